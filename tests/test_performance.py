"""Speed and memory options (issue 7): each one changes results by no more than the tolerance stated in its test,
and the benchmark's quick mode runs end to end. No timings are asserted anywhere."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

import prefixtune
from prefixtune import cli, data
from prefixtune.config import TrainConfig
from prefixtune.efficiency import enable_gradient_checkpointing, micro_steps
from prefixtune.eval import causal_lm_loss, row_nll
from prefixtune.methods.registry import build_method
from prefixtune.prefix import PrefixEncoder
from prefixtune.train.tasks import TaskLoop
from tiny import tiny
from tiny_tokenizer import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FOODS = ["French", "Italian", "Japanese", "Chinese", "English"]


def _examples(n: int = 40) -> list[data.Example]:
    """E2E-like pairs whose lengths vary a lot, so that batching by length matters."""
    out = []
    for i in range(n):
        source = f"name: Cat Park {i}, food: {FOODS[i % 5]}" + ", area: city centre" * (i % 4)
        target = f"Cat Park serves {FOODS[i % 5]} food" + " near the river" * (i % 7) + "."
        out.append(data.Example(source, target, [target]))
    return out


def _batch(rows: int = 3, length: int = 12, source: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (rows, length))
    labels = ids.clone()
    labels[:, :source] = -100
    mask = torch.ones_like(ids)
    mask[1, length - 3 :] = 0  # a right-padded row
    labels[1, length - 3 :] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.trainable_parameters()]


# ----- LM head and loss on target tokens only ------------------------------------------------------------------


def test_target_only_logits_are_on_by_default_and_skip_the_source() -> None:
    """On by default in the trainer and the loss functions; the LM head sees only the positions the loss reads
    (equal loss and gradients, to 1e-6 / 1e-5: tests/test_train_cli.py::test_target_only_logits_...)."""
    assert TrainConfig().target_only_logits
    assert inspect.signature(causal_lm_loss).parameters["target_only"].default is True
    assert inspect.signature(row_nll).parameters["target_only"].default is True
    model = prefixtune.attach(tiny(), prefixtune.PrefixConfig(num_virtual_tokens=3, projection_dim=8))
    seen = []
    model.base_model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    batch = _batch(length=12, source=5)
    causal_lm_loss(model, batch)
    causal_lm_loss(model, batch, target_only=False)
    assert seen == [12 - 5, 12]  # positions 4..10 predict the targets at 5..11


def test_the_all_logits_loss_reads_the_logits_in_place_and_each_layer_gets_an_unbound_prefix() -> None:
    """Two copies the mechanism used to make in every training step, gone (bench/gpu.py, docs/performance.md):
    the all-positions loss slices no logits (it pads the targets), and the layers' prefix slices come from one
    unbind, so the backward pass stacks their gradients once instead of zero-filling the whole prefix per layer."""
    from prefixtune.eval.objective import NEXT_TOKEN

    model = prefixtune.attach(tiny(), prefixtune.PrefixConfig(num_virtual_tokens=3, projection_dim=8))
    batch = _batch(length=12, source=5)
    logits, targets = NEXT_TOKEN.logits(model, batch, target_only=False)
    assert logits.shape[:2] == targets.shape == (3, 12) and logits.is_contiguous()
    assert (targets[:, -1] == -100).all() and torch.equal(targets[:, :-1], batch["labels"][:, 1:])
    prefix = model.prefix_batch(None, 3)
    keys, values = prefix.layer_kv(1)
    assert keys.grad_fn is not None and type(keys.grad_fn).__name__.startswith("UnbindBackward")
    assert type(values.grad_fn).__name__.startswith("UnbindBackward")
    torch.testing.assert_close(keys, prefix.keys[1], rtol=0, atol=0)


# ----- length-bucketed batches -----------------------------------------------------------------------------------


def test_length_bucketing_is_deterministic_cuts_padding_and_keeps_every_example_loss() -> None:
    """Bucketing changes which examples share a batch, never an example's loss: every example's summed target
    NLL under a frozen model is the same as without bucketing (rtol 1e-5), and one seed gives one order."""
    tokenizer = make_tokenizer()
    model = tiny()
    model.resize_token_embeddings(len(tokenizer))
    encoded, _ = data.encode(_examples(), tokenizer, max_length=128)
    pad = tokenizer.pad_token_id

    def epoch(bucket: bool, seed: int = 3) -> list[dict[str, torch.Tensor]]:
        return data.batches(encoded, 4, shuffle=True, seed=seed, bucket_by_length=bucket, pad_id=pad)

    bucketed, plain = epoch(True), epoch(False)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(bucketed, epoch(True)))
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(bucketed, epoch(True, seed=4)))

    def padding(batches):
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    assert padding(bucketed) < padding(plain) / 2

    def losses(batches):
        out = []
        with torch.no_grad():
            for b in batches:
                nll = row_nll(model, b)
                for row, value in enumerate(nll.tolist()):
                    n = int(b["attention_mask"][row].sum())
                    out.append((tuple(b["input_ids"][row, :n].tolist()), value))
        return sorted(out)

    with_buckets, without = losses(bucketed), losses(plain)
    assert [ids for ids, _ in with_buckets] == [ids for ids, _ in without]
    torch.testing.assert_close(
        torch.tensor([v for _, v in with_buckets]), torch.tensor([v for _, v in without]), rtol=1e-5, atol=1e-5
    )
    # the trainer's batches follow the option
    for bucket in (True, False):
        cfg = TrainConfig(bucket_by_length=bucket, batch_size=4, seed=0)
        loop = TaskLoop(None, encoded, [], per_epoch=len(bucketed), total_steps=1)
        expected = data.batches(encoded, 4, shuffle=True, seed=0, bucket_by_length=bucket, pad_id=pad)
        assert torch.equal(loop.micro_batch(0, cfg, pad)["input_ids"], expected[0]["input_ids"])


# ----- bfloat16 autocast -----------------------------------------------------------------------------------------


def test_bf16_autocast_loss_and_gradient_agree_with_float32() -> None:
    """Stated tolerance: the loss within 1% (relative) of float32, the prefix gradient's cosine with float32's
    at least 0.99 (a tiny random Llama; bench/perf.py reports the same loss comparison on the real model)."""
    torch.manual_seed(0)
    model = prefixtune.attach(tiny(), prefixtune.PrefixConfig(num_virtual_tokens=4, projection_dim=16, init="random"))
    with torch.no_grad():
        model.adapters["default"].mlp[2].weight.normal_(std=0.1)
    model.train()
    batch = _batch()
    results = []
    for bf16 in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = causal_lm_loss(model, batch)
        loss.backward()
        results.append((float(loss), torch.cat([g.flatten() for g in _grads(model)])))
    (loss32, grad32), (loss16, grad16) = results
    assert abs(loss16 - loss32) / loss32 < 0.01
    assert torch.nn.functional.cosine_similarity(grad32, grad16, dim=0) > 0.99


# ----- gradient checkpointing ------------------------------------------------------------------------------------

CHECKPOINTED = [
    ("prefix", {"num_virtual_tokens": 3, "projection_dim": 8, "init": "random"}, "llama-gqa"),
    ("prefix", {"num_virtual_tokens": 3, "reparameterize": False, "init": "random"}, "gpt2"),
    ("prefix", {"num_virtual_tokens": 3, "position_convention": "zero", "init": "random"}, "gemma3"),
    ("prompt", {"num_virtual_tokens": 3, "init": "random"}, "llama-gqa"),
    ("lora", {"r": 2, "dropout": 0.0}, "llama-gqa"),
    ("lora+prefix", {"r": 2, "lora.dropout": 0.0, "num_virtual_tokens": 3, "init": "random"}, "qwen2"),
    ("full", {}, "llama-gqa"),
]


def _perturb(model: torch.nn.Module) -> None:
    """Zero-initialized parts (the prefix MLP's last layer, LoRA's B) would hide a wrong gradient: make them not."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (p == 0).all():
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))


