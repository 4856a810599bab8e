"""Training and generation performance, prefixtune against PEFT and the bare model, in one run (issue 7).

    python -m bench all --json out.json             # smollm2-135m, E2E (~64 tokens) and XSum (512 tokens)
    python -m bench all --quick --json out.json     # a tiny random Llama on synthetic data: seconds (CI, tests)

What one run measures, every configuration on the same batches (built once by the parent, in the same order):
- training: tokens/s (real tokens, padding not counted) and peak RSS for prefix, prompt, LoRA and full
  fine-tuning, ours (prefixtune's methods and loss) and PEFT's where PEFT has the method (prefix, prompt, LoRA;
  `hf-full` is transformers' own loss), on E2E batches and on XSum-length inputs. A step is forward, loss,
  backward, gradient clipping and an AdamW update, in float32 unless the name says bf16. Extra rows: our prefix
  with gradient checkpointing (-gc), with bfloat16 autocast (-bf16, plus its loss against float32 on the same
  batch and weights) and with logits at every position (-alllogits, what target-only logits save).
- each configuration runs in its own process (a fresh interpreter; `--fork` forks the parent instead, which is
  what --quick does to skip the imports); peak memory is that process's `ru_maxrss` (resource.getrusage), also
  given above the RSS right after loading the model.
- generation: greedy tokens/s at batch 1 and 8 (E2E prompts, left padded, a fixed number of new tokens), bare
  model vs our prefix vs PEFT's prefix, in one process, interleaved, median of --gen-repeats.
- the machine's ceiling: the best float32 matmul FLOP/s on the same threads (square matrices of 1024 and 2048),
  measured in every training process just before its steps (load on a shared machine drifts between processes),
  and that configuration's achieved FLOP/s as a fraction of it; a separate process also measures it at the start
  and the end of the run. FLOPs per step (N_lin: weights of the linear layers in the decoder blocks;
  N_head: the LM head; T: tokens processed (real tokens, plus P for prompt tuning); T_head: positions whose next
  token is a target; A = 4 * layers * heads * head_dim * attended (query, key) pairs, causal, prefix columns included):
      full fine-tuning:   3 * (2 * N_lin * T + 2 * N_head * T_head) + 3 * A     (= 6 N T for the matmuls)
      frozen base:        2 * (2 * N_lin * T + 2 * N_head * T_head) + 3 * A     (forward + activation gradients)
  The head is counted only where the loss needs it, for every implementation alike, and the recomputation of
  gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).

Repeats: `--short-repeats` / `--long-repeats` run each configuration's process that many times, round-robin over
all configurations (so a burst of load on a shared machine hits them alike); the figures are medians. Not a test:
timings on a shared machine are noisy; read the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.perf_common import ROOT, load_average, machine, native_bf16
from bench.perf_inputs import load_tokenizer, prepare_inputs, tiny_model_dir
from bench.perf_report import compute_ratios, median_of_runs, print_tables
from bench.perf_train import train_configs
from bench.perf_workers import run_worker, worker_main

# The parts, each a module of its own: perf_common (machine facts, the matmul ceiling, what workers share),
# perf_inputs (model, tokenizer, batches), perf_train and perf_generate (the measuring workers), perf_workers
# (their processes), perf_report (medians, ratios, targets, tables). This one: the arguments and the run.


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """The whole suite: inputs once, the ceiling, every training configuration round-robin, generation, the
    paired measurement, the ceiling again; the result that --json writes."""
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="prefixtune-bench-") as tmp:
        workdir = Path(tmp)
        model = str(tiny_model_dir(workdir)) if args.quick else args.model
        tokenizer = load_tokenizer(model)
        inputs = prepare_inputs(args, tokenizer, workdir)
        result: dict[str, Any] = {
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
            "model": "tiny random Llama (--quick)" if args.quick else args.model,
            "machine": machine(args.threads),
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "command", "fork", "data_dir")},
            "inputs": inputs["stats"],
        }
        common = {"model": model, "inputs": inputs["path"], "threads": args.threads}
        fork = args.fork

        def ceiling() -> dict[str, Any]:
            sizes = [128, 256] if args.quick else [512, 1024, 2048]
            spec = {**common, "sizes": sizes, "trials": 3, "seconds": 0.05 if args.quick else 1.0}
            return run_worker("ceiling", spec, workdir, fork)

        ceilings = [ceiling()]
        with_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and (args.quick or native_bf16()))
        result["settings"]["bf16_row"] = with_bf16
        configs = train_configs(args.configs, bf16=with_bf16)
        repeats = {"e2e": args.short_repeats, "xsum": args.long_repeats}
        runs: dict[str, list[dict[str, Any]]] = {c["name"]: [] for c in configs}
        for r in range(max(repeats.values())):
            for c in configs:
                if r >= repeats[c["seq"]]:
                    continue
                short = c["seq"] == "e2e"
                spec = {
                    **common,
                    **c,
                    "virtual_tokens": args.virtual_tokens,
                    "warmup": args.warmup if short else args.long_warmup,
                    "steps": args.short_steps if short else args.long_steps,
                    "ceiling_sizes": [256] if args.quick else [1024, 2048],
                    "ceiling_seconds": 0.05 if args.quick else 0.75,
                }
                t0 = time.time()
                runs[c["name"]].append(run_worker("train", spec, workdir, fork))
                last = runs[c["name"]][-1]
                say = last.get("error", "").strip().splitlines()[-1:] or [f"{last['tokens_per_s']} tokens/s"]
                print(
                    f"[{time.time() - started:6.0f}s] {c['name']} run {r + 1}: {say[0]} ({time.time() - t0:.0f}s)",
                    flush=True,
                )
            if r == 0 and not args.skip_generation:
                spec = {
                    **common,
                    "virtual_tokens": args.virtual_tokens,
                    "batch_sizes": args.gen_batches,
                    "new_tokens": args.gen_new_tokens,
                    "repeats": args.gen_repeats,
                }
                result["generate"] = run_worker("generate", spec, workdir, fork)
                print(f"[{time.time() - started:6.0f}s] generation: {json.dumps(result['generate'])[:300]}")
        if args.pair_steps:
            spec = {**common, "method": "prefix", "seq": "e2e", "virtual_tokens": args.virtual_tokens}
            result["paired"] = {
                "prefix@e2e": run_worker("pair", {**spec, "pair_steps": args.pair_steps}, workdir, fork)
            }
            print(f"[{time.time() - started:6.0f}s] paired: {json.dumps(result['paired'])[:300]}", flush=True)
        ceilings.append(ceiling())
        good = [c for c in ceilings if "error" not in c]
        if not good:
            raise SystemExit(f"the matmul ceiling could not be measured: {ceilings[0]['error']}")
        result["ceiling"] = {k: max(c[k] for c in good) for k in good[0]}
        result["train"] = {name: median_of_runs(r) for name, r in runs.items()}
        if "error" in result.get("generate", {}):
            print(result["generate"]["error"], file=sys.stderr)
            result.pop("generate")
        result["ratios"], result["targets"] = compute_ratios(result)
        result["machine"]["load_average_end"] = load_average()
        result["seconds"] = round(time.time() - started, 1)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["all", "worker"], help="all: the whole suite; worker: internal")
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--quick", action="store_true", help="a tiny random model and synthetic data (seconds)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None, help="where e2e/xsum files are (default: ../shared/data if there)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --quick)")
    parser.add_argument("--configs", help="regex: only the training configurations whose name matches")
    parser.add_argument("--short-batch", type=int, default=8)
    parser.add_argument("--short-len", type=int, default=64, help="E2E max tokens per example")
    parser.add_argument("--short-steps", type=int, default=None, help="timed steps on E2E batches (default 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps on E2E batches (default 1)")
    parser.add_argument("--short-repeats", type=int, default=None, help="processes per E2E configuration (def. 3)")
    parser.add_argument("--long-batch", type=int, default=8)
    parser.add_argument("--long-len", type=int, default=None, help="XSum max tokens per example (default 512)")
    parser.add_argument("--long-steps", type=int, default=None, help="timed steps on XSum batches (default 2)")
    parser.add_argument("--long-warmup", type=int, default=1)
    parser.add_argument("--long-repeats", type=int, default=1)
    parser.add_argument("--virtual-tokens", type=int, default=20, help="P for prefixes and prompts")
    parser.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--gen-new-tokens", type=int, default=None, help="new tokens per generation (default 32)")
    parser.add_argument("--gen-repeats", type=int, default=None, help="timed generations per model (default 5)")
    parser.add_argument(
        "--bf16",
        choices=["auto", "on", "off"],
        default="auto",
        help="the bf16 autocast row (auto: with --quick, or where the CPU has native bfloat16)",
    )
    parser.add_argument(
        "--pair-steps",
        type=int,
        default=None,
        help="steps of each side in the paired ours/PEFT prefix measurement on E2E (default 16; 0 = skip)",
    )
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--fork", action="store_true", help="fork workers instead of fresh interpreters")
    parser.add_argument(
        "--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY for every worker (when not set already)"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "threads": 1 if quick else 2,
        "short_steps": 2 if quick else 4,
        "warmup": 1,
        "short_repeats": 1 if quick else 3,
        "long_len": 96 if quick else 512,
        "long_steps": 1 if quick else 2,
        "gen_new_tokens": 4 if quick else 32,
        "gen_repeats": 2 if quick else 5,
        "pair_steps": 2 if quick else 16,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if quick:
        args.short_len = min(args.short_len, 48)
        args.fork = True
    if args.data_dir is None and (ROOT.parent / "shared" / "data").is_dir():
        args.data_dir = str(ROOT.parent / "shared" / "data")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Before torch is imported (workers inherit it): OpenMP threads that wait passively instead of spinning. On a
    # machine shared with other jobs, spinning threads steal the cores that the working thread needs.
    os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "worker":
        return worker_main(args.spec)
    result = run_all(args)
    print_tables(result)
    if args.json:
        from prefixtune.peft_format import atomic_write_bytes  # here: torch must not be imported before the env above

        atomic_write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())
    failed = [name for name, row in result["train"].items() if "error" in row]
    return 1 if failed else 0
