"""Bottleneck adapters: Houlsby et al. (2019) after attention and after the MLP; Pfeiffer et al. (2021) after the MLP.

Each adapter is `h + up(act(down(h)))` on a sublayer's output, before the decoder layer's residual add. They enter
through forward hooks on the attention/MLP modules that `blocks.find_blocks` finds (no per-architecture code) and
live outside the base model, whose state dict never changes. `up` starts at zero, so an untrained adapter is the
identity and training starts exactly from the base model. (Houlsby et al. also train the layer norms; here they
stay frozen, so the adapter is the only thing that trains.)

Saved as `bottleneck_adapter.json` + `bottleneck_adapter.safetensors` (names PEFT does not claim).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .. import peft_format
from ..errors import PrefixTuneError
from .blocks import find_blocks
from .hooked import HookedModel, read_saved

CONFIG_FILE = "bottleneck_adapter.json"
WEIGHTS_FILE = "bottleneck_adapter.safetensors"
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class BottleneckConfig:
    """style: "houlsby" (after attention and MLP) or "pfeiffer" (after MLP only).
    bottleneck_dim: the adapter's inner width (Houlsby et al. tried 8, 64, 256).
    activation: "relu", "gelu", "silu" or "tanh"."""

    style: Literal["houlsby", "pfeiffer"] = "houlsby"
    bottleneck_dim: int = 64
    activation: str = "relu"

    def __post_init__(self) -> None:
        if not isinstance(self.style, str) or self.style not in ("houlsby", "pfeiffer"):
            raise PrefixTuneError(f"style must be 'houlsby' or 'pfeiffer', got {self.style!r}")
        if not isinstance(self.bottleneck_dim, int) or isinstance(self.bottleneck_dim, bool) or self.bottleneck_dim < 1:
            raise PrefixTuneError(f"bottleneck_dim must be an integer >= 1, got {self.bottleneck_dim!r}")
        if not isinstance(self.activation, str) or self.activation not in _ACTIVATIONS:
            raise PrefixTuneError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")

    @property
    def places(self) -> tuple[str, ...]:
        return ("attn", "mlp") if self.style == "houlsby" else ("mlp",)


class Bottleneck(nn.Module):
    """h -> h + up(act(down(h))); `up` is zero at start. (..., H) -> (..., H)."""

    def __init__(self, hidden: int, size: int, activation: str) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


class BottleneckModel(HookedModel):
    """A frozen causal LM with a bottleneck adapter after each decoder layer's attention and/or MLP."""

    def __init__(self, model: nn.Module, config: BottleneckConfig) -> None:
        super().__init__(model)
        self.config = config
        blocks = find_blocks(model)
        hidden = model.get_input_embeddings().weight.shape[1]
        device = next(model.parameters()).device
        self.adapters = nn.ModuleDict()  # "{layer}_{place}" -> Bottleneck
        for index in range(len(blocks.layers)):
            for place in config.places:
                module = blocks.attention(index) if place == "attn" else blocks.mlp(index)
                adapter = Bottleneck(hidden, config.bottleneck_dim, config.activation).to(device)
                self.adapters[f"{index}_{place}"] = adapter
                self._hooks.append(module.register_forward_hook(_apply(adapter)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.adapters.parameters() if p.requires_grad]

    def save_trained(self, directory: str | os.PathLike[str]) -> None:
        meta = {
            "method": "adapter",
            "format_version": 1,
            "adapter": asdict(self.config),
            "num_layers": len(self.adapters) // len(self.config.places),
            "hidden_size": self.base_model.get_input_embeddings().weight.shape[1],
            "base_model_name_or_path": peft_format.model_name(self.base_model),
        }
        self.write(directory, meta, self.adapters.state_dict(), CONFIG_FILE, WEIGHTS_FILE, "adapter")


def _apply(adapter: Bottleneck) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):  # attention modules return (hidden, weights, ...)
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook


def build_bottleneck(model: nn.Module, config: BottleneckConfig, tokenizer: Any = None) -> BottleneckModel:
    return BottleneckModel(model, config)


def load_bottleneck(model: nn.Module, directory: str | os.PathLike[str]) -> BottleneckModel:
    directory = Path(directory)
    meta, tensors, config = read_saved(
        directory, CONFIG_FILE, WEIGHTS_FILE, "adapter", BottleneckConfig, "bottleneck-adapter"
    )
    # the config sizes the layers about to be made: it must agree with the saved weights first (a damaged
    # bottleneck_dim of 10**9 would otherwise allocate gigabytes before load_state_dict could refuse it)
    sizes = {tuple(t.shape)[:1] for k, t in tensors.items() if k.endswith(".down.weight")}
    if sizes != {(config.bottleneck_dim,)}:
        raise PrefixTuneError(
            f"{directory}: bottleneck_dim {config.bottleneck_dim} in {CONFIG_FILE} does not match the saved "
            f"weights (down projections of {sorted(s[0] for s in sizes if s) or 'no'} rows); re-save the adapter"
        )
    wrapped = BottleneckModel(model, config)
    try:
        wrapped.adapters.load_state_dict(tensors)
    except RuntimeError as e:
        wrapped.detach()
        raise PrefixTuneError(
            f"adapter {directory} (made for {meta.get('base_model_name_or_path')}) does not fit "
            f"{peft_format.model_name(model)}: {' '.join(str(e).split())[:400]}"
        ) from None
    return wrapped
