"""Atomic file writes: every file prefixtune saves goes through here (temp file, fsync, rename, fsync the directory).

A run killed at any moment, even with SIGKILL, leaves the old file or the new one under the real name, never part
of one; `remove_stale_temp` clears the temporaries it may leave beside them.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# Every file prefixtune saves goes through the functions below: a temporary file in the same directory (named
# .NAME.XXXXXXXX.tmp, so a run killed mid-write leaves nothing under the real name), fsync, rename over the real
# name, fsync of the directory. A reader sees the old file or the new one, never part of one.
TMP_SUFFIX = ".tmp"


def _temp_file(path: Path) -> tuple[int, str]:
    """A new temporary file beside `path`, with the mode open() would give it (0666 less the umask: the kernel
    applies the process umask to os.open's mode, so it is never read or changed here; mkstemp would make 0600)."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def _atomic(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Let `write(tmp)` write a temporary file beside `path`, then fsync it and rename it to `path`."""
    path = Path(path)
    fd, tmp = _temp_file(path)
    os.close(fd)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of one."""
    _atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str]
) -> None:
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_save_figure(fig: Any, path: str | os.PathLike[str]) -> None:
    """`fig.savefig(path)`, atomically (the format follows the suffix, as in savefig)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png")
    atomic_write_bytes(path, buffer.getvalue())


def atomic_save_directory(
    directory: str | os.PathLike[str], write: Callable[[Path], None], last: tuple[str, ...] = ()
) -> None:
    """Let `write(staging)` save files (e.g. `save_pretrained`) into a staging directory inside `directory`, then
    move each file over its real name atomically, the names in `last` (the file that marks the directory as a
    saved method, such as adapter_config.json) after all the others."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=".staging-", suffix=TMP_SUFFIX))
    try:
        write(staging)
        files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.name in last, str(p)))
        for file in files:
            _fsync_file(file)
        for file in files:
            target = directory / file.relative_to(staging)
            if target.parent != directory:
                target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
            _fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_temp(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files and staging directories a killed run left in `directory` and its children."""
    directory = Path(directory)
    removed = []
    for path in [*directory.glob(f".*{TMP_SUFFIX}"), *directory.glob(f"*/.*{TMP_SUFFIX}")]:
        if path.name == ".checkpoint.tmp":  # checkpoint.py's own staging directory, replaced on every save
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def fsync_tree(directory: str | os.PathLike[str]) -> None:
    """fsync every file under `directory` and the directories themselves (before renaming it into place)."""
    directory = Path(directory)
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            _fsync_file(path)
    for path in [*(p for p in directory.rglob("*") if p.is_dir()), directory]:
        _fsync_dir(path)


def _fsync_file(path: str | os.PathLike[str]) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
