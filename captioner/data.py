"""Reading image-text pairs, loading images robustly, splitting and batching.

Images are decoded once with Pillow (any mode, EXIF orientation applied), resized to
the backbone's input size and kept in memory as uint8; unreadable files are skipped
and listed, never silently.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from captioner.config import DataConfig


class DataError(ValueError):
    """A manifest or image problem, with the file (and line) that caused it."""


@dataclass
class Record:
    """One image-text pair as read from a manifest.

    Example:
        >>> Record(image="/data/a.png", text="a red circle", split="train").split
        'train'
    """

    image: str
    text: str
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


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


@dataclass
class LoadReport:
    """Images that could not be used, with reasons; written into the run directory.

    Example:
        >>> r = LoadReport(); r.add("x.jpg", "missing file"); r.count
        1
    """

    failures: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str, reason: str) -> None:
        self.failures.append((path, reason))

    @property
    def count(self) -> int:
        return len(self.failures)

    def write(self, path: str | Path) -> None:
        lines = [f"{p}\t{reason}" for p, reason in self.failures]
        Path(path).write_text("".join(line + "\n" for line in lines))


# ---- manifests ---------------------------------------------------------------------------
def _resolve_image(name: str, base: Path) -> str:
    p = Path(name).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _parse_meta(row: dict[str, str], used: set[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, value in row.items():
        if key in used or key is None:
            continue
        if value and value[:1] in "[{":
            try:
                meta[key] = json.loads(value)
                continue
            except json.JSONDecodeError:
                pass
        meta[key] = value
    return meta


def read_csv_manifest(path: str | Path, image_column: str = "image", text_column: str = "caption",
                      split_column: str | None = "split", images_dir: str | None = None
                      ) -> list[Record]:
    """Read a CSV manifest; relative image paths resolve against ``images_dir`` or the
    manifest's own folder. Extra columns (JSON decoded where possible) go to ``meta``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    base = Path(images_dir) if images_dir else path.parent
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        for col in (image_column, text_column):
            if col not in columns:
                raise DataError(f"{path}: no column {col!r} (columns: {', '.join(columns)})")
        has_split = bool(split_column) and split_column in columns
        used = {image_column, text_column, split_column or ""}
        records = []
        for line, row in enumerate(reader, start=2):
            image, text = row.get(image_column), row.get(text_column)
            if not image or text is None or not text.strip():
                raise DataError(f"{path}:{line}: empty {image_column!r} or {text_column!r}")
            split = normalise_split(row.get(split_column), path, line) if has_split else None
            records.append(Record(_resolve_image(image, base), text.strip(), split,
                                  _parse_meta(row, used)))
    if not records:
        raise DataError(f"{path}: no rows")
    return records


def normalise_split(value: str | None, path: Path, line: int) -> str | None:
    if not value:
        return None
    aliases = {"train": "train", "restval": "train", "val": "val", "valid": "val",
               "validation": "val", "dev": "val", "test": "test"}
    split = aliases.get(value.strip().lower())
    if split is None:
        raise DataError(f"{path}:{line}: unknown split {value!r} (use train, val or test)")
    return split


def read_records(cfg: DataConfig, smiles_targets: bool = False) -> list[Record]:
    """All records of the configured data source, each with a split.

    Splits are by image; with ``data.split_by: smiles`` (or ``auto`` and SMILES targets)
    by canonical SMILES, so no molecule lands in two splits.
    """
    from captioner.datasets import canonical_smiles_key, drop_missing, group_splits, read_any

    if cfg.format == "shapes":
        from captioner.shapes import generate_shapes

        s = cfg.shapes
        manifest = generate_shapes(cfg.path or "runs/data/shapes", s.n_images, s.image_size,
                                   s.min_objects, s.max_objects, s.seed, s.val_fraction,
                                   s.test_fraction)
        records = read_csv_manifest(manifest)
    else:
        if not cfg.path:
            raise DataError("data.path is empty: name a manifest, caption file or annotations")
        records = read_any(cfg.format, cfg.path, cfg.images_dir, cfg.image_column,
                           cfg.text_column, cfg.split_column)
    if cfg.only_existing:
        records = drop_missing(records).records
    if cfg.limit:
        keep = set(sorted({r.image for r in records})[: cfg.limit])
        records = [r for r in records if r.image in keep]
    by_smiles = cfg.split_by == "smiles" or (cfg.split_by == "auto" and smiles_targets)
    return group_splits(records, cfg.val_fraction, cfg.test_fraction, cfg.split_seed,
                        key=canonical_smiles_key if by_smiles else None)


# ---- images ------------------------------------------------------------------------------
def load_image(path: str | Path, size: int | None) -> np.ndarray:
    """Decode any Pillow-readable image to (size, size, 3) uint8 RGB (``size=None``: the
    image's own (H, W, 3), e.g. to draw attention over what the user sees).

    Handles grayscale, palette, RGBA/LA (composited on white), 16-bit, CMYK and EXIF
    orientation.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            im = Image.fromarray((255.0 * arr / max(arr.max(), 1.0)).astype("uint8"))
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
        im = im.convert("RGB")
        if size is not None:
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _try_load(path: str, size: int) -> tuple[np.ndarray | None, str | None]:
    if not Path(path).is_file():
        return None, "missing file"
    try:
        return load_image(path, size), None
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable"
        return None, f"unreadable: {type(exc).__name__}: {exc}"


def load_images(paths: list[str], size: int, workers: int = 4
                ) -> tuple[np.ndarray, np.ndarray, LoadReport]:
    """Load many images in parallel -> (images (N_ok, S, S, 3), ok mask (N,), report)."""
    report = LoadReport()
    out = np.zeros((len(paths), size, size, 3), np.uint8)
    ok = np.zeros(len(paths), bool)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, (arr, err) in enumerate(pool.map(lambda p: _try_load(p, size), paths)):
            if err is None:
                out[i], ok[i] = arr, True
            else:
                report.add(paths[i], err)
    return out[ok], ok, report


def build_split(records: list[Record], size: int, workers: int = 4,
                report: LoadReport | None = None, load: bool = True,
                skip: set[str] | None = None) -> SplitData:
    """Group records by image, load each image once, drop pairs of unreadable images.

    With ``load=False`` no pixel is read (``images`` is None: the model's inputs come
    from a feature cache) and the images in ``skip`` are dropped instead.
    """
    by_image: dict[str, list[Record]] = {}
    for r in records:
        by_image.setdefault(r.image, []).append(r)
    paths = list(by_image)
    if load:
        images, ok, rep = load_images(paths, size, workers)
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
                      ).prefetch(2)


def steps_per_epoch(num_pairs: int, batch_size: int, max_steps: int | None) -> int:
    steps = num_pairs // batch_size
    return min(steps, max_steps) if max_steps else steps


def image_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive slices of an image array, the last one possibly smaller."""
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]
