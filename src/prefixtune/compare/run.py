"""`prefixtune compare`: several methods on the same model, data, budget and evaluation, each in its own process.

    DIR/compare.json   the comparison's settings; a later command on DIR must give the same ones (else refused)
    DIR/data/          train-n<size>-s<seed>.jsonl: the seeded subsample of the training split each size trains
                       on (the same for every method and rate of that seed; the smaller sizes nested in the larger)
    DIR/runs/NAME/     one run: NAME = method, method-n<size>-s<seed>, or with a sweep
                       method-n<size>-s<seed>-lr<rate>; job.json (what its worker does), train/ (a `prefixtune
                       train` run directory), worker.log, and result.json, written last: a run that has it is
                       finished and is reused, never retrained. A swept winner is scored on the test split by
                       one more process (test_job.json -> test_result.json).
    DIR/results.json, report.md, report.html, loss_curves.png, quality_vs_params.png (+ quality_vs_train_size.png)

The order (sweep.py): the untuned model (--untuned); the sweep (every candidate rate of every method, first seed,
each swept size, scored on the selection split); then every (method, size, seed) at its winning rate, scored on
the test split (for the first seed at a swept size that is the sweep's own run, scored once more). Test scores are
only ever computed for winners.

Each run is a worker process (worker.py) that loads the model, trains (from the run's checkpoint when an
earlier worker was interrupted), evaluates, and records its own peak RSS (`ru_maxrss`, the kernel's high-water
mark of that process) after training and at the end. One process per run, one run at a time by default: a
method's memory and time are its own. `--jobs N` runs N at a time (the sweep's runs together, then the runs beyond
a grid's edge, then the final runs; each worker gets cores // N torch threads: process.worker_env): the same runs
and results, in about 1/N of the time where the cores allow, but each run's time and memory are then measured on a
shared machine; every run records the N it ran under (`jobs`) and the report says so. A finished run's checkpoint
is deleted (the trained method stays in train/).

Method options are routed per method: `prefix.num_virtual_tokens=10`, `lora.r=8`, `prefix.lr=5e-3`. An option
without a method prefix is given to every method, so each of them must take it. Training settings (`warmup_steps`,
`max_length`, ...) are shared: the budget is the same for everyone.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import data, models
from ..atomic import atomic_write_bytes
from ..config import TrainConfig, build_config
from ..errors import PrefixTuneError
from ..methods.registry import METHODS, make_config, option_names
from ..train import tasks
from ..train.optim import default_lr
from . import report, sweep
from .process import DirectoryLock, run_all, run_worker, say
from .settings import CompareSettings, route_overrides

SETTINGS_FILE = "compare.json"
# what a directory written before a setting existed ran with: it resumes as it started
LEGACY_SETTINGS = {"sweep_extend": 0}
RESULT_FILE = "result.json"
TEST_JOB_FILE, TEST_RESULT_FILE = "test_job.json", "test_result.json"
UNTUNED = "untuned"
EVAL_DATA_FIELDS = ("data", "data_dir", "source_field", "target_field")


@dataclass
class Job:
    name: str
    method: str | None  # None: the untuned model, scored only
    config: TrainConfig  # what the worker trains (data: the subsample file at a given train size)
    source: TrainConfig | None = None  # the comparison's own data settings (what is subsampled and scored)
    train_size: int | None = None
    seed: int = 0
    rate_index: int = 0  # its rate's place in the method's candidate list
    split: str = "test"  # the split the worker scores after training
    swept: bool = False  # a sweep run (scored on the selection split; a winner is tested afterwards)

    @property
    def eval_source(self) -> TrainConfig:
        return self.source or self.config


@dataclass
class Plan:
    """Every run of a comparison that is known before the sweep ends, and how to make the others."""

    settings: CompareSettings
    out: Path
    saved: dict[str, Any]  # compare.json
    rates: dict[str, list[float]]  # candidate rates per method, in order (one without a sweep)
    swept: list[int | None]  # the swept train sizes (none without a sweep)
    untuned: Job | None
    sweep_jobs: list[Job]
    configs: dict[str, TrainConfig] = field(default_factory=dict)  # per method, at its centre rate, whole data
    extended: dict[str, list[float]] = field(default_factory=dict)  # rates tried beyond a grid's edge (sweep.py)

    def job(self, method: str, size: int | None, seed: int, lr: float, split: str, swept: bool) -> Job:
        settings = self.settings
        several = settings.train_sizes != [None] or len(settings.seeds) > 1
        if settings.sweep:
            name = f"{method}-n{size or 'all'}-s{seed}-lr{lr:g}"
        else:
            name = f"{method}-n{size or 'all'}-s{seed}" if several else method
        run_dir = self.out / "runs" / name
        source = replace(self.configs[method], out=str(run_dir / "train"), seed=seed, lr=lr)
        cfg = source
        if size is not None:  # the seeded subsample, written as a file before any run starts
            cfg = replace(source, train_split="all", source_field=None, target_field=None)
            cfg.data = str(subsample_path(self.out, size, seed))
            if cfg.eval_every:  # validation during training: the comparison's selection split, written out
                cfg.eval_data, cfg.eval_split = str(validation_path(self.out)), "all"
        index = self.tried(method).index(lr)
        return Job(name, method, cfg, source, size, seed, index, split, swept)

    @property
    def validates(self) -> bool:
        """Some run validates during training (eval_every) at a train size: on the selection split, written out."""
        sized = any(s is not None for s in self.settings.train_sizes)
        return sized and any(cfg.eval_every for cfg in self.configs.values())

    def tried(self, method: str) -> list[float]:
        """A method's rates in the order they were first tried: its grid, then any rates beyond its edges."""
        return self.rates[method] + self.extended.get(method, [])

    def final_jobs(self, winners: dict[tuple[str, int | None], float], available: int) -> list[Job]:
        """Every (method, size, seed) at its winning rate (or its one rate), scored on the test split."""
        settings = self.settings
        jobs = []
        for method in settings.methods:
            for size in settings.train_sizes:
                for seed in settings.seeds:
                    if settings.sweep:
                        lr = winners[(method, sweep.source_size(size, self.swept, available))]
                    else:
                        lr = self.rates[method][0]
                    swept = settings.sweep and size in self.swept and seed == settings.seeds[0]
                    jobs.append(self.job(method, size, seed, lr, settings.eval_split, swept))
        return jobs


