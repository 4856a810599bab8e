"""Tiny random decoders built from configs, one per architecture family (no downloads)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import transformers as tf

VOCAB = 96


def _llama() -> tf.PreTrainedModel:
    return tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    )


def _gpt2() -> tf.PreTrainedModel:
    return tf.GPT2LMHeadModel(
        tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=1)
    )


def _qwen2() -> tf.PreTrainedModel:
    return tf.Qwen2ForCausalLM(
        tf.Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    )


def _qwen3() -> tf.PreTrainedModel:
    return tf.Qwen3ForCausalLM(
        tf.Qwen3Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            head_dim=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    )


def _mistral() -> tf.PreTrainedModel:
    return tf.MistralForCausalLM(
        tf.MistralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=128,
            sliding_window=4,
        )
    )


def _gemma3() -> tf.PreTrainedModel:
    # head_dim 24 != hidden/heads (32/4); layers alternate sliding (window 4) and full attention
    return tf.Gemma3ForCausalLM(
        tf.Gemma3TextConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            head_dim=24,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    )


def _gpt_neox() -> tf.PreTrainedModel:
    return tf.GPTNeoXForCausalLM(
        tf.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            rotary_pct=0.5,
        )
    )


def _phi3() -> tf.PreTrainedModel:
    return tf.Phi3ForCausalLM(
        tf.Phi3Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


ARCHITECTURES: dict[str, Callable[[], tf.PreTrainedModel]] = {
    "gpt2": _gpt2,
    "llama-gqa": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma3": _gemma3,
    "gpt-neox": _gpt_neox,
    "phi3": _phi3,
}


def tiny(arch: str = "llama-gqa", attn: str = "sdpa", seed: int = 0) -> tf.PreTrainedModel:
    """A tiny random model in eval mode, float32, with the given stock attention kernel."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch]().eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = 0
    return model


def attach_two(model: tf.PreTrainedModel) -> Any:
    """Adapter "a" (3 virtual tokens, MLP) and "b" (5, direct), random init: the fast-path checks' pair
    (tests/test_fast_paths.py and bench/gpu_check.py)."""
    import prefixtune

    torch.manual_seed(1)
    pm = prefixtune.attach(model, prefixtune.PrefixConfig(num_virtual_tokens=3, init="random"), name="a")
    pm.add_adapter("b", prefixtune.PrefixConfig(num_virtual_tokens=5, reparameterize=False, init="random"))
    return pm


def recomputed(pm: Any, sequences: torch.Tensor, mask: torch.Tensor | None, names: list[str]) -> torch.Tensor:
    """Logits at every position of the whole sequence, one forward, no cache (what `generate` must match);
    `mask` covers the prompt, left padding included, and positions follow it as generate's do."""
    if mask is None:
        return pm(input_ids=sequences, adapter_names=names, use_cache=False).logits
    full_mask = torch.cat([mask, torch.ones_like(sequences[:, mask.shape[1] :])], dim=1)
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)  # generate's, for left padding
    return pm(
        input_ids=sequences, attention_mask=full_mask, position_ids=positions, adapter_names=names, use_cache=False
    ).logits


@contextmanager
def fast_paths_enabled(on: bool) -> Iterator[None]:
    """prefixtune's fast paths on or off (off: the general dense-mask and copying paths they must equal)."""
    import prefixtune.prefix as attention

    token = attention.FAST_PATHS.set(on)
    try:
        yield
    finally:
        attention.FAST_PATHS.reset(token)
