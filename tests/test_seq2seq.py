"""Encoder-decoder models: prefixes on encoder self-, decoder self- and cross-attention (BART family, T5, mT5)."""

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
from tiny_seq2seq import SEQ2SEQ, tiny_seq2seq

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
DEC = torch.tensor([[3, 20, 21, 22], [3, 30, 31, 32]])
LOCATIONS = [("encoder",), ("decoder",), ("cross",), ("encoder", "decoder", "cross")]
TOL = dict(rtol=1e-4, atol=1e-4)  # batch-size-dependent float32 rounding; a wrong prefix moves logits by > 1e-2


def _attach_three(model: torch.nn.Module) -> prefixtune.PrefixModel:
    """All three locations (MLP), decoder only (direct, other length), cross only."""
    torch.manual_seed(1)
    pm = prefixtune.attach(model, PrefixConfig(num_virtual_tokens=3, init="random", projection_dim=16), name="all")
    pm.add_adapter("dec", PrefixConfig(num_virtual_tokens=5, reparameterize=False, locations=["decoder"]))
    pm.add_adapter("cross", PrefixConfig(num_virtual_tokens=2, reparameterize=False, locations=["cross"]))
    with torch.no_grad():  # move the MLP off its zero start
        pm.adapters["all"].mlp[2].weight.normal_(std=0.1)
    return pm


def _logits(pm: prefixtune.PrefixModel, names: list[str], rows: slice = slice(None), **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return pm(input_ids=IDS[rows], decoder_input_ids=DEC[rows], adapter_names=names, **kwargs).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(SEQ2SEQ))
def test_roles_and_mixed_batch_equals_rows_alone(arch: str, attn: str) -> None:
    model = tiny_seq2seq(arch, attn)
    with torch.no_grad():
        plain = model(input_ids=IDS, decoder_input_ids=DEC).logits
    pm = _attach_three(model)
    assert pm.layout.roles == ["encoder", "encoder", "decoder", "cross", "decoder", "cross"]
    assert pm.adapter_config("all").locations == ("encoder", "decoder", "cross")
    for name in ("all", "dec", "cross"):
        assert (_logits(pm, [name, name]) - plain).abs().max() > 1e-2  # each location changes the output
    torch.testing.assert_close(_logits(pm, [BASE, BASE]), plain, rtol=0, atol=1e-6)
    mixed = _logits(pm, ["all", "dec"])
    torch.testing.assert_close(mixed[0], _logits(pm, ["all"], slice(0, 1))[0], **TOL)
    torch.testing.assert_close(mixed[1], _logits(pm, ["dec"], slice(1, 2))[0], **TOL)
    mixed = _logits(pm, ["cross", BASE])
    torch.testing.assert_close(mixed[0], _logits(pm, ["cross"], slice(0, 1))[0], **TOL)
    torch.testing.assert_close(mixed[1], plain[1], **TOL)


@pytest.mark.parametrize("arch", list(SEQ2SEQ))
def test_zero_length_prefix_changes_nothing(arch: str) -> None:
    model = tiny_seq2seq(arch)
    with torch.no_grad():
        plain = model(input_ids=IDS, decoder_input_ids=DEC).logits
    pm = prefixtune.attach(model, PrefixConfig(num_virtual_tokens=0))
    torch.testing.assert_close(_logits(pm, ["default", "default"]), plain, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_sdpa_and_eager_agree(arch: str) -> None:
    outs = [_logits(_attach_three(tiny_seq2seq(arch, attn)), ["all", "cross"]) for attn in ("sdpa", "eager")]
    torch.testing.assert_close(outs[0], outs[1], **TOL)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["bart", "t5", "pegasus"])
