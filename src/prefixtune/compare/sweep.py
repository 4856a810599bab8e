"""The learning-rate sweep of `prefixtune compare`: which rates each method tries, and which one wins.

Every method tries the same factors around its own centre rate (its default, `--lr` or `METHOD.lr=X`), by
default x1/3, x1 and x3, or the rates `--lrs METHOD=R1,R2,...` gives it. The sweep trains each rate on the first
seed at every swept train size and scores it on the selection split (validation); the winner (best quality
there, then lowest loss, then the earlier rate) is the rate every seed trains and is tested with. Where the winner
is the lowest or the highest rate tried, the best rate may lie outside the grid, so one more rate is tried beyond
it (one grid step further: x3 for the default factors), up to `--sweep-extend` times per method and size
(default 1; 0 keeps the grid fixed). A train size that is not swept takes the winner of the nearest swept size
(on a log scale; the smaller on a tie).
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import PrefixTuneError
from .settings import CompareSettings


def rounded(rate: float) -> float:
    """Three significant digits: 3e-3 x 1/3 is 1e-3, not 0.0009999999999999998 (names and JSON stay readable)."""
    return float(f"{rate:.3g}")


def candidate_rates(settings: CompareSettings, method: str, centre: float) -> list[float]:
    """The rates `method` tries, in order (one rate without a sweep: the centre)."""
    if not settings.sweep:
        return [centre]
    if method in settings.lr_lists:
        rates = [rounded(r) for r in settings.lr_lists[method]]
    else:
        rates = [rounded(centre * f) for f in settings.lr_factors]
    if len(set(rates)) < 2:
        raise PrefixTuneError(
            f"the sweep of {method} has one rate ({rates[0]:g}); a sweep needs at least 2 distinct rates "
            "(--lr-sweep 0.333,1,3 or --lrs METHOD=R1,R2,...), or give --no-sweep"
        )
    return list(dict.fromkeys(rates))


def swept_sizes(settings: CompareSettings) -> list[int | None]:
    """The train sizes that are swept (all of them unless --sweep-sizes names some)."""
    if settings.sweep_sizes is None:
        return list(settings.train_sizes)
    unknown = [s for s in settings.sweep_sizes if s not in settings.train_sizes]
    if unknown:
        shown = ", ".join(str(s or "all") for s in unknown)
        raise PrefixTuneError(f"--sweep-sizes {shown}: not among --train-sizes; sweep sizes that are trained")
    return list(settings.sweep_sizes)


def source_size(size: int | None, swept: list[int | None], available: int) -> int | None:
    """The swept size whose winner a size reuses: itself if swept, else the nearest on a log scale."""
    if size in swept:
        return size

    def distance(s: int | None) -> tuple[float, float]:
        n = s or available
        return abs(math.log(n) - math.log(size or available)), n

    return min(swept, key=distance)


def selection_key(quality: str):  # noqa: ANN201 (a sort key)
    """Sort key of a swept record: better quality first, then lower loss, then its place in the rate list."""

    def key(record: dict[str, Any]) -> tuple[float, float, int]:
        scores = record["select_scores"]
        value = scores.get(quality)
        loss = scores.get("loss")
        return (
            -value if value is not None else math.inf,
            loss if loss is not None and math.isfinite(loss) else math.inf,
            record["rate_index"],
        )

    return key


def choose(records: list[dict[str, Any]], quality: str) -> dict[str, Any]:
    """The winning record of one (method, swept size) among its rates."""
    return min(records, key=selection_key(quality))


def beyond_edge(tried: list[float], winner: float) -> float | None:
    """The next rate to try when `winner` is the lowest or highest of `tried` (one grid step further out, the step
    being the ratio of the two rates at that end), else None."""
    rates = sorted(set(tried))
    if len(rates) < 2:
        return None
    if winner == rates[0]:
        return rounded(rates[0] * rates[0] / rates[1])
    if winner == rates[-1]:
        return rounded(rates[-1] * rates[-1] / rates[-2])
    return None
