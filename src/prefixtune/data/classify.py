"""Examples -> token ids for a model that classifies with a head (`--task classify` on an encoder, P-tuning v2).

Batches keep the layout of every other training batch (data.batches pads them, tasks.merge mixes tasks):
`input_ids` are the tokenizer's own encoding of the source ([CLS] text [SEP]), and `labels` is -100 except at
position `LABEL_POSITION` (1), which holds the class id. Position 1 because the trainer counts target tokens as
`labels[:, 1:] != -100`: every example then counts once, and token-weighted means become means over examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .. import data  # the package's own names (Example, EncodedExample, ...); this module is not one of them
from ..errors import PrefixTuneError

LABEL_POSITION = 1


def example_label(example: data.Example) -> str | None:
    """The class of an example: its `label` (BIG-bench target_scores, a `label` field), else its target text."""
    return example.label if example.label is not None else example.target


def encode_classes(
    examples: Sequence[data.Example], tokenizer: Any, label_ids: dict[str, int], *, max_length: int
) -> tuple[list[data.EncodedExample], data.EncodeStats]:
    """The tokenizer's encoding of each source (special tokens included, cut at `max_length` and at the
    tokenizer's own limit), its class id at `LABEL_POSITION` of `labels` (see the module docstring)."""
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
        if len(ids) <= LABEL_POSITION:
            raise PrefixTuneError(f"example {index}: the tokenizer encodes {example.source!r} as fewer than 2 tokens")
        labels = [data.IGNORE_INDEX] * len(ids)
        labels[LABEL_POSITION] = label_ids[label]
        encoded.append(data.EncodedExample(ids, labels, len(ids), index))
    return encoded, stats
