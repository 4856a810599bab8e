"""Saved adapters: PEFT's format both ways (PEFT is the oracle), and bad files refused with nothing changed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import save_file

import prefixtune
from peft_support import live_peft_prefix
from prefixtune import PrefixConfig, PrefixTuneError
from tiny import tiny

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
PEFT_ARCHS = ["gpt2", "llama-gqa", "qwen2", "mistral", "gpt-neox", "phi3"]


def _peft_comparable(arch: str):
    """Sliding windows wider than the test sequence: there PEFT's prefix, which sits in the cache at positions
    0..P-1, falls out of the window, while ours stays visible to every token (see docs/design.md)."""
    model = tiny(arch)
    if getattr(model.config, "sliding_window", None):
        model.config.sliding_window = 64
    return model


def _trained_prefix(arch: str, p: int = 4) -> prefixtune.PrefixModel:
    pm = prefixtune.attach(_peft_comparable(arch), PrefixConfig(num_virtual_tokens=p, init="random", projection_dim=16))
    with torch.no_grad():  # move the MLP off its zero start so the collapse is non-trivial
        pm.adapters["default"].mlp[2].weight.normal_(std=0.1)
    return pm


@pytest.mark.parametrize("arch", PEFT_ARCHS)
@live_peft_prefix(strict=False)
def test_peft_loads_ours_with_same_logits_and_greedy_output(arch: str, tmp_path: Path) -> None:
    pm = _trained_prefix(arch)
    pm.save_adapter(tmp_path / "ours")
    with torch.no_grad():
        ours = pm(input_ids=IDS).logits
    ours_gen = pm.generate(input_ids=IDS, max_new_tokens=6, do_sample=False)
    base = pm.detach()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS).logits
    assert (ours - theirs).abs().max() < 1e-5
    assert torch.equal(peft_model.generate(input_ids=IDS, max_new_tokens=6, do_sample=False), ours_gen)


@pytest.mark.parametrize("arch", PEFT_ARCHS)
@live_peft_prefix()
def test_we_load_peft_prefix_with_same_logits(arch: str, tmp_path: Path) -> None:
    base = _peft_comparable(arch)
    torch.manual_seed(3)
    peft_model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS).logits
    theirs_gen = peft_model.generate(input_ids=IDS, max_new_tokens=6, do_sample=False)
    pm = prefixtune.load_adapter(peft_model.get_base_model(), tmp_path / "peft")
    assert pm.adapter_names == ["peft"]
    with torch.no_grad():
        ours = pm(input_ids=IDS).logits
    assert (ours - theirs).abs().max() < 1e-5
    assert torch.equal(pm.generate(input_ids=IDS, max_new_tokens=6, do_sample=False), theirs_gen)


def test_round_trip_keeps_logits_and_records_our_fields(tmp_path: Path) -> None:
    pm = _trained_prefix("llama-gqa")
    pm.add_adapter("zero", PrefixConfig(num_virtual_tokens=2, position_convention="zero", init="random"))
    pm.save_adapter(tmp_path / "a")
    pm.save_adapter(tmp_path / "z", name="zero")
    with torch.no_grad():
        ref = pm(input_ids=IDS, adapter_names=["default", "zero"]).logits
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING"
    assert config["prefixtune"]["prefix"]["reparameterize"] is True
    assert config["prefixtune"]["base_model"]["num_kv_heads"] == 2
    base = pm.detach()
    loaded = prefixtune.load_adapter(base, tmp_path / "a", name="default")
    prefixtune.load_adapter(loaded, tmp_path / "z", name="zero")
    assert loaded.adapter_config("zero").position_convention == "zero"
    with torch.no_grad():
        out = loaded(input_ids=IDS, adapter_names=["default", "zero"]).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # the loaded prefix trains as a direct parameter
    assert [p.shape for p in loaded.adapters["default"].parameters()] == [torch.Size([2, 2, 2, 4, 8])]


def test_adapter_for_another_model_is_refused(tmp_path: Path) -> None:
    _trained_prefix("llama-gqa").save_adapter(tmp_path / "llama")
    other_shapes = tiny("gpt2")
    with pytest.raises(PrefixTuneError, match="was made for .* this model"):
        prefixtune.load_adapter(other_shapes, tmp_path / "llama")
    assert other_shapes.config._attn_implementation == "sdpa"  # the refused model is left as it was
    same_shapes_other_weights = tiny("llama-gqa", seed=7)
    with pytest.raises(PrefixTuneError, match="not on this model .*force"):
        prefixtune.load_adapter(same_shapes_other_weights, tmp_path / "llama")
    forced = prefixtune.load_adapter(tiny("llama-gqa", seed=7), tmp_path / "llama", force=True)
    assert forced.adapter_names == ["llama"]


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "adapter"
    _trained_prefix("llama-gqa").save_adapter(path)
    return path


def _snapshot(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00garbage"), "corrupt or truncated"),
        (
            lambda p: (p / "adapter_model.safetensors").write_bytes(
                (p / "adapter_model.safetensors").read_bytes()[:50]
            ),
            "corrupt or truncated",
        ),
        (lambda p: (p / "adapter_model.safetensors").unlink(), "not found"),
        (lambda p: (p / "adapter_config.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "adapter_config.json").write_text("[]"), "JSON object"),
        (lambda p: _edit_config(p, lambda c: c.pop("num_layers")), "num_layers"),
        (lambda p: _edit_config(p, lambda c: c.update(peft_type="LORA")), "PREFIX_TUNING"),
        (lambda p: _edit_config(p, lambda c: c.update(num_virtual_tokens=9)), "config says"),
        (lambda p: save_file({"prompt_embeddings": torch.zeros(4, 3)}, p / "adapter_model.safetensors"), "config says"),
        (lambda p: save_file({"other": torch.zeros(4, 3)}, p / "adapter_model.safetensors"), "not found"),
        (
            lambda p: save_file(
                {"prompt_embeddings": torch.zeros(4, 64, dtype=torch.int32)}, p / "adapter_model.safetensors"
            ),
            "float",
        ),
        (
            lambda p: save_file(
                {"prompt_embeddings": torch.full((4, 64), float("nan"))}, p / "adapter_model.safetensors"
            ),
            "NaN",
        ),
        (lambda p: _edit_config(p, lambda c: c["prefixtune"]["prefix"].update(bogus=1)), "unknown prefix config"),
    ],
)
def test_bad_adapter_files_raise_our_error_and_change_nothing(tmp_path: Path, damage, message: str) -> None:
    path = _saved(tmp_path)
    damage(path)
    before = _snapshot(path)
    model = tiny("llama-gqa")
    with pytest.raises(PrefixTuneError, match=message):
        prefixtune.load_adapter(model, path)
    assert _snapshot(path) == before
    assert model.config._attn_implementation == "sdpa"


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    edit(config)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(PrefixTuneError, match="not an adapter directory"):
        prefixtune.load_adapter(tiny(), tmp_path / "nowhere")


def test_failed_save_keeps_the_previous_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _saved(tmp_path)
    before = _snapshot(path)
    pm = _trained_prefix("llama-gqa", p=6)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("prefixtune.atomic.save_file", fail)
    with pytest.raises(PrefixTuneError, match="No space left"):
        pm.save_adapter(path)
    assert _snapshot(path) == before  # no temp files left, old files intact


def test_fingerprint_of_a_large_embedding() -> None:
    """More than 2**24 embedding values (smollm2 has 28M): the sample indices must stay in range."""
    from types import SimpleNamespace

    from prefixtune.peft_format import fingerprint

    class Big(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(16_400, 1024)
            self.config = SimpleNamespace(model_type="big")

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.embed

    model = Big()
    first = fingerprint(model, 2, 2, 8)
    assert first == fingerprint(model, 2, 2, 8) and len(first["embedding_sha256"]) == 16
    with torch.no_grad():
        model.embed.weight[-1, -1] += 1.0  # the last value is in the sample
    assert fingerprint(model, 2, 2, 8) != first
