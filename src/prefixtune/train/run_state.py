"""What a training run reports and how it stops: its result, the window a metrics line sums, Ctrl-C at a step
boundary."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Interrupted(Exception):
    """Ctrl-C during training; a checkpoint was saved first. The CLI exits 130."""


@dataclass
class TrainResult:
    model: Any  # the trained method's model (a TrainableModel)
    out: Path
    steps: int
    best_val_loss: float | None
    stopped_early: bool
    trainable_params: int
    total_params: int
    train_seconds: float
    tasks: dict[str, dict[str, Any]] | None = None  # multi-task: name -> steps, best_val_loss, stopped_early
    skipped_steps: int = 0  # steps whose loss or gradient was not finite (on_nonfinite=skip): no update made
    lr: float | None = None  # the peak learning rate it trained at (given, or the data-scaled default)


@dataclass
class LogWindow:
    """What the next metrics.jsonl line sums; a checkpoint holds it, so a resumed run logs the same line."""

    loss: float = 0.0
    tokens: int = 0
    skipped: int = 0  # steps of the window skipped for a non-finite loss or gradient
    by_task: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def state(self) -> list[Any]:
        return [self.loss, self.tokens, self.skipped, self.by_task]


@contextmanager
def ctrl_c_at_step_boundary() -> Iterator[threading.Event]:
    """The first Ctrl-C sets an event that the loop checks between steps (so the checkpoint it saves is
    consistent: no half-applied optimizer step); a second Ctrl-C interrupts at once, saving nothing."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum: int, frame: Any) -> None:
        if event.is_set():
            raise KeyboardInterrupt
        event.set()
        print("\nprefixtune: stopping after this step (Ctrl-C again to abort without a checkpoint)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)
