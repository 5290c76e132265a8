"""Molecule pictures in many styles, from more than one drawing toolkit.

Training on ``data.format: smiles`` draws every example anew: :func:`sample_style` picks
a toolkit (RDKit, Indigo; Open Babel on request) and a style from the ranges of a
:class:`~captioner.config.DrawingConfig` -- canvas size and aspect ratio, bond width,
font size and face, colour or black-and-white labels, Kekulé or aromatic rings,
explicit hydrogens, labelled methyls or every carbon, rotation, RDKit's own layout or
CoordGen's, atoms moved a little off the layout, faint (grey) ink -- and
:func:`draw_example` draws the molecule, pads it to a square (never stretched), resizes
it and, for some pictures, adds scan-like damage with albumentations (blur, noise, JPEG,
binarisation, small elastic/perspective distortion). Every random choice comes from one
seed per example, so a picture is the same in any process and on any machine with the
same library versions.

Named styles (:func:`draw_named`) are fixed ways of drawing for evaluation:
``rdkit_plain`` (the black-and-white style of ``render-molecules``), ``rdkit_default``
(RDKit's MolDraw2D defaults: coloured heteroatom labels, as ``Draw.MolToImage``),
``indigo_default``, ``openbabel_default``, ``thin_rotated_bw`` (RDKit, 1 px lines,
black and white, a random rotation) and ``mix`` (one sample of the training mix).

This module imports neither TensorFlow nor Keras: drawing processes start quickly.

Example:
    >>> import numpy as np
    >>> from captioner.config import DrawingConfig
    >>> style = sample_style(DrawingConfig(), np.random.default_rng(0))
    >>> draw_example("c1ccccc1O", 64, DrawingConfig(), seed=0).shape
    (64, 64, 3)
"""

from __future__ import annotations

import functools
import io
import json
import os
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from captioner.choices import Choices
from captioner.config import DrawingConfig
from captioner.data.images import cut_square, ink_square
from captioner.data.molecules import (
    DrawStyle,
    RenderError,
    RenderLayout,
    RenderSummary,
    canonical_order,
    draw_molecule,
    jitter_points,
    parse_smiles,
    write_csv,
)


@dataclass(frozen=True)
class Damage:
    """Which scan-like degradations one picture gets (each with its own strength seed).

    Example:
        >>> Damage().any
        False
    """

    blur: bool = False
    noise: bool = False
    jpeg: bool = False
    binarize: bool = False
    distort: bool = False

    @property
    def any(self) -> bool:
        return self.blur or self.noise or self.jpeg or self.binarize or self.distort


@dataclass(frozen=True)
class Style:
    """The concrete style of one picture.

    ``bond_width`` is in pixels for a 224-pixel canvas (scaled with the canvas);
    ``font_scale`` multiplies the toolkit's default label size; ``margin`` is the extra
    white border added when padding to a square, as a fraction of the side; ``coordgen``
    lays RDKit's drawing out with CoordGen; ``jitter`` moves every atom off the layout by
    a Gaussian of that many mean bond lengths (0: none); ``ink`` is the fraction of its
    darkness the ink keeps (1: as drawn; 0.3: light grey).

    Example:
        >>> Style("rdkit", 200, 160).canvas
        (200, 160)
    """

    toolkit: str
    width: int
    height: int
    rotate: float = 0.0
    bond_width: float = 2.0
    font_scale: float = 1.0
    colour: bool = False
    aromatic: bool = False
    explicit_h: bool = False
    explicit_methyl: bool = False
    all_carbons: bool = False
    serif: bool = False
    margin: float = 0.0
    coordgen: bool = False
    jitter: float = 0.0
    ink: float = 1.0
    damage: Damage = Damage()
    seed: int = 0  # strengths of the damage

    @property
    def canvas(self) -> tuple[int, int]:
        return self.width, self.height


