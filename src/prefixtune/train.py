"""The training loop: AdamW, warmup + decay, accumulation, clipping, validation, checkpoints, resume.

Reproducible: the data order of epoch e is a function of (seed, e), and a checkpoint holds the RNG state, so a
resumed run continues exactly where the interrupted one was.

Several tasks in one run (tasks.py; one prefix each): every step takes each task's next micro-batch, the very
one its own single-task run would take, and stacks them into one mixed batch whose rows name their adapter. The
loss is the sum over tasks of each task's mean token loss (its summed token losses over its own target-token
count), not one mean over all tokens, which would couple the tasks through the shared denominator. A row sees
only its own task's prefix and the base is frozen, so each prefix gets exactly the gradient of its own run; with
one AdamW parameter group, one schedule and one gradient clip per task, each prefix is updated as in its own run,
up to floating-point rounding. Each task is initialized from the same RNG state as its own run, and keeps its
own step count, validation and early stopping. Dropout (off by default) draws differently in a mixed batch.

Several processes (distributed.py): every process builds the same global batch, computes the summed losses of
its share of the rows over the global token counts, times the number of processes; DDP's gradient average then
equals the single-process gradient of the global batch. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import checkpoint, classify, data, distributed, evaluate, mixed, tasks
from .atomic import atomic_save_figure, atomic_write_bytes, remove_stale_temp
from .config import TrainConfig, save_config
from .efficiency import enable_gradient_checkpointing, micro_steps
from .errors import PrefixTuneError
from .loss import causal_lm_loss
from .methods.registry import build_method, method_spec, parameter_counts, trainable_state_dict
from .mixed import TaskLoop

__all__ = ["Interrupted", "TrainResult", "causal_lm_loss", "plot_losses", "read_metrics", "train"]

NO_GAIN = "without improvement"
# Settings that may change between an interrupted run and its --resume; everything else must match.
RESUMABLE = {"max_steps", "epochs", "log_every", "eval_every", "save_every", "early_stop", "threads", "on_nonfinite"}


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


def _schedule(cfg: TrainConfig, total: int) -> Any:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return factor


def _prepare_out(cfg: TrainConfig, resume: bool) -> Path:
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PrefixTuneError(f"cannot write to output directory {out}: {e.strerror}") from None
    saved = out / "config.yaml"
    if resume:
        if not saved.is_file():
            raise PrefixTuneError(f"--resume: {out} holds no run (config.yaml missing)")
        import yaml

        before = yaml.safe_load(saved.read_text()) or {}
        now = cfg.to_dict()
        differ = sorted(k for k in set(before) | set(now) if k not in RESUMABLE and before.get(k) != now.get(k))
        if differ:
            raise PrefixTuneError(f"--resume: {out} was trained with a different config ({', '.join(differ)} differ)")
    elif saved.exists() or checkpoint.checkpoint_dir(out) is not None:
        raise PrefixTuneError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return out


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> TrainResult:
    """Train `cfg.method` on `cfg.data`; the run directory ends with the trained method(s), metrics, config, plot.

    Multi-task data trains one adapter per task (saved in `OUT/<task>/`); under torchrun or `accelerate launch`
    the processes share every global batch (see the module docstring).
    """
    runtime = distributed.start()
    result = _train(cfg, runtime, resume, progress, model_and_tokenizer)
    runtime.close()
    return result


def _train(
    cfg: TrainConfig,
    runtime: distributed.Runtime,
    resume: bool,
    progress: bool,
    model_and_tokenizer: tuple[Any, Any] | None,
) -> TrainResult:
    spec = method_spec(cfg.method)
    main = runtime.main
    if runtime.distributed:  # before anything is read or written: every process must run the same job
        runtime.agree("the training settings", {**cfg.to_dict(), "resume": resume})
    out = runtime.together(lambda: _prepare_out(cfg, resume) if main else Path(cfg.out))
    progress = progress and main
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    task_data, multitask = runtime.together(lambda: tasks.load_tasks(cfg))
    if multitask and not spec.mixable:
        raise PrefixTuneError(
            f"method {cfg.method!r} cannot train several tasks in one run (a batch cannot mix its adapters); "
            "use --method prefix or prompt, or train one task at a time"
        )
    if runtime.distributed:
        runtime.agree("the training data", tasks.fingerprint(task_data))
    if model_and_tokenizer is None:  # data errors come first: they are cheaper to find than a model load

        def load() -> tuple[Any, Any]:
            with distributed.main_first(runtime):  # process 0 fills the model cache before the others read it
                return classify.load_for_training(cfg, task_data)  # classify: an encoder gets one output per label

        model_and_tokenizer = runtime.together(load)
    base, tokenizer = model_and_tokenizer
    classify.check_training(cfg, task_data, base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loops: list[TaskLoop] = []
    for task in task_data:
        encoded, stats = classify.encode_for(
            base, task.train, tokenizer, max_length=cfg.max_length, chat_template=cfg.chat_template
        )
        _say(progress, f"training data{f' of task {task.name}' if task.name else ''}: {stats.describe()}")
        per_epoch = len(data.batches(encoded, cfg.batch_size, shuffle=False, pad_id=pad_id))
        steps_per_epoch = max(1, per_epoch // cfg.grad_accum)
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        loops.append(TaskLoop(task.name, encoded, task.validation, per_epoch, total))

    init_rng = torch.get_rng_state()
    model = build_method(cfg.method, base, cfg.options, tokenizer)
    if multitask:
        mixed.add_task_adapters(model, cfg, loops, init_rng)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable, total_params = parameter_counts(model)
    params = model.trainable_parameters()
    lr = cfg.lr or classify.default_lr(base, spec.default_lr)
    if multitask:
        optimizer = torch.optim.AdamW([{"params": t.params} for t in loops], lr=lr, weight_decay=cfg.weight_decay)
        factors = [_schedule(cfg, t.total_steps) for t in loops]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    else:
        loops[0].params = params
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, loops[0].total_steps))
    total_steps = max(t.total_steps for t in loops)

    step, micro, elapsed = 0, 0, 0.0
    state: dict[str, Any] | None = None
    if resume:
        # A run killed before its first checkpoint starts again from step 0 (what it did is redone exactly).
        state = runtime.together(lambda: _resume_state(out, model) if main else None)
        if runtime.distributed:  # process 0 read the checkpoint; the others get it from there (no shared disk)
            tensors, state = runtime.broadcast((trainable_state_dict(model) if main else None, state))
            if not main:
                checkpoint.restore_trainable(model, tensors)
    if state is None and resume:
        _say(progress, f"{out} has no checkpoint yet: starting from step 0")
    elif state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        step, micro, elapsed = state["step"], state["micro"], state.get("elapsed", 0.0)
        if multitask:
            for t in loops:
                saved = state["tasks"][t.name]
                t.best, t.bad_evals, t.stopped, t.steps = (saved[k] for k in ("best", "bad_evals", "stopped", "steps"))
        else:
            loops[0].best, loops[0].bad_evals = state["best"], state["bad_evals"]
        _say(progress, f"resuming {out} at step {step}")
    metrics_path = out / "metrics.jsonl"
    if main:
        save_config(cfg, out / "config.yaml")
        if resume:  # what a killed run logged or half-wrote after its checkpoint is logged again from there
            _keep_metrics_until(metrics_path, step)
            remove_stale_temp(out)
    trained = model  # the unwrapped model: saved, checkpointed, returned
    model = runtime.prepare(model, params)

    def snapshot() -> dict[str, Any]:
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": checkpoint.rng_state(),
            "step": step,
            "micro": micro,
            "best": loops[0].best,
            "bad_evals": loops[0].bad_evals,
            "elapsed": elapsed,
            "skipped": skipped,
            "window": [window_loss, window_tokens, window_skipped, window_by_task],  # the log line being summed
        }
        if multitask:
            state["tasks"] = {t.name: t.record() for t in loops}
        return state

    def save_checkpoint() -> None:
        nonlocal saved_at
        if main:
            checkpoint.save_checkpoint(out, trained, snapshot())
        saved_at = step

    def save_adapter(task: TaskLoop) -> None:
        if not main:
            return
        if task.name is None:
            trained.save_trained(out)
        else:
            trained.save_adapter(out / task.name, name=task.name)

    def log(record: dict[str, Any]) -> None:
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    simple = not multitask and not runtime.distributed  # the single-process path, exactly as it always was

    def autocast() -> Any:
        if cfg.bf16:
            return torch.autocast(runtime.device.type, dtype=torch.bfloat16)
        return runtime.accelerator.autocast() if runtime.distributed else nullcontext()

    bar = tqdm(total=total_steps, initial=step, desc=f"train {cfg.method}", disable=not progress, dynamic_ncols=True)
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    window_by_task: dict[str, float] = {t.name: 0.0 for t in loops if t.name is not None}
    skipped, window_skipped = 0, 0  # steps skipped for a non-finite loss or gradient (on_nonfinite=skip)
    saved_at = step if state is not None else None  # the step of the checkpoint on disk
    if state is not None and "window" in state:
        skipped = state["skipped"]
        window_loss, window_tokens, window_skipped, window_by_task = state["window"]
    model.train()
    with _ctrl_c_at_step_boundary() as interrupted:
        while step < total_steps:
            active = [t for t in loops if t.trains_at(step)]
            if not active:
                break  # every task stopped early
            if runtime.any(interrupted.is_set()):
                bar.close()
                save_checkpoint()
                raise Interrupted(f"interrupted at step {step}; checkpoint saved, continue with --resume")
            started = time.perf_counter()
            if simple:
                step_loss = 0.0
                for _ in micro_steps(model, cfg.grad_accum, share_prefix=cfg.prefix_once_per_step):
                    batch = active[0].micro_batch(micro, cfg, pad_id)
                    with autocast():
                        loss = causal_lm_loss(model, batch, target_only=cfg.target_only_logits)
                    (loss / cfg.grad_accum).backward()
                    step_loss += float(loss.detach()) / cfg.grad_accum
                    window_tokens += int(batch["attention_mask"].sum())
                    micro += 1
                step_losses = {None: step_loss}
            else:
                step_losses, tokens = mixed.train_step(model, active, micro, cfg, pad_id, runtime, autocast)
                micro += cfg.grad_accum
                window_tokens += tokens
            # per task: one task's gradient never scales another's
            norms = {t.name: _grad_norm(t.params, cfg.max_grad_norm) for t in (active if multitask else loops)}
            problem = _nonfinite(step_losses, norms)
            if runtime.any(problem is not None):
                problem = problem or "a loss or gradient on another process is not finite"
                if cfg.on_nonfinite == "stop":
                    bar.close()
                    raise PrefixTuneError(_nonfinite_stop(step + 1, problem, out, saved_at))
                optimizer.zero_grad(set_to_none=True)  # the step is skipped: no update, data and schedule move on
                skipped, window_skipped = skipped + 1, window_skipped + 1
                _say(main, f"step {step + 1}: {problem}; step skipped (on_nonfinite=skip)")  # even with --quiet
                with warnings.catch_warnings():  # when the very first step is skipped, torch warns about the order
                    warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*", category=UserWarning)
                    scheduler.step()
            else:
                window_loss += sum(step_losses.values()) / len(step_losses)
                if multitask:
                    for name, value in step_losses.items():
                        window_by_task[name] += value
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            for t in active:
                t.steps = step
            elapsed += time.perf_counter() - started
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                seconds = time.perf_counter() - window_start
                steps_in_window = (step % cfg.log_every or cfg.log_every) - window_skipped  # steps that updated
                record: dict[str, Any] = {"step": step}
                if steps_in_window > 0:  # the mean loss of the window's steps, skipped ones left out
                    record["loss"] = round(window_loss / steps_in_window, 5)
                record |= {
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": round(window_tokens / seconds, 1),
                    "elapsed_s": round(elapsed, 2),
                }
                if skipped:
                    record["skipped_steps"] = skipped  # in the whole run so far
                if multitask and steps_in_window > 0:
                    record["task_loss"] = {k: round(v / steps_in_window, 5) for k, v in window_by_task.items()}
                log(record)
                if "loss" in record:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                window_loss, window_tokens, window_skipped, window_start = 0.0, 0, 0, time.perf_counter()
                window_by_task = dict.fromkeys(window_by_task, 0.0)
            due = [t for t in active if cfg.eval_every and (step % cfg.eval_every == 0 or step == t.total_steps)]
            if due:
                if simple:
                    nll, count = evaluate.target_nll(
                        model,
                        tokenizer,
                        due[0].validation,
                        max_length=cfg.max_length,
                        batch_size=cfg.batch_size,
                        chat_template=cfg.chat_template,
                    )
                    model.train()
                    val_losses = {None: nll / max(count, 1)}
                else:
                    val_losses = mixed.validation_losses(model, tokenizer, due, cfg, runtime, pad_id)
                for t in due:
                    if t.name not in val_losses:
                        continue  # a task without validation examples
                    val_loss = val_losses[t.name]
                    task_field = {"task": t.name} if t.name is not None else {}
                    log(
                        {
                            "step": step,
                            **task_field,
                            "val_loss": round(val_loss, 5),
                            "val_perplexity": round(math.exp(min(val_loss, 700.0)), 4),
                        }
                    )
                    if t.best is None or val_loss < t.best:
                        t.best, t.bad_evals = val_loss, 0
                        save_adapter(t)  # the run directory always holds the best adapter so far
                    else:
                        t.bad_evals += 1
                        if cfg.early_stop and t.bad_evals >= cfg.early_stop:
                            t.stopped = True
                            who = f"task {t.name}: " if t.name else ""
                            _say(progress, f"{who}early stop at step {step}: {t.bad_evals} validations {NO_GAIN}")
                if all(t.stopped for t in loops):
                    break
            if cfg.save_every and step % cfg.save_every == 0:
                save_checkpoint()
    bar.close()
    for t in loops:
        if t.best is None:
            save_adapter(t)
    save_checkpoint()
    if main:
        plot_losses(metrics_path, out / "loss.png")
    summary = None
    if multitask:
        summary = {
            t.name: {"steps": t.steps, "best_val_loss": t.best, "stopped_early": t.stopped, "examples": len(t.encoded)}
            for t in loops
        }
    bests = [t.best for t in loops if t.best is not None]
    best = loops[0].best if not multitask else (sum(bests) / len(bests) if bests else None)
    stopped_early = all(t.stopped for t in loops)
    return TrainResult(trained, out, step, best, stopped_early, trainable, total_params, elapsed, summary, skipped)


def _resume_state(out: Path, model: Any) -> dict[str, Any] | None:
    """The checkpoint's state (its tensors restored into `model`), or None when the run saved none yet."""
    return checkpoint.load_checkpoint(out, model) if checkpoint.checkpoint_dir(out) is not None else None


