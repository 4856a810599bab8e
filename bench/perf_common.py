"""What every part of the performance suite (bench/perf.py) shares: the sequence kinds, the facts of the machine,
the matmul ceiling (measured in its own worker process and again inside every training process), and the worker
processes' peak memory and model loading.

torch, transformers, peft and prefixtune are imported inside the functions, on purpose: bench/perf.py's main()
sets OMP_WAIT_POLICY before torch is first imported (the workers inherit it), and `python -m bench --help` stays
fast.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SEQS = ("e2e", "xsum")  # the sequence kinds: E2E records (short) and XSum documents (long)
PEFT_METHODS = ("prefix", "prompt", "lora")  # the methods that PEFT has too


# ----- the machine ------------------------------------------------------------------------------------------------


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); without it torch's bf16 matmul is ~100x
    slower than float32 (0.4 vs 28 GFLOP/s on a Zen 3 with AVX2), so the bf16 row would take hours."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded (recorded at the start and the end of a run)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine(threads: int) -> dict[str, Any]:
    """The run's "machine" record: CPU, cores, versions, commit, OpenMP wait policy, load at the start."""
    import peft
    import torch
    import transformers

    cpu = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass

    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_src": [line[3:] for line in git("status", "--porcelain", "src").splitlines()],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start": load_average(),
    }


# ----- the matmul ceiling -----------------------------------------------------------------------------------------


def matmul_rate(sizes: list[int], trials: int, seconds: float, dtype: Any = None) -> tuple[float, float]:
    """Best square-matmul FLOP/s over `sizes`: (per wall-clock second, per CPU-second of this process)."""
    import torch

    best, best_cpu = 0.0, 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        for _ in range(trials):
            count, start, cpu_start = 0, time.perf_counter(), time.process_time()
            while True:
                a @ b
                count += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds:
                    break
            best = max(best, 2 * n**3 * count / elapsed)
            best_cpu = max(best_cpu, 2 * n**3 * count / max(time.process_time() - cpu_start, 1e-9))
    return best, best_cpu


def ceiling_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Best matmul FLOP/s on this many threads (float32, and bfloat16 for reference at one small size: CPUs
    without native bf16 run it ~100x slower)."""
    import torch

    torch.set_num_threads(spec["threads"])
    fp32 = matmul_rate(spec["sizes"], spec["trials"], spec["seconds"], torch.float32)
    bf16 = matmul_rate(spec["sizes"][:1], spec["trials"], spec["seconds"], torch.bfloat16)
    return {"float32": fp32[0], "float32_per_cpu_s": fp32[1], "bfloat16": bf16[0], "bfloat16_per_cpu_s": bf16[1]}


# ----- inside a worker process ------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss), in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def load_resident_model(name: str) -> Any:
    """The model (prefixtune.sources.load_model), every weight read once so that it is resident."""
    import torch

    from prefixtune.models import load_model

    model = load_model(name)[0]
    with torch.no_grad():  # weights may be mmapped and paged in lazily: touch them so they count before training
        for p in model.parameters():
            p.detach().sum()
    return model
