"""``evaluate``: decode a split, score it, and write metrics and per-example predictions.

Writes ``metrics.json``, ``metrics.md`` and ``predictions.csv`` (image, references,
prediction, score and per-example metrics) into the output folder. With ``compare``
other readers (OSRA, :mod:`captioner.evaluate.osra`) read the same image files and are
scored with the same metrics beside ours. Molecules can be drawn for the evaluation in a
named style (:func:`draw_eval_data`); data without pictures (``data.format: smiles``)
always is.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from captioner.choices import Choices
from captioner.config import DataConfig, load_config
from captioner.data.drawing import render_smiles
from captioner.data.formats import read_any, read_records
from captioner.data.manifests import LoadReport, Record
from captioner.data.splits import SplitData, build_split
from captioner.evaluate.grounding import molecule_grounding, shapes_grounding
from captioner.evaluate.metrics import (
    compute_metrics,
    exact_match_at_k,
    metric_family,
    metrics_markdown,
    per_example_caption_metrics,
    per_example_smiles_metrics,
    smiles_summary,
)
from captioner.evaluate.osra import OsraReadings, OsraUnavailable, read_images
from captioner.generate.captioner import Captioner, Generation
from captioner.viz.attention import report_items
from captioner.viz.report import write_report


@dataclass
class EvalData:
    """The images of one split with their references, as read for evaluation.

    Example:
        >>> split = build_split([Record("missing.png", "a b", "test")], 8, load=False)
        >>> data = EvalData(split, "config data", LoadReport())
        >>> data.split.paths, data.split.references, data.report.count
        (['missing.png'], [['a b']], 0)
    """

    split: SplitData
    source: str
    report: LoadReport


def _manifest_config(path: Path, base: DataConfig) -> DataConfig:
    """A data config for an arbitrary manifest, keeping the run's column names where the
    file has them and falling back to ``smiles``/``caption``/``text`` columns."""
    cfg = replace(base, format="auto", path=str(path), images_dir=None, limit=None,
                  only_existing=False)
    if path.suffix.lower() == ".csv":
        header = path.open(encoding="utf-8").readline().strip().split(",")
        if cfg.text_column not in header:
            for name in ("smiles", "caption", "text"):
                if name in header:
                    return replace(cfg, format="csv", text_column=name)
        return replace(cfg, format="csv") if cfg.image_column in header else cfg
    return cfg


def _records(cap: Captioner, data: str | None, split: str) -> tuple[list[Record], str]:
    smiles = cap.tokenizer.kind == "smiles"
    if data is None:
        return read_records(cap.config.data, smiles), "run config"
    path = Path(data)
    if path.suffix.lower() in (".yaml", ".yml"):
        return read_records(load_config(path).data, smiles), str(path)

    cfg = _manifest_config(path, cap.config.data)
    records = read_any(cfg.format, cfg.path, None, cfg.image_column, cfg.text_column,
                       cfg.split_column)
    if not any(r.split for r in records):  # a manifest without splits: evaluate it all
        records = [replace(r, split=split) for r in records]
    return records, str(path)


def load_eval_data(cap: Captioner, data: str | None = None, split: str = "test",
                   limit: int | None = None) -> EvalData:
    """Read a config's or manifest's split and load its images at the model's size."""
    records, source = _records(cap, data, split)
    chosen = [r for r in records if r.split == split]
    if not chosen:
        raise ValueError(f"no '{split}' pairs in {source}")
    if limit:
        keep = set(list(dict.fromkeys(r.image for r in chosen))[:limit])
        chosen = [r for r in chosen if r.image in keep]
    report = LoadReport()
    return EvalData(build_split(chosen, cap.image_size, cap.config.data.load_workers, report,
                                crop_margin=cap.crop_margin),
                    source, report)


def _heavy_atoms(split: SplitData) -> list[int] | None:
    """The manifest's ``heavy_atoms`` of every image, None unless all have one."""
    heavy = [m.get("heavy_atoms") for m in split.meta]
    return [int(h) for h in heavy] if all(h not in (None, "") for h in heavy) else None


@dataclass(frozen=True)
class Drawing:
    """How :func:`draw_eval_data` draws the molecules: a style of
    ``Choices().drawing_style``, the side in pixels and the seed of the style's random
    choices.

    Example:
        >>> Drawing("rdkit_default", 224)
        Drawing(style='rdkit_default', size=224, seed=0)
    """

    style: str
    size: int
    seed: int = 0


def _data_config(cap: Captioner, data: str | None) -> DataConfig | None:
    """The data config ``data`` names (the run's own without it; None for a manifest)."""
    if data is None:
        return cap.config.data
    if Path(data).suffix.lower() in (".yaml", ".yml"):
        return load_config(data).data
    return None


