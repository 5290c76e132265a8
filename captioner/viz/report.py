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

SMILES cards (the prediction or the first reference looks like SMILES; see
``write_report(molecules=...)``) put the text column beside RDKit drawings: the molecule
the model read, with the atoms and bonds that differ from the first reference filled in
light red, the reference with its differing atoms filled the same way (left out when the
two are the same molecule), and one drawing per other reader (``ReportItem.others``,
e.g. OSRA) with its own exact / differs mark (:mod:`captioner.viz.molecules`). Drawings
are SVG data URIs in ``<img>`` elements, so nothing in them can run. A ``<select
id="filter">`` then shows only the cards where given readers are exact or not (e.g. the
model exact and OSRA not), and each other reader's exactness is a sort key.

DOM state (for tests): the card ``.item`` has ``data-active-token="i"`` while a
map is shown (absent otherwise), the ``canvas.overlay`` has ``data-token="i"`` and
is ``hidden`` when no map is shown, and ``.token-label`` names the active token.
Hidden (filtered) cards have the ``hidden`` attribute and the card's ``data-exact``
holds ``{"model": 0|1, "others": {name: 0|1}}``. Opening the page with ``#selftest``
runs a scripted check and writes its result as JSON into ``<pre id="selftest">`` (see
``tests/test_report.py``).

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from captioner.data.images import load_view
from captioner.viz.figures import _as_rgb_uint8, _check_hw, jet_colormap
from captioner.viz.molecules import (
    MoleculeDiff,
    MoleculeDrawing,
    looks_like_smiles,
    molecule_diff_svg,
)

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
    molecule_px: int = 296


