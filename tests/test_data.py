"""Records -> examples -> token ids -> batches, on tiny files written in tmp_path (no downloads)."""

import json
import logging
import random
import sys
import types

import pytest
import torch

from prefixtune import data
from prefixtune.data import Example, builtin
from prefixtune.errors import PrefixTuneError
from tiny_tokenizer import make_tokenizer


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PREFIXTUNE_DATA_DIR", raising=False)

    def no_network():
        raise AssertionError("a test tried to download the built-in data")

    monkeypatch.setattr(builtin, "_fetch_bigbench", no_network)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def e2e_like(n_inputs=213, refs=3):
    return {
        "canary": "kept as it is",
        "examples": [
            {"input": f"name: Place {i}, area: riverside", "target": f"Place {i} is by the river, version {j}."}
            for i in range(n_inputs)
            for j in range(refs)
        ],
    }


# ----- reading ------------------------------------------------------------------------------------------------


def test_jsonl_input_target_with_list_targets_and_grouping(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"input": "a", "target": "x"},
            {"input": "b", "target": ["y1", "y2"]},
            {"input": "a", "target": "x2"},
        ],
    )
    path.write_text(path.read_text() + "\n   \n")  # blank lines are skipped
    examples = data.load_dataset(str(path), split=None)
    assert [(e.source, e.target, e.references) for e in examples] == [
        ("a", "x", ["x", "x2"]),
        ("b", "y1", ["y1", "y2"]),
    ]
    pairs = data.training_pairs(examples)
    assert [(p.source, p.target) for p in pairs] == [("a", "x"), ("a", "x2"), ("b", "y1"), ("b", "y2")]


