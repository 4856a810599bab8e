"""Task heads that train with a prefix (P-tuning v2): each adapter owns a trainable copy of the model's head.

A `...ForSequenceClassification` model comes with a freshly initialized head (`classifier` for BERT-style
encoders, `score` for decoders) that has to train together with the prefix. Each adapter gets its own copy, so
one base model serves several classifiers; a forward hook on the base model's head module replaces each row's
output with the output of that row's adapter's copy, which is what makes mixed batches work for classifiers.
Rows without a head ("__base__", or an adapter made with `head=None`) keep the base model's own head.

Which adapter each row uses is per-call data, and the head module is called without the model's forward keyword
arguments (`self.classifier(pooled)`), so the prefix batch cannot reach the hook the way it reaches attention.
The row names therefore travel in a `ContextVar` set for the duration of one `PrefixModel` call: every thread
(and asyncio task) has its own value, nothing is stored on the shared model, and a deep copy of the model has
nothing to go stale. The head sits outside the checkpointed layers, so no gradient-checkpoint replay (which runs
after the call returned) ever calls it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from .errors import PrefixTuneError

# Tried in this order when a config says head="auto" (the names PEFT saves as modules_to_save for SEQ_CLS).
HEAD_NAMES = ("classifier", "score")
# (the heads of the PrefixModel being called, its rows' adapter names) for the duration of the call.
_CALL_ROWS: ContextVar[tuple[nn.ModuleDict, tuple[str, ...]] | None] = ContextVar("prefixtune_head_rows", default=None)


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


@contextmanager
def rows_of_call(heads: nn.ModuleDict, row_names: Sequence[str]) -> Iterator[None]:
    """For the duration of one call: its rows' adapter names, for the head hooks of the model owning `heads`."""
    token = _CALL_ROWS.set((heads, tuple(row_names)))
    try:
        yield
    finally:
        _CALL_ROWS.reset(token)


class RowRouter:
    """A forward hook (with_kwargs) on the base model's head module `head`: each row through its adapter's copy.

    An object rather than a closure so that `copy.deepcopy` of the model rebinds it to the copy's own heads.
    """

    def __init__(self, heads: nn.ModuleDict, adapters: nn.ModuleDict, head: str) -> None:
        self.heads, self.adapters, self.head = heads, adapters, head

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        call = _CALL_ROWS.get()
        if call is None or call[0] is not self.heads or not isinstance(output, torch.Tensor):
            return None  # not inside a call of the PrefixModel this hook belongs to
        own_copy = {n for n in call[1] if n in self.heads and self.adapters[n].config.head == self.head}
        if not own_copy:
            return None
        names, rows = call[1], output.shape[0]
        if len(names) != rows:  # generate repeated each row
            names = tuple(n for n in names for _ in range(rows // len(names)))
        for name in dict.fromkeys(n for n in names if n in own_copy):
            index = torch.tensor([i for i, n in enumerate(names) if n == name], device=output.device)
            own_args = [_rows(a, index, rows) for a in args]
            own = self.heads[name](*own_args, **{k: _rows(v, index, rows) for k, v in kwargs.items()})
            output = output.index_copy(0, index, own.to(output.dtype))
        return output


def _rows(value: Any, index: torch.Tensor, rows: int) -> Any:
    """The selected batch rows of a tensor argument; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return value.index_select(0, index)
    return value
