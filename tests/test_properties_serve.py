"""Property-based tests of the server's request models (serve/protocol.py) and of the HTTP app on a tiny model.

The request models must accept a JSON value or reject it with pydantic's ValidationError (which the app answers
with 422), never raise anything else. Through the FastAPI app (TestClient, a tiny Llama, three adapters): random
JSON bodies, nearly-valid requests with one field wrong, random bytes and content types, NaN/Infinity, lone
surrogate escapes, odd names and paths for adapter loading, prompts of text or token ids (in and out of the
vocabulary, mixed, nested, empty), echo and logprobs, /tokenize and /detokenize bodies: every answer is 2xx or
4xx, never 5xx; a 4xx carries a JSON error body with a message; a 2xx completion has its choices (with logprobs
lists of one length each, when asked for), and a stream carries no server error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from prefixtune.serve import create_app
from prefixtune.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadAdapterRequest,
    TokenizeRequest,
    UnloadAdapterRequest,
)
from property_support import Tally, any_of, fuzz, json_texts, json_values, report
from serve_fixtures import SPECIAL, WORDS, save_adapters, tiny_llama, tiny_tokenizer

MODELS = ("tiny-llama", "alpha", "beta", "gamma", "__base__")
MAX_MODEL_LEN = 40  # every request stays cheap: prompt + completion fit in 40 tokens
PROMPT_WORDS = "the cat sat on a big red house and the dog ran to the river"
VOCAB = len(SPECIAL) + len(WORDS)  # the tiny model's embedding rows


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    yield from report(Tally(), "HTTP request models", request)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    model = tiny_llama(max_positions=64)
    adapters = save_adapters(model, tmp_path_factory.mktemp("serve_properties"))
    (adapters / "not-an-adapter").mkdir()
    app = create_app(model, tiny_tokenizer(), adapters_dir=adapters, max_model_len=MAX_MODEL_LEN, max_queue=64)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        test_client.adapters = adapters  # type: ignore[attr-defined]
        yield test_client


# ----- request bodies -----------------------------------------------------------------------------------------

# JSON texts, numbers beyond every limit (NaN and infinities too: Python's json reads them), lists, objects
numbers = st.one_of(
    st.integers(-3, 40),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-0.5, 2.5),
)


def mostly(valid: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually a valid value (so that requests get through to generation), sometimes anything."""
    return st.one_of(valid, valid, valid, other)


