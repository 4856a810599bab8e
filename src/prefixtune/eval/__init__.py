"""Generation, metrics and scoring: what `prefixtune eval`, `generate`, the demo, `compare` and validation use.

objective.py   what a model is scored (and trained) on: next tokens, or the class of its head
likelihood.py  the one scoring loop: validation losses, perplexity, label-word accuracy
generate.py    batched generation, cut at the first line
metrics.py     BLEU, ROUGE, accuracy, macro-F1, perplexity
classify.py    sequence classifiers: the labels they load with, predictions, scores
scores.py      `evaluate`: every score of a model on examples
"""

from .classify import evaluate_classifier, predict, saved_labels, wants_classify
from .generate import generate_texts
from .likelihood import most_likely_labels, scored_batches, summed_losses, target_nll
from .metrics import accuracy, bleu, macro_f1, normalize_label, perplexity, rouge
from .objective import (
    NEXT_TOKEN,
    ClassHead,
    NextToken,
    Objective,
    causal_lm_loss,
    is_sequence_classifier,
    model_labels,
    objective_for,
    row_nll,
)
from .scores import ALL_METRICS, GENERATION_METRICS, evaluate

__all__ = [
    "ALL_METRICS",
    "GENERATION_METRICS",
    "NEXT_TOKEN",
    "ClassHead",
    "NextToken",
    "Objective",
    "accuracy",
    "bleu",
    "causal_lm_loss",
    "evaluate",
    "evaluate_classifier",
    "generate_texts",
    "is_sequence_classifier",
    "macro_f1",
    "model_labels",
    "most_likely_labels",
    "normalize_label",
    "objective_for",
    "perplexity",
    "predict",
    "rouge",
    "row_nll",
    "saved_labels",
    "scored_batches",
    "summed_losses",
    "target_nll",
    "wants_classify",
]