def example_seed(*keys: int) -> int:
    """A drawing seed derived from ``keys`` (e.g. run seed, epoch, position), the same
    on every machine.

    Example:
        >>> example_seed(0, 1, 5) == example_seed(0, 1, 5) != example_seed(0, 2, 5)
        True
    """
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0] >> 1)


def _between(lo_hi: list[float] | list[int], u: float) -> float:
    """The value at the fraction ``u`` of the way through ``lo_hi``."""
    return float(lo_hi[0] + (lo_hi[1] - lo_hi[0]) * u)


def _uniform(rng: np.random.Generator, lo_hi: list[float] | list[int]) -> float:
    return _between(lo_hi, rng.random())


def sample_style(cfg: DrawingConfig, rng: np.random.Generator) -> Style:
    """A random :class:`Style` from ``cfg``'s ranges; each example's style depends on
    its seed alone. ``coordgen`` and ``ink``, then ``jitter``, are drawn after every
    other field, so a seed gives the older fields the values it gave before these
    existed."""
    weights = np.asarray(cfg.toolkit_weights, float)
    toolkit = cfg.toolkits[int(rng.choice(len(cfg.toolkits), p=weights / weights.sum()))]
    side = _uniform(rng, cfg.canvas_range)
    aspect = _uniform(rng, cfg.aspect_range)  # width / height
    width, height = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
    u = rng.random(14)
    damaged = u[9] < cfg.degrade_prob
    damage = Damage(blur=bool(damaged and u[10] < cfg.blur_prob),
                    noise=bool(damaged and u[11] < cfg.noise_prob),
                    jpeg=bool(damaged and u[12] < cfg.jpeg_prob),
                    binarize=bool(damaged and u[13] < cfg.binarize_prob),
                    distort=bool(damaged and rng.random() < cfg.distort_prob))
    bond_width = _uniform(rng, cfg.bond_width_range)
    font_scale = _uniform(rng, cfg.font_scale_range)
    margin = _uniform(rng, cfg.margin_range)
    seed = int(rng.integers(2**31 - 1))
    v = rng.random(2)  # drawn last: the older fields keep their values per seed
    ink = _uniform(rng, cfg.faint_ink_range) if v[1] < cfg.faint_ink_prob else 1.0
    w = rng.random(2)  # after the ink: coordgen and ink keep their values per seed
    jitter = _between(cfg.layout_jitter_range, w[1]) if w[0] < cfg.layout_jitter_prob else 0.0
    return Style(
        toolkit=toolkit, width=max(32, round(width)), height=max(32, round(height)),
        rotate=360.0 * u[0] if u[1] < cfg.rotate_prob else 0.0,
        bond_width=bond_width, font_scale=font_scale,
        colour=bool(u[2] < cfg.colour_prob), aromatic=bool(u[3] < cfg.aromatic_prob),
        explicit_h=bool(u[4] < cfg.explicit_h_prob),
        explicit_methyl=bool(u[5] < cfg.explicit_methyl_prob),
        all_carbons=bool(u[6] < cfg.all_carbons_prob), serif=bool(u[7] < cfg.serif_prob),
        margin=margin, damage=damage, seed=seed, coordgen=bool(v[0] < cfg.coordgen_prob),
        ink=ink, jitter=jitter)


# ---- toolkits ------------------------------------------------------------------------------
@functools.cache
def _font(serif: bool) -> str | None:
    """A TrueType file of the system's DejaVu/Liberation fonts, or None (built-in)."""
    names = (("DejaVuSerif.ttf", "LiberationSerif-Regular.ttf") if serif
             else ("DejaVuSans.ttf", "LiberationSans-Regular.ttf"))
    for root in ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts"):
        for folder, _, files in os.walk(root):
            for name in names:
                if name in files:
                    return os.path.join(folder, name)
    return None


