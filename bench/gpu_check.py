"""The GPU's side of the fast-path and resume tests (issue 16 items 3 and 5): what the CPU suite proves on CPU
kernels, measured on the device's own (SDPA's flash and memory-efficient kernels, cuBLAS, bf16).

    python bench/gpu_check.py --json check.json     # on a GPU: every tiny architecture, float32 and bf16
    python bench/gpu_check.py --quick               # on the CPU, one architecture (the test suite runs this)

Sections of the JSON:
- fast_paths: per architecture and dtype, the causal prefill with nothing masked (SDPA's lower-right causal form,
  no dense mask) against the dense widened mask: largest logit difference, and which SDPA kernels each path runs
  under when only one kernel is allowed (flash takes no mask: the dense path must fail there, the fast one
  should not); the prefix's gradient fast vs dense; `generate` (the prefix stored in the cache) against the
  path that concatenates it every step (tokens equal?) and against one full forward without a cache (largest
  logit difference), one adapter and a mixed, left-padded batch.
- attention_kernels: one prefixed attention call, forward + backward, timed: SDPA lower-right vs SDPA with the
  dense mask vs (on a GPU) flex_attention compiled with the same visibility.
- resume: `prefixtune train` on a tiny model (the device's default dtype), 8 steps straight against 8 steps cut by
  Ctrl-C at step 5 and resumed; with and without deterministic=true: adapter bytes equal? largest difference.
Numbers, not assertions: a benchmark-style report for docs/performance.md. Exit 1 if a check could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(ROOT / "tests")]  # prefixtune, bench, the tests' tiny models

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from bench.gpu_models import machine  # noqa: E402
from prefixtune import BASE, cli  # noqa: E402
from prefixtune.atomic import atomic_write_bytes  # noqa: E402
from tiny import ARCHITECTURES, attach_two, fast_paths_enabled, recomputed, tiny  # noqa: E402

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def fast_paths(arch: str, dtype: torch.dtype, device: str) -> dict[str, Any]:
    pm = attach_two(tiny(arch).to(device=device, dtype=dtype))
    vocab = pm.base_model.get_input_embeddings().num_embeddings
    ids = torch.randint(5, vocab, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    out: dict[str, Any] = {}
    with torch.no_grad():
        with fast_paths_enabled(True):
            fast = pm(input_ids=ids, adapter_names=["a", "a"]).logits
        with fast_paths_enabled(False):
            dense = pm(input_ids=ids, adapter_names=["a", "a"]).logits
        out["prefill_max_diff"] = _diff(fast, dense)
        out["logit_scale"] = float(dense.float().abs().max())
        kernels: dict[str, dict[str, str]] = {}
        for path, flag in (("fast", True), ("dense", False)):
            kernels[path] = {}
            for name, backend in KERNELS.items():
                try:
                    with fast_paths_enabled(flag), sdpa_kernel([backend]):
                        got = pm(input_ids=ids, adapter_names=["a", "a"]).logits
                    kernels[path][name] = f"ran, max diff to dense {_diff(got, dense):.3g}"
                except RuntimeError as e:
                    kernels[path][name] = "refused: " + str(e).splitlines()[0][:160]
        out["kernels"] = kernels
    grads = []
    for flag in (True, False):
        pm.zero_grad()
        with fast_paths_enabled(flag):
            pm(input_ids=ids, adapter_names=["a", "a"]).logits.float().square().mean().backward()
        grads.append(pm.adapters["a"].embedding.grad.clone())
    out["grad_max_rel_diff"] = _diff(grads[0], grads[1]) / max(float(grads[1].abs().max()), 1e-30)
    out["generate"] = {
        "one_adapter": _generate(pm, ids[:1, :8], None, ["a"]),
        "mixed_left_padded": _generate(pm, *_mixed(ids[:, :8]), ["a", "b", BASE]),
    }
    return out


def _mixed(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([ids, ids[:1]])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :3] = 0
    return ids, mask


def _generate(pm: Any, ids: torch.Tensor, mask: torch.Tensor | None, names: list[str]) -> dict[str, Any]:
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    stored = pm.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kwargs)
    with fast_paths_enabled(False):
        copied = pm.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kwargs)
    seq = stored.sequences
    with torch.no_grad():
        full = recomputed(pm, seq, mask, names)
    start = ids.shape[1]
    return {
        "tokens_equal_copy_path": bool(torch.equal(seq, copied.sequences)),
        "max_diff_to_copy_path": max(_diff(a, b) for a, b in zip(stored.logits, copied.logits)),
        "max_diff_to_recomputed": max(_diff(logit, full[:, start + i - 1]) for i, logit in enumerate(stored.logits)),
    }


def resume(work: Path, device: str, deterministic: bool, steps: int = 8, cut: int = 5) -> dict[str, Any]:
    from tiny_tokenizer import make_tokenizer

    model_dir, data = work / "model", work / "names.jsonl"
    if not model_dir.exists():
        tokenizer = make_tokenizer()
        model = tiny("llama-gqa")
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        names = ["Blue Spice", "Golden Curry", "Cat Park", "River Mat", "Dog Shop", "Coffee Area"]  # the tests' data
        rows = [{"input": f"name: {n}", "target": f"{n} is a coffee shop."} for n in names for _ in range(3)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tag = "det" if deterministic else "plain"

    def args(out: Path, *extra: str) -> list[str]:
        return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "4",
                "--quiet", "train_split=all", "warmup_steps=1", "log_every=1", "--max-steps", str(steps),
                "--lr", "1e-2", "--device", device, f"deterministic={str(deterministic).lower()}", *extra]  # fmt: skip

    straight, again, broken = work / f"straight-{tag}", work / f"again-{tag}", work / f"cut-{tag}"
    started = time.perf_counter()
    codes = [cli.main(args(straight)), cli.main(args(again))]
    seconds = time.perf_counter() - started
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def interrupting_step(self: Any, *a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == cut:  # Ctrl-C in the middle of this step: the run stops after it, with a checkpoint
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = interrupting_step  # type: ignore[method-assign]
    try:
        codes.append(cli.main(args(broken)))
    finally:
        torch.optim.AdamW.step = real_step  # type: ignore[method-assign]
    codes.append(cli.main(args(broken, "--resume")))
    a, b, c = (load_file(str(d / "adapter_model.safetensors")) for d in (straight, again, broken))
    return {
        "exit_codes": codes,  # 0, 0, 130 (interrupted), 0 (resumed)
        "two_straight_runs_bitwise": all(torch.equal(a[k], b[k]) for k in a),
        "two_straight_runs_max_diff": max(_diff(a[k], b[k]) for k in a),
        "resumed_bitwise": all(torch.equal(a[k], c[k]) for k in a),
        "resumed_max_diff": max(_diff(a[k], c[k]) for k in a),
        "adapter_max_abs": max(float(a[k].abs().max()) for k in a),
        "two_runs_seconds": round(seconds, 2),
    }


def attention_kernels(device: str, quick: bool) -> dict[str, Any]:
    """One attention call with a 20-column prefix, forward + backward, Llama-3.2-1B's heads at 8 x 1024 (bf16 on
    a GPU): SDPA with the lower-right causal form (what our fast path hands it), SDPA with the dense widened boolean
    mask (the general path), and, on a GPU, torch's flex_attention compiled with the same visibility as a block
    mask (issue 16 item 4: would a flex base be worth supporting?). Median milliseconds of timed repeats."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from bench.gpu_models import sync

    rows, heads, kv_heads, length, dim, prefix = (1, 4, 2, 64, 16, 4) if quick else (8, 32, 8, 1024, 64, 20)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)

    def tensor(h: int, n: int) -> torch.Tensor:
        return torch.randn(rows, h, n, dim, device=device, dtype=dtype, generator=g).requires_grad_()

    q, k, v = tensor(heads, length), tensor(kv_heads, prefix + length), tensor(kv_heads, prefix + length)
    group = heads // kv_heads
    dense = torch.ones(length, prefix + length, dtype=torch.bool, device=device).tril(prefix)
    bias = causal_lower_right(length, prefix + length)

    def sdpa(mask: Any) -> torch.Tensor:  # transformers repeats the KV heads when a mask is given
        return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), mask)

    calls: dict[str, Any] = {"sdpa_lower_right": lambda: sdpa(bias), "sdpa_dense_mask": lambda: sdpa(dense)}
    out: dict[str, Any] = {"shape": {"rows": rows, "heads": heads, "kv_heads": kv_heads, "length": length,
                                     "head_dim": dim, "prefix": prefix, "dtype": str(dtype)}}  # fmt: skip
    if device.startswith("cuda"):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def visible(b: Any, h: Any, i: Any, j: Any) -> Any:
            return j <= i + prefix

        block = create_block_mask(visible, None, None, length, prefix + length, device=device)
        compiled = torch.compile(flex_attention)
        calls["flex_attention"] = lambda: compiled(q, k, v, block_mask=block, enable_gqa=True)
        started = time.perf_counter()
        compiled(q, k, v, block_mask=block, enable_gqa=True).sum().backward()
        sync(device)
        out["flex_compile_s"] = round(time.perf_counter() - started, 2)
    else:
        out["flex_attention"] = "not run: no backward on a CPU"
    reference = calls["sdpa_dense_mask"]().float()
    for name, call in calls.items():
        out.setdefault("max_diff_to_dense", {})[name] = _diff(call(), reference)
        times = []
        for i in range(4 if quick else 12):
            sync(device)
            started = time.perf_counter()
            call().sum().backward()
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - started)
        out.setdefault("fwd_bwd_ms", {})[name] = round(1000 * sorted(times)[len(times) // 2], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CPU, one architecture, float32: seconds")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    archs = ["llama-gqa"] if args.quick else list(ARCHITECTURES)
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    result: dict[str, Any] = {"command": sys.argv, "machine": machine(device), "fast_paths": {}, "resume": {}}
    errors = 0

    def save() -> None:
        if args.json:
            atomic_write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())

    def attempt(where: dict[str, Any], key: str, run: Any) -> None:
        nonlocal errors
        try:
            where[key] = run()
        except Exception as e:  # noqa: BLE001 - reported; the exit status says a check could not run
            where[key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            errors += 1
        print(json.dumps({key: where[key]}), flush=True)
        save()

    for arch in archs:
        for dtype in dtypes:
            key = f"{arch}/{str(dtype).split('.')[-1]}"
            attempt(result["fast_paths"], key, lambda arch=arch, dtype=dtype: fast_paths(arch, dtype, device))
    with tempfile.TemporaryDirectory() as work:
        for deterministic in (False, True):
            key = "deterministic" if deterministic else "default"
            attempt(result["resume"], key, lambda d=deterministic: resume(Path(work), device, d))
    attempt(result, "attention_kernels", lambda: attention_kernels(device, args.quick))
    result["errors"] = errors
    save()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
