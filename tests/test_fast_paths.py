"""The fast paths equal the general ones on every tested architecture.

1. A causal prefill with nothing masked and every prefix column visible hands SDPA the lower-right causal form
   (no dense mask), which must give the logits of the dense widened mask (`FAST_PATHS` off).
2. `generate` stores each layer's prefix once in front of its cache (decode_cache.py): its tokens and logits must
   equal a full forward over the whole sequence without a cache (the recomputed path), and the concatenating
   path's, greedy and sampled, with one adapter and with a mixed, left-padded batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch.nn.attention.bias import CausalBias

import prefixtune
import prefixtune.prefix as attention
from prefixtune import BASE, PrefixConfig, PrefixTuneError
from prefixtune.decode_cache import PrefixLayer
from tiny import ARCHITECTURES, attach_two, fast_paths_enabled, recomputed, tiny
from tiny_seq2seq import tiny_seq2seq

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
SEQ2SEQ = ["bart", "t5"]
SLIDING = ("mistral", "gemma3")


def _model(arch: str) -> torch.nn.Module:
    return tiny_seq2seq(arch) if arch in SEQ2SEQ else tiny(arch)


def _inputs(arch: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    if arch in SEQ2SEQ:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


@contextmanager
def kernel_masks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """The masks our SDPA attention calls hand to transformers' kernel, and dense widenings counted as 'dense'."""
    seen: list[object] = []
    kernel, widen = attention.sdpa_attention_forward, attention._widen_mask

    def recording_kernel(module, query, key, value, mask, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(mask)
        return kernel(module, query, key, value, mask, *args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", recording_kernel)
    monkeypatch.setattr(attention, "_widen_mask", lambda *a, **k: seen.append("dense") or widen(*a, **k))
    yield seen


@pytest.mark.parametrize("arch", [*ARCHITECTURES, *SEQ2SEQ])
def test_lower_right_prefill_equals_the_dense_mask(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pm = attach_two(_model(arch))
    # sliding-window models (window 4) pass no mask only while the sequence fits the window
    inputs = _inputs(arch, IDS[:, :3] if arch in SLIDING else IDS)
    with torch.no_grad():
        with kernel_masks(monkeypatch) as seen:
            fast = pm(**inputs, adapter_names=["a", "a"]).logits
        assert "dense" not in seen or arch == "t5"  # T5's position bias is added to a dense mask (sdpa needs one)
        if arch != "t5":
            assert any(isinstance(m, CausalBias) for m in seen), "no causal prefill took the lower-right form"
        with fast_paths_enabled(False):
            dense = pm(**inputs, adapter_names=["a", "a"]).logits
        torch.testing.assert_close(fast, dense, rtol=0, atol=1e-5)
        # mixed prefix lengths keep a dense mask, with the same logits as before
        with kernel_masks(monkeypatch) as seen:
            pm(**inputs, adapter_names=["a", "b"])
        assert "dense" in seen and not any(isinstance(m, CausalBias) for m in seen)
    if arch in SLIDING:  # longer than the window: the model's own mask, widened, equal either way
        with torch.no_grad():
            fast = pm(input_ids=IDS, adapter_names=["a", "a"]).logits
            with fast_paths_enabled(False):
                torch.testing.assert_close(fast, pm(input_ids=IDS, adapter_names=["a", "a"]).logits, rtol=0, atol=1e-5)


def test_padding_keeps_the_dense_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    pm = attach_two(tiny("llama-gqa"))
    mask = torch.ones_like(IDS)
    mask[0, :2] = 0
    with torch.no_grad(), kernel_masks(monkeypatch) as seen:
        pm(input_ids=IDS, attention_mask=mask, adapter_names=["a", "a"])
    assert "dense" in seen and not any(isinstance(m, CausalBias) for m in seen)


def test_eager_keeps_the_dense_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    pm = attach_two(tiny("llama-gqa", "eager"))
    calls = []
    widen = attention._widen_mask
    monkeypatch.setattr(attention, "_widen_mask", lambda *a, **k: calls.append(1) or widen(*a, **k))
    with torch.no_grad():
        pm(input_ids=IDS, adapter_names=["a", "a"])
    assert calls  # eager kernels add a tensor mask


def test_lower_right_gradients_equal_the_dense_mask() -> None:
    pm = attach_two(tiny("llama-gqa"))
    grads = []
    for fast in (True, False):
        pm.zero_grad()
        with fast_paths_enabled(fast):
            pm(input_ids=IDS, adapter_names=["a", "a"]).logits.square().mean().backward()
        grads.append(pm.adapters["a"].embedding.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def _check_generate(pm, ids, mask, names, **options) -> None:  # type: ignore[no-untyped-def]
    new = 6
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, output_logits=True, return_dict_in_generate=True)
    torch.manual_seed(3)
    out = pm.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kwargs, **options)
    with fast_paths_enabled(False):
        torch.manual_seed(3)
        copied = pm.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kwargs, **options)
    assert torch.equal(out.sequences, copied.sequences)
    with torch.no_grad():
        full = recomputed(pm, out.sequences, mask, names)
    start = ids.shape[1]
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, start + step - 1], rtol=0, atol=1e-5)
        torch.testing.assert_close(logits, copied.logits[step], rtol=0, atol=1e-5)
    if not options.get("do_sample"):
        assert torch.equal(out.sequences[:, start:], torch.stack([f.argmax(-1) for f in out.logits], dim=1))
    cache = out.past_key_values
    real = out.sequences.shape[1] - 1  # the last token is never fed back
    assert cache.get_seq_length() == real
    width = max(pm.adapters[n].config.num_virtual_tokens for n in names if n != BASE)
    stored = [layer for layer in cache.layers if isinstance(layer, PrefixLayer)]
    if any(type(layer).__name__ == "DynamicLayer" or isinstance(layer, PrefixLayer) for layer in cache.layers):
        assert stored, "no layer kept its prefix in the cache"
    for layer in stored:
        assert layer.keys.shape[2] == width + real and layer.get_seq_length() == real


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_generate_equals_the_recomputed_path(arch: str, sample: bool) -> None:
    pm = attach_two(tiny(arch))
    options = {"do_sample": True, "top_k": 0, "temperature": 1.0} if sample else {"do_sample": False}
    _check_generate(pm, IDS[:1], None, ["a"], **options)
    # mixed adapters (different lengths, a row without a prefix), left padding
    ids = torch.cat([IDS, IDS[:1]])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :3] = 0
    _check_generate(pm, ids, mask, ["a", "b", BASE], **options)