def eval_drawing(cap: Captioner, data: str | None = None, style: str | None = None,
                 size: int | None = None, seed: int = 0) -> Drawing | None:
    """How to draw the evaluated molecules, None to read the data's own image files.

    Drawn when ``style`` or ``size`` is given, or when the data has no pictures
    (``data.format: smiles``); the one not given comes from the data config's
    ``data.drawing.eval_style`` / ``eval_size`` (the run's, for a manifest).
    """
    cfg = _data_config(cap, data)
    if style is None and size is None and (cfg is None or cfg.format != "smiles"):
        return None
    drawing = (cfg or cap.config.data).drawing
    style = Choices().check("drawing_style", style or drawing.eval_style, key="style")
    return Drawing(style, size or drawing.eval_size, seed)


def split_smiles(cap: Captioner, data: str | None = None, split: str = "test",
                 limit: int | None = None) -> tuple[list[str], str]:
    """The distinct reference SMILES of ``split`` (the first ``limit``) and their source."""
    records, source = _records(cap, data, split)
    smiles = list(dict.fromkeys(r.text for r in records if r.split == split))
    if not smiles:
        raise ValueError(f"no '{split}' pairs in {source}")
    return smiles[:limit] if limit else smiles, source


def draw_eval_data(cap: Captioner, out_dir: str | Path, drawing: Drawing,
                   data: str | None = None, split: str = "test",
                   limit: int | None = None) -> tuple[EvalData, int]:
    """Draw the split's reference SMILES (:func:`split_smiles`) with
    :func:`captioner.data.drawing.render_smiles` into ``out_dir/images`` (listed in
    ``out_dir/manifest.csv``; style ``mix`` samples the run's own ``data.drawing``) and
    load those pictures: (the data, molecules that could not be drawn)."""
    smiles, source = split_smiles(cap, data, split, limit)
    summary = render_smiles(smiles, out_dir, size=drawing.size, style=drawing.style,
                            seed=drawing.seed, progress=False, mix=cap.config.data.drawing)
    records = read_any("csv", summary.manifest, None, "image", "smiles", None)
    records = [replace(r, split=split) for r in records]
    if not records:
        raise ValueError(f"none of the {len(smiles)} '{split}' molecules of {source} "
                         f"could be drawn in style {drawing.style}")
    report = LoadReport()
    loaded = build_split(records, cap.image_size, cap.config.data.load_workers, report,
                         crop_margin=cap.crop_margin)
    where = f"{source}, drawn {drawing.style} at {drawing.size} px"
    return EvalData(loaded, where, report), len(summary.skipped)


