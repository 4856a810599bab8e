"""The budget and the learning-rate schedule: by default 6 epochs kept between 80 and 160 steps (one epoch on large
data), warmup that follows the run's length, then linear or cosine decay."""

from __future__ import annotations

import json

import pytest

from prefixtune.config import TrainConfig
from prefixtune.train.loop import total_steps
from prefixtune.train.optim import schedule, warmup_steps


@pytest.mark.parametrize(
    "epochs, per_epoch, expected",
    [
        (None, 7, 80),  # 50 examples of batch 8: 6 epochs are 42 steps, too few
        (None, 13, 80),  # 100: 78
        (None, 14, 84),
        (None, 25, 150),  # 200
        (None, 63, 160),  # 500: 378, too many
        (None, 160, 160),
        (None, 700, 700),  # one epoch is more
        (1.0, 7, 7),
        (2.5, 7, 18),
        (0.01, 7, 1),
    ],
)
def test_the_default_budget_is_6_epochs_between_80_and_160_steps_or_one_epoch(epochs, per_epoch, expected) -> None:
    assert total_steps(epochs, per_epoch) == expected


@pytest.mark.parametrize("total, expected", [(1, 1), (7, 1), (18, 2), (80, 8), (200, 20), (5000, 20)])
def test_default_warmup_is_a_tenth_of_the_run_at_most_20(total: int, expected: int) -> None:
    assert warmup_steps(TrainConfig(), total) == expected


@pytest.mark.parametrize("given", [0, 5, 50])
def test_a_given_warmup_is_kept_whatever_the_run_length(given: int) -> None:
    assert warmup_steps(TrainConfig(warmup_steps=given), 7) == given


def test_a_short_run_reaches_its_peak_rate_and_decays_to_zero() -> None:
    """One epoch of 50 examples at batch 8 is 7 steps: by default it warms up for 1 and decays over the other 6;
    a fixed 20 warmup steps (the old default) never gets past 40% of the peak."""
    factors = [schedule(TrainConfig(), 7)(step) for step in range(8)]
    assert factors[0] == pytest.approx(0.5) and factors[1] == 1.0 and factors[7] == 0.0
    assert all(a > b for a, b in zip(factors[1:], factors[2:]))
    fixed = [schedule(TrainConfig(warmup_steps=20), 7)(step) for step in range(7)]
    assert max(fixed) == pytest.approx(7 / 21) and fixed == sorted(fixed)


def test_cosine_and_constant_after_the_default_warmup() -> None:
    cosine = schedule(TrainConfig(schedule="cosine"), 80)
    constant = schedule(TrainConfig(schedule="constant"), 80)
    assert cosine(8) == 1.0 and cosine(44) == pytest.approx(0.5) and cosine(80) == pytest.approx(0.0, abs=1e-12)
    assert constant(7) < 1.0 and constant(8) == constant(79) == 1.0


def test_negative_warmup_is_refused() -> None:
    from prefixtune.errors import PrefixTuneError

    with pytest.raises(PrefixTuneError, match="warmup_steps"):
        TrainConfig(warmup_steps=-1)


