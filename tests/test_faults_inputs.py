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


# ---- (b) Captioner.generate and the caption command --------------------------------------
@pytest.fixture(scope="module")
def cap(trained_run):
    from captioner.generate.captioner import Captioner

    return Captioner.load(trained_run)


def _mixed(corpus: list[Sample], good_images: list[Path]) -> list[str]:
    """The corpus with a good image after every 40 files."""
    paths: list[str] = []
    for i, s in enumerate(corpus):
        if i % 40 == 0:
            paths.append(str(good_images[(i // 40) % len(good_images)]))
        paths.append(str(s.path))
    return paths


def test_generate_skips_bad_files_and_keeps_good_captions(cap, corpus, good_images):
    paths = _mixed(corpus, good_images)
    gen = cap.generate(paths, on_error="skip")
    failed = dict(gen.failures)
    assert not set(failed) & set(gen.images)
    assert set(failed) | set(gen.images) == set(paths)
    for s in corpus:
        if s.bad is True:
            assert str(s.path) in failed and str(s.path) in str(failed[str(s.path)])
        if s.bad is False:
            assert str(s.path) in gen.images
    assert {str(p) for p in good_images} <= set(gen.images)
    alone = cap.generate(gen.images)  # the usable ones without their bad neighbours
    assert gen.texts == alone.texts and gen.tokens == alone.tokens
    for p in good_images:  # each one captioned on its own
        single = cap.generate([p])
        assert gen.texts[gen.images.index(str(p))] == single.texts[0]
    recs = gen.error_records()
    assert len(recs) == len(failed) and all(r["error"].startswith(r["reason"] + ": ")
                                            for r in recs)
    _summary("Captioner.generate(on_error='skip')", files=len(corpus), good=len(gen.images),
             skipped=len(failed), crashes=0)


def test_generate_raises_naming_the_file_by_default(cap, corpus, good_images):
    empty = next(s.path for s in corpus if s.kind == "empty")
    with pytest.raises(ImageError, match=re.escape(str(empty))) as info:
        cap.generate([good_images[0], empty])
    assert info.value.reason == "empty"
    with pytest.raises(ImageError, match="missing"):
        cap.generate([good_images[0], empty.parent / "no_such.png"])
    none = cap.generate([empty], on_error="skip")
    assert none.texts == [] and none.images == [] and len(none.failures) == 1
    with pytest.raises(ValueError, match="on_error"):
        cap.generate([good_images[0]], on_error="ignore")


def test_caption_command_reports_each_bad_file(trained_run, corpus, good_images, tmp_path,
                                               capsys, cap):
    from captioner.cli import main

    kinds = ("empty", "text_named_image", "huge_header", "random_bytes")
    bad = [next(s.path for s in corpus if s.kind == k) for k in kinds]
    paths = [str(good_images[0]), *map(str, bad), str(good_images[1])]
    assert main(["caption", "--run", str(trained_run), *paths, "--json"]) == 0
    out, err = capsys.readouterr()
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in recs] == paths
    assert [r["text"] for r in (recs[0], recs[-1])] == cap.generate(good_images[:2]).texts
    for p, r in zip(bad, recs[1:-1]):
        assert "text" not in r and r["error"]
        assert re.search(rf"captioner caption: skipped {re.escape(str(p))}: \w+: .+", err)
    assert "empty" in recs[1]["reason"] and recs[3]["reason"] == "too_large"
    assert "Traceback" not in err
    # --out CSV: an error column only when something failed
    assert main(["caption", "--run", str(trained_run), *paths,
                 "--out", str(tmp_path / "r.csv")]) == 0
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[0] == "image,text,score,tokens,error" and len(rows) == len(paths) + 1
    capsys.readouterr()
    # nothing usable: exit status 1, every file named
    assert main(["caption", "--run", str(trained_run), *map(str, bad)]) == 1
    _, err = capsys.readouterr()
    assert all(f"skipped {p}: " in err for p in bad)


# ---- (c) the exported SavedModel ---------------------------------------------------------
SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


def test_savedmodel_bad_bytes(exported_run, corpus, good_images, cap):
    import tensorflow as tf

    sig = tf.saved_model.load(str(exported_run)).signatures["serving_default"]
    good = good_images[0].read_bytes()
    want = cap.generate([good_images[0]]).texts[0]
    rejected, invalid, decoded = [], 0, 0
    for s in corpus:
        data = s.path.read_bytes()
        try:
            out = sig(images=tf.constant([good, data]))
        except tf.errors.InvalidArgumentError:  # the in-graph decoder refused the bytes
            rejected.append(s)
            continue
        valid = out["valid"].numpy().tolist()
        assert valid[0] and out["text"].numpy()[0].decode() == want
        if not data.startswith(SIGNATURES):
            assert valid[1] is False and out["text"].numpy()[1] == b""
            invalid += 1
        else:
            assert valid[1] is True
            decoded += 1
    assert all(s.bad is not False or not s.path.read_bytes().startswith(SIGNATURES)
               for s in rejected)  # valid images with a known signature always decode
    assert not any(not s.path.read_bytes().startswith(SIGNATURES) for s in rejected)
    again = sig(images=tf.constant([good]))  # the process goes on
    assert bool(again["valid"][0]) and again["text"].numpy()[0].decode() == want
    _summary("SavedModel serving_default", files=len(corpus), valid_false=invalid,
             decoded=decoded, invalid_argument_error=len(rejected), crashes=0)


# ---- (d) serve ---------------------------------------------------------------------------
def test_serve_answers_each_bad_file(trained_run, corpus, good_images):
    import httpx

    from captioner.serve.loadtest import free_port, start_server, stop_server

    port = free_port()
    proc = start_server(["--run", str(trained_run)], port, max_batch=8)
    url = f"http://127.0.0.1:{port}"
    errors = results = requests = 0
    try:
        with httpx.Client(timeout=120) as client:
            for start in range(0, len(corpus), 7):
                batch = corpus[start:start + 7]
                good = good_images[requests % len(good_images)]
                files = [("image", (good.name, good.read_bytes(), "image/png"))] + [
                    ("image", (s.path.name, s.path.read_bytes(), "application/octet-stream"))
                    for s in batch]
                r = client.post(f"{url}/v1/caption", files=files)
                requests += 1
                assert r.status_code == 200, (r.status_code, r.text[:500])
                got = r.json()["results"]
                assert len(got) == len(files) and "text" in got[0]
                for s, res in zip(batch, got[1:]):
                    assert res["image"] == s.path.name
                    if "error" in res:
                        assert s.bad is not False, res
                        assert s.path.name in res["error"]["message"]
                        errors += 1
                    else:
                        assert s.bad is not True and "text" in res
                        results += 1
            alone = client.post(f"{url}/v1/caption", files=[
                ("image", (s.path.name, s.path.read_bytes(), "image/png"))
                for s in corpus if s.kind == "huge_header"])
            assert 400 <= alone.status_code < 500 and alone.json()["error"]["code"]
            assert client.get(f"{url}/health").status_code == 200
    finally:
        stop_server(proc)
    _summary("serve", files=len(corpus), requests=requests, errors=errors, results=results,
             status_5xx=0, crashes=0)


# ---- text inputs -------------------------------------------------------------------------
def _write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def test_empty_caption_is_refused_with_file_and_line(tmp_path):
    m = _write(tmp_path / "m.csv", "image,caption\na.png,a dog\nb.png,   \n")
    with pytest.raises(DataError, match=re.escape(f"{m}:3: empty")):
        read_csv_manifest(m)


def test_missing_column_names_file_column_and_columns_found(tmp_path):
    m = _write(tmp_path / "m.csv", "image,text\na.png,a dog\n")
    with pytest.raises(DataError) as info:
        read_csv_manifest(m)
    msg = str(info.value)
    assert str(m) in msg and "'caption'" in msg and "columns: image, text" in msg


@pytest.mark.parametrize("fmt,name,data,line", [
    ("csv", "m.csv", b"image,caption\na.png,a dog\nb.png,caf\xe9 au lait\n", 3),
    ("jsonl", "m.jsonl", b'{"image": "a.png", "caption": "x"}\n{"image": "b\xff.png"}\n', 2),
    ("flickr8k", "Flickr8k.token.txt", b"a.jpg#0\tA dog\na.jpg#1\tA \x80 dog\n", 2),
    ("coco", "captions_val.json", b'{"annotations": [], "images": [], "x": "\xc3"}', 1),
])
def test_non_utf8_files_raise_data_error_naming_the_file(tmp_path, fmt, name, data, line):
    from captioner.data.formats import read_any

    path = _write(tmp_path / name, data)
    with pytest.raises(DataError, match=re.escape(f"{path}:{line}: not UTF-8")):
        read_any(fmt, path, images_dir=tmp_path)


def test_untokenizable_smiles_names_file_and_line(tmp_path, project_root, capsys):
    from captioner.cli import main
    from captioner.config import load_config
    from captioner.data.formats import read_records

    m = _write(tmp_path / "mols.csv", "image,caption\na.png,CCO\nb.png,C&C\nc.png,CCN\n")
    overrides = [*TINY_DATA, f"data.path={m}", "tokenizer.kind=smiles"]
    cfg = load_config(project_root / "configs" / "shapes.yaml", overrides)
    with pytest.raises(DataError, match=re.escape(f"{m}:3: cannot tokenize SMILES 'C&C'")):
        read_records(cfg.data, smiles_targets=True)
    args = ["train", "--config", str(project_root / "configs" / "shapes.yaml"),
            "--run-dir", str(tmp_path / "run")]
    assert main(args + [a for o in overrides for a in ("--set", o)]) == 2
    err = capsys.readouterr().err
    assert f"{m}:3: cannot tokenize SMILES" in err and "Traceback" not in err


TINY_DATA = ["data.format=csv", "data.split_by=image"]


def test_long_captions_are_truncated_and_counted(tiny_config, shapes_dir, trained_run, tmp_path):
    from dataclasses import replace

    from captioner.data.tokenizers import WordTokenizer
    from captioner.train.setup import prepare_data

    images = sorted((shapes_dir / "images").glob("*.png"))[:6]
    long, short = " ".join(["red"] * 30), "a red circle"
    records = {"train": [Record(str(p), long if i % 2 else short) for i, p in enumerate(images)],
               "val": [Record(str(images[0]), long)], "test": [Record(str(images[1]), short)]}
    cfg = replace(tiny_config, data=replace(tiny_config.data, max_length=8))
    tok = WordTokenizer().fit([long, short])
    logged: list[str] = []
    data = prepare_data(cfg, tmp_path, records, tok, None, logged.append)
    assert data.report.truncated == 3 and data.report.texts == 6
    assert "truncated 3 of 6 training texts to data.max_length=8" in logged
    assert data.report.count == 0


# ---- nothing executes code from data ------------------------------------------------------
UNSAFE = [
    (re.compile(r"\bpickle\b|\bcloudpickle\b|\bdill\b|\bmarshal\b|\bshelve\b"), "pickle-like"),
    (re.compile(r"yaml\.(unsafe_)?load\((?![^)]*SafeLoader)"), "yaml.load without SafeLoader"),
    (re.compile(r"(?<![\w.])(eval|exec)\("), "eval/exec"),
    (re.compile(r"safe_mode\s*=\s*False"), "safe_mode=False"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
]


def test_no_code_runs_from_data(project_root):
    found = []
    for path in sorted((project_root / "captioner").rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for pattern, what in UNSAFE:
                if pattern.search(line):
                    found.append(f"{path.relative_to(project_root)}:{number}: {what}: {line}")
    assert not found, "\n".join(found)


def test_report_escapes_paths_predictions_and_references(tmp_path):
    from captioner.viz.report import ReportItem, write_report

    evil = '<script>alert("x")</script>'
    item = ReportItem(f'img/{evil}".png', ["a", evil], np.ones((2, 4)) / 4, f'a {evil}"',
                      references=[f'ref {evil} "quoted"'], score=-1.0,
                      image=np.zeros((8, 8, 3), np.uint8))
    page = write_report([item], tmp_path / "r.html", (2, 2)).read_text()
    assert "<script>alert" not in page
    assert "alert(" in page  # the text is there, escaped
    assert html.escape(evil) in page or evil.replace("<", "\\u003c") in page \
        or "\\u003cscript" in page
