"""Batch-norm statistics recomputed for the weights as they are ("precise BN").

A BatchNormalization layer trains on each batch's own statistics but infers with moving
averages kept during training. When the weights move quickly (a high learning rate on
ever-new drawn pictures), those averages can describe the recent past rather than the
current network, and the model then infers markedly worse than it trains (README, "SMILES
from pictures of ZINC molecules", has the measurement). :func:`recompute_batchnorm` sets
each trainable BN layer's moving mean and variance to the average of its batch moments
over a few training batches, computed with the current weights (the PreciseBN of pycls /
Detectron2; Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021). The trainer does so
before each validation when ``train.precise_bn_batches`` is set, and ``captioner
recalibrate`` does it for a trained run.
"""

from __future__ import annotations

from collections.abc import Iterable

import keras
import numpy as np
import tensorflow as tf

from captioner.model.layers import CaptionModel


def trainable_batchnorm(model: CaptionModel) -> list[keras.layers.BatchNormalization]:
    """The BatchNormalization layers of ``model``'s backbone that train (a frozen
    backbone's keep the statistics they came with)."""
    return [layer for layer in model.backbone._flatten_layers()
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]


def recompute_batchnorm(model: CaptionModel, images: Iterable[tf.Tensor | np.ndarray]) -> int:
    """Set the moving mean and variance of each trainable BN layer of ``model``'s backbone
    to the mean of its batch moments over ``images`` (uint8 batches (B, S, S, 3)), the
    backbone run in training mode with the current weights; nothing else changes. Returns
    the number of batches used (0, and nothing changed, when there is no such layer or no
    batch).

    Example:
        >>> from captioner.model.layers import CaptionModel
        >>> model = CaptionModel(vocab_size=8, image_size=32, cnn_filters=[8, 16],
        ...                      embedding_dim=8, units=8, attention_units=8).build_weights()
        >>> batch = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype="uint8")
        >>> recompute_batchnorm(model, [batch])
        1
        >>> trained = model.grid(batch, training=True)  # the batch's own statistics
        >>> bool(np.allclose(model.grid(batch), trained, atol=1e-4))  # now also inferred
        True
    """
    layers = trainable_batchnorm(model)
    if not layers:
        return 0
    momentum = [layer.momentum for layer in layers]
    before = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in layers]
    sums = [[np.zeros_like(mean, "float64"), np.zeros_like(var, "float64")]
            for mean, var in before]
    n, done = 0, False
    try:
        for layer in layers:
            layer.momentum = 0.0  # the moving statistics become this batch's
        for batch in images:
            model.grid(tf.convert_to_tensor(batch), training=True)
            for (mean, var), layer in zip(sums, layers):
                mean += layer.moving_mean.numpy()
                var += layer.moving_variance.numpy()
            n += 1
        done = True
    finally:
        for layer, m in zip(layers, momentum):
            layer.momentum = m
        if done and n:
            before = [(mean / n, var / n) for mean, var in sums]
        for (mean, var), layer in zip(before, layers):  # the old ones if it failed
            layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
            layer.moving_variance.assign(var.astype(layer.moving_variance.dtype))
    return n


__all__ = ["recompute_batchnorm", "trainable_batchnorm"]
