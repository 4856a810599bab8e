"""What bench/gpu.py's sections share: the model shapes (real configs, written out), building a random model,
our prefix and PEFT's, batches, one timed training step or generation, the matmul ceiling, the machine's facts."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from contextlib import contextmanager
from typing import Any

import torch
import transformers as tf

import prefixtune

# The models' published configs (the fields that shape the compute), as dicts: nothing is downloaded.
SHAPES: dict[str, tuple[type, dict[str, Any]]] = {
    "smollm2-135m": (
        tf.LlamaConfig,
        dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
        ),
    ),
    "qwen3-0.6b": (
        tf.Qwen3Config,
        dict(
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=40960,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
        ),
    ),
    "llama-3.2-1b": (
        tf.LlamaConfig,
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            rope_scaling=dict(
                rope_type="llama3",
                factor=32.0,
                high_freq_factor=4.0,
                low_freq_factor=1.0,
                original_max_position_embeddings=8192,
            ),
        ),
    ),
    "tiny": (
        tf.LlamaConfig,
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        ),
    ),
}
VIRTUAL_TOKENS = 20


def build(shape: str, dtype: torch.dtype, device: str) -> Any:
    config_class, fields = SHAPES[shape]
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialized where it runs, in its dtype: a 1B model in seconds
            model = tf.AutoModelForCausalLM.from_config(config_class(**fields), attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = 0
    return model.eval()


def ours(model: Any, adapters: int = 1, reparameterize: bool = True) -> Any:
    config = prefixtune.PrefixConfig(num_virtual_tokens=VIRTUAL_TOKENS, init="random", reparameterize=reparameterize)
    pm = prefixtune.attach(model, config, name="a0")
    for i in range(1, adapters):
        pm.add_adapter(f"a{i}", config)
    return pm


def peft_prefix(model: Any) -> Any:
    import peft  # deferred: only the train section needs it

    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS, prefix_projection=True, encoder_hidden_size=512
    )
    return peft.get_peft_model(model, config)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def peak_memory(out: dict[str, Any], device: str) -> Any:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    yield
    if device.startswith("cuda"):
        out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def batches(count: int, rows: int, length: int, vocab: int, device: str) -> list[dict[str, torch.Tensor]]:
    """Random token batches; the first 55% of each row is prompt (labels -100), the rest target (E2E: 25 of 56)."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (rows, length), generator=generator)
        labels = ids.clone()
        labels[:, : int(length * 0.55)] = -100
        out.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": torch.ones_like(ids).to(device),
                "labels": labels.to(device),
            }
        )
    return out


def train_step(model: Any, optimizer: Any, loss_fn: Any, batch: dict[str, torch.Tensor], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    loss = loss_fn(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def matmul_ceiling(dtype: torch.dtype, device: str, n: int) -> float:
    return matmul_rates([dtype], device, n, n, n)[dtype]


def matmul_rates(dtypes: list[torch.dtype], device: str, m: int, k: int, n: int) -> dict[torch.dtype, float]:
    """FLOP/s of x[m, k] @ w[n, k].T (a linear layer's forward) per dtype: the best of three 0.3 s windows, the
    dtypes' windows alternating so that a load on the machine hits them alike."""
    operands = {}
    for dtype in dtypes:
        operands[dtype] = (
            torch.randn(m, k, dtype=dtype, device=device),
            torch.randn(n, k, dtype=dtype, device=device).t(),
        )
        operands[dtype][0] @ operands[dtype][1]
    sync(device)
    best = dict.fromkeys(dtypes, 0.0)
    for _ in range(3):
        for dtype, (a, b) in operands.items():
            start, count = time.perf_counter(), 0
            while time.perf_counter() - start < 0.3:
                a @ b
                count += 1
                if count % 8 == 0:
                    sync(device)
            sync(device)
            best[dtype] = max(best[dtype], 2 * m * k * n * count / (time.perf_counter() - start))
    return best


def timed_generate(model: Any, ids: torch.Tensor, new: int, device: str, **kwargs: Any) -> float:
    sync(device)
    start = time.perf_counter()
    model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        **kwargs,
    )
    sync(device)
    return time.perf_counter() - start


def machine(device: str) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf.__version__,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        lscpu = []
    for line in lscpu:
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "Flags"):
            facts["cpu" if key.strip() == "Model name" else "cpu_flags"] = value.strip()
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["cuda"] = torch.version.cuda
    return facts
