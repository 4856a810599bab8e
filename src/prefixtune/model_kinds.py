"""What kind of model a transformers config describes: encoder-only (classifies with a head), encoder-decoder
(seq2seq), or a decoder; and the messages for the kinds a command cannot use. Reads configs only."""

from __future__ import annotations

from typing import Any

from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from .errors import PrefixTuneError

# ----- which models classify with a head ----------------------------------------------------------------------


def is_encoder_config(config: Any) -> bool:
    """Encoder-only (bidirectional, no generation): BERT, RoBERTa, MiniLM, DeBERTa, ... (a masked-LM family that
    is neither an encoder-decoder nor configured as a decoder, nor saved as a causal or seq2seq LM)."""
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        return False
    generates = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
    if any(str(a).endswith(generates) for a in getattr(config, "architectures", None) or []):
        return False
    return getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES and config.model_type != "reformer"


def uses_head(config: Any) -> bool:
    """Whether `--task classify` trains a head for this model: encoders, and models saved as sequence classifiers."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    saved = getattr(config, "architectures", None) or []
    return is_encoder_config(config) or any(str(a).endswith("ForSequenceClassification") for a in saved)


def is_seq2seq_config(config: Any) -> bool:
    """An encoder-decoder (BART, T5, Pegasus, ...): loads as AutoModelForSeq2SeqLM."""
    return bool(getattr(config, "is_encoder_decoder", False))


def seq2seq_not_in_cli(name: str, config: Any) -> PrefixTuneError:
    kind = (getattr(config, "architectures", None) or [getattr(config, "model_type", "?")])[0]
    return PrefixTuneError(
        f"{name} is an encoder-decoder (seq2seq) model ({kind}); the command line trains, scores and generates with "
        "decoder-only and encoder models only: train it from Python with prefixtune.attach on "
        "AutoModelForSeq2SeqLM (docs/seq2seq.md)"
    )


def encoder_cannot_generate(name: str, config: Any) -> PrefixTuneError:
    kind = (getattr(config, "architectures", None) or [getattr(config, "model_type", "?")])[0]
    return PrefixTuneError(
        f"{name} is an encoder-only model ({kind}): it cannot generate text; train and evaluate it with "
        "--task classify (a prefix plus a classifier head, P-tuning v2)"
    )
