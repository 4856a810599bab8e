"""Training options that save time or memory without changing what is computed (docs/performance.md).

- `enable_gradient_checkpointing(model)`: every decoder layer keeps only its input and recomputes its activations
  in the backward pass (non-reentrant `torch.utils.checkpoint`). PEFT cannot do this for prompt-learning methods:
  transformers drops `past_key_values` inside checkpointed layers, and that is where PEFT's prefix lives. Ours
  enters through the attention function as a forward keyword argument, which the checkpointed layer's replay
  receives again, so the recomputation sees the prefixes of the forward pass it replays with nothing to restore.
  Gradients equal those without checkpointing up to float rounding (tests/test_performance.py: 1e-6).
- `micro_steps(model, n)`: the micro-batches of one optimizer step. With n > 1 the prefix MLP (and its dropout)
  runs once per step instead of once per micro-batch (`PrefixModel.prefix_once_per_step`): its output is computed
  on first use, handed to every micro-batch as a leaf tensor that collects their gradients, and back-propagated
  through the MLP once at the end. Same gradients up to float rounding (with dropout, one mask is drawn per step
  instead of one per micro-batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .errors import PrefixTuneError


def _transformers_model(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise PrefixTuneError(f"{type(model).__name__} holds no transformers model to checkpoint")


def enable_gradient_checkpointing(
    model: nn.Module, options: dict[str, Any] | None = None, **layer_options: Any
) -> None:
    """Checkpoint every decoder layer of the transformers model inside `model` (any method's wrapped model).

    A prefix (or lora+prefix) model's recomputation sees the same prefixes as the forward pass it replays.
    Only in training mode, as transformers does it; the KV cache is off in checkpointed layers. `options` go to
    `torch.utils.checkpoint` (as transformers' `gradient_checkpointing_kwargs`); always non-reentrant: the
    prefix reaches the layers as a keyword argument, not as a checkpointed input, which only that variant handles.
    `layer_options`: transformers' `every_n_layers` and `offload` (releases that have them).
    """
    base = _transformers_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise PrefixTuneError(f"{type(base).__name__} does not support gradient checkpointing")
    if (options or {}).get("use_reentrant"):
        raise PrefixTuneError(
            "gradient checkpointing with use_reentrant=True cannot train a prefix; leave use_reentrant unset or False"
        )
    kwargs = {**(options or {}), "use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **layer_options)
    else:  # transformers releases before the rename
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **layer_options)
    # transformers also makes the input embeddings' output require grad, which only the reentrant variant needs;
    # left on, the backward pass would run through the frozen first layer's projections for nothing.
    if getattr(base, "_require_grads_hook", None) is not None:
        base.disable_input_require_grads()


def micro_steps(model: nn.Module, count: int, *, share_prefix: bool = True) -> Iterator[int]:
    """Yields 0..count-1, one per micro-batch of an optimizer step; see the module docstring.

    Use as `for k in micro_steps(model, grad_accum): ...forward, backward...`; the prefix MLP's backward runs when
    the loop ends normally. With count 1 (or share_prefix off, or no prefix model inside) it is `range(count)`.
    """
    # PrefixModels (e.g. inside lora+prefix), found by their method: this module sits below model.py
    prefix_models = [m for m in model.modules() if callable(getattr(m, "prefix_once_per_step", None))]
    if count < 2 or not share_prefix or not prefix_models or not torch.is_grad_enabled():
        yield from range(count)
        return
    with ExitStack() as stack:
        for prefix_model in prefix_models:
            stack.enter_context(prefix_model.prefix_once_per_step())
        yield from range(count)
