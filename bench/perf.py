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
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SEQS = ("e2e", "xsum")
PEFT_METHODS = ("prefix", "prompt", "lora")


# ----- configurations ---------------------------------------------------------------------------------------------


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); without it torch's bf16 matmul is ~100x
    slower than float32 (0.4 vs 28 GFLOP/s on a Zen 3 with AVX2), so the bf16 row would take hours."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def train_configs(pattern: str | None, bf16: bool = True) -> list[dict[str, Any]]:
    """Every training configuration: name, impl (ours, peft, hf), method, seq, and the options of ours."""
    configs = []
    for seq in SEQS:
        for method in ("prefix", "prompt", "lora", "full"):
            configs.append({"impl": "ours", "method": method, "seq": seq})
            configs.append({"impl": "peft" if method in PEFT_METHODS else "hf", "method": method, "seq": seq})
        if seq == "xsum":
            configs.append({"impl": "ours", "method": "prefix", "seq": seq, "gc": True})
        if seq == "e2e":
            if bf16:
                configs.append({"impl": "ours", "method": "prefix", "seq": seq, "bf16": True})
            configs.append({"impl": "ours", "method": "prefix", "seq": seq, "target_only": False})
            configs.append({"impl": "peft", "method": "prefix", "seq": seq, "unbucketed": True})
    for c in configs:
        c.setdefault("gc", False)
        c.setdefault("bf16", False)
        c.setdefault("unbucketed", False)
        c.setdefault("target_only", c["impl"] == "ours")
        extra = ("-gc" if c["gc"] else "") + ("-bf16" if c["bf16"] else "")
        extra += "-alllogits" if c["impl"] == "ours" and not c["target_only"] else ""
        extra += "-unbucketed" if c["unbucketed"] else ""
        c["name"] = f"{c['impl']}-{c['method']}{extra}@{c['seq']}"
    if pattern:
        configs = [c for c in configs if re.search(pattern, c["name"])]
    return configs


# ----- inputs -----------------------------------------------------------------------------------------------------

_FOODS = ["French", "Italian", "Japanese", "Chinese", "English", "Indian", "fast food"]
_NAMES = ["Blue Spice", "The Eagle", "The Golden Curry", "The Mill", "Cotto", "Zizzi", "The Phoenix"]
_WORDS = "the cat sat on mat and dog ran in park a coffee shop near river city centre family friendly".split()


def synthetic_examples(kind: str, n: int, seed: int = 0) -> list[Any]:
    """E2E-like records (short) or XSum-like documents (long), for --quick: no files, no network."""
    from prefixtune.data import Example

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, food = rng.choice(_NAMES), rng.choice(_FOODS)
        if kind == "e2e":
            source = f"name[{name}], eatType[{rng.choice(['pub', 'coffee shop'])}], food[{food}], area[city centre]"
            target = f"{name} serves {food} food in the city centre" + " near the river" * rng.randint(0, 3) + "."
        else:
            source = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(150, 400)))
            target = f"{name} opens a {food} restaurant."
        out.append(Example(source, target, [target]))
    return out