words = st.lists(any_of(*PROMPT_WORDS.split(" ")), min_size=1, max_size=6).map(" ".join)
anything = st.one_of(numbers, json_texts, json_values)
token_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)
# OpenAI's four prompt forms, valid: a text, texts, token ids, token-id lists
valid_prompts = st.one_of(
    words, st.lists(words, min_size=1, max_size=2), token_ids, st.lists(token_ids, min_size=1, max_size=2)
)
prompts = mostly(
    valid_prompts,
    st.one_of(
        any_of("", " ", PROMPT_WORDS * 4, [], [[]], [[[3]]], [3, "the"], [[3], "the"], [True, 3], [3.0], [-1]),
        json_texts,
        st.lists(st.one_of(any_of("the cat", "a dog"), json_texts), max_size=3),
        st.lists(st.one_of(st.integers(-3, VOCAB + 3), any_of(2**70, -(2**70))), max_size=6),  # out of vocab too
        st.lists(st.lists(st.integers(-1, VOCAB + 1), max_size=4), max_size=3),
        st.lists(st.one_of(words, token_ids, st.integers(0, VOCAB)), min_size=2, max_size=3),  # mixed forms
        json_values,
    ),
)
content_parts = st.lists(st.fixed_dictionaries({"type": mostly(st.just("text"), json_texts), "text": json_texts}))
messages = mostly(
    st.lists(st.fixed_dictionaries({"role": any_of("system", "user", "assistant"), "content": words}), min_size=1),
    st.lists(
        st.fixed_dictionaries(
            {"role": st.one_of(any_of("system", "user", "assistant", "tool", "developer"), json_texts)},
            optional={"content": st.one_of(prompts, content_parts.map(lambda p: p[:2])), "name": json_texts},
        ),
        max_size=3,
    ),
)
SAMPLING = {
    "max_tokens": mostly(st.integers(1, 6), st.one_of(numbers, st.none())),
    "temperature": mostly(st.one_of(st.floats(0, 2), any_of(0, 1e-30)), numbers),
    "top_p": mostly(st.one_of(st.floats(0.01, 1), any_of(1e-30, 1)), numbers),
    "stop": mostly(st.one_of(words, st.lists(words, max_size=4), st.none()), st.one_of(json_texts, json_values)),
    "seed": mostly(st.one_of(st.integers(0, 2**63 - 1), st.none()), numbers),
    "n": mostly(st.integers(1, 3), numbers),
    "stream": mostly(st.booleans(), json_values),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
    "ignore_eos": mostly(st.booleans(), json_values),
    "user": json_texts,
    "logprobs": json_values,
}
COMPLETION_EXTRAS = {  # completion-only fields: echo and logprobs (k alternatives), max_tokens 0 with echo
    "echo": mostly(st.booleans(), json_values),
    "logprobs": mostly(st.one_of(st.integers(0, 5), st.none(), any_of(20, 21, -1)), anything),
    "return_tokens_as_token_ids": mostly(st.booleans(), json_values),
    "max_tokens": mostly(st.integers(0, 6), st.one_of(numbers, st.none())),
}
CHAT_EXTRAS = {
    "logprobs": mostly(st.booleans(), anything),
    "top_logprobs": mostly(st.one_of(st.integers(0, 5), st.none(), any_of(20, 21)), anything),
}
VALID_SAMPLING = {
    "max_tokens": st.integers(1, 6),
    "temperature": st.one_of(st.floats(0, 2), any_of(0, 1e-30)),
    "top_p": st.one_of(st.floats(0.01, 1), any_of(1e-30, 1)),
    "stop": st.one_of(words, st.lists(words, max_size=4), st.none()),
    "seed": st.one_of(st.integers(0, 2**63 - 1), st.none()),
    "n": st.integers(1, 3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
}
model_names = mostly(any_of(*MODELS), st.one_of(json_texts, json_values))


def _bodies(required: dict[str, Any], optional: dict[str, Any], anyhow: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Valid bodies, valid bodies with one field made anything, and bodies of nearly anything."""
    valid = st.fixed_dictionaries(required, optional=optional)
    keys = sorted({*required, *optional, "user", "logprobs", "echo", "top_logprobs"})
    one_off = st.builds(lambda body, key, value: {**body, key: value}, valid, any_of(*keys), anything)
    return st.one_of(valid, one_off, one_off, st.fixed_dictionaries(anyhow["required"], optional=anyhow["optional"]))


completion_bodies = _bodies(
    {"model": any_of(*MODELS), "prompt": valid_prompts},
    {**VALID_SAMPLING, "echo": st.booleans(), "logprobs": st.one_of(st.integers(0, 5), st.none())},
    {"required": {"model": model_names, "prompt": prompts}, "optional": {**SAMPLING, **COMPLETION_EXTRAS}},
)
chat_bodies = _bodies(
    {
        "model": any_of(*MODELS),
        "messages": st.lists(st.fixed_dictionaries({"role": any_of("system", "user"), "content": words}), min_size=1),
    },
    {**VALID_SAMPLING, "max_completion_tokens": st.integers(1, 6), "logprobs": st.booleans()},
    {
        "required": {"model": model_names, "messages": messages},
        "optional": {**SAMPLING, **CHAT_EXTRAS, "max_completion_tokens": mostly(st.integers(1, 6), numbers)},
    },
)
TOKENIZE_OPTIONS = {
    "model": model_names,
    "add_special_tokens": mostly(st.booleans(), json_values),
    "add_generation_prompt": mostly(st.booleans(), json_values),
    "return_token_strs": mostly(st.booleans(), json_values),
}
tokenize_bodies = st.one_of(
    st.fixed_dictionaries({"prompt": mostly(words, anything)}, optional=TOKENIZE_OPTIONS),
    st.fixed_dictionaries({"messages": messages}, optional=TOKENIZE_OPTIONS),
    st.fixed_dictionaries({}, optional={**TOKENIZE_OPTIONS, "prompt": anything, "messages": messages}),
    json_values,
)
detokenize_bodies = st.one_of(
    st.fixed_dictionaries({"tokens": mostly(token_ids, prompts)}, optional={"model": model_names}),
    json_values,
)
adapter_names = st.one_of(any_of("alpha", "delta", "new-one", "a.b", "..", "__base__", "not-an-adapter"), json_texts)
adapter_paths = st.one_of(
    st.none(),
    any_of("alpha", "beta", "../alpha", "/etc", "alpha/adapter_config.json", "not-an-adapter", "", ".", "nope"),
    json_texts,
    json_values,
)
load_bodies = st.one_of(
    st.fixed_dictionaries({"name": adapter_names}, optional={"path": adapter_paths}),
    st.fixed_dictionaries({"lora_name": adapter_names}, optional={"lora_path": adapter_paths}),
    json_values,
)
unload_bodies = st.one_of(st.fixed_dictionaries({"name": adapter_names}), json_values)


def _encode(body: Any) -> bytes:
    # ensure_ascii: lone surrogates travel as \\ud800 escapes; allow_nan: NaN and Infinity tokens, which json reads
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


# ----- the request models directly --------------------------------------------------------------------------------


@fuzz(150)
@given(
    which=any_of(
        CompletionRequest,
        ChatCompletionRequest,
        LoadAdapterRequest,
        UnloadAdapterRequest,
        TokenizeRequest,
        DetokenizeRequest,
    ),
    body=st.one_of(completion_bodies, chat_bodies, load_bodies, tokenize_bodies, detokenize_bodies, json_values),
)
def test_request_models_validate_or_reject(tally: Tally, which: type, body: Any) -> None:
    try:
        parsed = which.model_validate(body)
    except ValidationError:
        tally.count(f"{which.__name__} model", "rejected")
        return
    tally.count(f"{which.__name__} model", "accepted")
    if isinstance(parsed, (CompletionRequest, ChatCompletionRequest)):
        for name in ("temperature", "top_p"):
            assert math.isfinite(getattr(parsed, name)), f"{name} must be a finite number"
        assert parsed.stop is None or (isinstance(parsed.stop, list) and len(parsed.stop) <= 4)
    if isinstance(parsed, CompletionRequest):  # normalized: a non-empty list of texts or of token-id lists
        assert parsed.prompt and len({type(p) for p in parsed.prompt}) == 1
        assert all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0
            for p in parsed.prompt
            if isinstance(p, list)
            for t in p
        )
        assert parsed.logprobs is None or 0 <= parsed.logprobs <= 20
        assert parsed.max_tokens != 0 or parsed.echo


# ----- through the app ----------------------------------------------------------------------------------------


def _check_answer(tally: Tally, name: str, response: Any) -> None:
    status = response.status_code
    assert status < 500, f"{status}: {response.text[:500]}"
    if status >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        tally.count(name, f"{status}")
        return
    tally.count(name, "2xx")
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        assert "server_error" not in response.text, response.text[:500]
        assert response.text.rstrip().endswith("data: [DONE]")
    elif name in ("completions", "chat completions"):
        choices = response.json()["choices"]
        assert choices, response.text[:500]
        for choice in choices:
            logprobs = choice["logprobs"]
            if name == "completions" and logprobs is not None:
                lengths = {len(logprobs[k]) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
                assert len(lengths) == 1, logprobs
            elif logprobs is not None:
                assert all(isinstance(entry["logprob"], float) for entry in logprobs["content"]), logprobs


def _post(client: TestClient, path: str, body: Any) -> Any:
    return client.post(path, content=_encode(body), headers={"content-type": "application/json"})


@fuzz(70)
@given(body=completion_bodies)
@example(body={"model": "alpha", "prompt": "the \ud800 cat"})
@example(body={"model": "\ud800", "prompt": "the cat"})
@example(body={"model": "alpha", "prompt": "the cat", "temperature": math.nan})
@example(body={"model": "alpha", "prompt": "the cat", "top_p": math.nan, "temperature": 0.5})
@example(body={"model": "alpha", "prompt": "the cat", "stop": ["\udfff"], "max_tokens": 3})
@example(body={"model": "alpha", "prompt": "the cat", "seed": 2**70})
@example(body={"model": "alpha", "prompt": "the cat", "max_tokens": 2**70})
@example(body={"model": "alpha", "prompt": "the cat", "stream": True, "n": 2, "max_tokens": 2})
@example(body={"model": "beta", "prompt": [[3, 4], [5]], "echo": True, "logprobs": 5, "max_tokens": 0})
@example(body={"model": "beta", "prompt": [3, 4], "echo": True, "logprobs": 2, "stream": True, "max_tokens": 2})
@example(body={"model": "beta", "prompt": [3, VOCAB], "max_tokens": 1})
@example(body={"model": "beta", "prompt": [3, 2**70], "max_tokens": 1})
@example(body={"model": "beta", "prompt": [[3], "the"], "max_tokens": 1})
def test_completions_never_5xx(tally: Tally, client: TestClient, body: Any) -> None:
    _check_answer(tally, "completions", _post(client, "/v1/completions", body))


@fuzz(50)
@given(body=chat_bodies)
@example(body={"model": "beta", "messages": [{"role": "user", "content": "hi \ud83d"}]})
@example(body={"model": "beta", "messages": [{"role": "user", "content": "the cat"}], "max_completion_tokens": 3})
@example(body={"model": "beta", "messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 20})
def test_chat_completions_never_5xx(tally: Tally, client: TestClient, body: Any) -> None:
    _check_answer(tally, "chat completions", _post(client, "/v1/chat/completions", body))


@fuzz(70)
@given(load=load_bodies, unload=unload_bodies)
@example(load={"name": "delta", "path": "alpha\x00"}, unload={"name": "delta"})
@example(load={"name": "delta", "path": "\ud800"}, unload={"name": "delta"})
@example(load={"name": "delta", "path": "not-an-adapter"}, unload={"name": "delta"})
@example(load={"name": "delta", "path": "alpha"}, unload={"name": "delta"})
def test_adapter_loading_never_5xx(tally: Tally, client: TestClient, load: Any, unload: Any) -> None:
    loaded = _post(client, "/v1/load_adapter", load)
    _check_answer(tally, "load_adapter", loaded)
    if loaded.status_code == 200:  # leave the server as it was for the next input
        _check_answer(tally, "unload_adapter", _post(client, "/v1/unload_adapter", {"name": loaded.json()["name"]}))
    _check_answer(tally, "unload_adapter", _post(client, "/v1/unload_adapter", unload))


@fuzz(60)
@given(tokenize=tokenize_bodies, detokenize=detokenize_bodies)
@example(tokenize={"prompt": "the cat", "model": "beta"}, detokenize={"tokens": [3, VOCAB]})
@example(tokenize={"messages": [{"role": "user", "content": "x"}]}, detokenize={"tokens": [2**70]})
def test_tokenize_and_detokenize_never_5xx(tally: Tally, client: TestClient, tokenize: Any, detokenize: Any) -> None:
    answer = _post(client, "/tokenize", tokenize)
    _check_answer(tally, "tokenize", answer)
    if answer.status_code == 200:
        assert answer.json()["count"] == len(answer.json()["tokens"])
    _check_answer(tally, "detokenize", _post(client, "/detokenize", detokenize))


@fuzz(80)
@given(
    path=any_of(
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/load_adapter",
        "/v1/unload_adapter",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
        "/v1/models",
        "/health",
        "/metrics",
        "/",
        "/v1/nope",
    ),
    method=any_of("POST", "GET", "PUT", "DELETE"),
    content=st.one_of(st.binary(max_size=80), st.builds(_encode, json_values), any_of(b"", b"{", b"NaN", b"[]")),
    content_type=any_of(
        "application/json", "text/plain", "application/x-www-form-urlencoded", "", "application/json; charset=latin-1"
    ),
)
def test_any_bytes_to_any_route_never_5xx(
    tally: Tally, client: TestClient, path: str, method: str, content: bytes, content_type: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.request(method, path, content=content, headers=headers)
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    tally.count("any bytes, any route", "2xx" if response.status_code < 400 else "4xx")
    if response.status_code >= 400:
        assert response.json()["error"]["message"]


def test_server_still_answers_after_the_fuzzing(client: TestClient) -> None:
    """The fuzzing may have unloaded adapters (a valid request); whatever is left must serve, and reload works."""
    served = [m["id"] for m in client.get("/v1/models").json()["data"]]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["adapters"] == len(served) - 1
    for name in served:
        answer = client.post("/v1/completions", json={"model": name, "prompt": "the cat", "max_tokens": 2})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
    for name in {"alpha", "beta", "gamma"} - set(served):
        assert client.post("/v1/load_adapter", json={"name": name}).status_code in (200, 409)
