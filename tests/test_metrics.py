"""Exact match and BLEU against hand-computed values."""

from __future__ import annotations

import math

import pytest

from captioner.metrics import corpus_bleu, exact_match, validation_metric


def test_exact_match_uses_any_reference_and_tokens():
    preds = ["a red circle", "a blue  square", "a cat"]
    refs = [["a green circle", "a red circle"], ["a blue square"], ["a dog"]]
    assert exact_match(preds, refs) == pytest.approx(2 / 3)
    assert exact_match([], []) == 0.0


def test_bleu_hand_computed():
    # hypothesis of 4 words, 3 unigram matches, 1 bigram match out of 3; brevity penalty 1
    pred = ["the cat sat down"]
    refs = [["the cat is down"]]
    b1 = corpus_bleu(pred, refs, n=1)
    b2 = corpus_bleu(pred, refs, n=2)
    assert b1 == pytest.approx(3 / 4)
    assert b2 == pytest.approx(math.sqrt(3 / 4 * 1 / 3))


def test_bleu_brevity_penalty_uses_closest_reference():
    pred = ["a b c"]
    refs = [["a b c d e f", "a b c x"]]
    # closest ref length 4 -> BP = exp(1 - 4/3)
    assert corpus_bleu(pred, refs, n=1) == pytest.approx(math.exp(1 - 4 / 3))


def test_validation_metric_dispatch():
    assert validation_metric("exact_match", ["a"], [["a"]]) == 1.0
    assert validation_metric("bleu4", ["a b c d"], [["a b c d"]]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown validation metric"):
        validation_metric("cider", ["a"], [["a"]])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        exact_match(["a", "b"], [["a"]])