def test_padding_in_the_encoder_input(arch: str, attn: str) -> None:
    """A right-padded encoder row gives what the row gives unpadded: prefix columns stay visible, pads masked."""
    model = tiny_seq2seq(arch, attn)
    pm = _attach_three(model)
    pad = model.config.pad_token_id
    ids = IDS.clone()
    ids[1, 4:] = pad
    mask = (torch.arange(6) < torch.tensor([[6], [4]])).long()
    with torch.no_grad():
        padded = pm(input_ids=ids, attention_mask=mask, decoder_input_ids=DEC, adapter_names=["all", "all"]).logits
        alone = pm(input_ids=ids[1:, :4], decoder_input_ids=DEC[1:], adapter_names=["all"]).logits
    torch.testing.assert_close(padded[1], alone[0], **TOL)


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_generate_with_cache_matches_no_cache(arch: str) -> None:
    """Decoder cache of real tokens only; cross keys from the cached encoder output, cross prefix every step."""
    pm = _attach_three(tiny_seq2seq(arch))
    mask = torch.ones_like(IDS)
    mask[1, 4:] = 0
    for names, beams in ((["all", "dec"], 1), (["all", "dec"], 3), (["cross", BASE], 3)):
        kwargs = dict(input_ids=IDS, attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=beams)
        cached = pm.generate(**kwargs, adapter_names=names)
        recomputed = pm.generate(**kwargs, adapter_names=names, use_cache=False)
        assert torch.equal(cached, recomputed), (names, beams)
    # greedy decoding of a mixed batch equals each row decoded alone
    both = pm.generate(input_ids=IDS, max_new_tokens=6, do_sample=False, adapter_names=["all", "dec"])
    first = pm.generate(input_ids=IDS[:1], max_new_tokens=6, do_sample=False, adapter_names=["all"])
    assert torch.equal(both[0, : first.shape[1]], first[0])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_t5_relative_bias_skips_prefix_columns(attn: str) -> None:
    """Against attention computed by hand: softmax([q.Kp, q.K + bias]) @ [Vp, V], no bias on the prefix."""
    model = tiny_seq2seq("t5", attn)
    pm = prefixtune.attach(model, PrefixConfig(num_virtual_tokens=3, init="random", reparameterize=False))
    kv = pm.layout.split(pm.adapters["default"].kv.detach(), ("encoder", "decoder", "cross"))
    for location, stack in (("encoder", model.encoder), ("decoder", model.decoder)):
        attention = stack.block[0].layer[0].SelfAttention  # the layer that owns the relative bias
        seen: dict[str, torch.Tensor] = {}

        def record(module: torch.nn.Module, args: tuple, kwargs: dict, out: tuple, seen: dict = seen) -> None:
            seen.update(h=args[0], out=out[0])

        hook = attention.register_forward_hook(record, with_kwargs=True)
        _logits(pm, ["default", "default"])
        hook.remove()
        expected = _t5_by_hand(attention, seen["h"], kv[location][0], causal=location == "decoder")
        torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)


def _t5_by_hand(attention: torch.nn.Module, h: torch.Tensor, prefix: torch.Tensor, causal: bool) -> torch.Tensor:
    """T5 attention (no 1/sqrt(d) scaling) with prefix keys/values (2, H, P, D) that get no position bias."""
    rows, length, _ = h.shape
    q, k, v = (proj(h).view(rows, length, 4, 8).transpose(1, 2) for proj in (attention.q, attention.k, attention.v))
    real = q @ k.transpose(-1, -2) + attention.compute_bias(length, length)  # (B, H, T, T)
    if causal:
        real = real.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    scores = torch.cat([q @ prefix[0].transpose(-1, -2), real], dim=-1)
    out = scores.softmax(-1) @ torch.cat([prefix[1].expand(rows, -1, -1, -1), v], dim=2)
    return attention.o(out.transpose(1, 2).reshape(rows, length, -1))


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_save_load_round_trip(arch: str, tmp_path: Path) -> None:
    pm = _attach_three(tiny_seq2seq(arch))
    for name in ("all", "dec", "cross"):
        pm.save_adapter(tmp_path / name, name=name)
    ref = _logits(pm, ["all", "cross"])
    saved = json.loads((tmp_path / "all" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_2_SEQ_LM" and saved["num_transformer_submodules"] == 2
    assert saved["prefixtune"]["layers"] == {"encoder": 2, "decoder": 2, "cross": 2}
    assert saved["prefixtune"]["prefix"]["locations"] == ["encoder", "decoder", "cross"]
    loaded = prefixtune.load_adapter(pm.detach(), tmp_path / "all")
    prefixtune.load_adapter(loaded, tmp_path / "cross")
    prefixtune.load_adapter(loaded, tmp_path / "dec")
    assert loaded.adapter_config("cross").locations == ("cross",)
    torch.testing.assert_close(_logits(loaded, ["all", "cross"]), ref, rtol=0, atol=1e-6)


def test_t5_gradients_reach_prefix_parameters_only() -> None:
    model = tiny_seq2seq("t5")
    model.train()
    pm = _attach_three(model)
    labels = DEC.clone()
    pm(input_ids=IDS, labels=labels, adapter_names=["all", "cross"]).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert pm.adapters["all"].embedding.grad.abs().sum() > 0
    assert pm.adapters["cross"].kv.grad.abs().sum() > 0
    assert pm.adapters["dec"].kv.grad is None  # not in the batch


@pytest.mark.parametrize("init", ["vocab", "text"])
def test_init_from_real_activations(init: str) -> None:
    """Each location starts from the frozen model's keys/values at that location (cross: from the encoder)."""
    model = tiny_seq2seq("bart")
    tokenizer = _DigitTokenizer()
    config = PrefixConfig(num_virtual_tokens=4, init=init, init_text="1 2" if init == "text" else None)
    pm = prefixtune.attach(model, config, tokenizer=tokenizer)
    kv = pm.adapters["default"].collapsed()
    assert kv.shape == (6, 2, 4, 4, 8) and kv.abs().sum() > 0
    assert not torch.equal(kv[0], kv[2])  # encoder layer 0 and decoder layer 0 see different weights


class _DigitTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [10 + int(t) for t in text.split()]}

    def __len__(self) -> int:
        return 20


def _neutral_positions(model: torch.nn.Module) -> torch.nn.Module:
    """Make the decoder blind to positions. PEFT's cache-based prefix shifts the decoder's positions by P (BART)
    and gives prefix keys relative bias (T5); ours does neither, so the layout is compared without positions."""
    with torch.no_grad():
        if hasattr(model, "model"):  # BART: all learned decoder positions equal
            weight = model.model.decoder.embed_positions.weight
            weight[:] = weight[5]
        else:  # T5: no relative bias in the decoder
            model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.zero_()
    return model


@pytest.mark.parametrize("arch", ["bart", "t5"])
@live_peft_prefix()
def test_peft_reads_our_decoder_prefix(arch: str, tmp_path: Path) -> None:
    """Exact with an odd number of decoder layers: PEFT's layout gives decoder layer i slot 2i mod L."""
    model = _neutral_positions(tiny_seq2seq(arch, **_layers(arch, 3)))
    pm = prefixtune.attach(model, PrefixConfig(num_virtual_tokens=3, init="random", locations=["decoder"]))
    pm.save_adapter(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["prefixtune"]["peft_reads_exactly"]
    ours, ours_gen = _logits(pm, ["default"] * 2), pm.generate(input_ids=IDS, max_new_tokens=6, do_sample=False)
    peft_model = PeftModel.from_pretrained(pm.detach(), tmp_path / "ours").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS, decoder_input_ids=DEC).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert torch.equal(peft_model.generate(input_ids=IDS, max_new_tokens=6, do_sample=False), ours_gen)


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("arch", ["bart", "t5"])
@live_peft_prefix(strict=False)
def test_we_read_peft_seq2seq_prefix(arch: str, layers: int, tmp_path: Path) -> None:
    model = _neutral_positions(tiny_seq2seq(arch, **_layers(arch, layers)))
    torch.manual_seed(3)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS, decoder_input_ids=DEC).logits
    theirs_gen = peft_model.generate(input_ids=IDS, max_new_tokens=6, do_sample=False)
    pm = prefixtune.load_adapter(peft_model.get_base_model(), tmp_path / "peft")
    assert pm.adapter_config().locations == ("decoder",)
    torch.testing.assert_close(_logits(pm, ["peft"] * 2), theirs, rtol=0, atol=1e-5)
    assert torch.equal(pm.generate(input_ids=IDS, max_new_tokens=6, do_sample=False), theirs_gen)


