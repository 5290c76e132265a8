"""Self-contained HTML attention report: one card per example, one chip per token.

``write_report`` writes ONE HTML file (inline CSS and JavaScript, no external
requests) showing, for every example, the image, the prediction, the references
and the per-example metrics. Each token of the prediction is a focusable chip;
hovering, clicking or focusing it shows that token's attention map over the image.

Rendering choice: the maps are drawn in the browser on a ``<canvas>`` laid over
the ``<img>`` (option "b"). Each item stores its (T, G) attention as JSON (per row:
integers 0..1000 relative to the row maximum, plus the row maximum), and a map is
drawn only when its token becomes active. The script upsamples the gh x gw grid to
the canvas size with the same separable bicubic filter PIL uses (kernel a = -0.5,
pixel-centre aligned, truncated and renormalised at the borders), clips negatives
and scales to max 1, i.e. it reproduces ``visualize.upsample_attention`` (smoother
than bilinear, which shows diamond-shaped ridges at 40 px per cell; the test checks
the canvas against ``upsample_attention``). It colours with the 256-entry table of
``visualize.jet_colormap`` and blends with per-pixel alpha ``opacity * m`` exactly
as ``visualize.overlay_attention`` blends. The canvas always covers the whole
displayed image, so the map stretches over the full width and height of any aspect
ratio (the backbone saw the image resized to a square). This keeps pages small
(about 4 bytes per weight instead of one PNG per token) for large evaluation sets.

Interaction: hover previews a token; click or focus pins it; clicking the pinned
token again or pressing Escape shows the plain image; ArrowRight / ArrowLeft step
to the next / previous token of the current item and STOP at the ends (no wrap);
Home / End jump to the first / last token. A ``<select id="sort">`` orders the
cards by score or any numeric metric, ascending or descending (items missing the
value sort last); the default is the given order. An opacity slider re-blends maps.

DOM state (for tests): the card ``.item`` has ``data-active-token="i"`` while a
map is shown (absent otherwise), the ``canvas.overlay`` has ``data-token="i"`` and
is ``hidden`` when no map is shown, and ``.token-label`` names the active token.
Opening the page with ``#selftest`` runs a scripted check and writes its result as
JSON into ``<pre id="selftest">`` (see ``tests/test_report.py``).

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> item = ReportItem("a.png", ["a", "cat"], np.full((2, 49), 1 / 49), "a cat",
    ...                   references=["a cat"], metrics={"bleu4": 1.0},
    ...                   image=np.zeros((32, 48, 3), np.uint8))
    >>> out = write_report([item], pathlib.Path(tempfile.mkdtemp()) / "r.html", (7, 7))
    >>> "a cat" in out.read_text()
    True
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from captioner.viz.figures import _as_rgb_uint8, _check_hw, jet_colormap

__all__ = ["ReportItem", "write_report"]


@dataclass(frozen=True)
class _ReportLayout:
    """Fixed sizes of the page (immutable).

    ``stage_max_w`` x ``stage_max_h`` is the displayed image box in CSS px (the card is a
    little wider); attention rows are stored as ints 0..``quant`` relative to the row max.

    Example:
        >>> _ReportLayout().quant
        1000
    """

    stage_max_w: int = 296
    stage_max_h: int = 370
    quant: int = 1000


@dataclass(eq=False)
class ReportItem:
    """One example of the report.

    ``attention`` is (len(tokens), G) with G = gh * gw (row-major grid cells).
    ``image`` (uint8 (H, W, 3)) is shown when given, else ``image_path`` is loaded.

    Example:
        >>> import numpy as np
        >>> ReportItem("x.png", ["C", "O"], np.zeros((2, 64)), "CO").metrics
        {}
    """

    image_path: str
    tokens: list[str]
    attention: np.ndarray
    prediction: str
    references: list[str] | None = None
    score: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    image: np.ndarray | None = None


# --------------------------------------------------------------------------- data helpers


def _finite(value: object) -> float | None:
    """``value`` as a float if it is a finite number, else None.

    Example:
        >>> _finite(0.5), _finite(float("nan")), _finite("x"), _finite(True)
        (0.5, None, None, 1.0)
    """
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def _sort_values(item: ReportItem, keys: Sequence[str]) -> dict[str, float]:
    """The finite numeric values of ``keys`` for one item ("score" = ``item.score``).

    Example:
        >>> import numpy as np
        >>> it = ReportItem("x", [], np.zeros((0, 4)), "", score=-1.5, metrics={"b": 2})
        >>> _sort_values(it, ["score", "b", "c"])
        {'score': -1.5, 'b': 2.0}
    """
    values = {}
    for key in keys:
        raw = item.score if key == "score" and item.score is not None else item.metrics.get(key)
        number = _finite(raw)
        if number is not None:
            values[key] = number
    return values


def _default_sort_keys(items: Sequence[ReportItem]) -> list[str]:
    """"score" (if any item has one) then every numeric metric key, first-seen order.

    Example:
        >>> import numpy as np
        >>> a = ReportItem("x", [], np.zeros((0, 4)), "", metrics={"bleu4": 0.1, "note": "?"})
        >>> b = ReportItem("y", [], np.zeros((0, 4)), "", score=0.3, metrics={"tanimoto": 1})
        >>> _default_sort_keys([a, b])
        ['score', 'bleu4', 'tanimoto']
    """
    keys = ["score"] if any(_finite(it.score) is not None for it in items) else []
    for item in items:
        for key, value in item.metrics.items():
            if key not in keys and _finite(value) is not None:
                keys.append(key)
    return keys


def _check_attention(item: ReportItem, index: int, grid_hw: tuple[int, int]) -> np.ndarray:
    """Validate ``item.attention`` as (len(tokens), gh * gw); return it as float32.

    Example:
        >>> import numpy as np
        >>> it = ReportItem("x", ["a"], np.zeros((1, 49)), "a")
        >>> _check_attention(it, 0, (7, 7)).shape
        (1, 49)
        >>> _check_attention(it, 0, (8, 8))
        Traceback (most recent call last):
        ValueError: item 0: attention has G=49 cells but grid_hw=(8, 8) needs 64
    """
    att = np.asarray(item.attention, dtype=np.float32)  # (T, G)
    if att.ndim != 2:
        raise ValueError(f"item {index}: attention must be (T, G), got shape {att.shape}")
    if att.shape[0] != len(item.tokens):
        raise ValueError(
            f"item {index}: attention has {att.shape[0]} rows but {len(item.tokens)} tokens"
        )
    if att.shape[1] != grid_hw[0] * grid_hw[1]:
        raise ValueError(
            f"item {index}: attention has G={att.shape[1]} cells but grid_hw={grid_hw} "
            f"needs {grid_hw[0] * grid_hw[1]}"
        )
    return att


def _attention_json(att: np.ndarray) -> str:
    """Compact JSON of a (T, G) matrix: rows as ints 0..1000 of the row max, plus maxima.

    NaN and negative weights count as 0 (as in ``visualize.upsample_attention``).

    Example:
        >>> import numpy as np
        >>> _attention_json(np.array([[0.1, 0.4], [0.0, 0.0]]))
        '{"q":[[250,1000],[0,0]],"p":[0.4,0]}'
    """
    clean = np.clip(np.nan_to_num(att.astype(np.float64)), 0.0, None)  # (T, G)
    peaks = clean.max(axis=1) if clean.size else np.zeros(len(clean))  # (T,)
    safe = np.where(peaks > 0, peaks, 1.0)[:, None]  # (T, 1)
    quant = np.rint(clean / safe * _ReportLayout().quant).astype(int)  # (T, G)
    maxima = [float(f"{p:.4g}") if p > 0 else 0 for p in peaks]
    return json.dumps({"q": quant.tolist(), "p": maxima}, separators=(",", ":"))


# --------------------------------------------------------------------------- images


def _load_rgb(item: ReportItem) -> np.ndarray:
    """The item's pixels as (H, W, 3) uint8 (``item.image`` or the file at ``image_path``).

    Example:
        >>> import numpy as np
        >>> it = ReportItem("x", [], np.zeros((0, 4)), "", image=np.zeros((5, 6), np.uint8))
        >>> _load_rgb(it).shape
        (5, 6, 3)
    """
    if item.image is not None:
        return _as_rgb_uint8(item.image)
    with Image.open(item.image_path) as img:
        return np.asarray(img.convert("RGB"))


def _resize(rgb: np.ndarray, image_size: int | tuple[int, int] | None) -> np.ndarray:
    """Resize for embedding: int = shrink so the longer side <= it, (h, w) = exact size.

    Example:
        >>> import numpy as np
        >>> _resize(np.zeros((200, 300, 3), np.uint8), 150).shape
        (100, 150, 3)
        >>> _resize(np.zeros((200, 300, 3), np.uint8), (64, 64)).shape
        (64, 64, 3)
    """
    if image_size is None:
        return rgb
    height, width = rgb.shape[:2]
    if isinstance(image_size, int):
        scale = min(1.0, image_size / max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
    else:
        out_h, out_w = _check_hw(image_size, "image_size")
        size = (out_w, out_h)
    if size == (width, height):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


def _encode(rgb: np.ndarray) -> tuple[bytes, str]:
    """Encode pixels as PNG, or as JPEG when that is under half the PNG size (photos).

    Returns (bytes, file extension). Line drawings such as molecules stay lossless.

    Example:
        >>> import numpy as np
        >>> _encode(np.zeros((8, 8, 3), np.uint8))[1]
        'png'
    """
    img = Image.fromarray(rgb)
    png, jpeg = io.BytesIO(), io.BytesIO()
    img.save(png, format="PNG", optimize=True)
    img.save(jpeg, format="JPEG", quality=88)
    if len(jpeg.getvalue()) * 2 < len(png.getvalue()):
        return jpeg.getvalue(), "jpg"
    return png.getvalue(), "png"


def _image_src(data: bytes, ext: str, index: int, files_dir: Path | None) -> str:
    """A data URI (``files_dir`` None) or the relative path of a file written there.

    Example:
        >>> _image_src(b"xy", "png", 0, None)
        'data:image/png;base64,eHk='
    """
    if files_dir is None:
        mime = "jpeg" if ext == "jpg" else ext
        return f"data:image/{mime};base64,{base64.b64encode(data).decode('ascii')}"
    name = f"item_{index:05d}.{ext}"
    (files_dir / name).write_bytes(data)
    return f"{files_dir.name}/{name}"


def _stage_size(height: int, width: int) -> tuple[int, int]:
    """Displayed (w, h) in CSS px: fit inside the stage box, keeping the aspect ratio.

    Example:
        >>> _stage_size(200, 300)
        (296, 197)
        >>> _stage_size(64, 64)
        (296, 296)
    """
    layout = _ReportLayout()
    scale = min(layout.stage_max_w / width, layout.stage_max_h / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


# --------------------------------------------------------------------------- HTML pieces


def _fmt(value: object) -> str:
    """Short display form of a metric value.

    Example:
        >>> _fmt(0.53125), _fmt(1.0), _fmt(-0.0), _fmt(None), _fmt("n/a")
        ('0.531', '1', '0', '–', 'n/a')
    """
    number = _finite(value)
    if number is not None:
        return f"{number + 0.0:.3g}"  # + 0.0 turns -0.0 into 0.0
    return "–" if value is None else str(value)


def _looks_like_smiles(text: str) -> bool:
    """True for a single whitespace-free string of SMILES characters with structure.

    Example:
        >>> _looks_like_smiles("CC(=O)O"), _looks_like_smiles("a dog runs")
        (True, False)
    """
    if not text or re.search(r"\s", text):
        return False
    if not re.fullmatch(r"[A-Za-z0-9@+\-\[\]()=#$/\\%.:*~]+", text):
        return False
    return bool(re.search(r"[0-9()\[\]=#@+/\\]|[A-Z]", text))


def _token_chips(tokens: Sequence[str]) -> str:
    """The focusable token buttons of one card.

    Example:
        >>> _token_chips(["<a>"])
        '<button type="button" class="tok" data-i="0" aria-pressed="false">&lt;a&gt;</button>'
    """
    chips = []
    for i, token in enumerate(tokens):
        text = html.escape(token) if token.strip() else "␣"
        chips.append(
            f'<button type="button" class="tok" data-i="{i}" aria-pressed="false">{text}</button>'
        )
    return "".join(chips)


def _metrics_html(item: ReportItem) -> str:
    """Score and metric pills of one card (empty string if there are none).

    Example:
        >>> import numpy as np
        >>> _metrics_html(ReportItem("x", [], np.zeros((0, 4)), "", metrics={"bleu4": 0.25}))
        '<div class="metrics"><span class="metric" data-key="bleu4">bleu4 <b>0.25</b></span></div>'
    """
    pairs = ([("score", item.score)] if item.score is not None else []) + list(
        item.metrics.items()
    )
    if not pairs:
        return ""
    pills = "".join(
        f'<span class="metric" data-key="{html.escape(str(k))}">'
        f"{html.escape(str(k))} <b>{html.escape(_fmt(v))}</b></span>"
        for k, v in pairs
    )
    return f'<div class="metrics">{pills}</div>'


def _references_html(item: ReportItem) -> str:
    """The references list of one card (empty string when unknown).

    Example:
        >>> import numpy as np
        >>> _references_html(ReportItem("x", [], np.zeros((0, 4)), "", references=["a & b"]))
        '<ol class="refs" title="references"><li class="ref">a &amp; b</li></ol>'
    """
    if item.references is None:
        return ""
    refs = "".join(
        f'<li class="ref{" hit" if ref.strip() == item.prediction.strip() else ""}">'
        f"{html.escape(ref)}</li>"
        for ref in item.references
    )
    return f'<ol class="refs" title="references">{refs}</ol>'


def _card_html(
    item: ReportItem, index: int, src: str, shape: tuple[int, int], att: np.ndarray,
    sort_keys: Sequence[str],
) -> str:
    """One ``<article class="item">`` card.

    Example:
        >>> import numpy as np
        >>> it = ReportItem("d/x.png", ["a"], np.ones((1, 4)), "a")
        >>> _card_html(it, 3, "x.png", (20, 10), it.attention, []).startswith('<article')
        True
    """
    width, height = _stage_size(*shape)
    kind = " smiles" if _looks_like_smiles(item.prediction) else ""
    sort_json = json.dumps(_sort_values(item, sort_keys), separators=(",", ":"))
    name = html.escape(Path(item.image_path).name or item.image_path or f"item {index}")
    return (
        f'<article class="item{kind}" data-index="{index}" '
        f'data-sort="{html.escape(sort_json)}" data-att="{html.escape(_attention_json(att))}">'
        f'<header class="card-head"><span class="idx">#{index}</span>'
        f'<span class="name" title="{html.escape(item.image_path)}">{name}</span></header>'
        f'<div class="stage" style="width:{width}px;height:{height}px">'
        f'<img src="{html.escape(src)}" alt="{name}" width="{width}" height="{height}" '
        f'loading="lazy" decoding="async">'
        f'<canvas class="overlay" width="{width}" height="{height}" hidden></canvas></div>'
        f'<div class="token-label" aria-live="polite">hover, click or focus a token</div>'
        f'<div class="tokens" role="group" aria-label="predicted tokens">'
        f"{_token_chips(item.tokens)}</div>"
        f'<div class="pred" title="prediction">{html.escape(item.prediction)}</div>'
        f"{_references_html(item)}{_metrics_html(item)}</article>"
    )


def _sort_options(keys: Sequence[str]) -> str:
    """``<option>`` elements: given order, then each key ascending and descending.

    Example:
        >>> _sort_options(["bleu4"]).count("<option")
        3
    """
    options = ['<option value="given" selected>given order</option>']
    for key in keys:
        safe = html.escape(key)
        options.append(f'<option value="{safe}:asc">{safe} ↑ (lowest first)</option>')
        options.append(f'<option value="{safe}:desc">{safe} ↓ (highest first)</option>')
    return "".join(options)


def _legend_gradient() -> str:
    """CSS ``linear-gradient`` of ``jet_colormap`` (11 stops) for the legend.

    Example:
        >>> _legend_gradient().startswith("linear-gradient(90deg, rgb(0,0,128) 0%")
        True
    """
    stops = np.linspace(0.0, 1.0, 11)
    rgb = np.rint(jet_colormap(stops) * 255).astype(int)  # (11, 3)
    parts = [f"rgb({r},{g},{b}) {round(s * 100)}%" for (r, g, b), s in zip(rgb.tolist(), stops)]
    return "linear-gradient(90deg, " + ", ".join(parts) + ")"


def _config_json(grid_hw: tuple[int, int], alpha: float) -> str:
    """The page config: grid size, default opacity and the 256-colour jet lookup table.

    Example:
        >>> json.loads(_config_json((7, 7), 0.6))["lut"][:3]
        [0, 0, 128]
    """
    lut = np.rint(jet_colormap(np.linspace(0.0, 1.0, 256)) * 255).astype(int)  # (256, 3)
    config = {"grid": list(grid_hw), "alpha": alpha, "lut": lut.reshape(-1).tolist()}
    return json.dumps(config, separators=(",", ":"))


# --------------------------------------------------------------------------- templates


def _page_css() -> str:
    """Inline stylesheet of the report.

    Example:
        >>> "tok.active" in _page_css()
        True
    """
    return """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
  background:#eef1f5;color:#1c2330}
