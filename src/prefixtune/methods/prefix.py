"""Prefix-tuning (Li & Liang, 2021): per-layer key/value blocks of P virtual tokens.

Two parameterizations of the same thing, a tensor `kv` of shape (L, 2, H_kv, P, D):
- direct: `kv` itself is the parameter;
- mlp (the paper's reparameterization): `kv = init_kv + MLP(E)`, `E` a (P, k) matrix and `MLP` a tanh MLP
  k -> k -> L*2*H_kv*D whose last layer starts at zero, so training starts exactly at `init_kv`.
Saved adapters always hold the collapsed direct form (PEFT's `prompt_embeddings`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
from torch import nn

from ..errors import PrefixTuneError

Init = Literal["random", "vocab", "text"]
PositionConvention = Literal["peft", "zero"]
# Where a prefix can go: encoder self-attention, decoder self-attention, decoder cross-attention (over the encoder).
LOCATIONS = ("encoder", "decoder", "cross")


@dataclass
class PrefixConfig:
    """How a prefix is shaped, parameterized and initialized.

    num_virtual_tokens: P, the prefix length (virtual tokens per layer).
    reparameterize:     train through Li & Liang's tanh MLP (collapsed to the direct form when saved).
    projection_dim:     k, the width of the (P, k) matrix and of the MLP's hidden layer (paper: 512).
    init:               "random" (N(0, 1) as PEFT), "vocab" (the frozen model's keys/values for sampled
                        vocabulary tokens) or "text" (its keys/values for `init_text`: real-word activations).
    init_text:          the text for init="text", e.g. "table-to-text:"; tiled or cut to P tokens.
    position_convention: "peft" puts real tokens at positions P..P+T-1 (PEFT and the original code);
                        "zero" keeps them at 0..T-1. Decoder-only models only: encoder and encoder-decoder
                        models compute their positions inside the model, so their prefixes always use "zero".
    dropout:            dropout on the prefix keys/values during training.
    locations:          which attention gets a prefix: any of "encoder" (encoder self-attention, also BERT-style
                        models), "decoder" (decoder self-attention, also causal LMs), "cross" (decoder
                        cross-attention over the encoder). None: every kind the model has (Li & Liang's three
                        for BART/T5). Naming one the model lacks is an error.
    head:               a module that trains with the prefix, one copy per adapter (P-tuning v2's classifier):
                        "auto" picks `classifier` or `score` when the model has one, None trains no head, or a
                        dotted module name.
    """

    num_virtual_tokens: int = 20
    reparameterize: bool = True
    projection_dim: int = 512
    init: Init = "vocab"
    init_text: str | None = None
    position_convention: PositionConvention = "peft"
    dropout: float = 0.0
    locations: tuple[str, ...] | None = None
    head: str | None = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.locations, str):  # "encoder,cross" from a command-line override
            self.locations = tuple(loc.strip() for loc in self.locations.split(",") if loc.strip())
        if self.locations is not None and not isinstance(self.locations, (list, tuple)):
            raise PrefixTuneError(f"locations must be a list drawn from {list(LOCATIONS)}, got {self.locations!r}")
        if self.locations is not None:
            if not all(loc in LOCATIONS for loc in self.locations):
                raise PrefixTuneError(f"locations must be a list drawn from {list(LOCATIONS)}, got {self.locations!r}")
            if not self.locations:
                raise PrefixTuneError(f"locations must name at least one of {list(LOCATIONS)} (or be None for all)")
            self.locations = tuple(loc for loc in LOCATIONS if loc in self.locations)
        if self.head is not None and (not isinstance(self.head, str) or not self.head):
            raise PrefixTuneError(f"head must be 'auto', a module name or None, got {self.head!r}")
        if self.init_text is not None and not isinstance(self.init_text, str):
            raise PrefixTuneError(f"init_text must be text, got {self.init_text!r}")
        if self.init_text is not None and self.init == "vocab":
            self.init = "text"
        if not _is_int(self.num_virtual_tokens) or self.num_virtual_tokens < 0:
            raise PrefixTuneError(f"num_virtual_tokens must be an integer >= 0, got {self.num_virtual_tokens!r}")
        if not _is_int(self.projection_dim) or self.projection_dim < 1:
            raise PrefixTuneError(f"projection_dim must be an integer >= 1, got {self.projection_dim!r}")
        if not isinstance(self.reparameterize, bool):
            raise PrefixTuneError(f"reparameterize must be true or false, got {self.reparameterize!r}")
        if self.init not in ("random", "vocab", "text"):
            raise PrefixTuneError(f"init must be 'random', 'vocab' or 'text', got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise PrefixTuneError("init='text' needs init_text, e.g. init_text='table-to-text:'")
        if self.position_convention not in ("peft", "zero"):
            raise PrefixTuneError(f"position_convention must be 'peft' or 'zero', got {self.position_convention!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise PrefixTuneError(f"dropout must be a number in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrefixConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PrefixTuneError(f"unknown prefix config fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)


class PrefixEncoder(nn.Module):
    """One adapter's trainable prefix. `forward()` returns kv: (L, 2, H_kv, P, D)."""

    def __init__(
        self, config: PrefixConfig, num_layers: int, num_kv_heads: int, head_dim: int, init_kv: torch.Tensor
    ) -> None:
        super().__init__()
        self.config = config
        self.shape = (num_layers, 2, num_kv_heads, config.num_virtual_tokens, head_dim)
        if tuple(init_kv.shape) != self.shape:
            raise PrefixTuneError(f"prefix initial value has shape {tuple(init_kv.shape)}, expected {self.shape}")
        self.dropout = nn.Dropout(config.dropout)
        if config.reparameterize:
            k = config.projection_dim
            out = num_layers * 2 * num_kv_heads * head_dim
            self.register_buffer("init_kv", init_kv.detach().clone())
            self.embedding = nn.Parameter(torch.randn(config.num_virtual_tokens, k) * k**-0.5)  # E: (P, k)
            self.mlp = nn.Sequential(nn.Linear(k, k), nn.Tanh(), nn.Linear(k, out))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)
        else:
            self.kv = nn.Parameter(init_kv.detach().clone())
        # Set to [] by efficiency.micro_steps for one optimizer step: the first call stores (kv, a leaf copy of it)
        # here and every call returns the leaf, so the MLP runs once per step however many micro-batches it has.
        self.step_cache: list[torch.Tensor] | None = None

    def forward(self) -> torch.Tensor:
        cache = self.step_cache
        if cache is None:
            return self._compute()
        if not cache:
            kv = self._compute()
            cache += [kv, kv.detach().requires_grad_(kv.requires_grad)]
        return cache[1]

    def _compute(self) -> torch.Tensor:
        if not self.config.reparameterize:
            return self.dropout(self.kv)
        num_layers, _, heads, p, dim = self.shape
        delta = self.mlp(self.embedding)  # (P, L*2*H*D)
        delta = delta.view(p, num_layers, 2, heads, dim).permute(1, 2, 3, 0, 4)  # (L, 2, H, P, D)
        return self.dropout(self.init_kv + delta)

    @torch.no_grad()
    def collapsed(self) -> torch.Tensor:
        """The direct form (L, 2, H_kv, P, D) without dropout: what gets saved."""
        was_training = self.training
        self.eval()
        try:
            return self._compute().detach().clone()
        finally:
            self.train(was_training)

    @torch.no_grad()
    def load_direct(self, kv: torch.Tensor) -> None:
        """Set the prefix to a saved direct-form value (the MLP, if any, restarts from zero around it)."""
        kv = kv.to(dtype=torch.float32)
        if self.config.reparameterize:
            self.init_kv.copy_(kv)
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)
        else:
            self.kv.copy_(kv)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def to_peft_embeddings(kv: torch.Tensor) -> torch.Tensor:
    """(L, 2, H, P, D) -> PEFT's `prompt_embeddings` (P, L*2*H*D)."""
    num_layers, two, heads, p, dim = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(p, num_layers * two * heads * dim).contiguous()


def from_peft_embeddings(emb: torch.Tensor, num_layers: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """PEFT's `prompt_embeddings` (P, L*2*H*D) -> (L, 2, H, P, D)."""
    p = emb.shape[0]
    return emb.view(p, num_layers, 2, num_kv_heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()
