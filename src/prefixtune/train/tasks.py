"""Which examples a training run learns, per task; each task's place in the loop; the batches that mix tasks.

A run is multi-task when `data` is a mapping of task name -> data set (`--data NAME=PATH` given more than once,
or `data: {NAME: PATH, ...}` in YAML), or when the records of one .jsonl/.csv/.json file carry a `task` field.
Each task is read, split, paired and batched exactly as a single-task run on that task's records alone would be,
so the prefixes trained together can equal the prefixes trained one at a time (step.py keeps their gradients
apart). Task names become adapter names and directories (`OUT/<task>/`), so they follow the adapter-name rules.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import data
from ..config import TrainConfig
from ..data import builtin
from ..errors import PrefixTuneError
from ..methods.registry import make_config
from ..model import check_adapter_name

# Files of the run directory that live beside OUT/<task>/: a task may not take their names.
RESERVED = frozenset({"checkpoint", "config.yaml", "metrics.jsonl", "loss.png"})


@dataclass
class TaskData:
    """One task's examples: `name` None for the single task of a plain run."""

    name: str | None
    train: list[data.Example]  # one pair per (source, reference), cut to train_size
    validation: list[data.Example] = field(default_factory=list)  # cut to eval_size; empty without eval_every


def load_tasks(cfg: TrainConfig) -> tuple[list[TaskData], bool]:
    """The run's tasks and whether it is multi-task; every data error is raised here, before a model loads."""
    by_task = None if isinstance(cfg.data, dict) else _tasks_in_file(cfg)
    if cfg.eval_data and (isinstance(cfg.data, dict) or by_task is not None):
        raise PrefixTuneError(
            "eval_data names one validation set, but the data holds several tasks: each task validates on "
            "its own data's eval_split; leave eval_data unset"
        )
    if isinstance(cfg.data, dict):
        return [_load_named(cfg, name, spec) for name, spec in cfg.data.items()], True
    if by_task is not None:
        return [_split_task(cfg, name, examples) for name, examples in by_task.items()], True
    return [_load_single(cfg)], False


def _load(cfg: TrainConfig, spec: str, split: str, limit: int | None = None) -> list[data.Example]:
    """One split of a data set; `limit` caps what a streamed hf: set reads (train_size, eval_size)."""
    return data.load_dataset(
        spec,
        split=None if split == "all" else split,
        data_dir=cfg.data_dir,
        source_field=cfg.source_field,
        target_field=cfg.target_field,
        limit=limit,
    )


def _load_single(cfg: TrainConfig) -> TaskData:
    """A plain run: the same calls, in the same order, with the same messages as before multi-task existed."""
    spec = str(cfg.data)
    pairs = data.training_pairs(_load(cfg, spec, cfg.train_split, cfg.train_size))[: cfg.train_size]
    if not pairs:
        raise PrefixTuneError(f"{spec}: no training examples in split {cfg.train_split!r}")
    validation: list[data.Example] = []
    if cfg.eval_every:
        where = cfg.eval_data or spec  # a separate validation set (compare: the swept split of a subsampled run)
        validation = _load(cfg, where, cfg.eval_split, cfg.eval_size)[: cfg.eval_size]
        if not validation:
            raise PrefixTuneError(f"{where}: split {cfg.eval_split!r} is empty; validation needs examples")
    return TaskData(None, pairs, validation)


def _load_named(cfg: TrainConfig, name: str, spec: str) -> TaskData:
    """`--data NAME=SPEC`: the data set as a single-task run on SPEC reads it; every example is task NAME."""
    check_task_name(name)
    pairs = data.training_pairs(_load(cfg, spec, cfg.train_split, cfg.train_size))[: cfg.train_size]
    if not pairs:
        raise PrefixTuneError(f"task {name!r} ({spec}) has no training examples in split {cfg.train_split!r}")
    validation: list[data.Example] = []
    if cfg.eval_every:
        validation = _load(cfg, spec, cfg.eval_split, cfg.eval_size)[: cfg.eval_size]
    for example in (*pairs, *validation):
        example.task = name
    return TaskData(name, pairs, validation)


