"""Synthetic "shapes" captioning dataset: the project's demo data (no download).

Each image shows one to three filled, coloured shapes placed in distinct cells of a
coarse 3x3 layout (with jitter), and has ONE canonical caption naming the shapes and
the spatial relation of each shape to the next one, e.g.
``"a red circle left of a blue square above a green triangle"``.

Canonical order is row-major over the layout cells (top-to-bottom, then
left-to-right); the relation word(s) between two consecutive objects describe the
previous object relative to the next one.  Consecutive objects are never in
diagonal cells, so one displacement axis always clearly dominates.  With row-major
order the previous object is never below the next, so ``"below"`` never occurs.
"""

from __future__ import annotations

import csv
import itertools
import json
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class ShapesSpec:
    """Appearance and layout constants of the shapes dataset (all sizes are fractions
    of the image size).

    Example:
        >>> spec = ShapesSpec()
        >>> spec.color_names[:2], spec.shapes[:2]
        (('red', 'green'), ('circle', 'square'))
        >>> spec.object_words()["circle"]
        'shape'
    """

    colors: tuple[tuple[str, tuple[int, int, int]], ...] = (
        ("red", (220, 40, 40)),
        ("green", (40, 170, 60)),
        ("blue", (40, 80, 220)),
        ("yellow", (230, 200, 30)),
        ("purple", (150, 60, 190)),
    )
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
    relations: tuple[str, ...] = ("left of", "right of", "above", "below")
    background: int = 235
    background_jitter: int = 12
    color_jitter: int = 10
    noise_std: float = 0.0
    size_range: tuple[float, float] = (0.232, 0.34)
    position_jitter: float = 0.035
    min_gap: float = 0.03
    min_dominance: float = 1.25
    layout: int = 3
    format_version: int = 1
    manifest_columns: tuple[str, ...] = ("image", "caption", "split", "objects", "word_objects")

    @property
    def color_names(self) -> tuple[str, ...]:
        """Colour words in table order."""
        return tuple(name for name, _ in self.colors)

    def rgb(self, color: str) -> tuple[int, int, int]:
        """Nominal RGB value of a colour word."""
        return dict(self.colors)[color]

    def object_words(self) -> dict[str, str]:
        """Map each colour word to ``"color"`` and each shape word to ``"shape"``."""
        words = {name: "color" for name in self.color_names}
        words.update({shape: "shape" for shape in self.shapes})
        return words

    def vocabulary(self) -> list[str]:
        """All words that may appear in a caption, sorted."""
        rel_words = {w for rel in self.relations for w in rel.split()}
        return sorted({"a", *self.object_words(), *rel_words})


def object_words(spec: ShapesSpec | None = None) -> dict[str, str]:
    """Which caption words are object words: ``{word: "color" | "shape"}``.

    Example:
        >>> object_words()["red"], object_words()["diamond"]
        ('color', 'shape')
    """
    return (spec or ShapesSpec()).object_words()


def max_caption_words(max_objects: int = 3, spec: ShapesSpec | None = None) -> int:
    """Upper bound on caption length in words (13 for three objects)."""
    spec = spec or ShapesSpec()
    longest_relation = max(len(rel.split()) for rel in spec.relations)
    return 3 * max_objects + longest_relation * max(max_objects - 1, 0)


# --------------------------------------------------------------------------- layout


