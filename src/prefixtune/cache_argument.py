"""The name of the models' KV-cache argument, which transformers 5.24 renamed.

transformers 5.24 renamed the forward argument (and the output field) `past_key_values` to `cache`; the old
name stays a deprecated alias until 5.40. We pass, and read, whichever name the installed transformers uses, so
no call of ours triggers the deprecation warning and nothing breaks when the alias goes.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

NAMES = ("cache", "past_key_values")  # the new name first


@cache
def cache_argument(model_class: type) -> str:
    """The keyword `model_class.forward` takes its cache as: "cache" (transformers >= 5.24) or "past_key_values"."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_from(kwargs: dict[str, Any]) -> Any:
    """The cache a forward call received under either name (None when it got none)."""
    for name in NAMES:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def output_cache(output: Any) -> Any:
    """The cache a model output carries (`output.cache` on transformers >= 5.24, `output.past_key_values` before)."""
    for name in NAMES:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None
