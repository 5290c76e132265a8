"""Molecule rendering: images, manifest, atom pixel positions, augmentation, idempotence."""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rdkit")

from captioner.data.molecules import (  # noqa: E402
    RenderError,
    RenderOptions,
    atom_tokens_positions,
    canonical_order,
    parse_smiles,
    read_smiles_csv,
    render_molecules,
    render_one,
    smiles_tokens,
)

DATA = Path("/work/shared/data/molecules")
SIX = ["OCC", "c1ccccc1O", "C[C@H](N)C(=O)O", "Brc1ccccc1", "CC(=O)Nc1ccc(O)cc1", "[Na+].[Cl-]"]
# augmentation without colour/blur/noise/CH3 labels: carbons are bare, crisp bond ends
CRISP = RenderOptions(colour_prob=0.0, blur_prob=0.0, noise_prob=0.0, explicit_methyl_prob=0.0)


def write_csv(path: Path, smiles: list[str], column: str = "smiles") -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", column])
        writer.writerows([i, s] for i, s in enumerate(smiles))
    return path


def read_manifest(out: Path) -> list[dict[str, str]]:
    with (out / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def dark_near(image, x: float, y: float, radius: int = 3, level: int = 110) -> bool:
    """Some dark pixel within ``radius``; labels need a larger radius (the O glyph is hollow)."""
    pixels = np.asarray(image.convert("L"))
    xi, yi = round(x), round(y)
    patch = pixels[max(0, yi - radius):yi + radius + 1, max(0, xi - radius):xi + radius + 1]
    return bool(patch.size) and int(patch.min()) < level


def token_matches_symbol(token: str, symbol: str) -> bool:
    bare = re.sub(r"^\d+", "", token.strip("[]"))
    return bare.lower().startswith(symbol.lower())


# --------------------------------------------------------------------------- render_one


def test_render_one_canonical_smiles_and_size():
    image, canon, atoms = render_one("OCC", size=96)
    assert image.size == (96, 96) and image.mode == "L"  # black-and-white palette
    assert canon == "CCO"
    assert [a["symbol"] for a in atoms] == ["C", "C", "O"]


def test_cco_atoms_zigzag_inside_image_and_o_label_is_dark():
    image, _, atoms = render_one("CCO", size=224)
    pts = np.array([[a["x"], a["y"]] for a in atoms])
    assert ((pts > 0) & (pts < 224)).all()
    d01, d12 = np.linalg.norm(pts[1] - pts[0]), np.linalg.norm(pts[2] - pts[1])
    assert d01 > 20 and abs(d01 - d12) / d01 < 0.1  # equal bond lengths
    v1, v2 = pts[0] - pts[1], pts[2] - pts[1]
    angle = math.degrees(math.acos(v1 @ v2 / (d01 * d12)))
    assert 100 < angle < 140  # zigzag, not colinear
    assert dark_near(image, *pts[2], radius=8)  # the "OH" label sits on the O atom
    assert dark_near(image, *pts[0]) and dark_near(image, *pts[1])  # bond ends
    assert np.asarray(image)[:5, :5].min() == 255  # white background


@pytest.mark.parametrize("seed", range(6))
def test_coordinates_follow_rotation(seed):
    image, canon, atoms = render_one("CCO", 224, np.random.default_rng(seed), CRISP)
    assert canon == "CCO"
    for atom in atoms:
        assert 0 <= atom["x"] < 224 and 0 <= atom["y"] < 224
        radius = 3 if atom["symbol"] == "C" else 8  # bond end, or on the (hollow) label
        assert dark_near(image, atom["x"], atom["y"], radius)


def test_explicit_hydrogens_keep_heavy_atom_mapping():
    options = RenderOptions(explicit_h_prob=1.0, colour_prob=0.0, blur_prob=0.0, noise_prob=0.0)
    image, canon, atoms = render_one("OCC", 224, np.random.default_rng(0), options)
    plain, _, _ = render_one("OCC", 224)
    assert canon == "CCO" and [a["symbol"] for a in atoms] == ["C", "C", "O"]
    assert all(dark_near(image, a["x"], a["y"], 3 if a["symbol"] == "C" else 8) for a in atoms)
    assert np.asarray(image).tobytes() != np.asarray(plain).tobytes()


def test_colour_palette_option_gives_coloured_heteroatoms():
    options = RenderOptions(colour_prob=1.0, blur_prob=0.0, noise_prob=0.0)
    image, _, atoms = render_one("OCC", 224, np.random.default_rng(1), options)
    assert image.mode == "RGB"
    o = atoms[2]
    x, y = round(o["x"]), round(o["y"])
    patch = np.asarray(image)[y - 8:y + 9, x - 8:x + 9].astype(int)
    assert ((patch[..., 0] - patch[..., 2]) > 100).any()  # red oxygen label


@pytest.mark.parametrize(
    ("smiles", "reason"),
    [("C1CC", "unclosed ring"), ("CN(C)(C)(C)C", "valence"), ("", "empty"), ("c1cccc1", "kekul")],
)
def test_unusable_smiles_raise_with_reason(smiles, reason):
    with pytest.raises(RenderError, match=f"(?i){reason}"):
        render_one(smiles, size=64)


# --------------------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    ("smiles", "indices"),
    [
        ("c1ccccc1O", [0, 2, 3, 4, 5, 6, 8]),
        ("C[C@H](N)C(=O)O", [0, 1, 3, 5, 8, 10]),
        ("[Na+].[Cl-]", [0, 2]),
        ("Brc1ccccc1", [0, 1, 3, 4, 5, 6, 7]),
    ],
)
def test_atom_tokens_positions_hand_written(smiles, indices):
    atoms = [{"symbol": "X", "x": float(k), "y": 0.0} for k in range(len(indices))]
    pairs = atom_tokens_positions(smiles, atoms)
    assert [i for i, _ in pairs] == indices
    assert [a["x"] for _, a in pairs] == list(range(len(indices)))  # k-th token <-> k-th atom
    with pytest.raises(ValueError, match="atom tokens"):
        atom_tokens_positions(smiles, atoms[:-1])