def _draw_rdkit(smiles: str, style: Style) -> tuple[Image.Image, list[tuple[float, float]]]:
    """RDKit (Cairo): the picture and each atom's pixel, in the molecule's atom order."""
    rd = DrawStyle(rotate=style.rotate, bond_width=style.bond_width,
                   font_scale=0.6 * style.font_scale,
                   min_font_size=round(7 * style.font_scale),
                   max_font_size=round(24 * style.font_scale), padding=0.05,
                   colour=style.colour, explicit_methyl=style.explicit_methyl,
                   explicit_h=style.explicit_h, aromatic=style.aromatic,
                   font_file=_font(style.serif) if style.serif else None,
                   all_carbons=style.all_carbons, coordgen=style.coordgen,
                   jitter=style.jitter, jitter_seed=style.seed)
    png, coords = draw_molecule(parse_smiles(smiles), style.canvas, rd)
    return Image.open(io.BytesIO(png)).convert("RGB"), coords


@functools.cache
def _indigo() -> tuple[Any, Any]:
    """This process's Indigo instance and renderer (one per process, made on first use)."""
    try:
        from indigo import Indigo
        from indigo.renderer import IndigoRenderer
    except ImportError as exc:
        raise ImportError("drawing with Indigo needs epam-indigo: pip install epam-indigo") \
            from exc
    indigo = Indigo()
    return indigo, IndigoRenderer(indigo)


@functools.cache
def _scratch_png() -> str:
    """This process's scratch file for Indigo's PNGs (in memory where /dev/shm exists):
    writing a file is far faster than the bindings' byte-by-byte ``renderToBuffer``."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    handle, path = tempfile.mkstemp(suffix=".png", prefix="captioner-indigo-", dir=folder)
    os.close(handle)
    weakref.finalize(_scratch_png, os.unlink, path)
    return path


def _move_indigo(mol: Any, degrees: float, jitter: float, seed: int) -> None:
    """Lay out ``mol``, turn its 2D coordinates and move its atoms by ``jitter`` mean bond
    lengths (:func:`~captioner.data.molecules.jitter_points`); Indigo draws the
    coordinates it has."""
    mol.layout()
    atoms = list(mol.iterateAtoms())
    xy = np.asarray([atom.xyz()[:2] for atom in atoms], float).reshape(-1, 2)  # (N, 2)
    angle = np.radians(degrees)
    cos, sin = float(np.cos(angle)), float(np.sin(angle))
    xy = xy @ np.array([[cos, sin], [-sin, cos]])  # (x, y) -> (cos x - sin y, sin x + cos y)
    if jitter > 0:
        index = {atom.index(): k for k, atom in enumerate(atoms)}
        bonds = [(index[b.source().index()], index[b.destination().index()])
                 for b in mol.iterateBonds()]
        xy = jitter_points(xy, bonds, jitter, seed)
    for atom, (x, y) in zip(atoms, xy):
        atom.setXYZ(float(x), float(y), 0.0)


def _draw_indigo(smiles: str, style: Style) -> Image.Image:
    """Indigo: aromatic rings as circles or Kekulé, hetero/terminal/all-atom labels,
    implicit hydrogens shown or explicit ones drawn, turned by ``style.rotate``."""
    from indigo import IndigoException

    indigo, renderer = _indigo()
    scale = min(style.canvas) / 224
    try:
        mol = indigo.loadMolecule(smiles)
        mol.aromatize() if style.aromatic else mol.dearomatize()
        if style.explicit_h:
            mol.unfoldHydrogens()
        if style.rotate or style.jitter:
            _move_indigo(mol, style.rotate, style.jitter, style.seed)
        indigo.setOption("render-output-format", "png")
        indigo.setOption("render-image-size", style.width, style.height)
        indigo.setOption("render-background-color", "1,1,1")
        indigo.setOption("render-coloring", style.colour)
        indigo.setOption("render-label-mode", "all" if style.all_carbons else "terminal-hetero")
        indigo.setOption("render-implicit-hydrogens-visible", True)
        indigo.setOption("render-relative-thickness", max(0.5, style.bond_width / 2.0))
        indigo.setOption("render-bond-line-width", max(1.0, style.bond_width * scale))
        indigo.setOption("render-margins", 4, 4)
        renderer.renderToFile(mol, _scratch_png())
    except IndigoException as exc:
        raise RenderError(f"Indigo could not draw {smiles!r}: {exc}") from exc
    with Image.open(_scratch_png()) as image:
        return image.convert("RGB")


def _draw_openbabel(smiles: str, style: Style) -> Image.Image:
    """Open Babel's own 2D depiction (its default PNG, 300 px), resized to the canvas."""
    try:
        from openbabel import pybel
    except ImportError as exc:
        raise ImportError("drawing with Open Babel needs it: pip install openbabel-wheel") \
            from exc
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mol.png"
        try:
            pybel.readstring("smi", smiles).draw(show=False, filename=str(path))
            image = Image.open(path).convert("RGB")
        except (OSError, ValueError) as exc:
            raise RenderError(f"Open Babel could not draw {smiles!r}: {exc}") from exc
    return image.resize(style.canvas, Image.Resampling.LANCZOS)


