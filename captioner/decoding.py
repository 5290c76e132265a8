"""Decoding strategies. They take a step function and never see the model.

A step function maps ``(tokens (N,), state) -> (log_probs (N, V), state, attention (N, G))``
where ``state`` is any nest of tensors with leading dimension N. Everything here is
plain TensorFlow control flow, so it runs eagerly and compiles inside ``tf.function``.
"""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf

StepFn = Callable[[tf.Tensor, Any], tuple[tf.Tensor, Any, tf.Tensor]]


def greedy_search(step_fn: StepFn, initial_state: Any, start_ids: tf.Tensor, end_id: int,
                  pad_id: int, max_length: int | tf.Tensor) -> dict[str, tf.Tensor]:
    """Batched greedy decoding; each row stops at its own ``end_id``.

    Returns ``tokens`` (B, T) int32 (generated ids, ``end_id`` included, ``pad_id`` after),
    ``lengths`` (B,) (tokens up to and including ``end_id``), ``scores`` (B,) (sum of the
    chosen tokens' log-probs) and ``attention`` (B, T, G) (zeros after the end). T is the
    number of steps actually run: at most ``max_length``, fewer when every row ended.

    Example:
        >>> def step(tokens, state):  # always predicts token 2 (= end) with log-prob 0
        ...     return tf.math.log(tf.one_hot(tf.fill(tf.shape(tokens), 2), 4)), state, tf.ones((tf.shape(tokens)[0], 3)) / 3
        >>> out = greedy_search(step, tf.zeros((2, 1)), tf.ones((2,), "int32"), 2, 0, 5)
        >>> out["tokens"].numpy().tolist(), out["lengths"].numpy().tolist()
        ([[2], [2]], [1, 1])
    """
    start_ids = tf.cast(start_ids, "int32")
    batch = tf.shape(start_ids)[0]
    max_length = tf.cast(max_length, "int32")
    tokens_ta = tf.TensorArray("int32", size=0, dynamic_size=True)
    attn_ta = tf.TensorArray("float32", size=0, dynamic_size=True)

    def cond(t, _prev, _state, finished, *_):
        return tf.logical_and(t < max_length, tf.logical_not(tf.reduce_all(finished)))

    def body(t, prev, state, finished, scores, lengths, tokens_ta, attn_ta):
        log_probs, state, attn = step_fn(prev, state)  # (B, V), nest, (B, G)
        best = tf.argmax(log_probs, axis=-1, output_type="int32")  # (B,)
        best_lp = tf.gather(log_probs, best, axis=1, batch_dims=1)  # (B,)
        live = tf.logical_not(finished)
        token = tf.where(live, best, pad_id)
        scores += tf.where(live, tf.cast(best_lp, "float32"), 0.0)
        lengths += tf.cast(live, "int32")
        attn = tf.where(live[:, None], tf.cast(attn, "float32"), 0.0)
        finished = tf.logical_or(finished, tf.equal(token, end_id))
        return (t + 1, token, state, finished, scores, lengths,
                tokens_ta.write(t, token), attn_ta.write(t, attn))

    init = (tf.constant(0), start_ids, initial_state, tf.zeros((batch,), "bool"),
            tf.zeros((batch,), "float32"), tf.zeros((batch,), "int32"), tokens_ta, attn_ta)
    _, _, _, _, scores, lengths, tokens_ta, attn_ta = tf.while_loop(cond, body, init)
    return {
        "tokens": tf.transpose(tokens_ta.stack(), [1, 0]),  # (B, T)
        "lengths": lengths,  # (B,)
        "scores": scores,  # (B,)
        "attention": tf.transpose(attn_ta.stack(), [1, 0, 2]),  # (B, T, G)
    }
