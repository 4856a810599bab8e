"""Full fine-tuning, and Li & Liang's FT-top-K baseline (only the top K decoder layers and the head train).

Saved as a whole transformers model (`save_pretrained`: config.json + model.safetensors) plus `full_finetune.json`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import atomic
from ..errors import PrefixTuneError, is_dropout_rate
from .blocks import find_blocks

CONFIG_FILE = "full_finetune.json"
# config.json fields that size the weights: a fine-tuned model has its base model's (checked before loading,
# so that a damaged config.json cannot make transformers allocate a model of any size)
SHAPE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "n_embd",
    "n_inner",
    "n_layer",
    "n_head",
)


@dataclass
class FullConfig:
    """top_layers: None = every parameter trains; K = only the top K decoder layers, the final norm and (with
    train_head) the LM head train (Li & Liang's FT-top2 is K=2). When the LM head is tied to the input embeddings
    (GPT-2, SmolLM2) training the head trains that one shared matrix.
    dropout: None = the model's own dropout rates; p = every dropout of the model set to p while it trains (the
    attention-probability dropout of Llama-style attention, every nn.Dropout of GPT-2-style models): full
    fine-tuning's regularizer, to set against the prefix's `dropout`."""

    top_layers: int | None = None
    train_head: bool = True
    dropout: float | None = None

    def __post_init__(self) -> None:
        if self.dropout is not None and not is_dropout_rate(self.dropout):
            raise PrefixTuneError(
                f"dropout must be a number in [0, 1) (or None for the model's own), got {self.dropout!r}"
            )
        if self.top_layers is not None and (not isinstance(self.top_layers, int) or self.top_layers < 1):
            raise PrefixTuneError(
                f"top_layers must be an integer >= 1 (or None for all layers), got {self.top_layers!r}"
            )


class FullModel(nn.Module):
    """The model itself, with `requires_grad` set by the config."""

    def __init__(self, model: nn.Module, config: FullConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        if config.dropout is not None:
            set_dropout(model, float(config.dropout))
        if config.top_layers is None:
            model.requires_grad_(True)
            return
        blocks = find_blocks(model)
        if config.top_layers > len(blocks.layers):
            raise PrefixTuneError(f"top_layers={config.top_layers} but the model has {len(blocks.layers)} layers")
        model.requires_grad_(False)
        blocks.layers[len(blocks.layers) - config.top_layers :].requires_grad_(True)
        if blocks.final_norm is not None:
            blocks.final_norm.requires_grad_(True)
        head = model.get_output_embeddings()
        if config.train_head and head is not None:
            head.requires_grad_(True)

    def forward(self, **kwargs: Any) -> Any:
        return self.model(**kwargs)

    @torch.no_grad()
    def generate(self, **kwargs: Any) -> Any:
        return self.model.generate(**kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def save_trained(self, directory: str | os.PathLike[str]) -> None:
        directory = Path(directory)
        try:
            atomic.atomic_save_directory(directory, self.model.save_pretrained)  # CONFIG_FILE, below, marks it
            meta = {"method": "full", "format_version": 1, "full": asdict(self.config)}
            atomic.atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(meta, indent=2) + "\n").encode())
        except OSError as e:
            raise PrefixTuneError(f"cannot write the model to {directory}: {e.strerror}") from None


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout rate of `model` to p: nn.Dropout modules and the float `attention_dropout` that Llama-style
    attention modules pass to the attention function while training. A model with neither is refused."""
    found = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
            found += 1
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, (int, float)) and not isinstance(rate, bool):
            module.attention_dropout = p
            found += 1
    if not found:
        raise PrefixTuneError(f"dropout={p}: {type(model).__name__} has no dropout to set; leave full.dropout unset")


def build_full(model: nn.Module, config: FullConfig, tokenizer: Any = None) -> FullModel:
    return FullModel(model, config)


def load_full(model: nn.Module, directory: str | os.PathLike[str]) -> FullModel:
    """Load a fully fine-tuned model saved by `save_trained`; `model` gives the class, dtype, device, attention."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
        config = FullConfig(**meta["full"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise PrefixTuneError(f"{directory}: not a full fine-tuning directory ({CONFIG_FILE}: {e})") from None
    try:
        saved = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise PrefixTuneError(f"{directory}: cannot read config.json ({e}); re-save the model") from None
    base = model.config.to_dict()
    differ = [k for k in SHAPE_FIELDS if k in base and (not isinstance(saved, dict) or saved.get(k) != base[k])]
    if differ:
        got = {k: saved.get(k) for k in differ} if isinstance(saved, dict) else saved
        raise PrefixTuneError(
            f"{directory}/config.json describes another model ({str(got)[:200]}; the base has "
            f"{ {k: base[k] for k in differ} }): load it onto the base model it was fine-tuned from"
        )
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        attention = None
    try:
        loaded = type(model).from_pretrained(directory, dtype=model.dtype, attn_implementation=attention)
    except Exception as e:  # transformers and safetensors raise many types for a bad config.json or bad weights
        message = (str(e).splitlines() or [""])[0][:300]
        raise PrefixTuneError(
            f"cannot load the fine-tuned model in {directory}: {type(e).__name__}: {message}; re-save it"
        ) from None
    return FullModel(loaded.to(next(model.parameters()).device), config)
