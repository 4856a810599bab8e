"""`prefixtune eval`: score a model (untuned without --adapter) on a data set; prints one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..data import CHAT_TEMPLATE, PLAIN
from ..inference import evaluate_on_data
from .common import add_device_arguments, placement


def add_arguments(sub: Any) -> None:
    p = sub.add_parser("eval", help="score a model (untuned without --adapter) on a data set; prints JSON")
    p.add_argument("--model", required=True, help="built-in alias, HF id, local dir or .gguf file")
    p.add_argument("--adapter", help="directory of a trained method (prefix, LoRA, ...); omit for the untuned model")
    p.add_argument("--data", required=True, help="built-in set, .jsonl/.csv file or hf:NAME")
    p.add_argument("--split", help="train, validation or test (default: test for built-ins, the whole file otherwise)")
    p.add_argument(
        "--metrics",
        help="comma-separated: bleu, rouge, accuracy, perplexity (default bleu,rouge); encoder classifiers: "
        "accuracy, macro_f1, loss (default accuracy,macro_f1)",
    )
    p.add_argument(
        "--task",
        choices=["generate", "classify"],
        help="classify scores labels (default: classify for multiemo, encoder models and classifier adapters)",
    )
    p.add_argument("--limit", type=int, help="score only the first N examples")
    p.add_argument("--batch-size", type=int, default=8, help="examples per generation batch")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length limit")
    p.add_argument("--max-length", type=int, default=256, help="max prompt (+target) tokens")
    p.add_argument("--num-beams", type=int, default=1, help="beam width (1 = greedy)")
    p.add_argument("--chat-template", action="store_true", help="wrap sources in the tokenizer's chat template")
    p.add_argument(
        "--prompt-format",
        choices=[PLAIN, CHAT_TEMPLATE],
        help="plain or chat_template (default: the adapter's saved format, else plain; chat records: chat_template)",
    )
    p.add_argument("--data-dir", help="where built-in data files are looked up first")
    p.add_argument("--source-field", help="record field holding the input")
    p.add_argument("--target-field", help="record field holding the target")
    p.add_argument("--predictions", metavar="FILE.jsonl", help="also write each prediction with its references")
    p.add_argument("--force", action="store_true", help="load an adapter trained on another model with same shapes")
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    where = placement(args)  # checked before anything loads
    result = evaluate_on_data(
        args.model,
        args.adapter,
        args.data,
        split=args.split,
        task=args.task,
        metrics=args.metrics,
        limit=args.limit,
        force=args.force,
        predictions_path=args.predictions,
        data_dir=args.data_dir,
        source_field=args.source_field,
        target_field=args.target_field,
        progress=sys.stderr.isatty(),
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        chat_template=args.chat_template,
        prompt_format=args.prompt_format,
        num_beams=args.num_beams,
        placement=where,
    )
    print(json.dumps(result))
    return 0
