"""Tests for the synthetic shapes dataset."""

from __future__ import annotations

import csv
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data.shapes import (
    ShapesSpec,
    assign_splits,
    box_center,
    generate_shapes,
    max_caption_words,
    object_words,
    read_manifest,
    relation,
    render_sample,
)

SPEC = ShapesSpec()
COLORS = "|".join(SPEC.color_names)
SHAPES = "|".join(SPEC.shapes)
PHRASE = f"a ({COLORS}) ({SHAPES})"
CAPTION_RE = re.compile(rf"^{PHRASE}(?: (?:left of|right of|above|below) {PHRASE})*$")
RELATION_RE = re.compile(r"(left of|right of|above|below)")


def _samples(n: int, seed: int = 0, **kwargs) -> list[tuple]:
    rng = np.random.default_rng(seed)
    return [render_sample(rng, **kwargs) for _ in range(n)]


@pytest.fixture(scope="module")
def samples() -> list[tuple]:
    return _samples(400, seed=123)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    return generate_shapes(out, 200, seed=5, workers=2)


def test_render_is_deterministic_for_a_seed() -> None:
    first, second = _samples(20, seed=7), _samples(20, seed=7)
    for (im_a, cap_a, obj_a, wo_a), (im_b, cap_b, obj_b, wo_b) in zip(first, second):
        assert (cap_a, obj_a, wo_a) == (cap_b, obj_b, wo_b)
        assert np.array_equal(np.asarray(im_a), np.asarray(im_b))
    other = _samples(20, seed=8)
    assert [s[1] for s in other] != [s[1] for s in first]


def test_captions_follow_grammar(samples: list[tuple]) -> None:
    counts = set()
    for _, caption, objects, _ in samples:
        assert CAPTION_RE.match(caption), caption
        assert caption == caption.strip() and "  " not in caption
        assert caption.count(" a ") + 1 == len(objects)
        assert len(caption.split()) <= max_caption_words(3)
        counts.add(len(objects))
    assert counts == {1, 2, 3}
    assert max_caption_words(3) == 13


def test_same_content_gives_same_caption(samples: list[tuple]) -> None:
    for _, caption, objects, _ in samples:
        cells = [_cell(obj["box"]) for obj in objects]
        assert len(set(cells)) == len(cells)
        for a, b in itertools.pairwise(cells):  # row-major, never diagonal neighbours
            assert a < b and abs(b[0] - a[0]) != abs(b[1] - a[1])
        assert [relation(a, b) for a, b in itertools.pairwise(cells)] == RELATION_RE.findall(
            caption
        )


def _cell(box: list[int], size: int = 112) -> tuple[int, int]:
    x, y = box_center(box)
    return int(y * 3 // size), int(x * 3 // size)


def test_relations_agree_with_boxes(samples: list[tuple]) -> None:
    seen = set()
    for _, caption, objects, _ in samples:
        for rel, (prev, nxt) in zip(
            RELATION_RE.findall(caption), itertools.pairwise(objects), strict=True
        ):
            (px, py), (nx, ny) = box_center(prev["box"]), box_center(nxt["box"])
            dx, dy = nx - px, ny - py
            major, minor = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx)}[rel]
            assert major > 20, (caption, rel, dx, dy)
            assert major >= 1.25 * abs(minor) and major - abs(minor) > 15, (caption, dx, dy)
            seen.add(rel)
    assert seen == {"left of", "right of", "above"}


def test_boxes_inside_and_apart(samples: list[tuple]) -> None:
    sizes = []
    for image, _, objects, _ in samples:
        width, height = image.size
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 < width and 0 <= y0 < y1 < height
            sizes.append(x1 - x0 + 1)
        for a, b in itertools.combinations([o["box"] for o in objects], 2):
            gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
            assert gap >= 3, (a, b)
    assert 24 <= min(sizes) and max(sizes) <= 40


def test_identities_distinct_and_from_tables(samples: list[tuple]) -> None:
    for _, _, objects, _ in samples:
        ids = [(o["color"], o["shape"]) for o in objects]
        assert len(set(ids)) == len(ids)
        assert all(c in SPEC.color_names and s in SPEC.shapes for c, s in ids)


def test_word_objects_align_with_words(samples: list[tuple]) -> None:
    kinds = object_words()
    for _, caption, objects, word_objects in samples:
        words = caption.split()
        assert len(words) == len(word_objects)
        for word, index in zip(words, word_objects):
            if word in kinds:
                assert objects[index][kinds[word]] == word
            else:
                assert index == -1
        assert sorted(set(word_objects) - {-1}) == list(range(len(objects)))


