"""`hf:` data sets on local files only (no downloads): save_to_disk directories, the json builder with data_files,
split slices, streaming that reads only what is taken, and every bad option."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from prefixtune import cli, data
from prefixtune.config import parse_data
from prefixtune.errors import PrefixTuneError


@pytest.fixture(autouse=True)
def local_cache(tmp_path, monkeypatch):
    """Builder caches go under tmp_path, never the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def rows(n: int, start: int = 0) -> dict[str, list[str]]:
    return {
        "input": [f"name: N{i}" for i in range(start, start + n)],
        "target": [f"N{i} is a shop." for i in range(start, start + n)],
    }


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows(20)), "test": datasets.Dataset.from_dict(rows(4, 100))}
    ).save_to_disk(str(path))
    return path


def sources(examples: list[data.Example]) -> list[str]:
    return [e.source for e in examples]


def test_a_saved_dataset_dict_keeps_its_own_splits(saved):
    assert sources(data.load_dataset(f"hf:{saved}", split="test")) == [f"name: N{i}" for i in range(100, 104)]
    assert len(data.load_dataset(f"hf:{saved}", split=None)) == 24
    with pytest.raises(PrefixTuneError, match=r"has no split 'validation' \(splits: train, test\)"):
        data.load_dataset(f"hf:{saved}", split="validation")


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("train[:10%]", range(0, 2)),
        ("train[10:20]", range(10, 20)),
        ("train[2:5]", range(2, 5)),
        ("train[-3:]", range(17, 20)),
        ("train[50%:]", range(10, 20)),
        ("test", range(100, 104)),
    ],
)
def test_split_slices_read_exactly_those_rows(saved, expression, expected):
    examples = data.load_dataset(f"hf:{saved}?split={expression}", split=None)
    assert sources(examples) == [f"name: N{i}" for i in expected]


def test_a_slice_is_divided_into_train_validation_test_as_a_file_is(saved):
    spec = f"hf:{saved}?split=train"
    parts = {s: set(sources(data.load_dataset(spec, split=s))) for s in data.SPLITS}
    assert sum(len(p) for p in parts.values()) == 20 and len(parts["test"]) == 2 and len(parts["validation"]) == 2
    assert not (parts["train"] & parts["test"]) and not (parts["train"] & parts["validation"])
    expected = data.split_examples(data.load_dataset(spec, split=None), "test", name=spec)
    assert parts["test"] == set(sources(expected))


def test_the_json_builder_reads_local_data_files(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path, start in ((a, 0), (b, 50)):
        r = rows(3, start)
        path.write_text("".join(json.dumps({"input": i, "target": t}) + "\n" for i, t in zip(r["input"], r["target"])))
    examples = data.load_dataset(f"hf:json?data_files={a},{b}", split="train")
    assert sources(examples) == [f"name: N{i}" for i in (0, 1, 2, 50, 51, 52)]
    assert examples[0].references == ["N0 is a shop."]


def write_with_bad_tail(path: Path, good: int, bad: int) -> Path:
    """`good` valid records, then `bad` records whose target is null (our error once read)."""
    lines = [json.dumps({"input": f"name: N{i}", "target": f"N{i} is a shop."}) for i in range(good)]
    lines += [json.dumps({"input": f"late {i}", "target": None}) for i in range(bad)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_streaming_reads_only_what_is_taken(tmp_path):
    path = write_with_bad_tail(tmp_path / "big.jsonl", good=30, bad=5000)
    spec = f"hf:json?data_files={path}&streaming=1"
    assert sources(data.load_dataset(spec + "&take=5", split="train")) == [f"name: N{i}" for i in range(5)]
    assert len(data.load_dataset(spec, split="train", limit=7)) == 7  # the caller's limit (train_size, --limit)
    assert sources(data.load_dataset(spec + "&split=train[10:13]", split=None)) == [
        "name: N10",
        "name: N11",
        "name: N12",
    ]
    with pytest.raises(PrefixTuneError, match=r"row 30: no 'target' field"):  # read whole, the bad tail is met
        data.load_dataset(f"hf:json?data_files={path}", split="train")


def test_training_streams_only_train_size_records(tmp_path, model_dir):
    path = write_with_bad_tail(tmp_path / "big.jsonl", good=12, bad=3000)
    out = tmp_path / "run"
    spec = f"hf:json?data_files={path}&streaming=1"
    args = ["train", "--model", str(model_dir), "--data", spec, "--out", str(out), "--quiet", "--batch-size", "4"]
    assert cli.main([*args, "train_size=8", "max_steps=2", "warmup_steps=1", "num_virtual_tokens=2"]) == 0
    assert (out / "adapter_config.json").is_file()
    assert cli.main([*args[:-2], "--out", str(tmp_path / "run2"), "max_steps=1"]) == 2  # no limit: refused


@pytest.mark.parametrize(
    "spec, message",
    [
        ("hf:", "needs a data set name"),
        ("hf:json?data_files=x.jsonl&colour=red", r"unknown hf: option 'colour'"),
        ("hf:json?split=train[1:2:3]", "is not a split expression"),
        ("hf:json?streaming=maybe", "streaming=1 or streaming=0"),
        ("hf:json?take=0", "positive number"),
        ("hf:json?take=ten", "positive number"),
    ],
)
def test_bad_hf_specs(spec, message):
    with pytest.raises(PrefixTuneError, match=message):
        data.load_dataset(spec, split=None)


def test_streaming_needs_a_limit_and_absolute_rows(tmp_path):
    path = write_with_bad_tail(tmp_path / "d.jsonl", good=5, bad=0)
    with pytest.raises(PrefixTuneError, match="streaming .* needs to know how many: add take=N"):
        data.load_dataset(f"hf:json?data_files={path}&streaming=1", split="train")
    with pytest.raises(PrefixTuneError, match="percentage slice needs the split's size"):
        data.load_dataset(f"hf:json?data_files={path}&streaming=1&take=3&split=train[:50%]", split=None)
    with pytest.raises(PrefixTuneError, match="cannot load Hugging Face data set"):
        data.load_dataset(f"hf:json?data_files={tmp_path / 'missing.jsonl'}", split=None)


def test_chat_records_come_through_hf(tmp_path):
    talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": talk}) + "\n")
    [example] = data.load_dataset(f"hf:json?data_files={path}", split="train")
    assert example.messages == talk[:1] and example.target == "hello"
    assert example.where == "hf:json[train] row 0"


def test_an_hf_spec_is_one_data_set_whatever_its_options_hold():
    spec = "hf:json?data_files=a.jsonl&split=train[:10%]"
    assert parse_data(spec) == spec and parse_data([spec]) == spec
    assert parse_data([f"chat={spec}", "other=b.jsonl"]) == {"chat": spec, "other": "b.jsonl"}
