"""One run of `prefixtune compare`, in its own process: `python -m prefixtune.compare.worker --job JOB.json`.

Stage "train" (job.json): loads the model, trains (continuing from the run's checkpoint when an earlier worker
was interrupted), scores the trained method on the job's split, and writes result.json beside job.json. Its peak
memory is its own: `ru_maxrss`, the kernel's resident-set high-water mark of this process, read after training
and at the end. Stage "test" (test_job.json): loads the trained method of a swept winner from its train/ and
scores it on the test split: test_result.json. Each scoring also writes predictions-<split>.jsonl and keeps the
per-example statistics of BLEU, ROUGE-L or accuracy in the result (the report's bootstrap resamples them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .. import data, train
from ..atomic import atomic_write_bytes
from ..config import TrainConfig
from ..devices import resolve_placement
from ..errors import PrefixTuneError
from ..eval import evaluate, metrics
from ..methods.registry import load_trained
from ..models import load_model
from ..train import checkpoint, tasks
from ..train.distributed import Runtime
from ..train.placement import training_placement
from .run import EVAL_DATA_FIELDS, RESULT_FILE, TEST_RESULT_FILE, UNTUNED, classifies, eval_examples


def _load_placed(cfg: TrainConfig, trains: bool) -> tuple[Any, Any]:
    """The base model on the run's --device in the dtype its training loads (or, untuned, the one it scores in)."""
    if trains:
        where, dtype, _ = training_placement(cfg, Runtime(), loading=True)
    else:
        where = resolve_placement(cfg.device, cfg.dtype)
        dtype = where.dtype
    return load_model(cfg.model, dtype=dtype, device=where.device, device_map=where.device_map, allow_seq2seq=False)


def _checkpoint_step(train_dir: Path) -> int:
    """The step of the run's newest checkpoint (0 without one)."""
    directory = checkpoint.checkpoint_dir(train_dir)
    state = torch.load(directory / checkpoint.STATE, weights_only=True) if directory else {}
    return int(state.get("step", 0))


def _peak_rss_mb() -> float:
    """This process's resident-set high-water mark (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def score(model: Any, tokenizer: Any, cfg: TrainConfig, job: dict[str, Any], run_dir: Path) -> tuple[dict, dict]:
    """Scores on the job's split of the comparison's own data, and the per-example statistics of its metrics."""
    spec = job["eval"]
    source = replace(cfg, **{k: spec["data"][k] for k in EVAL_DATA_FIELDS}) if "data" in spec else cfg
    examples = eval_examples(source, spec["split"], spec["limit"])
    classify = classifies(cfg, examples)
    labels = None
    if classify:
        labels = data.label_names(eval_examples(source, "all", None)) or None
    scores, predictions = evaluate(
        model,
        tokenizer,
        examples,
        metric_names=["accuracy"] if classify else ["bleu", "rouge", "perplexity"],
        task="classify" if classify else "generate",
        labels=labels,
        max_length=cfg.max_length,
        max_new_tokens=spec["max_new_tokens"],
        batch_size=spec["batch_size"],
        chat_template=cfg.chat_template,
        num_beams=spec["num_beams"],
    )
    if classify:
        references = [[str(e.label if e.label is not None else e.target)] for e in examples]
    else:
        references = [e.references or ([e.target] if e.target else []) for e in examples]
    stats: dict[str, list[list[float]]] = {}
    if len(predictions) == len(examples):
        names = ["accuracy"] if classify else ["bleu", "rougeL"]
        stats = {m: metrics.example_statistics(m, predictions, references) for m in names}
        rows = [
            {"input": e.source, "prediction": p, "references": r} for e, p, r in zip(examples, predictions, references)
        ]
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        atomic_write_bytes(run_dir / f"predictions-{spec['split']}.jsonl", text.encode())
    return scores, stats


def score_trained(job: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Score a finished run's trained method on the test split; writes and returns test_result.json."""
    cfg = TrainConfig(**job["config"])
    base, tokenizer = _load_placed(cfg, trains=True)
    model = load_trained(base, Path(cfg.out), job["method"])
    started = time.perf_counter()
    scores, stats = score(model, tokenizer, cfg, job, run_dir)
    record = {"scores": scores, "example_stats": stats, "test_seconds": round(time.perf_counter() - started, 2)}
    atomic_write_bytes(run_dir / TEST_RESULT_FILE, (json.dumps(record, indent=2) + "\n").encode())
    return record


