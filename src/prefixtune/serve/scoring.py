"""Prompt log-probabilities (`echo` with `logprobs`): one forward pass over the whole prompt, on the model thread.

The running batch keeps only each prompt's last logits, so a prompt to be scored gets its own pass through the
public `PrefixModel` forward (`adapter_names` per row), right-padded so that each row's real tokens sit at their
own positions 0..T-1 (the prefix's position offset is the model's pre-hook's business, as in every forward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model import PrefixModel
from .logprobs import TokenLogprob, prompt_logprobs

# Padded tokens per scoring pass: bounds its (rows x tokens x vocab) logits. A longer prompt goes alone.
SCORE_TOKENS = 2048


@torch.no_grad()
def score_prompts(
    model: PrefixModel,
    prompts: Sequence[Sequence[int]],
    adapters: Sequence[str],
    ks: Sequence[int],
    pad_token_id: int,
) -> list[tuple[list[TokenLogprob], torch.Tensor]]:
    """For each prompt: its tokens' log-probabilities (the first token's None) with the `ks[i]` likeliest tokens
    at each position, and the logits (V,) after its last token (the first new token's distribution)."""
    device = next(model.base_model.parameters()).device
    results: list[tuple[list[TokenLogprob], torch.Tensor] | None] = [None] * len(prompts)
    for group in _groups([len(p) for p in prompts]):
        width = max(len(prompts[i]) for i in group)
        ids = torch.full((len(group), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, : len(prompts[i])] = torch.tensor(list(prompts[i]), dtype=torch.long)
            mask[row, : len(prompts[i])] = 1
        positions = torch.arange(width, dtype=torch.long).expand(len(group), width)
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            adapter_names=[adapters[i] for i in group],
            use_cache=False,
        )
        logits = out.logits  # (B, T, V)
        for row, i in enumerate(group):
            n = len(prompts[i])
            results[i] = (prompt_logprobs(logits[row, :n], prompts[i], ks[i]), logits[row, n - 1].float())
    return [r for r in results if r is not None]


def _groups(lengths: list[int]) -> list[list[int]]:
    """Consecutive prompts whose padded size stays within SCORE_TOKENS (each prompt in exactly one group)."""
    groups: list[list[int]] = []
    width = 0
    for i, n in enumerate(lengths):
        if groups and max(width, n) * (len(groups[-1]) + 1) <= SCORE_TOKENS:
            groups[-1].append(i)
            width = max(width, n)
        else:
            groups.append([i])
            width = n
    return groups