def test_prompt_completion_and_named_fields(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c"}])
    assert data.load_dataset(str(path), split=None)[0].target == "c"
    path = write_jsonl(tmp_path / "named.jsonl", [{"question": "q", "answer": "ans", "task": "qa"}])
    [example] = data.load_dataset(str(path), split=None, source_field="question", target_field="answer")
    assert (example.source, example.target, example.task) == ("q", "ans", "qa")


def test_csv_and_tsv(tmp_path):
    (tmp_path / "d.csv").write_text('input,target\n"a, with comma",x\nb,y\n')
    examples = data.load_dataset(str(tmp_path / "d.csv"), split=None)
    assert [(e.source, e.target) for e in examples] == [("a, with comma", "x"), ("b", "y")]
    (tmp_path / "d.tsv").write_text("text\tsummary\nlong text\tshort\n")
    [example] = data.load_dataset(str(tmp_path / "d.tsv"), split=None, source_field="text", target_field="summary")
    assert (example.source, example.target) == ("long text", "short")


def test_bigbench_json_with_target_scores_is_classification(tmp_path):
    records = [
        {"input": "great", "target_scores": {"negative": 0, "positive": 1}},
        {"input": "great", "target_scores": {"negative": 0, "positive": 1}},
        {"input": "awful", "target_scores": {"negative": 1, "positive": 0}},
    ]
    (tmp_path / "t.json").write_text(json.dumps({"examples": records}))
    examples = data.load_dataset(str(tmp_path / "t.json"), split=None)
    assert len(examples) == 3  # classification records are never merged
    assert [(e.label, e.target, e.references) for e in examples][2] == ("negative", "negative", ["negative"])
    assert data.label_names(examples) == ["negative", "positive"]
    assert data.training_pairs(examples) == examples


def test_builtin_found_in_data_dir_env_and_cache(tmp_path, monkeypatch):
    folder = tmp_path / "given"
    folder.mkdir()
    (folder / "e2e_nlg.json").write_text(json.dumps(e2e_like()))
    whole = data.load_dataset("e2e", split=None, data_dir=folder)
    assert len(whole) == 213 and all(len(e.references) == 3 and e.task == "e2e" for e in whole)
    monkeypatch.setenv("PREFIXTUNE_DATA_DIR", str(folder))
    assert len(data.load_dataset("e2e", split="test")) == 43
    monkeypatch.delenv("PREFIXTUNE_DATA_DIR")
    cached = builtin.data_cache_dir()
    cached.mkdir(parents=True)
    (cached / "multiemo_all_text_en.json").write_text(
        json.dumps(
            {
                "examples": [
                    {"input": f"review {i}", "target_scores": {"good": i % 2, "bad": 1 - i % 2}} for i in range(20)
                ]
            }
        )
    )
    examples = data.load_dataset("multiemo", split=None)
    assert examples[0].label == "bad" and examples[1].target == "good"
    assert [row["cached"] for row in builtin.list_datasets()] == [False, False, True]


def test_e2e_split_by_distinct_input_is_disjoint_deterministic_and_order_free(tmp_path):
    raw = e2e_like()
    (tmp_path / "e2e_nlg.json").write_text(json.dumps(raw))
    parts = {s: data.load_dataset("e2e", split=s, data_dir=tmp_path) for s in data.SPLITS}
    assert {s: len(v) for s, v in parts.items()} == {"train": 149, "validation": 21, "test": 43}
    sources_of = {s: {e.source for e in v} for s, v in parts.items()}
    assert not sources_of["train"] & sources_of["test"]
    assert not sources_of["train"] & sources_of["validation"]
    assert not sources_of["validation"] & sources_of["test"]
    assert all(len(e.references) == 3 for e in parts["test"])  # all references of a held-out input
    random.Random(3).shuffle(raw["examples"])
    (tmp_path / "e2e_nlg.json").write_text(json.dumps(raw))
    assert {e.source for e in data.load_dataset("e2e", split="test", data_dir=tmp_path)} == sources_of["test"]
    other_seed = {e.source for e in data.load_dataset("e2e", split="test", data_dir=tmp_path, seed=1)}
    assert other_seed != sources_of["test"]


def test_user_file_splits(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": f"s{i}", "target": "t"} for i in range(30)])
    sizes = [len(data.load_dataset(str(path), split=s)) for s in data.SPLITS]
    assert sizes == [24, 3, 3]
    assert len(data.load_dataset(str(path), split=None)) == 30


# ----- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, kwargs, message",
    [
        ("empty.jsonl", "", {}, r"empty\.jsonl: the file is empty"),
        ("blank.csv", "\n  \n", {}, "the file is empty"),
        ("bad.jsonl", '{"input": "a", "target": "b"}\n{"input": "a" "target"}\n', {}, r"bad\.jsonl:2: not valid JSON"),
        ("list.jsonl", '{"input": "a", "target": "b"}\n[1, 2]\n', {}, r"list\.jsonl:2: expected a JSON object"),
        ("nosrc.jsonl", '{"text": "a", "target": "b"}\n', {}, r"nosrc\.jsonl:1: no 'input' or 'prompt' field"),
        ("notgt.jsonl", '{"input": "a", "target": "b"}\n{"input": "c"}\n', {}, r"notgt\.jsonl:2: no 'target' field"),
        ("nosrc2.jsonl", '{"input": "a", "target": "b"}\n{"target": "c"}\n', {}, r":2: no 'input' field"),
        ("named.jsonl", '{"q": "a", "target": "b"}\n', {"source_field": "question"}, r":1: no 'question' field"),
        ("type.jsonl", '{"input": 3, "target": "b"}\n', {}, r":1: 'input' must be a string"),
        ("tgt.jsonl", '{"input": "a", "target": []}\n', {}, r":1: 'target' must be a string or a non-empty list"),
        ("col.csv", "input,target\na,b\n", {"target_field": "summary"}, r"col\.csv:1: no column 'summary' \(columns"),
        ("ragged.csv", "input,target\na,b,c\n", {}, r"ragged\.csv:2: more cells"),
        ("cells.csv", "input,target\na\n", {}, r"cells\.csv:2: no 'target' field"),
        ("header.csv", "input,target\n", {}, r"header\.csv: no records"),
        ("tie.json", '[{"input": "a", "target_scores": {"x": 1, "y": 1}}]', {}, "no single best label"),
        ("broken.json", '{"examples": [', {}, r"broken\.json:1: not valid JSON"),
        ("shape.json", '{"rows": []}', {}, "an object with an 'examples' list"),
        ("data.txt", "just text", {}, "unknown data format"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path, name, content, kwargs, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(PrefixTuneError, match=message):
        data.load_dataset(str(tmp_path / name), split=None, **kwargs)


def test_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(PrefixTuneError, match=r"missing\.jsonl: no such data file"):
        data.load_dataset(str(tmp_path / "missing.jsonl"), split=None)
    with pytest.raises(PrefixTuneError, match=r"unknown built-in data set 'e2ee'\. Did you mean 'e2e'\?.*xsum"):
        data.load_dataset("e2ee", split="train")
    with pytest.raises(PrefixTuneError, match="is a directory; give a .jsonl"):
        data.load_dataset(str(tmp_path), split=None)
    with pytest.raises(PrefixTuneError, match="unknown split 'dev'"):
        data.load_dataset("e2e", split="dev")
    with pytest.raises(PrefixTuneError, match="data directory .* does not exist"):
        data.load_dataset("e2e", split="test", data_dir=tmp_path / "nope")


def test_empty_split_of_a_tiny_file(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"input": "a", "target": "b"}])
    with pytest.raises(PrefixTuneError, match="the 'test' split of .* is empty"):
        data.load_dataset(str(path), split="test")


def test_hf_without_datasets_or_network(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(PrefixTuneError, match=r"pip install 'prefixtune\[hf\]'"):
        data.load_dataset("hf:some/set", split="train")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'some/set' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(PrefixTuneError, match="cannot load Hugging Face data set 'some/set': Couldn't reach"):
        data.load_dataset("hf:some/set:cfg", split="train")


def test_hf_rows_use_the_same_field_rules(monkeypatch):
    calls = []

    def fake_load(name, config):
        calls.append((name, config))
        return {"train": [{"prompt": "p1", "completion": "c1"}], "test": [{"prompt": "p2", "completion": "c2"}]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    assert [e.source for e in data.load_dataset("hf:org/set:en", split="test")] == ["p2"]
    assert calls[-1] == ("org/set", "en")
    assert len(data.load_dataset("hf:org/set", split=None)) == 2
    with pytest.raises(PrefixTuneError, match=r"has no split 'validation' \(splits: train, test\)"):
        data.load_dataset("hf:org/set", split="validation")


# ----- tokenization -------------------------------------------------------------------------------------------


def test_encode_masks_the_prompt_and_appends_eos(tokenizer):
    example = Example("name: Blue Spice", "A coffee shop.")
    [enc], stats = data.encode([example], tokenizer, max_length=64)
    prompt = enc.input_ids[: enc.prompt_length]
    assert tokenizer.decode(prompt) == "name: Blue Spice\nOutput:"
    assert enc.labels[: enc.prompt_length] == [-100] * enc.prompt_length
    assert enc.labels[enc.prompt_length :] == enc.input_ids[enc.prompt_length :]
    assert enc.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(enc.input_ids[enc.prompt_length : -1]) == " A coffee shop."
    # the pieces tokenize as the joined text does, so training sees natural token boundaries
    assert enc.input_ids[:-1] == tokenizer("name: Blue Spice\nOutput: A coffee shop.")["input_ids"]
    assert stats.truncated == 0 and stats.examples == 1
    prompts, _ = data.encode_prompts(["name: Blue Spice"], tokenizer)
    assert prompts == [prompt]


def test_encode_adds_bos_when_the_tokenizer_does(tokenizer):
    from tokenizers import processors

    with_bos = make_tokenizer()
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", with_bos.bos_token_id)]
    )
    [enc], _ = data.encode([Example("the cat", "sat")], with_bos, max_length=32)
    assert enc.input_ids[0] == with_bos.bos_token_id
    assert enc.input_ids.count(with_bos.bos_token_id) == 1


def test_chat_template(tokenizer):
    chat = make_tokenizer(chat=True)
    [enc], _ = data.encode([Example("the cat", "sat")], chat, max_length=64, chat_template=True)
    expected_prompt = chat.apply_chat_template([{"role": "user", "content": "the cat"}], add_generation_prompt=True)
    if isinstance(expected_prompt, dict) or hasattr(expected_prompt, "keys"):
        expected_prompt = expected_prompt["input_ids"]
    assert enc.input_ids[: enc.prompt_length] == list(expected_prompt)
    assert chat.decode(enc.input_ids[enc.prompt_length :]) == "sat<eos>"
    with pytest.raises(PrefixTuneError, match="no chat template"):
        data.encode([Example("a", "b")], tokenizer, max_length=64, chat_template=True)


def test_truncation_is_counted_and_reported(tokenizer, caplog):
    long_source = " ".join(["the cat sat on the mat"] * 20)
    examples = [Example(long_source, "the dog ran"), Example("the cat", "sat"), Example("a", " ".join(["dog"] * 80))]
    with caplog.at_level(logging.WARNING, logger="prefixtune"):
        encoded, stats = data.encode(examples, tokenizer, max_length=40)
    assert all(len(e.input_ids) <= 40 for e in encoded)
    assert (stats.truncated, stats.source_truncated, stats.target_truncated) == (2, 1, 1)
    assert stats.longest > 40
    # the long source keeps its whole target (and EOS); the long target keeps at least half of max_length
    assert encoded[0].input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(encoded[0].input_ids[encoded[0].prompt_length : -1]) == " the dog ran"
    assert tokenizer.decode(encoded[0].input_ids[: encoded[0].prompt_length]).endswith("\nOutput:")
    assert sum(label != -100 for label in encoded[2].labels) >= 20
    assert encoded[2].input_ids[-1] != tokenizer.eos_token_id
    assert "2 of 3 examples truncated to max_length=40" in stats.describe()
    assert "2 of 3 examples truncated" in caplog.text

    _, stats = data.encode(examples[:1], tokenizer, max_length=512, max_source_length=5)
    assert stats.source_truncated == 1
    prompts, stats = data.encode_prompts(examples[:2], tokenizer, max_source_length=5)
    assert len(prompts[0]) == 5 + len(tokenizer("\nOutput:")["input_ids"]) and stats.truncated == 1


def test_encode_bad_input(tokenizer):
    with pytest.raises(PrefixTuneError, match="example 1 has no target"):
        data.encode([Example("a", "b"), Example("c", None)], tokenizer, max_length=32)
    with pytest.raises(PrefixTuneError, match="max_length=3 is too small"):
        data.encode([Example("a", "b")], tokenizer, max_length=3)
    labelled = [Example("great", "positive", ["positive"], label="positive")]
    [enc], _ = data.encode(labelled, tokenizer, max_length=32, label_words={"positive": "good"})
    assert tokenizer.decode(enc.input_ids[enc.prompt_length : -1]) == " good"
    with pytest.raises(PrefixTuneError, match="label 'positive' has no entry in label_words"):
        data.encode(labelled, tokenizer, max_length=32, label_words={"negative": "bad"})


# ----- batching -----------------------------------------------------------------------------------------------


def encoded_set(tokenizer, n=40):
    rng = random.Random(0)
    examples = [Example(" ".join(["cat"] * rng.randint(1, 30)), "the dog") for _ in range(n)]
    return data.encode(examples, tokenizer, max_length=128)[0]


def test_batches_are_right_padded_complete_and_deterministic(tokenizer):
    encoded = encoded_set(tokenizer)
    out = data.batches(encoded, 8, shuffle=True, seed=5, pad_id=tokenizer.pad_token_id)
    assert len(out) == 5
    seen = []
    for batch in out:
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        lengths = batch["attention_mask"].sum(1)
        for row, n in enumerate(lengths.tolist()):
            assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
            assert (batch["labels"][row, n:] == -100).all()
            assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
            seen.append(tuple(batch["input_ids"][row, :n].tolist()))
    assert sorted(seen) == sorted(tuple(e.input_ids) for e in encoded)
    again = data.batches(encoded, 8, shuffle=True, seed=5, pad_id=tokenizer.pad_token_id)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(out, again))
    other = data.batches(encoded, 8, shuffle=True, seed=6, pad_id=tokenizer.pad_token_id)
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(out, other))


def test_length_bucketing_cuts_padding(tokenizer):
    encoded = encoded_set(tokenizer, n=200)

    def padding(**kwargs):
        out = data.batches(encoded, 8, pad_id=tokenizer.pad_token_id, **kwargs)
        return sum((b["attention_mask"] == 0).sum().item() for b in out)

    assert padding(shuffle=True, seed=0) < padding(shuffle=True, seed=0, bucket_by_length=False) / 3
    assert padding(shuffle=False) <= padding(shuffle=True, seed=0)
    with pytest.raises(PrefixTuneError, match="batch_size must be at least 1"):
        data.batches(encoded, 0, shuffle=False, pad_id=0)


def test_prompt_batches_are_left_padded(tokenizer):
    prompts, _ = data.encode_prompts(["a", "the cat sat on the mat", "the dog"], tokenizer)
    out = data.prompt_batches(prompts, 2, pad_id=tokenizer.pad_token_id)
    assert sorted(i for indices, _ in out for i in indices) == [0, 1, 2]
    for indices, batch in out:
        assert batch["attention_mask"][:, -1].all()  # the last column is every row's last prompt token
        for row, i in enumerate(indices):
            n = len(prompts[i])
            assert batch["input_ids"][row, -n:].tolist() == prompts[i]
            assert not batch["attention_mask"][row, :-n].any()
    with pytest.raises(PrefixTuneError, match="empty prompt"):
        data.prompt_batches([[]], 1, pad_id=0)
