"""Decoding paths of a trained Captioner: greedy, beam, sampling, n-best and re-ranking."""

from __future__ import annotations

import numpy as np
import pytest

from captioner.generate.captioner import Captioner, DecodeOptions


@pytest.fixture(scope="module")
def cap(trained_run):
    return Captioner.load(trained_run)


@pytest.fixture(scope="module")
def images(shapes_dir):
    return sorted((shapes_dir / "images").glob("*.png"))[:5]


def test_beam_of_one_equals_greedy(cap, images):
    greedy = cap.generate(images)
    beam = cap.generate(images, strategy="beam", beam_size=1, n_best=1)
    assert beam.texts == greedy.texts and beam.tokens == greedy.tokens
    np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-5)
    np.testing.assert_allclose(beam.attention, greedy.attention, atol=1e-6)


def test_beam_n_best_is_sorted_and_scores_at_least_greedy(cap, images):
    greedy = cap.generate(images)
    beam = cap.generate(images, strategy="beam", beam_size=4, n_best=3)
    for i, cands in enumerate(beam.candidates):
        assert len(cands) == 3
        scores = [c.score for c in cands]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(c.tokens) for c in cands}) == 3
        assert scores[0] >= greedy.scores[i] - 1e-4
        assert cands[0].attention.shape == (len(cands[0].tokens), 64)


def test_sampling_is_deterministic_per_seed(cap, images):
    a = cap.generate(images, strategy="sample", seed=3)
    b = cap.generate(images, strategy="sample", seed=3)
    assert a.tokens == b.tokens
    top1 = cap.generate(images, strategy="sample", top_k=1, seed=5)
    assert top1.tokens == cap.generate(images).tokens


def test_each_path_compiles_once_and_is_cached(cap, images):
    cap.generate(images[:2], strategy="beam", beam_size=2, n_best=2)
    n = len(cap._compiled)
    cap.generate(images[2:], strategy="beam", beam_size=2, n_best=2)
    assert len(cap._compiled) == n


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="n_best"):
        DecodeOptions("beam", beam_size=2, n_best=3)
    with pytest.raises(ValueError, match="strategy"):
        DecodeOptions("nucleus")


def test_smiles_rerank_prefers_valid_candidates(cap):
    """With a SMILES tokenizer, a higher-scoring unparseable candidate moves behind a valid one."""
    from captioner.data.tokenizers import Tokenizer

    smiles_tok = Tokenizer.create("smiles").fit(["C1CC", "CCO"])
    ids = {t: smiles_tok.token_to_id(t) for t in ("C", "1", "O")}
    end = smiles_tok.end_id
    # candidate 0: "C1CC" (unclosed ring, invalid) scores higher than candidate 1: "CCO"
    tokens = np.array([[[ids["C"], ids["1"], ids["C"], ids["C"], end],
                        [ids["C"], ids["C"], ids["O"], end, 0]]])
    part = {"tokens": tokens, "lengths": np.array([[5, 4]]), "scores": np.array([[-1.0, -2.0]]),
            "token_scores": np.zeros((1, 2, 5), np.float32),
            "attention": np.zeros((1, 2, 5, 64), np.float32)}
    other = Captioner(cap.config, smiles_tok, cap.model)
    plain = other._collect([part], ["x"], rerank=False, n_best=2)
    reranked = other._collect([part], ["x"], rerank=True, n_best=2)
    assert plain.texts == ["C1CC"] and reranked.texts == ["CCO"]
    assert [c.text for c in reranked.candidates[0]] == ["CCO", "C1CC"]
