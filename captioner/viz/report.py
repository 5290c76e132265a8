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
from importlib import resources
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


def page_asset(name: str) -> str:
    """The text of a page asset shipped as package data (``captioner/viz/assets``): the
    report's ``report.css`` and ``report.js``, inlined so that a page is one file.

    Example:
        >>> "tok.active" in page_asset("report.css"), "ArrowRight" in page_asset("report.js")
        (True, True)
    """
    return resources.files("captioner.viz").joinpath("assets", name).read_text("utf-8")


def _page_html(title: str, header: str, cards: str, config: str, before_cards: str = "",
               extra_css: str = "", extra_js: str = "") -> str:
    """Assemble the whole document (all pieces already escaped); ``before_cards``,
    ``extra_css`` and ``extra_js`` let another page (the serve page) reuse the report's
    cards, styles and token interaction.

    Example:
        >>> _page_html("t", "", "", "{}").startswith("<!DOCTYPE html>")
        True
    """
    safe_config = config.replace("</", "<\\/")
    extra = f"<script>{extra_js}</script>\n" if extra_js else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n<style>{page_asset('report.css')}{extra_css}</style>\n"
        "</head>\n<body>\n"
        f"{header}\n{before_cards}<main id=\"cards\">{cards}</main>\n"
        '<pre id="selftest" hidden></pre>\n'
        f'<script type="application/json" id="report-config">{safe_config}</script>\n'
        f"<script>{page_asset('report.js')}</script>\n{extra}</body>\n</html>\n"
    )


def live_page_html(title: str, grid_hw: tuple[int, int], before_cards: str, extra_css: str,
                   extra_js: str) -> str:
    """A page with the report's header, styles and token interaction but no cards yet:
    ``extra_js`` adds cards (in :func:`_card_html`'s markup) as results arrive.

    Example:
        >>> page = live_page_html("try it", (7, 7), "<form></form>", "", "")
        >>> 'id="cards"></main>' in page and 'id="opacity"' in page and "<form>" in page
        True
    """
    header = _header_html(title, 0, grid_hw, [])
    return _page_html(html.escape(title), header, "", _config_json(grid_hw, 0.6),
                      before_cards, extra_css, extra_js)


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