def plan(settings: CompareSettings, out: str | os.PathLike[str]) -> Plan:
    """The comparison's runs and its settings as saved in compare.json.

    Every user error (bad method, option, setting, learning rate, sweep) is raised here, before anything is written.
    """
    out = Path(out)
    methods = list(settings.methods)
    common, options, rates = route_overrides(methods, settings.overrides)
    for method in settings.lr_lists:
        if method in rates:
            raise PrefixTuneError(f"{method}: give its rates once, either {method}.lr=X or --lrs {method}=...")
    configs: dict[str, TrainConfig] = {}
    candidates: dict[str, list[float]] = {}
    for method in methods:
        values = {
            "model": settings.model,
            "data": settings.data,
            "method": method,
            "out": str(out / "runs" / method / "train"),
            "max_steps": settings.max_steps,
            "batch_size": settings.batch_size,
            "seed": settings.seeds[0],
            "save_every": 50,  # an interrupted run resumes from its last checkpoint (override: save_every)
            "log_every": max(1, min(10, settings.max_steps // 20)),  # enough points for the loss plot
            "lr": settings.lr,
        }
        items = [f"{k}={v}" for k, v in common.items()] + [f"{k}={v}" for k, v in options[method].items()]
        items += [f"lr={rates[method]}"] if method in rates else []
        cfg = build_config(TrainConfig, None, values, items, option_names)
        if isinstance(cfg.data, dict):
            raise PrefixTuneError("compare takes one data set (not several tasks); give --data once")
        make_config(method, cfg.options)  # option values are checked now, not in the worker
        cfg.lr = cfg.lr or _default_lr(cfg)
        configs[method] = cfg
        candidates[method] = sweep.candidate_rates(settings, method, cfg.lr)
    swept = sweep.swept_sizes(settings) if settings.sweep else []
    saved = asdict(settings)
    saved.pop("overrides")
    saved.pop("jobs")  # how many run at a time does not change a run: a resume may choose another
    saved.update(
        shared_settings=dict(sorted(common.items())),
        method_options=options,
        lr_per_method={m: c.lr for m, c in configs.items()},
        lr_candidates=candidates,
    )
    result = Plan(settings, out, saved, candidates, swept, None, [], configs)
    if settings.untuned:
        first = configs[methods[0]]
        result.untuned = Job(UNTUNED, None, replace(first, out=str(out / "runs" / UNTUNED / "train")))
    first_seed = settings.seeds[0]
    for method in methods:
        for size in swept:
            for lr in candidates[method]:
                result.sweep_jobs.append(result.job(method, size, first_seed, lr, settings.select_split, True))
    return result


def _default_lr(cfg: TrainConfig) -> float:
    """The method's default rate as `prefixtune train` would pick it for the whole training split (the prefix's
    scales with the target tokens per step: `MethodSpec.default_lr_for`). Every train size runs at it (a subsample's
    own mean differs by a few percent), so the sizes of one comparison share their rates."""
    spec = METHODS[cfg.method]
    if spec.lr_targets_per_step is None or models.is_encoder_model(cfg.model):  # an encoder's head sets its own
        return spec.default_lr
    examples = tasks.load_tasks(replace(cfg, train_size=None))[0][0].train
    tokenizer = models.load_tokenizer(cfg.model)
    logger = logging.getLogger("prefixtune")
    level = logger.level
    logger.setLevel(logging.ERROR)  # what truncation cut: each worker's log says it for the data it trains on
    try:
        encoded, _ = data.encode(examples, tokenizer, max_length=cfg.max_length, chat_template=cfg.chat_template)
    finally:
        logger.setLevel(level)
    return default_lr(cfg, encoded)


def check_inputs(the_plan: Plan) -> int:
    """Model name, data, sizes and splits, cheaply, before any process starts; returns the training pairs' count."""
    settings = the_plan.settings
    models.resolve(settings.model)
    first = next(iter(the_plan.configs.values()))
    available = len(tasks.load_tasks(replace(first, train_size=None))[0][0].train)
    largest = max((s for s in settings.train_sizes if s is not None), default=0)
    if largest > available:
        raise PrefixTuneError(
            f"--train-sizes {largest}: {settings.data} has only {available} training examples "
            f"((source, reference) pairs) in split {first.train_split!r}"
        )
    splits = [settings.eval_split] + ([settings.select_split] if settings.sweep or the_plan.validates else [])
    for split in dict.fromkeys(splits):
        examples = eval_examples(first, split, settings.eval_limit)
        if not examples:
            hint = ""
            if split != settings.eval_split:
                hint = "; choose another --select-split, or " + ("--no-sweep" if settings.sweep else "no eval_every")
            raise PrefixTuneError(f"{settings.data}: split {split!r} has no examples to evaluate{hint}")
        if settings.metric and classifies(first, examples):
            raise PrefixTuneError(
                f"--metric {settings.metric}: {settings.data} is classification, scored by accuracy; drop --metric"
            )
    return available


def eval_examples(cfg: TrainConfig, split: str, limit: int | None) -> list[Any]:
    examples = data.load_dataset(
        str(cfg.data),
        split=None if split == "all" else split,
        data_dir=cfg.data_dir,
        source_field=cfg.source_field,
        target_field=cfg.target_field,
    )
    return examples[:limit]


def classifies(cfg: TrainConfig, examples: list[Any]) -> bool:
    """Whether the runs score these examples as classification (accuracy) rather than generation."""
    return cfg.task == "classify" or all(e.label is not None for e in examples)


def subsample_path(out: Path, size: int, seed: int) -> Path:
    return out / "data" / f"train-n{size}-s{seed}.jsonl"


def validation_path(out: Path) -> Path:
    return out / "data" / "validation.jsonl"


def write_subsamples(the_plan: Plan) -> None:
    """DIR/data/train-n<size>-s<seed>.jsonl: `size` training pairs drawn with `seed`, nested across sizes.

    One seeded permutation of the training pairs per seed; size N takes its first N (kept in data order), so the
    50 examples of a seed are among its 100. Every method and rate of that seed trains on the same file. With
    validation during training (eval_every), DIR/data/validation.jsonl holds the selection split (every
    reference of each input): a subsample file has no split of its own that is not training data.
    """
    settings = the_plan.settings
    sizes = [s for s in settings.train_sizes if s is not None]
    if not sizes:
        return
    first = next(iter(the_plan.configs.values()))
    pairs = tasks.load_tasks(replace(first, train_size=None))[0][0].train
    for seed in settings.seeds:
        order = list(range(len(pairs)))
        random.Random(f"prefixtune-compare-subsample-{seed}").shuffle(order)
        for size in sizes:
            _write_rows(subsample_path(the_plan.out, size, seed), [_row(pairs[i]) for i in sorted(order[:size])])
    if the_plan.validates:
        held_out = eval_examples(first, settings.select_split, None)
        rows = [_row(e, ref) for e in held_out for ref in (e.references or [e.target])]
        _write_rows(validation_path(the_plan.out), rows)


def _row(e: Any, target: str | None = None) -> dict[str, Any]:
    if e.label is not None:
        return {"input": e.source, "label": e.label}
    return {"input": e.source, "target": target if target is not None else e.target}


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    if not path.is_file() or path.read_bytes() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, text)


def run_compare(
    settings: CompareSettings,
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    launch: Callable[[Path], Any] | None = None,
) -> dict[str, Any]:
    """Run (or reuse) every run of the comparison and write the report; returns results.json's content.

    Each run is a worker process, `settings.jobs` at a time; `launch(job_path)` (tests) runs each in this process
    instead, one at a time.
    """
    out = Path(out)
    the_plan = plan(settings, out)
    available = check_inputs(the_plan)
    settings_path = out / SETTINGS_FILE
    saved = the_plan.saved
    if settings_path.is_file():
        try:
            before = json.loads(settings_path.read_text())
        except (OSError, ValueError) as e:
            raise PrefixTuneError(f"{settings_path} is unreadable ({e}); choose another --out") from None
        before = {**LEGACY_SETTINGS, **before}  # a directory written before a setting existed ran without it
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
    jobs = 1 if launch is not None else settings.jobs
    finals = len(settings.methods) * len(settings.train_sizes) * len(settings.seeds)
    count = int(settings.untuned) + len(the_plan.sweep_jobs) + finals  # grows by the rates beyond a grid's edge
    counter = itertools.count(1)
    with DirectoryLock(out) as lock_fd:
        if not settings_path.is_file():
            atomic_write_bytes(settings_path, (json.dumps(saved, indent=2) + "\n").encode())
        write_subsamples(the_plan)

        def run(job: Job) -> dict[str, Any]:
            tag = f"[{next(counter)}/{count}] {job.name}"
            return _run_or_reuse(job, tag, settings, lock_fd, progress, launch)

        def run_each(batch: list[Job]) -> list[dict[str, Any]]:
            return run_all([functools.partial(run, job) for job in batch], jobs)

        first = [the_plan.untuned] if the_plan.untuned else []
        done = run_each(first + the_plan.sweep_jobs)
        results = done[: len(first)]
        swept = [{**r, "rate_index": job.rate_index} for job, r in zip(the_plan.sweep_jobs, done[len(first) :])]
        cells = [(method, size) for method in settings.methods for size in the_plan.swept]
        tried = {(m, s): [r for r in swept if r["method"] == m and r.get("train_size") == s] for m, s in cells}

        def best(cell: tuple[str, int | None]) -> dict[str, Any]:
            return sweep.choose(tried[cell], report.quality_key(tried[cell], "select_scores", settings.metric))

        winner = {cell: best(cell) for cell in cells}
        open_cells = list(cells)
        for _ in range(settings.sweep_extend):  # a best rate may lie beyond its grid's edge: one step out per round
            wave: list[tuple[tuple[str, int | None], Job]] = []
            for cell in open_cells:
                method, size = cell
                rate = sweep.beyond_edge([r["lr"] for r in tried[cell]], winner[cell]["lr"])
                if rate is None:
                    continue
                if rate not in the_plan.tried(method):  # another size may have tried it already
                    the_plan.extended.setdefault(method, []).append(rate)
                wave.append((cell, the_plan.job(method, size, settings.seeds[0], rate, settings.select_split, True)))
            if not wave:
                break
            count += len(wave)
            for (cell, job), r in zip(wave, run_each([job for _, job in wave])):
                tried[cell].append({**r, "rate_index": job.rate_index, "beyond_grid": True})
                swept.append(tried[cell][-1])
                winner[cell] = best(cell)
            open_cells = [cell for cell, _ in wave]
        winners = {}
        for cell in cells:
            winner[cell]["won"] = True
            winners[cell] = winner[cell]["lr"]

        def final(job: Job) -> dict[str, Any]:
            if not job.swept:
                return run(job)
            trained = next(r for r in swept if r["name"] == job.name)
            tag = f"[{next(counter)}/{count}] {job.name}"
            return {**trained, **_test_or_reuse(job, tag, settings, lock_fd, progress, launch)}

        results += run_all([functools.partial(final, job) for job in the_plan.final_jobs(winners, available)], jobs)
    return report.write_report(out, saved, results, swept)


def write_job(job: Job, settings: CompareSettings, stage: str = "train") -> Path:
    """RUN/job.json (train, then score `job.split`) or RUN/test_job.json (score the trained run on the test split)."""
    run_dir = Path(job.config.out).parent
    run_dir.mkdir(parents=True, exist_ok=True)
    source = job.eval_source
    spec = {
        "name": job.name,
        "method": job.method,
        "stage": stage,
        "train_size": job.train_size,
        "jobs": settings.jobs,  # runs at a time while this one ran (its time and memory were measured so)
        "config": job.config.to_dict(),
        "eval": {
            "split": settings.eval_split if stage == "test" else job.split,
            "limit": settings.eval_limit,
            "max_new_tokens": settings.max_new_tokens,
            "num_beams": settings.num_beams,
            "batch_size": settings.batch_size,
            "data": {k: getattr(source, k) for k in EVAL_DATA_FIELDS},
            "scores_key": "select_scores" if job.swept and stage == "train" else "scores",
        },
    }
    path = run_dir / (TEST_JOB_FILE if stage == "test" else "job.json")
    atomic_write_bytes(path, (json.dumps(spec, indent=2) + "\n").encode())
    return path


def _run_or_reuse(
    job: Job, tag: str, settings: CompareSettings, lock_fd: int, progress: bool, launch: Callable[[Path], Any] | None
) -> dict[str, Any]:
    run_dir = Path(job.config.out).parent
    result_path = run_dir / RESULT_FILE
    if result_path.is_file():
        say(progress, f"{tag}: finished earlier, reusing {result_path}")
        return json.loads(result_path.read_text())
    job_path = write_job(job, settings)
    scored = f"scoring {job.split}" if job.method else "scoring"
    what = f"training {job.config.max_steps} steps at lr {job.config.lr:g}, then {scored}" if job.method else scored
    metrics = Path(job.config.out) / "metrics.jsonl"
    return run_worker(
        job_path, result_path, tag, what, metrics, job.config.max_steps, lock_fd, progress, launch, settings.jobs
    )


def _test_or_reuse(
    job: Job, tag: str, settings: CompareSettings, lock_fd: int, progress: bool, launch: Callable[[Path], Any] | None
) -> dict[str, Any]:
    """The test scores of a swept winner (its trained method, loaded in a new process)."""
    run_dir = Path(job.config.out).parent
    result_path = run_dir / TEST_RESULT_FILE
    if result_path.is_file():
        say(progress, f"{tag}: tested earlier, reusing {result_path}")
        return json.loads(result_path.read_text())
    job_path = write_job(job, settings, stage="test")
    what = f"the winning rate {job.config.lr:g}: scoring {settings.eval_split}"
    return run_worker(
        job_path, result_path, tag, what, run_dir / "none", None, lock_fd, progress, launch, settings.jobs
    )
