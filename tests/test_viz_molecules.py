"""Molecule drawings with the differences from the reference highlighted
(captioner.viz.molecules): which atoms and bonds are marked, what the SVG may hold."""

from __future__ import annotations

import json
import math
import re

import pytest

pytest.importorskip("rdkit")

from captioner.viz.molecules import (  # noqa: E402
    DIFF_COLOUR,
    clean_svg,
    molecule_diff_svg,
)

HIGHLIGHT = "#{:02X}{:02X}{:02X}".format(*(int(c * 255) for c in DIFF_COLOUR))


def highlighted_atoms(svg: str) -> set[str]:
    """Classes ("atom-2", ...) of the filled circles RDKit draws behind highlighted atoms."""
    return {m.group(1) for m in re.finditer(r"<ellipse[^>]*class='(atom-\d+)'[^>]*>", svg)
            if HIGHLIGHT in m.group(0)}


def bond_angle(svg: str, cls: str) -> float:
    """Direction in degrees of the first line drawn for one bond, e.g. ``bond-0 atom-0
    atom-1`` (drawings scale to fit, so lengths differ between molecules)."""
    d = re.search(rf"<path class='{cls}' d='([^']*)'", svg).group(1)
    x0, y0, x1, y1 = map(float, re.findall(r"-?\d+\.?\d*", d)[:4])
    return math.degrees(math.atan2(y1 - y0, x1 - x0))


def test_cco_against_ccn_marks_exactly_the_differing_atom():
    diff = molecule_diff_svg("CCO", "CCN")
    assert diff.valid and diff.exact_match is False
    assert diff.differing_atoms == (2,) and diff.differing_bonds == ()
    assert diff.reference.differing_atoms == (2,) and diff.reference.differing_bonds == ()
    assert highlighted_atoms(diff.svg) == {"atom-2"}
    assert highlighted_atoms(diff.reference.svg) == {"atom-2"}
    assert diff.note == "differing: 1 atom in the prediction; 1 atom in the reference"


def test_identical_molecules_highlight_nothing():
    diff = molecule_diff_svg("OCC", "CCO")  # the same molecule written another way
    assert diff.exact_match is True and diff.note == "exact match"
    assert diff.differing_atoms == () and diff.reference.differing_atoms == ()
    assert HIGHLIGHT not in diff.svg and HIGHLIGHT not in diff.reference.svg
    assert diff.prediction.canonical == diff.reference.canonical == "CCO"


def test_a_substituted_atom_inside_a_chain_marks_only_that_atom():
    diff = molecule_diff_svg("CCCCNCCCC", "CCCCOCCCC")
    assert diff.differing_atoms == (4,) and diff.reference.differing_atoms == (4,)
    assert diff.differing_bonds == () and diff.reference.differing_bonds == ()


def test_prediction_is_laid_out_like_the_reference():
    pred, ref = "CC(=O)Nc1ccc(O)cc1", "CC(=O)Nc1ccc(OC)cc1C"  # same atom order up front
    diff, plain = molecule_diff_svg(pred, ref), molecule_diff_svg(pred)
    for cls in ("bond-0 atom-0 atom-1", "bond-2 atom-1 atom-3", "bond-3 atom-3 atom-4"):
        aligned = bond_angle(diff.svg, cls)
        assert abs(aligned - bond_angle(diff.reference.svg, cls)) < 2
    assert abs(bond_angle(plain.svg, "bond-0 atom-0 atom-1")
               - bond_angle(diff.reference.svg, "bond-0 atom-0 atom-1")) > 30  # on its own


def test_rings_bond_orders_and_extra_atoms():
    pyridine = molecule_diff_svg("c1ccccc1", "c1ccncc1")
    assert len(pyridine.differing_atoms) == 1 and pyridine.reference.differing_atoms == (3,)
    saturated = molecule_diff_svg("C1CCCCC1", "c1ccccc1")  # aromatic bonds never match single
    assert len(saturated.differing_bonds) == 6 == len(saturated.reference.differing_bonds)
    shorter = molecule_diff_svg("CC(=O)O", "CC(=O)OC")  # the prediction lies inside
    assert shorter.differing_atoms == () and shorter.differing_bonds == ()
    assert shorter.reference.differing_atoms == (4,)
    assert shorter.reference.differing_bonds == (3,)
    assert shorter.exact_match is False and HIGHLIGHT not in shorter.svg


