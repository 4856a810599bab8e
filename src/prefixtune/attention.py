"""The only module that knows transformers' attention internals.

A prefix enters the model through an attention function registered with `transformers.AttentionInterface`:
the model computes its own post-RoPE `query/key/value` (so GQA, odd `head_dim`, sliding windows and caches are
the model's business), and this function prepends each row's prefix keys/values, widens the mask, and calls the
stock `sdpa` or `eager` kernel. The generation KV cache therefore only ever holds real tokens.

Which prefix each row gets lives on a `PrefixRouter` that the model's attention modules point to. The router
holds a `PrefixBatch` only for the duration of one `PrefixModel.forward` / `generate` call.

Encoder-decoder and encoder-only models go through the same function. The probe tells each attention module's
role from what it is called with (no per-architecture code): "encoder" (bidirectional self-attention), "decoder"
(causal self-attention) or "cross" (decoder queries over encoder keys). A kernel that adds a relative position
bias (T5's `position_bias`) gets it widened with zeros: prefix columns carry no position.
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
# Attention roles, in the order locations are listed: encoder self-, decoder self-, decoder cross-attention.
ROLES = ("encoder", "decoder", "cross")
# Probe lengths: different for encoder and decoder inputs, so a call's (query, key) lengths tell its role.
_PROBE_ENCODER_TOKENS, _PROBE_DECODER_TOKENS = 3, 2


@dataclass
class PrefixBatch:
    """Prefix keys/values for one batch, one row per batch row (rows may use different adapters).

    keys, values: (L, B, H_kv, P, D), P = the longest prefix in the batch; shorter ones are padded.
    visible:      (L, B, P) bool, False for padding columns and where a row's adapter has no prefix at a layer.
    offsets:      (B,) long, added to each row's position ids (the PEFT convention puts real tokens at P..P+T-1).
    layers:       which layers any row has a prefix at (others are skipped); None = all.

    Facts read once when the batch is built, so that no attention call has to synchronize to learn them:
    all_visible:  every column of every row at every layer is visible (one adapter or equal lengths, all layers);
    layer_uniform: `visible` is the same at every layer (the widened mask can be shared by all layers);
    has_offsets:  some row's positions are shifted.
    """

    keys: torch.Tensor
    values: torch.Tensor
    visible: torch.Tensor
    offsets: torch.Tensor
    layers: frozenset[int] | None = None
    all_visible: bool = False
    layer_uniform: bool = False
    has_offsets: bool = True

    @property
    def rows(self) -> int:
        return self.visible.shape[1]

    @property
    def width(self) -> int:
        return self.visible.shape[2]

    def repeat_rows(self, times: int) -> PrefixBatch:
        """Each row repeated `times` times in place (generate's expansion for beams / num_return_sequences)."""
        return PrefixBatch(
            keys=self.keys.repeat_interleave(times, dim=1),
            values=self.values.repeat_interleave(times, dim=1),
            visible=self.visible.repeat_interleave(times, dim=1),
            offsets=self.offsets.repeat_interleave(times, dim=0),
            layers=self.layers,
            all_visible=self.all_visible,
            layer_uniform=self.layer_uniform,
            has_offsets=self.has_offsets,
        )


@dataclass
class PrefixRouter:
    """Shared by all attention modules of one model: which layer is which, and the current batch's prefixes."""

    layer_of: dict[int, int] = field(default_factory=dict)  # id(attention module) -> prefix layer index
    batch: PrefixBatch | None = None
    # When a list: attention calls append (module, query length, key, value) here instead of using a prefix.
    recording: list[tuple[nn.Module, int, torch.Tensor, torch.Tensor]] | None = None
    _expanded: tuple[PrefixBatch, PrefixBatch] | None = None  # (batch, batch with rows repeated)
    # The last widened mask, keyed by (batch, the model's mask object, (layer or -1, shapes, dtype, kind)). Every
    # layer of one forward gets the same mask object, so the widening happens once per forward, not per layer.
    _widened: tuple[PrefixBatch, torch.Tensor | None, tuple[Any, ...], torch.Tensor] | None = None

    def widened_mask(
        self,
        batch: PrefixBatch,
        layer: int,
        mask: torch.Tensor | None,
        q_len: int,
        kv_len: int,
        dtype: torch.dtype,
        eager: bool,
        causal: bool,
    ) -> torch.Tensor | None:
        """`mask` with the prefix columns prepended, or None where the kernel needs no mask at all: a decode step
        (one query, or a bidirectional layer) with nothing masked, whose prefix columns are all visible."""
        if mask is None and batch.all_visible and (q_len == 1 or not causal):
            return None
        facts = (-1 if batch.layer_uniform else layer, q_len, kv_len, dtype, eager, causal)
        cached = self._widened
        if cached is not None and cached[0] is batch and cached[1] is mask and cached[2] == facts:
            return cached[3]
        widened = _widen_mask(mask, batch.visible[layer], q_len, kv_len, dtype, eager, causal)
        self._widened = (batch, mask, facts, widened)  # holds `mask`, so its identity cannot be reused meanwhile
        return widened

    def clear(self) -> None:
        self.batch = None
        self._widened = None

    def batch_for(self, rows: int) -> PrefixBatch:
        """The current batch for a call with `rows` rows: generate repeats each input row for beams and
        num_return_sequences (an encoder-decoder runs its encoder on B rows and its decoder on B * beams)."""
        batch = self.batch
        assert batch is not None
        if rows == batch.rows:
            return batch
        if self._expanded is not None and self._expanded[0] is batch and self._expanded[1].rows == rows:
            return self._expanded[1]
        if batch.rows == 0 or rows % batch.rows:
            raise PrefixTuneError(
                f"the batch has {rows} rows but the prefix selection has {batch.rows}; pass one adapter name per row"
            )
        self._expanded = (batch, batch.repeat_rows(rows // batch.rows))
        return self._expanded[1]


def _eager_kernel(module: nn.Module) -> Callable[..., Any]:
    """The model's own eager attention function (GPT-2, Gemma etc. each have theirs)."""
    kernel = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if kernel is None:
        raise PrefixTuneError(
            f"{type(module).__name__} has no eager_attention_forward; load the model with attn_implementation='sdpa'"
        )
    return kernel


def _implicit_mask(q_len: int, kv_len: int, rows: int, causal: bool, device: torch.device) -> torch.Tensor:
    """(rows, 1, q_len, kv_len) bool: what a skipped (None) mask means; causal ones are bottom-right aligned."""
    if not causal:
        return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device).expand(rows, 1, q_len, kv_len)
    i = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    j = torch.arange(kv_len, device=device)[None, :]
    return (j <= i)[None, None].expand(rows, 1, q_len, kv_len)


def _widen_mask(
    mask: torch.Tensor | None,
    visible: torch.Tensor,
    q_len: int,
    kv_len: int,
    dtype: torch.dtype,
    eager: bool,
    causal: bool,
) -> torch.Tensor:
    """Prepend the prefix columns to a 4D mask. Bool masks: True = attend; float masks: additive (0 or min)."""
    rows, p = visible.shape
    if mask is None:
        mask = _implicit_mask(q_len, kv_len, rows, causal, visible.device)
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
            router.recording.append((module, query.shape[2], key.detach(), value.detach()))
        elif router is not None and router.batch is not None and router.batch.width > 0:
            layer = router.layer_of[id(module)]
            batch = router.batch_for(key.shape[0])
            if batch.layers is None or layer in batch.layers:
                causal = kwargs.get("is_causal")
                causal = getattr(module, "is_causal", True) if causal is None else causal
                attention_mask = router.widened_mask(
                    batch, layer, attention_mask, query.shape[2], key.shape[2], query.dtype, eager, bool(causal)
                )
                bias = kwargs.get("position_bias")
                if isinstance(bias, torch.Tensor) and bias.shape[-1] == key.shape[2]:  # T5: (B|1, H, T, S)
                    kwargs["position_bias"] = nn.functional.pad(bias, (batch.width, 0))  # no bias on the prefix
                prefix_k, prefix_v = batch.keys[layer], batch.values[layer]
                if prefix_k.dtype != key.dtype:
                    prefix_k, prefix_v = prefix_k.to(key.dtype), prefix_v.to(value.dtype)
                key = torch.cat([prefix_k, key], dim=2)  # (B, H_kv, P + S, D)
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
    """What the probe saw: attention modules in call order, each one's role, and their key shape (H_kv, D)."""

    modules: list[nn.Module]
    roles: list[str]  # one of ROLES per module
    num_kv_heads: int
    head_dim: int

    @property
    def num_layers(self) -> int:
        return len(self.modules)

    @property
    def locations(self) -> tuple[str, ...]:
        """The roles this model has, in ROLES order: ("decoder",) for a causal LM, ("encoder",) for BERT."""
        return tuple(r for r in ROLES if r in self.roles)

    def layers_of(self, locations: tuple[str, ...]) -> list[int]:
        """Indices (in call order) of the attention modules with one of these roles."""
        return [i for i, role in enumerate(self.roles) if role in locations]

    def split(self, kv: torch.Tensor, locations: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """A prefix over `layers_of(locations)` (L_cov, ...) -> one (L_loc, ...) tensor per location."""
        roles = [self.roles[i] for i in self.layers_of(locations)]
        return {loc: kv[[j for j, role in enumerate(roles) if role == loc]] for loc in locations}

    def join(self, parts: dict[str, torch.Tensor], locations: tuple[str, ...]) -> torch.Tensor:
        """The inverse of `split`: per-location tensors -> one prefix over `layers_of(locations)`."""
        next_row, start = {}, 0  # each location's next row in the concatenation below
        for loc in locations:
            next_row[loc], start = start, start + parts[loc].shape[0]
        index = []
        for i in self.layers_of(locations):
            index.append(next_row[self.roles[i]])
            next_row[self.roles[i]] += 1
        return torch.cat([parts[loc] for loc in locations])[index]


def _model_inputs(model: nn.Module, ids: torch.Tensor, decoder_ids: torch.Tensor) -> dict[str, Any]:
    """Inputs for a recording forward; only an encoder-decoder model reads `decoder_ids`."""
    inputs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = decoder_ids
    return inputs


def _role(module: nn.Module, query_len: int, key_len: int, encoder_decoder: bool) -> str:
    if query_len != key_len:
        return "cross"  # decoder queries over encoder keys
    if encoder_decoder:
        return "encoder" if query_len == _PROBE_ENCODER_TOKENS else "decoder"
    return "decoder" if getattr(module, "is_causal", True) else "encoder"


def probe_attention_layers(model: nn.Module, router: PrefixRouter) -> LayerLayout:
    """Run a tiny forward with a recording attention function to find every attention call, its role and shape.

    This is how a model whose attention does not go through the interface is detected: nothing is recorded.
    """
    candidates = [m for m in model.modules() if hasattr(m, "layer_idx") or "Attention" in type(m).__name__]
    for module in candidates:
        module.__dict__[_ROUTE_ATTR] = router
    router.recording = []
    try:
        device = next(model.parameters()).device
        ids = torch.zeros((1, _PROBE_ENCODER_TOKENS), dtype=torch.long, device=device)
        with torch.no_grad():
            model(**_model_inputs(model, ids, ids[:, :_PROBE_DECODER_TOKENS]))
        seen = router.recording
    finally:
        router.recording = None
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    modules: list[nn.Module] = []
    roles: list[str] = []
    shapes: set[tuple[int, int]] = set()
    for module, query_len, key, _ in seen:
        if all(module is not m for m in modules):
            modules.append(module)
            roles.append(_role(module, query_len, key.shape[2], encoder_decoder))
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
            f"{type(model).__name__} has attention layers with different key shapes {sorted(shapes)} "
            "(e.g. encoder and decoder head counts differ); prefixtune needs one (num_kv_heads, head_dim) for all"
        )
    router.layer_of = {id(m): i for i, m in enumerate(modules)}
    (num_kv_heads, head_dim) = shapes.pop()
    return LayerLayout(modules=modules, roles=roles, num_kv_heads=num_kv_heads, head_dim=head_dim)


def detach_router(layout: LayerLayout) -> None:
    for module in layout.modules:
        module.__dict__.pop(_ROUTE_ATTR, None)


@torch.no_grad()
def record_key_values(model: nn.Module, router: PrefixRouter, input_ids: torch.Tensor) -> torch.Tensor:
    """The frozen model's keys/values for `input_ids` (1, T): (L, 2, H_kv, T, D), no prefix applied.

    Post-RoPE for decoders. An encoder-decoder reads `input_ids` on both sides, so cross-attention keys are the
    encoder's outputs for the same text.
    """
    saved, router.batch, router.recording = router.batch, None, []
    was_training = model.training
    model.eval()  # no dropout in the activations we copy
    try:
        model(**_model_inputs(model, input_ids, input_ids))
        seen = router.recording
    finally:
        router.batch, router.recording = saved, None
        model.train(was_training)
    by_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, _, key, value in seen:
        by_layer.setdefault(router.layer_of[id(module)], (key[0], value[0]))
    return torch.stack([torch.stack(by_layer[i]) for i in range(len(router.layer_of))]).float()
