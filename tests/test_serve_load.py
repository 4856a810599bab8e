"""A small, bounded load test: 200 requests from 32 concurrent clients, all answered, none with a 5xx."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import httpx

from prefixtune.serve import create_app
from serve_fixtures import WORDS, LiveServer, save_adapters, tiny_llama, tiny_tokenizer

REQUESTS, CONCURRENCY = 200, 32


def test_200_requests_at_32_concurrent_clients(tmp_path: Path) -> None:
    model = tiny_llama()
    adapters = save_adapters(model, tmp_path)
    app = create_app(model, tiny_tokenizer(), adapters_dir=adapters, max_batch_size=32, max_queue=256)
    rng = random.Random(0)
    models = ["alpha", "beta", "gamma", "tiny-llama"]
    jobs = []
    for i in range(REQUESTS):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(1, 30)))
        body = {"model": models[i % 4], "max_tokens": rng.randint(1, 24), "stream": i % 3 == 0, "seed": i}
        if i % 5 == 0:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        jobs.append(body)

    async def one(client: httpx.AsyncClient, gate: asyncio.Semaphore, body: dict) -> tuple[int, int]:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        async with gate:
            if not body["stream"]:
                r = await client.post(path, json=body)
                return r.status_code, r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
            chunks = 0
            async with client.stream("POST", path, json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunks += "error" not in json.loads(line[6:])
                return r.status_code, chunks

    async def run(url: str) -> list[tuple[int, int]]:
        gate = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*[one(client, gate, body) for body in jobs])

    with LiveServer(app) as live:
        started = time.perf_counter()
        results = asyncio.run(run(live.url))
        seconds = time.perf_counter() - started
        metrics = httpx.get(live.url + "/metrics").text
    statuses = [status for status, _ in results]
    print(f"{REQUESTS} requests at {CONCURRENCY} concurrent in {seconds:.1f} s; statuses {sorted(set(statuses))}")
    assert statuses == [200] * REQUESTS
    for body, (_, count) in zip(jobs, results):
        assert count >= 1 if body["stream"] else 1 <= count <= body["max_tokens"]
    assert 'prefixtune_requests_total{route="/v1/completions",status="200"}' in metrics
    assert 'status="5' not in metrics
