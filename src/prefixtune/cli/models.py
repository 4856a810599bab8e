"""`prefixtune models`: the built-in model aliases and what is cached; --prepare converts one now."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .. import models


def add_arguments(sub: Any) -> None:
    p = sub.add_parser("models", help="list built-in model aliases and what is cached")
    p.add_argument("--prepare", metavar="ALIAS", help="download and convert a built-in model now")


def run(args: argparse.Namespace) -> int:
    if args.prepare:
        models.prepare_alias(args.prepare)
    for row in models.list_models():
        print(json.dumps(row))
    return 0
