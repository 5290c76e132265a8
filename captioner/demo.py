"""The embedded demo: synthetic shapes -> train -> caption held-out images -> metrics.

Everything lands in the run directory (``runs/demo`` by default): the run itself,
``metrics.json`` (``exact_match``, ``grounding`` and counts), ``predictions.jsonl``
and per-token attention overlays in ``attention/``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from captioner.config import Config, load_config
from captioner.grounding import shapes_grounding
from captioner.inference import Captioner
from captioner.metrics import exact_match
from captioner.training import Trainer, caption_split


def default_config_path() -> Path:
    """``configs/shapes.yaml`` of the source tree this package lives in."""
    return Path(__file__).resolve().parent.parent / "configs" / "shapes.yaml"


def evaluate_shapes(captioner: Captioner, rows: list[dict[str, Any]], image_size: int
                    ) -> dict[str, Any]:
    """Exact caption match and attention grounding of captioned shapes images."""
    preds = [r["text"] for r in rows]
    words = [captioner.tokenizer.ids_to_tokens(r["tokens"]) for r in rows]
    grounding = shapes_grounding(words, [r["attention"] for r in rows],
                                 [r["meta"]["objects"] for r in rows],
                                 (image_size, image_size), captioner.grid_hw)
    return {"exact_match": exact_match(preds, [r["references"] for r in rows]),
            "grounding": grounding["grounding"], "grounded_words": grounding["grounded"],
            "object_words": grounding["object_words"], "images": len(rows)}


def write_overlays(captioner: Captioner, rows: list[dict[str, Any]], out_dir: Path,
                   count: int = 8) -> list[Path]:
    """Show, Attend and Tell style per-token attention figures for the first images."""
    from captioner.data import load_image
    from captioner.visualize import attention_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in rows[:count]:
        image = load_image(r["image"], captioner.image_size)
        tokens = captioner.tokenizer.ids_to_tokens(r["tokens"])
        out = out_dir / (Path(r["image"]).stem + ".png")
        paths.append(attention_figure(image, tokens, r["attention"], captioner.grid_hw, out,
                                      title=r["text"]))
    return paths


def run_demo(run_dir: str | Path = "runs/demo", overrides: list[str] | None = None,
             config: Config | None = None, log: Callable[[str], None] = print
             ) -> dict[str, Any]:
    """Generate the data, train (or resume), then caption and score the test split."""
    run_dir = Path(run_dir)
    cfg = config or load_config(default_config_path(), overrides)
    started = time.perf_counter()
    trainer = Trainer(cfg, run_dir, log)
    trainer.fit()
    train_s = time.perf_counter() - started
    captioner = Captioner.load(run_dir)
    rows = caption_split(captioner, trainer.data.test, cfg.decode.batch_size)
    metrics = evaluate_shapes(captioner, rows, cfg.data.shapes.image_size)
    metrics["train_and_load_seconds"] = round(train_s, 1)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (run_dir / "predictions.jsonl").open("w") as fh:
        for r in rows:
            fh.write(json.dumps({"image": r["image"], "prediction": r["text"],
                                 "references": r["references"]}) + "\n")
    figures = write_overlays(captioner, rows, run_dir / "attention")
    log(f"held-out images: {metrics['images']}  exact match: {metrics['exact_match']:.3f}  "
        f"grounding: {metrics['grounding']:.3f} "
        f"({metrics['grounded_words']}/{metrics['object_words']} object words)")
    log(f"metrics: {run_dir / 'metrics.json'}; attention overlays: {figures[0].parent}"
        if figures else f"metrics: {run_dir / 'metrics.json'}")
    return metrics