@pytest.mark.parametrize("method, options, arch", CHECKPOINTED, ids=[f"{m}-{a}" for m, _, a in CHECKPOINTED])
def test_gradient_checkpointing_gives_the_same_gradients(method: str, options: dict, arch: str) -> None:
    """Stated tolerance: gradients within 1e-6 (absolute) of the run without checkpointing, and the loss equal.
    The layers really are recomputed: each attention module runs twice per training step."""
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_method(method, tiny(arch), options)
        _perturb(model)
        if checkpointed:
            enable_gradient_checkpointing(model)
        calls = []
        attention = [m for m in model.modules() if type(m).__name__.endswith("Attention")][0]
        attention.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        model.train()
        loss = causal_lm_loss(model, _batch())
        loss.backward()
        results.append((float(loss), _grads(model), len(calls)))
    (loss_plain, plain, calls_plain), (loss_gc, checkpointed_grads, calls_gc) = results
    assert (calls_plain, calls_gc) == (1, 2)
    assert loss_gc == pytest.approx(loss_plain, abs=1e-6)
    for a, b in zip(plain, checkpointed_grads):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_gradient_checkpointing_with_rows_of_different_prefixes() -> None:
    """A mixed batch (two adapters of different lengths and a bare row) recomputes with each row's own prefix."""
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = prefixtune.attach(tiny(), prefixtune.PrefixConfig(num_virtual_tokens=2, init="random"), name="a")
        model.add_adapter("b", prefixtune.PrefixConfig(num_virtual_tokens=4, init="random", reparameterize=False))
        _perturb(model)
        if checkpointed:
            enable_gradient_checkpointing(model)
        model.train()
        batch = _batch()
        out = model(**batch, adapter_names=["a", "b", "__base__"])
        out.loss.backward()
        results.append(_grads(model))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


