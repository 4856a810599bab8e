"""`transformers.Trainer` and TRL's `SFTTrainer` training a PrefixModel, with adapter-only checkpoints.

    from prefixtune.hf_trainer import PrefixTrainer              # transformers.Trainer + the three overrides
    from prefixtune.hf_trainer import PrefixSFTTrainer           # trl.SFTTrainer + the same (needs trl)
    MyTrainer = prefix_trainer(SomeTrainerSubclass)              # any other Trainer subclass

Why a subclass at all: a plain `Trainer` trains a PrefixModel (its forward names the columns Trainer keeps, and
`gradient_checkpointing=True` reaches `PrefixModel.activation_checkpointing_enable`), but Trainer hands
`save_pretrained` only to `transformers.PreTrainedModel` and `peft.PeftModel` instances and resumes adapters
only for the latter: any other module is saved as a `model.safetensors` of its whole state dict, base model
included (14 GB per checkpoint for a 7B base). `PrefixTrainerMixin` changes exactly that:

- `_save`: the checkpoint gets `PrefixModel.save_pretrained` (adapter_config.json + adapter_model.safetensors,
  PEFT's prefix-tuning layout; "default" at the top, other adapters in subdirectories), the tokenizer and the
  training arguments. An adapter that trains through the reparameterization MLP is saved collapsed (that is what
  PEFT loads), so its MLP state also goes to `prefixtune_training.safetensors` for an exact resume.
- `_load_from_checkpoint` (`resume_from_checkpoint`) and `_load_best_model` (`load_best_model_at_end`): the
  saved adapters' weights are copied into the model's adapters in place, so the optimizer state Trainer restores
  next still belongs to the same parameters.
- TRL's SFTTrainer patches the model's forward with its fused LM head (per-token log-probabilities without the
  full logits); on a PrefixModel that patch would skip the prefix, so it moves to the base model, under ours.

Everything else is the stock trainer: nothing else is overridden, no `remove_unused_columns=False` needed.
Don't pass TRL a `peft_config`: it would wrap the base model with PEFT's own prefix tuning; pass the PrefixModel
as `model` (`prefix_config_from_peft` turns a `peft.PrefixTuningConfig` into our `PrefixConfig`).
"""

from __future__ import annotations

import inspect
import os
import types
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from .atomic import atomic_save_tensors
from .errors import PrefixTuneError
from .hf_model import CONFIG_FILE, adapter_dir
from .model import PrefixModel
from .prefix import PrefixConfig

TRAINING_STATE = "prefixtune_training.safetensors"  # reparameterized adapters' exact trainable state


