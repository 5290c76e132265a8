"""A run's training state and where it is saved: ``checkpoints/`` (the latest N) and
``best/`` (the best on the validation metric) of the run directory."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf


class Checkpoints:
    """The training state of a run -- the model, its optimizer(s), the completed epochs,
    the steps done of the current epoch and the best validation metric so far -- as one
    ``tf.train.Checkpoint``, saved into ``run_dir/checkpoints`` (the latest ``keep``) and
    ``run_dir/best`` (one).

    ``epoch``, ``step_in_epoch`` (int64) and ``best`` (float64, -inf at first) are the
    variables it saves; the training loop advances them.

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
                 backbone_optimizer: keras.optimizers.Optimizer | None = None, keep: int = 3):
        self.run_dir = Path(run_dir)
        self.epoch = tf.Variable(0, dtype="int64", trainable=False)  # completed epochs
        self.step_in_epoch = tf.Variable(0, dtype="int64", trainable=False)  # of the next one
        self.best = tf.Variable(-np.inf, dtype="float64", trainable=False)
        extra = {} if backbone_optimizer is None else {"backbone_optimizer": backbone_optimizer}
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                              epoch=self.epoch, step_in_epoch=self.step_in_epoch,
                                              best=self.best, **extra)
        self.latest_manager = tf.train.CheckpointManager(
            self.checkpoint, str(self.run_dir / "checkpoints"), max_to_keep=keep)
        self.best_manager = tf.train.CheckpointManager(self.checkpoint,
                                                       str(self.run_dir / "best"), 1)

    def restore(self) -> str | None:
        """Restore the latest checkpoint, if any (every saved object must match one of
        ours); returns its path, or None when there is none."""
        latest = self.latest_manager.latest_checkpoint
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        return latest

    def save_latest(self, number: int | None = None) -> str:
        """Save into ``checkpoints/`` as ``ckpt-<number>`` (default: the save counter),
        dropping the oldest beyond ``keep``; returns the path."""
        return self.latest_manager.save(checkpoint_number=number)

    def save_best(self, number: int) -> str:
        """Save into ``best/`` as ``ckpt-<number>``, replacing the one there."""
        return self.best_manager.save(checkpoint_number=number)

    def end_epoch(self, number: int, metric: float | None) -> bool:
        """Record epoch ``number`` as complete (``step_in_epoch`` back to 0), keep ``metric``
        as the best if it beats it, and save ``ckpt-<number>`` into ``checkpoints/`` and --
        when it improved, or there is no metric to compare -- into ``best/``. Returns
        whether the metric improved."""
        self.epoch.assign_add(1)
        self.step_in_epoch.assign(0)
        improved = metric is not None and metric > float(self.best.numpy())
        if improved:
            self.best.assign(metric)
        self.save_latest(number)
        if improved or metric is None:
            self.save_best(number)
        return improved
