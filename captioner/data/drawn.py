"""Training batches of molecule pictures drawn while training (``data.format: smiles``).

Every example is drawn anew, in a style sampled from ``data.drawing``
(:func:`captioner.data.drawing.draw_example`), seeded by (``train.seed``, epoch,
position in the epoch): an epoch never shows the same picture twice and no two epochs
look alike, yet a run -- or a run resumed in the middle of an epoch -- sees exactly the
same pictures with any number of drawing processes. Drawing runs in
``data.drawing.workers`` processes (0: in the training process), a few batches ahead
of training, and reaches TensorFlow through ``tf.data.Dataset.from_generator``.

With ``grid_hw`` (the backbone's grid) each batch also carries, per target position,
the grid cell of the atom that token names (:func:`atom_cells`), for training the
attention to look at the atom it reads (``train.attention_supervision``).

Example::

    source = DrawnExamples(["CCO", "c1ccccc1"], tokens, image_size=128,
                           cfg=DrawingConfig(workers=0), seed=0)
    for images, targets in source.batches(batch_size=2, epoch=1):  # (2, 128, 128, 3) uint8
        ...
"""

from __future__ import annotations

import logging
import multiprocessing
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
import tensorflow as tf

from captioner.config import DrawingConfig
from captioner.data.drawing import DrawnBatch, draw_batch, draw_named, example_seed
from captioner.data.molecules import atom_tokens_positions, cell_of_point
from captioner.data.splits import epoch_batches, no_autotune


def atom_cells(smiles: str, xy: np.ndarray | None, grid_hw: tuple[int, int], size: int,
               length: int) -> np.ndarray:
    """(length,) int32: at each position of the target row ``<start> t_1 t_2 ...`` the
    flat (row-major) cell of the ``grid_hw`` grid over a ``size``-px picture that holds
    the atom token ``t_j`` names (``xy[k]`` for the k-th atom token, in the atom order of
    ``smiles``), -1 at every other position and everywhere when ``xy`` is None or does
    not have one position per atom token.

    Example:
        >>> xy = np.array([[10.0, 10.0], [100.0, 10.0]])  # C at cell (0, 0), O at (0, 6)
        >>> atom_cells("C=O", xy, (7, 7), 112, 6).tolist()
        [-1, 0, -1, 6, -1, -1]
    """
    out = np.full(length, -1, np.int32)
    if xy is None:
        return out
    try:
        pairs = atom_tokens_positions(smiles, list(xy))  # (index among smiles' tokens, xy)
    except ValueError:  # not one position per atom token
        return out
    for index, (x, y) in pairs:
        if index + 1 < length:  # + 1: <start>
            row, col = cell_of_point((float(x), float(y)), grid_hw, (size, size))
            out[index + 1] = row * grid_hw[1] + col
    return out


