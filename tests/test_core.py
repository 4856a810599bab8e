"""The core engine on every supported decoder family: the prefix is exact, per row, and cache-safe."""

from __future__ import annotations

import pytest
import torch

import prefixtune
from prefixtune import BASE, PrefixConfig, PrefixTuneError
from prefixtune.cache_argument import output_cache
from tiny import ARCHITECTURES, tiny

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def _attach_two(model: torch.nn.Module) -> prefixtune.PrefixModel:
    """Two adapters of different lengths and parameterizations, both non-trivial."""
    torch.manual_seed(1)
    pm = prefixtune.attach(model, PrefixConfig(num_virtual_tokens=3, init="random"), name="a")
    pm.add_adapter("b", PrefixConfig(num_virtual_tokens=5, reparameterize=False, init="vocab"))
    return pm


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_prefix_is_exact_per_row(arch: str, attn: str) -> None:
    base = tiny(arch, attn)
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
    pm = _attach_two(base)
    with torch.no_grad():
        # a prefix changes the output; the base rows do not change
        with_a = pm(input_ids=IDS, adapter_names=["a", "a"]).logits
        assert (with_a - plain).abs().max() > 1e-3
        as_base = pm(input_ids=IDS, adapter_names=[BASE, BASE]).logits
        torch.testing.assert_close(as_base, plain, rtol=0, atol=1e-6)
        # mixed batch (different adapters, different lengths, one row without prefix) == each row alone
        mixed = pm(input_ids=torch.cat([IDS, IDS[:1]]), adapter_names=["a", "b", BASE]).logits
        alone_a = pm(input_ids=IDS[:1], adapter_names=["a"]).logits
        alone_b = pm(input_ids=IDS[1:], adapter_names=["b"]).logits
        torch.testing.assert_close(mixed[0], alone_a[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(mixed[1], alone_b[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(mixed[2], plain[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_zero_length_prefix_changes_nothing(arch: str) -> None:
    base = tiny(arch)
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
        pm = prefixtune.attach(base, PrefixConfig(num_virtual_tokens=0))
        torch.testing.assert_close(pm(input_ids=IDS).logits, plain, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2", "gemma3"])
def test_sdpa_and_eager_agree(arch: str) -> None:
    outs = []
    for attn in ("sdpa", "eager"):
        pm = _attach_two(tiny(arch, attn))
        with torch.no_grad():
            outs.append(pm(input_ids=IDS, adapter_names=["a", "b"]).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2", "mistral", "gemma3"])
def test_padding_left_and_right(arch: str, attn: str) -> None:
    pm = _attach_two(tiny(arch, attn))
    short = IDS[1:, :4]  # 4 real tokens
    with torch.no_grad():
        alone = pm(input_ids=short, adapter_names=["b"]).logits[0]
        # right padding: real positions unchanged
        right = torch.cat([IDS[:1], torch.cat([short, torch.zeros(1, 2, dtype=torch.long)], 1)])
        mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
        out = pm(input_ids=right, attention_mask=mask, adapter_names=["a", "b"]).logits
        torch.testing.assert_close(out[1, :4], alone, rtol=0, atol=1e-5)
        # left padding with position ids that skip the pads (what generate passes)
        left = torch.cat([IDS[:1], torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1)])
        mask = torch.tensor([[1] * 6, [0] * 2 + [1] * 4])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = pm(input_ids=left, attention_mask=mask, position_ids=positions, adapter_names=["a", "b"]).logits
        torch.testing.assert_close(out[1, 2:], alone, rtol=0, atol=1e-5)


def _greedy_without_cache(pm: prefixtune.PrefixModel, ids: torch.Tensor, names: list[str], steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            logits = pm(input_ids=ids, adapter_names=names, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("names", [["a", "b"], ["a", "a"]], ids=["mixed", "one-adapter"])
def test_generate_with_cache_matches_full_recompute(arch: str, attn: str, names: list[str]) -> None:
    # "one-adapter": every prefix column visible, so decode steps run without any mask (the fast path)
    pm = _attach_two(tiny(arch, attn))
    out = pm.generate(
        input_ids=IDS,
        attention_mask=torch.ones_like(IDS),
        adapter_names=names,
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
    )
    reference = _greedy_without_cache(pm, IDS, names, 6)
    assert torch.equal(out.sequences, reference)
    # the cache holds real tokens only: prompt + generated - 1 (the last token is never fed back)
    assert output_cache(out).get_seq_length() == IDS.shape[1] + 6 - 1


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2"])
def test_generate_left_padded_batch_matches_rows_alone(arch: str) -> None:
    pm = _attach_two(tiny(arch))
    short = IDS[1:, :4]
    left = torch.cat([IDS[:1], torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1)])
    mask = torch.tensor([[1] * 6, [0] * 2 + [1] * 4])
    both = pm.generate(input_ids=left, attention_mask=mask, adapter_names=["a", "b"], max_new_tokens=5, do_sample=False)
    row_a = pm.generate(input_ids=IDS[:1], adapter_names=["a"], max_new_tokens=5, do_sample=False)
    row_b = pm.generate(input_ids=short, adapter_names=["b"], max_new_tokens=5, do_sample=False)
    assert torch.equal(both[0], row_a[0])
    assert torch.equal(both[1, 2:], row_b[0])


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3"])
def test_beam_search_and_sampling(arch: str) -> None:
    pm = _attach_two(tiny(arch))
    beams = pm.generate(input_ids=IDS, adapter_names=["a", "b"], max_new_tokens=4, num_beams=3, do_sample=False)
    assert beams.shape == (2, IDS.shape[1] + 4)
    # a beam search of width 1 is greedy
    one = pm.generate(input_ids=IDS, adapter_names=["a", "b"], max_new_tokens=4, num_beams=1, do_sample=False)
    assert torch.equal(one, _greedy_without_cache(pm, IDS, ["a", "b"], 4))
    torch.manual_seed(0)
    s1 = pm.generate(
        input_ids=IDS,
        adapter_names=["b", "a"],
        max_new_tokens=4,
        do_sample=True,
        top_p=0.9,
        temperature=0.8,
        num_return_sequences=2,
    )
    torch.manual_seed(0)
    s2 = pm.generate(
        input_ids=IDS,
        adapter_names=["b", "a"],
        max_new_tokens=4,
        do_sample=True,
        top_p=0.9,
        temperature=0.8,
        num_return_sequences=2,
    )
    assert s1.shape == (4, IDS.shape[1] + 4) and torch.equal(s1, s2)


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2"])
def test_gradients_reach_prefix_parameters_only(arch: str) -> None:
    base = tiny(arch)
    pm = _attach_two(base)
    pm.train()
    loss = pm(input_ids=IDS, labels=IDS, adapter_names=["a", "b"]).loss
    loss.backward()
    assert all(p.grad is None for p in base.parameters())
    trainable = pm.trainable_parameters()
    assert trainable and all(p.grad is not None for p in trainable)
    # the MLP's last layer starts at zero, so its gradient is what moves first
    assert pm.adapters["a"].mlp[2].weight.grad.abs().sum() > 0
    assert pm.adapters["b"].kv.grad.abs().sum() > 0


def test_training_reduces_loss() -> None:
    pm = prefixtune.attach(tiny("llama-gqa"), PrefixConfig(num_virtual_tokens=8, projection_dim=64))
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=3e-2)
    pm.train()
    losses = []
    for _ in range(40):
        loss = pm(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3  # a random 2-layer model: the prefix alone moves it slowly


def test_reparameterization_starts_at_init_and_collapses() -> None:
    pm = prefixtune.attach(tiny(), PrefixConfig(num_virtual_tokens=3, init="random", projection_dim=16))
    enc = pm.adapters["default"]
    torch.testing.assert_close(enc.collapsed(), enc.init_kv)
    with torch.no_grad():
        enc.mlp[2].weight.normal_()
    collapsed = enc.collapsed()
    assert collapsed.shape == (2, 2, 2, 3, 8)  # (L, 2, H_kv, P, D)
    torch.testing.assert_close(collapsed, enc())


def _word_tokenizer():  # a tiny tokenizer built in the test
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "table", "-", "to", "text", ":", "hello"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def test_init_from_real_word_activations() -> None:
    tok = _word_tokenizer()
    ids = tok("table - to - text :", add_special_tokens=False)["input_ids"]
    assert ids == [2, 3, 4, 3, 5, 6]
    base = tiny()
    pm = prefixtune.attach(base, PrefixConfig(num_virtual_tokens=6, init_text="table - to - text :"), tokenizer=tok)
    assert pm.adapter_config().init == "text"
    with torch.no_grad():
        out = base(input_ids=torch.tensor([ids]), use_cache=True)  # activations of the frozen model
    cache = output_cache(out)
    kv = pm.adapters["default"].collapsed()
    for layer in range(2):
        torch.testing.assert_close(kv[layer, 0], cache.layers[layer].keys[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(kv[layer, 1], cache.layers[layer].values[0], rtol=0, atol=1e-6)


def test_init_text_needs_tokenizer() -> None:
    with pytest.raises(PrefixTuneError, match="tokenizer"):
        prefixtune.attach(tiny(), PrefixConfig(init_text="summarize:"))


def test_bad_adapter_names() -> None:
    pm = _attach_two(tiny())
    with pytest.raises(PrefixTuneError, match="one per row"):
        pm(input_ids=IDS, adapter_names=["a"])
    with pytest.raises(PrefixTuneError, match="unknown adapter names"):
        pm(input_ids=IDS, adapter_names=["a", "nope"])
    with pytest.raises(PrefixTuneError, match="not a string"):
        pm(input_ids=IDS, adapter_names="a")
    for bad in ["../x", "v1.2", "training", "forward", "cuda"]:  # torch refuses '.' and attribute names as modules
        with pytest.raises(PrefixTuneError, match="invalid adapter name"):
            pm.add_adapter(bad, PrefixConfig())
        assert bad not in pm.adapter_names
    with pytest.raises(PrefixTuneError, match="already exists"):
        pm.add_adapter("a", PrefixConfig())
    # a failed call leaves nothing selected: the next call gets exactly what it asks for
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=IDS[:1], adapter_names=[BASE]).logits, pm.base_model(IDS[:1]).logits)


def test_bad_configs() -> None:
    with pytest.raises(PrefixTuneError):
        PrefixConfig(num_virtual_tokens=-1)
    with pytest.raises(PrefixTuneError):
        PrefixConfig(init="zeros")  # type: ignore[arg-type]
    with pytest.raises(PrefixTuneError, match="unknown prefix config fields"):
        PrefixConfig.from_dict({"num_virtual_tokens": 3, "lenght": 2})


def test_model_without_attention_interface_is_refused() -> None:
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(PrefixTuneError, match="MambaForCausalLM"):
        prefixtune.attach(model, PrefixConfig(num_virtual_tokens=2))


def test_detach_restores_the_base_model() -> None:
    base = tiny(attn="eager")
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
    pm = _attach_two(base)
    assert base.config._attn_implementation == "prefixtune_eager"
    back = pm.detach()
    assert back is base and base.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=IDS).logits, plain, rtol=0, atol=0)


def test_mask_is_widened_once_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    import prefixtune.prefix as attention

    pm = _attach_two(tiny("llama-gqa"))
    calls = []
    widen = attention._widen_mask
    monkeypatch.setattr(attention, "_widen_mask", lambda *a, **k: calls.append(1) or widen(*a, **k))
    pm(input_ids=IDS, adapter_names=["a", "b"])
    assert len(calls) == 1  # not once per layer
    calls.clear()
    pm.generate(input_ids=IDS[:1], adapter_names=["a"], max_new_tokens=3, do_sample=False)
    assert not calls  # fully visible: a lower-right causal prompt, then decode steps with no mask at all
