"""The learning-rate schedule: warmup that follows the run's length by default, then linear or cosine decay."""

from __future__ import annotations

import pytest

from prefixtune.config import TrainConfig
from prefixtune.train.optim import schedule, warmup_steps


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