def test_a_run_without_a_budget_trains_80_steps_on_small_data(model_dir, data_file, tmp_path, capsys) -> None:
    """conftest's 18 records are 6 inputs, 6 training pairs: 2 steps of 4 per epoch, so 80 steps by default, and
    exactly one epoch with --epochs 1."""
    import json

    from prefixtune import cli

    args = ["train", "--model", str(model_dir), "--data", str(data_file), "--batch-size", "4", "--quiet"]
    args += ["train_split=all", "projection_dim=16", "num_virtual_tokens=4"]
    assert cli.main([*args, "--out", str(tmp_path / "auto")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 80
    assert cli.main([*args, "--out", str(tmp_path / "one"), "--epochs", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2


@pytest.mark.parametrize("lr, warns", [("0.3", True), ("1e-2", False)])
def test_a_diverging_run_is_told_once_to_lower_its_rate(model_dir, data_file, tmp_path, capsys, lr, warns) -> None:
    """Full fine-tuning of the tiny model at 0.3 climbs from 5.75 to 9.4 by step 4 (then recovers, as the prefix on
    MultiEmo did at 3e-3 on one seed: docs/methods.md); at 1e-2 its loss only falls. The run still finishes."""
    from prefixtune import cli

    out = tmp_path / "run"
    args = ["train", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), "--method", "full"]
    args += ["--max-steps", "12", "--batch-size", "4", "--lr", lr, "--quiet", "train_split=all", "log_every=1"]
    args += ["warmup_steps=0"]
    assert cli.main(args) == 0
    said = capsys.readouterr().err
    assert said.count("training is diverging") == (1 if warns else 0)
    if warns:
        assert f"try a lower learning rate than {float(lr):.3g}" in said
    assert (out / "model.safetensors").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    warned = [r for r in records if "warning" in r]
    assert len(warned) == (1 if warns else 0)
    if warns:  # `prefixtune compare` follows metrics.jsonl, not the worker's stderr: it shows the same line
        from prefixtune.compare.process import _report_progress

        metrics = tmp_path / "metrics.jsonl"
        metrics.write_text(json.dumps(warned[0]) + "\n")
        assert _report_progress(True, "[1/1] full-s0", metrics, 0, 12) == 1
        shown = capsys.readouterr().err
        assert f"[1/1] full-s0: step {warned[0]['step']}: training loss" in shown and "diverging" in shown


def test_the_prefix_default_rate_falls_with_the_square_root_of_target_tokens_per_step() -> None:
    """3e-3 at 200 target tokens per step (E2E's and XSum's batch of 8), never above it; other methods fixed."""
    from prefixtune.methods.registry import METHODS

    prefix = METHODS["prefix"]
    assert prefix.default_lr_for(200) == prefix.default_lr_for(None) == 3e-3
    assert prefix.default_lr_for(800) == 3e-3  # measured at 200, not above: never raised
    assert prefix.default_lr_for(50) == 1.5e-3 and prefix.default_lr_for(14) == 7.94e-4  # MultiEmo-like: 1.76 x 8
    assert METHODS["lora"].default_lr_for(14) == 2e-4 and METHODS["full"].default_lr_for(14) == 5e-5


def _targets_per_example(model_dir, data_file) -> float:
    """Counted here from the tokenizer, not by the code under test: ' ' + target, then EOS (the plain format)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    targets = [json.loads(line)["target"] for line in data_file.read_text().splitlines()]
    return sum(len(tokenizer(" " + t, add_special_tokens=False).input_ids) + 1 for t in targets) / len(targets)


def test_train_and_compare_give_the_prefix_the_same_data_scaled_default(model_dir, data_file, tmp_path, capsys):
    """Without --lr a prefix on the tiny data (about 23 target tokens an example, batch 4) trains at 3e-3 x
    sqrt(4 x 23 / 200), says so once, and compare centres its sweep there; a given --lr is used as it is."""
    from prefixtune import cli
    from prefixtune.compare import CompareSettings, plan
    from prefixtune.methods.registry import METHODS

    expected = METHODS["prefix"].default_lr_for(4 * _targets_per_example(model_dir, data_file))
    assert 1.5e-3 < expected < 2.5e-3
    args = ["train", "--model", str(model_dir), "--data", str(data_file), "--batch-size", "4", "--max-steps", "2"]
    args += ["--quiet", "train_split=all", "projection_dim=16", "num_virtual_tokens=4", "warmup_steps=0"]
    args += ["log_every=1", "schedule=constant"]
    assert cli.main([*args, "--out", str(tmp_path / "auto")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["lr"] == expected
    assert cli.main([*[a for a in args if a != "--quiet"], "--out", str(tmp_path / "auto-told")]) == 0
    said = capsys.readouterr().err
    assert said.count(f"learning rate {expected:.3g}: prefix's default 0.003 scaled") == 1, said
    logged = [json.loads(line)["lr"] for line in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [pytest.approx(expected)] * 2
    assert cli.main([*[a for a in args if a != "--quiet"], "--out", str(tmp_path / "given"), "--lr", "3e-3"]) == 0
    assert "scaled" not in capsys.readouterr().err
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "given" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [pytest.approx(3e-3)] * 2
    settings = CompareSettings(["prefix", "lora"], model=str(model_dir), data=str(data_file), max_steps=2)
    settings.batch_size, settings.overrides = 4, ["train_split=all"]
    rates = plan(settings, tmp_path / "cmp").saved["lr_per_method"]
    assert rates == {"prefix": expected, "lora": 2e-4}
