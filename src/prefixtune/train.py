"""The training loop: AdamW, warmup + decay, accumulation, clipping, validation, checkpoints, resume.

Reproducible: the data order of epoch e is a function of (seed, e), and a checkpoint holds the RNG state, so a
resumed run continues exactly where the interrupted one was.
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
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import checkpoint, data, evaluate
from .config import TrainConfig, save_config
from .errors import PrefixTuneError
from .methods.registry import build_method, method_spec, parameter_counts

# Settings that may change between an interrupted run and its --resume; everything else must match.
RESUMABLE = {"max_steps", "epochs", "log_every", "eval_every", "save_every", "early_stop", "threads"}


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
    """Train `cfg.method` on `cfg.data`; the run directory ends with the trained method, metrics, config, plot."""
    spec = method_spec(cfg.method)
    out = _prepare_out(cfg, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train_examples = data.load_dataset(
        cfg.data,
        split=_split(cfg.train_split),
        data_dir=cfg.data_dir,
        source_field=cfg.source_field,
        target_field=cfg.target_field,
    )
    pairs = data.training_pairs(train_examples)[: cfg.train_size]
    if not pairs:
        raise PrefixTuneError(f"{cfg.data}: no training examples in split {cfg.train_split!r}")
    val_examples: list[data.Example] = []
    if cfg.eval_every:
        val_examples = data.load_dataset(
            cfg.data,
            split=_split(cfg.eval_split),
            data_dir=cfg.data_dir,
            source_field=cfg.source_field,
            target_field=cfg.target_field,
        )[: cfg.eval_size]
        if not val_examples:
            raise PrefixTuneError(f"{cfg.data}: split {cfg.eval_split!r} is empty; validation needs examples")
    if model_and_tokenizer is None:  # data errors come first: they are cheaper to find than a model load
        from .sources import load_model

        model_and_tokenizer = load_model(cfg.model)
    base, tokenizer = model_and_tokenizer
    encoded, stats = data.encode(pairs, tokenizer, max_length=cfg.max_length, chat_template=cfg.chat_template)
    _say(progress, f"training data: {stats.describe()}")

    model = build_method(cfg.method, base, cfg.options, tokenizer)
    trainable, total_params = parameter_counts(model)
    params = model.trainable_parameters()
    lr = cfg.lr or spec.default_lr
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_epoch = len(data.batches(encoded, cfg.batch_size, shuffle=False, pad_id=pad_id))
    steps_per_epoch = max(1, per_epoch // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total_steps))

    step, micro, best, bad_evals, elapsed = 0, 0, None, 0, 0.0
    if resume:
        state = checkpoint.load_checkpoint(out, model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        step, micro, best, bad_evals = state["step"], state["micro"], state["best"], state["bad_evals"]
        elapsed = state.get("elapsed", 0.0)
        _say(progress, f"resuming {out} at step {step}")
    save_config(cfg, out / "config.yaml")
    metrics_path = out / "metrics.jsonl"

    def snapshot() -> dict[str, Any]:
        return {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": checkpoint.rng_state(),
            "step": step,
            "micro": micro,
            "best": best,
            "bad_evals": bad_evals,
            "elapsed": elapsed,
        }

    def log(record: dict[str, Any]) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    epoch_cache: dict[int, list[dict[str, torch.Tensor]]] = {}

    def micro_batch(index: int) -> dict[str, torch.Tensor]:
        epoch = index // per_epoch
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = data.batches(
                encoded, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch, pad_id=pad_id
            )
        return epoch_cache[epoch][index % per_epoch]

    bar = tqdm(total=total_steps, initial=step, desc=f"train {cfg.method}", disable=not progress, dynamic_ncols=True)
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    stopped_early = False
    model.train()
    with _ctrl_c_at_step_boundary() as interrupted:
        while step < total_steps:
            if interrupted.is_set():
                bar.close()
                checkpoint.save_checkpoint(out, model, snapshot())
                raise Interrupted(f"interrupted at step {step}; checkpoint saved, continue with --resume")
            started = time.perf_counter()
            for _ in range(cfg.grad_accum):
                batch = micro_batch(micro)
                with autocast:
                    loss = causal_lm_loss(model, batch, target_only=cfg.target_only_logits)
                (loss / cfg.grad_accum).backward()
                window_loss += float(loss) / cfg.grad_accum
                window_tokens += int(batch["attention_mask"].sum())
                micro += 1
            if not math.isfinite(window_loss):
                raise PrefixTuneError(
                    f"step {step + 1}: the loss is not finite; lower the learning rate (last checkpoint kept)"
                )
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed += time.perf_counter() - started
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                seconds = time.perf_counter() - window_start
                steps_in_window = step % cfg.log_every or cfg.log_every
                record = {
                    "step": step,
                    "loss": round(window_loss / steps_in_window, 5),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": round(window_tokens / seconds, 1),
                    "elapsed_s": round(elapsed, 2),
                }
                log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == total_steps):
                nll, count = evaluate.target_nll(
                    model,
                    tokenizer,
                    val_examples,
                    max_length=cfg.max_length,
                    batch_size=cfg.batch_size,
                    chat_template=cfg.chat_template,
                )
                model.train()
                val_loss = nll / max(count, 1)
                log({"step": step, "val_loss": round(val_loss, 5), "val_perplexity": round(math.exp(val_loss), 4)})
                if best is None or val_loss < best:
                    best, bad_evals = val_loss, 0
                    model.save_trained(out)  # the run directory always holds the best adapter so far
                else:
                    bad_evals += 1
                    if cfg.early_stop and bad_evals >= cfg.early_stop:
                        stopped_early = True
                        _say(progress, f"early stop at step {step}: {bad_evals} validations without improvement")
                        break
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint.save_checkpoint(out, model, snapshot())
    bar.close()
    if best is None:
        model.save_trained(out)
    checkpoint.save_checkpoint(out, model, snapshot())
    plot_losses(metrics_path, out / "loss.png")
    return TrainResult(model, out, step, best, stopped_early, trainable, total_params, elapsed)


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor], *, target_only: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens (labels != -100), as transformers computes it.

    With `target_only`, the LM head runs only at positions whose next token is a target in some row (via
    transformers' `logits_to_keep`): source tokens are masked from the loss anyway, so their logits are waste.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if not target_only:
        return model(**inputs, labels=labels).loss
    shifted = labels[:, 1:]  # the token that position p predicts is labels[:, p + 1]
    keep = (shifted != data.IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # (K,) positions
    logits = model(**inputs, logits_to_keep=keep).logits  # (B, K, V)
    target = shifted[:, keep]
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), target.flatten(), ignore_index=data.IGNORE_INDEX
    )


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


def _split(name: str) -> str | None:
    """ "all" means the whole data set (no split)."""
    return None if name == "all" else name


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(f"prefixtune: {message}", file=sys.stderr)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png: Path, title: str = "training loss") -> None:
    """loss.png: training loss per logged step, and validation loss where recorded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)
