"""Filling ``data.feature_cache`` with the grids of a frozen backbone, built exactly as
the Trainer builds it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from captioner.config import Config, ConfigError
from captioner.data.features import FeatureCache, extract_features
from captioner.data.formats import read_records
from captioner.model.layers import CaptionModel
from captioner.model.precision import resolve_precision


def cache_fingerprint(cfg: Config) -> dict[str, Any]:
    """What the cached grids depend on: the backbone, its weights, input size, precision."""
    m = cfg.model
    fp = {"backbone": m.backbone, "weights": m.weights or "none", "image_size": m.image_size,
          "precision": resolve_precision(cfg.train.precision)}
    if m.backbone == "small_cnn":
        fp.update(cnn_filters=m.cnn_filters, cnn_kernels=m.cnn_kernels, cnn_padding=m.cnn_padding)
        if m.cnn_norm != "batch":  # caches made before the choice existed stay valid
            fp["cnn_norm"] = m.cnn_norm
    if m.weights is None:  # random frozen weights: they depend on the seed
        fp["seed"] = cfg.train.seed
    return fp


def ensure_feature_cache(cfg: Config, model: CaptionModel, paths: list[str],
                         log: Callable[[str], None] = print) -> FeatureCache:
    """Extract the grids of ``paths`` into ``data.feature_cache`` unless they are there.

    ``paths`` must come in a canonical (sorted) order: the cache is keyed by the list.
    """
    size = cfg.model.image_size

    @tf.function(input_signature=[tf.TensorSpec((None, size, size, 3), tf.uint8)],
                 autograph=False)
    def encode(images: tf.Tensor) -> tf.Tensor:
        return tf.cast(model.grid(images, training=False), "float32")  # (B, G, C)

    summary = extract_features(paths, encode, cfg.data.feature_cache, cache_fingerprint(cfg),
                               size, batch_size=cfg.decode.batch_size,
                               shard_size=cfg.data.shard_size, dtype=cfg.data.feature_dtype,
                               workers=cfg.data.load_workers, progress=cfg.train.progress)
    log(f"feature cache {summary.path}: {summary.num_cached} images ({summary.status}, "
        f"{summary.images_per_s:.0f} images/s)")
    cache = FeatureCache(cfg.data.feature_cache).open()
    cache.check(cache_fingerprint(cfg), size)
    return cache


def extract_for_config(cfg: Config, log: Callable[[str], None] = print) -> FeatureCache:
    """``extract-features``: the grids of every image the config's data names, with the
    backbone built exactly as :class:`Trainer` builds it (same seed, same weights)."""
    if not cfg.data.feature_cache:
        raise ConfigError("data.feature_cache is not set: name the folder for the cache")
    if cfg.model.trainable != "frozen":
        raise ConfigError("extract-features needs model.trainable: frozen")
    keras.utils.set_random_seed(cfg.train.seed)
    kind = cfg.tokenizer.kind
    records = read_records(cfg.data, smiles_targets=kind in ("smiles", "selfies"), kind=kind)
    policy = keras.DTypePolicy(resolve_precision(cfg.train.precision))
    model = CaptionModel.from_model_config(cfg.model, vocab_size=8, dtype=policy)
    paths = sorted({r.image for r in records})  # the same order as the Trainer's
    return ensure_feature_cache(cfg, model, paths, log)

