"""Training in the performance suite (bench/perf.py): the configurations (ours, PEFT's, transformers' own), their
FLOPs per step, and the two worker processes that time them: one configuration per process (`train`), and our
prefix against PEFT's in one process (`pair`).

torch, peft and prefixtune are imported inside the functions, on purpose: bench/perf.py's main() sets
OMP_WAIT_POLICY before torch is first imported (the workers inherit it), and `python -m bench --help` stays fast.
"""

from __future__ import annotations

import re
import statistics
import time
from typing import Any

from bench.perf_common import PEFT_METHODS, SEQS, load_resident_model, matmul_rate, peak_rss_mb

# ----- configurations ---------------------------------------------------------------------------------------------


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


def model_and_loss(spec: dict[str, Any], base: Any) -> tuple[Any, Any]:
    """(model, loss function of a batch) for one configuration."""
    import peft

    from prefixtune.efficiency import enable_gradient_checkpointing
    from prefixtune.eval import causal_lm_loss
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


# ----- FLOPs ------------------------------------------------------------------------------------------------------


def model_dims(model: Any) -> dict[str, int]:
    """The sizes that the FLOP count needs (N_lin, N_head, layers, heads * head_dim) and the parameter count."""
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
    """Model FLOPs of one training step on `batch` (the formula in bench/perf.py's module docstring)."""
    lengths = [int(n) + prompt_tokens for n in batch["attention_mask"].sum(dim=1).tolist()]
    tokens = sum(lengths)
    head_positions = int((batch["labels"][:, 1:] != -100).sum())
    pairs = sum(n * (n + 1) // 2 + n * prefix_tokens for n in lengths)
    attention = 4 * dims["layers"] * dims["attn_width"] * pairs
    matmuls = 2 * dims["n_lin"] * tokens + 2 * dims["n_head"] * head_positions
    return (3 if full else 2) * matmuls + 3 * attention


# ----- the workers ------------------------------------------------------------------------------------------------


def timed_step(
    loss_of: Any, params: list[Any], optimizer: Any, batch: dict[str, Any], bf16: bool = False
) -> tuple[Any, float, float]:
    """One training step: forward and loss (under bfloat16 autocast if `bf16`), backward, gradient clipping at 1.0,
    the optimizer's update. Returns (the loss, wall-clock seconds, CPU seconds of this process)."""
    import torch

    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_of(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, time.perf_counter() - start, time.process_time() - cpu_start


def train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration: its tokens/s, FLOP/s against this process's own matmul ceiling, and its peak RSS."""
    import torch

    torch.set_num_threads(spec["threads"])
    # This process's own ceiling, just before its steps (before the model loads, so that the matrices do not
    # raise the RSS high-water mark): load on a shared machine drifts, so the fraction compares like with like.
    ceiling = matmul_rate(spec["ceiling_sizes"], 2, spec["ceiling_seconds"])
    torch.manual_seed(0)
    inputs = torch.load(spec["inputs"], weights_only=True)
    which = spec["seq"] + ("-unbucketed" if spec["unbucketed"] else "")
    batches = inputs["batches"][which][: spec["warmup"] + spec["steps"]]
    base = load_resident_model(spec["model"])
    loaded = peak_rss_mb()
    dims = model_dims(base)
    model, loss_of = model_and_loss(spec, base)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    result: dict[str, Any] = {"trainable_params": sum(p.numel() for p in params)}
    if spec["bf16"]:  # accuracy: the same weights and batch in float32 and under bfloat16 autocast
        with torch.no_grad():
            full = float(loss_of(batches[0]))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = float(loss_of(batches[0]))
        result["loss_fp32"], result["loss_bf16"] = round(full, 5), round(half, 5)
        result["loss_rel_diff"] = round(abs(half - full) / abs(full), 5)
    times, cpu_times, tokens, flops, losses = [], [], 0, 0, []
    prompt_tokens = spec["virtual_tokens"] if spec["method"] == "prompt" else 0
    prefix_tokens = spec["virtual_tokens"] if spec["method"] == "prefix" else 0
    for i, batch in enumerate(batches):
        loss, seconds, cpu_seconds = timed_step(loss_of, params, optimizer, batch, bf16=spec["bf16"])
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
        peak_rss_mb=peak_rss_mb(),
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
        side = {**spec, "impl": impl, "gc": False, "target_only": True}
        model, loss_of = model_and_loss(side, load_resident_model(spec["model"]))
        params = [p for p in model.parameters() if p.requires_grad]
        sides[impl] = (model.train(), loss_of, params, torch.optim.AdamW(params, lr=1e-5))

    def step(impl: str, batch: dict[str, Any]) -> tuple[float, float]:
        _, loss_of, params, optimizer = sides[impl]
        _, seconds, cpu_seconds = timed_step(loss_of, params, optimizer, batch)
        return seconds, cpu_seconds

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
