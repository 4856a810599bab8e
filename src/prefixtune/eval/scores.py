"""`evaluate`: every score of a model on examples, for `prefixtune eval`, the demo and `compare`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .. import data
from ..errors import PrefixTuneError
from . import metrics
from .classify import evaluate_classifier
from .generate import generate_texts
from .likelihood import most_likely_labels, target_nll
from .objective import ClassHead, objective_for

GENERATION_METRICS = ("bleu", "rouge")
ALL_METRICS = ("bleu", "rouge", "accuracy", "perplexity")


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[data.Example],
    *,
    metric_names: Sequence[str],
    task: str = "generate",
    labels: Sequence[str] | None = None,
    max_length: int = 256,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat_template: bool = False,
    num_beams: int = 1,
    progress: bool = False,
) -> tuple[dict[str, float], list[str]]:
    """Scores (BLEU/ROUGE 0-100, accuracy 0-1, perplexity) and the generated predictions.

    A sequence classifier (an encoder with a head) is scored by its head: accuracy, macro_f1, loss (classify.py).
    """
    if isinstance(objective_for(model), ClassHead):
        return evaluate_classifier(
            model, tokenizer, examples, metric_names=metric_names, max_length=max_length, batch_size=batch_size
        )
    unknown = sorted(set(metric_names) - set(ALL_METRICS))
    if unknown:
        raise PrefixTuneError(f"unknown metrics {unknown}; choose from {', '.join(ALL_METRICS)}")
    if not examples:
        raise PrefixTuneError("no examples to evaluate")
    scores: dict[str, float] = {"examples": float(len(examples))}
    predictions: list[str] = []
    generation: dict[str, Any] = dict(
        batch_size=batch_size, chat_template=chat_template, max_source_length=max_length, progress=progress
    )
    if task == "classify" or "accuracy" in metric_names:
        gold = [e.label if e.label is not None else e.target for e in examples]
        if any(g is None for g in gold):
            raise PrefixTuneError("accuracy needs a label (or target) on every example")
        label_set = list(labels) if labels else sorted({str(g) for g in gold})
        predictions = most_likely_labels(
            model,
            tokenizer,
            examples,
            label_set,
            max_length=max_length,
            chat_template=chat_template,
            batch_size=batch_size,
        )
        scores["accuracy"] = metrics.accuracy(predictions, [str(g) for g in gold])
        generated = generate_texts(model, tokenizer, examples, max_new_tokens=8, **generation)
        scores["accuracy_generated"] = metrics.accuracy(generated, [str(g) for g in gold])
    if any(m in metric_names for m in GENERATION_METRICS):
        predictions = generate_texts(
            model, tokenizer, examples, max_new_tokens=max_new_tokens, num_beams=num_beams, **generation
        )
        refs = [e.references or ([e.target] if e.target else []) for e in examples]
        if "bleu" in metric_names:
            scores["bleu"] = metrics.bleu(predictions, refs)
        if "rouge" in metric_names:
            scores.update({k: v for k, v in metrics.rouge(predictions, refs).items()})
    if "perplexity" in metric_names:
        nll, count = target_nll(
            model, tokenizer, examples, max_length=max_length, batch_size=batch_size, chat_template=chat_template
        )
        scores["perplexity"] = metrics.perplexity(nll, count)
        scores["loss"] = nll / max(count, 1)
    return {
        k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in scores.items()
    }, predictions
