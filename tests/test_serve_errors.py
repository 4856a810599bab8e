"""Bad input, adapters at run time, API keys, a full queue and clients that leave: answered in kind, serving goes on."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from prefixtune.serve import create_app
from serve_fixtures import LiveServer, save_adapters, tiny_gpt2, tiny_llama, tiny_tokenizer

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("serve_errors")
    model = tiny_llama()
    adapters = save_adapters(model, root / "adapters")
    broken = adapters / "broken"  # a corrupt adapter in the directory at start-up
    shutil.copytree(adapters / "alpha", broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    spare = save_adapters(model, root / "spare", {"delta": (5, "peft")})  # loadable later, from outside the dir
    foreign = save_adapters(tiny_gpt2(), root / "foreign", {"gpt2prefix": (4, "peft")})  # another model's shapes
    twin = save_adapters(tiny_llama(seed=1), root / "twin", {"twin": (4, "peft")})  # same shapes, other weights
    return {"model": model, "adapters": adapters, "spare": spare, "foreign": foreign, "twin": twin}


@pytest.fixture(scope="module")
def server(setup: dict[str, Any]) -> Iterator[LiveServer]:
    app = create_app(setup["model"], tiny_tokenizer(), adapters_dir=setup["adapters"], max_batch_size=8)
    with LiveServer(app) as live:
        yield live


def post(server: LiveServer, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(server.url + path, timeout=30, **kwargs)


def completion(server: LiveServer, **fields: Any) -> httpx.Response:
    body = {"model": "alpha", "prompt": "the cat", "max_tokens": 3, **GREEDY, **fields}
    return post(server, "/v1/completions", json=body)


def test_malformed_json_is_400(server: LiveServer) -> None:
    r = post(
        server,
        "/v1/completions",
        content=b'{"model": "alpha", "prompt": ',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["message"] == "the body is not valid JSON"
    assert post(server, "/v1/chat/completions", json={"model": "alpha"}).status_code == 422  # no messages


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 5},
        {"top_p": 0},
        {"top_p": 1.5},
        {"max_tokens": 0},
        {"n": 100},
        {"seed": -1},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"prompt": []},
        {"max_tokens": "many"},
    ],
)
def test_out_of_range_parameters_are_422(server: LiveServer, fields: dict[str, Any]) -> None:
    r = completion(server, **fields)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_adapter_is_404(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nobody", prompt="the cat", max_tokens=2)
    assert completion(server, model="../x").status_code == 404
    assert completion(server, model="broken").status_code == 404  # corrupt at start-up: not served


def test_prompt_longer_than_the_context_is_400(server: LiveServer) -> None:
    r = completion(server, prompt="the " * 5000)
    assert r.status_code == 400 and "at most" in r.json()["error"]["message"]
    r = completion(server, prompt="the cat", max_tokens=4095)  # alpha's P=4 positions come off the 4096
    assert r.status_code == 400 and "exceeds the context" in r.json()["error"]["message"]
    assert completion(server, prompt="", max_tokens=2).status_code == 400


def test_adapter_names_with_path_characters_are_refused(server: LiveServer) -> None:
    for name in ["../x", "a/b", "..", ".hidden", "x" * 65, "__base__"]:
        r = post(server, "/v1/load_adapter", json={"name": name})
        assert r.status_code == 400, (name, r.text)
        assert "invalid adapter name" in r.json()["error"]["message"]
    r = post(server, "/v1/load_adapter", json={"name": "sneaky", "path": "../spare/delta"})
    assert r.status_code == 400 and "must be inside" in r.json()["error"]["message"]


def test_corrupt_and_mismatched_adapters_are_refused(server: LiveServer, setup: dict[str, Any]) -> None:
    r = post(server, "/v1/load_adapter", json={"name": "broken2", "path": "broken"})
    assert r.status_code == 400 and "corrupt or truncated" in r.json()["error"]["message"]
    assert post(server, "/v1/load_adapter", json={"name": "missing"}).status_code == 400
    for source in ("foreign/gpt2prefix", "twin/twin"):  # wrong shapes; same shapes but another model
        dest = setup["adapters"] / source.split("/")[1]
        shutil.copytree(setup[source.split("/")[0]] / source.split("/")[1], dest)
        try:
            r = post(server, "/v1/load_adapter", json={"name": dest.name})
            assert r.status_code == 400 and ("was made for" in r.text or "was trained on" in r.text), r.text
        finally:
            shutil.rmtree(dest)
    names = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    assert names == ["tiny-llama", "alpha", "beta", "gamma"]


def test_load_and_unload_at_run_time(server: LiveServer, setup: dict[str, Any]) -> None:
    before = completion(server, model="beta", max_tokens=6).json()["choices"][0]["text"]
    r = post(server, "/v1/unload_adapter", json={"name": "beta"})
    assert r.status_code == 200 and r.json() == {"status": "unloaded", "name": "beta"}
    assert completion(server, model="beta").status_code == 404
    assert post(server, "/v1/unload_adapter", json={"name": "beta"}).status_code == 404
    r = post(server, "/v1/load_adapter", json={"lora_name": "beta", "lora_path": "beta"})  # vLLM's field names
    assert r.status_code == 200 and r.json()["num_virtual_tokens"] == 9
    assert completion(server, model="beta", max_tokens=6).json()["choices"][0]["text"] == before
    assert post(server, "/v1/load_adapter", json={"name": "beta"}).status_code == 409  # already served
    shutil.copytree(setup["spare"] / "delta", setup["adapters"] / "delta")
    assert post(server, "/v1/load_adapter", json={"name": "delta"}).status_code == 200
    assert completion(server, model="delta").status_code == 200
    assert post(server, "/v1/unload_adapter", json={"name": "delta"}).status_code == 200
    shutil.rmtree(setup["adapters"] / "delta")


def test_unload_lets_running_requests_finish(server: LiveServer) -> None:
    """Unloading stops new requests at once; the rows already running on the adapter finish first."""
    opened, seen = threading.Event(), {}

    def read_stream() -> None:
        body = {"model": "gamma", "prompt": "the cat", "max_tokens": 300, "stream": True, **GREEDY}
        body["stream_options"] = {"include_usage": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", server.url + "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    opened.set()
                    chunk = json.loads(line[6:])
                    seen.update(usage=chunk.get("usage") or seen.get("usage"))
                    seen.update(reason=(chunk["choices"] or [{}])[0].get("finish_reason") or seen.get("reason"))

    reader = threading.Thread(target=read_stream)
    reader.start()
    assert opened.wait(30)
    assert post(server, "/v1/unload_adapter", json={"name": "gamma"}).status_code == 200
    assert completion(server, model="gamma").status_code == 404
    r = post(server, "/v1/load_adapter", json={"name": "gamma"})
    assert r.status_code == 409 and "still being unloaded" in r.json()["error"]["message"]
    reader.join(60)
    assert seen["reason"] == "length" and seen["usage"]["completion_tokens"] == 300
    _wait_for(lambda: post(server, "/v1/load_adapter", json={"name": "gamma"}).status_code == 200)
    assert completion(server, model="gamma").status_code == 200


def test_api_key(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(setup["model"], tiny_tokenizer(), adapters_dir=setup["adapters"], api_key="s3cret")
    with LiveServer(app) as live:
        anonymous = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            anonymous.completions.create(model="alpha", prompt="the cat", max_tokens=2)
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(live.url + path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = httpx.post(live.url + "/v1/load_adapter", json={"name": "../x"})
        assert r.status_code == 401  # the key is checked before anything else
        assert httpx.get(live.url + "/health").status_code == 200  # open: for load balancers
        assert httpx.get(live.url + "/").status_code == 200  # the page itself holds no data
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model="alpha", prompt="the cat", max_tokens=2).usage.completion_tokens == 2


def _stream_first_chunk(url: str, body: dict[str, Any], opened: threading.Event, release: threading.Event) -> None:
    with httpx.Client(timeout=60) as client, client.stream("POST", url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                opened.set()
                release.wait(30)
                return  # leaves mid-stream: the connection is closed


def _gauge(server: LiveServer, name: str) -> float:
    return server.metric(httpx.get(server.url + "/metrics").text, name)


def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_queue_full_is_429_with_retry_after(setup: dict[str, Any]) -> None:
    app = create_app(setup["model"], tiny_tokenizer(), adapters_dir=setup["adapters"], max_batch_size=1, max_queue=1)
    with LiveServer(app) as live:
        long = {"model": "alpha", "prompt": "the cat", "max_tokens": 4000, "stream": True, **GREEDY}
        opened, release = threading.Event(), threading.Event()
        runner = threading.Thread(target=_stream_first_chunk, args=(live.url, long, opened, release))
        runner.start()
        assert opened.wait(30)  # the one batch slot is taken
        waiting: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: waiting.update(r=completion(live, max_tokens=2)))
        waiter.start()
        _wait_for(lambda: _gauge(live, "prefixtune_queue_depth") == 1)  # the one queue place is taken
        r = completion(live)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        release.set()  # the streaming client leaves; the waiting request gets the slot
        runner.join(30)
        waiter.join(30)
        assert waiting["r"].status_code == 200


def test_client_leaving_mid_stream_frees_its_row(server: LiveServer) -> None:
    opened, release = threading.Event(), threading.Event()
    release.set()
    before = _gauge(server, "prefixtune_generation_tokens_total")
    body = {"model": "gamma", "prompt": "the cat", "max_tokens": 4000, "stream": True, **GREEDY}
    _stream_first_chunk(server.url, body, opened, release)
    assert opened.is_set()
    _wait_for(lambda: _gauge(server, "prefixtune_running_requests") == 0)
    generated = _gauge(server, "prefixtune_generation_tokens_total") - before
    print(f"tokens generated before the client left and its row was freed: {generated:g}")
    assert generated < 4000
    time.sleep(0.3)
    assert _gauge(server, "prefixtune_generation_tokens_total") - before == generated  # nothing more for it
    assert completion(server).status_code == 200  # and everyone else is still served


def test_client_giving_up_on_a_non_streaming_request_frees_its_row(server: LiveServer) -> None:
    body = {"model": "alpha", "prompt": "the cat", "max_tokens": 4000, **GREEDY}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    _wait_for(lambda: _gauge(server, "prefixtune_running_requests") == 0)  # noticed within about a second


def test_unknown_route_and_method(server: LiveServer) -> None:
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/v1/completions").status_code == 405


def test_extreme_sampling_parameters_fail_nobody(server: LiveServer) -> None:
    """temperature 1e-45 and top_p 1e-300 are in range: they sample (here: the greedy token), and a request
    decoded in the same batch is not hurt (they used to make softmax NaN and fail the whole batch with 500)."""
    done: dict[str, Any] = {}
    other = threading.Thread(target=lambda: done.update(r=completion(server, max_tokens=200)))
    other.start()
    _wait_for(lambda: _gauge(server, "prefixtune_running_requests") >= 1)
    greedy = completion(server, max_tokens=6).json()["choices"][0]["text"]
    for fields in ({"temperature": 1e-45}, {"temperature": 1e-320}, {"temperature": 1.0, "top_p": 1e-300}):
        r = completion(server, max_tokens=6, seed=3, **fields)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy
    other.join(60)
    assert done["r"].status_code == 200 and done["r"].json()["usage"]["completion_tokens"] == 200


def test_more_completions_than_the_queue_holds_is_400(server: LiveServer) -> None:
    """17 prompts x n=16 = 272 rows can never wait in a queue of 256: 400, not a 429 that retrying cannot cure."""
    r = completion(server, prompt=["the cat"] * 17, n=16, max_tokens=1)
    assert r.status_code == 400 and "--max-queue" in r.json()["error"]["message"], r.text
    assert completion(server, prompt=["the cat"] * 2, n=16, max_tokens=1).status_code == 200


def test_chat_template_refusal_and_tokens_outside_the_vocabulary_are_400(setup: dict[str, Any]) -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('system messages are not "
        "supported') }}{% endif %}{{ m['content'] }} {% endfor %}"
    )
    tokenizer.add_tokens(["zebra"])  # id 85: the model's embedding has 85 rows (0..84)
    app = create_app(setup["model"], tokenizer, adapters_dir=setup["adapters"])
    with LiveServer(app) as live:
        chat = {"model": "alpha", "max_tokens": 2, **GREEDY}
        r = post(live, "/v1/chat/completions", json=chat | {"messages": [{"role": "system", "content": "the"}]})
        assert r.status_code == 400 and "system messages are not supported" in r.json()["error"]["message"]
        r = post(live, "/v1/chat/completions", json=chat | {"messages": [{"role": "user", "content": "the cat"}]})
        assert r.status_code == 200, r.text
        r = completion(live, prompt="the zebra")
        assert r.status_code == 400 and "outside the model's vocabulary" in r.json()["error"]["message"]
        assert completion(live).status_code == 200


def test_a_failing_request_fails_alone(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Faults injected into one request's sampling and into one prefill: that request gets an error, a request
    streaming alongside finishes whole, and the model thread keeps serving."""
    import prefixtune.serve.batch as batch_module
    import prefixtune.serve.scheduler as scheduler_module

    real_sample, real_prefill = scheduler_module.sample, batch_module.RunningBatch.prefill
    real_sample_rows = scheduler_module.sample_rows

    def sample_rows(logits: Any, params: Any, generators: Any) -> list[int]:  # the batch's draw fails...
        if any(p.seed == 666 for p in params):
            raise RuntimeError("injected sampling fault")
        return real_sample_rows(logits, params, generators)

    def sample(logits: Any, params: Any, generator: Any) -> int:  # ...and so does that row's alone
        if params.seed == 666:
            raise RuntimeError("injected sampling fault")
        return real_sample(logits, params, generator)

    def prefill(self: Any, prompts: Any, adapters: Any) -> Any:
        if any(len(p) == 13 for p in prompts):
            raise RuntimeError("injected prefill fault")
        return real_prefill(self, prompts, adapters)

    monkeypatch.setattr(scheduler_module, "sample", sample)
    monkeypatch.setattr(scheduler_module, "sample_rows", sample_rows)
    monkeypatch.setattr(batch_module.RunningBatch, "prefill", prefill)
    seen: dict[str, Any] = {"text": ""}

    def stream() -> None:
        body = {"model": "beta", "prompt": "the cat", "max_tokens": 150, "stream": True, **GREEDY}
        with httpx.Client(timeout=60) as client, client.stream("POST", server.url + "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    seen["text"] += chunk["choices"][0]["text"]
                    seen["reason"] = chunk["choices"][0]["finish_reason"] or seen.get("reason")

    reader = threading.Thread(target=stream)
    reader.start()
    _wait_for(lambda: _gauge(server, "prefixtune_running_requests") >= 1)
    neighbour: dict[str, Any] = {}
    sampled = threading.Thread(target=lambda: neighbour.update(r=completion(server, temperature=1.0, seed=5)))
    sampled.start()
    r = completion(server, temperature=1.0, seed=666)
    assert r.status_code == 500 and "injected sampling fault" in r.json()["error"]["message"]
    sampled.join(60)
    assert neighbour["r"].status_code == 200
    r = completion(server, prompt=" ".join(["the"] * 13))
    assert r.status_code == 500 and "injected prefill fault" in r.json()["error"]["message"]
    reader.join(60)
    assert seen["reason"] == "length"
    monkeypatch.undo()
    alone = completion(server, model="beta", max_tokens=150).json()["choices"][0]["text"]
    assert seen["text"] == alone  # the stream went on undisturbed, token for token
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