def _sample_cells(rng: np.random.Generator, n: int, layout: int) -> list[tuple[int, int]]:
    """Distinct layout cells in row-major order, no two consecutive ones diagonal."""
    while True:
        flat = np.sort(rng.choice(layout * layout, size=n, replace=False))
        cells = [(int(c) // layout, int(c) % layout) for c in flat]
        pairs = itertools.pairwise(cells)
        if all(abs(b[0] - a[0]) != abs(b[1] - a[1]) for a, b in pairs):
            return cells


def _sample_box(
    rng: np.random.Generator, cell: tuple[int, int], size: int, spec: ShapesSpec
) -> list[int]:
    """Square box ``[x0, y0, x1, y1]`` (inclusive pixels) of one object in ``cell``."""
    side = round(float(rng.uniform(*spec.size_range)) * size)
    jitter = spec.position_jitter * size
    box = []
    for index in (cell[1], cell[0]):  # x from column, y from row
        centre = size * (index + 0.5) / spec.layout + rng.uniform(-jitter, jitter)
        start = round(float(centre) - side / 2)
        box.append(min(max(start, 1), size - 1 - side))
    return [box[0], box[1], box[0] + side - 1, box[1] + side - 1]


def box_center(box: Sequence[float]) -> tuple[float, float]:
    """Centre ``(x, y)`` of a box ``[x0, y0, x1, y1]``."""
    return (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0


def _boxes_apart(a: Sequence[int], b: Sequence[int], gap: float) -> bool:
    """True when boxes are separated by at least ``gap`` pixels on some axis."""
    return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]


def _dominance_ok(prev: Sequence[int], nxt: Sequence[int], spec: ShapesSpec) -> bool:
    """True when one axis of the centre displacement clearly dominates the other."""
    (px, py), (nx, ny) = box_center(prev), box_center(nxt)
    dx, dy = abs(nx - px), abs(ny - py)
    return max(dx, dy) >= spec.min_dominance * min(dx, dy)


def _layout_ok(boxes: list[list[int]], size: int, spec: ShapesSpec) -> bool:
    gap = spec.min_gap * size
    for i, a in enumerate(boxes):
        if not all(_boxes_apart(a, b, gap) for b in boxes[i + 1 :]):
            return False
    return all(_dominance_ok(a, b, spec) for a, b in itertools.pairwise(boxes))


def _sample_layout(
    rng: np.random.Generator, n: int, size: int, spec: ShapesSpec
) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """Cells and non-overlapping boxes for ``n`` objects, in canonical order."""
    while True:
        cells = _sample_cells(rng, n, spec.layout)
        for _ in range(50):
            boxes = [_sample_box(rng, cell, size, spec) for cell in cells]
            if _layout_ok(boxes, size, spec):
                return cells, boxes


def relation(prev_cell: tuple[int, int], next_cell: tuple[int, int]) -> str:
    """Relation of the previous object to the next one from their (row, col) cells.

    Example:
        >>> relation((0, 0), (0, 2)), relation((0, 1), (2, 1))
        ('left of', 'above')
    """
    d_row, d_col = next_cell[0] - prev_cell[0], next_cell[1] - prev_cell[1]
    if abs(d_col) > abs(d_row):
        return "left of" if d_col > 0 else "right of"
    return "above" if d_row > 0 else "below"


# --------------------------------------------------------------------------- drawing


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: list[int], fill: tuple) -> None:
    x0, y0, x1, y1 = box
    xc, yc = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (xc, y0), (x1, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(xc, y0), (x1, yc), (xc, y1), (x0, yc)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _jittered(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple:
    noise = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + noise, 0, 255))


def _draw_image(
    rng: np.random.Generator, size: int, objects: list[dict], spec: ShapesSpec
) -> Image.Image:
    level = spec.background + int(rng.integers(-spec.background_jitter, spec.background_jitter + 1))
    image = Image.new("RGB", (size, size), (level, level, level))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        fill = _jittered(rng, spec.rgb(obj["color"]), spec.color_jitter)
        _draw_shape(draw, obj["shape"], obj["box"], fill)
    if spec.noise_std > 0:
        pixels = np.asarray(image, dtype=np.float32)
        pixels += rng.normal(0.0, spec.noise_std, size=pixels.shape)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image


# --------------------------------------------------------------------------- captions


def _sample_identities(rng: np.random.Generator, n: int, spec: ShapesSpec) -> list[tuple]:
    """``n`` distinct (colour, shape) pairs."""
    pairs = [(c, s) for c in spec.color_names for s in spec.shapes]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    return [pairs[int(i)] for i in chosen]


def caption_for(objects: list[dict], cells: list[tuple[int, int]]) -> tuple[str, list[int]]:
    """Canonical caption and ``word_objects`` for objects already in canonical order.

    Example:
        >>> objs = [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}]
        >>> caption_for(objs, [(0, 0), (1, 0)])
        ('a red circle above a blue square', [-1, 0, 0, -1, -1, 1, 1])
    """
    words: list[str] = []
    word_objects: list[int] = []
    for k, obj in enumerate(objects):
        if k > 0:
            rel = relation(cells[k - 1], cells[k]).split()
            words += rel
            word_objects += [-1] * len(rel)
        words += ["a", obj["color"], obj["shape"]]
        word_objects += [-1, k, k]
    return " ".join(words), word_objects


def render_sample(
    rng: np.random.Generator,
    image_size: int = 112,
    min_objects: int = 1,
    max_objects: int = 3,
    spec: ShapesSpec | None = None,
) -> tuple[Image.Image, str, list[dict], list[int]]:
    """Draw one random image; return ``(image, caption, objects, word_objects)``.

    ``objects`` are in canonical (caption) order, each
    ``{"color": str, "shape": str, "box": [x0, y0, x1, y1]}`` with inclusive pixel
    coordinates; ``word_objects`` holds one object index per caption word (-1 for
    words that are not colour/shape words).

    Example:
        >>> image, caption, objects, word_objects = render_sample(np.random.default_rng(0))
        >>> image.size, len(caption.split()) == len(word_objects)
        ((112, 112), True)
    """
    spec = spec or ShapesSpec()
    if not 1 <= min_objects <= max_objects <= spec.layout**2:
        raise ValueError(
            f"need 1 <= min_objects <= max_objects <= {spec.layout**2}, "
            f"got {min_objects}, {max_objects}"
        )
    n = int(rng.integers(min_objects, max_objects + 1))
    cells, boxes = _sample_layout(rng, n, image_size, spec)
    objects = [
        {"color": color, "shape": shape, "box": box}
        for (color, shape), box in zip(_sample_identities(rng, n, spec), boxes)
    ]
    image = _draw_image(rng, image_size, objects, spec)
    caption, word_objects = caption_for(objects, cells)
    return image, caption, objects, word_objects


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class _Job:
    """Rendering parameters shared by all worker chunks."""

    out_dir: str
    seed: int
    image_size: int
    min_objects: int
    max_objects: int
    spec: ShapesSpec


def image_name(index: int) -> str:
    """Relative path of image ``index`` inside the dataset directory."""
    return f"images/shape_{index:05d}.png"


def _render_chunk(job: _Job, indices: list[int]) -> list[tuple[str, list[dict], list[int]]]:
    rows = []
    for index in indices:
        rng = np.random.default_rng([job.seed, index])
        image, caption, objects, word_objects = render_sample(
            rng, job.image_size, job.min_objects, job.max_objects, job.spec
        )
        image.save(os.path.join(job.out_dir, image_name(index)), compress_level=1)
        rows.append((caption, objects, word_objects))
    return rows


def _render_all(job: _Job, n_images: int, workers: int) -> list[tuple]:
    indices = list(range(n_images))
    if workers <= 1 or n_images < 64:
        return _render_chunk(job, indices)
    n_chunks = workers * 4
    chunks = [indices[i::n_chunks] for i in range(n_chunks)]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        results = list(pool.map(_render_chunk, [job] * n_chunks, chunks))
    rows: list = [None] * n_images
    for chunk, chunk_rows in zip(chunks, results):
        for index, row in zip(chunk, chunk_rows):
            rows[index] = row
    return rows


def assign_splits(n_images: int, seed: int, val_fraction: float, test_fraction: float) -> list[str]:
    """Split name per image from a seeded shuffle (test first, then val, rest train).

    Example:
        >>> sorted(set(assign_splits(10, 0, 0.1, 0.1)))
        ['test', 'train', 'val']
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction > 1:
        raise ValueError(f"bad split fractions val={val_fraction} test={test_fraction}")
    order = np.random.default_rng(seed).permutation(n_images)
    n_test = round(n_images * test_fraction)
    n_val = min(round(n_images * val_fraction), n_images - n_test)
    splits = ["train"] * n_images
    for position, index in enumerate(order[: n_test + n_val]):
        splits[int(index)] = "test" if position < n_test else "val"
    return splits


def _write_manifest(path: Path, rows: list[tuple], splits: list[str], columns: tuple[str, ...]
                    ) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for index, ((caption, objects, word_objects), split) in enumerate(zip(rows, splits)):
            writer.writerow(
                [
                    image_name(index),
                    caption,
                    split,
                    json.dumps(objects, separators=(",", ":")),
                    json.dumps(word_objects, separators=(",", ":")),
                ]
            )
    os.replace(tmp, path)


def _params_match(params_path: Path, params: dict) -> bool:
    try:
        return json.loads(params_path.read_text(encoding="utf-8")) == params
    except (OSError, ValueError):
        return False


def generate_shapes(
    out_dir: str | os.PathLike,
    n_images: int,
    image_size: int = 112,
    min_objects: int = 1,
    max_objects: int = 3,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    workers: int | None = None,
    spec: ShapesSpec | None = None,
) -> Path:
    """Write the shapes dataset to ``out_dir`` and return the manifest path.

    Writes ``out_dir/images/shape_00000.png`` ..., ``out_dir/manifest.csv`` (columns
    ``image,caption,split,objects,word_objects``; ``objects``/``word_objects`` are
    JSON) and ``out_dir/shapes.json`` (the parameters).  Output is deterministic for a
    seed, whatever ``workers`` is.  If a manifest made with the same parameters
    exists, nothing is rewritten.

    Example:
        >>> manifest = generate_shapes("data/shapes", 6000)  # doctest: +SKIP
        >>> manifest.name  # doctest: +SKIP
        'manifest.csv'
    """
    spec = spec or ShapesSpec()
    if n_images < 1:
        raise ValueError(f"n_images must be positive, got {n_images}")
    out = Path(out_dir)
    manifest, params_path = out / "manifest.csv", out / "shapes.json"
    params = json.loads(
        json.dumps(
            {
                "version": spec.format_version,
                "n_images": n_images,
                "image_size": image_size,
                "min_objects": min_objects,
                "max_objects": max_objects,
                "seed": seed,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "spec": asdict(spec),
            }
        )
    )
    if manifest.exists() and _params_match(params_path, params):
        return manifest
    splits = assign_splits(n_images, seed, val_fraction, test_fraction)
    params_path.unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for old in (out / "images").glob("shape_*.png"):
        old.unlink()
    job = _Job(str(out), seed, image_size, min_objects, max_objects, spec)
    rows = _render_all(job, n_images, workers or min(os.cpu_count() or 1, 8))
    _write_manifest(manifest, rows, splits, spec.manifest_columns)
    params_path.write_text(json.dumps(params, indent=2), encoding="utf-8")
    return manifest


def read_manifest(manifest: str | os.PathLike) -> list[dict]:
    """Rows of a shapes manifest with ``objects``/``word_objects`` decoded and
    ``image`` made an absolute path string.

    Example:
        >>> rows = read_manifest("data/shapes/manifest.csv")  # doctest: +SKIP
        >>> rows[0]["objects"][0]["box"]  # doctest: +SKIP
        [10, 12, 40, 42]
    """
    root = Path(manifest).resolve().parent
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["image"] = str(root / row["image"])
        row["objects"] = json.loads(row["objects"])
        row["word_objects"] = json.loads(row["word_objects"])
    return rows
