"""Restoring a model's weights from a run directory's checkpoints."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from captioner.model.layers import CaptionModel


def restore_weights(model: CaptionModel, run_dir: str | Path, which: str = "best") -> str:
    """Restore model weights from ``best/`` (falling back to ``checkpoints/``)."""
    run_dir = Path(run_dir)
    dirs = ["best", "checkpoints"] if which == "best" else ["checkpoints"]
    for sub in dirs:
        path = tf.train.latest_checkpoint(str(run_dir / sub))
        if path:
            tf.train.Checkpoint(model=model).restore(path).expect_partial()
            return path
    raise FileNotFoundError(f"no checkpoint in {run_dir}/best or {run_dir}/checkpoints")

