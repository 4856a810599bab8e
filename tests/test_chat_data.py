"""Conversational data (TRL's `messages` and conversational prompt/completion) and the adapter's saved prompt format:
loss on assistant turns through the template's end-of-turn token, prompts for scoring, every bad record, and the
format read back by generate, eval, serve and PEFT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

from prefixtune import cli, data, peft_format
from prefixtune.errors import PrefixTuneError
from prefixtune.inference import adapter_formats, choose_format, saved_format
from prefixtune.methods.registry import build_method, load_trained
from prefixtune.model import PrefixModel
from prefixtune.prefix import PrefixConfig
from prefixtune.serve import create_app
from tiny import tiny
from tiny_tokenizer import make_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TALK = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "name: Blue Spice"},
    {"role": "assistant", "content": "A coffee shop."},
    {"role": "user", "content": "area?"},
    {"role": "assistant", "content": "city centre"},
]


def chatml_tokenizer() -> Any:
    """The tests' byte-level tokenizer with ChatML: <|im_end|> ends a turn, <eos> stays the EOS."""
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def tok() -> Any:
    return chatml_tokenizer()


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat-model")
    tokenizer = chatml_tokenizer()
    torch.manual_seed(0)
    model = tiny("llama-gqa")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def trained_text(tokenizer: Any, enc: data.EncodedExample) -> list[str]:
    """The decoded runs of tokens that carry loss."""
    runs, current = [], []
    for token, label in zip(enc.input_ids, enc.labels):
        if label != data.IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [tokenizer.decode(current)], []
    return runs + ([tokenizer.decode(current)] if current else [])


# ----- records and token ids --------------------------------------------------------------------------------------


def test_messages_train_every_assistant_turn_through_its_end_of_turn(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TALK}])
    [example] = data.load_dataset(str(path), split=None)
    assert example.target == "city centre" and example.references == ["city centre"]
    assert example.messages == TALK[:-1]
    [enc], stats = data.encode(data.training_pairs([example]), tok, max_length=256)
    assert stats.truncated == 0
    # both answers, each through <|im_end|>; no system/user text, no role headers, not the newline after the turn
    assert trained_text(tok, enc) == ["A coffee shop.<|im_end|>", "city centre<|im_end|>"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end != tok.eos_token_id and tok.eos_token_id not in enc.input_ids  # the turn's end, not the EOS
    assert enc.input_ids == tok(tok.apply_chat_template(TALK, tokenize=False), add_special_tokens=False)["input_ids"]


def test_scoring_prompt_is_everything_before_the_last_answer_with_the_generation_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TALK}])
    [example] = data.load_dataset(str(path), split=None)
    [enc], _ = data.encode([example], tok, max_length=256)
    [prompt], _ = data.encode_prompts([example], tok)
    assert prompt == enc.input_ids[: enc.prompt_length]  # the eval prompt is the training prefix
    assert tok.decode(prompt).endswith("<|im_start|>user\narea?<|im_end|>\n<|im_start|>assistant\n")
    assert json.loads(example.source) == TALK[:-1]
    assert data.stop_ids(tok, True) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def test_conversational_prompt_completion_trains_the_completion_only(tmp_path, tok):
    prompt = TALK[:4]  # holds an assistant turn: the prompt's turns carry no loss
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": [TALK[4]]}])
    [example] = data.load_dataset(str(path), split=None)
    assert example.loss_from == 4 and example.target == "city centre"
    [enc], _ = data.encode(data.training_pairs([example]), tok, max_length=256)
    assert trained_text(tok, enc) == ["city centre<|im_end|>"]


def test_plain_sources_under_chat_template_end_with_the_end_of_turn_token(tok):
    [enc], _ = data.encode([data.Example("name: Blue Spice", "A coffee shop.")], tok, max_length=64, chat_template=True)
    assert enc.input_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(enc.input_ids[enc.prompt_length :]) == "A coffee shop.<|im_end|>"
    [plain], _ = data.encode([data.Example("name: Blue Spice", "A coffee shop.")], tok, max_length=64)
    assert plain.input_ids[-1] == tok.eos_token_id  # the plain format keeps the EOS


