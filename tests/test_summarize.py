"""scripts/summarize.py: the README's molecule tables from what ``evaluate`` and ``train``
wrote (metrics.json, predictions.csv, history.json)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from captioner.evaluate.metrics import smiles_metrics


@pytest.fixture(scope="module")
def summarize(load_script):
    return load_script("summarize")


def _evaluation(folder: Path, preds: list[str], refs: list[str], heavy: list[int]) -> Path:
    folder.mkdir()
    metrics = {"images": len(preds), **smiles_metrics(preds, refs, heavy)}
    metrics["compare"] = {"osra": {"count": len(preds), **smiles_metrics(refs, refs, heavy)}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    with (folder / "predictions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "heavy_atoms", "exact_match"])
        for i, (p, r, h) in enumerate(zip(preds, refs, heavy)):
            writer.writerow([f"{i}.png", h, str(p == r)])
    return folder


def test_smiles_sizes_errors_and_curve_tables(summarize, tmp_path, capsys):
    ev = _evaluation(tmp_path / "eval", ["CCO", "COC", "", "CCCC"],
                     ["CCO", "CCO", "CCN", "CCC"], [3, 3, 3, 3])
    assert summarize.main(["smiles", f"greedy={ev}"]) == 0
    out = capsys.readouterr().out
    assert "| greedy | 4 | 0.250 | 0.750 |" in out
    assert "| greedy: OSRA | 4 | 1.000 | 1.000 |" in out
    assert "candidates" not in out

    metrics = json.loads((ev / "metrics.json").read_text())
    (ev / "metrics.json").write_text(json.dumps({**metrics, "top_k": 5,
                                                 "exact_match_at_k": 0.75}))
    summarize.main(["smiles", f"beam={ev}"])
    assert "beam: the molecule among the 5 candidates 0.750 (exact match 0.250)" in (
        capsys.readouterr().out)

    summarize.main(["sizes", f"greedy={ev}"])
    assert "| greedy | 0.250 (4) |" in capsys.readouterr().out

    summarize.main(["errors", f"greedy={ev}"])
    out = capsys.readouterr().out
    assert "| drawings | none | invalid | stereo | isomer | atoms | size |" in out
    assert "| greedy | 0.250 | 0.250 | 0.000 | 0.250 | 0.000 | 0.250 |" in out
    assert "| greedy: OSRA | 1.000 | 0.000 |" in out

    run = tmp_path / "run"
    run.mkdir()
    (run / "history.json").write_text(json.dumps({
        "epoch": [1, 2], "loss": [1.5, 0.5], "val_loss": [1.0, 0.4],
        "val_metric": [0.1, 0.3], "seconds": [60.0, 60.0], "images_per_s": [80.0, 82.0]}))
    summarize.main(["curve", f"qm9={run}"])
    out = capsys.readouterr().out
    assert "qm9 (2.0 min of training):" in out and "| 2 | 0.500 | 0.400 | 0.300 | 60 | 82 |" in out


def test_steps_table_of_bench_config_lines(summarize, tmp_path, capsys):
    lines = {"mirrored": {"train_step_ms": 470.4, "train_images_per_s": 136.05,
                          "drawn_pictures_per_s": 301.2, "bound_by": "train_step",
                          "load_average": 1.5},
             "shapes": {"train_step_ms": 12.0, "train_images_per_s": 1333.3,
                        "drawn_pictures_per_s": None, "bound_by": "train_step",
                        "load_average": None}}
    args = []
    for label, line in lines.items():
        path = tmp_path / f"{label}.json"
        path.write_text("noise\n" + json.dumps(line) + "\n")  # the last line counts
        args.append(f"{label}={path}")
    assert summarize.main(["steps", *args]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("| config | train step (ms) | step images/s | drawn pictures/s")
    assert rows[2] == "| mirrored | 470 | 136 | 301 | train_step | 1.50 |"
    assert rows[3] == "| shapes | 12 | 1333 | n/a | train_step | n/a |"
