"""The demo (README command 1): untuned model vs a trained prefix on held-out E2E inputs.

Writes OUT/metrics.json, OUT/loss.png, OUT/samples.md and the trained prefix in OUT/prefix/.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from . import data
from .atomic import atomic_write_bytes
from .config import TrainConfig
from .devices import resolve_placement
from .errors import PrefixTuneError
from .eval import evaluate
from .models import load_model
from .peft_format import ADAPTER_WEIGHTS
from .train import train

# The demo's prefix: Li & Liang's recipe (MLP reparameterization, real-word initialization) at a CPU budget.
DEMO_OPTIONS = {"num_virtual_tokens": 10, "init_text": "table-to-text: name food area price rating"}
DEMO_LR = 3e-3


def run_demo(
    out: str | Path = "runs/demo",
    *,
    model: str = "smollm2-135m",
    max_steps: int = 80,
    eval_limit: int | None = None,
    data_dir: str | None = None,
    fresh: bool = False,
    device: str | None = None,
    dtype: str | None = None,
) -> dict:
    """`device` / `dtype` as `--device` / `--dtype` (default: cuda in bfloat16 when available, else cpu in float32);
    checked before anything is written."""
    where = resolve_placement(device, dtype)
    if where.dtype == torch.float16:
        raise PrefixTuneError("--dtype float16 cannot train (no loss scaling: small gradients underflow); use bfloat16")
    out = Path(out)
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base, tokenizer = load_model(model, dtype=where.dtype, device=where.device, device_map=where.device_map)
    test = data.load_dataset("e2e", split="test", data_dir=data_dir)[:eval_limit]
    _say(f"scoring the untuned {model} on {len(test)} held-out E2E inputs")
    base_scores, base_predictions = evaluate(base, tokenizer, test, metric_names=["bleu", "rouge"], progress=True)

    cfg = TrainConfig(
        model=model,
        data="e2e",
        out=str(out / "prefix"),
        data_dir=data_dir,
        max_steps=max_steps,
        batch_size=8,
        lr=DEMO_LR,
        warmup_steps=20,
        options=dict(DEMO_OPTIONS),
        log_every=10,
        device=device,
        dtype=where.dtype_name,
    )
    resume = (out / "prefix" / "config.yaml").is_file()
    result = train(cfg, resume=resume, model_and_tokenizer=(base, tokenizer))
    _say(f"scoring the prefix on the same {len(test)} inputs")
    tuned_scores, tuned_predictions = evaluate(
        result.model, tokenizer, test, metric_names=["bleu", "rouge"], progress=True
    )
    atomic_write_bytes(out / "loss.png", (out / "prefix" / "loss.png").read_bytes())

    report = {
        "model": model,
        "data": "e2e (test split: held-out inputs, all references)",
        "examples": len(test),
        "train_steps": result.steps,
        "train_seconds": round(result.train_seconds, 1),
        "trainable_params": result.trainable_params,  # the prefix and the MLP that reparameterizes it
        "total_params": result.total_params,
        "saved_params": _saved_params(out / "prefix"),  # the collapsed prefix: what the adapter file holds
        "adapter_bytes": (out / "prefix" / ADAPTER_WEIGHTS).stat().st_size,
        "untuned": base_scores,
        "prefix": tuned_scores,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_bytes(out / "metrics.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(out / "samples.md", _samples(test, base_predictions, tuned_predictions).encode())
    print(_table(report))
    print(f"\nreport: {out}/metrics.json, {out}/loss.png, {out}/samples.md; prefix saved in {out}/prefix")
    return report


def _saved_params(directory: Path) -> int:
    with safe_open(str(directory / ADAPTER_WEIGHTS), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _table(report: dict) -> str:
    pct = 100 * report["trainable_params"] / report["total_params"]
    saved_pct = 100 * report["saved_params"] / report["total_params"]
    rows = [
        "| model | trained params (with the MLP) | saved prefix | BLEU | ROUGE-L |",
        "| --- | --- | --- | --- | --- |",
        f"| {report['model']} untuned | 0 | - | {report['untuned']['bleu']:.1f} | {report['untuned']['rougeL']:.1f} |",
        f"| + prefix ({report['train_steps']} steps, {report['train_seconds']:.0f} s) | "
        f"{report['trainable_params']:,} ({pct:.2f}%) | {report['saved_params']:,} ({saved_pct:.3f}%), "
        f"{report['adapter_bytes'] / 1024:.0f} KiB | {report['prefix']['bleu']:.1f} | "
        f"{report['prefix']['rougeL']:.1f} |",
    ]
    return "\n".join(rows)


def _samples(test: list[data.Example], base: list[str], tuned: list[str], count: int = 5) -> str:
    parts = ["# Demo samples (held-out E2E inputs)\n"]
    for example, b, t in list(zip(test, base, tuned))[:count]:
        parts.append(
            f"**input:** {example.source}\n\n- untuned: {b}\n- prefix: {t}\n"
            f"- reference: {example.references[0] if example.references else example.target}\n"
        )
    return "\n".join(parts)


def _say(message: str) -> None:
    print(f"prefixtune: {message}", file=sys.stderr)
