"""Greedy decoding with fake step functions whose outputs are known."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from captioner.generate.decoding import greedy_search

END, PAD, START = 2, 0, 1


def scripted_step(script: np.ndarray, grid: int = 4):
    """Row b emits script[b, t] at step t with log-prob log(0.5); attention one-hot at t % G."""
    script_t = tf.constant(script, tf.int32)
    vocab = 8

    def step(tokens, state):
        t = state  # (B,) step counter as the state
        ids = tf.gather(script_t, t, axis=1, batch_dims=1)  # (B,)
        probs = 0.5 * tf.one_hot(ids, vocab) + 0.5 / (vocab - 1) * (1 - tf.one_hot(ids, vocab))
        attn = tf.one_hot(t % grid, grid)
        return tf.math.log(probs), t + 1, attn

    return step


def run(script, max_length, compiled=False):
    batch = script.shape[0]
    step = scripted_step(script)

    def go():
        return greedy_search(step, tf.zeros((batch,), tf.int32), tf.fill([batch], START),
                             END, PAD, max_length)

    out = tf.function(go)() if compiled else go()
    return {k: v.numpy() for k, v in out.items()}


SCRIPT = np.array([[4, 5, END, 6, 6, 6],
                   [4, END, 7, 7, 7, 7],
                   [5, 5, 5, 5, 5, 5]])


def test_each_row_stops_at_its_own_end():
    out = run(SCRIPT, max_length=6)
    assert out["lengths"].tolist() == [3, 2, 6]
    assert out["tokens"].tolist() == [[4, 5, END, PAD, PAD, PAD],
                                      [4, END, PAD, PAD, PAD, PAD],
                                      [5, 5, 5, 5, 5, 5]]


def test_scores_sum_chosen_log_probs():
    out = run(SCRIPT, max_length=6)
    np.testing.assert_allclose(out["scores"], np.log(0.5) * np.array([3, 2, 6]), rtol=1e-6)


def test_attention_is_kept_per_step_and_zero_after_end():
    out = run(SCRIPT, max_length=6)
    att = out["attention"]
    assert att.shape == (3, 6, 4)
    assert att[0, 1].tolist() == [0, 1, 0, 0]
    assert np.all(att[1, 2:] == 0)
    assert np.all(att[2].sum(-1) == 1)


def test_stops_early_when_all_rows_end():
    out = run(SCRIPT[:2], max_length=6)
    assert out["tokens"].shape == (2, 3)


def test_max_length_caps_steps():
    out = run(SCRIPT, max_length=2)
    assert out["tokens"].shape == (3, 2)
    assert out["lengths"].tolist() == [2, 2, 2]


def test_eager_and_compiled_agree():
    a, b = run(SCRIPT, 6), run(SCRIPT, 6, compiled=True)
    for key in a:
        np.testing.assert_allclose(a[key], b[key])


def test_token_scores_are_the_chosen_log_probs_and_zero_after_end():
    for compiled in (False, True):
        out = run(SCRIPT, max_length=6, compiled=compiled)
        live = np.arange(6)[None, :] < out["lengths"][:, None]  # (B, T)
        np.testing.assert_allclose(out["token_scores"][live], np.log(0.5), rtol=1e-6)
        assert np.all(out["token_scores"][~live] == 0)
        np.testing.assert_allclose(out["token_scores"].sum(1), out["scores"], rtol=1e-6)
