"""What a model is trained and scored on, chosen once per model: next-token targets, or the class of its head.

Everything that trains or scores (train/step.py, the validation and perplexity loop in likelihood.py) asks
`objective_for(model)` once and then calls the objective without asking what the model is:

    objective.encode(examples, ...)     examples -> token ids and labels (data.encode, or data/classify.py)
    objective.scored(examples)          the examples validation and perplexity score
    objective.target_counts(batch)      (B,) how many targets each row of a batch is scored on
    objective.logits(model, batch)      (B, K, V) logits and the (B, K) targets they score (-100: none)

A loss is then always the cross-entropy of those logits against those targets (`summed_loss`, `row_losses`):
for a language model the next token at each target position, for a sequence classifier (an encoder with a head,
`...ForSequenceClassification`) its one class (K = 1, V = the number of labels).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .. import data
from ..data.classify import LABEL_POSITION, encode_classes
from ..errors import PrefixTuneError
from ..model import PrefixModel


class Objective(Protocol):
    """How one kind of model is trained and scored (see the module docstring)."""

    default_lr: float | None  # a run's learning rate when none is given (None: the method's own)

    def encode(
        self, examples: Sequence[data.Example], tokenizer: Any, *, max_length: int, chat_template: bool = False
    ) -> tuple[list[data.EncodedExample], data.EncodeStats]: ...

    def scored(self, examples: Sequence[data.Example]) -> list[data.Example]: ...

    def target_counts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def logits(
        self,
        model: Any,
        batch: dict[str, torch.Tensor],
        *,
        target_only: bool = True,
        adapter_names: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class NextToken:
    """A language model: each target token (labels != -100) is predicted from the positions before it."""

    default_lr: ClassVar[float | None] = None

    def encode(
        self, examples: Sequence[data.Example], tokenizer: Any, *, max_length: int, chat_template: bool = False
    ) -> tuple[list[data.EncodedExample], data.EncodeStats]:
        return data.encode(examples, tokenizer, max_length=max_length, chat_template=chat_template)

    def scored(self, examples: Sequence[data.Example]) -> list[data.Example]:
        return data.training_pairs(examples)  # every reference, as training learns them

    def target_counts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"][:, 1:] != data.IGNORE_INDEX).sum(dim=1)  # (B,)

    def logits(
        self,
        model: Any,
        batch: dict[str, torch.Tensor],
        *,
        target_only: bool = True,
        adapter_names: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """With `target_only`, the LM head runs only at positions whose next token is a target in some row (via
        transformers' `logits_to_keep`): source tokens are masked from the loss anyway, so their logits are waste."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if adapter_names is not None:
            inputs["adapter_names"] = list(adapter_names)
        shifted = batch["labels"][:, 1:]  # (B, T-1): the token that position p predicts is labels[:, p + 1]
        if target_only and keeps_positions(model):
            keep = (shifted != data.IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # (K,) positions
            return model(**inputs, logits_to_keep=keep).logits, shifted[:, keep]  # (B, K, V), (B, K)
        # Every position's logits as the model returns them, and the targets padded with one -100 at the end
        # (the last position predicts nothing): slicing the logits instead copies all of them (B x T x V) in the
        # loss and again, with a zero fill, in the backward pass.
        padded = F.pad(shifted, (0, 1), value=data.IGNORE_INDEX)  # (B, T)
        return model(**inputs).logits, padded  # (B, T, V), (B, T)


@dataclass(frozen=True)
class ClassHead:
    """A sequence classifier: the head's logits for the whole input score the example's one class."""

    labels: tuple[str, ...]  # the head's outputs, in id order
    # P-tuning v2 (Liu et al. 2022) trains BERT/RoBERTa prefixes with a fresh classifier head at 5e-3..1e-2.
    default_lr: ClassVar[float | None] = 5e-3

    def encode(
        self, examples: Sequence[data.Example], tokenizer: Any, *, max_length: int, chat_template: bool = False
    ) -> tuple[list[data.EncodedExample], data.EncodeStats]:
        if chat_template:
            raise PrefixTuneError("chat_template does not apply to a sequence classifier (it reads the text as it is)")
        label_ids = {label: i for i, label in enumerate(self.labels)}
        return encode_classes(examples, tokenizer, label_ids, max_length=max_length)

    def scored(self, examples: Sequence[data.Example]) -> list[data.Example]:
        return list(examples)  # one class per example, as `eval` scores it

    def target_counts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"][:, LABEL_POSITION] != data.IGNORE_INDEX).long()  # (B,) ones

    def logits(
        self,
        model: Any,
        batch: dict[str, torch.Tensor],
        *,
        target_only: bool = True,
        adapter_names: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = class_logits(model, batch, adapter_names)  # (B, C)
        return logits.unsqueeze(1), batch["labels"][:, LABEL_POSITION : LABEL_POSITION + 1]  # (B, 1, C), (B, 1)


NEXT_TOKEN = NextToken()


def objective_for(model: Any) -> Objective:
    """The objective of `model` (bare, a trained method's model, or wrapped for training): the one place that asks
    whether it classifies with a head."""
    if is_sequence_classifier(model):
        return ClassHead(tuple(model_labels(model)))
    return NEXT_TOKEN


# ----- losses -----------------------------------------------------------------------------------------------


def summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the scored targets: logits (B, K, V), targets (B, K) with -100 where none."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=data.IGNORE_INDEX, reduction="sum"
    )


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, K) cross-entropy of each scored target, 0 where there is none."""
    nll = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=data.IGNORE_INDEX, reduction="none"
    )
    return nll.view(targets.shape)


def row_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) summed cross-entropy of each row's scored targets."""
    return token_losses(logits, targets).sum(dim=1)


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor], *, target_only: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over a language model's target tokens (labels != -100)."""
    logits, targets = NEXT_TOKEN.logits(model, batch, target_only=target_only)
    return summed_loss(logits, targets) / max(int((targets != data.IGNORE_INDEX).sum()), 1)


