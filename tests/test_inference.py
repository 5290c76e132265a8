"""Decoding paths of a trained Captioner: greedy, beam, sampling, n-best and re-ranking."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

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
    # views' scores (1, V=2, N=2) order the candidates, after validity when re-ranking
    for views, rerank, first in (([[-1.0, -5.0], [-2.0, -1.0]], False, "C1CC"),
                                 ([[-1.0, -5.0], [-2.0, -1.0]], True, "CCO"),
                                 ([[-4.0, -1.0], [-2.0, -1.0]], False, "CCO")):
        gen = other._collect([{**part, "view_scores": np.array([views])}], ["x"], rerank, 2)
        assert gen.texts == [first]
        assert sorted(c.view_score for c in gen.candidates[0]) == sorted(
            np.array(views).sum(0).tolist())


def test_identity_view_scores_are_the_beams_own(cap, images):
    """Teacher forcing the beam's sequences on the picture itself gives the beam's scores;
    another view of the picture gives others."""
    pixels, _ = cap.load_images(images)
    beam = cap.compiled(cap.options(strategy="beam", beam_size=3, n_best=3))
    out = beam(tf.constant(pixels), tf.constant(20), tf.constant([0, 0]))
    scores = cap.scorer(("identity", "rot180"))(tf.constant(pixels), out["tokens"]).numpy()
    assert scores.shape == (len(images), 2, 3)  # (B, V, N)
    np.testing.assert_allclose(scores[:, 0], out["scores"], rtol=1e-4, atol=1e-4)
    assert np.abs(scores[:, 1] - scores[:, 0]).max() > 0.1
    assert (scores < 0).all()


def test_views_rank_the_beams_candidates(cap, images):
    views = ("identity", "rot90", "mirror")
    plain = cap.generate(images, strategy="beam", beam_size=3, n_best=3)
    viewed = cap.generate(images, strategy="beam", beam_size=3, n_best=3, rescore_views=views)
    for before, after in zip(plain.candidates, viewed.candidates):
        assert sorted(c.text for c in before) == sorted(c.text for c in after)  # same beam
        totals = [c.view_score for c in after]
        assert totals == sorted(totals, reverse=True) and None not in totals
    pixels, _ = cap.load_images(images)  # the same sums from the scorer by hand
    beam = cap.compiled(cap.options(strategy="beam", beam_size=3, n_best=3))
    tokens = beam(tf.constant(pixels), tf.constant(cap.config.decode.max_length),
                  tf.constant([0, 0]))["tokens"]
    sums = cap.scorer(views)(tf.constant(pixels), tokens).numpy().sum(1)  # (B, N)
    np.testing.assert_allclose([[c.view_score for c in x] for x in viewed.candidates],
                               -np.sort(-sums, axis=1), rtol=1e-5)
    assert viewed.texts == [c[0].text for c in viewed.candidates]
    assert [r["n_best"][0]["view_score"] for r in viewed.records(cap.tokenizer)] == [
        c[0].view_score for c in viewed.candidates]
    best = cap.generate(images, strategy="beam", beam_size=3, n_best=1, rescore_views=views)
    assert best.texts == viewed.texts  # all beams searched, then the views choose
    alone = cap.generate(images, strategy="beam", beam_size=3, n_best=3,
                         rescore_views=["identity"])  # the beam's own scores again
    assert ([[c.text for c in x] for x in alone.candidates]
            == [[c.text for c in x] for x in plain.candidates])


def test_views_leave_greedy_alone_and_need_pictures(cap, images):
    greedy = cap.generate(images, rescore_views=["identity", "rot90"])
    assert greedy.texts == cap.generate(images).texts
    assert greedy.candidates[0][0].view_score is None
    grids = np.zeros((1, cap.model.grid_size, cap.model.feature_dim), np.float32)
    with pytest.raises(ValueError, match="rescore_views turn pictures"):
        cap.generate(grids, strategy="beam", beam_size=2, rescore_views=["rot90"])
