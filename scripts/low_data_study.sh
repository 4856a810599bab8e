#!/usr/bin/env bash
# The low-data study of issue 18: prefix vs full fine-tuning vs LoRA on E2E at 50, 100, 200 and 500 training
# examples, 3 seeds, each method at its best rate of a learning-rate sweep (x1/3, x1, x3 around its default),
# sized to about two hours of two CPU cores: two `prefixtune compare` processes side by side, one thread each.
#
#   STEPS=18 bash scripts/low_data_study.sh     # the published run (docs/methods.md; resumable: repeat it after
#                                               # an interruption); without STEPS the sizing below picks the steps
#   DRY_RUN=1 bash scripts/low_data_study.sh    # prints the sizing and the two commands only
#
# The sweep runs at the smallest and the largest size only (50 and 500, first seed), and the sizes between
# reuse the winner of the nearest swept size (100 takes 50's, 200 takes 500's, on a log scale). That is why the
# study splits into two comparisons by size, {50, 100} sweeping 50 and {200, 500} sweeping 500: each is exactly
# the reuse a single comparison with --sweep-sizes 50,500 makes, and the two run on one core each.
#
# Sizing (per process, one core): 3 methods x 2 sizes x 3 seeds = 18 tested runs; the swept size adds 2 more
# rates per method, so 24 trained runs, 9 validation scorings (21 inputs), 18 test scorings (43 inputs) and 27
# worker starts (imports and the model load). Steps are what is left of the budget, shared by every trained
# run: STEPS = (BUDGET_S - overhead) / (24 x SEC_PER_STEP). The defaults are measurements on this project's
# shared 2-core machine (docs/methods.md, "Low data, swept"): override them with your own.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/low_data}
BUDGET_S=${BUDGET_S:-7200}              # wall seconds for the whole study (both processes run in parallel)
SEC_PER_STEP=${SEC_PER_STEP:-13}        # one optimizer step of batch 8, smollm2-135m, one thread
SEC_PER_TEST=${SEC_PER_TEST:-65}        # scoring the 43 E2E test inputs (greedy, 64 new tokens at most)
SEC_PER_VALIDATION=${SEC_PER_VALIDATION:-35}  # scoring the 21 validation inputs
SEC_PER_START=${SEC_PER_START:-15}      # a worker's imports and model load
BATCH=${BATCH:-8}
TRAINED=24 TESTS=18 VALIDATIONS=9 STARTS=27
overhead=$((STARTS * SEC_PER_START + VALIDATIONS * SEC_PER_VALIDATION + TESTS * SEC_PER_TEST))
STEPS=${STEPS:-$(((BUDGET_S - overhead) / (TRAINED * SEC_PER_STEP)))}
if [ "$STEPS" -lt 1 ]; then
    echo "low_data_study: a budget of ${BUDGET_S} s leaves no steps after ${overhead} s of scoring and starts" >&2
    exit 2
fi
WARMUP=${WARMUP:-$(((STEPS + 9) / 10))}  # the trainer's default of 20 warmup steps would be most of the run

# The published table ran with the fixed grid (before --sweep-extend existed): SWEEP_EXTEND=0 reproduces it; 1 is
# compare's default, one more rate beyond a grid's edge when a method wins there.
SWEEP_EXTEND=${SWEEP_EXTEND:-0}
common=(-m prefixtune compare --methods prefix,full,lora --data e2e --model smollm2-135m
    --max-steps "$STEPS" --batch-size "$BATCH" --seeds 0,1,2 --sweep-extend "$SWEEP_EXTEND" --quiet)
settings=("warmup_steps=$WARMUP" threads=1)
small=("${common[@]}" --train-sizes 50,100 --sweep-sizes 50 --out "$OUT/small" "${settings[@]}")
large=("${common[@]}" --train-sizes 200,500 --sweep-sizes 500 --out "$OUT/large" "${settings[@]}")

echo "low_data_study: ${STEPS} steps of batch ${BATCH} per run (${overhead} s of each process's ${BUDGET_S} s" \
    "go to scoring and starts; ${SEC_PER_STEP} s per step assumed)" >&2
echo "  $PY ${small[*]}" >&2
echo "  $PY ${large[*]}" >&2
if [ -n "${DRY_RUN:-}" ]; then
    exit 0
fi
if [ ! -x "$PY" ]; then
    echo "low_data_study: no $PY; run bash scripts/setup.sh first (or set PYTHON=...)" >&2
    exit 2
fi

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# Use the workplace's copy of the data when it is there; otherwise prefixtune fetches it from the registry.
if [ -z "${PREFIXTUNE_DATA_DIR:-}" ] && [ -f ../shared/data/e2e_nlg.json ]; then
    export PREFIXTUNE_DATA_DIR="$(cd ../shared/data && pwd)"
fi
mkdir -p "$OUT"
start=$(date +%s)
"$PY" "${small[@]}" >"$OUT/small.log" 2>&1 &
first=$!
"$PY" "${large[@]}" >"$OUT/large.log" 2>&1 &
second=$!
status=0
wait "$first" || status=$?
wait "$second" || status=$?
echo "low_data_study: both comparisons ended after $(($(date +%s) - start)) s (logs: $OUT/small.log, $OUT/large.log)" >&2
if [ "$status" -ne 0 ]; then
    echo "low_data_study: a comparison failed (exit $status); repeat the command to resume it" >&2
    exit "$status"
fi

# One table over both comparisons: BLEU mean ± sd over seeds, the bootstrap 95% interval over test inputs, the
# rate each method trained with, and prefix - full / prefix - lora per size and on average.
"$PY" - "$OUT" <<'EOF'
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
raws = [json.loads((out / part / "results.json").read_text()) for part in ("small", "large")]
runs = [r for raw in raws for r in raw["runs"] if r["method"] != "untuned"]
intervals = {k: v for raw in raws for k, v in raw["intervals"].items()}
sizes = sorted({r["train_size"] for r in runs})
methods = list(dict.fromkeys(r["method"] for r in runs))
others = [m for m in methods if m != "prefix"]
mean = {}
header = [f"{m} BLEU mean ± sd [95% interval], lr" for m in methods] + [f"prefix - {m}" for m in others]
lines = ["| training examples | " + " | ".join(header) + " |", "| --- " * (len(header) + 1) + "|"]
for size in sizes:
    cells = []
    for m in methods:
        group = [r for r in runs if r["method"] == m and r["train_size"] == size]
        values = [r["scores"]["bleu"] for r in group]
        mean[(m, size)] = statistics.mean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        low, high = intervals.get(f"{m}@{size}", [None, None, None])[1:]
        shown = f"[{low:.1f}, {high:.1f}]" if low is not None else "-"
        cells.append(f"{mean[(m, size)]:.2f} ± {sd:.2f} {shown}, {group[0]['lr']:g}")
    gaps = [f"{mean[('prefix', size)] - mean[(m, size)]:+.2f}" for m in others]
    lines.append(f"| {size} | " + " | ".join(cells + gaps) + " |")
average = {m: statistics.mean(mean[(m, s)] for s in sizes) for m in methods}
gaps = [f"{average['prefix'] - average[m]:+.2f}" for m in others]
lines.append("| mean | " + " | ".join([f"{average[m]:.2f}" for m in methods] + gaps) + " |")
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print(text)
EOF
