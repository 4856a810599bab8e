"""The worker processes of `prefixtune compare`: start one, follow its progress, turn its failure into one line;
run several at a time (`--jobs`).

Each run (a training cell, or the test scoring of a swept winner) is `python -m prefixtune.compare.worker --job
JOB.json`; it writes its result file last, so a run whose result file exists is finished and is reused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import PrefixTuneError

T = TypeVar("T")


def run_worker(
    job_path: Path,
    result_path: Path,
    tag: str,
    what: str,
    metrics: Path,
    total: int | None,
    lock_fd: int,
    progress: bool,
    launch: Callable[[Path], Any] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run the worker on `job_path` in a new process and return the result it wrote (raises on its failure).

    `jobs`: how many workers run at a time (their torch threads: `worker_env`). `launch` (tests only) runs the job
    in this process instead (worker.run_job): the same plan, worker code and files, without the seconds of a new
    interpreter's imports per run.
    """
    run_dir = job_path.parent
    if launch is not None:
        say(progress, f"{tag}: {what} in this process")
        launch(job_path)
        return json.loads(result_path.read_text())
    log_path = run_dir / "worker.log"
    say(progress, f"{tag}: {what} in a new process (log: {log_path})")
    started = time.perf_counter()
    seen = _line_count(metrics)
    log_start = log_path.stat().st_size if log_path.is_file() else 0
    with open(log_path, "ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefixtune.compare.worker", "--job", str(job_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=worker_env(jobs),
            pass_fds=(lock_fd,),  # the worker holds the directory lock too, even if this process dies
        )
        try:
            while worker.poll() is None:
                time.sleep(0.5)
                seen = _report_progress(progress, tag, metrics, seen, total)
        except KeyboardInterrupt:  # the worker got the Ctrl-C too: it saves a checkpoint and stops
            worker.wait()
            raise
    name = tag.split("] ", 1)[-1]
    if worker.returncode != 0:
        raise PrefixTuneError(f"{name}: {_worker_error(log_path, log_start, worker.returncode)}")
    result = json.loads(result_path.read_text())
    scores = result.get("scores") or result.get("select_scores") or {}
    quality = ", ".join(f"{k} {scores[k]:g}" for k in ("bleu", "rougeL", "accuracy") if k in scores)
    say(progress, f"{tag}: done in {time.perf_counter() - started:.0f} s ({quality})")
    return result


def worker_env(jobs: int) -> dict[str, str] | None:
    """The environment of a worker when `jobs` run at a time: each gets its share of the cores as torch threads
    (OMP_NUM_THREADS = usable cores // jobs, at least 1), so that the runs do not oversubscribe the CPU. A user's own
    OMP_NUM_THREADS is kept, and a run's `threads=K` setting overrides both (worker.py). None: this process's."""
    if jobs <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // jobs))}


def run_all(tasks: Sequence[Callable[[], T]], jobs: int) -> list[T]:
    """Call every task (each runs one worker process and waits for it), up to `jobs` at a time; results in order.

    One at a time they run in this thread, in order, and the first failure stops the rest. Several at a time they
    run in threads: after a failure no further task starts, the running ones finish (what they trained is kept
    for a resume), then the first failure in the tasks' order is raised. On Ctrl-C every worker got the signal
    too (they share the terminal's process group): each saves a checkpoint and stops, and this waits for them.
    """
    if jobs <= 1 or len(tasks) <= 1:
        return [task() for task in tasks]
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="prefixtune-compare")
    futures = [pool.submit(task) for task in tasks]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        for future in futures:
            future.cancel()  # only those not started yet
        pool.shutdown(wait=True)
    for future in futures:
        if not future.cancelled() and future.exception() is not None:
            raise future.exception()  # type: ignore[misc]
    return [future.result() for future in futures]


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
            say(
                progress,
                f"{tag}: step {record['step']}/{total} loss {record['loss']:.3f} "
                f"({record['tokens_per_s']:.0f} tokens/s)",
            )
        if "warning" in record:  # the trainer's own (a diverging loss): the worker's log alone would hide it
            say(progress, f"{tag}: step {record['step']}: {record['warning']}")
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


class DirectoryLock:
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


def say(enabled: bool, message: str) -> None:
    if enabled:
        print(f"prefixtune: compare {message}", file=sys.stderr, flush=True)
