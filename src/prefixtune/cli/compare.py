"""`prefixtune compare`: several methods on the same data, budget and evaluation; writes a report."""

from __future__ import annotations

import argparse
from typing import Any

from ..compare import (
    GENERATION_METRICS,
    CompareSettings,
    main_table,
    markdown,
    parse_factors,
    parse_methods,
    parse_rate_lists,
    parse_seeds,
    parse_sizes,
    run_compare,
)
from ..errors import PrefixTuneError
from .common import add_device_arguments, placement


def add_arguments(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="train and score several methods with the same data, budget and evaluation; writes a report",
        description="Each method (and each train size and seed) trains in its own process with the same steps and "
        "batch. Every method first tries the same learning-rate sweep around its own default (x1/3, x1, x3; "
        "docs/methods.md) on the first seed, scored on the validation split; the winning rate trains every seed "
        "and only it is scored on the test split. The report gives mean ± sd over seeds and a bootstrap 95% "
        "interval over test inputs. "
        "Repeating the command resumes: finished runs are reused, an interrupted one continues from its "
        "checkpoint. Method options go to one method as METHOD.OPTION=VALUE (prefix.num_virtual_tokens=10, "
        "lora.r=8, prefix.lr=5e-3); training settings (warmup_steps=50, ...) are shared.",
    )
    p.add_argument(
        "--methods", required=True, help="comma-separated: prefix,prompt,lora,adapter,lora+prefix,prefix-memory,full"
    )
    p.add_argument("--model", default="smollm2-135m", help="built-in alias, HF id, local dir or .gguf file")
    p.add_argument("--data", default="e2e", help="built-in set (e2e, xsum, multiemo), .jsonl/.csv or hf:NAME")
    p.add_argument("--out", required=True, help="comparison directory (runs, report.md/html, plots, results.json)")
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps per run (the same for every method)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (the same for every method)")
    p.add_argument("--lr", type=float, help="one learning rate for every method (default: each method's own)")
    p.add_argument("--train-sizes", help="low-data mode: e.g. 50,100,200,500 (or 'all'): one run per size and seed")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1,2 (each repeats every run)")
    p.add_argument(
        "--lr-sweep",
        metavar="FACTORS",
        help="factors around each method's centre rate (default 0.333,1,3; at least 2)",
    )
    p.add_argument(
        "--lrs",
        action="append",
        default=[],
        metavar="METHOD=R1,R2,...",
        help="a method's own rates to sweep, e.g. prefix=1e-3,3e-3,1e-2 (repeatable)",
    )
    p.add_argument("--no-sweep", action="store_true", help="no sweep: each method trains at its one centre rate")
    p.add_argument(
        "--sweep-extend",
        type=int,
        default=None,
        metavar="N",
        help="a method whose best rate is the lowest or highest it tried tries one more beyond it, up to N times "
        "(default 1; 0: the grid only)",
    )
    p.add_argument("--sweep-sizes", help="train sizes to sweep, e.g. 50,500 (default: all); others reuse the nearest")
    p.add_argument(
        "--select-split",
        default="validation",
        choices=["train", "validation", "test", "all"],
        help="split the swept rates are scored on",
    )
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="resamples of the test inputs for the 95%% interval (0: none)"
    )
    p.add_argument(
        "--metric",
        choices=list(GENERATION_METRICS),
        help="generation's quality metric: picks the swept rates, heads the report, gets the interval "
        "(default bleu; rougeL for summaries); classification is always scored by accuracy",
    )
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resamples")
    p.add_argument("--eval-split", default="test", choices=["train", "validation", "test", "all"], help="scored split")
    p.add_argument("--eval-limit", type=int, help="score only the first N inputs of the split")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length limit when scoring")
    p.add_argument("--num-beams", type=int, default=1, help="beam width when scoring (1 = greedy)")
    p.add_argument("--untuned", action="store_true", help="also score the model without training")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, each in its own process (default 1); with N > 1 each gets cores/N torch threads "
        "(unless threads=K or OMP_NUM_THREADS is set), and times and memory are measured on a shared machine",
    )
    add_device_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="shared settings and METHOD.OPTION=VALUE")


def run(args: argparse.Namespace) -> int:
    placement(args)  # checked before the comparison directory is written; each run resolves it again
    placed = [f"{flag}={getattr(args, flag)}" for flag in ("device", "dtype") if getattr(args, flag) is not None]
    for flag in ("max_steps", "batch_size", "eval_limit", "max_new_tokens", "num_beams", "lr"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise PrefixTuneError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    if args.jobs < 1:
        raise PrefixTuneError(f"--jobs must be >= 1 (runs at a time), got {args.jobs}")
    if args.bootstrap < 0:
        raise PrefixTuneError(f"--bootstrap must be >= 0 (0: no interval), got {args.bootstrap}")
    if args.no_sweep and (args.lr_sweep or args.lrs or args.sweep_sizes or args.sweep_extend is not None):
        raise PrefixTuneError("--no-sweep does not combine with --lr-sweep, --lrs, --sweep-sizes or --sweep-extend")
    if args.sweep_extend is not None and args.sweep_extend < 0:
        raise PrefixTuneError(f"--sweep-extend must be >= 0 (0: the grid only), got {args.sweep_extend}")
    methods = parse_methods(args.methods)
    sizes = parse_sizes(args.train_sizes) if args.train_sizes else [None]
    settings = CompareSettings(
        methods=methods,
        model=args.model,
        data=args.data,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        train_sizes=sizes,
        seeds=parse_seeds(args.seeds),
        lr=args.lr,
        eval_split=args.eval_split,
        eval_limit=args.eval_limit,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        untuned=args.untuned,
        overrides=[*args.overrides, *placed],
        sweep=not args.no_sweep,
        lr_lists=parse_rate_lists(args.lrs, methods),
        sweep_sizes=parse_sizes(args.sweep_sizes) if args.sweep_sizes else None,
        sweep_extend=1 if args.sweep_extend is None else args.sweep_extend,
        select_split=args.select_split,
        bootstrap=args.bootstrap,
        bootstrap_seed=args.bootstrap_seed,
        metric=args.metric,
        jobs=args.jobs,
    )
    if args.lr_sweep:
        settings.lr_factors = parse_factors(args.lr_sweep)
    results = run_compare(settings, args.out, progress=not args.quiet)
    intervals = results["intervals"] if settings.bootstrap else None
    print(markdown(*main_table(results["runs"], intervals, results["sweep"], results["quality_metric"])))
    print(f"\nreport in {args.out}: {', '.join(results['files'])}")
    return 0
