"""SavedModel export: loads without captioner, same texts as Captioner, bad bytes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from captioner.generate.captioner import Captioner
from captioner.generate.export import decode_images, export_run, next_version

from .conftest import call_cli

# Runs in a fresh interpreter where ``import captioner`` fails: the SavedModel must need
# nothing but TensorFlow.
LOAD_WITHOUT_CAPTIONER = r"""
import json, sys
sys.modules["captioner"] = None  # any import of captioner now raises ImportError
import tensorflow as tf
try:
    import captioner  # noqa: F401
    raise SystemExit("captioner was importable")
except ImportError:
    pass
m = tf.saved_model.load(sys.argv[1])
data = [open(p, "rb").read() for p in sys.argv[2:]] + [b"definitely not an image", b""]
out = {}
for sig in ("serving_default", "serving_beam"):
    r = m.signatures[sig](images=tf.constant(data))
    out[sig] = {k: v.numpy().tolist() for k, v in r.items() if k not in ("text", "token_text")}
    out[sig]["text"] = [t.decode() for t in r["text"].numpy()]
    out[sig]["token_text"] = [[t.decode() for t in row] for row in r["token_text"].numpy()]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def exported(exported_run) -> Path:
    return exported_run


@pytest.fixture(scope="module")
def cap(trained_run) -> Captioner:
    return Captioner.load(trained_run)


@pytest.fixture(scope="module")
def images(shapes_dir) -> list[Path]:
    return sorted((shapes_dir / "images").glob("*.png"))[:6]


def test_versioned_layout_and_signatures(exported):
    assert exported.name == "1" and (exported / "saved_model.pb").is_file()
    assert next_version(exported.parent) == 2
    cli = Path(sys.executable).with_name("saved_model_cli")
    shown = subprocess.run([str(cli), "show", "--dir", str(exported), "--all"],
                           capture_output=True, text=True, check=True).stdout
    for name in ("serving_default", "serving_beam", "serving_pixels", "token_scores",
                 "token_text", "attention"):
        assert name in shown


def test_loads_without_captioner_and_matches_caption(exported, cap, images):
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_CAPTIONER, str(exported),
                           *map(str, images)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    greedy, beam = out["serving_default"], out["serving_beam"]
    n = len(images)
    gen = cap.generate(images)
    assert greedy["text"][:n] == gen.texts
    assert greedy["valid"] == [True] * n + [False, False]
    assert greedy["text"][n:] == ["", ""] and greedy["length"][n:] == [0, 0]
    np.testing.assert_allclose(greedy["score"][:n], gen.scores, rtol=1e-4, atol=1e-4)
    for i in range(n):
        length = greedy["length"][i]
        tokens = greedy["tokens"][i][:length]
        assert tokens[:len(gen.tokens[i])] == gen.tokens[i]
        words = cap.tokenizer.ids_to_tokens(gen.tokens[i])
        assert greedy["token_text"][i][:len(words)] == words
        assert not any(greedy["token_text"][i][len(words):])
        np.testing.assert_allclose(sum(greedy["token_scores"][i]), greedy["score"][i],
                                   rtol=1e-4, atol=1e-4)
        att = np.array(greedy["attention"][i])  # (T, G)
        np.testing.assert_allclose(att[:length].sum(-1), 1.0, atol=1e-4)
        assert np.all(att[length:] == 0)
    beam_gen = cap.generate(images, strategy="beam", beam_size=3, n_best=1)
    assert beam["text"][:n] == beam_gen.texts


def test_other_modes_and_formats_decode_like_pillow(exported, cap, images, tmp_path):
    """RGBA (composited on white), grayscale and a lossless resize give the texts
    ``captioner caption`` gives on the same files."""
    base = np.asarray(Image.open(images[0]).convert("RGB"))
    rgba = np.dstack([base, np.full(base.shape[:2], 255, np.uint8)])
    rgba[:4, :4, 3] = 0  # a transparent corner: white after compositing
    files = {"rgba.png": Image.fromarray(rgba, "RGBA"),
             "gray.png": Image.fromarray(base).convert("L"),
             "big.png": Image.fromarray(base).resize((base.shape[1] * 2,) * 2,
                                                     Image.Resampling.NEAREST)}
    paths = []
    for name, im in files.items():
        im.save(tmp_path / name)
        paths.append(tmp_path / name)
    m = tf.saved_model.load(str(exported))
    data = tf.constant([p.read_bytes() for p in paths])
    texts = [t.decode() for t in m.signatures["serving_default"](images=data)["text"].numpy()]
    assert texts == cap.generate(paths).texts
    size = cap.image_size
    pixels, valid = decode_images(data, size)
    assert pixels.shape == (3, size, size, 3) and bool(tf.reduce_all(valid))
    assert np.all(pixels.numpy()[0, :2, :2] == 255)  # transparent corner composited on white


