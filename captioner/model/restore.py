"""Restoring a model's weights from a run directory's checkpoints, skipping a damaged
newest checkpoint and refusing one that does not fit the model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import tensorflow as tf

from captioner.model.layers import CaptionModel


def restore_weights(model: CaptionModel, run_dir: str | Path, which: str = "best",
                    log: Callable[[str], None] = print) -> str:
    """Restore model weights from ``best/`` (falling back to ``checkpoints/``), or from
    ``checkpoints/`` alone when ``which`` is ``latest``; returns the checkpoint's path.

    The checkpoints are tried newest first; one that cannot be read in full (truncated,
    corrupt) is skipped with a log line. One that reads but does not fit ``model`` raises
    ValueError naming the run directory and the mismatch; none at all, FileNotFoundError.
    """
    run_dir = Path(run_dir)
    dirs = ["best", "checkpoints"] if which == "best" else ["checkpoints"]
    skipped = []
    for sub in dirs:
        state = tf.train.get_checkpoint_state(str(run_dir / sub))
        paths = list(reversed(state.all_model_checkpoint_paths)) if state else []
        for path in paths:
            problem = unreadable(path)
            if problem:
                log(f"checkpoint {path} skipped: unreadable ({problem})")
                skipped.append(path)
                continue
            try:
                tf.train.Checkpoint(model=model).restore(path).expect_partial() \
                    .assert_existing_objects_matched()
            except (ValueError, AssertionError, tf.errors.OpError) as exc:
                raise ValueError(f"{run_dir}: checkpoint {path} does not fit the model built "
                                 f"from {run_dir / 'model.json'} and its tokenizer.json "
                                 f"(another architecture or vocabulary?): {first_line(exc)}"
                                 ) from exc
            return path
    also = f" (unreadable: {', '.join(skipped)})" if skipped else ""
    raise FileNotFoundError(f"no readable checkpoint in {run_dir}/best or "
                            f"{run_dir}/checkpoints{also}")


def unreadable(path: str) -> str | None:
    """Why the checkpoint at ``path`` (a prefix) cannot be read in full, or None when every
    tensor of it reads back (TensorFlow checks each one's checksum as it reads it).

    Example:
        >>> unreadable("/nonexistent/ckpt-1") is not None
        True
    """
    try:
        reader = tf.train.load_checkpoint(path)
        for key in reader.get_variable_to_shape_map():
            reader.get_tensor(key)
    except Exception as exc:  # noqa: BLE001 -- any failure to read is damage (TensorFlow
        # raises OpError, ValueError, IndexError "Read less bytes than requested"...)
        return f"{type(exc).__name__}: {first_line(exc)}"
    return None


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (TensorFlow's run long)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__
