"""Decoding without copying the prefix each step: each layer's prefix stored once, in front of its cached tokens.

Without this, every decode step of every layer concatenates the prefix in front of the whole cached key/value
tensor (prefix.py), an O(cache length) copy on top of the one transformers' `DynamicLayer.update` already makes.
`PrefixLayer` is a `DynamicLayer` whose storage starts with its layer's P prefix columns, written once at the
first update (the prefill), so the attention function gets keys (B, H_kv, P + S, D) and concatenates nothing.
`get_seq_length` (and so `get_mask_sizes`, position ids, generate's lengths and stopping) counts real tokens only.
Beam reordering, row selection and cropping act on the batch dimension or the end, so they keep working. The
tensors a `PrefixLayer` returns carry their prefix width as an attribute (`prefix.STORED_ATTR`), so only those
skip the concatenation, also when the cache is passed on to a later call. Layers that are not a plain
`DynamicLayer` (sliding windows drop old tokens, and would drop the prefix with them) keep transformers' own
layer and the concatenating path, as do encoder-decoders.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .cache_argument import cache_argument, cache_from
from .layers import LayerLayout
from .prefix import FAST_PATHS, STORED_ATTR, PrefixBatch


class PrefixLayer(DynamicLayer):
    """A cache layer holding `batch`'s prefix for prefix layer `layer` in front of the real tokens."""

    def __init__(self, batch: PrefixBatch, layer: int) -> None:
        super().__init__()
        self.batch, self.layer, self.width = batch, layer, batch.width

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:  # the prefill: the storage starts with this layer's prefix (B, H_kv, P, D)
            self.lazy_initialization(key_states, value_states)
            keys, values = self.batch.for_rows(key_states.shape[0]).layer_kv(self.layer)
            self.keys = keys.to(key_states.device, key_states.dtype)
            self.values = values.to(value_states.device, value_states.dtype)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.batch.stored.add(self.layer)
        setattr(self.keys, STORED_ATTR, self.width)  # tells the attention function not to prepend the prefix again
        setattr(self.values, STORED_ATTR, self.width)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return 0
        return self.keys.shape[-2] - self.width


def generate_cache(model: nn.Module, layout: LayerLayout, batch: PrefixBatch, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The cache keyword to add to a `generate` call so that its decode steps copy no prefix: {} where it does not
    apply (no prefix, fast paths off, a cache passed in, caching off or not dynamic, an encoder-decoder, or
    attention modules that do not name their cache index), which leaves the concatenating path."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
    if (
        batch.width == 0
        or not FAST_PATHS.get()
        or cache_from(kwargs) is not None
        or use_cache is False
        or getattr(config, "cache_implementation", None) not in (None, "dynamic")
        or getattr(model.config, "is_encoder_decoder", False)
        or set(layout.roles) != {"decoder"}
    ):
        return {}
    by_index = {getattr(module, "layer_idx", None): i for i, module in enumerate(layout.modules)}
    if len(by_index) != layout.num_layers or not all(isinstance(idx, int) and idx >= 0 for idx in by_index):
        return {}
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    if not cache.layers:  # no layer structure in the config: transformers would add plain layers as they are used
        cache.layers.extend(DynamicLayer() for _ in range(max(by_index) + 1))
    for idx, layer in by_index.items():
        if idx < len(cache.layers) and type(cache.layers[idx]) is DynamicLayer:
            if batch.layers is None or layer in batch.layers:
                cache.layers[idx] = PrefixLayer(batch, layer)
    return {cache_argument(type(model)): cache}