@dataclass(eq=False)
class ReportItem:
    """One example of the report.

    ``attention`` is (len(tokens), G) with G = gh * gw (row-major grid cells).
    ``image`` (uint8 (H, W, 3)) is shown when given, else ``image_path`` is loaded, cut
    to its ink with ``crop_margin`` when the model read it so
    (:func:`~captioner.data.images.load_view`): the attention lies over what it read.
    ``others`` maps another reader's name to what it read from the same image (e.g.
    ``{"OSRA": "CCO"}``); SMILES cards draw each beside the model's prediction.

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
    others: dict[str, str] = field(default_factory=dict)
    crop_margin: float | None = None


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


def _sort_values(item: ReportItem, keys: Sequence[str],
                 extra: dict[str, float] | None = None) -> dict[str, float]:
    """The finite numeric values of ``keys`` for one item ("score" = ``item.score``,
    then ``item.metrics``, then ``extra``: values the page computed, such as whether
    another reader's SMILES is exact).

    Example:
        >>> import numpy as np
        >>> it = ReportItem("x", [], np.zeros((0, 4)), "", score=-1.5, metrics={"b": 2})
        >>> _sort_values(it, ["score", "b", "c", "OSRA exact_match"], {"OSRA exact_match": 0})
        {'score': -1.5, 'b': 2.0, 'OSRA exact_match': 0.0}
    """
    extra = extra or {}
    values = {}
    for key in keys:
        if key == "score" and item.score is not None:
            raw = item.score
        else:
            raw = item.metrics.get(key, extra.get(key))
        number = _finite(raw)
        if number is not None:
            values[key] = number
    return values


def _default_sort_keys(items: Sequence[ReportItem],
                       extras: Sequence[dict[str, float]] = ()) -> list[str]:
    """"score" (if any item has one), every numeric metric key, then every key of
    ``extras`` (one dict per item), first-seen order.

    Example:
        >>> import numpy as np
        >>> a = ReportItem("x", [], np.zeros((0, 4)), "", metrics={"bleu4": 0.1, "note": "?"})
        >>> b = ReportItem("y", [], np.zeros((0, 4)), "", score=0.3, metrics={"tanimoto": 1})
        >>> _default_sort_keys([a, b], [{}, {"OSRA exact_match": 1.0}])
        ['score', 'bleu4', 'tanimoto', 'OSRA exact_match']
    """
    keys = ["score"] if any(_finite(it.score) is not None for it in items) else []
    for values in [*(it.metrics for it in items), *extras]:
        for key, value in values.items():
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
    """The item's pixels as (H, W, 3) uint8 (``item.image``, or the file at ``image_path``
    as the model read it).

    Example:
        >>> import numpy as np
        >>> it = ReportItem("x", [], np.zeros((0, 4)), "", image=np.zeros((5, 6), np.uint8))
        >>> _load_rgb(it).shape
        (5, 6, 3)
    """
    if item.image is not None:
        return _as_rgb_uint8(item.image)
    return load_view(item.image_path, item.crop_margin).pixels


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


# --------------------------------------------------------------------------- molecules


@dataclass(frozen=True)
class _Molecules:
    """The drawings of one SMILES card: the prediction against the first reference and
    each other reader against it too; ``missing`` says why there are none (no RDKit).

    Example:
        >>> _Molecules(None, {}, "SMILES support needs RDKit").missing
        'SMILES support needs RDKit'
    """

    diff: MoleculeDiff | None
    others: dict[str, MoleculeDiff] = field(default_factory=dict)
    missing: str = ""


def _item_molecules(item: ReportItem, draw: bool | None) -> _Molecules | None:
    """Drawings for a card: when ``draw`` is True, or None and the prediction or the first
    reference looks like SMILES; None for other cards.

    Example:
        >>> import numpy as np
        >>> _item_molecules(ReportItem("x", [], np.zeros((0, 4)), "a cat"), None) is None
        True
        >>> _item_molecules(ReportItem("x", [], np.zeros((0, 4)), "CCN", references=["CCO"],
        ...                            others={"OSRA": "CCO"}), None).others["OSRA"].note
        'exact match'
    """
    texts = [item.prediction, *(item.references or [])[:1]]
    if draw is False or (draw is None and not any(looks_like_smiles(t.strip()) for t in texts)):
        return None
    reference = item.references[0] if item.references else None
    px = _ReportLayout().molecule_px
    try:
        diff = molecule_diff_svg(item.prediction, reference, (px, px))
        others = {name: molecule_diff_svg(smiles, reference, (px, px))
                  for name, smiles in item.others.items()}
    except ImportError as exc:
        return _Molecules(None, {}, str(exc))
    return _Molecules(diff, others)


def _exact_marks(mols: _Molecules | None) -> dict[str, object]:
    """Which readers got the reference exactly (1) or not (0), for the page's filter;
    readers without a valid reference to compare with are left out.

    Example:
        >>> d = molecule_diff_svg("CCN", "CCO")
        >>> _exact_marks(_Molecules(d, {"OSRA": molecule_diff_svg("OCC", "CCO")}))
        {'model': 0, 'others': {'OSRA': 1}}
    """
    if mols is None or mols.diff is None:
        return {}
    marks: dict[str, object] = {}
    if mols.diff.exact_match is not None:
        marks["model"] = int(mols.diff.exact_match)
    others = {name: int(d.exact_match) for name, d in mols.others.items()
              if d.exact_match is not None}
    if others:
        marks["others"] = others
    return marks


def _other_sort_values(mols: _Molecules | None) -> dict[str, float]:
    """``"<reader> exact_match"``: 1.0 / 0.0 for every other reader with a verdict.

    Example:
        >>> _other_sort_values(_Molecules(None, {"OSRA": molecule_diff_svg("C", "C")}))
        {'OSRA exact_match': 1.0}
    """
    if mols is None:
        return {}
    return {f"{name} exact_match": float(d.exact_match) for name, d in mols.others.items()
            if d.exact_match is not None}


def _svg_src(svg: str, name: str, files_dir: Path | None) -> str:
    """A data URI of an SVG (``files_dir`` None) or the relative path of ``name`` written
    there; either way the page shows it in an ``<img>``, where scripts never run.

    Example:
        >>> _svg_src("<svg/>", "m.svg", None)
        'data:image/svg+xml;base64,PHN2Zy8+'
    """
    if files_dir is None:
        data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
        return f"data:image/svg+xml;base64,{data}"
    (files_dir / name).write_text(svg, encoding="utf-8")
    return f"{files_dir.name}/{name}"


def _mark(diff: MoleculeDiff) -> tuple[str, str]:
    """(CSS class, text) of a reader's verdict.

    Example:
        >>> _mark(molecule_diff_svg("CCO", "OCC")), _mark(molecule_diff_svg("C1CC", "C"))
        (('exact', '✓ exact'), ('invalid', '✗ not a valid molecule'))
    """
    if not diff.valid:
        return "invalid", "✗ not a valid molecule"
    if diff.exact_match is None:
        return "plain", "no reference to compare"
    return ("exact", "✓ exact") if diff.exact_match else ("differs", "≠ differs")


def _figure_html(drawing: MoleculeDrawing | None, src: str | None, cls: str, who: str,
                 caption: str) -> str:
    """One ``<figure class="mol ...">``: the drawing at ``src`` (or, when there is no
    SVG, a box saying it is not a molecule) and its caption; ``who`` and ``caption`` are
    already escaped HTML.

    Example:
        >>> _figure_html(MoleculeDrawing("X", False), None, "read invalid", "model",
        ...              "").count("nomol")
        1
    """
    px = _ReportLayout().molecule_px
    if drawing is not None and drawing.svg is not None and src is not None:
        alt = html.escape(f"{who}: {drawing.canonical or drawing.smiles}", quote=True)
        body = (f'<img class="mol-svg" src="{html.escape(src)}" alt="{alt}" width="{px}" '
                f'height="{px}" loading="lazy" decoding="async">')
    else:
        body = (f'<div class="nomol" style="width:{px}px;height:{px}px">'
                "not a valid molecule</div>")
    return (f'<figure class="mol {cls}">{body}<figcaption><b class="who">{who}</b> '
            f"{caption}</figcaption></figure>")


def _molecules_html(mols: _Molecules, index: int = 0, files_dir: Path | None = None) -> str:
    """The figures of a SMILES card: what the model read (differences highlighted), the
    reference (unless it is the same molecule), then each other reader. The SVGs are
    data URIs, or files ``item_<index>_<who>.svg`` in ``files_dir``.

    Example:
        >>> page = _molecules_html(_Molecules(molecule_diff_svg("CCN", "CCO")))
        >>> page.count("<figure"), "≠ differs" in page
        (2, True)
    """
    if mols.diff is None:
        return f'<p class="mol-missing">{html.escape(mols.missing)}</p>'

    def src(drawing: MoleculeDrawing | None, who: str) -> str | None:
        if drawing is None or drawing.svg is None:
            return None
        return _svg_src(drawing.svg, f"item_{index:05d}_{who}.svg", files_dir)

    diff = mols.diff
    cls, mark = _mark(diff)
    note = "" if diff.note in ("exact match", "not a valid molecule") else diff.note
    caption = (f'<span class="mark {cls}">{html.escape(mark)}</span>'
               f'<span class="note">{html.escape(note)}</span>')
    figures = [_figure_html(diff.prediction, src(diff.prediction, "model"), f"read {cls}",
                            "model", caption)]
    ref = diff.reference
    if ref is not None and not diff.exact_match:
        ref_caption = "" if ref.valid else (
            '<span class="mark invalid">✗ not a valid molecule</span>')
        figures.append(_figure_html(ref, src(ref, "reference"), "reference", "reference",
                                    ref_caption))
    for number, (name, other) in enumerate(mols.others.items()):
        cls, mark = _mark(other)
        caption = (f'<span class="mark {cls}">{html.escape(mark)}</span>'
                   f'<code class="smi">{html.escape(other.prediction.smiles)}</code>')
        figures.append(_figure_html(other.prediction, src(other.prediction, f"other{number}"),
                                    f"other {cls}", html.escape(name), caption))
    return "".join(figures)


def _filter_options(items_marks: Sequence[dict[str, object]]) -> list[tuple[str, str]]:
    """(value, label) of the filter control: JSON specs of which readers must be exact
    (1) or not (0); empty when no card has a verdict.

    Example:
        >>> opts = _filter_options([{"model": 1, "others": {"OSRA": 0}}])
        >>> [label for _, label in opts]  # doctest: +NORMALIZE_WHITESPACE
        ['all', 'model exact', 'model not exact', 'model exact, OSRA not',
         'OSRA exact, model not', 'neither exact (model, OSRA)']
    """
    if not any("model" in marks for marks in items_marks):
        return []
    names: list[str] = []
    for marks in items_marks:
        for name in marks.get("others", {}):  # type: ignore[union-attr]
            if name not in names:
                names.append(name)
    options = [("", "all"), ('{"model":1}', "model exact"), ('{"model":0}', "model not exact")]
    for name in names:
        spec = {"model": 1, "others": {name: 0}}
        options.append((json.dumps(spec, separators=(",", ":")), f"model exact, {name} not"))
        spec = {"model": 0, "others": {name: 1}}
        options.append((json.dumps(spec, separators=(",", ":")), f"{name} exact, model not"))
        spec = {"model": 0, "others": {name: 0}}
        options.append((json.dumps(spec, separators=(",", ":")),
                        f"neither exact (model, {name})"))
    return options


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
    sort_keys: Sequence[str], mols: _Molecules | None = None, files_dir: Path | None = None,
) -> str:
    """One ``<article class="item">`` card; with ``mols``, the text column sits beside the
    molecule drawings (``<div class="cols">``; SVG files go to ``files_dir`` if given).

    Example:
        >>> import numpy as np
        >>> it = ReportItem("d/x.png", ["a"], np.ones((1, 4)), "a")
        >>> _card_html(it, 3, "x.png", (20, 10), it.attention, []).startswith('<article')
        True
    """
    width, height = _stage_size(*shape)
    kind = " smiles" if looks_like_smiles(item.prediction) or mols is not None else ""
    kind += " mols" if mols is not None else ""
    sort_json = json.dumps(_sort_values(item, sort_keys, _other_sort_values(mols)),
                           separators=(",", ":"))
    marks = _exact_marks(mols)
    exact = (f' data-exact="{html.escape(json.dumps(marks, separators=(",", ":")))}"'
             if marks else "")
    name = html.escape(Path(item.image_path).name or item.image_path or f"item {index}")
    main = (
        f'<div class="stage" style="width:{width}px;height:{height}px">'
        f'<img src="{html.escape(src)}" alt="{name}" width="{width}" height="{height}" '
        f'loading="lazy" decoding="async">'
        f'<canvas class="overlay" width="{width}" height="{height}" hidden></canvas></div>'
        f'<div class="token-label" aria-live="polite">hover, click or focus a token</div>'
        f'<div class="tokens" role="group" aria-label="predicted tokens">'
        f"{_token_chips(item.tokens)}</div>"
        f'<div class="pred" title="prediction">{html.escape(item.prediction)}</div>'
        f"{_references_html(item)}{_metrics_html(item)}"
    )
    if mols is not None:
        main = (f'<div class="cols"><div class="col-main">{main}</div>'
                f"{_molecules_html(mols, index, files_dir)}</div>")
    return (
        f'<article class="item{kind}" data-index="{index}" '
        f'data-sort="{html.escape(sort_json)}"{exact} '
        f'data-att="{html.escape(_attention_json(att))}">'
        f'<header class="card-head"><span class="idx">#{index}</span>'
        f'<span class="name" title="{html.escape(item.image_path)}">{name}</span></header>'
        f"{main}</article>"
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


def _header_html(title: str, n_items: int, grid_hw: tuple[int, int], keys: Sequence[str],
                 filters: Sequence[tuple[str, str]] = ()) -> str:
    """The sticky top bar: title, counts, sort control, the filter by which reader is
    exact (when there are ``filters``), opacity slider, legend and help.

    Example:
        >>> 'id="sort"' in _header_html("t", 2, (7, 7), ["bleu4"])
        True
        >>> 'id="filter"' in _header_html("t", 2, (7, 7), [], [("", "all")])
        True
    """
    filter_html = ""
    if filters:
        options = "".join(f'<option value="{html.escape(value)}">{html.escape(label)}</option>'
                          for value, label in filters)
        filter_html = (f'<label>show <select id="filter">{options}</select></label>'
                       '<span class="count" id="shown" aria-live="polite"></span>')
    return (
        f'<header class="bar"><h1>{html.escape(title)}</h1>'
        f'<span class="count">{n_items} items · {grid_hw[0]}×{grid_hw[1]} attention grid</span>'
        f'<label>sort <select id="sort">{_sort_options(keys)}</select></label>'
        f"{filter_html}"
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
    molecules: bool | None = None,
) -> Path:
    """Write a self-contained HTML attention report and return its path.

    Args:
        items: the examples, shown in this order by default.
        out_path: the HTML file to write (parent directories are created).
        grid_hw: (gh, gw) of the attention grid; every attention row has gh * gw cells.
        title: page title and heading.
        image_size: None keeps the pixels as given; an int shrinks images so the longer
            side is at most that many pixels; (h, w) resizes to exactly that size.
        embed: True embeds images (and molecule SVGs) as base64 data URIs; False writes
            them to ``<out_dir>/report_files/`` and references them relatively.
        sortable_keys: keys offered by the sort control ("score" = ``item.score``,
            others from ``item.metrics``, and ``"<reader> exact_match"`` for each of
            ``item.others``); None = "score" (if any) + all numeric metrics + those.
        molecules: draw the predicted molecule (differences from the first reference
            highlighted), the reference and every other reader's molecule beside the
            image (:func:`captioner.viz.molecules.molecule_diff_svg`): True for every
            card, False for none, None (default) for cards whose prediction or first
            reference looks like SMILES. The page then also filters cards by which
            reader is exact. Without RDKit the cards say so instead.

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
    mols = [_item_molecules(item, molecules) for item in items]
    extras = [_other_sort_values(m) for m in mols]
    keys = (list(sortable_keys) if sortable_keys is not None
            else _default_sort_keys(items, extras))
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files_dir = None if embed else path.parent / "report_files"
    if files_dir is not None:
        files_dir.mkdir(exist_ok=True)
    cards = []
    for index, (item, att, mol) in enumerate(zip(items, atts, mols)):
        rgb = _resize(_load_rgb(item), image_size)  # (H, W, 3)
        src = _image_src(*_encode(rgb), index, files_dir)
        cards.append(_card_html(item, index, src, rgb.shape[:2], att, keys, mol, files_dir))
    body = "".join(cards) or '<p class="empty">no items</p>'
    header = _header_html(title, len(items), grid, keys,
                          _filter_options([_exact_marks(m) for m in mols]))
    page = _page_html(html.escape(title), header, body, _config_json(grid, 0.6))
    path.write_text(page, encoding="utf-8")
    return path
