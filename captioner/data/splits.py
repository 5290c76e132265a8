"""Splits in memory (each image once, its references, the training pairs) and the
seeded, resumable batch order of an epoch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from captioner.data.images import load_images
from captioner.data.manifests import LoadReport, Record


@dataclass
class SplitData:
    """One split in memory: unique images, all their references, and the training pairs.

    ``pair_image[i]`` is the index into ``images`` of training pair ``i``.

    Example:
        >>> s = SplitData(np.zeros((1, 8, 8, 3), "uint8"), ["a.png"], [["a b", "a c"]], [{}],
        ...               np.array([0, 0]), ["a b", "a c"])
        >>> s.num_pairs, s.num_images
        (2, 1)
    """

    images: np.ndarray | None  # (N_img, S, S, 3) uint8, or cached grids (N_img, G, C)
    paths: list[str]
    references: list[list[str]]
    meta: list[dict[str, Any]]
    pair_image: np.ndarray  # (N_pairs,) int
    pair_text: list[str]

    @property
    def num_pairs(self) -> int:
        return len(self.pair_text)

    @property
    def num_images(self) -> int:
        return len(self.paths)


def build_split(records: list[Record], size: int, workers: int = 4,
                report: LoadReport | None = None, load: bool = True,
                skip: set[str] | None = None, crop_margin: float | None = None) -> SplitData:
    """Group records by image, load each image once, drop pairs of unreadable images
    (``crop_margin``: see :func:`~captioner.data.images.load_image`).

    With ``load=False`` no pixel is read (``images`` is None: the model's inputs come
    from a feature cache) and the images in ``skip`` are dropped instead.
    """
    by_image: dict[str, list[Record]] = {}
    for r in records:
        by_image.setdefault(r.image, []).append(r)
    paths = list(by_image)
    if load:
        images, ok, rep = load_images(paths, size, workers, crop_margin)
        if report is not None:
            report.failures.extend(rep.failures)
    else:
        images, ok = None, np.array([p not in (skip or set()) for p in paths], bool)
    kept = [p for p, good in zip(paths, ok) if good]
    pair_image, pair_text = [], []
    for idx, p in enumerate(kept):
        for r in by_image[p]:
            pair_image.append(idx)
            pair_text.append(r.text)
    return SplitData(images, kept, [[r.text for r in by_image[p]] for p in kept],
                     [by_image[p][0].meta for p in kept], np.asarray(pair_image, np.int64),
                     pair_text)


# ---- batching ----------------------------------------------------------------------------
def no_autotune() -> tf.data.Options:
    """Options that turn tf.data's autotuner off, for pipelines with nothing to tune (a
    fixed prefetch, no parallel map): joining the autotuner's thread kept each epoch's
    iterator waiting, idle, after its last batch (README, "An idle wait at the end of
    every epoch").

    Example:
        >>> tf.data.Dataset.range(3).with_options(no_autotune()).options().autotune.enabled
        False
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def epoch_order(num_pairs: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled pair order of one epoch; a pure function of (seed, epoch) for resuming."""
    return np.random.default_rng([seed, epoch]).permutation(num_pairs)


def gather_batch(images: tf.Tensor, tokens: tf.Tensor, pair_image: tf.Tensor, idx: tf.Tensor
                 ) -> tuple[tf.Tensor, tf.Tensor]:
    """Pairs ``idx`` -> (images (B, S, S, 3) uint8, tokens (B, L) int32). Works eagerly
    and inside ``tf.data``."""
    return tf.gather(images, tf.gather(pair_image, idx)), tf.gather(tokens, idx)


def epoch_batches(num_pairs: int, batch_size: int, seed: int, epoch: int, skip: int = 0,
                  max_steps: int | None = None) -> np.ndarray:
    """Pair indices of one epoch's batches after the first ``skip``: (steps, batch_size).

    Only full batches are used (a fixed shape means one compiled train step).
    """
    steps = steps_per_epoch(num_pairs, batch_size, max_steps)
    order = epoch_order(num_pairs, seed, epoch)[: steps * batch_size]
    return order.reshape(steps, batch_size)[skip:]


@dataclass
class PairTensors:
    """A split's images, targets and pair->image index as tensors, built once per run.

    Example:
        >>> t = PairTensors.from_arrays(np.zeros((2, 4, 4, 3), "uint8"), np.ones((3, 5)),
        ...                             np.array([0, 1, 1]))
        >>> [(im.shape, tok.shape) for im, tok in t.batches(np.array([[2, 0]]))]
        [(TensorShape([2, 4, 4, 3]), TensorShape([2, 5]))]
    """

    images: tf.Tensor  # (N_img, S, S, 3) uint8
    tokens: tf.Tensor  # (N_pairs, L) int32
    pair_image: tf.Tensor  # (N_pairs,) int64

    @classmethod
    def from_arrays(cls, images: np.ndarray, tokens: np.ndarray, pair_image: np.ndarray
                    ) -> PairTensors:
        return cls(tf.constant(images, tf.uint8), tf.constant(tokens, tf.int32),
                   tf.constant(pair_image, tf.int64))

    def batches(self, batch_indices: np.ndarray) -> tf.data.Dataset:
        """A dataset of (images, tokens) batches for rows of pair indices (steps, B)."""
        ds = tf.data.Dataset.from_tensor_slices(batch_indices)
        return ds.map(lambda idx: gather_batch(self.images, self.tokens, self.pair_image, idx)
                      ).prefetch(2).with_options(no_autotune())


def steps_per_epoch(num_pairs: int, batch_size: int, max_steps: int | None) -> int:
    steps = num_pairs // batch_size
    return min(steps, max_steps) if max_steps else steps

