"""Next-token losses for training: the mean over a batch's target tokens, and per-row sums for mixed batches.

A sequence classifier (an encoder with a head, classify.py) takes the cross-entropy of its head's logits instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import classify, data
from .classify import is_sequence_classifier


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor], *, target_only: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens (labels != -100), as transformers computes it.

    With `target_only`, the LM head runs only at positions whose next token is a target in some row (via
    transformers' `logits_to_keep`): source tokens are masked from the loss anyway, so their logits are waste.
    """
    if is_sequence_classifier(model):
        return classify.class_loss(model, batch)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if not target_only or not keeps_positions(model):
        return model(**inputs, labels=labels).loss
    shifted = labels[:, 1:]  # the token that position p predicts is labels[:, p + 1]
    keep = (shifted != data.IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # (K,) positions
    logits = model(**inputs, logits_to_keep=keep).logits  # (B, K, V)
    target = shifted[:, keep]
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=data.IGNORE_INDEX)


def row_nll(
    model: Any,
    batch: dict[str, torch.Tensor],
    *,
    target_only: bool = True,
    adapter_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """(B,) summed next-token cross-entropy of each row's target tokens; `adapter_names` picks each row's adapter.

    Sums, not means: the caller chooses the normalizer (train.py divides by each task's global token count).
    """
    if is_sequence_classifier(model):
        return classify.row_nll(model, batch, adapter_names)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if adapter_names is not None:
        inputs["adapter_names"] = list(adapter_names)
    shifted = labels[:, 1:]  # (B, T-1)
    if target_only and keeps_positions(model):
        keep = (shifted != data.IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # (K,) positions
        logits = model(**inputs, logits_to_keep=keep).logits  # (B, K, V)
        target = shifted[:, keep]
    else:
        logits = model(**inputs).logits[:, :-1]  # (B, T-1, V)
        target = shifted
    nll = F.cross_entropy(
        logits.flatten(0, 1).float(), target.flatten(), ignore_index=data.IGNORE_INDEX, reduction="none"
    )
    return nll.view(target.shape).sum(dim=1)


def keeps_positions(model: Any) -> bool:
    """Whether the model takes `logits_to_keep` as positions of its input tokens (every model here: a soft-prompt
    model shifts them past its prompts itself); a model without the argument gets full logits."""
    forward = getattr(getattr(model, "module", model), "forward", None)
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    return "logits_to_keep" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
