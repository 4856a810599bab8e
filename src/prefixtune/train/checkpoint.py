"""Training checkpoints: trainable tensors (safetensors) + optimizer/schedule/RNG/step (torch, weights_only).

A checkpoint is a directory written whole under a temporary name and swapped in by renames, so a run killed at
any moment leaves either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import _fsync_dir, fsync_tree
from ..errors import PrefixTuneError

CHECKPOINT = "checkpoint"
TRAINABLE = "trainable.safetensors"
STATE = "state.pt"


def rng_state() -> dict[str, Any]:
    """The generators a run draws from (init, data order, dropout), as a checkpoint holds them: torch's CPU
    generator, Python's, and, where CUDA is initialized, every GPU's (dropout on a GPU draws from those)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()  # one ByteTensor per visible GPU
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`. GPU states are restored where the machine has GPUs: all of them when it has as many
    as the run that saved them, else those it has (a run moved to a smaller machine); a CPU-only machine skips
    them (its dropout draws from the CPU generator, which is restored)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        count = min(len(cuda), torch.cuda.device_count())
        for index in range(count):
            torch.cuda.set_rng_state(cuda[index], device=index)


def save_checkpoint(run_dir: Path, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write `run_dir/checkpoint` atomically: the model's trainable tensors and `state` (plain data + tensors)."""
    final = run_dir / CHECKPOINT
    tmp, old = run_dir / f".{CHECKPOINT}.tmp", run_dir / f".{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, tmp / TRAINABLE)
    torch.save(state, tmp / STATE)
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    # else a run killed between the two renames left only `old`: it stays the newest complete checkpoint until
    # `tmp` is in place (deleting it first would leave no checkpoint at all for a moment)
    tmp.rename(final)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dir(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a crash between the two renames leaves only the `.old` one)."""
    for candidate in (run_dir / CHECKPOINT, run_dir / f".{CHECKPOINT}.old"):
        if (candidate / TRAINABLE).is_file() and (candidate / STATE).is_file():
            return candidate
    return None


def resume_state(run_dir: Path, model: nn.Module) -> dict[str, Any] | None:
    """The newest checkpoint's state (its tensors restored into `model`), or None when the run saved none yet."""
    return load_checkpoint(run_dir, model) if checkpoint_dir(run_dir) is not None else None


def load_checkpoint(run_dir: Path, model: nn.Module) -> dict[str, Any]:
    """Restore the trainable tensors into `model`; return the saved state."""
    directory = checkpoint_dir(run_dir)
    if directory is None:
        raise PrefixTuneError(f"{run_dir} has no checkpoint to resume from (train with save_every to write one)")
    try:
        tensors = load_file(directory / TRAINABLE)
        state = torch.load(directory / STATE, weights_only=True)
    except Exception as e:
        raise PrefixTuneError(f"{directory}: unreadable checkpoint ({e})") from None
    restore_trainable(model, tensors, where=str(directory))
    return state


def restore_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Copy saved trainable tensors (name -> tensor) into `model`'s trainable parameters; names must match."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        raise PrefixTuneError(f"{where}: checkpoint tensors do not match this run's trainable parameters")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise PrefixTuneError(f"{where}: {name} is {tuple(tensor.shape)}, expected {tuple(params[name].shape)}")
            params[name].copy_(tensor)