@pytest.mark.parametrize("smiles", SIX + ["OC(=O)c1ccc2[nH]ccc2c1Cl", "C[N+](C)(C)CC(=O)[O-]"])
def test_rendered_atoms_match_canonical_tokens(smiles):
    _, canon, atoms = render_one(smiles, size=64)
    tokens = smiles_tokens(canon)
    pairs = atom_tokens_positions(canon, atoms)
    assert len(pairs) == parse_smiles(smiles).GetNumHeavyAtoms()
    assert all(token_matches_symbol(tokens[i], a["symbol"]) for i, a in pairs)


def sample_rows(path: Path, step: int, n: int) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(itertools.islice(csv.DictReader(fh), 0, step * n, step))


@pytest.mark.parametrize("name", ["qm9.csv", "zinc.csv"])
def test_atom_tokens_equal_heavy_atoms_on_real_molecules(name):
    if not (DATA / name).is_file():
        pytest.skip(f"{DATA / name} not available")
    rows = sample_rows(DATA / name, step=97, n=300)
    for row in rows:
        mol = parse_smiles(row["smiles"])
        canon, order = canonical_order(mol)
        tokens = smiles_tokens(canon)
        atoms = [{"symbol": mol.GetAtomWithIdx(i).GetSymbol()} for i in order]
        pairs = atom_tokens_positions(canon, atoms)
        assert len(pairs) == mol.GetNumHeavyAtoms(), canon
        assert all(token_matches_symbol(tokens[i], a["symbol"]) for i, a in pairs), canon
        if "heavy_atoms" in row:
            assert len(pairs) == int(row["heavy_atoms"]), canon


# --------------------------------------------------------------------------- render_molecules


