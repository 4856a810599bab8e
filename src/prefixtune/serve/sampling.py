"""Per-request sampling (temperature, top_p, seed) and detokenization with stop strings."""

from __future__ import annotations

import random
from collections.abc import Sequence
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
    stop_token_ids: list[int] = field(default_factory=list)  # ends the row as the EOS does (a chat's end of turn)

    def generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else random.getrandbits(63)
        return torch.Generator().manual_seed(seed)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from one row's logits (V,)."""
    if params.temperature <= 0.0:
        return int(logits.argmax())
    return sample_rows(logits[None], [params], [generator])[0]


# Below float32's smallest normal number a temperature changes nothing but ties (the largest logit takes all);
# clamped to it, (logits - max) / T stays finite and softmax well defined for any temperature the API accepts.
_MIN_TEMPERATURE = torch.finfo(torch.float32).tiny
_NUCLEUS_K = 512  # top-p looks at the k most likely tokens first, and widens k (x8) only where their mass falls short


def sample_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> list[int]:
    """One token id per row of `logits` (B, V), row i drawn with `params[i]` (temperature > 0) and `generators[i]`.

    Batched: one exp for all rows (no normalization needed: the draw scales by each row's total), top-p from a
    partial sort (top-k, widened only for rows that need more) instead of a sort of the whole vocabulary, and
    inverse-CDF draws (one uniform from each row's own generator, so a seed gives the same draws whatever else is
    in the batch) instead of a `torch.multinomial` call per row. On smollm2's logits (49k tokens, 64 rows, one
    CPU thread) a step's sampling takes 2-4x less time than softmax + sort + multinomial row by row.
    """
    weights = logits.detach().to("cpu", torch.float32)  # (B, V)
    rows, vocab = weights.shape
    temperature = torch.tensor([max(p.temperature, _MIN_TEMPERATURE) for p in params], dtype=torch.float32)
    # exp((logit - max) / T): the most likely token weighs 1, none overflows, whatever the temperature
    weights = torch.exp((weights - weights.max(dim=-1, keepdim=True).values) / temperature[:, None])
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        top_p = torch.tensor([params[i].top_p for i in nucleus], dtype=torch.float32)
        weights[nucleus] = _keep_nucleus(weights[nucleus], top_p)
    cdf = weights.double().cumsum(dim=-1)  # (B, V); float64 so that the sum of 49k small terms stays exact enough
    uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])  # (B,) in [0, 1)
    # the first token whose cumulative weight exceeds u * total: never a token of weight 0
    picks = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
    return picks.clamp_(max=vocab - 1).tolist()


def _keep_nucleus(weights: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose share of the row's weight reaches top_p (at
    least one token), row by row."""
    out = torch.zeros_like(weights)
    goal = top_p * weights.sum(dim=-1)  # (R,) the weight the kept tokens must reach
    todo = torch.arange(weights.shape[0])
    k = min(_NUCLEUS_K, weights.shape[1])
    while len(todo):
        values, order = weights[todo].topk(k, dim=-1)  # sorted, most likely first
        before = values.cumsum(dim=-1) - values  # weight of the strictly more likely tokens
        # settled when the top k reach the goal (or k is the whole vocabulary)
        done = (before[:, -1] + values[:, -1] >= goal[todo]) | (k == weights.shape[1])
        keep = before < goal[todo][:, None]
        keep[:, 0] = True  # never less than the most likely token, however small top_p is
        rows = todo[done]
        out[rows] = out[rows].scatter(1, order[done], torch.where(keep[done], values[done], 0.0))
        todo, k = todo[~done], min(k * 8, weights.shape[1])
    return out


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
        """Everything not yet emitted (the request is finished for another reason than a stop string).

        Text still held back because the last tokens end inside a character is decoded now, as it stands (the
        unfinished character as U+FFFD), so that the whole text is what decoding the completion adds; it is cut
        at a stop string if it completes one."""
        if self.read_at < len(self.ids):
            before = self.tokenizer.decode(self.ids[self.prefix_at : self.read_at], skip_special_tokens=True)
            after = self.tokenizer.decode(self.ids[self.prefix_at :], skip_special_tokens=True)
            start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
            self.text += after[len(before) :]
            self.prefix_at, self.read_at = self.read_at, len(self.ids)
            hits = [at for s in self.stop if (at := self.text.find(s, start)) != -1]
            if hits:
                self.text = self.text[: max(min(hits), self.sent)]
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