def row_nll(
    model: Any,
    batch: dict[str, torch.Tensor],
    *,
    target_only: bool = True,
    adapter_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """(B,) summed next-token cross-entropy of each row's target tokens; `adapter_names` picks each row's adapter."""
    return row_losses(*NEXT_TOKEN.logits(model, batch, target_only=target_only, adapter_names=adapter_names))


# ----- the model behind an objective ----------------------------------------------------------------------------


def keeps_positions(model: Any) -> bool:
    """Whether the model takes `logits_to_keep` as positions of its input tokens (every model here: a soft-prompt
    model shifts them past its prompts itself); a model without the argument gets full logits."""
    forward = getattr(getattr(model, "module", model), "forward", None)
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    return "logits_to_keep" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def base_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a trainer wrapper (DDP's .module) and a PrefixModel."""
    for _ in range(3):
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module):
            model = inner
        if isinstance(model, PrefixModel):
            model = model.base_model
    return model


def is_sequence_classifier(model: Any) -> bool:
    """Whether `model` (bare, a PrefixModel or wrapped for training) outputs one logit per class per example."""
    return isinstance(model, nn.Module) and type(base_of(model)).__name__.endswith("ForSequenceClassification")


def model_labels(model: nn.Module) -> list[str]:
    """The class names of the base model's outputs, in id order (its config's id2label)."""
    config = base_of(model).config
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[i]) for i in range(config.num_labels)]


def class_logits(
    model: Any, batch: dict[str, torch.Tensor], adapter_names: Sequence[str] | None = None
) -> torch.Tensor:
    """(B, C) float logits of a sequence classifier's head; `adapter_names` picks each row's adapter."""
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if adapter_names is not None:
        kwargs["adapter_names"] = list(adapter_names)
    return model(**kwargs).logits.float()


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (padding is masked either way)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise PrefixTuneError("the tokenizer has no pad token (nor an EOS token); set tokenizer.pad_token")
    return int(pad)
