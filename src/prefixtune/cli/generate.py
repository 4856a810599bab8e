"""`prefixtune generate`: text (or a classifier's label) for a prompt, a file or stdin."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from ..data import CHAT_TEMPLATE, FORMATS, RAW
from ..errors import PrefixTuneError
from ..eval import is_sequence_classifier, predict
from ..inference import adapter_formats, answer_prompts, load_with_adapters, route_lines, stream_prompt
from ..model import BASE
from .common import add_device_arguments, placement


def add_arguments(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, a file or stdin")
    p.add_argument("--model", required=True, help="built-in alias, HF id, local dir or .gguf file")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a trained prefix; repeat to load several (lines of --input-file may pick one: NAME<TAB>text)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt (tokens stream to the terminal)")
    src.add_argument("--input-file", help="one prompt per line ('-' = stdin); 'NAME<TAB>prompt' picks an adapter")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length limit")
    p.add_argument("--num-beams", type=int, default=1, help="beam width (1 = greedy)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch for files")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--raw", action="store_true", help="use prompts as they are (no 'Output:' format)")
    p.add_argument(
        "--prompt-format",
        choices=FORMATS,
        help="plain ('PROMPT\\nOutput:'), chat_template or raw (default: each adapter's saved format, else plain; "
        "--chat-template and --raw are short for the last two)",
    )
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    if args.prompt is None and args.input_file is None:
        args.input_file = "-"
    explicit = _explicit_format(args)
    model, tokenizer, names = load_with_adapters(args.model, args.adapter, placement(args))
    formats = adapter_formats(args.adapter, names, explicit)
    torch.manual_seed(args.seed)
    if args.prompt is not None and is_sequence_classifier(model):  # an encoder classifier prints the label
        print(predict(model, tokenizer, [args.prompt])[0][0])
        return 0
    if args.prompt is not None:
        first = formats[names[0] if names else BASE]
        stream_prompt(
            model,
            tokenizer,
            args.prompt,
            raw=first.raw,
            chat_template=first.chat_template,
            max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams,
            sample=args.sample,
            temperature=args.temperature,
            top_p=args.top_p,
        )
        return 0
    lines = sys.stdin.read().splitlines() if args.input_file == "-" else _read_lines(args.input_file)
    prompts, chosen = route_lines(lines, names)
    outputs = answer_prompts(
        model,
        tokenizer,
        prompts,
        chosen if names else None,
        [formats[name] for name in chosen],
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    for text in outputs:
        print(text.replace("\n", " "))
    return 0


def _explicit_format(args: argparse.Namespace) -> str | None:
    """The format the command line asks for (None: each adapter's own); two different ones are refused."""
    asked = {f for f, on in ((RAW, args.raw), (CHAT_TEMPLATE, args.chat_template)) if on}
    asked |= {args.prompt_format} if args.prompt_format else set()
    if len(asked) > 1:
        raise PrefixTuneError(
            f"conflicting prompt formats {sorted(asked)}: give one of --prompt-format, --raw, --chat-template"
        )
    return next(iter(asked), None)


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise PrefixTuneError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise PrefixTuneError(f"{path} is not UTF-8 text") from None
