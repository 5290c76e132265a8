"""Compiled generation and the user-facing :class:`Captioner`.

``make_generate_function`` is the one place where a decoding path is compiled; a
``Captioner`` caches the compiled functions it has built.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from captioner.config import Config, config_from_dict
from captioner.data import image_batches, load_image
from captioner.decoding import greedy_search
from captioner.model import CaptionModel
from captioner.tokenizers import Tokenizer


def make_generate_function(model: CaptionModel, tokenizer: type[Tokenizer] | Tokenizer,
                           strategy: str = "greedy") -> Callable[..., dict[str, tf.Tensor]]:
    """Compile ``images (B, S, S, 3) uint8, max_length () -> decoded dict`` once.

    The step function closes over the per-image encoder outputs, so attention keys are
    computed once per image, never per step.
    """
    if strategy != "greedy":
        raise ValueError(f"unknown decoding strategy {strategy!r}")
    size = model.args["image_size"]
    start_id, end_id, pad_id = tokenizer.start_id, tokenizer.end_id, tokenizer.pad_id

    @tf.function(input_signature=[tf.TensorSpec((None, size, size, 3), tf.uint8),
                                  tf.TensorSpec((), tf.int32)])
    def generate(images: tf.Tensor, max_length: tf.Tensor) -> dict[str, tf.Tensor]:
        enc = model.encode(images, training=False)  # features (B, G, E), keys (B, G, A)
        h0 = model.decoder.initial_state(enc)  # (B, U)

        def step(tokens: tf.Tensor, h: tf.Tensor):
            return model.decoder.step(tokens, h, enc)

        start = tf.fill([tf.shape(images)[0]], start_id)  # (B,)
        return greedy_search(step, h0, start, end_id, pad_id, max_length)

    return generate


@dataclass
class Generation:
    """Decoded sequences for a batch of images.

    ``tokens[i]`` are the ids generated for image i without ``<end>``; ``attention`` is
    (B, T, G) with ``attention[i, t]`` the weights used to emit ``tokens[i][t]``
    (zero rows past each sequence); ``scores`` are sums of token log-probs
    (``<end>`` included).

    Example:
        >>> g = Generation(["a b"], [[4, 5]], np.zeros(1), np.zeros((1, 3, 49)), ["x.png"])
        >>> g.texts[0], g.attention.shape
        ('a b', (1, 3, 49))
    """

    texts: list[str]
    tokens: list[list[int]]
    scores: np.ndarray  # (B,)
    attention: np.ndarray  # (B, T, G)
    images: list[str]

    def records(self, tokenizer: Tokenizer) -> list[dict[str, Any]]:
        """One JSON-ready dict per image (the ``caption --json`` output)."""
        out = []
        for i, text in enumerate(self.texts):
            n = len(self.tokens[i])
            out.append({"image": self.images[i], "text": text,
                        "tokens": tokenizer.ids_to_tokens(self.tokens[i]),
                        "score": float(self.scores[i]),
                        "attention": np.round(self.attention[i, :n], 5).tolist()})
        return out


class Captioner:
    """A trained model with its tokenizer and config, ready to caption images.

    Example:
        >>> cap = Captioner.load("runs/demo")                     # doctest: +SKIP
        >>> out = cap.generate(["runs/data/shapes/images/shape_00001.png"])  # doctest: +SKIP
        >>> out.texts[0], out.attention.shape                      # doctest: +SKIP
        ('a red circle above a blue square', (1, 8, 49))
    """

    def __init__(self, config: Config, tokenizer: Tokenizer, model: CaptionModel):
        self.config = config
        self.tokenizer = tokenizer
        self.model = model
        self._compiled: dict[str, Callable[..., dict[str, tf.Tensor]]] = {}

    @classmethod
    def load(cls, run_dir: str | Path, checkpoint: str = "best") -> Captioner:
        """Rebuild from ``run_dir`` alone: config.json, tokenizer.json, model.json and
        the ``best`` (or ``latest``) checkpoint."""
        from captioner.training import restore_weights

        run_dir = Path(run_dir)
        for name in ("config.json", "tokenizer.json", "model.json"):
            if not (run_dir / name).is_file():
                raise FileNotFoundError(f"{run_dir / name} is missing: is {run_dir} a run "
                                        "directory written by 'captioner train'?")
        config = config_from_dict(json.loads((run_dir / "config.json").read_text()))
        tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
        model = model_from_run(run_dir, config)
        restore_weights(model, run_dir, checkpoint)
        return cls(config, tokenizer, model)

    @property
    def image_size(self) -> int:
        return self.model.args["image_size"]

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.model.grid_hw

    def compiled(self, strategy: str = "greedy") -> Callable[..., dict[str, tf.Tensor]]:
        if strategy not in self._compiled:
            self._compiled[strategy] = make_generate_function(self.model, self.tokenizer, strategy)
        return self._compiled[strategy]

    def load_images(self, images: Sequence[str | Path] | np.ndarray
                    ) -> tuple[np.ndarray, list[str]]:
        """Paths or an array -> (uint8 (B, S, S, 3) at the model's input size, names)."""
        if isinstance(images, np.ndarray):
            if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
                raise ValueError(f"image array must be (B, {self.image_size}, "
                                 f"{self.image_size}, 3), got {images.shape}")
            return images.astype(np.uint8), [f"array[{i}]" for i in range(len(images))]
        arrays = [load_image(p, self.image_size) for p in images]
        return np.stack(arrays), [str(p) for p in images]

    def generate(self, images: Sequence[str | Path] | np.ndarray, max_length: int | None = None,
                 batch_size: int | None = None) -> Generation:
        """Greedy captions, token ids, scores and attention (B, T, G) for ``images``."""
        pixels, names = self.load_images(images)
        max_length = max_length or self.config.decode.max_length
        batch_size = batch_size or self.config.decode.batch_size
        fn = self.compiled("greedy")
        parts = [{k: v.numpy() for k, v in fn(tf.constant(b), tf.constant(max_length)).items()}
                 for b in image_batches(pixels, batch_size)]
        return self._collect(parts, names)

    def _collect(self, parts: list[dict[str, np.ndarray]], names: list[str]) -> Generation:
        steps = max(p["attention"].shape[1] for p in parts)
        grid = self.model.grid_size
        attention = np.concatenate([np.pad(p["attention"], ((0, 0), (0, steps - p["attention"]
                                    .shape[1]), (0, 0))) for p in parts]).reshape(-1, steps, grid)
        tokens, texts = [], []
        for p in parts:
            for row, length in zip(p["tokens"], p["lengths"]):
                ids = [int(t) for t in row[:length] if t != self.tokenizer.end_id]
                tokens.append(ids)
                texts.append(self.tokenizer.decode(ids))
        scores = np.concatenate([p["scores"] for p in parts])
        return Generation(texts, tokens, scores, attention, names)

    def caption(self, images: Sequence[str | Path] | np.ndarray) -> list[str]:
        """Just the texts."""
        return self.generate(images).texts


def model_from_run(run_dir: Path, config: Config) -> CaptionModel:
    """Rebuild the model from ``model.json`` (its ``get_config``) with the run's precision."""
    args = json.loads((Path(run_dir) / "model.json").read_text())
    args["dtype"] = keras.DTypePolicy(config.train.precision)
    return CaptionModel.from_config(args).build_weights()