def _keep_metrics_until(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl with the records up to `step` (the checkpoint's): a killed run may have logged
    later steps, which the resumed run logs again, and may have left a torn last line."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if isinstance(r.get("step"), int) and r["step"] <= step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if path.read_bytes() != text.encode():
        atomic_write_bytes(path, text.encode())


def _grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """The total gradient norm of `params`, clipped to `max_norm` first when clipping is on."""
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _nonfinite(losses: dict[Any, float], norms: dict[Any, float]) -> str | None:
    """What is not finite in this step (None: nothing)."""
    for what, values in (("loss", losses), ("gradient norm", norms)):
        for name, value in values.items():
            if not math.isfinite(value):
                return f"{f'task {name}: ' if name is not None else ''}the {what} is {value}"
    return None


def _nonfinite_stop(step: int, problem: str, out: Path, saved_at: int | None) -> str:
    kept = (
        f"the checkpoint of step {saved_at} in {out} is kept: continue with --resume on_nonfinite=skip, or start "
        "again with a lower learning rate"
        if saved_at is not None
        else "no checkpoint was saved yet (set --save-every); start again with a lower learning rate or "
        "on_nonfinite=skip"
    )
    return f"step {step}: {problem}; training stopped before the update. {kept}"


@contextmanager
def _ctrl_c_at_step_boundary() -> Iterator[threading.Event]:
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


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(f"prefixtune: {message}", file=sys.stderr)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of metrics.jsonl. A torn last line (the run was killed while appending it) is left out; a bad
    line anywhere else raises our error."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as e:
        raise PrefixTuneError(f"cannot read {path}: {e.strerror}") from None
    records = []
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    for index, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if index == len(numbered) - 1:
                break  # torn last line
            raise PrefixTuneError(f"{path}:{number}: not a metrics record ({e}); delete the line") from None
        records.append(record)
    return records


def plot_losses(metrics_path: Path, png: Path, title: str = "training loss") -> None:
    """loss.png: training loss per logged step, and validation loss where recorded (one line per task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if train:
        ax.plot(*zip(*train), label="train" if not any("task_loss" in r for r in records) else "train (task mean)")
    for task in dict.fromkeys(r.get("task") for r in records if "val_loss" in r):
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and r.get("task") == task]
        ax.plot(*zip(*val), marker="o", label="validation" if task is None else f"validation {task}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_save_figure(fig, png)
    plt.close(fig)
