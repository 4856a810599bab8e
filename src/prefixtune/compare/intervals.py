"""The report's statistics beyond the mean: bootstrap intervals over test inputs, and the sweep's tables.

The interval of a (method, train size) row is the percentile bootstrap of its mean over seeds: each of
`bootstrap` resamples (1000 by default, seeded by `bootstrap_seed`) draws the test inputs with replacement, once
for all seeds, recomputes every seed's corpus score on them (BLEU from sacrebleu's sufficient statistics, not a
mean of sentence BLEUs; ROUGE-L and accuracy as means) and averages over the seeds
(`prefixtune.eval.metrics.bootstrap_interval`). It says how much the score depends on which test inputs were
drawn; the spread over seeds (mean ± sd) says how much it depends on the seed.
"""

from __future__ import annotations

import statistics
from typing import Any

from ..eval import metrics


def group_name(run: dict[str, Any]) -> str:
    """`method@size` ("all" for the whole training split): the key of a row in results.json's intervals."""
    return f"{run['method']}@{run.get('train_size') or 'all'}"


def group_intervals(runs: list[dict[str, Any]], key: str, settings: dict[str, Any]) -> dict[str, list[float]]:
    """group_name -> [point, low, high] of the quality (accuracy in %), for rows whose runs kept their statistics."""
    resamples = settings.get("bootstrap", 0)
    if not resamples:
        return {}
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(group_name(run), []).append(run)
    found: dict[str, list[float]] = {}
    for name, group in groups.items():
        tables = [r.get("example_stats", {}).get(key) for r in group]
        if not all(tables) or len({len(t) for t in tables}) != 1:
            continue  # a run of an older compare, or scored on other inputs: no interval rather than a wrong one
        point, low, high = metrics.bootstrap_interval(
            key, tables, resamples=resamples, seed=settings.get("bootstrap_seed", 0)
        )
        scale = 100.0 if key == "accuracy" else 1.0
        found[name] = [round(scale * v, 4) for v in (point, low, high)]
    return found


def summary(runs: list[dict[str, Any]], key: str, intervals: dict[str, list[float]]) -> list[dict[str, Any]]:
    """results.json's `summary`: per (method, train size) the rate, the seeds, mean and sd of each test score over
    seeds (sd null with one seed), and the bootstrap interval of the quality `key`."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(group_name(run), []).append(run)
    rows = []
    for name, group in groups.items():
        names = ("accuracy",) if key == "accuracy" else ("bleu", "rougeL", "loss")
        scores: dict[str, dict[str, float | None]] = {}
        for metric in names:
            values = [r["scores"][metric] for r in group if r["scores"].get(metric) is not None]
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else None
                scores[metric] = {"mean": round(statistics.mean(values), 4), "sd": None if sd is None else round(sd, 4)}
        found = intervals.get(name)
        rows.append(
            {
                "method": group[0]["method"],
                "train_size": group[0].get("train_size"),
                "lr": group[0].get("lr"),
                "seeds": [r.get("seed") for r in group],
                "scores": scores,
                "interval_95": None if found is None else {"metric": key, "low": found[1], "high": found[2]},
            }
        )
    return rows


def _select_value(record: dict[str, Any], key: str) -> float | None:
    value = record.get("select_scores", {}).get(key)
    return None if value is None else (100 * value if key == "accuracy" else value)


def rates_tried(run: dict[str, Any], swept: list[dict[str, Any]], key: str) -> str:
    """`1e-3: 40.1, 3e-3: 45.2*, ...`: the validation score of each rate at the size this row's rate came from."""
    size = run.get("train_size")
    mine = [r for r in swept if r["method"] == run["method"]]
    if not mine or run.get("lr") is None:
        return "-"  # the untuned model
    sizes = {r.get("train_size") for r in mine}
    if size not in sizes:  # a size between the swept ones: the nearest swept size whose winner it reuses
        won = [r for r in mine if r.get("lr") == run.get("lr")]
        return f"reuses {run.get('lr'):g} (won at {', '.join(str(r.get('train_size') or 'all') for r in won)})"
    parts = []
    for r in sorted((r for r in mine if r.get("train_size") == size), key=lambda r: r["lr"]):
        value = _select_value(r, key)
        star = "*" if r["lr"] == run.get("lr") else ""
        parts.append(f"{r['lr']:g}: {'-' if value is None else format(value, '.2f')}{star}")
    return ", ".join(parts)


