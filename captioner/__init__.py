"""captioner: Show, Attend and Tell image-to-sequence models (captions or SMILES).

Heavy modules (TensorFlow) load on first use, so ``import captioner`` stays cheap::

    from captioner import Captioner
    cap = Captioner.load("runs/demo")
    out = cap.generate(["image.png"])   # texts, tokens, scores, attention (B, T, G)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Captioner", "Config", "Generation", "Trainer", "load_config", "train"]


def __getattr__(name: str) -> Any:
    if name in ("Captioner", "Generation"):
        from captioner.generate import captioner as inference

        return getattr(inference, name)
    if name in ("Trainer", "train"):
        from captioner.train import steps as training

        return getattr(training, name)
    if name in ("Config", "load_config"):
        from captioner import config

        return getattr(config, name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
