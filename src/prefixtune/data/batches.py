"""Token ids -> padded batches: length buckets, a seeded order per epoch, prompt-only batches for generation."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from ..errors import PrefixTuneError
from .prompts import IGNORE_INDEX, EncodedExample


def _ordered_groups(lengths: list[int], batch_size: int, shuffle: bool, seed: int, bucket: bool) -> list[list[int]]:
    """Indices grouped into batches. Bucketing sorts windows of 50 batches by length, so that a batch holds
    similar lengths (little padding) while shuffling still mixes the data; then the batch order is shuffled."""
    if batch_size < 1:
        raise PrefixTuneError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if bucket:
        window = batch_size * 50 if shuffle else max(len(order), 1)
        order = [
            i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=lengths.__getitem__)
        ]
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle and bucket:
        rng.shuffle(groups)
    return groups


def batches(
    encoded: Sequence[EncodedExample],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    bucket_by_length: bool = True,
    pad_id: int,
) -> list[dict[str, torch.Tensor]]:
    """Right-padded training batches: input_ids, attention_mask (B, T) and labels (B, T) with -100 on padding.

    Deterministic for a given seed; pass a different seed per epoch to reshuffle.
    """
    lengths = [len(e.input_ids) for e in encoded]
    out = []
    for group in _ordered_groups(lengths, batch_size, shuffle, seed, bucket_by_length):
        width = max(lengths[i] for i in group)
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            n = lengths[i]
            input_ids[row, :n] = torch.tensor(encoded[i].input_ids)
            labels[row, :n] = torch.tensor(encoded[i].labels)
            attention_mask[row, :n] = 1
        out.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return out


def prompt_batches(
    prompts: Sequence[Sequence[int]], batch_size: int, *, pad_id: int, bucket_by_length: bool = True
) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """Left-padded generation batches: (indices into prompts, {input_ids, attention_mask} (B, T)).

    Left padding keeps every row's last prompt token in the last column, where generation continues.
    With bucketing the prompts are sorted by length, so use the indices to put outputs back in order.
    """
    lengths = [len(p) for p in prompts]
    if any(n == 0 for n in lengths):
        raise PrefixTuneError("an empty prompt cannot be generated from")
    out = []
    for group in _ordered_groups(lengths, batch_size, False, 0, bucket_by_length):
        width = max(lengths[i] for i in group)
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            input_ids[row, width - lengths[i] :] = torch.tensor(prompts[i])
            attention_mask[row, width - lengths[i] :] = 1
        out.append((group, {"input_ids": input_ids, "attention_mask": attention_mask}))
    return out
