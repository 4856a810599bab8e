"""--device / --dtype for every command, bfloat16 weights end to end, per-layer prefix placement, the CUDA RNG in
checkpoints, --resume on a directory with nothing saved, seq2seq checkpoints (issue 16 items 1, 2, 5, 6; issue 17
item 5). Tests that depend on the hardware assert what this machine must do, GPU or not: none passes merely
because no GPU is present."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import prefixtune
from prefixtune import PrefixConfig, cli, models
from prefixtune.config import TrainConfig
from prefixtune.devices import cpu_has_native_bf16, resolve_dtype, resolve_placement
from prefixtune.errors import PrefixTuneError
from prefixtune.layers import PerLayer, layer_places
from prefixtune.train import checkpoint, train
from prefixtune.train.distributed import Runtime
from prefixtune.train.placement import training_placement
from tiny import tiny
from tiny_seq2seq import tiny_seq2seq
from tiny_tokenizer import make_tokenizer

IDS = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
BF16_TOL = dict(rtol=0.0, atol=0.15)  # tiny random models: bf16 weight rounding moves logits by ~0.05


def _missing_gpu() -> str:
    """A CUDA device this machine does not have: `cuda` without a GPU, one index past the last with GPUs."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


def _train_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--quiet", "train_split=all", "warmup_steps=1", "log_every=1", "projection_dim=8",
            "num_virtual_tokens=3", *extra]  # fmt: skip


def _one_error_line(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prefixtune: error: "), err
    for word in words:
        assert word in err[0], err
    return err[0]


# ----- bad input: one line, exit 2, nothing written ----------------------------------------------------------


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--device", "_missing_gpu"], ["cuda"]),
        (["--device", "tpu"], ["unknown device 'tpu'", "cpu, cuda"]),
        (["--device", "cpu", "--dtype", "float16"], ["float16 on the CPU"]),
    ],
)
def test_bad_device_or_dtype_is_refused_by_every_command(
    flags: list[str], words: list[str], model_dir: Path, data_file: Path, tmp_path: Path, capsys
) -> None:
    flags = [_missing_gpu() if f == "_missing_gpu" else f for f in flags]
    out = tmp_path / "out"
    commands = [
        _train_args(model_dir, data_file, out / "train"),
        ["eval", "--model", str(model_dir), "--data", str(data_file), "--predictions", str(out / "p.jsonl")],
        ["generate", "--model", str(model_dir), "--prompt", "name: Cat Park"],
        [
            "compare",
            "--methods",
            "prefix",
            "--model",
            str(model_dir),
            "--data",
            str(data_file),
            "--out",
            str(out / "c"),
        ],
        ["demo", "--model", str(model_dir), "--out", str(out / "demo")],
        ["serve", "--model", str(model_dir), "--port", "0"],
    ]
    for argv in commands:
        assert cli.main([*argv, *flags]) == 2, argv[0]
        _one_error_line(capsys, *words)
        assert not out.exists(), argv[0]  # nothing written, no run directory created


