"""Shared fixtures: a tiny shapes config and one tiny trained run per test session."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import settings

from captioner.cli import tensorflow_environment

# before TensorFlow loads: the kernels `python -m captioner` uses, so a run trained here
# and one trained by a CLI subprocess are bit-identical (test_faults_training compares them)
tensorflow_environment()
# CI runs the same examples every time (no flaky red builds); locally they vary.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

TINY = [
    "data.shapes.n_images=160",
    "data.shapes.image_size=32",
    "model.image_size=32",
    "model.cnn_filters=[8, 16]",
    "model.embedding_dim=16",
    "model.units=32",
    "model.attention_units=16",
    "model.dropout=0.0",
    "train.epochs=1",
    "train.batch_size=16",
    "train.max_steps_per_epoch=4",
    "train.val_limit=8",
    "train.progress=false",
    "train.warmup_steps=0",
    "decode.max_length=16",
]


def copy_run(run: Path, tmp_path: Path) -> Path:
    """A copy of ``run`` (e.g. the session's ``trained_run``) in ``tmp_path``, without its
    lock, for a test that trains on or damages it."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / ".lock").unlink(missing_ok=True)
    return copy


def call_cli(*args, cwd: Path | None = None) -> SimpleNamespace:
    """``captioner ARGS`` run by ``cli.main`` in this process (from ``cwd`` if given):
    returncode, stdout and stderr as ``subprocess.run`` would give them for ``python -m
    captioner ARGS`` (argparse's exit included), without a TensorFlow import per call."""
    from captioner.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code
    finally:
        os.chdir(here)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="session")
def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def load_script(project_root):
    """``load_script("summarize")``: ``scripts/summarize.py`` imported as a module."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, project_root / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shapes")


@pytest.fixture(scope="session")
def tiny_smiles_overrides() -> list[str]:
    """Model and training overrides of ``smiles_qm9`` for a two-step SMILES run."""
    return ["model.image_size=32", "model.cnn_filters=[8, 16]", "model.embedding_dim=16",
            "model.units=32", "model.attention_units=16", "model.dropout=0.0",
            "train.epochs=1", "train.batch_size=8", "train.max_steps_per_epoch=2",
            "train.val_limit=4", "train.progress=false", "train.warmup_steps=0",
            "decode.max_length=24"]


@pytest.fixture
def tiny_overrides(shapes_dir) -> list[str]:
    """Overrides that turn configs/shapes.yaml into a seconds-long run."""
    return [*TINY, f"data.path={shapes_dir}"]


@pytest.fixture
def tiny_config(project_root, tiny_overrides):
    from captioner.config import load_config

    return load_config(project_root / "configs" / "shapes.yaml", tiny_overrides)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, project_root, shapes_dir) -> Path:
    """A tiny run trained once for the session (2 epochs)."""
    from captioner.config import load_config
    from captioner.train.trainer import train

    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(project_root / "configs" / "shapes.yaml",
                      [*TINY, f"data.path={shapes_dir}", "train.epochs=2"])
    train(cfg, run_dir, log=lambda _msg: None)
    return run_dir


@pytest.fixture(scope="session")
def exported_run(trained_run, tmp_path_factory) -> Path:
    """``trained_run`` exported once for the session (beam 3, whole pictures): version 1
    of its own export folder, which no test writes into."""
    from captioner.generate.export import ExportOptions, export_run

    return export_run(trained_run, tmp_path_factory.mktemp("export") / "tiny",
                      ExportOptions(beam_size=3))


@pytest.fixture(scope="session")
def drawn_run(tmp_path_factory, project_root, tiny_smiles_overrides):
    """A tiny ``data.format: smiles`` run (pictures drawn while training), two steps."""
    from captioner.config import load_config
    from captioner.train.trainer import train
    from tests.test_osra import SMILES

    work = tmp_path_factory.mktemp("drawn_run")
    src = work / "smiles.csv"
    src.write_text("smiles\n" + "\n".join(SMILES) + "\n")
    cfg = load_config(project_root / "configs" / "smiles_qm9.yaml", [
        "data.format=smiles", f"data.path={src}", "data.val_fraction=0.15",
        "data.test_fraction=0.25", "data.drawing.eval_size=64", "data.drawing.workers=1",
        *tiny_smiles_overrides])
    train(cfg, work / "run", log=lambda _msg: None)
    return work / "run"
