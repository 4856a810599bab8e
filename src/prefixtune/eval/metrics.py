"""Scores: BLEU, ROUGE, accuracy and macro-F1 of predictions, perplexity of a summed log-likelihood.

Scales: BLEU and ROUGE are 0-100 (as papers and sacrebleu report them), accuracy and macro-F1 are fractions 0-1,
perplexity is exp(mean negative log-likelihood per target token).
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence

from ..errors import PrefixTuneError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _check(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> list[list[str]]:
    if len(predictions) != len(references_list):
        raise PrefixTuneError(f"{len(predictions)} predictions but {len(references_list)} reference sets")
    if not predictions:
        raise PrefixTuneError("nothing to score: no predictions")
    references = []
    for i, refs in enumerate(references_list):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise PrefixTuneError(f"example {i}: references must be a non-empty list of strings, got {refs!r}")
        references.append(refs)
    return references


def bleu(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu, 13a tokenization), 0-100, against all references of each example.

    `references_list[i]` holds the references of prediction i; their number may differ between examples.
    """
    import sacrebleu  # deferred: a slow import that only BLEU needs

    references = _check(predictions, references_list)
    # sacrebleu wants reference *streams* (stream j = the j-th reference of every example); None marks
    # "this example has fewer references" and is skipped for that example.
    width = max(len(refs) for refs in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (rouge-score, Porter stemming), 0-100; each example takes its best reference."""
    from rouge_score import rouge_scorer  # deferred: a slow import (nltk) that only ROUGE needs

    references = _check(predictions, references_list)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references):
        best = scorer.score_multi(refs, prediction)
        for key in ROUGE_TYPES:
            totals[key] += best[key].fmeasure
    return {key: 100.0 * total / len(references) for key, total in totals.items()}


def normalize_label(text: str) -> str:
    """The first line of a text, trimmed of spaces and punctuation, case-folded: "Positive.\\n.." -> "positive"."""
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    return first.strip().strip(string.punctuation + " \t").casefold()


def accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Fraction (0-1) of predictions equal to their label after `normalize_label` on both."""
    if len(predictions) != len(labels):
        raise PrefixTuneError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not predictions:
        raise PrefixTuneError("nothing to score: no predictions")
    hits = sum(normalize_label(p) == normalize_label(gold) for p, gold in zip(predictions, labels))
    return hits / len(predictions)


def macro_f1(predictions: Sequence[str], gold: Sequence[str]) -> float:
    """Mean F1 over the classes that occur in the gold labels or the predictions (scikit-learn's macro average)."""
    scores = []
    for c in sorted(set(gold) | set(predictions)):
        tp = sum(p == c and g == c for p, g in zip(predictions, gold))
        fp = sum(p == c and g != c for p, g in zip(predictions, gold))
        fn = sum(p != c and g == c for p, g in zip(predictions, gold))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp(total_nll / total_tokens): total_nll is the summed negative log-likelihood (nats) of the scored tokens."""
    if total_tokens <= 0:
        raise PrefixTuneError("no target tokens to score for perplexity (are all targets truncated away?)")
    mean = total_nll / total_tokens
    return math.exp(mean) if mean < 700 else math.inf


# ----- per-example statistics and the bootstrap over inputs ---------------------------------------------------

BOOTSTRAP_METRICS = ("bleu", "rougeL", "accuracy")


def example_statistics(
    metric: str, predictions: Sequence[str], references_list: Sequence[Sequence[str]]
) -> list[list[float]]:
    """One row per example whose column sums give the corpus score back (`score_from_statistics`).

    bleu: sacrebleu's sufficient statistics (hypothesis and closest reference length, n-gram matches and totals
    for n = 1..4), so a resample of inputs is scored as corpus BLEU of those inputs, not as a mean of sentence
    BLEUs; rougeL: [F-measure x 100, 1] (the mean over examples); accuracy: [hit, 1] (`references_list[i][0]` is
    the gold label).
    """
    if metric == "bleu":
        from sacrebleu.metrics import BLEU  # deferred: a slow import that only BLEU needs

        references = _check(predictions, references_list)
        width = max(len(refs) for refs in references)
        streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
        # sacrebleu's own per-segment statistics (what corpus_bleu sums); tests pin the sums to corpus_bleu
        return [list(map(float, row)) for row in BLEU()._extract_corpus_statistics(list(predictions), streams)]
    if metric == "rougeL":
        from rouge_score import rouge_scorer  # deferred: a slow import (nltk) that only ROUGE needs

        references = _check(predictions, references_list)
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        return [
            [100.0 * scorer.score_multi(refs, p)["rougeL"].fmeasure, 1.0] for p, refs in zip(predictions, references)
        ]
    if metric == "accuracy":
        references = _check(predictions, references_list)
        return [
            [float(normalize_label(p) == normalize_label(refs[0])), 1.0] for p, refs in zip(predictions, references)
        ]
    raise PrefixTuneError(
        f"no per-example statistics for metric {metric!r}; choose from {', '.join(BOOTSTRAP_METRICS)}"
    )


def score_from_statistics(metric: str, summed: Sequence[float]) -> float:
    """The corpus score of column sums of `example_statistics` rows."""
    if metric == "bleu":
        from sacrebleu.metrics import BLEU

        return float(BLEU()._compute_score_from_stats([int(round(v)) for v in summed]).score)
    if metric in ("rougeL", "accuracy"):
        return summed[0] / summed[1] if summed[1] else 0.0
    raise PrefixTuneError(
        f"no per-example statistics for metric {metric!r}; choose from {', '.join(BOOTSTRAP_METRICS)}"
    )


def bootstrap_interval(
    metric: str,
    runs: Sequence[Sequence[Sequence[float]]],
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(point, low, high): the mean over runs of the corpus score, and its percentile bootstrap interval.

    `runs` holds each run's `example_statistics` over the same inputs (e.g. one run per training seed). Each
    resample draws len(inputs) inputs with replacement (one draw shared by every run), recomputes each run's
    corpus score on them and averages over runs; the interval is the (1 - level) / 2 and (1 + level) / 2
    quantiles of those means. Deterministic for a given `seed`.
    """
    import numpy as np  # deferred: only the bootstrap needs it

    if not runs or any(len(r) != len(runs[0]) for r in runs) or not runs[0]:
        raise PrefixTuneError("bootstrap: give one or more runs with statistics for the same, non-empty inputs")
    if resamples < 1 or not 0 < level < 1:
        raise PrefixTuneError(f"bootstrap: resamples must be >= 1 and level in (0, 1), got {resamples}, {level}")
    tables = [np.asarray(r, dtype=np.float64) for r in runs]
    point = float(np.mean([score_from_statistics(metric, t.sum(axis=0).tolist()) for t in tables]))
    rng = np.random.default_rng(seed)
    n = len(tables[0])
    means = np.empty(resamples)
    for b in range(resamples):
        index = rng.integers(0, n, size=n)
        means[b] = np.mean([score_from_statistics(metric, t[index].sum(axis=0).tolist()) for t in tables])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return point, float(low), float(high)
