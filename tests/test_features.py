"""Feature cache: extraction, resume, invalidation, skipped images and the tf.data readers.

A fake backbone maps each image to its mean colour tiled into (G, C) plus the cell index,
so every cached value can be checked exactly.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from captioner.data.features import (
    CacheLayout,
    FeatureCache,
    FeatureCacheError,
    benchmark_input,
    extract_features,
)
from captioner.data.splits import epoch_batches

G, C, SIZE = 4, 6, 8
N_PATHS, CORRUPT, MISSING = 40, 5, 17  # positions of the unreadable images
FP = {"name": "fake", "weights": "none", "trainable": False}


def colour(i: int) -> tuple[int, int, int]:
    return (i * 6) % 256, 255 - i * 6, (i * 37) % 256


def expected_grid(i: int) -> np.ndarray:
    """(G, C): the fake encoder's output for image i."""
    return np.tile(np.array(colour(i), np.float32), C // 3)[None, :] + np.arange(G)[:, None]


class FakeEncoder:
    """Counts calls; raises ``exc`` on call number ``fail_after + 1``."""

    def __init__(self, fail_after: int | None = None, exc: type[BaseException] = RuntimeError):
        self.calls, self.fail_after, self.exc = 0, fail_after, exc

    def __call__(self, images: np.ndarray) -> tf.Tensor:  # (B, S, S, 3) uint8 -> (B, G, C)
        assert images.dtype == np.uint8 and images.shape[1:] == (SIZE, SIZE, 3)
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise self.exc("backbone crashed")
        self.calls += 1
        mean = images.reshape(len(images), -1, 3).mean(axis=1)  # (B, 3)
        grid = np.tile(mean, (1, C // 3))[:, None, :] + np.arange(G)[None, :, None]
        return tf.constant(grid, tf.float32)


@pytest.fixture
def images(tmp_path) -> list[str]:
    """40 paths: 38 solid-colour PNGs, one corrupt file and one missing path."""
    folder = tmp_path / "img"
    folder.mkdir()
    paths = []
    for i in range(N_PATHS):
        p = folder / f"{i:02d}.png"
        if i == CORRUPT:
            p.write_bytes(b"\x89PNG not really")
        elif i != MISSING:
            Image.new("RGB", (SIZE, SIZE), colour(i)).save(p)
        paths.append(str(p))
    return paths


def extract(paths, out, enc=None, fp=FP, **kw):
    kw = {"batch_size": 3, "shard_size": 8, "workers": 2, "progress": False, **kw}
    return extract_features(paths, enc or FakeEncoder(), out, fp, SIZE, **kw)


def good(paths):
    return [(i, p) for i, p in enumerate(paths) if i not in (CORRUPT, MISSING)]


def shard_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("features-"))


# ---- extraction --------------------------------------------------------------------------
def test_round_trip_values_order_and_shards(images, tmp_path):
    out = tmp_path / "cache"
    s = extract(images, out)
    assert (s.status, s.num_requested, s.num_cached, s.num_skipped) == ("fresh", 40, 38, 2)
    assert s.num_extracted == 38 and s.images_per_s > 0 and s.path == str(out)
    assert shard_files(out) == [f"features-{k:05d}-of-00005.tfrecord" for k in range(5)]
    cache = FeatureCache(out).open()
    feats, paths = cache.load_all()
    assert feats.dtype == np.float16 and feats.shape == (38, G, C)
    assert paths == cache.paths == [p for _, p in good(images)]
    want = np.stack([expected_grid(i) for i, _ in good(images)])
    np.testing.assert_allclose(feats.astype(np.float32), want, rtol=1e-3)
    assert cache.grid_shape == (G, C) and cache.dtype == "float16"
    assert cache.fingerprint == FP and cache.index_of(images[20]) == 18
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and index["grid_shape"] == [G, C]
    assert [(sh["start"], sh["stop"], sh["count"]) for sh in index["shards"]] == [
        (0, 8, 7), (8, 16, 8), (16, 24, 7), (24, 32, 8), (32, 40, 8)]


def test_shard_count_follows_shard_size(images, tmp_path):
    for shard_size, n in ((1, 40), (16, 3), (40, 1), (1000, 1)):
        out = tmp_path / f"c{shard_size}"
        s = extract(images, out, shard_size=shard_size)
        assert s.num_shards == n and len(shard_files(out)) == n
        assert len(FeatureCache(out).open().load_all()[1]) == 38


def test_same_inputs_return_immediately(images, tmp_path):
    out = tmp_path / "cache"
    extract(images, out)
    enc = FakeEncoder()
    s = extract(images, out, enc)
    assert enc.calls == 0 and s.status == "up-to-date" and s.num_cached == 38
    assert s.num_skipped == 2


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_resume_after_interruption(images, tmp_path, exc):
    full_enc = FakeEncoder()
    extract(images, tmp_path / "full", full_enc)
    assert full_enc.calls == 15  # 5 shards x 3 batches of <= 3 images

    out = tmp_path / "cache"
    with pytest.raises(exc, match="backbone crashed"):
        extract(images, out, FakeEncoder(fail_after=7, exc=exc))  # dies in shard 2
    index = json.loads((out / "index.json").read_text())
    assert not index["complete"] and len(index["shards"]) == 2
    assert shard_files(out) == [CacheLayout().shard_name(0, 5), CacheLayout().shard_name(1, 5)]
    mtimes = [(out / f).stat().st_mtime_ns for f in shard_files(out)]
    with pytest.raises(FeatureCacheError, match="'complete'"):
        FeatureCache(out).open()

    enc = FakeEncoder()
    s = extract(images, out, enc)
    assert s.status == "resumed" and enc.calls == full_enc.calls - 6 and s.num_extracted == 23
    assert [(out / f).stat().st_mtime_ns for f in shard_files(out)[:2]] == mtimes
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for name in shard_files(tmp_path / "full"):  # byte-identical to an uninterrupted run
        assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    assert json.loads((out / "index.json").read_text()) == json.loads(
        (tmp_path / "full" / "index.json").read_text())
    a, b = FeatureCache(out).load_all(), FeatureCache(tmp_path / "full").load_all()
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]


def test_fingerprint_or_dtype_change_discards_cache(images, tmp_path, caplog):
    out = tmp_path / "cache"
    extract(images, out)
    enc = FakeEncoder()
    with caplog.at_level(logging.WARNING, logger="captioner.data.features"):
        s = extract(images, out, enc, fp={**FP, "weights": "imagenet"}, shard_size=16)
    assert enc.calls > 0 and s.status == "fresh" and "weights" in s.invalidated
    assert "weights: 'none' -> 'imagenet'" in caplog.text
    assert shard_files(out) == [CacheLayout().shard_name(k, 3) for k in range(3)]  # old ones gone
    assert FeatureCache(out).fingerprint["weights"] == "imagenet"

    s = extract(images, out, fp={**FP, "weights": "imagenet"}, dtype="float32")
    assert "dtype: 'float16' -> 'float32'" in s.invalidated
    feats, _ = FeatureCache(out).load_all()
    assert feats.dtype == np.float32
    np.testing.assert_array_equal(feats[0], expected_grid(0))


def test_touched_or_added_image_discards_cache(images, tmp_path):
    out = tmp_path / "cache"
    extract(images, out)
    st = os.stat(images[3])
    os.utime(images[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    enc = FakeEncoder()
    s = extract(images, out, enc)
    assert enc.calls == 15 and "1 image(s) changed size/mtime" in s.invalidated

    extra = str(Path(images[0]).with_name("new.png"))
    Image.new("RGB", (SIZE, SIZE), (1, 2, 3)).save(extra)
    s = extract(images + [extra], out)
    assert "1 image(s) added" in s.invalidated and s.num_cached == 39
    assert FeatureCache(out).paths[-1] == extra

    s = extract(images[:-1], out)
    assert "image(s) removed" in s.invalidated and s.num_cached == 37


def test_skipped_images_are_listed(images, tmp_path):
    out = tmp_path / "cache"
    s = extract(images, out)
    reasons = dict(s.skipped)
    assert set(reasons) == {images[CORRUPT], images[MISSING]}
    assert reasons[images[MISSING]] == "missing file"
    assert reasons[images[CORRUPT]].startswith("unreadable: ")
    cache = FeatureCache(out).open()
    assert dict(cache.skipped) == reasons
    assert images[CORRUPT] not in cache.paths
    with pytest.raises(KeyError, match="skipped at extraction: missing file"):
        cache.index_of(images[MISSING])


def test_encoder_output_is_checked(images, tmp_path):
    with pytest.raises(ValueError, match=r"expected \(3, G, C\)"):
        extract(images, tmp_path / "a", lambda x: np.zeros((len(x), 5)))
    with pytest.raises(ValueError, match="use dtype='float32'"):
        extract(images, tmp_path / "b", lambda x: np.full((len(x), 2, 2), 1e6))


# ---- reading -----------------------------------------------------------------------------
@pytest.fixture
def cache(images, tmp_path) -> FeatureCache:
    extract(images, tmp_path / "cache")
    return FeatureCache(tmp_path / "cache").open()


def test_dataset_equals_load_all(cache):
    feats, paths = cache.load_all()
    got = list(cache.dataset().as_numpy_iterator())
    assert [p.decode() for p, _ in got] == paths
    assert all(f.dtype == np.float32 and f.shape == (G, C) for _, f in got)
    np.testing.assert_array_equal(np.stack([f for _, f in got]), feats.astype(np.float32))

    subset = [paths[30], paths[2], paths[9]]
    got = list(cache.dataset(subset, keep_dtype=True).as_numpy_iterator())
    assert [p.decode() for p, _ in got] == [paths[2], paths[9], paths[30]]  # cache order
    np.testing.assert_array_equal(got[2][1], feats[30])
    assert got[0][1].dtype == np.float16
    unordered = {p.decode() for p, _ in cache.dataset(deterministic=False).as_numpy_iterator()}
    assert unordered == set(paths)


def pairs_for(cache: FeatureCache) -> tuple[list[str], np.ndarray]:
    """1-3 captions per image; tokens[i] = (pair id, image row, 7)."""
    pair_paths = [p for i, p in enumerate(cache.paths) for _ in range(1 + i % 3)]
    rows = [cache.index_of(p) for p in pair_paths]
    tokens = np.stack([np.arange(len(rows)), rows, np.full(len(rows), 7)], axis=1)
    return pair_paths, tokens


def collect(ds) -> tuple[np.ndarray, np.ndarray]:
    batches = list(ds.as_numpy_iterator())
    return np.stack([f for f, _ in batches]), np.stack([t for _, t in batches])


@pytest.mark.parametrize("in_memory", [True, False])
def test_pair_dataset_gathers_rows_deterministically(cache, in_memory):
    pair_paths, tokens = pairs_for(cache)  # 75 pairs
    all_feats = cache.load_all()[0].astype(np.float32)
    feats, toks = collect(cache.pair_dataset(pair_paths, tokens, 8, 3, 1, in_memory, window=16))
    assert feats.shape == (75 // 8, 8, G, C) and feats.dtype == np.float32
    assert toks.shape == (9, 8, 3) and toks.dtype == np.int32
    np.testing.assert_array_equal(feats, all_feats[toks[..., 1]])  # the pair's own image
    np.testing.assert_array_equal(toks, tokens[toks[..., 0]])
    assert len(set(toks[..., 0].ravel())) == 72  # no pair twice
    if in_memory:
        np.testing.assert_array_equal(toks[..., 0], epoch_batches(75, 8, 3, 1))
        # no autotuner thread: its join left about half the epochs idle for seconds (README)
        ds = cache.pair_dataset(pair_paths, tokens, 8, 3, 1, in_memory)
        assert ds.options().autotune.enabled is False

    again = collect(cache.pair_dataset(pair_paths, tokens, 8, 3, 1, in_memory, window=16))
    np.testing.assert_array_equal(again[1], toks)
    other = collect(cache.pair_dataset(pair_paths, tokens, 8, 3, 2, in_memory, window=16))
    assert not np.array_equal(other[1], toks)
    resumed = collect(cache.pair_dataset(pair_paths, tokens, 8, 3, 1, in_memory, window=16,
                                         skip=2, max_steps=5))
    np.testing.assert_array_equal(resumed[1], toks[2:5])


def test_pair_dataset_picks_streaming_above_memory_limit(cache):
    pair_paths, tokens = pairs_for(cache)
    streamed = collect(cache.pair_dataset(pair_paths, tokens, 8, 3, 1, memory_limit_bytes=0))
    assert not np.array_equal(streamed[1][..., 0], epoch_batches(75, 8, 3, 1))
    with pytest.raises(KeyError, match="not in the feature cache"):
        cache.pair_dataset(["/elsewhere.png"], tokens[:1], 1, 0, 0)


def test_datasets_feed_tf_functions(cache):
    feats, _ = cache.load_all()
    want = float(feats.astype(np.float64).sum())

    @tf.function
    def step(f, t):  # a train-step-like consumer, traced once for the fixed batch shape
        return tf.reduce_sum(f) + 0.0 * tf.cast(tf.reduce_sum(t), tf.float32)

    pair_paths, tokens = pairs_for(cache)
    ds = cache.pair_dataset(pair_paths[:72], tokens[:72], 8, 0, 0, in_memory=False)
    total = sum(float(step(f, t)) for f, t in ds)
    assert step.experimental_get_tracing_count() == 1
    assert total == pytest.approx(float(np.sum(feats[tokens[:72, 1]].astype(np.float64))))

    @tf.function
    def consume(ds):
        s = tf.constant(0.0, tf.float64)
        for _, f in ds:
            s += tf.reduce_sum(tf.cast(f, tf.float64))
        return s

    assert float(consume(cache.dataset().batch(5))) == pytest.approx(want)


@pytest.mark.parametrize("edit, pattern", [
    (lambda ix: ix.pop("grid_shape"), r"index\.json: missing key 'grid_shape'"),
    (lambda ix: ix.update(shards="oops"), r"index\.json: key 'shards' must be list"),
    (lambda ix: ix["shards"][1].pop("count"), r"index\.json: missing key 'shards\[1\]\.count'"),
    (lambda ix: ix.update(complete=False), r"index\.json: key 'complete' is false"),
    (lambda ix: ix.update(dtype="int8"), r"index\.json: key 'dtype' must be one of"),
])
def test_index_corruption_names_file_and_key(cache, edit, pattern):
    path = cache.dir / "index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))
    with pytest.raises(FeatureCacheError, match=pattern):
        FeatureCache(cache.dir).open()


def test_broken_files_give_clear_errors(cache, images, caplog):
    (cache.dir / CacheLayout().shard_name(2, 5)).unlink()
    with pytest.raises(FeatureCacheError, match=r"'shards\[2\]\.file'.*is missing"):
        FeatureCache(cache.dir).open()
    enc = FakeEncoder()  # extraction redoes the missing shard and the ones after it
    assert extract(images, cache.dir, enc).status == "resumed" and enc.calls == 9
    (cache.dir / "index.json").write_text("{not json")
    with pytest.raises(FeatureCacheError, match=r"index\.json: not valid JSON"):
        FeatureCache(cache.dir).open()
    with caplog.at_level(logging.WARNING, logger="captioner.data.features"):
        assert extract(images, cache.dir).status == "fresh"
    assert "unusable index" in caplog.text
    with pytest.raises(FeatureCacheError, match="'fingerprint' does not match.*weights"):
        FeatureCache(cache.dir).check({**FP, "weights": "imagenet"}, SIZE)
    FeatureCache(cache.dir).check(FP, SIZE)


def test_benchmark_input_reports_both_rates(cache):
    pair_paths, tokens = pairs_for(cache)
    r = benchmark_input(cache, pair_paths, tokens, batch_size=8, steps=5)
    assert r["stream_images_per_s"] > 0 and r["memory_images_per_s"] > 0
    assert r["memory_load_seconds"] >= 0 and r["batch_size"] == 8