def test_sliding_window_layers_keep_the_copy_path() -> None:
    pm = attach_two(tiny("mistral"))
    out = pm.generate(input_ids=IDS[:1], max_new_tokens=3, return_dict_in_generate=True, adapter_names=["a"])
    assert not any(isinstance(layer, PrefixLayer) for layer in out.past_key_values.layers)


def test_beam_search_reorders_the_stored_prefix() -> None:
    pm = attach_two(tiny("llama-gqa"))
    ids = torch.cat([IDS, IDS[:1]])
    kwargs = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    fast = pm.generate(input_ids=ids, adapter_names=["a", "b", BASE], **kwargs)
    with fast_paths_enabled(False):
        copied = pm.generate(input_ids=ids, adapter_names=["a", "b", BASE], **kwargs)
    assert torch.equal(fast, copied)


def test_a_cache_passed_in_takes_the_copy_path() -> None:
    from transformers import DynamicCache

    pm = attach_two(tiny("llama-gqa"))
    cache = DynamicCache()
    out = pm.generate(input_ids=IDS[:1], past_key_values=cache, max_new_tokens=3, adapter_names=["a"])
    assert not any(isinstance(layer, PrefixLayer) for layer in cache.layers)
    assert cache.get_seq_length() == out.shape[1] - 1


def test_a_returned_cache_continues_in_a_later_call() -> None:
    pm = attach_two(tiny("llama-gqa"))
    out = pm.generate(input_ids=IDS[:1], max_new_tokens=3, return_dict_in_generate=True, adapter_names=["a"])
    cache = out.past_key_values
    assert any(isinstance(layer, PrefixLayer) for layer in cache.layers)
    seen = cache.get_seq_length()
    with torch.no_grad():
        step = pm(input_ids=out.sequences[:, seen:], past_key_values=cache, adapter_names=["a"]).logits[:, -1]
        full = pm(input_ids=out.sequences, adapter_names=["a"], use_cache=False).logits[:, -1]
        torch.testing.assert_close(step, full, rtol=0, atol=1e-5)
        with pytest.raises(PrefixTuneError, match="prefix columns"):  # adapter b's prefix is 5 wide, the cache's 3
            pm(input_ids=out.sequences[:, -1:], past_key_values=cache, adapter_names=["b"])


@pytest.mark.parametrize("implementation", ["flex_attention", "flash_attention_2"])
def test_unsupported_attention_is_refused_in_one_line(implementation: str) -> None:
    model = tiny("llama-gqa")
    model.config._attn_implementation = implementation  # set_attn_implementation checks that the package exists
    with pytest.raises(PrefixTuneError) as raised:
        prefixtune.attach(model, PrefixConfig(num_virtual_tokens=2, init="random"))
    assert "\n" not in str(raised.value) and "sdpa" in str(raised.value)
