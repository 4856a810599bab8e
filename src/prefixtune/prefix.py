"""The mechanism: prefix config, trainable encoder, per-call prefix batch, attention function, position offsets.

Each attention layer gets P "virtual tokens" of keys and values, prepended after the layer's own projection and
rotary embedding inside an attention function registered with `transformers.AttentionInterface`: the model
computes its own query/key/value (GQA, odd head dims, sliding windows and caches are its business), we prepend
each row's prefix, widen the mask and call the stock `sdpa` or `eager` kernel. The KV cache holds real tokens.
Each call's `PrefixBatch` arrives as data, `base_model(..., prefix_batch=batch)`: transformers 5 hands a forward's
keyword arguments down to every attention call (generate's model kwargs reach every forward, checkpoint replays
get them again), so nothing about a call lives on the model: deep copies and concurrent threads just work.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.attention.bias import CausalBias, causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .cache_argument import cache_from
from .errors import PrefixTuneError, is_dropout_rate
from .masks import widen_mask as _widen_mask  # a module global: the tests count the dense widenings through it

Init = Literal["random", "vocab", "text", "data"]
PositionConvention = Literal["peft", "zero"]
# Where a prefix can go: encoder self-attention, decoder self-attention, decoder cross-attention (over the encoder).
LOCATIONS = ("encoder", "decoder", "cross")
PREFIX_IMPLEMENTATIONS = {"sdpa": "prefixtune_sdpa", "eager": "prefixtune_eager"}  # stock kernel -> ours
BATCH_KWARG = "prefix_batch"  # forward keyword: this call's PrefixBatch
RECORD_KWARG = "prefix_record"  # forward keyword: a list that attention calls append (module, T, keys, values) to
LAYER_ATTR = "prefixtune_layer"  # int set on each attention module by the probe: its prefix layer (survives deepcopy)
# Only while the probe runs: attention calls that arrived without our keyword (a model that drops its kwargs).
UNROUTED: ContextVar[list[nn.Module] | None] = ContextVar("prefixtune_unrouted", default=None)
# False: every call takes the general path (dense widened mask, prefix concatenated in every decode step), which
# the tests compare the fast paths against (lower-right causal SDPA; the prefix kept in the cache, decode_cache.py).
FAST_PATHS: ContextVar[bool] = ContextVar("prefixtune_fast_paths", default=True)
_NO_CACHE = "generate with past_key_values=DynamicCache() to keep the prefix out of the cache"
STORED_ATTR = "prefixtune_stored"  # on keys/values a decode cache returns: the prefix columns in front of them


@dataclass
class PrefixConfig:
    """How a prefix is shaped, parameterized and initialized.

    num_virtual_tokens: P, the prefix length (virtual tokens per layer).
    reparameterize:     train through Li & Liang's tanh MLP (collapsed to the direct form when saved).
    projection_dim:     k, the width of the (P, k) matrix and of the MLP's hidden layer (paper: 512).
    init:               "random" (N(0, 1) as PEFT), "vocab" (the frozen model's keys/values for sampled
                        vocabulary tokens), "text" (its keys/values for `init_text`: real-word activations) or
                        "data" (as "text", for a description `prefixtune train` derives from the training data:
                        structured inputs' field names, e.g. E2E's, or free text's shared words; data/describe.py).
    init_text:          the text for init="text", e.g. "table-to-text:"; tiled or cut to P tokens.
    position_convention: "peft" puts real tokens at positions P..P+T-1 (PEFT and the original code);
                        "zero" keeps them at 0..T-1. Decoder-only models only: encoder and encoder-decoder
                        models compute their positions inside the model, so their prefixes always use "zero".
    dropout:            dropout on the prefix keys/values during training.
    locations:          which attention gets a prefix: any of "encoder" (encoder self-attention, also BERT-style
                        models), "decoder" (decoder self-attention, also causal LMs), "cross" (decoder
                        cross-attention over the encoder). None: every kind the model has (Li & Liang's three
                        for BART/T5). Naming one the model lacks is an error.
    head:               a module that trains with the prefix, one copy per adapter (P-tuning v2's classifier):
                        "auto" picks `classifier` or `score` when the model has one, None trains no head, or a
                        dotted module name.
    """

    num_virtual_tokens: int = 20
    reparameterize: bool = True
    projection_dim: int = 512
    init: Init = "vocab"
    init_text: str | None = None
    position_convention: PositionConvention = "peft"
    dropout: float = 0.0
    locations: tuple[str, ...] | None = None
    head: str | None = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.locations, str):  # "encoder,cross" from a command-line override
            self.locations = tuple(loc.strip() for loc in self.locations.split(",") if loc.strip())
        if self.locations is not None:
            if not isinstance(self.locations, (list, tuple)) or not all(loc in LOCATIONS for loc in self.locations):
                raise PrefixTuneError(f"locations must be a list drawn from {list(LOCATIONS)}, got {self.locations!r}")
            if not self.locations:
                raise PrefixTuneError(f"locations must name at least one of {list(LOCATIONS)} (or be None for all)")
            self.locations = tuple(loc for loc in LOCATIONS if loc in self.locations)
        if self.head is not None and (not isinstance(self.head, str) or not self.head):
            raise PrefixTuneError(f"head must be 'auto', a module name or None, got {self.head!r}")
        if self.init_text is not None and not isinstance(self.init_text, str):
            raise PrefixTuneError(f"init_text must be text, got {self.init_text!r}")
        if self.init_text is not None and self.init == "vocab":
            self.init = "text"
        p, k = self.num_virtual_tokens, self.projection_dim
        checks = [
            (_is_int(p) and p >= 0, "num_virtual_tokens must be an integer >= 0"),
            (_is_int(k) and k >= 1, "projection_dim must be an integer >= 1"),
            (isinstance(self.reparameterize, bool), "reparameterize must be true or false"),
            (self.init in ("random", "vocab", "text", "data"), "init must be 'random', 'vocab', 'text' or 'data'"),
            (self.position_convention in ("peft", "zero"), "position_convention must be 'peft' or 'zero'"),
            (is_dropout_rate(self.dropout), "dropout must be a number in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                field_name = message.split()[0]
                raise PrefixTuneError(f"{message}, got {getattr(self, field_name)!r}")
        if self.init == "text" and not self.init_text:
            raise PrefixTuneError("init='text' needs init_text, e.g. init_text='table-to-text:'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrefixConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PrefixTuneError(f"unknown prefix config fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class PrefixEncoder(nn.Module):
    """One adapter's trainable prefix; `forward()` returns kv: (L, 2, H_kv, P, D).

    direct: kv is the parameter. mlp (Li & Liang's reparameterization): kv = init_kv + MLP(E), E a (P, k) matrix,
    MLP a tanh MLP k -> k -> L*2*H_kv*D whose last layer starts at zero, so training starts exactly at init_kv.
    Saved adapters hold the collapsed direct form (`collapsed()`, PEFT's `prompt_embeddings`).
    """

    def __init__(
        self, config: PrefixConfig, num_layers: int, num_kv_heads: int, head_dim: int, init_kv: Tensor
    ) -> None:
        super().__init__()
        self.config = config
        self.shape = (num_layers, 2, num_kv_heads, config.num_virtual_tokens, head_dim)
        if tuple(init_kv.shape) != self.shape:
            raise PrefixTuneError(f"prefix initial value has shape {tuple(init_kv.shape)}, expected {self.shape}")
        self.dropout = nn.Dropout(config.dropout)
        if config.reparameterize:
            k = config.projection_dim
            self.register_buffer("init_kv", init_kv.detach().clone())
            self.embedding = nn.Parameter(torch.randn(config.num_virtual_tokens, k) * k**-0.5)  # E: (P, k)
            self.mlp = nn.Sequential(nn.Linear(k, k), nn.Tanh(), nn.Linear(k, num_layers * 2 * num_kv_heads * head_dim))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)
        else:
            self.kv = nn.Parameter(init_kv.detach().clone())
        self.step_kv: list[Tensor] | None = None  # inside PrefixModel.prefix_once_per_step(): [] or [kv, leaf copy]

    def forward(self) -> Tensor:
        if self.step_kv is None:
            return self._compute()
        if not self.step_kv:  # the first call of an optimizer step: its kv, and the leaf every micro-batch uses
            kv = self._compute()
            self.step_kv += [kv, kv.detach().requires_grad_(kv.requires_grad)]
        return self.step_kv[1]

    def _compute(self) -> Tensor:
        if not self.config.reparameterize:
            return self.dropout(self.kv)
        num_layers, _, heads, p, dim = self.shape
        delta = self.mlp(self.embedding)  # (P, L*2*H*D)
        delta = delta.view(p, num_layers, 2, heads, dim).permute(1, 2, 3, 0, 4)  # (L, 2, H, P, D)
        return self.dropout(self.init_kv + delta)

    @torch.no_grad()
    def collapsed(self) -> Tensor:
        """The direct form (L, 2, H_kv, P, D) without dropout: what gets saved."""
        was_training = self.training
        self.eval()
        try:
            return self._compute().detach().clone()
        finally:
            self.train(was_training)


@dataclass(eq=False)
class PrefixBatch:
    """One call's prefix keys/values, one row per batch row (rows may use different adapters).

    keys, values:  (L, B, H_kv, P, D), P = the longest prefix in the batch; shorter ones are padded.
    visible:       (L, B, P) bool, False for padding columns and where a row's adapter has no prefix at a layer.
    offsets:       (B,) long, added to each row's position ids (the PEFT convention puts real tokens at P..P+T-1).
    layers:        which layers any row has a prefix at (others are skipped); None = all.
    Facts read once when the batch is built, so that no attention call has to synchronize to learn them:
    all_visible:   every column of every row at every layer is visible (one adapter or equal lengths, all layers);
    layer_uniform: `visible` is the same at every layer (one widened mask serves all layers);
    has_offsets:   some row's positions are shifted.
    stored:        the prefix layers whose decode cache (decode_cache.py) stores this batch's prefix in front of
                   the tokens; shared by the row-repeated copies of the batch.
    The caches below live and die with this call's object, so concurrent calls never share them; `reached` is set
    by the attention function, so a caller can tell that a model passed the batch on (a custom generate might not).
    """

    keys: Tensor
    values: Tensor
    visible: Tensor
    offsets: Tensor
    layers: frozenset[int] | None = None
    all_visible: bool = False
    layer_uniform: bool = False
    has_offsets: bool = True
    stored: set[int] = field(default_factory=set, repr=False)
    reached: bool = field(default=False, init=False, repr=False)
    _repeated: dict[int, PrefixBatch] = field(default_factory=dict, init=False, repr=False)
    # The last widened mask: (the model's mask object, facts, widened). Every layer of one forward gets the same
    # mask object, so the widening happens once per forward, not per layer; holding `mask` keeps its id unique.
    _widened: tuple[Any, tuple[Any, ...], Tensor] | None = field(default=None, init=False, repr=False)
    # Each layer's (B, H_kv, P, D) keys and values, unbound once per batch: indexing the stacked tensors in every
    # layer gives the backward pass one zero-filled gradient of the whole (L, B, H_kv, P, D) per layer and per
    # keys/values, each then added up (2L fills and adds); unbind's backward is one stack.
    _layer_keys: Any = field(default=None, init=False, repr=False)
    _layer_values: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._layer_keys = self.keys.unbind(0) if isinstance(self.keys, Tensor) else self.keys  # PerLayer: as is
        self._layer_values = self.values.unbind(0) if isinstance(self.values, Tensor) else self.values

    def layer_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """This layer's prefix keys and values, each (B, H_kv, P, D)."""
        return self._layer_keys[layer], self._layer_values[layer]

    @property
    def rows(self) -> int:
        return self.visible.shape[1]

    @property
    def width(self) -> int:
        return self.visible.shape[2]

    def for_rows(self, rows: int) -> PrefixBatch:
        """This batch for a call with `rows` rows: generate repeats each input row (beams, num_return_sequences)
        in the tensors it passes, not in our object; an encoder-decoder runs its encoder on B rows, decoder on B*k."""
        if rows == self.rows:
            return self
        if rows not in self._repeated:
            if self.rows == 0 or rows % self.rows:
                raise PrefixTuneError(
                    f"the batch has {rows} rows but the prefix selection has {self.rows}; pass one adapter name per row"
                )
            times = rows // self.rows
            self._repeated[rows] = replace(  # fresh caches: init=False fields are not copied
                self,
                keys=self.keys.repeat_interleave(times, dim=1),  # (L, B*k, H_kv, P, D)
                values=self.values.repeat_interleave(times, dim=1),
                visible=self.visible.repeat_interleave(times, dim=1),  # (L, B*k, P)
                offsets=self.offsets.repeat_interleave(times, dim=0),  # (B*k,)
            )
        return self._repeated[rows]

    def widened_mask(
        self, layer: int, mask: Tensor | None, query: Tensor, kv_len: int, *, eager: bool, causal: bool
    ) -> Tensor | CausalBias | None:
        """`mask` (over `kv_len` real keys) with the prefix columns prepended, or no dense mask where the kernel
        needs none: nothing masked and every prefix column visible is None for a decode step (one query) or a
        bidirectional layer, and SDPA's lower-right causal form for a causal prefill (`eager=False` only): query i
        sees keys 0..P+i of the P + S, bottom-right alignment, which keeps SDPA's flash/efficient kernels eligible."""
        q_len, dtype = query.shape[2], query.dtype
        if mask is None and self.all_visible and FAST_PATHS.get():
            if q_len == 1 or not causal:
                return None
            if not eager:
                return causal_lower_right(q_len, self.width + kv_len)
        facts = (-1 if self.layer_uniform else layer, q_len, kv_len, dtype, eager, causal)
        if self._widened is not None and self._widened[0] is mask and self._widened[1] == facts:
            return self._widened[2]
        widened = _widen_mask(mask, self.visible[layer], q_len, kv_len, dtype, eager, causal)
        self._widened = (mask, facts, widened)
        return widened


def _eager_kernel(module: nn.Module) -> Callable[..., Any]:
    """The model's own eager attention function (GPT-2, Gemma etc. each have theirs)."""
    kernel = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if kernel is None:
        raise PrefixTuneError(
            f"{type(module).__name__} has no eager_attention_forward; load the model with attn_implementation='sdpa'"
        )
    return kernel


def _float32_sdpa(kernel: Callable[..., Any], module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  mask: Any, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """SDPA in float32 for bfloat16 training on a CPU, its output cast back: torch's CPU SDPA backward is about
    twice as slow in bfloat16 as in float32, casts included (docs/performance.md, "bfloat16 on a CPU")."""
    if isinstance(mask, Tensor) and mask.is_floating_point():
        mask = mask.float()
    out, weights = kernel(module, query.float(), key.float(), value.float(), mask, *args, **kwargs)
    return out.to(query.dtype), weights


def _make_prefix_attention(eager: bool) -> Callable[..., Any]:
    def prefix_attention(
        module: nn.Module,
        query: Tensor,  # (B, H, T, D)
        key: Tensor,  # (B, H_kv, S, D), real tokens only (cache included)
        value: Tensor,  # (B, H_kv, S, D)
        attention_mask: Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        kernel = _eager_kernel(module) if eager else sdpa_attention_forward
        prefix_batch: PrefixBatch | None = kwargs.pop(BATCH_KWARG, None)
        prefix_record: list[tuple[nn.Module, int, Tensor, Tensor]] | None = kwargs.pop(RECORD_KWARG, None)
        if prefix_record is not None:
            prefix_record.append((module, query.shape[2], key.detach(), value.detach()))
        elif prefix_batch is None:
            unrouted = UNROUTED.get()
            if unrouted is not None:
                unrouted.append(module)
        elif prefix_batch.width > 0:
            prefix_batch.reached = True
            layer: int = getattr(module, LAYER_ATTR)
            batch = prefix_batch.for_rows(key.shape[0])
            if batch.layers is None or layer in batch.layers:
                stored = getattr(key, STORED_ATTR, None)  # keys from a decode cache with the prefix in front
                if stored is None and layer in batch.stored:
                    raise PrefixTuneError(f"{type(module).__name__} altered its cached keys; {_NO_CACHE}")
                if stored is not None and (stored != batch.width or getattr(value, STORED_ATTR, None) != stored):
                    raise PrefixTuneError(f"the cache holds {stored} prefix columns, not {batch.width}; {_NO_CACHE}")
                kv_len = key.shape[2] - (batch.width if stored else 0)
                causal = kwargs.get("is_causal")
                causal = getattr(module, "is_causal", True) if causal is None else causal
                bias = kwargs.get("position_bias")
                biased = isinstance(bias, Tensor) and bias.shape[-1] == kv_len  # T5: (B|1, H, T, S)
                attention_mask = batch.widened_mask(
                    layer, attention_mask, query, kv_len, eager=eager or biased, causal=bool(causal)
                )
                if biased:
                    kwargs["position_bias"] = nn.functional.pad(bias, (batch.width, 0))  # no bias on the prefix
                if not stored:  # (B, H_kv, P, D), already in this layer's dtype and on its device (prefix_batch)
                    prefix_keys, prefix_values = batch.layer_kv(layer)
                    key = torch.cat([prefix_keys, key], dim=2)  # (B, H_kv, P + S, D)
                    value = torch.cat([prefix_values, value], dim=2)
        if not eager and query.dtype == torch.bfloat16 and query.device.type == "cpu" and torch.is_grad_enabled():
            return _float32_sdpa(kernel, module, query, key, value, attention_mask, *args, **kwargs)
        return kernel(module, query, key, value, attention_mask, *args, **kwargs)

    return prefix_attention


for _base, _name in PREFIX_IMPLEMENTATIONS.items():
    AttentionInterface.register(_name, _make_prefix_attention(eager=_base == "eager"))
    AttentionMaskInterface.register(_name, eager_mask if _base == "eager" else sdpa_mask)


def offset_positions(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Forward pre-hook (with_kwargs) on the base model: shift each row's position ids by its prefix offset.

    Reads the call's batch from the call's own kwargs; encoder and encoder-decoder prefixes have no offsets."""
    batch: PrefixBatch | None = kwargs.get(BATCH_KWARG)
    if batch is None or not batch.has_offsets:
        return None
    reference = args[0] if args else kwargs.get("input_ids")
    if reference is None:
        reference = kwargs["inputs_embeds"]
    rows, length = reference.shape[:2]
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        cache = cache_from(kwargs)  # `cache` on transformers >= 5.24, `past_key_values` before
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = torch.arange(past, past + length, device=reference.device)[None, :]  # (1, T)
    kwargs["position_ids"] = position_ids + batch.for_rows(rows).offsets[:, None].to(position_ids.device)  # (B, T)
    return args, kwargs
