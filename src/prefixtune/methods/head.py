"""Task heads that train with a prefix (P-tuning v2): each adapter owns a trainable copy of the model's head.

A `...ForSequenceClassification` model comes with a freshly initialized head (`classifier` for BERT-style
encoders, `score` for decoders) that has to train together with the prefix. Each adapter gets its own copy, so
one base model serves several classifiers; a forward hook on the base model's head module replaces each row's
output with the output of that row's adapter's copy, which is what makes mixed batches work for classifiers.
Rows without a head ("__base__", or an adapter made with `head=None`) keep the base model's own head.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import PrefixTuneError

# Tried in this order when a config says head="auto" (the names PEFT saves as modules_to_save for SEQ_CLS).
HEAD_NAMES = ("classifier", "score")


def find_head(model: nn.Module, head: str | None) -> str | None:
    """The dotted module name of the head that trains with the prefix, or None for no head."""
    if head is None:
        return None
    if head == "auto":
        return next((n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)), None)
    try:
        model.get_submodule(head)
    except AttributeError:
        raise PrefixTuneError(
            f"{type(model).__name__} has no module {head!r} to train as the head; "
            f"set head to one of its modules, 'auto' ({' or '.join(HEAD_NAMES)}), or None"
        ) from None
    return head


def copy_head(model: nn.Module, head: str, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A trainable copy of the model's head module, optionally with saved weights."""
    module = copy.deepcopy(model.get_submodule(head))
    module._forward_hooks.clear()  # the copy must not carry our routing hook from the original
    module._forward_pre_hooks.clear()
    if state is not None:
        own = module.state_dict()
        if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
            raise PrefixTuneError(
                f"the saved head {head!r} has tensors {_shapes(state)}, this model's head has {_shapes(own)} "
                "(another number of labels?); load the adapter into a model built with the same head"
            )
        module.load_state_dict(state)
    for param in module.parameters():
        param.requires_grad_(True)
    return module


def _shapes(state: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(state.items()))


def route_rows(heads: nn.ModuleDict, row_names: Callable[[], Sequence[str] | None]) -> Callable[..., Any]:
    """A forward hook (with_kwargs) for the base model's head: each row through its own adapter's copy."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        names = row_names()
        if names is None or not isinstance(output, torch.Tensor) or not any(n in heads for n in names):
            return None
        rows = output.shape[0]
        if len(names) != rows:  # generate repeated each row
            names = [n for n in names for _ in range(rows // len(names))]
        for name in dict.fromkeys(n for n in names if n in heads):
            index = torch.tensor([i for i, n in enumerate(names) if n == name], device=output.device)
            own_args = [_rows(a, index, rows) for a in args]
            own = heads[name](*own_args, **{k: _rows(v, index, rows) for k, v in kwargs.items()})
            output = output.index_copy(0, index, own.to(output.dtype))
        return output

    return hook


def _rows(value: Any, index: torch.Tensor, rows: int) -> Any:
    """The selected batch rows of a tensor argument; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return value.index_select(0, index)
    return value
