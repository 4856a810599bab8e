"""A frozen base model with named prefixes attached: forward, generate, save, load.

`PrefixModel` owns the adapters (one `PrefixEncoder` each) and, for each call, builds the per-row prefix batch
and hands it to the base model as a forward keyword argument, which transformers passes down to the attention
function (prefix.py). Nothing about a call is stored on the model: calls from several threads do not interfere,
and `copy.deepcopy` gives an independent model. The base model's weights never change and never train.

Causal LMs, encoder-decoder models (BART, T5: prefixes on encoder self-, decoder self- and cross-attention, each
switchable with `PrefixConfig.locations`) and encoder classifiers (BERT: P-tuning v2, with a trainable copy of
the classifier head per adapter, `PrefixConfig.head`) all go through the same calls.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from . import peft_format
from .decode_cache import generate_cache
from .encoders import load_encoder, new_encoder
from .errors import PrefixTuneError
from .heads import RowRouter, copy_head, rows_of_call
from .hf_model import TransformersModelMixin
from .layers import (
    ROLES,
    layer_places,
    place_per_layer,
    probe_attention_layers,
    release_layers,
    restore_implementation,
    route_through_prefix,
)
from .locations import resolve
from .prefix import BATCH_KWARG, RECORD_KWARG, PrefixBatch, PrefixConfig, PrefixEncoder, offset_positions

BASE = "__base__"  # in adapter_names: this row uses no prefix (PEFT's convention)
# forward's named inputs, in its order: the columns Trainer keeps
COLUMNS = ("input_ids", "attention_mask", "labels", "position_ids", "token_type_ids", "inputs_embeds")
COLUMNS += ("decoder_input_ids", "decoder_attention_mask")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_MODULE_ATTRIBUTES = frozenset(dir(nn.ModuleDict()))  # adapters live in a ModuleDict: these names are taken


def check_adapter_name(name: str) -> str:
    """Adapter names are also directory, HTTP and module names: letters, digits, '_', '-' only (torch refuses '.' in
    a module name), and not the name of an attribute every module has (`training`, `forward`, `cuda`...)."""
    if not isinstance(name, str) or not _NAME.match(name) or name == BASE:
        raise PrefixTuneError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '_', '-', starting with a letter or digit"
        )
    if name in _MODULE_ATTRIBUTES:
        raise PrefixTuneError(f"invalid adapter name {name!r}: a torch module attribute has that name; pick another")
    return name


class PrefixModel(TransformersModelMixin, nn.Module):
    """A base model plus named prefixes. Build it with `prefixtune.attach` or `prefixtune.load_adapter`.

    It starts in the base model's train/eval mode; adapters added follow the model's mode. What Trainer, TRL and
    PEFT-style code call (save_pretrained, from_pretrained, gradient checkpointing...) comes from hf_model.py."""

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        super().__init__()
        if isinstance(model, PrefixModel):
            raise PrefixTuneError("this model already has prefixes attached; call add_adapter on it instead")
        self.base_model = model
        self.tokenizer = tokenizer
        self.adapters = nn.ModuleDict()
        self.heads = nn.ModuleDict()  # adapter name -> its trainable copy of the task head (heads.py)
        self._labels: dict[str, list[str]] = {}  # adapter name -> class names of its head's outputs
        self._head_hooks: dict[str, Any] = {}  # head module name -> hook handle
        self.active_adapter: str | None = None
        self._stock_implementation = route_through_prefix(model)
        try:
            self.layout = probe_attention_layers(model)
        except BaseException:
            restore_implementation(model, self._stock_implementation)
            raise
        for param in model.parameters():
            param.requires_grad_(False)
        self._fingerprint: dict[str, Any] | None = None
        self._hook = model.register_forward_pre_hook(offset_positions, with_kwargs=True)
        if hasattr(model, "_validate_model_kwargs"):  # a model that can generate
            # generate() refuses model kwargs that its forward's signature does not name, and ours travel in
            # **kwargs. A partial (not a closure) so that deepcopy and pickling rebind it to the copied model.
            model._validate_model_kwargs = partial(_validate_model_kwargs, model)
        self.training = model.training  # from_pretrained models start in eval mode; adapters follow (add_adapter)

    # ----- adapters -----------------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters.keys())

    @property
    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            lay = self.layout
            self._fingerprint = peft_format.fingerprint(self.base_model, lay.num_layers, lay.num_kv_heads, lay.head_dim)
        return self._fingerprint

    def add_adapter(
        self, name: str, config_or_path: PrefixConfig | str | os.PathLike[str], *, force: bool = False
    ) -> PrefixModel:
        """Add a new trainable prefix from a `PrefixConfig`, or load a saved one from a directory."""
        check_adapter_name(name)
        if name in self.adapters:
            raise PrefixTuneError(f"adapter {name!r} already exists; pick another name or delete_adapter it first")
        labels = None
        if isinstance(config_or_path, PrefixConfig):
            encoder, head_state = self._new_encoder(resolve(self.base_model, self.layout, config_or_path)), None
        else:
            encoder, head_state, labels = self._load_encoder(config_or_path, force=force)
        device = next(self.base_model.parameters()).device
        head = encoder.config.head
        if head is not None:
            self.heads[name] = copy_head(self.base_model, head, head_state).to(device).train(self.training)
            if head not in self._head_hooks:
                module = self.base_model.get_submodule(head)
                hook = RowRouter(self.heads, self.adapters, head)
                self._head_hooks[head] = module.register_forward_hook(hook, with_kwargs=True)
            self._labels[name] = labels or _model_labels(self.base_model)
        self.adapters[name] = encoder.to(device).train(self.training)  # dropout off after model.eval()
        if self.active_adapter is None:
            self.active_adapter = name
        return self

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        del self.adapters[name]
        if name in self.heads:
            del self.heads[name]
        self._labels.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.adapters), None)

    def set_adapter(self, name: str) -> None:
        """The adapter used for rows when `adapter_names` is not given."""
        if name != BASE:
            self._require(name)
        self.active_adapter = name

    def adapter_config(self, name: str | None = None) -> PrefixConfig:
        return self.adapters[self._require(name or self.active_adapter)].config

    def label_names(self, name: str | None = None) -> list[str] | None:
        """The class names of an adapter's head outputs, in order (None for an adapter without a head).

        A new adapter takes the base model's `id2label`; a loaded one the labels saved with it.
        """
        return self._labels.get(self._require(name or self.active_adapter))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train: the prefixes' and their heads' copies, never the base model's."""
        return [p for p in [*self.adapters.parameters(), *self.heads.parameters()] if p.requires_grad]

    def save_adapter(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        """Save one adapter (the active one by default) in PEFT's prefix-tuning format (docs/seq2seq.md)."""
        name = self._require(name or self.active_adapter)
        encoder = self.adapters[name]
        parts = self.layout.split(encoder.collapsed(), encoder.config.locations)
        head = {k: v.detach() for k, v in self.heads[name].state_dict().items()} if name in self.heads else None
        base = peft_format.model_name(self.base_model)
        encoder_decoder = "cross" in self.layout.locations or _is_encoder_decoder(self.base_model)
        peft_format.save_prefix(
            path,
            parts,
            encoder.config,
            self.fingerprint,
            base,
            encoder_decoder=encoder_decoder,
            head=head,
            labels=self._labels.get(name) if head is not None else None,
        )

    def detach(self) -> nn.Module:
        """Remove every prefix and give back the base model as it was (attention implementation included)."""
        self._hook.remove()
        for hook in self._head_hooks.values():
            hook.remove()
        self._head_hooks = {}
        self.base_model.__dict__.pop("_validate_model_kwargs", None)
        release_layers(self.layout)
        restore_implementation(self.base_model, self._stock_implementation)
        self.adapters = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self._labels = {}
        return self.base_model

    def _require(self, name: str | None) -> str:
        if name is None or name not in self.adapters:
            raise PrefixTuneError(f"unknown adapter {name!r}; this model has {self.adapter_names}")
        return name

    def _new_encoder(self, config: PrefixConfig) -> PrefixEncoder:
        return new_encoder(self.base_model, self.layout, self.tokenizer, config)

    def _load_encoder(
        self, path: str | os.PathLike[str], force: bool
    ) -> tuple[PrefixEncoder, dict[str, torch.Tensor] | None, list[str] | None]:
        """A saved prefix as a new adapter, its head's saved weights and label names (if it has a head)."""
        return load_encoder(self.base_model, self.layout, self.fingerprint, path, force=force)

    # ----- calls --------------------------------------------------------------------------------------------

    def forward(
        self,
        *args: Any,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        adapter_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward (same arguments, same output) with each row's prefix applied.

        adapter_names: one adapter name per batch row ("__base__" = no prefix); default: the active adapter.
        The named inputs are the columns Trainer keeps (it reads this signature); those given go on to the base
        model as keywords, everything else as it came.
        """
        given = (input_ids, attention_mask, labels, position_ids, token_type_ids, inputs_embeds, decoder_input_ids)
        kwargs |= {k: v for k, v in zip(COLUMNS, (*given, decoder_attention_mask)) if v is not None}
        rows = _batch_rows(args, kwargs)
        batch = self.prefix_batch(adapter_names, rows)
        with self._heads_routed(adapter_names, rows):
            return self.base_model(*args, **kwargs, **{BATCH_KWARG: batch})

    @torch.no_grad()
    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """`transformers` generate (greedy, beam, sampling) with per-row prefixes; without a cache passed in, each
        layer's prefix is stored once in front of its cache (decode_cache.py), counted out of its length.

        The prefix batch rides in generate's model kwargs, which reach every forward (tensors among them are
        repeated for beams / num_return_sequences, our batch is not: the attention function repeats its rows)."""
        rows = _batch_rows(args, kwargs)
        batch = self.prefix_batch(adapter_names, rows)
        kwargs.update(generate_cache(self.base_model, self.layout, batch, kwargs))  # the prefix stored once
        with self._heads_routed(adapter_names, rows):
            output = self.base_model.generate(*args, **kwargs, **{BATCH_KWARG: batch})
        if batch.width > 0 and not batch.reached:  # the probe checked forward; a model's own generate could drop it
            raise PrefixTuneError(
                f"{type(self.base_model).__name__}.generate did not pass its model kwargs on to the forward, so the "
                "prefixes were not applied; generate with a model whose prepare_inputs_for_generation forwards them"
            )
        return output

    @contextmanager
    def _heads_routed(self, adapter_names: Sequence[str] | None, rows: int) -> Iterator[None]:
        """Tell the head hooks (heads.py) this call's rows, if any adapter has a head."""
        if not self._head_hooks:
            yield
            return
        names = list(adapter_names) if adapter_names is not None else [self.active_adapter or BASE] * rows
        with rows_of_call(self.heads, names):
            yield

    @contextmanager
    def prefix_once_per_step(self) -> Iterator[None]:
        """Within the block (the micro-batches of one optimizer step) each adapter's prefix MLP (and dropout) runs
        once: on first use its kv is computed and handed to every call as one leaf tensor that collects their
        gradients, back-propagated through the MLP once when the block ends normally. Training-loop state by design:
        it spans the step's calls. Adapters whose kv costs nothing to recompute (direct, no dropout) are left alone."""
        sharing = [
            encoder
            for encoder in self.adapters.values()
            if encoder.config.reparameterize or (encoder.training and encoder.config.dropout > 0)
        ]
        for encoder in sharing:
            encoder.step_kv = []
        try:
            yield
            pending = [encoder.step_kv for encoder in sharing]
        finally:
            for encoder in sharing:
                encoder.step_kv = None
        for step in pending:
            if step and step[1].grad is not None and step[0].requires_grad:
                torch.autograd.backward(step[0], step[1].grad)

    def prefix_batch(self, adapter_names: Sequence[str] | None, rows: int) -> PrefixBatch:
        """Stack each row's prefix: keys/values (L, B, H_kv, P_max, D), visibility (L, B, P_max), offsets (B,).

        Built once per call in the attention layers' dtype and on their device; when the layers sit on several
        devices (device_map="auto") or differ in dtype, keys, values and visibility are `layers.PerLayer` lists,
        each layer's slice on that layer's own device and in its dtype."""
        if adapter_names is None:
            adapter_names = [self.active_adapter or BASE] * rows
        if isinstance(adapter_names, str):
            raise PrefixTuneError("adapter_names must be a list with one name per batch row, not a string")
        names = list(adapter_names)
        if len(names) != rows:
            raise PrefixTuneError(f"adapter_names has {len(names)} names for a batch of {rows} rows; give one per row")
        unknown = sorted({n for n in names if n != BASE and n not in self.adapters})
        if unknown:
            raise PrefixTuneError(f"unknown adapter names {unknown}; this model has {self.adapter_names} and {BASE!r}")
        lay = self.layout
        used = [n for n in dict.fromkeys(names) if n != BASE]
        kvs = {n: self.adapters[n]() for n in used}  # each (L_n, 2, H, P_n, D), computed once per call
        lengths = {n: kv.shape[3] for n, kv in kvs.items()}
        layers = {n: lay.layers_of(self.adapters[n].config.locations or ROLES) for n in used}
        width = max(lengths.values(), default=0)
        device = next(self.base_model.parameters()).device  # where the adapters live and the batch is assembled
        places = layer_places(lay)  # each attention layer's own (device, dtype)
        # Cast once here, in the model's dtype (the float32 parameters still get their gradients through it), so
        # that no attention call has to cast; under device_map="auto" each layer's slice goes to its device below.
        dtype = places[0][1]
        full = torch.zeros(lay.num_layers, 2, lay.num_kv_heads, width, lay.head_dim, device=device, dtype=dtype)
        columns = torch.arange(width, device=device)
        # One padded bank entry per used adapter (+ an empty one for BASE), then one gather for all rows.
        bank, seen = [], []
        for n in used:
            kv = nn.functional.pad(kvs[n].to(dtype), (0, 0, 0, width - lengths[n]))
            at = torch.zeros(lay.num_layers, dtype=torch.bool, device=device)
            at[layers[n]] = True
            bank.append(kv if len(layers[n]) == lay.num_layers else full.index_copy(0, _index(layers[n], device), kv))
            seen.append(at[:, None] & (columns < lengths[n])[None, :])  # (L, P_max)
        bank.append(full)
        seen.append(torch.zeros(lay.num_layers, width, dtype=torch.bool, device=device))
        slot = {n: i for i, n in enumerate(used)} | {BASE: len(used)}
        index = torch.tensor([slot[n] for n in names], device=device)
        stacked = torch.stack(bank)[index]  # (B, L, 2, H, P_max, D)
        keys, values = stacked[:, :, 0].transpose(0, 1), stacked[:, :, 1].transpose(0, 1)  # (L, B, H, P_max, D)
        visible = torch.stack(seen)[index].transpose(0, 1)  # (L, B, P_max)
        if any(place != (device, dtype) for place in places):  # layers on several devices (or in several dtypes)
            keys, values, visible = place_per_layer(places, keys, values, visible)
        row_len = torch.tensor([lengths.get(n, 0) for n in names], device=device)
        peft_rows = torch.tensor(
            [n != BASE and self.adapters[n].config.position_convention == "peft" for n in names], device=device
        )
        covered = frozenset(i for n in used for i in layers[n])
        every_layer = [len(layers[n]) == lay.num_layers for n in used]
        return PrefixBatch(
            keys=keys,  # type: ignore[arg-type]  # a PerLayer indexes and repeats like the stacked tensor
            values=values,  # type: ignore[arg-type]
            visible=visible,  # type: ignore[arg-type]
            offsets=torch.where(peft_rows, row_len, torch.zeros_like(row_len)),
            layers=None if len(covered) == lay.num_layers else covered,
            # Plain Python facts (no tensor reads): every row has a full-width prefix on every layer, or at least
            # the same columns at every layer; some row is shifted.
            all_visible=BASE not in names and all(every_layer) and all(n == width for n in lengths.values()),
            layer_uniform=all(every_layer),
            has_offsets=any(
                n != BASE and self.adapters[n].config.position_convention == "peft" and lengths[n] > 0 for n in names
            ),
        )


def _validate_model_kwargs(model: nn.Module, model_kwargs: dict[str, Any]) -> None:
    """generate's model-kwargs check, without our keywords (which the model's forward takes through **kwargs)."""
    model_kwargs.pop(BATCH_KWARG, None)
    model_kwargs.pop(RECORD_KWARG, None)
    type(model)._validate_model_kwargs(model, model_kwargs)


_ROW_INPUTS = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds")


def _batch_rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for value in (*args[:1], *(kwargs.get(k) for k in _ROW_INPUTS)):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise PrefixTuneError("pass input_ids or inputs_embeds")


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _model_labels(model: nn.Module) -> list[str] | None:
    """The model's class names in id order (its config's id2label), None when it has none."""
    id2label = getattr(model.config, "id2label", None) or {}
    return [str(id2label[i]) for i in range(len(id2label))] if set(id2label) == set(range(len(id2label))) else None


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def attach(
    model: nn.Module, config: PrefixConfig | None = None, name: str = "default", *, tokenizer: Any = None
) -> PrefixModel:
    """Attach a new trainable prefix named `name` to a frozen transformers model.

    Causal LMs, encoder-decoder models (`...ForConditionalGeneration`) and encoders (`...ForSequenceClassification`:
    the classifier head trains with the prefix, see `PrefixConfig.head`). The tokenizer is needed only for
    `init="text"` (and bounds the sampled ids for `init="vocab"`).
    """
    wrapped = model if isinstance(model, PrefixModel) else PrefixModel(model, tokenizer=tokenizer)
    if tokenizer is not None:
        wrapped.tokenizer = tokenizer
    return _add_or_undo(wrapped, wrapped is not model, name, config or PrefixConfig(), force=False)


def load_adapter(
    model: nn.Module, path: str | os.PathLike[str], name: str | None = None, *, force: bool = False
) -> PrefixModel:
    """Load a saved prefix (ours or PEFT's) onto `model` (a base model or a PrefixModel) as `name`.

    The name defaults to the directory's name. Shapes that do not fit the model are refused; a prefix trained on
    another model with the same shapes is refused unless `force=True`.
    """
    if name is None:
        name = os.path.basename(os.path.normpath(path)) or "default"
        if not _NAME.match(name):
            name = "default"
    wrapped = model if isinstance(model, PrefixModel) else PrefixModel(model)
    return _add_or_undo(wrapped, wrapped is not model, name, path, force=force)


def _add_or_undo(
    wrapped: PrefixModel, created: bool, name: str, source: PrefixConfig | str | os.PathLike[str], force: bool
) -> PrefixModel:
    """add_adapter; if it fails on a wrapper made just now, give the base model back untouched."""
    try:
        return wrapped.add_adapter(name, source, force=force)
    except BaseException:
        if created:
            wrapped.detach()
        raise
