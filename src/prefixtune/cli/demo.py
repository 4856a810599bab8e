"""`prefixtune demo`: train and evaluate a prefix on E2E with smollm2-135m (README command 1)."""

from __future__ import annotations

import argparse
from typing import Any

from ..demo import run_demo
from .common import add_device_arguments, placement


def add_arguments(sub: Any) -> None:
    p = sub.add_parser("demo", help="train and evaluate a prefix on E2E with smollm2-135m (README command 1)")
    p.add_argument("--out", default="runs/demo", help="report directory")
    p.add_argument("--max-steps", type=int, default=80, help="training steps")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N held-out inputs")
    p.add_argument("--model", default="smollm2-135m", help="model to tune")
    p.add_argument("--data-dir", help="where e2e_nlg.json is looked up first")
    p.add_argument("--fresh", action="store_true", help="delete a previous demo run in --out first")
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    where = placement(args)  # checked before anything is written
    run_demo(
        args.out,
        model=args.model,
        max_steps=args.max_steps,
        eval_limit=args.eval_limit,
        data_dir=args.data_dir,
        fresh=args.fresh,
        device=args.device,
        dtype=args.dtype if args.dtype is not None else where.dtype_name,
    )
    return 0
