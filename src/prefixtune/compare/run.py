"""`prefixtune compare`: several methods on the same model, data, budget and evaluation, each in its own process.

    DIR/compare.json   the comparison's settings; a later command on DIR must give the same ones (else refused)
    DIR/runs/NAME/     one run (NAME = method, or method-n<size>-s<seed> in low-data mode): job.json (what its
                       worker does), train/ (a `prefixtune train` run directory), worker.log, and result.json,
                       written last: a run that has it is finished and is reused, never retrained
    DIR/results.json, report.md, report.html, loss_curves.png, quality_vs_params.png (+ quality_vs_train_size.png)

Each run is a worker process (worker.py) that loads the model, trains (from the run's checkpoint when an
earlier worker was interrupted), evaluates, and records its own peak RSS (`ru_maxrss`, the kernel's high-water
mark of that process) after training and at the end. One process per run, one run at a time: a method's memory
and time are its own. A finished run's checkpoint is deleted (the trained method stays in train/).

Method options are routed per method: `prefix.num_virtual_tokens=10`, `lora.r=8`, `prefix.lr=5e-3`. An option
without a method prefix is given to every method, so each of them must take it. Training settings (`warmup_steps`,
`max_length`, ...) are shared: the budget is the same for everyone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .. import data, models
from ..atomic import atomic_write_bytes
from ..config import TrainConfig, build_config
from ..errors import PrefixTuneError
from ..methods.registry import METHODS, make_config, option_names
from ..train import tasks
from . import report

SETTINGS_FILE = "compare.json"
RESULT_FILE = "result.json"
UNTUNED = "untuned"
# Fixed by compare itself (flags or the run layout), so not accepted as key=value.
NOT_OVERRIDABLE = {
    "method": "--methods",
    "out": "--out",
    "options": "METHOD.OPTION=VALUE",
    "model": "--model",
    "data": "--data",
    "train_size": "--train-sizes",
    "seed": "--seeds",
    "max_steps": "--max-steps",
    "batch_size": "--batch-size",
}


@dataclass
class CompareSettings:
    """What a comparison runs; saved as DIR/compare.json (with each method's resolved learning rate)."""

    methods: list[str]
    model: str = "smollm2-135m"
    data: str = "e2e"
    max_steps: int = 100
    batch_size: int = 8
    train_sizes: list[int | None] = field(default_factory=lambda: [None])  # None: the whole training split
    seeds: list[int] = field(default_factory=lambda: [0])
    lr: float | None = None  # one rate for every method; None: each method's METHODS[m].default_lr
    eval_split: str = "test"  # or train, validation, all
    eval_limit: int | None = None
    max_new_tokens: int = 64
    num_beams: int = 1
    untuned: bool = False  # also score the model without training (one more row)
    overrides: list[str] = field(default_factory=list)  # key=value, routed by `route_overrides`


@dataclass
class Job:
    name: str
    method: str | None  # None: the untuned model, scored only
    config: TrainConfig


def route_overrides(
    methods: list[str], overrides: list[str]
) -> tuple[dict[str, str], dict[str, dict[str, str]], dict[str, str]]:
    """key=value items -> (shared training settings, options per method, learning rate per method); all as text."""
    train_fields = {f.name for f in fields(TrainConfig)}
    common: dict[str, str] = {}
    options: dict[str, dict[str, str]] = {m: {} for m in methods}
    rates: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise PrefixTuneError(f"override {item!r} is not of the form key=value")
        method, dot, rest = key.partition(".")
        if dot and method in METHODS:
            if method not in methods:
                owners = [m for m in methods if key in option_names(m)]  # e.g. lora+prefix's own `lora.r`
                hint = f"; for {owners[0]}'s option write {owners[0]}.{key}={value}" if owners else ""
                raise PrefixTuneError(f"{item}: method {method!r} is not in --methods ({','.join(methods)}){hint}")
            if rest == "lr":
                rates[method] = value
            elif rest in option_names(method):
                options[method][rest] = value
            elif rest in train_fields:
                raise PrefixTuneError(
                    f"{item}: training settings are shared by every method (equal budget); give {rest}={value}"
                )
            else:
                raise PrefixTuneError(
                    f"{item}: {rest!r} is not an option of method {method!r}; "
                    f"its options are: {', '.join(option_names(method))}, lr"
                )
        elif key in NOT_OVERRIDABLE:
            raise PrefixTuneError(f"{item}: compare sets {key} itself; use {NOT_OVERRIDABLE[key]}")
        elif key in train_fields:
            common[key] = value
        else:
            missing = [m for m in methods if key not in option_names(m)]
            if len(missing) == len(methods):
                raise PrefixTuneError(
                    f"{item}: {key!r} is neither a training setting nor an option of {', '.join(methods)}; "
                    "give a method its option as METHOD.OPTION=VALUE (e.g. lora.r=8)"
                )
            if missing:
                takers = [m for m in methods if m not in missing]
                raise PrefixTuneError(
                    f"{item}: option {key!r} does not apply to {', '.join(missing)}; give it to one method "
                    f"as {takers[0]}.{key}={value}"
                )
            for m in methods:
                options[m][key] = value
    return common, options, rates


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise PrefixTuneError(
            f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid methods: {', '.join(METHODS)}"
        )
    if not names:
        raise PrefixTuneError("--methods is empty; give a comma-separated list, e.g. prefix,lora,full")
    if len(set(names)) != len(names):
        raise PrefixTuneError(f"--methods names a method twice: {text}")
    return names


def parse_sizes(text: str) -> list[int | None]:
    """`50,100,all` -> [50, 100, None]."""
    sizes: list[int | None] = []
    for piece in (p.strip() for p in text.split(",") if p.strip()):
        if piece == "all":
            sizes.append(None)
            continue
        if not piece.isdigit() or int(piece) < 1:
            raise PrefixTuneError(f"--train-sizes: {piece!r} is not a positive integer (or 'all')")
        sizes.append(int(piece))
    if not sizes or len(set(sizes)) != len(sizes):
        raise PrefixTuneError(f"--train-sizes {text!r}: give distinct sizes, e.g. 50,100,200,500")
    return sorted(sizes, key=lambda s: float("inf") if s is None else s)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise PrefixTuneError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise PrefixTuneError(f"--seeds {text!r}: give distinct integers, e.g. 0,1")
    return seeds


def plan(settings: CompareSettings, out: str | os.PathLike[str]) -> tuple[list[Job], dict[str, Any]]:
    """Every run of the comparison with its TrainConfig, and the settings as saved in compare.json.

    Every user error (bad method, option, setting, learning rate) is raised here, before anything is written.
    """
    methods = list(settings.methods)
    common, options, rates = route_overrides(methods, settings.overrides)
    several = len(settings.train_sizes) > 1 or settings.train_sizes != [None] or len(settings.seeds) > 1
    jobs: list[Job] = []
    resolved_lr: dict[str, float] = {}
    for method in ([None] if settings.untuned else []) + methods:
        for size in settings.train_sizes if method else [None]:
            for seed in settings.seeds if method else [settings.seeds[0]]:
                name = method or UNTUNED
                if several and method:
                    name += f"-n{size or 'all'}-s{seed}"
                values = {
                    "model": settings.model,
                    "data": settings.data,
                    "method": method or methods[0],
                    "out": str(Path(out) / "runs" / name / "train"),
                    "max_steps": settings.max_steps,
                    "batch_size": settings.batch_size,
                    "train_size": size,
                    "seed": seed,
                    "save_every": 50,  # an interrupted run resumes from its last checkpoint (override: save_every)
                    "log_every": max(1, min(10, settings.max_steps // 20)),  # enough points for the loss plot
                    "lr": settings.lr,
                }
                items = [f"{k}={v}" for k, v in common.items()]
                if method:
                    items += [f"{k}={v}" for k, v in options[method].items()]
                    items += [f"lr={rates[method]}"] if method in rates else []
                cfg = build_config(TrainConfig, None, values, items, option_names)
                if isinstance(cfg.data, dict):
                    raise PrefixTuneError("compare takes one data set (not several tasks); give --data once")
                if method:
                    make_config(method, cfg.options)  # option values are checked now, not in the worker
                    cfg.lr = cfg.lr or METHODS[method].default_lr
                    resolved_lr[method] = cfg.lr
                jobs.append(Job(name, method, cfg))
    saved = asdict(settings)
    saved.pop("overrides")
    saved.update(shared_settings=dict(sorted(common.items())), method_options=options, lr_per_method=resolved_lr)
    return jobs, saved


def check_inputs(jobs: list[Job], settings: CompareSettings) -> None:
    """Model name, data and sizes, cheaply, before any process starts."""
    models.resolve(settings.model)
    first = jobs[-1].config
    available = len(tasks.load_tasks(replace(first, train_size=None))[0][0].train)
    largest = max((s for s in settings.train_sizes if s is not None), default=0)
    if largest > available:
        raise PrefixTuneError(
            f"--train-sizes {largest}: {settings.data} has only {available} training examples "
            f"((source, reference) pairs) in split {first.train_split!r}"
        )
    if not eval_examples(first, settings.eval_split, settings.eval_limit):
        raise PrefixTuneError(f"{settings.data}: split {settings.eval_split!r} has no examples to evaluate")


def eval_examples(cfg: TrainConfig, split: str, limit: int | None) -> list[Any]:
    examples = data.load_dataset(
        str(cfg.data),
        split=None if split == "all" else split,
        data_dir=cfg.data_dir,
        source_field=cfg.source_field,
        target_field=cfg.target_field,
    )
    return examples[:limit]


def run_compare(settings: CompareSettings, out: str | os.PathLike[str], *, progress: bool = True) -> dict[str, Any]:
    """Run (or reuse) every run of the comparison and write the report; returns results.json's content."""
    out = Path(out)
    jobs, saved = plan(settings, out)
    check_inputs(jobs, settings)
    settings_path = out / SETTINGS_FILE
    if settings_path.is_file():
        try:
            before = json.loads(settings_path.read_text())
        except (OSError, ValueError) as e:
            raise PrefixTuneError(f"{settings_path} is unreadable ({e}); choose another --out") from None
        differ = sorted(k for k in set(before) | set(saved) if before.get(k) != saved.get(k))
        if differ:
            raise PrefixTuneError(
                f"{out} holds a comparison with other settings ({', '.join(differ)} differ); "
                "repeat its command to resume it, or choose another --out"
            )
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrefixTuneError(f"{out} exists and is not a compare directory (no {SETTINGS_FILE}); choose another --out")
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrefixTuneError(f"cannot write to {out}: {e.strerror}") from None
    with _lock(out) as lock_fd:
        if not settings_path.is_file():
            atomic_write_bytes(settings_path, (json.dumps(saved, indent=2) + "\n").encode())
        results = []
        for number, job in enumerate(jobs, 1):
            results.append(_run_or_reuse(job, number, len(jobs), settings, lock_fd, progress))
    return report.write_report(out, saved, results)


def write_job(job: Job, settings: CompareSettings) -> Path:
    """RUN/job.json: everything the worker needs (worker.run_job reads it)."""
    run_dir = Path(job.config.out).parent
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "name": job.name,
        "method": job.method,
        "config": job.config.to_dict(),
        "eval": {
            "split": settings.eval_split,
            "limit": settings.eval_limit,
            "max_new_tokens": settings.max_new_tokens,
            "num_beams": settings.num_beams,
            "batch_size": settings.batch_size,
        },
    }
    atomic_write_bytes(run_dir / "job.json", (json.dumps(spec, indent=2) + "\n").encode())
    return run_dir / "job.json"


def _run_or_reuse(
    job: Job, number: int, count: int, settings: CompareSettings, lock_fd: int, progress: bool
) -> dict[str, Any]:
    run_dir = Path(job.config.out).parent
    result_path = run_dir / RESULT_FILE
    tag = f"[{number}/{count}] {job.name}"
    if result_path.is_file():
        _say(progress, f"{tag}: finished earlier, reusing {result_path}")
        return json.loads(result_path.read_text())
    job_path = write_job(job, settings)
    what = f"training {job.config.max_steps} steps at lr {job.config.lr:g}" if job.method else "scoring"
    _say(progress, f"{tag}: {what} in a new process (log: {run_dir / 'worker.log'})")
    started = time.perf_counter()
    metrics = Path(job.config.out) / "metrics.jsonl"
    seen = _line_count(metrics)
    log_path = run_dir / "worker.log"
    log_start = log_path.stat().st_size if log_path.is_file() else 0
    with open(log_path, "ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefixtune.compare.worker", "--job", str(job_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(lock_fd,),  # the worker holds the directory lock too, even if this process dies
        )
        try:
            while worker.poll() is None:
                time.sleep(0.5)
                seen = _report_progress(progress, tag, metrics, seen, job.config.max_steps)
        except KeyboardInterrupt:  # the worker got the Ctrl-C too: it saves a checkpoint and stops
            worker.wait()
            raise
    if worker.returncode != 0:
        raise PrefixTuneError(f"{job.name}: {_worker_error(log_path, log_start, worker.returncode)}")
    result = json.loads(result_path.read_text())
    quality = ", ".join(f"{k} {result['scores'][k]:g}" for k in ("bleu", "rougeL", "accuracy") if k in result["scores"])
    _say(progress, f"{tag}: done in {time.perf_counter() - started:.0f} s ({quality})")
    return result


def _line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _report_progress(progress: bool, tag: str, metrics: Path, seen: int, total: int | None) -> int:
    if not metrics.is_file():
        return seen
    lines = metrics.read_text().splitlines()
    for line in lines[seen:]:
        try:
            record = json.loads(line)
        except ValueError:
            return seen  # a line being written: read it next time
        if "loss" in record:
            _say(
                progress,
                f"{tag}: step {record['step']}/{total} loss {record['loss']:.3f} "
                f"({record['tokens_per_s']:.0f} tokens/s)",
            )
        seen += 1
    return seen


def _worker_error(log: Path, start: int, code: int) -> str:
    """The worker's own one-line error (from this attempt's part of the log), or what is known of its end."""
    with open(log, "rb") as f:
        f.seek(start)
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        if line.startswith("prefixtune: error: "):
            return line.removeprefix("prefixtune: error: ")
    why = {130: "interrupted", -2: "interrupted", -9: "killed (out of memory?)"}.get(code, f"exit code {code}")
    tail = next((line for line in reversed(lines) if line.strip()), "")
    return f"its worker failed ({why}): {tail[:200]}; see {log}; the same command resumes it"


class _lock:
    """An exclusive flock on DIR/.compare.lock: two compares on one directory would write the same runs."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".compare.lock"

    def __enter__(self) -> int:
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise PrefixTuneError(f"another compare (or its worker) is running in {self.path.parent}") from None
        return self.fd

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(f"prefixtune: compare {message}", file=sys.stderr, flush=True)
