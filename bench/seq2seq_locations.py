"""Does each prefix location learn on its own? A frozen seq2seq model, one new task, one prefix per location.

    python bench/seq2seq_locations.py [--arch t5|bart] [--pretrain-steps 1000] [--tune-steps 400] [--prefix-len 8]
    python bench/seq2seq_locations.py --model facebook/bart-base     # a pretrained model instead (hub or dir)

No pretrained seq2seq weights reach this machine, so by default a tiny T5 (or BART) is trained from scratch on a
synthetic copy task (output = input sequence), then frozen. For each new task (reverse the sequence; shift
every token to the next one) a prefix is trained at each location alone (encoder self-attention, decoder
self-attention, cross-attention) and at all three, with the same budget. Reported per task and location:
held-out loss and token accuracy (teacher-forced) before and after, and trainable parameter counts. With
--model the pretraining is skipped and the tasks use a block of that model's ordinary token ids.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers as tf

import prefixtune
from prefixtune import PrefixConfig

TASKS: dict[str, Callable[[list[int], int, int], list[int]]] = {
    "copy": lambda seq, first, k: seq,
    "reverse": lambda seq, first, k: seq[::-1],
    "shift": lambda seq, first, k: [first + (t - first + 1) % k for t in seq],
}
LOCATIONS = [("encoder",), ("decoder",), ("cross",), ("encoder", "decoder", "cross")]


def tiny_model(arch: str) -> tf.PreTrainedModel:
    if arch == "t5":
        config = tf.T5Config(
            vocab_size=32, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )
        return tf.T5ForConditionalGeneration(config)
    config = tf.BartConfig(
        vocab_size=32, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
    )
    return tf.BartForConditionalGeneration(config)


class Tasks:
    """Random sequences of K content tokens (ids first..first+K-1), 5-10 long, batched with padding."""

    def __init__(self, model: tf.PreTrainedModel, first: int, k: int = 16) -> None:
        self.first, self.k = first, k
        self.pad, self.eos = model.config.pad_token_id, model.config.eos_token_id

    def batch(self, task: str, size: int, rng: random.Random) -> dict[str, torch.Tensor]:
        sources = [[self.first + rng.randrange(self.k) for _ in range(rng.randint(5, 10))] for _ in range(size)]
        targets = [TASKS[task](s, self.first, self.k) + [self.eos] for s in sources]
        sources = [s + [self.eos] for s in sources]
        width_s, width_t = max(map(len, sources)), max(map(len, targets))
        return {
            "input_ids": torch.tensor([s + [self.pad] * (width_s - len(s)) for s in sources]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width_s - len(s)) for s in sources]),
            "labels": torch.tensor([t + [-100] * (width_t - len(t)) for t in targets]),
        }


def train(model: torch.nn.Module, params: list, data: Tasks, task: str, steps: int, lr: float, args: Any) -> float:
    """AdamW, 50 warm-up steps then linear decay; fresh random batches of `task` from a seeded stream."""
    rng = random.Random(args.seed + (task != "copy"))  # pretraining: seed; tuning: seed + 1
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * (1 - s / steps))
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        loss = model(**data.batch(task, args.batch_size, rng)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return loss.item()


@torch.no_grad()
def evaluate(model: torch.nn.Module, held: dict[str, torch.Tensor]) -> dict[str, float]:
    out = model(**held)
    labels = held["labels"]
    real = labels != -100
    accuracy = ((out.logits.argmax(-1) == labels) & real).sum() / real.sum()
    return {"loss": round(float(out.loss), 4), "token_accuracy": round(float(accuracy), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["t5", "bart"], default="t5")
    parser.add_argument("--model", help="a pretrained seq2seq model (hub id or directory) instead of --arch")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--tune-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prefix-len", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2, help="prefix learning rate")
    parser.add_argument("--tasks", default="reverse,shift")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for a model this small)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    report: dict = {"arch": args.model or args.arch, "prefix_len": args.prefix_len, "tune_steps": args.tune_steps}
    if args.model:
        model = tf.AutoModelForSeq2SeqLM.from_pretrained(args.model, attn_implementation="sdpa")
        data = Tasks(model, first=1000)
    else:
        model = tiny_model(args.arch)
        model.set_attn_implementation("sdpa")
        data = Tasks(model, first=3)
        train(model, list(model.parameters()), data, "copy", args.pretrain_steps, 3e-3, args)
        report["pretrain_copy"] = evaluate(model, data.batch("copy", 256, random.Random(999)))
    for param in model.parameters():
        param.requires_grad_(False)
    for task in args.tasks.split(","):
        held = data.batch(task, 256, random.Random(1234))
        results: dict = {"untuned": evaluate(model, held)}
        for locations in LOCATIONS:
            torch.manual_seed(args.seed)
            config = PrefixConfig(args.prefix_len, locations=locations, init="vocab", projection_dim=64)
            pm = prefixtune.attach(model, config)
            train(pm, pm.trainable_parameters(), data, task, args.tune_steps, args.lr, args)
            saved = pm.adapters["default"].collapsed().numel()  # values stored for this prefix
            results["+".join(locations)] = evaluate(pm, held) | {"prefix_values": saved}
            pm.detach()
        report[task] = results
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
