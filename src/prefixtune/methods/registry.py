"""Every training method behind one small protocol, so the trainer and `compare` never branch on the method.

spec = METHODS["lora"]                                   # or method_spec(name): a clear error for unknown names
trained = build_method("lora", model, {"r": 8}, tokenizer)  # options that do not apply raise PrefixTuneError
loss = trained(input_ids=..., labels=...).loss           # an nn.Module; forward returns the transformers output
AdamW(trained.trainable_parameters(), lr=spec.default_lr)
trained.save_trained(out)                                # the method's own format
again = load_trained(fresh_model, out)                   # the method is read from the directory
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import PrefixTuneError
from ..model import PrefixModel
from ..prefix import PrefixConfig
from . import bottleneck, full, lora, lora_prefix, memory, prompt


@runtime_checkable
class TrainableModel(Protocol):
    """What every method's wrapped model is (besides an `nn.Module`: `train()`, `eval()`, `to()`, `__call__`)."""

    def forward(self, **hf_kwargs: Any) -> Any:
        """The transformers output (with `loss` when `labels` are given). Mixable methods also take adapter_names."""
        ...

    def generate(self, **hf_kwargs: Any) -> Any:
        """transformers `generate`: input_ids followed by the new tokens."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly the parameters the optimizer gets; nothing else has requires_grad."""
        ...

    def save_trained(self, directory: str | os.PathLike[str]) -> None:
        """The method's own saved format (small files; full fine-tuning saves the model)."""
        ...


class PrefixTrainable(PrefixModel):
    """The core `PrefixModel` with the protocol's `save_trained` (= `save_adapter` of the active prefix)."""

    def save_trained(self, directory: str | os.PathLike[str]) -> None:
        self.save_adapter(directory)


def _build_prefix(model: nn.Module, config: PrefixConfig, tokenizer: Any = None) -> PrefixTrainable:
    return _with_first_adapter(PrefixTrainable(model, tokenizer=tokenizer), config)


def _load_prefix(model: nn.Module, directory: str | os.PathLike[str]) -> PrefixTrainable:
    return _with_first_adapter(PrefixTrainable(model), directory)


def _with_first_adapter(wrapped: PrefixTrainable, source: Any) -> PrefixTrainable:
    try:
        wrapped.add_adapter("default", source)
    except BaseException:
        wrapped.detach()
        raise
    return wrapped


@dataclass(frozen=True)
class MethodSpec:
    """A method: its config dataclass, how to build and load it, and a default learning rate with its source."""

    name: str
    config_class: type
    build: Callable[[nn.Module, Any, Any], TrainableModel]  # (model, config, tokenizer)
    load: Callable[[nn.Module, str | os.PathLike[str]], TrainableModel]  # (model, directory)
    default_lr: float  # for AdamW; docs/methods.md gives the sources
    lr_source: str
    mixable: bool = False  # forward/generate accept adapter_names (one adapter per batch row)
    # The default rate holds at this many target tokens per optimizer step (None: at any); fewer scale it down
    # (`default_lr_for`).
    lr_targets_per_step: float | None = None

    def default_lr_for(self, targets_per_step: float | None) -> float:
        """The default rate for steps of `targets_per_step` target tokens (None: unknown, the plain default).

        Adam's square-root scaling rule (Malladi et al. 2022, "On the SDEs and scaling rules for adaptive gradient
        algorithms"): a batch k times smaller takes a rate sqrt(k) times smaller, since its gradient noise is
        sqrt(k) times larger and Adam normalizes the step's size, not its noise. The loss averages over target
        tokens, so the batch that counts is target tokens per step. Only ever lowered (the rate was measured at
        `lr_targets_per_step`, not above it), rounded to 3 significant digits (names and JSON stay readable).
        """
        if self.lr_targets_per_step is None or not targets_per_step:
            return self.default_lr
        scale = min(1.0, math.sqrt(targets_per_step / self.lr_targets_per_step))
        return float(f"{self.default_lr * scale:.3g}")


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in [
        MethodSpec(
            "prefix",
            PrefixConfig,
            _build_prefix,
            _load_prefix,
            3e-3,
            "Li & Liang 2021 use 5e-5 for thousands of steps; at hundreds of steps 1e-3..1e-2 learn far faster "
            "(probe on smollm2/E2E in docs/methods.md); 3e-3 at E2E's and XSum's ~200 target tokens per step "
            "(batch 8), scaled down by the square root for fewer (MultiEmo's label words: docs/methods.md)",
            mixable=True,
            lr_targets_per_step=200.0,
        ),
        MethodSpec(
            "prompt",
            prompt.PromptConfig,
            prompt.build_prompt,
            prompt.load_prompt,
            3e-2,
            "Lester et al. 2021 use 0.3 with Adafactor; with AdamW we use PEFT's prompt-tuning example's 3e-2",
            mixable=True,
        ),
        MethodSpec(
            "lora",
            lora.LoraConfig,
            lora.build_lora,
            lora.load_lora,
            2e-4,
            "Hu et al. 2021, GPT-2 on E2E: 2e-4, r=4, alpha=32",
        ),
        MethodSpec(
            "adapter",
            bottleneck.BottleneckConfig,
            bottleneck.build_bottleneck,
            bottleneck.load_bottleneck,
            1e-4,
            "Houlsby et al. 2019 sweep 1e-4..1e-3; AdapterHub (Pfeiffer et al.) default 1e-4",
        ),
        MethodSpec(
            "lora+prefix",
            lora_prefix.LoraPrefixConfig,
            lora_prefix.build_lora_prefix,
            lora_prefix.load_lora_prefix,
            2e-4,
            "no published value; LoRA's 2e-4 (Hu et al. 2021) for both parts",
            mixable=True,
        ),
        MethodSpec(
            "prefix-memory",
            memory.PrefixMemoryConfig,
            memory.build_memory,
            memory.load_memory,
            8e-3,
            "Wang et al. 2026 (PrefixMemory-Tuning) give no rate for this reading; the best of 1e-4..2.4e-2 on E2E "
            "validation at 50 examples and 18 steps (docs/methods.md, levers)",
        ),
        MethodSpec(
            "full", full.FullConfig, full.build_full, full.load_full, 5e-5, "Li & Liang 2021 fine-tuning baseline: 5e-5"
        ),
    ]
}


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise PrefixTuneError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def option_names(name: str) -> list[str]:
    """The options a method takes (for lora+prefix also `lora.X` / `prefix.X`)."""
    return list(_options(method_spec(name).config_class))


