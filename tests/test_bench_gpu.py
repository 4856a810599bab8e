"""bench/gpu.py (the one-command GPU benchmark) runs on the CPU with --quick and writes every section's figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from peft_support import peft_prefix_tuning_broken

ROOT = Path(__file__).resolve().parents[1]


def _quick(tmp_path: Path, script: str, *extra: str) -> dict:
    """bench/SCRIPT --quick in a subprocess (prefixtune from src/): its JSON, after a zero exit."""
    out = tmp_path / "quick.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", "--json", str(out), *extra],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_gpu_bench_quick_writes_every_section(tmp_path: Path) -> None:
    # PEFT in a second dtype too (the bf16-vs-float32 figure)
    result = _quick(tmp_path, "gpu.py", "--reference-dtype", "bfloat16")
    assert {"machine", "dtype", "seconds", "train", "mfu", "generate", "mixed", "decode"} <= set(result)
    assert "cpu_flags" in result["machine"] and result["dtype"] == "float32"
    train = result["train"]["tiny"]
    assert set(train["ratio_vs_peft"]) == {"shipped", "mechanism"} and all(
        v > 0 for v in train["ratio_vs_peft"].values()
    )
    assert set(train["tokens_per_s"]) == {"ours_shipped", "ours_all_logits", "peft", "peft_reference"}
    assert train["reference_dtype"] == "bfloat16" and set(train["ratio_vs_peft_reference"]) == {"shipped", "mechanism"}
    assert train["matmul_gflops"]["shape"] == [2 * 16, 64, 128] and train["matmul_ratio"] > 0
    assert train["matmul_gflops"]["float32"] > 0 and train["matmul_gflops"]["bfloat16"] > 0
    assert result["mfu"]["tiny"]["model_tflops_per_s"] >= 0 and result["mfu"]["tiny"]["step_s"] > 0
    generate = result["generate"]["tiny"]
    for rows in ("b1", "b8"):
        assert generate[rows]["ours_over_bare"] > 0
        # PEFT's side runs wherever its prefix-tuning does (tests/peft_support.py); elsewhere the JSON says why not
        if peft_prefix_tuning_broken() is None:
            assert set(generate[rows]["tokens_per_s"]) == {"bare", "ours", "peft"}
            assert generate[rows]["ours_over_peft"] > 0
        else:
            assert generate["peft"].startswith("not run")
    assert result["mixed"]["tiny"]["speedup"] > 0
    decode = result["decode"]["tiny"]
    for name in ("bare", "ours", "ours_copy_each_step"):
        assert decode[name]["last_ms"] > 0
    assert all("peak_rss_mb" in entry for entry in result["decode"].values())


def test_gpu_check_quick_compares_the_fast_paths_and_resume_on_this_machine(tmp_path: Path) -> None:
    """bench/gpu_check.py --quick on the CPU: its figures are the CPU suite's claims, so here they must hold."""
    result = _quick(tmp_path, "gpu_check.py")
    assert result["errors"] == 0 and "cpu_flags" in result["machine"]
    check = result["fast_paths"]["llama-gqa/float32"]
    assert check["prefill_max_diff"] <= 1e-5 and check["grad_max_rel_diff"] <= 1e-5
    assert check["kernels"]["fast"]["math"].startswith("ran")
    for run in check["generate"].values():
        assert run["tokens_equal_copy_path"] and run["max_diff_to_recomputed"] <= 1e-5
    for run in result["resume"].values():  # on a CPU a resumed run is the straight run, bit for bit
        assert run["exit_codes"] == [0, 0, 130, 0] and run["resumed_bitwise"] and run["two_straight_runs_bitwise"]
