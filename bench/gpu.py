"""One command for a GPU machine: our prefix against PEFT's and the bare model, on real model shapes, no downloads.

    python bench/gpu.py --json gpu.json               # one H200: SmolLM2-135M, Qwen3-0.6B, Llama-3.2-1B shapes, bf16
    python bench/gpu.py --quick --json quick.json     # a tiny shape on the CPU, seconds (the test suite runs this)
    python bench/gpu.py --device cpu --dtype float32 --shapes smollm2-135m --sections decode   # a CPU subset

Models are random-initialized from the real configs written below (so nothing is downloaded; speed does not
depend on the weights). Sections, each reported under its own key of the JSON:
- train:    tokens/s of one training step (forward, loss, backward, AdamW) of our prefix and PEFT's (20 virtual
            tokens, the 512-wide reparameterization MLP on both sides), alternating step by step on the same
            batches; the ratio two ways: the mechanism alone (ours computes logits at every position, like PEFT)
            and as shipped (ours: logits on target positions only). Median of the per-step ratios.
            --reference-dtype float32 adds PEFT in float32 to the same alternation (ours in bf16 against it),
            and the two dtypes' matmul rates on the step's MLP shape (matmul_ratio: what the hardware gives).
- mfu:      model FLOP utilization of our prefix training on the Llama-3.2-1B shape at 8 x 1024 tokens, against
            --peak-tflops (the H200's measured bf16 dense matmul rate) and against a matmul measured here.
- generate: greedy tokens/s at batch 1 and 8: the bare model, our prefix, PEFT's prefix (its own generate; not
            run where PEFT refuses the installed transformers, and the JSON says so), in rotating order.
- mixed:    8 adapters mixed in one batch of 8 rows vs the same 8 rows served one adapter at a time (first shape).
- decode:   the cost of a decode step vs cache length: the median of the last 100 steps of a long continuation,
            bare vs our prefix stored in the cache (decode_cache.py) vs the previous path that concatenated the
            prefix onto the cache every step, the three in lockstep (step k of each back to back).
Peak memory (torch.cuda.max_memory_allocated, or ru_maxrss on a CPU) per section. Written for torch >= 2.11 and
transformers >= 5.17 (the GPU machine's versions): only APIs both have. Not a test: a benchmark on whatever
machine it runs; the JSON records the machine (lscpu flags, GPU name, versions).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]  # run from a checkout without installing: prefixtune and bench

import torch  # noqa: E402
import transformers as tf  # noqa: E402

from bench.gpu_models import (  # noqa: E402
    SHAPES,
    VIRTUAL_TOKENS,
    batches,
    build,
    machine,
    matmul_ceiling,
    matmul_rates,
    ours,
    peak_memory,
    peft_prefix,
    sync,
    timed_generate,
    train_step,
)
from prefixtune.atomic import atomic_write_bytes  # noqa: E402
from prefixtune.cache_argument import cache_argument  # noqa: E402
from prefixtune.decode_cache import generate_cache  # noqa: E402
from prefixtune.eval import causal_lm_loss  # noqa: E402
from prefixtune.prefix import BATCH_KWARG  # noqa: E402

SECTIONS = ("train", "mfu", "generate", "mixed", "decode")


def section_train(args: argparse.Namespace, shape: str, dtype: torch.dtype) -> dict[str, Any]:
    """Ours and PEFT's prefix alternating step by step on the same batches: tokens/s and per-step ratios."""
    rows, length, steps = args.train_batch
    vocab = SHAPES[shape][1]["vocab_size"]
    data = batches(steps + 1, rows, length, vocab, args.device)
    mine = ours(build(shape, dtype, args.device))
    mine.train()
    theirs = peft_prefix(build(shape, dtype, args.device))
    theirs.train()
    setups = {
        "ours_shipped": (mine, lambda b: causal_lm_loss(mine, b, target_only=True)),
        "ours_all_logits": (mine, lambda b: causal_lm_loss(mine, b, target_only=False)),
        "peft": (theirs, lambda b: theirs(**b).loss),
    }
    optimizers = {
        "ours": torch.optim.AdamW(mine.trainable_parameters(), lr=1e-4),
        "peft": torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4),
    }
    reference = getattr(torch, args.reference_dtype) if args.reference_dtype else None
    if reference is not None and reference != dtype:  # PEFT in another dtype too (bf16 ours vs PEFT's float32)
        other = peft_prefix(build(shape, reference, args.device))
        other.train()
        setups["peft_reference"] = (other, lambda b: other(**b).loss)
        optimizers["peft_reference"] = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=1e-4)
    times: dict[str, list[float]] = {name: [] for name in setups}
    for i, batch in enumerate(data):
        for name, (model, loss_fn) in setups.items():
            optimizer = optimizers[name if name in optimizers else name.split("_")[0]]
            elapsed = train_step(model, optimizer, loss_fn, batch, args.device)
            if i > 0:  # the first batch warms up
                times[name].append(elapsed)
    tokens = rows * length
    out: dict[str, Any] = {"batch": [rows, length], "timed_steps": steps, "virtual_tokens": VIRTUAL_TOKENS}
    out["tokens_per_s"] = {name: round(tokens / statistics.median(t), 1) for name, t in times.items()}

    def ratios(baseline: list[float]) -> dict[str, float]:  # median of per-step ratios: load hits both alike
        return {
            "shipped": round(statistics.median(p / o for p, o in zip(baseline, times["ours_shipped"])), 3),
            "mechanism": round(statistics.median(p / o for p, o in zip(baseline, times["ours_all_logits"])), 3),
        }

    out["ratio_vs_peft"] = ratios(times["peft"])
    if "peft_reference" in times:
        out["reference_dtype"] = args.reference_dtype
        out["ratio_vs_peft_reference"] = ratios(times["peft_reference"])
        # the hardware's own ratio between the two dtypes, on the step's MLP matmul: the ceiling for any ratio above
        fields = SHAPES[shape][1]
        mlp = (rows * length, fields["hidden_size"], fields["intermediate_size"])
        rates = matmul_rates([dtype, reference], args.device, *mlp)
        gflops = {args.dtype: rates[dtype] / 1e9, args.reference_dtype: rates[reference] / 1e9}
        out["matmul_gflops"] = {"shape": list(mlp), **{name: round(r, 1) for name, r in gflops.items()}}
        out["matmul_ratio"] = round(rates[dtype] / rates[reference], 3)
    return out


