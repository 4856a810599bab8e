"""The OpenAI-compatible request bodies (validated by pydantic) and the JSON we answer with."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.status)


def error_body(message: str, type: str, param: str | None, code: int | str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value: str) -> str:
    """JSON can carry "\\ud800" (half of a UTF-16 pair): not text; the tokenizer and the UTF-8 answer would fail."""
    if _SURROGATE.search(value):
        raise ValueError("holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), which is not text")
    return value


def _path_text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("a path cannot hold a NUL character")
    return _text(value)


Text = Annotated[str, AfterValidator(_text)]
PathText = Annotated[str, AfterValidator(_path_text)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions. Unknown fields are ignored (as by vLLM)."""

    model_config = ConfigDict(extra="ignore")

    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: keep going after the end-of-sequence token

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


MAX_LOGPROBS = 20  # most alternatives listed per position (`logprobs`, `top_logprobs`), as vLLM's default
Prompt = str | list[int]  # one prompt: a text, or token ids


def _token_ids(value: list[Any], where: str) -> list[int]:
    for at, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(f"{where} holds {type(item).__name__} {item!r} at {at}: token ids are integers")
        if item < 0:
            raise ValueError(f"{where} holds token id {item} at {at}: token ids are 0 or more")
    return value


def _prompts(value: Any) -> list[Prompt]:
    """OpenAI's four prompt forms (a text, a list of texts, token ids, a list of token-id lists) -> the prompts."""
    if isinstance(value, str):
        return [_text(value)]
    if not isinstance(value, list) or not value:
        raise ValueError(
            "prompt must be a text, a non-empty list of texts, a list of token ids or a list of token-id lists"
        )
    kinds = {"text" if isinstance(v, str) else "token-id list" if isinstance(v, list) else "token id" for v in value}
    if len(kinds) > 1:
        raise ValueError(
            f"prompt mixes {' and '.join(sorted(kinds))}s: send texts only, token ids only, or token-id lists only"
        )
    if isinstance(value[0], str):
        return [_text(v) for v in value]
    if isinstance(value[0], list):
        return [_token_ids(v, f"prompt {i}") for i, v in enumerate(value)]
    return [_token_ids(value, "prompt")]


def _top_count(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
        raise ValueError(
            f"{name} is the number of most likely tokens to list at each position: an integer 0..{MAX_LOGPROBS}, "
            f"got {value!r}"
        )
    return value


class CompletionRequest(SamplingFields):
    prompt: list[Text | list[int]]  # normalized: one entry per prompt
    max_tokens: int | None = Field(None, ge=0)  # 0: no new tokens (scoring the prompt with echo and logprobs)
    echo: bool = False  # the prompt's text (and with logprobs, its tokens' log-probabilities) before the completion
    logprobs: int | None = None  # the log-probability of each token and of the `logprobs` likeliest ones
    return_tokens_as_token_ids: bool = False  # vLLM's extension: logprobs name tokens "token_id:ID", not by text
    # ours: how text prompts are formatted. "raw" (default, OpenAI's meaning): as sent; "adapter": the named
    # adapter's saved prompt format (raw where it has none); "plain" / "chat_template": that format
    prompt_format: Literal["raw", "adapter", "plain", "chat_template"] = "raw"

    @field_validator("prompt", mode="before")
    @classmethod
    def _some_prompt(cls, value: Any) -> list[Prompt]:
        return _prompts(value)

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs(cls, value: Any) -> int | None:
        return _top_count(value, "logprobs")

    @model_validator(mode="after")
    def _zero_tokens_score(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError(
                "max_tokens 0 generates nothing: it is for scoring a prompt with echo: true (and logprobs); "
                "otherwise ask for at least 1 token"
            )
        return self


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False  # the log-probability of each generated token
    top_logprobs: int | None = None  # with logprobs: also the `top_logprobs` likeliest tokens at each position

    @field_validator("top_logprobs", mode="before")
    @classmethod
    def _top_logprobs(cls, value: Any) -> int | None:
        return _top_count(value, "top_logprobs")

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a `prompt` (text) or chat `messages` (rendered with the chat template first)."""

    model_config = ConfigDict(extra="ignore")
    model: Text | None = None  # optional: an adapter's context limit for max_model_len; default the base model
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # default: True for a prompt (as completions do), False for messages
    add_generation_prompt: bool = True  # messages only
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt (a text) or messages (a chat), not both or neither")
        return self


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize: token ids -> text."""

    model_config = ConfigDict(extra="ignore")
    model: Text | None = None
    tokens: list[int]

    @field_validator("tokens", mode="before")
    @classmethod
    def _ids(cls, value: Any) -> list[int]:
        if not isinstance(value, list):
            raise ValueError("tokens must be a list of token ids")
        return _token_ids(value, "tokens")


class LoadAdapterRequest(BaseModel):
    """`name` (vLLM: `lora_name`) and an optional `path` (vLLM: `lora_path`), default ADAPTERS_DIR/name."""

    model_config = ConfigDict(extra="ignore")
    name: Text = Field(validation_alias=AliasChoices("name", "lora_name"))
    path: PathText | None = Field(None, validation_alias=AliasChoices("path", "lora_path"))


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Text = Field(validation_alias=AliasChoices("name", "lora_name"))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_choice(
    index: int, text: str, finish_reason: str | None, chat: bool, chunk: bool, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One choice of a completion (chat or not), whole or as a streamed chunk; `logprobs` already in its shape."""
    if not chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if chunk:
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def envelope(
    id: str, model: str, chat: bool, chunk: bool, choices: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    kind = ("chat.completion" if chat else "text_completion") + (".chunk" if chat and chunk else "")
    return {"id": id, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}