def test_same_context_records_group_and_train_each_answer(tmp_path, tok):
    records = [{"messages": TALK[:2] + [{"role": "assistant", "content": a}]} for a in ("one", "two")]
    [example] = data.load_dataset(str(write_jsonl(tmp_path / "g.jsonl", records)), split=None)
    assert example.references == ["one", "two"]
    pairs = data.training_pairs([example])
    assert [p.target for p in pairs] == ["one", "two"] and all(p.messages == TALK[:2] for p in pairs)


def test_long_conversations_are_cut_at_their_end_and_counted(tmp_path, tok):
    [example] = data.load_dataset(str(write_jsonl(tmp_path / "c.jsonl", [{"messages": TALK}])), split=None)
    [enc], stats = data.encode([example], tok, max_length=20)
    assert len(enc.input_ids) == 20 and stats.truncated == 1 and stats.target_truncated == 1


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}, r"role 'bot'"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]}, "be a string"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]}, "must be a string"),
        ({"messages": TALK + [{"role": "user", "content": "more?"}]}, "ends with a user turn"),
        ({"messages": "hello"}, "non-empty list"),
        ({"messages": []}, "non-empty list"),
        ({"prompt": TALK[:2], "completion": [{"role": "user", "content": "x"}]}, r"completion\[0\] has role 'user'"),
        ({"prompt": TALK[:2], "completion": "a string"}, "non-empty list"),
        ({"prompt": "text", "completion": [TALK[2]]}, "must be a list of messages like the file's first record"),
    ],
)
def test_bad_chat_records_name_the_file_and_line(tmp_path, record, message):
    good = {"prompt": TALK[:2], "completion": [TALK[2]]} if "prompt" in record else {"messages": TALK}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(PrefixTuneError, match=rf"bad\.jsonl:2: .*{message}"):
        data.load_dataset(str(path), split=None)
    (tmp_path / "bad.json").write_text(json.dumps([good, record]))
    with pytest.raises(PrefixTuneError, match=rf"bad\.json: record 1: .*{message}"):
        data.load_dataset(str(tmp_path / "bad.json"), split=None)


def test_plain_records_after_chat_records_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": TALK}, {"input": "a", "target": "b"}])
    with pytest.raises(PrefixTuneError, match=r"mixed\.jsonl:2: no 'messages' field .*same form"):
        data.load_dataset(str(path), split=None)


def test_chat_records_on_a_tokenizer_without_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TALK}])
    examples = data.load_dataset(str(path), split=None)
    with pytest.raises(
        PrefixTuneError, match=r"chat\.jsonl:1: .*needs a tokenizer with a chat template.*chat_template"
    ):
        data.encode(examples, make_tokenizer(), max_length=64)
    with pytest.raises(PrefixTuneError, match=r"chat\.jsonl:1: .*needs a tokenizer with a chat template"):
        data.encode_prompts(examples, make_tokenizer())


def test_a_template_that_is_not_prefix_stable_is_refused(tmp_path):
    tokenizer = chatml_tokenizer()
    tokenizer.chat_template = "{{ messages|length }}" + CHATML  # earlier turns render differently later
    [example] = data.load_dataset(str(write_jsonl(tmp_path / "c.jsonl", [{"messages": TALK}])), split=None)
    with pytest.raises(PrefixTuneError, match=r"c\.jsonl:1: the chat template is not prefix-stable"):
        data.encode([example], tokenizer, max_length=256)


def test_a_template_ending_turns_with_eos_trains_the_eos(tmp_path):
    tokenizer = make_tokenizer(chat=True)  # its template ends every turn with <eos>
    [example] = data.load_dataset(str(write_jsonl(tmp_path / "c.jsonl", [{"messages": TALK[1:3]}])), split=None)
    [enc], _ = data.encode([example], tokenizer, max_length=256)
    assert trained_text(tokenizer, enc) == ["A coffee shop.<eos>"]
    assert data.stop_ids(tokenizer, True) == [tokenizer.eos_token_id]


# ----- the adapter's prompt format: training writes it, PEFT ignores it, generate/eval/serve read it ---------------


