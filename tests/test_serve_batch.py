"""The serving engine without HTTP: continuous batching across adapters, sampling, stop strings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prefixtune.model import BASE
from prefixtune.serve.batch import RunningBatch
from prefixtune.serve.sampling import SamplingParams, TextStream, _keep_nucleus, sample, sample_rows
from serve_fixtures import oracle, save_adapters, tiny_llama, tiny_tokenizer
from tiny import ARCHITECTURES, tiny

# (adapter, prompt ids, step at which the row joins); rows leave after N tokens, so joins and leaves interleave
ROWS = [
    ("alpha", [5, 6, 7, 8, 9], 0),
    ("beta", [10, 11], 1),
    (BASE, [12, 13, 14, 15, 16, 17, 18], 1),
    ("gamma", [19], 3),
    ("alpha", [20, 21, 22], 4),
]
N = 7


@pytest.mark.parametrize("arch", ["wide-llama", *ARCHITECTURES])
def test_joining_and_leaving_rows_match_each_row_alone(arch: str, tmp_path: Path) -> None:
    """Logits and greedy tokens of every row equal those of `generate` on that row alone with its own prefix.

    Every decoder family of the core tests (sliding windows, GQA, odd head_dim included), plus a Llama with a
    wide init whose greedy tokens vary a lot."""
    base = tiny_llama() if arch == "wide-llama" else tiny(arch)
    model = oracle(base, save_adapters(base, tmp_path))
    solo = {}
    for i, (adapter, prompt, _) in enumerate(ROWS):
        ids = torch.tensor([prompt])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=N,
            do_sample=False,
            adapter_names=[adapter],
            pad_token_id=0,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        solo[i] = (out.sequences[0, len(prompt) :].tolist(), torch.cat(out.logits))

    batch = RunningBatch(model)
    tokens: dict[int, list[int]] = {i: [] for i in range(len(ROWS))}
    logits_seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(ROWS))}
    order: list[int] = []

    def record(rows: list[int], logits: torch.Tensor) -> None:
        for i, row_logits in zip(rows, logits):
            tokens[i].append(int(row_logits.argmax()))
            logits_seen[i].append(row_logits)

    for step in range(20):
        joining = [i for i, (_, _, at) in enumerate(ROWS) if at == step]
        if joining:
            record(joining, batch.prefill([ROWS[i][1] for i in joining], [ROWS[i][0] for i in joining]))
            order += joining
        keep = [r for r, i in enumerate(order) if len(tokens[i]) < N]
        batch.keep(keep)
        order = [order[r] for r in keep]
        if not order and step > max(at for *_, at in ROWS):
            break
        if order:
            record(order, batch.step(torch.tensor([tokens[i][-1] for i in order])))
    for i in range(len(ROWS)):
        assert tokens[i] == solo[i][0], f"row {i} ({ROWS[i][0]})"
        torch.testing.assert_close(torch.stack(logits_seen[i]), solo[i][1], atol=1e-4, rtol=1e-4)
    assert len(batch) == 0


def test_greedy_top_p_and_seed() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample(logits, SamplingParams(temperature=0.0), torch.Generator()) == 1
    # top_p so small that only the most likely token is left
    picks = {
        sample(logits, SamplingParams(temperature=1.0, top_p=0.01), torch.Generator().manual_seed(s)) for s in range(20)
    }
    assert picks == {1}
    # top_p 0.9 keeps the two near-equal tokens only
    picks = {
        sample(logits, SamplingParams(temperature=1.0, top_p=0.9), torch.Generator().manual_seed(s)) for s in range(50)
    }
    assert picks == {1, 3}
    a = [sample(logits, SamplingParams(seed=7), g) for g in [SamplingParams(seed=7).generator()] for _ in range(10)]
    b = [sample(logits, SamplingParams(seed=7), g) for g in [SamplingParams(seed=7).generator()] for _ in range(10)]
    assert a == b


def test_batched_sampling_follows_the_distribution_and_each_rows_seed() -> None:
    """sample_rows (all sampled rows of a step at once) draws from softmax(logits / T), within top_p, and row i's
    draw depends on its own generator only."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1e9]]).repeat(4000, 1)
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(4000)]
    picks = sample_rows(logits, params, [p.generator() for p in params])
    freq = torch.bincount(torch.tensor(picks), minlength=5).double() / len(picks)
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), -1), atol=0.03, rtol=0)
    assert freq[4] == 0  # weight 0: never drawn
    alone = [sample_rows(logits[:1], [p], [p.generator()])[0] for p in params[:50]]
    assert alone == picks[:50]  # the same seed, the same draw, whatever else is in the batch
    # temperature 0.5 sharpens the distribution
    params = [SamplingParams(temperature=0.5, seed=i) for i in range(4000)]
    picks = sample_rows(logits, params, [p.generator() for p in params])
    freq = torch.bincount(torch.tensor(picks), minlength=5).double() / len(picks)
    torch.testing.assert_close(freq, torch.softmax(logits[0].double() / 0.5, -1), atol=0.03, rtol=0)
    # top_p 0.8 keeps tokens 3 and 2 (0.644 + 0.237 of the mass: 3 alone falls short), in proportion
    params = [SamplingParams(temperature=1.0, top_p=0.8, seed=i) for i in range(4000)]
    picks = sample_rows(logits, params, [p.generator() for p in params])
    assert set(picks) == {3, 2}
    assert abs(picks.count(3) / len(picks) - 0.644 / (0.644 + 0.237)) < 0.03


def test_nucleus_equals_the_full_sort_also_beyond_the_first_guess() -> None:
    """The partial sort (top-k, widened where the mass falls short) keeps what a sort of the whole row keeps."""
    torch.manual_seed(0)
    weights = torch.exp(torch.randn(6, 5000) * torch.tensor([[0.1], [0.5], [1.0], [2.0], [4.0], [8.0]]))
    top_p = torch.tensor([0.9, 0.5, 0.95, 0.3, 0.99, 1e-9])
    kept = _keep_nucleus(weights, top_p)
    for row, p in zip(range(6), top_p):
        values, order = weights[row].sort(descending=True)
        before = values.cumsum(0) - values
        expected = set(order[(before < p * weights[row].sum()) | (torch.arange(5000) == 0)].tolist())
        assert set(kept[row].nonzero()[:, 0].tolist()) == expected, row
        torch.testing.assert_close(kept[row][list(expected)], weights[row][list(expected)])
    assert (kept[0] > 0).sum() > 512  # the flat row needed more than the first top-k guess


def test_stop_strings_are_cut_and_held_back() -> None:
    tok = tiny_tokenizer()
    ids = tok("the cat sat on the red road", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, ["red road", "moon"])
    emitted, stopped = "", False
    for token in ids:
        delta, stopped = stream.push(token)
        emitted += delta
        if stopped:
            break
    assert stopped and emitted == "the cat on the "  # [UNK] (sat) is a special token: skipped
    # "red" might start "red road": it is held back until a later token decides
    stream = TextStream(tok, ["red road"])
    assert [stream.push(t)[0] for t in tok("the red", add_special_tokens=False)["input_ids"]] == ["the", " "]
    assert stream.flush() == "red"
