"""Molecule drawings for SMILES predictions: what the model read, with the atoms and
bonds that differ from the reference highlighted.

:func:`molecule_diff_svg` parses both SMILES with RDKit, aligns them by their maximum
common substructure (``rdFMCS.FindMCS``) and draws each with ``MolDraw2DSVG``, the atoms
and bonds outside the common part filled in :data:`DIFF_COLOUR`.

Alignment choices:

- atoms compare as ANY (``AtomCompare.CompareAny``) in the search, and elements are
  compared afterwards: the common part is the largest shared skeleton, so a substituted
  atom (``CCOCC`` read as ``CCNCC``) marks that one atom, where an element-matching MCS
  (which is connected) would also mark the whole smaller side of the chain;
- bonds compare by exact order (``BondCompare.CompareOrderExact``: aromatic matches only
  aromatic), so a benzene read as a cyclohexane differs in every ring bond;
- ``RingMatchesRingOnly`` for atoms and bonds: a chain is never laid onto a ring, so a
  missed ring closure shows; partial rings may match (``CompleteRingsOnly`` off), so one
  wrong ring atom marks that atom, not the ring;
- of the ways the common skeleton maps onto the prediction (at most 1,000 tried), the one
  that agrees with the reference on the most atoms is used; an atom differs when it is
  outside the common part or its element, formal charge, isotope or CIP label (R/S)
  differs from the atom it maps to; a bond differs when it is outside the common part;
- the search stops after :data:`MCS_TIMEOUT_S` seconds (``timed_out``), keeping the
  largest common part found so far, so a difference may be over-marked then, never
  missed.

Exact match means equal RDKit canonical SMILES (with stereochemistry), as the
``exact_match`` metric. A prediction can match in every atom and bond and still not be
exact (hydrogens, double-bond geometry): :attr:`MoleculeDiff.note` says so. The
prediction and the others are laid out (2D coordinates) on the reference's depiction
through the same atom mapping, so the drawings have the same orientation.

SMILES are parsed without CXSMILES extensions (no atom labels from the text) and a string
with whitespace inside is not a molecule. The SVG is RDKit's, checked by
:func:`clean_svg` (XML declaration, comments and metadata removed; only drawing elements
and attributes allowed), so no text of the input reaches the page through it.

Example:
    >>> diff = molecule_diff_svg("CCN", "CCO")
    >>> diff.valid, diff.exact_match, diff.differing_atoms, diff.differing_bonds
    (True, False, (2,), ())
    >>> diff.svg.startswith("<svg") and "<script" not in diff.svg
    True
    >>> molecule_diff_svg("C1CC", "CCO").note
    'not a valid molecule'
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from captioner.data.chem import chem, quiet_rdkit

__all__ = ["DIFF_COLOUR", "MCS_TIMEOUT_S", "MoleculeDiff", "MoleculeDrawing", "clean_svg",
           "looks_like_smiles", "molecule_diff_svg", "rdkit_available"]

DIFF_COLOUR = (1.0, 0.55, 0.55)  # light red behind the black-and-white drawing
BOND_PX = 45  # bond length in pixels; larger molecules shrink to fit the drawing
MCS_TIMEOUT_S = 1  # FindMCS takes whole seconds
MAX_MAPPINGS = 1000  # substructure matches tried when choosing the atom mapping

_SVG_ELEMENTS = frozenset({"svg", "g", "rect", "path", "ellipse", "circle", "line",
                           "polyline", "polygon", "text", "tspan", "title"})
_SVG_ATTRIBUTES = frozenset({
    "version", "baseProfile", "width", "height", "viewBox", "space", "class", "style",
    "d", "x", "y", "cx", "cy", "rx", "ry", "r", "x1", "y1", "x2", "y2", "points", "fill",
    "stroke", "stroke-width", "opacity", "fill-opacity", "font-size", "font-family",
    "text-anchor", "dominant-baseline", "transform"})
_SVG_NS = "{http://www.w3.org/2000/svg}"


@dataclass(frozen=True)
class MoleculeDrawing:
    """One molecule as drawn: the given SMILES, whether RDKit parses it, its canonical
    SMILES, the SVG (None when it does not parse) and the atom and bond indices (RDKit's,
    in the order of the SMILES) drawn as differing.

    Example:
        >>> MoleculeDrawing("C1CC", valid=False).svg is None
        True
    """

    smiles: str
    valid: bool
    canonical: str | None = None
    svg: str | None = None
    differing_atoms: tuple[int, ...] = ()
    differing_bonds: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (tuples as lists).

        Example:
            >>> MoleculeDrawing("X", valid=False).to_json()["differing_atoms"]
            []
        """
        return {"smiles": self.smiles, "valid": self.valid, "canonical": self.canonical,
                "svg": self.svg, "differing_atoms": list(self.differing_atoms),
                "differing_bonds": list(self.differing_bonds)}