def section_mfu(args: argparse.Namespace, shape: str, dtype: torch.dtype) -> dict[str, Any]:
    """Model FLOPs of our prefix training step (frozen base: forward + activation gradients) per second."""
    rows, length, steps = args.mfu_batch
    config = SHAPES[shape][1]
    model = ours(build(shape, dtype, args.device))
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    data = batches(steps + 1, rows, length, config["vocab_size"], args.device)
    times = [train_step(model, optimizer, lambda b: causal_lm_loss(model, b), b, args.device) for b in data][1:]
    base = model.base_model
    n_head = base.get_output_embeddings().weight.numel()
    n_lin = sum(
        m.weight.numel() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    tokens, targets = rows * length, rows * (length - int(length * 0.55))
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    pairs = rows * sum(VIRTUAL_TOKENS + i + 1 for i in range(length))  # causal, prefix columns included
    attention = 4 * config["num_hidden_layers"] * heads * head_dim * pairs
    flops = 2 * (2 * n_lin * tokens + 2 * n_head * targets) + 3 * attention
    achieved = flops / statistics.median(times)
    ceiling = matmul_ceiling(dtype, args.device, 8192 if args.device.startswith("cuda") else 512)
    return {
        "batch": [rows, length],
        "step_s": round(statistics.median(times), 4),
        "model_tflops_per_s": round(achieved / 1e12, 2),
        "mfu_of_peak": round(achieved / (args.peak_tflops * 1e12), 4),
        "peak_tflops": args.peak_tflops,
        "matmul_tflops_measured": round(ceiling / 1e12, 2),
        "mfu_of_measured_matmul": round(achieved / ceiling, 4),
    }


def section_generate(args: argparse.Namespace, shape: str, dtype: torch.dtype) -> dict[str, Any]:
    prompt, new, repeats = args.gen
    models = {"bare": build(shape, dtype, args.device), "ours": ours(build(shape, dtype, args.device))}
    out: dict[str, Any] = {"prompt_tokens": prompt, "new_tokens": new}
    try:  # PEFT's prefix in its own generate (its cache holds the prefix); PEFT 0.21 refuses transformers >= 5.24
        models["peft"] = peft_prefix(build(shape, dtype, args.device)).eval()
    except ValueError as e:
        out["peft"] = f"not run: {e}"
    vocab = SHAPES[shape][1]["vocab_size"]
    names = list(models)
    with torch.no_grad():
        for rows in (1, 8):
            ids = torch.randint(3, vocab, (rows, prompt), generator=torch.Generator().manual_seed(rows)).to(args.device)
            times: dict[str, list[float]] = {name: [] for name in names}
            for model in models.values():
                timed_generate(model, ids, 2, args.device)  # warm up
            for r in range(repeats):  # rotated, so that machine load hits every side alike
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    times[name].append(timed_generate(models[name], ids, new, args.device))
            rates = {name: round(rows * new / statistics.median(t), 1) for name, t in times.items()}
            row: dict[str, Any] = {"tokens_per_s": rates, "ours_over_bare": round(rates["ours"] / rates["bare"], 3)}
            if "peft" in rates:
                row["ours_over_peft"] = round(rates["ours"] / rates["peft"], 3)
                row["peft_over_bare"] = round(rates["peft"] / rates["bare"], 3)
            out[f"b{rows}"] = row
    return out


def section_mixed(args: argparse.Namespace, shape: str, dtype: torch.dtype) -> dict[str, Any]:
    """8 rows, each its own adapter: one generate over the mixed batch vs one generate per adapter."""
    prompt, new, repeats = args.gen
    mine = ours(build(shape, dtype, args.device), adapters=8, reparameterize=False)
    vocab = SHAPES[shape][1]["vocab_size"]
    ids = torch.randint(3, vocab, (8, prompt), generator=torch.Generator().manual_seed(8)).to(args.device)
    names = [f"a{i}" for i in range(8)]
    mixed, apart = [], []
    with torch.no_grad():
        timed_generate(mine, ids, 2, args.device, adapter_names=names)
        for _ in range(repeats):
            mixed.append(timed_generate(mine, ids, new, args.device, adapter_names=names))
            apart.append(
                sum(
                    timed_generate(mine, ids[i : i + 1], new, args.device, adapter_names=[n])
                    for i, n in enumerate(names)
                )
            )
    return {
        "adapters": 8,
        "mixed_tokens_per_s": round(8 * new / statistics.median(mixed), 1),
        "one_at_a_time_tokens_per_s": round(8 * new / statistics.median(apart), 1),
        "speedup": round(statistics.median(apart) / statistics.median(mixed), 3),
    }


def section_decode(args: argparse.Namespace, shape: str, dtype: torch.dtype) -> dict[str, Any]:
    """Seconds of one decode step as the cache grows (batch 1, greedy): the bare model, ours (the prefix stored
    once in the cache, decode_cache.py) and ours with a plain cache (the prefix concatenated onto it every step,
    the path before), in lockstep: step k of each runs back to back, so machine load hits all three alike."""
    length, last = args.decode
    bare = build(shape, dtype, args.device)
    mine = ours(build(shape, dtype, args.device))
    vocab = SHAPES[shape][1]["vocab_size"]
    ids = torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(2)).to(args.device)
    name_of_cache = cache_argument(type(bare))
    stored_batch, copy_batch = mine.prefix_batch(["a0"], 1), mine.prefix_batch(["a0"], 1)
    runs = {
        "bare": (bare, {}, tf.DynamicCache()),
        "ours": (
            mine.base_model,
            {BATCH_KWARG: stored_batch},
            generate_cache(mine.base_model, mine.layout, stored_batch, {})[name_of_cache],
        ),
        "ours_copy_each_step": (mine.base_model, {BATCH_KWARG: copy_batch}, tf.DynamicCache()),
    }
    tokens = {name: ids for name in runs}
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    with torch.no_grad():
        for step in range(length + 1):  # step 0 is the prefill
            for name in order[step % 3 :] + order[: step % 3]:
                model, extra, cache = runs[name]
                sync(args.device)
                start = time.perf_counter()
                logits = model(input_ids=tokens[name], use_cache=True, **{name_of_cache: cache}, **extra).logits
                tokens[name] = logits[:, -1:].argmax(-1)
                sync(args.device)
                if step:
                    times[name].append(time.perf_counter() - start)
    out: dict[str, Any] = {"continuation": length, "window": last, "prompt_tokens": ids.shape[1]}
    for name, steps in times.items():
        out[name] = {
            "first_ms": round(1000 * statistics.median(steps[:last]), 3),
            "last_ms": round(1000 * statistics.median(steps[-last:]), 3),
        }
    for name in ("ours", "ours_copy_each_step"):
        out[f"{name}_over_bare_last"] = round(out[name]["last_ms"] / out["bare"]["last_ms"], 3)
    out["cache_lengths"] = {name: runs[name][2].get_seq_length() for name in runs}
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny shape on the CPU, tiny sizes: seconds")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: bf16 on cuda")
    parser.add_argument("--shapes", default=None, help="comma-separated, from " + ", ".join(SHAPES))
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, from " + ", ".join(SECTIONS))
    parser.add_argument("--mfu-shape", default="llama-3.2-1b")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the H200's measured bf16 matmul rate")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--decode-length", type=int, default=1024, help="the long continuation of the decode section")
    parser.add_argument("--repeats", type=int, default=None, help="timed generate calls per model (default 3)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed steps per side (CPU: 6)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--reference-dtype",
        default=None,
        choices=["bfloat16", "float32"],
        help="train: PEFT also in this dtype, timed in the same alternation (e.g. ours in bf16 vs PEFT in float32)",
    )
    parser.add_argument("--budget-s", type=float, default=None, help="skip the sections left after this many seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.device = args.device or "cpu"
        args.shapes, args.mfu_shape = args.shapes or "tiny", "tiny"
        args.train_batch, args.mfu_batch, args.gen, args.decode = (2, 16, 2), (1, 32, 1), (4, 4, 1), (12, 4)
        args.threads = args.threads or 1
    else:
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        args.shapes = args.shapes or "smollm2-135m,qwen3-0.6b,llama-3.2-1b"
        gpu = args.device.startswith("cuda")
        args.train_batch = (8, 1024, args.train_steps or 10) if gpu else (8, 64, args.train_steps or 6)
        args.mfu_batch = (8, 1024, 10) if gpu else (2, 256, 3)
        args.gen = (64, 64, args.repeats or 3) if gpu else (32, 32, args.repeats or 3)
        args.decode = (args.decode_length, 100)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES] + [
        s for s in args.sections.split(",") if s not in SECTIONS
    ]
    if unknown:
        parser.error(f"unknown shapes or sections {unknown}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    started = time.time()
    result: dict[str, Any] = {"command": sys.argv, "machine": machine(args.device), "dtype": args.dtype}
    sections = args.sections.split(",")
    for section in sections:
        shapes = [args.mfu_shape] if section == "mfu" else args.shapes.split(",")
        for shape in shapes:
            if section in ("decode", "mixed") and not args.quick and len(shapes) > 1 and shape != shapes[0]:
                continue  # one shape is enough to see the slope and the mixing gain; the first one listed
            entry: dict[str, Any] = {}
            if args.budget_s and time.time() - started > args.budget_s:
                entry["skipped"] = f"the run passed --budget-s {args.budget_s} before this section"
            else:
                # one lent GPU call runs every section: a failing one is reported and the rest still run
                try:
                    with peak_memory(entry, args.device):
                        entry.update(globals()[f"section_{section}"](args, shape, dtype))
                except Exception as e:  # noqa: BLE001 - reported in the JSON, the exit status says it
                    entry["error"] = f"{type(e).__name__}: {e}"[:2000]
                    result["errors"] = result.get("errors", 0) + 1
            result.setdefault(section, {})[shape] = entry
            print(json.dumps({section: {shape: entry}}), flush=True)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            result["seconds"] = round(time.time() - started, 1)
            if args.json:  # after every section, so a run cut short still leaves what it measured
                atomic_write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())
    return result


if __name__ == "__main__":
    sys.exit(1 if main().get("errors") else 0)
