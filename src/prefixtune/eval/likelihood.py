"""Scoring by likelihood: the one loop behind validation during training, perplexity, and label-word accuracy.

`scored_batches` runs the model over batches (each with the adapter that scores it) and hands back logits and
targets (eval/objective.py); the callers only reduce them: `summed_losses` to a summed loss and target count
per adapter (validation, perplexity), `most_likely_labels` to each candidate label's log-likelihood.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from .. import data
from ..cache_argument import cache_argument
from ..devices import input_device
from .objective import (
    NEXT_TOKEN,
    Objective,
    keeps_positions,
    objective_for,
    pad_token_id,
    row_losses,
    summed_loss,
)

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
    scores = label_loglikelihoods(
        model, tokenizer, examples, labels, max_length=max_length, chat_template=chat_template, batch_size=batch_size
    )
    return [labels[i] for i in scores.argmax(-1).tolist()]


def label_loglikelihoods(
    model: Any,
    tokenizer: Any,
    examples: Sequence[data.Example],
    labels: Sequence[str],
    *,
    max_length: int,
    chat_template: bool = False,
    batch_size: int = 8,
    shared_prompt: bool | None = None,
) -> torch.Tensor:
    """(N, L) log-likelihood of each label's tokens (plus EOS) after each example's prompt.

    A causal LM that continues its own KV cache reads each prompt once (`shared_prompt`, the default where the
    model supports it): the prompt runs once per example and only the L labels' few tokens run per candidate,
    from copies of its cache, instead of L full (prompt + label) sequences. `shared_prompt=False` scores every
    candidate sequence from scratch, which the tests hold the shared path to."""
    candidates = [  # a conversation's candidates score the final answer only
        data.Example(e.source, label, messages=e.messages, loss_from=len(e.messages or ()), where=e.where)
        for e in examples
        for label in labels
    ]
    encoded, _ = data.encode(candidates, tokenizer, max_length=max_length, chat_template=chat_template)
    if not encoded:
        return torch.empty(0, len(labels))
    encoded = sorted(encoded, key=lambda e: e.index)
    pad_id = pad_token_id(tokenizer)
    rows = [encoded[i : i + len(labels)] for i in range(0, len(encoded), len(labels))]  # one example's candidates
    shared = [_shared_length(candidates) for candidates in rows]
    if shared_prompt is None:
        shared_prompt = continues_cache(model)
    shared_prompt = shared_prompt and min(shared) > 0  # a one-token prompt has nothing to share before its target
    if shared_prompt:
        return _shared_prompt_scores(model, rows, shared, batch_size, pad_id)
    groups = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    items = [(None, data.batches(g, len(g), shuffle=False, bucket_by_length=False, pad_id=pad_id)[0]) for g in groups]
    scores = torch.cat(
        [-row_losses(logits, targets) for _, logits, targets in scored_batches(model, NEXT_TOKEN, items)]
    )
    return scores.view(len(examples), len(labels))


def continues_cache(model: Any) -> bool:
    """Whether a forward of `model` continues a KV cache it is given as the base model does: a causal LM, bare or
    under a method that leaves the cache to it (not a soft prompt, which prepends its tokens to every call)."""
    from ..methods.prompt import PromptModel  # methods/ imports eval/: imported here, not at the top

    if isinstance(getattr(model, "module", model), PromptModel):
        return False
    base = _causal_lm(model)
    if not isinstance(base, PreTrainedModel) or base.config.is_encoder_decoder:
        return False
    return cache_argument(type(base)) in inspect.signature(type(base).forward).parameters


@torch.no_grad()
def _shared_prompt_scores(
    model: Any,
    rows: Sequence[Sequence[data.EncodedExample]],
    shared: Sequence[int],
    batch_size: int,
    pad_id: int,
) -> torch.Tensor:
    """`label_loglikelihoods` reading each prompt once: per example, the tokens all its L candidates share up to
    the token before the first target run once into a cache (left-padded batches of examples, explicit positions);
    the cache is repeated L times and each candidate's remaining tokens (right-padded) are scored from it."""
    model.eval()
    device = input_device(model)
    cache_kwarg = cache_argument(type(_causal_lm(model)))
    num_labels = len(rows[0])
    out = torch.empty(len(rows), num_labels)
    for start in range(0, len(rows), batch_size):
        group = range(start, min(start + batch_size, len(rows)))
        width = max(shared[i] for i in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, width - shared[i] :] = torch.tensor(rows[i][0].input_ids[: shared[i]])
            mask[row, width - shared[i] :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            **{cache_kwarg: cache},
            **({"logits_to_keep": 1} if keeps_positions(model) else {}),
        )
        cache.batch_repeat_interleave(num_labels)
        rest = [(rows[i][j], shared[i]) for i in group for j in range(num_labels)]
        length = max(len(e.input_ids) - k for e, k in rest)
        cont_ids = torch.full((len(rest), length), pad_id, dtype=torch.long)
        cont_labels = torch.full((len(rest), length), data.IGNORE_INDEX, dtype=torch.long)
        cont_mask = torch.zeros((len(rest), length), dtype=torch.long)
        for row, (e, k) in enumerate(rest):
            n = len(e.input_ids) - k
            cont_ids[row, :n] = torch.tensor(e.input_ids[k:])
            cont_labels[row, :n] = torch.tensor(e.labels[k:])
            cont_mask[row, :n] = 1
        past = torch.tensor([shared[i] for i in group]).repeat_interleave(num_labels)
        logits = model(
            input_ids=cont_ids.to(device),
            attention_mask=torch.cat([mask.repeat_interleave(num_labels, dim=0), cont_mask], dim=1).to(device),
            position_ids=(past[:, None] + torch.arange(length)[None, :]).to(device),
            use_cache=True,
            **{cache_kwarg: cache},
        ).logits
        scores = -row_losses(logits[:, :-1], cont_labels[:, 1:].to(logits.device))
        out[group.start : group.stop] = scores.view(len(group), num_labels).cpu()
    return out


def _shared_length(candidates: Sequence[data.EncodedExample]) -> int:
    """How many leading tokens all of one example's candidates share, stopping before the token that predicts the
    first target (so every target is predicted inside the per-candidate part); 0 where nothing can be shared."""
    first_target = min(next(p for p, t in enumerate(e.labels) if t != data.IGNORE_INDEX) for e in candidates)
    common = 0
    reference = candidates[0].input_ids
    while common < first_target - 1 and all(
        len(e.input_ids) > common and e.input_ids[common] == reference[common] for e in candidates
    ):
        common += 1
    return common


def _causal_lm(model: Any) -> Any:
    """The transformers model under any wrapper (DDP, PrefixModel, PEFT, a hooked method): the outermost one."""
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)
