"""The run directory: whether a run may write (or resume) there, metrics.jsonl, loss.png.

A run directory holds config.yaml, metrics.jsonl (one JSON record per logged step or validation), loss.png,
the trained method (or OUT/<task>/ per task) and checkpoint/ (checkpoint.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_save_figure, atomic_write_bytes
from ..config import TrainConfig
from ..errors import PrefixTuneError
from .checkpoint import checkpoint_dir

# Settings that may change between an interrupted run and its --resume; everything else must match.
RESUMABLE = {
    "max_steps", "epochs", "log_every", "eval_every", "save_every", "early_stop", "threads", "on_nonfinite",
    "device",  # a preempted run may come back on another machine (the dtype must stay: it changes the numbers)
}  # fmt: skip
METRICS = "metrics.jsonl"


def prepare_out(cfg: TrainConfig, resume: bool) -> Path:
    """The run directory, checked: writable; with `resume`, a run of the same config or nothing saved yet (then the
    run starts there: one command can be rerun after a preemption at any moment); without, no run yet."""
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PrefixTuneError(f"cannot write to output directory {out}: {e.strerror}") from None
    saved = out / "config.yaml"
    if resume:
        if not holds_run(out):  # nothing saved yet (killed before its first file, or never started): start it
            return out
        if not saved.is_file():
            raise PrefixTuneError(f"--resume: {out} has a checkpoint but no config.yaml; start again in another --out")
        before = yaml.safe_load(saved.read_text()) or {}
        now = cfg.to_dict()
        differ = sorted(k for k in set(before) | set(now) if k not in RESUMABLE and before.get(k) != now.get(k))
        if differ:
            raise PrefixTuneError(f"--resume: {out} was trained with a different config ({', '.join(differ)} differ)")
    elif saved.exists() or checkpoint_dir(out) is not None:
        raise PrefixTuneError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return out


def holds_run(out: Path) -> bool:
    """Whether a run saved anything in `out` yet (its config or a checkpoint): what --resume can continue."""
    return (out / "config.yaml").exists() or checkpoint_dir(out) is not None


def append_metrics(metrics_path: Path, record: dict[str, Any]) -> None:
    """Append one record to metrics.jsonl (a run killed mid-append leaves a torn last line, which readers skip)."""
    with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def keep_metrics_until(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl with the records up to `step` (the checkpoint's): a killed run may have logged
    later steps, which the resumed run logs again, and may have left a torn last line."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if isinstance(r.get("step"), int) and r["step"] <= step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if path.read_bytes() != text.encode():
        atomic_write_bytes(path, text.encode())


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of metrics.jsonl. A torn last line (the run was killed while appending it) is left out; a bad
    line anywhere else raises our error."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as e:
        raise PrefixTuneError(f"cannot read {path}: {e.strerror}") from None
    records = []
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    for index, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if index == len(numbered) - 1:
                break  # torn last line
            raise PrefixTuneError(f"{path}:{number}: not a metrics record ({e}); delete the line") from None
        records.append(record)
    return records


def plot_losses(metrics_path: Path, png: Path, title: str = "training loss") -> None:
    """loss.png: training loss per logged step, and validation loss where recorded (one line per task)."""
    # deferred: matplotlib is a slow import that only the end of a run needs
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if train:
        ax.plot(*zip(*train), label="train" if not any("task_loss" in r for r in records) else "train (task mean)")
    for task in dict.fromkeys(r.get("task") for r in records if "val_loss" in r):
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and r.get("task") == task]
        ax.plot(*zip(*val), marker="o", label="validation" if task is None else f"validation {task}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_save_figure(fig, png)
    plt.close(fig)
