"""The only module that knows transformers' attention internals.

A prefix enters the model through an attention function registered with `transformers.AttentionInterface`:
the model computes its own post-RoPE `query/key/value` (so GQA, odd `head_dim`, sliding windows and caches are
the model's business), and this function prepends each row's prefix keys/values, widens the mask, and calls the
stock `sdpa` or `eager` kernel. The generation KV cache therefore only ever holds real tokens.

Which prefix each row gets lives on a `PrefixRouter` that the model's attention modules point to. The router
holds a `PrefixBatch` only for the duration of one `PrefixModel.forward` / `generate` call.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .errors import PrefixTuneError

# Our implementation name for each stock kernel we wrap.
PREFIX_IMPLEMENTATIONS = {"sdpa": "prefixtune_sdpa", "eager": "prefixtune_eager"}
_ROUTE_ATTR = "_prefixtune_route"


@dataclass
class PrefixBatch:
    """Prefix keys/values for one batch, one row per batch row (rows may use different adapters).

    keys, values: (L, B, H_kv, P, D), P = the longest prefix in the batch; shorter ones are padded.
    visible:      (B, P) bool, False for padding columns and for rows without a prefix.
    offsets:      (B,) long, added to each row's position ids (the PEFT convention puts real tokens at P..P+T-1).
    """

    keys: torch.Tensor
    values: torch.Tensor
    visible: torch.Tensor
    offsets: torch.Tensor

    @property
    def rows(self) -> int:
        return self.visible.shape[0]

    def repeat_rows(self, times: int) -> PrefixBatch:
        """Each row repeated `times` times in place (generate's expansion for beams / num_return_sequences)."""
        return PrefixBatch(
            keys=self.keys.repeat_interleave(times, dim=1),
            values=self.values.repeat_interleave(times, dim=1),
            visible=self.visible.repeat_interleave(times, dim=0),
            offsets=self.offsets.repeat_interleave(times, dim=0),
        )


@dataclass
class PrefixRouter:
    """Shared by all attention modules of one model: which layer is which, and the current batch's prefixes."""

    layer_of: dict[int, int] = field(default_factory=dict)  # id(attention module) -> prefix layer index
    batch: PrefixBatch | None = None
    # When a list: attention calls append (module, key, value) here instead of using a prefix.
    recording: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] | None = None


def _eager_kernel(module: nn.Module) -> Callable[..., Any]:
    """The model's own eager attention function (GPT-2, Gemma etc. each have theirs)."""
    kernel = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if kernel is None:
        raise PrefixTuneError(
            f"{type(module).__name__} has no eager_attention_forward; load the model with attn_implementation='sdpa'"
        )
    return kernel


def _causal_mask(q_len: int, kv_len: int, rows: int, device: torch.device) -> torch.Tensor:
    """(rows, 1, q_len, kv_len) bool, bottom-right aligned: what a skipped (None) causal mask means."""
    i = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    j = torch.arange(kv_len, device=device)[None, :]
    return (j <= i)[None, None].expand(rows, 1, q_len, kv_len)


def _widen_mask(
    mask: torch.Tensor | None, visible: torch.Tensor, q_len: int, kv_len: int, dtype: torch.dtype, eager: bool
) -> torch.Tensor:
    """Prepend the prefix columns to a 4D mask. Bool masks: True = attend; float masks: additive (0 or min)."""
    rows, p = visible.shape
    if mask is None:
        mask = _causal_mask(q_len, kv_len, rows, visible.device)
        if eager:
            mask = torch.zeros((), dtype=dtype, device=visible.device).masked_fill(~mask, torch.finfo(dtype).min)
    mask = mask.expand(rows, -1, -1, -1)
    prefix_part = visible[:, None, None, :].expand(rows, mask.shape[1], mask.shape[2], p)
    if mask.dtype != torch.bool:
        zero = torch.zeros((), dtype=mask.dtype, device=mask.device)
        prefix_part = zero.masked_fill(~prefix_part, torch.finfo(mask.dtype).min).expand_as(prefix_part)
    return torch.cat([prefix_part, mask], dim=-1)


