"""LoRA (Hu et al., 2021) through the `peft` library; saved in PEFT's own format, mergeable into the base."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import load_file
from torch import nn

from .. import atomic
from ..errors import PrefixTuneError, is_dropout_rate


@dataclass
class LoraConfig:
    """r: rank; alpha: scale numerator (update = alpha/r * B A); dropout: on the LoRA input.
    target_modules: module names (or "all-linear"); None = PEFT's default for the architecture (q/v projections
    for Llama-style models, c_attn for GPT-2), or "all-linear" where PEFT has no default.
    Defaults are Hu et al.'s GPT-2 E2E setting (r=4, alpha=32, dropout=0.1)."""

    r: int = 4
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise PrefixTuneError(f"r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise PrefixTuneError(f"alpha must be a number > 0, got {self.alpha!r}")
        if not is_dropout_rate(self.dropout):
            raise PrefixTuneError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        targets = self.target_modules
        if targets is not None and targets != "all-linear":
            if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(m, str) for m in targets):
                raise PrefixTuneError(f"target_modules must be module names or 'all-linear', got {targets!r}")

    def to_peft(self, model: nn.Module) -> peft.LoraConfig:
        targets = self.target_modules
        if (
            targets is None
            and getattr(model.config, "model_type", None) not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
        ):
            targets = "all-linear"
        return peft.LoraConfig(
            task_type="CAUSAL_LM", r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets
        )


def inject_lora(model: nn.Module, config: LoraConfig) -> peft.PeftModel:
    """Wrap `model` in a PeftModel with LoRA layers injected into it in place; only LoRA parameters train."""
    was_training = model.training
    try:
        peft_model = peft.get_peft_model(model, config.to_peft(model))
    except ValueError as e:  # PEFT's message for target modules that match nothing
        raise PrefixTuneError(f"LoRA cannot be attached to {type(model).__name__}: {e}") from None
    return peft_model.train(was_training)  # new LoRA layers (and their dropout) follow the base model's mode


def load_lora_into(model: nn.Module, directory: str | os.PathLike[str]) -> peft.PeftModel:
    """Load a PEFT LoRA adapter directory onto `model` (trainable, so training can resume)."""
    was_training = model.training
    weights = Path(directory) / "adapter_model.safetensors"
    saved = None
    if weights.is_file():  # read it whole first: PEFT puts LoRA layers into `model` before it reads the weights
        try:
            tensors = load_file(weights)
        except Exception as e:  # safetensors raises several types for corrupt or truncated files
            raise PrefixTuneError(f"{weights}: corrupt or truncated safetensors file ({e}); re-save it") from None
        saved = set(tensors)
        _check_ranks(Path(directory), tensors)
    # PEFT injects LoRA layers (and freezes the base) before it finds that the weights do not fit: keep what is
    # needed to give the model back as it was
    children = [(module, dict(module._modules)) for module in model.modules()]
    grads = [(param, param.requires_grad) for param in model.parameters()]
    attributes = set(vars(model))

    def undo(why: str) -> PrefixTuneError:
        for module, kept in children:
            module._modules.clear()
            module._modules.update(kept)
        for param, flag in grads:
            param.requires_grad_(flag)
        for name in set(vars(model)) - attributes:  # peft_config
            delattr(model, name)
        return PrefixTuneError(f"cannot load the LoRA adapter in {directory}: {why}")

    try:
        peft_model = peft.PeftModel.from_pretrained(model, str(directory), is_trainable=True)
    except Exception as e:  # PEFT, transformers and safetensors raise many types for a bad config or bad weights
        raise undo(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}") from None
    # PEFT only warns when the file lacks LoRA weights, and leaves those layers at their fresh initialization
    wanted = {n.replace(".default.", ".") for n, p in peft_model.named_parameters() if p.requires_grad}
    missing = sorted(wanted - saved) if saved is not None else []
    if missing:
        raise undo(f"{weights.name} lacks {len(missing)} LoRA tensors (e.g. {missing[0]}); re-save the adapter")
    return peft_model.train(was_training)


def _check_ranks(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The ranks in adapter_config.json size the layers PEFT makes: refuse ranks above the saved weights' (a
    damaged r of 10**9 would allocate gigabytes before PEFT could find the mismatch)."""
    try:
        raw = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return  # PEFT reports an unreadable config
    if not isinstance(raw, dict):
        return
    pattern = raw.get("rank_pattern") if isinstance(raw.get("rank_pattern"), dict) else {}
    asked = [raw.get("r"), *pattern.values()]
    have = {int(t.shape[0]) for k, t in tensors.items() if "lora_A" in k and t.ndim == 2}
    if not have or any(not isinstance(r, int) or isinstance(r, bool) or not 0 < r <= max(have) for r in asked):
        raise PrefixTuneError(
            f"{directory}: the ranks in adapter_config.json ({[r for r in asked][:5]}) do not match the saved "
            f"LoRA weights (ranks {sorted(have) or 'none'}); re-save the adapter"
        )


class LoraModel(nn.Module):
    """A base model with PEFT LoRA layers; forward/generate go through PEFT."""

    def __init__(self, peft_model: peft.PeftModel) -> None:
        super().__init__()
        self.peft_model = peft_model

    def forward(self, **kwargs: Any) -> Any:
        return self.peft_model(**kwargs)

    @torch.no_grad()
    def generate(self, **kwargs: Any) -> Any:
        return self.peft_model.generate(**kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def save_trained(self, directory: str | os.PathLike[str]) -> None:
        """PEFT's format: adapter_config.json (peft_type LORA) + adapter_model.safetensors."""
        try:  # each file atomically, adapter_config.json (what marks the directory as an adapter) last
            atomic.atomic_save_directory(
                directory, lambda staging: self.peft_model.save_pretrained(str(staging)), last=("adapter_config.json",)
            )
        except OSError as e:
            raise PrefixTuneError(f"cannot write the LoRA adapter to {directory}: {e.strerror}") from None

    def merge(self) -> nn.Module:
        """Fold the LoRA update into the base weights and return the plain transformers model (no PEFT layers)."""
        return self.peft_model.merge_and_unload()


def build_lora(model: nn.Module, config: LoraConfig, tokenizer: Any = None) -> LoraModel:
    return LoraModel(inject_lora(model, config))


def load_lora(model: nn.Module, directory: str | os.PathLike[str]) -> LoraModel:
    return LoraModel(load_lora_into(model, directory))
