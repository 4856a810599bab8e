"""Library functions behind `prefixtune eval` and `prefixtune generate`: load a model with its trained methods,
score it on a data set, answer prompts. The CLI only parses arguments and prints."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from transformers import TextStreamer

from . import data, peft_format
from .atomic import atomic_write_bytes
from .data.classify import example_label
from .devices import Placement, input_device, resolve_placement
from .errors import PrefixTuneError
from .eval import evaluate, generate_texts, is_sequence_classifier, predict, saved_labels, wants_classify
from .methods.registry import detect_method, load_trained
from .model import BASE, load_adapter
from .models import load_model

BUILTIN_TEST_SPLIT = ("e2e", "xsum", "multiemo")  # built-in sets are scored on their test split by default


def load_for_inference(
    model_name: str,
    adapter: str | None,
    force: bool = False,
    labels: list[str] | None = None,
    placement: Placement | None = None,
) -> tuple[Any, Any]:
    """The model with its trained method (any method's directory; none for the untuned model), and its tokenizer.

    Classifier adapters bring their labels: an encoder loads with one output each; without an adapter, `labels`
    (the eval data's) give an encoder its untrained head. The base loads on the placement's device and in its
    dtype (default: `resolve_placement(None, None)`); a trained method's own weights keep their float32.
    """
    if adapter is not None:
        labels = saved_labels([adapter]) or labels
    base, tokenizer = _load_base(model_name, labels, placement)
    if adapter is None:
        return base, tokenizer
    if force and detect_method(adapter) == "prefix":
        return load_adapter(base, adapter, force=True), tokenizer
    return load_trained(base, adapter), tokenizer


def evaluate_on_data(
    model_name: str,
    adapter: str | None,
    data_spec: str,
    *,
    split: str | None = None,
    task: str | None = None,
    metrics: str | None = None,
    limit: int | None = None,
    force: bool = False,
    predictions_path: str | None = None,
    data_dir: str | None = None,
    source_field: str | None = None,
    target_field: str | None = None,
    progress: bool = False,
    prompt_format: str | None = None,
    placement: Placement | None = None,
    **generation: Any,
) -> dict[str, Any]:
    """Score a model (with `adapter`, or untuned) on a data set; the result is what `prefixtune eval` prints.

    `generation`: max_length, max_new_tokens, batch_size, chat_template, num_beams (as `evaluate.evaluate`).
    The prompt format is `prompt_format` ("plain" or "chat_template") or `chat_template=True` when given, else the
    one the adapter was trained with (its prefixtune.prompt_format), else plain. Chat records always use the chat
    template.
    """
    placement = placement or resolve_placement(None, None)
    if split is None and data_spec in BUILTIN_TEST_SPLIT:
        split = "test"
    explicit = prompt_format or (data.CHAT_TEMPLATE if generation.pop("chat_template", False) else None)
    chosen = choose_format(explicit, saved_format(adapter) if adapter else None)
    if chosen.raw:
        raise PrefixTuneError("eval scores prompts in a trained format: use --prompt-format plain or chat_template")
    generation["chat_template"] = chosen.chat_template
    examples = data.load_dataset(
        data_spec, split=split, data_dir=data_dir, source_field=source_field, target_field=target_field, limit=limit
    )[:limit]
    wants = data_spec == "multiemo" or wants_classify(model_name, adapter)
    task = task or ("classify" if wants else "generate")
    labels = sorted({str(example_label(e)) for e in examples}) if task == "classify" else None
    if task == "classify" and not adapter:
        torch.manual_seed(0)  # an encoder's untrained head: the one a seed-0 training run starts from
    model, tokenizer = load_for_inference(model_name, adapter, force, labels, placement)
    default = "accuracy,macro_f1" if is_sequence_classifier(model) else "bleu,rouge"
    names = [m.strip() for m in (metrics or default).split(",") if m.strip()]
    scores, predicted = evaluate(
        model, tokenizer, examples, metric_names=names, task=task, progress=progress, **generation
    )
    if predictions_path:
        lines = [
            json.dumps({"source": e.source, "prediction": p, "references": e.references or [e.target]})
            for e, p in zip(examples, predicted)
        ]
        atomic_write_bytes(predictions_path, ("\n".join(lines) + "\n").encode())
    shown = data.CHAT_TEMPLATE if any(e.messages is not None for e in examples) else chosen.type
    return {
        "model": model_name,
        "adapter": adapter,
        "data": data_spec,
        "split": split,
        "prompt_format": shown,
        **scores,
    }


def saved_format(adapter_dir: str) -> data.PromptFormat | None:
    """The prompt format an adapter was trained with, or None (saved before the field existed, or by PEFT)."""
    try:
        saved = peft_format.read_prompt_format(adapter_dir)
    except PrefixTuneError:  # no readable adapter_config.json: the method's loader reports what is wrong
        return None
    return None if saved is None else data.PromptFormat.from_saved(saved, adapter_dir)


def choose_format(explicit: str | None, saved: data.PromptFormat | None) -> data.PromptFormat:
    """An explicit choice wins, then the adapter's own format, then plain (what adapters without one used)."""
    if explicit is not None:
        return data.PromptFormat(explicit)
    return saved or data.PromptFormat(data.PLAIN)


def adapter_formats(
    adapter_specs: Sequence[str], names: Sequence[str], explicit: str | None
) -> dict[str, data.PromptFormat]:
    """The prompt format of each loaded adapter (by name) and of the base model's rows (BASE)."""
    formats = {BASE: choose_format(explicit, None)}
    for spec, name in zip(adapter_specs, names):
        path = spec.partition("=")[2] if "=" in spec else spec
        formats[name] = choose_format(explicit, saved_format(path))
    return formats


def load_with_adapters(
    model_name: str, adapter_specs: Sequence[str], placement: Placement | None = None
) -> tuple[Any, Any, list[str]]:
    """The model with prefixes from `[NAME=]DIR` specs, its tokenizer, and the adapter names in order."""
    paths = [spec.partition("=")[2] or spec for spec in adapter_specs]
    base, tokenizer = _load_base(model_name, saved_labels(paths), placement)  # classifier adapters' labels
    model: Any = base
    names: list[str] = []
    for spec in adapter_specs:
        name, sep, path = spec.partition("=")
        model = load_adapter(model, path, name=name) if sep else load_adapter(model, spec)
        names.append(model.adapter_names[-1])
    model.eval()  # generate/serve never train: no dropout, on the base model or any prefix
    return model, tokenizer, names


def _load_base(model_name: str, labels: list[str] | None, placement: Placement | None) -> tuple[Any, Any]:
    """The base model for eval/generate on its placement; encoder-decoders are refused (decoder-only prompts)."""
    placement = placement or resolve_placement(None, None)
    return load_model(
        model_name,
        labels=labels,
        dtype=placement.dtype,
        device=placement.device,
        device_map=placement.device_map,
        allow_seq2seq=False,
    )


def route_lines(lines: Sequence[str], names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Lines of an input file -> (prompts, adapter per prompt): 'NAME<TAB>text' picks a loaded adapter."""
    prompts, chosen = [], []
    for number, line in enumerate(lines, 1):
        name, tab, text = line.partition("\t")
        if tab and names:
            if name not in names and name != BASE:
                raise PrefixTuneError(f"line {number}: adapter {name!r} was not loaded (loaded: {list(names)})")
            chosen.append(name)
            prompts.append(text)
        else:
            chosen.append(names[0] if names else BASE)
            prompts.append(line)
    return prompts, chosen


def answer_prompts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    adapter_names: Sequence[str] | None,
    formats: Sequence[data.PromptFormat] | None = None,
    **generation: Any,
) -> list[str]:
    """One output per prompt: the predicted label for a classifier, else the generated text (greedy, beam or
    sampled as `generation` says: batch_size, max_new_tokens, chat_template, num_beams, do_sample, ...).
    `formats` (one per prompt) overrides `chat_template`: prompts of each format are generated together."""
    if is_sequence_classifier(model):
        outputs, _ = predict(
            model, tokenizer, list(prompts), adapter_names=adapter_names, batch_size=generation.get("batch_size", 8)
        )
        return list(outputs)
    if formats is None:
        return generate_texts(
            model, tokenizer, list(prompts), adapter_names=adapter_names, first_line=False, **generation
        )
    outputs = [""] * len(prompts)
    for chosen in dict.fromkeys(formats):
        rows = [i for i, f in enumerate(formats) if f == chosen]
        generation.update(chat_template=chosen.chat_template, raw=chosen.raw)
        texts = generate_texts(
            model,
            tokenizer,
            [prompts[i] for i in rows],
            adapter_names=[adapter_names[i] for i in rows] if adapter_names is not None else None,
            first_line=False,
            **generation,
        )
        for i, text in zip(rows, texts):
            outputs[i] = text
    return outputs


def stream_prompt(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    raw: bool,
    chat_template: bool,
    max_new_tokens: int,
    num_beams: int,
    sample: bool,
    temperature: float,
    top_p: float,
) -> None:
    """Generate for one prompt, printing tokens as they come (beam search prints the whole answer at the end)."""
    if raw:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    else:
        ids = torch.tensor(data.encode_prompts([prompt], tokenizer, chat_template=chat_template)[0])
    ids = ids.to(input_device(model))
    kwargs: dict[str, Any] = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=data.stop_ids(tokenizer, chat_template),  # under the chat template: its end of turn too
    )
    if num_beams == 1:  # transformers streams greedy and sampled decoding only
        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    out = model.generate(**kwargs)
    if num_beams > 1:
        print(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
