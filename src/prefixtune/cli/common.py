"""What every subcommand shares: exit codes, the process rank (one summary line under torchrun), and the
`--device` / `--dtype` flags (devices.py checks them before a command writes or loads anything)."""

from __future__ import annotations

import argparse
import os

from ..devices import Placement, add_device_arguments, resolve_placement

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130

__all__ = ["EXIT_INTERRUPTED", "EXIT_USAGE", "add_device_arguments", "placement", "rank"]


def rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when run alone)."""
    return int(os.environ.get("RANK", "0") or 0)


def placement(args: argparse.Namespace) -> Placement:
    """The checked `--device` and `--dtype` of a command (PrefixTuneError: exit 2, nothing written)."""
    return resolve_placement(getattr(args, "device", None), getattr(args, "dtype", None))
