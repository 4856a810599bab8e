"""Training on several processes: accelerate's `Accelerator` over torch.distributed (gloo on CPU, NCCL on GPUs).

`prefixtune train` started by `torchrun --nproc-per-node N -m prefixtune train ...` or
`accelerate launch --multi_gpu --num_processes N -m prefixtune train ...` sees WORLD_SIZE=N > 1. Then every
process reads the same data and builds the same global batch as single-process training, takes its own slice of
the rows (`Runtime.rows`), and DDP averages the gradients; step.py scales each process's loss so that the
average equals the single-process gradient of the global batch. Only process 0 writes files. A checkpoint holds
whole tensors and global step counters, so a run can be resumed by any number of processes.

With accelerate's FSDP (GPUs only) the frozen base model is sharded and the trainable modules are left out of
FSDP (`ignored_modules`): they stay whole on every process, and their gradients are averaged here. DeepSpeed is
refused (its engine owns backward, clipping and the optimizer step, which the loop does per task). docs/scaling.md
has the commands and configurations. Without a launcher (WORLD_SIZE unset or 1) nothing here runs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import PrefixTuneError

T = TypeVar("T")


@dataclass
class Runtime:
    """This process's place in the run: rank 0 of 1 (no accelerator) unless launched on several processes."""

    accelerator: Any = None
    rank: int = 0
    world: int = 1
    local_device: torch.device | None = None  # a single process: where the model takes its inputs (--device)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Process 0: the only one that writes the run directory and shows progress."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if self.accelerator is not None:
            return self.accelerator.device
        return self.local_device if self.local_device is not None else torch.device("cpu")

    @property
    def fsdp(self) -> bool:
        return self.accelerator is not None and self.accelerator.distributed_type.name == "FSDP"

    def rows(self, count: int) -> range:
        """This process's contiguous share of `count` rows of a global batch (shares differ by at most one)."""
        return range(count * self.rank // self.world, count * (self.rank + 1) // self.world)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes (float64)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on one (so that all stop at the same step)."""
        return bool(self.sum([float(flag)])[0]) if self.distributed else flag

    def gather(self, value: Any) -> list[Any]:
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        """Process 0's `value` on every process."""
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def together(self, step: Callable[[], T]) -> T:
        """Run `step` on every process; if it raises our error on any, raise it on all (none waits forever)."""
        if not self.distributed:
            return step()
        value, error = None, None
        try:
            value = step()
        except PrefixTuneError as e:
            error = str(e)
        errors = self.gather(error)
        for rank, message in enumerate(errors):
            if message is not None:
                raise PrefixTuneError(message if rank == self.rank or rank == 0 else f"{message} (on process {rank})")
        return value  # type: ignore[return-value]

    def agree(self, what: str, value: dict[str, Any] | str) -> None:
        """Refuse to train when the processes were started with different `value`s (settings, data)."""
        values = self.gather(value)
        differ = [rank for rank, v in enumerate(values) if v != values[0]]
        if not differ:
            return
        rank = differ[0]
        if isinstance(value, dict):
            first, other = values[0], values[rank]
            keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
            detail = "; ".join(f"{k}: {first.get(k)!r} on process 0, {other.get(k)!r} on process {rank}" for k in keys)
        else:
            detail = f"process 0 has {values[0]}, process {rank} has {values[rank]}"
        raise PrefixTuneError(
            f"the {self.world} processes disagree on {what} ({detail}); start every process with the same settings"
        )

    def prepare(self, model: nn.Module, trainable: list[nn.Parameter]) -> nn.Module:
        """The model wrapped for training (DDP, or FSDP with the trainable modules left whole)."""
        if not self.distributed:
            return model
        if self.fsdp:
            wanted = {id(p) for p in trainable}
            owners = [m for m in model.modules() if any(id(p) in wanted for p in m.parameters(recurse=False))]
            self.accelerator.state.fsdp_plugin.ignored_modules = owners
        with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers; False still means what we want
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            return self.accelerator.prepare(model)

    def no_sync(self, model: nn.Module, sync: bool) -> Any:
        """Accumulate gradients locally on all but the last micro-batch of a step."""
        return nullcontext() if sync or not self.distributed else self.accelerator.no_sync(model)

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Average the trainable gradients over processes where no wrapper does it (FSDP leaves them to us).

        A parameter without a gradient on every process keeps none (AdamW then skips it, as it would alone).
        """
        if not self.fsdp:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        used = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        flat = torch.cat([g.flatten() for g in grads] + [used])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, count in zip(params, flat[-len(params) :].tolist()):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p) / self.world if count else None
            offset += n

    def close(self) -> None:
        """End the run on every process. The caller has dropped its prepared (DDP) model: when a DDP Reducer holds
        the last reference to the gloo group, freeing it (with the GIL held) joins gloo's worker threads, and one
        of them may still need the GIL to free a finished collective's tensors: a deadlock at exit, seen in about
        one of four two-process CPU runs. Freed here first, the group goes in destroy_process_group, whose binding
        lets go of the GIL while the threads finish."""
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.barrier()
            self.accelerator.free_memory()  # accelerate's references to the prepared model; collects the garbage
            torch.distributed.destroy_process_group()


def start() -> Runtime:
    """The runtime for this process: a single process unless a launcher set WORLD_SIZE > 1."""
    _refuse_unsupported_engines()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Runtime()
    # deferred: accelerate is a slow import that only multi-process runs need
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Multi-task rows of a task may all be on other processes: DDP must not wait for their gradients here.
    # Buffers (rotary tables, prefix init values) are equal on every process: no broadcast before each forward.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
    if accelerator.num_processes != world:
        raise PrefixTuneError(
            f"WORLD_SIZE is {world} but accelerate set up {accelerator.num_processes} process(es); "
            "start with torchrun or `accelerate launch --multi_gpu`"
        )
    if accelerator.is_fsdp2:
        raise PrefixTuneError(
            "FSDP version 2 is not supported by prefixtune train yet; set fsdp_version: 1 in the accelerate config "
            "(examples/accelerate_fsdp.yaml)"
        )
    return Runtime(accelerator, accelerator.process_index, world)


def _refuse_unsupported_engines() -> None:
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise PrefixTuneError(
            "DeepSpeed is not supported by prefixtune train (its engine owns backward, clipping and the optimizer "
            "step); use plain data-parallel or FSDP, see docs/scaling.md"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available():
        raise PrefixTuneError(
            "FSDP needs GPUs (accelerate enables it for GPUs only); on CPUs launch without the FSDP config, "
            "which trains data-parallel"
        )


@contextmanager
def main_first(runtime: Runtime) -> Iterator[None]:
    """Process 0 runs the block before the others (e.g. a model conversion that fills a shared cache)."""
    if runtime.distributed and not runtime.main:
        torch.distributed.barrier()
    try:
        yield
    finally:
        if runtime.distributed and runtime.main:
            torch.distributed.barrier()