# ----- training runs: the CLI flag, and the prefix MLP once per step -----------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model")
    tokenizer = make_tokenizer()
    model = tiny("llama-gqa")
    model.resize_token_embeddings(len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "e2e-like.jsonl"
    path.write_text("\n".join(json.dumps({"input": e.source, "target": e.target}) for e in _examples(24)) + "\n")
    return path


def _train(model_dir: Path, data_file: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    argv = ["train", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), "--quiet"]
    argv += ["--max-steps", "2", "--batch-size", "2", "--lr", "0.01", "train_split=all", "warmup_steps=0"]
    argv += ["projection_dim=16", "num_virtual_tokens=3", "threads=1", *extra]
    assert cli.main(argv) == 0
    return load_file(out / "adapter_model.safetensors")


def test_training_with_gradient_checkpointing_ends_where_training_without_does(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    """`--gradient-checkpointing` on the command line: the trained prefix within 1e-5 of the run without."""
    plain = _train(model_dir, data_file, tmp_path / "plain")
    checkpointed = _train(model_dir, data_file, tmp_path / "gc", "--gradient-checkpointing")
    assert TrainConfig.__dataclass_fields__["gradient_checkpointing"].default is False
    saved = (tmp_path / "gc" / "config.yaml").read_text()
    assert "gradient_checkpointing: true" in saved
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=0, atol=1e-5)


def test_prefix_mlp_runs_once_per_optimizer_step(
    model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 3 micro-batches per step (and gradient checkpointing, whose recomputation must not rerun it) the MLP
    runs once per step, not per micro-batch and not per layer; the trained prefix is within 1e-6 of the run that
    recomputes it per micro-batch (prefix_once_per_step=false)."""
    calls = []
    original = PrefixEncoder._compute

    def counted(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(PrefixEncoder, "_compute", counted)
    per_step: list[int] = []
    hook = register_optimizer_step_pre_hook(lambda *_: per_step.append(len(calls)))
    try:
        shared = _train(model_dir, data_file, tmp_path / "once", "grad_accum=3", "gradient_checkpointing=true")
        once = list(per_step)
        per_step.clear()
        calls.clear()
        unshared = _train(model_dir, data_file, tmp_path / "each", "grad_accum=3", "prefix_once_per_step=false")
        each = list(per_step)
    finally:
        hook.remove()
    assert once == [1, 2]
    assert each == [3, 6]
    for key in shared:
        torch.testing.assert_close(shared[key], unshared[key], rtol=0, atol=1e-6)


def test_micro_steps_leaves_no_shared_prefix_behind_on_error() -> None:
    model = prefixtune.attach(tiny(), prefixtune.PrefixConfig(num_virtual_tokens=2, projection_dim=8))
    encoder = model.adapters["default"]
    with pytest.raises(RuntimeError):
        for _ in micro_steps(model, 2):
            model(**{k: v for k, v in _batch().items() if k != "labels"})
            raise RuntimeError("boom")
    assert encoder().grad_fn is not None  # computed afresh through the MLP, not the step's shared leaf
    assert list(micro_steps(model, 1)) == [0] and encoder().grad_fn is not None


# ----- the benchmark -----------------------------------------------------------------------------------------------


def test_bench_quick_runs_end_to_end(tmp_path: Path) -> None:
    """`python -m bench all --quick`: every configuration in its own (forked) process, the table and the JSON."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    names = {f"{impl}-{m}@{s}" for s in ("e2e", "xsum") for impl, m in [("ours", "full"), ("hf", "full")]}
    names |= {f"{impl}-{m}@{s}" for s in ("e2e", "xsum") for impl in ("ours", "peft") for m in ("prefix", "prompt")}
    names |= {"ours-prefix-gc@xsum", "ours-prefix-bf16@e2e", "ours-prefix-alllogits@e2e"}
    assert names <= set(result["train"])
    for name, row in result["train"].items():
        assert "error" not in row, (name, row)
        assert row["tokens_per_s"] > 0 and row["peak_rss_mb"] > 0 and row["flops_per_s"] > 0
    assert result["ceiling"]["float32"] > 0
    assert set(result["generate"]) >= {"b1", "b8"}
    assert set(result["generate"]["b8"]) == set(result["generate"]["b8_cpu"]) == {"bare", "ours", "peft"}
    ratios = result["ratios"]
    assert set(ratios["train_tokens_per_s_ours_over_peft"]) >= {"prefix@e2e", "prompt@xsum", "lora@e2e"}
    assert "prefix-gc@xsum" in ratios["peak_rss_ours_over_peft"]
    assert ratios["generate_b1"]["ours_prefix_over_bare"] > 0
    assert {t["met"] for t in result["targets"]} <= {True, False}
    assert "ours-prefix-bf16@e2e" in result["train"] and "loss_rel_diff" in result["train"]["ours-prefix-bf16@e2e"]
    assert result["paired"]["prefix@e2e"]["ours_over_peft"] > 0
    assert "targets (" in done.stdout and "tokens/s" in done.stdout
