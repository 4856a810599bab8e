"""Records -> examples: files, Hugging Face data sets and the built-in sets, their references and splits.

Sources of records: JSONL, CSV, JSON (a list, or BIG-bench's {"examples": [...]}) files; `hf:NAME[:CONFIG][?...]`
(Hugging Face `datasets`, optional; hf.py); the built-in sets `e2e`, `xsum`, `multiemo` (files located or fetched by
builtin.py). Fields: `input`/`target` by default, `prompt`/`completion` recognized, others by name; `messages`
and conversational `prompt`/`completion` (lists of {role, content}) make chat examples (chat.py). A `target`
that is a list of strings, or several records with the same source, are the references of one example;
BIG-bench `target_scores` (or a `label` field) make a classification example whose target is the label word.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import PrefixTuneError
from . import builtin, chat, hf

SPLITS = ("train", "validation", "test")
# (validation, test) fractions of the distinct sources; train is the rest
SPLIT_FRACTIONS: dict[str, tuple[float, float]] = {"e2e": (0.10, 0.20), "xsum": (0.10, 0.10), "multiemo": (0.10, 0.10)}
DEFAULT_SPLIT_FRACTIONS = (0.10, 0.10)



@dataclass
class Example:
    """One input and what should come out of it.

    `target` is the text trained on (the first reference; the label word for classification, None when
    unknown); `references` are all acceptable targets for scoring; `label` is set for classification only.
    """

    source: str
    target: str | None
    references: list[str] = field(default_factory=list)
    label: str | None = None
    task: str | None = None
    # chat examples (chat.py): the conversation before the final answer, which is `target`; the source is its JSON
    messages: list[dict[str, str]] | None = None
    loss_from: int = 0  # assistant turns of `messages` at this index or later carry loss
    where: str | None = field(default=None, compare=False)  # file:line of a chat record, for errors at encoding


# ----- reading ------------------------------------------------------------------------------------------------


def load_dataset(
    spec: str,
    *,
    split: str | None,
    data_dir: str | os.PathLike[str] | None = None,
    source_field: str | None = None,
    target_field: str | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> list[Example]:
    """Read a data set and return one example per distinct source, references grouped, in file order.

    `spec` is a built-in name (e2e, xsum, multiemo), `hf:NAME[:CONFIG]`, or a .jsonl/.csv/.json file.
    `split=None` is everything; "train"/"validation"/"test" are disjoint sets of distinct sources, chosen by
    a hash of (seed, source) so they never depend on file order. The split seed is not the training seed:
    train and eval must pass the same `seed` (default 0) or the test set leaks into training.
    Sizes in distinct sources (validation/test fractions, train is the rest):
      e2e      10% / 20%: 149 train, 21 validation, 43 test (of 213 inputs, ~4.7 references each)
      xsum     10% / 10%: 801 train, 100 validation, 100 test (of 1001)
      multiemo 10% / 10%: 6571 train, 822 validation, 822 test (of 8215)
      files    10% / 10%, rounded half up; hf:NAME uses the data set's own splits instead (hf:NAME?split=EXPR:
               that slice, divided as a file is; see hf.py for the options).
    `limit` caps the records read from a streamed hf: data set (`take=N` in the spec does too); files and
    non-streamed sets are read whole (so that references are grouped over the whole set) and cut by the caller.
    Classification examples are not grouped (each record stays one example), but share a split by source.
    """
    if split is not None and split not in SPLITS:
        raise PrefixTuneError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if spec.startswith("hf:"):
        return _read_hf(spec, split, source_field, target_field, limit, seed)
    if spec in builtin.DATA_ALIASES:
        path = builtin.prepare_dataset(spec, data_dir)
        examples = read_records(path, source_field=source_field, target_field=target_field, task=spec)
        fractions = SPLIT_FRACTIONS.get(spec, DEFAULT_SPLIT_FRACTIONS)
    else:
        path = _expand(spec)
        if not path.exists() and not path.suffix and "/" not in spec and os.sep not in spec:
            builtin.data_alias(spec)  # raises: unknown built-in name, with the list
        examples = read_records(path, source_field=source_field, target_field=target_field)
        fractions = DEFAULT_SPLIT_FRACTIONS
    grouped = group_references(examples)
    if split is None:
        return grouped
    return split_examples(grouped, split, fractions=fractions, seed=seed, name=spec)


def read_records(
    path: str | os.PathLike[str],
    *,
    source_field: str | None = None,
    target_field: str | None = None,
    require_target: bool = True,
    task: str | None = None,
) -> list[Example]:
    """Read a .jsonl, .csv/.tsv or .json file into one Example per record (no grouping, no splitting)."""
    path = _expand(path)
    if path.is_dir():
        raise PrefixTuneError(f"{path} is a directory; give a .jsonl, .csv or .json file")
    if not path.is_file():
        hint = "" if path.suffix else f"; built-in data sets: {', '.join(builtin.DATA_ALIASES)}"
        raise PrefixTuneError(f"{path}: no such data file{hint}")
    try:  # bytes, not read_text: its newline translation would change line breaks inside CSV cells
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise PrefixTuneError(f"{path}: cannot read as UTF-8 text ({e}); save the file as UTF-8") from None
    if not text.strip():
        raise PrefixTuneError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        rows = _csv_rows(path, text, "\t" if suffix == ".tsv" else ",", source_field, target_field)
    elif suffix == ".json":
        rows = _json_rows(path, text)
    elif suffix in (".jsonl", ".ndjson") or text.lstrip().startswith("{"):
        rows = _jsonl_rows(path, text)
    else:
        raise PrefixTuneError(f"{path}: unknown data format; use .jsonl, .csv, .tsv or .json")
    if not rows:
        raise PrefixTuneError(f"{path}: no records")
    fields = _FieldPlan.choose(rows[0][1], source_field, target_field, rows[0][0])
    return [fields.example(record, where, require_target, task) for where, record in rows]


def _expand(path: str | os.PathLike[str]) -> Path:
    try:
        return Path(path).expanduser()
    except (RuntimeError, ValueError):  # "~name/..." for a user that does not exist (or a name with NUL)
        raise PrefixTuneError(f"{path}: cannot expand '~' (no such user's home); give the full path") from None


def _parse_json(text: str, where: str, whole_file: bool) -> Any:
    """json.loads, with every way it can fail turned into our error (naming the line for a whole file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = f":{e.lineno}" if whole_file else ""
        raise PrefixTuneError(f"{where}{line}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise PrefixTuneError(f"{where}: JSON nested too deeply to read; flatten the record") from None
    except ValueError as e:  # an integer of more than 4300 digits (Python's int_max_str_digits)
        raise PrefixTuneError(f"{where}: not valid JSON here ({str(e).split(':')[0]}); quote long numbers") from None


# JSONL lines end at LF, CRLF or CR only: JSON strings may hold U+2028, U+0085 and the like (str.splitlines
# breaks there), while a raw CR or LF inside a JSON string is not valid JSON anyway.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _jsonl_rows(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(_LINE_BREAK.split(text), start=1):
        if not line.strip():
            continue
        record = _parse_json(line, f"{path}:{number}", whole_file=False)
        if not isinstance(record, dict):
            raise PrefixTuneError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        rows.append((f"{path}:{number}", record))
    return rows


def _json_rows(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    data = _parse_json(text, str(path), whole_file=True)
    records = data.get("examples") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise PrefixTuneError(f"{path}: expected a JSON list of records or an object with an 'examples' list")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise PrefixTuneError(f"{path}: record {i}: expected a JSON object, got {type(record).__name__}")
    return [(f"{path}: record {i}", record) for i, record in enumerate(records)]


def _csv_rows(
    path: Path, text: str, delimiter: str, source_field: str | None, target_field: str | None
) -> list[tuple[str, dict[str, Any]]]:
    if len(text) > csv.field_size_limit():  # the default 128 KiB per cell is too little for long documents
        csv.field_size_limit(len(text))
    # the csv module finds the rows itself: a quoted cell may hold line breaks
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        columns = reader.fieldnames or []
    except csv.Error as e:
        raise PrefixTuneError(f"{path}:1: malformed CSV header ({e})") from None
    for wanted in (source_field, target_field):
        if wanted is not None and wanted not in columns:
            raise PrefixTuneError(f"{path}:1: no column {wanted!r} (columns: {', '.join(columns)})")
    rows = []
    try:
        for row in reader:
            if None in row:
                raise PrefixTuneError(f"{path}:{reader.line_num}: more cells than the {len(columns)} columns")
            rows.append((f"{path}:{reader.line_num}", {k: v for k, v in row.items() if v is not None}))
    except csv.Error as e:
        raise PrefixTuneError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return rows


@dataclass
class _FieldPlan:
    """Which record fields hold the source and the target, decided once per file from its first record."""

    source: str
    target: str | None  # None: no target field named or found; classification fields may still apply
    target_named: bool
    chat: str | None = None  # "messages" or "prompt_completion" for conversational records (chat.py)

    @classmethod
    def choose(cls, first: dict[str, Any], source_field: str | None, target_field: str | None, where: str):
        if source_field is None and "messages" in first and "input" not in first:
            return cls("messages", None, False, chat="messages")
        if source_field is None:
            source_field = next((f for f in ("input", "prompt") if f in first), None)
            if source_field is None:
                raise PrefixTuneError(
                    f"{where}: no 'input' or 'prompt' field, nor 'messages' (fields: {', '.join(first) or 'none'}); "
                    "name the source field with --source-field"
                )
        target = target_field or next((f for f in ("target", "completion") if f in first), None)
        conversational = chat.is_conversation(first.get(source_field))
        return cls(source_field, target, target_field is not None, "prompt_completion" if conversational else None)

    def example(self, record: dict[str, Any], where: str, require_target: bool, task: str | None) -> Example:
        task = _check_text(record["task"], "task", where) if isinstance(record.get("task"), str) else task
        if self.chat is not None:
            return self._chat_example(record, where, task)
        source = record.get(self.source)
        if source is None:
            raise PrefixTuneError(f"{where}: no {self.source!r} field (fields: {', '.join(record)})")
        if not isinstance(source, str):
            raise PrefixTuneError(f"{where}: {self.source!r} must be a string, got {type(source).__name__}")
        _check_text(source, self.source, where)
        value = record.get(self.target) if self.target else None
        if value is not None:
            references = [value] if isinstance(value, str) else value
            if not isinstance(references, list) or not references or not all(isinstance(r, str) for r in references):
                raise PrefixTuneError(f"{where}: {self.target!r} must be a string or a non-empty list of strings")
            for reference in references:
                _check_text(reference, self.target or "target", where)
            return Example(source, references[0], list(references), task=task)
        if not self.target_named:
            label = _label_of(record, where)
            if label is not None:
                _check_text(label, "label", where)
                return Example(source, label, [label], label=label, task=task)
        if require_target:
            wanted = self.target or "target"
            raise PrefixTuneError(
                f"{where}: no {wanted!r} field (fields: {', '.join(record)}); name the target field with --target-field"
            )
        return Example(source, None, [], task=task)

    def _chat_example(self, record: dict[str, Any], where: str, task: str | None) -> Example:
        if self.chat == "messages":
            conversation = chat.parse_messages(record, where)
        else:
            if not isinstance(record.get(self.source), list):
                raise PrefixTuneError(
                    f"{where}: {self.source!r} must be a list of messages like the file's first record "
                    "(do not mix conversational and plain records in one file)"
                )
            conversation = chat.parse_prompt_completion(record, self.source, self.target or "completion", where)
        for message in [*conversation.context, {"content": conversation.answer}]:
            _check_text(message["content"], "content", where)
        answer = conversation.answer
        return Example(
            conversation.source,
            answer,
            [answer],
            task=task,
            messages=conversation.context,
            loss_from=conversation.loss_from,
            where=where,
        )


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(value: str, what: str, where: str) -> str:
    """Refuse strings that are not text: JSON lets "\\ud800" (half of a UTF-16 pair) through, tokenizers do not."""
    if _SURROGATE.search(value):
        raise PrefixTuneError(
            f"{where}: {what!r} holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), which is not text; "
            "fix or remove that record"
        )
    return value


def _label_of(record: dict[str, Any], where: str) -> str | None:
    """A classification label: BIG-bench `target_scores` (the label scored 1), or a `label` field."""
    scores = record.get("target_scores")
    if isinstance(scores, dict) and scores:
        if not all(isinstance(v, (int, float)) for v in scores.values()):
            shown = repr(scores) if len(repr(scores)) <= 200 else repr(scores)[:200] + "..."
            raise PrefixTuneError(f"{where}: target_scores must map each label to a number, got {shown}")
        best = max(scores.values())
        winners = [name for name, score in scores.items() if score == best]
        if len(winners) != 1:
            raise PrefixTuneError(f"{where}: target_scores has no single best label ({scores})")
        return str(winners[0])
    if "label" in record and record["label"] is not None:
        return str(record["label"])
    return None


def _read_hf(
    spec: str, split: str | None, source_field: str | None, target_field: str | None, limit: int | None, seed: int
) -> list[Example]:
    """hf: records as examples (see hf.py): the data set's own splits, or one `split=` slice divided as a file is."""
    parsed = hf.parse_spec(spec)
    if not parsed.streaming:
        limit = None  # read whole (memory-mapped), so that references group as for a file; take=N still cuts
    limit = min(parsed.take, limit) if parsed.take and limit else parsed.take or limit
    if parsed.split is not None and limit is None:  # an absolute slice's end is a limit too
        _, start, stop = hf.parse_split(parsed.split, spec)
        if stop is not None and not stop.endswith("%") and int(stop) >= 0:
            limit = max(int(stop) - int(start or 0), 0) if not (start or "").endswith("%") else None
    if parsed.streaming and limit is None:
        raise PrefixTuneError(
            f"{spec}: streaming reads records one by one and needs to know how many: add take=N to the spec "
            "(or set train_size / eval_size when training, --limit when evaluating)"
        )
    source = hf.HfSource(parsed)
    if parsed.split is not None:  # one slice: our own train/validation/test by source, as for a file
        examples = group_references(_hf_examples(source.rows(parsed.split, limit), source_field, target_field))
        if not examples:
            raise PrefixTuneError(f"{spec}: no records")
        return examples if split is None else split_examples(examples, split, seed=seed, name=spec)
    available = source.split_names()
    if split is not None and split not in available:
        raise PrefixTuneError(f"hf:{parsed.name} has no split {split!r} (splits: {', '.join(available)})")
    examples = []
    for part in [split] if split is not None else available:
        examples += _hf_examples(source.rows(part, limit), source_field, target_field)
    if not examples:
        raise PrefixTuneError(f"hf:{parsed.name}: no records")
    return group_references(examples)


def _hf_examples(rows: Iterable[tuple[str, dict[str, Any]]], source_field: str | None, target_field: str | None):
    examples: list[Example] = []
    plan: _FieldPlan | None = None
    for where, record in rows:
        plan = plan or _FieldPlan.choose(record, source_field, target_field, where)
        examples.append(plan.example(record, where, True, None))
    return examples


# ----- grouping and splitting ---------------------------------------------------------------------------------


def group_references(examples: Iterable[Example]) -> list[Example]:
    """Merge generation examples with the same source (and task) into one with all references; keep order.

    Classification examples (label set) and examples without a target stay as they are.
    """
    grouped: list[Example] = []
    by_key: dict[tuple[str, str | None], Example] = {}
    for example in examples:
        if example.label is not None or example.target is None:
            grouped.append(example)
            continue
        key = (example.source, example.task)
        if key in by_key:
            merged = by_key[key]
            merged.references.extend(r for r in example.references if r not in merged.references)
            continue
        copy = replace(example, references=list(example.references), label=None)
        by_key[key] = copy
        grouped.append(copy)
    return grouped


def split_examples(
    examples: Sequence[Example],
    split: str,
    *,
    fractions: tuple[float, float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    name: str = "data",
) -> list[Example]:
    """The `split` part of `examples`, by distinct source: no source is in two parts. See load_dataset."""
    distinct = list(dict.fromkeys(e.source for e in examples))
    ranked = sorted(distinct, key=lambda s: hashlib.sha256(f"{seed}\0{s}".encode()).hexdigest())
    n_validation, n_test = (int(f * len(ranked) + 0.5) for f in fractions)
    parts = {
        "test": set(ranked[:n_test]),
        "validation": set(ranked[n_test : n_test + n_validation]),
        "train": set(ranked[n_test + n_validation :]),
    }
    chosen = [e for e in examples if e.source in parts[split]]
    if not chosen:
        raise PrefixTuneError(
            f"the {split!r} split of {name} is empty ({len(distinct)} distinct inputs); add data or use the whole file"
        )
    return chosen


def training_pairs(examples: Iterable[Example]) -> list[Example]:
    """One example per (source, reference): training learns every reference; scoring uses them together."""
    pairs = []
    for example in examples:
        if example.label is not None:
            pairs.append(example)
            continue
        references = example.references or ([example.target] if example.target is not None else [])
        pairs += [replace(example, target=r, references=[r], label=None) for r in references]
    return pairs


def label_names(examples: Iterable[Example]) -> list[str]:
    """The distinct labels of classification examples, sorted."""
    return sorted({e.label for e in examples if e.label is not None})

