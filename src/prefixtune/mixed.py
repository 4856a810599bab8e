"""One optimizer step over a mixed, possibly sharded, global batch; validation of several tasks at once.

train.py runs the loop; this file holds what a multi-task or multi-process step does differently from the plain
single-process step (see train.py's docstring for why the losses are weighted as they are).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import classify, data, distributed, tasks
from .config import TrainConfig
from .efficiency import micro_steps
from .errors import PrefixTuneError
from .loss import row_nll
from .methods.registry import make_config


@dataclass
class TaskLoop:
    """One task in the loop: its batches, schedule length, parameters and validation record."""

    name: str | None  # None: the one task of a plain run
    encoded: list[data.EncodedExample]
    validation: list[data.Example]
    per_epoch: int  # micro-batches per epoch
    total_steps: int
    params: list[nn.Parameter] = field(default_factory=list)
    best: float | None = None
    bad_evals: int = 0
    stopped: bool = False
    steps: int = 0
    _epoch: dict[int, list[dict[str, torch.Tensor]]] = field(default_factory=dict)

    def trains_at(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) trains this task."""
        return step < self.total_steps and not self.stopped

    def micro_batch(self, index: int, cfg: TrainConfig, pad_id: int) -> dict[str, torch.Tensor]:
        epoch = index // self.per_epoch
        if epoch not in self._epoch:
            self._epoch.clear()
            self._epoch[epoch] = data.batches(
                self.encoded,
                cfg.batch_size,
                shuffle=True,
                seed=cfg.seed * 1000 + epoch,
                bucket_by_length=cfg.bucket_by_length,
                pad_id=pad_id,
            )
        return self._epoch[epoch][index % self.per_epoch]

    def record(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals, "stopped": self.stopped, "steps": self.steps}


def add_task_adapters(model: Any, cfg: TrainConfig, loops: list[TaskLoop], init_rng: torch.Tensor) -> None:
    """One adapter per task, each initialized from the RNG state its own single-task run would start from.

    The method builds its first adapter ("default"); it is removed (or frozen, where the method cannot remove
    one), so that only the tasks' adapters train.
    """
    if not all(hasattr(model, verb) for verb in ("add_adapter", "save_adapter")):
        raise PrefixTuneError(
            f"method {cfg.method!r} shares trainable weights between its adapters, so it cannot train one per task; "
            "use --method prefix or prompt, or train one task at a time"
        )
    default = list(model.trainable_parameters())
    for t in loops:
        torch.set_rng_state(init_rng)
        before = {id(p) for p in model.trainable_parameters()}
        model.add_adapter(t.name, make_config(cfg.method, cfg.options))
        t.params = [p for p in model.trainable_parameters() if id(p) not in before]
    if hasattr(model, "delete_adapter"):
        model.delete_adapter("default")
    else:
        for p in default:
            p.requires_grad_(False)
    if hasattr(model, "set_adapter"):
        model.set_adapter(loops[0].name)
    else:
        model.active_adapter = loops[0].name


def train_step(
    model: Any,
    active: list[TaskLoop],
    micro: int,
    cfg: TrainConfig,
    pad_id: int,
    runtime: distributed.Runtime,
    autocast: Any,
) -> tuple[dict[Any, float], int]:
    """Forward and backward of one optimizer step's micro-batches; returns each task's loss and the token count.

    Row r of task t is weighted world / (N_t * grad_accum), N_t the target tokens of task t in the global
    micro-batch: summed over processes and micro-batches, task t's gradient is the mean-loss gradient of its run.
    """
    names = [t.name for t in active]
    losses = dict.fromkeys(names, 0.0)
    tokens = 0
    share = cfg.prefix_once_per_step and not runtime.distributed  # DDP reduces gradients inside backward
    for k in micro_steps(model, cfg.grad_accum, share_prefix=share):
        parts = [(t.name, t.micro_batch(micro + k, cfg, pad_id)) for t in active]
        if len(parts) == 1 and parts[0][0] is None:
            batch, row_names = parts[0][1], None
            row_task = [None] * batch["input_ids"].shape[0]
        else:
            batch, row_names = tasks.merge(parts, pad_id)
            row_task = row_names
        tokens += int(batch["attention_mask"].sum())
        targets = (batch["labels"][:, 1:] != data.IGNORE_INDEX).sum(dim=1)  # (B,) target tokens per row
        count = {n: 0 for n in names}
        for n, c in zip(row_task, targets.tolist()):
            count[n] += c
        scale = [runtime.world / (max(count[n], 1) * cfg.grad_accum) for n in row_task]
        rows = runtime.rows(len(row_task))
        real = len(rows) > 0
        if not real:  # more processes than rows: a zero-weight copy of row 0 keeps this process in step
            rows = range(0, 1)
        local = {key: value[rows.start : rows.stop].to(runtime.device) for key, value in batch.items()}
        weight = torch.tensor(scale[rows.start : rows.stop], device=runtime.device) * float(real)
        local_names = row_names[rows.start : rows.stop] if row_names is not None else None
        with runtime.no_sync(model, sync=k == cfg.grad_accum - 1):
            with autocast():
                nll = row_nll(model, local, target_only=cfg.target_only_logits, adapter_names=local_names)
            weighted = nll * weight  # (b,)
            weighted.sum().backward()
        for n, value in zip(row_task[rows.start : rows.stop], weighted.detach().tolist()):
            losses[n] += value if real else 0.0
    if runtime.fsdp:
        runtime.average_gradients([p for t in active for p in t.params])
    totals = runtime.sum([losses[n] for n in names])
    return {n: v / runtime.world for n, v in zip(names, totals)}, tokens


@torch.no_grad()
def validation_losses(
    model: Any,
    tokenizer: Any,
    due: list[TaskLoop],
    cfg: TrainConfig,
    runtime: distributed.Runtime,
    pad_id: int,
) -> dict[Any, float]:
    """Mean target-token loss of each task's validation examples, the batches shared out among the processes."""
    items: list[tuple[Any, dict[str, torch.Tensor]]] = []
    for t in due:
        if not t.validation:
            continue
        pairs = data.training_pairs(t.validation)
        encoded, _ = classify.encode_for(
            model, pairs, tokenizer, max_length=cfg.max_length, chat_template=cfg.chat_template
        )
        items += [(t.name, b) for b in data.batches(encoded, cfg.batch_size, shuffle=False, pad_id=pad_id)]
    names = list(dict.fromkeys(name for name, _ in items))
    sums = {n: [0.0, 0] for n in names}
    mine = items[runtime.rank :: runtime.world]
    # FSDP gathers weights in every forward: each process must run as many forwards as the others.
    rounds = math.ceil(len(items) / runtime.world) if runtime.fsdp else len(mine)
    model.eval()
    for i in range(rounds):
        name, batch = mine[i] if i < len(mine) else items[0]
        batch = {k: v.to(runtime.device) for k, v in batch.items()}
        rows = batch["input_ids"].shape[0]
        nll = row_nll(model, batch, target_only=False, adapter_names=[name] * rows if name is not None else None)
        if i < len(mine):
            sums[name][0] += float(nll.sum())
            sums[name][1] += int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
    model.train()
    totals = runtime.sum([x for n in names for x in sums[n]])
    return {n: totals[2 * i] / max(totals[2 * i + 1], 1) for i, n in enumerate(names)}
