"""Log-probabilities: computed on the model thread from logits (token ids and floats only), put into OpenAI's
completion and chat shapes on the HTTP side (token texts from the HTTP side's tokenizer).

They are the model's own distribution, `log_softmax` of the logits in float32, before temperature and top_p
(vLLM's default, "raw" log-probabilities), whatever the request samples with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

FLOOR = -9999.0  # what -inf becomes: JSON has no infinity (OpenAI and vLLM answer -9999.0 too)


@dataclass
class TokenLogprob:
    """One position: its token, that token's log-probability and the k likeliest tokens there, likeliest first.

    `logprob` is None for a prompt's first token (nothing comes before it to predict it from).
    """

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


def logprobs_of(logits: torch.Tensor, tokens: Sequence[int], ks: Sequence[int]) -> list[TokenLogprob]:
    """Row i of `logits` (N, V): the log-probability of `tokens[i]` and of the `ks[i]` likeliest tokens."""
    if not len(tokens):
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    ids = torch.tensor(list(tokens), dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(1, ids[:, None])[:, 0].tolist()
    k = min(max(ks), logprobs.shape[-1])
    values, index = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], ids[:, None][:, :0])
    values, index = values.tolist(), index.tolist()
    return [
        TokenLogprob(token, lp, list(zip(index[i][: ks[i]], values[i][: ks[i]])))
        for i, (token, lp) in enumerate(zip(tokens, chosen))
    ]


def prompt_logprobs(logits: torch.Tensor, prompt: Sequence[int], k: int) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the tokens before it, from the prompt's logits (T, V)."""
    first = TokenLogprob(prompt[0], None)
    return [first, *logprobs_of(logits[: len(prompt) - 1], prompt[1:], [k] * (len(prompt) - 1))]


def _number(value: float) -> float | None:
    """A log-probability JSON can carry: -inf as FLOOR, NaN (a broken model) as null."""
    if math.isnan(value):
        return None
    return max(value, FLOOR)


def completion_logprobs(
    entries: Sequence[TokenLogprob], k: int, token_text: Callable[[int], str], offset: int
) -> tuple[dict[str, Any], int]:
    """OpenAI's completion `logprobs` object for these positions, and the text offset after them.

    top_logprobs[i] maps token text -> log-probability for the position's own token and its k likeliest (vLLM's
    k + 1); text_offset[i] is `offset` plus the lengths of the token texts before it.
    """
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for entry in entries:
        text = token_text(entry.token)
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
        if entry.logprob is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_number(entry.logprob))
        top = {text: _number(entry.logprob)}  # the likelier alternatives overwrite a token of the same text
        top.update({token_text(t): _number(lp) for t, lp in entry.top[:k]})
        top_logprobs.append(top)
    body = {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }
    return body, offset


def chat_logprobs(
    entries: Sequence[TokenLogprob], k: int, token_text: Callable[[int], str], token_bytes: Callable[[int], list[int]]
) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal"}."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        return {"token": token_text(token), "logprob": _number(logprob), "bytes": token_bytes(token)}

    content = [
        one(e.token, e.logprob) | {"top_logprobs": [one(t, lp) for t, lp in e.top[:k]]}
        for e in entries
        if e.logprob is not None
    ]
    return {"content": content, "refusal": None}
