"""Classification with a trained head (`--task classify` on an encoder, P-tuning v2): labels, predictions, scores.

Decoders classify by label words (likelihood.most_likely_labels). An encoder (BERT, RoBERTa, MiniLM) cannot
generate, so it is loaded as a sequence classifier with one output per label; the prefix trains together with
the adapter's own copy of the head (methods/head.py), and the adapter records the label names
(`prefixtune.labels` in adapter_config.json), so `eval` and `generate` map class ids back to labels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import data
from ..data.classify import encode_classes, example_label
from ..devices import input_device
from ..errors import PrefixTuneError
from ..model import BASE, PrefixModel
from ..models import is_encoder_model
from .metrics import macro_f1
from .objective import base_of, class_logits, is_sequence_classifier, model_labels, pad_token_id

# The questions a caller asks about classification, from one module (`example_label` and
# `is_sequence_classifier` live with the encoding and the objective; the CLI asks them here).
__all__ = [
    "METRICS",
    "evaluate_classifier",
    "example_label",
    "is_sequence_classifier",
    "predict",
    "saved_labels",
    "wants_classify",
]

METRICS = ("accuracy", "macro_f1", "loss")


# ----- which labels a model loads with ------------------------------------------------------------------------


def saved_labels(adapters: Sequence[str | Any]) -> list[str] | None:
    """The labels recorded in saved prefix adapters (the first that has them), to load their base model with.

    Unreadable directories give None here; loading the adapter reports them.
    """
    found: list[list[str]] = []
    for directory in adapters:
        try:
            raw = json.loads((Path(directory) / "adapter_config.json").read_text())
            labels = raw["prefixtune"]["labels"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels):
            found.append(labels)
    if any(len(labels) != len(found[0]) for labels in found):
        raise PrefixTuneError(
            f"these adapters classify into different numbers of labels ({', '.join(str(len(x)) for x in found)}); "
            "load classifiers with the same number of labels together"
        )
    return found[0] if found else None


def wants_classify(model_name: str, adapter: str | None) -> bool:
    """Whether eval should classify without being told: the model is an encoder, or the adapter holds labels."""
    return (adapter is not None and saved_labels([adapter]) is not None) or is_encoder_model(model_name)


# ----- prediction and scores ----------------------------------------------------------------------------------


def _row_labels(model: Any, names: Sequence[str]) -> list[list[str]]:
    """Each row's class names: its adapter's (as saved with it), else the base model's."""
    base = model_labels(model)
    if not isinstance(model, PrefixModel):
        return [base for _ in names]
    return [(model.label_names(n) if n != BASE else None) or base for n in names]


@torch.no_grad()
def predict(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    adapter_names: Sequence[str] | None = None,
    batch_size: int = 8,
    max_length: int = 256,
) -> tuple[list[str], torch.Tensor]:
    """The predicted label of each text (argmax of the head) and the logits (N, C), in order.

    `adapter_names`: one per text (a PrefixModel); default: its active adapter (or the bare model's head).
    """
    if not texts:
        return [], torch.empty(0)
    if adapter_names is None:
        active = model.active_adapter if isinstance(model, PrefixModel) else None
        adapter_names = [active or BASE] * len(texts)
    examples = [data.Example(t, None, label="?") for t in texts]
    encoded, _ = encode_classes(examples, tokenizer, {"?": 0}, max_length=max_length)
    model.eval()
    logits = torch.empty(len(texts), base_of(model).config.num_labels)
    pad_id = pad_token_id(tokenizer)
    device = input_device(model)
    for start in range(0, len(encoded), batch_size):
        rows = list(range(start, min(start + batch_size, len(encoded))))
        batch = data.batches(
            [encoded[i] for i in rows], len(rows), shuffle=False, bucket_by_length=False, pad_id=pad_id
        )[0]
        names = [adapter_names[i] for i in rows] if isinstance(model, PrefixModel) else None
        batch = {k: v.to(device) for k, v in batch.items()}
        logits[rows] = class_logits(model, batch, names).cpu()
    labels = _row_labels(model, adapter_names)
    return [labels[i][c] for i, c in enumerate(logits.argmax(-1).tolist())], logits


def evaluate_classifier(
    model: Any,
    tokenizer: Any,
    examples: Sequence[data.Example],
    *,
    metric_names: Sequence[str],
    max_length: int = 256,
    batch_size: int = 8,
) -> tuple[dict[str, float], list[str]]:
    """Accuracy (argmax of the head), macro-F1 and mean cross-entropy on labeled examples; and the predictions."""
    names = list(metric_names) or ["accuracy", "macro_f1"]
    wrong = [m for m in names if m not in METRICS]
    if wrong:
        raise PrefixTuneError(
            f"metrics {wrong} do not apply to a sequence classifier (it predicts labels, not text); "
            f"choose from {', '.join(METRICS)}"
        )
    if not examples:
        raise PrefixTuneError("no examples to evaluate")
    gold = [example_label(e) for e in examples]
    if any(g is None for g in gold):
        raise PrefixTuneError("classification needs a label (or target) on every example")
    adapter_labels = model.label_names() if isinstance(model, PrefixModel) and model.active_adapter else None
    known = adapter_labels or model_labels(model)
    unknown = sorted({str(g) for g in gold} - set(known))
    if unknown:
        raise PrefixTuneError(
            f"the eval data has labels {unknown} that the classifier was not trained on (its labels: {known})"
        )
    predictions, logits = predict(
        model, tokenizer, [e.source for e in examples], batch_size=batch_size, max_length=max_length
    )
    gold_text = [str(g) for g in gold]
    scores: dict[str, float] = {"examples": float(len(examples))}
    if "accuracy" in names:
        scores["accuracy"] = sum(p == g for p, g in zip(predictions, gold_text)) / len(gold_text)
    if "macro_f1" in names:
        scores["macro_f1"] = macro_f1(predictions, gold_text)
    if "loss" in names:
        target = torch.tensor([known.index(g) for g in gold_text])
        scores["loss"] = float(F.cross_entropy(logits, target))
    return {k: (round(v, 4) if math.isfinite(v) else v) for k, v in scores.items()}, predictions
