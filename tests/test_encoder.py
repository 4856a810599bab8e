"""Encoder classifiers (BERT, RoBERTa): deep prefixes plus a trainable head per adapter (P-tuning v2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model

import prefixtune
from peft_support import live_peft_prefix
from prefixtune import BASE, PrefixConfig, PrefixTuneError
from tiny import tiny
from tiny_seq2seq import ENCODERS, tiny_encoder

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
TOL = dict(rtol=1e-5, atol=1e-5)


def _attach_two(model: torch.nn.Module) -> prefixtune.PrefixModel:
    """'a': prefix + its own head (moved off the base head); 'b': another length, no head."""
    torch.manual_seed(1)
    pm = prefixtune.attach(model, PrefixConfig(num_virtual_tokens=3, init="random", projection_dim=16), name="a")
    pm.add_adapter("b", PrefixConfig(num_virtual_tokens=5, reparameterize=False, init="vocab", head=None))
    with torch.no_grad():
        pm.adapters["a"].mlp[2].weight.normal_(std=0.1)
        for param in pm.heads["a"].parameters():
            param.normal_(std=0.5)
    return pm


def _logits(pm: prefixtune.PrefixModel, names: list[str], rows: slice = slice(None)) -> torch.Tensor:
    with torch.no_grad():
        return pm(input_ids=IDS[rows], attention_mask=MASK[rows], adapter_names=names).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(ENCODERS))
def test_mixed_batch_with_heads_equals_rows_alone(arch: str, attn: str) -> None:
    model = tiny_encoder(arch, attn)
    with torch.no_grad():
        plain = model(input_ids=IDS, attention_mask=MASK).logits
    pm = _attach_two(model)
    assert pm.layout.roles == ["encoder", "encoder"]
    assert pm.adapter_config("a").head == "classifier" and pm.adapter_config("b").head is None
    assert (_logits(pm, ["b", "b"]) - plain).abs().max() > 1e-3  # the prefix alone changes the output
    torch.testing.assert_close(_logits(pm, [BASE, BASE]), plain, rtol=0, atol=1e-6)
    mixed = _logits(pm, ["a", "b"])
    torch.testing.assert_close(mixed[0], _logits(pm, ["a"], slice(0, 1))[0], **TOL)
    torch.testing.assert_close(mixed[1], _logits(pm, ["b"], slice(1, 2))[0], **TOL)
    # padding: the padded row equals the row cut to its real tokens
    with torch.no_grad():
        cut = pm(input_ids=IDS[1:, :4], adapter_names=["a"]).logits
    torch.testing.assert_close(_logits(pm, ["a", "a"])[1], cut[0], **TOL)


@pytest.mark.parametrize("arch", list(ENCODERS))
def test_zero_length_prefix_changes_nothing(arch: str) -> None:
    model = tiny_encoder(arch)
    with torch.no_grad():
        plain = model(input_ids=IDS, attention_mask=MASK).logits
    pm = prefixtune.attach(model, PrefixConfig(num_virtual_tokens=0))
    torch.testing.assert_close(_logits(pm, ["default", "default"]), plain, rtol=0, atol=1e-6)


def test_gradients_reach_prefix_and_head_only() -> None:
    model = tiny_encoder("bert")
    model.train()
    pm = _attach_two(model)
    assert {id(p) for p in pm.trainable_parameters()} == {
        id(p) for p in [*pm.adapters.parameters(), *pm.heads.parameters()]
    }
    pm(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 2]), adapter_names=["a", "b"]).loss.backward()
    assert all(p.grad is None for p in model.parameters())  # the base classifier included
    assert pm.heads["a"].weight.grad.abs().sum() > 0
    assert pm.adapters["a"].embedding.grad.abs().sum() > 0 and pm.adapters["b"].kv.grad.abs().sum() > 0


def test_training_prefix_and_head_reduces_loss() -> None:
    pm = prefixtune.attach(tiny_encoder("bert"), PrefixConfig(num_virtual_tokens=4, reparameterize=False))
    labels = torch.tensor([0, 2])
    optimizer = torch.optim.AdamW(pm.trainable_parameters(), lr=5e-2)
    losses = []
    for _ in range(15):
        loss = pm(input_ids=IDS, attention_mask=MASK, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_save_load_round_trip_with_head(tmp_path: Path) -> None:
    pm = _attach_two(tiny_encoder("roberta"))
    pm.save_adapter(tmp_path / "a", name="a")
    pm.save_adapter(tmp_path / "b", name="b")
    ref = _logits(pm, ["a", "b"])
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["classifier"]
    assert saved["prefixtune"]["prefix"]["locations"] == ["encoder"]
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    loaded = prefixtune.load_adapter(pm.detach(), tmp_path / "a")
    prefixtune.load_adapter(loaded, tmp_path / "b")
    assert sorted(loaded.heads) == ["a"]
    torch.testing.assert_close(_logits(loaded, ["a", "b"]), ref, rtol=0, atol=1e-6)


def _neutral_positions(model: torch.nn.Module) -> torch.nn.Module:
    """PEFT's cache-based prefix shifts BERT's positions by P; ours gives the prefix no position. Compare the
    format with positions made irrelevant (all position embeddings equal)."""
    with torch.no_grad():
        weight = model.bert.embeddings.position_embeddings.weight
        weight[:] = weight[0]
    return model


@live_peft_prefix()
def test_peft_reads_our_prefix_and_head(tmp_path: Path) -> None:
    pm = _attach_two(_neutral_positions(tiny_encoder("bert")))
    pm.save_adapter(tmp_path / "a", name="a")
    ours = _logits(pm, ["a", "a"])
    peft_model = PeftModel.from_pretrained(pm.detach(), tmp_path / "a").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@live_peft_prefix()
def test_we_read_peft_prefix_and_head(tmp_path: Path) -> None:
    model = _neutral_positions(tiny_encoder("bert"))
    torch.manual_seed(3)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)).eval()
    with torch.no_grad():
        peft_model.base_model.classifier.modules_to_save["default"].weight.normal_()
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS, attention_mask=MASK).logits
    pm = prefixtune.load_adapter(_neutral_positions(tiny_encoder("bert")), tmp_path / "peft")
    assert pm.adapter_config().head == "classifier" and pm.adapter_config().locations == ("encoder",)
    torch.testing.assert_close(_logits(pm, ["peft", "peft"]), theirs, rtol=0, atol=1e-5)


def test_bad_heads_and_encoder_adapters_in_decoders(tmp_path: Path) -> None:
    with pytest.raises(PrefixTuneError, match="no module 'pooler.nope'"):
        prefixtune.attach(tiny_encoder("bert"), PrefixConfig(head="pooler.nope"))
    with pytest.raises(PrefixTuneError, match="head must be"):
        PrefixConfig(head="")
    with pytest.raises(PrefixTuneError, match="no cross-attention"):
        prefixtune.attach(tiny_encoder("bert"), PrefixConfig(locations=["encoder", "cross"]))
    pm = prefixtune.attach(tiny_encoder("bert"), PrefixConfig(num_virtual_tokens=2))
    pm.save_adapter(tmp_path / "enc")
    decoder = tiny("gpt2")  # same layer count and shapes as the tiny BERT
    with pytest.raises(PrefixTuneError, match="prefix for encoder self-attention .* only decoder self-attention"):
        prefixtune.load_adapter(decoder, tmp_path / "enc")
    assert decoder.config._attn_implementation == "sdpa"
    other_labels = tiny_encoder("bert")
    other_labels.classifier = torch.nn.Linear(32, 5)
    with pytest.raises(PrefixTuneError, match="another number of labels"):
        prefixtune.load_adapter(other_labels, tmp_path / "enc", force=True)
