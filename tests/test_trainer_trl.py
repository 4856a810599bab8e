"""transformers.Trainer and TRL's SFTTrainer train a PrefixModel; checkpoints hold the adapter (PEFT's files) only.

Tiny random Llama + byte-level tokenizer; every run is a few CPU seconds. The four training texts form one batch,
so each step sees the same batch and the loss curve has no sampling noise: a drop is training, not luck.
"""

from __future__ import annotations

import os

import peft
import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

import prefixtune
from peft_support import live_peft_prefix
from prefixtune import PrefixConfig, PrefixModel, PrefixTuneError
from prefixtune.hf_trainer import PrefixTrainer, prefix_config_from_peft, prefix_trainer
from prefixtune.inference import load_with_adapters
from prefixtune.models import load_model
from tiny import tiny
from tiny_tokenizer import make_tokenizer

TEXTS = [
    "name: Blue Spice is a coffee shop.",
    "The cat sat on the mat.",
    "Cat Park is a pub.",
    "the dog ran in the park",
]
DIRECT = PrefixConfig(num_virtual_tokens=8, reparameterize=False, init="random")
MLP = PrefixConfig(num_virtual_tokens=8, reparameterize=True, projection_dim=16, init="random")
LR = {False: 0.5, True: 0.03}  # direct prefix / through the MLP


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def base_model(tokenizer, seed: int = 0):
    model = tiny("llama-gqa", seed=seed)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def prefix_model(tokenizer, config: PrefixConfig = DIRECT, seed: int = 0) -> PrefixModel:
    torch.manual_seed(seed)
    return prefixtune.attach(base_model(tokenizer), config)


def dataset(tokenizer) -> Dataset:
    return Dataset.from_dict({"text": TEXTS}).map(lambda r: tokenizer(r["text"]), remove_columns=["text"])


def trainer(cls, model, tokenizer, out, steps: int, *, save_steps: int | None = None, **options):
    lr = options.pop("learning_rate", LR[model.adapter_config().reparameterize])
    callbacks = options.pop("callbacks", None)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=len(TEXTS),
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **options,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    data = dataset(tokenizer)
    return cls(model, args, collator, data, processing_class=tokenizer, callbacks=callbacks)


def losses(run) -> list[float]:
    return [entry["loss"] for entry in run.state.log_history if "loss" in entry]


def batch(tokenizer) -> dict[str, torch.Tensor]:
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    return {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch(tokenizer)).logits


def kv(model: PrefixModel, name: str = "default") -> torch.Tensor:
    return model.adapters[name].collapsed()


# ----- transformers.Trainer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Trainer, PrefixTrainer], ids=["Trainer", "PrefixTrainer"])
def test_trainer_trains_a_prefix_model_with_default_columns(cls, tokenizer, tmp_path):
    """No remove_unused_columns=False: the forward's signature names input_ids, attention_mask, labels."""
    model = prefix_model(tokenizer)
    frozen = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    run = trainer(cls, model, tokenizer, tmp_path, 20)
    run.train()
    curve = losses(run)
    assert len(curve) == 20
    assert curve[-1] < curve[0] - 0.1, curve  # measured: 5.29 -> 5.14
    assert all(b <= a + 1e-6 for a, b in zip(curve, curve[1:])), curve  # one fixed batch: it only goes down
    assert all(torch.equal(v, frozen[k]) for k, v in model.base_model.state_dict().items())  # the base never trains
    assert {"input_ids", "attention_mask", "labels"} <= set(run._signature_columns)


def test_checkpoint_holds_the_adapter_only_and_loads_back(tokenizer, tmp_path):
    model = prefix_model(tokenizer)
    run = trainer(PrefixTrainer, model, tokenizer, tmp_path, 6, save_steps=3)
    run.train()
    checkpoint = tmp_path / "checkpoint-6"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "optimizer.pt"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "config.json"}
    assert not [f for f in files if f.endswith((".safetensors", ".bin")) and f.startswith(("model", "pytorch"))]
    lay = model.layout
    prefix_numel = 8 * lay.num_layers * 2 * lay.num_kv_heads * lay.head_dim
    with safe_open(checkpoint / "adapter_model.safetensors", "pt") as f:
        assert list(f.keys()) == ["prompt_embeddings"]
        assert f.get_tensor("prompt_embeddings").numel() == prefix_numel
    size = os.path.getsize(checkpoint / "adapter_model.safetensors")
    assert prefix_numel * 4 <= size <= prefix_numel * 4 + 1024  # the prefix and a header; the base has 100x that
    assert sum(p.numel() for p in model.base_model.parameters()) > 100 * prefix_numel

    model.eval()
    expected = logits(model, tokenizer)
    ours = prefixtune.load_adapter(base_model(tokenizer), str(checkpoint), name="default").eval()
    torch.testing.assert_close(logits(ours, tokenizer), expected, rtol=0, atol=1e-5)
    again = PrefixModel.from_pretrained(base_model(tokenizer), checkpoint)
    torch.testing.assert_close(logits(again, tokenizer), expected, rtol=0, atol=1e-5)
    assert not again.training and not any(p.requires_grad for p in again.adapters.parameters())  # PEFT's default
    assert not torch.allclose(logits(base_model(tokenizer).eval(), tokenizer), expected, atol=1e-3)


