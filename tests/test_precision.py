"""``train.precision: auto``: mixed_bfloat16 only where the machine computes bfloat16
natively, float32 elsewhere; the choice reaches training, loading and the feature cache."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from captioner.choices import ChoiceError
from captioner.config import apply_overrides, load_config
from captioner.model import precision
from captioner.model.precision import (
    Bfloat16Support,
    cpu_bfloat16_flags,
    precision_note,
    resolve_precision,
)

from .conftest import copy_run

X86_WITH = """processor\t: 0
flags\t\t: fpu vme avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile
processor\t: 1
flags\t\t: fpu vme avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile
"""
X86_WITHOUT = """processor\t: 0
flags\t\t: fpu vme avx2 avx512f avx512dq avx512cd avx512bw avx512vl
"""
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve bf16 i8mm\n"
NATIVE, EMULATED = Bfloat16Support(True, "test: native"), Bfloat16Support(False, "test: none")


def test_cpu_flags_are_read_from_cpuinfo_text():
    assert cpu_bfloat16_flags(X86_WITH) == ["avx512_bf16", "amx_bf16"]
    assert cpu_bfloat16_flags(X86_WITHOUT) == []
    assert cpu_bfloat16_flags(ARM) == ["bf16"]
    assert cpu_bfloat16_flags("flags : avx512_bf16x fakebf16\nmodel name : bf16 cpu") == []


def test_auto_is_bfloat16_only_with_native_support():
    assert resolve_precision("auto", NATIVE) == "mixed_bfloat16"
    assert resolve_precision("auto", EMULATED) == "float32"
    for given in ("float32", "mixed_bfloat16", "mixed_float16"):
        assert resolve_precision(given, EMULATED) == resolve_precision(given, NATIVE) == given
    with pytest.raises(ChoiceError, match="train.precision"):
        resolve_precision("bfloat16")


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/cpuinfo")
def test_this_cpu_is_judged_by_its_cpuinfo():
    flags = cpu_bfloat16_flags(Path("/proc/cpuinfo").read_text(errors="replace"))
    support = precision._cpu_support()
    assert support.native == bool(flags)
    assert (flags[0] in support.reason) if flags else ("no bfloat16 flag" in support.reason)


def test_notes_say_what_auto_chose_and_warn_about_emulated_bfloat16(monkeypatch):
    monkeypatch.setattr(precision, "bfloat16_support", lambda: EMULATED)
    assert precision_note("auto") == ("train.precision=auto: float32 (no native bfloat16: "
                                      "test: none)")
    warning = precision_note("mixed_bfloat16")
    assert warning.startswith("warning: train.precision=mixed_bfloat16") and "float32" in warning
    assert precision_note("float32") is None and precision_note("mixed_float16") is None
    monkeypatch.setattr(precision, "bfloat16_support", lambda: NATIVE)
    assert precision_note("auto").startswith("train.precision=auto: mixed_bfloat16 (native")
    assert precision_note("mixed_bfloat16") is None


def test_recipes_ask_for_auto_and_the_feature_cache_keys_on_the_choice():
    from captioner.train.feature_cache import cache_fingerprint

    for name in ("smiles_qm9", "smiles_zinc", "coco"):
        assert load_config(name).train.precision == "auto", name
    cfg = apply_overrides(load_config("shapes"), ["train.precision=auto"])
    chosen = apply_overrides(cfg, [f"train.precision={resolve_precision('auto')}"])
    assert cache_fingerprint(cfg) == cache_fingerprint(chosen)


def test_auto_reaches_the_trainer_and_a_loaded_run(tiny_config, trained_run, tmp_path):
    import json

    from captioner.generate.captioner import Captioner
    from captioner.train.trainer import Trainer

    want = resolve_precision("auto")
    dtype = {"float32": "float32", "mixed_bfloat16": "bfloat16"}[want]
    lines: list[str] = []
    trainer = Trainer(apply_overrides(tiny_config, ["train.precision=auto"]),
                      tmp_path / "new", log=lines.append)
    trainer.lock.release()
    assert f"train.precision=auto: {want} (" in lines[0]
    assert trainer.model.decoder.compute_dtype == dtype
    run = copy_run(trained_run, tmp_path)  # the session's float32 run, its config saying auto
    config = json.loads((run / "config.json").read_text())
    config["train"]["precision"] = "auto"
    (run / "config.json").write_text(json.dumps(config))
    cap = Captioner.load(run)
    assert cap.model.decoder.compute_dtype == dtype
    image = next((Path(tiny_config.data.path) / "images").glob("*.png"))
    if want == "float32":  # the run's own policy: the very same reading
        assert cap.caption([image]) == Captioner.load(trained_run).caption([image])
