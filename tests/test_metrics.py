"""BLEU, ROUGE, accuracy, perplexity: scales, multi-reference handling, bad input."""

import math

import pytest
import sacrebleu

from prefixtune.errors import PrefixTuneError
from prefixtune.eval import metrics


def test_bleu_exact_match_is_100():
    assert metrics.bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)


def test_bleu_takes_all_references_of_an_example():
    prediction = ["there is a cat on the mat"]
    one = metrics.bleu(prediction, [["the cat is on the mat"]])
    two = metrics.bleu(prediction, [["the cat is on the mat", "there is a cat on the mat"]])
    assert one < 50 and two == pytest.approx(100.0)


def test_bleu_variable_number_of_references_matches_sacrebleu():
    predictions = ["a small cafe near the river", "blue spice is a pub", "cheap food in the city centre"]
    references = [
        ["a small cafe by the river", "there is a cafe near the river"],
        ["blue spice is a pub"],
        ["cheap food in the centre of the city", "the city centre has cheap food", "food is cheap in the city"],
    ]
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(3)]
    expected = sacrebleu.corpus_bleu(predictions, streams).score
    assert metrics.bleu(predictions, references) == pytest.approx(expected)
    # the order of references within an example does not matter
    shuffled = [list(reversed(refs)) for refs in references]
    assert metrics.bleu(predictions, shuffled) == pytest.approx(expected)


def test_bleu_accepts_a_single_string_as_references():
    assert metrics.bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)


def test_rouge_is_best_over_references_on_0_100_scale():
    scores = metrics.rouge(["the cat sat"], [["a dog ran far away", "the cat sat"]])
    assert set(scores) == {"rouge1", "rouge2", "rougeL"}
    assert all(v == pytest.approx(100.0) for v in scores.values())
    partial = metrics.rouge(["the cat sat"], [["the cat sat on the mat"]])
    assert 0 < partial["rouge2"] < partial["rouge1"] < 100


def test_accuracy_normalizes_generated_label_words():
    predictions = [" Positive.", "negative\nbecause the food", "neutral", "ambivalent"]
    labels = ["positive", "negative", "positive", "negative"]
    assert metrics.accuracy(predictions, labels) == pytest.approx(0.5)
    assert metrics.normalize_label("  Neutral!  \nmore") == "neutral"
    assert metrics.normalize_label("") == ""


def test_perplexity():
    assert metrics.perplexity(0.0, 10) == pytest.approx(1.0)
    assert metrics.perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert metrics.perplexity(1e6, 1) == math.inf


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: metrics.bleu(["a"], [["a"], ["b"]]), "1 predictions but 2"),
        (lambda: metrics.bleu([], []), "nothing to score"),
        (lambda: metrics.rouge(["a"], [[]]), "non-empty list"),
        (lambda: metrics.accuracy(["a", "b"], ["a"]), "2 predictions but 1 labels"),
        (lambda: metrics.accuracy([], []), "nothing to score"),
        (lambda: metrics.perplexity(3.0, 0), "no target tokens"),
    ],
)
def test_bad_input_is_a_prefixtune_error(call, message):
    with pytest.raises(PrefixTuneError, match=message):
        call()