def draw_canvas(smiles: str, style: Style) -> Image.Image:
    """The molecule drawn on ``style``'s canvas by its toolkit (rotation included)."""
    return _canvas_and_atoms(smiles, style)[0]


def _canvas_and_atoms(smiles: str, style: Style
                      ) -> tuple[Image.Image, list[tuple[float, float]] | None]:
    """:func:`draw_canvas` and each atom's pixel on the canvas, in the molecule's atom
    order (RDKit), or None (the toolkits that do not report positions)."""
    Choices().check("toolkit", style.toolkit)
    if style.toolkit == "rdkit":
        return _draw_rdkit(smiles, style)
    if style.toolkit == "indigo":
        return _draw_indigo(smiles, style), None
    image = _draw_openbabel(smiles, style)
    if style.rotate:
        image = image.rotate(style.rotate, Image.Resampling.BICUBIC, expand=True,
                             fillcolor=(255, 255, 255))
    return image, None


# ---- square, resize, damage ------------------------------------------------------------------
def to_square(image: Image.Image, size: int, margin: float = 0.0) -> tuple[Image.Image, Any]:
    """Pad ``image`` with white to a square (plus ``margin`` of the side on each edge),
    then resize to ``size``; returns the image and a function mapping (x, y) pixels of
    the input to the output.

    Example:
        >>> from PIL import Image
        >>> im, where = to_square(Image.new("RGB", (100, 50), "white"), 50)
        >>> im.size, where(50.0, 25.0)
        ((50, 50), (25.0, 25.0))
    """
    width, height = image.size
    side = round(max(width, height) * (1 + 2 * margin))
    left, top = (side - width) // 2, (side - height) // 2
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, (left, top))
    scale = size / side

    def where(x: float, y: float) -> tuple[float, float]:
        return (x + left) * scale, (y + top) * scale

    return square.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0), where


@functools.cache
def _damage_transforms() -> dict[str, Any]:
    """The albumentations transforms, each always applied when chosen (p=1)."""
    try:
        import albumentations as A  # noqa: N812 (the library's own convention)
    except ImportError as exc:
        raise ImportError("scan-like damage needs albumentations: pip install albumentations") \
            from exc
    return {
        "distort": A.OneOf([A.Perspective(scale=(0.01, 0.05), fill=255, p=1.0),
                            A.ElasticTransform(alpha=8, sigma=4, fill=255, p=1.0),
                            A.Affine(shear=(-8, 8), scale=(0.9, 1.05), fill=255, p=1.0)],
                           p=1.0),
        "blur": A.OneOf([A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 1.0), p=1.0),
                         A.MotionBlur(blur_limit=(3, 5), p=1.0)], p=1.0),
        "noise": A.GaussNoise(std_range=(0.02, 0.12), per_channel=False, p=1.0),
        "jpeg": A.ImageCompression(quality_range=(20, 80), p=1.0),
    }


