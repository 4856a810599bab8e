"""The results of the performance suite (bench/perf.py): the median over each configuration's processes, the
ratios (ours over PEFT, ours over the bare model, FLOP/s over the ceiling), the issue's targets, and the tables
printed at the end of a run."""

from __future__ import annotations

import json
import re
import statistics
from typing import Any

from bench.perf_common import PEFT_METHODS, SEQS

# the fields of a training result that are medians over that configuration's processes
MEDIANS = (
    "ceiling_fraction",
    "ceiling_fraction_cpu",
    "tokens_per_s",
    "tokens_per_cpu_s",
    "flops_per_s",
    "flops_per_cpu_s",
    "peak_rss_mb",
    "above_loaded_mb",
    "rss_loaded_mb",
)
# (ours, theirs) pairs compared by ratios, with their key in the JSON
PAIRS = [
    *[(f"ours-{m}@{s}", f"peft-{m}@{s}", f"{m}@{s}") for s in SEQS for m in PEFT_METHODS],
    ("ours-prefix@e2e", "peft-prefix-unbucketed@e2e", "prefix@e2e (PEFT on unbucketed batches)"),
    ("ours-prefix-gc@xsum", "peft-prefix@xsum", "prefix-gc@xsum"),
    *[(f"ours-full@{s}", f"hf-full@{s}", f"full@{s} (vs transformers' loss)") for s in SEQS],
]


