"""The command line, end to end on a tiny config in a temporary directory: every command
through ``cli.main`` in this process (the same parser and commands as ``python -m
captioner``, without a TensorFlow import per call); ``python -m captioner`` itself for
help, version and a parser error. The installed ``captioner`` script trains, captions and
evaluates in a fresh process in test_packaging."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import call_cli

# Builds the whole parser, every subcommand's help and parses each command's --help (which
# exits), then reports what got imported: the parser must not need TensorFlow.
PARSER_ONLY = """
import contextlib, io, json, sys
from captioner.cli import build_parser, main

parser = build_parser()
sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
for name, sp in sub.choices.items():
    assert name in parser.format_help() and sp.format_help()
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args([name, "--help"])
        except SystemExit as exc:
            assert exc.code == 0, name
# a config that is neither a file nor a built-in name fails before TensorFlow loads
with contextlib.redirect_stderr(io.StringIO()) as err:
    code = main(["train", "--config", "no_such_config"])
heavy = sorted(m for m in ("tensorflow", "keras", "captioner.bench", "captioner.data.manifests")
               if m in sys.modules)
print(json.dumps({"commands": sorted(sub.choices), "heavy": heavy, "code": code,
                  "error": err.getvalue()}))
"""


def run_cli(*args, cwd):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "captioner", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, project_root):
    from tests.conftest import TINY

    work = tmp_path_factory.mktemp("cli")
    sets = [x for item in TINY for x in ("--set", item)]
    proc = call_cli("train", "--config", "shapes",  # the built-in config, by name
                    "--run-dir", str(work / "run"), "--set", f"data.path={work / 'shapes'}",
                    *sets, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, proc


def test_train_writes_a_run(cli_run):
    work, proc = cli_run
    assert "epoch 1/1" in proc.stdout
    assert (work / "run" / "config.json").is_file()
    cfg = json.loads((work / "run" / "config.json").read_text())
    assert cfg["model"]["image_size"] == 32 and cfg["train"]["epochs"] == 1


def test_caption_prints_text_and_json(cli_run):
    work, _ = cli_run
    images = sorted((work / "shapes" / "images").glob("*.png"))[:3]
    proc = call_cli("caption", "--run", str(work / "run"), *map(str, images), cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith(str(images[0]))

    proc = call_cli("caption", "--run", str(work / "run"), "--json", "--max-length", "6",
                   *map(str, images), cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["image"] for r in recs] == list(map(str, images))
    for r in recs:
        assert set(r) == {"image", "text", "tokens", "score", "token_scores", "attention"}
        assert len(r["attention"]) == len(r["tokens"]) == len(r["token_scores"]) <= 6
        assert all(lp <= 0.0 for lp in r["token_scores"])
        assert all(len(row) == 64 for row in r["attention"])  # 8x8 grid
        assert r["score"] <= 0.0
        assert r["text"] == " ".join(r["tokens"])


def test_resume_a_finished_run_from_its_directory(cli_run):
    work, _ = cli_run
    proc = call_cli("train", "--run-dir", str(work / "run"), "--set", "train.epochs=2", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stdout and "epoch 2/2" in proc.stdout
    history = json.loads((work / "run" / "history.json").read_text())
    assert history["epoch"] == [1, 2]


def test_errors_are_clear(cli_run, project_root):
    work, _ = cli_run
    proc = call_cli("train", "--config", str(project_root / "configs" / "shapes.yaml"),
                   "--set", "model.unitz=3", cwd=work)
    assert proc.returncode == 2 and "model.unitz" in proc.stderr
    proc = call_cli("caption", "--run", str(work / "run"), str(work / "nope.png"), cwd=work)
    assert proc.returncode != 0 and "nope.png" in proc.stderr
    proc = call_cli("caption", "--run", str(work / "missing-run"), "x.png", cwd=work)
    assert proc.returncode == 2 and "missing-run does not exist" in proc.stderr
    (work / "empty-run").mkdir(exist_ok=True)  # a folder that holds no run
    proc = call_cli("caption", "--run", str(work / "empty-run"), "x.png", cwd=work)
    assert proc.returncode == 2 and "config.json" in proc.stderr


def test_caption_folders_globs_and_output_files(cli_run):
    work, _ = cli_run
    folder = work / "shapes" / "images"
    n = len(list(folder.glob("*.png")))
    proc = call_cli("caption", "--run", str(work / "run"), str(folder), "--out",
                   str(work / "all.csv"), "--max-length", "4", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (work / "all.csv").read_text().strip().splitlines()
    assert rows[0] == "image,text,score,tokens" and len(rows) == n + 1
    proc = call_cli("caption", "--run", str(work / "run"), str(folder / "shape_0000*.png"),
                   "--beam-size", "2", "--n-best", "2", "--out", str(work / "few.jsonl"),
                   cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in (work / "few.jsonl").read_text().splitlines()]
    assert len(recs) == 10 and all(len(r["n_best"]) == 2 for r in recs)
    assert all(r["n_best"][0]["score"] >= r["n_best"][1]["score"] for r in recs)
    proc = call_cli("caption", "--run", str(work / "run"), str(work / "nothing*.png"), cwd=work)
    assert proc.returncode == 2 and "nothing*.png" in proc.stderr


def test_evaluate_writes_metrics_and_predictions(cli_run):
    work, _ = cli_run
    out = work / "eval"
    proc = call_cli("evaluate", "--run", str(work / "run"), "--out", str(out), "--limit", "6",
                   "--beam-size", "2", "--report", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 6 and metrics["split"] == "test"
    assert metrics["decode"]["strategy"] == "beam" and metrics["decode"]["beam_size"] == 2
    for key in ("bleu1", "bleu4", "cider_d", "rouge_l", "exact_match"):
        assert 0.0 <= metrics[key] <= 10.0, key
    assert "| BLEU-4 |" in (out / "metrics.md").read_text()
    lines = (out / "predictions.csv").read_text().strip().splitlines()
    assert lines[0].startswith("image,references,prediction,score") and len(lines) == 7
    assert "test (6 images)" in proc.stdout
    assert metrics["grounding_detail"]["kind"].startswith("shapes")
    assert 0.0 <= metrics["grounding"] <= 1.0
    page = (out / "index.html").read_text()
    assert page.count('<article class="item"') == 6
    assert "bleu4" in page and "http://" not in page and "https://" not in page


def test_attention_writes_a_figure_per_image_and_a_page(cli_run):
    from PIL import Image

    work, _ = cli_run
    images = sorted((work / "shapes" / "images").glob("*.png"))[:3]
    out = work / "att"
    proc = call_cli("attention", "--run", str(work / "run"), *map(str, images), "--out",
                   str(out), cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for image in images:
        with Image.open(out / f"{image.stem}.png") as im:
            assert im.size[0] > 100 and im.size[1] > 100
    page = (out / "index.html").read_text()
    assert all(image.name in page for image in images)


def test_parser_and_every_help_import_no_tensorflow(tmp_path):
    proc = subprocess.run([sys.executable, "-c", PARSER_ONLY], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["heavy"] == []
    assert {"train", "caption", "evaluate", "attention", "bench", "demo"} <= set(out["commands"])
    assert out["code"] == 2
    assert "no_such_config" in out["error"] and "shapes, smiles_qm9" in out["error"]


def test_python_m_captioner_help(tmp_path):
    for args in (["--help"], ["bench", "--help"], ["train", "--help"]):
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 0 and "usage: captioner" in proc.stdout, proc.stderr
    proc = run_cli("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("captioner ")
    proc = run_cli("bench", "--attend", "sideways", cwd=tmp_path)
    assert proc.returncode == 2 and "before" in proc.stderr and "after" in proc.stderr


def test_onednn_is_on_unless_the_user_says_otherwise(monkeypatch):
    from captioner.cli import tensorflow_environment

    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    tensorflow_environment()
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1"
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    tensorflow_environment()
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"