def prepare_inputs(args: argparse.Namespace, tokenizer: Any, workdir: Path) -> dict[str, Any]:
    """Token batches for both sequence kinds and the generation prompts; saved for the workers."""
    import torch

    from prefixtune import data

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lengths = {"e2e": (args.short_len, args.short_batch), "xsum": (args.long_len, args.long_batch)}
    needed = {"e2e": args.warmup + args.short_steps, "xsum": args.long_warmup + args.long_steps}
    batches, stats, prompts = {}, {}, None
    for seq in SEQS:
        max_length, batch_size = lengths[seq]
        if args.quick:
            examples = synthetic_examples(seq, 96 if seq == "e2e" else 4 * batch_size * needed[seq])
        else:
            examples = data.load_dataset(seq, split="train", data_dir=args.data_dir)
            if seq == "xsum":
                examples = examples[: 16 * batch_size * needed[seq]]
        pairs = data.training_pairs(examples)
        encoded, _ = data.encode(pairs, tokenizer, max_length=max_length)
        if seq == "xsum":  # documents that fill max_length (cut at their end), so that long batches are B x max
            full = [e for e in encoded if len(e.input_ids) == max_length]
            encoded = full if len(full) >= batch_size else sorted(encoded, key=lambda e: -len(e.input_ids))
        epoch = data.batches(encoded, batch_size, shuffle=True, seed=0, pad_id=pad_id)
        if len(epoch) < needed[seq]:
            epoch = (epoch * needed[seq])[: needed[seq]]
        batches[seq] = epoch[: needed[seq]]
        if seq == "e2e":  # the same examples, batched without length buckets (what a plain shuffled loader gives)
            same = [_example_of(b, row) for b in batches[seq] for row in range(len(b["input_ids"]))]
            batches["e2e-unbucketed"] = data.batches(
                same, batch_size, shuffle=True, seed=0, bucket_by_length=False, pad_id=pad_id
            )
            stats["e2e-measured"] = {
                "padding_bucketed": _padding(batches[seq]),
                "padding_unbucketed": _padding(batches["e2e-unbucketed"]),
            }
        plain = data.batches(encoded, batch_size, shuffle=True, seed=0, bucket_by_length=False, pad_id=pad_id)
        stats[seq] = {
            "examples": len(encoded),
            "mean_tokens": round(sum(len(e.input_ids) for e in encoded) / len(encoded), 1),
            "mean_target_tokens": round(sum(len(e.input_ids) - e.prompt_length for e in encoded) / len(encoded), 1),
            "padding_bucketed": _padding(epoch),
            "padding_unbucketed": _padding(plain),
            "batch": [batch_size, max_length],
        }
        if seq == "e2e":
            prompts, _ = data.encode_prompts(examples[: max(args.gen_batches)], tokenizer)
    path = workdir / "inputs.pt"
    torch.save({"batches": batches, "prompts": prompts, "pad_id": pad_id}, path)
    return {"path": str(path), "stats": stats}


def _example_of(batch: dict[str, Any], row: int) -> Any:
    from prefixtune.data import IGNORE_INDEX, EncodedExample

    n = int(batch["attention_mask"][row].sum())
    labels = batch["labels"][row, :n].tolist()
    prompt = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), n)
    return EncodedExample(batch["input_ids"][row, :n].tolist(), labels, prompt, row)


def _padding(batches: list[dict[str, Any]]) -> float:
    cells = sum(b["attention_mask"].numel() for b in batches)
    return round(1 - sum(int(b["attention_mask"].sum()) for b in batches) / cells, 4)


def tiny_model_dir(workdir: Path) -> Path:
    """--quick: a tiny random Llama and a tiny byte-level tokenizer saved as a model directory."""
    import torch
    import transformers as tf

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_tokenizer import make_tokenizer

    tokenizer = make_tokenizer(vocab_size=300)
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    directory = workdir / "tiny-llama"
    tf.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    from prefixtune import sources

    kind, where = sources.resolve(model)
    directory = sources.prepare_alias(str(where)) if kind == "alias" else where
    if kind == "gguf":
        return sources.load_model(model)[1]
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ----- workers (each in its own process) --------------------------------------------------------------------------


def _maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _load_model(name: str) -> Any:
    import torch

    from prefixtune.sources import load_model

    model = load_model(name)[0]
    with torch.no_grad():  # weights may be mmapped and paged in lazily: touch them so they count before training
        for p in model.parameters():
            p.detach().sum()
    return model


def model_dims(model: Any) -> dict[str, int]:
    from torch import nn

    from prefixtune.methods.blocks import find_blocks

    blocks = find_blocks(model)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {
        "n_lin": sum(m.weight.numel() for m in blocks.layers.modules() if isinstance(m, nn.Linear)),
        "n_head": model.get_output_embeddings().weight.numel(),
        "layers": len(blocks.layers),
        "attn_width": heads * head_dim,
        "params": sum(p.numel() for p in model.parameters()),
    }


