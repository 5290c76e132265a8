"""What the server decodes with: a run directory (:class:`RunBackend`, the Captioner
with its compiled decoders) or an exported SavedModel (:class:`ExportBackend`, plain
TensorFlow). Both take a batch of uint8 pixels at the model's input size and return one
JSON-ready result per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tensorflow as tf

from captioner.evaluate.metrics import metric_family
from captioner.generate.captioner import Captioner
from captioner.generate.export import next_version


class CaptionBackend(Protocol):
    """Decodes batches for the server.

    Example:
        >>> backend = RunBackend("runs/demo")                 # doctest: +SKIP
        >>> backend.caption(np.zeros((2, 112, 112, 3), np.uint8))[0]["text"]  # doctest: +SKIP
        'a red circle'
    """

    name: str
    image_size: int
    grid_hw: tuple[int, int]
    text_kind: str | None  # "smiles", "caption" or None (not known: an export)
    crop_margin: float | None  # pictures cut to their ink plus this margin (None: whole)

    def caption(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        """uint8 (B, S, S, 3) -> per image: text, tokens (strings), token_ids, score,
        token_scores (T,) and attention (T, G) as float32 arrays rounded to 5 decimals
        (the server's JSON encoder writes arrays directly)."""


def _rounded(values: np.ndarray, digits: int = 5) -> np.ndarray:
    return np.round(values, digits).astype(np.float32)


class RunBackend:
    """A run directory through :class:`~captioner.generate.captioner.Captioner`
    (``decode`` overrides the run's decoding settings, e.g. ``strategy="beam"``;
    ``crop_margin`` the run's ``decode.crop_margin`` unless ``"run"``). Each upload is
    read once: a run's ``decode.margin_views`` is not used here."""

    def __init__(self, run_dir: str | Path, checkpoint: str = "best",
                 crop_margin: float | str | None = "run", **decode: Any):
        if decode.get("margin_views"):
            raise ValueError("margin_views cut picture files at each margin; the server reads "
                             "each upload once (use caption or evaluate for margin_views)")
        self.cap = Captioner.load(run_dir, checkpoint, crop_margin=crop_margin)
        self.crop_margin = self.cap.crop_margin
        self.decode = {**decode, "margin_views": ()}  # not the run's decode.margin_views
        self.name = f"run {Path(run_dir).resolve()}"
        self.image_size = self.cap.image_size
        self.grid_hw = tuple(self.cap.grid_hw)
        self.text_kind = metric_family(self.cap.tokenizer.kind)  # "smiles" or "caption"

    def caption(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        gen = self.cap.generate(pixels, **self.decode)
        attention, token_scores = _rounded(gen.attention), _rounded(gen.token_scores)
        out = []
        for i, ids in enumerate(gen.tokens):
            n = len(ids)
            out.append({"text": gen.texts[i], "tokens": self.cap.tokenizer.ids_to_tokens(ids),
                        "token_ids": list(ids), "score": round(float(gen.scores[i]), 5),
                        "token_scores": token_scores[i, :n], "attention": attention[i, :n]})
        return out


def saved_model_dir(export_dir: str | Path) -> Path:
    """``export_dir`` itself when it holds a SavedModel, else its newest numbered version.

    Example:
        >>> saved_model_dir("/no/such/export")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no SavedModel in /no/such/export (nor in a numbered version below it)
    """
    root = Path(export_dir)
    if (root / "saved_model.pb").is_file():
        return root
    newest = root / str(next_version(root) - 1)
    if (newest / "saved_model.pb").is_file():
        return newest
    raise FileNotFoundError(f"no SavedModel in {root} (nor in a numbered version below it)")


class ExportBackend:
    """A SavedModel written by ``captioner export``, through its ``serving_pixels``
    signature (greedy decoding, as exported). The export does not record its tokenizer,
    so ``text_kind`` is None. ``crop_margin``: as the export's metadata says unless
    given (``"run"``: the metadata's)."""

    def __init__(self, export_dir: str | Path, crop_margin: float | str | None = "run"):
        path = saved_model_dir(export_dir)
        self.model = tf.saved_model.load(str(path))
        self.fn = self.model.signatures["serving_pixels"]
        meta = {k: int(v) for k, v in self.model.metadata().items()}
        self.name = f"export {path.resolve()}"
        self.image_size = meta["image_size"]
        self.grid_hw = (meta["grid_height"], meta["grid_width"])
        self.text_kind = None
        permille = meta.get("crop_margin_permille", -1)  # exports before it: whole pictures
        self.crop_margin = (crop_margin if crop_margin != "run" else
                            None if permille < 0 else permille / 1000)

    def caption(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        r = {k: v.numpy() for k, v in self.fn(pixels=tf.constant(pixels, tf.uint8)).items()}
        attention, token_scores = _rounded(r["attention"]), _rounded(r["token_scores"])
        out = []
        for i in range(len(pixels)):
            words = [w.decode() for w in r["token_text"][i]]
            ids = [int(t) for t in r["tokens"][i]]
            n = int(r["length"][i])  # generated tokens, <end> included when it came
            n -= 1 if n and not words[n - 1] else 0  # the tokens before <end>
            out.append({"text": r["text"][i].decode(), "tokens": words[:n],
                        "token_ids": ids[:n], "score": round(float(r["score"][i]), 5),
                        "token_scores": token_scores[i, :n], "attention": attention[i, :n]})
        return out
