"""Where a model can take a prefix, and whether a config or a saved prefix fits it.

A location is a kind of attention, as the probe (layers.py) saw it: "encoder" (bidirectional self-attention:
an encoder-decoder's encoder, or a BERT-style model), "decoder" (causal self-attention: an encoder-decoder's
decoder, or a causal LM), "cross" (an encoder-decoder's decoder attending over the encoder).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from . import peft_format
from .errors import PrefixTuneError
from .heads import find_head
from .layers import ROLES, LayerLayout
from .prefix import PrefixConfig

DESCRIBE = {"encoder": "encoder self-attention", "decoder": "decoder self-attention", "cross": "cross-attention"}


def resolve(model: nn.Module, layout: LayerLayout, config: PrefixConfig) -> PrefixConfig:
    """The config as this model uses it: locations and head named, positions as the model can take them."""
    here = layout.locations
    wanted = here if config.locations is None else config.locations
    missing = [loc for loc in wanted if loc not in here]
    if missing:
        raise PrefixTuneError(
            f"{type(model).__name__} has no {' or '.join(DESCRIBE[m] for m in missing)}; its attention is "
            f"{', '.join(DESCRIBE[h] for h in here)}: use locations from {list(here)} (or None for all)"
        )
    # Only causal LMs take shifted position ids; other models compute positions inside (prefix: no position).
    convention = config.position_convention if here == ("decoder",) else "zero"
    return replace(config, locations=wanted, position_convention=convention, head=find_head(model, config.head))


def saved_parts(saved: peft_format.SavedPrefix, model: nn.Module, layout: LayerLayout) -> dict[str, torch.Tensor]:
    """The saved per-location prefixes keyed by this model's locations, in ROLES order.

    Refuses a prefix for attention the model lacks: an encoder adapter in a causal LM, a seq2seq adapter with
    encoder or cross prefixes in a decoder-only model, a one-stack adapter in an encoder-decoder.
    """
    here, name = layout.locations, peft_format.model_name(model)
    parts = dict(saved.parts)
    if "self" in parts:  # location not recorded: the self-attention of a causal LM or of an encoder
        if here not in (("decoder",), ("encoder",)):
            raise PrefixTuneError(
                f"adapter {saved.path} was made for a model with one stack of self-attention ({saved.base}); "
                f"this model {name} is an encoder-decoder"
            )
        parts = {here[0]: parts.pop("self")}
    missing = [loc for loc in parts if loc not in here]
    if missing:
        raise PrefixTuneError(
            f"adapter {saved.path} has a prefix for {' and '.join(DESCRIBE[m] for m in missing)} ({saved.base}); "
            f"this model {name} has only {', '.join(DESCRIBE[h] for h in here)}: load it into the kind of model "
            "it was trained on"
        )
    return {loc: parts[loc] for loc in ROLES if loc in parts}


def describe_layers(per_location: dict[str, int]) -> str:
    """'2 layers' for one location, '2 encoder + 2 decoder + 2 cross layers' for several."""
    if len(per_location) == 1:
        return f"{next(iter(per_location.values()))} layers"
    return " + ".join(f"{n} {loc}" for loc, n in per_location.items()) + " layers"
