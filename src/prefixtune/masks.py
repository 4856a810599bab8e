"""The dense masks of the general path: a skipped mask made explicit, and a 4D mask widened with prefix columns."""

from __future__ import annotations

import torch
from torch import Tensor


def implicit_mask(q_len: int, kv_len: int, rows: int, causal: bool, device: torch.device) -> Tensor:
    """(rows, 1, q_len, kv_len) bool: what a skipped (None) mask means; causal ones are bottom-right aligned."""
    if not causal:
        return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device).expand(rows, 1, q_len, kv_len)
    i = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    j = torch.arange(kv_len, device=device)[None, :]
    return (j <= i)[None, None].expand(rows, 1, q_len, kv_len)


def widen_mask(
    mask: Tensor | None, visible: Tensor, q_len: int, kv_len: int, dtype: torch.dtype, eager: bool, causal: bool
) -> Tensor:
    """Prepend the prefix columns (visible: (B, P)) to a 4D mask. Bool: True = attend; float: additive (0 or min)."""
    rows, p = visible.shape
    if mask is None:
        mask = implicit_mask(q_len, kv_len, rows, causal, visible.device)
        if eager:
            mask = torch.zeros((), dtype=dtype, device=visible.device).masked_fill(~mask, torch.finfo(dtype).min)
    mask = mask.expand(rows, -1, -1, -1)  # (B, 1|H, T, S)
    prefix_part = visible[:, None, None, :].expand(rows, mask.shape[1], mask.shape[2], p)  # (B, 1|H, T, P)
    if mask.dtype != torch.bool:
        zero = torch.zeros((), dtype=mask.dtype, device=mask.device)
        prefix_part = zero.masked_fill(~prefix_part, torch.finfo(mask.dtype).min).expand_as(prefix_part)
    return torch.cat([prefix_part, mask], dim=-1)  # (B, 1|H, T, P + S)
