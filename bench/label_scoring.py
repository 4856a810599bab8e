"""Label-word classification scoring: each prompt read once (the shared cache) vs every candidate from scratch.

    PREFIXTUNE_DATA_DIR=../shared/data python bench/label_scoring.py [--examples 24] [--threads 1] [--out F.json]
    python bench/label_scoring.py --quick        # a tiny random Llama and made-up reviews (seconds; the suite)

A decoder classifies by label words: `eval.likelihood.label_loglikelihoods` scores each label's tokens (plus EOS)
after the prompt. Both sides run the same model on the same MultiEmo test examples (the first N of the built-in
test split, four labels) in the same process, alternating, and return the same (N, 4) log-likelihoods:
- "shared": the default for a causal LM: the prompt runs once per example into a KV cache, repeated per label,
  and only each label's few tokens run per candidate;
- "per_candidate": `shared_prompt=False`, four full (prompt + label) sequences per example (what scoring did
  before; still what a soft prompt gets).
JSON out: seconds per example for each side, their ratio, the largest log-likelihood difference and whether the
predicted labels agree, and the machine (lscpu flags included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from prefixtune import data
from prefixtune.atomic import atomic_write_bytes
from prefixtune.eval.likelihood import continues_cache, label_loglikelihoods

LABELS = ["positive", "negative", "neutral", "ambivalent"]


def cpu_flags() -> list[str]:
    """The lscpu flags that decide float32/bfloat16 speed here."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("Flags:")), [])
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))


def quick_setup() -> tuple[Any, Any, list[data.Example]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import tiny
    from tiny_tokenizer import make_tokenizer

    tokenizer = make_tokenizer()
    model = tiny("llama-gqa")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    words = "the food was good but the service slow and the room small".split()
    examples = [data.Example(" ".join(words[i % 5 :] * (1 + i % 3)), LABELS[i % 4]) for i in range(8)]
    return model, tokenizer, examples


def real_setup(model_name: str, count: int) -> tuple[Any, Any, list[data.Example]]:
    from prefixtune.models import load_model

    model, tokenizer = load_model(model_name)
    return model.eval(), tokenizer, data.load_dataset("multiemo", split="test")[:count]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--examples", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="alternating timed rounds per side (the best is kept)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a tiny random model and made-up examples")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer, examples = quick_setup() if args.quick else real_setup(args.model, args.examples)
    settings = dict(max_length=args.max_length, batch_size=args.batch_size)
    seconds: dict[str, list[float]] = {"shared": [], "per_candidate": []}
    scores: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for side, shared in (("shared", True), ("per_candidate", False)):
            start = time.perf_counter()
            scores[side] = label_loglikelihoods(model, tokenizer, examples, LABELS, shared_prompt=shared, **settings)
            seconds[side].append(time.perf_counter() - start)
    best = {side: min(values) for side, values in seconds.items()}
    agree = scores["shared"].argmax(-1).eq(scores["per_candidate"].argmax(-1))
    result = {
        "bench": "label_scoring",
        "model": "tiny random llama-gqa" if args.quick else args.model,
        "examples": len(examples),
        "labels": len(LABELS),
        "settings": settings | {"threads": args.threads, "repeats": args.repeats},
        "shared_is_default": bool(continues_cache(model)),
        "seconds_per_example": {side: round(s / len(examples), 4) for side, s in best.items()},
        "per_candidate_over_shared": round(best["per_candidate"] / best["shared"], 3),
        "max_abs_loglik_difference": float((scores["shared"] - scores["per_candidate"]).abs().max()),
        "predictions_agree": f"{int(agree.sum())}/{len(examples)}",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_flags": cpu_flags(),
            "cores": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__,
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write_bytes(args.out, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
