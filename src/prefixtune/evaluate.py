"""Generation and scoring for `prefixtune eval`, the demo, `compare` and validation during training.

`model` is anything with the transformers `forward`/`generate` signature: a plain causal LM (the untuned
baseline) or a trained method's model. Generated text is cut at the first newline for every model alike: the
targets are one line, and an untuned model would otherwise be charged for rambling past the answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from . import classify, data, metrics
from .errors import PrefixTuneError

GENERATION_METRICS = ("bleu", "rouge")
ALL_METRICS = ("bleu", "rouge", "accuracy", "perplexity")


@torch.no_grad()
def generate_texts(
    model: Any,
    tokenizer: Any,
    sources: Sequence[data.Example | str],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    chat_template: bool = False,
    max_source_length: int | None = None,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    adapter_names: Sequence[str] | None = None,
    progress: bool = False,
    first_line: bool = True,
) -> list[str]:
    """Batched generation (left padding, length-bucketed); returns one text per source, in order."""
    prompts, _ = data.encode_prompts(
        sources, tokenizer, max_source_length=max_source_length, chat_template=chat_template
    )
    outputs: list[str] = [""] * len(prompts)
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    groups = data.prompt_batches(prompts, batch_size, pad_id=pad_id)
    for indices, batch in tqdm(groups, desc="generate", disable=not progress, leave=False):
        kwargs: dict[str, Any] = dict(
            batch,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=do_sample,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        if first_line:  # the answer ends at its first line break: stop there instead of rambling to the limit
            kwargs["stopping_criteria"] = StoppingCriteriaList([_FirstLineDone(tokenizer, batch["input_ids"].shape[1])])
        if adapter_names is not None:
            kwargs["adapter_names"] = [adapter_names[i] for i in indices]
        out = model.generate(**kwargs)
        new = out[:, batch["input_ids"].shape[1] :]
        for row, i in enumerate(indices):
            text = tokenizer.decode(new[row], skip_special_tokens=True)
            outputs[i] = (text.strip().split("\n")[0] if first_line else text).strip()
    return outputs


class _FirstLineDone(StoppingCriteria):
    """A row is done once its new text, leading whitespace aside, holds a line break (what we keep ends there)."""

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([t.lstrip() != "" and "\n" in t.lstrip() for t in texts], device=input_ids.device)


@torch.no_grad()
def target_nll(
    model: Any,
    tokenizer: Any,
    examples: Sequence[data.Example],
    *,
    max_length: int,
    batch_size: int = 8,
    chat_template: bool = False,
) -> tuple[float, int]:
    """Summed negative log-likelihood of the target tokens (EOS included) and their count.

    A sequence classifier: the summed cross-entropy of the examples' classes and the number of examples.
    """
    if classify.is_sequence_classifier(model):
        return classify.target_nll(model, tokenizer, examples, max_length=max_length, batch_size=batch_size)
    encoded, _ = data.encode(
        data.training_pairs(examples), tokenizer, max_length=max_length, chat_template=chat_template
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count = 0.0, 0
    model.eval()
    for batch in data.batches(encoded, batch_size, shuffle=False, pad_id=pad_id):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="sum", ignore_index=data.IGNORE_INDEX
        )
        total += float(nll)
        count += int((labels != data.IGNORE_INDEX).sum())
    return total, count


@torch.no_grad()
def most_likely_labels(
    model: Any,
    tokenizer: Any,
    examples: Sequence[data.Example],
    labels: Sequence[str],
    *,
    max_length: int,
    chat_template: bool = False,
    batch_size: int = 8,
) -> list[str]:
    """For each example, the label whose word (plus EOS) the model finds most likely after the prompt."""
    candidates = [data.Example(e.source, label) for e in examples for label in labels]
    encoded, _ = data.encode(candidates, tokenizer, max_length=max_length, chat_template=chat_template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = torch.empty(len(encoded))
    model.eval()
    order = [e.index for e in encoded]
    groups = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    position = 0
    for group in groups:
        batch = data.batches(group, len(group), shuffle=False, bucket_by_length=False, pad_id=pad_id)[0]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = batch["labels"][:, 1:]
        mask = target != data.IGNORE_INDEX
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores[position : position + len(group)] = (picked * mask).sum(-1)
        position += len(group)
    by_example = torch.empty(len(encoded))
    by_example[torch.tensor(order)] = scores
    best = by_example.view(len(examples), len(labels)).argmax(-1)
    return [labels[i] for i in best.tolist()]


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[data.Example],
    *,
    metric_names: Sequence[str],
    task: str = "generate",
    labels: Sequence[str] | None = None,
    max_length: int = 256,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat_template: bool = False,
    num_beams: int = 1,
    progress: bool = False,
) -> tuple[dict[str, float], list[str]]:
    """Scores (BLEU/ROUGE 0-100, accuracy 0-1, perplexity) and the generated predictions.

    A sequence classifier (an encoder with a head) is scored by its head: accuracy, macro_f1, loss (classify.py).
    """
    if classify.is_sequence_classifier(model):
        return classify.evaluate(
            model, tokenizer, examples, metric_names=metric_names, max_length=max_length, batch_size=batch_size
        )
    unknown = sorted(set(metric_names) - set(ALL_METRICS))
    if unknown:
        raise PrefixTuneError(f"unknown metrics {unknown}; choose from {', '.join(ALL_METRICS)}")
    if not examples:
        raise PrefixTuneError("no examples to evaluate")
    scores: dict[str, float] = {"examples": float(len(examples))}
    predictions: list[str] = []
    if task == "classify" or "accuracy" in metric_names:
        gold = [e.label if e.label is not None else e.target for e in examples]
        if any(g is None for g in gold):
            raise PrefixTuneError("accuracy needs a label (or target) on every example")
        label_set = list(labels) if labels else sorted({str(g) for g in gold})
        predictions = most_likely_labels(
            model,
            tokenizer,
            examples,
            label_set,
            max_length=max_length,
            chat_template=chat_template,
            batch_size=batch_size,
        )
        scores["accuracy"] = metrics.accuracy(predictions, [str(g) for g in gold])
        generated = generate_texts(
            model,
            tokenizer,
            examples,
            batch_size=batch_size,
            max_new_tokens=8,
            chat_template=chat_template,
            max_source_length=max_length,
            progress=progress,
        )
        scores["accuracy_generated"] = metrics.accuracy(generated, [str(g) for g in gold])
    if any(m in metric_names for m in GENERATION_METRICS):
        predictions = generate_texts(
            model,
            tokenizer,
            examples,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            chat_template=chat_template,
            max_source_length=max_length,
            num_beams=num_beams,
            progress=progress,
        )
        refs = [e.references or ([e.target] if e.target else []) for e in examples]
        if "bleu" in metric_names:
            scores["bleu"] = metrics.bleu(predictions, refs)
        if "rouge" in metric_names:
            scores.update({k: v for k, v in metrics.rouge(predictions, refs).items()})
    if "perplexity" in metric_names:
        nll, count = target_nll(
            model, tokenizer, examples, max_length=max_length, batch_size=batch_size, chat_template=chat_template
        )
        scores["perplexity"] = metrics.perplexity(nll, count)
        scores["loss"] = nll / max(count, 1)
    return {
        k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in scores.items()
    }, predictions
