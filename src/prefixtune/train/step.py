"""One optimizer step's forwards and backwards, the same code for one task or several, one process or several.

Micro-batch m of a step is every active task's micro-batch m (the very one its own single-task run takes),
stacked into one global batch whose rows name their adapter (tasks.merge); a plain run has one task and so its
own batch. The loss is the sum over tasks of each task's mean target loss (its summed target losses over its
own target count in the global batch), not one mean over all targets, which would couple the tasks through the
shared denominator. A row sees only its own task's prefix and the base is frozen, so each prefix gets exactly the
gradient of its own run; with one AdamW parameter group, one schedule and one gradient clip per task (optim.py),
each prefix is updated as in its own run, up to floating-point rounding.

Several processes (distributed.py) build the same global batch; each computes the summed losses of its share of
the rows over the global target counts, times the number of processes: DDP's gradient average then equals the
single-process gradient of the global batch. With one task and one process the loss is exactly the batch's mean
target loss over `grad_accum`, computed as it always was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..efficiency import micro_steps
from ..eval.objective import Objective, summed_loss, token_losses
from .distributed import Runtime
from .tasks import TaskLoop, merge


def global_batch(
    tasks: Sequence[TaskLoop], index: int, cfg: TrainConfig, pad_id: int
) -> tuple[dict[str, torch.Tensor], list[str | None]]:
    """Micro-batch `index` of every task, stacked (task by task), and the task (adapter) name of each row."""
    parts = [(t.name, t.micro_batch(index, cfg, pad_id)) for t in tasks]
    if len(parts) == 1:
        name, batch = parts[0]
        return batch, [name] * batch["input_ids"].shape[0]
    merged, names = merge(parts, pad_id)  # type: ignore[arg-type]  # several tasks: every one has a name
    return merged, list(names)


def train_step(
    model: nn.Module,
    objective: Objective,
    tasks: Sequence[TaskLoop],
    micro: int,
    cfg: TrainConfig,
    pad_id: int,
    runtime: Runtime,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> tuple[dict[str | None, float], int]:
    """Forward and backward of one optimizer step's `cfg.grad_accum` micro-batches, from micro-batch `micro` on.

    Returns each task's loss (its mean target loss, averaged over the micro-batches) and the number of tokens in
    the global batches. The gradients are left in the parameters (reduced over processes) for the optimizer.
    """
    names = [t.name for t in tasks]
    losses = dict.fromkeys(names, 0.0)
    tokens = 0
    share = cfg.prefix_once_per_step and not runtime.distributed  # DDP reduces gradients inside backward
    for k in micro_steps(model, cfg.grad_accum, share_prefix=share):
        batch, row_names = global_batch(tasks, micro + k, cfg, pad_id)
        tokens += int(batch["attention_mask"].sum())
        count = dict.fromkeys(names, 0)  # each task's targets in the global micro-batch
        for name, n in zip(row_names, objective.target_counts(batch).tolist()):
            count[name] += n
        rows = runtime.rows(len(row_names))
        real = len(rows) > 0
        if not real:  # more processes than rows: a zero-weight copy of row 0 keeps this process in step
            rows = range(0, 1)
        local = {key: value[rows.start : rows.stop].to(runtime.device) for key, value in batch.items()}
        local_names = row_names[rows.start : rows.stop]
        adapter_names = None if local_names[0] is None else local_names  # a plain run: the active adapter
        weight = runtime.world * float(real)
        with runtime.no_sync(model, sync=k == cfg.grad_accum - 1):
            with autocast():
                logits, targets = objective.logits(
                    model, local, target_only=cfg.target_only_logits, adapter_names=adapter_names
                )
                sums = _summed_by_task(logits, targets, local_names)
            parts = []
            for name, summed in sums:
                mean = summed / max(count[name], 1)  # this process's share of the task's mean target loss
                parts.append(mean / cfg.grad_accum * weight)
                losses[name] += float(mean.detach()) * weight / cfg.grad_accum
            sum(parts[1:], parts[0]).backward()
    if runtime.fsdp:
        runtime.average_gradients([p for t in tasks for p in t.params])
    totals = runtime.sum([losses[n] for n in names])
    return {n: v / runtime.world for n, v in zip(names, totals)}, tokens


def _summed_by_task(
    logits: torch.Tensor, targets: torch.Tensor, row_names: Sequence[str | None]
) -> list[tuple[str | None, torch.Tensor]]:
    """Each task's summed target loss over its rows (the rows are stacked task by task).

    Rows of one task (a plain run) take the fused sum, exactly as plain runs always did; rows of several take
    per-target losses once and sum each task's rows (slicing the logits per task would allocate a gradient of the
    whole logits once per task).
    """
    spans: list[tuple[str | None, int, int]] = []  # (task, first row, last row + 1)
    for i, name in enumerate(row_names):
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], i + 1)
        else:
            spans.append((name, i, i + 1))
    if len(spans) == 1:
        return [(spans[0][0], summed_loss(logits, targets))]
    per_target = token_losses(logits, targets)  # (B, K)
    return [(name, per_target[a:b].sum()) for name, a, b in spans]


def nonfinite(losses: dict[Any, float], norms: dict[Any, float]) -> str | None:
    """What is not finite in this step (None: nothing)."""
    for what, values in (("loss", losses), ("gradient norm", norms)):
        for name, value in values.items():
            if not math.isfinite(value):
                return f"{f'task {name}: ' if name is not None else ''}the {what} is {value}"
    return None


def nonfinite_stop(step: int, problem: str, out: Path, saved_at: int | None) -> str:
    """The error of a run stopped at a non-finite step (on_nonfinite=stop): what to do, with which checkpoint."""
    kept = (
        f"the checkpoint of step {saved_at} in {out} is kept: continue with --resume on_nonfinite=skip, or start "
        "again with a lower learning rate"
        if saved_at is not None
        else "no checkpoint was saved yet (set --save-every); start again with a lower learning rate or "
        "on_nonfinite=skip"
    )
    return f"step {step}: {problem}; training stopped before the update. {kept}"
