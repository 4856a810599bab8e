"""Finding a model's attention layers and their roles (the probe), and recording their keys/values.

The probe switches the model to our attention implementation (prefix.py) and runs a tiny forward whose attention
calls record themselves (`prefix_record=` keyword). What each call is called with tells its role, with no
per-architecture code: "encoder" (bidirectional self-attention), "decoder" (causal self-attention) or "cross"
(decoder queries over encoder keys). Each attention module found gets its prefix layer index as an integer
attribute (`prefix.LAYER_ATTR`), which the attention function reads and `copy.deepcopy` keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import PrefixTuneError
from .prefix import LAYER_ATTR, LOCATIONS, PREFIX_IMPLEMENTATIONS, RECORD_KWARG, UNROUTED

ROLES = LOCATIONS  # a layer's role is the location a prefix there has, in this order
# Probe lengths: different for encoder and decoder inputs, so a call's (query, key) lengths tell its role.
_PROBE_ENCODER_TOKENS, _PROBE_DECODER_TOKENS = 3, 2
# Kernels refused with a prefix, and why (docs/performance.md: measured on torch 2.13 / transformers 5.23, CPU).
REFUSED_IMPLEMENTATIONS = {
    "flex_attention": "torch's flex_attention has no backward on CPU and would need a new block mask per call",
    "flash_attention_2": "its varlen kernel takes no prefix block and is not tested here (needs flash-attn and CUDA)",
}


def _implementation(model: nn.Module) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def route_through_prefix(model: nn.Module) -> str:
    """Switch `model` to our attention implementation; returns the stock one it had (to switch back)."""
    current = _implementation(model)
    if current in PREFIX_IMPLEMENTATIONS.values():
        return next(base for base, ours in PREFIX_IMPLEMENTATIONS.items() if ours == current)
    if current in REFUSED_IMPLEMENTATIONS:
        raise PrefixTuneError(
            f"attn_implementation={current!r} cannot take a prefix ({REFUSED_IMPLEMENTATIONS[current]}); load the "
            "model with attn_implementation='sdpa', whose unmasked prefill runs SDPA's flash/efficient kernels"
        )
    if current not in PREFIX_IMPLEMENTATIONS:
        raise PrefixTuneError(
            f"{type(model).__name__} uses attn_implementation={current!r}; prefixtune works with 'sdpa' or 'eager' "
            "(load the model with attn_implementation='sdpa')"
        )
    model.set_attn_implementation(PREFIX_IMPLEMENTATIONS[current])
    return current


def restore_implementation(model: nn.Module, base: str) -> None:
    """Switch `model` back to the stock attention implementation `base`."""
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


def probe_attention_layers(model: nn.Module) -> LayerLayout:
    """Run a tiny forward whose attention calls record themselves: every attention call, its role and key shape.

    `model` must already use our implementation (`route_through_prefix`). A model whose attention does not go
    through the interface records nothing; one that does not pass its forward keyword arguments down to the
    attention function cannot be handed a prefix batch (no tested architecture does that): both are refused.
    """
    seen: list[tuple[nn.Module, int, torch.Tensor, torch.Tensor]] = []
    unrouted: list[nn.Module] = []
    device = next(model.parameters()).device
    ids = torch.zeros((1, _PROBE_ENCODER_TOKENS), dtype=torch.long, device=device)
    token = UNROUTED.set(unrouted)
    try:
        with torch.no_grad():
            model(**_model_inputs(model, ids, ids[:, :_PROBE_DECODER_TOKENS]), **{RECORD_KWARG: seen})
    finally:
        UNROUTED.reset(token)
    if unrouted:
        raise PrefixTuneError(
            f"{type(model).__name__}: {type(unrouted[0]).__name__} is not handed the forward's keyword arguments, so "
            "a prefix cannot reach it; prefixtune needs a model whose attention receives them (transformers 5 models)"
        )
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    modules: list[nn.Module] = []
    roles: list[str] = []
    shapes: set[tuple[int, int]] = set()
    for module, query_len, key, _ in seen:
        if all(module is not m for m in modules):
            modules.append(module)
            roles.append(_role(module, query_len, key.shape[2], encoder_decoder))
            shapes.add((key.shape[1], key.shape[3]))
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
    for index, module in enumerate(modules):
        setattr(module, LAYER_ATTR, index)
    (num_kv_heads, head_dim) = shapes.pop()
    return LayerLayout(modules=modules, roles=roles, num_kv_heads=num_kv_heads, head_dim=head_dim)


def release_layers(layout: LayerLayout) -> None:
    """Remove the layer indices the probe set (the model goes back to being a plain model)."""
    for module in layout.modules:
        module.__dict__.pop(LAYER_ATTR, None)


@torch.no_grad()
def record_key_values(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The frozen model's keys/values for `input_ids` (1, T): (L, 2, H_kv, T, D), no prefix applied.

    Post-RoPE for decoders. An encoder-decoder reads `input_ids` on both sides, so cross-attention keys are the
    encoder's outputs for the same text.
    """
    seen: list[tuple[nn.Module, int, torch.Tensor, torch.Tensor]] = []
    was_training = model.training
    model.eval()  # no dropout in the activations we copy
    try:
        model(**_model_inputs(model, input_ids, input_ids), **{RECORD_KWARG: seen})
    finally:
        model.train(was_training)
    by_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, _, key, value in seen:
        by_layer.setdefault(getattr(module, LAYER_ATTR), (key[0], value[0]))  # each (H_kv, T, D)
    return torch.stack([torch.stack(by_layer[i]) for i in range(len(by_layer))]).float()


