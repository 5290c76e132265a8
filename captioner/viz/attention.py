"""``attention``: per-token attention figures and an interactive page for some images.

For every image, ``OUTDIR/<name>.png`` is a Show, Attend and Tell style grid (the image,
then one panel per generated token with its attention upsampled over the whole image,
whatever its aspect ratio: the model saw the image resized to a square, so its grid
covers the full picture -- or, with ``decode.crop_margin``, the square cut around the
ink that it read, which the panels then show), and ``OUTDIR/index.html`` shows them all
interactively.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from captioner.generate.captioner import Captioner, Generation
from captioner.viz.figures import attention_figure
from captioner.viz.report import ReportItem, write_report


def figure_name(path: str, index: int, taken: set[str]) -> str:
    """A unique PNG file name for an image path (``cat.jpg`` -> ``cat.png``).

    Example:
        >>> taken = set(); figure_name("a/cat.jpg", 0, taken), figure_name("b/cat.jpg", 1, taken)
        ('cat.png', 'cat_1.png')
    """
    stem = Path(path).stem or f"image{index}"
    name = f"{stem}.png"
    if name in taken:
        name = f"{stem}_{index}.png"
    taken.add(name)
    return name


def write_figures(cap: Captioner, gen: Generation, out_dir: Path,
                  titles: Sequence[str] | None = None) -> list[Path]:
    """One PNG grid per image of ``gen`` (token panels over the original image)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    paths = []
    for i, image_path in enumerate(gen.images):
        tokens = cap.tokenizer.ids_to_tokens(gen.tokens[i])
        image = cap.view(image_path).pixels  # (H, W, 3): the picture, or the cut the model read
        title = titles[i] if titles else gen.texts[i]
        out = out_dir / figure_name(image_path, i, taken)
        paths.append(attention_figure(image, tokens, gen.attention[i], cap.grid_hw, out,
                                      title=title))
    return paths


def report_items(cap: Captioner, gen: Generation, references: Sequence[list[str]] | None = None,
                 metrics: Sequence[dict[str, Any]] | None = None,
                 images: Sequence[str] | None = None,
                 others: Sequence[dict[str, str]] | None = None) -> list[Any]:
    """:class:`captioner.report.ReportItem` for every image of ``gen`` (``images``: the
    files, when ``gen`` was decoded from arrays; ``others``: per image, other readers'
    SMILES by reader name, e.g. ``{"OSRA": "CCO"}``, drawn beside the prediction)."""
    items = []
    for i, image_path in enumerate(images or gen.images):
        tokens = cap.tokenizer.ids_to_tokens(gen.tokens[i])
        items.append(ReportItem(image_path=image_path, tokens=tokens,
                                attention=gen.attention[i, :len(tokens)],
                                prediction=gen.texts[i],
                                references=list(references[i]) if references else None,
                                score=float(gen.scores[i]),
                                metrics=dict(metrics[i]) if metrics else {},
                                others=dict(others[i]) if others else {},
                                crop_margin=cap.crop_margin))
    return items


def write_attention(run_dir: str | Path, images: Sequence[str], out_dir: str | Path,
                    log: Callable[[str], None] = print, crop_margin: float | str | None = "run",
                    **decode: Any) -> dict[str, Any]:
    """Caption ``images`` with a run and write the figures and ``index.html``
    (``crop_margin``: as :func:`captioner.evaluate.runs.evaluate`'s)."""
    cap = Captioner.load(run_dir, crop_margin=crop_margin)
    gen = cap.generate(list(images), **decode)
    out = Path(out_dir)
    figures = write_figures(cap, gen, out)
    page = write_report(report_items(cap, gen), out / "index.html", cap.grid_hw,
                        title=f"captioner attention: {Path(run_dir).name}")
    log(f"{len(figures)} attention figures and {page} in {out}")
    return {"figures": figures, "page": page, "generation": gen}
