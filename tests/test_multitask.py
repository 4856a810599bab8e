"""Several prefixes in one `prefixtune train` run: equal to training each alone, per-task output, bad input."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefixtune import cli, train
from prefixtune.config import TrainConfig, build_config
from prefixtune.errors import PrefixTuneError
from prefixtune.methods.registry import option_names

# Tasks of different sizes and lengths, so that mixed batches are padded and tasks wrap epochs at different steps.
TASKS = {
    "names": [{"input": f"name: {n}", "target": f"{n} is a coffee shop."} for n in ("Blue Spice", "Cat Park", "Dog")],
    "colors": [
        {"input": f"color of the {n}", "target": f"the {n} is {c}, very {c} indeed."}
        for n, c in (("sky", "blue"), ("grass", "green"), ("sun", "yellow"), ("mat", "red"), ("park", "green"))
    ],
    "echo": [{"input": w, "target": w} for w in ("cat", "dog", "the mat", "park")],
}
# Adam's steps are sign-like, so rounding differences between a mixed and a single batch do not grow much:
# observed max |difference| ~1e-7 on prefix values of size ~0.5; the tolerance leaves room for other BLAS.
ATOL = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tasks")
    paths = {}
    for name, rows in TASKS.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["all"] = root / "all.jsonl"
    paths["all"].write_text("".join(json.dumps({**r, "task": t}) + "\n" for t, rows in TASKS.items() for r in rows))
    return paths


def _args(model_dir: Path, out: Path, *data: str, steps: int = 6) -> list[str]:
    return [
        "train",
        "--model",
        str(model_dir),
        *[x for d in data for x in ("--data", d)],
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--quiet",
        "--max-steps",
        str(steps),
        "--lr",
        "3e-2",
        "--eval-every",
        "3",
        "train_split=all",
        "eval_split=all",
        "grad_accum=2",
        "warmup_steps=1",
        "log_every=2",
        "projection_dim=16",
        "num_virtual_tokens=4",
    ]


@pytest.fixture(scope="module")
def singles(model_dir: Path, files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each task trained alone, the plain single-task way."""
    root = tmp_path_factory.mktemp("singles")
    for name in TASKS:
        assert cli.main(_args(model_dir, root / name, str(files[name]))) == 0
    return {name: root / name for name in TASKS}


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def _assert_same_as_singles(out: Path, singles: dict[str, Path], names: list[str]) -> None:
    for name in names:
        together, alone = _adapter(out / name), _adapter(singles[name])
        assert together.keys() == alone.keys()
        for key in alone:
            torch.testing.assert_close(together[key], alone[key], rtol=0, atol=ATOL)
    first, second = _adapter(singles[names[0]]), _adapter(singles[names[1]])
    assert max((first[k] - second[k]).abs().max().item() for k in first) > 100 * ATOL  # the tasks learned apart


def test_task_field_trains_one_prefix_per_task_equal_to_training_each_alone(
    model_dir: Path, files: dict[str, Path], singles: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "multi"
    capsys.readouterr()
    assert cli.main(_args(model_dir, out, str(files["all"]))) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["tasks"]) == set(TASKS) and all(t["steps"] == 6 for t in summary["tasks"].values())
    for name in TASKS:
        assert (out / name / "adapter_config.json").is_file()
    assert not (out / "adapter_model.safetensors").exists()
    _assert_same_as_singles(out, singles, list(TASKS))
    records = train.read_metrics(out / "metrics.jsonl")
    for name in TASKS:  # per-task validation, the same numbers as the task's own run
        together = [(r["step"], r["val_loss"]) for r in records if r.get("task") == name]
        own = train.read_metrics(singles[name] / "metrics.jsonl")
        alone = [(r["step"], r["val_loss"]) for r in own if "val_loss" in r]
        assert [s for s, _ in together] == [3, 6] == [s for s, _ in alone]
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(together, alone))
    losses = [r for r in records if "task_loss" in r]
    assert len(losses) == 3 and set(losses[0]["task_loss"]) == set(TASKS)


