"""Classification with a trainable head: `--task classify` for encoder-only models (P-tuning v2).

Decoders classify by label words (the label is the target text; evaluate.most_likely_labels scores them). An
encoder (BERT, RoBERTa, MiniLM) cannot generate, so `--task classify` loads it as a sequence classifier
(`AutoModelForSequenceClassification`) with one output per label: the distinct labels of the training data,
sorted, as `id2label`. A model saved as `...ForSequenceClassification` (a decoder classifier too) is loaded the
same way. The prefix trains together with the adapter's own copy of the classifier head (`PrefixConfig.head`,
methods/head.py) on the cross-entropy of the head's logits; the adapter records the label names
(`prefixtune.labels` in adapter_config.json), so `eval` and `generate` map class ids back to labels.

Batches keep the trainer's layout (data.batches pads them, tasks.merge mixes tasks): `input_ids` are the
tokenizer's own encoding of the source ([CLS] text [SEP]), and `labels` is -100 except at position 1, which holds
the class id. Position 1 because the trainer counts target tokens as `labels[:, 1:] != -100`: every example then
counts once, and its token-weighted means become means over examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import data
from .errors import PrefixTuneError

METRICS = ("accuracy", "macro_f1", "loss")
# P-tuning v2 (Liu et al. 2022) trains BERT/RoBERTa prefixes with a fresh classifier head at 5e-3..1e-2.
DEFAULT_LR = 5e-3
_LABEL_POSITION = 1


# ----- which models classify with a head ----------------------------------------------------------------------


def is_encoder_config(config: Any) -> bool:
    """Encoder-only (bidirectional, no generation): BERT, RoBERTa, MiniLM, DeBERTa, ... (a masked-LM family that
    is neither an encoder-decoder nor configured as a decoder, nor saved as a causal or seq2seq LM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

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


def encoder_cannot_generate(name: str, config: Any) -> PrefixTuneError:
    kind = (getattr(config, "architectures", None) or [getattr(config, "model_type", "?")])[0]
    return PrefixTuneError(
        f"{name} is an encoder-only model ({kind}): it cannot generate text; train and evaluate it with "
        "--task classify (a prefix plus a classifier head, P-tuning v2)"
    )


def base_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a trainer wrapper (DDP's .module) and a PrefixModel."""
    from .model import PrefixModel

    for _ in range(3):
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module):
            model = inner
        if isinstance(model, PrefixModel):
            model = model.base_model
    return model


def is_sequence_classifier(model: Any) -> bool:
    """Whether `model` (bare, a PrefixModel or wrapped for training) outputs one logit per class per example."""
    return isinstance(model, nn.Module) and type(base_of(model)).__name__.endswith("ForSequenceClassification")


def model_labels(model: nn.Module) -> list[str]:
    """The class names of the base model's outputs, in id order (its config's id2label)."""
    config = base_of(model).config
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[i]) for i in range(config.num_labels)]


def example_label(example: data.Example) -> str | None:
    """The class of an example: its `label` (BIG-bench target_scores, a `label` field), else its target text."""
    return example.label if example.label is not None else example.target


# ----- loading for training, eval and generate ----------------------------------------------------------------


def training_labels(cfg: Any, task_data: Sequence[Any]) -> list[str] | None:
    """The sorted distinct labels of the training examples of every task (None unless `cfg.task` is classify)."""
    if cfg.task != "classify":
        return None
    found = {example_label(e) for t in task_data for e in t.train}
    return sorted(x for x in found if x is not None) or None


def load_for_training(cfg: Any, task_data: Sequence[Any]) -> tuple[Any, Any]:
    """The model for a training run: with `--task classify`, an encoder comes with one output per label."""
    from .models import load_model

    return load_model(cfg.model, labels=training_labels(cfg, task_data))


def check_training(cfg: Any, task_data: Sequence[Any], model: nn.Module) -> None:
    """Refuse what a head classifier cannot train; name the classes of a model given with default names.

    A model passed in by the API with transformers' default names (LABEL_0, ...) and as many outputs as the data
    has labels gets the data's labels, sorted.
    """
    if not is_sequence_classifier(model):
        return
    name = cfg.model
    if cfg.task != "classify":
        raise PrefixTuneError(f"{name} is a sequence classifier: train it with --task classify")
    if cfg.method != "prefix":
        raise PrefixTuneError(
            f"{name} classifies with a head; --method {cfg.method} would not train it. "
            "Use --method prefix (a prefix plus the classifier head, P-tuning v2)"
        )
    missing = [e for t in task_data for e in t.train if example_label(e) is None]
    if missing:
        raise PrefixTuneError(f"{len(missing)} training examples have no label (or target) to classify")
    wanted = sorted({str(example_label(e)) for t in task_data for e in t.train})
    base = base_of(model)
    have = model_labels(base)
    if have == [f"LABEL_{i}" for i in range(len(have))] and len(have) == len(wanted):
        base.config.id2label = dict(enumerate(wanted))
        base.config.label2id = {label: i for i, label in enumerate(wanted)}
        have = wanted
    if len(have) < 2:
        raise PrefixTuneError(f"classification needs at least two labels; the training data has only {wanted}")
    parts = (("training", [e for t in task_data for e in t.train]), ("validation", _validation(task_data)))
    for part, examples in parts:
        unknown = sorted({str(example_label(e)) for e in examples} - set(have))
        if unknown:
            raise PrefixTuneError(
                f"the {part} data has labels {unknown} that the classifier's {len(have)} outputs {have} do not name"
                + (" (labels come from the training split only)" if part == "validation" else "")
            )


