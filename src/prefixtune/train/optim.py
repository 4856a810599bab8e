"""The optimizer of a run: AdamW with one parameter group per task, warmup + decay, gradient clipping per task.

One group, one schedule and one clip per task: in a multi-task run one task's step never scales another's, so
each prefix is updated as in its own run (step.py); a plain run is the one-task case.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .. import data
from ..config import TrainConfig
from ..methods.registry import method_spec
from .tasks import TaskLoop

AUTO_WARMUP_MAX = 20  # the fixed default before warmup followed the run's length


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """`warmup_steps`, or by default a tenth of the run's `total` steps (rounded up), at most 20: a fixed 20 would
    keep a short run (one epoch of 50 examples is 7 steps of 8) below its peak rate from start to end."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return min(AUTO_WARMUP_MAX, math.ceil(total / 10))


def schedule(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """The learning-rate factor of each step: linear warmup, then linear or cosine decay over `total` (or none)."""
    warmup = warmup_steps(cfg, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return factor


def targets_per_step(encoded: Sequence[data.EncodedExample], cfg: TrainConfig) -> float | None:
    """The mean number of target tokens (labels that get a loss) an optimizer step averages over: the mean per
    example x `batch_size` (the global batch, however many processes share it) x `grad_accum`. None: no data."""
    if not encoded:
        return None
    targets = sum(sum(1 for t in e.labels if t != data.IGNORE_INDEX) for e in encoded)
    return targets / len(encoded) * cfg.batch_size * cfg.grad_accum


def default_lr(cfg: TrainConfig, encoded: Sequence[data.EncodedExample]) -> float:
    """`cfg.method`'s default rate for this data (`MethodSpec.default_lr_for`): what `prefixtune train` uses when
    no rate is given, and the centre of `prefixtune compare`'s sweep."""
    return method_spec(cfg.method).default_lr_for(targets_per_step(encoded, cfg))


def build_optimizer(
    cfg: TrainConfig, tasks: Sequence[TaskLoop], lr: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over each task's parameters (one group per task) and the per-task schedule of its total steps."""
    optimizer = torch.optim.AdamW([{"params": t.params} for t in tasks], lr=lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule(cfg, t.total_steps) for t in tasks])
    return optimizer, scheduler


def grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """The total gradient norm of `params`, clipped to `max_norm` first when clipping is on."""
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
