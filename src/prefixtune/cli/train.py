"""`prefixtune train`: arguments -> TrainConfig -> prefixtune.train.train; prints a JSON summary."""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields
from typing import Any

from ..config import TrainConfig, build_config, field_help
from ..methods.registry import option_names
from ..train import train
from .common import add_device_arguments, rank


def add_arguments(sub: Any) -> None:
    helps = field_help(TrainConfig)
    p = sub.add_parser(
        "train",
        help="train a prefix (or another method) on a data set",
        description="Train a method on a data set. Settings come from defaults, then --config FILE.yaml, then "
        "flags, then key=value overrides (any field below, or a method option such as init_text=...).",
        epilog="All settings (use as key=value):\n"
        + "\n".join(f"  {f.name:<20} {helps[f.name]} (default: {_default(f)})" for f in fields(TrainConfig)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help=helps["model"])
    p.add_argument(
        "--data",
        action="append",
        metavar="[TASK=]DATA",
        help="built-in set (e2e, xsum, multiemo), .jsonl/.csv or hf:NAME; repeat as TASK=DATA to train one prefix "
        "per task in one run (saved in OUT/TASK/); a file whose records carry `task` does the same",
    )
    p.add_argument("--out", help=helps["out"])
    p.add_argument(
        "--method", help=helps["method"] + " (prefix, prompt, lora, adapter, lora+prefix, prefix-memory, full)"
    )
    p.add_argument("--task", choices=["generate", "classify"], help=helps["task"])
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings")
    p.add_argument("--max-steps", type=int, help=helps["max_steps"])
    p.add_argument("--epochs", type=float, help=helps["epochs"])
    p.add_argument("--batch-size", type=int, help=helps["batch_size"])
    p.add_argument("--lr", type=float, help=helps["lr"])
    p.add_argument("--num-virtual-tokens", type=int, help="prefix/prompt length P (a method option)")
    p.add_argument("--top-layers", type=int, metavar="K", help="--method full: train only the top K layers and head")
    p.add_argument("--seed", type=int, help=helps["seed"])
    p.add_argument("--save-every", type=int, help=helps["save_every"])
    p.add_argument("--eval-every", type=int, help=helps["eval_every"])
    p.add_argument("--on-nonfinite", choices=["stop", "skip"], help=helps["on_nonfinite"])
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help=helps["gradient_checkpointing"])
    p.add_argument("--data-dir", help=helps["data_dir"])
    p.add_argument("--source-field", help=helps["source_field"])
    p.add_argument("--target-field", help=helps["target_field"])
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (a directory with nothing saved yet: start it)",
    )
    add_device_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any setting, e.g. warmup_steps=50")


def _default(f: Any) -> Any:
    """A setting's default for the help text: the value, or what its factory makes (never dataclasses' MISSING)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def run(args: argparse.Namespace) -> int:
    values = {
        k: getattr(args, k)
        for k in (
            "model",
            "data",
            "out",
            "method",
            "task",
            "max_steps",
            "epochs",
            "batch_size",
            "lr",
            "seed",
            "save_every",
            "eval_every",
            "on_nonfinite",
            "gradient_checkpointing",
            "data_dir",
            "source_field",
            "target_field",
            "device",
            "dtype",
        )
    }
    overrides = list(args.overrides)
    if args.num_virtual_tokens is not None:
        overrides.append(f"num_virtual_tokens={args.num_virtual_tokens}")
    if args.top_layers is not None:
        overrides.append(f"top_layers={args.top_layers}")
    cfg = build_config(TrainConfig, args.config, values, overrides, option_names)
    result = train(cfg, resume=args.resume, progress=not args.quiet)
    summary = {
        "out": str(result.out),
        "steps": result.steps,
        "best_val_loss": result.best_val_loss,
        "stopped_early": result.stopped_early,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "train_seconds": round(result.train_seconds, 2),
        "lr": result.lr,
    }
    if result.skipped_steps:
        summary["skipped_steps"] = result.skipped_steps
    if result.tasks is not None:
        summary["tasks"] = result.tasks
    if rank() == 0:  # under torchrun / accelerate launch every process returns here; one summary is enough
        print(json.dumps(summary))
    return 0