def test_float16_training_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    cfg = TrainConfig(out=str(tmp_path / "run"), dtype="float16", device="cpu")
    with pytest.raises(PrefixTuneError, match="float16"):
        training_placement(cfg, Runtime(), loading=False)
    if torch.cuda.is_available():  # on a GPU float16 is a valid weight dtype, but not one to train in here
        with pytest.raises(PrefixTuneError, match="cannot train"):
            training_placement(TrainConfig(dtype="float16", device="cuda"), Runtime(), loading=False)


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check itself (the hardware's answer stubbed: no such GPU here); a supported one passes."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(PrefixTuneError, match="Tesla T4 has no bfloat16"):
        resolve_dtype("bfloat16", "cuda")
    assert resolve_dtype(None, "cuda") == torch.float32  # the default falls back instead of failing
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("bfloat16", "cuda") == resolve_dtype(None, "cuda") == torch.bfloat16


def test_defaults_follow_this_machine(capsys) -> None:
    placement = resolve_placement(None, None)
    if torch.cuda.is_available():
        assert placement.device == torch.device("cuda")
        assert placement.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    else:
        assert placement.device == torch.device("cpu") and placement.dtype == torch.float32
    assert resolve_placement("cpu", None).dtype == torch.float32
    auto = resolve_placement("auto", None)
    assert auto.device is None and auto.device_map == "auto"
    capsys.readouterr()
    assert resolve_placement("cpu", "bfloat16").dtype == torch.bfloat16  # allowed on any CPU
    note = capsys.readouterr().err
    assert ("emulates" in note) == (not cpu_has_native_bf16())


# ----- bfloat16 weights, float32 prefixes --------------------------------------------------------------------


def test_bf16_training_on_a_cpu_runs_attention_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's CPU SDPA backward is about twice as slow in bf16 as in float32: with gradients on, our attention hands
    the kernel float32 (mask too) and casts its output back; without (eval, generate) it stays bf16. Logits and the
    prefix's gradient agree with the bf16 kernel's, with and without padding (a dense mask)."""
    import prefixtune.prefix as attention

    pm = prefixtune.attach(tiny("llama-gqa").to(torch.bfloat16), PrefixConfig(num_virtual_tokens=3, init="random"))
    seen: list[tuple[torch.dtype, torch.dtype | None]] = []
    kernel = attention.sdpa_attention_forward

    def spy(module, query, key, value, mask, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((query.dtype, mask.dtype if isinstance(mask, torch.Tensor) else None))
        return kernel(module, query, key, value, mask, *args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    upcasting = attention._float32_sdpa
    padded = torch.ones_like(IDS)
    padded[1, :2] = 0
    for mask in (None, padded):
        runs = []
        for upcast in (True, False):  # ours, then the bf16 kernel itself for reference
            monkeypatch.setattr(attention, "_float32_sdpa", upcasting if upcast else lambda k, *a, **kw: k(*a, **kw))
            pm.zero_grad()
            seen.clear()
            logits = pm(input_ids=IDS, attention_mask=mask).logits
            logits.float().square().mean().backward()
            assert logits.dtype == torch.bfloat16
            assert {q for q, _ in seen} == {torch.float32 if upcast else torch.bfloat16}
            if mask is not None:
                assert all(m in (torch.bool, torch.float32 if upcast else torch.bfloat16) for _, m in seen)
            grad = torch.cat([p.grad.flatten() for p in pm.trainable_parameters() if p.grad is not None])
            runs.append((logits.detach().float(), grad))
        (fast, fast_grad), (plain, plain_grad) = runs
        torch.testing.assert_close(fast, plain, **BF16_TOL)
        assert fast_grad.abs().max() > 0 and torch.nn.functional.cosine_similarity(fast_grad, plain_grad, dim=0) > 0.99
    monkeypatch.setattr(attention, "_float32_sdpa", upcasting)
    seen.clear()
    with torch.no_grad():
        pm(input_ids=IDS)
    assert {q for q, _ in seen} == {torch.bfloat16}  # no gradients: the bf16 kernel, no casts


@pytest.mark.parametrize(("native", "dtype"), [(True, None), (False, None), (True, "float32")])
def test_training_on_a_native_bf16_cpu_notes_bfloat16_once(
    native: bool, dtype: str | None, model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """float32 stays the CPU default; where the CPU has native bfloat16 and no dtype was chosen, training says once
    that --dtype bfloat16 is faster there (docs/performance.md); an explicit dtype or an emulating CPU: no note."""
    import prefixtune.train.loop as loop

    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)
    cfg = TrainConfig(
        model=str(model_dir), data=str(data_file), out=str(tmp_path / "run"), max_steps=1, batch_size=4,
        train_split="all", device="cpu", dtype=dtype, options={"num_virtual_tokens": 2, "init": "random"},
    )  # fmt: skip
    result = train(cfg, progress=True)
    assert result.model.base_model.dtype == torch.float32
    assert capsys.readouterr().err.count(loop.BF16_HINT) == (1 if native and dtype is None else 0)


def test_prefix_batch_is_built_in_the_models_dtype_once() -> None:
    torch.manual_seed(0)
    fp32 = prefixtune.attach(tiny(), PrefixConfig(num_virtual_tokens=3, projection_dim=8, init="random"))
    with torch.no_grad():
        fp32.adapters["default"].mlp[2].weight.normal_(std=0.1)
        reference = fp32(input_ids=IDS).logits
    half = prefixtune.attach(tiny().to(torch.bfloat16), PrefixConfig(num_virtual_tokens=3, projection_dim=8))
    half.adapters["default"].load_state_dict(fp32.adapters["default"].state_dict())
    assert all(p.dtype == torch.float32 for p in half.trainable_parameters())  # trainable weights stay float32
    batch = half.prefix_batch(["default", "default"], 2)
    assert batch.keys.dtype == batch.values.dtype == torch.bfloat16  # the attention function gets it as is
    assert isinstance(batch.keys, torch.Tensor)  # one device, one dtype: the stacked form
    assert fp32.prefix_batch(["default"], 1).keys.dtype == torch.float32
    logits = half(input_ids=IDS).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, **BF16_TOL)
    assert (logits.float() - reference).abs().max() > 0  # really computed in bfloat16
    logits.float().sum().backward()  # the cast is differentiable: the float32 parameters get gradients
    grads = [p.grad for p in half.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads[-2:])


def test_to_bfloat16_with_a_prefix_on_some_layers_only() -> None:
    """`pm.to(torch.bfloat16)` with an adapter on a subset of layers (index_copy between dtypes used to fail)."""
    model = tiny_seq2seq("bart")
    pm = prefixtune.attach(model, PrefixConfig(num_virtual_tokens=2, reparameterize=False, locations=["cross"]))
    dec = torch.tensor([[2, 20, 21], [2, 30, 31]])
    names = ["default", "__base__"]
    with torch.no_grad():
        pm.adapters["default"].kv.normal_(std=2.0)
        reference = pm(input_ids=IDS, decoder_input_ids=dec, adapter_names=names).logits
        alone = pm(input_ids=IDS, decoder_input_ids=dec, adapter_names=["__base__"] * 2).logits
        assert (reference[0] - alone[0]).abs().max() > 0.2  # the cross-attention prefix matters
        pm.to(torch.bfloat16)
        assert pm.prefix_batch(names, 2).keys.dtype == torch.bfloat16
        logits = pm(input_ids=IDS, decoder_input_ids=dec, adapter_names=names).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, **BF16_TOL)


def test_bf16_weights_train_eval_generate_end_to_end(model_dir: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    cfg = TrainConfig(
        model=str(model_dir), data=str(data_file), out=str(out), max_steps=3, batch_size=4, lr=5e-2, warmup_steps=0,
        train_split="all", log_every=1, device="cpu", dtype="bfloat16",
        options={"num_virtual_tokens": 3, "projection_dim": 8, "init": "random"},
    )  # fmt: skip
    result = train(cfg, progress=False)
    model = result.model
    assert model.base_model.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    assert model.prefix_batch(["default"], 1).keys.dtype == torch.bfloat16
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses) and losses[-1] < losses[0]
    capsys.readouterr()
    argv = ["--model", str(model_dir), "--adapter", str(out), "--device", "cpu", "--dtype", "bfloat16"]
    assert (
        cli.main(["eval", *argv, "--data", str(data_file), "--metrics", "bleu,perplexity", "--max-new-tokens", "4"])
        == 0
    )
    scores = json.loads(capsys.readouterr().out)
    assert 1 < scores["perplexity"] < 1e6 and "bleu" in scores
    assert cli.main(["generate", *argv, "--prompt", "name: Cat Park", "--max-new-tokens", "4"]) == 0


def test_method_full_trains_float32_weights_under_autocast() -> None:
    placement, weights, autocast = training_placement(TrainConfig(method="full", device="cpu", dtype="bfloat16"),
                                                      Runtime(), loading=False)  # fmt: skip
    assert (placement.dtype, weights, autocast) == (torch.bfloat16, torch.float32, torch.bfloat16)
    _, weights, autocast = training_placement(TrainConfig(device="cpu", dtype="bfloat16"), Runtime(), loading=False)
    assert (weights, autocast) == (torch.bfloat16, None)  # a prefix: bfloat16 base, float32 prefix, no autocast


# ----- per-layer placement (device_map="auto") ---------------------------------------------------------------


def _split_model() -> torch.nn.Module:
    """A tiny Llama whose second layer onwards (and norm, head) is in float64: layers that differ in their own
    parameters, as layers on different GPUs do under device_map="auto" (here told apart by dtype, on one CPU)."""
    model = tiny()
    for module in (model.model.layers[1], model.model.norm, model.lm_head):
        module.to(torch.float64)
    return model


def test_each_layers_prefix_goes_where_that_layers_weights_are() -> None:
    torch.manual_seed(0)
    config = PrefixConfig(num_virtual_tokens=3, reparameterize=False, init="random")
    reference = prefixtune.attach(tiny(), config)
    split = prefixtune.attach(_split_model(), config)
    split.adapters["default"].load_state_dict(reference.adapters["default"].state_dict())
    assert [dtype for _, dtype in layer_places(split.layout)] == [torch.float32, torch.float64]
    batch = split.prefix_batch(["default", "__base__"], 2)
    assert isinstance(batch.keys, PerLayer) and batch.keys.shape == (2, 2, 2, 3, 8)
    assert [k.dtype for k in batch.keys.tensors] == [torch.float32, torch.float64]
    assert [v.dtype for v in batch.values.tensors] == [torch.float32, torch.float64]
    names = ["default", "__base__"]
    with torch.no_grad():
        torch.testing.assert_close(
            split(input_ids=IDS, adapter_names=names).logits.float(),
            reference(input_ids=IDS, adapter_names=names).logits,
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip
        kwargs = dict(input_ids=IDS, max_new_tokens=3, num_beams=2, do_sample=False, adapter_names=names)
        assert torch.equal(split.generate(**kwargs), reference.generate(**kwargs))  # rows repeated for beams
    split(input_ids=IDS).logits.sum().backward()
    assert split.adapters["default"].kv.grad.abs().sum() > 0  # gradients come back through the per-layer copies


def test_device_map_auto_loads_and_generates(model_dir: Path, capsys) -> None:
    """`--device auto` (accelerate's device_map="auto": here all on this machine's devices) end to end."""
    model, _ = models.load_model(str(model_dir), device_map="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert {p.device.type for p in model.parameters()} == {expected}
    argv = ["generate", "--model", str(model_dir), "--prompt", "name: Cat Park", "--max-new-tokens", "3"]
    assert cli.main([*argv, "--device", "auto"]) == 0


# ----- checkpoints: the CUDA generators ----------------------------------------------------------------------


def test_checkpoint_rng_holds_every_generator() -> None:
    if torch.cuda.is_available():
        torch.cuda.init()
    state = checkpoint.rng_state()
    assert {"torch", "python"} <= set(state)
    if torch.cuda.is_available():
        assert len(state["cuda"]) == torch.cuda.device_count()
        torch.rand(3, device="cuda")
        first = torch.rand(3, device="cuda")
        checkpoint.set_rng_state(state)
        torch.rand(3, device="cuda")
        assert torch.equal(torch.rand(3, device="cuda"), first)  # the GPU generator came back
    else:
        assert "cuda" not in state
        # a checkpoint saved on a GPU machine resumes on a CPU-only one: its CPU generators are restored
        before = torch.rand(3)
        checkpoint.set_rng_state({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)]})
        assert torch.equal(torch.rand(3), before)


def test_saved_checkpoint_holds_the_rng_fields(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert cli.main(_train_args(model_dir, data_file, out, "--max-steps", "2", "--save-every", "1")) == 0
    state = torch.load(out / checkpoint.CHECKPOINT / checkpoint.STATE, weights_only=True)
    assert {"torch", "python"} <= set(state["rng"])
    assert ("cuda" in state["rng"]) == (torch.cuda.is_available() and torch.cuda.is_initialized())


def test_deterministic_runs_under_deterministic_algorithms_and_then_restores_the_setting(
    model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deterministic=true: every optimizer step runs under torch's deterministic algorithms, cuBLAS gets its
    fixed workspace unless the user chose one, and the caller's setting is back afterwards; same losses on a CPU."""
    seen: list[bool] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    plain, fixed = tmp_path / "plain", tmp_path / "fixed"
    assert cli.main(_train_args(model_dir, data_file, plain, "--max-steps", "3")) == 0
    assert seen == [False] * 3 and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert cli.main(_train_args(model_dir, data_file, fixed, "--max-steps", "3", "deterministic=true")) == 0
    assert seen[3:] == [True] * 3 and not torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert (fixed / "adapter_model.safetensors").read_bytes() == (plain / "adapter_model.safetensors").read_bytes()


# ----- --resume with nothing saved ---------------------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True])
def test_resume_with_nothing_saved_starts_the_run(
    existing: bool, model_dir: Path, data_file: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    if existing:  # a run killed before it wrote its first file: an empty directory
        out.mkdir()
    assert cli.main(_train_args(model_dir, data_file, out, "--max-steps", "2", "--resume")) == 0
    err = capsys.readouterr().err
    assert "holds no run yet: starting it" in err
    assert (out / "config.yaml").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    # a directory holding another run's config is still refused
    assert cli.main(_train_args(model_dir, data_file, out, "--max-steps", "2", "--resume", "--lr", "0.5")) == 2
    _one_error_line(capsys, "different config", "lr")


# ----- seq2seq checkpoints -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-bart")
    tokenizer = make_tokenizer()
    model = tiny_seq2seq("bart")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_seq2seq_loads_as_seq2seq_never_as_a_causal_lm(bart_dir: Path) -> None:
    model, _ = models.load_model(str(bart_dir))
    assert type(model).__name__ == "BartForConditionalGeneration"
    assert model.get_encoder() is not None and len(model.model.encoder.layers) == 2
    with pytest.raises(PrefixTuneError, match="encoder-decoder"):
        models.load_model(str(bart_dir), allow_seq2seq=False)


def test_tied_weights_left_on_meta_are_tied_again(bart_dir: Path) -> None:
    """The state transformers 5.23's loader sometimes leaves late in a long process (tied weights on meta) is
    repaired by tying each target to its source; a weight with no source still on meta is our error."""
    model, _ = models.load_model(str(bart_dir))
    shared = model.model.shared.weight
    for embedding in (model.model.encoder.embed_tokens, model.model.decoder.embed_tokens, model.lm_head):
        embedding.weight = torch.nn.Parameter(torch.empty_like(shared, device="meta"))
    models._materialize_tied_weights(model, bart_dir)
    assert model.model.encoder.embed_tokens.weight is shared and model.model.decoder.embed_tokens.weight is shared
    assert model.lm_head.weight is shared
    model.model.encoder.layers[0].fc1.weight = torch.nn.Parameter(torch.empty_like(shared, device="meta"))
    with pytest.raises(PrefixTuneError, match="loaded without weights for model.encoder.layers.0.fc1.weight"):
        models._materialize_tied_weights(model, bart_dir)


def test_seq2seq_is_refused_by_the_cli_in_one_line(bart_dir: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    commands = [
        _train_args(bart_dir, data_file, out),
        ["eval", "--model", str(bart_dir), "--data", str(data_file)],
        ["generate", "--model", str(bart_dir), "--prompt", "name: Cat Park"],
    ]
    for argv in commands:
        assert cli.main(argv) == 2, argv[0]
        _one_error_line(capsys, "encoder-decoder (seq2seq)", "BartForConditionalGeneration", "prefixtune.attach")
    assert not out.exists()
