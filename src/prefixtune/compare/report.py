"""The comparison report: results.json (raw), report.md and report.html (tables), and three plots.

Rows are (method, train size), averaged over seeds (quality as mean ± sd when there are several, and a bootstrap
95% interval over the test inputs: intervals.py). With a learning-rate sweep each row says the rate it won with and
the validation score of every rate tried; a table lists every swept run. Parameters are
counted against the base model: "trainable" is what the optimizer updates, "saved" what the saved files hold
(prefix-tuning trains an MLP reparameterization, ~4% of smollm2-135m, but saves only the collapsed prefix, ~0.2%).
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import atomic_save_figure, atomic_write_bytes
from . import intervals as ci

PNG_FILES = ("loss_curves.png", "quality_vs_params.png", "quality_vs_train_size.png")


GENERATION_METRICS = {"bleu": "BLEU", "rougeL": "ROUGE-L"}  # compare --metric: name in the scores -> label


def quality_key(runs: list[dict[str, Any]], scores: str = "scores", metric: str | None = None) -> str:
    """Accuracy for classification, else `metric` (compare --metric; default bleu). `scores`: the runs' field
    holding the scores, e.g. select_scores."""
    return "accuracy" if any("accuracy" in r.get(scores, {}) for r in runs) else metric or "bleu"


def label(key: str) -> str:
    return GENERATION_METRICS.get(key, "accuracy (%)" if key == "accuracy" else key)


def group_runs(runs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Runs of one (method, train size), in the order they ran."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["method"], run.get("train_size")), []).append(run)
    return list(groups.values())


def _mean(group: list[dict[str, Any]], get: Callable[[dict[str, Any]], Any]) -> float | None:
    values = [v for v in map(get, group) if v is not None]
    return sum(values) / len(values) if values else None


def _spread(group: list[dict[str, Any]], get: Callable[[dict[str, Any]], Any], fmt: str) -> str:
    values = [v for v in map(get, group) if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def _count(n: float | None, of: float) -> str:
    if n is None:
        return "-"
    if n == 0:
        return "0"
    text = f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else f"{n:.0f}"
    return f"{text} ({100 * n / of:.3g}%)"


def _bytes(n: float | None) -> str:
    if not n:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def main_table(
    runs: list[dict[str, Any]],
    intervals: dict[str, list[float]] | None = None,
    swept: list[dict[str, Any]] | None = None,
    key: str | None = None,
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table (one row per method and train size).

    `intervals` (results.json's, by `ci.group_name`) adds the bootstrap 95% interval of the quality `key` (default:
    `quality_key`); `swept` (the sweep's runs) adds the validation score of every rate tried, the winner starred.
    """
    key = key or quality_key(runs)
    header = [
        "method",
        "train size",
        "seeds",
        "lr",
        "trainable params (% of base)",
        "saved params (% of base)",
        "on disk",
        "steps",
        "train time",
        "tokens/s",
        "peak RSS, training (above loaded model)",
    ]
    header += ["accuracy"] if key == "accuracy" else ["BLEU", "ROUGE-L", "test loss"]
    if intervals is not None:
        header.append(f"{'accuracy' if key == 'accuracy' else label(key)} 95% interval (test inputs)")
    if swept:
        header.append(f"validation {key} per rate tried (* won)")
    rows = []
    for group in group_runs(runs):
        first = group[0]
        of = first["base_params"]
        # only processes that trained from step 0: a resumed one's high-water mark misses the earlier steps
        whole = [r for r in group if not r.get("resumed_from_step")]
        peak, loaded = (
            _mean(whole, lambda r: r.get("peak_rss_train_mb")),
            _mean(whole, lambda r: r["rss_after_load_mb"]),
        )
        row = [
            first["method"],
            _size(first),
            str(len(group)) if first["method"] != "untuned" else "-",
            f"{first['lr']:g}" if first.get("lr") else "-",
            _count(_mean(group, lambda r: r["trainable_params"]), of),
            _count(_mean(group, lambda r: r["saved_params"]), of),
            _bytes(_mean(group, lambda r: r["saved_bytes"])),
            str(first["steps"]),
            f"{_mean(group, lambda r: r['train_seconds']):.0f} s" if first["steps"] else "-",
            f"{_mean(group, lambda r: r.get('tokens_per_s')):.0f}" if first.get("tokens_per_s") else "-",
            f"{peak:.0f} MB (+{peak - loaded:.0f})" if peak is not None and loaded is not None else "-",
        ]
        if key == "accuracy":
            row.append(_spread(group, lambda r: 100 * r["scores"]["accuracy"], ".1f") + " %")
        else:
            for k in ("bleu", "rougeL", "loss"):
                row.append(_spread(group, lambda r, k=k: r["scores"].get(k), ".2f"))
        if intervals is not None:
            found = intervals.get(ci.group_name(first))
            row.append(f"[{found[1]:.2f}, {found[2]:.2f}]" if found else "-")
        if swept:
            row.append(ci.rates_tried(first, swept, key))
        rows.append(row)
    return header, rows


