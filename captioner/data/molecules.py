"""Render SMILES strings to molecule pictures (RDKit) with a per-atom pixel manifest.

``render_molecules`` reads a CSV with a SMILES column and writes::

    out_dir/images/mol_000000.png   one PNG per rendered row (named by 0-based data row)
    out_dir/manifest.csv            image, smiles (canonical), heavy_atoms, atoms[, selfies]
    out_dir/skipped.csv             line, smiles, reason   (rows that could not be rendered)
    out_dir/render.json             parameters + input size/mtime (idempotence key)

``atoms`` is a JSON list with one ``{"symbol", "x", "y"}`` entry per atom, in the order
the atoms appear in the canonical SMILES (RDKit's ``_smilesAtomOutputOrder``), with
``x, y`` the atom's pixel position in the saved PNG.  ``atom_tokens_positions`` pairs
these entries with the atom tokens of the canonical SMILES, e.g. to check where
attention falls while a model writes each atom.

Example::

    summary = render_molecules("qm9.csv", "data/qm9_img", limit=1000, augment=True)
    print(summary.rendered, len(summary.skipped), summary.manifest)
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from captioner.data.manifests import csv_rows
from captioner.data.tokenizers import SmilesTokenizer

if TYPE_CHECKING:
    from PIL import Image


class RenderError(ValueError):
    """A SMILES string that cannot be parsed, sanitized, drawn or encoded."""


@dataclass(frozen=True)
class RenderLayout:
    """Output files and work split of ``render_molecules`` (immutable).

    ``format_version`` is part of the ``render.json`` idempotence key; ``max_chunk`` caps
    the molecules per worker task.

    Example:
        >>> RenderLayout().manifest_columns
        ('image', 'smiles', 'heavy_atoms', 'atoms')
    """

    format_version: int = 1
    manifest_columns: tuple[str, ...] = ("image", "smiles", "heavy_atoms", "atoms")
    skipped_columns: tuple[str, ...] = ("line", "smiles", "reason")
    max_chunk: int = 32


@dataclass(frozen=True)
class RenderOptions:
    """Drawing defaults and augmentation ranges/probabilities.

    The plain style (``augment=False``) uses the scalar fields; augmentation samples
    each image's style from the ``*_range`` / ``*_prob`` fields.

    Example:
        >>> RenderOptions().bond_width
        2.0
        >>> RenderOptions(colour_prob=0.0).colour_prob
        0.0
    """

    bond_width: float = 2.0
    font_scale: float = 0.6  # RDKit baseFontSize (relative to bond length)
    min_font_size: int = 7  # pixels at size 224, scaled with the image size
    max_font_size: int = 24  # idem: keeps labels of tiny molecules from ballooning
    padding: float = 0.05
    colour: bool = False  # default: black-and-white atom palette
    kekulize: bool = True  # False: aromatic bonds drawn as solid + dashed lines
    rotate_range: tuple[float, float] = (0.0, 360.0)
    bond_width_range: tuple[float, float] = (1.0, 3.0)
    font_scale_range: tuple[float, float] = (0.45, 0.85)
    padding_range: tuple[float, float] = (0.02, 0.12)
    colour_prob: float = 0.3
    explicit_methyl_prob: float = 0.3
    explicit_h_prob: float = 0.15
    aromatic_prob: float = 0.3
    blur_prob: float = 0.3
    blur_radius_range: tuple[float, float] = (0.3, 1.0)
    noise_prob: float = 0.3
    noise_sigma_range: tuple[float, float] = (2.0, 10.0)


@dataclass(frozen=True)
class DrawStyle:
    """The concrete style of one picture (sampled from ``RenderOptions`` when augmenting).

    Example:
        >>> DrawStyle.plain(RenderOptions()).rotate
        0.0
    """

    rotate: float = 0.0
    bond_width: float = 2.0
    font_scale: float = 0.6
    min_font_size: int = 7
    max_font_size: int = 24
    padding: float = 0.05
    colour: bool = False
    explicit_methyl: bool = False
    explicit_h: bool = False
    aromatic: bool = False
    blur_radius: float = 0.0
    noise_sigma: float = 0.0
    font_file: str | None = None  # a TrueType file; None: RDKit's built-in font
    all_carbons: bool = False  # label every carbon "C", not only the heteroatoms
    coordgen: bool = False  # lay out with CoordGen instead of RDKit's own depictor
    jitter: float = 0.0  # atoms moved by a Gaussian of this many mean bond lengths
    jitter_seed: int = 0

    @classmethod
    def plain(cls, options: RenderOptions) -> DrawStyle:
        return cls(bond_width=options.bond_width, font_scale=options.font_scale,
                   min_font_size=options.min_font_size,
                   max_font_size=options.max_font_size, padding=options.padding,
                   colour=options.colour, aromatic=not options.kekulize)

    @classmethod
    def sample(cls, options: RenderOptions, rng: np.random.Generator) -> DrawStyle:
        """Draw a random style; always consumes the same number of random values."""
        u = rng.random(8)

        def pick(lo_hi: tuple[float, float], v: float) -> float:
            return float(lo_hi[0] + (lo_hi[1] - lo_hi[0]) * v)

        blur = pick(options.blur_radius_range, rng.random())
        noise = pick(options.noise_sigma_range, rng.random())
        return cls(
            rotate=pick(options.rotate_range, u[0]),
            bond_width=pick(options.bond_width_range, u[1]),
            font_scale=pick(options.font_scale_range, u[2]),
            min_font_size=options.min_font_size,
            max_font_size=options.max_font_size,
            padding=pick(options.padding_range, rng.random()),
            colour=bool(u[3] < options.colour_prob),
            explicit_methyl=bool(u[4] < options.explicit_methyl_prob),
            explicit_h=bool(u[5] < options.explicit_h_prob),
            aromatic=bool(u[6] < options.aromatic_prob),
            blur_radius=blur if u[7] < options.blur_prob else 0.0,
            noise_sigma=noise if rng.random() < options.noise_prob else 0.0,
        )


@dataclass
class RenderSummary:
    """Result of ``render_molecules``.

    ``skipped`` holds ``(line number in the CSV incl. header, smiles, reason)``;
    ``cached`` is True when an up-to-date render was found and nothing was redone.
    """

    rendered: int
    skipped: list[tuple[int, str, str]]
    manifest: Path
    cached: bool = False
    params: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- RDKit helpers


def _rdkit() -> Any:
    try:
        from rdkit import Chem
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "rendering molecules needs RDKit: pip install rdkit "
            "(or pip install 'captioner[molecules]')"
        ) from exc
    return Chem


def _selfies() -> Any:
    try:
        import selfies
    except ImportError as exc:
        raise ImportError("the SELFIES column needs the selfies package: pip install selfies") \
            from exc
    return selfies


def _clean_log(text: str) -> str:
    timestamp = re.compile(r"^\[\d\d:\d\d:\d\d\]\s*")  # RDKit's "[HH:MM:SS] " prefix
    lines = [timestamp.sub("", line).strip() for line in text.splitlines()]
    return "; ".join(dict.fromkeys(line for line in lines if line))


def parse_smiles(smiles: str) -> Any:
    """Parse and sanitize a SMILES string, raising ``RenderError`` with RDKit's reason.

    RDKit's own error output is captured (not printed).

    Example:
        >>> parse_smiles("OCC").GetNumAtoms()
        3
        >>> parse_smiles("C1CC")
        Traceback (most recent call last):
        ...
        captioner.data.molecules.RenderError: SMILES Parse Error: unclosed ring for input: 'C1CC'
    """
    chem = _rdkit()
    from rdkit import rdBase

    if not smiles.strip():
        raise RenderError("empty SMILES")
    capture = getattr(rdBase, "CaptureErrorLog", None)
    if capture is None:  # older RDKit: silence only
        with rdBase.BlockLogs():
            mol = chem.MolFromSmiles(smiles)
        log = ""
    else:
        with capture() as cap:
            mol = chem.MolFromSmiles(smiles)
        log = cap.messages
    if mol is None:
        raise RenderError(_clean_log(log) or "RDKit could not parse the SMILES")
    if mol.GetNumAtoms() == 0:
        raise RenderError("SMILES has no atoms")
    return mol


def canonical_order(mol: Any) -> tuple[str, list[int]]:
    """Isomeric canonical SMILES and the atom indices in the order they are written.

    Example:
        >>> canonical_order(parse_smiles("OCC"))
        ('CCO', [2, 1, 0])
    """
    chem = _rdkit()
    smiles = chem.MolToSmiles(mol, isomericSmiles=True, canonical=True)
    order = json.loads(mol.GetProp("_smilesAtomOutputOrder").replace(",]", "]"))
    return smiles, [int(i) for i in order]


# --------------------------------------------------------------------------- drawing


def _configure(drawer: Any, style: DrawStyle, size: int) -> None:
    """Apply ``style`` to an RDKit drawer whose shorter side is ``size`` pixels."""
    opts = drawer.drawOptions()
    opts.rotate = style.rotate
    opts.bondLineWidth = max(1, round(style.bond_width * size / 224))
    opts.baseFontSize = style.font_scale
    opts.minFontSize = max(1, round(style.min_font_size * size / 224))
    opts.maxFontSize = max(opts.minFontSize, round(style.max_font_size * size / 224))
    opts.padding = style.padding
    opts.explicitMethyl = style.explicit_methyl
    opts.setBackgroundColour((1.0, 1.0, 1.0, 1.0))
    opts.clearBackground = True
    opts.includeMetadata = False
    if style.font_file:
        opts.fontFile = style.font_file
    if not style.colour:
        opts.useBWAtomPalette()


def jitter_points(xy: np.ndarray, bonds: list[tuple[int, int]], sigma: float,
                  seed: int) -> np.ndarray:
    """A molecule's 2D layout with every atom moved by a Gaussian of ``sigma`` mean bond
    lengths (seeded): the same molecule with bond lengths and angles off by a little, as
    other layout programs and hand drawings place it. ``xy``: (N_atoms, 2).

    Example:
        >>> xy = np.array([[0.0, 0.0], [1.5, 0.0], [3.0, 0.0]])
        >>> moved = jitter_points(xy, [(0, 1), (1, 2)], 0.1, seed=0)
        >>> moved.shape, bool(np.abs(moved - xy).max() < 0.6)
        ((3, 2), True)
        >>> bool((jitter_points(xy, [(0, 1), (1, 2)], 0.1, seed=0) == moved).all())
        True
    """
    lengths = [float(np.hypot(*(xy[i] - xy[j]))) for i, j in bonds]
    scale = float(np.mean(lengths)) if lengths else 1.0
    noise = np.random.default_rng(seed).normal(0.0, sigma * scale, xy.shape)
    return xy + noise


def _mol_to_draw(mol: Any, style: DrawStyle) -> Any:
    """The molecule as drawn: heavy atoms keep indices 0..n-1 (added Hs come after)."""
    chem = _rdkit()
    from rdkit.Chem.Draw import rdMolDraw2D

    drawn = chem.AddHs(mol) if style.explicit_h else chem.Mol(mol)
    if style.coordgen:  # PrepareMolForDrawing keeps the coordinates a molecule has
        from rdkit.Chem import rdCoordGen

        rdCoordGen.AddCoords(drawn)
    if style.jitter > 0:
        if not drawn.GetNumConformers():
            from rdkit.Chem import rdDepictor

            rdDepictor.Compute2DCoords(drawn)
        conf = drawn.GetConformer()
        xy = np.asarray(conf.GetPositions())[:, :2]  # (N_atoms, 2)
        bonds = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in drawn.GetBonds()]
        for i, (x, y) in enumerate(jitter_points(xy, bonds, style.jitter, style.jitter_seed)):
            conf.SetAtomPosition(i, (float(x), float(y), 0.0))
    if style.all_carbons:
        for atom in drawn.GetAtoms():
            if atom.GetSymbol() == "C":
                atom.SetProp("atomLabel", "C")
    return rdMolDraw2D.PrepareMolForDrawing(drawn, kekulize=not style.aromatic)


def draw_molecule(mol: Any, size: int | tuple[int, int], style: DrawStyle
                  ) -> tuple[bytes, list[tuple[float, float]]]:
    """Draw ``mol`` as a PNG of ``size`` (a side, or (width, height)); returns the PNG and
    each atom's (x, y) pixel.

    Coordinates are read from the drawer after drawing, so they follow rotation/padding.

    Example:
        >>> png, xy = draw_molecule(parse_smiles("CCO"), 64, DrawStyle())
        >>> png[:4], len(xy)
        (b'\\x89PNG', 3)
    """
    from rdkit.Chem.Draw import rdMolDraw2D

    width, height = (size, size) if isinstance(size, int) else size
    drawer = rdMolDraw2D.MolDraw2DCairo(width, height)
    _configure(drawer, style, min(width, height))
    drawer.drawOptions().prepareMolsBeforeDrawing = False
    try:
        drawer.DrawMolecule(_mol_to_draw(mol, style))
        drawer.FinishDrawing()
    except (RuntimeError, ValueError) as exc:
        raise RenderError(f"drawing failed: {exc}") from exc
    coords = []
    for idx in range(mol.GetNumAtoms()):
        point = drawer.GetDrawCoords(idx)
        coords.append((float(point.x), float(point.y)))
    if not all(math.isfinite(c) for xy in coords for c in xy):
        raise RenderError("drawing failed: non-finite atom coordinates")
    return drawer.GetDrawingText(), coords


def _degrade(image: Image.Image, style: DrawStyle, rng: np.random.Generator | None) -> Any:
    from PIL import Image, ImageFilter

    if not style.colour:
        image = image.convert("L")  # black-and-white palette: a third of the PNG size
    if style.blur_radius > 0:
        image = image.filter(ImageFilter.GaussianBlur(style.blur_radius))
    if style.noise_sigma > 0 and rng is not None:
        pixels = np.asarray(image, dtype=np.float32)
        pixels = pixels + rng.normal(0.0, style.noise_sigma, pixels.shape)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), image.mode)
    return image


def render_one(
    smiles: str,
    size: int = 224,
    rng: np.random.Generator | None = None,
    options: RenderOptions | None = None,
) -> tuple[Image.Image, str, list[dict[str, Any]]]:
    """Render one SMILES: (image, canonical SMILES, atoms in canonical output order).

    ``rng=None`` draws the plain style; a generator samples an augmented style.  The
    image is mode "L" for the black-and-white atom palette and "RGB" for colour.
    Raises ``RenderError`` (a ``ValueError``) with a reason for unusable input.

    Example:
        >>> image, canon, atoms = render_one("OCC", size=96)
        >>> image.size, canon, [a["symbol"] for a in atoms]
        ((96, 96), 'CCO', ['C', 'C', 'O'])
    """
    from PIL import Image

    options = options or RenderOptions()
    mol = parse_smiles(smiles)
    canonical, order = canonical_order(mol)
    style = DrawStyle.plain(options) if rng is None else DrawStyle.sample(options, rng)
    png, coords = draw_molecule(mol, size, style)
    image = _degrade(Image.open(io.BytesIO(png)).convert("RGB"), style, rng)
    atoms = [
        {"symbol": mol.GetAtomWithIdx(i).GetSymbol(),
         "x": round(coords[i][0], 2), "y": round(coords[i][1], 2)}
        for i in order
    ]
    return image, canonical, atoms


# --------------------------------------------------------------------------- tokens


def smiles_tokens(smiles: str) -> list[str]:
    """Atom-level SMILES tokens (Molecular Transformer regex); ValueError if not covered.

    Example:
        >>> smiles_tokens("BrC[NH3+]")
        ['Br', 'C', '[NH3+]']
    """
    tokens = SmilesTokenizer.pattern.findall(smiles)
    if "".join(tokens) != smiles:
        raise ValueError(f"cannot tokenize SMILES {smiles!r} with the SMILES regex")
    return tokens


def is_atom_token(token: str) -> bool:
    """True for bracket atoms and organic-subset (incl. aromatic) atom symbols.

    Example:
        >>> [is_atom_token(t) for t in ["Cl", "c", "[nH]", "(", "=", "1", "%10"]]
        [True, True, True, False, False, False, False]
    """
    return token.startswith("[") or token in {"B", "Br", "C", "Cl", "N", "O", "S", "P", "F",
                                              "I", "b", "c", "n", "o", "s", "p", "*"}


def atom_tokens_positions(canonical_smiles: str, atoms: Sequence[Any]) -> list[tuple[int, Any]]:
    """Pair each atom token of ``canonical_smiles`` with its atom entry (k-th ↔ k-th; an
    entry is anything, e.g. a ``render-molecules`` dict or an (x, y) pixel).

    Returns ``(token index, atom entry)`` for every atom token; raises ``ValueError``
    if the number of atom tokens differs from ``len(atoms)``.

    Example:
        >>> atoms = [{"symbol": s, "x": i, "y": 0} for i, s in enumerate("CCO")]
        >>> [(i, a["symbol"]) for i, a in atom_tokens_positions("CC(=O)", atoms)]
        [(0, 'C'), (1, 'C'), (4, 'O')]
    """
    indices = [i for i, tok in enumerate(smiles_tokens(canonical_smiles)) if is_atom_token(tok)]
    if len(indices) != len(atoms):
        raise ValueError(
            f"{canonical_smiles!r} has {len(indices)} atom tokens but {len(atoms)} atoms"
        )
    return list(zip(indices, atoms))


def cell_of_point(point: tuple[float, float], grid_hw: tuple[int, int],
                  image_hw: tuple[int, int]) -> tuple[int, int]:
    """``(row, col)`` of the grid cell containing pixel ``(x, y)`` of an image.

    Example:
        >>> cell_of_point((100.0, 30.0), (7, 7), (224, 224))
        (0, 3)
    """
    x, y = point
    gh, gw = grid_hw
    height, width = image_hw
    row = min(gh - 1, max(0, int(y * gh / height)))
    col = min(gw - 1, max(0, int(x * gw / width)))
    return row, col


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class _Job:
    out_dir: Path
    size: int
    augment: bool
    seed: int
    options: RenderOptions
    selfies: bool


def _image_name(row: int) -> str:
    return f"images/mol_{row:06d}.png"


def _render_row(job: _Job, row: int, smiles: str) -> dict[str, Any]:
    """Render data row ``row`` (0-based) to disk; returns its manifest record."""
    rng = np.random.default_rng([job.seed, row]) if job.augment else None
    image, canonical, atoms = render_one(smiles, job.size, rng, job.options)
    record = {
        "image": _image_name(row),
        "smiles": canonical,
        "heavy_atoms": sum(1 for a in atoms if a["symbol"] not in ("H", "*")),
        "atoms": json.dumps(atoms, separators=(",", ":")),
    }
    if job.selfies:
        sf = _selfies()
        try:
            record["selfies"] = sf.encoder(canonical)
        except Exception as exc:  # selfies raises its own EncoderError
            raise RenderError(f"SELFIES encoding failed: {exc}") from exc
    image.save(job.out_dir / record["image"], format="PNG")
    return record


def _render_chunk(
    job: _Job, chunk: Sequence[tuple[int, int, str]]
) -> list[tuple[int, str, dict[str, Any] | None, str]]:
    """Render ``(row, line, smiles)`` items; returns ``(line, smiles, record|None, reason)``."""
    results = []
    for row, line, smiles in chunk:
        try:
            results.append((line, smiles, _render_row(job, row, smiles), ""))
        except RenderError as exc:
            results.append((line, smiles, None, str(exc)))
    return results


def read_smiles_csv(
    path: str | Path, column: str = "smiles", limit: int | None = None
) -> list[tuple[int, int, str]]:
    """``(row, line, smiles)`` of a CSV: 0-based data row, 1-based line number (header = 1).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "m.csv"
        >>> _ = p.write_text("id,smiles\\n1,CCO\\n2,c1ccccc1\\n")
        >>> read_smiles_csv(p)
        [(0, 2, 'CCO'), (1, 3, 'c1ccccc1')]
    """
    rows = csv_rows(path, [column], "; name the SMILES column (--column, smiles_column=)", limit)
    return [(i, line, (row[column] or "").strip()) for i, (line, row) in enumerate(rows)]


def sample_rows(items: list[Any], sample: int | None, seed: int) -> list[Any]:
    """A seeded random ``sample`` of ``items`` kept in their order (all when None or more).

    Example:
        >>> sample_rows(list("abcdef"), 3, seed=0) == sample_rows(list("abcdef"), 3, seed=0)
        True
    """
    if sample is None or sample >= len(items):
        return items
    keep = np.random.default_rng(seed).choice(len(items), size=sample, replace=False)
    return [items[i] for i in sorted(keep)]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _run(job: _Job, items: Sequence[tuple[int, int, str]], workers: int, progress: bool) -> list:
    from tqdm import tqdm

    max_chunk = RenderLayout().max_chunk
    chunk_size = max(1, min(max_chunk, math.ceil(len(items) / (4 * max(1, workers)))))
    chunks = list(_chunks(items, chunk_size))
    bar = tqdm(total=len(items), desc="render molecules", unit="mol", disable=not progress)
    results: list = []
    work = partial(_render_chunk, job)
    if workers <= 1 or len(chunks) <= 1:
        mapped: Iterator = map(work, chunks)
        pool = None
    else:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
        mapped = pool.map(work, chunks)
    try:
        for part in mapped:
            results.extend(part)
            bar.update(len(part))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return results


def _params(csv_path: Path, size: int, augment: bool, seed: int, limit: int | None,
            column: str, selfies: bool, options: RenderOptions) -> dict[str, Any]:
    from rdkit import rdBase

    stat = csv_path.stat()
    return {
        "format_version": RenderLayout().format_version,
        "input": str(csv_path.resolve()),
        "input_size": stat.st_size,
        "input_mtime_ns": stat.st_mtime_ns,
        "size": size,
        "augment": augment,
        "seed": seed if augment else None,
        "limit": limit,
        "smiles_column": column,
        "selfies": selfies,
        "options": json.loads(json.dumps(asdict(options))),
        "rdkit": rdBase.rdkitVersion,
    }


def _read_skipped(path: Path) -> list[tuple[int, str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [(int(r["line"]), r["smiles"], r["reason"]) for r in csv.DictReader(fh)]


def _cached_summary(out_dir: Path, params: dict[str, Any]) -> RenderSummary | None:
    paths = [out_dir / n for n in ("render.json", "manifest.csv", "skipped.csv")]
    if not all(p.is_file() for p in paths):
        return None
    try:
        if json.loads(paths[0].read_text(encoding="utf-8")) != params:
            return None
        with paths[1].open(newline="", encoding="utf-8") as fh:
            rendered = sum(1 for _ in csv.DictReader(fh))
        skipped = _read_skipped(paths[2])
    except (OSError, ValueError, KeyError):
        return None
    return RenderSummary(rendered, skipped, paths[1], cached=True, params=params)


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _prepare_out_dir(out_dir: Path) -> None:
    """Invalidate a previous render and remove its images (only ``images/mol_*.png``)."""
    (out_dir / "render.json").unlink(missing_ok=True)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for old in images.glob("mol_*.png"):
        old.unlink()


def render_molecules(
    smiles_csv: str | Path,
    out_dir: str | Path,
    size: int = 224,
    augment: bool = False,
    seed: int = 0,
    limit: int | None = None,
    workers: int | None = None,
    smiles_column: str = "smiles",
    selfies: bool = False,
    progress: bool = True,
    options: RenderOptions | None = None,
    sample: int | None = None,
) -> RenderSummary:
    """Render the SMILES column of a CSV to PNGs plus ``manifest.csv`` / ``skipped.csv``.

    Output is identical for any ``workers``; augmentation is seeded per (seed, data row).
    If ``out_dir`` already holds a render with the same parameters and an unchanged input
    file, nothing is redone (``summary.cached``).  Otherwise old ``images/mol_*.png`` are
    removed first.  Unusable SMILES are skipped and listed with their CSV line number.
    ``limit`` takes the first N rows; ``sample`` a seeded random N rows (kept in file
    order), e.g. a representative subset of a file sorted by size.

    Example::

        s = render_molecules("zinc.csv", "data/zinc_img", limit=5000, augment=True, seed=1)
        s.rendered, s.skipped[:3]   # e.g. 4998, [(17, 'C1CC', 'SMILES Parse Error: ...')]
    """
    _rdkit()
    if selfies:
        _selfies()
    if size < 16:
        raise ValueError(f"image size must be >= 16 pixels, got {size}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    csv_path, out_dir = Path(smiles_csv), Path(out_dir)
    options = options or RenderOptions()
    params = _params(csv_path, size, augment, seed, limit, smiles_column, selfies, options)
    params["sample"] = sample
    cached = _cached_summary(out_dir, params)
    if cached is not None:
        return cached
    items = sample_rows(read_smiles_csv(csv_path, smiles_column, limit), sample, seed)
    _prepare_out_dir(out_dir)
    job = _Job(out_dir, size, augment, seed, options, selfies)
    results = _run(job, items, workers or os.cpu_count() or 1, progress)
    records = [rec for _, _, rec, _ in results if rec is not None]
    skipped = [(line, smi, reason) for line, smi, rec, reason in results if rec is None]
    layout = RenderLayout()
    columns = layout.manifest_columns + (("selfies",) if selfies else ())
    write_csv(out_dir / "manifest.csv", columns, records)
    write_csv(out_dir / "skipped.csv", layout.skipped_columns,
               [dict(zip(layout.skipped_columns, s)) for s in skipped])
    (out_dir / "render.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
    return RenderSummary(len(records), skipped, out_dir / "manifest.csv", params=params)


__all__ = [
    "DrawStyle",
    "RenderError",
    "RenderOptions",
    "RenderSummary",
    "atom_tokens_positions",
    "canonical_order",
    "cell_of_point",
    "draw_molecule",
    "is_atom_token",
    "jitter_points",
    "parse_smiles",
    "read_smiles_csv",
    "render_molecules",
    "render_one",
    "sample_rows",
    "smiles_tokens",
]
