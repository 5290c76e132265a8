"""A run's training state and where it is saved: ``checkpoints/`` (the latest N) and
``best/`` (the best on the validation metric) of the run directory.

TensorFlow's ``CheckpointManager`` writes a checkpoint's data files, then its index, then
replaces the ``checkpoint`` state file atomically, so a crash leaves at worst an
unreferenced or damaged newest checkpoint: :meth:`Checkpoints.restore` reads each one
fully before restoring it and falls back to the previous one, saying what it skipped.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from captioner.model.restore import restore_first_readable


class Checkpoints:
    """The training state of a run -- the model, its optimizer(s), the completed epochs,
    the steps done of the current epoch and the best validation metric so far -- as one
    ``tf.train.Checkpoint``, saved into ``run_dir/checkpoints`` (the latest ``keep``) and
    ``run_dir/best`` (one).

    ``epoch``, ``step_in_epoch`` (int64), ``best`` (float64, -inf at first),
    ``loss_sum`` (float64, the current epoch's summed step losses) and ``skipped``
    (int64, the current epoch's batches skipped for a non-finite loss) are the variables
    it saves, with any others named in ``state`` (a time budget's; a checkpoint saved
    without them restores, and they start afresh); the training loop advances them.
    Checkpoints are numbered by the caller or, by default, one past the newest in
    ``checkpoints/`` (never reusing a number).

    Example:
        >>> import tempfile
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> ckpts = Checkpoints(tempfile.mkdtemp(), model, keras.optimizers.SGD())
        >>> ckpts.restore() is None  # nothing saved yet
        True
        >>> ckpts.end_epoch(1, metric=0.5), ckpts.end_epoch(2, metric=0.4)  # improved?
        (True, False)
        >>> again = Checkpoints(ckpts.run_dir, model, keras.optimizers.SGD())
        >>> Path(again.restore()).name, int(again.epoch.numpy()), float(again.best.numpy())
        ('ckpt-2', 2, 0.5)
        >>> Path(again.best_manager.latest_checkpoint).name
        'ckpt-1'
    """

    def __init__(self, run_dir: str | Path, model: keras.Model,
                 optimizer: keras.optimizers.Optimizer,
                 backbone_optimizer: keras.optimizers.Optimizer | None = None, keep: int = 3,
                 state: dict[str, tf.Variable] | None = None):
        self.run_dir = Path(run_dir)
        self.epoch = tf.Variable(0, dtype="int64", trainable=False)  # completed epochs
        self.step_in_epoch = tf.Variable(0, dtype="int64", trainable=False)  # of the next one
        self.best = tf.Variable(-np.inf, dtype="float64", trainable=False)
        self.loss_sum = tf.Variable(0.0, dtype="float64", trainable=False)  # this epoch's
        self.skipped = tf.Variable(0, dtype="int64", trainable=False)  # this epoch's
        extra = {} if backbone_optimizer is None else {"backbone_optimizer": backbone_optimizer}
        self._objects = dict(model=model, optimizer=optimizer, epoch=self.epoch,
                             step_in_epoch=self.step_in_epoch, best=self.best,
                             loss_sum=self.loss_sum, skipped=self.skipped, **extra)
        self.state = dict(state or {})
        self.checkpoint = tf.train.Checkpoint(**self._objects, **self.state)
        self.latest_manager = tf.train.CheckpointManager(
            self.checkpoint, str(self.run_dir / "checkpoints"), max_to_keep=keep)
        self.best_manager = tf.train.CheckpointManager(self.checkpoint,
                                                       str(self.run_dir / "best"), 1)

    def restore(self, log: Callable[[str], None] = print) -> str | None:
        """Restore the newest readable checkpoint of ``checkpoints/``, if any; returns its
        path, or None when there is none.

        Each candidate, newest first, is read in full (a truncated or corrupt ``.index``
        or ``.data`` file raises there) before it is restored; an unreadable one is
        skipped with a log line naming it and why. A readable checkpoint that does not
        fit our objects (another vocabulary size or architecture) raises ValueError naming
        the run directory -- that is not damage, and falling back would not help. When
        checkpoints exist but none is readable, ValueError too.
        """
        skipped: list[str] = []
        fits = ("the model and optimizer built from this run's config/tokenizer (another "
                "vocabulary size or architecture?)")
        paths = list(reversed(self.latest_manager.checkpoints))
        checkpoint = self.checkpoint
        missing = self._missing_state(paths[0]) if paths else []
        if missing:  # e.g. a time budget given to a run that started without one
            log(f"{paths[0]} holds no {', '.join(missing)}: they start afresh")
            checkpoint = tf.train.Checkpoint(**self._objects)
        path = restore_first_readable(checkpoint, paths, self.run_dir, fits, log, skipped)
        if path is not None:
            if skipped:
                log(f"restored the previous checkpoint {path} instead")
            return path
        if skipped:
            raise ValueError(f"{self.run_dir}: no readable checkpoint in "
                             f"{self.run_dir / 'checkpoints'} (skipped {', '.join(skipped)})")
        return None

    def _missing_state(self, path: str) -> list[str]:
        """The names of :attr:`state` that the checkpoint at ``path`` does not hold (none
        when it cannot be listed: restoring then says why)."""
        try:
            saved = {name.split("/")[0] for name, _ in tf.train.list_variables(path)}
        except (ValueError, tf.errors.OpError):
            return []
        return [name for name in self.state if name not in saved]

    def next_number(self) -> int:
        """One past the newest checkpoint number in ``checkpoints/`` (1 at first)."""
        numbers = [checkpoint_number(p) for p in self.latest_manager.checkpoints]
        return max([n for n in numbers if n is not None], default=0) + 1

    def save_latest(self, number: int | None = None) -> str:
        """Save into ``checkpoints/`` as ``ckpt-<number>`` (default: :meth:`next_number`),
        dropping the oldest beyond ``keep``; returns the path."""
        return self.latest_manager.save(
            checkpoint_number=self.next_number() if number is None else number)

    def save_best(self, number: int) -> str:
        """Save into ``best/`` as ``ckpt-<number>``, replacing the one there."""
        return self.best_manager.save(checkpoint_number=number)

    def end_epoch(self, number: int | None, metric: float | None) -> bool:
        """Record an epoch as complete (``step_in_epoch``, ``loss_sum`` and ``skipped`` back
        to 0), keep ``metric`` as the best if it beats it, and save ``ckpt-<number>``
        (default: :meth:`next_number`) into ``checkpoints/`` and -- when it improved, or
        there is no metric to compare -- into ``best/``. Returns whether it improved."""
        self.epoch.assign_add(1)
        self.step_in_epoch.assign(0)
        self.loss_sum.assign(0.0)
        self.skipped.assign(0)
        improved = metric is not None and metric > float(self.best.numpy())
        if improved:
            self.best.assign(metric)
        path = self.save_latest(number)
        if improved or metric is None:
            self.save_best(checkpoint_number(path))
        return improved


def checkpoint_number(path: str) -> int | None:
    """The N of a ``.../ckpt-N`` prefix, or None."""
    match = re.search(r"-(\d+)$", str(path))
    return int(match.group(1)) if match else None

