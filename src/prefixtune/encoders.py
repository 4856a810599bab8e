"""A `PrefixEncoder` for one model: a new one initialized from the model's own activations, or a saved one checked
against the model (layers, KV heads, head dim, base fingerprint) before it is loaded."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from . import peft_format
from .data.describe import NO_TEXT
from .errors import PrefixTuneError
from .layers import ROLES, LayerLayout, record_key_values
from .locations import describe_layers, resolve, saved_parts
from .prefix import PrefixConfig, PrefixEncoder


def new_encoder(base_model: nn.Module, lay: LayerLayout, tokenizer: Any, config: PrefixConfig) -> PrefixEncoder:
    init_kv = initial_kv(base_model, lay, tokenizer, config)
    return PrefixEncoder(config, init_kv.shape[0], lay.num_kv_heads, lay.head_dim, init_kv)


def initial_kv(base_model: nn.Module, lay: LayerLayout, tokenizer: Any, config: PrefixConfig) -> torch.Tensor:
    """(L_cov, 2, H_kv, P, D) over the layers at the config's locations: N(0, 1), or the frozen model's own keys and
    values for sampled vocabulary tokens or for `init_text` (real-word activations)."""
    p = config.num_virtual_tokens
    layers = lay.layers_of(config.locations or ROLES)
    if config.init == "random" or p == 0:
        return torch.randn(len(layers), 2, lay.num_kv_heads, p, lay.head_dim)
    device = next(base_model.parameters()).device
    if config.init == "vocab":
        vocab = base_model.get_input_embeddings().weight.shape[0]
        if tokenizer is not None:
            vocab = min(vocab, len(tokenizer))
        ids = torch.randint(0, vocab, (1, p))
    else:
        if not config.init_text:  # init="data" outside `prefixtune train`
            raise PrefixTuneError(NO_TEXT)
        if tokenizer is None:
            raise PrefixTuneError("init='text' needs a tokenizer: attach(model, config, tokenizer=tokenizer)")
        text_ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
        if not text_ids:
            raise PrefixTuneError(f"init_text {config.init_text!r} has no tokens")
        ids = torch.tensor(text_ids * (p // len(text_ids) + 1))[:p].unsqueeze(0)
    return record_key_values(base_model, ids.to(device))[layers].cpu()


def load_encoder(
    base_model: nn.Module, lay: LayerLayout, fingerprint: dict[str, Any], path: str | os.PathLike[str], *, force: bool
) -> tuple[PrefixEncoder, dict[str, torch.Tensor] | None, list[str] | None]:
    """A saved prefix as a new adapter, its head's saved weights and label names (if it has a head)."""
    saved = peft_format.read_prefix(path)
    here = peft_format.model_name(base_model)
    parts = saved_parts(saved, base_model, lay)
    _, _, heads, _, dim = next(iter(parts.values())).shape
    theirs = {loc: kv.shape[0] for loc, kv in parts.items()}
    ours = {loc: len(lay.layers_of((loc,))) for loc in parts}
    if theirs != ours or (heads, dim) != (lay.num_kv_heads, lay.head_dim):
        raise PrefixTuneError(
            f"adapter {saved.path} was made for {saved.base} ({describe_layers(theirs)}, {heads} KV heads, "
            f"head dim {dim}); this model {here} has {describe_layers(ours)}, {lay.num_kv_heads} KV heads, "
            f"head dim {lay.head_dim}"
        )
    if saved.base_fingerprint is not None and saved.base_fingerprint != fingerprint and not force:
        raise PrefixTuneError(
            f"adapter {saved.path} was trained on {saved.base} (fingerprint "
            f"{saved.base_fingerprint.get('embedding_sha256')}), not on this model {here} "
            f"({fingerprint['embedding_sha256']}); pass force=True (--force) to load it anyway"
        )
    # A saved prefix is the collapsed direct form; it keeps training as such.
    head = saved.config.head if saved.head is not None else None
    config = replace(saved.config, reparameterize=False, locations=tuple(parts), head=head)
    config = resolve(base_model, lay, config)
    kv = lay.join(parts, config.locations)
    return PrefixEncoder(config, kv.shape[0], lay.num_kv_heads, lay.head_dim, kv), saved.head, saved.labels
