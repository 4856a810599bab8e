"""`prefixtune train / eval / generate` end to end on a tiny model saved to disk, and every user error."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import NAMES

from prefixtune import cli, train
from prefixtune.config import TrainConfig, build_config
from prefixtune.errors import PrefixTuneError
from prefixtune.methods.registry import option_names
from tiny import tiny
from tiny_tokenizer import make_tokenizer


def _train_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--quiet",
        "train_split=all",
        "warmup_steps=2",
        "log_every=2",
        "projection_dim=16",
        "num_virtual_tokens=4",
        *extra,
    ]


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_train_writes_a_complete_run(model_dir: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code = cli.main(
        _train_args(
            model_dir,
            data_file,
            out,
            "--max-steps",
            "12",
            "--lr",
            "1e-2",
            "--eval-every",
            "6",
            "eval_split=all",
            "--save-every",
            "6",
        )
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 12 and 0 < summary["trainable_params"] < summary["total_params"]
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "config.yaml",
        "loss.png",
        "checkpoint/trainable.safetensors",
        "checkpoint/state.pt",
    ):
        assert (out / name).is_file(), name
    records = train.read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_after_interrupt_equals_uninterrupted_run(
    model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = tmp_path / "straight"
    assert cli.main(_train_args(model_dir, data_file, straight, "--max-steps", "8", "--lr", "1e-2")) == 0
    cut = tmp_path / "cut"
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def interrupting_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # Ctrl-C in the middle of step 5: the run stops after it, with a checkpoint
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupting_step)
    assert cli.main(_train_args(model_dir, data_file, cut, "--max-steps", "8", "--lr", "1e-2")) == 130
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert not (cut / "adapter_model.safetensors").exists() and (cut / "checkpoint").is_dir()
    assert cli.main(_train_args(model_dir, data_file, cut, "--max-steps", "8", "--lr", "1e-2", "--resume")) == 0
    assert (cut / "adapter_model.safetensors").read_bytes() == (straight / "adapter_model.safetensors").read_bytes()


def test_resume_with_another_config_is_refused(model_dir: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert cli.main(_train_args(model_dir, data_file, out, "--max-steps", "2")) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert cli.main(_train_args(model_dir, data_file, out, "--max-steps", "4", "--lr", "0.5", "--resume")) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefixtune: error: --resume") and "lr" in err and len(err.strip().splitlines()) == 1
    assert cli.main(_train_args(model_dir, data_file, out, "--max-steps", "2")) == 2  # no --resume: refused too
    assert "already holds a run" in capsys.readouterr().err
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    "make_data, extra, message",
    [
        (lambda p: p / "missing.jsonl", [], "missing.jsonl"),
        (lambda p: _write(p / "bad.jsonl", '{"input": "a", "target": "b"}\n{oops\n'), [], "bad.jsonl:2"),
        (lambda p: _write(p / "empty.jsonl", ""), [], "empty"),
        (lambda p: _write(p / "nofield.jsonl", '{"text": "a"}\n'), [], "nofield.jsonl:1"),
        (lambda p: _write(p / "t.csv", "text,label\na,b\n"), ["--source-field", "review"], "review"),
        (None, ["bogus_key=3"], "unknown config keys"),
        (None, ["batch_size=zero"], "batch_size"),
        (None, ["--method", "sgd"], "unknown method"),
        (None, ["r=8"], "r"),  # a LoRA option given to the prefix method
    ],
)
def test_bad_input_is_one_line_exit_2(model_dir, data_file, tmp_path, capsys, make_data, extra, message) -> None:
    data = make_data(tmp_path) if make_data else data_file
    out = tmp_path / "run"
    code = cli.main(_train_args(model_dir, data, out, "--max-steps", "2", *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("prefixtune: error:") and message in err and len(err.splitlines()) == 1, err
    assert not (out / "adapter_model.safetensors").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_unknown_model_and_unwritable_out(data_file: Path, tmp_path: Path, capsys) -> None:
    assert (
        cli.main(
            [
                "train",
                "--model",
                "no-such-model-alias",
                "--data",
                str(data_file),
                "--out",
                str(tmp_path / "r"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "no-such-model-alias" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions; a file in the way is refused for everyone
            locked = tmp_path / "a-file"
            locked.write_text("x")
        assert (
            cli.main(["train", "--model", "x", "--data", str(data_file), "--out", str(locked / "run"), "--quiet"]) == 2
        )
        assert "cannot write to output directory" in capsys.readouterr().err
    finally:
        os.chmod(tmp_path / "locked", 0o700)


def test_argparse_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--max-steps", "many"])
    assert info.value.code == 2


def test_eval_and_generate(model_dir: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert cli.main(_train_args(model_dir, data_file, out, "--max-steps", "20", "--lr", "3e-2")) == 0
    capsys.readouterr()
    base_args = [
        "eval",
        "--model",
        str(model_dir),
        "--data",
        str(data_file),
        "--metrics",
        "bleu,rouge,perplexity",
        "--max-new-tokens",
        "12",
    ]
    assert cli.main(base_args) == 0
    untuned = json.loads(capsys.readouterr().out)
    assert cli.main([*base_args, "--adapter", str(out), "--predictions", str(tmp_path / "p.jsonl")]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert {"bleu", "rouge1", "rouge2", "rougeL", "perplexity"} <= set(tuned)
    assert tuned["examples"] == len(NAMES)  # three identical records per input are one example
    assert tuned["perplexity"] < untuned["perplexity"]
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == len(NAMES)

    assert (
        cli.main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--adapter",
                f"names={out}",
                "--prompt",
                "name: Cat Park",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    capsys.readouterr()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("names\tname: Blue Spice\n__base__\tname: Dog Shop\nname: River Mat\n")
    assert (
        cli.main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--adapter",
                f"names={out}",
                "--input-file",
                str(prompts),
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.splitlines()) == 3
    prompts.write_text("other\tname: Blue Spice\n")
    assert (
        cli.main(["generate", "--model", str(model_dir), "--adapter", f"names={out}", "--input-file", str(prompts)])
        == 2
    )


def test_config_precedence(tmp_path: Path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lr: 0.1\nbatch_size: 3\nnum_virtual_tokens: 7\n")
    cfg = build_config(
        TrainConfig, str(yaml_file), {"batch_size": 5}, ["lr=0.2", "init_text=table-to-text:"], option_names
    )
    assert (cfg.lr, cfg.batch_size) == (0.2, 5)
    assert cfg.options == {"num_virtual_tokens": 7, "init_text": "table-to-text:"}
    yaml_file.write_text("- a list\n")
    with pytest.raises(PrefixTuneError, match="mapping"):
        build_config(TrainConfig, str(yaml_file), {}, [], option_names)
    with pytest.raises(PrefixTuneError, match="key=value"):
        build_config(TrainConfig, None, {}, ["lr"], option_names)


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2", "gemma3"])
def test_target_only_logits_give_the_same_loss_and_gradients(arch: str) -> None:
    import prefixtune
    from prefixtune.eval import causal_lm_loss

    pm = prefixtune.attach(tiny(arch), prefixtune.PrefixConfig(num_virtual_tokens=3, projection_dim=8))
    ids = torch.randint(3, 90, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100  # the source
    labels[1, 7:] = -100  # right padding
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    grads = []
    for target_only in (False, True):
        pm.zero_grad()
        loss = causal_lm_loss(pm, batch, target_only=target_only)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in pm.trainable_parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-6)
    for full, kept in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(full, kept, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("method", "options"),
    [("prompt", {"num_virtual_tokens": 3}), ("lora", {}), ("adapter", {}), ("lora+prefix", {}), ("full", {})],
)
def test_target_only_logits_are_exact_for_every_method(method: str, options: dict) -> None:
    from prefixtune.eval import causal_lm_loss, row_nll
    from prefixtune.methods.prompt import PromptConfig
    from prefixtune.methods.registry import build_method

    torch.manual_seed(0)
    model = build_method(method, tiny("llama-gqa"), options, make_tokenizer())
    ids = torch.randint(3, 90, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    full, kept = (causal_lm_loss(model, batch, target_only=t) for t in (False, True))
    torch.testing.assert_close(full, kept, rtol=0, atol=1e-5)
    torch.testing.assert_close(row_nll(model, batch, target_only=False), row_nll(model, batch), rtol=0, atol=1e-4)
    if method == "prompt":  # rows with soft prompts of different lengths (and none) in one batch
        model.add_adapter("long", PromptConfig(num_virtual_tokens=5))
        names = ["default", "long", "__base__"]
        torch.testing.assert_close(
            row_nll(model, batch, target_only=False, adapter_names=names),
            row_nll(model, batch, adapter_names=names),
            rtol=0,
            atol=1e-4,
        )


def test_generation_stops_after_the_first_nonblank_line() -> None:
    from prefixtune.eval.generate import _FirstLineDone

    tok = make_tokenizer()
    prompt = tok("name: Cat Park", add_special_tokens=False)["input_ids"]
    rows = ["\n", " the cat", "\n the cat\n", "the dog\nthe cat"]
    ids = [prompt + tok(r, add_special_tokens=False)["input_ids"] for r in rows]
    width = max(len(i) for i in ids)
    batch = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i in ids])
    done = _FirstLineDone(tok, len(prompt))(batch, torch.zeros(4, 1))
    assert done.tolist() == [False, False, True, True]
