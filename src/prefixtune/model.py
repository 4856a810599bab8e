"""A frozen base model with named prefixes attached: forward, generate, save, load.

`PrefixModel` owns the adapters (one `PrefixEncoder` each) and, for each call, builds the per-row prefix batch
that the attention function (attention.py) reads. The base model's weights never change and never train.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from . import artifact
from .attention import (
    PrefixBatch,
    PrefixRouter,
    detach_router,
    probe_attention_layers,
    record_key_values,
    restore_implementation,
    route_through_prefix,
)
from .errors import PrefixTuneError
from .methods.prefix import PrefixConfig, PrefixEncoder

BASE = "__base__"  # in adapter_names: this row uses no prefix (PEFT's convention)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_adapter_name(name: str) -> str:
    """Adapter names are also directory and HTTP names: letters, digits, '_', '.', '-' only."""
    if not isinstance(name, str) or not _NAME.match(name) or name == BASE or ".." in name:
        raise PrefixTuneError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return name


class PrefixModel(nn.Module):
    """A base causal LM plus named prefixes. Build it with `prefixtune.attach` or `prefixtune.load_adapter`."""

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        super().__init__()
        if isinstance(model, PrefixModel):
            raise PrefixTuneError("this model already has prefixes attached; call add_adapter on it instead")
        self.base_model = model
        self.tokenizer = tokenizer
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.router = PrefixRouter()
        self._stock_implementation = route_through_prefix(model)
        try:
            self.layout = probe_attention_layers(model, self.router)
        except BaseException:
            restore_implementation(model, self._stock_implementation)
            raise
        for param in model.parameters():
            param.requires_grad_(False)
        self._fingerprint: dict[str, Any] | None = None
        self._hook = model.register_forward_pre_hook(self._offset_positions, with_kwargs=True)

    # ----- adapters -----------------------------------------------------------------------------------------

    @property
    def config(self) -> Any:
        """The base model's transformers config."""
        return self.base_model.config

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters.keys())

    @property
    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            lay = self.layout
            self._fingerprint = artifact.fingerprint(self.base_model, lay.num_layers, lay.num_kv_heads, lay.head_dim)
        return self._fingerprint

    def add_adapter(
        self, name: str, config_or_path: PrefixConfig | str | os.PathLike[str], *, force: bool = False
    ) -> PrefixModel:
        """Add a new trainable prefix from a `PrefixConfig`, or load a saved one from a directory."""
        check_adapter_name(name)
        if name in self.adapters:
            raise PrefixTuneError(f"adapter {name!r} already exists; pick another name or delete_adapter it first")
        if isinstance(config_or_path, PrefixConfig):
            encoder = self._new_encoder(config_or_path)
        else:
            encoder = self._load_encoder(config_or_path, force=force)
        device = next(self.base_model.parameters()).device
        self.adapters[name] = encoder.to(device)
        if self.active_adapter is None:
            self.active_adapter = name
        return self

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.adapters), None)

    def set_adapter(self, name: str) -> None:
        """The adapter used for rows when `adapter_names` is not given."""
        if name != BASE:
            self._require(name)
        self.active_adapter = name

    def adapter_config(self, name: str | None = None) -> PrefixConfig:
        return self.adapters[self._require(name or self.active_adapter)].config

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train: those of the prefixes, never the base model's."""
        return [p for p in self.adapters.parameters() if p.requires_grad]

    def save_adapter(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        """Save one adapter (the active one by default) in PEFT's prefix-tuning format."""
        encoder = self.adapters[self._require(name or self.active_adapter)]
        base = artifact.model_name(self.base_model)
        artifact.save_prefix(path, encoder.collapsed(), encoder.config, self.fingerprint, base)

    def detach(self) -> nn.Module:
        """Remove every prefix and give back the base model as it was (attention implementation included)."""
        self._hook.remove()
        detach_router(self.layout)
        restore_implementation(self.base_model, self._stock_implementation)
        self.adapters = nn.ModuleDict()
        return self.base_model

    def _require(self, name: str | None) -> str:
        if name is None or name not in self.adapters:
            raise PrefixTuneError(f"unknown adapter {name!r}; this model has {self.adapter_names}")
        return name

    def _new_encoder(self, config: PrefixConfig) -> PrefixEncoder:
        lay = self.layout
        init_kv = self._initial_kv(config)
        return PrefixEncoder(config, lay.num_layers, lay.num_kv_heads, lay.head_dim, init_kv)

    def _initial_kv(self, config: PrefixConfig) -> torch.Tensor:
        lay, p = self.layout, config.num_virtual_tokens
        if config.init == "random" or p == 0:
            return torch.randn(lay.num_layers, 2, lay.num_kv_heads, p, lay.head_dim)
        device = next(self.base_model.parameters()).device
        if config.init == "vocab":
            vocab = self.base_model.get_input_embeddings().weight.shape[0]
            if self.tokenizer is not None:
                vocab = min(vocab, len(self.tokenizer))
            ids = torch.randint(0, vocab, (1, p))
        else:
            if self.tokenizer is None:
                raise PrefixTuneError("init='text' needs a tokenizer: attach(model, config, tokenizer=tokenizer)")
            text_ids = self.tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
            if not text_ids:
                raise PrefixTuneError(f"init_text {config.init_text!r} has no tokens")
            ids = torch.tensor(text_ids * (p // len(text_ids) + 1))[:p].unsqueeze(0)
        with self._selected([BASE], rows=1):
            return record_key_values(self.base_model, self.router, ids.to(device)).cpu()

    def _load_encoder(self, path: str | os.PathLike[str], force: bool) -> PrefixEncoder:
        saved = artifact.read_prefix(path)
        lay = self.layout
        _, _, heads, _, dim = saved.kv.shape
        here = artifact.model_name(self.base_model)
        if (saved.kv.shape[0], heads, dim) != (lay.num_layers, lay.num_kv_heads, lay.head_dim):
            raise PrefixTuneError(
                f"adapter {saved.path} was made for {saved.base} ({saved.kv.shape[0]} layers, {heads} KV heads, "
                f"head dim {dim}); this model {here} has {lay.num_layers} layers, {lay.num_kv_heads} KV heads, "
                f"head dim {lay.head_dim}"
            )
        if saved.base_fingerprint is not None and saved.base_fingerprint != self.fingerprint and not force:
            raise PrefixTuneError(
                f"adapter {saved.path} was trained on {saved.base} (fingerprint "
                f"{saved.base_fingerprint.get('embedding_sha256')}), not on this model {here} "
                f"({self.fingerprint['embedding_sha256']}); pass force=True (--force) to load it anyway"
            )
        # A saved prefix is the collapsed direct form; it keeps training as such.
        config = replace(saved.config, reparameterize=False)
        return PrefixEncoder(config, lay.num_layers, lay.num_kv_heads, lay.head_dim, saved.kv)

    # ----- calls --------------------------------------------------------------------------------------------

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward (same arguments, same output) with each row's prefix applied.

        adapter_names: one adapter name per batch row ("__base__" = no prefix); default: the active adapter.
        """
        with self._selected(adapter_names, rows=_batch_rows(args, kwargs)):
            return self.base_model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """`transformers` generate (greedy, beam, sampling; KV cache of real tokens only) with per-row prefixes."""
        with self._selected(adapter_names, rows=_batch_rows(args, kwargs)):
            return self.base_model.generate(*args, **kwargs)

    @contextmanager
    def _selected(self, adapter_names: Sequence[str] | None, rows: int) -> Iterator[None]:
        if self.router.batch is not None:
            raise PrefixTuneError("PrefixModel calls cannot be nested")
        self.router.batch = self.prefix_batch(adapter_names, rows)
        try:
            yield
        finally:
            self.router.batch = None

    def prefix_batch(self, adapter_names: Sequence[str] | None, rows: int) -> PrefixBatch:
        """Stack each row's prefix: keys/values (L, B, H_kv, P_max, D), visibility (B, P_max), offsets (B,)."""
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
        kvs = {n: self.adapters[n]() for n in used}  # each (L, 2, H, P_n, D), computed once per call
        lengths = {n: kv.shape[3] for n, kv in kvs.items()}
        width = max(lengths.values(), default=0)
        device = next(self.base_model.parameters()).device
        empty = torch.zeros(lay.num_layers, 2, lay.num_kv_heads, width, lay.head_dim, device=device)
        # One padded bank entry per used adapter (+ an empty one for BASE), then one gather for all rows.
        bank = [nn.functional.pad(kvs[n], (0, 0, 0, width - lengths[n])) for n in used] + [empty]
        slot = {n: i for i, n in enumerate(used)} | {BASE: len(used)}
        index = torch.tensor([slot[n] for n in names], device=device)
        stacked = torch.stack(bank)[index]  # (B, L, 2, H, P_max, D)
        row_len = torch.tensor([lengths.get(n, 0) for n in names], device=device)
        peft_rows = torch.tensor(
            [n != BASE and self.adapters[n].config.position_convention == "peft" for n in names], device=device
        )
        return PrefixBatch(
            keys=stacked[:, :, 0].transpose(0, 1),
            values=stacked[:, :, 1].transpose(0, 1),
            visible=torch.arange(width, device=device)[None, :] < row_len[:, None],
            offsets=torch.where(peft_rows, row_len, torch.zeros_like(row_len)),
        )

    def _offset_positions(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Forward pre-hook on the base model: expand the prefix batch for beams and shift position ids."""
        batch = self.router.batch
        if batch is None:
            return None
        rows = _batch_rows(args, kwargs)
        if rows != batch.rows and batch.rows and rows % batch.rows == 0:
            batch = self.router.batch = batch.repeat_rows(rows // batch.rows)
        if not bool(batch.offsets.any()):
            return None
        reference = args[0] if args else kwargs.get("input_ids")
        if reference is None:
            reference = kwargs["inputs_embeds"]
        length = reference.shape[1]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            cache = kwargs.get("past_key_values")
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + length, device=reference.device)[None, :]
        kwargs["position_ids"] = position_ids + batch.offsets[:, None].to(position_ids.device)
        return args, kwargs


def _batch_rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise PrefixTuneError("pass input_ids or inputs_embeds")


def attach(
    model: nn.Module, config: PrefixConfig | None = None, name: str = "default", *, tokenizer: Any = None
) -> PrefixModel:
    """Attach a new trainable prefix named `name` to a frozen transformers causal LM.

    The tokenizer is needed only for `init="text"` (and bounds the sampled ids for `init="vocab"`).
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