@pytest.fixture(scope="module")
def chat_run(chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("chat-run")
    records = [
        {"messages": [{"role": "user", "content": f"name: {n}"}, {"role": "assistant", "content": f"{n} is a shop."}]}
        for n in ("Blue Spice", "Golden Curry", "Cat Park", "River Mat")
    ] + [{"messages": TALK}]
    chat_data = write_jsonl(work / "chat.jsonl", records)
    out = work / "run"
    args = ["train", "--model", str(chat_model_dir), "--data", str(chat_data), "--out", str(out), "--quiet"]
    args += ["--batch-size", "4", "train_split=all", "max_steps=2", "warmup_steps=1", "num_virtual_tokens=2"]
    assert cli.main(args) == 0
    return {"out": out, "data": chat_data, "work": work}


def test_training_on_chat_data_saves_the_chat_format(chat_run):
    saved = json.loads((chat_run["out"] / "adapter_config.json").read_text())["prefixtune"]["prompt_format"]
    assert saved == {"type": "chat_template", "end_of_turn": "<|im_end|>"}
    assert saved_format(str(chat_run["out"])) == data.PromptFormat("chat_template")


def test_peft_reads_an_adapter_carrying_its_prompt_format(chat_run, chat_model_dir):
    config = peft.PeftConfig.from_pretrained(str(chat_run["out"]))
    assert config.peft_type == peft.PeftType.PREFIX_TUNING and config.num_virtual_tokens == 2
    base = AutoModelForCausalLM.from_pretrained(chat_model_dir)
    loaded = peft.PeftModel.from_pretrained(base, str(chat_run["out"]))
    assert loaded.peft_config["default"].num_virtual_tokens == 2


def test_eval_on_chat_data_uses_the_chat_template(chat_run, chat_model_dir, capsys):
    args = ["eval", "--model", str(chat_model_dir), "--adapter", str(chat_run["out"]), "--data", str(chat_run["data"])]
    predictions = chat_run["work"] / "pred.jsonl"
    assert cli.main([*args, "--metrics", "bleu,perplexity", "--predictions", str(predictions)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["prompt_format"] == "chat_template" and result["examples"] == 5
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert rows[-1]["references"] == ["city centre"] and json.loads(rows[-1]["source"]) == TALK[:-1]


def test_generate_applies_the_saved_format_unless_told_otherwise(chat_run, chat_model_dir, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("name: Blue Spice\nname: Cat Park\n")
    base = ["generate", "--model", str(chat_model_dir), "--adapter", str(chat_run["out"]), "--input-file", str(prompts)]
    base += ["--max-new-tokens", "6"]
    outputs = {}
    for name, extra in {"saved": [], "chat": ["--chat-template"], "plain": ["--prompt-format", "plain"]}.items():
        assert cli.main([*base, *extra]) == 0
        outputs[name] = capsys.readouterr().out
    assert outputs["saved"] == outputs["chat"]
    formats = adapter_formats([str(chat_run["out"])], ["default"], None)
    assert formats["default"] == data.PromptFormat("chat_template") and formats["__base__"].type == "plain"
    assert adapter_formats([str(chat_run["out"])], ["default"], "plain")["default"].type == "plain"
    assert cli.main([*base, "--raw", "--chat-template"]) == 2  # two explicit formats


def test_adapters_without_the_field_keep_the_plain_format(tmp_path, tok):
    model = tiny("llama-gqa")
    wrapped = PrefixModel(model)
    wrapped.add_adapter("old", PrefixConfig(num_virtual_tokens=2, init="random", reparameterize=False))
    wrapped.save_adapter(tmp_path / "old", "old")
    assert peft_format.read_prompt_format(tmp_path / "old") is None
    assert choose_format(None, saved_format(str(tmp_path / "old"))) == data.PromptFormat("plain")
    raw = json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    raw["prefixtune"]["prompt_format"] = {"type": "plain", "template": "Q: {input} A:"}
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(PrefixTuneError, match="plain template 'Q: {input} A:' differs"):
        saved_format(str(tmp_path / "old"))


def test_lora_adapter_config_with_the_field_still_loads_in_peft(tmp_path):
    trained = build_method("lora", tiny("llama-gqa"), {"r": 2})
    trained.save_trained(tmp_path / "lora")
    assert peft_format.write_prompt_format(tmp_path / "lora", data.PromptFormat("plain").to_dict())
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "lora")).r == 2
    load_trained(tiny("llama-gqa"), tmp_path / "lora")
    assert saved_format(str(tmp_path / "lora")) == data.PromptFormat("plain")


# ----- serve ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A server whose model always answers <|im_end|>: adapters "chat" (saved chat format), "plain", "old" (none)."""
    tokenizer = chatml_tokenizer()
    torch.manual_seed(0)
    model = tiny("llama-gqa")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # every position's likeliest next token is <|im_end|>
        model.lm_head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[end] = 10.0
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    adapters = tmp_path_factory.mktemp("adapters")
    wrapped = PrefixModel(model)
    for name in ("chat", "plain", "old"):
        wrapped.add_adapter(name, PrefixConfig(num_virtual_tokens=2, init="random", reparameterize=False))
        wrapped.save_adapter(adapters / name, name)
        wrapped.delete_adapter(name)
    peft_format.write_prompt_format(adapters / "chat", data.PromptFormat("chat_template").to_dict(tokenizer))
    peft_format.write_prompt_format(adapters / "plain", data.PromptFormat("plain").to_dict())
    wrapped.detach()
    app = create_app(model, tokenizer, adapters_dir=adapters, model_name="base")
    with TestClient(app) as client:
        yield client, tokenizer


def test_models_list_the_prompt_format(chat_server):
    client, _ = chat_server
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed["chat"]["prompt_format"] == {"type": "chat_template", "end_of_turn": "<|im_end|>"}
    assert listed["plain"]["prompt_format"]["type"] == "plain"
    assert listed["old"]["prompt_format"] is None and listed["base"]["prompt_format"] is None


def test_completions_format_text_only_when_asked(chat_server):
    client, tokenizer = chat_server

    def usage(model: str, prompt: Any, **extra: Any) -> int:
        body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, **extra}
        reply = client.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        return reply.json()["usage"]["prompt_tokens"]

    text = "name: Blue Spice"
    plain_ids = data.encode_prompts([text], tokenizer)[0][0]
    chat_ids = data.encode_prompts([text], tokenizer, chat_template=True)[0][0]
    assert usage("plain", text) == len(tokenizer(text)["input_ids"])  # default: raw, as OpenAI means it
    assert usage("plain", text, prompt_format="adapter") == len(plain_ids)
    assert usage("chat", text, prompt_format="adapter") == len(chat_ids)
    assert usage("old", text, prompt_format="adapter") == len(tokenizer(text)["input_ids"])  # none saved: raw
    assert usage("base", text, prompt_format="chat_template") == len(chat_ids)
    echoed = client.post(
        "/v1/completions",
        json={"model": "chat", "prompt": text, "max_tokens": 1, "echo": True, "prompt_format": "adapter"},
    ).json()
    assert echoed["choices"][0]["text"].startswith("<|im_start|>user\nname: Blue Spice<|im_end|>")
    bad = client.post("/v1/completions", json={"model": "chat", "prompt": [5, 6], "prompt_format": "adapter"})
    assert bad.status_code == 400 and "formats text prompts" in bad.json()["error"]["message"]


def test_chat_and_chat_formatted_completions_stop_at_the_end_of_turn(chat_server):
    client, _ = chat_server
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0},
    ).json()
    assert chat["choices"][0]["finish_reason"] == "stop" and chat["usage"]["completion_tokens"] == 1
    body = {"model": "chat", "prompt": "hi", "max_tokens": 3, "temperature": 0}
    raw = client.post("/v1/completions", json=body).json()  # raw completions: <|im_end|> is just a token
    assert raw["choices"][0]["finish_reason"] == "length" and raw["usage"]["completion_tokens"] == 3
    formatted = client.post("/v1/completions", json={**body, "prompt_format": "adapter"}).json()
    assert formatted["choices"][0]["finish_reason"] == "stop" and formatted["usage"]["completion_tokens"] == 1


def test_an_adapter_with_a_format_this_version_cannot_apply_is_not_loaded(chat_server, tmp_path):
    client, _ = chat_server
    adapters = Path(client.app.state.serve.registry.adapters_dir)
    wrapped = PrefixModel(tiny("llama-gqa"))
    wrapped.add_adapter("odd", PrefixConfig(num_virtual_tokens=2, init="random", reparameterize=False))
    wrapped.save_adapter(adapters / "odd", "odd")
    peft_format.write_prompt_format(adapters / "odd", {"type": "alpaca"})
    reply = client.post("/v1/load_adapter", json={"name": "odd"})
    assert reply.status_code == 400 and "'alpaca'" in reply.json()["error"]["message"]
    assert "odd" not in {m["id"] for m in client.get("/v1/models").json()["data"]}
