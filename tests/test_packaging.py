"""The package as a user gets it: a wheel built from the repository, installed into a
fresh virtual environment outside the checkout, runs the command line there.

The temporary environment reuses the dependencies already installed beside the running
interpreter (a ``.pth`` line naming that site-packages: plain paths, so the checkout's
editable-install hook in it is not run) and gets the wheel with ``--no-deps``: no network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_TOOLING = all(importlib.util.find_spec(m) for m in ("setuptools", "venv", "pip"))
pytestmark = pytest.mark.skipif(not BUILD_TOOLING,
                                reason="setuptools, venv or pip is not installed")

# configs/shapes.yaml made a seconds-long run (data.path is relative: the working directory);
# attend=before: the decoder step that runs on the compiled kernels
TINY = ["data.path=shapes", "data.shapes.n_images=40", "data.shapes.image_size=32",
        "model.attend=before", "model.image_size=32", "model.cnn_filters=[8, 16]",
        "model.embedding_dim=16", "model.units=32", "model.attention_units=16",
        "model.dropout=0.0", "train.epochs=1", "train.batch_size=16",
        "train.max_steps_per_epoch=2", "train.val_limit=4", "train.warmup_steps=0",
        "train.progress=false", "train.tensorboard=false", "decode.max_length=12"]


def run(cmd: list, cwd: Path, env: dict | None = None, timeout: float = 300
        ) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps --no-build-isolation`` of a copy of the repository's package
    files (so the build's ``build/`` and ``*.egg-info`` never land in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "captioner", src / "captioner",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", tmp / "dist", src], cwd=tmp)
    (whl,) = (tmp / "dist").glob("captioner-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """A new venv holding only the wheel (+ a path to the dependencies); returns the
    environment to run it with, its bin folder and a working directory outside the
    checkout."""
    tmp = tmp_path_factory.mktemp("venv")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    cwd=tmp).stdout.strip())
    (site / "_captioner_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
         "--no-index", wheel], cwd=tmp)
    work = tmp / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               TF_CPP_MIN_LOG_LEVEL="3", CAPTIONER_CACHE=str(tmp / "cache"))
    assert ROOT not in work.parents and ROOT != work
    return {"venv": venv, "bin": bindir, "python": python, "site": site, "work": work,
            "env": env, "cache": tmp / "cache"}


def test_wheel_holds_configs_kernel_source_and_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"captioner/configs/{p.name}" for p in (ROOT / "captioner/configs").glob("*.yaml")}
    expected.add("captioner/model/kernels/decoder_step.cc")
    assets = ROOT / "captioner" / "viz" / "assets"
    if assets.is_dir():
        expected |= {p.relative_to(ROOT).as_posix() for p in assets.rglob("*") if p.is_file()}
    assert {"captioner/configs/shapes.yaml", "captioner/configs/smiles_qm9.yaml"} <= expected
    assert expected <= names, sorted(expected - names)
    assert "captioner/cli.py" in names
    assert not any(n.startswith(("tests/", "configs/", "scripts/")) for n in names)
    entry = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "captioner = captioner.cli:main" in entry


def test_installed_package_is_the_wheel_not_the_checkout(installed):
    """The package, its configs and the kernel source come from the installed wheel, and
    the config module loads without TensorFlow."""
    proc = run([installed["python"], "-c",
                "import sys, captioner, captioner.config as c\n"
                "print(captioner.__file__)\nprint(c.resolve_config('shapes'))\n"
                "print('tensorflow' in sys.modules)\n"
                "from captioner.model.kernels import KernelBuild\n"
                "print(KernelBuild().source)"],
               cwd=installed["work"], env=installed["env"])
    package, shapes, tf_loaded, source = proc.stdout.strip().splitlines()[-4:]
    assert Path(package).is_relative_to(installed["site"])
    assert Path(shapes).is_relative_to(installed["site"]) and Path(shapes).is_file()
    assert tf_loaded == "False"
    assert Path(source).is_relative_to(installed["site"])
    assert Path(source).read_bytes() == (ROOT / "captioner/model/kernels/decoder_step.cc"
                                         ).read_bytes()


def test_help_runs_from_the_installed_script(installed):
    exe = shutil.which("captioner", path=str(installed["bin"]))
    assert exe is not None
    proc = run([exe, "--help"], cwd=installed["work"], env=installed["env"])
    for command in ("train", "caption", "evaluate", "attention", "demo", "bench"):
        assert command in proc.stdout
    bad = subprocess.run([exe, "train", "--config", "no_such_config"], cwd=installed["work"],
                         env=installed["env"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "shapes" in bad.stderr and "smiles_qm9" in bad.stderr


@pytest.fixture(scope="module")
def trained(installed) -> Path:
    """``captioner train --config shapes`` (the built-in config, by name), tiny, from a
    working directory outside the checkout; returns that directory."""
    work, env = installed["work"], installed["env"]
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    # with a compiler the kernels must build from the wheel's .cc (fused: no silent fallback)
    kernel = "fused" if compiler else "auto"
    sets = [x for item in [*TINY, f"model.attention_kernel={kernel}"] for x in ("--set", item)]
    proc = run(["captioner", "train", "--config", "shapes", "--run-dir", "run", *sets],
               cwd=work, env=env)
    assert "epoch 1/1" in proc.stdout
    if compiler:  # compiled into the fresh CAPTIONER_CACHE from the installed source
        assert list(installed["cache"].rglob("decoder_step-*.so")), proc.stderr[-2000:]
    return work


def test_train_writes_a_run_and_generates_its_data(trained):
    for name in ("config.json", "tokenizer.json", "model.json", "history.json"):
        assert (trained / "run" / name).is_file(), name
    assert (trained / "shapes" / "manifest.csv").is_file()  # generated in the working dir
    assert (trained / "run" / "best").is_dir()


def test_caption_prints_one_line_per_image(trained, installed):
    from PIL import Image

    shape = sorted((trained / "shapes" / "images").glob("*.png"))[0]
    drawn = trained / "drawn.png"
    image = Image.new("RGB", (32, 32), "white")
    image.paste((220, 30, 30), (8, 8, 24, 24))
    image.save(drawn)
    proc = run(["captioner", "caption", "--run", "run", str(shape), str(drawn)], cwd=trained,
               env=installed["env"])
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2, proc.stdout
    for line, path in zip(lines, (shape, drawn)):
        image_path, text = line.split("\t")
        assert image_path == str(path) and text.strip(), line


def test_evaluate_writes_metrics_and_the_report_page(trained, installed):
    """The report page inlines the packaged assets (``attention`` writes the same page)."""
    run(["captioner", "evaluate", "--run", "run", "--out", "eval", "--limit", "3", "--report"],
        cwd=trained, env=installed["env"])
    metrics = json.loads((trained / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 3
    assert (trained / "eval" / "index.html").read_text().count('<article class="item"') == 3
