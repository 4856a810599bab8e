"""What evaluation clients need from the server: token-id prompts, echo and log-probabilities in OpenAI's shapes,
/tokenize and /detokenize, vLLM's adapter routes, and lm-evaluation-harness itself run against a live server.

Every log-probability is checked against the PrefixModel computed directly (log_softmax of its logits for the
same adapter, an independent copy of the model), to 1e-4.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import lm_eval
import openai
import pytest
import torch
import transformers as tf
from lm_eval.tasks import TaskManager

from lm_eval_tasks import CHOICES, TASKS, write_tasks
from prefixtune.model import BASE, PrefixModel
from prefixtune.serve import create_app
from prefixtune.serve.sampling import TextStream
from serve_fixtures import LiveServer, oracle, save_adapters

ADAPTERS = {"beta": (5, "peft"), "gamma": (3, "zero")}
MODELS = ["beta", "gamma", "tiny"]  # "tiny": the base model, no prefix
TOL = 1e-4


@pytest.fixture(scope="module")
def served(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    # Random prefixes from a fixed seed, whatever ran before in this process. With seed 19 beta's greedy
    # completion of pt_gen's first question stops at the generation config's end-of-sequence id (2, <bos> in
    # this tokenizer; the tokenizer's own is 1): the lm-eval test sees the server stop where generate would.
    torch.manual_seed(19)
    adapters = save_adapters(model, tmp_path_factory.mktemp("eval_adapters"), ADAPTERS)
    solo = oracle(model, adapters).eval()
    app = create_app(model, tokenizer, adapters_dir=adapters, model_name="tiny", max_batch_size=8)
    with LiveServer(app) as server:
        yield {"server": server, "tokenizer": tokenizer, "solo": solo, "model_dir": model_dir, "app": app}


def post(served: dict[str, Any], path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(served["server"].url + path, json=body, timeout=60)


def completion(served: dict[str, Any], **fields: Any) -> dict[str, Any]:
    body = {"model": "beta", "temperature": 0.0, "ignore_eos": True, **fields}
    r = post(served, "/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def direct(solo: PrefixModel, model: str, ids: list[int]) -> torch.Tensor:
    """log_softmax of the PrefixModel's logits (T, V) for `ids` on `model`'s adapter."""
    adapter = BASE if model == "tiny" else model
    with torch.no_grad():
        out = solo(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            adapter_names=[adapter],
        )
    return torch.log_softmax(out.logits[0].float(), dim=-1)


def token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token])


def greedy_ids(served: dict[str, Any], model: str, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after `ids` by the PrefixModel's own generate (past the end-of-sequence token)."""
    out = served["solo"].generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        adapter_names=[BASE if model == "tiny" else model],
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[0, len(ids) :].tolist()


# ----- prompts --------------------------------------------------------------------------------------------------


