"""The inputs of the performance suite (bench/perf.py): the model and tokenizer (a tiny random Llama for --quick),
and the token batches and generation prompts that the parent builds once and every worker process reads.

torch, transformers and prefixtune are imported inside the functions, on purpose: bench/perf.py's main() sets
OMP_WAIT_POLICY before torch is first imported (the workers inherit it), and `python -m bench --help` stays fast.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

from bench.perf_common import ROOT, SEQS

# ----- the model --------------------------------------------------------------------------------------------------


def tiny_model_dir(workdir: Path) -> Path:
    """--quick: a tiny random Llama and a tiny byte-level tokenizer saved as a model directory."""
    import torch
    import transformers as tf

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_tokenizer import make_tokenizer

    tokenizer = make_tokenizer(vocab_size=300)
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    directory = workdir / "tiny-llama"
    tf.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_tokenizer(model: str) -> Any:
    """The tokenizer of `model` (a prefixtune.sources name or a directory), with a pad token."""
    from transformers import AutoTokenizer

    from prefixtune import models

    kind, where = models.resolve(model)
    directory = models.prepare_alias(str(where)) if kind == "alias" else where
    if kind == "gguf":
        return models.load_model(model)[1]
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ----- the data ---------------------------------------------------------------------------------------------------

_FOODS = ["French", "Italian", "Japanese", "Chinese", "English", "Indian", "fast food"]
_NAMES = ["Blue Spice", "The Eagle", "The Golden Curry", "The Mill", "Cotto", "Zizzi", "The Phoenix"]
_WORDS = "the cat sat on mat and dog ran in park a coffee shop near river city centre family friendly".split()


def synthetic_examples(kind: str, n: int, seed: int = 0) -> list[Any]:
    """E2E-like records (short) or XSum-like documents (long), for --quick: no files, no network."""
    from prefixtune.data import Example

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, food = rng.choice(_NAMES), rng.choice(_FOODS)
        if kind == "e2e":
            source = f"name[{name}], eatType[{rng.choice(['pub', 'coffee shop'])}], food[{food}], area[city centre]"
            target = f"{name} serves {food} food in the city centre" + " near the river" * rng.randint(0, 3) + "."
        else:
            source = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(150, 400)))
            target = f"{name} opens a {food} restaurant."
        out.append(Example(source, target, [target]))
    return out


def prepare_inputs(args: argparse.Namespace, tokenizer: Any, workdir: Path) -> dict[str, Any]:
    """Token batches for both sequence kinds and the generation prompts; saved for the workers."""
    import torch

    from prefixtune import data

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lengths = {"e2e": (args.short_len, args.short_batch), "xsum": (args.long_len, args.long_batch)}
    needed = {"e2e": args.warmup + args.short_steps, "xsum": args.long_warmup + args.long_steps}
    batches, stats, prompts = {}, {}, None
    for seq in SEQS:
        max_length, batch_size = lengths[seq]
        if args.quick:
            examples = synthetic_examples(seq, 96 if seq == "e2e" else 4 * batch_size * needed[seq])
        else:
            examples = data.load_dataset(seq, split="train", data_dir=args.data_dir)
            if seq == "xsum":
                examples = examples[: 16 * batch_size * needed[seq]]
        pairs = data.training_pairs(examples)
        encoded, _ = data.encode(pairs, tokenizer, max_length=max_length)
        if seq == "xsum":  # documents that fill max_length (cut at their end), so that long batches are B x max
            full = [e for e in encoded if len(e.input_ids) == max_length]
            encoded = full if len(full) >= batch_size else sorted(encoded, key=lambda e: -len(e.input_ids))
        epoch = data.batches(encoded, batch_size, shuffle=True, seed=0, pad_id=pad_id)
        if len(epoch) < needed[seq]:
            epoch = (epoch * needed[seq])[: needed[seq]]
        batches[seq] = epoch[: needed[seq]]
        if seq == "e2e":  # the same examples, batched without length buckets (what a plain shuffled loader gives)
            same = [unpadded_example(b, row) for b in batches[seq] for row in range(len(b["input_ids"]))]
            batches["e2e-unbucketed"] = data.batches(
                same, batch_size, shuffle=True, seed=0, bucket_by_length=False, pad_id=pad_id
            )
            stats["e2e-measured"] = {
                "padding_bucketed": padding_fraction(batches[seq]),
                "padding_unbucketed": padding_fraction(batches["e2e-unbucketed"]),
            }
        plain = data.batches(encoded, batch_size, shuffle=True, seed=0, bucket_by_length=False, pad_id=pad_id)
        stats[seq] = {
            "examples": len(encoded),
            "mean_tokens": round(sum(len(e.input_ids) for e in encoded) / len(encoded), 1),
            "mean_target_tokens": round(sum(len(e.input_ids) - e.prompt_length for e in encoded) / len(encoded), 1),
            "padding_bucketed": padding_fraction(epoch),
            "padding_unbucketed": padding_fraction(plain),
            "batch": [batch_size, max_length],
        }
        if seq == "e2e":
            prompts, _ = data.encode_prompts(examples[: max(args.gen_batches)], tokenizer)
    path = workdir / "inputs.pt"
    torch.save({"batches": batches, "prompts": prompts, "pad_id": pad_id}, path)
    return {"path": str(path), "stats": stats}


def unpadded_example(batch: dict[str, Any], row: int) -> Any:
    """Row `row` of a padded batch as an EncodedExample again (its real tokens, labels and prompt length)."""
    from prefixtune.data import IGNORE_INDEX, EncodedExample

    n = int(batch["attention_mask"][row].sum())
    labels = batch["labels"][row, :n].tolist()
    prompt = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), n)
    return EncodedExample(batch["input_ids"][row, :n].tolist(), labels, prompt, row)


def padding_fraction(batches: list[dict[str, Any]]) -> float:
    """The share of the batches' cells that are padding."""
    cells = sum(b["attention_mask"].numel() for b in batches)
    return round(1 - sum(int(b["attention_mask"].sum()) for b in batches) / cells, 4)
