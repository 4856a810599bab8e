"""Label-word classification reads each prompt once (a shared KV cache): the same log-likelihoods as scoring every
(prompt + label) sequence from scratch, for every method and architecture family, truncated prompts included."""

from __future__ import annotations

import warnings

import pytest
import torch

from prefixtune import data
from prefixtune.eval.likelihood import _shared_length, continues_cache, label_loglikelihoods, most_likely_labels
from prefixtune.methods.registry import build_method
from tiny import ARCHITECTURES, tiny
from tiny_seq2seq import tiny_seq2seq
from tiny_tokenizer import make_tokenizer

warnings.filterwarnings("ignore", message=".*(attention mask|pad token).*")
LABELS = ["positive", "negative", "neutral", "ambivalent"]  # of different token lengths
METHODS = {
    "full": {},
    "prefix": {"num_virtual_tokens": 3, "projection_dim": 8, "init": "random"},
    "lora": {"r": 2},
    "adapter": {"bottleneck_dim": 4},
    "prefix-memory": {},
    "lora+prefix": {"r": 2, "num_virtual_tokens": 3, "init": "random"},
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def reviews() -> list[data.Example]:
    """Prompts of different lengths (left padding in the shared batch) with labels that tokenize differently."""
    return [data.Example(f"review {i}: " + "good bad so so " * (i % 5), LABELS[i % 4]) for i in range(7)]


def trained(method: str, arch: str, tokenizer) -> torch.nn.Module:
    """A method's model with its trainable weights moved off their initialization (LoRA's B starts at zero)."""
    base = tiny(arch)
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model = base if method == "full" else build_method(method, base, METHODS[method], tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad or method == "full":
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def both(model, tokenizer, examples, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    kwargs = dict(max_length=max_length, batch_size=3)  # 7 examples: groups of 3, 3, 1
    shared = label_loglikelihoods(model, tokenizer, examples, LABELS, shared_prompt=True, **kwargs)
    scratch = label_loglikelihoods(model, tokenizer, examples, LABELS, shared_prompt=False, **kwargs)
    return shared, scratch


@pytest.mark.parametrize("method", list(METHODS))
def test_shared_prompt_equals_scratch_for_every_method(method: str, tokenizer) -> None:
    model = trained(method, "llama-gqa", tokenizer)
    assert continues_cache(model)
    for max_length in (256, 20):  # 20: every prompt cut, by a different amount for each label's length
        shared, scratch = both(model, tokenizer, reviews(), max_length)
        assert shared.shape == (7, 4)
        assert torch.allclose(shared, scratch, atol=1e-4), (shared - scratch).abs().max()
        assert scratch.std() > 0.1  # the scores differ between labels and examples: a real comparison


@pytest.mark.parametrize("arch", sorted(set(ARCHITECTURES) - {"llama-gqa"}))
def test_shared_prompt_equals_scratch_for_every_architecture(arch: str, tokenizer) -> None:
    for method in ("full", "prefix"):  # sliding windows (mistral, gemma3), learned positions (gpt2), rotary
        shared, scratch = both(trained(method, arch, tokenizer), tokenizer, reviews(), 256)
        assert torch.allclose(shared, scratch, atol=1e-4), (arch, method, (shared - scratch).abs().max())


def test_chat_prompts_share_their_template(tokenizer) -> None:
    chat_tokenizer = make_tokenizer(chat=True)
    model = trained("prefix", "llama-gqa", chat_tokenizer)
    kwargs = dict(max_length=256, batch_size=2, chat_template=True)
    shared = label_loglikelihoods(model, chat_tokenizer, reviews(), LABELS, shared_prompt=True, **kwargs)
    scratch = label_loglikelihoods(model, chat_tokenizer, reviews(), LABELS, shared_prompt=False, **kwargs)
    assert torch.allclose(shared, scratch, atol=1e-4)


def test_soft_prompts_and_seq2seq_score_from_scratch(tokenizer) -> None:
    assert not continues_cache(tiny_seq2seq("bart"))
    base = tiny("llama-gqa")
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    prompt = build_method("prompt", base, {"num_virtual_tokens": 3}, tokenizer).eval()
    assert not continues_cache(prompt)  # its forward prepends the soft prompt to every call
    default = label_loglikelihoods(prompt, tokenizer, reviews(), LABELS, max_length=256)
    scratch = label_loglikelihoods(prompt, tokenizer, reviews(), LABELS, max_length=256, shared_prompt=False)
    assert torch.equal(default, scratch)


def test_shared_length_stops_before_the_first_target_and_at_the_first_difference() -> None:
    def enc(ids: list[int], first_target: int) -> data.EncodedExample:
        labels = [data.IGNORE_INDEX] * first_target + ids[first_target:]
        return data.EncodedExample(ids, labels, first_target, 0)

    # the token before the first target (index 4) predicts it: it belongs to the per-candidate part
    assert _shared_length([enc([5, 6, 7, 8, 9, 10], 5), enc([5, 6, 7, 8, 9, 11, 12], 5)]) == 4
    # prompts cut differently (a longer label leaves less of the prompt): shared up to the first difference
    assert _shared_length([enc([5, 6, 7, 8, 9, 10], 5), enc([5, 6, 9, 12, 13], 3)]) == 2
    # a one-token prompt has nothing to share: label_loglikelihoods scores such a call from scratch
    assert _shared_length([enc([5, 9, 1], 1), enc([5, 10, 1], 1)]) == 0


def test_most_likely_labels_is_the_argmax(tokenizer) -> None:
    model = trained("prefix", "llama-gqa", tokenizer)
    predicted = most_likely_labels(model, tokenizer, reviews(), LABELS, max_length=256)
    best = label_loglikelihoods(model, tokenizer, reviews(), LABELS, max_length=256).argmax(-1)
    assert predicted == [LABELS[i] for i in best.tolist()]


def test_bench_quick_runs_both_sides(tmp_path) -> None:
    """bench/label_scoring.py --quick (the suite's run of the benchmark): both sides score, and agree."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.label_scoring import main

    out = tmp_path / "label_scoring.json"
    assert main(["--quick", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["shared_is_default"] is True
    assert result["predictions_agree"] == "8/8"
    assert result["max_abs_loglik_difference"] < 1e-4
    assert all(s > 0 for s in result["seconds_per_example"].values())
