"""One model thread: a bounded queue in, continuous batching across adapters, text events out.

Between two decode steps the thread runs queued commands (adapter load/unload), drops cancelled and finished
rows, and admits waiting requests (prefilled together and merged into the running batch). Every decode step
is one forward pass over all running rows, whatever adapter each row uses. A request that asks for its prompt's
log-probabilities (`echo` + `logprobs`) is scored first in a pass of its own (`scoring.py`); one that wants at most
one new token (lm-eval's loglikelihood requests) is finished there and never takes a batch row.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model import BASE, PrefixModel
from .batch import RunningBatch
from .logprobs import TokenLogprob, logprobs_of
from .metrics import Metrics
from .sampling import SamplingParams, TextStream, sample, sample_rows
from .scoring import score_prompts

log = logging.getLogger("prefixtune.serve")


class QueueFull(Exception):
    """The waiting queue is at --max-queue; the client should retry later."""


@dataclass
class Event:
    """What a request hears from the model thread: a text delta, and at the end a finish reason or an error."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" when finished
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the new tokens since the last event
    prompt_logprobs: list[TokenLogprob] | None = None  # the prompt's, in the request's first event


@dataclass(eq=False)
class GenerationRequest:
    adapter: str  # an adapter name or BASE
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]  # called on `loop`'s thread (on the model thread when loop is None)
    loop: asyncio.AbstractEventLoop | None = None
    incremental: bool = True  # text events per token (streaming); False: one event with all the text at the end
    logprobs: int | None = None  # None: none; k: each new token's log-probability and the k likeliest tokens
    prompt_logprobs: int | None = None  # None: none; k: the same for the prompt's tokens (echo)
    cancelled: bool = False
    completion_tokens: int = 0
    next_token: int = -1
    stream: TextStream | None = field(default=None, repr=False)
    generator: torch.Generator | None = field(default=None, repr=False)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list, repr=False)  # not yet in an event
    prompt_entries: list[TokenLogprob] | None = field(default=None, repr=False)  # scored, not yet in an event

    def cancel(self) -> None:
        """Ask the model thread to drop this request (client gone); it frees the row before the next step."""
        self.cancelled = True

    def event(self, text: str, finish_reason: str | None) -> Event:
        """The next event, carrying the log-probabilities gathered since the last one."""
        event = Event(
            text,
            finish_reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=self.completion_tokens,
            logprobs=self.pending_logprobs,
            prompt_logprobs=self.prompt_entries,
        )
        self.pending_logprobs, self.prompt_entries = [], None
        return event


