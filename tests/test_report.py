"""Tests for captioner.report (self-contained HTML attention report).

Pure-Python tests check the written file; the browser tests open the page in
headless Chromium with ``#selftest`` (the page then scripts token 0 -> ArrowRight
-> End/ArrowRight -> Escape -> click/click -> every sort option, and writes the
DOM state as JSON into ``<pre id="selftest">``), read it back with ``--dump-dom``
and take a screenshot.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from captioner.viz.figures import upsample_attention
from captioner.viz.molecules import DIFF_COLOUR
from captioner.viz.report import ReportItem, write_report

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=5000",
)
PEAKS = [(1, 5), (5, 1), (3, 3)]  # (row, col) of the attended cell of item 0's tokens


def _one_hot_rows(grid_hw: tuple[int, int], cells: list[tuple[int, int]]) -> np.ndarray:
    """(T, G) attention, each row peaking at one cell on a small uniform floor."""
    att = np.full((len(cells), grid_hw[0] * grid_hw[1]), 0.01, dtype=np.float32)  # (T, G)
    for t, (row, col) in enumerate(cells):
        att[t, row * grid_hw[1] + col] = 1.0
    return att / att.sum(axis=1, keepdims=True)


def _image(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth synthetic photo-like (H, W, 3) uint8 image."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, np.full_like(xx, 40 * seed)], -1)
    return base.astype(np.uint8)


def _items(grid_hw: tuple[int, int]) -> list[ReportItem]:
    """Four items: item 0 is 300x200 (non-square); bleu4 ties between items 0 and 3; item 1
    is a wrong SMILES prediction that another reader ("OSRA") read exactly."""
    g = grid_hw[0] * grid_hw[1]
    smiles = list("CC(=O)O")
    return [
        ReportItem("imgs/dog <1>.jpg", ["a", "<dog>", "runs"], _one_hot_rows(grid_hw, PEAKS),
                   "a <dog> runs", references=['a dog & "cat"', "a <dog> runs"], score=-1.0,
                   metrics={"bleu4": 0.5, "tanimoto": 0.9}, image=_image(200, 300, 0)),
        ReportItem("mols/m1.png", smiles, np.random.default_rng(1).random((len(smiles), g)),
                   "CC(=O)O", references=["CC(=O)OC"], score=-3.0,
                   metrics={"bleu4": 0.1}, image=_image(64, 64, 1),
                   others={"OSRA": "COC(C)=O"}),
        ReportItem("imgs/c.png", ["x"], np.ones((1, g)), "x", references=None, score=None,
                   metrics={"bleu4": 0.9, "tanimoto": 0.2}, image=_image(120, 90, 2)),
        ReportItem("imgs/d.png", ["y", "z"], np.ones((2, g)), "y z", references=["y"],
                   score=-2.0, metrics={"bleu4": 0.5, "exact_match": 0.0},
                   image=_image(50, 50, 3)),
    ]


def _write(tmp_path: Path, grid_hw=(7, 7), **kwargs) -> tuple[Path, str]:
    path = write_report(_items(grid_hw), tmp_path / "out" / "report.html", grid_hw, **kwargs)
    return path, path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- pure Python


def test_single_self_contained_file(tmp_path):
    path, page = _write(tmp_path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page.lower() and "https://" not in page.lower()
    assert "<link" not in page and "@import" not in page and "url(" not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 7 and all(s.startswith("data:image/") for s in srcs)
    # 4 pictures, then item 1's molecules: the model's, the reference's and OSRA's
    assert sum(s.startswith("data:image/svg+xml;base64,") for s in srcs) == 3
    assert page.count('<article class="item') == 4
    assert 'id="sort"' in page and 'class="legend"' in page and 'id="selftest"' in page


def test_escapes_predictions_references_and_names(tmp_path):
    _, page = _write(tmp_path, title="<my> report")
    for item in _items((7, 7)):
        assert html.escape(item.prediction) in page
        for ref in item.references or []:
            assert html.escape(ref) in page
    assert "a <dog> runs" not in page and "<dog>" not in page
    assert "&lt;my&gt; report" in page and "<my>" not in page
    assert "dog &lt;1&gt;.jpg" in page
    assert '<li class="ref hit">a &lt;dog&gt; runs</li>' in page  # prediction == reference


def test_embed_false_writes_report_files(tmp_path):
    path, page = _write(tmp_path, embed=False)
    files = sorted((path.parent / "report_files").iterdir())
    assert [f.name for f in files if f.suffix == ".svg"] == [
        "item_00001_model.svg", "item_00001_other0.svg", "item_00001_reference.svg"]
    pictures = [f for f in files if f.suffix != ".svg"]
    assert [f.stem for f in pictures] == [f"item_{i:05d}" for i in range(4)]
    assert "data:image/" not in page
    for f in files:
        assert f'src="report_files/{f.name}"' in page
    for f in pictures:
        assert Image.open(f).size[0] > 0
    assert HIGHLIGHT in (path.parent / "report_files" / "item_00001_reference.svg").read_text()


@pytest.mark.parametrize("grid_hw", [(7, 7), (8, 8)])
def test_grids_and_non_square_image(tmp_path, grid_hw):
    _, page = _write(tmp_path, grid_hw=grid_hw)
    cards = re.findall(r'<article[^>]*data-att="([^"]*)"', page)
    first = json.loads(html.unescape(cards[0]))
    assert len(first["q"]) == 3 and all(len(r) == grid_hw[0] * grid_hw[1] for r in first["q"])
    row, col = PEAKS[1]
    assert int(np.argmax(first["q"][1])) == row * grid_hw[1] + col
    assert max(first["q"][1]) == 1000
    # the 300x200 image keeps its aspect ratio and the canvas covers exactly the image box
    assert '<canvas class="overlay" width="296" height="197" hidden>' in page
    assert 'style="width:296px;height:197px"' in page
    assert f"{grid_hw[0]}×{grid_hw[1]} attention grid" in page


def test_rejects_bad_attention(tmp_path):
    item = _items((7, 7))[0]
    item.attention = item.attention[:2]  # 2 rows for 3 tokens
    with pytest.raises(ValueError, match="2 rows but 3 tokens"):
        write_report([item], tmp_path / "r.html", (7, 7))
    with pytest.raises(ValueError, match="G=49 cells but grid_hw=\\(8, 8\\)"):
        write_report(_items((7, 7)), tmp_path / "r.html", (8, 8))
    with pytest.raises(ValueError, match="grid_hw"):
        write_report(_items((7, 7)), tmp_path / "r.html", (0, 7))
    assert not (tmp_path / "r.html").exists()


def test_loads_image_path_and_resizes(tmp_path):
    img_path = tmp_path / "photo.png"
    Image.fromarray(_image(200, 300, 0)).save(img_path)
    item = ReportItem(str(img_path), ["a"], np.ones((1, 49)), "a", image=None)
    path = write_report([item], tmp_path / "r.html", (7, 7), image_size=150, embed=False)
    assert Image.open(path.parent / "report_files" / "item_00000.png").size == (150, 100)


def _sort_options(page: str) -> list[str]:
    (select,) = re.findall(r'<select id="sort">(.*?)</select>', page)
    return re.findall(r'<option value="([^"]*)"', select)


def test_sort_keys_and_values(tmp_path):
    _, page = _write(tmp_path)
    options = _sort_options(page)
    assert options[0] == "given"
    assert options[1:] == [f"{k}:{d}" for k in ("score", "bleu4", "tanimoto", "exact_match",
                                                "OSRA exact_match") for d in ("asc", "desc")]
    sorts = [json.loads(html.unescape(s)) for s in re.findall(r'data-sort="([^"]*)"', page)]
    assert sorts[2] == {"bleu4": 0.9, "tanimoto": 0.2}  # no score, so it sorts last on score
    _, page = _write(tmp_path, sortable_keys=["tanimoto"])
    assert _sort_options(page) == ["given", "tanimoto:asc", "tanimoto:desc"]


def test_many_items_stay_small(tmp_path):
    att = np.random.default_rng(0).random((6, 64))
    items = [ReportItem(f"i{i}.png", list("abcdef"), att, "abcdef", metrics={"m": i / 300},
                        image=_image(32, 32, i % 5)) for i in range(300)]
    path = write_report(items, tmp_path / "r.html", (8, 8))
    page = path.read_text(encoding="utf-8")
    assert page.count('<article class="item') == 300
    assert path.stat().st_size < 300 * 6000  # ~4 bytes per weight, no per-token images


def test_empty_report(tmp_path):
    page = write_report([], tmp_path / "r.html", (7, 7)).read_text(encoding="utf-8")
    assert "no items" in page and "<article" not in page


# --------------------------------------------------------------------------- SMILES cards

HIGHLIGHT = "#{:02X}{:02X}{:02X}".format(*(int(c * 255) for c in DIFF_COLOUR))


def _figures(page: str) -> list[tuple[str, str]]:
    """(class, inner HTML) of every molecule figure, in page order."""
    return re.findall(r'<figure class="mol ([^"]*)">(.*?)</figure>', page, re.S)


def _svg(fragment: str) -> str:
    """The SVG text of the one drawing in ``fragment``."""
    (data,) = re.findall(r'src="data:image/svg\+xml;base64,([^"]*)"', fragment)
    return base64.b64decode(data).decode("utf-8")


def test_smiles_card_draws_the_model_the_reference_and_other_readers(tmp_path):
    _, page = _write(tmp_path)
    figures = _figures(page)
    assert [cls for cls, _ in figures] == ["read differs", "reference", "other exact"]
    (_, model), (_, reference), (_, osra) = figures
    assert "≠ differs" in model and "1 atom and 1 bond in the reference" in model
    assert '<b class="who">OSRA</b>' in osra and "✓ exact" in osra
    assert '<code class="smi">COC(C)=O</code>' in osra
    # CC(=O)O lies wholly inside methyl acetate: only the reference's methyl is filled
    assert HIGHLIGHT not in _svg(model) and HIGHLIGHT in _svg(reference)
    assert HIGHLIGHT not in _svg(osra)
    for _, body in figures:
        assert _svg(body).startswith("<svg") and "<script" not in _svg(body)
    card = re.search(r'<article class="item smiles mols" data-index="1"[^>]*>', page).group(0)
    marks = json.loads(html.unescape(re.search(r'data-exact="([^"]*)"', card).group(1)))
    assert marks == {"model": 0, "others": {"OSRA": 1}}
    assert json.loads(html.unescape(re.search(r'data-sort="([^"]*)"', card).group(1)))[
        "OSRA exact_match"] == 1.0
    labels = re.findall(r'<select id="filter">(.*?)</select>', page)[0]
    assert re.findall(r">([^<]*)</option>", labels) == [
        "all", "model exact", "model not exact", "model exact, OSRA not",
        "OSRA exact, model not", "neither exact (model, OSRA)"]


def test_exact_smiles_card_draws_one_molecule(tmp_path):
    item = ReportItem("m.png", list("OCC"), np.ones((3, 4)), "OCC", references=["CCO"],
                      image=_image(32, 32, 0))
    page = write_report([item], tmp_path / "r.html", (2, 2)).read_text(encoding="utf-8")
    (cls, body), = _figures(page)
    assert cls == "read exact" and "✓ exact" in body and HIGHLIGHT not in _svg(body)


def test_invalid_smiles_prediction_shows_a_note_and_the_reference(tmp_path):
    item = ReportItem("m.png", list("C1CC"), np.ones((4, 4)), "C1CC", references=["CCO"],
                      image=_image(32, 32, 0))
    page = write_report([item], tmp_path / "r.html", (2, 2)).read_text(encoding="utf-8")
    (cls, body), (ref_cls, ref_body) = _figures(page)
    assert cls == "read invalid" and "not a valid molecule" in body and "<img" not in body
    assert ref_cls == "reference" and HIGHLIGHT not in _svg(ref_body)  # drawn plainly


def test_caption_cards_have_no_molecules(tmp_path):
    items = [it for i, it in enumerate(_items((7, 7))) if i != 1]
    page = write_report(items, tmp_path / "r.html", (7, 7)).read_text(encoding="utf-8")
    assert "<figure" not in page and "svg+xml" not in page and 'class="cols"' not in page
    assert " data-exact=" not in page and 'id="filter"' not in page
    assert page.count('<article class="item" ') == 3
    off = write_report(_items((7, 7)), tmp_path / "off.html", (7, 7), molecules=False)
    assert "<figure" not in off.read_text(encoding="utf-8")


def test_other_reader_names_and_smiles_are_escaped(tmp_path):
    evil = "<img src=x onerror=alert(1)>"
    item = ReportItem("m.png", ["C"], np.ones((1, 4)), "CCO", references=["CCN"],
                      others={evil: f'C"{evil}', "fine": "CCN"}, image=_image(32, 32, 0))
    page = write_report([item], tmp_path / "r.html", (2, 2)).read_text(encoding="utf-8")
    assert evil not in page and "onerror=alert(1)>" not in page
    assert f'<b class="who">{html.escape(evil)}</b>' in page
    assert [cls for cls, _ in _figures(page)] == ["read differs", "reference",
                                                   "other invalid", "other exact"]



def test_report_items_hand_other_readers_to_the_page(tmp_path):
    from captioner.data.tokenizers import Tokenizer
    from captioner.viz.attention import report_items  # imports TensorFlow

    tokenizer = Tokenizer.create("smiles").fit(["CCO", "CCN"])
    texts = ["CCN", "CCO"]
    ids = [tokenizer.encode(t, add_special=False) for t in texts]
    gen = SimpleNamespace(images=["a.png", "b.png"], tokens=ids, texts=texts,
                          scores=np.array([-1.0, -2.0]), attention=np.full((2, 3, 4), 0.25))
    others = [{"OSRA": "CCO"}, {"OSRA": "C1CC"}]
    cap = SimpleNamespace(tokenizer=tokenizer, crop_margin=None)
    items = report_items(cap, gen, [["CCO"], ["OCC"]], others=others)
    assert [item.others for item in items] == others
    for item in items:
        item.image = _image(32, 32, 0)
    page = write_report(items, tmp_path / "r.html", (2, 2)).read_text(encoding="utf-8")
    assert [cls for cls, _ in _figures(page)] == [
        "read differs", "reference", "other exact",  # we read CCN, OSRA got it
        "read exact", "other invalid"]  # we got it, OSRA's SMILES does not parse
    assert "OSRA exact_match:desc" in _sort_options(page)


# --------------------------------------------------------------------------- headless Chromium


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium/chromium-browser binary on PATH (apt-get install chromium)")


def _run_chromium(args: list[str], profile: Path) -> str:
    cmd = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="module", params=[(7, 7), (8, 8)], ids=["7x7", "8x8"])
def browser_page(request, tmp_path_factory):
    """(grid_hw, report path, self-test JSON read back from the DOM after the script ran)."""
    grid_hw = request.param
    tmp = tmp_path_factory.mktemp("report")
    path = write_report(_items(grid_hw), tmp / "report.html", grid_hw)
    dom = _run_chromium(["--dump-dom", f"{path.as_uri()}#selftest"], tmp / "profile")
    found = re.search(r'<pre id="selftest"[^>]*>(.*?)</pre>', dom, re.S)
    assert found and found.group(1), f"self-test did not run; DOM starts {dom[:300]!r}"
    return grid_hw, path, json.loads(html.unescape(found.group(1)))


def test_browser_token_navigation(browser_page):
    _, _, st = browser_page
    first, second = st["first"], st["second"]
    assert (first["active"], first["overlay"], first["pressed"]) == (0, 0, 1)
    assert (second["active"], second["overlay"], second["pressed"]) == (1, 1, 1)
    assert first["label"].startswith("token 1/3: a")
    assert second["label"].startswith("token 2/3: <dog>")  # textContent, unescaped
    assert st["end"] == 2  # End, then ArrowRight stops at the last token (no wrap)
    assert st["cleared"] == {"active": None, "overlay": None, "pressed": 0,
                             "label": "hover, click or focus a token"}
    assert (st["clicked"], st["unclicked"]) == (0, None)  # clicking the active token clears
    assert st["final"]["active"] == 1 and st["final"]["overlay"] == 1


def test_browser_canvas_matches_upsample_attention(browser_page):
    grid_hw, _, st = browser_page
    state = st["second"]
    width, height = state["size"]
    assert (width, height) == (296, 197)  # 300x200 image: the map spans its full box
    assert state["alphaPixels"] > 0.9 * width * height
    # smooth, not blocky: a nearest-neighbour map has at most G alpha levels (max 153 here)
    assert state["alphaLevels"] >= 100 > grid_hw[0] * grid_hw[1]
    row, col = PEAKS[1]
    x, y = state["peak"]
    assert col / grid_hw[1] <= x <= (col + 1) / grid_hw[1]
    assert row / grid_hw[0] <= y <= (row + 1) / grid_hw[0]
    heat = upsample_attention(_items(grid_hw)[0].attention[1], grid_hw, (height, width))
    expected = np.rint(0.6 * 255 * heat)[::7, ::7].ravel()  # STRIDE = 7 in the page script
    assert np.abs(np.array(state["sample"]) - expected).max() <= 2


def test_browser_sorting(browser_page):
    _, _, st = browser_page
    assert st["items"] == 4
    assert st["sorts"] == {
        "given": [0, 1, 2, 3],
        "score:asc": [1, 3, 0, 2], "score:desc": [0, 3, 1, 2],  # item 2 has no score
        "bleu4:asc": [1, 0, 3, 2], "bleu4:desc": [2, 0, 3, 1],  # ties keep given order
        "tanimoto:asc": [2, 0, 1, 3], "tanimoto:desc": [0, 2, 1, 3],
        "exact_match:asc": [3, 0, 1, 2], "exact_match:desc": [3, 0, 1, 2],
        "OSRA exact_match:asc": [1, 0, 2, 3], "OSRA exact_match:desc": [1, 0, 2, 3],
    }


def test_browser_filter_by_exact_readers(browser_page):
    _, _, st = browser_page
    assert st["filters"] == {
        "all": [0, 1, 2, 3], "model exact": [], "model not exact": [1],
        "model exact, OSRA not": [], "OSRA exact, model not": [1],
        "neither exact (model, OSRA)": [],
    }


def test_browser_screenshot(tmp_path):
    """Screenshot of the self-tested 7x7 page (token 1 of item 0 shown), kept in tmp_path."""
    path = write_report(_items((7, 7)), tmp_path / "report.html", (7, 7))
    shot = tmp_path / "report.png"
    _run_chromium([f"--screenshot={shot}", "--window-size=1200,900",
                   f"{path.as_uri()}#selftest"], tmp_path / "profile")
    assert shot.exists()
    with Image.open(shot) as img:
        assert img.size == (1200, 900)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50


def test_an_item_read_cut_to_its_ink_shows_the_cut(tmp_path):
    """A picture the model read cut to its ink is shown cut (the attention lies over the
    cut), with EXIF orientation applied as the model read it; otherwise whole."""
    from PIL import Image

    from captioner.viz.report import _load_rgb

    im = Image.new("RGB", (200, 100), "white")
    im.paste((0, 0, 0), (150, 20, 170, 60))
    im.save(tmp_path / "m.png")
    att = np.full((1, 4), 0.25)
    cut = _load_rgb(ReportItem(str(tmp_path / "m.png"), ["C"], att, "C", crop_margin=0.25))
    assert cut.shape == (60, 60, 3) and (cut[10:50, 20:40] == 0).all()
    whole = _load_rgb(ReportItem(str(tmp_path / "m.png"), ["C"], att, "C"))
    assert whole.shape == (100, 200, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the model reads it upright, 100 x 200
    im.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert _load_rgb(ReportItem(str(tmp_path / "r.jpg"), ["C"], att, "C")).shape == (200, 100, 3)
