"""A tiny GPT-2-style byte-level BPE tokenizer trained in the test (no downloads): any text encodes."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "name: Blue Spice, eatType: coffee shop, area: city centre",
    "A coffee shop in the city centre area called Blue Spice.",
    "The Golden Curry is a family friendly restaurant near the river.",
    "Output: positive negative neutral ambivalent",
    "the cat sat on the mat and the dog ran in the park",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(vocab_size: int = 300, chat: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE (ids 0..2 are <pad>, <eos>, <bos>); it never adds BOS on its own, like GPT-2."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
