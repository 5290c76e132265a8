"""captioner: Show, Attend and Tell image-to-sequence models (captions or SMILES).

The package is laid out by stage: :mod:`captioner.data` (manifests, images, tokenizers,
shapes, molecules, feature cache), :mod:`captioner.model` (layers, recurrence, backbones,
kernels), :mod:`captioner.train` (trainer, steps, distribute, optimizers),
:mod:`captioner.generate` (decoding, Captioner), :mod:`captioner.evaluate` (metrics,
grounding, runs), :mod:`captioner.viz` (figures, report) and :mod:`captioner.cli`.

Heavy modules (TensorFlow) load on first use, so ``import captioner`` stays cheap::

    from captioner import Captioner
    cap = Captioner.load("runs/demo")
    out = cap.generate(["image.png"])   # texts, tokens, scores, attention (B, T, G)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["Captioner", "Config", "Generation", "Trainer", "load_config", "train"]


def __getattr__(name: str) -> Any:
    """The public API by name, importing its module on first use."""
    where = {"Captioner": "captioner.generate.captioner",
             "Generation": "captioner.generate.captioner",
             "Trainer": "captioner.train.trainer", "train": "captioner.train.trainer",
             "Config": "captioner.config", "load_config": "captioner.config"}
    if name not in where:
        raise AttributeError(f"module 'captioner' has no attribute {name!r}")
    return getattr(importlib.import_module(where[name]), name)