def test_data_pairs_train_named_tasks(
    model_dir: Path, files: dict[str, Path], singles: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "pairs"
    assert cli.main(_args(model_dir, out, f"names={files['names']}", f"echo={files['echo']}")) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint", "echo", "names"]
    _assert_same_as_singles(out, singles, ["names", "echo"])


def test_multitask_resume_after_interrupt_is_bitwise(
    model_dir: Path, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = (f"names={files['names']}", f"colors={files['colors']}")
    straight = tmp_path / "straight"
    assert cli.main(_args(model_dir, straight, *pairs, steps=4)) == 0
    cut = tmp_path / "cut"
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def interrupting_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupting_step)
    assert cli.main(_args(model_dir, cut, *pairs, steps=4)) == 130
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert cli.main([*_args(model_dir, cut, *pairs, steps=4), "--resume"]) == 0
    for name in ("names", "colors"):
        assert (cut / name / "adapter_model.safetensors").read_bytes() == (
            straight / name / "adapter_model.safetensors"
        ).read_bytes()


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "make_data, extra, message",
    [
        (lambda p: [_write(p / "a.jsonl", [{"input": "a", "target": "b", "task": "no spaces"}])], [], "task name"),
        (lambda p: [_write(p / "a.jsonl", [{"input": "a", "target": "b", "task": "checkpoint"}])], [], "taken"),
        (
            lambda p: [
                _write(p / "a.jsonl", [{"input": "a", "target": "b", "task": "x"}, {"input": "c", "target": "d"}])
            ],  # noqa: E501
            [],
            "1 of 2 examples have no 'task'",
        ),
        (
            lambda p: [_write(p / "a.jsonl", [{"input": f"s{i}", "target": "t", "task": "x"} for i in range(3)])],
            ["train_split=validation"],
            "split of task 'x'",
        ),
        (lambda p: [f"a={_write(p / 'a.jsonl', [{'input': 'a', 'target': 'b'}])}", f"b={p / 'empty.jsonl'}"], [], "b"),
        (lambda p: [f"bad/name={_write(p / 'a.jsonl', [{'input': 'a', 'target': 'b'}])}"], [], "task name"),
        (lambda p: [f"a={p / 'x.jsonl'}", f"a={p / 'y.jsonl'}"], [], "given twice"),
        (lambda p: [_write(p / "x.jsonl", [{"input": "a", "target": "b"}]), str(p / "y.jsonl")], [], "NAME=PATH"),
        (
            lambda p: [_write(p / "a.jsonl", [{"input": "a", "target": "b", "task": "x"}])],
            ["--method", "lora"],
            "cannot train several tasks",
        ),
    ],
)
def test_bad_tasks_fail_before_the_model_loads(tmp_path: Path, capsys, make_data, extra, message) -> None:
    """The model does not exist: each error must come from the data, before any model is loaded."""
    data = make_data(tmp_path)
    out = tmp_path / "run"
    code = cli.main(["train", "--model", str(tmp_path / "no-model"), *[x for d in data for x in ("--data", d)],
                     "--out", str(out), "--quiet", "--max-steps", "1", *extra])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("prefixtune: error:") and len(err.splitlines()) == 1, err
    assert message in err and "no-model" not in err, err
    assert not any(out.rglob("adapter_model.safetensors"))


def test_lora_plus_prefix_shares_weights_so_cannot_split_tasks(
    model_dir: Path, files: dict[str, Path], tmp_path: Path, capsys
) -> None:
    args = [*_args(model_dir, tmp_path / "r", str(files["all"]), steps=1), "--method", "lora+prefix"]
    args = [a for a in args if a not in ("projection_dim=16",)]
    assert cli.main(args) == 2
    assert "shares trainable weights" in capsys.readouterr().err


def test_data_mapping_in_yaml_and_overrides(tmp_path: Path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data:\n  e2e: e2e\n  mine: my.jsonl\n")
    cfg = build_config(TrainConfig, str(yaml_file), {}, [], option_names)
    assert cfg.data == {"e2e": "e2e", "mine": "my.jsonl"}
    cfg = build_config(TrainConfig, None, {}, ["data=a=x.jsonl,b=y.jsonl"], option_names)
    assert cfg.data == {"a": "x.jsonl", "b": "y.jsonl"}
    assert build_config(TrainConfig, None, {"data": ["e2e"]}, [], option_names).data == "e2e"
    existing = tmp_path / "odd=name.jsonl"
    existing.write_text("{}\n")
    assert build_config(TrainConfig, None, {"data": [str(existing)]}, [], option_names).data == str(existing)
    with pytest.raises(PrefixTuneError, match="empty"):
        TrainConfig(data={})