def chosen_rates(runs: list[dict[str, Any]], swept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, train size): the rate it trained with, and whether that size was swept."""
    seen: dict[str, dict[str, Any]] = {}
    swept_at = {(r["method"], r.get("train_size")) for r in swept}
    for run in runs:
        if run["method"] == "untuned":
            continue
        seen.setdefault(
            group_name(run),
            {
                "method": run["method"],
                "train_size": run.get("train_size"),
                "lr": run.get("lr"),
                "swept_here": (run["method"], run.get("train_size")) in swept_at,
            },
        )
    return list(seen.values())


def sweep_table(swept: list[dict[str, Any]], key: str) -> tuple[list[str], list[list[str]]]:
    """Every swept run: method, train size, seed, rate, its validation scores; the winners marked."""
    header = ["method", "train size", "seed", "lr", f"validation {key}", "validation loss", "won"]
    rows = []
    for r in swept:
        value, loss = _select_value(r, key), r.get("select_scores", {}).get("loss")
        rows.append(
            [
                r["method"],
                str(r.get("train_size") or "all"),
                str(r.get("seed", 0)),
                f"{r['lr']:g}",
                "-" if value is None else f"{value:.2f}",
                "-" if loss is None else f"{loss:.3f}",
                ("yes" if r.get("won") else "") + (" (beyond grid)" if r.get("beyond_grid") else ""),
            ]
        )
    return header, rows


def describe(settings: dict[str, Any]) -> str:
    """The report's sentences on the sweep, the seeds and the intervals."""
    parts = []
    if settings.get("sweep"):
        factors = ", ".join(f"x{f:.3g}" for f in settings.get("lr_factors", []))
        own = settings.get("lr_lists") or {}
        tried = [f"{m} tried {', '.join(f'{r:g}' for r in rates)}" for m, rates in own.items()]
        others = [m for m in settings["methods"] if m not in own]
        if others:
            tried.insert(
                0, f"{', '.join(others)} tried {'its' if len(others) == 1 else 'each its'} centre rate {factors}"
            )
        sizes = settings.get("sweep_sizes")
        where = "every train size" if sizes is None else f"train sizes {', '.join(str(s or 'all') for s in sizes)}"
        parts.append(
            f"Learning rates: {'; '.join(tried)}; on the first seed only "
            f"({settings['seeds'][0]}) at {where}, scored on split `{settings.get('select_split', 'validation')}`; "
            "the winner (best validation score, then lowest validation loss) trained every seed, and only winners "
            "were scored on the test split (other sizes reuse the winner of the nearest swept size)."
        )
        extend = settings.get("sweep_extend", 0)
        if extend:
            parts.append(
                f"A winner at the lowest or highest rate tried made its method try one more rate beyond it (one grid "
                f"step further), up to {extend} time{'s' if extend > 1 else ''} per size (rows marked beyond grid)."
            )
        if settings.get("select_split", "validation") in (settings.get("eval_split"), "all"):
            parts.append("Rates were chosen on the scored inputs themselves: the winners' scores are optimistic.")
    if settings.get("bootstrap"):
        parts.append(
            f"Intervals: percentile bootstrap of the mean over seeds, {settings['bootstrap']} resamples of the test "
            f"inputs (seed {settings.get('bootstrap_seed', 0)}); ± is the standard deviation over seeds."
        )
    return " ".join(parts)
