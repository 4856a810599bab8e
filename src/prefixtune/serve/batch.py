"""The running batch: rows that joined at different times share one left-padded KV cache.

Continuous batching at the token level: new rows are prefilled together (left-padded) and merged into the
running cache between decode steps; finished rows are dropped between decode steps. Each row keeps its own
adapter (per-row `adapter_names`), its own real length, and hence its own position ids:

    cache keys/values  (B, H_kv, S, D)   S = the longest row; shorter rows are padded on the left
    mask               (B, S)            1 for real tokens, 0 for padding
    lengths            (B,)              real tokens of each row = the position id of its next token

Position ids are passed explicitly (real index of each token); `PrefixModel`'s pre-hook adds each row's prefix
offset (the PEFT convention) on top. The cache holds real tokens only; prefixes are attached in attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from inspect import signature
from typing import Any

import torch
from transformers import DynamicCache

from ..cache_argument import cache_argument
from ..model import PrefixModel
from ..prefix import BATCH_KWARG, PrefixBatch


class RunningBatch:
    """Rows being decoded together. Not thread-safe: only the scheduler's model thread touches it."""

    def __init__(self, model: PrefixModel, pad_token_id: int = 0) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = next(model.base_model.parameters()).device
        self._reset()
        # Only the last position's logits are needed: skip the (B, T, vocab) projection of a prefill if we can.
        self._last_only = (
            {"logits_to_keep": 1} if "logits_to_keep" in signature(model.base_model.forward).parameters else {}
        )

    def _reset(self) -> None:
        self.adapters: list[str] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (B, S)
        self.lengths = torch.zeros((0,), dtype=torch.long, device=self.device)  # (B,)
        self._prefix: PrefixBatch | None = None  # rebuilt only when the rows change

    def __len__(self) -> int:
        return len(self.adapters)

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]], adapters: Sequence[str]) -> torch.Tensor:
        """Run the new rows' prompts (left-padded together), append the rows; returns their last logits (B_new, V)."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real index of each token; padding at 0
        cache = DynamicCache()
        logits = self._forward(list(adapters), self._prefix_for(adapters), ids, mask, positions, cache)  # (B_new, V)
        self._merge(cache, mask, list(adapters))
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: each row's next token (B,) in, each row's logits (B, V) out."""
        assert self.cache is not None and len(self) == tokens.shape[0]
        ones = torch.ones((len(self), 1), dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        if self._prefix is None:
            self._prefix = self._prefix_for(self.adapters)
        logits = self._forward(
            self.adapters, self._prefix, tokens.to(self.device)[:, None], self.mask, self.lengths[:, None], self.cache
        )
        self.lengths = self.lengths + 1
        return logits

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows (in this order); drop cache columns that are padding in every remaining row."""
        if len(rows) == len(self) and list(rows) == list(range(len(self))):
            return
        if not rows:
            self._reset()
            return
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        mask = self.mask[index]
        first = int(mask.any(dim=0).nonzero()[0])  # leading columns that no remaining row uses
        assert self.cache is not None
        layers = [(k[index, :, first:], v[index, :, first:]) for k, v in _layers(self.cache)]
        self.cache = _cache_from(layers)
        self.mask = mask[:, first:]
        self.lengths = self.lengths[index]
        self.adapters = [self.adapters[i] for i in rows]
        self._prefix = None

    # ----- internals ----------------------------------------------------------------------------------------

    def _prefix_for(self, adapters: Sequence[str]) -> PrefixBatch:
        return self.model.prefix_batch(list(adapters), len(adapters))

    def _forward(
        self,
        adapters: list[str],
        prefix: PrefixBatch,
        ids: torch.Tensor,  # (B, T)
        mask: torch.Tensor,  # (B, S_past + T)
        positions: torch.Tensor,  # (B, T) real positions; the pre-hook adds prefix offsets
        cache: DynamicCache,
    ) -> torch.Tensor:
        # The base model directly (the rows' prefix batch is built once per set of rows, not once per step);
        # the batch rides in the forward's keyword arguments down to the attention function and the position hook.
        out = self.model.base_model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_argument(type(self.model.base_model)): cache, BATCH_KWARG: prefix},
            **self._last_only,
        )
        return out.logits[:, -1, :].float()  # (B, V); left padding puts every row's last token last

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, adapters: list[str]) -> None:
        """Append prefilled rows to the running rows, left-padding whichever cache is shorter."""
        lengths = mask.sum(dim=1)
        if self.cache is None or len(self) == 0:
            self.cache, self.mask, self.lengths, self.adapters = cache, mask, lengths, adapters
            self._prefix = None
            return
        width = max(self.mask.shape[1], mask.shape[1])
        old, new = _layers(self.cache), _layers(cache)
        layers = [
            (
                torch.cat([_pad_left(k0, width), _pad_left(k1, width)]),
                torch.cat([_pad_left(v0, width), _pad_left(v1, width)]),
            )
            for (k0, v0), (k1, v1) in zip(old, new)
        ]
        self.cache = _cache_from(layers)
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(mask, width, dim=1)])
        self.lengths = torch.cat([self.lengths, lengths])
        self.adapters = self.adapters + adapters
        self._prefix = None


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]  # each (B, H_kv, S, D)


def _cache_from(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def _pad_left(x: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zero-pad `x` on the left of `dim` up to `width` (padding columns are masked out)."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape: list[Any] = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