def faint(pixels: np.ndarray, ink: float) -> np.ndarray:
    """Lighten the ink of a picture on white: each pixel keeps the fraction ``ink`` of its
    darkness (``255 - (255 - p) * ink``), so black lines turn grey and white stays white.

    Example:
        >>> faint(np.array([[[0, 128, 255]]], np.uint8), 0.5).tolist()
        [[[128, 192, 255]]]
    """
    if ink >= 1.0:
        return pixels
    lighter = 255.0 - (255.0 - pixels.astype(np.float32)) * ink
    return np.rint(lighter).astype(np.uint8)


def damage(pixels: np.ndarray, which: Damage, seed: int) -> np.ndarray:
    """Scan-like degradation of an (H, W, 3) uint8 picture, seeded.

    Order: distortion, blur, binarisation (black ink on white: a grey-level threshold
    35-80% of the way from the darkest pixel to white), noise, JPEG.
    """
    if not which.any:
        return pixels
    transforms = _damage_transforms()
    rng = np.random.default_rng(seed)
    for name in ("distort", "blur"):
        if getattr(which, name):
            transforms[name].set_random_seed(int(rng.integers(2**31 - 1)))
            pixels = transforms[name](image=pixels)["image"]
    if which.binarize:  # threshold between the darkest ink and white: ink never vanishes
        grey = pixels.mean(axis=-1, keepdims=True)
        darkest = float(grey.min())
        threshold = darkest + rng.uniform(0.35, 0.8) * (255.0 - darkest)
        pixels = np.where(grey <= threshold, 0, 255).astype(np.uint8)
        pixels = np.repeat(pixels, 3, axis=-1)
    for name in ("noise", "jpeg"):
        if getattr(which, name):
            transforms[name].set_random_seed(int(rng.integers(2**31 - 1)))
            pixels = transforms[name](image=pixels)["image"]
    return np.ascontiguousarray(pixels, dtype=np.uint8)


def _crop_canvas(canvas: Image.Image, coords: list[tuple[float, float]] | None,
                 margin: float) -> tuple[Image.Image, list[tuple[float, float]] | None]:
    """``canvas`` cut to its ink with ``margin`` (:func:`~captioner.data.images.crop_to_ink`,
    as ``evaluate --crop-margin`` reads a picture) and the atoms' pixels moved with it."""
    box = ink_square(canvas, margin)
    if box is None:
        return canvas, coords
    x0, y0, _ = box
    moved = None if coords is None else [(x - x0, y - y0) for x, y in coords]
    return cut_square(canvas, box), moved


# ---- what callers use -----------------------------------------------------------------------
def draw_example(smiles: str, size: int, cfg: DrawingConfig, seed: int) -> np.ndarray:
    """One training picture of ``smiles``: (size, size, 3) uint8 in a style sampled with
    ``seed`` from ``cfg``. Raises :class:`RenderError` when no toolkit can draw it."""
    return draw_example_atoms(smiles, size, cfg, seed)[0]