def _validation(task_data: Sequence[Any]) -> list[data.Example]:
    return [e for t in task_data for e in t.validation]


def saved_labels(adapters: Sequence[str | Any]) -> list[str] | None:
    """The labels recorded in saved prefix adapters (the first that has them), to load their base model with.

    Unreadable directories give None here; loading the adapter reports them.
    """
    import json
    from pathlib import Path

    found: list[list[str]] = []
    for directory in adapters:
        try:
            raw = json.loads((Path(directory) / "adapter_config.json").read_text())
            labels = raw["prefixtune"]["labels"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels):
            found.append(labels)
    if any(len(labels) != len(found[0]) for labels in found):
        raise PrefixTuneError(
            f"these adapters classify into different numbers of labels ({', '.join(str(len(x)) for x in found)}); "
            "load classifiers with the same number of labels together"
        )
    return found[0] if found else None


def wants_classify(model_name: str, adapter: str | None) -> bool:
    """Whether eval should classify without being told: the model is an encoder, or the adapter holds labels."""
    from .models import is_encoder_model

    return (adapter is not None and saved_labels([adapter]) is not None) or is_encoder_model(model_name)


def default_lr(model: nn.Module, fallback: float) -> float:
    """The learning rate when none is given: P-tuning v2's for a prefix with a classifier head."""
    return DEFAULT_LR if is_sequence_classifier(model) else fallback


# ----- encoding and losses ------------------------------------------------------------------------------------


def encode(
    examples: Sequence[data.Example], tokenizer: Any, label_ids: dict[str, int], *, max_length: int
) -> tuple[list[data.EncodedExample], data.EncodeStats]:
    """The tokenizer's encoding of each source (special tokens included, cut at `max_length`), class id at
    position 1 of `labels` (see the module docstring)."""
    limit = max_length
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 1 < model_max < 100_000:
        limit = min(limit, model_max)
    texts = [e.source for e in examples]
    full = tokenizer(texts, verbose=False)["input_ids"] if texts else []  # cut below, and counted
    stats = data.EncodeStats(examples=len(examples), max_length=limit)
    encoded = []
    for index, (example, ids) in enumerate(zip(examples, full)):
        label = example_label(example)
        if label is None:
            raise PrefixTuneError(f"example {index} has no label (or target) to classify")
        if label not in label_ids:
            raise PrefixTuneError(
                f"example {index}: label {label!r} is not one of the classifier's labels {sorted(label_ids)}"
            )
        stats.longest = max(stats.longest, len(ids))
        if len(ids) > limit:
            ids = tokenizer(example.source, truncation=True, max_length=limit)["input_ids"]
            stats.truncated += 1
            stats.source_truncated += 1
        ids = list(ids)
        if len(ids) <= _LABEL_POSITION:
            raise PrefixTuneError(f"example {index}: the tokenizer encodes {example.source!r} as fewer than 2 tokens")
        labels = [data.IGNORE_INDEX] * len(ids)
        labels[_LABEL_POSITION] = label_ids[label]
        encoded.append(data.EncodedExample(ids, labels, len(ids), index))
    return encoded, stats


def encode_for(
    model: Any,
    examples: Sequence[data.Example],
    tokenizer: Any,
    *,
    max_length: int,
    chat_template: bool = False,
) -> tuple[list[data.EncodedExample], data.EncodeStats]:
    """Training encoding for `model`: data.encode (prompt + target tokens) unless it classifies with a head."""
    if not is_sequence_classifier(model):
        return data.encode(examples, tokenizer, max_length=max_length, chat_template=chat_template)
    if chat_template:
        raise PrefixTuneError("chat_template does not apply to a sequence classifier (it reads the text as it is)")
    labels = model_labels(model)
    return encode(examples, tokenizer, {label: i for i, label in enumerate(labels)}, max_length=max_length)


def _logits(model: Any, batch: dict[str, torch.Tensor], adapter_names: Sequence[str] | None = None) -> torch.Tensor:
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if adapter_names is not None:
        kwargs["adapter_names"] = list(adapter_names)
    return model(**kwargs).logits.float()  # (B, C)


def row_nll(model: Any, batch: dict[str, torch.Tensor], adapter_names: Sequence[str] | None = None) -> torch.Tensor:
    """(B,) cross-entropy of each example's class under the head's logits."""
    target = batch["labels"][:, _LABEL_POSITION]
    return F.cross_entropy(_logits(model, batch, adapter_names), target, reduction="none")