def step_flops(batch: dict[str, Any], dims: dict[str, int], full: bool, prompt_tokens: int, prefix_tokens: int) -> int:
    """Model FLOPs of one training step on `batch` (the formula in the module docstring)."""
    lengths = [int(n) + prompt_tokens for n in batch["attention_mask"].sum(dim=1).tolist()]
    tokens = sum(lengths)
    head_positions = int((batch["labels"][:, 1:] != -100).sum())
    pairs = sum(n * (n + 1) // 2 + n * prefix_tokens for n in lengths)
    attention = 4 * dims["layers"] * dims["attn_width"] * pairs
    matmuls = 2 * dims["n_lin"] * tokens + 2 * dims["n_head"] * head_positions
    return (3 if full else 2) * matmuls + 3 * attention


def _build(spec: dict[str, Any], base: Any) -> tuple[Any, Any]:
    """(model, loss function of a batch) for one configuration."""
    import peft

    from prefixtune.efficiency import enable_gradient_checkpointing
    from prefixtune.loss import causal_lm_loss
    from prefixtune.methods.registry import build_method

    method, p = spec["method"], spec["virtual_tokens"]
    if spec["impl"] == "ours":
        options = {
            "prefix": {"num_virtual_tokens": p, "init": "random"},
            "prompt": {"num_virtual_tokens": p, "init": "random"},
        }.get(method, {})
        model = build_method(method, base, options)
        if spec["gc"]:
            enable_gradient_checkpointing(model)
        return model, lambda batch: causal_lm_loss(model, batch, target_only=spec["target_only"])
    if spec["impl"] == "hf":
        base.requires_grad_(True)
        return base, lambda batch: base(**batch).loss
    config = {
        "prefix": lambda: peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=p, prefix_projection=True, encoder_hidden_size=512
        ),
        "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p),
        "lora": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=32, lora_dropout=0.1),
    }[method]()
    model = peft.get_peft_model(base, config)
    return model, lambda batch: model(**batch).loss


def train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    # This process's own ceiling, just before its steps (before the model loads, so that the matrices do not
    # raise the RSS high-water mark): load on a shared machine drifts, so the fraction compares like with like.
    ceiling = matmul_rate(spec["ceiling_sizes"], 2, spec["ceiling_seconds"])
    torch.manual_seed(0)
    inputs = torch.load(spec["inputs"], weights_only=True)
    which = spec["seq"] + ("-unbucketed" if spec["unbucketed"] else "")
    batches = inputs["batches"][which][: spec["warmup"] + spec["steps"]]
    base = _load_model(spec["model"])
    loaded = _maxrss_mb()
    dims = model_dims(base)
    model, loss_of = _build(spec, base)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    result: dict[str, Any] = {"trainable_params": sum(p.numel() for p in params)}

    def autocast() -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["bf16"])

    if spec["bf16"]:  # accuracy: the same weights and batch in float32 and under bfloat16 autocast
        with torch.no_grad():
            full = float(loss_of(batches[0]))
            with autocast():
                half = float(loss_of(batches[0]))
        result["loss_fp32"], result["loss_bf16"] = round(full, 5), round(half, 5)
        result["loss_rel_diff"] = round(abs(half - full) / abs(full), 5)
    times, cpu_times, tokens, flops, losses = [], [], 0, 0, []
    prompt_tokens = spec["virtual_tokens"] if spec["method"] == "prompt" else 0
    prefix_tokens = spec["virtual_tokens"] if spec["method"] == "prefix" else 0
    for i, batch in enumerate(batches):
        start, cpu_start = time.perf_counter(), time.process_time()
        with autocast():
            loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        losses.append(round(float(loss.detach()), 4))
        if i >= spec["warmup"]:
            times.append(seconds)
            cpu_times.append(cpu_seconds)
            tokens += int(batch["attention_mask"].sum())
            flops += step_flops(batch, dims, spec["method"] == "full", prompt_tokens, prefix_tokens)
    total, cpu_total = sum(times), sum(cpu_times)
    result.update(
        tokens_per_s=round(tokens / total, 1),
        flops_per_s=flops / total,
        tokens_per_cpu_s=round(tokens / cpu_total, 1),
        flops_per_cpu_s=flops / cpu_total,
        ceiling_flops_per_s=ceiling[0],
        ceiling_flops_per_cpu_s=ceiling[1],
        ceiling_fraction=round(flops / total / ceiling[0], 4),
        ceiling_fraction_cpu=round(flops / cpu_total / ceiling[1], 4),
        step_seconds=[round(t, 3) for t in times],
        step_cpu_seconds=[round(t, 3) for t in cpu_times],
        losses=losses,
        rss_loaded_mb=loaded,
        peak_rss_mb=_maxrss_mb(),
        dims=dims,
    )
    result["above_loaded_mb"] = round(result["peak_rss_mb"] - loaded, 1)
    return result


