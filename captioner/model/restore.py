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
    skipped: list[str] = []
    fits = (f"the model built from {run_dir / 'model.json'} and its tokenizer.json "
            "(another architecture or vocabulary?)")
    for sub in dirs:
        state = tf.train.get_checkpoint_state(str(run_dir / sub))
        paths = list(reversed(state.all_model_checkpoint_paths)) if state else []
        path = restore_first_readable(tf.train.Checkpoint(model=model), paths, run_dir, fits,
                                      log, skipped, partial=True)
        if path is not None:
            return path
    also = f" (unreadable: {', '.join(skipped)})" if skipped else ""
    raise FileNotFoundError(f"no readable checkpoint in {run_dir}/best or "
                            f"{run_dir}/checkpoints{also}")


def restore_first_readable(checkpoint: tf.train.Checkpoint, paths: list[str],
                           run_dir: Path, fits: str, log: Callable[[str], None],
                           skipped: list[str], partial: bool = False) -> str | None:
    """Restore the first of ``paths`` (newest first) that reads in full into
    ``checkpoint``; returns its path, or None when none does. Unreadable ones are logged
    and appended to ``skipped``; one that reads but does not fit raises ValueError naming
    ``run_dir`` and saying what it should have fitted (``fits``). ``partial``: objects of
    the checkpoint that ``checkpoint`` does not hold (an optimizer) are expected.

    Example:
        >>> restore_first_readable(tf.train.Checkpoint(), ["/nonexistent/ckpt-1"],
        ...                        Path("run"), "x", lambda _m: None, [])
    """
    for path in paths:
        problem = unreadable(path)
        if problem:
            log(f"checkpoint {path} skipped: unreadable ({problem})")
            skipped.append(path)
            continue
        try:
            status = checkpoint.restore(path)
            (status.expect_partial() if partial else status).assert_existing_objects_matched()
        except (ValueError, AssertionError, tf.errors.OpError) as exc:
            raise ValueError(f"{run_dir}: checkpoint {path} does not fit {fits}: "
                             f"{first_line(exc)}") from exc
        return path
    return None


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
