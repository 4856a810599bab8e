"""Hugging Face data sets: `hf:NAME[:CONFIG][?OPTION=VALUE&...]` -> raw records, read lazily.

    NAME          a hub id, a builder (`json`, `csv`, `parquet`, `text` with data_files=), or a local directory
                  written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`
    data_files=   comma-separated files or globs for a builder (hf:json?data_files=a.jsonl,b.jsonl)
    split=        one split expression: `train`, `train[:10%]`, `train[10:20]`, `train[-100:]`; the records are
                  that slice, and prefixtune divides them into train/validation/test by source as it does a file
    streaming=1   read records one by one (`datasets` streaming): nothing is downloaded or held beyond the records
                  taken; needs a limit, `take=N` or the caller's (train_size, eval_size, eval --limit). Slices
                  must then be absolute rows (`train[100:600]`), percentages need the whole split.
    take=N        read at most the first N records of each split (with or without streaming)
    revision=     a hub revision (branch, tag or commit)

Without split= the data set's own splits are train/validation/test (as before).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from ..errors import PrefixTuneError

OPTIONS = ("data_files", "split", "streaming", "take", "revision")
_SLICE = re.compile(r"^([\w.-]+)(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?$")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclass
class HfSpec:
    name: str
    config: str | None = None
    data_files: list[str] | None = None
    split: str | None = None  # a split expression, checked by parse_split
    streaming: bool = False
    take: int | None = None
    revision: str | None = None


def parse_spec(spec: str) -> HfSpec:
    """`hf:NAME[:CONFIG][?options]` -> HfSpec; our error for an empty name or an unknown or bad option."""
    body, _, query = spec[len("hf:") :].partition("?")
    name, _, config = body.partition(":")
    if not name:
        raise PrefixTuneError("hf: needs a data set name, as in hf:NAME, hf:NAME:CONFIG or hf:json?data_files=FILE")
    parsed = HfSpec(name, config or None)
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in OPTIONS:
            raise PrefixTuneError(f"{spec}: unknown hf: option {key!r}; options: {', '.join(OPTIONS)}")
        if key == "data_files":
            parsed.data_files = [f.strip() for f in value.split(",") if f.strip()] or None
        elif key == "split":
            parse_split(value, spec)
            parsed.split = value
        elif key == "streaming":
            if value.lower() not in _TRUE + _FALSE:
                raise PrefixTuneError(f"{spec}: streaming={value!r}; use streaming=1 or streaming=0")
            parsed.streaming = value.lower() in _TRUE
        elif key == "take":
            if not value.isdigit() or int(value) < 1:
                raise PrefixTuneError(f"{spec}: take={value!r} must be a positive number of records")
            parsed.take = int(value)
        else:
            parsed.revision = value or None
    return parsed


def parse_split(expression: str, where: str) -> tuple[str, str | None, str | None]:
    """`train[:10%]` -> ("train", None, "10%"): the split's name and the slice's ends as written."""
    match = _SLICE.match(expression.strip())
    if not match:
        raise PrefixTuneError(
            f"{where}: split={expression!r} is not a split expression; use NAME, NAME[:10%], NAME[10:20] or NAME[-5:]"
        )
    return match.group(1), match.group(2), match.group(3)


def _bound(end: str | None, size: int | None, where: str) -> int | None:
    if end is None:
        return None
    if end.endswith("%"):
        if size is None:
            raise PrefixTuneError(
                f"{where}: a percentage slice needs the split's size, which streaming does not know; "
                "give absolute rows (train[0:1000]) or drop streaming=1"
            )
        return round(int(end[:-1]) * size / 100)
    return int(end)


def _datasets() -> Any:
    try:
        import datasets  # deferred: an optional dependency (prefixtune[hf]), heavy to import
    except ImportError:
        raise PrefixTuneError("hf: data sets need the `datasets` package: pip install 'prefixtune[hf]'") from None
    return datasets


def _failed(spec: HfSpec, e: Exception) -> PrefixTuneError:
    first = (str(e).splitlines() or [type(e).__name__])[0]
    return PrefixTuneError(f"cannot load Hugging Face data set {spec.name!r}: {first} (no network? use a local file)")


class HfSource:
    """One hf: data set, opened once: its split names, and rows of a split (a whole one or a slice)."""

    def __init__(self, spec: HfSpec) -> None:
        self.spec = spec
        self.datasets = _datasets()
        self.local = Path(spec.name).expanduser().is_dir() and not spec.data_files
        try:
            if self.local:  # a save_to_disk directory: memory-mapped Arrow files
                loaded = self.datasets.load_from_disk(str(Path(spec.name).expanduser()))
            else:
                options = {"data_files": spec.data_files, "revision": spec.revision, "streaming": spec.streaming}
                loaded = self.datasets.load_dataset(spec.name, spec.config, **{k: v for k, v in options.items() if v})
        except PrefixTuneError:
            raise
        except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFoundError)
            raise _failed(spec, e) from None
        self.parts = loaded if hasattr(loaded, "keys") else {"train": loaded}  # one Dataset: its only split

    def split_names(self) -> list[str]:
        return list(self.parts.keys())

    def rows(self, expression: str, limit: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
        """(where, record) for the rows of `expression` (NAME or NAME[a:b]), at most `limit` of them."""
        label = f"hf:{self.spec.name}"
        name, start, stop = parse_split(expression, label)
        if name not in self.parts:
            raise PrefixTuneError(f"{label} has no split {name!r} (splits: {', '.join(self.split_names())})")
        part = self.parts[name]
        if self.spec.streaming and self.local:
            part = part.to_iterable_dataset()
        size = None if self.spec.streaming else len(part)
        first, last = _bound(start, size, label), _bound(stop, size, label)
        if (first is not None and first < 0) or (last is not None and last < 0):
            if size is None:
                raise PrefixTuneError(f"{label}: streaming cannot count from the end; give rows from the start")
            first = first + size if first is not None and first < 0 else first
            last = last + size if last is not None and last < 0 else last
        first = first or 0
        if last is not None and limit is not None:
            limit = min(limit, max(last - first, 0))
        elif last is not None:
            limit = max(last - first, 0)
        if self.spec.streaming:
            stream = iter(part.skip(first) if first else part)
        else:
            end = size if limit is None else min(size, first + limit)
            stream = iter(part.select(range(first, max(end, first))) if (first, end) != (0, size) else part)
        try:
            for i, row in enumerate(islice(stream, limit)):
                yield f"{label}[{expression}] row {first + i}", dict(row)
        except PrefixTuneError:
            raise
        except Exception as e:  # a corrupt shard or lost connection while streaming
            raise _failed(self.spec, e) from None