def test_pixels_signature_resizes_any_size(exported, cap, images):
    m = tf.saved_model.load(str(exported))
    arr = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in images[:2]])
    out = m.signatures["serving_pixels"](pixels=tf.constant(arr))
    assert [t.decode() for t in out["text"].numpy()] == cap.generate(images[:2]).texts
    odd = tf.constant(np.zeros((1, 45, 70, 3), np.uint8))
    assert m.signatures["serving_pixels"](pixels=odd)["attention"].shape[-1] == 64


def test_truncated_image_fails_the_call_and_the_process_goes_on(exported, images):
    m = tf.saved_model.load(str(exported))
    whole = images[0].read_bytes()
    with pytest.raises(tf.errors.InvalidArgumentError):
        m.signatures["serving_default"](images=tf.constant([whole[: len(whole) // 2]]))
    again = m.signatures["serving_default"](images=tf.constant([whole]))
    assert bool(again["valid"][0])


def test_jpeg_bytes_are_decoded(exported, images):
    m = tf.saved_model.load(str(exported))
    buf = io.BytesIO()
    Image.open(images[0]).convert("RGB").save(buf, format="JPEG", quality=95)
    out = m.signatures["serving_default"](images=tf.constant([buf.getvalue()]))
    assert bool(out["valid"][0]) and out["tokens"].shape[0] == 1


def test_existing_version_is_refused(trained_run, exported):
    with pytest.raises(FileExistsError, match="exists"):
        export_run(trained_run, exported.parent, version=1)


def test_export_command_writes_the_next_version_that_cuts_pictures(trained_run, exported,
                                                                   tmp_path):
    """``export --crop-margin 0.1`` (a run that reads whole pictures) writes byte
    signatures that cut each picture in the graph (the same texts as ``caption`` with that
    margin), says so in the metadata, and the server reads it back; an export without it
    reads whole pictures."""
    from captioner.serve.backends import ExportBackend

    out = tmp_path / "cli_export"
    (out / "4").mkdir(parents=True)  # an older version already there
    r = call_cli("export", "--run", trained_run, "--out", out, "--beam-size", "2",
                 "--max-length", "5", "--crop-margin", "0.1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert str(out / "5") in r.stdout and (out / "5" / "saved_model.pb").is_file()
    backend = ExportBackend(out / "5")  # reads the margin back from the metadata
    assert backend.crop_margin == 0.1
    m = backend.model
    meta = {k: int(v) for k, v in m.metadata().items()}
    assert meta["beam_size"] == 2 and meta["max_length"] == 5 and meta["grid_height"] == 8
    assert meta["crop_margin_permille"] == 100
    paths = []
    for i, (x, y) in enumerate([(5, 5), (60, 10), (20, 70)]):  # small shapes, off centre
        im = Image.new("RGB", (100, 90), "white")
        im.paste((200, 30, 30), (x, y, x + 14, y + 12))
        im.paste((30, 30, 200), (x + 8, y + 14, x + 20, y + 20))
        im.save(tmp_path / f"off{i}.png")
        paths.append(tmp_path / f"off{i}.png")
    data = tf.constant([p.read_bytes() for p in paths])
    texts = [t.decode() for t in m.signatures["serving_default"](images=data)["text"].numpy()]
    cut = Captioner.load(trained_run, crop_margin=0.1)
    assert texts == cut.generate(paths, max_length=5).texts
    pixels, _ = decode_images(data, cut.image_size, 0.1)
    assert not np.array_equal(pixels.numpy(), decode_images(data, cut.image_size)[0].numpy())
    whole = ExportBackend(exported, crop_margin=0.2)  # given: overrides the metadata's
    assert whole.crop_margin == 0.2 and int(whole.model.metadata()["crop_margin_permille"]) == -1


def test_cut_to_ink_in_the_graph_is_pillows_cut():
    """``cut_to_ink`` (TensorFlow ops) gives the very pixels of
    ``data.images.crop_to_ink`` (Pillow): drawings, ink at the edges, colour, no ink."""
    from captioner.data.images import crop_to_ink
    from captioner.generate.export import cut_to_ink

    rng = np.random.default_rng(0)
    pictures = []
    for i in range(12):
        height, width = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        im = np.full((height, width, 3), 255, np.uint8)
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        y1, x1 = int(rng.integers(y0, height)) + 1, int(rng.integers(x0, width)) + 1
        im[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3)) if i % 2 else 0
        pictures.append(im)
    pictures.append(np.full((10, 30, 3), 255, np.uint8))  # no ink: unchanged
    grey = np.full((16, 16, 3), 255, np.uint8)
    grey[5, 5] = (200, 200, 190)  # Pillow's grey level 199: ink
    grey[9, 9] = (200, 200, 200)  # 200: not ink
    pictures.append(grey)
    for im in pictures:
        for margin in (0.0, 0.15, 0.3):
            expected = np.asarray(crop_to_ink(Image.fromarray(im), margin))
            got = cut_to_ink(tf.constant(im), margin).numpy()
            assert got.shape == expected.shape and np.array_equal(got, expected), margin
    assert cut_to_ink(tf.constant(grey), 0.0).shape == (1, 1, 3)
