"""The OpenAI-compatible server, driven by the official `openai` client against a live server on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from prefixtune.model import BASE
from prefixtune.serve import create_app
from serve_fixtures import LiveServer, continuation, oracle, save_adapters, solo_greedy, tiny_llama, tiny_tokenizer

GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tokenizer, model = tiny_tokenizer(), tiny_llama()
    adapters = save_adapters(model, tmp_path_factory.mktemp("adapters"))
    solo_model = oracle(model, adapters)
    app = create_app(model, tokenizer, adapters_dir=adapters, max_batch_size=16)
    with LiveServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield {"server": server, "client": client, "tokenizer": tokenizer, "solo": solo_model}


def solo_text(served: dict[str, Any], model: str, prompt: str, max_tokens: int) -> str:
    adapter = BASE if model == "tiny-llama" else model
    ids = solo_greedy(served["solo"], served["tokenizer"], adapter, prompt, max_tokens)
    return continuation(served["tokenizer"], prompt, ids)


def test_models_health_and_metrics(served: dict[str, Any]) -> None:
    listed = {m.id: m for m in served["client"].models.list().data}
    assert set(listed) == {"tiny-llama", "alpha", "beta", "gamma"}
    assert listed["beta"].model_extra["parent"] == "tiny-llama"
    url = served["server"].url
    assert httpx.get(url + "/health").json()["status"] == "ok"
    text = httpx.get(url + "/metrics").text
    for name in (
        "prefixtune_requests_total",
        "prefixtune_queue_depth",
        "prefixtune_batch_size",
        "prefixtune_generation_tokens_total",
    ):
        assert f"# TYPE {name} " in text


@pytest.mark.parametrize("model", ["alpha", "beta", "gamma", "tiny-llama"])
def test_completion_equals_solo_generate(served: dict[str, Any], model: str) -> None:
    prompt = "the old king walked to the river"
    answer = served["client"].completions.create(model=model, prompt=prompt, max_tokens=9, **GREEDY)
    assert answer.choices[0].text == solo_text(served, model, prompt, 9)
    assert answer.choices[0].finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (7, 9)


def test_streaming_equals_non_streaming(served: dict[str, Any]) -> None:
    client = served["client"]
    whole = client.completions.create(model="beta", prompt="a small bird", max_tokens=12, **GREEDY)
    chunks = list(client.completions.create(model="beta", prompt="a small bird", max_tokens=12, stream=True, **GREEDY))
    assert len(chunks) >= 12  # one chunk per token: the text streams
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_streaming_and_not(served: dict[str, Any]) -> None:
    client = served["client"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat and the dog"}]
    whole = client.chat.completions.create(model="gamma", messages=messages, max_tokens=6, **GREEDY)
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 6
    stream = client.chat.completions.create(
        model="gamma", messages=messages, max_tokens=6, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_concurrent_mixed_adapters_equal_solo_generate(served: dict[str, Any]) -> None:
    """Requests for different adapters, sent at once, share decode steps and still give each one's solo tokens."""
    words = "the cat sat on a red stone by the old river in the city".split()
    jobs = [
        (model, " ".join(words[: 1 + (3 * i) % len(words)]), 4 + (5 * i) % 11)
        for i, model in enumerate(["alpha", "beta", "gamma", "tiny-llama"] * 4)
    ]
    server = served["server"]
    before = _decode_batches(httpx.get(server.url + "/metrics").text)

    async def run_all() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        async with client:
            answers = await asyncio.gather(
                *[client.completions.create(model=m, prompt=p, max_tokens=n, **GREEDY) for m, p, n in jobs]
            )
        return [a.choices[0].text for a in answers]

    texts = asyncio.run(run_all())
    for (model, prompt, n), text in zip(jobs, texts):
        assert text == solo_text(served, model, prompt, n), (model, prompt, n)
    steps, rows = (a - b for a, b in zip(_decode_batches(httpx.get(server.url + "/metrics").text), before))
    assert rows > steps  # some decode steps carried more than one row, i.e. adapters were mixed in a batch


def _decode_batches(metrics: str) -> tuple[float, float]:
    count = total = 0.0
    for line in metrics.splitlines():
        if line.startswith('prefixtune_batch_size_count{phase="decode"}'):
            count = float(line.split()[-1])
        if line.startswith('prefixtune_batch_size_sum{phase="decode"}'):
            total = float(line.split()[-1])
    return count, total


def test_seed_stop_n_and_prompt_lists(served: dict[str, Any]) -> None:
    client = served["client"]
    sampled = [
        client.completions.create(model="alpha", prompt="the moon", max_tokens=10, temperature=1.0, top_p=0.9, seed=42)
        for _ in range(2)
    ]
    assert sampled[0].choices[0].text == sampled[1].choices[0].text  # same seed, same text
    greedy = client.completions.create(model="alpha", prompt="the moon", max_tokens=10, **GREEDY).choices[0].text
    stop = greedy.split()[3]
    cut = client.completions.create(model="alpha", prompt="the moon", max_tokens=10, stop=[stop], **GREEDY)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == greedy[: greedy.index(stop)]
    many = client.completions.create(model="beta", prompt=["a dog", "the sun is"], n=2, max_tokens=3, **GREEDY)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text  # greedy: both choices of one prompt agree
    assert many.usage.completion_tokens == 12


def test_playground_page_is_served(served: dict[str, Any]) -> None:
    page = httpx.get(served["server"].url + "/")
    assert page.status_code == 200 and "prefixtune playground" in page.text


def test_eos_ends_a_completion(served: dict[str, Any]) -> None:
    """Without ignore_eos, the end-of-sequence token finishes the row with finish_reason 'stop'."""
    answers = [
        served["client"].completions.create(
            model="tiny-llama", prompt=f"the {w}", max_tokens=40, temperature=2.0, seed=s
        )
        for s, w in enumerate(["cat", "dog", "sun", "king"] * 3)
    ]
    assert {a.choices[0].finish_reason for a in answers} == {"stop", "length"}  # seeded: some rows drew [EOS]
    for a in answers:
        assert a.usage.completion_tokens == 40 or a.choices[0].finish_reason == "stop"
        assert "[EOS]" not in a.choices[0].text
