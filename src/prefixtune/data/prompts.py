"""Examples -> token ids, in the prompt format that training and generation share.

    plain:          [BOS if the tokenizer adds one] source "\\nOutput:" | " " target EOS
    chat_template:  the tokenizer's chat template with the source as the user turn and the generation
                    prompt added                                      | target EOS

Everything left of "|" is the prompt; its tokens get label -100 (no loss). The separator "\\nOutput:" is
fixed text the prefix learns to answer after; the target is tokenized on its own, so the label boundary is exact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import PrefixTuneError
from .records import Example

SEPARATOR = "\nOutput:"
TARGET_PREFIX = " "  # plain format: the target starts after one space ("Output: Blue Spice is ...")
IGNORE_INDEX = -100
log = logging.getLogger("prefixtune")
_CHAT_SLOT = "\ue000"  # a private-use character stands in for the source when the chat template is rendered


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX over the prompt, the target ids (ending in EOS unless cut) after it
    prompt_length: int
    index: int  # position in the list given to encode


@dataclass
class EncodeStats:
    """What tokenization did; `truncated` counts examples that lost any token. Callers must report it."""

    examples: int = 0
    truncated: int = 0
    source_truncated: int = 0
    target_truncated: int = 0  # lost the end of the target (and its EOS)
    longest: int = 0  # longest sequence before truncation, in tokens
    max_length: int | None = None

    def describe(self) -> str:
        if not self.truncated:
            return f"{self.examples} examples, none truncated (longest {self.longest} tokens)"
        return (
            f"{self.truncated} of {self.examples} examples truncated to max_length={self.max_length} "
            f"({self.source_truncated} sources cut at the end, {self.target_truncated} targets cut; "
            f"longest {self.longest} tokens)"
        )


class _PromptBuilder:
    """Token ids around the source: before + source + after, built once per tokenizer and format."""

    def __init__(self, tokenizer: Any, chat_template: bool) -> None:
        self.tokenizer = tokenizer
        if chat_template:
            if not getattr(tokenizer, "chat_template", None):
                raise PrefixTuneError("this tokenizer has no chat template; train and generate without chat_template")
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": _CHAT_SLOT}], tokenize=False, add_generation_prompt=True
            )
            if rendered.count(_CHAT_SLOT) != 1:
                raise PrefixTuneError("this tokenizer's chat template rewrites the message; use the plain format")
            before, after = rendered.split(_CHAT_SLOT)
            self.before, self.after = self._ids(before), self._ids(after)
            self.target_prefix = ""
        else:
            self.before, self.after = _leading_special_ids(tokenizer), self._ids(SEPARATOR)
            self.target_prefix = TARGET_PREFIX

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def source_ids(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

    @property
    def overhead(self) -> int:
        return len(self.before) + len(self.after)


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before text on its own (a BOS for Llama-2 style models, nothing for GPT-2)."""
    with_special = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def _as_example(item: Example | str) -> Example:
    return Example(item, None) if isinstance(item, str) else item


def encode(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    max_length: int,
    max_source_length: int | None = None,
    chat_template: bool = False,
    label_words: dict[str, str] | None = None,
) -> tuple[list[EncodedExample], EncodeStats]:
    """Token ids and labels for training or perplexity: prompt masked with -100, target then EOS scored.

    Truncation is explicit and counted in the returned stats (and logged): the source is first cut to
    `max_source_length`; if prompt + target + EOS still exceeds `max_length`, the target keeps what the prompt
    leaves but at least half of `max_length` (cut at its end, losing EOS), and the source's end is cut to fit.
    `label_words` maps classification labels to the words trained on (default: the label itself).
    """
    if tokenizer.eos_token_id is None:
        raise PrefixTuneError("the tokenizer has no EOS token; set tokenizer.eos_token")
    builder = _PromptBuilder(tokenizer, chat_template)
    if max_length < builder.overhead + 2:
        raise PrefixTuneError(f"max_length={max_length} is too small for the prompt format ({builder.overhead} tokens)")
    targets = [_target_text(e, i, label_words) for i, e in enumerate(examples)]
    source_ids = builder.source_ids([e.source for e in examples])
    target_ids = builder.source_ids([builder.target_prefix + t for t in targets])
    stats = EncodeStats(examples=len(examples), max_length=max_length)
    encoded = []
    for index, (source, target) in enumerate(zip(source_ids, target_ids)):
        target = target + [tokenizer.eos_token_id]
        stats.longest = max(stats.longest, builder.overhead + len(source) + len(target))
        cut_source = cut_target = False
        if max_source_length is not None and len(source) > max_source_length:
            source, cut_source = source[:max_source_length], True
        if builder.overhead + len(source) + len(target) > max_length:
            target_budget = max(max_length - builder.overhead - len(source), max_length // 2)
            if len(target) > target_budget:
                target, cut_target = target[:target_budget], True
            room = max_length - builder.overhead - len(target)
            if len(source) > room:
                source, cut_source = source[: max(room, 0)], True
        prompt = builder.before + source + builder.after
        encoded.append(EncodedExample(prompt + target, [IGNORE_INDEX] * len(prompt) + target, len(prompt), index))
        stats.source_truncated += cut_source
        stats.target_truncated += cut_target
        stats.truncated += cut_source or cut_target
    if stats.truncated:
        log.warning("prefixtune: %s", stats.describe())
    return encoded, stats


def encode_prompts(
    examples: Sequence[Example | str],
    tokenizer: Any,
    *,
    max_source_length: int | None = None,
    chat_template: bool = False,
) -> tuple[list[list[int]], EncodeStats]:
    """Prompt ids for generation, built exactly as `encode` builds them for training (source cut at its end)."""
    builder = _PromptBuilder(tokenizer, chat_template)
    items = [_as_example(e) for e in examples]
    stats = EncodeStats(examples=len(items), max_length=max_source_length)
    prompts = []
    for source in builder.source_ids([e.source for e in items]):
        stats.longest = max(stats.longest, builder.overhead + len(source))
        if max_source_length is not None and len(source) > max_source_length:
            source = source[:max_source_length]
            stats.truncated += 1
            stats.source_truncated += 1
        prompts.append(builder.before + source + builder.after)
    if stats.truncated:
        log.warning("prefixtune: %s", stats.describe())
    return prompts, stats


def _target_text(example: Example, index: int, label_words: dict[str, str] | None) -> str:
    if example.label is not None and label_words is not None:
        if example.label not in label_words:
            raise PrefixTuneError(f"example {index}: label {example.label!r} has no entry in label_words")
        return label_words[example.label]
    if example.target is None:
        raise PrefixTuneError(f"example {index} has no target; training and perplexity need one")
    return example.target


# ----- batching -----------------------------------------------------------------------------------------------