def make_config(name: str, options: Mapping[str, Any] | Any = None) -> Any:
    """The method's config from flat options; options that do not apply raise an error listing the valid ones."""
    spec = method_spec(name)
    if isinstance(options, spec.config_class):
        return options
    if options is not None and not isinstance(options, Mapping):
        raise PrefixTuneError(f"method {name!r} takes a {spec.config_class.__name__} or a mapping of options")
    known = _options(spec.config_class)
    unknown = sorted(set(options or {}) - set(known))
    if unknown:
        raise PrefixTuneError(
            f"option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"{'do' if len(unknown) > 1 else 'does'} not apply to method {name!r}; its options are: {', '.join(known)}"
        )
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in (options or {}).items():
        path = known[key]
        if len(path) == 1:
            top[path[0]] = value
        else:
            nested.setdefault(path[0], {})[path[1]] = value
    for part, values in nested.items():
        top[part] = _nested_class(spec.config_class, part)(**values)
    return spec.config_class(**top)


def build_method(name: str, model: nn.Module, options: Mapping[str, Any] | Any = None, tokenizer: Any = None):
    """Attach method `name` to a transformers causal LM and return its `TrainableModel`."""
    spec = method_spec(name)
    return spec.build(model, make_config(name, options), tokenizer)


def detect_method(directory: str | os.PathLike[str]) -> str:
    """Which method saved this directory (also recognizes PEFT's own prefix/prompt/LoRA adapters)."""
    directory = Path(directory)
    if (directory / lora_prefix.LORA_DIR).is_dir() and (directory / lora_prefix.PREFIX_DIR).is_dir():
        return "lora+prefix"
    if (directory / bottleneck.CONFIG_FILE).is_file():
        return "adapter"
    if (directory / memory.CONFIG_FILE).is_file():
        return "prefix-memory"
    if (directory / full.CONFIG_FILE).is_file():
        return "full"
    config_path = directory / "adapter_config.json"
    try:
        peft_type = json.loads(config_path.read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError, RecursionError):
        raise PrefixTuneError(
            f"{directory} holds no saved prefixtune method (no readable adapter_config.json)"
        ) from None
    by_type = {"PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "LORA": "lora"}
    if not isinstance(peft_type, str) or peft_type not in by_type:
        raise PrefixTuneError(f"{config_path}: peft_type {peft_type!r} is not one of {sorted(by_type)}")
    return by_type[peft_type]


def load_trained(model: nn.Module, directory: str | os.PathLike[str], method: str | None = None):
    """Load what `save_trained` wrote onto a fresh base `model`; the method is detected unless given."""
    if not Path(directory).is_dir():
        raise PrefixTuneError(f"{directory} is not a directory")
    return method_spec(method or detect_method(directory)).load(model, directory)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor for the parameters that train: what a training checkpoint needs (not the frozen base)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    trainable = {id(p): p.numel() for p in model.trainable_parameters()}
    total = {id(p): p.numel() for p in model.parameters()}
    return sum(trainable.values()), sum(total.values())


def _nested_class(cls: type, name: str) -> type | None:
    field = next(f for f in fields(cls) if f.name == name)
    factory = field.default_factory  # type: ignore[misc]
    return factory if isinstance(factory, type) and is_dataclass(factory) else None


def _options(cls: type) -> dict[str, tuple[str, ...]]:
    """option name -> path into the config; nested parts give `part.field`, and `field` where it is unambiguous."""
    known: dict[str, tuple[str, ...]] = {}
    for f in fields(cls):
        sub = _nested_class(cls, f.name)
        if sub is None:
            known[f.name] = (f.name,)
        else:
            known.update({f"{f.name}.{g.name}": (f.name, g.name) for g in fields(sub)})
    leaves = Counter(path[-1] for path in known.values() if len(path) == 2)
    known.update({path[-1]: path for path in list(known.values()) if len(path) == 2 and leaves[path[-1]] == 1})
    return known
