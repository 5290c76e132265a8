"""OSRA as a baseline reader: its output parsing, failures, absence, a real run on rendered
molecules and ``evaluate --compare osra`` end to end on a tiny SMILES run."""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from captioner.evaluate import osra as osra_module
from captioner.evaluate.metrics import per_example_smiles_metrics, smiles_metrics
from captioner.evaluate.osra import (
    OsraUnavailable,
    osra_environment,
    parse_osra_output,
    read_image,
    read_images,
)

HAVE_OSRA = shutil.which("osra") is not None
needs_osra = pytest.mark.skipif(not HAVE_OSRA, reason="osra not installed (apt-get install osra)")

# Small molecules of C, N, O, F (QM9-like) plus a few rings OSRA can read at 300 px.
SMILES = [
    "CCO", "c1ccccc1O", "CC(=O)O", "O=C1CCCCC1", "Cc1ccncc1", "CC(=O)Nc1ccc(O)cc1",
    "CC(C)N", "OCC#N", "FC(F)(F)c1ccccc1", "NC(=O)C1CC1", "c1ccc2ccccc2c1", "CC1CCCCC1",
    "OC1CCCC1", "c1ccncc1", "Nc1ccccc1", "CC(C)(C)O", "O=Cc1ccccc1", "CCN(CC)CC",
    "C1CCOC1", "c1ccoc1", "Cc1ccccc1C", "OC(=O)c1ccccc1", "CC#CC", "N#Cc1ccccc1",
    "C1CCNCC1", "O=C1CCCN1", "Fc1ccccc1", "COc1ccccc1", "CC(O)CO", "C=CC=O",
    "c1cc[nH]c1", "CCCCCO",
]


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("stdout, structures", [
    ("Oc1ccccc1\n", ("Oc1ccccc1",)),
    ("", ()),
    ("\n  \n", ()),
    ("CCO\n[Na+]\n", ("CCO", "[Na+]")),           # two structures on one picture
    ("CCO 0.9532\n", ("CCO",)),                  # -p adds a confidence field
])
def test_parse_osra_output(stdout, structures):
    assert parse_osra_output(stdout) == structures


def fake_osra(tmp_path: Path) -> str:
    """A stand-in ``osra`` whose behaviour depends on the file name."""
    script = tmp_path / "fake-osra"
    script.write_text("#!/bin/sh\n"
                      'case "$1" in\n'
                      "  --version) echo; echo 'osra  version: 9.9' ;;\n"
                      "  *one*) echo 'OCC' ;;\n"
                      "  *two*) printf 'CCO\\n\\n[Na+]\\n' ;;\n"
                      "  *empty*) ;;\n"
                      "  *fail*) echo 'Cannot open file' >&2; exit 252 ;;\n"
                      "  *slow*) sleep 5; echo 'CCO' ;;\n"
                      "esac\n")
    script.chmod(0o755)
    return str(script)


def test_each_outcome_maps_to_one_prediction_and_failures_never_abort(tmp_path):
    program = fake_osra(tmp_path)
    names = ["one.png", "two.png", "empty.png", "fail.png", "slow.png", "one-again.png"]
    readings = read_images(names, workers=2, timeout=0.5, program=program)
    assert readings.smiles == ["OCC", "CCO.[Na+]", "", "", "", "OCC"]  # the order given
    assert [len(r.structures) for r in readings.results] == [1, 2, 0, 0, 0, 1]
    errors = [r.error for r in readings.results]
    assert errors[:3] == [None, None, None] and errors[5] is None
    assert errors[3] == "exit status 252: Cannot open file"
    assert errors[4] == "timeout after 0.5 s"
    assert readings.failed == 2 and readings.no_answer == 3
    assert 0.4 < readings.results[4].seconds < 4.0  # killed at the timeout, not after 5 s
    summary = readings.summary()
    assert summary["name"] == "OSRA 9.9" and summary["workers"] == 2
    assert summary["errors"] == ["exit status 252: Cannot open file", "timeout after 0.5 s"]
    # empty answers are invalid predictions, never matches
    rows = per_example_smiles_metrics(readings.smiles, ["CCO", "CCO", "CCO", "CCO", "CCO", "CCO"])
    assert [r["exact_match"] for r in rows] == [True, False, False, False, False, True]
    assert [r["valid"] for r in rows] == [True, True, False, False, False, True]


def test_program_that_cannot_start_is_a_per_image_error(tmp_path):
    script = tmp_path / "not-executable"
    script.write_text("echo CCO\n")  # no shebang, not executable
    result = read_image("a.png", str(script))
    assert result.smiles == "" and result.error.startswith(f"could not run {script}")


def test_missing_osra_raises_with_the_install_command(monkeypatch):
    monkeypatch.setattr(osra_module.shutil, "which", lambda *_a, **_k: None)
    with pytest.raises(OsraUnavailable, match="apt-get install osra"):
        read_images(["a.png"])


# --------------------------------------------------------------------------- real OSRA


@needs_osra
def test_real_osra_reads_rendered_molecules(tmp_path, monkeypatch):
    from captioner.data.molecules import render_one

    mols = SMILES[:6]
    paths = []
    for i, smi in enumerate(mols):
        image, _, _ = render_one(smi, size=300)
        paths.append(tmp_path / f"m{i}.png")
        image.save(paths[-1])
    readings = read_images(paths, workers=2)
    assert readings.failed == 0
    # Open Babel's Python package sets BABEL_LIBDIR for itself; OSRA must not see it
    monkeypatch.setenv("BABEL_LIBDIR", str(tmp_path))
    monkeypatch.setenv("BABEL_DATADIR", str(tmp_path))
    assert read_images(paths[1:2]).smiles == readings.smiles[1:2] == ["Oc1ccccc1"]
    rows = per_example_smiles_metrics(readings.smiles, mols)
    read = {smi for smi, row in zip(mols, rows) if row["exact_match"]}
    # OSRA 2.1.3 reads the four ring molecules exactly and prints nothing for the two
    # smallest (CCO, acetic acid): 4 of 6. A better OSRA may read those too.
    assert {"c1ccccc1O", "O=C1CCCCC1", "Cc1ccncc1", "CC(=O)Nc1ccc(O)cc1"} <= read
    assert all(row["valid"] for smi, row in zip(mols, rows) if smi in read)
    assert readings.seconds_per_image < 10.0


