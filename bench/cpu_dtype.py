"""Which dtype the CPU default should be: one prefix-training forward+backward of a mid-size random Llama with
float32 weights and with bfloat16 weights (the prefix float32 in both), on this CPU. Prints JSON with the
`lscpu` bfloat16 flags, so the figure says which kind of CPU it came from.

    python bench/cpu_dtype.py [--threads 1] [--steps 3]

Decides `devices.resolve_dtype`'s CPU default (docs/performance.md). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import time

import torch
import transformers as tf

import prefixtune
from prefixtune.devices import cpu_has_native_bf16


def _flags() -> list[str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return []
    return sorted(set(re.findall(r"avx512_bf16|amx_bf16|avx2", text)))


def _step_seconds(dtype: torch.dtype, steps: int, batch: int, seq: int) -> tuple[float, float]:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=8192, hidden_size=576, intermediate_size=1536, num_hidden_layers=6,
                            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512)  # fmt: skip
    model = tf.LlamaForCausalLM(config).to(dtype).eval()
    pm = prefixtune.attach(model, prefixtune.PrefixConfig(num_virtual_tokens=10, projection_dim=64, init="random"))
    pm.train()
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    times, loss = [], 0.0
    for _ in range(steps + 1):  # the first step warms up
        started = time.perf_counter()
        out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
        times.append(time.perf_counter() - started)
        loss = float(out.loss.detach())
        pm.zero_grad()
    return min(times[1:]), loss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fp32, loss32 = _step_seconds(torch.float32, args.steps, args.batch, args.seq)
    bf16, loss16 = _step_seconds(torch.bfloat16, args.steps, args.batch, args.seq)
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name:")),
        platform.processor())  # fmt: skip
    result = {
        "cpu": cpu,
        "lscpu_flags": _flags(),
        "native_bf16": cpu_has_native_bf16(),
        "threads": args.threads,
        "shape": f"Llama 6 layers, hidden 576, 9/3 KV heads, vocab 8192; batch {args.batch} x {args.seq} tokens; P=10",
        "torch": torch.__version__,
        "float32_step_s": round(fp32, 3),
        "bfloat16_step_s": round(bf16, 3),
        "bfloat16_slowdown": round(bf16 / fp32, 1),
        "loss_float32": round(loss32, 4),
        "loss_bfloat16": round(loss16, 4),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
