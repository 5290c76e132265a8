"""Choosing among candidates by what other views of the picture say.

Beam search reads a picture once and ranks its candidates by their log-probability
given that one reading. :func:`make_score_function` scores token sequences again by
teacher forcing, on the picture itself and on the same picture turned, mirrored or
shrunk (``decode.rescore_views``, values of ``Choices().rescore_view``);
:class:`~captioner.generate.captioner.Captioner` ranks the candidates by the sum of
those log-probabilities, the log of the product of the views' probabilities: a reading
that holds up from every view goes first.

A drawing cut to its ink can also be cut again at other margins (``decode.margin_views``):
the Captioner decodes each cut, takes the union of their candidates, scores each one
at every margin with :func:`make_reading_function` and ranks what the candidates name
with :func:`pool_readings` (for SMILES, the spellings of one molecule pool).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
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
        seen = tf.concat([view_images(images, v) for v in views], 0)  # (V*B, S, S, 3)
        token_logp, _ = teacher_forced(model, seen, tf.tile(tokens, [len(views), 1, 1]),
                                       start_id, pad_id)  # (V*B, N, T)
        total = tf.reduce_sum(token_logp, 2)  # (V*B, N)
        batch, n = tf.shape(tokens)[0], tf.shape(tokens)[1]
        return tf.transpose(tf.reshape(total, (len(views), batch, n)), [1, 0, 2])  # (B, V, N)

    return score


def teacher_forced(model: CaptionModel, images: tf.Tensor, tokens: tf.Tensor, start_id: int,
                   pad_id: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Each image's N token sequences (B, N, T) read by teacher forcing: every token's
    log-probability (B, N, T) float32 (0 at ``pad_id``) and the attention that emitted it
    (B, N, T, G) (0 rows at ``pad_id``). Traced inside the compiled functions here."""
    batch, n, steps = tf.unstack(tf.shape(tokens))
    enc = tile_for_beams(model.encode(images, training=False), n)  # (B*N, G, E)
    targets = tf.reshape(tokens, (batch * n, steps))  # (B*N, T)
    inputs = tf.concat([tf.fill([batch * n, 1], start_id), targets[:, :-1]], 1)
    real = tf.not_equal(targets, pad_id)  # (B*N, T)
    logits, alpha = model.decoder(enc, inputs, training=False, target_mask=real)  # (.., T, V')
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, tf.cast(logits, "float32"))
    token_logp = tf.where(real, -nll, 0.0)  # (B*N, T)
    alpha = tf.where(real[:, :, None], tf.cast(alpha, "float32"), 0.0)  # (B*N, T, G)
    return (tf.reshape(token_logp, (batch, n, steps)),
            tf.reshape(alpha, (batch, n, steps, tf.shape(alpha)[-1])))


def make_reading_function(model: CaptionModel, start_id: int, pad_id: int
                          ) -> Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]:
    """Compile ``images (B, S, S, 3) uint8, tokens (B, N, T) int32 -> {"token_scores":
    (B, N, T), "attention": (B, N, T, G)}``: :func:`teacher_forced` on the pictures as
    given. A sequence's token scores sum to its score in :func:`make_score_function`'s
    ``identity`` view.
    """
    size = model.args["image_size"]

    @tf.function(input_signature=[tf.TensorSpec((None, size, size, 3), tf.uint8),
                                  tf.TensorSpec((None, None, None), tf.int32)],
                 autograph=False)
    def read(images: tf.Tensor, tokens: tf.Tensor) -> dict[str, tf.Tensor]:
        token_logp, alpha = teacher_forced(model, images, tokens, start_id, pad_id)
        return {"token_scores": token_logp, "attention": alpha}

    return read


@dataclass(frozen=True)
class PooledReading:
    """What one group of candidates names, ranked by :func:`pool_readings`.

    ``key``: what the group's spellings name (a canonical SMILES, or the text itself);
    ``index``: the candidate that spells it best (its position in the union);
    ``score``: the log of the summed probabilities of the group's spellings, each the
    product of its probabilities at every margin.

    Example:
        >>> PooledReading("CCO", 0, -0.5).index
        0
    """

    key: str
    index: int
    score: float


def pool_readings(keys: Sequence[str], logp: np.ndarray) -> list[PooledReading]:
    """Rank the union of one picture's candidates: ``keys[n]`` names candidate n and
    ``logp`` (N, M) is its log-probability read at each of M margins. Best first.

    Example:
        >>> logp = np.log([[0.3, 0.5], [0.3, 0.5], [0.4, 0.5]])  # (N, M)
        >>> [(r.key, r.index) for r in pool_readings(["CCO", "CCO", "CCN"], logp)]
        [('CCO', 0), ('CCN', 2)]
    """
    total = np.asarray(logp, np.float64).sum(1)  # (N,): log of the product over margins
    groups: dict[str, list[int]] = {}
    for n, key in enumerate(keys):
        groups.setdefault(key, []).append(n)
    pooled = [PooledReading(key, max(members, key=lambda n: total[n]),
                            float(np.logaddexp.reduce(total[members])))
              for key, members in groups.items()]
    return sorted(pooled, key=lambda r: -r.score)
