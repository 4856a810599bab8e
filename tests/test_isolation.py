"""Nothing about a call lives on the shared model: deep copies are whole and independent, threads do not interfere.

The prefix batch travels in the forward's keyword arguments and the head rows in a ContextVar, so a deep copy of a
PrefixModel works on its own, and two threads calling one model at once each get what they get alone.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

import prefixtune
from prefixtune import BASE, PrefixConfig, PrefixTuneError
from prefixtune.efficiency import enable_gradient_checkpointing
from prefixtune.prefix import BATCH_KWARG
from tiny import ARCHITECTURES, tiny
from tiny_seq2seq import ENCODERS, SEQ2SEQ, tiny_encoder, tiny_seq2seq

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
GREEDY = {"max_new_tokens": 4, "do_sample": False}


def _two_adapters(model: torch.nn.Module) -> prefixtune.PrefixModel:
    """Adapter "a" through the MLP, "b" direct and longer: both change the outputs."""
    torch.manual_seed(1)
    pm = prefixtune.attach(model, PrefixConfig(num_virtual_tokens=3, projection_dim=8, init="random"), name="a")
    pm.add_adapter("b", PrefixConfig(num_virtual_tokens=5, reparameterize=False, init="random"))
    with torch.no_grad():  # the MLP's last layer starts at zero: make "a" differ from its initial value
        pm.adapters["a"].mlp[2].weight.normal_(std=0.1)
    return pm


def _logits(pm: prefixtune.PrefixModel, names: list[str], **inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        return pm(**inputs, adapter_names=names).logits


def _generate(pm: prefixtune.PrefixModel, names: list[str], **inputs: Any) -> torch.Tensor:
    return pm.generate(**inputs, adapter_names=names, **GREEDY, num_beams=2, num_return_sequences=2)


# ----- the batch reaches every attention call ------------------------------------------------------------------------

MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    **{arch: lambda arch=arch: tiny(arch) for arch in ARCHITECTURES},
    **{arch: lambda arch=arch: tiny_seq2seq(arch) for arch in SEQ2SEQ},
    **{arch: lambda arch=arch: tiny_encoder(arch) for arch in ENCODERS},
}


@pytest.mark.parametrize("arch", list(MODELS))
def test_every_attention_call_receives_the_calls_prefix_batch(arch: str) -> None:
    """In a forward, in every step of generate with beams and num_return_sequences, and in the gradient-checkpoint
    replay: each attention module is called with the batch of the call it belongs to (no state on the model)."""
    pm = _two_adapters(MODELS[arch]())
    calls: list[Any] = []
    for module in pm.layout.modules:
        module.register_forward_pre_hook(
            lambda _, args, kwargs: calls.append(kwargs.get(BATCH_KWARG)), with_kwargs=True
        )
    seq2seq = arch in SEQ2SEQ
    inputs = {"input_ids": IDS, **({"decoder_input_ids": IDS[:, :2]} if seq2seq else {})}
    _logits(pm, ["a", "b"], **inputs)
    assert len(calls) == pm.layout.num_layers and calls[0] is not None and all(c is calls[0] for c in calls)
    if arch not in ENCODERS:
        calls.clear()
        pm.generate(
            input_ids=IDS,
            adapter_names=["a", "b"],
            max_new_tokens=3,
            min_new_tokens=3,
            num_beams=2,
            num_return_sequences=2,
        )
        steps = 3 * len(pm.layout.layers_of(("decoder", "cross"))) + len(pm.layout.layers_of(("encoder",)))
        assert len(calls) == steps and calls[0] is not None and all(c is calls[0] for c in calls)
    if pm.base_model.supports_gradient_checkpointing:
        enable_gradient_checkpointing(pm)
        pm.train()
        calls.clear()
        out = pm(**inputs, adapter_names=["a", "b"])
        out.logits.float().pow(2).mean().backward()  # (every architecture here checkpoints all its layers)
        assert len(calls) == 2 * pm.layout.num_layers and calls[0] is not None and all(c is calls[0] for c in calls)


# ----- copy.deepcopy ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2"])
def test_deepcopy_gives_a_working_independent_model(arch: str) -> None:
    original = _two_adapters(tiny(arch))
    names = ["a", "b"]
    before, generated = _logits(original, names, input_ids=IDS), _generate(original, names, input_ids=IDS)
    clone = copy.deepcopy(original)
    torch.testing.assert_close(_logits(clone, names, input_ids=IDS), before, rtol=0, atol=0)
    assert torch.equal(_generate(clone, names, input_ids=IDS), generated)

    # Train the copy's prefixes one step: the copy changes, the original does not.
    loss = clone(input_ids=IDS, labels=IDS, adapter_names=names).loss
    loss.backward()
    with torch.no_grad():
        for param in clone.trainable_parameters():
            param -= 0.5 * param.grad
    assert (_logits(clone, names, input_ids=IDS) - before).abs().max() > 1e-3
    torch.testing.assert_close(_logits(original, names, input_ids=IDS), before, rtol=0, atol=0)
    assert all(p.grad is None for p in original.trainable_parameters())

    # Deleting an adapter in the copy, and detaching the copy, leave the original as it was.
    clone.delete_adapter("a")
    assert original.adapter_names == ["a", "b"] and clone.adapter_names == ["b"]
    clone.detach()
    assert original.base_model.config._attn_implementation.startswith("prefixtune_")
    torch.testing.assert_close(_logits(original, names, input_ids=IDS), before, rtol=0, atol=0)
    assert torch.equal(_generate(original, names, input_ids=IDS), generated)

    # And the other way round: changing the original leaves a second copy unchanged.
    second = copy.deepcopy(original)
    with torch.no_grad():
        original.adapters["b"].kv.add_(1.0)
    original.delete_adapter("a")
    assert (_logits(original, ["b", "b"], input_ids=IDS) - before).abs().max() > 1e-3
    torch.testing.assert_close(_logits(second, names, input_ids=IDS), before, rtol=0, atol=0)


def test_deepcopy_of_an_encoder_decoder() -> None:
    original = _two_adapters(tiny_seq2seq("bart"))
    inputs = {"input_ids": IDS, "decoder_input_ids": IDS[:, :3]}
    before = _logits(original, ["a", "b"], **inputs)
    generated = _generate(original, ["a", "b"], input_ids=IDS)
    clone = copy.deepcopy(original)
    torch.testing.assert_close(_logits(clone, ["a", "b"], **inputs), before, rtol=0, atol=0)
    assert torch.equal(_generate(clone, ["a", "b"], input_ids=IDS), generated)


def test_deepcopy_of_a_classifier_routes_rows_through_its_own_heads() -> None:
    """Each adapter's head copy is per model: a copy's rows go through the copy's heads, not the original's."""
    original = _two_adapters(tiny_encoder("bert"))
    names = ["a", "b"]
    before = _logits(original, names, input_ids=IDS)
    clone = copy.deepcopy(original)
    torch.testing.assert_close(_logits(clone, names, input_ids=IDS), before, rtol=0, atol=0)
    with torch.no_grad():
        clone.heads["a"].bias.add_(1.0)
    changed = _logits(clone, names, input_ids=IDS)
    torch.testing.assert_close(changed[0], before[0] + 1.0, rtol=0, atol=1e-5)  # row "a": the copy's own head
    torch.testing.assert_close(changed[1], before[1], rtol=0, atol=0)
    torch.testing.assert_close(_logits(original, names, input_ids=IDS), before, rtol=0, atol=0)


# ----- threads ------------------------------------------------------------------------------------------------------


def _race(jobs: list[Callable[[], torch.Tensor]], iterations: int) -> None:
    """Run each job alone for its expected result, then all at once from one thread each, `iterations` times
    (every round started together by a barrier); every result must equal the job's result alone."""
    expected = [job() for job in jobs]
    barrier = threading.Barrier(len(jobs))
    failures: list[str] = []

    def worker(index: int) -> None:
        try:
            for round_ in range(iterations):
                barrier.wait(timeout=60)
                got = jobs[index]()
                if got.shape != expected[index].shape or not torch.allclose(got, expected[index], rtol=0, atol=1e-6):
                    failures.append(f"job {index}, round {round_}: result differs from the job run alone")
        except Exception as error:  # reported below, with the thread it happened in
            failures.append(f"job {index}: {type(error).__name__}: {error}")
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:5]