# ------------------------------------------------------------------- evaluate end to end


@pytest.fixture(scope="module")
def smiles_run(tmp_path_factory, project_root, tiny_smiles_overrides):
    """A tiny SMILES run trained for two steps on molecules rendered at 300 px."""
    from captioner.config import load_config
    from captioner.data.molecules import render_molecules
    from captioner.train.trainer import train

    work = tmp_path_factory.mktemp("smiles_run")
    src = work / "smiles.csv"
    src.write_text("smiles\n" + "\n".join(SMILES) + "\n")
    summary = render_molecules(src, work / "data", size=300, workers=1, progress=False)
    cfg = load_config(project_root / "configs" / "smiles_qm9.yaml", [
        "data.format=csv", f"data.path={summary.manifest}", "data.val_fraction=0.15",
        "data.test_fraction=0.25", *tiny_smiles_overrides])
    train(cfg, work / "run", log=lambda _msg: None)
    return work / "run"


def read_predictions(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@needs_osra
def test_cli_evaluate_compare_osra_scores_the_same_files(smiles_run, tmp_path, capsys):
    from captioner.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(smiles_run), "--out", str(out),
                 "--compare", "osra", "--report"]) == 0
    assert "osra: test (" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    other = metrics["compare"]["osra"]
    assert other["count"] == metrics["images"] == metrics["count"] >= 6
    assert other["version"] == osra_module.osra_version("osra") and other["workers"] >= 1
    assert other["seconds_per_image"] > 0 and other["failed"] == 0

    rows = read_predictions(out / "predictions.csv")
    header = (out / "predictions.csv").read_text().splitlines()[0].split(",")
    assert len(header) == len(set(header)) and header[-3:] == [
        "osra_structures", "osra_error", "osra_seconds"]
    assert len(rows) == metrics["images"]
    # each osra_prediction is what osra prints for that very image file
    for row in rows:
        printed = subprocess.run(["osra", row["image"]], capture_output=True, text=True,
                                 timeout=60, env=osra_environment()).stdout
        assert row["osra_prediction"] == ".".join(parse_osra_output(printed))
        assert int(row["osra_structures"]) == len(parse_osra_output(printed))
    # the summary is the same SMILES metrics on those predictions
    refs = [json.loads(r["references"]) for r in rows]
    expected = smiles_metrics([r["osra_prediction"] for r in rows], refs)
    for key in ("exact_match", "exact_match_nostereo", "inchi_match", "validity", "tanimoto"):
        assert other[key] == pytest.approx(expected[key]), key
    assert other["exact_match"] == pytest.approx(
        sum(r["osra_exact_match"] == "True" for r in rows) / len(rows))
    assert other["exact_match"] > 0  # OSRA reads some of these 300 px drawings

    # the report page marks OSRA's reading of every card, in the same order
    page = (out / "index.html").read_text()
    marks = [json.loads(html.unescape(m)) for m in re.findall(r'data-exact="([^"]*)"', page)]
    assert [m["others"]["OSRA"] for m in marks] == [
        int(r["osra_exact_match"] == "True") for r in rows]

    md = (out / "metrics.md").read_text()
    side_by_side = md.split(f"| Metric | ours | {other['name']} |")[1].splitlines()
    exact_row = next(line for line in side_by_side if line.startswith("| Exact match (canon"))
    assert exact_row == (f"| Exact match (canonical) | {metrics['exact_match']:.4f} | "
                         f"{other['exact_match']:.4f} |")


def test_evaluate_without_osra_still_writes_everything(smiles_run, tmp_path, monkeypatch):
    from captioner.evaluate.runs import evaluate

    real_which = shutil.which
    monkeypatch.setattr(osra_module.shutil, "which",
                        lambda name, *a, **k: None if "osra" in str(name)
                        else real_which(name, *a, **k))
    logged: list[str] = []
    out = tmp_path / "eval"
    result = evaluate(smiles_run, out, compare=("osra",), log=logged.append)
    assert any(m.startswith("--compare osra skipped:") and "apt-get install osra" in m
               for m in logged)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "compare" not in metrics and "compare" not in result
    assert metrics["images"] >= 6 and 0.0 <= metrics["exact_match"] <= 1.0
    rows = read_predictions(out / "predictions.csv")
    assert len(rows) == metrics["images"] and "osra_prediction" not in rows[0]
    assert "ours" not in (out / "metrics.md").read_text()


def test_compare_needs_smiles_metrics_and_a_known_reader(smiles_run, tmp_path):
    from captioner.choices import ChoiceError
    from captioner.evaluate.runs import evaluate

    with pytest.raises(ValueError, match="needs SMILES metrics, not caption"):
        evaluate(smiles_run, tmp_path / "a", metrics="caption", compare=("osra",))
    with pytest.raises(ChoiceError, match="compare must be one of osra"):
        evaluate(smiles_run, tmp_path / "b", compare=("chemgrapher",))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_rejects_unknown_compare():
    from captioner.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["evaluate", "--run", "r", "--out", "o", "--compare", "osra"])
    assert args.compare == ["osra"]
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--run", "r", "--out", "o", "--compare", "imago"])
