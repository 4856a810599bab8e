"""What the methods that enter a frozen model through forward hooks share (bottleneck adapters, prefix-memory):
the frozen base, forward/generate passed through, `detach()` that removes the hooks, and a save of one JSON file
and one safetensors file, each written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .. import atomic
from ..errors import PrefixTuneError


class HookedModel(nn.Module):
    """A frozen causal LM; subclasses add their modules and append their hook handles to `self._hooks`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.base_model = model
        for param in model.parameters():
            param.requires_grad_(False)
        self._hooks: list[Any] = []

    def forward(self, **kwargs: Any) -> Any:
        return self.base_model(**kwargs)

    @torch.no_grad()
    def generate(self, **kwargs: Any) -> Any:
        return self.base_model.generate(**kwargs)

    def detach(self) -> nn.Module:
        """Remove the hooks and give back the base model as it was."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        return self.base_model

    @staticmethod
    def write(
        directory: str | os.PathLike[str],
        meta: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        config_file: str,
        weights_file: str,
        what: str,
    ) -> None:
        """The weights, then the JSON that marks the directory (so a directory with the JSON has its weights)."""
        directory = Path(directory)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        try:
            directory.mkdir(parents=True, exist_ok=True)
            atomic.atomic_save_tensors(tensors, directory / weights_file, {"format": "pt"})
            atomic.atomic_write_bytes(directory / config_file, (json.dumps(meta, indent=2) + "\n").encode())
        except OSError as e:
            raise PrefixTuneError(f"cannot write the {what} to {directory}: {e.strerror}") from None


def read_saved(directory: Path, config_file: str, weights_file: str, block: str, config_class: type, kind: str):
    """(meta, tensors, config) from a directory `HookedModel.write` wrote; every way it can be broken is one
    PrefixTuneError naming the directory (`kind`: "bottleneck-adapter", "prefix-memory")."""
    missing = [name for name in (config_file, weights_file) if not (directory / name).is_file()]
    if missing:
        raise PrefixTuneError(f"{directory} is not a {kind} directory ({', '.join(missing)} missing)")
    try:
        meta = json.loads((directory / config_file).read_text())
        tensors = load_file(directory / weights_file)
    except Exception as e:  # bad JSON, corrupt safetensors
        raise PrefixTuneError(f"{directory}: cannot read the {kind} files ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get(block), dict):
        raise PrefixTuneError(f"{directory / config_file}: missing the '{block}' block; re-save the adapter")
    try:
        config = config_class(**meta[block])
    except TypeError as e:
        raise PrefixTuneError(f"{directory / config_file}: bad '{block}' block ({e})") from None
    return meta, tensors, config