def class_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch's examples."""
    return row_nll(model, batch).mean()


@torch.no_grad()
def target_nll(
    model: Any, tokenizer: Any, examples: Sequence[data.Example], *, max_length: int, batch_size: int = 8
) -> tuple[float, int]:
    """Summed cross-entropy of the examples' classes and the number of examples (validation during training)."""
    encoded, _ = encode_for(model, examples, tokenizer, max_length=max_length)
    total = 0.0
    model.eval()
    for batch in data.batches(encoded, batch_size, shuffle=False, pad_id=_pad_id(tokenizer)):
        total += float(row_nll(model, batch).sum())
    return total, len(encoded)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise PrefixTuneError("the tokenizer has no pad token; set tokenizer.pad_token")
    return int(pad)


# ----- prediction and scores ----------------------------------------------------------------------------------


def _row_labels(model: Any, names: Sequence[str]) -> list[list[str]]:
    """Each row's class names: its adapter's (as saved with it), else the base model's."""
    from .model import BASE, PrefixModel

    base = model_labels(model)
    if not isinstance(model, PrefixModel):
        return [base for _ in names]
    return [(model.label_names(n) if n != BASE else None) or base for n in names]


@torch.no_grad()
def predict(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    adapter_names: Sequence[str] | None = None,
    batch_size: int = 8,
    max_length: int = 256,
) -> tuple[list[str], torch.Tensor]:
    """The predicted label of each text (argmax of the head) and the logits (N, C), in order.

    `adapter_names`: one per text (a PrefixModel); default: its active adapter (or the bare model's head).
    """
    from .model import BASE, PrefixModel

    if not texts:
        return [], torch.empty(0)
    if adapter_names is None:
        active = model.active_adapter if isinstance(model, PrefixModel) else None
        adapter_names = [active or BASE] * len(texts)
    examples = [data.Example(t, None, label="?") for t in texts]
    encoded, _ = encode(examples, tokenizer, {"?": 0}, max_length=max_length)
    model.eval()
    logits = torch.empty(len(texts), base_of(model).config.num_labels)
    pad_id = _pad_id(tokenizer)
    order = list(range(len(encoded)))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = data.batches(
            [encoded[i] for i in rows], len(rows), shuffle=False, bucket_by_length=False, pad_id=pad_id
        )
        names = [adapter_names[i] for i in rows] if isinstance(model, PrefixModel) else None
        logits[rows] = _logits(model, batch[0], names).cpu()
    labels = _row_labels(model, adapter_names)
    return [labels[i][c] for i, c in enumerate(logits.argmax(-1).tolist())], logits


def macro_f1(predictions: Sequence[str], gold: Sequence[str]) -> float:
    """Mean F1 over the classes that occur in the gold labels or the predictions (scikit-learn's macro average)."""
    scores = []
    for c in sorted(set(gold) | set(predictions)):
        tp = sum(p == c and g == c for p, g in zip(predictions, gold))
        fp = sum(p == c and g != c for p, g in zip(predictions, gold))
        fn = sum(p != c and g == c for p, g in zip(predictions, gold))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[data.Example],
    *,
    metric_names: Sequence[str],
    max_length: int = 256,
    batch_size: int = 8,
) -> tuple[dict[str, float], list[str]]:
    """Accuracy (argmax of the head), macro-F1 and mean cross-entropy on labeled examples; and the predictions."""
    names = list(metric_names) or ["accuracy", "macro_f1"]
    wrong = [m for m in names if m not in METRICS]
    if wrong:
        raise PrefixTuneError(
            f"metrics {wrong} do not apply to a sequence classifier (it predicts labels, not text); "
            f"choose from {', '.join(METRICS)}"
        )
    if not examples:
        raise PrefixTuneError("no examples to evaluate")
    gold = [example_label(e) for e in examples]
    if any(g is None for g in gold):
        raise PrefixTuneError("classification needs a label (or target) on every example")
    from .model import PrefixModel

    known = (model.label_names() if isinstance(model, PrefixModel) and model.active_adapter else None) or model_labels(
        model
    )
    unknown = sorted({str(g) for g in gold} - set(known))
    if unknown:
        raise PrefixTuneError(
            f"the eval data has labels {unknown} that the classifier was not trained on (its labels: {known})"
        )
    predictions, logits = predict(
        model, tokenizer, [e.source for e in examples], batch_size=batch_size, max_length=max_length
    )
    gold_text = [str(g) for g in gold]
    scores: dict[str, float] = {"examples": float(len(examples))}
    if "accuracy" in names:
        scores["accuracy"] = sum(p == g for p, g in zip(predictions, gold_text)) / len(gold_text)
    if "macro_f1" in names:
        scores["macro_f1"] = macro_f1(predictions, gold_text)
    if "loss" in names:
        target = torch.tensor([known.index(g) for g in gold_text])
        scores["loss"] = float(F.cross_entropy(logits, target))
    return {k: (round(v, 4) if math.isfinite(v) else v) for k, v in scores.items()}, predictions
