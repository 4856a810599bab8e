"""E2E quality of our prefix (Li & Liang's recipe) vs PEFT's prefix-tuning with its defaults, equal steps (issue 3).

    python bench/quality_vs_peft.py [--model smollm2-135m] [--eval-at 80,240] [--lr 3e-3] [--peft-lr 3e-3]
        [--eval-limit N] [--threads 2] [--json out.json]

One training loop for both sides, so the only difference is the prefix: the same model, the same E2E training
batches in the same order, AdamW with the same learning rate, warmup and linear decay over the longest run,
gradient clipping at 1.0, the full-logits loss. The untuned model and every (side, step) in --eval-at are scored
with the same `prefixtune.eval` (greedy, first line, BLEU with all references, ROUGE-L) on the held-out test
inputs. Ours: PrefixConfig(num_virtual_tokens=10, init_text=the demo's) with the default MLP reparameterization.
PEFT: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10) and nothing else (prefix_projection=False,
random init). The issue's targets (ours >= PEFT + 5 BLEU at equal steps, ours >= 50 BLEU) are reported, not
asserted. Not a test: it takes tens of minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch

from prefixtune import PrefixConfig, attach, data
from prefixtune.atomic import atomic_write_bytes
from prefixtune.demo import DEMO_OPTIONS
from prefixtune.eval import causal_lm_loss, evaluate
from prefixtune.models import load_model

BATCH, WARMUP, CLIP, SEED, P = 8, 20, 1.0, 0, 10


def _schedule(total: int):
    def factor(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / (WARMUP + 1)
        return max(0.0, 1.0 - (step - WARMUP) / max(1, total - WARMUP))

    return factor


def _score(model, tokenizer, test, label: str) -> dict:
    started = time.perf_counter()
    scores, predictions = evaluate(model, tokenizer, test, metric_names=["bleu", "rouge"], progress=True)
    print(f"{label}: BLEU {scores['bleu']:.2f} ROUGE-L {scores['rougeL']:.2f}", file=sys.stderr)
    return {**scores, "eval_seconds": round(time.perf_counter() - started, 1), "sample": predictions[:3]}


def run_side(side: str, args, batches, test) -> dict:
    base, tokenizer = load_model(args.model)
    torch.manual_seed(SEED)
    if side == "ours":
        model = attach(base, PrefixConfig(**{"num_virtual_tokens": P, **DEMO_OPTIONS}), tokenizer=tokenizer)
        params, lr = model.trainable_parameters(), args.lr
    else:
        from peft import PrefixTuningConfig, get_peft_model

        model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
        params, lr = [p for p in model.parameters() if p.requires_grad], args.peft_lr
    total = max(args.eval_at)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total))
    out = {
        "lr": lr,
        "trainable_params": sum(p.numel() for p in params),
        "config": "PrefixConfig(num_virtual_tokens=10, init_text=demo, reparameterize=True)"
        if side == "ours"
        else "peft.PrefixTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=10)",
        "steps": {},
        "losses": [],
    }
    started = time.perf_counter()
    model.train()
    for step in range(1, total + 1):
        batch = batches[(step - 1) % len(batches)]
        loss = causal_lm_loss(model, batch, target_only=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        scheduler.step()
        out["losses"].append(round(loss.item(), 4))
        if step % 10 == 0:
            print(f"{side} step {step}/{total} loss {loss.item():.3f}", file=sys.stderr)
        if step in args.eval_at:
            model.eval()
            out["steps"][step] = {
                "train_seconds": round(time.perf_counter() - started, 1),
                **_score(model, tokenizer, test, f"{side} @ {step}"),
            }
            model.train()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--eval-at", default="80,240", help="steps at which both sides are scored")
    parser.add_argument("--lr", type=float, default=3e-3, help="our learning rate (the demo's)")
    parser.add_argument("--peft-lr", type=float, default=None, help="PEFT's learning rate (default: --lr)")
    parser.add_argument("--eval-limit", type=int, default=None, help="score only the first N test inputs")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sides", default="untuned,ours,peft")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    args.eval_at = sorted({int(s) for s in args.eval_at.split(",")})
    args.peft_lr = args.peft_lr or args.lr
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(SEED)
    _, tokenizer = load_model(args.model)
    train = data.training_pairs(data.load_dataset("e2e", split="train", data_dir=args.data_dir))
    test = data.load_dataset("e2e", split="test", data_dir=args.data_dir)[: args.eval_limit]
    encoded, _ = data.encode(train, tokenizer, max_length=256)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    needed = math.ceil(max(args.eval_at) * BATCH / len(encoded))
    batches = [b for epoch in range(needed) for b in data.batches(encoded, BATCH, shuffle=True, seed=epoch, pad_id=pad)]
    result: dict = {
        "bench": "quality_vs_peft",
        "model": args.model,
        "data": f"e2e: {len(train)} training pairs, {len(test)} held-out test inputs with all references",
        "batch_size": BATCH,
        "schedule": f"warmup {WARMUP}, linear decay to step {max(args.eval_at)}; clip {CLIP}",
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
    }
    sides = args.sides.split(",")
    if "untuned" in sides:
        base, _ = load_model(args.model)
        base.eval()
        result["untuned"] = _score(base, tokenizer, test, "untuned")
        del base
    for side in ("ours", "peft"):
        if side in sides:
            result[side] = run_side(side, args, batches, test)
    if "ours" in result and "peft" in result:
        result["targets"] = {}
        for step in args.eval_at:
            ours, peft = result["ours"]["steps"][step]["bleu"], result["peft"]["steps"][step]["bleu"]
            result["targets"][str(step)] = {
                "ours_bleu": ours,
                "peft_bleu": peft,
                "ours_minus_peft": round(ours - peft, 2),
                "ours_beats_peft_by_5": ours >= peft + 5,
                "ours_at_least_50": ours >= 50,
            }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        atomic_write_bytes(Path(args.json), (text + "\n").encode())


if __name__ == "__main__":
    main()
