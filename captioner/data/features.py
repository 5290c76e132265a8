"""Cached backbone features: run a frozen CNN once, train many epochs from sharded TFRecords.

``extract_features`` encodes every image with ``encode_fn`` ((B, S, S, 3) uint8 ->
(B, G, C)) and writes a cache directory; ``FeatureCache`` reads it back as a
``tf.data`` pipeline, as one in-memory array, or as batched training pairs.

Layout of a cache directory (only these files are ever created or deleted)::

    out_dir/
      index.json                        # format, fingerprints, grid shape, dtype, shards,
                                        # skipped images, ``complete`` flag
      images.json                       # requested images in order: [[path, size, mtime_ns]]
      features-00000-of-00003.tfrecord  # shard k: requested images k*shard_size ...
      features-00001-of-00003.tfrecord  #   (k+1)*shard_size - 1, minus unreadable ones
      ...

Each TFRecord example holds ``path`` (bytes), ``index`` (int64, the image's row in cache
order), ``features`` (raw little-endian bytes of the stored dtype, C order) and
``shape`` (int64 [G, C]).

A shard is written to ``<name>.tmp`` and renamed when complete, then ``index.json`` is
rewritten (atomically), so an interrupted extraction resumes at the first missing shard.
The cache is discarded (and the reason logged on ``captioner.features``) when the
fingerprint, image size, dtype or image set (paths, order, file size or mtime) changes.

Example:
    >>> import tempfile
    >>> from PIL import Image
    >>> d = Path(tempfile.mkdtemp())
    >>> paths = [str(d / f"{i}.png") for i in range(3)]
    >>> for i, p in enumerate(paths):
    ...     Image.new("RGB", (4, 4), (80 * i, 0, 0)).save(p)
    >>> enc = lambda x: np.repeat(x.mean(axis=(1, 2))[:, None, :], 2, axis=1)  # (B, 2, 3)
    >>> s = extract_features(paths, enc, d / "cache", {"name": "toy"}, 4, progress=False)
    >>> s.num_cached, s.num_skipped
    (3, 0)
    >>> feats, cached = FeatureCache(d / "cache").open().load_all()
    >>> feats.shape, feats.dtype.name, float(feats[2, 0, 0])
    ((3, 2, 3), 'float16', 160.0)
    >>> import shutil; shutil.rmtree(d)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from captioner.data.images import try_load_image as try_load_image
from captioner.data.splits import epoch_batches, no_autotune, steps_per_epoch

EncodeFn = Callable[[np.ndarray], Any]  # (B, S, S, 3) uint8 -> (B, G, C) array or tensor


@dataclass(frozen=True)
class CacheLayout:
    """File names and defaults of a feature cache (immutable).

    Example:
        >>> CacheLayout().shard_name(3, 12)
        'features-00003-of-00012.tfrecord'
    """

    format_version: int = 1
    index_name: str = "index.json"
    images_name: str = "images.json"
    shard_prefix: str = "features"
    shard_suffix: str = ".tfrecord"
    tmp_suffix: str = ".tmp"
    dtypes: tuple[str, ...] = ("float16", "float32")
    # pair_dataset keeps the whole cache in memory up to this size (stored dtype).
    memory_limit_bytes: int = 2 * 1024**3
    logger: str = "captioner.data.features"

    def shard_name(self, k: int, n: int) -> str:
        return f"{self.shard_prefix}-{k:05d}-of-{n:05d}{self.shard_suffix}"

    def is_ours(self, name: str) -> bool:
        """True for shard, temp, index and image-list files of a cache."""
        base = name[: -len(self.tmp_suffix)] if name.endswith(self.tmp_suffix) else name
        shard = base.startswith(self.shard_prefix + "-") and base.endswith(self.shard_suffix)
        return shard or base in (self.index_name, self.images_name)


class FeatureCacheError(ValueError):
    """A broken, incomplete or mismatched cache, naming the file and key at fault."""


@dataclass
class CacheSummary:
    """What one ``extract_features`` call did.

    ``status`` is ``"fresh"`` (extracted from scratch), ``"resumed"`` (completed shards
    reused) or ``"up-to-date"`` (nothing to do); ``invalidated`` says why an old cache
    was discarded. ``images_per_s`` counts images processed in this call.

    Example:
        >>> CacheSummary("c", 10, 9, 1, 9, 1, 2.0, 5.0, [("x.png", "missing file")]).status
        'fresh'
    """

    path: str
    num_requested: int
    num_cached: int
    num_skipped: int
    num_extracted: int
    num_shards: int
    seconds: float
    images_per_s: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    status: str = "fresh"
    invalidated: str | None = None
    encode_calls: int = 0


def _log() -> logging.Logger:
    return logging.getLogger(CacheLayout().logger)


# ---- fingerprints ------------------------------------------------------------------------
def file_stats(paths: Sequence[str]) -> list[list[Any]]:
    """``[[path, size, mtime_ns], ...]``; a missing file gets size and mtime -1.

    Example:
        >>> file_stats(["/no/such/file.png"])
        [['/no/such/file.png', -1, -1]]
    """
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append([p, int(st.st_size), int(st.st_mtime_ns)])
        except OSError:
            out.append([p, -1, -1])
    return out


def image_list_sha256(stats: list[list[Any]]) -> str:
    """sha256 of the ordered paths with each file's size and mtime (see ``file_stats``)."""
    text = json.dumps(stats, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _normalise(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A JSON round trip, so tuples and lists (or numpy scalars via str) compare equal."""
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def _dict_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    absent = "<absent>"
    return [f"{k}: {old.get(k, absent)!r} -> {new.get(k, absent)!r}"
            for k in sorted(set(old) | set(new)) if old.get(k, absent) != new.get(k, absent)]


def _images_diff(old: list[list[Any]], new: list[list[Any]]) -> str:
    before = {p: (s, m) for p, s, m in old}
    after = {p: (s, m) for p, s, m in new}
    added = [p for p in after if p not in before]
    removed = [p for p in before if p not in after]
    changed = [p for p in after if p in before and before[p] != after[p]]
    parts = [f"{len(xs)} image(s) {what} (e.g. {xs[0]})"
             for xs, what in ((added, "added"), (removed, "removed"),
                              (changed, "changed size/mtime")) if xs]
    return "image set changed: " + ("; ".join(parts) or "image order changed")


# ---- index files -------------------------------------------------------------------------
def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + CacheLayout().tmp_suffix)
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FeatureCacheError(f"{path}: not found (run extract-features first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FeatureCacheError(f"{path}: not valid JSON ({exc})") from exc


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _check_keys(obj: Any, spec: dict[str, type], path: Path, prefix: str = "") -> None:
    if not isinstance(obj, dict):
        raise FeatureCacheError(f"{path}: {prefix.rstrip('.') or 'top level'} must be an object")
    for key, kind in spec.items():
        if key not in obj:
            raise FeatureCacheError(f"{path}: missing key {prefix + key!r}")
        if not _is(obj[key], kind):
            raise FeatureCacheError(f"{path}: key {prefix + key!r} must be {kind.__name__}, "
                                    f"got {type(obj[key]).__name__} {obj[key]!r:.60}")


def _validate_index(index: Any, path: Path, require_complete: bool) -> None:
    """Structural checks of index.json; errors name the file and the key."""
    _check_keys(index, {"complete": bool}, path)
    if require_complete and not index["complete"]:
        raise FeatureCacheError(f"{path}: key 'complete' is false: the extraction was "
                                "interrupted or is still running; run extract-features again")
    _check_keys(index, {"format_version": int, "fingerprint": dict, "image_list_sha256": str,
                        "num_images": int, "image_size": int, "dtype": str, "shard_size": int,
                        "num_shards": int, "shards": list, "skipped": list}, path)
    layout = CacheLayout()
    if index["format_version"] != layout.format_version:
        raise FeatureCacheError(f"{path}: key 'format_version' is {index['format_version']}, "
                                f"this version reads {layout.format_version}")
    if index["dtype"] not in layout.dtypes:
        raise FeatureCacheError(f"{path}: key 'dtype' must be one of {layout.dtypes}")
    if "grid_shape" not in index:
        raise FeatureCacheError(f"{path}: missing key 'grid_shape'")
    grid = index["grid_shape"]
    ok_grid = isinstance(grid, list) and len(grid) == 2 and all(_is(g, int) and g > 0
                                                               for g in grid)
    if not ok_grid and (require_complete or grid is not None):
        raise FeatureCacheError(f"{path}: key 'grid_shape' must be [G, C] positive ints, "
                                f"got {grid!r}")
    shard_spec = {"file": str, "start": int, "stop": int, "count": int, "first_row": int}
    for i, shard in enumerate(index["shards"]):
        _check_keys(shard, shard_spec, path, f"shards[{i}].")
    for i, item in enumerate(index["skipped"]):
        _check_keys(item, {"image": int, "path": str, "reason": str}, path, f"skipped[{i}].")


def _read_images(out: Path, index: dict[str, Any]) -> list[list[Any]]:
    layout = CacheLayout()
    path = out / layout.images_name
    obj = _read_json(path)
    stats = obj.get("images") if isinstance(obj, dict) else None
    if not isinstance(stats, list) or image_list_sha256(stats) != index["image_list_sha256"]:
        raise FeatureCacheError(f"{path}: key 'images' does not match 'image_list_sha256' of "
                                f"{out / layout.index_name}")
    return stats


# ---- extraction --------------------------------------------------------------------------
@dataclass
class _Batch:
    positions: list[int]  # positions in the requested image list
    paths: list[str]
    images: np.ndarray  # (B_ok, S, S, 3) uint8
    failed: list[dict[str, Any]]  # {"image", "path", "reason"}


def _loaded_batches(paths: list[str], start: int, size: int, batch_size: int,
                    pool: ThreadPoolExecutor) -> Iterator[_Batch]:
    """Batches of decoded images, loading the next two batches while one is encoded."""
    chunks = iter(range(0, len(paths), batch_size))
    pending: deque[list[tuple[int, Future]]] = deque()

    def submit() -> None:
        lo = next(chunks, None)
        if lo is not None:
            pending.append([(start + i, pool.submit(try_load_image, paths[i], size))
                            for i in range(lo, min(lo + batch_size, len(paths)))])

    submit()
    submit()
    while pending:
        futures = pending.popleft()
        submit()
        batch = _Batch([], [], np.zeros((0, size, size, 3), np.uint8), [])
        arrays = []
        for pos, fut in futures:
            arr, err = fut.result()
            if err is None:
                batch.positions.append(pos)
                batch.paths.append(paths[pos - start])
                arrays.append(arr)
            else:
                batch.failed.append({"image": pos, "path": paths[pos - start], "reason": err})
        if arrays:
            batch.images = np.stack(arrays)
        yield batch


def _encode(encode_fn: EncodeFn, batch: _Batch, dtype: str,
            grid: tuple[int, int] | None) -> np.ndarray:
    """Run the backbone on one batch -> (B, G, C) little-endian ``dtype``, checked."""
    out = encode_fn(batch.images)
    arr = np.asarray(out.numpy() if hasattr(out, "numpy") else out)
    n = len(batch.paths)
    if arr.ndim != 3 or arr.shape[0] != n or (grid and tuple(arr.shape[1:]) != grid):
        want = f"({n}, {grid[0]}, {grid[1]})" if grid else f"({n}, G, C)"
        raise ValueError(f"encode_fn returned shape {arr.shape}, expected {want}")
    if not np.isfinite(arr).all():
        raise ValueError(f"encode_fn returned non-finite values for a batch starting at "
                         f"{batch.paths[0]}")
    with np.errstate(over="ignore"):
        cast = arr.astype(np.dtype(dtype).newbyteorder("<"))
    if not np.isfinite(cast).all():
        raise ValueError(f"features overflow {dtype} (|x| > {np.finfo(dtype).max}); "
                         "use dtype='float32'")
    return cast


def _example(path: str, row: int, feats: np.ndarray) -> bytes:
    """One serialized tf.train.Example for an image's grid (G, C)."""
    f = tf.train.Feature
    return tf.train.Example(features=tf.train.Features(feature={
        "path": f(bytes_list=tf.train.BytesList(value=[path.encode("utf-8")])),
        "index": f(int64_list=tf.train.Int64List(value=[row])),
        "features": f(bytes_list=tf.train.BytesList(value=[feats.tobytes()])),
        "shape": f(int64_list=tf.train.Int64List(value=list(feats.shape))),
    })).SerializeToString()


@dataclass
class _Run:
    """Mutable state of one extraction call."""

    out: Path
    index: dict[str, Any]
    paths: list[str]
    encode_fn: EncodeFn
    batch_size: int
    pool: ThreadPoolExecutor
    bar: Any
    encode_calls: int = 0
    processed: int = 0

    @property
    def grid(self) -> tuple[int, int] | None:
        g = self.index["grid_shape"]
        return (g[0], g[1]) if g else None


def _write_shard(run: _Run, k: int) -> dict[str, Any]:
    """Encode shard ``k`` into a temp file, rename it when complete; return its entry."""
    idx = run.index
    start, stop = k * idx["shard_size"], min((k + 1) * idx["shard_size"], idx["num_images"])
    first_row = sum(s["count"] for s in idx["shards"])
    layout = CacheLayout()
    entry = {"file": layout.shard_name(k, idx["num_shards"]), "start": start, "stop": stop,
             "count": 0, "first_row": first_row}
    final = run.out / entry["file"]
    tmp = final.with_name(final.name + layout.tmp_suffix)
    skipped: list[dict[str, Any]] = []
    try:
        with tf.io.TFRecordWriter(str(tmp)) as writer:
            for batch in _loaded_batches(run.paths[start:stop], start, idx["image_size"],
                                         run.batch_size, run.pool):
                skipped += batch.failed
                if batch.paths:
                    feats = _encode(run.encode_fn, batch, idx["dtype"], run.grid)  # (B, G, C)
                    run.encode_calls += 1
                    idx["grid_shape"] = list(feats.shape[1:])
                    for p, f in zip(batch.paths, feats):
                        writer.write(_example(p, first_row + entry["count"], f))
                        entry["count"] += 1
                n = len(batch.paths) + len(batch.failed)
                run.processed += n
                run.bar.update(n)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    idx["skipped"] += skipped
    return entry


def _clear(out: Path) -> None:
    """Delete every cache file (shards, temp files, index) -- nothing else."""
    layout = CacheLayout()
    for p in out.iterdir():
        if p.is_file() and layout.is_ours(p.name):
            p.unlink()


def _resumable(out: Path, index: dict[str, Any]) -> dict[str, Any]:
    """Keep the leading shards whose files exist; drop strays, temp files and later shards."""
    kept = []
    for shard in index["shards"]:
        if not (out / shard["file"]).is_file():
            break
        kept.append(shard)
    end = kept[-1]["stop"] if kept else 0
    index["shards"] = kept
    index["skipped"] = [s for s in index["skipped"] if s["image"] < end]
    index["complete"] = index["complete"] and len(kept) == index["num_shards"]
    if not kept:
        index["grid_shape"] = None
    layout = CacheLayout()
    names = {s["file"] for s in kept} | {layout.index_name, layout.images_name}
    for p in out.iterdir():
        if p.is_file() and layout.is_ours(p.name) and p.name not in names:
            p.unlink()
    return index


def _existing(out: Path, new: dict[str, Any], stats: list[list[Any]]
              ) -> tuple[dict[str, Any] | None, str | None]:
    """The old index if it can be reused (complete or resumable), else (None, reason)."""
    path = out / CacheLayout().index_name
    if not path.exists():
        return None, None
    try:
        old = _read_json(path)
        _validate_index(old, path, require_complete=False)
    except FeatureCacheError as exc:
        return None, f"unusable index: {exc}"
    if old["format_version"] != new["format_version"]:
        return None, "format version changed"
    diff = _dict_diff({"image_size": old["image_size"], "dtype": old["dtype"],
                       **old["fingerprint"]},
                      {"image_size": new["image_size"], "dtype": new["dtype"],
                       **new["fingerprint"]})
    if diff:
        return None, "fingerprint changed: " + "; ".join(diff)
    if old["image_list_sha256"] != new["image_list_sha256"]:
        try:
            return None, _images_diff(_read_images(out, old), stats)
        except FeatureCacheError:
            return None, "image set changed"
    if not old["complete"] and old["shard_size"] != new["shard_size"]:
        return None, f"shard_size changed ({old['shard_size']} -> {new['shard_size']}) " \
                     "in an incomplete cache"
    return _resumable(out, old), None


def _new_index(fingerprint: dict[str, Any], stats: list[list[Any]], image_size: int,
               dtype: str, shard_size: int) -> dict[str, Any]:
    n = len(stats)
    return {"format_version": CacheLayout().format_version, "fingerprint": _normalise(fingerprint),
            "image_list_sha256": image_list_sha256(stats), "num_images": n,
            "image_size": image_size, "dtype": dtype, "grid_shape": None,
            "shard_size": shard_size, "num_shards": max(1, math.ceil(n / shard_size)),
            "shards": [], "skipped": [], "complete": False}


def _check_args(paths: list[str], image_size: int, batch_size: int, shard_size: int,
                dtype: str) -> None:
    if not paths:
        raise ValueError("extract_features: no image paths")
    dtypes = CacheLayout().dtypes
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {dtypes}, got {dtype!r}")
    for name, v in (("image_size", image_size), ("batch_size", batch_size),
                    ("shard_size", shard_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")


def _unique(paths: Sequence[str]) -> list[str]:
    out = list(dict.fromkeys(str(p) for p in paths))
    if len(out) != len(paths):
        _log().warning("extract_features: dropped %d duplicate path(s)", len(paths) - len(out))
    return out


def _summary(out: Path, index: dict[str, Any], t0: float, status: str,
             invalidated: str | None, run: _Run | None = None, reused: int = 0
             ) -> CacheSummary:
    seconds = time.perf_counter() - t0
    skipped = [(s["path"], s["reason"]) for s in index["skipped"]]
    cached = sum(s["count"] for s in index["shards"])
    processed = run.processed if run else 0
    return CacheSummary(
        path=str(out), num_requested=index["num_images"], num_cached=cached,
        num_skipped=len(skipped), num_extracted=cached - reused if run else 0,
        num_shards=index["num_shards"], seconds=seconds,
        images_per_s=processed / seconds if processed and seconds > 0 else 0.0,
        skipped=skipped, status=status, invalidated=invalidated,
        encode_calls=run.encode_calls if run else 0)


def extract_features(image_paths: Sequence[str], encode_fn: EncodeFn, out_dir: str | Path,
                     fingerprint: dict[str, Any], image_size: int, batch_size: int = 32,
                     shard_size: int = 1024, dtype: str = "float16", workers: int = 4,
                     progress: bool = True) -> CacheSummary:
    """Encode every image once into a sharded, resumable feature cache in ``out_dir``.

    ``encode_fn``: (B, S, S, 3) uint8 -> (B, G, C) numpy array or tensor; ``fingerprint``
    describes the backbone (name, weights, preprocessing, ...) and is stored with
    ``image_size`` and ``dtype``: a change in any of them, or in the image set, discards
    the cache. Same inputs -> returns at once without calling ``encode_fn``; an
    interrupted call resumes at the first incomplete shard. Unreadable or missing
    images are skipped and listed in ``index.json`` and ``CacheSummary.skipped``.

    Example (see the module docstring for a complete one):
        >>> extract_features([], lambda x: x, "/tmp/unused", {}, 8)
        Traceback (most recent call last):
        ...
        ValueError: extract_features: no image paths
    """
    _check_args(list(image_paths), image_size, batch_size, shard_size, dtype)
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = _unique(image_paths)
    stats = file_stats(paths)
    new = _new_index(fingerprint, stats, image_size, dtype, shard_size)
    index, reason = _existing(out, new, stats)
    if reason:
        _log().warning("discarding feature cache %s: %s", out, reason)
    if index is not None and index["complete"]:
        return _summary(out, index, t0, "up-to-date", None)
    status = "resumed" if index is not None and index["shards"] else "fresh"
    if index is None:
        _clear(out)
        index = new
        layout = CacheLayout()
        _write_json_atomic(out / layout.images_name, {"images": stats})
        _write_json_atomic(out / layout.index_name, index)
    elif status == "resumed":
        _log().info("resuming feature cache %s at shard %d of %d", out, len(index["shards"]),
                    index["num_shards"])
    return _run_shards(out, index, paths, encode_fn, batch_size, workers, progress, t0,
                       status, reason)


def _run_shards(out: Path, index: dict[str, Any], paths: list[str], encode_fn: EncodeFn,
                batch_size: int, workers: int, progress: bool, t0: float, status: str,
                reason: str | None) -> CacheSummary:
    from tqdm import tqdm

    done = index["shards"][-1]["stop"] if index["shards"] else 0
    reused = sum(s["count"] for s in index["shards"])
    pool = ThreadPoolExecutor(max(1, workers))
    bar = tqdm(total=len(paths), initial=done, desc="extract features", unit="img",
               disable=not progress, dynamic_ncols=True)
    run = _Run(out, index, paths, encode_fn, batch_size, pool, bar)
    index_path = out / CacheLayout().index_name
    try:
        for k in range(len(index["shards"]), index["num_shards"]):
            index["shards"].append(_write_shard(run, k))
            _write_json_atomic(index_path, index)
            bar.set_postfix(skipped=len(index["skipped"]), refresh=False)
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
    if index["grid_shape"] is None:
        first = index["skipped"][0]
        raise FeatureCacheError(f"no image could be read ({len(index['skipped'])} skipped, "
                                f"e.g. {first['path']}: {first['reason']})")
    index["complete"] = True
    _write_json_atomic(index_path, index)
    return _summary(out, index, t0, status, reason, run, reused)


# ---- reading -----------------------------------------------------------------------------
class FeatureCache:
    """Read a cache written by ``extract_features``.

    Example:
        >>> FeatureCache("/no/such/cache").open()
        Traceback (most recent call last):
        ...
        captioner.data.features.FeatureCacheError: /no/such/cache/index.json: not found ...
    """

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self._index: dict[str, Any] | None = None
        self._paths: list[str] = []
        self._rows: dict[str, int] = {}
        self._memory: np.ndarray | None = None  # (N, G, C) stored dtype, after load_all
        self._memory_t: tf.Tensor | None = None  # the same as a tensor, for pair_dataset

    # -- metadata
    def open(self) -> FeatureCache:
        """Validate index.json, images.json and the shard files; returns ``self``."""
        layout = CacheLayout()
        path = self.dir / layout.index_name
        index = _read_json(path)
        _validate_index(index, path, require_complete=True)
        stats = _read_images(self.dir, index)
        if len(stats) != index["num_images"]:
            raise FeatureCacheError(f"{path}: key 'num_images' is {index['num_images']} but "
                                    f"{layout.images_name} lists {len(stats)}")
        if len(index["shards"]) != index["num_shards"]:
            raise FeatureCacheError(f"{path}: key 'shards' has {len(index['shards'])} entries, "
                                    f"'num_shards' is {index['num_shards']}")
        for i, shard in enumerate(index["shards"]):
            if not (self.dir / shard["file"]).is_file():
                raise FeatureCacheError(f"{path}: key 'shards[{i}].file': "
                                        f"{self.dir / shard['file']} is missing")
        skipped = {s["image"] for s in index["skipped"]}
        self._paths = [p for i, (p, _, _) in enumerate(stats) if i not in skipped]
        if len(self._paths) != sum(s["count"] for s in index["shards"]):
            raise FeatureCacheError(f"{path}: key 'shards': counts do not add up to the "
                                    f"{len(self._paths)} readable images")
        self._rows = {p: i for i, p in enumerate(self._paths)}
        self._index, self._memory, self._memory_t = index, None, None
        return self

    @property
    def index(self) -> dict[str, Any]:
        if self._index is None:
            self.open()
        return self._index  # type: ignore[return-value]

    @property
    def paths(self) -> list[str]:
        """Cached image paths in cache (row) order."""
        _ = self.index
        return list(self._paths)

    @property
    def grid_shape(self) -> tuple[int, int]:
        g, c = self.index["grid_shape"]
        return g, c

    @property
    def dtype(self) -> str:
        return self.index["dtype"]

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.index["fingerprint"])

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [(s["path"], s["reason"]) for s in self.index["skipped"]]

    @property
    def nbytes(self) -> int:
        """Size of all features in memory in the stored dtype."""
        g, c = self.grid_shape
        return len(self.paths) * g * c * np.dtype(self.dtype).itemsize

    def __len__(self) -> int:
        return len(self.paths)

    def index_of(self, path: str) -> int:
        """Row of ``path`` in cache order; KeyError says if the image was skipped."""
        _ = self.index
        row = self._rows.get(str(path))
        if row is None:
            why = dict(self.skipped).get(str(path))
            raise KeyError(f"{path} is not in the feature cache {self.dir}"
                           + (f" (skipped at extraction: {why})" if why else ""))
        return row

    def check(self, fingerprint: dict[str, Any], image_size: int) -> None:
        """Raise FeatureCacheError if the cache was built for another backbone or size."""
        diff = _dict_diff({"image_size": self.index["image_size"], **self.fingerprint},
                          {"image_size": image_size, **_normalise(fingerprint)})
        if diff:
            index_path = self.dir / CacheLayout().index_name
            raise FeatureCacheError(f"{index_path}: key 'fingerprint' does "
                                    f"not match the configured backbone: {'; '.join(diff)}; "
                                    "run extract-features again")

    # -- tf.data
    def _shard_files(self) -> list[str]:
        return [str(self.dir / s["file"]) for s in self.index["shards"]]

    def _parser(self, keep_dtype: bool) -> Callable[[tf.Tensor], tuple[tf.Tensor, ...]]:
        g, c = self.grid_shape
        stored = tf.dtypes.as_dtype(self.dtype)
        spec = {"path": tf.io.FixedLenFeature([], tf.string),
                "index": tf.io.FixedLenFeature([], tf.int64),
                "features": tf.io.FixedLenFeature([], tf.string)}

        def parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            ex = tf.io.parse_single_example(record, spec)
            feats = tf.reshape(tf.io.decode_raw(ex["features"], stored), (g, c))  # (G, C)
            return ex["path"], ex["index"], feats if keep_dtype else tf.cast(feats, tf.float32)

        return parse

    def records(self, files: list[str] | None = None, keep_dtype: bool = False,
                deterministic: bool = True, in_order: bool = True,
                cycle_length: int = 4) -> tf.data.Dataset:
        """(path, row index, features (G, C)) from ``files`` (default: all shards).

        ``in_order``: whole shards one after another (exact cache order, other shards
        still read ahead in parallel); else records alternate between ``cycle_length``
        shards (``deterministic=False``: whatever arrives first).
        """
        files = self._shard_files() if files is None else files
        block = max([s["count"] for s in self.index["shards"]] + [1]) if in_order else 1
        ds = tf.data.Dataset.from_tensor_slices(tf.constant(files, tf.string))
        ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20),
                           cycle_length=max(1, min(cycle_length, len(files))),
                           block_length=block, num_parallel_calls=tf.data.AUTOTUNE,
                           deterministic=deterministic)
        return ds.map(self._parser(keep_dtype), num_parallel_calls=tf.data.AUTOTUNE,
                      deterministic=deterministic)

    def dataset(self, paths: Sequence[str] | None = None, keep_dtype: bool = False,
                deterministic: bool = True, cycle_length: int = 4) -> tf.data.Dataset:
        """``(path, features (G, C))`` in cache order; float32 unless ``keep_dtype``.

        ``paths`` restricts to those images (still in cache order; only shards holding
        them are read); unknown paths raise KeyError. ``deterministic=False`` trades the
        order for throughput.

        Example:
            >>> # for path, feats in FeatureCache("cache").dataset().batch(64): ...
        """
        files = None
        ds_filter = None
        if paths is not None:
            rows = np.array(sorted({self.index_of(p) for p in paths}), np.int64)
            keep = np.zeros(len(self.paths), bool)
            keep[rows] = True
            files = [str(self.dir / s["file"]) for s in self.index["shards"]
                     if keep[s["first_row"]:s["first_row"] + s["count"]].any()]
            ds_filter = tf.constant(keep)
        ds = self.records(files, keep_dtype, deterministic, deterministic, cycle_length)
        if ds_filter is not None:
            ds = ds.filter(lambda path, row, feats: tf.gather(ds_filter, row))
        return ds.map(lambda path, row, feats: (path, feats)).prefetch(tf.data.AUTOTUNE)

    def load_all(self) -> tuple[np.ndarray, list[str]]:
        """All features in memory -> ((N, G, C) in the stored dtype, paths in row order)."""
        if self._memory is None:
            g, c = self.grid_shape
            out = np.empty((len(self.paths), g, c), self.dtype)
            seen = np.zeros(len(self.paths), bool)
            ds = self.records(keep_dtype=True, deterministic=False, in_order=False)
            for paths, rows, feats in ds.batch(1024).prefetch(2).as_numpy_iterator():
                out[rows], seen[rows] = feats, True
                if any(p.decode("utf-8") != self._paths[r] for p, r in zip(paths, rows)):
                    raise FeatureCacheError(f"{self.dir}: a shard's paths do not match index")
            if not seen.all():
                raise FeatureCacheError(f"{self.dir}: shards hold {int(seen.sum())} of "
                                        f"{len(seen)} images listed in index.json")
            self._memory = out
        return self._memory, self.paths

    def pair_rows(self, pair_paths: Sequence[str]) -> np.ndarray:
        """Cache row of each training pair's image: (N_pairs,) int64."""
        return np.array([self.index_of(p) for p in pair_paths], np.int64)

    def pair_dataset(self, pair_paths: Sequence[str], tokens: np.ndarray, batch_size: int,
                     shuffle_seed: int, epoch: int, in_memory: bool | None = None,
                     memory_limit_bytes: int = CacheLayout().memory_limit_bytes,
                     window: int = 1024, skip: int = 0, max_steps: int | None = None
                     ) -> tf.data.Dataset:
        """Shuffled full batches ``(features (B, G, C) float32, tokens (B, L) int32)``.

        Several captions share one image: ``pair_paths[i]`` is pair ``i``'s image and
        ``tokens[i]`` its caption. Deterministic for (``shuffle_seed``, ``epoch``);
        ``skip``/``max_steps`` as in ``data.epoch_batches`` (resuming mid-epoch).

        In memory (``in_memory=None``: when ``nbytes <= memory_limit_bytes``, 2 GiB by
        default) features are loaded once and each batch is a ``tf.gather`` of rows; the
        pair order is exactly ``data.epoch_batches`` (same as training on images). Else
        the shards stream in an epoch-permuted order and pairs are shuffled within
        windows of ``window`` pairs (stateless, so also deterministic): memory is about
        ``window`` grids, but the mixing is local.

        Example:
            >>> # for feats, toks in cache.pair_dataset(paths, toks, 32, 0, epoch): ...
        """
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or len(tokens) != len(pair_paths):
            raise ValueError(f"tokens must be (N_pairs={len(pair_paths)}, L), "
                             f"got {tokens.shape}")
        rows = self.pair_rows(pair_paths)  # (N_pairs,)
        steps = steps_per_epoch(len(rows), batch_size, max_steps)
        if steps < 1:
            raise ValueError(f"{len(rows)} pairs make no full batch of {batch_size}")
        if in_memory is None:
            in_memory = self.nbytes <= memory_limit_bytes
        if in_memory:
            return self._pairs_in_memory(rows, tokens, batch_size, shuffle_seed, epoch, skip,
                                         max_steps)
        return self._pairs_streamed(rows, tokens, batch_size, shuffle_seed, epoch, window,
                                    skip, steps)

    def _pairs_in_memory(self, rows: np.ndarray, tokens: np.ndarray, batch_size: int,
                         seed: int, epoch: int, skip: int, max_steps: int | None
                         ) -> tf.data.Dataset:
        if self._memory_t is None:
            self._memory_t = tf.constant(self.load_all()[0])
        feats = self._memory_t  # (N, G, C) stored dtype
        toks, rows_t = tf.constant(tokens, tf.int32), tf.constant(rows)
        batches = epoch_batches(len(rows), batch_size, seed, epoch, skip, max_steps)  # (S, B)

        def gather(idx: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return (tf.cast(tf.gather(feats, tf.gather(rows_t, idx)), tf.float32),
                    tf.gather(toks, idx))

        ds = tf.data.Dataset.from_tensor_slices(batches)  # one gather per batch, no autotuner:
        # joining its thread left about half the epochs idle for ~8 s at their end (README)
        return ds.map(gather).prefetch(2).with_options(no_autotune())

    def _pairs_streamed(self, rows: np.ndarray, tokens: np.ndarray, batch_size: int,
                        seed: int, epoch: int, window: int, skip: int, steps: int
                        ) -> tf.data.Dataset:
        rng = np.random.default_rng([seed, epoch])
        files = [self._shard_files()[i] for i in rng.permutation(len(self.index["shards"]))]
        order = np.argsort(rows, kind="stable")  # pairs grouped by image row
        splits = tf.constant(np.concatenate([[0], np.cumsum(np.bincount(
            rows, minlength=len(self.paths)))]), tf.int64)  # (N + 1,)
        pairs_t, toks = tf.constant(order, tf.int64), tf.constant(tokens, tf.int32)
        base = tf.constant(rng.integers(0, 2**31 - 1, size=2), tf.int64)

        def expand(path: tf.Tensor, row: tf.Tensor, feats: tf.Tensor
                   ) -> tuple[tf.Tensor, tf.Tensor]:
            pids = pairs_t[splits[row]:splits[row + 1]]  # (n,)
            return tf.repeat(feats[None], tf.size(pids), axis=0), pids  # (n, G, C), (n,)

        def mix(i: tf.Tensor, batch: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, ...]:
            perm = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(batch[1])[0]),
                                                            seed=base + i)
            return tf.gather(batch[0], perm), tf.gather(batch[1], perm)

        def finish(feats: tf.Tensor, pids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return tf.cast(feats, tf.float32), tf.gather(toks, pids)

        ds = self.records(files, keep_dtype=True, deterministic=True, in_order=False)
        ds = ds.map(expand, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
        ds = ds.batch(window).enumerate().map(mix, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.unbatch().batch(batch_size, drop_remainder=True).take(steps).skip(skip)
        return ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


# ---- throughput --------------------------------------------------------------------------
def _rate(ds: tf.data.Dataset, steps: int, batch_size: int) -> float:
    """Samples/s of iterating ``ds`` (repeated) for ``steps`` batches after one warm-up."""
    it = iter(ds.repeat())
    next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch_size / max(time.perf_counter() - t0, 1e-9)


def benchmark_input(cache: FeatureCache, pair_paths: Sequence[str], tokens: np.ndarray,
                    batch_size: int = 32, steps: int = 50, seed: int = 0) -> dict[str, float]:
    """Images/s the input pipeline delivers with no model compute, streamed vs in memory.

    ``stream_images_per_s``: ``pair_dataset(in_memory=False)`` reading the shards;
    ``memory_images_per_s``: ``pair_dataset(in_memory=True)`` gathering from the
    pre-loaded array (``memory_load_seconds`` is the one-off load). Compare both with
    the train step's images/s: the input must be faster for training not to wait.

    Example:
        >>> # benchmark_input(FeatureCache("cache"), pair_paths, tokens, 32, steps=50)
        >>> # {'stream_images_per_s': ..., 'memory_images_per_s': ..., ...}
    """
    stream = cache.pair_dataset(pair_paths, tokens, batch_size, seed, 0, in_memory=False)
    stream_rate = _rate(stream, steps, batch_size)
    t0 = time.perf_counter()
    cache.load_all()
    load_s = time.perf_counter() - t0
    memory = cache.pair_dataset(pair_paths, tokens, batch_size, seed, 0, in_memory=True)
    return {"stream_images_per_s": stream_rate,
            "memory_images_per_s": _rate(memory, steps, batch_size),
            "memory_load_seconds": load_s, "batch_size": float(batch_size),
            "steps": float(steps)}
