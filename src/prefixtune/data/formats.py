"""The prompt format an adapter was trained with, as saved in its adapter_config.json ("prefixtune.prompt_format").

    {"type": "plain", "template": "{input}\\nOutput:", "answer_prefix": " "}     the tokenizer's BOS (if it adds one),
                                                                                the input, "\\nOutput:"; answers
                                                                                start with a space, end with EOS
    {"type": "chat_template", "end_of_turn": "<|im_end|>"}                        the input as one user turn of the
                                                                                tokenizer's chat template with its
                                                                                generation prompt; answers end with
                                                                                the end-of-turn token
    "raw" (never saved; a CLI/server choice)                                    the input as it is

Training writes it (from `chat_template` and the data: conversational records are always chat_template); `generate`,
`eval` and `serve` read it; an explicit option (`--prompt-format`, `--chat-template`, `--raw`) wins; adapters saved
before the field existed read as None, and callers then use the plain format as they always did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import PrefixTuneError
from . import chat
from .prompts import SEPARATOR, TARGET_PREFIX

PLAIN, CHAT_TEMPLATE, RAW = "plain", "chat_template", "raw"
FORMATS = (PLAIN, CHAT_TEMPLATE, RAW)
PLAIN_TEMPLATE = "{input}" + SEPARATOR


@dataclass(frozen=True)
class PromptFormat:
    type: str  # plain | chat_template | raw

    def __post_init__(self) -> None:
        if self.type not in FORMATS:
            raise PrefixTuneError(f"unknown prompt format {self.type!r}; use one of {', '.join(FORMATS)}")

    @property
    def chat_template(self) -> bool:
        return self.type == CHAT_TEMPLATE

    @property
    def raw(self) -> bool:
        return self.type == RAW

    def to_dict(self, tokenizer: Any = None) -> dict[str, Any]:
        """What is saved (and shown in /v1/models): the type and what a client needs to build the same prompt."""
        if self.type == PLAIN:
            return {"type": PLAIN, "template": PLAIN_TEMPLATE, "answer_prefix": TARGET_PREFIX}
        if self.type == CHAT_TEMPLATE:
            described: dict[str, Any] = {"type": CHAT_TEMPLATE}
            if tokenizer is not None:
                try:
                    described["end_of_turn"] = tokenizer.convert_ids_to_tokens(chat.end_of_turn_id(tokenizer))
                except PrefixTuneError:
                    described["end_of_turn"] = None
            return described
        return {"type": RAW}

    @classmethod
    def from_saved(cls, value: Any, where: str) -> PromptFormat:
        """The saved field -> a format; our error for one this version cannot apply."""
        kind = value.get("type") if isinstance(value, dict) else value
        if kind not in (PLAIN, CHAT_TEMPLATE):
            raise PrefixTuneError(
                f"{where}: prefixtune.prompt_format {value!r} is not a format this version applies "
                f"({PLAIN}, {CHAT_TEMPLATE}); give the format explicitly with --prompt-format"
            )
        if kind == PLAIN and isinstance(value, dict) and value.get("template", PLAIN_TEMPLATE) != PLAIN_TEMPLATE:
            raise PrefixTuneError(
                f"{where}: the adapter's plain template {value.get('template')!r} differs from {PLAIN_TEMPLATE!r}; "
                "give the format explicitly with --prompt-format (raw, and format the prompts yourself)"
            )
        return cls(kind)


def trained_format(chat_template: bool, examples: Any) -> PromptFormat:
    """The format a run trains in: chat_template when asked for or when any example is a conversation."""
    conversational = any(getattr(e, "messages", None) is not None for e in examples)
    return PromptFormat(CHAT_TEMPLATE if chat_template or conversational else PLAIN)