.bar{position:sticky;top:0;z-index:5;display:flex;flex-wrap:wrap;align-items:center;gap:10px 22px;
  padding:10px 20px;background:#fff;border-bottom:1px solid #d8dee8;
  box-shadow:0 1px 4px rgba(0,0,0,.06)}
.bar h1{font-size:18px;margin:0 8px 0 0;font-weight:650}
.bar label{display:flex;align-items:center;gap:6px;color:#4a5568;font-size:13px}
.bar select{font:inherit;padding:3px 6px;border:1px solid #c5cdd9;border-radius:6px;background:#fff}
.count,.help{color:#6b7588;font-size:12.5px}
.legend{display:flex;align-items:center;gap:6px;font-size:12px;color:#6b7588}
.legend .ramp{width:150px;height:11px;border-radius:3px;border:1px solid #c5cdd9}
kbd{font:11px ui-monospace,monospace;border:1px solid #c5cdd9;border-bottom-width:2px;
  border-radius:4px;padding:0 4px;background:#f7f9fb}
#cards{display:grid;grid-template-columns:repeat(auto-fill,324px);gap:16px;
  padding:16px 20px 40px;justify-content:center}
.item{background:#fff;border-radius:10px;padding:12px 13px;display:flex;flex-direction:column;
  gap:7px;box-shadow:0 1px 3px rgba(20,30,50,.12);border:2px solid transparent;min-width:0}
.item[data-active-token]{border-color:#8fb5f5}
.card-head{display:flex;gap:8px;align-items:baseline;font-size:12px;color:#6b7588;min-width:0}
.card-head .idx{font-weight:700;color:#3d4757}
.card-head .name{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.stage{position:relative;margin:0 auto;border-radius:6px;overflow:hidden;background:#dde2ea;
  max-width:100%;outline:1px solid #e2e6ee}
.stage img,.stage canvas{position:absolute;left:0;top:0;width:100%;height:100%;display:block}
.stage canvas[hidden]{display:none}
.token-label{font-size:12.5px;color:#6b7588;min-height:1.45em}
.token-label b{color:#1f5fd1;font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace}
.tokens{display:flex;flex-wrap:wrap;gap:4px}
.tok{font:13px/1.5 ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;color:#24324a;
  background:#eef3fb;border:1px solid #cad6ea;border-radius:999px;padding:0 8px;cursor:pointer}
.tok:hover{background:#dce8fb;border-color:#9dbcf0}
.tok.active{background:#1f6feb;border-color:#1f6feb;color:#fff}
.tok:focus-visible{outline:2px solid #f0a020;outline-offset:1px}
.pred{font-weight:600;overflow-wrap:anywhere}
.smiles .pred,.smiles .ref{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace;
  font-size:13px}
.refs{margin:0;padding-left:20px;color:#4a5568;font-size:13px;overflow-wrap:anywhere}
.ref.hit{color:#17803d}
.ref.hit::after{content:" ✓"}
.metrics{display:flex;flex-wrap:wrap;gap:4px}
.metric{font-size:12px;background:#f1f3f7;border-radius:4px;padding:1px 6px;color:#4a5568}
.metric b{color:#1c2330;font-weight:600}
.metric.sorted{background:#fff1c9}
.empty{padding:40px;color:#6b7588}
"""


def _page_js() -> str:
    """Inline script: lazy canvas maps, token interaction, sorting and ``#selftest``.

    Example:
        >>> "ArrowRight" in _page_js()
        True
    """
    return r"""
(function () {
  "use strict";
  var cfg = JSON.parse(document.getElementById("report-config").textContent);
  var GH = cfg.grid[0], GW = cfg.grid[1], LUT = cfg.lut, STRIDE = 7;
  var opacity = cfg.alpha, lastCard = null;
  var deck = document.getElementById("cards");

  function attOf(card) {
    if (!card._att) { card._att = JSON.parse(card.dataset.att); }
    return card._att;
  }
  function cubic(x) {  // PIL's bicubic kernel (a = -0.5)
    x = Math.abs(x);
    if (x < 1) { return (1.5 * x - 2.5) * x * x + 1; }
    return x < 2 ? (((x - 5) * x + 8) * x - 4) * -0.5 : 0;
  }
  function taps(n, cells) {  // PIL's resampling coefficients: cells -> n pixels
    var scale = cells / n, fs = Math.max(scale, 1), support = 2 * fs, out = [];
    for (var p = 0; p < n; p++) {
      var center = (p + 0.5) * scale, ws = [], sum = 0;
      var lo = Math.max(Math.trunc(center - support + 0.5), 0);
      var hi = Math.min(Math.trunc(center + support + 0.5), cells);
      for (var j = lo; j < hi; j++) {
        ws.push(cubic((j - center + 0.5) / fs)); sum += ws[ws.length - 1];
      }
      for (var k = 0; k < ws.length && sum; k++) { ws[k] /= sum; }
      out.push({lo: lo, w: ws});
    }
    return out;
  }
  function upsample(row, w, h) {  // = visualize.upsample_attention: bicubic, clip, max 1
    var tx = taps(w, GW), ty = taps(h, GH), tmp = new Float64Array(GH * w);
    var heat = new Float32Array(w * h), peak = 0, x, y, j, v, t;
    for (var r = 0; r < GH; r++) {
      for (x = 0; x < w; x++) {
        t = tx[x]; v = 0;
        for (j = 0; j < t.w.length; j++) { v += row[r * GW + t.lo + j] * t.w[j]; }
        tmp[r * w + x] = v;
      }
    }
    for (y = 0; y < h; y++) {
      t = ty[y];
      for (x = 0; x < w; x++) {
        v = 0;
        for (j = 0; j < t.w.length; j++) { v += tmp[(t.lo + j) * w + x] * t.w[j]; }
        v = Math.max(v, 0); heat[y * w + x] = v;
        if (v > peak) { peak = v; }
      }
    }
    for (var k = 0; peak > 0 && k < heat.length; k++) { heat[k] /= peak; }
    return heat;
  }
  function drawMap(canvas, row) {  // jet colour, alpha = opacity * m (overlay_attention)
    var w = canvas.width, h = canvas.height, heat = upsample(row, w, h);
    var ctx = canvas.getContext("2d"), img = ctx.createImageData(w, h), px = img.data;
    for (var k = 0; k < w * h; k++) {
      var m = heat[k], ci = Math.round(m * 255) * 3, o = k * 4;
      px[o] = LUT[ci]; px[o + 1] = LUT[ci + 1]; px[o + 2] = LUT[ci + 2];
      px[o + 3] = Math.round(opacity * m * 255);
    }
    ctx.putImageData(img, 0, 0);
    canvas._drawn = {token: row, opacity: opacity};
  }
  function chipsOf(card) { return card.querySelectorAll(".tok"); }
  function show(card, i) {  // display token i of card (-1 = the plain image)
    var canvas = card.querySelector("canvas.overlay"), chips = chipsOf(card);
    var label = card.querySelector(".token-label");
    for (var j = 0; j < chips.length; j++) {
      chips[j].classList.toggle("active", j === i);
      chips[j].setAttribute("aria-pressed", j === i ? "true" : "false");
    }
    if (i < 0 || i >= chips.length) {
      delete card.dataset.activeToken;
      canvas.hidden = true; canvas.removeAttribute("data-token");
      label.textContent = chips.length ? "hover, click or focus a token" : "no tokens";
      return;
    }
    var att = attOf(card), row = att.q[i];
    var d = canvas._drawn;
    if (!d || d.token !== row || d.opacity !== opacity) { drawMap(canvas, row); }
    card.dataset.activeToken = String(i);
    canvas.dataset.token = String(i); canvas.hidden = false;
    label.innerHTML = "";
    label.append("token " + (i + 1) + "/" + chips.length + ": ");
    var b = document.createElement("b"); b.textContent = chips[i].textContent;
    label.append(b, "  (max α " + att.p[i] + ")");
    lastCard = card;
  }
  function pin(card, i) { card._pinned = i; show(card, i); }
  function pinned(card) { return card._pinned === undefined ? -1 : card._pinned; }
  function step(card, delta, to) {  // arrows stop at the ends (no wrap)
    var chips = chipsOf(card), n = chips.length;
    if (!n) { return; }
    var cur = pinned(card);
    if (cur < 0) { cur = Array.prototype.indexOf.call(chips, document.activeElement); }
    var j = to !== undefined ? to : (cur < 0 ? (delta > 0 ? 0 : n - 1) : cur + delta);
    j = Math.min(Math.max(j, 0), n - 1);
    pin(card, j); chips[j].focus({preventScroll: false});
  }
  function tokenTarget(ev) {
    var chip = ev.target.closest ? ev.target.closest(".tok") : null;
    return chip ? {chip: chip, card: chip.closest(".item"), i: Number(chip.dataset.i)} : null;
  }

  deck.addEventListener("mouseover", function (ev) {
    var t = tokenTarget(ev); if (t) { show(t.card, t.i); }
  });
  deck.addEventListener("mouseout", function (ev) {
    var t = tokenTarget(ev);
    if (t && !(ev.relatedTarget && t.chip.contains(ev.relatedTarget))) {
      show(t.card, pinned(t.card));
    }
  });
  deck.addEventListener("mousedown", function (ev) {
    var t = tokenTarget(ev); if (t) { t.card._wasPinned = pinned(t.card) === t.i; }
  });
  deck.addEventListener("focusin", function (ev) {
    var t = tokenTarget(ev); if (t) { pin(t.card, t.i); }
  });
  deck.addEventListener("click", function (ev) {
    var t = tokenTarget(ev); if (!t) { return; }
    var again = ev.detail === 0 ? pinned(t.card) === t.i : t.card._wasPinned;
    t.card._wasPinned = false;
    pin(t.card, again ? -1 : t.i);
  });
  document.addEventListener("keydown", function (ev) {
    var t = tokenTarget(ev), loose = ev.target === document.body || ev.target === document;
    var card = t ? t.card : (loose ? lastCard : null);  // keep arrows for select / slider
    if (!card || ev.altKey || ev.ctrlKey || ev.metaKey) { return; }
    var keys = {ArrowRight: 1, ArrowLeft: -1, Home: 0, End: 0, Escape: 0};
    if (!(ev.key in keys)) { return; }
    ev.preventDefault();
    if (ev.key === "Escape") { pin(card, -1); return; }
    if (ev.key === "Home") { step(card, 0, 0); return; }
    if (ev.key === "End") { step(card, 0, chipsOf(card).length - 1); return; }
    step(card, keys[ev.key]);
  });

  function sortCards(value) {
    var cards = Array.prototype.slice.call(deck.querySelectorAll(".item"));
    var cut = value.lastIndexOf(":"), key = value.slice(0, cut), desc = /:desc$/.test(value);
    function val(card) {
      if (!card._sort) { card._sort = JSON.parse(card.dataset.sort); }
      return value === "given" ? Number(card.dataset.index) : card._sort[key];
    }
    cards.sort(function (a, b) {
      var va = val(a), vb = val(b), ma = va === undefined, mb = vb === undefined;
      if (ma || mb) { return ma === mb ? a.dataset.index - b.dataset.index : (ma ? 1 : -1); }
      if (va !== vb) { return desc ? vb - va : va - vb; }
      return a.dataset.index - b.dataset.index;
    });
    cards.forEach(function (card) {
      deck.appendChild(card);
      card.querySelectorAll(".metric").forEach(function (m) {
        m.classList.toggle("sorted", value !== "given" && m.dataset.key === key);
      });
    });
    return cards.map(function (card) { return Number(card.dataset.index); });
  }
  var sortSel = document.getElementById("sort");
  sortSel.addEventListener("change", function () { sortCards(sortSel.value); });
  var slider = document.getElementById("opacity");
  slider.addEventListener("input", function () {
    opacity = Number(slider.value);
    deck.querySelectorAll(".item[data-active-token]").forEach(function (card) {
      show(card, Number(card.dataset.activeToken));
    });
  });

  function state(card) {
    var canvas = card.querySelector("canvas.overlay"), s = {
      active: card.dataset.activeToken === undefined ? null : Number(card.dataset.activeToken),
      overlay: canvas.hidden ? null : Number(canvas.dataset.token),
      label: card.querySelector(".token-label").textContent,
      pressed: card.querySelectorAll('.tok[aria-pressed="true"]').length
    };
    if (canvas.hidden) { return s; }
    var w = canvas.width, h = canvas.height;
    var px = canvas.getContext("2d").getImageData(0, 0, w, h).data;
    var n = 0, levels = {}, best = -1, at = 0;
    for (var k = 3; k < px.length; k += 4) {
      if (px[k]) { n++; }
      levels[px[k]] = 1;
      if (px[k] > best) { best = px[k]; at = (k - 3) / 4; }
    }
    s.alphaPixels = n; s.alphaLevels = Object.keys(levels).length; s.size = [w, h];
    s.peak = [((at % w) + 0.5) / w, (Math.floor(at / w) + 0.5) / h];
    s.sample = [];  // alpha at every STRIDE-th pixel of every STRIDE-th row
    for (var y = 0; y < h; y += STRIDE) {
      for (var x = 0; x < w; x += STRIDE) { s.sample.push(px[(y * w + x) * 4 + 3]); }
    }
    return s;
  }
  function press(el, key) {
    (el || document.body).dispatchEvent(new KeyboardEvent("keydown", {key: key, bubbles: true}));
  }
  function selftest() {
    var out = {items: deck.querySelectorAll(".item").length, sorts: {}};
    var card = deck.querySelector(".item"), chips = card ? chipsOf(card) : [];
    if (chips.length) {
      chips[0].focus(); pin(card, 0);
      out.first = state(card);
      press(chips[0], "ArrowRight");
      out.second = state(card);
      press(chips[1 % chips.length], "End"); press(document.activeElement, "ArrowRight");
      out.end = state(card).active;  // ArrowRight on the last token stops there
      press(document.activeElement, "Escape");
      out.cleared = state(card);
      chips[0].click(); out.clicked = state(card).active;
      chips[0].click(); out.unclicked = state(card).active;
    }
    Array.prototype.forEach.call(sortSel.options, function (opt) {
      out.sorts[opt.value] = sortCards(opt.value);
    });
    sortSel.value = "given"; sortCards("given");
    if (chips.length) { pin(card, Math.min(1, chips.length - 1)); out.final = state(card); }
    var pre = document.getElementById("selftest");
    pre.textContent = JSON.stringify(out);
    document.title = "selftest done";
  }
  if (location.hash === "#selftest") {
    if (document.readyState === "complete") { selftest(); }
    else { window.addEventListener("load", selftest); }
  }
})();
"""


def _page_html(title: str, header: str, cards: str, config: str) -> str:
    """Assemble the whole document (all pieces already escaped).

    Example:
        >>> _page_html("t", "", "", "{}").startswith("<!DOCTYPE html>")
        True
    """
    safe_config = config.replace("</", "<\\/")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n<style>{_page_css()}</style>\n</head>\n<body>\n"
        f"{header}\n<main id=\"cards\">{cards}</main>\n"
        '<pre id="selftest" hidden></pre>\n'
        f'<script type="application/json" id="report-config">{safe_config}</script>\n'
        f"<script>{_page_js()}</script>\n</body>\n</html>\n"
    )


def _header_html(title: str, n_items: int, grid_hw: tuple[int, int], keys: Sequence[str]) -> str:
    """The sticky top bar: title, counts, sort control, opacity slider, legend and help.

    Example:
        >>> 'id="sort"' in _header_html("t", 2, (7, 7), ["bleu4"])
        True
    """
    return (
        f'<header class="bar"><h1>{html.escape(title)}</h1>'
        f'<span class="count">{n_items} items · {grid_hw[0]}×{grid_hw[1]} attention grid</span>'
        f'<label>sort <select id="sort">{_sort_options(keys)}</select></label>'
        '<label>opacity <input id="opacity" type="range" min="0" max="1" step="0.05" '
        'value="0.6"></label>'
        f'<span class="legend">low <span class="ramp" style="background:{_legend_gradient()}">'
        "</span> high attention</span>"
        '<span class="help">hover / click / focus a token · <kbd>←</kbd> <kbd>→</kbd> step '
        "(stops at the ends) · <kbd>Esc</kbd> or click again: plain image</span></header>"
    )


# --------------------------------------------------------------------------- public API


def write_report(
    items: list[ReportItem],
    out_path: str | Path,
    grid_hw: tuple[int, int],
    title: str = "captioner attention",
    image_size: int | tuple[int, int] | None = None,
    embed: bool = True,
    sortable_keys: Sequence[str] | None = None,
) -> Path:
    """Write a self-contained HTML attention report and return its path.

    Args:
        items: the examples, shown in this order by default.
        out_path: the HTML file to write (parent directories are created).
        grid_hw: (gh, gw) of the attention grid; every attention row has gh * gw cells.
        title: page title and heading.
        image_size: None keeps the pixels as given; an int shrinks images so the longer
            side is at most that many pixels; (h, w) resizes to exactly that size.
        embed: True embeds images as base64 data URIs; False writes them to
            ``<out_dir>/report_files/`` and references them relatively.
        sortable_keys: keys offered by the sort control ("score" = ``item.score``,
            others from ``item.metrics``); None = "score" (if any) + all numeric metrics.

    Raises:
        ValueError: if an item's attention is not (len(tokens), gh * gw).

    Example:
        >>> import numpy as np, tempfile, pathlib
        >>> items = [ReportItem("m.png", ["C", "O"], np.ones((2, 64)), "CO",
        ...                     metrics={"tanimoto": 0.5}, image=np.zeros((20, 30, 3), np.uint8))]
        >>> path = write_report(items, pathlib.Path(tempfile.mkdtemp()) / "r.html", (8, 8))
        >>> 'data-index="0"' in path.read_text(), "data:image/png;base64," in path.read_text()
        (True, True)
    """
    grid = _check_hw(grid_hw, "grid_hw")
    atts = [_check_attention(item, i, grid) for i, item in enumerate(items)]
    keys = list(sortable_keys) if sortable_keys is not None else _default_sort_keys(items)
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files_dir = None if embed else path.parent / "report_files"
    if files_dir is not None:
        files_dir.mkdir(exist_ok=True)
    cards = []
    for index, (item, att) in enumerate(zip(items, atts)):
        rgb = _resize(_load_rgb(item), image_size)  # (H, W, 3)
        src = _image_src(*_encode(rgb), index, files_dir)
        cards.append(_card_html(item, index, src, rgb.shape[:2], att, keys))
    body = "".join(cards) or '<p class="empty">no items</p>'
    header = _header_html(title, len(items), grid, keys)
    page = _page_html(html.escape(title), header, body, _config_json(grid, 0.6))
    path.write_text(page, encoding="utf-8")
    return path