def test_the_four_prompt_forms(served: dict[str, Any]) -> None:
    """Text, token ids, a list of texts and a list of token-id lists: one choice per prompt, the same text for the
    same tokens."""
    texts = ["the cat sat on the mat", "A coffee shop in the city"]
    ids = [served["tokenizer"](t)["input_ids"] for t in texts]
    by_text = [completion(served, prompt=t, max_tokens=5)["choices"][0]["text"] for t in texts]
    assert completion(served, prompt=ids[0], max_tokens=5)["choices"][0]["text"] == by_text[0]
    for prompt in (texts, ids):
        answer = completion(served, prompt=prompt, max_tokens=5, n=2)
        assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in answer["choices"]] == [by_text[0], by_text[0], by_text[1], by_text[1]]
        assert answer["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])


# ----- completions: echo and logprobs ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scores_the_prompt_like_the_prefix_model(served: dict[str, Any], model: str, max_tokens: int) -> None:
    """lm-eval's loglikelihood request (echo, logprobs, 0 or 1 new token): every prompt token's log-probability and
    the 5 likeliest at each position equal the PrefixModel's own."""
    tokenizer = served["tokenizer"]
    ids = tokenizer("the cat sat on the mat and the dog ran in the park")["input_ids"]
    answer = completion(served, model=model, prompt=ids, max_tokens=max_tokens, echo=True, logprobs=5)
    choice = answer["choices"][0]
    logprobs = choice["logprobs"]
    expected = direct(served["solo"], model, ids)
    generated = len(logprobs["tokens"]) - len(ids)
    assert generated == max_tokens and answer["usage"]["completion_tokens"] == max_tokens
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["tokens"][: len(ids)] == [token_text(tokenizer, t) for t in ids]
    for t in range(1, len(ids) + generated):
        token = ids[t] if t < len(ids) else expected[-1].argmax().item()  # greedy: the likeliest next token
        assert abs(logprobs["token_logprobs"][t] - expected[t - 1, token].item()) < TOL, t
        values, index = expected[t - 1].topk(5)
        top = logprobs["top_logprobs"][t]
        wanted = {token_text(tokenizer, i): v for i, v in zip(index.tolist(), values.tolist())}
        assert set(top) == set(wanted) | {logprobs["tokens"][t]}
        for text, value in wanted.items():
            assert abs(top[text] - value) < TOL
    assert choice["text"].startswith(tokenizer.decode(ids))
    lengths = [len(t) for t in logprobs["tokens"]]
    assert logprobs["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))]
    assert choice["finish_reason"] == "length"


def test_generated_logprobs_equal_the_prefix_model_streamed_or_not(served: dict[str, Any]) -> None:
    tokenizer = served["tokenizer"]
    prompt = "The Golden Curry is a family"
    ids = tokenizer(prompt)["input_ids"]
    whole = completion(served, model="gamma", prompt=prompt, max_tokens=8, logprobs=3)["choices"][0]
    new = greedy_ids(served, "gamma", ids, 8)
    logprobs = whole["logprobs"]
    assert logprobs["tokens"] == [token_text(tokenizer, t) for t in new]
    expected = direct(served["solo"], "gamma", ids + new)
    for i, token in enumerate(new):
        assert abs(logprobs["token_logprobs"][i] - expected[len(ids) + i - 1, token].item()) < TOL
        assert len(logprobs["top_logprobs"][i]) <= 4
    with httpx.stream(
        "POST",
        served["server"].url + "/v1/completions",
        json={
            "model": "gamma",
            "prompt": prompt,
            "max_tokens": 8,
            "logprobs": 3,
            "stream": True,
            "temperature": 0.0,
            "ignore_eos": True,
        },
        timeout=60,
    ) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = {k: sum((c["choices"][0]["logprobs"][k] for c in chunks), []) for k in logprobs}
    assert streamed == logprobs
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]


def test_echo_streams_the_prompt_first(served: dict[str, Any]) -> None:
    body = {
        "model": "beta",
        "prompt": "the dog ran",
        "max_tokens": 4,
        "echo": True,
        "logprobs": 1,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    whole = completion(served, **body)["choices"][0]
    with httpx.stream("POST", served["server"].url + "/v1/completions", json=body | {"stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["text"].startswith("the dog ran")
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    tokens = sum((c["choices"][0]["logprobs"]["tokens"] for c in chunks), [])
    offsets = sum((c["choices"][0]["logprobs"]["text_offset"] for c in chunks), [])
    assert tokens == whole["logprobs"]["tokens"] and offsets == whole["logprobs"]["text_offset"]


def test_the_openai_client_reads_them(served: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=served["server"].url + "/v1", api_key="unused", max_retries=0, timeout=60)
    ids = served["tokenizer"]("the cat sat")["input_ids"]
    answer = client.completions.create(model="beta", prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0)
    assert answer.choices[0].logprobs.token_logprobs[0] is None
    assert len(answer.choices[0].logprobs.top_logprobs) == len(ids)
    tokens = (
        client.completions.create(
            model="beta", prompt="the cat", max_tokens=2, logprobs=0, extra_body={"return_tokens_as_token_ids": True}
        )
        .choices[0]
        .logprobs.tokens
    )
    assert all(t.startswith("token_id:") and t[9:].isdigit() for t in tokens)


def test_text_that_ends_inside_a_character_is_kept(served: dict[str, Any]) -> None:
    """A completion whose last token ends inside a character: its text is still what decoding adds (the unfinished
    character as U+FFFD, as a whole decode gives it), not cut back to the last whole character."""
    tokenizer = served["tokenizer"]
    ids = tokenizer("the é", add_special_tokens=False)["input_ids"]  # 'é' is two byte tokens here
    assert tokenizer.decode(ids[-1:]) == "\ufffd"
    stream = TextStream(tokenizer, [])
    text = "".join(stream.push(t)[0] for t in ids[:-1])
    assert text + stream.flush() == tokenizer.decode(ids[:-1])
    stopped = TextStream(tokenizer, ["e \ufffd"])  # a stop string the held-back tail completes is still cut
    text = "".join(stopped.push(t)[0] for t in ids[:-1])
    assert text + stopped.flush() == "th"


# ----- chat ---------------------------------------------------------------------------------------------------


def test_chat_logprobs_in_openai_shape(served: dict[str, Any]) -> None:
    tokenizer = served["tokenizer"]
    messages = [{"role": "user", "content": "the cat sat on the mat"}]
    client = openai.OpenAI(base_url=served["server"].url + "/v1", api_key="unused", max_retries=0, timeout=60)
    answer = client.chat.completions.create(
        model="beta",
        messages=messages,
        max_tokens=12,
        logprobs=True,
        top_logprobs=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == 12
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = direct(served["solo"], "beta", ids)
    first = content[0]
    assert abs(first.logprob - expected[-1].max().item()) < TOL  # greedy: the likeliest token, at its logprob
    assert [t.logprob for t in first.top_logprobs] == sorted((t.logprob for t in first.top_logprobs), reverse=True)
    assert len(first.top_logprobs) == 3 and abs(first.top_logprobs[0].logprob - first.logprob) < TOL
    specials = set(tokenizer.all_special_tokens)
    joined = b"".join(bytes(c.bytes) for c in content if c.token not in specials)
    assert joined.decode("utf-8", errors="replace") == answer.choices[0].message.content


def test_chat_logprobs_each_token_equal_the_prefix_model(served: dict[str, Any]) -> None:
    """Each generated token of a chat completion, against the PrefixModel on the rendered prompt (/tokenize of
    the messages gives the same ids as the template here)."""
    tokenizer = served["tokenizer"]
    messages = [{"role": "user", "content": "A coffee shop"}]
    r = post(
        served,
        "/v1/chat/completions",
        {
            "model": "gamma",
            "messages": messages,
            "max_tokens": 6,
            "logprobs": True,
            "temperature": 0.0,
            "ignore_eos": True,
        },
    )
    content = r.json()["choices"][0]["logprobs"]["content"]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = post(served, "/tokenize", {"messages": messages}).json()["tokens"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    new = greedy_ids(served, "gamma", ids, 6)
    expected = direct(served["solo"], "gamma", ids + new)
    for i, (entry, token) in enumerate(zip(content, new)):
        assert entry["top_logprobs"] == []
        assert entry["token"] == token_text(tokenizer, token)
        assert abs(entry["logprob"] - expected[len(ids) + i - 1, token].item()) < TOL


# ----- tokenize, detokenize, vLLM's adapter routes -------------------------------------------------------------


def test_tokenize_and_detokenize_in_vllms_shape(served: dict[str, Any]) -> None:
    tokenizer = served["tokenizer"]
    text = "The Golden Curry is near the river."
    r = post(served, "/tokenize", {"model": "beta", "prompt": text})
    assert r.status_code == 200, r.text
    ids = tokenizer(text)["input_ids"]
    limits = {m["id"]: m["max_model_len"] for m in httpx.get(served["server"].url + "/v1/models").json()["data"]}
    assert r.json() == {"count": len(ids), "max_model_len": limits["beta"], "tokens": ids, "token_strs": None}
    strs = post(served, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert strs["max_model_len"] == limits["tiny"] and strs["token_strs"] == [token_text(tokenizer, t) for t in ids]
    assert post(served, "/detokenize", {"model": "gamma", "tokens": ids}).json() == {"prompt": text}
    info = httpx.get(served["server"].url + "/tokenizer_info").json()
    assert (info["eos_token"], info["bos_token"], info["model_max_length"]) == ("<eos>", "<bos>", limits["tiny"])


def test_vllms_lora_adapter_routes(served: dict[str, Any]) -> None:
    before = completion(served, model="gamma", prompt="the cat", max_tokens=4)["choices"][0]["text"]
    r = post(served, "/v1/unload_lora_adapter", {"lora_name": "gamma"})
    assert r.status_code == 200 and r.json()["status"] == "unloaded"
    assert post(served, "/v1/completions", {"model": "gamma", "prompt": "the cat"}).status_code == 404
    deadline = time.monotonic() + 30
    while (r := post(served, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": "gamma"})).status_code == 409:
        assert time.monotonic() < deadline, "the unloaded adapter never drained"
        time.sleep(0.05)
    assert r.status_code == 200 and r.json()["num_virtual_tokens"] == ADAPTERS["gamma"][0]
    assert completion(served, model="gamma", prompt="the cat", max_tokens=4)["choices"][0]["text"] == before


# ----- bad input ------------------------------------------------------------------------------------------------

BAD = [
    (
        "/v1/completions",
        {"prompt": [5, 6, 99999]},
        400,
        "token id 99999 at position 2, outside the model's vocabulary",
        "prompt",
    ),
    ("/v1/completions", {"prompt": [[5, 6], [7, 300]]}, 400, "prompt 1 has token id 300", "prompt"),
    ("/v1/completions", {"prompt": [[5], []]}, 400, "prompt 1 is empty", "prompt"),
    ("/v1/completions", {"prompt": [5, -1]}, 422, "token ids are 0 or more", "prompt"),
    ("/v1/completions", {"prompt": []}, 422, "non-empty list", "prompt"),
    ("/v1/completions", {"prompt": ["the cat", 5]}, 422, "mixes text and token ids", "prompt"),
    ("/v1/completions", {"prompt": [[5, 6], "the cat"]}, 422, "mixes text and token-id lists", "prompt"),
    ("/v1/completions", {"prompt": [[5, "6"]]}, 422, "token ids are integers", "prompt"),
    ("/v1/completions", {"prompt": [5, True]}, 422, "token ids are integers", "prompt"),
    ("/v1/completions", {"prompt": [[[5]]]}, 422, "token ids are integers", "prompt"),
    ("/v1/completions", {"prompt": "the cat", "logprobs": 21}, 422, "an integer 0..20", "logprobs"),
    ("/v1/completions", {"prompt": "the cat", "logprobs": -1}, 422, "an integer 0..20", "logprobs"),
    ("/v1/completions", {"prompt": "the cat", "logprobs": True}, 422, "an integer 0..20", "logprobs"),
    ("/v1/completions", {"prompt": "the cat", "max_tokens": 0}, 422, "echo: true", "body"),
    ("/v1/completions", {"prompt": "the cat", "max_tokens": -1, "echo": True}, 422, "max_tokens", "max_tokens"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, 422, "an integer 0..20", "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, 422, "top_logprobs needs logprobs: true", "body"),
    ("/v1/chat/completions", {"logprobs": 3}, 422, "logprobs", "logprobs"),
    ("/tokenize", {}, 422, "either prompt", "body"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 422, "either prompt", "body"),
    ("/tokenize", {"model": "nobody", "prompt": "x"}, 404, "does not exist", "model"),
    ("/detokenize", {"tokens": [5, 99999]}, 400, "outside the model's vocabulary", "tokens"),
    ("/detokenize", {"tokens": [-3]}, 422, "token ids are 0 or more", "tokens"),
    ("/detokenize", {"tokens": "5 6"}, 422, "a list of token ids", "tokens"),
]


def test_bad_input_is_4xx_and_disturbs_nothing(served: dict[str, Any]) -> None:
    """Each bad request gets its 4xx and a message that says what to do, while a streaming completion runs on
    beside them and ends exactly as it would alone."""
    tokenizer = served["tokenizer"]
    ids = tokenizer("the dog ran in the park")["input_ids"]
    texts: list[str] = []

    def stream() -> None:
        body = {
            "model": "beta",
            "prompt": ids,
            "max_tokens": 30,
            "stream": True,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        with httpx.stream("POST", served["server"].url + "/v1/completions", json=body, timeout=60) as r:
            texts.extend(
                json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines() if line.startswith("data: {")
            )

    runner = threading.Thread(target=stream)
    runner.start()
    for path, fields, status, words, param in BAD:
        base = (
            {"model": "beta", "messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"model": "beta"}
        )
        body = fields if path in ("/tokenize", "/detokenize") else base | fields
        r = post(served, path, body)
        assert r.status_code == status, (path, fields, r.text)
        assert words in r.json()["error"]["message"], (path, fields, r.text)
        assert r.json()["error"]["param"] == param, (path, fields, r.text)
    runner.join(60)
    expected = tokenizer.decode(ids + greedy_ids(served, "beta", ids, 30), skip_special_tokens=True)
    assert "".join(texts) == expected[len(tokenizer.decode(ids, skip_special_tokens=True)) :]


# ----- the model thread's lock -----------------------------------------------------------------------------------

HOLD = 3.0  # seconds one detokenization on the model thread takes, once armed


class SlowDecode:
    """The model thread's tokenizer, slow on demand: once armed, its next decode takes HOLD seconds (inside the
    scheduler's per-token detokenization, i.e. while the model thread holds its tokenizer lock)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.armed, self.holding = threading.Event(), threading.Event()

    def decode(self, *args: Any, **kwargs: Any) -> str:
        if self.armed.is_set():
            self.armed.clear()
            self.holding.set()
            time.sleep(HOLD)
        return self.tokenizer.decode(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def test_handlers_never_wait_on_the_model_threads_tokenizer(served: dict[str, Any]) -> None:
    """While the model thread is stuck in one token's detokenization, a new completion is tokenized and /health,
    /v1/models and /tokenize answer at once: no handler waits on a lock the model thread holds per token."""
    tokenizer = tf.AutoTokenizer.from_pretrained(served["model_dir"])
    app = create_app(tf.AutoModelForCausalLM.from_pretrained(served["model_dir"]).eval(), tokenizer, model_name="t")
    scheduler = app.state.serve.scheduler
    slow = scheduler.tokenizer = SlowDecode(scheduler.tokenizer)
    with LiveServer(app) as server:
        started, answers = threading.Event(), []

        def generate() -> None:
            body = {"model": "t", "prompt": "the cat", "max_tokens": 12, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    started.set()
                    answers.append(line)

        def another() -> None:
            answers.append(
                httpx.post(server.url + "/v1/completions", json={"model": "t", "prompt": "a dog"}, timeout=60)
            )

        first = threading.Thread(target=generate)
        first.start()
        assert started.wait(30)
        slow.armed.set()
        assert slow.holding.wait(30)  # the model thread is inside a detokenization for HOLD seconds
        second = threading.Thread(target=another)
        second.start()
        time.sleep(0.3)  # the new completion is being handled: its prompt tokenized
        began = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 200
        assert httpx.post(server.url + "/tokenize", json={"prompt": "the cat"}, timeout=30).status_code == 200
        waited = time.monotonic() - began
        first.join(60)
        second.join(60)
    assert waited < HOLD / 2, f"the handlers waited {waited:.2f} s behind the model thread"
    assert answers[-1].status_code == 200 and any(a == "data: [DONE]" for a in answers[:-1])


def test_a_tokenizer_that_cannot_be_copied_is_shared(served: dict[str, Any]) -> None:
    tokenizer = tf.AutoTokenizer.from_pretrained(served["model_dir"])

    def refuse(self: Any, memo: Any) -> Any:
        raise TypeError("this tokenizer cannot be copied")

    tokenizer.__class__ = type("Uncopyable", (type(tokenizer),), {"__deepcopy__": refuse})
    model = tf.AutoModelForCausalLM.from_pretrained(served["model_dir"]).eval()
    app = create_app(model, tokenizer, model_name="t")
    assert app.state.serve.tokenizer.shared
    with LiveServer(app) as server:
        body = {"model": "t", "prompt": "the cat", "max_tokens": 3, "echo": True, "logprobs": 1, "ignore_eos": True}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) == 3 + 3, r.text


# ----- lm-evaluation-harness -------------------------------------------------------------------------------------

def tokenize_calls(served: dict[str, Any]) -> float:
    metrics = httpx.get(served["server"].url + "/metrics").text
    line = 'prefixtune_requests_total{route="/tokenize",status="200"} '
    return sum(float(row.split()[-1]) for row in metrics.splitlines() if row.startswith(line))


@pytest.mark.parametrize("tokenizer_args", ["", ",tokenizer={dir},tokenizer_backend=huggingface"])
def test_lm_eval_local_completions(served: dict[str, Any], tmp_path: Path, tokenizer_args: str) -> None:
    """The real lm-eval client (`local-completions`, its Python API) with its default settings (token-id prompts,
    batch size 1), on a prefix: a generate_until task gets the PrefixModel's greedy text; a multiple_choice task
    gets, for every choice, the PrefixModel's own sum of the continuation's log-probabilities (1e-4). Its tokenizer:
    the server's (/tokenizer_info and /tokenize, which lm-eval finds by itself) or the model directory's."""
    model_args = f"model=beta,base_url={served['server'].url}/v1/completions"
    model_args += tokenizer_args.format(dir=served["model_dir"])
    tokenize_calls_before = tokenize_calls(served)
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(write_tasks(tmp_path)), include_defaults=False),
        log_samples=True,
        random_seed=None,  # leave this process's random generators alone (they do not reach the requests)
        numpy_random_seed=None,
        torch_random_seed=None,
    )
    tokenized = tokenize_calls(served) - tokenize_calls_before
    assert tokenized > 0 if not tokenizer_args else tokenized == 0  # whose tokenizer lm-eval used
    tokenizer = served["tokenizer"]
    correct = 0
    for sample in out["samples"]["pt_choice"]:
        doc = sample["doc"]
        context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice, response in zip(doc["choices"], sample["resps"]):
            whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            logprobs = direct(served["solo"], "beta", whole)
            expected = sum(logprobs[t - 1, whole[t]].item() for t in range(len(context), len(whole)))
            assert abs(float(response[0][0]) - expected) < TOL, (doc, choice)
            scores.append(expected)
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    assert out["results"]["pt_choice"]["acc,none"] == pytest.approx(correct / len(CHOICES))
    # the server stops at the tokenizer's end-of-sequence id and at the generation config's (here <bos>'s id too)
    configured = served["solo"].base_model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}
    for sample in out["samples"]["pt_gen"]:
        context = tokenizer(sample["doc"]["question"], add_special_tokens=False)["input_ids"]
        new = greedy_ids(served, "beta", context, 6)
        new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
        text = tokenizer.decode(context + new, skip_special_tokens=True)[len(tokenizer.decode(context)) :]
        assert sample["resps"][0][0] == text.split(".")[0], sample["doc"]
