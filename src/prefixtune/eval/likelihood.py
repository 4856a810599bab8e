"""Scoring by likelihood: the one loop behind validation during training, perplexity, and label-word accuracy.

`scored_batches` runs the model over batches (each with the adapter that scores it) and hands back logits and
targets (eval/objective.py); the callers only reduce them: `summed_losses` to a summed loss and target count
per adapter (validation, perplexity), `most_likely_labels` to each candidate label's log-likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch

from .. import data
from ..devices import input_device
from .objective import NEXT_TOKEN, Objective, objective_for, pad_token_id, row_losses, summed_loss

# (adapter name, batch): the adapter that scores the batch's rows; None for the model's active adapter (or none)
Item = tuple[Any, dict[str, torch.Tensor]]


@torch.no_grad()
def scored_batches(
    model: Any,
    objective: Objective,
    items: Sequence[Item],
    *,
    device: torch.device | None = None,
    rank: int = 0,
    world: int = 1,
    lockstep: bool = False,
) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]:
    """(adapter name, logits (B, K, V), targets (B, K)) of each batch that process `rank` of `world` scores:
    every `world`-th item, from the `rank`-th. With `lockstep` (FSDP gathers weights in every forward) each process
    runs as many forwards as the process with the most batches; the extra ones score a batch it does not count."""
    mine = items[rank::world]
    rounds = math.ceil(len(items) / world) if lockstep else len(mine)
    model.eval()
    device = device if device is not None else input_device(model)
    for i in range(rounds):
        name, batch = mine[i] if i < len(mine) else items[0]
        batch = {k: v.to(device) for k, v in batch.items()}
        rows = batch["input_ids"].shape[0]
        names = [name] * rows if name is not None else None
        logits, targets = objective.logits(model, batch, target_only=False, adapter_names=names)
        if i < len(mine):
            yield name, logits, targets


def summed_losses(
    model: Any,
    objective: Objective,
    items: Sequence[Item],
    *,
    device: torch.device | None = None,
    rank: int = 0,
    world: int = 1,
    lockstep: bool = False,
) -> dict[Hashable, tuple[float, int]]:
    """Per adapter name of `items`: the summed loss of its targets in the batches this process scores, and their
    count (every name is there, with (0.0, 0) where this process scored none of its batches)."""
    sums = {name: [0.0, 0] for name in dict.fromkeys(name for name, _ in items)}
    shard = dict(device=device, rank=rank, world=world, lockstep=lockstep)
    for name, logits, targets in scored_batches(model, objective, items, **shard):
        sums[name][0] += float(summed_loss(logits, targets))
        sums[name][1] += int((targets != data.IGNORE_INDEX).sum())
    return {name: (float(total), int(count)) for name, (total, count) in sums.items()}


def encoded_batches(
    objective: Objective,
    examples: Sequence[data.Example],
    tokenizer: Any,
    *,
    max_length: int,
    batch_size: int,
    chat_template: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """The batches that score `examples` (in length buckets; the order does not change a sum)."""
    encoded, _ = objective.encode(
        objective.scored(examples), tokenizer, max_length=max_length, chat_template=chat_template
    )
    return data.batches(encoded, batch_size, shuffle=False, pad_id=pad_token_id(tokenizer))


def target_nll(
    model: Any,
    tokenizer: Any,
    examples: Sequence[data.Example],
    *,
    max_length: int,
    batch_size: int = 8,
    chat_template: bool = False,
) -> tuple[float, int]:
    """Summed negative log-likelihood of the examples' targets and their count: target tokens (EOS included) for a
    language model, the examples' classes for a sequence classifier."""
    objective = objective_for(model)
    batches = encoded_batches(
        objective, examples, tokenizer, max_length=max_length, batch_size=batch_size, chat_template=chat_template
    )
    return summed_losses(model, objective, [(None, b) for b in batches]).get(None, (0.0, 0))


def most_likely_labels(
    model: Any,
    tokenizer: Any,
    examples: Sequence[data.Example],
    labels: Sequence[str],
    *,
    max_length: int,
    chat_template: bool = False,
    batch_size: int = 8,
) -> list[str]:
    """For each example, the label whose word (plus EOS) the model finds most likely after the prompt."""
    candidates = [  # a conversation's candidates score the final answer only
        data.Example(e.source, label, messages=e.messages, loss_from=len(e.messages or ()), where=e.where)
        for e in examples
        for label in labels
    ]
    encoded, _ = data.encode(candidates, tokenizer, max_length=max_length, chat_template=chat_template)
    if not encoded:
        return []
    pad_id = pad_token_id(tokenizer)
    groups = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    items = [(None, data.batches(g, len(g), shuffle=False, bucket_by_length=False, pad_id=pad_id)[0]) for g in groups]
    scores = torch.cat(
        [-row_losses(logits, targets) for _, logits, targets in scored_batches(model, NEXT_TOKEN, items)]
    )
    by_example = torch.empty(len(encoded))
    by_example[torch.tensor([e.index for e in encoded])] = scores
    best = by_example.view(len(examples), len(labels)).argmax(-1)
    return [labels[i] for i in best.tolist()]
