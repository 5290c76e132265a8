"""Molecules drawn in many styles (captioner.data.drawing) and drawn while training
(captioner.data.drawn, data.format: smiles)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("rdkit")
pytest.importorskip("indigo")
pytest.importorskip("albumentations")

from captioner.choices import Choices  # noqa: E402
from captioner.config import ConfigError, DrawingConfig, load_config  # noqa: E402
from captioner.data.drawing import (  # noqa: E402
    Damage,
    Style,
    damage,
    draw_canvas,
    draw_example,
    draw_example_atoms,
    draw_named,
    faint,
    sample_style,
    to_square,
)
from captioner.data.formats import read_smiles_list  # noqa: E402
from captioner.data.manifests import DataError  # noqa: E402

MOLECULES = ["CC1(C)CC2CC2O1", "OC1CN=C(N)O1", "N#CC1=CC(O)C=C1", "Cc1ccc(O)cc1N",
             "O=C1NC(=O)C2=C1N=CN2", "CCC(C)(C)C#N", "C[NH3+]", "FC(F)(F)c1ccncc1"]


def test_examples_are_seeded_and_varied():
    cfg = DrawingConfig()
    a = draw_example("Cc1ccc(O)cc1N", 64, cfg, seed=3)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, draw_example("Cc1ccc(O)cc1N", 64, cfg, seed=3))
    others = [draw_example("Cc1ccc(O)cc1N", 64, cfg, seed=s) for s in range(4, 12)]
    assert all(not np.array_equal(a, b) for b in others)
    assert all(b.min() < 200 for b in others)  # ink on every picture


def test_style_sampling_covers_the_configured_mix():
    rng = np.random.default_rng(0)
    styles = [sample_style(DrawingConfig(), rng) for _ in range(400)]
    toolkits = [s.toolkit for s in styles]
    assert 0.5 < toolkits.count("rdkit") / 400 < 0.7  # weights 0.6 / 0.4
    assert {"rdkit", "indigo"} == set(toolkits)
    assert any(s.rotate for s in styles) and any(not s.rotate for s in styles)
    assert any(s.width != s.height for s in styles)
    assert all(128 <= max(s.canvas) <= 256 for s in styles)
    assert 0.15 < np.mean([s.damage.any for s in styles]) < 0.3  # degrade_prob 0.25
    only_indigo = DrawingConfig(toolkits=["indigo"], toolkit_weights=[1.0])
    assert {sample_style(only_indigo, rng).toolkit for _ in range(20)} == {"indigo"}


@pytest.mark.parametrize("toolkit", ["rdkit", "indigo", "openbabel"])
def test_each_toolkit_draws_on_a_non_square_canvas(toolkit):
    if toolkit == "openbabel":
        pytest.importorskip("openbabel")
    style = Style(toolkit, 200, 120, rotate=30.0, colour=True, aromatic=True)
    image = draw_canvas("Cc1ccc(O)cc1N", style)
    pixels = np.asarray(image)
    assert pixels.shape[2] == 3 and pixels.min() < 100 and pixels.max() == 255
    if toolkit != "openbabel":  # Open Babel rotates the picture: the canvas grows
        assert image.size == (200, 120)
    square, where = to_square(image, 64, margin=0.1)
    assert square.size == (64, 64)
    assert np.asarray(square)[0].min() > 200  # the margin is white, not stretched ink


def test_coordgen_and_faint_ink_are_sampled_last_and_drawn():
    """``coordgen_prob`` and ``faint_ink_prob`` add a second RDKit layout and grey ink;
    with both at 0 (the default) a seed draws exactly the styles it drew before."""
    varied = DrawingConfig(coordgen_prob=0.5, faint_ink_prob=0.5, faint_ink_range=[0.3, 0.6])
    for seed in range(30):
        old = sample_style(DrawingConfig(), np.random.default_rng(seed))
        new = sample_style(varied, np.random.default_rng(seed))
        assert (old.coordgen, old.ink) == (False, 1.0)
        assert dataclasses.replace(new, coordgen=False, ink=1.0) == old
        assert new.ink == 1.0 or 0.3 <= new.ink <= 0.6
    styles = [sample_style(varied, np.random.default_rng(s)) for s in range(400)]
    assert 0.4 < np.mean([s.coordgen for s in styles]) < 0.6
    assert 0.4 < np.mean([s.ink < 1.0 for s in styles]) < 0.6
    # CoordGen lays the cage out otherwise: another picture with the same atoms
    cage = "C#CC12CCC3CC1N32"
    own = np.asarray(draw_canvas(cage, Style("rdkit", 160, 160)))
    coordgen = np.asarray(draw_canvas(cage, Style("rdkit", 160, 160, coordgen=True)))
    assert np.abs(own.astype(float) - coordgen).mean() > 5.0
    pixels, xy = draw_example_atoms(cage, 96, DrawingConfig(
        toolkits=["rdkit"], toolkit_weights=[1.0], degrade_prob=0.0, coordgen_prob=1.0), 0)
    assert xy.shape == (9, 2) and pixels.min() < 100
    # faint ink: the darkest pixel is the ink's fraction of black, white stays white
    black = DrawingConfig(toolkits=["rdkit"], toolkit_weights=[1.0], degrade_prob=0.0,
                          colour_prob=0.0)
    grey = dataclasses.replace(black, faint_ink_prob=1.0, faint_ink_range=[0.4, 0.4])
    dark, light = draw_example(cage, 96, black, 3), draw_example(cage, 96, grey, 3)
    assert dark.min() < 100 and light.min() == round(255 - 0.4 * (255 - int(dark.min())))
    assert np.array_equal(light, faint(dark, 0.4)) and light.max() == 255
    assert faint(dark, 1.0) is dark


def test_layout_jitter_is_sampled_after_everything_and_moves_the_atoms():
    """``layout_jitter_prob`` moves the atoms off the layout (RDKit and Indigo) by a
    fraction of the bond length; with it at 0 a seed draws the styles it drew before."""
    before = DrawingConfig(coordgen_prob=0.5, faint_ink_prob=0.5)
    varied = dataclasses.replace(before, layout_jitter_prob=0.5,
                                 layout_jitter_range=[0.1, 0.2])
    for seed in range(30):
        old = sample_style(before, np.random.default_rng(seed))
        new = sample_style(varied, np.random.default_rng(seed))
        assert old.jitter == 0.0 and dataclasses.replace(new, jitter=0.0) == old
        assert new.jitter == 0.0 or 0.1 <= new.jitter <= 0.2
    styles = [sample_style(varied, np.random.default_rng(s)) for s in range(400)]
    assert 0.4 < np.mean([s.jitter > 0 for s in styles]) < 0.6
    cage = "C#CC12CCC3CC1N32"
    for toolkit in ("rdkit", "indigo"):
        own = np.asarray(draw_canvas(cage, Style(toolkit, 160, 160, seed=1)), float)
        moved = np.asarray(draw_canvas(cage, Style(toolkit, 160, 160, jitter=0.15, seed=1)))
        again = np.asarray(draw_canvas(cage, Style(toolkit, 160, 160, jitter=0.15, seed=1)))
        other = np.asarray(draw_canvas(cage, Style(toolkit, 160, 160, jitter=0.15, seed=2)))
        assert np.abs(own - moved).mean() > 2.0, toolkit  # another picture ...
        assert np.array_equal(moved, again) and not np.array_equal(moved, other)  # seeded
    # the atoms' pixels follow the moved layout: each atom still sits on its ink
    cfg = DrawingConfig(toolkits=["rdkit"], toolkit_weights=[1.0], degrade_prob=0.0,
                        layout_jitter_prob=1.0, layout_jitter_range=[0.15, 0.15])
    plain = dataclasses.replace(cfg, layout_jitter_prob=0.0)
    (pixels, xy), (_, still) = (draw_example_atoms(cage, 96, c, 0) for c in (cfg, plain))
    assert xy.shape == still.shape == (9, 2) and np.abs(xy - still).max() > 1.0
    grey = pixels.mean(axis=-1)
    for x, y in xy:  # ink within 2 px of every atom (bond ends meet there)
        x0, y0 = int(round(x)), int(round(y))
        assert grey[max(0, y0 - 2):y0 + 3, max(0, x0 - 2):x0 + 3].min() < 200  # white: 255


def test_to_square_pads_without_stretching():
    from PIL import Image

    image = Image.new("RGB", (100, 50), "white")
    image.paste((0, 0, 0), (0, 0, 100, 50))  # all black: its square copy is half black
    square, where = to_square(image, 40)
    pixels = np.asarray(square)[..., 0]
    assert (pixels < 128).mean() == pytest.approx(0.5, abs=0.03)
    assert where(0.0, 0.0) == (0.0, 10.0) and where(100.0, 50.0) == (40.0, 30.0)


def test_damage_is_seeded_and_changes_pixels():
    clean = draw_example("Cc1ccc(O)cc1N", 64, DrawingConfig(degrade_prob=0.0), seed=1)
    every = Damage(blur=True, noise=True, jpeg=True, binarize=False, distort=True)
    a, b = damage(clean, every, 5), damage(clean, every, 5)
    assert np.array_equal(a, b) and not np.array_equal(a, clean)
    assert not np.array_equal(a, damage(clean, every, 6))
    binary = damage(clean, Damage(binarize=True), 0)
    assert set(np.unique(binary)) <= {0, 255}
    assert damage(clean, Damage(), 0) is clean


@pytest.mark.parametrize("style", Choices().drawing_style)
def test_named_styles(style):
    if style == "openbabel_default":
        pytest.importorskip("openbabel")
    image, canonical, atoms = draw_named("OCC", style, 96, seed=2)
    assert image.size == (96, 96) and canonical == "CCO"
    assert np.asarray(image).min() < 128
    if style in ("rdkit_plain", "rdkit_default", "thin_rotated_bw"):
        assert [a["symbol"] for a in atoms] == ["C", "C", "O"]
        assert all(0 <= a["x"] <= 96 and 0 <= a["y"] <= 96 for a in atoms)
    else:
        assert atoms is None
    again, _, _ = draw_named("OCC", style, 96, seed=2)
    assert np.array_equal(np.asarray(image), np.asarray(again))


def test_mix_style_samples_the_given_drawing_config():
    indigo_only = DrawingConfig(toolkits=["indigo"], toolkit_weights=[1.0])
    rdkit_only = DrawingConfig(toolkits=["rdkit"], toolkit_weights=[1.0])
    image, canonical, _ = draw_named("Cc1ccc(O)cc1N", "mix", 96, 5, indigo_only)
    assert np.array_equal(np.asarray(image), draw_example(canonical, 96, indigo_only, 5))
    other = np.asarray(draw_named("Cc1ccc(O)cc1N", "mix", 96, 5, rdkit_only)[0])
    assert not np.array_equal(np.asarray(image), other)
    default = np.asarray(draw_named("Cc1ccc(O)cc1N", "mix", 96, 5)[0])
    assert np.array_equal(default, draw_example(canonical, 96, DrawingConfig(), 5))


def test_rdkit_default_is_what_draw_moltoimage_draws():
    from rdkit import Chem
    from rdkit.Chem import Draw

    ours = np.asarray(draw_named("Cc1ccc(O)cc1N", "rdkit_default", 224)[0]).astype(int)
    theirs = np.asarray(Draw.MolToImage(Chem.MolFromSmiles("Cc1ccc(O)cc1N"),
                                        size=(224, 224)).convert("RGB")).astype(int)
    assert np.abs(ours - theirs).mean() < 2.0  # the same drawing up to anti-aliasing


def test_thin_rotated_differs_by_seed():
    a = np.asarray(draw_named("Cc1ccc(O)cc1N", "thin_rotated_bw", 128, seed=0)[0])
    b = np.asarray(draw_named("Cc1ccc(O)cc1N", "thin_rotated_bw", 128, seed=1)[0])
    assert not np.array_equal(a, b)
    assert set(np.unique(a[..., 0] - a[..., 2])) == {0}  # black and white: no colour


def test_drawing_module_does_not_import_tensorflow():
    code = ("import sys, captioner.data.drawing; "
            "print(any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


# ---- data.format: smiles -------------------------------------------------------------------
def test_read_smiles_list_canonicalises_and_names_bad_lines(tmp_path):
    good = tmp_path / "m.csv"
    good.write_text("id,smiles\n1,OCC\n2,C1=CC=CC=C1\n")
    records = read_smiles_list(good)
    assert [r.text for r in records] == ["CCO", "c1ccccc1"]
    assert [r.image for r in records] == ["", ""]
    assert records[1].source == f"{good}:3"
    bad = tmp_path / "bad.csv"
    bad.write_text("smiles\nCCO\nC1CC\nCC\nXyz\n")
    with pytest.raises(DataError, match=r"2 SMILES that RDKit cannot parse, first .*bad.csv:3"):
        read_smiles_list(bad)
    with pytest.raises(DataError, match="no column 'smi'"):
        read_smiles_list(good, column="smi")


def test_rdkit_pictures_say_where_their_atoms_are():
    from rdkit import Chem

    rdkit_only = DrawingConfig(toolkits=["rdkit"], toolkit_weights=[1.0], degrade_prob=0.0)
    for seed, smiles in enumerate(MOLECULES):
        pixels, xy = draw_example_atoms(smiles, 128, rdkit_only, seed)
        assert np.array_equal(pixels, draw_example(smiles, 128, rdkit_only, seed))
        assert xy.shape == (Chem.MolFromSmiles(smiles).GetNumAtoms(), 2)
        grey = pixels.mean(-1)  # (128, 128)
        for x, y in xy:  # ink (bond ends meet, or a label) within 4 px of every atom
            row, col = int(round(y)), int(round(x))
            assert grey[max(0, row - 4):row + 5, max(0, col - 4):col + 5].min() < 220, smiles
    # in colour, the k-th position is the k-th atom of the SMILES: O labels red, N blue
    colour = DrawingConfig(toolkits=["rdkit"], toolkit_weights=[1.0], degrade_prob=0.0,
                           colour_prob=1.0, font_scale_range=[1.0, 1.2])
    smiles = "OC1CN=C(N)O1"  # atoms O C C N C N O
    for seed in range(4):
        pixels, xy = draw_example_atoms(smiles, 160, colour, seed)
        for (x, y), symbol in zip(xy, "OCCNCNO", strict=True):
            if symbol == "C":  # black, and may touch a red or blue half-bond
                continue
            row, col = int(round(y)), int(round(x))
            near = pixels[max(0, row - 4):row + 5, max(0, col - 4):col + 5].reshape(-1, 3)
            red = bool(((near[:, 0] > 150) & (near[:, 2] < 100)).any())
            blue = bool(((near[:, 2] > 150) & (near[:, 0] < 100)).any())
            assert (red, blue) == (symbol == "O", symbol == "N"), (seed, symbol)
    indigo_only = DrawingConfig(toolkits=["indigo"], toolkit_weights=[1.0])
    assert draw_example_atoms(MOLECULES[0], 64, indigo_only, 0)[1] is None
    distorted = DrawingConfig(toolkits=["rdkit"], toolkit_weights=[1.0], degrade_prob=1.0,
                              distort_prob=1.0)
    assert draw_example_atoms(MOLECULES[0], 64, distorted, 0)[1] is None


def test_crop_to_ink_draws_the_molecule_filling_its_picture_with_its_atoms_moved():
    """With ``crop_to_ink`` the drawing is cut to its ink (margin from ``margin_range``),
    as ``evaluate --crop-margin`` reads a picture, and the atoms' pixels follow the cut."""
    rdkit_only = dict(toolkits=["rdkit"], toolkit_weights=[1.0], degrade_prob=0.0,
                      canvas_range=[256, 256], aspect_range=[1.0, 1.0])
    cropped = DrawingConfig(crop_to_ink=True, margin_range=[0.1, 0.1], **rdkit_only)
    smiles = "CCO"
    for seed in range(3):
        pixels, xy = draw_example_atoms(smiles, 120, cropped, seed)
        ink = np.nonzero(pixels.mean(-1) < 200)
        # margin 0.1: the ink's longer side is 120 / 1.2 = 100 px (+- a pixel of resizing)
        extent = max(np.ptp(ink[0]), np.ptp(ink[1])) + 1
        assert 97 <= extent <= 103, (seed, extent)
        grey = pixels.mean(-1)
        for x, y in xy:  # every atom still on ink after the cut
            row, col = int(round(y)), int(round(x))
            assert grey[max(0, row - 4):row + 5, max(0, col - 4):col + 5].min() < 220, seed
    # the picture evaluate --crop-margin 0.1 reads from the same drawing saved whole
    import io

    from captioner.data.drawing import draw_canvas, sample_style
    from captioner.data.images import load_image

    png = io.BytesIO()
    draw_canvas(smiles, sample_style(cropped, np.random.default_rng(0))).save(png, "PNG")
    read = load_image(png.getvalue(), 120, crop_margin=0.1).astype(float)
    drawn = draw_example(smiles, 120, cropped, 0).astype(float)
    assert np.abs(drawn - read).mean() < 0.5  # the same crop and size
    assert np.abs(drawn - np.roll(read, 1, axis=1)).mean() > 1.0  # 1 px off is not


