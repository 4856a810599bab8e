"""Every method behind the one protocol: builds, trains, saves, loads; plus each method's own promises."""

from __future__ import annotations

import json
import warnings
from typing import Any

import peft
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from peft_support import live_peft_prefix
from prefixtune import PrefixTuneError
from prefixtune.methods.bottleneck import BottleneckModel
from prefixtune.methods.full import set_dropout
from prefixtune.methods.prompt import PromptConfig, PromptModel
from prefixtune.methods.registry import (
    METHODS,
    TrainableModel,
    build_method,
    detect_method,
    load_trained,
    make_config,
    parameter_counts,
)

VOCAB = 64
warnings.filterwarnings("ignore", message=".*(attention mask|pad token|Unexpected keyword|is_gradient_checkpointing).*")


def tiny_llama(seed: int = 0, **config_overrides: Any) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(LlamaConfig(**{**settings, **config_overrides})).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=128,
        bos_token_id=1,
        eos_token_id=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


ARCHS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# Small sizes and a high learning rate so a few steps visibly fit the tiny memorization task.
CASES = {
    "prefix": ({"num_virtual_tokens": 4, "projection_dim": 16}, 1e-2),
    "prompt": ({"num_virtual_tokens": 4}, 5e-2),
    "lora": ({"r": 4, "dropout": 0.0}, 1e-2),
    "adapter": ({"bottleneck_dim": 8}, 1e-2),
    "adapter-pfeiffer": ({"bottleneck_dim": 8, "style": "pfeiffer"}, 1e-2),
    "lora+prefix": ({"r": 4, "lora.dropout": 0.0, "num_virtual_tokens": 4, "projection_dim": 16}, 1e-2),
    "full": ({}, 1e-3),
    "full-top1": ({"top_layers": 1}, 1e-3),
}


def method_of(case: str) -> str:
    return case.split("-")[0] if case.startswith(("adapter", "full")) else case


def batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    ids = torch.randint(3, VOCAB, (2, 10))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train_steps(model: TrainableModel, steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def test_every_method_is_registered() -> None:
    assert set(METHODS) == {"prefix", "prompt", "lora", "adapter", "lora+prefix", "prefix-memory", "full"}
    assert all(spec.default_lr > 0 and spec.lr_source for spec in METHODS.values())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", CASES)
def test_trains_saves_and_loads_to_identical_logits(case: str, arch: str, tmp_path) -> None:
    options, lr = CASES[case]
    method = method_of(case)
    model = build_method(method, ARCHS[arch](), options)
    assert isinstance(model, TrainableModel)
    losses = train_steps(model, 8, lr)
    # A random tiny model predicts almost uniformly (log 64 = 4.16 nats); a soft prompt at the input only moves
    # it by ~0.07 nats in 8 steps (seed-dependent), every other method by far more.
    assert losses[-1] < losses[0] - (0.03 if method == "prompt" else 0.05), losses
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_trained(tmp_path / "out")
    assert detect_method(tmp_path / "out") == method
    loaded = load_trained(ARCHS[arch](), tmp_path / "out")
    assert type(loaded) is type(model)
    with torch.no_grad():
        after = loaded(**inputs).logits
    assert before.shape == (2, 10, VOCAB)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    out = loaded.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 13) and torch.equal(out[:, :10], inputs["input_ids"])


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_only_the_trainable_parameters(case: str) -> None:
    options, _ = CASES[case]
    model = build_method(method_of(case), tiny_llama(), options)
    model(**batch()).loss.backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable
    for name, param in model.named_parameters():
        assert param.requires_grad == (id(param) in trainable), name
        assert (param.grad is not None) == (id(param) in trainable), name
    if case == "full-top1":
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert any("layers.2." in n for n in names) and not any("layers.0." in n or "layers.1." in n for n in names)
        assert any(n.endswith("model.norm.weight") for n in names)


