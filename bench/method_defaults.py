"""Each method at its default learning rate for a short, equal budget on E2E: does its loss move? (JSON out)

    python bench/method_defaults.py --model DIR [--steps 40] [--batch-size 8] [--methods prefix,lora]

DIR is a local transformers model directory (e.g. the cached `smollm2-135m` copy). A plain AdamW loop with the
method's `METHODS[name].default_lr` and no schedule; the same examples in the same order for every method.
Reports the mean training loss of the first and last five steps and held-out loss before and after.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixtune.methods.registry import METHODS, build_method, parameter_counts

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e_nlg.json"


def encode(tokenizer, records: list[dict], max_len: int = 96) -> dict[str, torch.Tensor]:
    """Source tokens masked from the loss, EOS after the target, right padding."""
    rows = []
    for r in records:
        source = tokenizer(r["input"] + "\n", add_special_tokens=False)["input_ids"]
        target = tokenizer(" " + r["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (source + target)[:max_len]
        rows.append((ids, ([-100] * len(source) + target)[:max_len]))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--verbose", action="store_true", help="print each step's loss to stderr")
    args = parser.parse_args()
    records = json.loads(DATA.read_text())["examples"]
    random.Random(0).shuffle(records)
    held_out, train = records[:32], records[32:]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    batches = [encode(tokenizer, train[i * args.batch_size : (i + 1) * args.batch_size]) for i in range(args.steps)]
    held = encode(tokenizer, held_out)
    results = {}
    for name in args.methods.split(","):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
        model = build_method(name, base, {}, tokenizer)
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=METHODS[name].default_lr)
        model.eval()
        with torch.no_grad():
            before = model(**held).loss.item()
        losses, start = [], time.perf_counter()
        model.train()
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(round(loss.item(), 4))
            if args.verbose:
                print(name, len(losses), losses[-1], round(time.perf_counter() - start, 1), file=sys.stderr, flush=True)
        seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            after = model(**held).loss.item()
        trainable, total = parameter_counts(model)
        results[name] = {
            "lr": METHODS[name].default_lr,
            "trainable": trainable,
            "trainable_pct": round(100 * trainable / total, 4),
            "train_loss_first5": round(sum(losses[:5]) / 5, 4),
            "train_loss_last5": round(sum(losses[-5:]) / 5, 4),
            "heldout_loss_before": round(before, 4),
            "heldout_loss_after": round(after, 4),
            "seconds": round(seconds, 1),
        }
        print(json.dumps({name: results[name]}), flush=True)
    print(json.dumps({"steps": args.steps, "batch_size": args.batch_size, "results": results}, indent=2))


if __name__ == "__main__":
    main()