def _tasks_in_file(cfg: TrainConfig) -> dict[str, list[data.Example]] | None:
    """A local file whose records name their task: its examples by task, in file order (else None)."""
    spec = str(cfg.data)
    if spec in builtin.DATA_ALIASES or spec.startswith("hf:") or not Path(spec).expanduser().is_file():
        return None  # built-in sets tag every example with their own name; hf: sets keep their own splits
    examples = _load(cfg, spec, "all")
    named = [e for e in examples if e.task is not None]
    if not named:
        return None
    if len(named) != len(examples):
        raise PrefixTuneError(
            f"{spec}: {len(examples) - len(named)} of {len(examples)} examples have no 'task' field; "
            "give every record a task (or none of them)"
        )
    by_task: dict[str, list[data.Example]] = {}
    for example in examples:
        by_task.setdefault(str(example.task), []).append(example)
    for name in by_task:
        check_task_name(name, where=spec)
    return by_task


def _split_task(cfg: TrainConfig, name: str, examples: list[data.Example]) -> TaskData:
    """One task of a file with a `task` field, split as the file of its records alone would be."""
    where = f"task {name!r} of {cfg.data}"

    def part(split: str) -> list[data.Example]:
        if split == "all":
            return list(examples)
        return data.split_examples(examples, split, fractions=data.DEFAULT_SPLIT_FRACTIONS, name=where)

    pairs = data.training_pairs(part(cfg.train_split))[: cfg.train_size]
    if not pairs:
        raise PrefixTuneError(f"{where} has no training examples in split {cfg.train_split!r}")
    validation = part(cfg.eval_split)[: cfg.eval_size] if cfg.eval_every else []
    return TaskData(name, pairs, validation)


def check_task_name(name: str, where: str | None = None) -> str:
    """A task name is an adapter name (letters, digits, '_', '-') and not the name of a run file."""
    try:
        check_adapter_name(name)
    except PrefixTuneError as e:
        raise PrefixTuneError(f"{where + ': ' if where else ''}task name {name!r}: {e}") from None
    if name in RESERVED:
        raise PrefixTuneError(
            f"{where + ': ' if where else ''}task name {name!r} is taken by a file of the run directory "
            f"({', '.join(sorted(RESERVED))}); rename the task"
        )
    return name


def fingerprint(tasks: Sequence[TaskData]) -> str:
    """A hash of every example the run will train and validate on (processes must agree on it)."""
    digest = hashlib.sha256()
    for task in tasks:
        for part in (task.train, task.validation):
            for e in part:
                digest.update(json.dumps([task.name, e.source, e.target, e.references, e.label]).encode())
            digest.update(b"\0")
    return digest.hexdigest()


# ----- tasks in the loop ---------------------------------------------------------------------------------------


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
        """Micro-batch `index` of the run (counted over epochs): epoch e's order is a function of (seed, e)."""
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

    def summary(self) -> dict[str, Any]:
        """What a multi-task run reports of this task."""
        return {
            "steps": self.steps,
            "best_val_loss": self.best,
            "stopped_early": self.stopped,
            "examples": len(self.encoded),
        }

    def restore(self, record: dict[str, Any]) -> None:
        self.best, self.bad_evals, self.stopped, self.steps = (
            record[k] for k in ("best", "bad_evals", "stopped", "steps")
        )


def add_task_adapters(
    model: Any, cfg: TrainConfig, loops: list[TaskLoop], init_rng: torch.Tensor, task_data: Sequence[TaskData]
) -> None:
    """One adapter per task, each initialized from the RNG state its own single-task run would start from (and,
    for init="data", from a description of its own training data).

    The method builds its first adapter ("default"); it is removed (or frozen, where the method cannot remove
    one), so that only the tasks' adapters train.
    """
    if not all(hasattr(model, verb) for verb in ("add_adapter", "save_adapter")):
        raise PrefixTuneError(
            f"method {cfg.method!r} shares trainable weights between its adapters, so it cannot train one per task; "
            "use --method prefix or prompt, or train one task at a time"
        )
    default = list(model.trainable_parameters())
    for t, task in zip(loops, task_data, strict=True):
        torch.set_rng_state(init_rng)
        before = {id(p) for p in model.trainable_parameters()}
        model.add_adapter(t.name, make_config(cfg.method, data.fill_init_text(cfg.options, task.train)))
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


def merge(
    parts: Sequence[tuple[str, dict[str, torch.Tensor]]], pad_id: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One right-padded batch from each task's micro-batch, and the adapter name of every row."""
    width = max(batch["input_ids"].shape[1] for _, batch in parts)
    pads = {"input_ids": pad_id, "attention_mask": 0, "labels": data.IGNORE_INDEX}
    merged: dict[str, Any] = {}
    for key, value in pads.items():
        merged[key] = torch.cat(
            [torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=value) for _, b in parts]
        )  # (B, T)
    names = [name for name, batch in parts for _ in range(batch["input_ids"].shape[0])]
    return merged, names