@live_peft_prefix()
def test_trainer_checkpoint_loads_in_peft(tokenizer, tmp_path):
    model = prefix_model(tokenizer)
    trainer(PrefixTrainer, model, tokenizer, tmp_path, 3, save_steps=3).train()
    theirs = peft.PeftModel.from_pretrained(base_model(tokenizer), str(tmp_path / "checkpoint-3")).eval()
    torch.testing.assert_close(logits(theirs, tokenizer), logits(model.eval(), tokenizer), rtol=0, atol=1e-4)


class _WeightsAtStart(TrainerCallback):
    def __init__(self) -> None:
        self.kv: torch.Tensor | None = None
        self.step: int | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # after the checkpoint is loaded
        self.kv, self.step = kv(model), state.global_step


@pytest.mark.parametrize("config", [DIRECT, MLP], ids=["direct", "mlp"])
def test_resume_from_checkpoint_continues_where_it_stopped(config, tokenizer, tmp_path):
    whole = prefix_model(tokenizer, config)
    trainer(PrefixTrainer, whole, tokenizer, tmp_path / "whole", 8, save_steps=4).train()
    checkpoint = tmp_path / "whole" / "checkpoint-4"
    saved = kv(prefixtune.load_adapter(base_model(tokenizer), str(checkpoint), name="default"))

    resumed = prefix_model(tokenizer, config, seed=1)  # other initial weights: only the checkpoint can fix them
    assert not torch.allclose(kv(resumed), saved)
    seen = _WeightsAtStart()
    run = trainer(PrefixTrainer, resumed, tokenizer, tmp_path / "resumed", 8, save_steps=4, callbacks=[seen])
    run.train(resume_from_checkpoint=str(checkpoint))
    assert seen.step == 4 and run.state.global_step == 8
    torch.testing.assert_close(seen.kv, saved, rtol=0, atol=1e-6)  # the checkpoint's adapter, restored
    assert [e["step"] for e in run.state.log_history if "loss" in e][-4:] == [5, 6, 7, 8]
    # the optimizer state came back too: the resumed run ends where the uninterrupted one did
    torch.testing.assert_close(kv(resumed), kv(whole), rtol=0, atol=1e-5)


def test_resume_refuses_a_checkpoint_without_this_adapter(tokenizer, tmp_path):
    model = prefix_model(tokenizer)
    trainer(PrefixTrainer, model, tokenizer, tmp_path / "a", 2, save_steps=2).train()
    other = prefixtune.attach(base_model(tokenizer), DIRECT, name="other")
    with pytest.raises(PrefixTuneError, match="holds no adapter 'other'"):
        trainer(PrefixTrainer, other, tokenizer, tmp_path / "b", 4).train(
            resume_from_checkpoint=str(tmp_path / "a/checkpoint-2")
        )


def test_gradient_checkpointing_switch_gives_the_same_training(tokenizer, tmp_path):
    results = {}
    for gc in (False, True):
        model = prefix_model(tokenizer)
        run = trainer(PrefixTrainer, model, tokenizer, tmp_path / str(gc), 2, gradient_checkpointing=gc)
        run.train()
        assert model.is_gradient_checkpointing is gc
        results[gc] = (losses(run), kv(model))
    # step 2's loss is computed with the weights after one update from (checkpointed) gradients
    assert abs(results[True][0][1] - results[False][0][1]) < 1e-5
    assert results[False][0][1] < results[False][0][0]
    torch.testing.assert_close(results[True][1], results[False][1], rtol=0, atol=1e-6)


def test_reentrant_checkpointing_is_refused(tokenizer):
    model = prefix_model(tokenizer)
    with pytest.raises(PrefixTuneError, match="use_reentrant"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_save_pretrained_lays_adapters_out_as_peft(tokenizer, tmp_path):
    model = prefix_model(tokenizer)
    prefixtune.attach(model, PrefixConfig(num_virtual_tokens=3, reparameterize=False, init="random"), name="extra")
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors"} == set(os.listdir(tmp_path / "extra"))
    loaded = PrefixModel.from_pretrained(base_model(tokenizer), tmp_path / "extra", adapter_name="extra")
    torch.testing.assert_close(kv(loaded, "extra"), kv(model, "extra"), rtol=0, atol=0)
    with pytest.raises(PrefixTuneError, match="unknown adapter"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])
    assert not (tmp_path / "x").exists()


def test_prefix_config_from_peft():
    ours = prefix_config_from_peft(
        peft.PrefixTuningConfig(num_virtual_tokens=7, prefix_projection=True, encoder_hidden_size=64)
    )
    assert (ours.num_virtual_tokens, ours.reparameterize, ours.projection_dim) == (7, True, 64)
    assert prefix_config_from_peft(peft.PrefixTuningConfig(num_virtual_tokens=3)).reparameterize is False
    with pytest.raises(PrefixTuneError, match="PrefixTuningConfig"):
        prefix_config_from_peft(peft.LoraConfig())
    with pytest.raises(PrefixTuneError, match="Trainer subclass"):
        prefix_trainer(dict)


