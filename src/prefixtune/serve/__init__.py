"""`prefixtune serve`: one base model, many prefixes, one OpenAI-compatible HTTP server.

    app = create_app(prefix_model, tokenizer, adapters_dir="adapters/", api_key=None)   # FastAPI app
    uvicorn.run(app, host="127.0.0.1", port=8000)

The command line wires `add_serve_arguments` and `run_serve`.
"""

from __future__ import annotations

import argparse
import logging
import os

from .. import models
from ..devices import add_device_arguments, resolve_placement
from ..errors import PrefixTuneError
from .app import create_app

__all__ = ["add_serve_arguments", "create_app", "run_serve"]

def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `prefixtune serve`."""
    parser.add_argument(
        "--model", required=True, help="base model: a built-in alias, a Hugging Face id or a local directory"
    )
    parser.add_argument(
        "--adapters",
        metavar="DIR",
        default=None,
        help="directory of adapters, one subdirectory each (its name is the adapter's name); "
        "load_adapter paths must lie inside it",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but / and /health "
        "(default: the PREFIXTUNE_API_KEY environment variable; none = open)",
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="most requests decoded together (default 32)")
    parser.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="most requests waiting for a batch slot; beyond it requests get 429 with Retry-After (default 256)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context limit in tokens, prompt + completion (default: the model's own)",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="the name clients use for the base model (default: --model)"
    )
    add_device_arguments(parser)  # --device, --dtype: the same as every command's
    parser.add_argument(
        "--force", action="store_true", help="load adapters whose base-model fingerprint differs but whose shapes fit"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="server log level (default info)",
    )


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, build the app and serve until interrupted. User mistakes raise PrefixTuneError."""
    import uvicorn

    for flag in ("max_batch_size", "max_queue", "port"):
        if getattr(args, flag) < (0 if flag == "port" else 1):
            raise PrefixTuneError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    where = resolve_placement(args.device, args.dtype)
    model, tokenizer = models.load_model(
        args.model, dtype=where.dtype, attn_implementation="sdpa", device=where.device, device_map=where.device_map
    )
    api_key = args.api_key or os.environ.get("PREFIXTUNE_API_KEY") or None
    app = create_app(
        model,
        tokenizer,
        adapters_dir=args.adapters,
        api_key=api_key,
        model_name=args.served_model_name or args.model,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_model_len=args.max_model_len,
        force=args.force,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