def test_even_decoder_depth_is_flagged_as_lossy_for_peft(tmp_path: Path) -> None:
    config = PrefixConfig(num_virtual_tokens=2, init="random", locations=["decoder"])
    pm = prefixtune.attach(tiny_seq2seq("bart"), config)
    pm.save_adapter(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["prefixtune"]["peft_reads_exactly"] is False
    pm.add_adapter("b", tmp_path / "a")  # ours reads its own tensor: exact
    torch.testing.assert_close(_logits(pm, ["b", "b"]), _logits(pm, ["default", "default"]), rtol=0, atol=1e-6)


def _layers(arch: str, n: int) -> dict[str, int]:
    return {"num_layers": n} if "t5" in arch else {"encoder_layers": n, "decoder_layers": n}


def test_bad_locations_and_adapters_for_another_kind_of_model(tmp_path: Path) -> None:
    with pytest.raises(PrefixTuneError, match="no cross-attention"):
        prefixtune.attach(tiny("gpt2"), PrefixConfig(locations=["cross"]))
    with pytest.raises(PrefixTuneError, match="no encoder self-attention"):
        prefixtune.attach(tiny("llama-gqa"), PrefixConfig(locations=["encoder", "decoder"]))
    with pytest.raises(PrefixTuneError, match="locations must"):
        PrefixConfig(locations=["decoder", "middle"])
    with pytest.raises(PrefixTuneError, match="at least one"):
        PrefixConfig(locations=[])
    # a seq2seq adapter (encoder + cross prefixes) into a decoder-only model
    pm = prefixtune.attach(tiny_seq2seq("bart"), PrefixConfig(num_virtual_tokens=2, init="random"))
    pm.save_adapter(tmp_path / "s2s")
    decoder_only = tiny("gpt2")
    with pytest.raises(PrefixTuneError, match="encoder self-attention and cross-attention .* only decoder"):
        prefixtune.load_adapter(decoder_only, tmp_path / "s2s")
    assert decoder_only.config._attn_implementation == "sdpa"  # left as it was
    # a one-stack PEFT-style adapter (no recorded location) into an encoder-decoder
    config = json.loads((tmp_path / "s2s" / "adapter_config.json").read_text())
    peft_style = tmp_path / "peft_style"
    peft_style.mkdir()
    config.update(num_transformer_submodules=1, num_layers=2, prefixtune=None)
    (peft_style / "adapter_config.json").write_text(json.dumps(config))
    weights = (tmp_path / "s2s" / "adapter_model.safetensors").read_bytes()
    (peft_style / "adapter_model.safetensors").write_bytes(weights)
    with pytest.raises(PrefixTuneError, match="one stack of self-attention .* encoder-decoder"):
        prefixtune.load_adapter(tiny_seq2seq("bart"), peft_style)
