"""What `transformers.Trainer`, TRL and PEFT-style code ask of a model, for `PrefixModel` (which inherits it).

The engine (model.py) stays the engine; this mixin only answers the questions those libraries put to a model:
its forward's columns (model.py names them), `save_pretrained` / `from_pretrained` in PEFT's layout, gradient
checkpointing through `activation_checkpointing_enable` / `gradient_checkpointing_enable`, and the attributes
Trainer and TRL read (`config`, `generation_config`, input/output embeddings, `accepts_loss_kwargs`, ...), each
answered by the base model. It knows no training loop: `hf_trainer.py` (above model.py) holds the Trainer side.

Saved layout, as PEFT's `PeftModel.save_pretrained`: the adapter named "default" at the directory's top, every
other selected adapter in a subdirectory of its name; each holds `adapter_config.json` and
`adapter_model.safetensors` (`save_adapter`'s files), never the base model's weights.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import nn

from .efficiency import enable_gradient_checkpointing
from .errors import PrefixTuneError

DEFAULT = "default"  # PEFT's adapter name, the one saved at the top of a directory
CONFIG_FILE = "adapter_config.json"


def adapter_dir(save_directory: str | os.PathLike[str], name: str) -> str:
    """Where `save_pretrained` puts adapter `name` under `save_directory` (PEFT's rule)."""
    return os.fspath(save_directory) if name == DEFAULT else os.path.join(save_directory, name)


class TransformersModelMixin:
    """PEFT-shaped saving and loading and the transformers-model attributes, answered by `self.base_model`."""

    _keys_to_ignore_on_save: list[str] | None = None  # Trainer reads it after loading a state dict

    # ----- PEFT's save / load ------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        safe_serialization: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Save the adapters (all by default) in PEFT's prefix-tuning format, as `PeftModel.save_pretrained` lays
        them out: "default" in `save_directory`, any other in `save_directory/NAME`. The base model is not saved.

        `state_dict` is accepted for callers that pass one (Trainer under FSDP/DeepSpeed) and not used: the
        adapters are saved from the model. Only processes with `is_main_process` write.
        """
        if not safe_serialization:
            raise PrefixTuneError("prefix adapters are saved as safetensors only; drop safe_serialization=False")
        names = list(self.adapters) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._require(name)
        if not is_main_process:
            return
        if os.path.isfile(save_directory):
            raise PrefixTuneError(f"{save_directory} is a file; save_pretrained needs a directory")
        for name in names:
            self.save_adapter(adapter_dir(save_directory, name), name)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = DEFAULT,
        is_trainable: bool = False,
        *,
        force: bool = False,
    ) -> Any:
        """`PeftModel.from_pretrained(base_model, path)`'s shape: `model` (a base model, or a PrefixModel to add to)
        with the adapter saved in `model_id` (ours or PEFT's prefix-tuning files) as `adapter_name`.

        As in PEFT, `is_trainable=False` (the default) loads it for inference: its parameters do not require grad
        and the model is in eval mode. `prefixtune.load_adapter` keeps it trainable and the mode as it was.
        """
        created = not isinstance(model, cls)
        wrapped = cls(model) if created else model
        try:
            wrapped.add_adapter(adapter_name, model_id, force=force)
        except BaseException:
            if created:
                wrapped.detach()
            raise
        if not is_trainable:
            wrapped.adapters[adapter_name].requires_grad_(False)
            if adapter_name in wrapped.heads:
                wrapped.heads[adapter_name].requires_grad_(False)
            wrapped.eval()
        return wrapped

    def get_base_model(self) -> nn.Module:
        """The frozen transformers model (PEFT's name for it)."""
        return self.base_model

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter is not None else []

    def print_trainable_parameters(self) -> None:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = trainable + sum(p.numel() for p in self.base_model.parameters())
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # ----- gradient checkpointing (Trainer's `gradient_checkpointing=True`) ------------------------------------

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.base_model, "supports_gradient_checkpointing", False))

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **layer_options: Any
    ) -> None:
        """Checkpoint the base model's layers (`efficiency.enable_gradient_checkpointing`: non-reentrant, the
        replays see the same prefixes). `layer_options`: transformers' `every_n_layers`, `offload`."""
        enable_gradient_checkpointing(self, activation_checkpointing_kwargs, **layer_options)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **layer_options: Any
    ) -> None:
        """The older name of `activation_checkpointing_enable` (transformers < 5.23, TRL, PEFT callers)."""
        enable_gradient_checkpointing(self, gradient_checkpointing_kwargs, **layer_options)

    def activation_checkpointing_disable(self) -> None:
        base = self.base_model
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:  # transformers releases before the rename
            base.gradient_checkpointing_disable()

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.base_model.modules())

    is_activation_checkpointing = is_gradient_checkpointing

    # ----- what Trainer and TRL read off a model -----------------------------------------------------------

    @property
    def config(self) -> Any:
        """The base model's transformers config."""
        return self.base_model.config

    @property
    def generation_config(self) -> Any:
        return getattr(self.base_model, "generation_config", None)

    @generation_config.setter
    def generation_config(self, value: Any) -> None:  # Seq2SeqTrainer sets one from its arguments
        self.base_model.generation_config = value

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the base model's forward takes `num_items_in_batch` (Trainer asks, to scale the loss right)."""
        base = self.base_model
        if hasattr(base, "accepts_loss_kwargs"):
            return bool(base.accepts_loss_kwargs)
        params = inspect.signature(base.forward).parameters.values()
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)

    @property
    def warnings_issued(self) -> dict[str, bool]:
        """Warnings a trainer has shown once (TRL's experimental trainers record theirs here)."""
        return self.__dict__.setdefault("_warnings_issued", {})

    @property
    def hf_device_map(self) -> Any:
        """The base model's device map, when it was loaded with one (then Trainer does not move the model)."""
        if not hasattr(self.base_model, "hf_device_map"):
            raise AttributeError("hf_device_map")
        return self.base_model.hf_device_map

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.base_model.get_output_embeddings()

    def can_generate(self) -> bool:
        can = getattr(self.base_model, "can_generate", None)
        return bool(can()) if callable(can) else False

    def add_model_tags(self, tags: list[str] | str) -> None:
        if hasattr(self.base_model, "add_model_tags"):
            self.base_model.add_model_tags(tags)

    def enable_input_require_grads(self) -> None:
        """Not needed: the prefix trains through non-reentrant checkpointing without it (a no-op kept for callers)."""