def _score(family: str, preds: list[str],
           split: SplitData) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Corpus metrics and per-example rows of ``preds``. SMILES molecules are scored once
    (the rows, with the manifest's heavy-atom counts) and the corpus figures summarise
    those rows, so ``metrics.json`` and ``predictions.csv`` agree by construction; caption
    metrics (BLEU, CIDEr-D, ...) are corpus statistics of their own."""
    if family == "smiles":
        rows = per_example_smiles_metrics(preds, split.references, _heavy_atoms(split))
        return smiles_summary(rows), rows
    return (compute_metrics(family, preds, split.references),
            per_example_caption_metrics(preds, split.references))


#: per-example columns of another reader in ``predictions.csv`` (prefixed by its name)
COMPARED_COLUMNS = ("valid", "exact_match", "exact_match_nostereo", "inchi_match", "tanimoto",
                    "error_kind")


def _read_with_osra(split: SplitData, log: Callable[[str], None]) -> OsraReadings | None:
    """OSRA's readings of the split's image files; None (and a logged message) when OSRA
    is not installed."""
    try:
        log(f"--compare osra: reading {split.num_images} images with OSRA")
        return read_images(split.paths)
    except OsraUnavailable as exc:
        log(f"--compare osra skipped: {exc}")
        return None


def _osra_columns(readings: OsraReadings, rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """``predictions.csv`` columns of OSRA: its prediction, per-example metrics (``rows``,
    from :func:`_score`), the number of structures it found, its error and seconds."""
    columns: dict[str, list[Any]] = {"osra_prediction": readings.smiles}
    columns.update({f"osra_{k}": [row[k] for row in rows] for k in COMPARED_COLUMNS})
    columns["osra_structures"] = [len(r.structures) for r in readings.results]
    columns["osra_error"] = [r.error or "" for r in readings.results]
    columns["osra_seconds"] = [f"{r.seconds:.3f}" for r in readings.results]
    return columns


def image_hw(path: str) -> tuple[int, int]:
    """(height, width) of an image file, read from its header (EXIF orientation applied)."""
    with Image.open(path) as im:
        width, height = ImageOps.exif_transpose(im).size if im.getexif() else im.size
    return height, width


def grounding_scores(cap: Captioner, gen: Generation, split: SplitData) -> dict[str, Any] | None:
    """Attention grounding where the data says where things are: shapes (object boxes,
    colour and shape words; whole pictures only) or rendered molecules (atom positions,
    atom tokens; moved into the cut picture when ``cap.crop_margin`` cuts it)."""
    metas = split.meta
    words = [cap.tokenizer.ids_to_tokens(t) for t in gen.tokens]
    attention = [gen.attention[i, :len(w)] for i, w in enumerate(words)]
    if metas and all(isinstance(m.get("objects"), list) for m in metas):
        if cap.crop_margin is not None:  # boxes of the whole picture
            return None
        hw = image_hw(split.paths[0])  # the shapes images all have one size
        out = shapes_grounding(words, attention, [m["objects"] for m in metas], hw, cap.grid_hw)
        return {**out, "kind": "shapes: colour and shape words, peak cell centre in the box"}
    if metas and all(isinstance(m.get("atoms"), list) for m in metas):
        refs = [r[0] for r in split.references]
        atoms = [m["atoms"] for m in metas]
        if cap.crop_margin is None:
            hws = [image_hw(p) for p in split.paths]
        else:  # positions in the cut picture the model read
            views = [cap.view(p) for p in split.paths]
            atoms = [[{**a, **dict(zip("xy", view.to_view(float(a["x"]), float(a["y"]))))}
                      for a in mol] for mol, view in zip(atoms, views, strict=True)]
            hws = [view.pixels.shape[:2] for view in views]
        out = molecule_grounding(words, attention, refs, atoms, hws, cap.grid_hw)
        return {**out, "kind": "molecules: atom tokens of exact predictions, peak cell = atom's"}
    return None


def _write_predictions(path: Path, gen: Generation, split: SplitData,
                       rows: list[dict[str, Any]],
                       extra: dict[str, list[Any]] | None = None) -> None:
    """One row per image: image, references, prediction, score, our per-example metrics,
    then the ``extra`` columns (name -> one value per image)."""
    first = ("image", "references", "prediction", "score")
    keys = [k for k in rows[0] if k not in first and not isinstance(rows[0][k], (list, dict))
            ] if rows else []
    extra = extra or {}
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([*first, *keys, *extra])
        for i, row in enumerate(rows):
            writer.writerow([split.paths[i], json.dumps(split.references[i]), gen.texts[i],
                             f"{gen.scores[i]:.5f}", *[row[k] for k in keys],
                             *[values[i] for values in extra.values()]])


def evaluate(run_dir: str | Path, out_dir: str | Path, data: str | None = None,
             split: str = "test", limit: int | None = None, metrics: str | None = None,
             report: bool = False, compare: Sequence[str] = (), style: str | None = None,
             size: int | None = None, draw_seed: int = 0,
             crop_margin: float | str | None = "run", log: Callable[[str], None] = print,
             **decode: Any) -> dict[str, Any]:
    """Decode ``split`` of ``data`` (the run's own data by default) and score it.

    ``decode`` takes the :meth:`Captioner.generate` options (``strategy``, ``beam_size``,
    ``n_best``, ``max_length``, ...). The metric family follows the tokenizer (words ->
    caption metrics, SMILES -> SMILES metrics) unless ``metrics`` says. ``report`` also
    writes ``index.html``: every image with its per-token attention, sortable by the
    per-example metrics and score.

    ``compare`` (values of ``Choices().compare``; SMILES metrics only): other readers of
    the same image files, scored with the same SMILES metrics into
    ``metrics["compare"][name]`` (plus their timings), side by side in ``metrics.md``, as
    ``<name>_*`` columns of ``predictions.csv`` and on the report page. A reader that is
    not installed is skipped with a logged message; the rest is written as usual.

    ``style`` (of ``Choices().drawing_style``) and ``size`` (pixels): draw the split's
    molecules into ``out_dir/images`` (seeded by ``draw_seed``; see
    :func:`eval_drawing` and :func:`draw_eval_data`) and evaluate those pictures, which the
    report and the other readers then see too. Data without pictures
    (``data.format: smiles``) is drawn by default in ``data.drawing.eval_style`` at
    ``eval_size`` px. ``metrics["style"]`` and ``metrics["image_px"]`` say how (None when
    the data's own image files were read).

    ``crop_margin``: our reader sees each picture file cut to its ink plus this margin
    (:func:`~captioner.data.images.load_view`; for drawings on white such as molecules),
    None the whole picture, ``"run"`` (the default) as the run's ``decode.crop_margin``
    says; other readers get the files as they are. The report draws the attention over
    the cut picture, and grounding moves the atoms' positions with the cut.
    ``metrics["crop_margin"]`` says which was used.
    """
    compare = tuple(dict.fromkeys(Choices().check("compare", c, key="compare")
                                  for c in compare))
    cap = Captioner.load(run_dir, crop_margin=crop_margin)
    family = metrics or metric_family(cap.tokenizer.kind)
    if compare and family != "smiles":
        raise ValueError(f"compare {', '.join(compare)}: other readers give SMILES, so it "
                         f"needs SMILES metrics, not {family}")
    drawing = eval_drawing(cap, data, style, size, draw_seed)
    undrawn = 0
    if drawing is None:
        ev = load_eval_data(cap, data, split, limit)
    else:
        log(f"drawing the '{split}' molecules: {drawing.style} at {drawing.size} px")
        ev, undrawn = draw_eval_data(cap, out_dir, drawing, data, split, limit)
    started = time.perf_counter()
    margins = cap.margin_views(decode.get("margin_views"))  # cut from the files again
    gen = cap.generate(ev.split.paths if margins else ev.split.images, **decode)
    seconds = time.perf_counter() - started
    result, rows = _score(family, gen.texts, ev.split)
    top_k = max(len(c) for c in gen.candidates) if gen.candidates else 1
    if family == "smiles" and top_k > 1:
        result["top_k"] = top_k
        result["exact_match_at_k"] = exact_match_at_k(
            [[c.text for c in cands] for cands in gen.candidates], ev.split.references)
    grounding = grounding_scores(cap, gen, ev.split)
    if grounding is not None:
        result["grounding"] = grounding.pop("grounding")
        result["grounding_detail"] = grounding
    options = cap.options(**{k: v for k, v in decode.items() if k != "max_length"})
    views = cap.rescore_views(options, decode.get("rescore_views"))
    result.update({"split": split, "data": ev.source, "images": ev.split.num_images,
                   "skipped_images": ev.report.count,
                   "decode": {**options.__dict__, "rescore_views": list(views),
                              "margin_views": list(margins)},
                   "images_per_s": ev.split.num_images / max(seconds, 1e-9),
                   "style": drawing.style if drawing else None,
                   "image_px": drawing.size if drawing else None,
                   "crop_margin": cap.crop_margin})
    if drawing is not None:
        result.update({"draw_seed": drawing.seed, "undrawn_molecules": undrawn})
    osra = _read_with_osra(ev.split, log) if "osra" in compare else None
    osra_columns = None
    if osra is not None:
        osra_metrics, osra_rows = _score("smiles", osra.smiles, ev.split)
        result["compare"] = {"osra": {**osra_metrics, **osra.summary()}}
        osra_columns = _osra_columns(osra, osra_rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "metrics.md").write_text(metrics_markdown(result))
    ev.report.write(out / "skipped_images.txt")
    _write_predictions(out / "predictions.csv", gen, ev.split, rows, osra_columns)
    if report:
        others = [{"OSRA": s} for s in osra.smiles] if osra is not None else None
        _write_report(cap, gen, ev.split, rows, out / "index.html", others)
    log(headline(result))
    for name, other in result.get("compare", {}).items():
        log(f"{name}: " + headline({**other, "split": split, "images": other["count"]}))
    return result


def _write_report(cap: Captioner, gen: Generation, split: SplitData,
                  rows: list[dict[str, Any]], path: Path,
                  others: list[dict[str, str]] | None = None) -> Path:
    """``index.html`` of the evaluation; ``others``: per image, other readers' SMILES by
    reader name (e.g. ``{"OSRA": "CCO"}``), drawn beside ours."""
    numeric = [{k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
               for row in rows]  # exact_match and friends become 0/1
    items = report_items(cap, gen, split.references, numeric, images=split.paths,
                         others=others)
    return write_report(items, path, cap.grid_hw, title=f"captioner evaluation: {path.parent}",
                        image_size=320)


def headline(result: dict[str, Any]) -> str:
    """One line with the main numbers of a metrics dict."""
    keys = (("bleu1", "BLEU-1"), ("bleu4", "BLEU-4"), ("cider_d", "CIDEr-D"),
            ("rouge_l", "ROUGE-L"), ("meteor", "METEOR"), ("exact_match", "exact"),
            ("validity", "valid"), ("tanimoto", "Tanimoto"), ("grounding", "grounding"))
    parts = [f"{label} {result[k]:.4f}" for k, label in keys if isinstance(result.get(k), float)]
    if isinstance(result.get("exact_match_at_k"), float):
        parts.append(f"exact in top {result['top_k']} {result['exact_match_at_k']:.4f}")
    return f"{result['split']} ({result['images']} images): " + ", ".join(parts)
