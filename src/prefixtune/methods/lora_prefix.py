"""LoRA + prefix (the combination studied by He et al., 2022): PEFT's LoRA on the linear layers and our prefix in
attention, in one model and one optimizer. PEFT cannot stack these two itself (one prompt-learning method per
model); here they compose because they touch different places: LoRA replaces linear layers inside the base model
in place, the prefix enters through the attention function, and `PrefixModel` calls the base model, LoRA and all.

Saved as one directory with both parts, each in PEFT's format:  DIR/lora/ (peft_type LORA), DIR/prefix/ (PREFIX_TUNING).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
from torch import nn

from .. import atomic
from ..errors import PrefixTuneError
from ..model import PrefixModel, attach, load_adapter
from ..prefix import PrefixConfig
from .lora import LoraConfig, inject_lora, load_lora_into

LORA_DIR, PREFIX_DIR = "lora", "prefix"


@dataclass
class LoraPrefixConfig:
    """The two parts' configs; as flat options, `lora.r=8`, `prefix.num_virtual_tokens=10` (or the bare name where
    only one part has it)."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)


class LoraPrefixModel(nn.Module):
    """One base model with LoRA layers injected and a prefix attached; `adapter_names` selects prefixes per row."""

    def __init__(self, prefix_model: PrefixModel, peft_model: peft.PeftModel) -> None:
        super().__init__()
        self.prefix_model = prefix_model
        # The PeftModel wraps the same base model; keep it out of the module tree so nothing is registered twice.
        object.__setattr__(self, "peft_model", peft_model)

    def forward(self, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        return self.prefix_model(adapter_names=adapter_names, **kwargs)

    @torch.no_grad()
    def generate(self, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        return self.prefix_model.generate(adapter_names=adapter_names, **kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.prefix_model.trainable_parameters() + self.lora_parameters()

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def save_trained(self, directory: str | os.PathLike[str]) -> None:
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            atomic.atomic_save_directory(
                directory / LORA_DIR,
                lambda staging: self.peft_model.save_pretrained(str(staging)),
                last=("adapter_config.json",),
            )
        except OSError as e:
            raise PrefixTuneError(f"cannot write the LoRA part to {directory / LORA_DIR}: {e.strerror}") from None
        self.prefix_model.save_adapter(directory / PREFIX_DIR)

    def merge_lora(self) -> PrefixModel:
        """Fold LoRA into the base weights in place; what is left is the base model with the prefix attached."""
        self.peft_model.merge_and_unload()
        return self.prefix_model


def build_lora_prefix(model: nn.Module, config: LoraPrefixConfig, tokenizer: Any = None) -> LoraPrefixModel:
    # The prefix first: its "vocab"/"text" initialization records the frozen model's own keys and values.
    prefix_model = attach(model, config.prefix, name="default", tokenizer=tokenizer)
    try:
        return LoraPrefixModel(prefix_model, inject_lora(model, config.lora))
    except BaseException:
        prefix_model.detach()
        raise


def load_lora_prefix(model: nn.Module, directory: str | os.PathLike[str]) -> LoraPrefixModel:
    directory = Path(directory)
    for part in (LORA_DIR, PREFIX_DIR):
        if not (directory / part).is_dir():
            raise PrefixTuneError(f"{directory} is not a lora+prefix directory: {part}/ is missing")
    prefix_model = load_adapter(model, directory / PREFIX_DIR, name="default")
    try:
        return LoraPrefixModel(prefix_model, load_lora_into(model, directory / LORA_DIR))
    except BaseException:
        prefix_model.detach()
        raise