class DrawnExamples:
    """Batches of (pictures (B, S, S, 3) uint8, targets (B, L) int32) drawn from SMILES,
    and with ``grid_hw`` the atoms' cells (B, L) int32 (:func:`atom_cells`) as a third.

    ``smiles[i]`` is drawn for training pair ``i`` whose targets are ``tokens[i]`` (SMILES
    tokens for ``grid_hw``: position j + 1 is the j-th token of ``smiles[i]``).
    The drawing processes start on first use and stop with :meth:`close` (or when the
    object is collected). A molecule no toolkit can draw is trained on a white picture,
    logged and counted in :attr:`undrawn`.
    """

    def __init__(self, smiles: Sequence[str], tokens: np.ndarray, image_size: int,
                 cfg: DrawingConfig, seed: int, ahead: int = 4,
                 grid_hw: tuple[int, int] | None = None):
        if len(smiles) != len(tokens):
            raise ValueError(f"{len(smiles)} SMILES but {len(tokens)} target rows")
        self.smiles, self.tokens = list(smiles), np.asarray(tokens, np.int32)
        self.grid_hw = None if grid_hw is None else (int(grid_hw[0]), int(grid_hw[1]))
        self.image_size, self.cfg, self.seed = int(image_size), cfg, int(seed)
        self.ahead = max(1, ahead)
        self._pool: ProcessPoolExecutor | None = None
        self.undrawn: dict[str, int] = {}  # SMILES no toolkit could draw -> times
        self._finalizer: weakref.finalize | None = None

    @property
    def num_pairs(self) -> int:
        return len(self.smiles)

    def _executor(self) -> ProcessPoolExecutor | None:
        if self.cfg.workers == 0:
            return None
        if self._pool is None:  # spawn: the workers never inherit TensorFlow's threads
            self._pool = ProcessPoolExecutor(self.cfg.workers,
                                             mp_context=multiprocessing.get_context("spawn"))
            self._finalizer = weakref.finalize(self, self._pool.shutdown, cancel_futures=True)
        return self._pool

    def _count(self, failed: list[str]) -> None:
        """Molecules no toolkit could draw (trained on a white picture), logged once each."""
        for smiles in failed:
            if smiles not in self.undrawn:
                logging.getLogger(__name__).warning(
                    "could not draw %r: trained on a white picture", smiles)
            self.undrawn[smiles] = self.undrawn.get(smiles, 0) + 1

    def close(self) -> None:
        """Stop the drawing processes (a later batch starts new ones)."""
        if self._finalizer is not None:
            self._finalizer()
        self._pool = self._finalizer = None

    def _items(self, epoch: int, rows: np.ndarray, first: int) -> list[tuple[str, int]]:
        """(SMILES, seed) of one batch of pair indices, the batch at step ``first``."""
        b = len(rows)
        return [(self.smiles[i], example_seed(self.seed, epoch, first * b + j))
                for j, i in enumerate(rows)]

    def _cells(self, rows: np.ndarray, drawn: DrawnBatch) -> np.ndarray:
        """(B, L) int32 atom cells of one drawn batch (:func:`atom_cells`)."""
        length = self.tokens.shape[1]
        return np.stack([atom_cells(self.smiles[i], xy, self.grid_hw, self.image_size, length)
                         for i, xy in zip(rows, drawn.atoms, strict=True)])

    def _generate(self, epoch: int, batches: np.ndarray, skip: int
                  ) -> Iterator[tuple[np.ndarray, ...]]:
        pool = self._executor()
        window: deque[tuple[np.ndarray, Future | DrawnBatch]] = deque()

        def submit(k: int) -> None:
            items = self._items(epoch, batches[k], skip + k)
            work = (pool.submit(draw_batch, items, self.image_size, self.cfg) if pool
                    else None)
            window.append((batches[k], work if work is not None else
                           draw_batch(items, self.image_size, self.cfg)))

        upcoming = iter(range(len(batches)))
        for k in upcoming:
            submit(k)
            if len(window) >= self.ahead:
                break
        while window:
            rows, work = window.popleft()
            drawn = work.result() if isinstance(work, Future) else work
            self._count(drawn.failed)
            k = next(upcoming, None)
            if k is not None:
                submit(k)
            if self.grid_hw is None:
                yield drawn.images, self.tokens[rows]
            else:
                yield drawn.images, self.tokens[rows], self._cells(rows, drawn)

    def batches(self, batch_size: int, epoch: int, skip: int = 0,
                max_steps: int | None = None) -> tf.data.Dataset:
        """The batches of 1-based ``epoch`` after the first ``skip`` (pairs in the seeded
        order of :func:`~captioner.data.splits.epoch_batches`, full batches only)."""
        order = epoch_batches(self.num_pairs, batch_size, self.seed, epoch, skip, max_steps)
        size, length = self.image_size, self.tokens.shape[1]
        signature = (tf.TensorSpec((batch_size, size, size, 3), tf.uint8),
                     tf.TensorSpec((batch_size, length), tf.int32))
        if self.grid_hw is not None:  # + the atoms' cells (B, L)
            signature += (tf.TensorSpec((batch_size, length), tf.int32),)
        return tf.data.Dataset.from_generator(
            lambda: self._generate(epoch, order, skip), output_signature=signature
        ).prefetch(2).with_options(no_autotune())  # one generator: nothing to tune


def draw_split(smiles: Sequence[str], size: int, style: str, seed: int,
               cfg: DrawingConfig) -> np.ndarray:
    """Fixed pictures of a validation/test split: (N, size, size, 3) uint8, molecule ``i``
    drawn in ``style`` with seed (``seed``, 0, ``i``); the training mix for ``mix``."""
    if style == "mix":
        items = [(s, example_seed(seed, 0, i)) for i, s in enumerate(smiles)]
        return draw_batch(items, size, cfg).images
    out = np.empty((len(smiles), size, size, 3), np.uint8)
    for i, s in enumerate(smiles):
        out[i] = np.asarray(draw_named(s, style, size, example_seed(seed, 0, i))[0])
    return out


__all__ = ["DrawnExamples", "atom_cells", "draw_split"]