def test_two_threads_generating_on_one_model_each_get_their_own_prefixes() -> None:
    """Different adapters, prompt lengths, batch sizes and beam settings, at the same time on one PrefixModel."""
    pm = _two_adapters(tiny("llama-gqa"))
    short, beams = IDS[:1, :3], {"num_beams": 2, "num_return_sequences": 2}
    jobs = [
        lambda: pm.generate(input_ids=IDS, adapter_names=["a", "b"], **GREEDY).float(),
        lambda: pm.generate(input_ids=short, adapter_names=["b"], **beams, **GREEDY).float(),
    ]
    _race(jobs, iterations=60)


def test_two_threads_training_forward_and_backward_on_one_model() -> None:
    """Each thread's loss and its adapter's gradients are what they are alone (autograd.grad: no shared .grad)."""
    pm = _two_adapters(tiny("qwen2"))
    pm.train()

    def job(name: str, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
        params = list(pm.adapters[name].parameters())

        def run() -> torch.Tensor:
            loss = pm(input_ids=ids, labels=ids, adapter_names=[name] * ids.shape[0]).loss
            grads = torch.autograd.grad(loss, params)
            return torch.cat([loss.detach().reshape(1), *(g.flatten() for g in grads)])

        return run

    _race([job("a", IDS), job("b", IDS[:1, :4])], iterations=40)


def test_two_threads_on_a_classifier_with_a_head_per_adapter() -> None:
    """The per-row head routing (heads.py) is per call too: mixed rows in one thread, other rows in another."""
    pm = _two_adapters(tiny_encoder("bert"))
    jobs = [
        lambda: _logits(pm, ["a", "b"], input_ids=IDS),
        lambda: _logits(pm, ["b", BASE, "a"], input_ids=torch.cat([IDS[:, :4], IDS[:1, 2:6]])),
    ]
    _race(jobs, iterations=60)


# ----- models that would drop the prefix ----------------------------------------------------------------------------


def test_a_model_whose_attention_does_not_receive_the_forward_kwargs_is_refused() -> None:
    """No tested architecture drops them; one that did would silently run without a prefix, so attach refuses."""
    model = tiny("llama-gqa")
    attention = model.model.layers[1].self_attn
    stock = attention.forward

    def dropping_kwargs(hidden_states: torch.Tensor, position_embeddings: Any, attention_mask: Any, **_: Any) -> Any:
        return stock(hidden_states, position_embeddings, attention_mask)  # the rest of its keywords are dropped

    attention.forward = dropping_kwargs
    with pytest.raises(PrefixTuneError, match="LlamaAttention is not handed the forward's keyword arguments"):
        prefixtune.attach(model, PrefixConfig(num_virtual_tokens=2, init="random"))
    assert model.config._attn_implementation == "sdpa"  # given back as it was


def test_a_generate_that_drops_the_model_kwargs_is_an_error_not_a_silent_bare_model() -> None:
    pm = _two_adapters(tiny("llama-gqa"))
    stock = pm.base_model.prepare_inputs_for_generation

    def dropping(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {k: v for k, v in stock(*args, **kwargs).items() if k != "prefix_batch"}

    pm.base_model.prepare_inputs_for_generation = dropping
    with pytest.raises(PrefixTuneError, match="did not pass its model kwargs on to the forward"):
        pm.generate(input_ids=IDS, adapter_names=["a", "b"], **GREEDY)
    pm.generate(input_ids=IDS, adapter_names=[BASE, BASE], **GREEDY)  # no prefix to lose: fine
