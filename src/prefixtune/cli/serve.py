"""`prefixtune serve`: many prefixes of one base model behind an OpenAI-compatible HTTP API (docs/serving.md)."""

from __future__ import annotations

import argparse
from typing import Any

from ..serve import add_serve_arguments, run_serve


def add_arguments(sub: Any) -> None:
    add_serve_arguments(sub.add_parser("serve", help="serve many prefixes over an OpenAI-compatible HTTP API"))


def run(args: argparse.Namespace) -> int:
    return run_serve(args)