def test_drawing_config_is_checked():
    with pytest.raises(ConfigError, match="decode.crop_margin: must be set"):
        load_config("smiles_qm9", ["data.drawing.crop_to_ink=true", "decode.crop_margin=null"])
    assert load_config("smiles_qm9", ["data.drawing.crop_to_ink=true",
                                      "decode.crop_margin=0.15"]).decode.crop_margin == 0.15
    with pytest.raises(ConfigError, match=r"data.drawing.toolkits\[1\] must be one of"):
        load_config("smiles_qm9", ["data.drawing.toolkits=[rdkit, chemdraw]"])
    with pytest.raises(ConfigError, match="data.drawing.toolkit_weights"):
        load_config("smiles_qm9", ["data.drawing.toolkit_weights=[1.0]"])
    with pytest.raises(ConfigError, match="data.drawing.blur_prob"):
        load_config("smiles_qm9", ["data.drawing.blur_prob=1.5"])
    with pytest.raises(ConfigError, match="data.drawing.faint_ink_range: fractions"):
        load_config("smiles_qm9", ["data.drawing.faint_ink_range=[0.5, 1.5]"])
    with pytest.raises(ConfigError, match="data.drawing.faint_ink_range: two numbers"):
        load_config("smiles_qm9", ["data.drawing.faint_ink_range=[0.8, 0.5]"])
    with pytest.raises(ConfigError, match="data.drawing.coordgen_prob"):
        load_config("smiles_qm9", ["data.drawing.coordgen_prob=2"])
    with pytest.raises(ConfigError, match="data.drawing.layout_jitter_range: fractions"):
        load_config("smiles_qm9", ["data.drawing.layout_jitter_range=[0.1, 0.8]"])
    with pytest.raises(ConfigError, match="data.drawing.layout_jitter_prob"):
        load_config("smiles_qm9", ["data.drawing.layout_jitter_prob=-0.1"])
    with pytest.raises(ConfigError, match="data.drawing.eval_style must be one of"):
        load_config("smiles_qm9", ["data.drawing.eval_style=crayon"])
    for overrides in (["data.format=csv"], ["tokenizer.kind=selfies"]):  # no atom positions
        with pytest.raises(ConfigError, match="train.attention_supervision: needs data.format"):
            load_config("smiles_qm9", [*overrides, "train.attention_supervision=1.0"])
    with pytest.raises(ConfigError, match="train.attention_supervision: must be 0"):
        load_config("smiles_qm9", ["train.attention_supervision=-1"])
    cfg = load_config("smiles_qm9")
    assert cfg.data.format == "smiles" and cfg.data.drawing.toolkits == ["rdkit", "indigo"]


