"""What every subcommand shares: exit codes and the process rank (one summary line under torchrun)."""

from __future__ import annotations

import os

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when run alone)."""
    return int(os.environ.get("RANK", "0") or 0)
