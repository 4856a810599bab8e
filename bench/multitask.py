"""Time saved by training 8 prefixes in one multi-task run instead of 8 separate runs (JSON out).

    python bench/multitask.py [--model tiny|smollm2-135m|DIR] [--tasks 8] [--examples 16] [--steps 10]
                              [--batch-size 4] [--json runs/bench_multitask.json]

Tasks are disjoint slices of the built-in E2E training pairs (same lengths as real data). "separate" calls
`prefixtune.train.train` once per task, each loading the model from disk as a run of its own does (the Python
interpreter is not restarted: import time is left out, which favors the separate runs); "together" is one call
on a file whose records carry `task`. Both use the same seed, batch size and steps per task, so each prefix sees
the same batches; `max_abs_diff` checks that the prefixes agree. `tiny` is a random 2-layer Llama with
smollm2-135m's tokenizer (so the numbers show per-step overhead); smollm2-135m shows a real model's compute.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from prefixtune import data, models
from prefixtune.atomic import atomic_write_bytes
from prefixtune.config import TrainConfig
from prefixtune.train import train


def tiny_model(directory: Path) -> str:
    """A random 2-layer Llama saved with smollm2-135m's tokenizer: a model directory like any other."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(models.prepare_alias("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def write_tasks(root: Path, tasks: int, examples: int) -> list[str]:
    pairs = data.training_pairs(data.load_dataset("e2e", split="train"))
    if len(pairs) < tasks * examples:
        sys.exit(f"E2E has {len(pairs)} training pairs; ask for at most {len(pairs) // tasks} per task")
    names = [f"task{i}" for i in range(tasks)]
    lines = []
    for i, name in enumerate(names):
        rows = [{"input": p.source, "target": p.target} for p in pairs[i * examples : (i + 1) * examples]]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        lines += [json.dumps({**r, "task": name}) + "\n" for r in rows]
    (root / "all.jsonl").write_text("".join(lines))
    return names


def config(model: str, data_path: Path, out: Path, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=model,
        data=str(data_path),
        out=str(out),
        train_split="all",
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=5e-3,
        warmup_steps=2,
        log_every=max(1, args.steps),
        max_length=128,
        options={"num_virtual_tokens": 10},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, smollm2-135m or a model directory")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--examples", type=int, default=16, help="training pairs per task")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per task")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per task per step")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = tiny_model(root / "model") if args.model == "tiny" else args.model
        names = write_tasks(root, args.tasks, args.examples)
        separate_wall, separate_loop = 0.0, 0.0
        for name in names:
            started = time.perf_counter()
            result = train(config(model, root / f"{name}.jsonl", root / "separate" / name, args), progress=False)
            separate_wall += time.perf_counter() - started
            separate_loop += result.train_seconds
        started = time.perf_counter()
        result = train(config(model, root / "all.jsonl", root / "together", args), progress=False)
        together_wall = time.perf_counter() - started
        diff, scale = 0.0, 0.0
        for name in names:
            alone = load_file(root / "separate" / name / "adapter_model.safetensors")
            mixed = load_file(root / "together" / name / "adapter_model.safetensors")
            diff = max(diff, max(float((alone[k] - mixed[k]).abs().max()) for k in alone))
            scale = max(scale, max(float(alone[k].abs().max()) for k in alone))
    report = {
        "bench": "multitask",
        "model": args.model,
        "tasks": args.tasks,
        "examples_per_task": args.examples,
        "steps": args.steps,
        "batch_size_per_task": args.batch_size,
        "separate_runs_wall_s": round(separate_wall, 2),
        "one_run_wall_s": round(together_wall, 2),
        "wall_speedup": round(separate_wall / together_wall, 2),
        "separate_train_loop_s": round(separate_loop, 2),
        "one_run_train_loop_s": round(result.train_seconds, 2),
        "train_loop_speedup": round(separate_loop / result.train_seconds, 2),
        "max_abs_diff": diff,  # between each task's prefix from its own run and from the multi-task run
        "max_abs_value": scale,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    print(json.dumps(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
