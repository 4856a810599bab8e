"""Conversational records (TRL's formats) and their token ids under the tokenizer's chat template.

Two record forms, both TRL's conversational formats:
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}      loss on every assistant turn
    {"prompt": [messages...], "completion": [assistant messages...]}                loss on the completion only
An example keeps the conversation before its final answer (`Example.messages`), the index from which assistant
turns carry loss (`Example.loss_from`), and the final answer as its target and reference: evaluation prompts with
everything before the last assistant turn (plus the generation prompt) and scores the last answer.

Token ids come from rendering the conversation with `apply_chat_template` and tokenizing the text (no special
tokens added: templates write their own BOS). Assistant spans are found prefix by prefix: turn i starts where
the rendering of messages[:i] with the generation prompt ends and stops where messages[:i+1] ends. Both must be
prefixes of the whole conversation, as text and as token ids; a template that is not prefix-stable (one that
rewrites earlier turns, or whose tokens merge across a turn boundary) is refused. In a span, loss runs up to and
including the template's end-of-turn token (`<|im_end|>` for ChatML); what follows it (a newline) has none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import PrefixTuneError

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
_SLOT = "\ue000"  # a private-use character stands in for an answer when the template's turn ending is read


def is_conversation(value: Any) -> bool:
    """A list of message objects (TRL's conversational form), as opposed to a string."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def check_messages(value: Any, what: str, where: str, *, roles: tuple[str, ...] = ROLES) -> list[dict[str, str]]:
    """A validated list of {role, content} messages (extra keys dropped); our error naming `where` otherwise."""
    if not isinstance(value, list) or not value:
        raise PrefixTuneError(f"{where}: {what!r} must be a non-empty list of {{role, content}} messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise PrefixTuneError(f"{where}: {what}[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in roles:
            raise PrefixTuneError(
                f"{where}: {what}[{i}] has role {role!r}; use one of {', '.join(roles)} (fix or remove the record)"
            )
        if not isinstance(content, str):
            raise PrefixTuneError(
                f"{where}: {what}[{i}] ({role}) content must be a string, got {type(content).__name__}; "
                "give text (multimodal content parts are not supported)"
            )
        messages.append({"role": role, "content": content})
    return messages


@dataclass
class Conversation:
    """A chat record split for training and scoring: context, where loss starts, and the final answer."""

    context: list[dict[str, str]]  # every message before the final assistant turn
    answer: str  # the final assistant turn's content
    loss_from: int  # assistant turns of `context` at this index or later carry loss

    @property
    def source(self) -> str:
        """The context as one string: what splits, groups and prediction files see of the input."""
        return json.dumps(self.context, ensure_ascii=False)


def parse_messages(record: dict[str, Any], where: str) -> Conversation:
    """`{"messages": [...]}`: must hold an assistant turn and end with one; every assistant turn trains."""
    if "messages" not in record:
        raise PrefixTuneError(
            f"{where}: no 'messages' field (fields: {', '.join(record) or 'none'}); the file's first record has "
            "one, and every record must take the same form"
        )
    messages = check_messages(record["messages"], "messages", where)
    if not any(m["role"] == "assistant" for m in messages):
        raise PrefixTuneError(f"{where}: 'messages' has no assistant turn; there is nothing to learn or score")
    if messages[-1]["role"] != "assistant":
        raise PrefixTuneError(
            f"{where}: 'messages' ends with a {messages[-1]['role']} turn; end each conversation with the "
            "assistant's answer (drop the trailing turns)"
        )
    return Conversation(messages[:-1], messages[-1]["content"], 0)


def parse_prompt_completion(record: dict[str, Any], prompt_field: str, completion_field: str, where: str):
    """`{"prompt": [...], "completion": [...]}`: the completion's assistant turns train, the prompt's do not."""
    prompt = check_messages(record.get(prompt_field), prompt_field, where)
    if completion_field not in record:
        raise PrefixTuneError(f"{where}: no {completion_field!r} field (fields: {', '.join(record)})")
    completion = check_messages(record[completion_field], completion_field, where, roles=("assistant",))
    messages = prompt + completion
    return Conversation(messages[:-1], messages[-1]["content"], len(prompt))


# ----- token ids ------------------------------------------------------------------------------------------------


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return ids | {i for i, token in decoder.items() if getattr(token, "special", False)}


def end_of_turn_id(tokenizer: Any, where: str = "the tokenizer") -> int:
    """The token that ends an assistant turn under the chat template (ChatML: <|im_end|>; may be the EOS)."""
    require_chat_template(tokenizer, where)
    rendered = _render(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SLOT}], False)
    if rendered.count(_SLOT) != 1:
        raise PrefixTuneError(f"{where}: the chat template rewrites the assistant's message; use the plain format")
    tail = rendered.split(_SLOT)[1]
    special = _special_ids(tokenizer)
    found = next((i for i in _ids(tokenizer, tail) if i in special), None)
    if found is None:
        raise PrefixTuneError(
            f"{where}: the chat template ends an assistant turn with no special token ({tail!r}), so an answer's "
            "end cannot be learned; use a template with an end-of-turn token"
        )
    return found


def stop_ids(tokenizer: Any, chat: bool) -> list[int]:
    """The ids generation stops at: the EOS, and under the chat template its end-of-turn token too."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if chat:
        try:
            eot = end_of_turn_id(tokenizer)
        except PrefixTuneError:  # a template that ends turns with plain text: the EOS is all there is
            return ids
        ids += [eot] if eot not in ids else []
    return ids


def require_chat_template(tokenizer: Any, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise PrefixTuneError(
            f"{where}: chat data (or chat_template) needs a tokenizer with a chat template, and this one has none; "
            "use a chat/instruct model, set tokenizer.chat_template, or give `input`/`target` records"
        )


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, where: str = "") -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # templates raise what they refuse (jinja's TemplateError: roles that do not alternate)
        raise PrefixTuneError(f"{where or 'chat'}: the chat template refused this conversation: {e}") from None


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def prompt_ids(tokenizer: Any, context: list[dict[str, str]], where: str) -> list[int]:
    """The ids a model answers after: the context rendered with the generation prompt (what training saw)."""
    require_chat_template(tokenizer, where)
    return _ids(tokenizer, _render(tokenizer, context, True, where))


def conversation_ids(
    tokenizer: Any, messages: list[dict[str, str]], loss_from: int, where: str, end_of_turn: int | None = None
) -> tuple[list[int], list[int], int]:
    """(input ids, labels, prompt length) of a whole conversation; labels are -100 outside trained answers.

    The prompt length is where the final answer starts. Raises our error if the template is not prefix-stable.
    `end_of_turn`: the template's end-of-turn id when the caller has it (found here otherwise).
    """
    require_chat_template(tokenizer, where)
    eot = end_of_turn if end_of_turn is not None else end_of_turn_id(tokenizer, where)
    text = _render(tokenizer, messages, False, where)
    ids = _ids(tokenizer, text)
    labels = [IGNORE_INDEX] * len(ids)
    start = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, where)
        through = _render(tokenizer, messages[: i + 1], False, where)
        if not (text.startswith(through) and through.startswith(before)):
            raise PrefixTuneError(
                f"{where}: the chat template is not prefix-stable (turn {i} renders differently once later turns "
                "follow), so assistant turns cannot be located; use another template or the plain format"
            )
        before_ids, through_ids = _ids(tokenizer, before), _ids(tokenizer, through)
        if ids[: len(through_ids)] != through_ids or through_ids[: len(before_ids)] != before_ids:
            raise PrefixTuneError(
                f"{where}: tokens merge across a turn boundary of the chat template (turn {i}), so assistant "
                "tokens cannot be located exactly; use another template or the plain format"
            )
        start, end = len(before_ids), len(through_ids)
        if i >= loss_from:
            stop = next((j for j in range(start, end) if ids[j] == eot), end - 1)  # through its end-of-turn token
            labels[start : stop + 1] = ids[start : stop + 1]
    return ids, labels, start
