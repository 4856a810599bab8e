"""Each method's BLEU on E2E at equal steps with smollm2-135m, and the issue's targets (JSON out).

    python bench/compare_e2e.py --out runs/bench/compare_e2e [--methods prefix,prompt,lora,adapter,lora+prefix,full]
        [--max-steps 100] [--batch-size 8] [--eval-limit N] [--train-sizes 50,100,200,500 --seeds 0,1] [--no-sweep]
        [key=value ...]

A thin wrapper around `prefixtune compare` (same directory layout, resumable: rerun the command to continue), so
every method first gets the same learning-rate sweep (x1/3, x1, x3 around its default, scored on validation, the
winner tested; `--no-sweep` trains each at its default only), and which adds the paper's targets: prefix within
1 BLEU of full fine-tuning (or above it) at the full training set, and, with --train-sizes, prefix >= full
fine-tuning on average over the sizes. Targets are reported, not asserted.
Extra key=value items go to compare as they are (e.g. `prefix.lr=5e-3 threads=1`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from prefixtune.atomic import atomic_write_bytes
from prefixtune.compare import CompareSettings, parse_methods, parse_seeds, parse_sizes, run_compare
from prefixtune.errors import PrefixTuneError


def _mean_bleu(runs: list[dict], method: str, size: int | None) -> float | None:
    values = [r["scores"]["bleu"] for r in runs if r["method"] == method and r.get("train_size") == size]
    return round(statistics.mean(values), 2) if values else None


def targets(runs: list[dict], sizes: list[int | None]) -> dict:
    out: dict = {}
    largest = sizes[-1]
    prefix, full = _mean_bleu(runs, "prefix", largest), _mean_bleu(runs, "full", largest)
    if prefix is not None and full is not None:
        out["prefix_within_1_bleu_of_full"] = {
            "train_size": largest or "all",
            "prefix": prefix,
            "full": full,
            "gap": round(prefix - full, 2),
            "met": prefix >= full - 1.0,
        }
    small = [s for s in sizes if s is not None]
    if small:
        by_size = {s: (_mean_bleu(runs, "prefix", s), _mean_bleu(runs, "full", s)) for s in small}
        pairs = [(p, f) for p, f in by_size.values() if p is not None and f is not None]
        if pairs:
            mean_prefix = statistics.mean(p for p, _ in pairs)
            mean_full = statistics.mean(f for _, f in pairs)
            out["low_data_prefix_ge_full"] = {
                "by_size": {str(s): {"prefix": p, "full": f} for s, (p, f) in by_size.items()},
                "prefix_mean": round(mean_prefix, 2),
                "full_mean": round(mean_full, 2),
                "met": mean_prefix >= mean_full,
            }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench/compare_e2e")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="prefix,prompt,lora,adapter,lora+prefix,full")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-limit", type=int)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--train-sizes")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--untuned", action="store_true")
    parser.add_argument("--no-sweep", action="store_true", help="each method at its default rate only")
    parser.add_argument("--json", help="also write the JSON here")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        settings = CompareSettings(
            methods=parse_methods(args.methods),
            model=args.model,
            data="e2e",
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            train_sizes=parse_sizes(args.train_sizes) if args.train_sizes else [None],
            seeds=parse_seeds(args.seeds),
            eval_limit=args.eval_limit,
            max_new_tokens=args.max_new_tokens,
            untuned=args.untuned,
            sweep=not args.no_sweep,
            overrides=list(args.overrides),
        )
        raw = run_compare(settings, args.out)
    except PrefixTuneError as e:
        print(f"compare_e2e: error: {e}", file=sys.stderr)
        return 2
    runs = raw["runs"]
    result = {
        "bench": "compare_e2e",
        "model": args.model,
        "settings": raw["settings"],
        "runs": [
            {
                "name": r["name"],
                "method": r["method"],
                "train_size": r.get("train_size"),
                "seed": r.get("seed"),
                "lr": r.get("lr"),
                "steps": r["steps"],
                "trainable_params": r["trainable_params"],
                "saved_params": r["saved_params"],
                "train_seconds": r["train_seconds"],
                "tokens_per_s": r.get("tokens_per_s"),
                "peak_rss_train_mb": r.get("peak_rss_train_mb"),
                "bleu": r["scores"].get("bleu"),
                "rougeL": r["scores"].get("rougeL"),
                "test_loss": r["scores"].get("loss"),
                "examples": r["scores"].get("examples"),
            }
            for r in runs
        ],
        "targets": targets(runs, settings.train_sizes),
        "report": str(Path(args.out) / "report.md"),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.json, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