def _make_prefix_attention(base: str) -> Callable[..., Any]:
    eager = base == "eager"

    def prefix_attention(
        module: nn.Module,
        query: torch.Tensor,  # (B, H, T, D)
        key: torch.Tensor,  # (B, H_kv, S, D), real tokens only (cache included)
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        kernel = _eager_kernel(module) if eager else sdpa_attention_forward
        router: PrefixRouter | None = module.__dict__.get(_ROUTE_ATTR)
        if router is not None and router.recording is not None:
            router.recording.append((module, key.detach(), value.detach()))
        elif router is not None and router.batch is not None and router.batch.visible.shape[1] > 0:
            batch = router.batch
            layer = router.layer_of[id(module)]
            if batch.rows != key.shape[0]:
                raise PrefixTuneError(
                    f"the batch has {key.shape[0]} rows but the prefix selection has {batch.rows}; "
                    "pass one adapter name per row"
                )
            prefix_k = batch.keys[layer].to(key.dtype)  # (B, H_kv, P, D)
            prefix_v = batch.values[layer].to(value.dtype)
            attention_mask = _widen_mask(
                attention_mask, batch.visible, query.shape[2], key.shape[2], query.dtype, eager
            )
            key = torch.cat([prefix_k, key], dim=2)
            value = torch.cat([prefix_v, value], dim=2)
        return kernel(module, query, key, value, attention_mask, *args, **kwargs)

    return prefix_attention


for _base, _name in PREFIX_IMPLEMENTATIONS.items():
    AttentionInterface.register(_name, _make_prefix_attention(_base))
    AttentionMaskInterface.register(_name, eager_mask if _base == "eager" else sdpa_mask)


def _implementation(model: nn.Module) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def route_through_prefix(model: nn.Module) -> str:
    """Switch `model` to our attention implementation; returns the stock one it had (to switch back)."""
    current = _implementation(model)
    if current in PREFIX_IMPLEMENTATIONS.values():
        return next(base for base, ours in PREFIX_IMPLEMENTATIONS.items() if ours == current)
    if current not in PREFIX_IMPLEMENTATIONS:
        raise PrefixTuneError(
            f"{type(model).__name__} uses attn_implementation={current!r}; prefixtune works with 'sdpa' or 'eager' "
            "(load the model with attn_implementation='sdpa')"
        )
    model.set_attn_implementation(PREFIX_IMPLEMENTATIONS[current])
    return current


def restore_implementation(model: nn.Module, base: str) -> None:
    model.set_attn_implementation(base)


@dataclass(frozen=True)
class LayerLayout:
    """What the probe saw: attention modules in call order and their key shape (H_kv, D)."""

    modules: list[nn.Module]
    num_kv_heads: int
    head_dim: int

    @property
    def num_layers(self) -> int:
        return len(self.modules)


def probe_attention_layers(model: nn.Module, router: PrefixRouter) -> LayerLayout:
    """Run a 2-token forward with a recording attention function to find every attention call and its shape.

    This is how a model whose attention does not go through the interface is detected: nothing is recorded.
    """
    candidates = [m for m in model.modules() if hasattr(m, "layer_idx") or "Attention" in type(m).__name__]
    for module in candidates:
        module.__dict__[_ROUTE_ATTR] = router
    router.recording = []
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), use_cache=False)
        seen = router.recording
    finally:
        router.recording = None
    modules: list[nn.Module] = []
    shapes: set[tuple[int, int]] = set()
    for module, key, _ in seen:
        if all(module is not m for m in modules):
            modules.append(module)
            shapes.add((key.shape[1], key.shape[3]))
    for module in candidates:
        if all(module is not m for m in modules):
            del module.__dict__[_ROUTE_ATTR]
    if not modules:
        raise PrefixTuneError(
            f"{type(model).__name__}: no attention call went through transformers' AttentionInterface, "
            "so a prefix cannot be attached to this model"
        )
    if len(shapes) != 1:
        raise PrefixTuneError(
            f"{type(model).__name__} has attention layers with different key shapes {sorted(shapes)}; "
            "prefixtune needs one (num_kv_heads, head_dim) for all layers"
        )
    router.layer_of = {id(m): i for i, m in enumerate(modules)}
    (num_kv_heads, head_dim) = shapes.pop()
    return LayerLayout(modules=modules, num_kv_heads=num_kv_heads, head_dim=head_dim)


def detach_router(layout: LayerLayout) -> None:
    for module in layout.modules:
        module.__dict__.pop(_ROUTE_ATTR, None)


@torch.no_grad()
def record_key_values(model: nn.Module, router: PrefixRouter, input_ids: torch.Tensor) -> torch.Tensor:
    """The frozen model's post-RoPE keys/values for `input_ids` (1, T): (L, 2, H_kv, T, D), no prefix applied."""
    saved, router.batch, router.recording = router.batch, None, []
    was_training = model.training
    model.eval()  # no dropout in the activations we copy
    try:
        model(input_ids=input_ids, use_cache=False)
        seen = router.recording
    finally:
        router.batch, router.recording = saved, None
        model.train(was_training)
    by_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, key, value in seen:
        by_layer.setdefault(router.layer_of[id(module)], (key[0], value[0]))
    return torch.stack([torch.stack(by_layer[i]) for i in range(len(router.layer_of))]).float()
