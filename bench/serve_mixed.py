"""Mixed-prefix serving: 8 adapters, 64 requests spread across them, one run, JSON out.

    python bench/serve_mixed.py                       # --model tiny: a random Llama, seconds
    python bench/serve_mixed.py --model smollm2-135m  # the real built-in model (prefixtune.sources)

Measured on a live server on 127.0.0.1 (uvicorn in a thread; the HTTP clients in another process), all greedy
with ignore_eos so that every request makes exactly --max-tokens tokens:
- mixed: all 64 requests at once, rows of different adapters share every forward pass;
- one_adapter_at_a_time: the same server code with mixing off (PEFT's way: a batch holds one adapter);
- generate_direct: `PrefixModel.generate` on the same 64 prompts as one left-padded mixed batch (no server);
- scheduler_direct: the server's batching engine on the same requests without HTTP (where the time goes);
- latency: closed-loop streaming clients at 1, 8 and 32 concurrent: end-to-end and first-token p50/p99.
Targets from issue 6: mixed / one-at-a-time >= 4x; server / generate >= 0.8x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
import transformers as tf
import uvicorn
from tokenizers import Tokenizer, models, pre_tokenizers

import prefixtune
from prefixtune.atomic import atomic_write_bytes
from prefixtune.model import PrefixModel
from prefixtune.serve import create_app
from prefixtune.serve.sampling import SamplingParams
from prefixtune.serve.scheduler import GenerationRequest, Scheduler

WORDS = (
    "the a of to in on at for with from and or not is are was be have has do cat dog bird fish tree house road "
    "river city king queen red blue green small big old new fast slow run walk sing read write eat sleep see hear "
    "say go come sun moon star rain snow wind fire stone table chair door window garden market bread water light"
).split()


def tiny(seed: int = 0) -> tuple[Any, Any]:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=2,
    )
    model = tf.LlamaForCausalLM(config).eval()
    model.config._name_or_path = "tiny"
    return model, tokenizer


def build(name: str) -> tuple[PrefixModel, Any, Path]:
    if name == "tiny":
        model, tokenizer = tiny()
    else:
        from prefixtune.models import load_model

        model, tokenizer = load_model(name)
    wrapped = PrefixModel(model, tokenizer=tokenizer)
    directory = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    for i in range(8):  # 8 adapters of different lengths, saved and loaded back as a server would
        config = prefixtune.PrefixConfig(num_virtual_tokens=8 + 2 * i, reparameterize=False, init="vocab")
        wrapped.add_adapter(f"task{i}", config)
        wrapped.save_adapter(directory / f"task{i}", f"task{i}")
        wrapped.delete_adapter(f"task{i}")
    for i in range(8):
        wrapped.add_adapter(f"task{i}", directory / f"task{i}")
    return wrapped, tokenizer, directory


GREEDY = {"temperature": 0.0, "top_p": 1.0}


def make_requests(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(f"task{i % 8}", " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))) for i in range(n)]


class Server:
    def __init__(self, app: Any) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join()


async def post(port: int, body: dict, on_chunk: Any = None) -> tuple[int, bytes]:
    """One POST /v1/completions over a fresh connection, with a bare asyncio HTTP/1.1 client.

    httpx costs several milliseconds of client CPU per request (more with a warm pool of 64 connections), which on
    a small machine is the bottleneck being measured instead of the server; this costs a fraction of one.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    writer.write(f"{head}Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    payload = b""
    if "content-length" in headers:
        payload = await reader.readexactly(int(headers["content-length"]))
    else:  # chunked: the server-sent events
        while size := int((await reader.readline()).strip() or b"0", 16):
            chunk = await reader.readexactly(size)
            await reader.readline()
            payload += chunk
            if on_chunk is not None:
                on_chunk(chunk)
    writer.close()
    return status, payload


async def closed_loop(
    url: str, jobs: list[tuple[str, str]], concurrency: int, max_tokens: int, stream: bool, sampling: dict
) -> dict:
    """`concurrency` clients, each sending the next job as soon as its last one is answered."""
    port = int(url.rsplit(":", 1)[1])
    pending = list(enumerate(jobs))
    latencies: list[float] = []
    first_tokens: list[float] = []
    tokens = 0

    async def client_loop() -> None:
        nonlocal tokens
        while pending:
            i, (model, prompt) = pending.pop(0)
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, **sampling}
            if sampling["temperature"] > 0:
                body["seed"] = i
            start = time.perf_counter()
            if stream:
                first: list[float] = []
                status, _ = await post(
                    port,
                    {**body, "stream": True},
                    lambda chunk, first=first: first or first.append(time.perf_counter()),
                )
                first_tokens.append(first[0] - start)
                tokens += max_tokens
            else:
                status, payload = await post(port, body)
                tokens += json.loads(payload)["usage"]["completion_tokens"]
            assert status == 200, status
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*[client_loop() for _ in range(concurrency)])
    seconds = time.perf_counter() - started
    out = {
        "requests": len(jobs),
        "seconds": round(seconds, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
    }
    out |= {"latency_p50_s": round(_pct(latencies, 50), 3), "latency_p99_s": round(_pct(latencies, 99), 3)}
    if first_tokens:
        out |= {
            "first_token_p50_s": round(_pct(first_tokens, 50), 3),
            "first_token_p99_s": round(_pct(first_tokens, 99), 3),
        }
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def mean_decode_batch(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    lines = [line.split() for line in text.splitlines() if line.startswith("prefixtune_batch_size_")]
    values = {name: float(value) for name, value in lines}
    count = values.get('prefixtune_batch_size_count{phase="decode"}', 0.0)
    return round(values.get('prefixtune_batch_size_sum{phase="decode"}', 0.0) / count, 2) if count else 0.0


def run_clients(
    url: str, jobs: list[tuple[str, str]], concurrency: int, max_tokens: int, stream: bool, sampling: dict
) -> dict:
    return asyncio.run(closed_loop(url, jobs, concurrency, max_tokens, stream, sampling))


def serve_run(
    clients: ProcessPoolExecutor,
    model: PrefixModel,
    tokenizer: Any,
    jobs: list,
    concurrency: int,
    max_tokens: int,
    stream: bool = False,
    sampling: dict | None = None,
    **app_kw: Any,
) -> dict:
    """Start a server, run the clients in their own process (no GIL shared with the server), stop the server."""
    app = create_app(model, tokenizer, model_name="base", max_batch_size=64, max_queue=1024, **app_kw)
    with Server(app) as url:
        sampling = sampling or GREEDY
        clients.submit(run_clients, url, jobs[:4], 4, 2, False, sampling).result()  # warm-up
        cpu = time.process_time()  # this process: the model thread and uvicorn's; the clients run in another
        result = clients.submit(run_clients, url, jobs, concurrency, max_tokens, stream, sampling).result()
        result |= _cpu(time.process_time() - cpu, result["tokens"])
        result["mean_decode_batch"] = mean_decode_batch(url)
    return result


def scheduler_direct(
    model: PrefixModel, tokenizer: Any, jobs: list[tuple[str, str]], max_tokens: int, sampling: dict | None = None
) -> dict:
    """The server's batching engine without HTTP: every request queued, then the model thread started."""
    done = threading.Semaphore(0)
    scheduler = Scheduler(model, tokenizer, max_batch_size=64, max_queue=len(jobs))
    sampling = sampling or GREEDY
    for i, (adapter, prompt) in enumerate(jobs):
        seed = i if sampling["temperature"] > 0 else None
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=seed, **sampling)
        ids = tokenizer(prompt)["input_ids"]
        finish = lambda event: done.release() if event.finish_reason or event.error else None  # noqa: E731
        scheduler.submit(GenerationRequest(adapter, ids, params, finish, incremental=False))
    start, cpu = time.perf_counter(), time.process_time()
    scheduler.start()
    for _ in jobs:
        done.acquire()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    scheduler.stop()
    tokens = len(jobs) * max_tokens
    return {
        "requests": len(jobs),
        "seconds": round(seconds, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
    } | _cpu(cpu, tokens)


@torch.no_grad()
def generate_direct(
    model: PrefixModel, tokenizer: Any, jobs: list[tuple[str, str]], max_tokens: int, sampling: dict | None = None
) -> dict:
    tokenizer.padding_side = "left"
    enc = tokenizer([p for _, p in jobs], return_tensors="pt", padding=True)
    sampling = sampling or GREEDY
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    if sampling["temperature"] > 0:  # transformers' own batched temperature / top-p warpers and multinomial
        kwargs |= dict(do_sample=True, temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=None)
    model.generate(**{k: v[:4] for k, v in enc.items()}, adapter_names=[a for a, _ in jobs[:4]], max_new_tokens=2)
    start, cpu = time.perf_counter(), time.process_time()
    out = model.generate(**enc, adapter_names=[a for a, _ in jobs], **kwargs)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = (out.shape[1] - enc["input_ids"].shape[1]) * len(jobs)
    return {
        "requests": len(jobs),
        "seconds": round(seconds, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
    } | _cpu(cpu, tokens)


def _cpu(seconds: float, tokens: int) -> dict:
    """CPU seconds this process spent (all its threads) and tokens per CPU second: steadier than wall time on a
    machine that other jobs share, though it leaves out what a wall clock counts (waiting, the clients' CPU)."""
    return {"cpu_s": round(seconds, 3), "tokens_per_cpu_s": round(tokens / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (random Llama, default) or a prefixtune.sources name")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--latency-requests", type=int, default=None, help="requests per latency run (default --requests)"
    )
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32], help="latency runs (none: skip)")
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs per policy, alternated; best kept")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples, seeded per request"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with --temperature (default 1)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    model, tokenizer, directory = build(args.model)
    sampling = {"temperature": args.temperature, "top_p": args.top_p}
    jobs = make_requests(args.requests)
    n = args.max_tokens
    report: dict[str, Any] = {
        "bench": "serve_mixed",
        "model": args.model,
        "adapters": 8,
        "requests": len(jobs),
        "max_tokens": n,
        "sampling": sampling,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf.__version__,
    }
    everything = len(jobs)  # all requests in flight at once: the batcher decides what shares a forward pass
    runs: dict[str, list[dict[str, Any]]] = {
        "mixed": [],
        "one_adapter_at_a_time": [],
        "generate_direct": [],
        "scheduler_direct": [],
    }
    for _ in range(args.repeats):  # alternated, so that a busy machine weighs on all three alike
        runs["mixed"].append(
            serve_run(clients, model, tokenizer, jobs, everything, n, sampling=sampling, mix_adapters=True)
        )
        runs["one_adapter_at_a_time"].append(
            serve_run(clients, model, tokenizer, jobs, everything, n, sampling=sampling, mix_adapters=False)
        )
        runs["generate_direct"].append(generate_direct(model, tokenizer, jobs, n, sampling))
        runs["scheduler_direct"].append(scheduler_direct(model, tokenizer, jobs, n, sampling))
    for name, results in runs.items():
        report[name] = max(results, key=lambda r: r["tokens_per_s"])
        report[name]["tokens_per_s_all_runs"] = [r["tokens_per_s"] for r in results]
        report[name]["tokens_per_cpu_s"] = max(r["tokens_per_cpu_s"] for r in results)
        report[name]["tokens_per_cpu_s_all_runs"] = [r["tokens_per_cpu_s"] for r in results]
    report["mixed_over_one_at_a_time"] = round(
        report["mixed"]["tokens_per_s"] / report["one_adapter_at_a_time"]["tokens_per_s"], 2
    )
    report["server_over_generate"] = round(
        report["mixed"]["tokens_per_s"] / report["generate_direct"]["tokens_per_s"], 2
    )
    report["scheduler_over_generate"] = round(
        report["scheduler_direct"]["tokens_per_s"] / report["generate_direct"]["tokens_per_s"], 2
    )
    for ratio, (a, b) in {
        "mixed_over_one_at_a_time_cpu": ("mixed", "one_adapter_at_a_time"),
        "server_over_generate_cpu": ("mixed", "generate_direct"),
        "scheduler_over_generate_cpu": ("scheduler_direct", "generate_direct"),
    }.items():  # the same ratios in tokens per CPU second of this process (best run of each)
        report[ratio] = round(report[a]["tokens_per_cpu_s"] / report[b]["tokens_per_cpu_s"], 2)
    latency_jobs = jobs[: args.latency_requests or len(jobs)]
    report["latency"] = {
        str(c): serve_run(
            clients, model, tokenizer, latency_jobs, c, n, sampling=sampling, mix_adapters=True, stream=True
        )
        for c in args.concurrency
    }
    report["targets"] = {"mixed_over_one_at_a_time": ">= 4", "server_over_generate": ">= 0.8"}
    clients.shutdown()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        atomic_write_bytes(args.out, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