def test_lora_plus_prefix_gives_both_parts_gradients_and_saves_both(tmp_path) -> None:
    model = build_method("lora+prefix", tiny_llama(), CASES["lora+prefix"][0])
    train_steps(model, 2, 1e-2)  # past step 0, where LoRA's zero-initialized B blocks A's gradient
    model(**batch()).loss.backward()
    prefix_grads = [p.grad for p in model.prefix_model.trainable_parameters()]
    lora_grads = [p.grad for p in model.lora_parameters()]
    assert prefix_grads and lora_grads
    assert all(g is not None and g.abs().sum() > 0 for g in prefix_grads + lora_grads)
    model.save_trained(tmp_path / "both")
    assert json.loads((tmp_path / "both/lora/adapter_config.json").read_text())["peft_type"] == "LORA"
    assert json.loads((tmp_path / "both/prefix/adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"


def test_adapter_starts_as_the_base_model_and_detaches_cleanly() -> None:
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    base = tiny_llama()
    with torch.no_grad():
        expected = base(**inputs).logits
        for style in ("houlsby", "pfeiffer"):
            wrapped = build_method("adapter", base, {"style": style})
            assert isinstance(wrapped, BottleneckModel)
            torch.testing.assert_close(wrapped(**inputs).logits, expected, atol=0, rtol=0)
            torch.nn.init.normal_(wrapped.adapters["0_mlp"].up.weight)  # a trained adapter changes the output...
            assert not torch.allclose(wrapped(**inputs).logits, expected)
            wrapped.detach()  # ...and detaching gives the base model back
            torch.testing.assert_close(base(**inputs).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_dropout_acts_only_while_training_and_survives_a_reload(arch: str, tmp_path) -> None:
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        expected = ARCHS[arch]()(**inputs).logits
        plain = build_method("full", ARCHS[arch]()).train()  # the tiny models' own rates are 0: nothing drops
        torch.testing.assert_close(plain(**inputs).logits, expected, atol=0, rtol=0)
        model = build_method("full", ARCHS[arch](), {"dropout": 0.5})
        torch.testing.assert_close(model(**inputs).logits, expected, atol=0, rtol=0)  # eval mode: no dropout
        model.train()
        torch.manual_seed(0)
        dropped = model(**inputs).logits
        torch.manual_seed(1)
        other = model(**inputs).logits
        assert not torch.allclose(dropped, expected, atol=1e-3) and not torch.allclose(dropped, other, atol=1e-3)
        model.eval().save_trained(tmp_path / "full")
        loaded = load_trained(ARCHS[arch](), tmp_path / "full")
        assert loaded.config.dropout == 0.5
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=0, rtol=0)
        loaded.train()
        torch.manual_seed(0)
        torch.testing.assert_close(loaded(**inputs).logits, dropped, atol=0, rtol=0)


def test_adapter_places_follow_the_style() -> None:
    houlsby = build_method("adapter", tiny_gpt2(), {"style": "houlsby"})
    pfeiffer = build_method("adapter", tiny_gpt2(), {"style": "pfeiffer"})
    assert sorted(houlsby.adapters) == sorted(f"{i}_{p}" for i in range(3) for p in ("attn", "mlp"))
    assert sorted(pfeiffer.adapters) == [f"{i}_mlp" for i in range(3)]


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_merge_equals_unmerged(arch: str) -> None:
    model = build_method("lora", ARCHS[arch](), {"r": 4, "dropout": 0.0})
    train_steps(model, 3, 1e-2)
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        unmerged = model(**inputs).logits
        merged_model = model.merge()
        assert not any("lora" in n for n, _ in merged_model.named_parameters())
        torch.testing.assert_close(merged_model(**inputs).logits, unmerged, atol=1e-5, rtol=0)


# ----- prompt tuning -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
# PEFT's generate breaks with transformers 5.24's cache rename for its prompt tuning too (GPT-2 diverges after the
# first token there; Llama happens to agree): the same upstream cause as its prefix-tuning, hence not strict.
@live_peft_prefix(strict=False)
def test_prompt_saved_by_us_loads_in_peft_and_back(arch: str, tmp_path) -> None:
    ids = batch()["input_ids"]
    ours = build_method("prompt", ARCHS[arch](), {"num_virtual_tokens": 5, "init": "random"})
    ours.save_trained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(ARCHS[arch](), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits[:, 5:], atol=1e-5, rtol=0)
        greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(input_ids=ids, **greedy), theirs.generate(input_ids=ids, **greedy))
    # PEFT's own prompt, trained a little by PEFT, loads into ours with PEFT's logits.
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB")
    native = peft.get_peft_model(ARCHS[arch](), config)
    with torch.no_grad():
        native.prompt_encoder["default"].embedding.weight.add_(0.1)
    native.save_pretrained(tmp_path / "peft")
    loaded = load_trained(ARCHS[arch](), tmp_path / "peft")
    assert isinstance(loaded, PromptModel)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, native(input_ids=ids).logits[:, 3:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_prompt_mixed_batch_equals_rows_alone(arch: str, padding: str) -> None:
    model = PromptModel(ARCHS[arch]())
    model.add_adapter("short", PromptConfig(num_virtual_tokens=2)).add_adapter(
        "long", PromptConfig(num_virtual_tokens=6)
    )
    torch.manual_seed(1)
    lengths, names, width = [7, 4, 5], ["short", "long", "__base__"], 7
    rows = [torch.randint(3, VOCAB, (n,)) for n in lengths]
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if padding == "left" else slice(0, len(row))
        ids[i, cols], mask[i, cols] = row, 1
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        for i, row in enumerate(rows):
            alone = model(input_ids=row[None], adapter_names=[names[i]]).logits[0]
            torch.testing.assert_close(mixed[i][mask[i].bool()], alone, atol=1e-5, rtol=0)
    # Training through a mixed batch reaches both prompts.
    labels = ids.masked_fill(mask == 0, -100)
    model(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_generate_with_cache_matches_step_by_step_forward(arch: str) -> None:
    model = PromptModel(ARCHS[arch]())
    model.add_adapter("a", PromptConfig(num_virtual_tokens=3, init="random"))
    model.add_adapter("b", PromptConfig(num_virtual_tokens=5, init="random"))
    rows, names = [torch.tensor([5, 9, 11, 4]), torch.tensor([7, 8])], ["a", "b"]
    ids = torch.tensor([[5, 9, 11, 4], [0, 0, 7, 8]])  # left padding, as for generation
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=5, do_sample=False)
    for i, row in enumerate(rows):
        current = row[None]
        with torch.no_grad():
            for _ in range(5):
                step = model(input_ids=current, adapter_names=[names[i]]).logits[:, -1].argmax(-1, keepdim=True)
                current = torch.cat([current, step], dim=1)
        expected = current[0, -5:]
        if (expected == 2).any():  # generate stops at EOS (id 2) and pads after it
            stop = int((expected == 2).nonzero()[0]) + 1
            expected = torch.cat([expected[:stop], torch.zeros(5 - stop, dtype=torch.long)])
        assert torch.equal(out[i, -5:], expected)


class WordTokenizer:
    """Enough of a tokenizer for init_text: one id per character."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [3 + ord(c) % (VOCAB - 3) for c in text]}

    def __len__(self) -> int:
        return VOCAB


def test_prompt_initializes_from_text_and_vocabulary() -> None:
    base = tiny_llama()
    model = build_method("prompt", base, {"num_virtual_tokens": 5, "init_text": "ab"}, tokenizer=WordTokenizer())
    ids = torch.tensor(WordTokenizer()("ababa")["input_ids"])
    torch.testing.assert_close(model.prompts["default"].data, base.get_input_embeddings()(ids).detach())
    vocab = build_method("prompt", tiny_llama(), {"num_virtual_tokens": 5}).prompts["default"].data
    rows_in_vocabulary = (vocab[:, None, :] == base.get_input_embeddings().weight[None]).all(-1).any(-1)
    assert rows_in_vocabulary.all()
    with pytest.raises(PrefixTuneError, match="tokenizer"):
        build_method("prompt", tiny_llama(), {"init": "text", "init_text": "x"})


# ----- bad input -----------------------------------------------------------------------------------------------


def test_bad_method_names_and_options_are_clear_errors(tmp_path) -> None:
    with pytest.raises(PrefixTuneError, match="valid methods: prefix, prompt, lora"):
        build_method("lorra", tiny_llama())
    with pytest.raises(PrefixTuneError, match="num_virtual_tokens does not apply to method 'lora'.*r, alpha"):
        make_config("lora", {"num_virtual_tokens": 10})
    with pytest.raises(PrefixTuneError, match="dropout does not apply.*lora.dropout"):
        make_config("lora+prefix", {"dropout": 0.1})  # ambiguous between the two parts
    with pytest.raises(PrefixTuneError, match="top_layers=9"):
        build_method("full", tiny_llama(), {"top_layers": 9})
    with pytest.raises(PrefixTuneError, match="style"):
        make_config("adapter", {"style": "parallel"})
    for rate in (1.0, -0.1, True, "0.1"):
        with pytest.raises(PrefixTuneError, match="dropout must be a number in"):
            make_config("full", {"dropout": rate})
    with pytest.raises(PrefixTuneError, match="Linear has no dropout to set"):
        set_dropout(torch.nn.Linear(2, 2), 0.1)
    with pytest.raises(PrefixTuneError, match="no saved prefixtune method"):
        load_trained(tiny_llama(), tmp_path)
    assert make_config("lora+prefix", {"r": 8, "prefix.dropout": 0.1}).lora.r == 8


def test_a_saved_method_refuses_a_model_it_does_not_fit(tmp_path) -> None:
    build_method("adapter", tiny_llama(), {"bottleneck_dim": 8}).save_trained(tmp_path / "adapter")
    build_method("prompt", tiny_llama(), {"num_virtual_tokens": 3}).save_trained(tmp_path / "prompt")
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    for kind in ("adapter", "prompt"):
        with pytest.raises(PrefixTuneError, match="does not fit"):
            load_trained(other, tmp_path / kind)
    with pytest.raises(PrefixTuneError, match="force=True"):
        load_trained(tiny_llama(seed=7), tmp_path / "prompt")  # same shapes, other weights


def test_parameter_counts() -> None:
    model = build_method("prompt", tiny_llama(), {"num_virtual_tokens": 4})
    trainable, total = parameter_counts(model)
    assert trainable == 4 * 32 and total == trainable + sum(p.numel() for p in tiny_llama().parameters())


def test_a_hooked_method_missing_its_weights_file_is_a_clear_error(tmp_path) -> None:
    """Before the shared reader, a bottleneck directory without its safetensors file raised a TypeError."""
    build_method("adapter", tiny_llama(), {"bottleneck_dim": 8}).save_trained(tmp_path / "adapter")
    (tmp_path / "adapter" / "bottleneck_adapter.safetensors").unlink()
    with pytest.raises(PrefixTuneError, match="not a bottleneck-adapter directory.*safetensors missing"):
        load_trained(tiny_llama(), tmp_path / "adapter")
