"""The demo (README command 1) end to end on a tiny model and an E2E-shaped file: its report, table and prefix."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForCausalLM

import prefixtune
from prefixtune.cli import main


def _e2e(folder: Path) -> Path:
    rows = [
        {"input": f"name: Place {i}, area: riverside", "target": f"Place {i} is by the river, version {j}."}
        for i in range(40)
        for j in range(2)
    ]
    (folder / "e2e_nlg.json").write_text(json.dumps({"examples": rows}))
    return folder


def test_demo_writes_its_report_and_a_loadable_prefix(model_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "data").mkdir()
    data_dir = _e2e(tmp_path / "data")
    out = tmp_path / "demo"
    args = ["demo", "--model", str(model_dir), "--data-dir", str(data_dir), "--out", str(out)]
    assert main([*args, "--max-steps", "3", "--eval-limit", "3"]) == 0
    table = capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert report["train_steps"] == 3 and report["examples"] == 3
    assert {"bleu", "rougeL"} <= set(report["untuned"]) and {"bleu", "rougeL"} <= set(report["prefix"])
    # the saved prefix is the collapsed (L, 2, H_kv, P, D) block; the MLP trains but is not saved
    pm = prefixtune.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), out / "prefix")
    config = pm.adapter_config()
    layout = pm.layout
    expected = layout.num_layers * 2 * layout.num_kv_heads * config.num_virtual_tokens * layout.head_dim
    assert report["saved_params"] == expected < report["trainable_params"]
    assert f"{expected:,}" in table and f"{report['prefix']['bleu']:.1f}" in table
    assert (out / "loss.png").stat().st_size > 0 and "**input:**" in (out / "samples.md").read_text()
    # a second run without --fresh resumes the finished training instead of starting over
    assert main([*args, "--max-steps", "3", "--eval-limit", "3"]) == 0
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 3