class Scheduler:
    """Owns the model: only its thread calls forward. `submit` and `call` are safe from any thread."""

    def __init__(
        self,
        model: PrefixModel,
        tokenizer: Any,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        mix_adapters: bool = True,
        metrics: Metrics | None = None,
        tokenizer_lock: threading.Lock | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.mix_adapters = mix_adapters  # False: one adapter per batch (PEFT's way), for comparison
        self.metrics = metrics or Metrics()
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        pad = getattr(tokenizer, "pad_token_id", None)
        self.batch = RunningBatch(model, pad if pad is not None else 0)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.vocab_size = int(model.base_model.get_input_embeddings().weight.shape[0])
        self.rows: list[GenerationRequest] = []  # aligned with self.batch's rows
        self._waiting: deque[GenerationRequest] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._retiring: set[str] = set()
        self._outbox: list[tuple[GenerationRequest, Event]] = []  # delivered once per step, not once per token
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="prefixtune-model", daemon=True)

    # ----- any thread ---------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> None:
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(request)
            self._wake.notify()

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn` on the model thread between two decode steps."""
        future: Future[Any] = Future()
        with self._wake:
            self._commands.append((fn, future))
            self._wake.notify()
        return future

    def retire(self, adapter: str) -> None:
        """Delete `adapter` from the model once no waiting or running request uses it."""
        with self._wake:
            self._retiring.add(adapter)
            self._wake.notify()

    # ----- the model thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._commands or self.rows or self._retiring):
                    self._wake.wait()
                if self._stopping:
                    break
                commands = list(self._commands)
                self._commands.clear()
            try:
                self._step(commands)
            except Exception as exc:  # a bug outside a forward pass: fail the running rows, keep the thread alive
                log.exception("scheduler step failed")
                self._fail(self.rows, exc)
                self.rows = []
                self.batch.keep([])
            self._deliver()
        for request in self.rows + list(self._waiting):
            self._emit(request, Event(error="the server is shutting down"))
        self._deliver()

    def _step(self, commands: list[tuple[Callable[[], Any], Future[Any]]]) -> None:
        """Between two decode steps: commands, retirements, departures, admissions; then one decode step."""
        for fn, future in commands:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the caller, who reports it
                    future.set_exception(exc)
        self._retire_unused()
        self._drop([i for i, r in enumerate(self.rows) if r.cancelled])
        admitted = self._score_first(self._admit())
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as exc:  # the new rows fail; the rows already running go on
                log.exception("prefill failed")
                self._fail(admitted, exc)
                if len(self.batch) != len(self.rows):  # failed half-way through the merge: start afresh
                    self._fail(self.rows, exc)
                    self.rows = []
                    self.batch.keep([])
                else:
                    self._drop([i for i, r in enumerate(self.rows) if any(r is a for a in admitted)])
        if self.rows:
            try:
                self._decode()
            except Exception as exc:  # a bug or out of memory in the forward pass: fail its rows, keep serving
                log.exception("decode step failed")
                self._fail(self.rows, exc)
                self.rows = []
                self.batch.keep([])

    def _fail(self, requests: list[GenerationRequest], exc: Exception) -> None:
        for request in requests:
            self._emit(request, Event(error=f"generation failed: {exc}"))

    def _emit(self, request: GenerationRequest, event: Event) -> None:
        self._outbox.append((request, event))

    def _deliver(self) -> None:
        """Hand this step's events over: one wake-up per event loop, however many rows had news."""
        by_loop: dict[asyncio.AbstractEventLoop | None, list[tuple[GenerationRequest, Event]]] = {}
        for request, event in self._outbox:
            by_loop.setdefault(request.loop, []).append((request, event))
        self._outbox = []
        for loop, items in by_loop.items():
            if loop is None:
                _dispatch(items)
            else:
                try:
                    loop.call_soon_threadsafe(_dispatch, items)
                except RuntimeError:  # that loop is closed: nobody is listening any more
                    pass

    def _admit(self) -> list[GenerationRequest]:
        with self._wake:
            free = self.max_batch_size - len(self.rows)
            if free <= 0 or not self._waiting:
                return []
            group = None
            if not self.mix_adapters:
                group = (
                    self.rows[0].adapter
                    if self.rows
                    else next((r.adapter for r in self._waiting if not r.cancelled), None)
                )
            admitted, rest = [], deque()
            while self._waiting:
                request = self._waiting.popleft()
                if request.cancelled:
                    continue
                if request.adapter != BASE and request.adapter not in self.model.adapters:
                    self._emit(request, Event(error=f"adapter {request.adapter!r} was unloaded"))
                    continue
                if len(admitted) < free and (group is None or request.adapter == group):
                    admitted.append(request)
                else:
                    rest.append(request)
            self._waiting = rest
            return admitted

    def _start(self, request: GenerationRequest) -> None:
        request.stream = TextStream(self.tokenizer, request.params.stop, request.prompt_ids)
        request.generator = request.params.generator()

    def _score_first(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """Score the prompts of the requests that want their log-probabilities; finish those that want at most one
        new token (the scoring pass's last logits give it); return the requests that still need a batch row."""
        scored = [r for r in requests if r.prompt_logprobs is not None]
        if not scored:
            return requests
        try:
            results = score_prompts(
                self.model,
                [r.prompt_ids for r in scored],
                [r.adapter for r in scored],
                [r.prompt_logprobs or 0 for r in scored],
                self.batch.pad_token_id,
            )
            self.metrics.observe_batch("score", len(scored))
            here: list[tuple[GenerationRequest, torch.Tensor]] = []
            for request, (entries, last) in zip(scored, results):
                request.prompt_entries = entries
                if request.params.max_tokens <= 1:
                    here.append((request, last))
            for request, _ in here:
                self._start(request)
                if request.params.max_tokens == 0:
                    self._emit(request, request.event("", "length"))
            one = [(r, last) for r, last in here if r.params.max_tokens == 1]
            if one:  # each row's own faults stay with it (as in a decode step)
                self._advance_rows([r for r, _ in one], torch.stack([last for _, last in one]))
            self.metrics.add_tokens(prompt=sum(len(r.prompt_ids) for r, _ in here), completion=len(one))
        except Exception as exc:  # these requests fail; the others go on to their prefill
            log.exception("prompt scoring failed")
            self._fail(scored, exc)
            return [r for r in requests if r.prompt_logprobs is None]
        done = {id(r) for r, _ in here}
        return [r for r in requests if id(r) not in done]

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        for request in requests:
            self._start(request)
        logits = self.batch.prefill([r.prompt_ids for r in requests], [r.adapter for r in requests])
        self.rows.extend(requests)
        self.metrics.observe_batch("prefill", len(requests))
        self.metrics.add_tokens(prompt=sum(len(r.prompt_ids) for r in requests))
        self._advance_all(requests, logits, first=len(self.rows) - len(requests))

    def _decode(self) -> None:
        tokens = torch.tensor([r.next_token for r in self.rows], dtype=torch.long)
        logits = self.batch.step(tokens)
        self.metrics.observe_batch("decode", len(self.rows))
        self._advance_all(self.rows, logits, first=0)

    def _advance_all(self, requests: list[GenerationRequest], logits: torch.Tensor, first: int) -> None:
        """Each request's next token from its logits row; finished rows leave the batch."""
        finished = [first + i for i in self._advance_rows(requests, logits)]
        self.metrics.add_tokens(completion=len(requests))
        self._drop(finished)

    def _advance_rows(self, requests: list[GenerationRequest], logits: torch.Tensor) -> list[int]:
        """Each request's next token from its logits row (B, V); the indices of the requests now finished."""
        tokens = logits.argmax(dim=-1).tolist()  # one call for all rows; sampled rows draw below, together
        sampled = [i for i, r in enumerate(requests) if r.params.temperature > 0.0]
        failed: dict[int, Exception] = {}
        if sampled:
            try:
                draws = sample_rows(
                    logits[sampled], [requests[i].params for i in sampled], [requests[i].generator for i in sampled]
                )
                for i, token in zip(sampled, draws):
                    tokens[i] = token
            except Exception:  # find the row at fault: each draws alone
                log.exception("sampling failed")
                for i in sampled:
                    try:
                        tokens[i] = sample(logits[i], requests[i].params, requests[i].generator)  # type: ignore[arg-type]
                    except Exception as exc:
                        failed[i] = exc
        wanted = [i for i, r in enumerate(requests) if r.logprobs is not None and i not in failed]
        if wanted:
            try:
                ks = [requests[i].logprobs or 0 for i in wanted]
                entries = logprobs_of(logits[wanted], [tokens[i] for i in wanted], ks)
                for i, entry in zip(wanted, entries):
                    requests[i].pending_logprobs.append(entry)
            except Exception as exc:  # these rows fail; the others go on
                log.exception("log-probabilities failed")
                failed.update({i: exc for i in wanted})
        finished = []
        for i, (request, token) in enumerate(zip(requests, tokens)):
            try:
                if i in failed:
                    raise failed[i]
                done = self._advance(request, token)
            except Exception as exc:  # this request's sampling or detokenization: it alone fails
                log.exception("request failed")
                self._fail([request], exc)
                done = True
            if done:
                finished.append(i)
        return finished

    def _advance(self, request: GenerationRequest, token: int) -> bool:
        """Report the row's next token; True when the request is finished."""
        assert request.stream is not None
        request.completion_tokens += 1
        request.next_token = token
        finish = None
        if (token in self.eos_ids or token in request.params.stop_token_ids) and not request.params.ignore_eos:
            finish, text = "stop", request.stream.flush()
        else:
            with self.tokenizer_lock:
                text, stopped = request.stream.push(token)
            if stopped:
                finish = "stop"
            elif request.completion_tokens >= request.params.max_tokens:
                finish, text = "length", text + request.stream.flush()
        if not request.incremental:
            text = request.stream.text if finish else ""
        if text or finish:
            self._emit(request, request.event(text, finish))
        return finish is not None

    def _drop(self, indices: list[int]) -> None:
        if not indices:
            return
        gone = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.batch.keep(keep)
        self.rows = [self.rows[i] for i in keep]

    def _retire_unused(self) -> None:
        with self._wake:
            if not self._retiring:
                return
            used = {r.adapter for r in self.rows} | {r.adapter for r in self._waiting}
            done = {name for name in self._retiring if name not in used}
            self._retiring -= done
        for name in done:
            if name != BASE and name in self.model.adapters:
                self.model.delete_adapter(name)
                log.info("adapter %s unloaded", name)


def _dispatch(items: list[tuple[GenerationRequest, Event]]) -> None:
    for request, event in items:
        request.on_event(event)


def _eos_ids(model: PrefixModel, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(model.base_model.generation_config, "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
