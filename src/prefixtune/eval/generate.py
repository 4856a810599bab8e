"""Batched text generation for `prefixtune eval`, `generate`, the demo and `compare`.

`model` is anything with the transformers `forward`/`generate` signature: a plain causal LM (the untuned
baseline) or a trained method's model. Generated text is cut at the first newline for every model alike: the
targets are one line, and an untuned model would otherwise be charged for rambling past the answer. Chat examples
(conversations) are not cut: their answers may span lines and end at the template's end-of-turn token, where
generation stops (as it does at the EOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from .. import data
from ..devices import input_device
from .objective import pad_token_id


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
    raw: bool = False,
) -> list[str]:
    """Batched generation (left padding, length-bucketed); returns one text per source, in order.

    The prompt format is plain, or `chat_template`, or `raw` (texts as they are); conversations use the chat
    template whatever the format."""
    prompts, _ = data.encode_prompts(
        sources, tokenizer, max_source_length=max_source_length, chat_template=chat_template and not raw, raw=raw
    )
    conversational = any(isinstance(s, data.Example) and s.messages is not None for s in sources)
    first_line = first_line and not conversational  # chat answers may span lines; they end at the end of turn
    stop = data.stop_ids(tokenizer, chat_template or conversational)
    outputs: list[str] = [""] * len(prompts)
    model.eval()
    pad_id = pad_token_id(tokenizer)
    groups = data.prompt_batches(prompts, batch_size, pad_id=pad_id)
    device = input_device(model)  # the model's (its first layers' under device_map="auto")
    for indices, batch in tqdm(groups, desc="generate", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        kwargs: dict[str, Any] = dict(
            batch,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=do_sample,
            pad_token_id=pad_id,
            eos_token_id=stop if len(stop) > 1 else tokenizer.eos_token_id,
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
