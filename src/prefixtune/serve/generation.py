"""One completion request over HTTP: prompt -> token ids -> scheduled rows -> JSON or server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .. import data
from ..errors import PrefixTuneError
from ..model import BASE
from .logprobs import TokenLogprob, chat_logprobs, completion_logprobs
from .metrics import LATENCY_BUCKETS, Metrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    completion_choice,
    envelope,
    error_body,
    new_id,
    usage,
)
from .registry import AdapterRegistry
from .sampling import SamplingParams
from .scheduler import Event, GenerationRequest, QueueFull, Scheduler
from .tokenization import HttpTokenizer

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


@dataclass
class ServerState:
    tokenizer: HttpTokenizer  # the HTTP side's own copy: handlers never wait on the model thread for it
    scheduler: Scheduler
    registry: AdapterRegistry
    metrics: Metrics


@dataclass
class Prompt:
    ids: list[int]
    text: str | None  # as sent; None for token ids (decoded only when echoed)


@dataclass
class LogprobRequest:
    """What a request asks for: k alternatives per position (None: no log-probabilities) and echo."""

    k: int | None
    echo: bool
    as_ids: bool  # vLLM's return_tokens_as_token_ids


def render_chat(tokenizer: HttpTokenizer, chat: list[ChatMessage], add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat template when it has one; otherwise plain `role: text` lines (then `assistant:`)."""
    messages = [{"role": m.role, "content": m.text()} for m in chat]
    if tokenizer.has_chat_template:
        try:
            return tokenizer.chat(messages, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # templates raise on what they refuse (e.g. roles that do not alternate)
            raise APIError(400, f"the model's chat template refused these messages: {exc}", param="messages") from None
    lines = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return lines + "assistant:" if add_generation_prompt else lines


def completion_format(state: ServerState, body: CompletionRequest, adapter: str) -> data.PromptFormat | None:
    """The format /v1/completions applies to text prompts (None: raw, as sent). See docs/serving.md."""
    if body.prompt_format == "raw":
        return None
    if body.prompt_format == "adapter":  # the adapter's own; raw for the base model and adapters without one
        return state.registry.prompt_format(adapter)
    return data.PromptFormat(body.prompt_format)


def prompts_of(
    state: ServerState, body: CompletionRequest | ChatCompletionRequest, adapter: str = BASE
) -> list[Prompt]:
    """The request's prompts as token ids: texts tokenized (with the tokenizer's special tokens) or, with a
    prompt_format, built as training built them; ids as sent."""
    if isinstance(body, ChatCompletionRequest):
        text = render_chat(state.tokenizer, body.messages)
        return [Prompt(state.tokenizer.encode(text, add_special_tokens=False), text)]
    chosen = completion_format(state, body, adapter)
    if chosen is None or chosen.raw:
        return [
            Prompt(state.tokenizer.encode(p), p) if isinstance(p, str) else Prompt(list(p), None) for p in body.prompt
        ]
    if any(not isinstance(p, str) for p in body.prompt):
        raise APIError(
            400,
            f"prompt_format {body.prompt_format!r} formats text prompts; send text, or token ids with prompt_format "
            "'raw' (the default)",
            param="prompt_format",
        )
    try:  # echo shows the formatted prompt: the text is decoded from the ids the model saw
        return [Prompt(state.tokenizer.formatted(str(p), chosen.chat_template), None) for p in body.prompt]
    except PrefixTuneError as exc:  # chat_template on a tokenizer without one
        raise APIError(400, str(exc), param="prompt_format") from None


def end_of_turn_ids(state: ServerState, body: CompletionRequest | ChatCompletionRequest, adapter: str) -> list[int]:
    """Token ids that end a row besides the EOS: the chat template's end of turn, for chat and chat-formatted
    completions (an adapter trained on the template learned to end its answer there)."""
    chat_like = isinstance(body, ChatCompletionRequest) or (
        (chosen := completion_format(state, body, adapter)) is not None and chosen.chat_template
    )
    eot = state.tokenizer.end_of_turn() if chat_like else None
    return [eot] if eot is not None else []


def check_tokens(ids: list[int], vocab_size: int, what: str, param: str) -> None:
    """Every id must have an embedding row: a 400 naming the first one that has none."""
    for at, token in enumerate(ids):
        if token >= vocab_size:
            raise APIError(
                400,
                f"{what} has token id {token} at position {at}, outside the model's vocabulary of {vocab_size} "
                f"(ids 0..{vocab_size - 1}); tokenize with this model's tokenizer (POST /tokenize)",
                param=param,
            )


def _check_prompts(prompts: list[Prompt], vocab_size: int, limit: int, asked: int | None, model: str) -> None:
    for i, prompt in enumerate(prompts):
        what = "the prompt" if len(prompts) == 1 else f"prompt {i}"
        if not prompt.ids:
            raise APIError(400, f"{what} is empty: send at least one token", param="prompt")
        check_tokens(prompt.ids, vocab_size, what, "prompt")
        if len(prompt.ids) >= limit:
            raise APIError(
                400, f"{what} has {len(prompt.ids)} tokens; {model!r} takes at most {limit - 1}", param="prompt"
            )
        if asked is not None and len(prompt.ids) + asked > limit:
            raise APIError(
                400,
                f"{what} ({len(prompt.ids)} tokens) plus max_tokens ({asked}) exceeds the context of {model!r} "
                f"({limit} tokens); lower max_tokens or shorten the prompt",
                param="max_tokens",
            )


async def complete(state: ServerState, body: CompletionRequest | ChatCompletionRequest, request: Request) -> Response:
    """One /v1/completions or /v1/chat/completions request: validated, queued, answered as JSON or events."""
    chat = isinstance(body, ChatCompletionRequest)
    started = time.perf_counter()
    adapter = state.registry.resolve(body.model)
    prompts = prompts_of(state, body, adapter)
    turn_ends = end_of_turn_ids(state, body, adapter)
    if len(prompts) * body.n > state.scheduler.max_queue:  # could never be queued at once: retrying cannot help
        raise APIError(
            400,
            f"{len(prompts)} prompts x n={body.n} asks for {len(prompts) * body.n} completions; this server queues "
            f"at most {state.scheduler.max_queue} (--max-queue): send fewer at a time",
            param="n" if body.n > 1 else "prompt",
        )
    limit = state.registry.context_limit(adapter)
    asked = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        asked = body.max_completion_tokens
    _check_prompts(prompts, state.scheduler.vocab_size, limit, asked, body.model)
    if isinstance(body, ChatCompletionRequest):
        wants = LogprobRequest((body.top_logprobs or 0) if body.logprobs else None, False, False)
    else:
        wants = LogprobRequest(body.logprobs, body.echo, body.return_tokens_as_token_ids)

    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    rows: list[GenerationRequest] = []
    for i, prompt in enumerate(prompts):
        default = COMPLETION_DEFAULT_MAX_TOKENS if not chat else limit - len(prompt.ids)
        for j in range(body.n):
            index = i * body.n + j
            params = SamplingParams(
                max_tokens=min(asked if asked is not None else default, limit - len(prompt.ids)),
                temperature=body.temperature,
                top_p=body.top_p,
                stop=list(body.stop or []),
                seed=None if body.seed is None else body.seed + index,
                ignore_eos=body.ignore_eos,
                stop_token_ids=turn_ends,
            )

            def on_event(event: Event, index: int = index) -> None:
                events.put_nowait((index, event))

            row = GenerationRequest(adapter, list(prompt.ids), params, on_event, loop, incremental=body.stream)
            row.logprobs = wants.k
            row.prompt_logprobs = wants.k if wants.echo else None
            rows.append(row)
    try:
        for row in rows:
            state.scheduler.submit(row)
    except QueueFull as exc:
        for row in rows:
            row.cancel()
        raise APIError(
            429, f"the server is busy: {exc}; retry shortly", type="rate_limit_error", headers={"Retry-After": "1"}
        ) from None
    state.metrics.inc("prefixtune_adapter_requests_total", model=body.model)

    reply = Reply(state, body, chat, rows, events, started, prompts, wants)
    if body.stream:
        return StreamingResponse(reply.stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await reply.collect(request)


class Reply:
    """Gathers the rows' events into one answer (JSON) or relays them as server-sent events."""

    def __init__(
        self,
        state: ServerState,
        body: CompletionRequest | ChatCompletionRequest,
        chat: bool,
        rows: list[GenerationRequest],
        events: asyncio.Queue[tuple[int, Event]],
        started: float,
        prompts: list[Prompt],
        wants: LogprobRequest,
    ) -> None:
        self.state, self.body, self.chat, self.rows = state, body, chat, rows
        self.events, self.started, self.prompts, self.wants = events, started, prompts, wants
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.completion_tokens = [0] * len(rows)
        self.offsets = [0] * len(rows)  # text_offset reached by each choice (streaming)
        self.echoed = [False] * len(rows)  # the prompt went out with the choice's first chunk

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) for r in self.rows[:: self.body.n])

    def _usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, sum(self.completion_tokens))

    def _finished(self) -> None:
        self.state.metrics.observe("prefixtune_request_seconds", time.perf_counter() - self.started, LATENCY_BUCKETS)

    def _token_text(self, token: int) -> str:
        return f"token_id:{token}" if self.wants.as_ids else self.state.tokenizer.token_text(token)

    def _echo(self, index: int) -> str:
        """Choice `index`'s prompt as text: as sent, or token ids decoded (special tokens kept)."""
        prompt = self.prompts[index // self.body.n]
        return prompt.text if prompt.text is not None else self.state.tokenizer.decode(prompt.ids)

    def _piece(self, index: int, text: str, entries: list[TokenLogprob]) -> tuple[str, dict[str, Any] | None]:
        """A choice's text and logprobs object for what just came (the prompt too on its first piece, if echoed)."""
        if self.wants.echo and not self.echoed[index]:
            self.echoed[index] = True
            text = self._echo(index) + text
        if self.wants.k is None:
            return text, None
        if self.chat:
            return text, chat_logprobs(entries, self.wants.k, self._token_text, self.state.tokenizer.token_bytes)
        logprobs, self.offsets[index] = completion_logprobs(
            entries, self.wants.k, self._token_text, self.offsets[index]
        )
        return text, logprobs

    async def collect(self, request: Request) -> Response:
        texts, reasons = [""] * len(self.rows), [None] * len(self.rows)
        entries: list[list[TokenLogprob]] = [[] for _ in self.rows]
        pending = len(self.rows)
        try:
            while pending:
                try:
                    index, event = await asyncio.wait_for(self.events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():  # nobody is waiting for the answer: free the rows
                        return Response(status_code=499)
                    continue
                if event.error:
                    raise APIError(500, event.error, type="server_error")
                texts[index] += event.text
                entries[index] += (event.prompt_logprobs or []) + event.logprobs
                self.completion_tokens[index] = event.completion_tokens
                if event.finish_reason:
                    reasons[index] = event.finish_reason
                    pending -= 1
        finally:
            for row in self.rows:
                row.cancel()  # a no-op for finished rows
        self._finished()
        choices = []
        for i, (text, reason) in enumerate(zip(texts, reasons)):
            text, logprobs = self._piece(i, text, entries[i])
            choices.append(completion_choice(i, text, reason, self.chat, chunk=False, logprobs=logprobs))
        return JSONResponse(envelope(self.id, self.body.model, self.chat, False, choices, usage=self._usage()))

    async def stream(self) -> AsyncIterator[str]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}
        pending = len(self.rows)
        try:
            if self.chat:  # OpenAI opens each choice with the assistant's role
                for i in range(len(self.rows)):
                    choice = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield _sse(envelope(self.id, self.body.model, True, True, [choice], **extra))
            while pending:
                index, event = await self.events.get()
                if event.error:
                    yield _sse(error_body(event.error, "server_error", None, 500))
                    return
                self.completion_tokens[index] = event.completion_tokens
                text, logprobs = self._piece(index, event.text, (event.prompt_logprobs or []) + event.logprobs)
                choice = completion_choice(index, text, event.finish_reason, self.chat, chunk=True, logprobs=logprobs)
                yield _sse(envelope(self.id, self.body.model, self.chat, True, [choice], **extra))
                pending -= event.finish_reason is not None
            if include_usage:
                yield _sse(envelope(self.id, self.body.model, self.chat, True, [], usage=self._usage()))
            yield "data: [DONE]\n\n"
            self._finished()
        finally:  # the client may have gone away mid-stream: free its rows before the next decode step
            for row in self.rows:
                row.cancel()


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
