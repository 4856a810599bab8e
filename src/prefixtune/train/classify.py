"""What `--task classify` changes in a training run: the model it loads and what a head classifier can train.

An encoder (BERT, RoBERTa, MiniLM) cannot generate, so with `--task classify` it loads as a sequence classifier
(`AutoModelForSequenceClassification`) with one output per label: the distinct labels of the training data,
sorted, as `id2label`. A model saved as `...ForSequenceClassification` (a decoder classifier too) loads the same
way. Decoders otherwise classify by label words, which is plain next-token training. Once the model is loaded,
its objective (eval/objective.py) is what the rest of the run trains and scores on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..data.classify import example_label
from ..devices import Placement
from ..errors import PrefixTuneError
from ..eval.objective import base_of, is_sequence_classifier, model_labels
from ..models import load_model, seq2seq_not_in_cli
from .tasks import TaskData


def training_labels(cfg: TrainConfig, task_data: Sequence[TaskData]) -> list[str] | None:
    """The sorted distinct labels of the training examples of every task (None unless `cfg.task` is classify)."""
    if cfg.task != "classify":
        return None
    found = {example_label(e) for t in task_data for e in t.train}
    return sorted(x for x in found if x is not None) or None


def load_for_training(
    cfg: TrainConfig, task_data: Sequence[TaskData], placement: Placement, dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """The model for a training run, on the placement's device in `dtype` (default the placement's): with
    `--task classify`, an encoder comes with one output per label. Encoder-decoders are refused (the data pipeline
    is decoder-only)."""
    return load_model(
        cfg.model,
        labels=training_labels(cfg, task_data),
        dtype=dtype or placement.dtype,
        device=placement.device,
        device_map=placement.device_map,
        allow_seq2seq=False,
    )


def check_training(cfg: TrainConfig, task_data: Sequence[TaskData], model: nn.Module) -> None:
    """Refuse what a head classifier cannot train; name the classes of a model given with default names.

    Nothing to check for a language model. A model passed in by the API with transformers' default names
    (LABEL_0, ...) and as many outputs as the data has labels gets the data's labels, sorted.
    """
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise seq2seq_not_in_cli(cfg.model, model.config)
    if not is_sequence_classifier(model):
        return
    name = cfg.model
    if cfg.task != "classify":
        raise PrefixTuneError(f"{name} is a sequence classifier: train it with --task classify")
    if cfg.method != "prefix":
        raise PrefixTuneError(
            f"{name} classifies with a head; --method {cfg.method} would not train it. "
            "Use --method prefix (a prefix plus the classifier head, P-tuning v2)"
        )
    training = [e for t in task_data for e in t.train]
    missing = [e for e in training if example_label(e) is None]
    if missing:
        raise PrefixTuneError(f"{len(missing)} training examples have no label (or target) to classify")
    wanted = sorted({str(example_label(e)) for e in training})
    base = base_of(model)
    have = model_labels(base)
    if have == [f"LABEL_{i}" for i in range(len(have))] and len(have) == len(wanted):
        base.config.id2label = dict(enumerate(wanted))
        base.config.label2id = {label: i for i, label in enumerate(wanted)}
        have = wanted
    if len(have) < 2:
        raise PrefixTuneError(f"classification needs at least two labels; the training data has only {wanted}")
    parts = (("training", training), ("validation", [e for t in task_data for e in t.validation]))
    for part, examples in parts:
        unknown = sorted({str(example_label(e)) for e in examples} - set(have))
        if unknown:
            raise PrefixTuneError(
                f"the {part} data has labels {unknown} that the classifier's {len(have)} outputs {have} do not name"
                + (" (labels come from the training split only)" if part == "validation" else "")
            )
