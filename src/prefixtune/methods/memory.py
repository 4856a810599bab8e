"""The decoupled prefix of PrefixMemory-Tuning (Wang et al., ICLR 2026, arXiv 2506.13674), as `prefix-memory`.

A prefix inside the softmax competes with the input for attention weight: the longer the input, the less the prefix
counts, and the longer the prefix, the less the input does. PrefixMemory-Tuning moves the prefix out of the softmax
and adds a query-dependent term to each head's attention output instead, a linear-attention memory:

    o_i = softmax-attention(q_i, K, V) + phi(q_i) M_h / (phi(q_i) . 1)     M_h: (D, D) per head and layer, trained

We read it as follows (the paper's code was not available here): phi is elu(x) + 1, Katharopoulos et al.'s (2020)
linear-attention feature map, applied to the head's query as `q_proj` makes it (before any query norm or RoPE, so
the memory does not depend on positions); M starts at zero, so training starts exactly from the base model. The
denominator is linear attention's normalizer for a memory whose keys sum to one: it makes the term a weighted mean of
M's rows, in the units of the values whatever the size of the model's queries (`normalize=false` drops it; without
it one AdamW step at 1e-3 moved smollm2-135m's training loss from 1.9 to 11, its queries being large). The
term enters through two hooks per attention module: one keeps the output of its `q_proj` (the query the model
computes anyway), the other adds the term to the input of its `o_proj` (the heads' attention outputs). That needs
no per-architecture code beyond those two projections (Llama, Mistral, Qwen, Gemma ...); models without them are
refused in one line. No projection runs twice; decoding needs no cache of its own.

Saved as `prefix_memory.json` + `prefix_memory.safetensors` (names PEFT does not claim).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .. import peft_format
from ..errors import PrefixTuneError
from .blocks import find_blocks
from .hooked import HookedModel, read_saved

CONFIG_FILE = "prefix_memory.json"
WEIGHTS_FILE = "prefix_memory.safetensors"
_FEATURE_MAPS = ("elu", "relu")


@dataclass
class PrefixMemoryConfig:
    """feature_map: phi, "elu" (elu(x) + 1, positive) or "relu".
    normalize: divide the term by phi(q) . 1 (a weighted mean of the memory's rows)."""

    feature_map: str = "elu"
    normalize: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.normalize, bool):
            raise PrefixTuneError(f"normalize must be true or false, got {self.normalize!r}")
        if not isinstance(self.feature_map, str) or self.feature_map not in _FEATURE_MAPS:
            raise PrefixTuneError(f"feature_map must be one of {list(_FEATURE_MAPS)}, got {self.feature_map!r}")


def _projections(attention: nn.Module) -> tuple[nn.Linear, nn.Linear, int]:
    """(q_proj, o_proj, head_dim) of an attention module, or a one-line refusal."""
    q_proj, o_proj = getattr(attention, "q_proj", None), getattr(attention, "o_proj", None)
    if not isinstance(q_proj, nn.Linear) or not isinstance(o_proj, nn.Linear):
        raise PrefixTuneError(
            f"prefix-memory needs attention modules with q_proj and o_proj linear layers (Llama, Mistral, Qwen, "
            f"Gemma ...); {type(attention).__name__} has {sorted(n for n, _ in attention.named_children())}"
        )
    head_dim = getattr(attention, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim < 1 or q_proj.out_features % head_dim:
        raise PrefixTuneError(f"{type(attention).__name__}: no head_dim that divides q_proj's {q_proj.out_features}")
    return q_proj, o_proj, head_dim


class PrefixMemoryModel(HookedModel):
    """A frozen causal LM whose every attention head adds phi(q) M_h to its output."""

    def __init__(self, model: nn.Module, config: PrefixMemoryConfig) -> None:
        super().__init__(model)
        self.config = config
        blocks = find_blocks(model)
        attentions = [blocks.attention(i) for i in range(len(blocks.layers))]
        shapes = [_projections(a) for a in attentions]
        device = next(model.parameters()).device
        self.memory = nn.ParameterList(
            nn.Parameter(torch.zeros(q.out_features // d, d, d, device=device)) for q, _, d in shapes
        )  # one (H, D, D) per layer, float32
        for (q_proj, o_proj, head_dim), memory in zip(shapes, self.memory):
            queries: list[torch.Tensor] = []
            self._hooks.append(q_proj.register_forward_hook(_keep_query(queries)))
            self._hooks.append(o_proj.register_forward_pre_hook(_add_memory(queries, head_dim, memory, config)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.memory)

    def save_trained(self, directory: str | os.PathLike[str]) -> None:
        meta = {
            "method": "prefix-memory",
            "format_version": 1,
            "memory": asdict(self.config),
            "shapes": [list(m.shape) for m in self.memory],
            "base_model_name_or_path": peft_format.model_name(self.base_model),
        }
        tensors = {f"memory.{i}": m for i, m in enumerate(self.memory)}
        self.write(directory, meta, tensors, CONFIG_FILE, WEIGHTS_FILE, "prefix memory")


def _keep_query(queries: list[torch.Tensor]) -> Any:
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        queries[:] = [output]  # (B, T, H * D)

    return hook


def _add_memory(queries: list[torch.Tensor], head_dim: int, memory: nn.Parameter, config: PrefixMemoryConfig) -> Any:
    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        query = queries.pop()
        query = query.view(*query.shape[:-1], -1, head_dim).to(memory.dtype)  # (B, T, H, D)
        phi = F.elu(query) + 1 if config.feature_map == "elu" else F.relu(query)
        if config.normalize:
            phi = phi / phi.sum(-1, keepdim=True).clamp_min(1e-6)
        term = torch.einsum("bthd,hde->bthe", phi, memory).flatten(-2)  # (B, T, H * D)
        return (args[0] + term.to(args[0].dtype), *args[1:])  # o_proj's input: the heads' attention outputs

    return pre_hook


def build_memory(model: nn.Module, config: PrefixMemoryConfig, tokenizer: Any = None) -> PrefixMemoryModel:
    return PrefixMemoryModel(model, config)


def load_memory(model: nn.Module, directory: str | os.PathLike[str]) -> PrefixMemoryModel:
    directory = Path(directory)
    meta, tensors, config = read_saved(
        directory, CONFIG_FILE, WEIGHTS_FILE, "memory", PrefixMemoryConfig, "prefix-memory"
    )
    wrapped = PrefixMemoryModel(model, config)
    expected = {f"memory.{i}": tuple(m.shape) for i, m in enumerate(wrapped.memory)}
    found = {k: tuple(t.shape) for k, t in tensors.items()}
    if found != expected:
        wrapped.detach()
        raise PrefixTuneError(
            f"prefix memory {directory} (made for {meta.get('base_model_name_or_path')}) does not fit "
            f"{peft_format.model_name(model)}: it holds {len(found)} layers of {sorted(set(found.values()))[:2]}, "
            f"the model needs {len(expected)} of {sorted(set(expected.values()))[:2]}"
        )
    with torch.no_grad():
        for i, m in enumerate(wrapped.memory):
            m.copy_(tensors[f"memory.{i}"])
    return wrapped
