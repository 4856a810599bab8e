"""init="data": a real-word initialization from a description of the training data, when no init_text is given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import prefixtune
from prefixtune import cli
from prefixtune.data import Example, describe_task, fill_init_text
from prefixtune.errors import PrefixTuneError
from prefixtune.methods.registry import build_method
from tiny import tiny
from tiny_tokenizer import make_tokenizer

E2E_LIKE = [
    Example("name: Blue Spice, eatType: coffee shop, area: city centre", "A coffee shop called Blue Spice."),
    Example("name: Cat Park, eatType: pub, food: Indian, area: riverside", "Cat Park is an Indian pub."),
    Example("name: Dog, food: French, area: riverside, near: Cafe Rouge", "Dog serves French food."),
]


def test_structured_inputs_are_described_by_their_field_names_in_order() -> None:
    assert describe_task(E2E_LIKE) == "name eatType area food near"
    brackets = [Example("name[Blue Spice], customer rating[high]", "x"), Example("name[Dog], area[riverside]", "y")]
    assert describe_task(brackets) == "name customer rating area"


def test_free_text_by_the_words_most_inputs_share_then_label_words() -> None:
    labels = [Example(f"review {i} says it was {w}", w) for i, w in enumerate(["good", "bad", "good", "meh"])]
    assert describe_task(labels) == "review says it was good bad meh"  # few short repeated targets: the label words
    unrelated = [Example("alpha beta", "x1"), Example("gamma delta", "y2"), Example("epsilon", "z3")]
    assert describe_task(unrelated) == "alpha beta"  # nothing shared; targets that never repeat are not labels
    labels_once = [Example(f"w{i} v{i}", f"t{i}") for i in range(12) for _ in range(2)]  # 12 distinct: not labels
    assert describe_task(labels_once) == "w0 v0"
    chat = [
        Example(
            json.dumps([{"role": "user", "content": f"translate {w}"}]),
            w.upper(),
            messages=[{"role": "user", "content": f"translate {w}"}],
        )
        for w in ("cat", "dog", "sun", "sky", "mat", "park", "tree", "road", "car", "bus", "man")
    ]
    assert describe_task(chat) == "translate"  # the contents, not the JSON keys "role"/"content"
    assert describe_task([]) == ""


def test_fill_init_text_only_where_init_is_data_and_no_text_was_given() -> None:
    assert fill_init_text({"init": "data"}, E2E_LIKE)["init_text"] == describe_task(E2E_LIKE)
    assert fill_init_text({"init": "data", "init_text": "mine"}, E2E_LIKE)["init_text"] == "mine"
    assert "init_text" not in fill_init_text({"init": "vocab"}, E2E_LIKE)
    assert fill_init_text({"prefix.init": "data"}, E2E_LIKE)["prefix.init_text"] == describe_task(E2E_LIKE)
    assert "init_text" not in fill_init_text({"init": "data"}, [])  # nothing to describe: the config refuses


def test_data_init_without_text_outside_training_is_refused_when_built() -> None:
    tok = make_tokenizer()
    model = tiny("llama-gqa")
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    config = prefixtune.PrefixConfig(init="data")  # a valid spec: training fills the text
    with pytest.raises(PrefixTuneError, match="init='data'"):
        prefixtune.attach(model, config, tokenizer=tok)
    with pytest.raises(PrefixTuneError, match="init='data'"):
        build_method("prompt", model, {"init": "data"}, tok)


def test_data_init_starts_from_the_activations_of_the_description() -> None:
    tok, text = make_tokenizer(), describe_task(E2E_LIKE)
    made = {}
    for init, init_text in (("data", text), ("text", text), ("other", "a different text")):
        torch.manual_seed(0)
        kind = "text" if init == "other" else init
        config = prefixtune.PrefixConfig(num_virtual_tokens=6, reparameterize=False, init=kind, init_text=init_text)
        model = tiny("llama-gqa")
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        pm = prefixtune.attach(model, config, tokenizer=tok)
        made[init] = [p.detach().clone() for p in pm.trainable_parameters()]
    assert len(made["data"]) == len(made["text"]) > 0
    for ours, text in zip(made["data"], made["text"], strict=True):
        torch.testing.assert_close(ours, text, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(made["data"], made["other"]))  # the text is what counts


def test_train_cli_derives_and_records_the_text(model_dir: Path, tmp_path: Path, capsys) -> None:
    rows = [{"input": e.source, "target": e.target} for e in E2E_LIKE] * 2
    data_file = tmp_path / "d.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = ["train", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), "--quiet"]
    args += ["--max-steps", "1", "--batch-size", "2", "init=data", "num_virtual_tokens=4", "projection_dim=8"]
    args += ["train_split=all"]
    assert cli.main(args) == 0
    saved = json.loads((out / "adapter_config.json").read_text())["prefixtune"]["prefix"]
    assert (saved["init"], saved["init_text"]) == ("data", describe_task(E2E_LIKE))