def test_box_centres_have_object_colour(samples: list[tuple]) -> None:
    for image, _, objects, _ in samples[:100]:
        pixels = np.asarray(image, dtype=int)
        background = pixels[0, 0]
        assert np.all(np.abs(background - background[0]) == 0)  # plain gray
        for obj in objects:
            x, y = (round(v) for v in box_center(obj["box"]))
            patch = pixels[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3)
            nearest = [
                min(SPEC.colors, key=lambda c: np.abs(np.subtract(c[1], p)).sum())[0] for p in patch
            ]
            assert set(nearest) == {obj["color"]}
            assert np.abs(patch - SPEC.rgb(obj["color"])).max() <= 2 * SPEC.color_jitter


def test_image_size_scales() -> None:
    image, _, objects, _ = _samples(1, seed=3, image_size=224, min_objects=3)[0]
    assert image.size == (224, 224) and len(objects) == 3
    assert all(o["box"][2] - o["box"][0] >= 50 for o in objects)


def test_bad_object_counts_raise() -> None:
    with pytest.raises(ValueError):
        render_sample(np.random.default_rng(0), 112, 3, 2)


def test_vocabulary() -> None:
    assert SPEC.vocabulary() == sorted(
        [
            "a",
            "red",
            "green",
            "blue",
            "yellow",
            "purple",
            "circle",
            "square",
            "triangle",
            "diamond",
            "left",
            "right",
            "of",
            "above",
            "below",
        ]
    )


def test_manifest_columns_and_content(dataset: Path) -> None:
    with open(dataset, newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == ShapesSpec().manifest_columns
        rows = list(reader)
    assert len(rows) == 200
    assert rows[0]["image"] == "images/shape_00000.png"
    for row in rows[:40]:
        assert CAPTION_RE.match(row["caption"])
        objects, word_objects = json.loads(row["objects"]), json.loads(row["word_objects"])
        assert len(word_objects) == len(row["caption"].split())
        assert all(set(o) == {"color", "shape", "box"} and len(o["box"]) == 4 for o in objects)
        with Image.open(dataset.parent / row["image"]) as image:
            assert image.size == (112, 112) and image.mode == "RGB"
    decoded = read_manifest(dataset)
    assert decoded[0]["objects"] == json.loads(rows[0]["objects"])
    assert Path(decoded[0]["image"]).is_file()


def test_splits_partition_with_fractions(dataset: Path) -> None:
    rows = read_manifest(dataset)
    splits = [row["split"] for row in rows]
    assert set(splits) == {"train", "val", "test"}
    assert splits.count("val") == 20 and splits.count("test") == 20
    assert splits.count("train") == 160
    for name in ("val", "test"):  # shuffled, not contiguous blocks
        where = [i for i, split in enumerate(splits) if split == name]
        assert where[-1] - where[0] > 40
    assert assign_splits(200, 6, 0.1, 0.1) != splits
    assert assign_splits(200, 5, 0.1, 0.1) == splits
    assert assign_splits(10, 0, 0.25, 0.0).count("val") == 2
    with pytest.raises(ValueError):
        assign_splits(10, 0, 0.6, 0.5)


def test_generation_matches_render_and_is_worker_independent(dataset: Path, tmp_path: Path) -> None:
    serial = generate_shapes(tmp_path, 200, seed=5, workers=1)
    assert serial.read_text() == dataset.read_text()
    for index in (0, 77, 199):
        name = f"images/shape_{index:05d}.png"
        with Image.open(serial.parent / name) as a, Image.open(dataset.parent / name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))
    image, caption, _, _ = render_sample(np.random.default_rng([5, 77]))
    assert read_manifest(serial)[77]["caption"] == caption
    with Image.open(serial.parent / "images/shape_00077.png") as saved:
        assert np.array_equal(np.asarray(saved), np.asarray(image))


def test_cache_reuse_and_regeneration(tmp_path: Path) -> None:
    manifest = generate_shapes(tmp_path, 30, seed=1)
    first_image = tmp_path / "images" / "shape_00000.png"
    stamps = (manifest.stat().st_mtime_ns, first_image.stat().st_mtime_ns)
    captions = [r["caption"] for r in read_manifest(manifest)]

    again = generate_shapes(tmp_path, 30, seed=1, workers=3)
    assert again == manifest
    assert (manifest.stat().st_mtime_ns, first_image.stat().st_mtime_ns) == stamps

    generate_shapes(tmp_path, 20, seed=2)
    assert manifest.stat().st_mtime_ns != stamps[0]
    rows = read_manifest(manifest)
    assert len(rows) == 20 and [r["caption"] for r in rows] != captions[:20]
    assert len(list((tmp_path / "images").glob("shape_*.png"))) == 20
    assert json.loads((tmp_path / "shapes.json").read_text())["seed"] == 2


def test_missing_manifest_regenerates(tmp_path: Path) -> None:
    manifest = generate_shapes(tmp_path, 10, seed=1)
    manifest.unlink()
    assert generate_shapes(tmp_path, 10, seed=1).is_file()
