"""Bad inputs: a seeded corpus of broken, hostile and odd image files fed through every
path that reads images (training-data loading, ``Captioner.generate`` and the ``caption``
command, the exported SavedModel, ``serve``), bad text inputs (manifests, captions,
SMILES), and checks that nothing executes code from data.

The fuzz tests print their counts (``pytest -s`` shows them).
"""

from __future__ import annotations

import html
import io
import json
import random
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data.images import ImageError, load_image, load_images
from captioner.data.manifests import DataError, LoadReport, Record, read_csv_manifest
from captioner.data.splits import build_split

SEED = 1234
SIZE = 32  # the TINY model's image size


# ---- the corpus --------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    path: Path
    kind: str
    bad: bool | None  # True: must be refused; False: must load; None: either (a cut file)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def huge_png(width: int, height: int) -> bytes:
    """A valid-looking PNG whose IHDR claims width x height (8-bit gray), with one row of
    pixel data: tiny on disk, a decompression bomb if trusted."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))  # one filtered row
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def make_corpus(folder: Path, good_png: Path, seed: int = SEED) -> list[Sample]:
    """Several hundred files, the same for a given seed."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = Image.open(good_png).convert("RGB").resize((64, 64))
    png, jpg = _encoded(base, "PNG"), _encoded(base, "JPEG", quality=90)
    out: list[Sample] = []

    def add(name: str, data: bytes, kind: str, bad: bool | None) -> None:
        path = folder / f"{len(out):04d}_{name}"
        path.write_bytes(data)
        out.append(Sample(path, kind, bad))

    for i in range(90):  # cut at random points
        add(f"cut{i}.png", png[:rng.randrange(1, len(png) - 1)], "truncated_png", None)
        add(f"cut{i}.jpg", jpg[:rng.randrange(1, len(jpg) - 1)], "truncated_jpeg", None)
    signatures = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"RIFF", b"II*\x00"]
    for i in range(50):
        noise = rng.randbytes(rng.randrange(1, 4000))
        add(f"noise{i}.{rng.choice(['png', 'jpg', 'gif', 'bin'])}",
            b"\x00" + noise if noise[:1] in (b"\x89", b"\xff", b"G", b"B", b"R", b"I", b"P")
            else noise, "random_bytes", True)
        sig = signatures[i % len(signatures)]
        add(f"signed_noise{i}.png", sig + rng.randbytes(rng.randrange(0, 4000)),
            "random_bytes_with_signature", True)
    for ext in ("png", "jpg", "jpeg", "gif", "bmp", "webp"):
        add(f"empty.{ext}", b"", "empty", True)
    for w, h in ((30000, 30000), (100000, 1000), (65535, 65535), (9000, 9000)):
        add(f"huge_{w}x{h}.png", huge_png(w, h), "huge_header", True)
    texts = ["hello", "<html><script>alert(1)</script></html>", "a,b,c\n1,2,3\n",
             json.dumps({"image": "x"}), "\u00e9\u00e8 unicode \U0001f600", " " * 100]
    for i, text in enumerate(texts):
        add(f"text{i}.jpg", text.encode(), "text_named_image", True)
        add(f"text{i}.png", text.encode(), "text_named_image", True)
    # valid images, odd modes and wrong names: all must load
    gray16 = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    odd = {"gray16.png": _encoded(gray16, "PNG"),
           "palette_transparent.png": _encoded(pal, "PNG", transparency=0),
           "cmyk.jpg": _encoded(base.convert("CMYK"), "JPEG"),
           "bilevel.png": _encoded(base.convert("1"), "PNG"),
           "la.png": _encoded(base.convert("LA"), "PNG"),
           "rgba.png": _encoded(base.convert("RGBA"), "PNG"),
           "gray.jpg": _encoded(base.convert("L"), "JPEG"),
           "tiny1x1.png": _encoded(base.resize((1, 1)), "PNG"),
           "wide.png": _encoded(base.resize((400, 3)), "PNG"),
           "anim.gif": _encoded(base.convert("P"), "GIF", save_all=True,
                                append_images=[base.convert("P").rotate(90)]),
           "bmp.bmp": _encoded(base, "BMP"),
           "png_named.jpg": png, "jpeg_named.png": jpg, "png_named.gif": png,
           "no_extension": png, "UPPER.PNG": png}
    for name, data in odd.items():
        add(name, data, "odd_but_valid", False)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shapes_dir, trained_run) -> list[Sample]:
    good = sorted((shapes_dir / "images").glob("*.png"))[0]  # trained_run made the data
    return make_corpus(tmp_path_factory.mktemp("fuzz"), good)


@pytest.fixture(scope="module")
def good_images(shapes_dir, trained_run) -> list[Path]:
    return sorted((shapes_dir / "images").glob("*.png"))[:4]


def _summary(name: str, **counts) -> None:
    print(f"\nfuzz[{name}] " + " ".join(f"{k}={v}" for k, v in counts.items()))


def test_corpus_is_deterministic_and_large(tmp_path, shapes_dir, corpus):
    again = make_corpus(tmp_path / "again", sorted((shapes_dir / "images").glob("*.png"))[0])
    assert [s.path.name for s in again] == [s.path.name for s in corpus]
    assert all(a.path.read_bytes() == b.path.read_bytes() for a, b in zip(again, corpus))
    assert len(corpus) >= 300
    assert max(s.path.stat().st_size for s in corpus if s.kind == "huge_header") < 200_000


# ---- (a) training-data loading -----------------------------------------------------------
def test_training_loading_lists_every_bad_file(corpus, good_images):
    paths = [str(p) for p in good_images] + [str(s.path) for s in corpus]
    images, ok, report = load_images(paths, SIZE, workers=2)
    reasons = dict(report.failures)
    assert images.shape == (int(ok.sum()), SIZE, SIZE, 3) and images.dtype == np.uint8
    assert ok[:len(good_images)].all()
    for s, good in zip(corpus, ok[len(good_images):]):
        if s.bad is True:
            assert not good, s
        if s.bad is False:
            assert good, (s, reasons.get(str(s.path)))
        if not good:
            assert reasons[str(s.path)].startswith("unreadable: "), s
    assert set(reasons) == {p for p, good in zip(paths, ok) if not good}
    by_reason: dict[str, int] = {}
    for r in reasons.values():
        key = r.split(": ")[1]
        by_reason[key] = by_reason.get(key, 0) + 1
    assert all(reasons[str(s.path)].startswith("unreadable: too_large: ")
               for s in corpus if s.kind == "huge_header")
    # build_split drops the pairs of unusable images and reports them
    records = [Record(p, "a red circle") for p in paths]
    rep = LoadReport()
    split = build_split(records, SIZE, workers=2, report=rep)
    assert split.num_images == int(ok.sum()) and rep.count == len(reasons)
    _summary("load_images", files=len(corpus), refused=len(reasons), loaded=int(ok.sum())
             - len(good_images), crashes=0, **by_reason)


def test_load_image_raises_only_image_error(corpus):
    for s in corpus:
        try:
            arr = load_image(s.path.read_bytes(), SIZE)  # bytes, as serve reads them
            assert arr.shape == (SIZE, SIZE, 3)
        except ImageError as exc:
            assert exc.reason in ("empty", "not_an_image", "truncated", "too_large",
                                  "unreadable")
