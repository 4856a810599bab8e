"""The training loop: AdamW, warmup + decay, accumulation, clipping, validation, checkpoints, resume.

Reproducible: the data order of epoch e is a function of (seed, e), and a checkpoint holds the RNG state, so a
resumed run continues exactly where the interrupted one was.

`Trainer` is the run as an explicit recipe: `setup` reads the data, loads and wraps the model, builds the
optimizer and restores a checkpoint; `train` runs the steps; `save_checkpoint` writes one. Every step is
step.train_step, whether the run trains one task or several (tasks.py; one prefix each, each with its own
AdamW parameter group, schedule, gradient clip, step count, validation and early stopping, and initialized from
the RNG state of its own run) on one process or several (distributed.py; only process 0 writes). Dropout (off
by default) draws differently in a mixed batch.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import data, peft_format
from ..atomic import remove_stale_temp
from ..config import TrainConfig, save_config
from ..devices import cpu_has_native_bf16, input_device
from ..efficiency import enable_gradient_checkpointing
from ..errors import PrefixTuneError
from ..eval.likelihood import encoded_batches, summed_losses
from ..eval.objective import ClassHead, objective_for, pad_token_id
from ..methods.registry import build_method, method_spec, parameter_counts, trainable_state_dict
from . import checkpoint, distributed, tasks
from .classify import check_training, load_for_training
from .optim import build_optimizer, default_lr, grad_norm, targets_per_step
from .placement import training_placement
from .run_dir import METRICS, append_metrics, holds_run, keep_metrics_until, plot_losses, prepare_out
from .run_state import Interrupted, LogWindow, TrainResult, ctrl_c_at_step_boundary
from .step import nonfinite, nonfinite_stop, train_step
from .tasks import TaskLoop

NO_GAIN = "without improvement"
BF16_HINT = (
    "note: this CPU computes bfloat16 natively: --dtype bfloat16 trains about 1.7-2x faster here at the same quality "
    "(E2E), while float32 stays the default (docs/performance.md, 'bfloat16 on a CPU')"
)


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> TrainResult:
    """Train `cfg.method` on `cfg.data`; the run directory ends with the trained method(s), metrics, config, plot.

    Multi-task data trains one adapter per task (saved in `OUT/<task>/`); under torchrun or `accelerate launch`
    the processes share every global batch (step.py).
    """
    runtime = distributed.start()
    with deterministic_algorithms(cfg.deterministic):
        trainer = Trainer(cfg, runtime, resume=resume, progress=progress)
        trainer.setup(model_and_tokenizer)
        result = trainer.train()
    trainer.model = None  # the DDP wrapper goes before the process group does (Runtime.close)
    runtime.close()
    return result


@contextmanager
def deterministic_algorithms(wanted: bool) -> Iterator[None]:
    """torch's deterministic algorithms for one run (an op without one raises, naming itself), then the caller's
    setting again. cuBLAS reads CUBLAS_WORKSPACE_CONFIG when a process first uses it: set here unless the
    user set it, so a run asked for it before its first GPU matmul repeats bit for bit."""
    if not wanted:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


class Trainer:
    """One training run on this process's `runtime` (its device; rank 0 of 1 without a launcher)."""

    def __init__(self, cfg: TrainConfig, runtime: distributed.Runtime, *, resume: bool = False, progress: bool = True):
        self.cfg, self.runtime, self.resume = cfg, runtime, resume
        self.main = runtime.main
        self.progress = progress and runtime.main
        # bfloat16 autocast on the runtime's device; under a launcher, what accelerate's config asks for
        self.autocast_dtype = torch.bfloat16 if cfg.bf16 else None
        self.step = self.micro = self.skipped = 0
        self.elapsed = 0.0
        self.saved_at: int | None = None  # the step of the checkpoint on disk
        self.window = LogWindow()
        self.first_loss: float | None = None  # the first logged window's loss: divergence is judged against it
        self.warned_diverging = False

    # ----- setup ------------------------------------------------------------------------------------------------

    def setup(self, model_and_tokenizer: tuple[Any, Any] | None = None) -> None:
        """Read the data, load (or take) the model, build the method and optimizer, restore the checkpoint."""
        cfg, runtime = self.cfg, self.runtime
        spec = method_spec(cfg.method)
        if runtime.distributed:  # before anything is read or written: every process must run the same job
            runtime.agree("the training settings", {**cfg.to_dict(), "resume": self.resume})
        # before anything is written: a bad --device or --dtype, a seq2seq --model; full: float32 under autocast
        self.placement, self.weights_dtype, autocast = training_placement(cfg, runtime, model_and_tokenizer is None)
        self.autocast_dtype = autocast or self.autocast_dtype
        self.out = runtime.together(lambda: prepare_out(cfg, self.resume) if self.main else Path(cfg.out))
        if self.resume and not runtime.broadcast(holds_run(self.out) if self.main else None):
            _say(self.main, f"--resume: {self.out} holds no run yet: starting it")  # even with --quiet
            self.resume = False
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        task_data, self.multitask = runtime.together(lambda: tasks.load_tasks(cfg))
        if self.multitask and not spec.mixable:
            raise PrefixTuneError(
                f"method {cfg.method!r} cannot train several tasks in one run (a batch cannot mix its adapters); "
                "use --method prefix or prompt, or train one task at a time"
            )
        if runtime.distributed:
            runtime.agree("the training data", tasks.fingerprint(task_data))
        if model_and_tokenizer is None:  # data errors come first: they are cheaper to find than a model load

            def load() -> tuple[Any, Any]:
                with distributed.main_first(runtime):  # process 0 fills the model cache before the others read it
                    # classify: an encoder gets one output per label
                    return load_for_training(cfg, task_data, self.placement, self.weights_dtype)

            model_and_tokenizer = runtime.together(load)
        base, self.tokenizer = model_and_tokenizer
        if not runtime.distributed:  # batches go where the model takes its inputs (a model passed in stays put)
            runtime.local_device = input_device(base)
        check_training(cfg, task_data, base)
        self.objective = objective_for(base)  # what every step and validation trains and scores on
        self.prompt_format = data.trained_format(cfg.chat_template, [e for t in task_data for e in t.train])
        self.pad_id = pad_token_id(self.tokenizer)
        self.loops = [self._task_loop(task) for task in task_data]
        self._build_model(base, task_data)
        self.total_steps = max(t.total_steps for t in self.loops)
        self.window.by_task = {t.name: 0.0 for t in self.loops if t.name is not None}
        state = self._resume_state()
        if state is not None:
            self._restore(state)
        self.metrics_path = self.out / METRICS
        if self.main:
            # Temporaries of a killed run go first, resumed or not: a run killed while writing its first file
            # (config.yaml) holds no run to resume, but its half-written temporary is still there.
            remove_stale_temp(self.out)
            save_config(cfg, self.out / "config.yaml")
            if self.resume:  # what a killed run logged or half-wrote after its checkpoint is logged again from there
                keep_metrics_until(self.metrics_path, self.step)
        self.model = runtime.prepare(self.trained, self.trained.trainable_parameters())  # wrapped: DDP, FSDP
        on_cpu = self.placement.device is not None and self.placement.device.type == "cpu"
        if self.progress and cfg.dtype is None and on_cpu and cpu_has_native_bf16():  # after every check passed
            _say(True, BF16_HINT)

    def _task_loop(self, task: tasks.TaskData) -> TaskLoop:
        cfg = self.cfg
        encoded, stats = self.objective.encode(
            task.train, self.tokenizer, max_length=cfg.max_length, chat_template=cfg.chat_template
        )
        _say(self.progress, f"training data{f' of task {task.name}' if task.name else ''}: {stats.describe()}")
        per_epoch = len(data.batches(encoded, cfg.batch_size, shuffle=False, pad_id=self.pad_id))
        steps_per_epoch = max(1, per_epoch // cfg.grad_accum)
        total = cfg.max_steps or total_steps(cfg.epochs, steps_per_epoch)
        return TaskLoop(task.name, encoded, task.validation, per_epoch, total)

    def _build_model(self, base: Any, task_data: list[tasks.TaskData]) -> None:
        """The method on `base` (one adapter per task), its parameter counts, the optimizer and schedule."""
        cfg = self.cfg
        init_rng = torch.get_rng_state()
        options = data.fill_init_text(cfg.options, task_data[0].train)  # init="data": text from the data
        model = build_method(cfg.method, base, options, self.tokenizer)
        if self.multitask:
            tasks.add_task_adapters(model, cfg, self.loops, init_rng, task_data)  # each task's parameters
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.trainable_params, self.total_params = parameter_counts(model)
        if not self.multitask:
            self.loops[0].params = model.trainable_parameters()
        self.trained = model  # the unwrapped model: saved, checkpointed, returned
        lr = cfg.lr or self.objective.default_lr or default_lr(cfg, [e for t in self.loops for e in t.encoded])
        plain = method_spec(cfg.method).default_lr
        if not (cfg.lr or self.objective.default_lr) and lr != plain:
            targets = targets_per_step([e for t in self.loops for e in t.encoded], cfg)
            _say(
                self.progress,
                f"learning rate {lr:.3g}: {cfg.method}'s default {plain:.3g} scaled by the square root of this "
                f"data's {targets:.0f} target tokens per step over {method_spec(cfg.method).lr_targets_per_step:.0f} "
                "(give --lr to choose)",
            )
        self.lr = lr
        self.optimizer, self.scheduler = build_optimizer(cfg, self.loops, lr)

    def _resume_state(self) -> dict[str, Any] | None:
        """The checkpoint's state on every process (its tensors restored into the model), None to start afresh."""
        if not self.resume:
            return None
        runtime, model = self.runtime, self.trained
        # A run killed before its first checkpoint starts again from step 0 (what it did is redone exactly).
        state = runtime.together(lambda: checkpoint.resume_state(self.out, model) if self.main else None)
        if runtime.distributed:  # process 0 read the checkpoint; the others get it from there (no shared disk)
            tensors, state = runtime.broadcast((trainable_state_dict(model) if self.main else None, state))
            if not self.main:
                checkpoint.restore_trainable(model, tensors)
        if state is None:
            _say(self.progress, f"{self.out} has no checkpoint yet: starting from step 0")
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        self.step, self.micro, self.elapsed = state["step"], state["micro"], state.get("elapsed", 0.0)
        if self.multitask:
            for t in self.loops:
                t.restore(state["tasks"][t.name])
        else:
            self.loops[0].best, self.loops[0].bad_evals = state["best"], state["bad_evals"]
        self.saved_at = self.step
        if "window" in state:
            self.skipped = state["skipped"]
            loss, tokens, skipped, by_task = state["window"]
            self.window = LogWindow(loss, tokens, skipped, by_task)
        self.first_loss, self.warned_diverging = state.get("first_loss"), state.get("warned_diverging", False)
        _say(self.progress, f"resuming {self.out} at step {self.step}")

    # ----- training ---------------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Run the steps left (all of them, or those after the restored checkpoint); save the result."""
        cfg, loops = self.cfg, self.loops
        self.bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"train {cfg.method}",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        self.window.started = time.perf_counter()
        self.model.train()
        with ctrl_c_at_step_boundary() as interrupted:
            while self.step < self.total_steps:
                active = [t for t in loops if t.trains_at(self.step)]
                if not active:
                    break  # every task stopped early
                if self.runtime.any(interrupted.is_set()):
                    self.bar.close()
                    self.save_checkpoint()
                    raise Interrupted(f"interrupted at step {self.step}; checkpoint saved, continue with --resume")
                self._optimizer_step(active)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self._log_window()
                evaluates = cfg.eval_every and self.step % cfg.eval_every == 0
                due = [t for t in active if cfg.eval_every and (evaluates or self.step == t.total_steps)]
                if due:
                    self._validate(due)
                    if all(t.stopped for t in loops):
                        break
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
        self.bar.close()
        for t in loops:
            if t.best is None:
                self._save_adapter(t)
        self.save_checkpoint()
        if self.main:
            plot_losses(self.metrics_path, self.out / "loss.png")
        return self._result()

    def _optimizer_step(self, active: list[TaskLoop]) -> None:
        """One step of the active tasks: forward and backward, clipping, then the update or (non-finite) a skip."""
        cfg, runtime = self.cfg, self.runtime
        started = time.perf_counter()
        losses, tokens = train_step(
            self.model, self.objective, active, self.micro, cfg, self.pad_id, runtime, self._autocast
        )
        self.micro += cfg.grad_accum
        self.window.tokens += tokens
        norms = {t.name: grad_norm(t.params, cfg.max_grad_norm) for t in active}  # per task
        problem = nonfinite(losses, norms)
        if runtime.any(problem is not None):
            problem = problem or "a loss or gradient on another process is not finite"
            if cfg.on_nonfinite == "stop":
                self.bar.close()
                raise PrefixTuneError(nonfinite_stop(self.step + 1, problem, self.out, self.saved_at))
            self.optimizer.zero_grad(set_to_none=True)  # the step is skipped: no update, data and schedule move on
            self.skipped += 1
            self.window.skipped += 1
            _say(self.main, f"step {self.step + 1}: {problem}; step skipped (on_nonfinite=skip)")  # even with --quiet
            with warnings.catch_warnings():  # when the very first step is skipped, torch warns about the order
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*", category=UserWarning)
                self.scheduler.step()
        else:
            self.window.loss += sum(losses.values()) / len(losses)
            if self.multitask:
                for name, value in losses.items():
                    self.window.by_task[name] += value  # type: ignore[index]  # several tasks: all named
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        for t in active:
            t.steps = self.step
        self.elapsed += time.perf_counter() - started
        self.bar.update(1)

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is not None:
            return torch.autocast(self.runtime.device.type, dtype=self.autocast_dtype)
        return self.runtime.accelerator.autocast() if self.runtime.distributed else nullcontext()

    def _log_window(self) -> None:
        """One metrics.jsonl line: the mean loss of the window's steps (skipped ones left out), lr, throughput."""
        cfg, window = self.cfg, self.window
        seconds = time.perf_counter() - window.started
        steps_in_window = (self.step % cfg.log_every or cfg.log_every) - window.skipped  # steps that updated
        record: dict[str, Any] = {"step": self.step}
        if steps_in_window > 0:
            record["loss"] = round(window.loss / steps_in_window, 5)
        record |= {
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": round(window.tokens / seconds, 1),
            "elapsed_s": round(self.elapsed, 2),
        }
        if self.skipped:
            record["skipped_steps"] = self.skipped  # in the whole run so far
        if self.multitask and steps_in_window > 0:
            record["task_loss"] = {k: round(v / steps_in_window, 5) for k, v in window.by_task.items()}
        warning = self._divergence(record["loss"]) if "loss" in record else None
        if warning:
            record["warning"] = warning  # in metrics.jsonl too: `prefixtune compare` shows it from there
        self._log(record)
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if warning:
            _say(self.main, f"step {self.step}: {warning}")
        self.window = LogWindow(by_task=dict.fromkeys(window.by_task, 0.0))

    def _divergence(self, loss: float) -> str | None:
        """Once, when the training loss climbs well above where it started, what to say: the rate is too high for
        this data (docs/methods.md, MultiEmo: the prefix at 3e-3 went from 9.0 to 13.5 on one seed and ended at the
        majority class; at 1e-3 every seed trained). The margin keeps batch-to-batch noise from tripping it."""
        if self.first_loss is None:
            self.first_loss = loss
        elif not self.warned_diverging and loss > DIVERGED_FACTOR * self.first_loss + DIVERGED_MARGIN:
            self.warned_diverging = True
            return (
                f"training loss {loss:.3f} is above its first logged value {self.first_loss:.3f}: training is "
                f"diverging; try a lower learning rate than {self.scheduler.base_lrs[0]:.3g} (a third of it, say)"
            )
        return None

    def _validate(self, due: list[TaskLoop]) -> None:
        """Score the due tasks' validation examples (batches shared out among the processes); log, keep the best
        adapter, stop a task early after `early_stop` validations without improvement."""
        cfg, runtime = self.cfg, self.runtime
        items = []
        for t in due:
            if t.validation:  # a task of a multi-task run may have no validation examples
                batches = encoded_batches(
                    self.objective,
                    t.validation,
                    self.tokenizer,
                    max_length=cfg.max_length,
                    batch_size=cfg.batch_size,
                    chat_template=cfg.chat_template,
                )
                items += [(t.name, b) for b in batches]
        with self._autocast():  # validation computes as the training forward does
            sums = summed_losses(
                self.model,
                self.objective,
                items,
                device=runtime.device,
                rank=runtime.rank,
                world=runtime.world,
                lockstep=runtime.fsdp,  # FSDP gathers weights in every forward: each process runs as many
            )
        self.model.train()
        totals = runtime.sum([x for n in sums for x in sums[n]])
        val_losses = {n: totals[2 * i] / max(totals[2 * i + 1], 1) for i, n in enumerate(sums)}
        for t in due:
            if t.name not in val_losses:
                continue
            val_loss = val_losses[t.name]
            task_field = {"task": t.name} if t.name is not None else {}
            perplexity = round(math.exp(min(val_loss, 700.0)), 4)
            self._log({"step": self.step, **task_field, "val_loss": round(val_loss, 5), "val_perplexity": perplexity})
            if t.best is None or val_loss < t.best:
                t.best, t.bad_evals = val_loss, 0
                self._save_adapter(t)  # the run directory always holds the best adapter so far
            else:
                t.bad_evals += 1
                if cfg.early_stop and t.bad_evals >= cfg.early_stop:
                    t.stopped = True
                    who = f"task {t.name}: " if t.name else ""
                    _say(self.progress, f"{who}early stop at step {self.step}: {t.bad_evals} validations {NO_GAIN}")

    # ----- what is written --------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """The run's state at this step boundary (process 0 writes it; every process records the step)."""
        if self.main:
            checkpoint.save_checkpoint(self.out, self.trained, self._snapshot())
        self.saved_at = self.step

    def _snapshot(self) -> dict[str, Any]:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": checkpoint.rng_state(),
            "step": self.step,
            "micro": self.micro,
            "best": self.loops[0].best,
            "bad_evals": self.loops[0].bad_evals,
            "elapsed": self.elapsed,
            "skipped": self.skipped,
            "window": self.window.state(),  # the log line being summed
            "first_loss": self.first_loss,
            "warned_diverging": self.warned_diverging,
        }
        if self.multitask:
            state["tasks"] = {t.name: t.record() for t in self.loops}
        return state

    def _save_adapter(self, task: TaskLoop) -> None:
        if not self.main:
            return
        if task.name is None:
            self.trained.save_trained(self.out)
        else:
            self.trained.save_adapter(self.out / task.name, name=task.name)
        if not isinstance(self.objective, ClassHead):  # saved so that generate/eval/serve build the same prompts
            where = self.out if task.name is None else self.out / task.name
            peft_format.write_prompt_format(where, self.prompt_format.to_dict(self.tokenizer))

    def _log(self, record: dict[str, Any]) -> None:
        if self.main:
            append_metrics(self.metrics_path, record)

    def _result(self) -> TrainResult:
        loops = self.loops
        bests = [t.best for t in loops if t.best is not None]
        best = loops[0].best if not self.multitask else (sum(bests) / len(bests) if bests else None)
        summary = {str(t.name): t.summary() for t in loops} if self.multitask else None
        counts = (self.trainable_params, self.total_params)
        stopped = all(t.stopped for t in loops)
        return TrainResult(
            self.trained, self.out, self.step, best, stopped, *counts, self.elapsed, summary, self.skipped, self.lr
        )


DIVERGED_FACTOR, DIVERGED_MARGIN = 1.2, 0.5  # a window loss above 1.2 x the first + 0.5 nats: diverging

# docs/methods.md, "The budget by default" and "160 steps at every size": on E2E the prefix scored best at 80 steps
# of batch 8 with 50 and 100 examples (12.8 epochs or more overfit) and at 160 with 200 and 500 (80 underfit)
AUTO_EPOCHS, AUTO_MIN_STEPS, AUTO_MAX_STEPS = 6, 80, 160


def total_steps(epochs: float | None, steps_per_epoch: int) -> int:
    """A run's steps without max_steps: `epochs` passes, or by default 6 passes kept between 80 and 160 steps, or
    one pass where that is more (one epoch of 50 examples is 7 steps of 8: 80 steps; of 200, 25: 150; of 500 or
    more: 160, until one epoch is longer)."""
    if epochs is not None:
        return max(1, math.ceil(epochs * steps_per_epoch))
    bounded = min(max(AUTO_EPOCHS * steps_per_epoch, AUTO_MIN_STEPS), AUTO_MAX_STEPS)
    return max(steps_per_epoch, bounded)


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(f"prefixtune: {message}", file=sys.stderr)