def draw_example_atoms(smiles: str, size: int, cfg: DrawingConfig, seed: int
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`draw_example` and where its atoms are: the picture and each atom's (x, y)
    pixel in it, (N_atoms, 2) float32 in the order the atoms are written in ``smiles``
    -- or None when the drawer does not report positions (Indigo, Open Babel) or the
    picture was distorted (the positions would be off).

    Example:
        >>> cfg = DrawingConfig(toolkits=["rdkit"], toolkit_weights=[1.0], degrade_prob=0.0)
        >>> pixels, xy = draw_example_atoms("CCO", 64, cfg, seed=0)
        >>> pixels.shape, xy.shape, bool(((xy >= 0) & (xy <= 64)).all())
        ((64, 64, 3), (3, 2), True)
    """
    style = sample_style(cfg, np.random.default_rng(seed))
    try:
        canvas, coords = _canvas_and_atoms(smiles, style)
    except RenderError:  # Indigo / Open Babel failed: RDKit draws it (positions not used)
        if style.toolkit == "rdkit":
            raise
        canvas, coords = draw_canvas(smiles, Style("rdkit", style.width, style.height)), None
    if cfg.crop_to_ink:
        canvas, coords = _crop_canvas(canvas, coords, style.margin)
        square, where = to_square(canvas, size)
    else:
        square, where = to_square(canvas, size, style.margin)
    pixels = faint(np.asarray(square, dtype=np.uint8), style.ink)
    pixels = damage(pixels, style.damage, style.seed)
    if coords is None or style.damage.distort:
        return pixels, None
    return pixels, np.asarray([where(x, y) for x, y in coords], np.float32)  # (N_atoms, 2)


@dataclass(frozen=True)
class DrawnBatch:
    """What :func:`draw_batch` drew: ``images`` (N, S, S, 3) uint8, the SMILES no toolkit
    could draw (``failed``; their pictures are left white for the caller to count) and,
    per picture, its atoms' pixels (``atoms[i]``: (N_atoms, 2) float32 or None, see
    :func:`draw_example_atoms`)."""

    images: np.ndarray
    failed: list[str]
    atoms: list[np.ndarray | None]


def draw_batch(items: list[tuple[str, int]], size: int, cfg: DrawingConfig) -> DrawnBatch:
    """Pictures of ``(smiles, seed)`` pairs (:func:`draw_example_atoms` each).

    Example:
        >>> batch = draw_batch([("CCO", 0), ("not a molecule", 1)], 32, DrawingConfig())
        >>> batch.images.shape, batch.failed, int(batch.images[1].min())
        ((2, 32, 32, 3), ['not a molecule'], 255)
    """
    out = np.full((len(items), size, size, 3), 255, np.uint8)
    failed, atoms = [], []
    for i, (smiles, seed) in enumerate(items):
        try:
            out[i], xy = draw_example_atoms(smiles, size, cfg, seed)
        except RenderError:
            failed.append(smiles)
            xy = None
        atoms.append(xy)
    return DrawnBatch(out, failed, atoms)


def named_style(name: str, rng: np.random.Generator, size: int) -> Style | None:
    """The :class:`Style` of a named style at ``size`` px (``None`` for ``rdkit_default``
    and ``openbabel_default``, which use the toolkit's own defaults, and for ``mix``,
    sampled per picture by :func:`draw_example`)."""
    Choices().check("drawing_style", name)
    if name == "rdkit_plain":
        return Style("rdkit", size, size, bond_width=2.0, font_scale=1.0, colour=False)
    if name == "thin_rotated_bw":
        return Style("rdkit", size, size, rotate=float(rng.uniform(0, 360)), bond_width=1.0,
                     font_scale=1.0, colour=False)
    if name == "indigo_default":
        return Style("indigo", size, size, bond_width=2.0, colour=True)
    return None


def _rdkit_default(smiles: str, size: int) -> tuple[Image.Image, list[tuple[float, float]]]:
    """RDKit's MolDraw2DCairo with its default options (what ``Draw.MolToImage`` draws)."""
    from rdkit.Chem.Draw import rdMolDraw2D

    mol = parse_smiles(smiles)
    drawer = rdMolDraw2D.MolDraw2DCairo(size, size)
    rdMolDraw2D.PrepareAndDrawMolecule(drawer, mol)
    drawer.FinishDrawing()
    coords = [drawer.GetDrawCoords(i) for i in range(mol.GetNumAtoms())]
    image = Image.open(io.BytesIO(drawer.GetDrawingText())).convert("RGB")
    return image, [(float(p.x), float(p.y)) for p in coords]


