"""``evaluate`` on molecules it draws itself: a named style and size (``--style``,
``--size``), and by default for data without pictures (``data.format: smiles``)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from captioner.choices import ChoiceError
from captioner.data.chem import canonical_smiles
from captioner.evaluate.osra import osra_environment, parse_osra_output
from captioner.evaluate.runs import (
    Drawing,
    draw_eval_data,
    eval_drawing,
    evaluate,
    split_smiles,
)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_smiles_data_is_drawn_by_default_in_the_eval_style(drawn_run, tmp_path):
    from captioner.generate.captioner import Captioner

    out = tmp_path / "eval"
    logged: list[str] = []
    metrics = evaluate(drawn_run, out, log=logged.append)
    assert "drawing the 'test' molecules: rdkit_default at 64 px" in logged
    assert (metrics["style"], metrics["image_px"], metrics["draw_seed"]) == (
        "rdkit_default", 64, 0)
    saved = json.loads((out / "metrics.json").read_text())
    assert (saved["style"], saved["image_px"]) == ("rdkit_default", 64)

    test_smiles, _ = split_smiles(Captioner.load(drawn_run))
    manifest = read_csv(out / "manifest.csv")
    assert [r["smiles"] for r in manifest] == test_smiles
    assert metrics["images"] == len(test_smiles) == metrics["count"] >= 6
    pictures = sorted((out / "images").glob("*.png"))
    assert len(pictures) == len(test_smiles)
    for picture in pictures:
        with Image.open(picture) as im:
            assert im.size == (64, 64)
    rows = read_csv(out / "predictions.csv")  # the model read exactly those files
    assert sorted(Path(r["image"]).resolve() for r in rows) == [p.resolve() for p in pictures]
    assert [json.loads(r["references"]) for r in rows] == [[s] for s in test_smiles]


def test_beam_n_best_adds_top_k_exact_match(drawn_run, tmp_path):
    from captioner.generate.captioner import Captioner

    logged: list[str] = []
    metrics = evaluate(drawn_run, tmp_path / "beam", limit=4, strategy="beam", beam_size=3,
                       n_best=3, log=logged.append)
    assert metrics["top_k"] == 3
    # the same candidates, generated again from the drawn files, scored by hand
    cap = Captioner.load(drawn_run)
    rows = read_csv(tmp_path / "beam" / "predictions.csv")
    gen = cap.generate([r["image"] for r in rows], strategy="beam", beam_size=3, n_best=3)
    assert [len(c) for c in gen.candidates] == [3] * 4
    refs = [json.loads(r["references"])[0] for r in rows]
    canon = [[canonical_smiles(c.text) for c in cands] for cands in gen.candidates]
    expected = np.mean([canonical_smiles(r) in c for r, c in zip(refs, canon)])
    assert metrics["exact_match_at_k"] == pytest.approx(expected)
    assert metrics["exact_match"] <= metrics["exact_match_at_k"]
    assert "Exact match in the 3 candidates kept (top-k)" in (
        tmp_path / "beam" / "metrics.md").read_text()
    assert "exact in top 3" in logged[-1]
    greedy = evaluate(drawn_run, tmp_path / "greedy", limit=4, log=lambda _m: None)
    assert "exact_match_at_k" not in greedy and "top_k" not in greedy
    viewed = evaluate(drawn_run, tmp_path / "views", limit=4, strategy="beam", beam_size=3,
                      n_best=3, rescore_views=("identity", "rot90"), log=lambda _m: None)
    assert viewed["decode"]["rescore_views"] == ["identity", "rot90"]
    assert metrics["decode"]["rescore_views"] == []
    assert viewed["exact_match_at_k"] == metrics["exact_match_at_k"]  # the same candidates


def test_each_molecule_is_scored_once_and_the_files_agree(drawn_run, tmp_path, monkeypatch):
    import captioner.evaluate.metrics as metrics_module

    scored: list[str] = []
    score_one = metrics_module._smiles_example

    def counted(prediction, *args, **kwargs):
        scored.append(prediction)
        return score_one(prediction, *args, **kwargs)

    monkeypatch.setattr(metrics_module, "_smiles_example", counted)
    metrics = evaluate(drawn_run, tmp_path / "eval", log=lambda _m: None)
    assert len(scored) == metrics["images"]  # one RDKit pass per molecule, not two
    rows = read_csv(tmp_path / "eval" / "predictions.csv")
    for key in ("exact_match", "validity", "tanimoto"):
        column = "valid" if key == "validity" else key
        values = [float(r[column] == "True") if r[column] in ("True", "False")
                  else float(r[column]) for r in rows]
        assert metrics[key] == pytest.approx(np.mean(values))
    bins = [r["heavy_atom_bin"] for r in rows]
    assert {b: m["count"] for b, m in metrics["by_heavy_atoms"].items() if m["count"]} == {
        b: bins.count(b) for b in set(bins)}


def test_crop_margin_reads_each_drawing_cropped_to_its_ink(drawn_run, tmp_path, monkeypatch,
                                                            capsys):
    from captioner.cli import main
    from captioner.data.images import load_image
    from captioner.generate.captioner import Captioner

    seen: list[np.ndarray] = []
    generate = Captioner.generate

    def spy(self, images, *args, **kwargs):
        seen.append(np.asarray(images))
        return generate(self, images, *args, **kwargs)

    monkeypatch.setattr(Captioner, "generate", spy)
    metrics = evaluate(drawn_run, tmp_path / "crop", crop_margin=0.15, log=lambda _m: None)
    assert metrics["crop_margin"] == 0.15
    rows = read_csv(tmp_path / "crop" / "predictions.csv")
    size = seen[0].shape[1]
    cropped = np.stack([load_image(r["image"], size, crop_margin=0.15) for r in rows])
    assert np.array_equal(seen[0], cropped)
    assert not np.array_equal(cropped, np.stack([load_image(r["image"], size) for r in rows]))
    whole = evaluate(drawn_run, tmp_path / "whole", crop_margin=None, log=lambda _m: None)
    assert whole["crop_margin"] is None
    import captioner.generate.captioner as captioner_module

    loaded: list[np.ndarray] = []
    monkeypatch.setattr(captioner_module, "load_image",
                        lambda *a, **k: loaded.append(load_image(*a, **k)) or loaded[-1])
    assert main(["caption", "--run", str(drawn_run), "--crop-margin", "0.15", "--json",
                 rows[0]["image"]]) == 0
    assert len(loaded) == 1 and np.array_equal(loaded[0], cropped[0])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["image"] == rows[0]["image"]


def test_a_run_that_reads_cut_pictures_does_so_everywhere(drawn_run, tmp_path, monkeypatch):
    """``decode.crop_margin`` in the run's config (the QM9 recipe's 0.15): ``evaluate``
    cuts each picture to its ink unless told ``none``; grounding moves the atoms'
    positions into the cut; the report and ``attention`` draw the attention over the cut
    the model read."""
    import captioner.evaluate.runs as runs_module
    import captioner.viz.report as report_module
    from captioner.cli import main
    from captioner.data.images import load_view
    from captioner.generate.captioner import Captioner

    run = drawn_run
    assert json.loads((run / "config.json").read_text())["decode"]["crop_margin"] == 0.15
    assert Captioner.load(run).crop_margin == 0.15

    grounded: list[tuple] = []
    measure = runs_module.molecule_grounding
    monkeypatch.setattr(runs_module, "molecule_grounding",
                        lambda *a: grounded.append(a) or measure(*a))
    shown: list[tuple] = []
    view = report_module.load_view
    monkeypatch.setattr(report_module, "load_view",
                        lambda path, margin: shown.append((path, margin)) or view(path, margin))
    metrics = evaluate(run, tmp_path / "cut", report=True, log=lambda _m: None)
    assert metrics["crop_margin"] == 0.15 and "grounding" in metrics
    rows = read_csv(tmp_path / "cut" / "predictions.csv")
    manifest = {r["image"]: json.loads(r["atoms"])
                for r in read_csv(tmp_path / "cut" / "manifest.csv")}
    _words, _att, _refs, atoms, hws, _grid = grounded[-1]
    for row, mol, hw in zip(rows, atoms, hws, strict=True):
        cut = load_view(row["image"], 0.15)
        assert hw == cut.pixels.shape[:2] and cut.box is not None
        original = manifest[str(Path(row["image"]).relative_to(tmp_path / "cut"))]
        assert [(a["x"], a["y"]) for a in mol] == [
            (a["x"] - cut.box[0], a["y"] - cut.box[1]) for a in original]
    assert (tmp_path / "cut" / "index.html").is_file()
    assert sorted(shown) == sorted((r["image"], 0.15) for r in rows)
    whole = evaluate(run, tmp_path / "whole", crop_margin=None, log=lambda _m: None)
    assert whole["crop_margin"] is None
    _words, _att, _refs, atoms, hws, _grid = grounded[-1]
    assert hws[0] == load_view(rows[0]["image"], None).pixels.shape[:2]
    assert main(["evaluate", "--run", str(run), "--out", str(tmp_path / "cli"),
                 "--crop-margin", "none", "--limit", "2"]) == 0
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["crop_margin"] is None

    viewed: list[str] = []
    cut_view = Captioner.view
    monkeypatch.setattr(Captioner, "view",
                        lambda self, path: viewed.append((path, self.crop_margin))
                        or cut_view(self, path))
    assert main(["attention", "--run", str(run), "--out", str(tmp_path / "att"),
                 rows[0]["image"]]) == 0
    assert viewed == [(rows[0]["image"], 0.15)]


def test_named_style_size_and_seed(drawn_run, tmp_path):
    def draw(name: str, seed: int) -> list[bytes]:
        metrics = evaluate(drawn_run, tmp_path / name, style="thin_rotated_bw", size=96,
                           limit=3, draw_seed=seed, log=lambda _m: None)
        assert (metrics["style"], metrics["image_px"], metrics["images"]) == (
            "thin_rotated_bw", 96, 3)
        return [p.read_bytes() for p in sorted((tmp_path / name / "images").glob("*.png"))]

    first, again, other = draw("a", 0), draw("b", 0), draw("c", 1)
    assert len(first) == 3 and first == again  # seeded: the same pictures every time
    assert first != other  # another seed rotates them differently


def test_drawing_choice_follows_the_data_and_the_arguments(drawn_run):
    from captioner.generate.captioner import Captioner

    cap = Captioner.load(drawn_run)
    assert eval_drawing(cap) == Drawing("rdkit_default", 64, 0)
    assert eval_drawing(cap, style="indigo_default") == Drawing("indigo_default", 64, 0)
    assert eval_drawing(cap, size=128, seed=3) == Drawing("rdkit_default", 128, 3)
    with pytest.raises(ChoiceError, match="style must be one of"):
        eval_drawing(cap, style="crayon")
    pictures = SimpleNamespace(config=SimpleNamespace(data=replace(cap.config.data,
                                                                  format="csv")))
    assert eval_drawing(pictures) is None  # image files: read them as they are
    assert eval_drawing(pictures, size=300) == Drawing("rdkit_default", 300, 0)


def test_mix_style_draws_the_runs_own_drawing_config(drawn_run, tmp_path):
    from captioner.data.drawing import draw_named, example_seed
    from captioner.generate.captioner import Captioner

    cap = Captioner.load(drawn_run)
    indigo_only = replace(cap.config.data.drawing, toolkits=["indigo"], toolkit_weights=[1.0])
    cap.config = replace(cap.config, data=replace(cap.config.data, drawing=indigo_only))
    eval_data, undrawn = draw_eval_data(cap, tmp_path / "mix", Drawing("mix", 64, 0), limit=2)
    assert undrawn == 0 and eval_data.split.num_images == 2
    manifest = read_csv(tmp_path / "mix" / "manifest.csv")
    for i, row in enumerate(manifest):
        with Image.open(tmp_path / "mix" / row["image"]) as im:
            drawn = np.asarray(im.convert("RGB"))
        expected = draw_named(row["smiles"], "mix", 64, example_seed(0, i), indigo_only)[0]
        assert np.array_equal(drawn, np.asarray(expected))


@pytest.mark.skipif(shutil.which("osra") is None, reason="osra not installed")
def test_cli_style_with_osra_reads_the_drawn_files(drawn_run, tmp_path):
    from captioner.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(drawn_run), "--out", str(out), "--style",
                 "rdkit_plain", "--size", "300", "--limit", "4", "--compare", "osra"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["style"], metrics["image_px"], metrics["images"]) == ("rdkit_plain", 300, 4)
    assert metrics["compare"]["osra"]["count"] == 4
    for row in read_csv(out / "predictions.csv"):
        assert Path(row["image"]).resolve().parent == (out / "images").resolve()
        printed = subprocess.run(["osra", row["image"]], capture_output=True, text=True,
                                 timeout=60, env=osra_environment()).stdout
        assert row["osra_prediction"] == ".".join(parse_osra_output(printed))
