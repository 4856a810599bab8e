"""Core engine vs PEFT's prefix-tuning, same model and batch, one run; prints JSON (issue 2's benchmark).

    python bench/core_vs_peft.py --model tiny            # seconds; a tiny random Llama
    python bench/core_vs_peft.py --model smollm2-135m    # the built-in model

Measures forward+backward tokens/s (prefix training step without the optimizer), and greedy generate
tokens/s with a prefix (ours, PEFT's) and without (the bare model). Each figure is the best of --repeats.
Ratios: ours/PEFT for training and generation, ours/bare for generation. Not a test: timings on a shared
machine are noisy, so read the ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def load(name: str):
    if name == "tiny":
        from tiny import tiny

        return tiny("llama-gqa")
    from prefixtune.models import load_model

    return load_model(name)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, or a prefixtune model name (smollm2-135m)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--virtual-tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import PrefixTuningConfig, get_peft_model

    import prefixtune

    torch.manual_seed(0)
    vocab = load(args.model).config.vocab_size
    ids = torch.randint(3, min(vocab, 5000), (args.batch_size, args.seq_len))
    mask = torch.ones_like(ids)
    tokens = ids.numel()
    gen_kwargs = dict(
        input_ids=ids[:, :16],
        attention_mask=mask[:, :16],
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    new_tokens = args.batch_size * args.new_tokens
    result: dict = {
        "model": args.model,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "threads": torch.get_num_threads(),
    }

    bare = load(args.model).eval()
    result["bare_generate_tok_s"] = new_tokens / best_of(args.repeats, lambda: bare.generate(**gen_kwargs))

    # ours: direct parameterization (what PEFT trains by default), same P
    ours = prefixtune.attach(
        load(args.model),
        prefixtune.PrefixConfig(num_virtual_tokens=args.virtual_tokens, reparameterize=False, init="random"),
    )

    def ours_step() -> None:
        ours.train()
        loss = ours(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        ours.zero_grad(set_to_none=True)

    ours_step()
    result["ours_train_tok_s"] = tokens / best_of(args.repeats, ours_step)
    ours.eval()
    result["ours_generate_tok_s"] = new_tokens / best_of(args.repeats, lambda: ours.generate(**gen_kwargs))

    peft_model = get_peft_model(
        load(args.model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.virtual_tokens)
    )

    def peft_step() -> None:
        peft_model.train()
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        peft_model.zero_grad(set_to_none=True)

    peft_step()
    result["peft_train_tok_s"] = tokens / best_of(args.repeats, peft_step)
    peft_model.eval()
    with torch.no_grad():
        result["peft_generate_tok_s"] = new_tokens / best_of(args.repeats, lambda: peft_model.generate(**gen_kwargs))

    result["train_ours_over_peft"] = result["ours_train_tok_s"] / result["peft_train_tok_s"]
    result["generate_ours_over_peft"] = result["ours_generate_tok_s"] / result["peft_generate_tok_s"]
    result["generate_ours_over_bare"] = result["ours_generate_tok_s"] / result["bare_generate_tok_s"]
    result = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        from prefixtune.atomic import atomic_write_bytes

        atomic_write_bytes(args.json, (text + "\n").encode())


if __name__ == "__main__":
    main()
