"""The HTTP app: OpenAI-compatible routes, adapter management, health, metrics and the playground."""

from __future__ import annotations

import hmac
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import peft_format
from ..errors import PrefixTuneError
from ..model import PrefixModel
from .generation import ServerState, check_tokens, complete, render_chat
from .metrics import Metrics
from .page import PLAYGROUND_HTML
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadAdapterRequest,
    TokenizeRequest,
    UnloadAdapterRequest,
    error_body,
)
from .registry import AdapterRegistry
from .scheduler import Scheduler
from .tokenization import HttpTokenizer

log = logging.getLogger("prefixtune.serve")
OPEN_PATHS = ("/", "/health")  # everything else needs the API key when one is set


def create_app(
    model: Any,
    tokenizer: Any,
    *,
    adapters_dir: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    model_name: str | None = None,
    max_batch_size: int = 32,
    max_queue: int = 256,
    max_model_len: int | None = None,
    mix_adapters: bool = True,
    force: bool = False,
) -> FastAPI:
    """An app serving `model` (a PrefixModel, or a bare causal LM) and every adapter under `adapters_dir`.

    The model thread starts and stops with the app's lifespan (uvicorn runs it; so does `TestClient` as a
    context manager).
    """
    prefix_model = model if isinstance(model, PrefixModel) else PrefixModel(model, tokenizer=tokenizer)
    prefix_model.eval()
    metrics = Metrics()
    lock = threading.Lock()
    scheduler = Scheduler(
        prefix_model,
        tokenizer,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        mix_adapters=mix_adapters,
        metrics=metrics,
        tokenizer_lock=lock,
    )
    base_name = model_name or peft_format.model_name(prefix_model.base_model)
    registry = AdapterRegistry(
        prefix_model, scheduler, base_name, adapters_dir, max_model_len=max_model_len, force=force
    )
    registry.load_directory()
    http_tokenizer = HttpTokenizer(tokenizer, lock)  # the handlers' own copy: never the model thread's
    state = ServerState(http_tokenizer, scheduler, registry, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        log.info("serving %s with adapters %s", base_name, list(registry.served))
        yield
        scheduler.stop()

    app = FastAPI(title="prefixtune", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    app.add_middleware(GateAndCount, api_key=api_key, metrics=metrics)
    _add_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND_HTML)

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = scheduler.alive
        body = {
            "status": "ok" if alive else "model thread stopped",
            "model": base_name,
            "adapters": len(registry.served),
            "queue_depth": scheduler.queue_depth,
            "running": scheduler.running,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        gauges = {
            "prefixtune_queue_depth": scheduler.queue_depth,
            "prefixtune_running_requests": scheduler.running,
            "prefixtune_adapters_loaded": len(registry.served),
        }
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": registry.models()}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await complete(state, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await complete(state, body, request)

    @app.post("/v1/load_adapter")
    @app.post("/v1/load_lora_adapter")  # vLLM's name; {"lora_name", "lora_path"} are accepted on both
    async def load_adapter(body: LoadAdapterRequest) -> dict[str, Any]:
        info = await registry.load(body.name, body.path)
        return {"status": "loaded", "name": info.name, "path": info.path, "num_virtual_tokens": info.num_virtual_tokens}

    @app.post("/v1/unload_adapter")
    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest) -> dict[str, Any]:
        registry.unload(body.name)
        return {"status": "unloaded", "name": body.name}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        limit = registry.context_limit(registry.resolve(body.model)) if body.model else registry.max_model_len
        if body.messages is not None:
            text = render_chat(http_tokenizer, body.messages, body.add_generation_prompt)
            ids = http_tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
        else:
            assert body.prompt is not None
            special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = http_tokenizer.encode(body.prompt, add_special_tokens=special)
        strs = [http_tokenizer.token_text(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": limit, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        if body.model:
            registry.resolve(body.model)
        check_tokens(body.tokens, scheduler.vocab_size, "tokens", "tokens")
        return {"prompt": http_tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return http_tokenizer.info(registry.max_model_len)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(error_body("the body is not valid JSON", "invalid_request_error", None, 400), 400)
        where = [".".join(str(p) for p in e.get("loc", ())[1:]) or "body" for e in errors]
        # pydantic prefixes our validators' messages with "Value error, "; the message itself says what is wrong
        message = "; ".join(f"{w}: {str(e.get('msg')).removeprefix('Value error, ')}" for w, e in zip(where, errors))
        return JSONResponse(error_body(message, "invalid_request_error", where[0] if where else None, 422), 422)

    @app.exception_handler(PrefixTuneError)
    async def user_error(request: Request, exc: PrefixTuneError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "invalid_request_error", None, 400), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = error_body(
            str(exc.detail),
            "not_found_error" if exc.status_code == 404 else "invalid_request_error",
            None,
            exc.status_code,
        )
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


class GateAndCount:
    """ASGI middleware: the API key check (Bearer token) and the per-route request counter.

    Pure ASGI rather than BaseHTTPMiddleware so that streamed responses and client disconnects pass through.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in _ROUTES else "other"
        if self.api_key and path not in OPEN_PATHS and not self._authorized(scope):
            self.metrics.inc("prefixtune_requests_total", route=route, status="401")
            body = error_body(
                "a valid API key is needed: send 'Authorization: Bearer <key>'", "authentication_error", None, 401
            )
            response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        status = {"code": 500}

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.inc("prefixtune_requests_total", route=route, status=str(status["code"]))

    def _authorized(self, scope: Scope) -> bool:
        assert self.api_key is not None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())
        return False


_ROUTES = {
    "/",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/load_adapter",
    "/v1/unload_adapter",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
}
