"""Tiny random encoder-decoder and encoder models built from configs (no downloads)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf

VOCAB = 64
_BART_LIKE = dict(
    vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, init_std=0.2,
    pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
)
_T5_LIKE = dict(
    vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=1.5,
)

# name -> (model class, config class, config fields)
SEQ2SEQ: dict[str, tuple[type, type, dict]] = {
    "bart": (tf.BartForConditionalGeneration, tf.BartConfig, _BART_LIKE),
    "mbart": (tf.MBartForConditionalGeneration, tf.MBartConfig, _BART_LIKE),
    "pegasus": (tf.PegasusForConditionalGeneration, tf.PegasusConfig, _BART_LIKE),
    "t5": (tf.T5ForConditionalGeneration, tf.T5Config, _T5_LIKE),
    "mt5": (tf.MT5ForConditionalGeneration, tf.MT5Config, _T5_LIKE),
}

_BERT_LIKE = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=64, num_labels=3, initializer_range=0.2,
)
ENCODERS: dict[str, Callable[[], tf.PreTrainedModel]] = {
    "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**_BERT_LIKE)),
    "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**_BERT_LIKE, pad_token_id=1)),
}


def tiny_seq2seq(arch: str = "bart", attn: str = "sdpa", seed: int = 0, **overrides: int) -> tf.PreTrainedModel:
    """A tiny random encoder-decoder in eval mode, float32, with the given stock attention kernel."""
    model_class, config_class, fields = SEQ2SEQ[arch]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**fields, **overrides})).eval()
    model.set_attn_implementation(attn)
    return model


def tiny_encoder(arch: str = "bert", attn: str = "sdpa", seed: int = 0) -> tf.PreTrainedModel:
    """A tiny random sequence classifier (3 labels) in eval mode."""
    torch.manual_seed(seed)
    model = ENCODERS[arch]().eval()
    model.set_attn_implementation(attn)
    return model