class PrefixTrainerMixin:
    """Put before a `transformers.Trainer` subclass: adapter-only checkpoints, resume, best-model loading."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = self._prefix_model()
        if model is not None and "forward" in model.__dict__:  # an instance-level patch (TRL's fused LM head)
            _move_forward_patch(model, model.__dict__.pop("forward"))

    def _prefix_model(self) -> PrefixModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, PrefixModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._prefix_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        save_training_state(model, output_dir)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        prefix_model = self._prefix_model() if model is None or model is self.model else None
        if prefix_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_adapters(prefix_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        model = self._prefix_model()
        if model is None:
            return super()._load_best_model()
        restore_adapters(model, self.state.best_model_checkpoint)


def prefix_trainer(trainer_class: type) -> type:
    """`trainer_class` (transformers.Trainer or a subclass, e.g. TRL's) with PrefixTrainerMixin's checkpoints."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise PrefixTuneError(f"prefix_trainer needs a transformers.Trainer subclass, got {trainer_class!r}")
    name = f"Prefix{trainer_class.__name__}"
    return type(name, (PrefixTrainerMixin, trainer_class), {"__doc__": f"{trainer_class.__name__}, adapter-only."})


PrefixTrainer = prefix_trainer(Trainer)


def __getattr__(name: str) -> Any:
    if name == "PrefixSFTTrainer":
        # deferred: TRL is an optional dependency, imported only by who asks for its trainer
        from trl import SFTTrainer

        globals()[name] = cls = prefix_trainer(SFTTrainer)
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def save_training_state(model: PrefixModel, output_dir: str) -> None:
    """The trainable tensors of each adapter whose saved form is not its training form (reparameterized)."""
    tensors = {}
    for name, encoder in model.adapters.items():
        if encoder.config.reparameterize:
            tensors |= {f"{name}/adapter/{k}": v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
            if name in model.heads:
                head = model.heads[name].state_dict()
                tensors |= {f"{name}/head/{k}": v.detach().cpu().contiguous() for k, v in head.items()}
    if tensors:
        atomic_save_tensors(tensors, os.path.join(output_dir, TRAINING_STATE), {})


@torch.no_grad()
def restore_adapters(model: PrefixModel, checkpoint: str) -> None:
    """Copy every adapter's weights saved in `checkpoint` (a Trainer checkpoint directory) into the model's."""
    state_file = os.path.join(checkpoint, TRAINING_STATE)
    state = load_file(state_file) if os.path.isfile(state_file) else {}
    for name, encoder in model.adapters.items():
        path = adapter_dir(checkpoint, name)
        if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
            raise PrefixTuneError(f"checkpoint {checkpoint} holds no adapter {name!r} (no {path}/{CONFIG_FILE})")
        parts = {"adapter": encoder, "head": model.heads[name] if name in model.heads else None}
        if any(key.startswith(f"{name}/") for key in state):
            for part, module in parts.items():
                if module is not None:
                    prefix = f"{name}/{part}/"
                    module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            continue
        if encoder.config.reparameterize:
            raise PrefixTuneError(
                f"checkpoint {checkpoint} holds adapter {name!r} collapsed, without {TRAINING_STATE}: its "
                "reparameterization MLP cannot be restored; load it with PrefixModel.from_pretrained to train it on"
            )
        saved, head, _ = model._load_encoder(path, force=False)
        if saved.kv.shape != encoder.kv.shape:
            raise PrefixTuneError(f"adapter {name!r} in {path} has shape {tuple(saved.kv.shape)}, not {encoder.shape}")
        encoder.kv.copy_(saved.kv)
        if head is not None and parts["head"] is not None:
            parts["head"].load_state_dict(head)


def prefix_config_from_peft(peft_config: Any) -> PrefixConfig:
    """Our PrefixConfig for a `peft.PrefixTuningConfig` (the argument TRL's `peft_config` takes)."""
    if getattr(peft_config, "peft_type", None) is None or str(peft_config.peft_type.value) != "PREFIX_TUNING":
        raise PrefixTuneError(f"expected a peft.PrefixTuningConfig, got {type(peft_config).__name__}")
    reparameterize = bool(peft_config.prefix_projection)
    return PrefixConfig(
        num_virtual_tokens=peft_config.num_virtual_tokens,
        reparameterize=reparameterize,
        projection_dim=peft_config.encoder_hidden_size if reparameterize else PrefixConfig.projection_dim,
        init="random",  # PEFT's initialization
    )


def _move_forward_patch(model: PrefixModel, patch: Any) -> None:
    """Re-apply a `trl...add_fused_lm_head` patch of the PrefixModel to its base model, with the same options.

    The patch calls `self.base_model` (the backbone, in a transformers model) directly, which on a PrefixModel
    would skip the prefix; on the base model, under PrefixModel.forward, the backbone gets our prefix batch."""
    function = getattr(patch, "__func__", None)
    apply = getattr(function, "__globals__", {}).get("add_fused_lm_head")  # its module's (wraps renames it)
    if not isinstance(patch, types.MethodType) or apply is None:
        raise PrefixTuneError(
            f"something replaced the PrefixModel's forward ({patch!r}); patch its base_model instead, which "
            "PrefixModel.forward calls with the prefixes"
        )
    closure = dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in function.__closure__ or ())))
    options = {k: closure[k] for k in inspect.signature(apply).parameters if k != "model" and k in closure}
    apply(model.base_model, **options)