def _size(run: dict[str, Any]) -> str:
    if run["method"] == "untuned":
        return "-"
    return str(run["train_size"]) if run.get("train_size") else f"all ({run.get('train_examples', '?')})"


def size_table(runs: list[dict[str, Any]], key: str | None = None) -> tuple[list[str], list[list[str]]] | None:
    """Quality per method (rows) and train size (columns), mean ± sd over seeds; None with one size only."""
    trained = [r for r in runs if r["method"] != "untuned"]
    sizes = sorted({r.get("train_size") or 0 for r in trained})
    if len(sizes) < 2:
        return None
    key = key or quality_key(runs)
    header = ["method"] + [f"{key} @ {s or 'all'}" for s in sizes]
    rows = []
    for method in dict.fromkeys(r["method"] for r in trained):
        row = [method]
        for size in sizes:
            group = [r for r in trained if r["method"] == method and (r.get("train_size") or 0) == size]
            row.append(_spread(group, lambda r: _quality(r, key), ".2f"))
        rows.append(row)
    return header, rows


def warnings_table(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
    """What the trainer warned about (a diverging loss), per run: a seed that diverged is otherwise only a low score
    in a mean, and the progress lines that showed it are gone once the report is read."""
    rows = {(r["name"], step): text for r in runs for step, text in r.get("warnings") or []}  # a reused sweep run once
    return (
        (["run", "step", "warning"], [[name, str(step), text] for (name, step), text in rows.items()]) if rows else None
    )


def _quality(run: dict[str, Any], key: str) -> float | None:
    value = run["scores"].get(key)
    return None if value is None else (100 * value if key == "accuracy" else value)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _describe(settings: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    examples = next((int(r["scores"]["examples"]) for r in runs if "examples" in r["scores"]), "?")
    limit = f", first {settings['eval_limit']}" if settings.get("eval_limit") else ""
    rate = (  # `lr_per_method` holds the resolved rates, a given METHOD.lr included: no sweep is not "default"
        "its own swept learning rate"
        if settings.get("sweep")
        else "one learning rate each (column lr: the method's default, the prefix's scaled to the training data's "
        "target tokens per step, unless given as METHOD.lr=X)"
    )
    return (
        f"Model `{settings['model']}`, data `{settings['data']}`; every method trains {settings['max_steps']} steps "
        f"of batch {settings['batch_size']} (seeds {', '.join(map(str, settings['seeds']))}) at "
        f"{rate}, each run in its own process, {_at_a_time(runs)}. "
        f"Scored on split `{settings['eval_split']}` ({examples} inputs{limit}); the quality metric is "
        f"{label(quality_key(runs, metric=settings.get('metric')))}. {ci.describe(settings)} "
        "Peak RSS is the process's high-water mark at the end "
        "of training; it includes Python, torch and the base model, the same for every row (the part in "
        "parentheses is what training added after the model was loaded); a run resumed from a checkpoint shows "
        '"-" (its process did not see every step).'
    )


def _at_a_time(runs: list[dict[str, Any]]) -> str:
    jobs = max((r.get("jobs", 1) for r in runs), default=1)
    if jobs <= 1:
        return "one at a time"
    return (
        f"up to {jobs} at a time (`--jobs {jobs}`: times and peak memory were measured while runs shared the "
        "machine, each worker with its share of the cores)"
    )


def write_report(
    out: Path, settings: dict[str, Any], runs: list[dict[str, Any]], swept: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Write every report file into `out`; returns the raw results (results.json)."""
    swept = swept or []
    key = quality_key(runs, metric=settings.get("metric"))
    plots = [plot_losses(runs, out / PNG_FILES[0]), plot_quality_vs_params(runs, out / PNG_FILES[1], key)]
    plots.append(plot_quality_vs_size(runs, out / PNG_FILES[2], key))
    names = ["report.md", "report.html", "results.json"] + [p.name for p in plots if p]
    intervals = ci.group_intervals(runs, key, settings)
    raw = {
        "settings": settings,
        "quality_metric": key,
        "files": names,
        "runs": runs,
        "intervals": intervals,
        "summary": ci.summary(runs, key, intervals),
        "sweep": [{k: v for k, v in r.items() if k not in ("example_stats", "losses")} for r in swept],
        "chosen_lr": ci.chosen_rates(runs, swept),
    }
    atomic_write_bytes(out / "results.json", (json.dumps(raw, indent=2) + "\n").encode())
    tables = [("Methods", main_table(runs, intervals if settings.get("bootstrap") else None, swept, key))]
    by_size = size_table(runs, key)
    if by_size:
        tables.append((f"{key} by training-set size", by_size))
    if swept:
        tables.append(("Learning-rate sweep (selection split)", ci.sweep_table(swept, key)))
    if warned := warnings_table(runs + swept):
        tables.append(("Training warnings", warned))
    intro = _describe(settings, runs)
    md = [f"# prefixtune compare: {', '.join(settings['methods'])}\n", intro + "\n"]
    for title, (header, rows) in tables:
        md += [f"## {title}\n", markdown(header, rows) + "\n"]
    md += [f"![{p.stem}]({p.name})\n" for p in plots if p]
    atomic_write_bytes(out / "report.md", "\n".join(md).encode())
    parts = [
        f"<h1>prefixtune compare: {html.escape(', '.join(settings['methods']))}</h1>",
        f"<p>{html.escape(intro)}</p>",
    ]
    for title, (header, rows) in tables:
        parts += [f"<h2>{html.escape(title)}</h2>", html_table(header, rows)]
    for p in plots:
        if p:
            data = base64.b64encode(p.read_bytes()).decode()
            parts.append(f'<figure><img alt="{p.stem}" src="data:image/png;base64,{data}"></figure>')
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
    )
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>prefixtune compare</title><style>{style}</style>"
    page += f"</head><body>{''.join(parts)}</body></html>\n"
    atomic_write_bytes(out / "report.html", page.encode())
    return raw


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.2), dpi=100)


def _save(fig: Any, png: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_save_figure(fig, png)
    plt.close(fig)
    return png


def plot_losses(runs: list[dict[str, Any]], png: Path) -> Path:
    """Training loss per method on one plot (in low-data mode: the largest train size, first seed)."""
    fig, ax = _figure()
    chosen: dict[str, dict[str, Any]] = {}
    for run in runs:
        if run["method"] == "untuned" or not run.get("losses"):
            continue
        size = run.get("train_size") or math.inf
        if run["method"] not in chosen or size > (chosen[run["method"]].get("train_size") or math.inf):
            chosen[run["method"]] = run
    for method, run in chosen.items():
        ax.plot(*zip(*run["losses"]), label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    if chosen:
        ax.legend(fontsize="small")
    return _save(fig, png)


def plot_quality_vs_params(runs: list[dict[str, Any]], png: Path, key: str | None = None) -> Path:
    """Quality against trainable parameters (filled) and saved parameters (hollow, where they differ), log x."""
    key = key or quality_key(runs)
    fig, ax = _figure()
    largest: dict[str, float] = {}
    for run in runs:
        largest[run["method"]] = max(largest.get(run["method"], 0), run.get("train_size") or math.inf)
    for group in group_runs(runs):
        first = group[0]
        quality = _mean(group, lambda r: _quality(r, key))
        if quality is None or (first.get("train_size") or math.inf) < largest[first["method"]]:
            continue  # low-data mode: each method at its largest train size
        if first["method"] == "untuned":
            ax.axhline(quality, color="gray", linestyle="--", label="untuned")
            continue
        trainable, saved = _mean(group, lambda r: r["trainable_params"]), _mean(group, lambda r: r["saved_params"])
        (point,) = ax.plot([trainable], [quality], "o", label=first["method"])
        if saved and abs(saved - trainable) > 0.05 * trainable:
            ax.plot([saved], [quality], "o", mfc="none", color=point.get_color())
            ax.plot([saved, trainable], [quality, quality], ":", color=point.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (hollow: saved parameters)")
    ax.set_ylabel(label(key))
    ax.set_title(f"{key} vs parameters")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return _save(fig, png)


def plot_quality_vs_size(runs: list[dict[str, Any]], png: Path, key: str | None = None) -> Path | None:
    """Quality against training-set size, mean ± sd over seeds, one line per method; None with one size."""
    key = key or quality_key(runs)
    if size_table(runs, key) is None:
        png.unlink(missing_ok=True)
        return None
    fig, ax = _figure()
    for method in dict.fromkeys(r["method"] for r in runs if r["method"] != "untuned"):
        points = []
        for group in group_runs([r for r in runs if r["method"] == method]):
            values = [q for q in (_quality(r, key) for r in group) if q is not None]
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                points.append((group[0].get("train_examples") or 0, statistics.mean(values), spread))
        points.sort()
        if points:
            xs, ys, errs = zip(*points)
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("training examples")
    ax.set_ylabel(label(key))
    ax.set_title(f"{key} vs training-set size (mean ± sd over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return _save(fig, png)
