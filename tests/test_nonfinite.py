"""A NaN/inf loss or gradient in `prefixtune train`: stop naming the step with the last good checkpoint kept, or skip.

The NaN is injected by wrapping the loss function the training loop calls: one chosen call returns a loss times
NaN (so its gradients are NaN too), or a finite loss whose gradient is infinite.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefixtune import cli, train
from prefixtune.train import checkpoint, step


def _args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--quiet",
        "--max-steps",
        "8",
        "train_split=all",
        "warmup_steps=2",
        "log_every=2",
        "projection_dim=16",
        "num_virtual_tokens=4",
        *extra,
    ]


class _InfGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        return grad * float("inf")


def _poison(monkeypatch: pytest.MonkeyPatch, call: int, kind: str = "nan") -> None:
    """Make the `call`-th training loss (1-based; one per step here) NaN, or give it an infinite gradient."""
    real = step.summed_loss
    calls = {"n": 0}

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] != call:
            return value
        return value * float("nan") if kind == "nan" else _InfGrad.apply(value)

    monkeypatch.setattr(step, "summed_loss", loss)


def _record_checkpoints(monkeypatch: pytest.MonkeyPatch) -> dict[int, bytes]:
    """step -> the bytes of checkpoint/trainable.safetensors right after it was saved."""
    saved: dict[int, bytes] = {}
    real = checkpoint.save_checkpoint

    def save(run_dir, model, state):  # noqa: ANN001
        final = real(run_dir, model, state)
        saved[state["step"]] = (final / checkpoint.TRAINABLE).read_bytes()
        return final

    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    return saved


@pytest.mark.parametrize("kind, grad_norm", [("nan", "1.0"), ("inf-grad", "1.0"), ("inf-grad", "0")])
def test_nonfinite_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, kind, grad_norm
) -> None:
    extra = ("--save-every", "2", "--eval-every", "2", "eval_split=all", f"max_grad_norm={grad_norm}")
    straight = tmp_path / "straight"
    assert cli.main(_args(model_dir, data_file, straight, *extra)) == 0
    out = tmp_path / "run"
    saved = _record_checkpoints(monkeypatch)
    _poison(monkeypatch, call=5, kind=kind)
    capsys.readouterr()
    assert cli.main(_args(model_dir, data_file, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    what = "the loss is nan" if kind == "nan" else "the gradient norm is"
    assert err.startswith("prefixtune: error: step 5: ") and what in err, err
    assert "checkpoint of step 4" in err and len(err.splitlines()) == 1, err
    # on disk: the checkpoint of step 4, byte for byte, and no log line past it
    assert sorted(saved) == [2, 4]
    assert (out / "checkpoint" / checkpoint.TRAINABLE).read_bytes() == saved[4]
    assert torch.load(out / "checkpoint" / checkpoint.STATE, weights_only=True)["step"] == 4
    assert max(r["step"] for r in train.read_metrics(out / "metrics.jsonl")) == 4
    assert all(torch.isfinite(t).all() for t in load_file(out / "adapter_model.safetensors").values())
    # and it is the good one: resuming from it (no NaN now) ends where the uninterrupted run ended
    monkeypatch.undo()
    assert cli.main(_args(model_dir, data_file, out, *extra, "--resume")) == 0
    assert (out / "adapter_model.safetensors").read_bytes() == (straight / "adapter_model.safetensors").read_bytes()


def test_nonfinite_without_a_checkpoint_says_so(
    model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _poison(monkeypatch, call=1)
    assert cli.main(_args(model_dir, data_file, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefixtune: error: step 1: the loss is nan") and "no checkpoint was saved" in err, err


def test_skip_makes_no_update_counts_the_step_and_goes_on(
    model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "run"
    saved = _record_checkpoints(monkeypatch)
    _poison(monkeypatch, call=3)
    capsys.readouterr()
    assert cli.main(_args(model_dir, data_file, out, "--save-every", "1", "--on-nonfinite", "skip")) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["skipped_steps"] == 1
    assert "step 3: the loss is nan; step skipped" in captured.err
    # step 3 changed nothing: the trainable tensors after it are those after step 2; step 4 moved them again
    assert saved[3] == saved[2] != saved[4]
    state = torch.load(out / "checkpoint" / checkpoint.STATE, weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {7}  # 8 steps, one without update
    assert state["skipped"] == 1 and state["step"] == 8
    records = train.read_metrics(out / "metrics.jsonl")
    assert [r.get("skipped_steps", 0) for r in records] == [0, 1, 1, 1]  # logged at steps 2, 4, 6, 8
    assert all(isinstance(r["loss"], float) and r["loss"] == r["loss"] for r in records)  # the NaN is left out
    assert all(torch.isfinite(t).all() for t in load_file(out / "adapter_model.safetensors").values())


def test_a_stopped_run_can_resume_with_skip(
    model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    _poison(monkeypatch, call=3)
    assert cli.main(_args(model_dir, data_file, out, "--save-every", "2")) == 2
    _poison(monkeypatch, call=1)  # the resumed run meets the same bad step 3 first (its first call)
    assert cli.main(_args(model_dir, data_file, out, "--save-every", "2", "on_nonfinite=skip", "--resume")) == 0
    state = torch.load(out / "checkpoint" / checkpoint.STATE, weights_only=True)
    assert state["step"] == 8 and state["skipped"] == 1


def test_on_nonfinite_in_help_and_bad_values(model_dir: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--on-nonfinite {stop,skip}" in text and "on_nonfinite" in text and "(default: stop)" in text
    assert cli.main(_args(model_dir, data_file, tmp_path / "run", "on_nonfinite=maybe")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "prefixtune: error: on_nonfinite must be stop or skip, got 'maybe'"