def median_of_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's row: its middle good run, with the MEDIANS fields the medians over its good runs."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[-1].get("error", "failed")}
    out = dict(good[len(good) // 2])
    for key in MEDIANS:
        out[key] = statistics.median(r[key] for r in good)
    out["runs"] = [{k: r[k] for k in ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mb")} for r in good]
    return out


def generation_sizes(gen: dict[str, Any]) -> list[str]:
    """The batch-size keys (b1, b8, ...) of a generation result, without their _cpu and _all companions."""
    return [k for k in gen if re.fullmatch(r"b\d+", k)]


def compute_ratios(result: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ratios by wall-clock time (what the targets are stated in) and by CPU time (process user+system seconds:
    on a shared machine, the work each configuration did, whatever else was running)."""
    train, gen = result["train"], result.get("generate", {})

    def get(name: str, key: str) -> float | None:
        row = train.get(name)
        return row.get(key) if row and "error" not in row else None

    def pairs(key: str) -> dict[str, float]:
        return {
            label: round(get(ours, key) / get(theirs, key), 3)
            for ours, theirs, label in PAIRS
            if get(ours, key) and get(theirs, key)
        }

    ratios: dict[str, Any] = {
        "train_tokens_per_s_ours_over_peft": pairs("tokens_per_s"),
        "train_tokens_per_cpu_s_ours_over_peft": pairs("tokens_per_cpu_s"),
        "peak_rss_ours_over_peft": pairs("peak_rss_mb"),
        "above_loaded_rss_ours_over_peft": pairs("above_loaded_mb"),
        # achieved FLOP/s over the matmul ceiling measured in the same process just before the steps
        "flops_fraction_of_ceiling": {
            name: round(row["ceiling_fraction"], 3) for name, row in train.items() if "error" not in row
        },
        "flops_per_cpu_s_fraction_of_ceiling": {
            name: round(row["ceiling_fraction_cpu"], 3) for name, row in train.items() if "error" not in row
        },
    }
    paired = result.get("paired", {}).get("prefix@e2e", {})
    if "ours_over_peft" in paired:
        ratios["paired_train_tokens_per_s_ours_over_peft"] = {
            "prefix@e2e": paired["ours_over_peft"],
            "prefix@e2e by CPU time": paired["ours_over_peft_cpu"],
        }
    sizes = generation_sizes(gen)
    for size in sizes:
        for suffix, g in (("", gen[size]), ("_cpu", gen[f"{size}_cpu"])):
            ratios[f"generate_{size}{suffix}"] = {
                "ours_prefix_over_bare": round(g["ours"] / g["bare"], 3),
                "peft_prefix_over_bare": round(g["peft"] / g["bare"], 3),
                "ours_prefix_over_peft_prefix": round(g["ours"] / g["peft"], 3),
            }
    targets = []

    def target(name: str, group: str, key: str, op: str, threshold: float, cpu_group: str | None = None) -> None:
        value = ratios.get(group, {}).get(key)
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        row = {"target": name, "value": value, "need": f"{op} {threshold}", "met": met}
        if cpu_group is not None:
            row["value_by_cpu_time"] = ratios.get(cpu_group, {}).get(key)
        targets.append(row)

    target(
        "prefix training tokens/s, ours / PEFT, E2E batches",
        "train_tokens_per_s_ours_over_peft",
        "prefix@e2e",
        ">=",
        1.3,
        "train_tokens_per_cpu_s_ours_over_peft",
    )
    if "ours_over_peft" in paired:
        targets[-1]["value_paired"] = paired["ours_over_peft"]
        targets[-1]["value_paired_by_cpu_time"] = paired["ours_over_peft_cpu"]
    target(
        "peak training RSS at 512 tokens, ours (gradient checkpointing) / PEFT",
        "peak_rss_ours_over_peft",
        "prefix-gc@xsum",
        "<=",
        0.8,
    )
    for size in sizes:
        for key, need in (("ours_prefix_over_bare", 0.95), ("ours_prefix_over_peft_prefix", 1.0)):
            what = "bare model" if key.endswith("bare") else "PEFT's prefix"
            target(
                f"generation batch {size[1:]}, our prefix / {what}",
                f"generate_{size}",
                key,
                ">=",
                need,
                f"generate_{size}_cpu",
            )
    target(
        "achieved training FLOP/s / matmul ceiling, our prefix at the long batch",
        "flops_fraction_of_ceiling",
        "ours-prefix@xsum",
        ">=",
        0.4,
        "flops_per_cpu_s_fraction_of_ceiling",
    )
    return ratios, targets


def print_tables(result: dict[str, Any]) -> None:
    """The run on stdout: the ceiling, the inputs, the training table, generation, the ratios and the targets."""
    ceiling = result["ceiling"]
    print(
        f"\nmatmul ceiling: {ceiling['float32'] / 1e9:.1f} GFLOP/s float32 "
        f"({ceiling['float32_per_cpu_s'] / 1e9:.1f} per CPU-second), {ceiling['bfloat16'] / 1e9:.1f} bfloat16"
    )
    for seq, s in result["inputs"].items():
        if "batch" not in s:
            print(f"{seq}: padding {s['padding_bucketed']:.1%} bucketed, {s['padding_unbucketed']:.1%} not")
            continue
        print(
            f"{seq}: batch {s['batch'][0]} x <= {s['batch'][1]} tokens, mean {s['mean_tokens']} tokens "
            f"({s['mean_target_tokens']} target); padding {s['padding_bucketed']:.1%} bucketed, "
            f"{s['padding_unbucketed']:.1%} not"
        )
    header = (
        f"{'configuration':<30} {'tokens/s':>9} {'tok/CPU-s':>10} {'peak RSS MB':>12} {'above load':>11} "
        f"{'GFLOP/s':>8} {'% ceil':>7} {'% ceil CPU':>11}"
    )
    print("\n% ceil: achieved FLOP/s over the matmul FLOP/s measured in the same process (CPU: per CPU-second)")
    print(header + "\n" + "-" * len(header))
    for name, row in result["train"].items():
        if "error" in row:
            print(f"{name:<30} FAILED: {row['error'].strip().splitlines()[-1]}")
            continue
        print(
            f"{name:<30} {row['tokens_per_s']:>9.1f} {row['tokens_per_cpu_s']:>10.1f} {row['peak_rss_mb']:>12.0f} "
            f"{row['above_loaded_mb']:>11.0f} {row['flops_per_s'] / 1e9:>8.1f} "
            f"{row['ceiling_fraction']:>7.1%} {row['ceiling_fraction_cpu']:>11.1%}"
        )
    gen = result.get("generate", {})
    if gen:
        print(f"\n{'generation tokens/s':<24} {'bare':>8} {'ours':>8} {'PEFT':>8}")
        for size in generation_sizes(gen):
            for suffix, label in (("", ""), ("_cpu", " per CPU-s")):
                g = gen[size + suffix]
                print(f"{'batch ' + size[1:] + label:<24} {g['bare']:>8.1f} {g['ours']:>8.1f} {g['peft']:>8.1f}")
    print("\nratios: " + json.dumps(result["ratios"], indent=1))
    print("\ntargets (wall-clock ratios; by CPU time in brackets):")
    for t in result["targets"]:
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        cpu = f" [{t['value_by_cpu_time']}]" if t.get("value_by_cpu_time") is not None else ""
        if "value_paired" in t:
            cpu += f"; paired in one process {t['value_paired']} [{t['value_paired_by_cpu_time']}]"
        print(f"  {mark:<12} {t['target']}: {t['value']}{cpu} (need {t['need']})")
