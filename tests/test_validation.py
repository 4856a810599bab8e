"""Validation during training: a separate validation set (`eval_data`), early stopping, the best adapter kept."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import NAMES
from test_train_cli import _train_args

from prefixtune import cli, train
from prefixtune.config import TrainConfig
from prefixtune.train import tasks


def _args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """test_train_cli's command line with one warmup step (the scenarios below are tuned to it)."""
    return _train_args(model_dir, data, out, "warmup_steps=1", *extra)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Inputs that the training file (conftest's names.jsonl) does not hold, with another target than it teaches."""
    path = tmp_path_factory.mktemp("held_out") / "held_out.jsonl"
    rows = [{"input": f"name: {n}", "target": f"{n} is a pub."} for n in ("Zed", "Yara", "Xu")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _val_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in train.read_metrics(out / "metrics.jsonl") if "val_loss" in r]


def test_eval_data_is_validated_instead_of_a_split_of_the_training_data(data_file: Path, held_out: Path) -> None:
    cfg = TrainConfig(data=str(data_file), train_split="all", eval_every=2, eval_data=str(held_out), eval_split="all")
    (task,), multitask = tasks.load_tasks(cfg)
    assert not multitask and {e.source for e in task.train} == {f"name: {n}" for n in NAMES}
    assert [e.source for e in task.validation] == ["name: Zed", "name: Yara", "name: Xu"]
    without = tasks.load_tasks(TrainConfig(data=str(data_file), train_split="all"))[0][0]
    assert without.validation == []  # no eval_every: nothing is read for validation


def test_the_run_directory_holds_the_best_adapter_not_the_last(
    model_dir: Path, data_file: Path, held_out: Path, tmp_path: Path, capsys
) -> None:
    """Training teaches "coffee shop", the held-out set wants "pub": its loss falls (the shared words) and then
    rises; the adapter saved is the one of the best validation, as `prefixtune eval` on the same examples shows
    (its perplexity is exp of that loss)."""
    out = tmp_path / "run"
    extra = ("--max-steps", "12", "--lr", "0.1", "--eval-every", "1", f"eval_data={held_out}", "eval_split=all")
    assert cli.main(_args(model_dir, data_file, out, *extra)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    losses = _val_losses(out)
    best_step, best = min(losses, key=lambda s_l: s_l[1])
    assert len(losses) == 12 and best_step < 12 and losses[-1][1] > best  # the scenario: the last is not the best
    assert summary["best_val_loss"] == pytest.approx(best, abs=1e-4) and summary["steps"] == 12
    score = ["eval", "--model", str(model_dir), "--data", str(held_out), "--metrics", "perplexity"]
    assert cli.main([*score, "--adapter", str(out)]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert math.log(scored["perplexity"]) == pytest.approx(best, rel=1e-3)


def test_early_stop_ends_the_run_after_that_many_validations_without_improvement(
    model_dir: Path, data_file: Path, held_out: Path, tmp_path: Path, capsys
) -> None:
    """A rate so small that no weight moves: every validation after the first equals it, none improves on it."""
    out = tmp_path / "run"
    extra = ("--max-steps", "20", "--lr", "1e-30", "--eval-every", "2", "early_stop=2", f"eval_data={held_out}")
    assert cli.main(_args(model_dir, data_file, out, *extra, "eval_split=all")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [step for step, _ in _val_losses(out)] == [2, 4, 6]
    assert summary["steps"] == 6 and summary["stopped_early"] is True


def test_eval_data_with_several_tasks_is_one_line_exit_2(data_file: Path, held_out: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    args = _args(Path("unused"), Path("unused"), out, "--eval-every", "2", f"eval_data={held_out}")
    args[args.index("--data") + 1] = f"a={data_file},b={data_file}"
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefixtune: error: eval_data") and len(err.splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())  # nothing written (the checked directory may exist)
