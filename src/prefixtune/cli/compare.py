"""`prefixtune compare`: several methods on the same data, budget and evaluation; writes a report."""

from __future__ import annotations

import argparse
from typing import Any

from ..compare import CompareSettings, main_table, markdown, parse_methods, parse_seeds, parse_sizes, run_compare
from ..errors import PrefixTuneError
from .common import add_device_arguments, placement


def add_arguments(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="train and score several methods with the same data, budget and evaluation; writes a report",
        description="Each method (and each train size and seed) trains in its own process with the same steps and "
        "batch at its own default learning rate (docs/methods.md), then is scored on the same held-out inputs. "
        "Repeating the command resumes: finished runs are reused, an interrupted one continues from its "
        "checkpoint. Method options go to one method as METHOD.OPTION=VALUE (prefix.num_virtual_tokens=10, "
        "lora.r=8, prefix.lr=5e-3); training settings (warmup_steps=50, ...) are shared.",
    )
    p.add_argument("--methods", required=True, help="comma-separated: prefix,prompt,lora,adapter,lora+prefix,full")
    p.add_argument("--model", default="smollm2-135m", help="built-in alias, HF id, local dir or .gguf file")
    p.add_argument("--data", default="e2e", help="built-in set (e2e, xsum, multiemo), .jsonl/.csv or hf:NAME")
    p.add_argument("--out", required=True, help="comparison directory (runs, report.md/html, plots, results.json)")
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps per run (the same for every method)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (the same for every method)")
    p.add_argument("--lr", type=float, help="one learning rate for every method (default: each method's own)")
    p.add_argument("--train-sizes", help="low-data mode: e.g. 50,100,200,500 (or 'all'): one run per size and seed")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1")
    p.add_argument("--eval-split", default="test", choices=["train", "validation", "test", "all"], help="scored split")
    p.add_argument("--eval-limit", type=int, help="score only the first N inputs of the split")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length limit when scoring")
    p.add_argument("--num-beams", type=int, default=1, help="beam width when scoring (1 = greedy)")
    p.add_argument("--untuned", action="store_true", help="also score the model without training")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_device_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="shared settings and METHOD.OPTION=VALUE")


def run(args: argparse.Namespace) -> int:
    placement(args)  # checked before the comparison directory is written; each run resolves it again
    placed = [f"{flag}={getattr(args, flag)}" for flag in ("device", "dtype") if getattr(args, flag) is not None]
    for flag in ("max_steps", "batch_size", "eval_limit", "max_new_tokens", "num_beams", "lr"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise PrefixTuneError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    settings = CompareSettings(
        methods=parse_methods(args.methods),
        model=args.model,
        data=args.data,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        train_sizes=parse_sizes(args.train_sizes) if args.train_sizes else [None],
        seeds=parse_seeds(args.seeds),
        lr=args.lr,
        eval_split=args.eval_split,
        eval_limit=args.eval_limit,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        untuned=args.untuned,
        overrides=[*args.overrides, *placed],
    )
    results = run_compare(settings, args.out, progress=not args.quiet)
    print(markdown(*main_table(results["runs"])))
    print(f"\nreport in {args.out}: {', '.join(results['files'])}")
    return 0
