"""prefix-memory (the decoupled prefix of PrefixMemory-Tuning): phi(q) M_h added to every head's attention output."""

from __future__ import annotations

import pytest
import torch
from test_methods import batch, tiny_gpt2, tiny_llama, train_steps
from torch.nn import functional as F
from transformers import LlamaForCausalLM

from prefixtune import PrefixTuneError
from prefixtune.methods.memory import PrefixMemoryModel
from prefixtune.methods.registry import build_method, detect_method, load_trained, make_config


def llama_with_biases(seed: int = 0) -> LlamaForCausalLM:
    """attention_bias=True gives o_proj a bias, which the memory's term must not add a second time."""
    model = tiny_llama(seed, num_hidden_layers=2, attention_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:  # transformers initializes biases to zero, which would hide a second one
            torch.nn.init.normal_(layer.self_attn.o_proj.bias)
    return model


def inputs() -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch().items() if k != "labels"}


def test_starts_as_the_base_model_and_detaches_cleanly() -> None:
    base = tiny_llama()
    with torch.no_grad():
        expected = base(**inputs()).logits
        wrapped = build_method("prefix-memory", base)
        assert isinstance(wrapped, PrefixMemoryModel)
        torch.testing.assert_close(wrapped(**inputs()).logits, expected, atol=0, rtol=0)  # M starts at zero
        torch.nn.init.normal_(wrapped.memory[1])
        assert not torch.allclose(wrapped(**inputs()).logits, expected)
        wrapped.detach()
        torch.testing.assert_close(base(**inputs()).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_the_term_is_phi_of_the_query_times_the_memory_before_o_proj(feature_map: str, normalize: bool) -> None:
    """Reference: the term from a query recomputed with q_proj from the attention module's own input, added to
    o_proj's input (the heads' attention outputs). Equal only if ours takes the query the model computed, lines the
    heads up and adds the term once, inside o_proj (its bias counted once)."""
    torch.manual_seed(1)
    memories = [torch.randn(4, 8, 8) * 0.3 for _ in range(2)]
    reference_model = llama_with_biases()
    hooks = []
    for layer, memory in zip(reference_model.model.layers, memories):
        attention = layer.self_attn
        seen: dict[str, torch.Tensor] = {}

        def keep(module, args, kwargs, seen=seen):
            seen["h"] = kwargs["hidden_states"]

        def add(module, args, seen=seen, attention=attention, memory=memory):
            q = attention.q_proj(seen["h"]).view(*seen["h"].shape[:-1], 4, 8)
            phi = F.elu(q) + 1 if feature_map == "elu" else F.relu(q)
            if normalize:
                phi = phi / phi.sum(-1, keepdim=True).clamp_min(1e-6)
            term = torch.einsum("bthd,hde->bthe", phi, memory).flatten(-2)
            return (args[0] + term,)

        hooks.append(attention.register_forward_pre_hook(keep, with_kwargs=True))
        hooks.append(attention.o_proj.register_forward_pre_hook(add))
    with torch.no_grad():
        expected = reference_model(**inputs()).logits
        ours = build_method("prefix-memory", llama_with_biases(), {"feature_map": feature_map, "normalize": normalize})
        for param, memory in zip(ours.memory, memories):
            param.copy_(memory)
        torch.testing.assert_close(ours(**inputs()).logits, expected, atol=1e-5, rtol=0)


def test_trains_only_the_memory_saves_loads_and_generates_as_without_cache(tmp_path) -> None:
    model = build_method("prefix-memory", tiny_llama())
    assert [tuple(p.shape) for p in model.trainable_parameters()] == [(4, 8, 8)] * 3  # (H, D, D) per layer
    losses = train_steps(model, 8, 1e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    model(**batch()).loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == name.startswith("memory."), name
    with torch.no_grad():
        before = model(**inputs()).logits
    model.save_trained(tmp_path / "out")
    assert detect_method(tmp_path / "out") == "prefix-memory"
    loaded = load_trained(tiny_llama(), tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, before, atol=1e-6, rtol=0)
    cached = loaded.generate(**inputs(), max_new_tokens=5, do_sample=False, pad_token_id=0)
    uncached = loaded.generate(**inputs(), max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False)
    assert cached.shape == (2, 15) and torch.equal(cached, uncached)


def test_bad_models_options_and_files_are_clear_errors(tmp_path) -> None:
    with pytest.raises(PrefixTuneError, match="q_proj and o_proj"):
        build_method("prefix-memory", tiny_gpt2())  # GPT-2's fused c_attn
    with pytest.raises(PrefixTuneError, match="feature_map must be one of"):
        make_config("prefix-memory", {"feature_map": "softmax"})
    with pytest.raises(PrefixTuneError, match="normalize must be true or false"):
        make_config("prefix-memory", {"normalize": "yes"})
    with pytest.raises(PrefixTuneError, match="r does not apply to method 'prefix-memory'"):
        make_config("prefix-memory", {"r": 8})
    build_method("prefix-memory", tiny_llama()).save_trained(tmp_path / "m")
    with pytest.raises(PrefixTuneError, match="does not fit"):
        load_trained(llama_with_biases(), tmp_path / "m")  # 2 layers, not 3
    (tmp_path / "m" / "prefix_memory.safetensors").unlink()
    with pytest.raises(PrefixTuneError, match="prefix_memory.safetensors missing"):
        load_trained(tiny_llama(), tmp_path / "m")
