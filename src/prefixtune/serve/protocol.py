"""The OpenAI-compatible request bodies (validated by pydantic) and the JSON we answer with."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, field_validator


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


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text]

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        return value


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


def completion_choice(index: int, text: str, finish_reason: str | None, chat: bool, chunk: bool) -> dict[str, Any]:
    """One choice of a completion (chat or not), whole or as a streamed chunk."""
    if not chat:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if chunk:
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason}


def envelope(
    id: str, model: str, chat: bool, chunk: bool, choices: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    kind = ("chat.completion" if chat else "text_completion") + (".chunk" if chat and chunk else "")
    return {"id": id, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}
