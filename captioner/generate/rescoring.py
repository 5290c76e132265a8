"""Choosing among a beam's candidates by what other views of the picture say.

Beam search reads a picture once and ranks its candidates by their log-probability
given that one reading. :func:`make_score_function` scores token sequences again by
teacher forcing, on the picture itself and on the same picture turned, mirrored or
shrunk (``decode.rescore_views``, values of ``Choices().rescore_view``);
:class:`~captioner.generate.captioner.Captioner` ranks the candidates by the sum of
those log-probabilities, the log of the product of the views' probabilities: a reading
that holds up from every view goes first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

from captioner.choices import Choices
from captioner.generate.decoding import tile_for_beams
from captioner.model.layers import CaptionModel


def view_images(images: tf.Tensor, view: str, pad_fraction: float = 0.1) -> tf.Tensor:
    """uint8 pictures (B, S, S, 3) -> the same pictures seen in ``view``, (B, S, S, 3) uint8.

    ``identity``; ``rot90`` / ``rot180`` / ``rot270`` (turned anticlockwise); ``mirror``
    (left-right); ``pad`` (a white border of ``pad_fraction`` of the side on every edge,
    resized back to S: the picture a little smaller). The same ops eagerly and traced.

    Example:
        >>> x = tf.reshape(tf.cast(tf.range(4), tf.uint8), (1, 2, 2, 1))  # [[0, 1], [2, 3]]
        >>> view_images(x, "rot90")[0, :, :, 0].numpy().tolist()
        [[1, 3], [0, 2]]
    """
    Choices().check("rescore_view", view, "decode.rescore_views")
    if view == "identity":
        return images
    if view == "mirror":
        return tf.image.flip_left_right(images)
    if view != "pad":
        return tf.image.rot90(images, {"rot90": 1, "rot180": 2, "rot270": 3}[view])
    size = images.shape[1]
    border = max(1, round(pad_fraction * size))
    padded = tf.pad(images, [[0, 0], [border, border], [border, border], [0, 0]],
                    constant_values=255)  # (B, S + 2b, S + 2b, 3)
    small = tf.image.resize(padded, (size, size), antialias=True)  # (B, S, S, 3) float32
    return tf.cast(tf.clip_by_value(tf.round(small), 0, 255), tf.uint8)


def make_score_function(model: CaptionModel, start_id: int, pad_id: int,
                        views: Sequence[str]) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Compile ``images (B, S, S, 3) uint8, tokens (B, N, T) int32 -> (B, V, N) float32``:
    the log-probability of each image's N token sequences (``<end>`` included, ``pad_id``
    after, as beam search returns them) given the image seen in each of the V ``views``.

    For the ``identity`` view this is the sum of the token log-probs beam search gave the
    same sequence (up to float rounding): the same model, teacher-forced.
    """
    views = tuple(Choices().check("rescore_view", v, "decode.rescore_views") for v in views)
    if not views:
        raise ValueError("decode.rescore_views: no view to score with")
    size = model.args["image_size"]

    @tf.function(input_signature=[tf.TensorSpec((None, size, size, 3), tf.uint8),
                                  tf.TensorSpec((None, None, None), tf.int32)],
                 autograph=False)
    def score(images: tf.Tensor, tokens: tf.Tensor) -> tf.Tensor:
        batch, n, steps = tf.unstack(tf.shape(tokens))
        seen = tf.concat([view_images(images, v) for v in views], 0)  # (V*B, S, S, 3)
        enc = tile_for_beams(model.encode(seen, training=False), n)  # (V*B*N, G, E)
        targets = tf.tile(tf.reshape(tokens, (batch * n, steps)), [len(views), 1])  # (V*B*N, T)
        inputs = tf.concat([tf.fill([tf.shape(targets)[0], 1], start_id), targets[:, :-1]], 1)
        real = tf.not_equal(targets, pad_id)  # (V*B*N, T)
        logits, _ = model.decoder(enc, inputs, training=False, target_mask=real)  # (.., T, V')
        nll = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, tf.cast(logits, "float32"))
        total = -tf.reduce_sum(tf.where(real, nll, 0.0), 1)  # (V*B*N,)
        return tf.transpose(tf.reshape(total, (len(views), batch, n)), [1, 0, 2])  # (B, V, N)

    return score

