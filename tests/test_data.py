"""Manifests, robust image loading, splits and batching (eager and inside tf.data)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from captioner.data.images import (
    ImageError,
    ImageLimits,
    crop_to_ink,
    load_image,
    load_view,
)
from captioner.data.manifests import DataError, LoadReport, Record, read_csv_manifest
from captioner.data.splits import PairTensors, build_split, epoch_batches, gather_batch


def write_manifest(path, rows, header="image,caption,split"):
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def test_manifest_paths_resolve_against_its_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    m = write_manifest(tmp_path / "sub" / "m.csv", ["a.png,a cat,train", "/abs/b.png,a dog,"])
    recs = read_csv_manifest(m)
    assert recs[0].image == str(tmp_path / "sub" / "a.png")
    assert recs[1].image == "/abs/b.png" and recs[1].split is None


def test_manifest_errors_name_file_and_line(tmp_path):
    m = write_manifest(tmp_path / "m.csv", ["a.png,a cat,train", "b.png,,train"])
    with pytest.raises(DataError, match=r"m\.csv:3"):
        read_csv_manifest(m)
    m = write_manifest(tmp_path / "m2.csv", ["a.png,a cat,holdout"])
    with pytest.raises(DataError, match=r"m2\.csv:2: unknown split 'holdout'"):
        read_csv_manifest(m)
    with pytest.raises(DataError, match="no column 'text'"):
        read_csv_manifest(m, text_column="text")


def test_extra_json_columns_become_meta(tmp_path):
    m = write_manifest(tmp_path / "m.csv", ['a.png,a cat,train,"[1, 2]",x'],
                       header="image,caption,split,boxes,note")
    rec = read_csv_manifest(m)[0]
    assert rec.meta == {"boxes": [1, 2], "note": "x"}


def test_splits_are_by_image_and_never_leak():
    from captioner.data.formats import group_splits

    recs = group_splits([Record(f"img{i // 5}.png", f"text {i}") for i in range(500)],
                        0.1, 0.2, seed=3)
    split_of = {}
    for r in recs:
        assert split_of.setdefault(r.image, r.split) == r.split
    counts = {s: sum(v == s for v in split_of.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 70, "val": 10, "test": 20}


def make_images(tmp_path):
    paths = {}
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = (255, 0, 0)
    paths["rgb"] = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(paths["rgb"])
    paths["gray"] = tmp_path / "gray.png"
    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(paths["gray"])
    paths["rgba"] = tmp_path / "rgba.png"
    Image.fromarray(np.zeros((20, 20, 4), np.uint8)).save(paths["rgba"])  # fully transparent
    paths["palette"] = tmp_path / "palette.png"
    Image.fromarray(rgb).convert("P").save(paths["palette"])
    paths["16bit"] = tmp_path / "deep.png"
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(paths["16bit"])
    paths["cmyk"] = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(paths["cmyk"])
    paths["corrupt"] = tmp_path / "corrupt.jpg"
    paths["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths["text"] = tmp_path / "notes.png"
    paths["text"].write_text("hello")
    return paths


def test_load_image_handles_modes(tmp_path):
    p = make_images(tmp_path)
    for key in ("rgb", "gray", "rgba", "palette", "16bit", "cmyk"):
        arr = load_image(p[key], 16)
        assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8, key
    assert load_image(p["rgb"], 16)[8, 2].tolist() == [255, 0, 0]
    assert load_image(p["rgba"], 8).min() == 255  # transparent -> white background
    assert load_image(p["16bit"], 8).min() == 255  # 16-bit scaled, not clipped to garbage


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)  # wide image, left half white
    arr[:, :10] = 255
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "rot.jpg", 20)
    assert out[2, 10].mean() > 200 and out[18, 10].mean() < 50  # top white, bottom black


def test_unreadable_and_missing_images_are_skipped_and_counted(tmp_path):
    p = make_images(tmp_path)
    recs = [Record(str(p["rgb"]), "a b", "train"), Record(str(p["corrupt"]), "c d", "train"),
            Record(str(p["text"]), "e f", "train"),
            Record(str(tmp_path / "gone.png"), "g", "train"), Record(str(p["rgb"]), "a c", "train")]
    report = LoadReport()
    split = build_split(recs, 16, workers=2, report=report)
    assert split.num_images == 1 and split.num_pairs == 2
    assert split.references == [["a b", "a c"]]
    assert report.count == 3
    reasons = dict(report.failures)
    assert reasons[str(tmp_path / "gone.png")] == "missing file"
    assert reasons[str(p["corrupt"])].startswith("unreadable")
    report.write(tmp_path / "skipped.txt")
    assert len((tmp_path / "skipped.txt").read_text().splitlines()) == 3


def test_gather_batch_same_eagerly_and_in_tf_data():
    images = tf.constant(np.arange(4 * 2 * 2 * 3).reshape(4, 2, 2, 3), tf.uint8)
    tokens = tf.constant(np.arange(6 * 3).reshape(6, 3), tf.int32)
    pair_image = tf.constant([0, 0, 1, 2, 3, 3])
    idx = tf.constant([5, 2, 0])
    eager = gather_batch(images, tokens, pair_image, idx)
    ds = tf.data.Dataset.from_tensors(idx).map(lambda i: gather_batch(images, tokens,
                                                                      pair_image, i))
    graph = next(iter(ds))
    for a, b in zip(eager, graph):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert eager[0].numpy()[0].tolist() == images.numpy()[3].tolist()


def test_epoch_batches_are_deterministic_and_skip():
    full = epoch_batches(40, 8, seed=0, epoch=1)
    assert full.shape == (5, 8)
    np.testing.assert_array_equal(full, epoch_batches(40, 8, seed=0, epoch=1))
    np.testing.assert_array_equal(epoch_batches(40, 8, 0, 1, skip=2), full[2:])
    assert not np.array_equal(full, epoch_batches(40, 8, seed=0, epoch=2))
    assert sorted(full.ravel().tolist()) == list(range(40))
    assert epoch_batches(43, 8, 0, 1).shape == (5, 8)  # only full batches
    assert epoch_batches(40, 8, 0, 1, max_steps=3).shape == (3, 8)


def test_pair_tensors_batches_gather_the_right_rows():
    images = np.arange(4, dtype=np.uint8)[:, None, None, None].repeat(3, -1)  # image i = i
    tokens = np.arange(6, dtype=np.int32)[:, None].repeat(2, 1)  # pair j = j
    pair_image = np.array([0, 0, 1, 2, 3, 3])
    pairs = PairTensors.from_arrays(images, tokens, pair_image)
    got = [(im.numpy()[:, 0, 0, 0].tolist(), tok.numpy()[:, 0].tolist())
           for im, tok in pairs.batches(np.array([[5, 2], [0, 3]]))]
    assert got == [([3, 1], [5, 2]), ([0, 2], [0, 3])]
    # no autotuner thread: its join made each epoch's last batch wait idle (README)
    assert pairs.batches(np.array([[5, 2]])).options().autotune.enabled is False


def test_load_image_names_each_kind_of_bad_input(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(good, "PNG")
    data = good.getvalue()
    assert load_image(data, 8).shape == (8, 8, 3)
    (tmp_path / "text.png").write_text("just text\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    cases = {b"": "empty", tmp_path / "empty.jpg": "empty",
             tmp_path / "text.png": "not_an_image",
             data[:-12]: "truncated",  # the IEND chunk cut off: pixels decode, verify fails
             data[: len(data) // 2]: "truncated"}
    for source, reason in cases.items():
        with pytest.raises(ImageError) as info:
            load_image(source, 8)
        assert info.value.reason == reason, (source, info.value)
        if isinstance(source, Path):
            assert source.name in str(info.value)
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, "PNG")  # 81 Mpx, a few KB on disk
    with pytest.raises(ImageError, match="9000 x 9000 pixels") as info:
        load_image(bomb.getvalue(), 8)
    assert info.value.reason == "too_large"
    assert load_image(data, None, ImageLimits(max_pixels=1200)).shape == (30, 40, 3)
    with pytest.raises(ImageError, match="too_large"):
        load_image(data, None, ImageLimits(max_pixels=1199))


def test_crop_to_ink_reads_a_drawing_at_the_scale_of_its_ink(tmp_path):
    """A small drawing in a corner of a large canvas fills the read picture once cropped;
    the whole-picture reading is unchanged, and so is a picture without ink."""
    canvas = Image.new("RGB", (300, 200), "white")
    canvas.paste((0, 0, 0), (250, 10, 290, 30))  # 40 x 20 px of ink near the right edge
    path = tmp_path / "drawing.png"
    canvas.save(path)
    whole = load_image(path, 40)
    assert (whole < 128).all(axis=-1).sum() < 40  # a few pixels of ink in the corner
    cropped = load_image(path, 40, crop_margin=0.25)  # side 40 * 1.5 = 60 -> 40 px
    ink = (cropped < 128).all(axis=-1)
    ys, xs = np.nonzero(ink)
    assert (xs.min(), xs.max() + 1) == (7, 33) and (ys.min(), ys.max() + 1) == (13, 27)
    assert (cropped[0, 0] == 255).all() and (cropped[-1, -1] == 255).all()
    assert crop_to_ink(canvas, 0.0).size == (40, 40)
    assert (load_image(path, 40, crop_margin=0.0) < 128).all(axis=-1).mean() > 0.45
    blank = tmp_path / "blank.png"
    Image.new("RGB", (50, 30), "white").save(blank)
    assert np.array_equal(load_image(blank, 16, crop_margin=0.2), load_image(blank, 16))
    with pytest.raises(ValueError, match="margin must be >= 0"):
        crop_to_ink(canvas, -0.1)
    records = [Record(str(path), "a", "test")]
    split = build_split(records, 40, crop_margin=0.25)
    assert np.array_equal(split.images[0], cropped)
    view = load_view(path, 0.25)  # what the model read, before resizing
    assert view.box == (240, -10, 60) and view.pixels.shape == (60, 60, 3)
    assert np.array_equal(view.resized(40), cropped)
    assert view.to_view(250.0, 10.0) == (10.0, 20.0)
    assert np.array_equal(view.pixels[20:40, 10:50], np.zeros((20, 40, 3), np.uint8))
    assert (view.pixels[:20] == 255).all()  # above the picture's top edge: white
    whole_view = load_view(path, None)
    assert whole_view.box is None and np.array_equal(whole_view.resized(40), whole)
    assert whole_view.to_view(250.0, 10.0) == (250.0, 10.0)
    assert load_view(blank, 0.2).box is None
