"""Compiled generation and the user-facing :class:`Captioner`.

``make_generate_function`` is the one place where a decoding path is compiled; a
``Captioner`` caches the compiled functions it has built.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from captioner.choices import Choices
from captioner.config import Config, DecodeConfig, config_from_dict
from captioner.data.chem import canonical_smiles
from captioner.data.images import ImageError, View, image_batches, load_image, load_view
from captioner.data.tokenizers import Tokenizer
from captioner.generate.decoding import beam_search, greedy_search, sample_search, tile_for_beams
from captioner.generate.rescoring import make_reading_function, make_score_function, pool_readings
from captioner.model.layers import CaptionModel
from captioner.model.precision import resolve_precision
from captioner.model.restore import restore_weights


@dataclass(frozen=True)
class DecodeOptions:
    """One decoding path: each distinct value compiles one function, built once and cached.

    Example:
        >>> DecodeOptions("beam", beam_size=3, n_best=2).candidates
        2
    """

    strategy: str = "greedy"  # greedy | beam | sample
    beam_size: int = 3
    n_best: int = 1
    length_penalty: float = 0.0
    temperature: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        Choices().check("decode_strategy", self.strategy, "decoding strategy")
        if self.strategy == "beam" and not 1 <= self.n_best <= self.beam_size:
            raise ValueError(f"n_best ({self.n_best}) must be between 1 and beam_size "
                             f"({self.beam_size})")

    @property
    def candidates(self) -> int:
        """Sequences returned per image."""
        return self.n_best if self.strategy == "beam" else 1

    @classmethod
    def from_config(cls, cfg: DecodeConfig, **overrides: Any) -> DecodeOptions:
        values = {"strategy": cfg.strategy, "beam_size": cfg.beam_size, "n_best": cfg.n_best,
                  "length_penalty": cfg.length_penalty, "temperature": cfg.temperature,
                  "top_k": cfg.top_k}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["strategy"] == "beam":
            values["n_best"] = min(values["n_best"], values["beam_size"])
        return cls(**values)


def run_strategy(options: DecodeOptions, model: CaptionModel, enc: dict[str, tf.Tensor],
                  ids: tuple[int, int, int], max_length: tf.Tensor, seed: tf.Tensor
                  ) -> dict[str, tf.Tensor]:
    """Decode from encoder outputs; every strategy returns (B, n, ...) shaped results."""
    start_id, end_id, pad_id = ids
    batch = tf.shape(enc["features"])[0]
    weights = model.decoder.step_weights()  # read and cast once, outside the loop
    if options.strategy == "beam":
        k = options.beam_size
        enc = tile_for_beams(enc, k)  # (B*K, G, E), computed once, never gathered
        h0 = model.decoder.initial_state(enc)  # (B*K, U)
        out = beam_search(lambda t, h: model.decoder.step(t, h, enc, weights), h0,
                          tf.fill([batch * k], start_id), end_id, pad_id, max_length, k,
                          options.n_best, options.length_penalty)
        return {key: out[key] for key in ("tokens", "lengths", "scores", "token_scores",
                                          "attention")}
    h0 = model.decoder.initial_state(enc)  # (B, U)
    start = tf.fill([batch], start_id)

    def step(tokens: tf.Tensor, h: tf.Tensor):
        return model.decoder.step(tokens, h, enc, weights)

    if options.strategy == "sample":
        out = sample_search(step, h0, start, end_id, pad_id, max_length, seed,
                            options.temperature, options.top_k)
    else:
        out = greedy_search(step, h0, start, end_id, pad_id, max_length)
    return {key: tf.expand_dims(value, 1) for key, value in out.items()}  # n = 1


def make_generate_function(model: CaptionModel, tokenizer: type[Tokenizer] | Tokenizer,
                           options: DecodeOptions | None = None, grids: bool = False
                           ) -> Callable[..., dict[str, tf.Tensor]]:
    """Compile ``images (B, S, S, 3) uint8, max_length (), seed (2,) -> decoded dict`` once
    (or, with ``grids``, from cached backbone grids (B, G, C) float32).

    The step function closes over the per-image encoder outputs, so attention keys are
    computed once per image, never per step. Results are shaped (B, n, ...) with n the
    number of candidates (``n_best`` for beam search, else 1): ``tokens`` (B, n, T),
    ``lengths`` (B, n), ``scores`` (B, n), ``attention`` (B, n, T, G).
    """
    options = options or DecodeOptions()
    size = model.args["image_size"]
    ids = (tokenizer.start_id, tokenizer.end_id, tokenizer.pad_id)
    inputs = (tf.TensorSpec((None, model.grid_size, model.feature_dim), tf.float32) if grids
              else tf.TensorSpec((None, size, size, 3), tf.uint8))

    @tf.function(input_signature=[inputs, tf.TensorSpec((), tf.int32),
                                  tf.TensorSpec((2,), tf.int32)], autograph=False)
    def generate(images: tf.Tensor, max_length: tf.Tensor, seed: tf.Tensor
                 ) -> dict[str, tf.Tensor]:
        enc = model.encode(images, training=False)  # features (B, G, E), keys (B, G, A)
        return run_strategy(options, model, enc, ids, max_length, seed)

    return generate


@dataclass
class Candidate:
    """One decoded sequence: text, token ids (no ``<end>``), score, its attention,
    each token's log-prob (``token_scores``, same length as ``tokens``) and, when views
    re-scored the beam (``decode.rescore_views``), its log-probability summed over them;
    read at several margins (``decode.margin_views``), the log of the pooled probability
    of what it names (its score, token scores and attention are then those of teacher
    forcing on the picture as the run reads it, at ``crop_margin``).

    Example:
        >>> Candidate("a b", [4, 5], -0.5, np.zeros((2, 49))).attention.shape
        (2, 49)
    """

    text: str
    tokens: list[int]
    score: float
    attention: np.ndarray  # (len(tokens), G)
    token_scores: np.ndarray | None = None  # (len(tokens),) float32 log-probs
    view_score: float | None = None


@dataclass
class Generation:
    """Decoded sequences for a batch of images.

    ``tokens[i]`` are the ids generated for image i without ``<end>``; ``attention`` is
    (B, T, G) with ``attention[i, t]`` the weights used to emit ``tokens[i][t]``
    (zero rows past each sequence); ``scores`` are sums of token log-probs (``<end>``
    included; length-normalised when beam search uses a length penalty) and
    ``token_scores`` (B, T) each token's log-prob (zeros past each sequence).
    ``candidates[i]`` holds the n-best list of image i (one entry unless beam search
    was asked for more), best first. ``failures`` lists the ``(path, ImageError)`` of
    images left out by ``Captioner.generate(..., on_error="skip")`` (empty otherwise).

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
    candidates: list[list[Candidate]] | None = None
    token_scores: np.ndarray | None = None  # (B, T)
    failures: list[tuple[str, ImageError]] = field(default_factory=list)

    def error_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per image skipped with ``on_error="skip"``: ``image``,
        ``error`` (``"<reason>: <detail>"``) and ``reason``."""
        return [{"image": path, "error": f"{err.reason}: {err.detail}", "reason": err.reason}
                for path, err in self.failures]

    def records(self, tokenizer: Tokenizer) -> list[dict[str, Any]]:
        """One JSON-ready dict per image (the ``caption --json`` output)."""
        out = []
        for i, text in enumerate(self.texts):
            n = len(self.tokens[i])
            rec = {"image": self.images[i], "text": text,
                   "tokens": tokenizer.ids_to_tokens(self.tokens[i]),
                   "score": float(self.scores[i]),
                   "token_scores": ([] if self.token_scores is None else
                                    np.round(self.token_scores[i, :n], 5).tolist()),
                   "attention": np.round(self.attention[i, :n], 5).tolist()}
            if self.candidates and len(self.candidates[i]) > 1:
                rec["n_best"] = [{"text": c.text, "score": c.score}
                                 | ({} if c.view_score is None else {"view_score": c.view_score})
                                 for c in self.candidates[i]]
            out.append(rec)
        return out


def _valid_smiles(text: str) -> bool:
    return bool(text) and canonical_smiles(text) is not None


def _rank(candidate: Candidate, rerank: bool) -> tuple[bool, float]:
    """Sort key of a beam's candidates (a stable sort keeps the beam's order for ties):
    with ``rerank``, the ones RDKit parses first; then by view score when there is one."""
    invalid = rerank and not _valid_smiles(candidate.text)
    return invalid, 0.0 if candidate.view_score is None else -candidate.view_score


class Captioner:
    """A trained model with its tokenizer and config, ready to caption images.

    Example:
        >>> cap = Captioner.load("runs/demo")                     # doctest: +SKIP
        >>> out = cap.generate(["runs/data/shapes/images/shape_00001.png"])  # doctest: +SKIP
        >>> out.texts[0], out.attention.shape                      # doctest: +SKIP
        ('a red circle above a blue square', (1, 8, 49))
        >>> cap.generate(images, strategy="beam", beam_size=5, n_best=3)  # doctest: +SKIP
        >>> cap.crop_margin = 0.15  # read drawings cut to their ink  # doctest: +SKIP
        >>> cap.view("mol.png").pixels.shape  # what the model read  # doctest: +SKIP
        (180, 180, 3)
    """

    def __init__(self, config: Config, tokenizer: Tokenizer, model: CaptionModel):
        self.config = config
        self.tokenizer = tokenizer
        self.model = model
        # picture files are cut to their ink plus this margin before they are read
        # (data.images.load_view; None: whole pictures); the run's decode.crop_margin
        self.crop_margin: float | None = config.decode.crop_margin
        self._compiled: dict[tuple[DecodeOptions, bool], Callable[..., dict[str, tf.Tensor]]] = {}
        self._scorers: dict[tuple[str, ...], Callable[..., tf.Tensor]] = {}
        self._reader: Callable[..., dict[str, tf.Tensor]] | None = None

    @classmethod
    def load(cls, run_dir: str | Path, checkpoint: str = "best",
             attention_kernel: str | None = None,
             crop_margin: float | str | None = "run") -> Captioner:
        """Rebuild from ``run_dir`` alone: config.json, tokenizer.json, model.json and
        the ``best`` (or ``latest``) checkpoint; ``attention_kernel`` overrides the
        run's ``model.attention_kernel`` (e.g. ``tensorflow`` for an export) and
        ``crop_margin`` its ``decode.crop_margin`` (a margin, or None for whole pictures;
        ``"run"``: the run's own)."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run directory {run_dir} does not exist (or is not a "
                                    "directory)")
        for name in ("config.json", "tokenizer.json", "model.json"):
            if not (run_dir / name).is_file():
                raise FileNotFoundError(f"{run_dir / name} is missing: is {run_dir} a run "
                                        "directory written by 'captioner train'?")
        try:
            config = config_from_dict(json.loads((run_dir / "config.json").read_text()))
            tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
            vocab = json.loads((run_dir / "model.json").read_text()).get("vocab_size")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{run_dir}: unreadable run directory file: {exc}") from exc
        if vocab is not None and vocab != tokenizer.vocab_size:
            raise ValueError(f"{run_dir}: tokenizer.json has {tokenizer.vocab_size} tokens but "
                             f"the model (model.json, its checkpoint's output layer) has "
                             f"{vocab}: the tokenizer is not this run's")
        model = model_from_run(run_dir, config, attention_kernel)
        restore_weights(model, run_dir, checkpoint)
        cap = cls(config, tokenizer, model)
        if crop_margin != "run":
            cap.crop_margin = crop_margin
        return cap

    @property
    def image_size(self) -> int:
        return self.model.args["image_size"]

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.model.grid_hw

    def compiled(self, options: DecodeOptions, grids: bool = False
                 ) -> Callable[..., dict[str, tf.Tensor]]:
        """The compiled function of one decoding path (built on first use, then cached)."""
        key = (options, grids)
        if key not in self._compiled:
            self._compiled[key] = make_generate_function(self.model, self.tokenizer, options,
                                                         grids)
        return self._compiled[key]

    def scorer(self, views: tuple[str, ...]) -> Callable[..., tf.Tensor]:
        """The compiled view scorer of :func:`~captioner.generate.rescoring.make_score_function`
        for ``views`` (built on first use, then cached)."""
        if views not in self._scorers:
            self._scorers[views] = make_score_function(self.model, self.tokenizer.start_id,
                                                       self.tokenizer.pad_id, views)
        return self._scorers[views]

    def reader(self) -> Callable[..., dict[str, tf.Tensor]]:
        """The compiled teacher-forced reading of
        :func:`~captioner.generate.rescoring.make_reading_function` (built once)."""
        if self._reader is None:
            self._reader = make_reading_function(self.model, self.tokenizer.start_id,
                                                 self.tokenizer.pad_id)
        return self._reader

    def load_images(self, images: Sequence[str | Path] | np.ndarray
                    ) -> tuple[np.ndarray, list[str]]:
        """Paths or an array -> (uint8 (B, S, S, 3) at the model's input size, names).

        An array of cached backbone grids (B, G, C) passes through as float32. A path
        that cannot be used raises :class:`ImageError` naming it (reason ``missing`` for
        a file that does not exist); see :meth:`load_images_skipping` to go on instead.
        """
        if isinstance(images, np.ndarray):
            names = [f"array[{i}]" for i in range(len(images))]
            if images.ndim == 3 and images.shape[1:] == (self.model.grid_size,
                                                         self.model.feature_dim):
                return images.astype(np.float32), names
            if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
                raise ValueError(f"image array must be (B, {self.image_size}, "
                                 f"{self.image_size}, 3) or grids (B, {self.model.grid_size}, "
                                 f"{self.model.feature_dim}), got {images.shape}")
            return images.astype(np.uint8), names
        arrays = [self._load_one(p) for p in images]
        if not arrays:
            raise ValueError("no images given")
        return np.stack(arrays), [str(p) for p in images]

    def load_images_skipping(self, images: Sequence[str | Path]
                             ) -> tuple[np.ndarray, list[str], list[tuple[str, ImageError]]]:
        """Like :meth:`load_images` for paths, but an unusable file is left out:
        (pixels of the usable ones (B_ok, S, S, 3), their names, [(path, ImageError)])."""
        arrays, names, failures = [], [], []
        for p in images:
            try:
                arrays.append(self._load_one(p))
                names.append(str(p))
            except ImageError as exc:
                failures.append((str(p), exc))
        size = self.image_size
        pixels = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
        return pixels, names, failures

    def view(self, path: str | Path) -> View:
        """The picture at ``path`` as the model reads it before resizing (cut to its ink
        with :attr:`crop_margin`, else whole): what its attention grid covers."""
        return load_view(path, self.crop_margin)

    def _load_one(self, path: str | Path) -> np.ndarray:
        try:
            return load_image(path, self.image_size, crop_margin=self.crop_margin)
        except FileNotFoundError:
            raise ImageError(str(path), "missing", "no such file") from None

    def options(self, rescore_views: Sequence[str] | None = None,
                margin_views: Sequence[float] | None = None, **overrides: Any) -> DecodeOptions:
        """Decoding options from the run's ``decode`` config with keyword overrides."""
        options = DecodeOptions.from_config(self.config.decode, **overrides)
        if (self._reranks(options) or self.rescore_views(options, rescore_views)
                or self.margin_views(margin_views)):
            # search all beams, choose among them after
            options = DecodeOptions(**{**options.__dict__, "n_best": options.beam_size})
        return options

    def rescore_views(self, options: DecodeOptions, views: Sequence[str] | None = None
                      ) -> tuple[str, ...]:
        """The views that re-rank the candidates of ``options`` (beam search only; none
        otherwise): ``views``, else the run's ``decode.rescore_views``."""
        if options.strategy != "beam":
            return ()
        return tuple(self.config.decode.rescore_views if views is None else views)

    def margin_views(self, margins: Sequence[float] | None = None) -> tuple[float, ...]:
        """The margins each picture file is cut and read at before the readings are
        pooled: ``margins``, else the run's ``decode.margin_views`` (empty: one reading)."""
        margins = tuple(self.config.decode.margin_views if margins is None else margins)
        bad = [m for m in margins if not m >= 0]
        if bad or len(set(margins)) < len(margins):
            raise ValueError(f"margin_views must be distinct margins >= 0, got {list(margins)}")
        return margins

    def _reranks(self, options: DecodeOptions) -> bool:
        return (options.strategy == "beam" and self.config.decode.rerank_valid_smiles
                and self.tokenizer.kind in ("smiles", "selfies"))

    def generate(self, images: Sequence[str | Path] | np.ndarray, max_length: int | None = None,
                 batch_size: int | None = None, seed: int = 0, on_error: str = "raise",
                 **decode: Any) -> Generation:
        """Captions, token ids, scores and attention (B, T, G) for ``images``.

        ``decode`` overrides the run's decode config: ``strategy`` (greedy, beam,
        sample), ``beam_size``, ``n_best``, ``length_penalty``, ``temperature``, ``top_k``,
        ``rescore_views`` (beam search: rank the candidates by their log-probability
        summed over the picture seen in these views, :mod:`~captioner.generate.rescoring`),
        ``margin_views`` (picture files: decode each cut to its ink at these margins and
        rank what the union of their candidates names, :meth:`generate_at_margins`).

        ``on_error`` says what an unusable image file does (empty, not an image, cut off,
        too large, missing): ``"raise"`` (the default) raises :class:`ImageError` naming
        the file; ``"skip"`` leaves it out, so the result holds the usable images only
        (``images`` names them) and ``failures`` the ``(path, ImageError)`` of the others
        (all of them, and no caption, when none is usable). Each image is decoded on its
        own rows of the batch, so a skipped neighbour does not change another's caption.
        """
        Choices().check("on_image_error", on_error, "on_error")
        max_length = max_length or self.config.decode.max_length
        batch_size = batch_size or self.config.decode.batch_size
        views, margins = decode.pop("rescore_views", None), decode.pop("margin_views", None)
        options = self.options(rescore_views=views, margin_views=margins, **decode)
        views, margins = self.rescore_views(options, views), self.margin_views(margins)
        n_best = decode.get("n_best") or self.config.decode.n_best
        if margins:
            if views:
                raise ValueError("margin_views and rescore_views both choose among the "
                                 "candidates: give one of them")
            if isinstance(images, np.ndarray):
                raise ValueError("margin_views cut picture files at each margin: they need "
                                 "image paths, not arrays")
            return self.generate_at_margins(images, margins, options, max_length, batch_size,
                                            seed, on_error, n_best)
        failures: list[tuple[str, ImageError]] = []
        if on_error == "skip" and not isinstance(images, np.ndarray):
            pixels, names, failures = self.load_images_skipping(images)
        else:
            pixels, names = self.load_images(images)
        if views and pixels.ndim == 3:
            raise ValueError("rescore_views turn pictures: they need images, not cached "
                             "backbone grids")
        fn = self.compiled(options, grids=pixels.ndim == 3)
        parts = []
        for i, b in enumerate(image_batches(pixels, batch_size)):
            part = {k: v.numpy() for k, v in fn(tf.constant(b), tf.constant(max_length),
                                                tf.constant([seed, i], tf.int32)).items()}
            if views:  # (B, V, N) log-probs of the candidates in each view
                part["view_scores"] = self.scorer(views)(tf.constant(b),
                                                         tf.constant(part["tokens"])).numpy()
            parts.append(part)
        gen = self._collect(parts, names, self._reranks(options), n_best)
        gen.failures = failures
        return gen

    def generate_at_margins(self, images: Sequence[str | Path], margins: Sequence[float],
                            options: DecodeOptions, max_length: int, batch_size: int,
                            seed: int = 0, on_error: str = "raise", n_best: int = 1
                            ) -> Generation:
        """Read each picture file cut to its ink at every margin of ``margins`` and pool.

        Each cut is decoded with ``options``; the union of the candidates (distinct token
        sequences) is scored by teacher forcing at every margin, and what they name (for
        SMILES and SELFIES the canonical molecule, else the text) is ranked by
        :func:`~captioner.generate.rescoring.pool_readings` (valid SMILES first when the
        run re-ranks); each name is spelled by its best candidate, whose ``view_score`` is
        the pooled log-probability. Scores, token scores and attention are teacher
        forcing's on the picture as the run reads it (:attr:`crop_margin`), so the
        attention lies over :meth:`view`. ``on_error`` as in :meth:`generate`.
        """
        if on_error == "skip":
            own, names, failures = self.load_images_skipping(images)
        else:
            (own, names), failures = self.load_images(images), []
        fn = self.compiled(options)
        candidates: list[list[Candidate]] = []
        for start in range(0, len(names), batch_size):
            batch = names[start:start + batch_size]
            cut = {m: (own[start:start + batch_size] if m == self.crop_margin else
                       np.stack([load_image(p, self.image_size, crop_margin=m) for p in batch]))
                   for m in margins}  # each (b, S, S, 3)
            union: list[dict[tuple[int, ...], None]] = [{} for _ in batch]
            for pixels in cut.values():
                out = fn(tf.constant(pixels), tf.constant(max_length),
                         tf.constant([seed, start // batch_size], tf.int32))
                tokens, lengths = out["tokens"].numpy(), out["lengths"].numpy()  # (b, n, T)
                for b, n in np.ndindex(*lengths.shape):
                    union[b][tuple(int(t) for t in tokens[b, n, :lengths[b, n]])] = None
            candidates += self._pool(own[start:start + batch_size], cut,
                                     [list(u) for u in union])
        candidates = [sorted(c, key=lambda x: _rank(x, self._reranks(options)))[:max(1, n_best)]
                      for c in candidates]
        gen = self._generation(candidates, names)
        gen.failures = failures
        return gen

    def read_tokens(self, pixels: np.ndarray, rows: Sequence[Sequence[Sequence[int]]]
                    ) -> dict[str, np.ndarray]:
        """Teacher-forced reading of each picture's token sequences (``rows[b]``: token
        ids without ``<start>``, ``<end>`` kept where it came) in one compiled call:
        ``token_scores`` (B, N, T) and ``attention`` (B, N, T, G), zero past each sequence
        and past each row's N (:meth:`reader`)."""
        width, steps = max(map(len, rows)), max((len(t) for r in rows for t in r), default=1)
        tokens = np.full((len(rows), width, max(steps, 1)), self.tokenizer.pad_id, np.int32)
        for b, row in enumerate(rows):
            for n, ids in enumerate(row):
                tokens[b, n, :len(ids)] = ids  # (B, N, T)
        out = self.reader()(tf.constant(pixels), tf.constant(tokens))
        return {k: v.numpy() for k, v in out.items()}

    def _pool(self, own: np.ndarray, cut: dict[float, np.ndarray],
              union: list[list[tuple[int, ...]]]) -> list[list[Candidate]]:
        """One batch's union of candidates (token ids, ``<end>`` kept) -> each picture's
        pooled candidates, best first."""
        at = {m: self.read_tokens(pixels, union) for m, pixels in cut.items()}
        mine = at.get(self.crop_margin) or self.read_tokens(own, union)  # as the run reads
        logp = np.stack([r["token_scores"].sum(2) for r in at.values()], -1)  # (b, N, M)
        out = []
        for b, row in enumerate(union):
            ids = [self._strip_end(t) for t in row]
            texts = [self.tokenizer.decode(i) for i in ids]
            pooled = pool_readings([self._name(t) for t in texts], logp[b, :len(row)])
            out.append([Candidate(texts[r.index], ids[r.index],
                                  float(mine["token_scores"][b, r.index].sum()),
                                  mine["attention"][b, r.index, :len(ids[r.index])],
                                  mine["token_scores"][b, r.index, :len(ids[r.index])], r.score)
                        for r in pooled])
        return out

    def _strip_end(self, ids: Iterable[int]) -> list[int]:
        """Token ids without a final ``<end>``."""
        ids = list(ids)
        return ids[:-1] if ids and ids[-1] == self.tokenizer.end_id else ids

    def _name(self, text: str) -> str:
        """What a reading names when readings pool: its molecule for SMILES and SELFIES
        (RDKit's canonical SMILES; the text itself when RDKit cannot read it), else the
        text."""
        if self.tokenizer.kind in ("smiles", "selfies"):
            return canonical_smiles(text) or text
        return text

    def _candidates(self, parts: list[dict[str, np.ndarray]]) -> list[list[Candidate]]:
        out = []
        for p in parts:
            for b in range(p["tokens"].shape[0]):
                row = []
                for n in range(p["tokens"].shape[1]):
                    length = int(p["lengths"][b, n])
                    ids = self._strip_end(int(t) for t in p["tokens"][b, n, :length])
                    views = p.get("view_scores")
                    row.append(Candidate(self.tokenizer.decode(ids), ids,
                                         float(p["scores"][b, n]),
                                         p["attention"][b, n, :len(ids)],
                                         p["token_scores"][b, n, :len(ids)],
                                         None if views is None else float(views[b, :, n].sum())))
                out.append(row)
        return out

    def _collect(self, parts: list[dict[str, np.ndarray]], names: list[str], rerank: bool,
                 n_best: int) -> Generation:
        candidates = [sorted(c, key=lambda x: _rank(x, rerank)) for c in self._candidates(parts)]
        return self._generation([c[:max(1, n_best)] for c in candidates], names)

    def _generation(self, candidates: list[list[Candidate]], names: list[str]) -> Generation:
        """The Generation of each image's candidates, ranked, best first."""
        best = [c[0] for c in candidates]
        steps = max([len(c.tokens) for c in best] + [1])
        attention = np.zeros((len(best), steps, self.model.grid_size), np.float32)
        token_scores = np.zeros((len(best), steps), np.float32)
        for i, c in enumerate(best):
            attention[i, :len(c.tokens)] = c.attention
            token_scores[i, :len(c.tokens)] = c.token_scores
        return Generation([c.text for c in best], [c.tokens for c in best],
                          np.array([c.score for c in best], np.float32), attention, names,
                          candidates, token_scores)

    def caption(self, images: Sequence[str | Path] | np.ndarray, **decode: Any) -> list[str]:
        """Just the texts."""
        return self.generate(images, **decode).texts


def expand_images(specs: Sequence[str]) -> list[str]:
    """Files, folders (their images, sorted) and glob patterns -> image paths.

    Raises FileNotFoundError naming every spec that matched nothing.
    """
    suffixes = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
    paths, missing = [], []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in suffixes)
        elif p.is_file():
            found = [spec]
        else:
            found = sorted(glob.glob(spec, recursive=True))
        paths += found
        if not found:
            missing.append(spec)
    if missing:
        raise FileNotFoundError(f"no image file matches: {', '.join(missing)}")
    return paths


def write_results(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write ``caption`` results as JSON lines (``.jsonl``) or CSV (``.csv``).

    A record with an ``error`` (an image that could not be used) is written as it is in
    JSON lines; in CSV it gets empty text, score and tokens, and an ``error`` column is
    added (only when some record has one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        errors = any("error" in r for r in records)
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "text", "score", "tokens"] + (["error"] if errors else []))
            for r in records:
                if "error" in r:
                    writer.writerow([r["image"], "", "", "", r["error"]])
                    continue
                row = [r["image"], r["text"], f"{r['score']:.5f}", " ".join(r["tokens"])]
                writer.writerow(row + ([""] if errors else []))
    elif path.suffix.lower() in (".jsonl", ".json"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        raise ValueError(f"--out must end in .jsonl or .csv, got {path}")
    return path


def model_from_run(run_dir: Path, config: Config, attention_kernel: str | None = None
                   ) -> CaptionModel:
    """Rebuild the model from ``model.json`` (its ``get_config``) with the run's precision
    (and ``attention_kernel`` instead of the run's, when given)."""
    args = json.loads((Path(run_dir) / "model.json").read_text())
    if attention_kernel is not None:
        args["attention_kernel"] = attention_kernel
    args["dtype"] = keras.DTypePolicy(resolve_precision(config.train.precision))
    args["weights"] = None  # the checkpoint holds every weight: never download or read files
    return CaptionModel.from_config(args).build_weights()