def test_stereo_and_charge_differences():
    stereo = molecule_diff_svg("C[C@H](N)C(=O)O", "C[C@@H](N)C(=O)O")
    assert stereo.differing_atoms == (1,) and stereo.reference.differing_atoms == (1,)
    charged = molecule_diff_svg("CC(=O)[O-]", "CC(=O)O")
    assert charged.differing_atoms == (3,)
    geometry = molecule_diff_svg("C/C=C/C", "C/C=C\\C")  # E vs Z: no atom or bond to mark
    assert geometry.exact_match is False and geometry.differing_atoms == ()
    assert geometry.note == "same atoms and bonds; hydrogens or double-bond stereo differ"


@pytest.mark.parametrize("text", ["C1CC", "", "   ", "CCO extra", "hello world", "C(("])
def test_invalid_prediction_has_no_drawing_and_says_so(text):
    diff = molecule_diff_svg(text, "CCO")
    assert not diff.valid and diff.svg is None and diff.prediction.canonical is None
    assert diff.note == "not a valid molecule" and diff.exact_match is False
    assert diff.reference.valid and HIGHLIGHT not in diff.reference.svg  # drawn plainly
    alone = molecule_diff_svg(text)
    assert alone.svg is None and alone.exact_match is None and alone.reference is None


def test_no_reference_draws_the_prediction_plainly():
    diff = molecule_diff_svg("c1ccccc1O")
    assert diff.valid and diff.reference is None and diff.exact_match is None
    assert diff.note == "no reference" and HIGHLIGHT not in diff.svg
    assert diff.svg.startswith("<svg") and diff.svg.rstrip().endswith("</svg>")
    bad_ref = molecule_diff_svg("CCO", "C1CC")
    assert bad_ref.exact_match is None and not bad_ref.reference.valid
    assert bad_ref.reference.svg is None and bad_ref.note == "the reference is not a valid molecule"


def test_svg_holds_no_script_metadata_or_smiles_text():
    smiles = "CC(=O)Nc1ccc(O)cc1"
    diff = molecule_diff_svg(smiles, "CC(=O)Nc1ccc(N)cc1")
    for svg in (diff.svg, diff.reference.svg):
        lowered = svg.lower()
        for banned in ("<script", "<?xml", "<!--", "<metadata", "onload", "href", "<foreign"):
            assert banned not in lowered
        assert smiles not in svg and "Nc1ccc" not in svg
        assert clean_svg(svg) == svg  # passes its own check unchanged


def test_text_in_the_smiles_cannot_reach_the_svg():
    labelled = "CCO |$<script>alert(1)</script>;;$|"  # CXSMILES atom labels are drawn
    assert molecule_diff_svg(labelled).svg is None  # refused (whitespace), never drawn
    evil = molecule_diff_svg("CCO", '"><script>alert(1)</script>')
    assert not evil.reference.valid and evil.reference.svg is None
    assert "script" not in evil.svg and "alert" not in evil.svg


@pytest.mark.parametrize("svg", [
    "<svg><script>alert(1)</script></svg>",
    "<svg onload='alert(1)'><path d='M 0 0'/></svg>",
    "<svg><foreignObject><div>x</div></foreignObject></svg>",
    "<svg xmlns:xlink='http://www.w3.org/1999/xlink'><path xlink:href='javascript:x'/></svg>",
    "<svg><path style='fill:url(http://example.com/x)' d='M 0 0'/></svg>",
    "<!DOCTYPE svg [<!ENTITY x 'y'>]><svg>&x;</svg>",
    "<svg><path d='M 0 0'></svg>",
])
def test_clean_svg_refuses_anything_but_drawing(svg):
    with pytest.raises(ValueError):
        clean_svg(svg)


def test_to_json_round_trips():
    body = json.loads(json.dumps(molecule_diff_svg("CCO", "CCN").to_json()))
    assert body["exact_match"] is False and body["prediction"]["differing_atoms"] == [2]
    assert body["reference"]["canonical"] == "CCN" and body["timed_out"] is False
