"""Examples -> token ids, in the prompt format that training and generation share.

    plain:          [BOS if the tokenizer adds one] source "\\nOutput:" | " " target EOS
    chat_template:  the tokenizer's chat template with the source as the user turn and the generation
                    prompt added                                      | target END-OF-TURN (<|im_end|>, ...)
    chat examples:  the conversation rendered by the chat template; loss on its assistant turns (chat.py)

Everything left of "|" is the prompt; its tokens get label -100 (no loss). The separator "\\nOutput:" is
fixed text the prefix learns to answer after; the target is tokenized on its own, so the label boundary is exact.
Under the chat template an answer ends with the template's end-of-turn token, which is the EOS only where the
template ends turns with it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import PrefixTuneError
from . import chat
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
            try:
                self.end_id = chat.end_of_turn_id(tokenizer)
            except PrefixTuneError:  # a template that ends turns with plain text: answers end with the EOS
                self.end_id = tokenizer.eos_token_id
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
            self.end_id = tokenizer.eos_token_id

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
    conversations = [i for i, e in enumerate(examples) if e.messages is not None]
    if conversations:
        return _encode_mixed(
            examples, conversations, tokenizer, max_length, max_source_length, chat_template, label_words
        )
    builder = _PromptBuilder(tokenizer, chat_template)
    if max_length < builder.overhead + 2:
        raise PrefixTuneError(f"max_length={max_length} is too small for the prompt format ({builder.overhead} tokens)")
    targets = [_target_text(e, i, label_words) for i, e in enumerate(examples)]
    source_ids = builder.source_ids([e.source for e in examples])
    target_ids = builder.source_ids([builder.target_prefix + t for t in targets])
    stats = EncodeStats(examples=len(examples), max_length=max_length)
    encoded = []
    for index, (source, target) in enumerate(zip(source_ids, target_ids)):
        target = target + [builder.end_id]
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
    raw: bool = False,
) -> tuple[list[list[int]], EncodeStats]:
    """Prompt ids for generation, built exactly as `encode` builds them for training (source cut at its end).

    `raw`: texts as they are (with the tokenizer's own special tokens), no format; conversations still use the
    chat template."""
    items = [_as_example(e) for e in examples]
    stats = EncodeStats(examples=len(items), max_length=max_source_length)
    plain = [e for e in items if e.messages is None]
    builder = _PromptBuilder(tokenizer, chat_template) if plain else None
    if raw and builder is not None:
        builder.before, builder.after = [], []
        by_source = iter([list(tokenizer(e.source)["input_ids"]) for e in plain])
    else:
        by_source = iter(builder.source_ids([e.source for e in plain]) if builder else [])
    prompts = []
    for item in items:
        if item.messages is not None:  # a conversation: its context and the generation prompt, cut at the start
            ids = chat.prompt_ids(tokenizer, item.messages, item.where or "chat example")
            stats.longest = max(stats.longest, len(ids))
            if max_source_length is not None and len(ids) > max_source_length:
                ids = ids[-max_source_length:]
                stats.truncated += 1
                stats.source_truncated += 1
            prompts.append(ids)
            continue
        assert builder is not None
        source = next(by_source)
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


def _encode_mixed(
    examples: Sequence[Example],
    conversations: list[int],
    tokenizer: Any,
    max_length: int,
    max_source_length: int | None,
    chat_template: bool,
    label_words: dict[str, str] | None,
) -> tuple[list[EncodedExample], EncodeStats]:
    """Chat examples (whole conversations, cut at the end to max_length) and any plain ones, in order."""
    chosen = set(conversations)
    plain = [i for i in range(len(examples)) if i not in chosen]
    encoded: dict[int, EncodedExample] = {}
    stats = EncodeStats(examples=len(examples), max_length=max_length)
    if plain:
        done, plain_stats = encode(
            [examples[i] for i in plain],
            tokenizer,
            max_length=max_length,
            max_source_length=max_source_length,
            chat_template=chat_template,
            label_words=label_words,
        )
        for i, e in zip(plain, done):
            encoded[i] = EncodedExample(e.input_ids, e.labels, e.prompt_length, i)
        for name in ("truncated", "source_truncated", "target_truncated"):
            setattr(stats, name, getattr(plain_stats, name))
        stats.longest = plain_stats.longest
    cut = EncodeStats()
    first = examples[conversations[0]]
    chat.require_chat_template(tokenizer, first.where or f"example {conversations[0]}")
    end_of_turn = chat.end_of_turn_id(tokenizer, first.where or f"example {conversations[0]}")  # once per call
    for i in conversations:
        example = examples[i]
        if example.target is None:
            raise PrefixTuneError(f"example {i} has no target; training and perplexity need one")
        assert example.messages is not None
        messages = [*example.messages, {"role": "assistant", "content": example.target}]
        ids, labels, prompt_length = chat.conversation_ids(
            tokenizer, messages, example.loss_from, example.where or f"example {i}", end_of_turn
        )
        stats.longest = max(stats.longest, len(ids))
        if len(ids) > max_length:
            cut.truncated += 1
            cut.target_truncated += 1
            cut.source_truncated += prompt_length > max_length
            ids, labels = ids[:max_length], labels[:max_length]
        encoded[i] = EncodedExample(ids, labels, min(prompt_length, len(ids)), i)
    stats.truncated += cut.truncated
    stats.source_truncated += cut.source_truncated
    stats.target_truncated += cut.target_truncated
    if cut.truncated:
        log.warning("prefixtune: %s (conversations are cut at their end)", stats.describe())
    return [encoded[i] for i in range(len(examples))], stats


