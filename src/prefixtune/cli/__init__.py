"""`prefixtune` command line: one module per subcommand, each `add_arguments(sub)` and `run(args)`.

Argument parsing only; the work is done by library functions (train, inference, compare, demo, serve). User errors
(PrefixTuneError) print one line and exit 2; Ctrl-C exits 130 (training saves a checkpoint first).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from transformers.utils import logging as hf_logging

from ..errors import PrefixTuneError
from ..train import Interrupted
from . import compare, data, demo, generate, models, serve, train
from . import eval as eval_
from .common import EXIT_INTERRUPTED, EXIT_USAGE, rank

SUBCOMMANDS = {
    "train": train,
    "eval": eval_,
    "generate": generate,
    "models": models,
    "data": data,
    "demo": demo,
    "compare": compare,
    "serve": serve,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefixtune", description="Prefix-tuning for Hugging Face transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in SUBCOMMANDS.values():
        command.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may stand anywhere among the flags (argparse only takes them in one run)
    if args.command in ("train", "compare") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    hf_logging.disable_progress_bar()  # our own bars say what is happening
    try:
        return SUBCOMMANDS[args.command].run(args)
    except PrefixTuneError as e:
        if rank() == 0:  # several processes raise the same error together (distributed.py): say it once
            print(f"prefixtune: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as e:  # Ctrl-C during training: a checkpoint was saved
        print(f"prefixtune: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("prefixtune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


__all__ = ["build_parser", "main"]
