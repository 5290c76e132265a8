"""The demo pipeline end to end on a tiny config (the real one is `make demo`)."""

from __future__ import annotations

import json

from captioner.config import load_config
from captioner.demo import default_config_path, run_demo


def test_demo_writes_metrics_figures_and_page(tmp_path, tiny_overrides):
    cfg = load_config(default_config_path(), tiny_overrides)
    lines = []
    metrics = run_demo(tmp_path / "demo", config=cfg, log=lines.append, figures=2)
    saved = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert 0.0 <= saved["exact_match"] <= 1.0 and 0.0 <= saved["grounding"] <= 1.0
    assert saved["exact_match"] == metrics["exact_match"]
    assert saved["images"] == 16  # 10% of 160 images
    assert saved["grounding_detail"]["kind"].startswith("shapes")
    assert saved["grounding_detail"]["object_words"] >= saved["grounding_detail"]["grounded"]
    assert len(list((tmp_path / "demo" / "attention").glob("*.png"))) == 2
    assert (tmp_path / "demo" / "attention" / "index.html").is_file()
    assert (tmp_path / "demo" / "index.html").is_file()
    assert any("exact match" in line and "grounding" in line for line in lines)