def test_render_molecules_manifest_images_and_skips(tmp_path):
    src = write_csv(tmp_path / "in.csv", ["OCC", "C1CC", "c1ccccc1O", "", "CN(C)(C)(C)C"])
    out = tmp_path / "out"
    summary = render_molecules(src, out, size=80, workers=1, progress=False)
    assert summary.rendered == 2 and summary.manifest == out / "manifest.csv"
    assert [(line, smi) for line, smi, _ in summary.skipped] == [
        (3, "C1CC"), (5, ""), (6, "CN(C)(C)(C)C")]
    assert "unclosed ring" in summary.skipped[0][2]
    rows = read_manifest(out)
    assert list(rows[0]) == ["image", "smiles", "heavy_atoms", "atoms"]
    assert [r["smiles"] for r in rows] == ["CCO", "Oc1ccccc1"]
    assert [r["image"] for r in rows] == ["images/mol_000000.png", "images/mol_000002.png"]
    assert [int(r["heavy_atoms"]) for r in rows] == [3, 7]
    from PIL import Image

    for r in rows:
        atoms = json.loads(r["atoms"])
        assert len(atom_tokens_positions(r["smiles"], atoms)) == int(r["heavy_atoms"])
        assert all(0 <= a["x"] < 80 and 0 <= a["y"] < 80 for a in atoms)
        with Image.open(out / r["image"]) as im:
            assert im.size == (80, 80) and im.format == "PNG"
    with (out / "skipped.csv").open(newline="") as fh:
        listed = list(csv.DictReader(fh))
    assert [int(s["line"]) for s in listed] == [3, 5, 6] and all(s["reason"] for s in listed)
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "mol_000000.png", "mol_000002.png"]


def test_missing_column_names_file_and_column(tmp_path):
    src = write_csv(tmp_path / "in.csv", ["CCO"], column="SMILES_str")
    with pytest.raises(ValueError, match=r"in\.csv.*'smiles'"):
        render_molecules(src, tmp_path / "out", progress=False)
    summary = render_molecules(src, tmp_path / "out", size=64, smiles_column="SMILES_str",
                               workers=1, progress=False)
    assert summary.rendered == 1


def test_smiles_csv_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    """Spreadsheet exports start with a UTF-8 byte-order mark; the first column's name
    must not carry it (both readers of SMILES lists go through ``csv_rows``)."""
    from captioner.data.formats import read_smiles_list

    plain = tmp_path / "plain.csv"
    plain.write_text("smiles,id\nOCC,1\nc1ccccc1,2\n", encoding="utf-8")
    marked = tmp_path / "marked.csv"
    marked.write_text("smiles,id\nOCC,1\nc1ccccc1,2\n", encoding="utf-8-sig")
    assert marked.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_smiles_csv(marked) == read_smiles_csv(plain) == [
        (0, 2, "OCC"), (1, 3, "c1ccccc1")]
    assert [(r.text, r.source.rsplit(":", 1)[1]) for r in read_smiles_list(marked)] == [
        ("CCO", "2"), ("c1ccccc1", "3")]


def test_smiles_csv_limit_reads_no_further_and_bad_bytes_name_their_line(tmp_path):
    from captioner.data.formats import read_smiles_list
    from captioner.data.manifests import DataError

    src = tmp_path / "m.csv"
    # 20,000 good rows (far past the reader's buffer), then a line that is not UTF-8
    src.write_bytes(b"smiles\nOCC\nCCN\n" + b"CCO\n" * 20_000 + b"C\xe9C\n")
    assert read_smiles_csv(src, limit=2) == [(0, 2, "OCC"), (1, 3, "CCN")]
    with pytest.raises(DataError, match=r"m\.csv:20004: not UTF-8 text \(byte 0xe9"):
        read_smiles_csv(src)
    with pytest.raises(DataError, match=r"m\.csv:20004: not UTF-8 text"):
        read_smiles_list(src)


def test_limit_renders_first_rows_only(tmp_path):
    src = write_csv(tmp_path / "in.csv", SIX)
    summary = render_molecules(src, tmp_path / "out", size=64, limit=2, workers=1,
                               progress=False)
    assert summary.rendered == 2
    assert [r["smiles"] for r in read_manifest(tmp_path / "out")] == ["CCO", "Oc1ccccc1"]