def layer_places(layout: LayerLayout) -> list[tuple[torch.device, torch.dtype]]:
    """Each attention layer's own (device, dtype), read from its own first floating-point tensor: under
    device_map="auto" the layers sit on different GPUs, and a layer's prefix must be where its keys are.
    Read on every call (a model may have been moved since), so it walks the module dicts directly: ~1 us a layer."""
    places = []
    for module in layout.modules:
        tensor = _first_tensor(module, floating=True)
        if tensor is not None:
            places.append((tensor.device, tensor.dtype))
        else:  # no floating-point weights of its own (quantized): its device, keys in the default dtype
            any_tensor = _first_tensor(module, floating=False)
            device = any_tensor.device if any_tensor is not None else torch.device("cpu")
            places.append((device, torch.get_default_dtype()))
    return places


def _first_tensor(module: nn.Module, floating: bool) -> torch.Tensor | None:
    """The first parameter or buffer of `module` and its submodules (breadth first), floating-point if asked."""
    queue = [module]
    while queue:
        current = queue.pop(0)
        for tensor in (*current._parameters.values(), *current._buffers.values()):
            if tensor is not None and (tensor.is_floating_point() or not floating):
                return tensor
        queue.extend(m for m in current._modules.values() if m is not None)
    return None


class PerLayer:
    """Per-layer tensors, each on its own layer's device and in its dtype, standing in for a stacked (L, B, ...)
    tensor of a PrefixBatch: `[layer]` gives that layer's (B, ...) slice, `.shape` the stacked shape, and
    `repeat_interleave(k, dim=1)` repeats rows as the stacked tensor would (beams, num_return_sequences)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.tensors[layer]

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.tensors), *self.tensors[0].shape)

    def repeat_interleave(self, times: int, dim: int) -> PerLayer:
        if dim != 1:
            raise ValueError("PerLayer repeats rows (dim 1 of the stacked form) only")
        return PerLayer([t.repeat_interleave(times, dim=0) for t in self.tensors])


def place_per_layer(
    places: list[tuple[torch.device, torch.dtype]],
    keys: torch.Tensor,  # (L, B, H_kv, P, D)
    values: torch.Tensor,  # (L, B, H_kv, P, D)
    visible: torch.Tensor,  # (L, B, P) bool
) -> tuple[PerLayer, PerLayer, PerLayer]:
    """A stacked prefix batch split into per-layer tensors, each moved to its layer's device and dtype (gradients
    flow back through the copies)."""
    # unbind, not keys[i] per layer: the backward of one unbind is one stack, where per-layer indexing gives one
    # zero-filled gradient of the whole stacked tensor per layer (PrefixBatch.layer_kv does the same).
    return (
        PerLayer([k.to(device=d, dtype=t) for k, (d, t) in zip(keys.unbind(0), places)]),
        PerLayer([v.to(device=d, dtype=t) for v, (d, t) in zip(values.unbind(0), places)]),
        PerLayer([m.to(device=d) for m, (d, _) in zip(visible.unbind(0), places)]),
    )
