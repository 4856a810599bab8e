"""One completion request over HTTP: prompt -> token ids -> scheduled rows -> JSON or server-sent events."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .metrics import LATENCY_BUCKETS, Metrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
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

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


@dataclass
class ServerState:
    tokenizer: Any
    tokenizer_lock: threading.Lock
    scheduler: Scheduler
    registry: AdapterRegistry
    metrics: Metrics


def render_chat(tokenizer: Any, body: ChatCompletionRequest) -> str:
    """The tokenizer's chat template when it has one; otherwise plain `role: text` lines."""
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # templates raise on what they refuse (e.g. roles that do not alternate)
            raise APIError(400, f"the model's chat template refused these messages: {exc}", param="messages") from None
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


async def complete(state: ServerState, body: CompletionRequest | ChatCompletionRequest, request: Request) -> Response:
    chat = isinstance(body, ChatCompletionRequest)
    started = time.perf_counter()
    adapter = state.registry.resolve(body.model)
    with state.tokenizer_lock:
        if isinstance(body, ChatCompletionRequest):
            prompts = [state.tokenizer(render_chat(state.tokenizer, body), add_special_tokens=False)["input_ids"]]
        else:
            texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            prompts = [state.tokenizer(text)["input_ids"] for text in texts]
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
    for ids in prompts:
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if max(ids) >= state.scheduler.vocab_size:  # a tokenizer with tokens the model has no embedding for
            raise APIError(
                400,
                f"the prompt has token id {max(ids)}, outside the model's vocabulary of {state.scheduler.vocab_size}",
                param="prompt",
            )
        if len(ids) >= limit:
            raise APIError(
                400, f"the prompt has {len(ids)} tokens; {body.model!r} takes at most {limit - 1}", param="prompt"
            )
        if asked is not None and len(ids) + asked > limit:
            raise APIError(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({asked}) exceeds the context of {body.model!r} "
                f"({limit} tokens); lower max_tokens or shorten the prompt",
                param="max_tokens",
            )

    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    rows: list[GenerationRequest] = []
    for i, ids in enumerate(prompts):
        default = COMPLETION_DEFAULT_MAX_TOKENS if not chat else limit - len(ids)
        for j in range(body.n):
            index = i * body.n + j
            params = SamplingParams(
                max_tokens=min(asked or default, limit - len(ids)),
                temperature=body.temperature,
                top_p=body.top_p,
                stop=list(body.stop or []),
                seed=None if body.seed is None else body.seed + index,
                ignore_eos=body.ignore_eos,
            )

            def on_event(event: Event, index: int = index) -> None:
                events.put_nowait((index, event))

            rows.append(GenerationRequest(adapter, list(ids), params, on_event, loop, incremental=body.stream))
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

    reply = Reply(state, body, chat, rows, events, started)
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
    ) -> None:
        self.state, self.body, self.chat, self.rows = state, body, chat, rows
        self.events, self.started = events, started
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.completion_tokens = [0] * len(rows)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) for r in self.rows[:: self.body.n])

    def _usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, sum(self.completion_tokens))

    def _finished(self) -> None:
        self.state.metrics.observe("prefixtune_request_seconds", time.perf_counter() - self.started, LATENCY_BUCKETS)

    async def collect(self, request: Request) -> Response:
        texts, reasons = [""] * len(self.rows), [None] * len(self.rows)
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
                self.completion_tokens[index] = event.completion_tokens
                if event.finish_reason:
                    reasons[index] = event.finish_reason
                    pending -= 1
        finally:
            for row in self.rows:
                row.cancel()  # a no-op for finished rows
        self._finished()
        choices = [completion_choice(i, t, r, self.chat, chunk=False) for i, (t, r) in enumerate(zip(texts, reasons))]
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
                choice = completion_choice(index, event.text, event.finish_reason, self.chat, chunk=True)
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