def image_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def test_augmentation_deterministic_for_any_worker_count(tmp_path):
    src = write_csv(tmp_path / "in.csv", SIX)
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        render_molecules(src, outs[workers], size=96, augment=True, seed=3, workers=workers,
                         progress=False)
    assert (outs[1] / "manifest.csv").read_bytes() == (outs[2] / "manifest.csv").read_bytes()
    assert image_bytes(outs[1]) == image_bytes(outs[2])
    assert len(image_bytes(outs[1])) == len(SIX)


def test_augmented_images_differ_from_plain_and_across_seeds(tmp_path):
    src = write_csv(tmp_path / "in.csv", SIX)
    plain, aug3, aug4 = (tmp_path / n for n in ("plain", "aug3", "aug4"))
    render_molecules(src, plain, size=96, workers=1, progress=False)
    render_molecules(src, aug3, size=96, augment=True, seed=3, workers=1, progress=False)
    render_molecules(src, aug4, size=96, augment=True, seed=4, workers=1, progress=False)
    p, a3, a4 = image_bytes(plain), image_bytes(aug3), image_bytes(aug4)
    assert sum(p[k] != a3[k] for k in p) >= 5
    assert sum(a3[k] != a4[k] for k in p) >= 5
    # canonical SMILES and atom order do not depend on the drawing style
    assert [r["smiles"] for r in read_manifest(plain)] == [r["smiles"] for r in read_manifest(aug3)]


def test_idempotent_unless_parameters_or_input_change(tmp_path):
    src = write_csv(tmp_path / "in.csv", SIX[:3])
    out = tmp_path / "out"
    first = render_molecules(src, out, size=64, workers=1, progress=False)
    stamp = (out / "manifest.csv").stat().st_mtime_ns
    image_stamp = (out / "images" / "mol_000000.png").stat().st_mtime_ns
    again = render_molecules(src, out, size=64, workers=2, progress=False)
    assert again.cached and not first.cached
    assert (again.rendered, again.skipped) == (first.rendered, first.skipped)
    assert (out / "manifest.csv").stat().st_mtime_ns == stamp
    assert (out / "images" / "mol_000000.png").stat().st_mtime_ns == image_stamp

    bigger = render_molecules(src, out, size=72, workers=1, progress=False)
    assert not bigger.cached
    from PIL import Image

    with Image.open(out / "images" / "mol_000000.png") as im:
        assert im.size == (72, 72)
    write_csv(src, SIX[:2])  # input changed: re-render, stale images removed
    changed = render_molecules(src, out, size=72, workers=1, progress=False)
    assert not changed.cached and changed.rendered == 2
    assert len(list((out / "images").glob("*.png"))) == 2


def test_selfies_column(tmp_path):
    sf = pytest.importorskip("selfies")
    src = write_csv(tmp_path / "in.csv", SIX)
    render_molecules(src, tmp_path / "out", size=64, selfies=True, workers=1, progress=False)
    rows = read_manifest(tmp_path / "out")
    assert list(rows[0]) == ["image", "smiles", "heavy_atoms", "atoms", "selfies"]
    for row in rows:
        assert row["selfies"].startswith("[")
        decoded = sf.decoder(row["selfies"])
        assert canonical_order(parse_smiles(decoded))[0] == row["smiles"]


def test_sample_takes_a_seeded_random_subset_in_file_order(tmp_path):
    from captioner.data.molecules import render_molecules

    src = tmp_path / "in.csv"
    smiles = ["C" * (i + 1) for i in range(12)]
    src.write_text("smiles\n" + "\n".join(smiles) + "\n")
    a = render_molecules(src, tmp_path / "a", size=64, sample=4, seed=3, workers=1,
                         progress=False)
    b = render_molecules(src, tmp_path / "b", size=64, sample=4, seed=3, workers=1,
                         progress=False)
    c = render_molecules(src, tmp_path / "c", size=64, sample=4, seed=4, workers=1,
                         progress=False)

    def chosen(summary):
        return [line.split(",")[1] for line in summary.manifest.read_text().splitlines()[1:]]

    assert a.rendered == 4 and chosen(a) == chosen(b) != chosen(c)
    assert chosen(a) == sorted(chosen(a), key=len)  # file order kept
