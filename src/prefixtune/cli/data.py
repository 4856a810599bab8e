"""`prefixtune data`: the built-in data sets; --prepare fetches one into the cache."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..data import builtin


def add_arguments(sub: Any) -> None:
    p = sub.add_parser("data", help="list built-in data sets; --prepare fetches one into the cache")
    p.add_argument("--prepare", metavar="NAME", help="fetch a built-in set (e2e, xsum, multiemo) now")
    p.add_argument("--data-dir", help="where built-in data files are looked up first")


def run(args: argparse.Namespace) -> int:
    if args.prepare:
        builtin.prepare_dataset(args.prepare, args.data_dir)
    for row in builtin.list_datasets(args.data_dir):
        print(json.dumps(row, default=str))
    return 0