# ----- TRL ------------------------------------------------------------------------------------------------------


def sft(model, tokenizer, out, steps: int, **options):
    from trl import SFTConfig

    from prefixtune.hf_trainer import PrefixSFTTrainer

    data = Dataset.from_dict(
        {"prompt": [t.split(" ")[0] for t in TEXTS], "completion": [" " + " ".join(t.split(" ")[1:]) for t in TEXTS]}
    )
    lr = LR[model.adapter_config().reparameterize]
    args = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=len(TEXTS),
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        shuffle_dataset=False,
        disable_tqdm=True,
        bf16=False,  # TRL's default autocasts the forward to bf16; float32 keeps the comparisons exact
        **options,
    )
    return PrefixSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)


@pytest.mark.parametrize("config", [DIRECT, MLP], ids=["direct", "mlp"])
def test_sft_trainer_trains_and_saves_the_adapter(config, tokenizer, tmp_path):
    model = prefix_model(tokenizer, config)
    run = sft(model, tokenizer, tmp_path, 20, save_strategy="steps", save_steps=20)
    run.train()
    curve = losses(run)
    assert curve[-1] < curve[0] - 0.1, curve
    files = set(os.listdir(tmp_path / "checkpoint-20"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    loaded = PrefixModel.from_pretrained(base_model(tokenizer), tmp_path / "checkpoint-20")
    torch.testing.assert_close(logits(loaded, tokenizer), logits(model.eval(), tokenizer), rtol=0, atol=1e-5)


def test_sft_fused_lm_head_sees_the_prefix(tokenizer, tmp_path):
    """TRL computes its loss with a fused LM head patched into the model; the patch sits under our prefix."""
    model = prefix_model(tokenizer)
    sft(model, tokenizer, tmp_path, 1)  # the trainer patches the model when it is built
    model.eval()
    inputs = batch(tokenizer)
    with torch.no_grad():
        fused = model(**inputs, fused_lm_head=True)
        plain = model(**inputs)
        without = model(**inputs, adapter_names=["__base__"] * len(TEXTS), fused_lm_head=True)
    assert hasattr(fused, "log_probs")
    torch.testing.assert_close(fused.loss, plain.loss, rtol=0, atol=1e-5)
    assert abs(without.loss - plain.loss) > 1e-3


def test_sft_with_gradient_checkpointing(tokenizer, tmp_path):
    results = []
    for gc in (False, True):
        model = prefix_model(tokenizer)
        run = sft(model, tokenizer, tmp_path / str(gc), 2, gradient_checkpointing=gc)
        run.train()
        results.append(losses(run))
    assert abs(results[0][1] - results[1][1]) < 1e-5


# ----- train/eval mode of added adapters (issue 17, item 5) -----------------------------------------------------


def test_adapters_follow_the_model_mode(tokenizer, tmp_path):
    noisy = PrefixConfig(num_virtual_tokens=6, reparameterize=False, init="random", dropout=0.5)
    model = prefix_model(tokenizer, noisy)
    model.eval()
    prefixtune.attach(model, noisy, name="late")  # added after eval(): dropout off
    assert not model.adapters["late"].training
    first, second = logits(model, tokenizer), logits(model, tokenizer)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    model.save_adapter(tmp_path / "late", "late")
    prefixtune.load_adapter(model, str(tmp_path / "late"), name="loaded")
    assert not model.adapters["loaded"].training
    model.train()
    prefixtune.attach(model, noisy, name="trainmode")
    assert model.adapters["trainmode"].training
    out = [model(**batch(tokenizer), adapter_names=["trainmode"] * len(TEXTS)).logits for _ in range(2)]
    assert not torch.allclose(out[0], out[1])  # dropout on: the test above could tell
    # a wrapper starts in its base model's mode (from_pretrained models are in eval mode)
    assert not prefixtune.attach(base_model(tokenizer).eval(), noisy).adapters["default"].training


def test_generate_loads_adapters_in_eval_mode(model_dir, tmp_path):
    base, _ = load_model(str(model_dir))
    noisy = PrefixConfig(num_virtual_tokens=4, reparameterize=False, init="random", dropout=0.5)
    prefixtune.attach(base.train(), noisy).save_adapter(tmp_path / "noisy")
    model, tok, names = load_with_adapters(str(model_dir), [str(tmp_path / "noisy")])
    assert names == ["noisy"]
    assert not any(m.training for m in model.modules())
    ids = tok(["name: Blue Spice"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("script", ["trainer.py", "trl_sft.py"])
def test_examples_run_tiny(script, tmp_path):
    """The examples' --tiny mode runs offline and leaves an adapter-only final directory."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.path.join(root, "src"), "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        os.path.join(root, "examples", script),
        "--tiny",
        "--max-steps",
        "3",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loss " in done.stdout
    files = set(os.listdir(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
