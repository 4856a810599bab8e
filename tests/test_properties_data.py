"""Property-based tests of the data readers: JSONL, CSV/TSV and JSON files, with and without field options.

Random bytes, random text (BOMs, CRLF, NUL, Unicode line separators), random JSON values as records, missing and
extra fields, empty files and long lines: `read_records` / `load_dataset` either give well-formed examples or
raise PrefixTuneError. Files that hold clean records must read back exactly (the oracle is the writer), and what
is read must tokenize (`encode`) or be refused with PrefixTuneError too.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from prefixtune import PrefixTuneError, data
from prefixtune.data import builtin
from property_support import Tally, any_of, fuzz, json_texts, json_values, report, texts
from tiny_tokenizer import make_tokenizer

SUFFIXES = (".jsonl", ".ndjson", ".csv", ".tsv", ".json", ".txt", "")
FIELD_NAMES = ("input", "target", "prompt", "completion", "label", "target_scores", "task", "text", "summary")
field_options = st.one_of(st.none(), st.none(), any_of(*FIELD_NAMES), texts)


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    yield from report(Tally(), "data readers", request)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data_properties")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return make_tokenizer()


def _write(directory: Path, suffix: str, content: bytes) -> Path:
    path = directory / f"records{suffix}"
    path.write_bytes(content)
    return path


def _check_examples(examples: list[data.Example]) -> None:
    """What a reader gives back is well-formed, whatever the file held."""
    assert examples, "a reader returns records or raises"
    for e in examples:
        assert isinstance(e.source, str)
        assert e.target is None or isinstance(e.target, str)
        assert all(isinstance(r, str) for r in e.references)
        assert e.target is None or e.target == e.references[0]
        assert e.label is None or isinstance(e.label, str)
        assert e.task is None or isinstance(e.task, str)


def _read(tally: Tally, name: str, path: Path, **options: Any) -> list[data.Example] | None:
    examples = tally.attempt(name, lambda: data.read_records(path, **options))
    if examples is not None:
        _check_examples(examples)
    return examples


def _encode(tally: Tally, tokenizer: Any, examples: list[data.Example]) -> None:
    """What was read goes on to tokenization, as in training (targets) and generation (prompts)."""
    with_target = [e for e in examples if e.target is not None]
    if with_target:
        encoded = tally.attempt("encode", lambda: data.encode(with_target, tokenizer, max_length=32)[0])
        if encoded is not None:
            assert len(encoded) == len(with_target)
            assert all(0 < len(e.input_ids) <= 32 and len(e.labels) == len(e.input_ids) for e in encoded)
    prompts = tally.attempt("encode", lambda: data.encode_prompts(examples, tokenizer, max_source_length=16)[0])
    if prompts is not None:
        assert len(prompts) == len(examples)


def _decorate(text: str, bom: bool, newline: str) -> bytes:
    # a lone surrogate cannot be UTF-8: written as its 3 bytes it makes the file invalid UTF-8 (to be refused)
    return (("\ufeff" if bom else "") + text.replace("\n", newline)).encode("utf-8", "surrogatepass")


# ----- anything at all ------------------------------------------------------------------------------------------


@fuzz(200)
@given(
    suffix=any_of(*SUFFIXES),
    content=st.one_of(
        st.binary(max_size=200),
        st.builds(_decorate, texts, st.booleans(), any_of("\n", "\r\n", "\r")),
        st.builds(lambda b, rest: b"\xef\xbb\xbf" * b + rest, st.integers(0, 2), st.binary(max_size=50)),
    ),
    source_field=field_options,
    target_field=field_options,
    require_target=st.booleans(),
)
@example(suffix=".jsonl", content=b"", source_field=None, target_field=None, require_target=True)
@example(suffix=".csv", content=b"\xef\xbb\xbf\r\n\r\n", source_field=None, target_field=None, require_target=True)
@example(suffix=".json", content=b"\xff\xfe{\x00}\x00", source_field=None, target_field=None, require_target=True)
def test_random_bytes_are_read_or_refused(
    tally: Tally,
    work: Path,
    tokenizer: Any,
    suffix: str,
    content: bytes,
    source_field: str | None,
    target_field: str | None,
    require_target: bool,
) -> None:
    path = _write(work, suffix, content)
    options = {"source_field": source_field, "target_field": target_field, "require_target": require_target}
    examples = _read(tally, "random bytes", path, **options)
    if examples is not None:
        _encode(tally, tokenizer, examples)


# ----- JSON records with random fields and values ---------------------------------------------------------------

# Records that are often nearly right: an input (usually text), and each other known field present or not,
# holding the right type or any JSON value; sometimes extra fields, sometimes no input at all.
OPTIONAL_FIELDS = {
    "prompt": st.one_of(json_texts, json_values),
    "target": st.one_of(json_texts, json_texts, st.lists(json_texts, max_size=3), json_values),
    "completion": st.one_of(json_texts, json_values),
    "label": json_values,
    "target_scores": st.dictionaries(texts, st.one_of(st.integers(0, 1), st.floats(), json_values), max_size=3),
    "task": st.one_of(json_texts, json_values),
}
record = st.builds(
    lambda known, extra: {**extra, **known},
    st.one_of(
        st.fixed_dictionaries({"input": st.one_of(json_texts, json_texts, json_values)}, optional=OPTIONAL_FIELDS),
        st.fixed_dictionaries({"input": json_texts, "target_scores": OPTIONAL_FIELDS["target_scores"]}),
        st.fixed_dictionaries({}, optional={"input": json_values, **OPTIONAL_FIELDS}),
    ),
    st.one_of(st.just({}), st.dictionaries(st.one_of(any_of(*FIELD_NAMES), texts), json_values, max_size=2)),
)
valid_record = st.builds(
    lambda source, target, extra: {**extra, "input": source, "target": target},
    json_texts,
    st.one_of(json_texts, st.lists(json_texts, min_size=1, max_size=3)),
    st.one_of(st.just({}), st.dictionaries(json_texts, json_values, max_size=2)),
)
records = st.one_of(
    st.lists(valid_record, min_size=1, max_size=4),
    st.lists(st.one_of(valid_record, record), min_size=1, max_size=4),
    st.lists(record, max_size=1),
)


def _jsonl(rows: list[Any], newline: str, bom: bool, blank_lines: bool, ascii_only: bool) -> bytes:
    lines = [json.dumps(r, ensure_ascii=ascii_only) for r in rows]
    if blank_lines:
        lines = [x for line in lines for x in (line, "  ")]
    return _decorate("\n".join(lines) + "\n", bom, newline)


@fuzz(200)
@given(
    rows=st.one_of(records, st.lists(json_values, max_size=4)),
    fmt=any_of("jsonl", "json-list", "json-examples", "json-any"),
    newline=any_of("\n", "\r\n"),
    bom=st.booleans(),
    blank_lines=st.booleans(),
    ascii_only=st.booleans(),
    source_field=field_options,
    target_field=field_options,
)
def test_random_json_records_are_read_or_refused(
    tally: Tally,
    work: Path,
    tokenizer: Any,
    rows: list[Any],
    fmt: str,
    newline: str,
    bom: bool,
    blank_lines: bool,
    ascii_only: bool,
    source_field: str | None,
    target_field: str | None,
) -> None:
    if fmt == "jsonl":
        path = _write(work, ".jsonl", _jsonl(rows, newline, bom, blank_lines, ascii_only))
    else:
        value: Any = {"examples": rows} if fmt == "json-examples" else rows if fmt == "json-list" else rows[:1]
        path = _write(work, ".json", _decorate(json.dumps(value, ensure_ascii=ascii_only, indent=1), bom, newline))
    examples = _read(tally, "random JSON records", path, source_field=source_field, target_field=target_field)
    if examples is not None:
        _encode(tally, tokenizer, examples)


# ----- clean records read back exactly --------------------------------------------------------------------------

clean = st.lists(st.tuples(texts, texts), min_size=1, max_size=6)
extra_fields = st.dictionaries(texts.filter(lambda k: k not in FIELD_NAMES), json_values, max_size=2)


def _csv(rows: list[tuple[str, str]], header: tuple[str, str], delimiter: str, newline: str, quote_all: bool) -> str:
    out = io.StringIO()
    writer = csv.writer(
        out, delimiter=delimiter, lineterminator=newline, quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL
    )
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


@fuzz(150)
@given(
    rows=clean,
    fmt=any_of("jsonl", "json", "csv", "tsv"),
    names=any_of(("input", "target"), ("prompt", "completion"), ("src", "tgt")),
    newline=any_of("\n", "\r\n", "\r"),
    bom=st.booleans(),
    extra=extra_fields,
)
@example(rows=[("a\nb", "c\r\nd")], fmt="csv", names=("input", "target"), newline="\r\n", bom=False, extra={})
@example(rows=[("a\u2028b", "c\x85d")], fmt="csv", names=("input", "target"), newline="\n", bom=True, extra={})
@example(rows=[("a\u2028b", "c\x85d")], fmt="jsonl", names=("input", "target"), newline="\n", bom=False, extra={})
def test_clean_records_read_back_exactly(
    tally: Tally,
    work: Path,
    rows: list[tuple[str, str]],
    fmt: str,
    names: tuple[str, str],
    newline: str,
    bom: bool,
    extra: dict[str, Any],
) -> None:
    if fmt in ("csv", "tsv"):
        # csv.writer quotes a cell holding CR or LF only if its line terminator has that character: quote all
        # cells unless the terminator is CRLF
        text = _csv(rows, names, "\t" if fmt == "tsv" else ",", newline, quote_all=newline != "\r\n")
        path = _write(work, f".{fmt}", ("\ufeff" if bom else "").encode() + text.encode())
    else:
        dicts = [{**extra, names[0]: s, names[1]: t} for s, t in rows]
        if fmt == "jsonl":  # ASCII: extra fields may hold lone surrogates, which only escaped JSON can carry
            path = _write(work, ".jsonl", _jsonl(dicts, newline, bom, False, ascii_only=True))
        else:
            path = _write(work, ".json", _decorate(json.dumps(dicts, ensure_ascii=True), bom, newline))
    named = names == ("src", "tgt")
    options = {"source_field": "src", "target_field": "tgt"} if named else {}
    examples = _read(tally, "clean records", path, **options)
    assert examples is not None, "well-formed records must be read"
    assert [(e.source, e.target, e.references) for e in examples] == [(s, t, [t]) for s, t in rows]


@fuzz(60)
@given(rows=clean, references=st.lists(st.lists(texts, min_size=1, max_size=3), min_size=1, max_size=6))
def test_target_lists_and_repeated_sources_are_references(
    tally: Tally, work: Path, rows: list[tuple[str, str]], references: list[list[str]]
) -> None:
    dicts = [{"input": s, "target": refs} for (s, _), refs in zip(rows, references)]
    path = _write(work, ".jsonl", _jsonl(dicts, "\n", False, False, ascii_only=True))
    examples = _read(tally, "reference lists", path)
    assert examples is not None
    grouped = data.group_references(examples)
    expected: dict[str, list[str]] = {}
    for d in dicts:
        expected.setdefault(d["input"], [])
        expected[d["input"]] += [r for r in d["target"] if r not in expected[d["input"]]]
    assert {e.source: e.references for e in grouped} == expected


# ----- load_dataset with any spec --------------------------------------------------------------------------------


@fuzz(100)
@given(
    spec=st.one_of(
        texts,
        st.builds(lambda a, b: a + b, any_of("~", "~nosuchuser", "./", "/", "..", "x="), texts),
        any_of("train.jsonl", "./train.jsonl", "../data_properties0/train.jsonl", "train.jsonl/", "TRAIN.JSONL"),
    ),
    split=st.one_of(st.none(), any_of(*data.SPLITS), texts),
)
@example(spec="~nosuchuser/data.jsonl", split=None)
@example(spec="~nosuchuser", split="train")
def test_load_dataset_with_any_spec(
    tally: Tally, work: Path, monkeypatch: pytest.MonkeyPatch, spec: str, split: str | None
) -> None:
    if spec.startswith("hf:") or spec.strip() in builtin.DATA_ALIASES:
        return  # built-in data sets and Hugging Face fetch files: not for a fuzzer
    monkeypatch.chdir(work)
    (work / "train.jsonl").write_text('{"input": "a", "target": "b"}\n' * 3)
    examples = tally.attempt("load_dataset spec", lambda: data.load_dataset(spec, split=split, data_dir=work))
    if examples is not None:
        _check_examples(examples)


# ----- the regressions hypothesis found, kept as plain tests -----------------------------------------------------


def _refused(path: Path, match: str, **options: Any) -> None:
    with pytest.raises(PrefixTuneError, match=match):
        data.read_records(path, **options)


def test_deeply_nested_json_is_refused(work: Path) -> None:
    _refused(_write(work, ".jsonl", b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"), "nested too deeply")
    _refused(_write(work, ".json", b"[" * 100_000 + b"]" * 100_000), "nested too deeply")


def test_number_too_long_for_python_is_refused(work: Path) -> None:
    line = b'{"input": "a", "target": "b", "id": ' + b"7" * 5000 + b"}\n"
    _refused(_write(work, ".jsonl", line), "not valid JSON")


def test_unicode_line_separators_inside_jsonl_strings(work: Path) -> None:
    text = json.dumps({"input": "a\u2028b\x85c\x0cd", "target": "e\u2029f"}, ensure_ascii=False) + "\r\n"
    (example_,) = data.read_records(_write(work, ".jsonl", text.encode()))
    assert (example_.source, example_.target) == ("a\u2028b\x85c\x0cd", "e\u2029f")


def test_csv_cells_keep_their_newlines(work: Path) -> None:
    path = _write(work, ".csv", b'input,target\r\n"line 1\r\nline 2","a\nb"\r\n"x\xc2\x85y\xe2\x80\xa8z",c\r\n')
    assert [(e.source, e.target) for e in data.read_records(path)] == [
        ("line 1\r\nline 2", "a\nb"),
        ("x\x85y\u2028z", "c"),
    ]


def test_long_lines_are_read(work: Path) -> None:
    long = "word " * 200_000  # 1 MB in one cell or one JSON string
    path = _write(work, ".csv", f'input,target\n"{long}",short\n'.encode())
    assert data.read_records(path)[0].source == long
    path = _write(work, ".jsonl", (json.dumps({"input": "short", "target": long}) + "\n").encode())
    assert data.read_records(path)[0].target == long
    header = _write(work, ".csv", f"{'h' * 200_000},input,target\n1,a,b\n".encode())
    assert data.read_records(header)[0].target == "b"


def test_target_scores_must_be_numbers(work: Path) -> None:
    path = _write(work, ".jsonl", b'{"input": "a", "target_scores": {"yes": 1, "no": "0"}}\n')
    _refused(path, "target_scores")
    path = _write(work, ".jsonl", b'{"input": "a", "target_scores": {"yes": 1, "no": 0}}\n')
    assert data.read_records(path)[0].label == "yes"


def test_lone_surrogate_escapes_are_refused(work: Path) -> None:
    _refused(_write(work, ".jsonl", b'{"input": "a\\ud800", "target": "b"}\n'), "surrogate")
    _refused(_write(work, ".json", b'[{"input": "a", "target": ["b", "\\udfff"]}]'), "surrogate")
    pair = data.read_records(_write(work, ".jsonl", b'{"input": "\\ud83d\\ude00", "target": "b"}\n'))
    assert pair[0].source == "\U0001f600"  # an escaped surrogate pair is one character


def test_unknown_home_directory_is_our_error(work: Path) -> None:
    with pytest.raises(PrefixTuneError, match="nosuchuser"):
        data.read_records("~nosuchuser/x.jsonl")
    with pytest.raises(PrefixTuneError, match="nosuchuser"):
        data.load_dataset("~nosuchuser/x.jsonl", split="train")