def pair_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Our prefix and PEFT's trained in one process on the same batches, one step each in alternation (who goes
    first alternates too). Per batch, PEFT's step time over ours is our speedup on that batch; the median over
    batches is robust to the load drifting on a shared machine, which comparing separate processes is not."""
    import torch

    torch.set_num_threads(spec["threads"])
    inputs = torch.load(spec["inputs"], weights_only=True)
    batches = inputs["batches"][spec["seq"]]
    sides = {}
    for impl in ("ours", "peft"):
        torch.manual_seed(0)
        model, loss_of = _build({**spec, "impl": impl, "gc": False, "target_only": True}, _load_model(spec["model"]))
        params = [p for p in model.parameters() if p.requires_grad]
        sides[impl] = (model.train(), loss_of, params, torch.optim.AdamW(params, lr=1e-5))

    def step(impl: str, batch: dict[str, Any]) -> tuple[float, float]:
        _, loss_of, params, optimizer = sides[impl]
        start, cpu_start = time.perf_counter(), time.process_time()
        loss_of(batch).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu_start

    for impl in sides:
        step(impl, batches[0])  # warm up
    wall, cpu = [], []
    for i in range(spec["pair_steps"]):
        batch = batches[i % len(batches)]
        order = ["ours", "peft"] if i % 2 == 0 else ["peft", "ours"]
        times = {impl: step(impl, batch) for impl in order}
        wall.append(times["peft"][0] / times["ours"][0])
        cpu.append(times["peft"][1] / times["ours"][1])
    return {
        "steps": spec["pair_steps"],
        "ours_over_peft": round(statistics.median(wall), 3),
        "ours_over_peft_cpu": round(statistics.median(cpu), 3),
        "per_step": [round(x, 3) for x in wall],
        "per_step_cpu": [round(x, 3) for x in cpu],
    }


def matmul_rate(sizes: list[int], trials: int, seconds: float, dtype: Any = None) -> tuple[float, float]:
    """Best square-matmul FLOP/s over `sizes`: (per wall-clock second, per CPU-second of this process)."""
    import torch

    best, best_cpu = 0.0, 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        for _ in range(trials):
            count, start, cpu_start = 0, time.perf_counter(), time.process_time()
            while True:
                a @ b
                count += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds:
                    break
            best = max(best, 2 * n**3 * count / elapsed)
            best_cpu = max(best_cpu, 2 * n**3 * count / max(time.process_time() - cpu_start, 1e-9))
    return best, best_cpu


def ceiling_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Best matmul FLOP/s on this many threads (float32, and bfloat16 for reference at one small size: CPUs
    without native bf16 run it ~100x slower)."""
    import torch

    torch.set_num_threads(spec["threads"])
    fp32 = matmul_rate(spec["sizes"], spec["trials"], spec["seconds"], torch.float32)
    bf16 = matmul_rate(spec["sizes"][:1], spec["trials"], spec["seconds"], torch.bfloat16)
    return {"float32": fp32[0], "float32_per_cpu_s": fp32[1], "bfloat16": bf16[0], "bfloat16_per_cpu_s": bf16[1]}


