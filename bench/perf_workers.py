"""The worker processes of the performance suite (bench/perf.py): each measurement runs in a process of its own,
a fresh interpreter (`python -m bench worker SPEC.json`) or, with --fork, a fork of the parent. The protocol: the
parent writes the spec (the worker's kind and options, and `out`, where the result goes) to a JSON file; the
worker writes its result, or {"error": traceback}, as JSON to `out` and exits 0, or 1 on an error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.perf_common import ROOT, ceiling_worker
from bench.perf_generate import generate_worker
from bench.perf_train import pair_worker, train_worker

WORKERS = {"train": train_worker, "ceiling": ceiling_worker, "generate": generate_worker, "pair": pair_worker}


def run_worker(kind: str, spec: dict[str, Any], workdir: Path, fork: bool) -> dict[str, Any]:
    """Run one worker in its own process (fresh interpreter, or a fork of this one); its JSON result."""
    out = workdir / f"result-{time.time_ns()}.json"
    spec = {**spec, "kind": kind, "out": str(out)}
    if fork:
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 0
            try:
                out.write_text(json.dumps(WORKERS[kind](spec)))
            except BaseException:
                out.write_text(json.dumps({"error": traceback.format_exc()}))
                code = 1
            finally:
                os._exit(code)
        os.waitpid(pid, 0)
    else:
        path = workdir / f"spec-{time.time_ns()}.json"
        path.write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
        done = subprocess.run([sys.executable, "-m", "bench", "worker", str(path)], cwd=ROOT, env=env)
        if done.returncode and not out.exists():
            return {"error": f"worker exited with {done.returncode}"}
    return json.loads(out.read_text())


def worker_main(path: str) -> int:
    """`python -m bench worker SPEC.json`: the fresh-interpreter side of run_worker."""
    spec = json.loads(Path(path).read_text())
    try:
        result = WORKERS[spec["kind"]](spec)
    except BaseException:
        result = {"error": traceback.format_exc()}
    Path(spec["out"]).write_text(json.dumps(result))
    return 1 if "error" in result else 0
