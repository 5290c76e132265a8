"""The embedded demo: synthetic shapes -> train -> caption held-out images -> metrics.

Everything lands in the run directory (``runs/demo`` by default): the run itself, the
evaluation of the test split (``metrics.json`` with ``exact_match`` and ``grounding``,
``metrics.md``, ``predictions.csv``, ``index.html``) and per-token attention figures of a
few test images in ``attention/``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from captioner.config import BUILTIN_CONFIG_DIR, Config, load_config
from captioner.evaluate.runs import evaluate
from captioner.train.trainer import Trainer
from captioner.viz.attention import write_attention


def default_config_path() -> Path:
    """The built-in ``shapes`` config (package data, also ``load_config("shapes")``)."""
    return BUILTIN_CONFIG_DIR / "shapes.yaml"


def run_demo(run_dir: str | Path = "runs/demo", overrides: list[str] | None = None,
             config: Config | None = None, log: Callable[[str], None] = print,
             figures: int = 8) -> dict[str, Any]:
    """Generate the data, train (or resume), then caption and score the test split."""
    run_dir = Path(run_dir)
    cfg = config or load_config(default_config_path(), overrides)
    started = time.perf_counter()
    trainer = Trainer(cfg, run_dir, log)
    trainer.fit()
    train_s = time.perf_counter() - started
    metrics = evaluate(run_dir, run_dir, split="test", report=True, log=lambda _: None)
    metrics["train_seconds"] = round(train_s, 1)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    look = write_attention(run_dir, trainer.data.test.paths[:figures], run_dir / "attention",
                           log=lambda _: None)
    detail = metrics.get("grounding_detail", {})
    log(f"held-out images: {metrics['images']}  exact match: {metrics['exact_match']:.3f}  "
        f"grounding: {metrics['grounding']:.3f} ({detail.get('grounded')}/"
        f"{detail.get('object_words')} object words)")
    log(f"metrics: {run_dir / 'metrics.json'}; all test images: {run_dir / 'index.html'}; "
        f"attention figures: {look['page'].parent}")
    return metrics