def generate_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy tokens/s of the bare model, our prefix and PEFT's prefix, interleaved, at each batch size."""
    import peft
    import torch

    import prefixtune
    from prefixtune import data

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    inputs = torch.load(spec["inputs"], weights_only=True)
    p = spec["virtual_tokens"]
    bare = _load_model(spec["model"]).eval()
    ours = prefixtune.attach(_load_model(spec["model"]), prefixtune.PrefixConfig(num_virtual_tokens=p, init="random"))
    ours.eval()
    theirs = peft.get_peft_model(
        _load_model(spec["model"]), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p)
    ).eval()
    models = {"bare": bare, "ours": ours, "peft": theirs}
    out: dict[str, Any] = {}
    for size in spec["batch_sizes"]:
        prompts = inputs["prompts"][:size]
        _, batch = data.prompt_batches(prompts, size, pad_id=inputs["pad_id"], bucket_by_length=False)[0]
        kwargs = dict(
            **batch,
            max_new_tokens=spec["new_tokens"],
            min_new_tokens=spec["new_tokens"],
            do_sample=False,
            pad_token_id=inputs["pad_id"],
        )
        new_tokens = size * spec["new_tokens"]
        rates: dict[str, list[float]] = {name: [] for name in models}
        cpu_rates: dict[str, list[float]] = {name: [] for name in models}
        order = list(models)
        with torch.no_grad():
            for model in models.values():
                model.generate(**{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm up
            for r in range(spec["repeats"]):
                for name in order[r % 3 :] + order[: r % 3]:  # rotate who goes first
                    start, cpu_start = time.perf_counter(), time.process_time()
                    models[name].generate(**kwargs)
                    rates[name].append(new_tokens / (time.perf_counter() - start))
                    cpu_rates[name].append(new_tokens / max(time.process_time() - cpu_start, 1e-9))
        out[f"b{size}"] = {name: round(statistics.median(v), 2) for name, v in rates.items()}
        out[f"b{size}_cpu"] = {name: round(statistics.median(v), 2) for name, v in cpu_rates.items()}
        out[f"b{size}_all"] = {name: [round(x, 2) for x in v] for name, v in rates.items()}
    return out


WORKERS = {"train": train_worker, "ceiling": ceiling_worker, "generate": generate_worker, "pair": pair_worker}


def run_worker(kind: str, spec: dict[str, Any], workdir: Path, fork: bool) -> dict[str, Any]:
    """Run one worker in its own process (fresh interpreter, or a fork of this one); its JSON result."""
    out = workdir / f"result-{time.time_ns()}.json"
    spec = {**spec, "kind": kind, "out": str(out)}
    if fork:
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 0
            try:
                out.write_text(json.dumps(WORKERS[kind](spec)))
            except BaseException:
                out.write_text(json.dumps({"error": traceback.format_exc()}))
                code = 1
            finally:
                os._exit(code)
        os.waitpid(pid, 0)
    else:
        path = workdir / f"spec-{time.time_ns()}.json"
        path.write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
        done = subprocess.run([sys.executable, "-m", "bench", "worker", str(path)], cwd=ROOT, env=env)
        if done.returncode and not out.exists():
            return {"error": f"worker exited with {done.returncode}"}
    return json.loads(out.read_text())


def worker_main(path: str) -> int:
    spec = json.loads(Path(path).read_text())
    try:
        result = WORKERS[spec["kind"]](spec)
    except BaseException:
        result = {"error": traceback.format_exc()}
    Path(spec["out"]).write_text(json.dumps(result))
    return 1 if "error" in result else 0


# ----- the run ----------------------------------------------------------------------------------------------------


def machine(threads: int) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    cpu = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass

    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_src": [line[3:] for line in git("status", "--porcelain", "src").splitlines()],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def _median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[-1].get("error", "failed")}
    out = dict(good[len(good) // 2])
    for key in MEDIANS:
        out[key] = statistics.median(r[key] for r in good)
    out["runs"] = [{k: r[k] for k in ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mb")} for r in good]
    return out


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
    sizes = [k for k in gen if re.fullmatch(r"b\d+", k)]
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
        for size in (k for k in gen if re.fullmatch(r"b\d+", k)):
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


def run_all(args: argparse.Namespace) -> dict[str, Any]:
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
        result["train"] = {name: _median_runs(r) for name, r in runs.items()}
        if "error" in result.get("generate", {}):
            print(result["generate"]["error"], file=sys.stderr)
            result.pop("generate")
        result["ratios"], result["targets"] = compute_ratios(result)
        result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
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
        from prefixtune.artifact import atomic_write_bytes  # here: torch must not be imported before the env above

        atomic_write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())
    failed = [name for name, row in result["train"].items() if "error" in row]
    return 1 if failed else 0
