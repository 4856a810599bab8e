"""Shared pieces of the property-based tests (tests/test_properties_*.py).

Every property has the same shape: feed a generated input to one entry point; it must either work or raise
`PrefixTuneError` (HTTP: answer 4xx with a JSON error body). Any other exception escapes and fails the test,
and hypothesis shrinks it to a small example.

Runs are reproducible (`derandomize=True`, no example database) and small enough for CI; each module prints how
many inputs it tried, and how many worked or were refused, when it finishes.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from prefixtune import PrefixTuneError

T = TypeVar("T")

SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "print_blob": False,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
        HealthCheck.large_base_example,
    ],
}


def fuzz(max_examples: int) -> Callable[[T], T]:
    """hypothesis settings for one property: `max_examples` inputs, deterministic, no deadline."""
    return settings(max_examples=max_examples, **SETTINGS)


class Tally:
    """Inputs tried per property, and how each ended: worked, or refused with our error."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def attempt(self, name: str, call: Callable[[], T]) -> T | None:
        """Run `call`; None when it raised PrefixTuneError. Any other exception propagates (the test fails)."""
        try:
            result = call()
        except PrefixTuneError as exc:
            assert str(exc).strip(), "a PrefixTuneError must say what went wrong"
            self.counts[name, "refused"] += 1
            return None
        self.counts[name, "worked"] += 1
        return result

    def count(self, name: str, outcome: str) -> None:
        self.counts[name, outcome] += 1

    def tried(self, name: str | None = None) -> int:
        return sum(n for (prop, _), n in self.counts.items() if name is None or prop == name)

    def lines(self) -> list[str]:
        names = sorted({prop for prop, _ in self.counts})
        out = []
        for name in names:
            parts = ", ".join(f"{n} {outcome}" for (prop, outcome), n in sorted(self.counts.items()) if prop == name)
            out.append(f"  {name}: {self.tried(name)} inputs ({parts})")
        return out


def report(tally: Tally, module: str, request: pytest.FixtureRequest) -> Iterator[Tally]:
    """Body of each module's tally fixture: yields the tally, then prints its counts on the terminal (past
    pytest's capture) and, when PREFIXTUNE_PROPERTY_TALLY names a file, appends them there as one JSON line."""
    yield tally
    lines = [f"{module}: {tally.tried()} inputs tried", *tally.lines()]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)
    record = os.environ.get("PREFIXTUNE_PROPERTY_TALLY")
    if record:
        counts = {f"{prop}/{outcome}": n for (prop, outcome), n in sorted(tally.counts.items())}
        with open(record, "a") as f:
            f.write(json.dumps({"module": module, "tried": tally.tried(), "counts": counts}) + "\n")


# ----- strategies ---------------------------------------------------------------------------------------------

# Text that can be written to a UTF-8 file (no lone surrogates), with the awkward characters made likely:
# line and paragraph separators, NUL, BOM, CR, quotes and delimiters.
AWKWARD = "\n\r\t\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\ufeff\"',;{}[]:\\"
texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from(AWKWARD + "ab é"), max_size=20),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
)

# JSON strings may also hold escaped lone surrogates ("\\ud800"), which Python's json module lets through.
json_texts = st.one_of(texts, st.text(alphabet=st.characters(min_codepoint=0xD7FE, max_codepoint=0xE001), max_size=3))
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    json_texts,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=12,
)


def any_of(*values: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from(values)