@dataclass(frozen=True)
class MoleculeDiff:
    """A prediction drawn against its reference.

    ``exact_match`` is None without a valid reference (nothing to compare) and False for
    an invalid prediction against a valid one; ``note`` is one line for the page ("exact
    match", "differing: 1 atom in the prediction; ...", "not a valid molecule", ...);
    ``timed_out`` is True when the common substructure search hit its time limit.

    Example:
        >>> d = molecule_diff_svg("CCO")
        >>> d.reference is None, d.exact_match, d.note
        (True, None, 'no reference')
    """

    prediction: MoleculeDrawing
    reference: MoleculeDrawing | None = None
    exact_match: bool | None = None
    note: str = ""
    timed_out: bool = False

    @property
    def valid(self) -> bool:
        """Whether the prediction parses."""
        return self.prediction.valid

    @property
    def svg(self) -> str | None:
        """The prediction's SVG (None when it does not parse)."""
        return self.prediction.svg

    @property
    def differing_atoms(self) -> tuple[int, ...]:
        """Atoms of the prediction outside the common part or unlike their counterpart."""
        return self.prediction.differing_atoms

    @property
    def differing_bonds(self) -> tuple[int, ...]:
        """Bonds of the prediction outside the common part."""
        return self.prediction.differing_bonds

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``prediction``, ``reference`` (or None), ``exact_match``,
        ``note`` and ``timed_out``."""
        return {"prediction": self.prediction.to_json(),
                "reference": self.reference.to_json() if self.reference else None,
                "exact_match": self.exact_match, "note": self.note,
                "timed_out": self.timed_out}


# --------------------------------------------------------------------------- text checks


def looks_like_smiles(text: str) -> bool:
    """True for a single whitespace-free string of SMILES characters with structure.

    Example:
        >>> looks_like_smiles("CC(=O)O"), looks_like_smiles("a dog runs")
        (True, False)
    """
    if not text or re.search(r"\s", text):
        return False
    if not re.fullmatch(r"[A-Za-z0-9@+\-\[\]()=#$/\\%.:*~]+", text):
        return False
    return bool(re.search(r"[0-9()\[\]=#@+/\\]|[A-Z]", text))


def clean_svg(svg: str) -> str:
    """RDKit's SVG text ready to embed: the XML declaration, comments and ``<metadata>``
    removed, then checked to hold only drawing elements and attributes (no script, event
    handler, link, ``foreignObject`` or entity).

    Raises:
        ValueError: naming the first element or attribute that is not allowed.

    Example:
        >>> clean_svg("<?xml version='1.0'?><!-- x --><svg xmlns='http://www.w3.org/2000/svg'>"
        ...           "<path d='M 0 0'/></svg>")
        "<svg xmlns='http://www.w3.org/2000/svg'><path d='M 0 0'/></svg>"
        >>> clean_svg("<svg><script>alert(1)</script></svg>")
        Traceback (most recent call last):
        ValueError: SVG element <script> is not allowed
    """
    text = re.sub(r"<\?xml.*?\?>", "", svg, flags=re.S)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<metadata\b.*?</metadata>", "", text, flags=re.S | re.I).strip()
    if "<!" in text or "<?" in text:
        raise ValueError("SVG with a DOCTYPE, entity, CDATA or processing instruction is "
                         "not allowed")
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise ValueError(f"SVG is not well-formed XML: {exc}") from None
    for node in root.iter():
        tag = node.tag.removeprefix(_SVG_NS)
        if tag not in _SVG_ELEMENTS:
            raise ValueError(f"SVG element <{tag}> is not allowed")
        for name, value in node.attrib.items():
            local = name.rsplit("}", 1)[-1]
            if local not in _SVG_ATTRIBUTES or re.search(r"url\(|javascript:", value, re.I):
                raise ValueError(f"SVG attribute {local}={value[:40]!r} on <{tag}> is not "
                                 "allowed")
    return text


# --------------------------------------------------------------------------- RDKit


def rdkit_available() -> bool:
    """Whether RDKit can be imported (drawings need it).

    Example:
        >>> isinstance(rdkit_available(), bool)
        True
    """
    try:
        chem()
    except ImportError:
        return False
    return True


def _parse(smiles: str) -> Any:
    """The sanitised RDKit molecule (without CXSMILES extensions), or None when the text
    is empty, holds whitespace or does not parse."""
    text = smiles.strip()
    if not text or re.search(r"\s", text):
        return None
    params = chem().SmilesParserParams()
    params.allowCXSMILES = False
    with quiet_rdkit():
        mol = chem().MolFromSmiles(text, params)
    return mol if mol is not None and mol.GetNumAtoms() > 0 else None


def _mcs_query(mol_a: Any, mol_b: Any, timeout: int) -> tuple[Any, bool]:
    """(the common substructure as a query molecule or None, whether the search timed
    out), with the settings of the module docstring."""
    from rdkit.Chem import rdFMCS

    params = rdFMCS.MCSParameters()
    params.AtomTyper = rdFMCS.AtomCompare.CompareAny
    params.BondTyper = rdFMCS.BondCompare.CompareOrderExact
    params.AtomCompareParameters.RingMatchesRingOnly = True
    params.AtomCompareParameters.CompleteRingsOnly = False
    params.BondCompareParameters.RingMatchesRingOnly = True
    params.BondCompareParameters.CompleteRingsOnly = False
    params.Timeout = max(1, int(timeout))
    with quiet_rdkit():
        result = rdFMCS.FindMCS([mol_a, mol_b], params)
    query = chem().MolFromSmarts(result.smartsString) if result.numAtoms else None
    return query, bool(result.canceled)


def _cip(mol: Any) -> dict[int, str]:
    """Atom index -> CIP label ("R" / "S") of the labelled stereocentres."""
    centres = chem().FindMolChiralCenters(mol, includeUnassigned=False,
                                          useLegacyImplementation=False)
    return dict(centres)


def _atom_key(atom: Any, cip: dict[int, str]) -> tuple[int, int, int, str]:
    return (atom.GetAtomicNum(), atom.GetFormalCharge(), atom.GetIsotope(),
            cip.get(atom.GetIdx(), ""))


@dataclass(frozen=True)
class _Alignment:
    """Atom pairs (prediction index, reference index) of the common part and the
    differing atoms and bonds of each side."""

    pairs: tuple[tuple[int, int], ...]
    pred_atoms: tuple[int, ...]
    pred_bonds: tuple[int, ...]
    ref_atoms: tuple[int, ...]
    ref_bonds: tuple[int, ...]
    timed_out: bool


def _bonds_of(mol: Any, query: Any, match: Sequence[int]) -> set[int]:
    bonds = set()
    for qb in query.GetBonds():
        bond = mol.GetBondBetweenAtoms(match[qb.GetBeginAtomIdx()], match[qb.GetEndAtomIdx()])
        if bond is not None:
            bonds.add(bond.GetIdx())
    return bonds


def _align(pred: Any, ref: Any, timeout: int) -> _Alignment:
    """Align ``pred`` on ``ref`` by their common substructure (see the module docstring)."""
    query, timed_out = _mcs_query(pred, ref, timeout)
    ref_match = ref.GetSubstructMatch(query) if query is not None else ()
    candidates = (pred.GetSubstructMatches(query, uniquify=False, maxMatches=MAX_MAPPINGS)
                  if ref_match else ())
    cip_pred, cip_ref = _cip(pred), _cip(ref)
    ref_keys = [_atom_key(ref.GetAtomWithIdx(j), cip_ref) for j in ref_match]

    def agreement(match: Sequence[int]) -> int:
        return sum(_atom_key(pred.GetAtomWithIdx(i), cip_pred) == key
                   for i, key in zip(match, ref_keys))

    pred_match = max(candidates, key=agreement, default=())
    if not pred_match:  # nothing in common: everything differs
        return _Alignment((), tuple(range(pred.GetNumAtoms())), tuple(range(pred.GetNumBonds())),
                          tuple(range(ref.GetNumAtoms())), tuple(range(ref.GetNumBonds())),
                          timed_out)
    pairs = tuple(zip(pred_match, ref_match))
    same = {(i, j) for i, j in pairs
            if _atom_key(pred.GetAtomWithIdx(i), cip_pred) == _atom_key(ref.GetAtomWithIdx(j),
                                                                         cip_ref)}
    pred_same = {i for i, _ in same}
    ref_same = {j for _, j in same}
    pred_bonds = _bonds_of(pred, query, pred_match)
    ref_bonds = _bonds_of(ref, query, ref_match)
    return _Alignment(
        pairs,
        tuple(i for i in range(pred.GetNumAtoms()) if i not in pred_same),
        tuple(b for b in range(pred.GetNumBonds()) if b not in pred_bonds),
        tuple(j for j in range(ref.GetNumAtoms()) if j not in ref_same),
        tuple(b for b in range(ref.GetNumBonds()) if b not in ref_bonds),
        timed_out)


def _layout(mol: Any, template: Any | None = None,
            pairs: Sequence[tuple[int, int]] | None = None) -> None:
    """2D coordinates for ``mol``. With a laid-out ``template``, the atoms it shares with
    ``mol`` take the template's positions: the (template index, ``mol`` index) ``pairs``,
    or, when None, a substructure match of the whole template (identical molecules)."""
    from rdkit.Chem import rdDepictor

    if template is not None:
        try:
            if pairs is None:
                rdDepictor.GenerateDepictionMatching2DStructure(mol, template)
                return
            if len(pairs) >= 2:
                rdDepictor.GenerateDepictionMatching2DStructure(mol, template, list(pairs))
                return
        except (RuntimeError, ValueError):
            pass  # RDKit refuses some constraints; an unconstrained layout still draws
    rdDepictor.Compute2DCoords(mol)


def _draw(mol: Any, size: tuple[int, int], atoms: Sequence[int] = (),
          bonds: Sequence[int] = ()) -> str:
    """The molecule as cleaned SVG, black on white, ``atoms`` and ``bonds`` filled in
    :data:`DIFF_COLOUR`."""
    from rdkit.Chem.Draw import rdMolDraw2D

    width, height = size
    drawer = rdMolDraw2D.MolDraw2DSVG(int(width), int(height))
    options = drawer.drawOptions()
    options.useBWAtomPalette()
    options.includeMetadata = False
    options.addStereoAnnotation = True
    options.fillHighlights = True
    options.fixedBondLength = BOND_PX
    colours = {i: DIFF_COLOUR for i in atoms}
    with quiet_rdkit():
        rdMolDraw2D.PrepareAndDrawMolecule(
            drawer, mol, highlightAtoms=list(atoms), highlightBonds=list(bonds),
            highlightAtomColors=colours, highlightBondColors={b: DIFF_COLOUR for b in bonds})
    drawer.FinishDrawing()
    return clean_svg(drawer.GetDrawingText())


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _note(exact: bool, align: _Alignment) -> str:
    """One line saying what differs.

    Example:
        >>> _note(False, _Alignment((), (2,), (), (2,), (1, 2), False))
        'differing: 1 atom in the prediction; 1 atom and 2 bonds in the reference'
    """
    if exact:
        return "exact match"
    sides = []
    for atoms, bonds, where in ((align.pred_atoms, align.pred_bonds, "the prediction"),
                                (align.ref_atoms, align.ref_bonds, "the reference")):
        parts = [_count(len(xs), word) for xs, word in ((atoms, "atom"), (bonds, "bond"))
                 if xs]
        if parts:
            sides.append(" and ".join(parts) + f" in {where}")
    if not sides:
        return "same atoms and bonds; hydrogens or double-bond stereo differ"
    return "differing: " + "; ".join(sides)


def molecule_diff_svg(predicted: str, reference: str | None = None,
                      size: tuple[int, int] = (300, 300),
                      timeout: int = MCS_TIMEOUT_S) -> MoleculeDiff:
    """Draw ``predicted`` and ``reference`` with what differs highlighted.

    Args:
        predicted: the SMILES read from the picture.
        reference: the expected SMILES, or None (then the prediction is drawn plainly).
        size: (width, height) of each drawing in pixels.
        timeout: seconds for the common substructure search (whole seconds, at least 1).

    Returns:
        A :class:`MoleculeDiff`. An invalid prediction has no SVG and the note "not a
        valid molecule"; an invalid reference is drawn as nothing, the prediction
        plainly. With an exact match, nothing is highlighted on either side.

    Example:
        >>> same = molecule_diff_svg("OCC", "CCO")
        >>> same.exact_match, same.differing_atoms, same.reference.differing_atoms
        (True, (), ())
        >>> ring = molecule_diff_svg("c1ccccc1", "c1ccncc1")
        >>> len(ring.differing_atoms), ring.reference.differing_atoms, ring.note
        (1, (3,), 'differing: 1 atom in the prediction; 1 atom in the reference')
    """
    pred_mol = _parse(predicted)
    ref_mol = _parse(reference) if reference is not None else None
    canon = chem().MolToSmiles(pred_mol) if pred_mol is not None else None
    ref_canon = chem().MolToSmiles(ref_mol) if ref_mol is not None else None
    ref_drawing = None
    if reference is not None and ref_mol is None:
        ref_drawing = MoleculeDrawing(reference, valid=False)
    if pred_mol is None:
        if ref_mol is not None:
            _layout(ref_mol)
            ref_drawing = MoleculeDrawing(reference, True, ref_canon, _draw(ref_mol, size))
        return MoleculeDiff(MoleculeDrawing(predicted, valid=False), ref_drawing,
                            exact_match=False if ref_mol is not None else None,
                            note="not a valid molecule")
    if ref_mol is None:
        _layout(pred_mol)
        note = "no reference" if reference is None else "the reference is not a valid molecule"
        return MoleculeDiff(MoleculeDrawing(predicted, True, canon, _draw(pred_mol, size)),
                            ref_drawing, note=note)
    exact = canon == ref_canon
    if exact:
        align = _Alignment((), (), (), (), (), False)
        _layout(ref_mol)
        _layout(pred_mol, ref_mol)
    else:
        align = _align(pred_mol, ref_mol, timeout)
        _layout(ref_mol)
        _layout(pred_mol, ref_mol, [(j, i) for i, j in align.pairs])
    prediction = MoleculeDrawing(predicted, True, canon,
                                 _draw(pred_mol, size, align.pred_atoms, align.pred_bonds),
                                 align.pred_atoms, align.pred_bonds)
    ref_drawing = MoleculeDrawing(reference, True, ref_canon,
                                  _draw(ref_mol, size, align.ref_atoms, align.ref_bonds),
                                  align.ref_atoms, align.ref_bonds)
    note = _note(exact, align) + (" (search timed out)" if align.timed_out else "")
    return MoleculeDiff(prediction, ref_drawing, exact, note, align.timed_out)