def draw_named(smiles: str, style: str, size: int, seed: int = 0,
               mix: DrawingConfig | None = None
               ) -> tuple[Image.Image, str, list[dict[str, Any]] | None]:
    """``smiles`` in the named ``style`` at ``size`` x ``size`` px: (image, canonical
    SMILES, atoms in canonical order with their pixel or None when the toolkit does not
    report positions). Style ``mix`` draws one sample of the drawing config ``mix`` (a
    run's ``data.drawing``; the default :class:`DrawingConfig` when None). Raises
    :class:`RenderError` for unusable input.

    Example:
        >>> image, canonical, atoms = draw_named("OCC", "rdkit_default", 96)
        >>> image.size, canonical, [a["symbol"] for a in atoms]
        ((96, 96), 'CCO', ['C', 'C', 'O'])
    """
    mol = parse_smiles(smiles)
    canonical, order = canonical_order(mol)
    spec = named_style(style, np.random.default_rng(seed), size)
    coords = None
    if style == "rdkit_default":
        image, coords = _rdkit_default(canonical, size)
        mol = parse_smiles(canonical)
        order = list(range(mol.GetNumAtoms()))
    elif style == "openbabel_default":
        image, _ = to_square(_draw_openbabel(canonical, Style("openbabel", 300, 300)), size)
    elif style == "mix":
        image = Image.fromarray(draw_example(canonical, size, mix or DrawingConfig(), seed))
    elif spec.toolkit == "rdkit":
        image, coords = _draw_rdkit(smiles, spec)
    else:
        image, _ = to_square(draw_canvas(canonical, spec), size)
    atoms = None if coords is None else [
        {"symbol": mol.GetAtomWithIdx(i).GetSymbol(),
         "x": round(coords[i][0], 2), "y": round(coords[i][1], 2)} for i in order]
    return image, canonical, atoms


def render_smiles(smiles: Sequence[str], out_dir: str | Path, size: int = 224,
                  style: str = "rdkit_plain", seed: int = 0, progress: bool = True,
                  lines: Sequence[int] | None = None,
                  mix: DrawingConfig | None = None) -> RenderSummary:
    """Draw each SMILES in the named ``style`` at ``size`` px into ``out_dir``: the
    ``render-molecules`` layout (``images/mol_NNNNNN.png`` named by position,
    ``manifest.csv`` with image, smiles (canonical), heavy_atoms, atoms -- empty for
    toolkits that do not report atom positions -- and ``skipped.csv`` with the
    ``line`` (``lines[i]``, e.g. the CSV line, else the 0-based position), SMILES and
    reason of what could not be drawn).
    Molecule ``i`` uses the seed (``seed``, ``i``), so a rerun draws the same pictures.
    ``mix`` is the drawing config the ``mix`` style samples from (:func:`draw_named`).

    Example::

        summary = render_smiles(["CCO", "c1ccccc1"], "runs/eval/thin", 256,
                                "thin_rotated_bw")
        summary.rendered, summary.manifest   # 2, runs/eval/thin/manifest.csv
    """
    from tqdm import tqdm

    Choices().check("drawing_style", style)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    layout, records, skipped = RenderLayout(), [], []
    for i, text in enumerate(tqdm(smiles, desc=f"draw {style}", unit="mol",
                                  disable=not progress)):
        try:
            image, canonical, atoms = draw_named(text, style, size, example_seed(seed, i), mix)
        except RenderError as exc:
            skipped.append({"line": lines[i] if lines is not None else i, "smiles": text,
                            "reason": str(exc)})
            continue
        name = f"images/mol_{i:06d}.png"
        image.save(out / name, format="PNG")
        heavy = parse_smiles(canonical).GetNumHeavyAtoms()
        records.append({"image": name, "smiles": canonical, "heavy_atoms": heavy,
                        "atoms": "" if atoms is None else json.dumps(atoms,
                                                                     separators=(",", ":"))})
    write_csv(out / "manifest.csv", layout.manifest_columns, records)
    write_csv(out / "skipped.csv", layout.skipped_columns, skipped)
    params = {"style": style, "size": size, "seed": seed, "molecules": len(smiles)}
    return RenderSummary(len(records), [(r["line"], r["smiles"], r["reason"]) for r in skipped],
                         out / "manifest.csv", params=params)


__all__ = ["Damage", "DrawnBatch", "Style", "damage", "draw_batch", "draw_canvas",
           "draw_example", "draw_example_atoms", "draw_named", "example_seed", "faint",
           "named_style", "render_smiles", "sample_style", "to_square"]
