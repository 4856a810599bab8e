"""Per-request sampling (temperature, top_p, seed) and detokenization with stop strings."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplingParams:
    """What one request asks for. temperature 0 = greedy; seed None = a fresh random seed."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    def generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else random.getrandbits(63)
        return torch.Generator().manual_seed(seed)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from one row's logits (V,)."""
    if params.temperature <= 0.0:
        return int(logits.argmax())
    # float64, and the largest logit subtracted first: any temperature > 0 the API accepts (1e-45 too) gives
    # finite probabilities (in float32, logits / 1e-45 overflow to inf and softmax returns NaN)
    logits = logits.detach().to("cpu", torch.float64)
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the strictly more likely tokens
        drop = before >= params.top_p  # the smallest set whose mass reaches top_p is kept
        drop[0] = False  # and never less than the most likely token, however small top_p is
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Token ids in, text deltas out; holds back text that could be the start of a stop string.

    Incremental detokenization (as vLLM does it): only a short window of ids is decoded per token, starting a
    few prompt tokens back, so the completion's text is exactly what decoding prompt + completion adds to the
    prompt's text (leading spaces included), multi-byte characters split across tokens wait until whole, and a
    long completion costs O(length), not O(length^2).
    """

    CONTEXT = 5  # prompt tokens decoded along with the first completion tokens

    def __init__(self, tokenizer: Any, stop: list[str], prompt_ids: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = list((prompt_ids or [])[-self.CONTEXT :])
        self.prefix_at = 0  # ids[prefix_at:read_at] were decoded last time (context for the new ids)
        self.read_at = len(self.ids)
        self.text = ""  # the completion so far (cut at a stop string once one is seen)
        self.sent = 0  # characters of self.text already emitted

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; returns (text to emit now, whether a stop string was reached)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix_at : self.read_at], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix_at :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):  # nothing new yet, or half a character
            return "", False
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += after[len(before) :]
        self.prefix_at, self.read_at = self.read_at, len(self.ids)
        hits = [at for s in self.stop if (at := self.text.find(s, start)) != -1]
        if hits:
            self.text = self.text[: min(hits)]  # the earliest stop string wins; it is not part of the output
            return self._emit(len(self.text)), True
        return self._emit(len(self.text) - self._held_back(self.text)), False

    def flush(self) -> str:
        """Everything not yet emitted (the request is finished for another reason than a stop string)."""
        return self._emit(len(self.text))

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.sent)
        delta, self.sent = self.text[self.sent : upto], upto
        return delta
