"""Tiny model, tiny word-level tokenizer, saved adapters and a live server on 127.0.0.1 for the serve tests."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any

import torch
import transformers as tf
import uvicorn
from tokenizers import Tokenizer, models, pre_tokenizers

import prefixtune
from prefixtune.model import PrefixModel

WORDS = (
    "the a an of to in on at for with from by and or but not is are was were be been have has had do does did "
    "cat dog bird fish tree house road river city king queen red blue green small big old new fast slow "
    "run walk sing read write eat sleep see hear say go come sun moon star rain snow wind fire stone"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[EOS]"]
# name -> (num_virtual_tokens, position convention)
ADAPTERS = {"alpha": (4, "peft"), "beta": (9, "peft"), "gamma": (3, "zero")}


def tiny_tokenizer() -> tf.PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def tiny_llama(max_positions: int = 4096, seed: int = 0) -> tf.PreTrainedModel:
    """Llama with GQA; a wide init so that greedy tokens vary instead of repeating one id."""
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=0.3,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
    )
    model = tf.LlamaForCausalLM(config).eval()
    model.config._name_or_path = "tiny-llama"
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model


def tiny_gpt2(seed: int = 0) -> tf.PreTrainedModel:
    torch.manual_seed(seed)
    config = tf.GPT2Config(
        vocab_size=len(SPECIAL) + len(WORDS),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        initializer_range=0.3,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = tf.GPT2LMHeadModel(config).eval()
    model.config._name_or_path = "tiny-gpt2"
    return model


def save_adapters(model: tf.PreTrainedModel, directory: Path, adapters: dict[str, tuple[int, str]] = ADAPTERS) -> Path:
    """Random prefixes for `model` saved as DIR/<name>; the model itself is left as it was."""
    work = copy.deepcopy(model)
    wrapped = PrefixModel(work)
    for name, (p, convention) in adapters.items():
        config = prefixtune.PrefixConfig(
            num_virtual_tokens=p, reparameterize=False, init="random", position_convention=convention
        )
        wrapped.add_adapter(name, config)
        with torch.no_grad():
            for param in wrapped.adapters[name].parameters():
                param.mul_(0.5)
        wrapped.save_adapter(directory / name, name)
    wrapped.detach()
    return directory


def oracle(model: tf.PreTrainedModel, directory: Path) -> PrefixModel:
    """An independent copy of the model with every adapter under `directory`, for solo `generate` answers."""
    wrapped = PrefixModel(copy.deepcopy(model))
    for path in sorted(directory.iterdir()):
        if path.is_dir() and (path / "adapter_config.json").exists():
            wrapped.add_adapter(path.name, path)
    return wrapped


def solo_greedy(model: PrefixModel, tokenizer: Any, adapter: str, prompt: str, max_tokens: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        adapter_names=[adapter],
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[0, ids.shape[1] :].tolist()


def continuation(tokenizer: Any, prompt: str, completion_ids: list[int]) -> str:
    """What the completion adds to the prompt's text (OpenAI's `text`: prompt + text reads as one text)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    whole = tokenizer.decode(prompt_ids + completion_ids, skip_special_tokens=True)
    return whole[len(tokenizer.decode(prompt_ids, skip_special_tokens=True)) :]


class LiveServer:
    """uvicorn on 127.0.0.1 with a free port, in a thread; the app's lifespan starts the model thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)

    def metric(self, text: str, name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)
