"""The KV-cache keyword: we pass and read the name the installed transformers uses (`cache` from 5.24 on).

transformers 5.24 renamed `past_key_values` to `cache` and warns (FutureWarning) when the old name is passed.
Our forward, generate and serving calls must cause no such warning, and the position pre-hook must find the
cache under whichever name the model receives it, so decoding with a PEFT-convention prefix keeps its positions.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers

import prefixtune
from prefixtune import PrefixConfig
from prefixtune.cache_argument import cache_argument, cache_from, output_cache
from prefixtune.serve.batch import RunningBatch
from tiny import ARCHITECTURES, tiny
from tiny_seq2seq import tiny_seq2seq

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "bart", "t5"])
def test_the_name_we_pass_is_the_one_the_model_takes(arch: str) -> None:
    model = tiny_seq2seq(arch) if arch in ("bart", "t5") else tiny(arch)
    name = cache_argument(type(model))
    assert name in inspect.signature(type(model).forward).parameters
    renamed = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 24)
    assert name == ("cache" if renamed else "past_key_values")


def test_cache_is_found_under_either_name() -> None:
    assert cache_from({"cache": "a"}) == "a" and cache_from({"past_key_values": "b"}) == "b"
    assert cache_from({"cache": None, "past_key_values": "b"}) == "b" and cache_from({}) is None


def _no_cache_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "past_key_values" in str(w.message) or "`cache`" in str(w.message)]


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2"])
def test_our_calls_cause_no_cache_deprecation_warning(arch: str) -> None:
    pm = prefixtune.attach(tiny(arch), PrefixConfig(num_virtual_tokens=3, init="random"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = pm(input_ids=IDS, use_cache=True)
        assert output_cache(out).get_seq_length() == IDS.shape[1]
        pm.generate(input_ids=IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
        batch = RunningBatch(pm)
        batch.prefill([[5, 6, 7]], ["default"])
        batch.step(torch.tensor([8]))
    assert _no_cache_warnings(record) == []


def test_decoding_keeps_prefix_positions_under_the_new_name() -> None:
    """The pre-hook shifts positions by P during generation too, which needs the cache's length: greedy decoding
    with the cache equals decoding by recomputing the whole sequence each step."""
    pm = prefixtune.attach(tiny("llama-gqa"), PrefixConfig(num_virtual_tokens=4, init="random"))
    generated = pm.generate(input_ids=IDS, max_new_tokens=6, do_sample=False, pad_token_id=0)
    sequence = IDS
    with torch.no_grad():
        for _ in range(6):
            step = pm(input_ids=sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, step], dim=1)
    assert torch.equal(generated, sequence)