tf = pytest.importorskip("tensorflow")

from captioner.data.drawing import example_seed  # noqa: E402
from captioner.data.drawn import DrawnExamples, draw_split  # noqa: E402


def _source(workers: int, n: int = 12) -> DrawnExamples:
    smiles = [MOLECULES[i % len(MOLECULES)] for i in range(n)]
    tokens = np.arange(n * 5, dtype=np.int32).reshape(n, 5)
    return DrawnExamples(smiles, tokens, 32, DrawingConfig(workers=workers), seed=7)


def _epoch(source: DrawnExamples, epoch: int, skip: int = 0) -> list[tuple[np.ndarray, ...]]:
    return [(im.numpy(), tok.numpy()) for im, tok in source.batches(4, epoch, skip)]


def test_drawn_batches_are_new_each_epoch_and_resume_exactly():
    source = _source(workers=0)
    one = _epoch(source, 1)
    assert len(one) == 3 and one[0][0].shape == (4, 32, 32, 3) and one[0][1].shape == (4, 5)
    # every pair once per epoch, with its own targets
    rows = np.concatenate([tok[:, 0] // 5 for _, tok in one])
    assert sorted(rows) == list(range(12))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(one, _epoch(source, 1)))
    two = _epoch(source, 2)
    assert not any(np.array_equal(a[0], b[0]) for a, b in zip(one, two))
    resumed = _epoch(source, 1, skip=2)  # after 2 of 3 batches
    assert len(resumed) == 1
    assert np.array_equal(resumed[0][0], one[2][0]) and np.array_equal(resumed[0][1], one[2][1])
    # no autotuner thread: its join made each epoch's last batch wait idle (README)
    assert source.batches(4, 1).options().autotune.enabled is False


def test_drawn_batches_carry_the_cells_of_their_atoms():
    """With a grid, each batch has a third tensor: the cell of the atom each target token
    names (-1 elsewhere), the same as atom_cells computed eagerly for that picture."""
    from captioner.data.drawn import atom_cells
    from captioner.data.molecules import is_atom_token
    from captioner.data.tokenizers import SmilesTokenizer

    tok = SmilesTokenizer().fit(MOLECULES)
    tokens = tok.encode_batch(MOLECULES, 24)  # (8, 24)
    rdkit_only = DrawingConfig(toolkits=["rdkit"], toolkit_weights=[1.0], degrade_prob=0.0,
                               workers=0)
    source = DrawnExamples(MOLECULES, tokens, 64, rdkit_only, seed=3, grid_hw=(4, 4))
    batches = list(source.batches(4, 1))
    assert len(batches) == 2 and all(len(b) == 3 for b in batches)
    for step, (_, targets, cells) in enumerate(batches):
        assert cells.shape == (4, 24) and cells.dtype == tf.int32
        for j, (row, row_cells) in enumerate(zip(targets.numpy(), cells.numpy(), strict=True)):
            i = [k for k in range(8) if np.array_equal(tokens[k], row)][0]
            words = tok.ids_to_tokens(row, strip_special=False)
            atoms = [p for p, w in enumerate(words) if is_atom_token(w)]
            assert np.flatnonzero(row_cells >= 0).tolist() == atoms  # every atom, no other
            assert row_cells.max() < 16
            _, xy = draw_example_atoms(MOLECULES[i], 64, rdkit_only,
                                       example_seed(3, 1, step * 4 + j))
            assert np.array_equal(atom_cells(MOLECULES[i], xy, (4, 4), 64, 24), row_cells)
    mixed = DrawnExamples(MOLECULES, tokens, 64, DrawingConfig(toolkits=["indigo"],
                          toolkit_weights=[1.0], workers=0), seed=3, grid_hw=(4, 4))
    assert all((cells.numpy() == -1).all() for _, _, cells in mixed.batches(4, 1))
    assert all(len(b) == 2 for b in _source(workers=0).batches(4, 1))  # no grid: no cells


def test_drawing_processes_draw_the_same_pictures():
    in_process, pooled = _source(workers=0), _source(workers=2)
    try:
        for a, b in zip(_epoch(in_process, 1), _epoch(pooled, 1)):
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    finally:
        pooled.close()


def test_example_seeds_and_fixed_splits():
    assert len({example_seed(0, e, p) for e in range(3) for p in range(100)}) == 300
    cfg = DrawingConfig(workers=0)
    a = draw_split(MOLECULES[:3], 32, "mix", 0, cfg)
    assert a.shape == (3, 32, 32, 3) and np.array_equal(a, draw_split(MOLECULES[:3], 32, "mix",
                                                                      0, cfg))
    b = draw_split(MOLECULES[:3], 32, "rdkit_plain", 0, cfg)
    assert not np.array_equal(a, b)


def test_train_on_drawn_molecules_with_selfies_tokens(tmp_path, tiny_smiles_overrides):
    """The drawn source with the SELFIES tokenizer (test_evaluate_drawn's run uses SMILES):
    training, a run directory that says so, and a model whose outputs are molecules."""
    pytest.importorskip("selfies")
    from rdkit import Chem

    from captioner.generate.captioner import Captioner
    from captioner.train.trainer import train

    data = tmp_path / "mols.csv"
    data.write_text("smiles\n" + "\n".join(MOLECULES * 5) + "\n")
    overrides = [f"data.path={data}", "data.drawing.workers=0", "data.val_fraction=0.25",
                 "data.test_fraction=0.125", *tiny_smiles_overrides, "tokenizer.kind=selfies",
                 "train.epochs=2", "train.batch_size=2", "train.tensorboard=false"]
    cfg = load_config("smiles_qm9", overrides)
    logs: list[str] = []
    history = train(cfg, tmp_path / "run", log=logs.append)
    assert history["epoch"] == [1, 2] and all(np.isfinite(history["loss"]))
    assert any("training molecules drawn while training" in m for m in logs)
    model = json.loads((tmp_path / "run" / "model.json").read_text())
    assert model["cnn_norm"] == cfg.model.cnn_norm
    assert json.loads((tmp_path / "run" / "tokenizer.json").read_text())["kind"] == "selfies"
    pictures = np.stack([draw_example(s, 32, DrawingConfig(), i)
                         for i, s in enumerate(MOLECULES[:3])])
    texts = Captioner.load(tmp_path / "run").generate(pictures).texts
    assert len(texts) == 3
    assert all(t == "" or Chem.MolFromSmiles(t) is not None for t in texts)  # SMILES out


def test_render_smiles_writes_a_manifest_evaluate_can_read(tmp_path):
    from captioner.data.drawing import render_smiles
    from captioner.data.manifests import read_csv_manifest

    summary = render_smiles(["OCC", "C1CC", "c1ccccc1O"], tmp_path / "thin", 64,
                            "thin_rotated_bw", seed=1, progress=False)
    assert summary.rendered == 2 and summary.skipped[0][:2] == (1, "C1CC")
    records = read_csv_manifest(summary.manifest, text_column="smiles", split_column=None)
    assert [r.text for r in records] == ["CCO", "Oc1ccccc1"]
    assert [a["symbol"] for a in records[0].meta["atoms"]] == ["C", "C", "O"]
    assert records[1].meta["heavy_atoms"] == "7"
    again = render_smiles(["OCC"], tmp_path / "again", 64, "thin_rotated_bw", seed=1,
                          progress=False)
    first = (tmp_path / "thin" / "images" / "mol_000000.png").read_bytes()
    assert (tmp_path / "again" / "images" / "mol_000000.png").read_bytes() == first
    assert again.rendered == 1


def test_render_molecules_cli_draws_a_named_style(tmp_path):
    src = tmp_path / "m.csv"
    src.write_text("name,smiles\na,CCO\nb,C1CC\nc,c1ccccc1O\n")
    out = tmp_path / "indigo"
    done = subprocess.run([sys.executable, "-m", "captioner", "render-molecules", "--smiles",
                           str(src), "--out", str(out), "--style", "indigo_default",
                           "--size", "96"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "drew 2 molecules in style indigo_default, skipped 1" in done.stdout
    assert (out / "skipped.csv").read_text().splitlines()[1].startswith("3,C1CC,")
    from PIL import Image

    with Image.open(out / "images" / "mol_000002.png") as image:
        assert image.size == (96, 96)
    bad = subprocess.run([sys.executable, "-m", "captioner", "render-molecules", "--smiles",
                          str(src), "--out", str(out), "--style", "mix", "--augment"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "does not combine with --augment" in bad.stderr


def test_undrawable_molecules_are_counted(monkeypatch):
    import captioner.data.drawing as drawing
    from captioner.data.molecules import RenderError

    real = drawing.draw_example_atoms

    def flaky(smiles, size, cfg, seed):
        if smiles == "C[NH3+]":
            raise RenderError("cannot draw")
        return real(smiles, size, cfg, seed)

    monkeypatch.setattr(drawing, "draw_example_atoms", flaky)
    source = _source(workers=0, n=8)  # MOLECULES[6] is C[NH3+]
    batches = _epoch(source, 1)
    assert source.undrawn == {"C[NH3+]": 1}
    rows = np.concatenate([tok[:, 0] // 5 for _, tok in batches])
    images = np.concatenate([im for im, _ in batches])
    assert images[list(rows).index(6)].min() == 255  # trained on a white picture