def run_job(job_path: Path) -> dict[str, Any]:
    """Train (resuming when a checkpoint is there) and evaluate one run; writes and returns result.json.

    A test job (stage "test") only scores the run's trained method: test_result.json.
    """
    job = json.loads(job_path.read_text())
    cfg = TrainConfig(**job["config"])
    method, run_dir, train_dir = job["method"], job_path.parent, Path(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if job.get("stage") == "test":
        return score_trained(job, run_dir)
    base, tokenizer = _load_placed(cfg, trains=method is not None)
    base_params = sum(p.numel() for p in base.parameters())
    with torch.no_grad():  # weights may be mmapped and paged in lazily: touch them so the baseline below holds them
        for p in base.parameters():
            p.detach().sum()
    record: dict[str, Any] = {
        "name": job["name"],
        "method": method or UNTUNED,
        "jobs": job.get("jobs", 1),  # runs at a time beside this one: its time and memory were measured so
        "base_params": base_params,
        "rss_after_load_mb": _peak_rss_mb(),
    }
    model: Any = base
    if method is None:
        record.update(trainable_params=0, saved_params=0, saved_bytes=0, steps=0, train_seconds=0.0)
    else:
        resume = checkpoint.checkpoint_dir(train_dir) is not None
        if not resume and train_dir.exists():  # stopped before its first checkpoint: nothing to keep
            shutil.rmtree(train_dir)
        # A resumed process ran only the steps after the checkpoint (maybe none): its high-water mark is not the
        # training's, so the record says where it started and the report leaves its peak memory out.
        record["resumed_from_step"] = _checkpoint_step(train_dir) if resume else 0
        result = train.train(cfg, resume=resume, progress=False, model_and_tokenizer=(base, tokenizer))
        record["peak_rss_train_mb"] = _peak_rss_mb()
        logged = train.read_metrics(train_dir / "metrics.jsonl")
        windows = [r["tokens_per_s"] for r in logged if "tokens_per_s" in r]
        record.update(
            lr=cfg.lr,
            train_size=job.get("train_size", cfg.train_size),
            train_examples=len(tasks.load_tasks(cfg)[0][0].train),
            seed=cfg.seed,
            options=cfg.options,
            steps=result.steps,
            train_seconds=round(result.train_seconds, 2),
            tokens_per_s=round(sum(windows) / len(windows), 1) if windows else None,
            trainable_params=result.trainable_params,
            total_params=result.total_params,
            best_val_loss=result.best_val_loss,
            losses=[[r["step"], r["loss"]] for r in logged if "loss" in r],
            warnings=[[r["step"], r["warning"]] for r in logged if "warning" in r],  # the report lists them
            **saved_size(train_dir),
        )
        model = result.model
        if cfg.eval_every:  # the run directory holds the best model seen in validation: score that one
            del model, result, base
            fresh, tokenizer = _load_placed(cfg, trains=True)
            model = load_trained(fresh, train_dir, method)
    started = time.perf_counter()
    record[job["eval"].get("scores_key", "scores")], record["example_stats"] = score(
        model, tokenizer, cfg, job, run_dir
    )
    record.update(eval_seconds=round(time.perf_counter() - started, 2), peak_rss_mb=_peak_rss_mb())
    record.setdefault("peak_rss_train_mb", record["peak_rss_mb"])
    atomic_write_bytes(run_dir / RESULT_FILE, (json.dumps(record, indent=2) + "\n").encode())
    if method is not None:
        shutil.rmtree(train_dir / checkpoint.CHECKPOINT, ignore_errors=True)  # finished: result.json is the record
    return record


# What `prefixtune train` writes beside the trained method itself.
RUN_FILES = {"checkpoint", ".checkpoint.tmp", ".checkpoint.old", "metrics.jsonl", "config.yaml", "loss.png"}


def saved_size(train_dir: Path) -> dict[str, int]:
    """Bytes on disk of the saved method, and the parameters its safetensors files hold."""
    from safetensors import safe_open

    size, params = 0, 0
    for path in sorted(train_dir.rglob("*")):
        if not path.is_file() or path.relative_to(train_dir).parts[0] in RUN_FILES:
            continue
        size += path.stat().st_size
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    shape = f.get_slice(key).get_shape()
                    params += math.prod(shape)
    return {"saved_bytes": size, "saved_params": params}


def _worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefixtune.compare.worker", description="one run of a comparison")
    parser.add_argument("--job", required=True, type=Path, help="DIR/runs/NAME/job.json written by compare")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        run_job(args.job)
    except PrefixTuneError as e:
        print(f"prefixtune: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("prefixtune: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        if type(e).__name__ == "Interrupted":  # train.Interrupted: a checkpoint was saved
            print(f"prefixtune: {e}", file=sys.stderr, flush=True)
            return 130
        raise
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
