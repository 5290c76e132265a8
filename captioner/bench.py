"""Throughput benchmark of the decoder: train step, greedy and beam decoding, FLOP roofline.

:func:`run_bench` trains and decodes on random backbone grids (B, G, C) with random targets,
so the backbone is out of the loop, and returns one JSON-ready dict (the ``bench`` command
prints it as one line). Two implementations run the same shapes:

* ``impl="captioner"``: our :class:`~captioner.model.layers.CaptionModel` with
  :func:`~captioner.train.steps.make_train_step` and
  :func:`~captioner.generate.captioner.make_generate_function` (compiled, batched).
* ``impl="classic"``: a faithful copy of the structure of TensorFlow's image-captioning
  tutorial ("Image captioning with visual attention"), kept here for comparison:
  :class:`BahdanauAttention` recomputes ``W1(features)`` at every step, the
  :class:`RNNDecoder` calls a Keras ``GRU`` on a length-1 sequence per step (without
  an initial state: the previous hidden only reaches the attention, exactly as the
  tutorial does), training is a Python ``for`` loop over time steps inside ONE
  ``tf.function`` (unrolled T times), and decoding (:func:`classic_evaluate`) is eager,
  one image at a time, one host sync per step. The tutorial has no beam search, so
  ``beam3_images_per_s`` is ``None`` for it. Both implementations use the same
  optimizer (:func:`~captioner.train.steps.make_optimizer`, Adam with clipping) so that
  only the model structure differs.

Shapes in comments: B batch, G grid cells, C backbone channels, E embedding_dim,
U GRU units, A attention units, V vocabulary, L max_length, T = L - 1 decoder steps.

Example:
    >>> r = run_bench(batch_size=4, grid=9, feature_dim=16, embedding_dim=8, units=16,
    ...               vocab_size=50, max_length=6, steps=2)            # doctest: +SKIP
    >>> sorted(k for k in r if k.endswith("_per_s"))                   # doctest: +SKIP
    ['beam3_images_per_s', 'greedy_images_per_s', 'peak_gflop_per_s', ...]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from captioner.choices import Choices
from captioner.config import Config, ModelConfig, load_config
from captioner.data.drawing import draw_batch, example_seed
from captioner.data.features import FeatureCache, benchmark_input, extract_features
from captioner.data.images import load_image
from captioner.data.molecules import read_smiles_csv
from captioner.data.tokenizers import Tokenizer
from captioner.generate.captioner import DecodeOptions, make_generate_function
from captioner.model.backbones import build_backbone
from captioner.model.layers import CaptionModel
from captioner.model.precision import resolve_precision
from captioner.train.setup import build_model_and_optimizers
from captioner.train.steps import make_optimizer, make_train_step

try:  # Unix only; elsewhere peak_rss_mb() reports None
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

TrainFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (grids (B,G,C), tokens (B,L)) -> loss


# ---- shapes, data and the FLOP count ---------------------------------------------------
@dataclass(frozen=True)
class BenchShapes:
    """The sizes of one benchmark; ``attention_units`` defaults to ``units``.

    ``grid`` must be a square (7x7 = 49, 8x8 = 64, ...) because the model is built around
    a square backbone grid.

    Example:
        >>> s = BenchShapes(batch_size=2, grid=9, max_length=6)
        >>> s.steps, s.side, s.attention_units
        (5, 3, 512)
    """

    batch_size: int = 64
    grid: int = 49
    feature_dim: int = 1280
    embedding_dim: int = 256
    units: int = 512
    attention_units: int | None = None
    vocab_size: int = 5000
    max_length: int = 50

    def __post_init__(self) -> None:
        if self.attention_units is None:
            object.__setattr__(self, "attention_units", self.units)
        side = math.isqrt(self.grid)
        if self.grid < 1 or side * side != self.grid:
            raise ValueError(f"grid must be a square number of cells (49, 64, ...), "
                             f"got {self.grid}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (<start> and one target), "
                             f"got {self.max_length}")
        if self.vocab_size <= Tokenizer.unk_id + 1:
            raise ValueError(f"vocab_size must exceed the {Tokenizer.unk_id + 1} special "
                             f"tokens, got {self.vocab_size}")
        for name in ("batch_size", "feature_dim", "embedding_dim", "units", "attention_units"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def steps(self) -> int:
        """T: decoder steps of one train step (targets are tokens[:, 1:])."""
        return self.max_length - 1

    @property
    def side(self) -> int:
        """Side of the square grid."""
        return math.isqrt(self.grid)


def flop_terms(s: BenchShapes, attend: str = "before", positions: int | None = None
               ) -> dict[str, int]:
    """Forward matmul FLOPs of one teacher-forced step over a batch, term by term.

    A matmul (m, k) x (k, n) counts 2mkn. With N = ``positions``, the real (not padding)
    target positions of the batch (default all T * B, T = ``s.steps``):

    * once per image, times B: ``encoder`` G*C*E*2 (grid projection) and
      ``attention_keys`` G*E*A*2 (W1 over the encoded grid, computed ONCE per image);
    * per real position, times N: ``attention_query`` U*A*2 (W2 h), ``attention_scores``
      G*A*2 (V over tanh(keys + query)), ``attention_context`` G*E*2 (alpha-weighted
      sum), ``gru_input`` (E_emb + E)*3U*2 (embedding and context halves of the GRU
      input projection; ``attend="after"``: only the embedding, E_emb*3U*2),
      ``gru_recurrent`` U*3U*2 and ``head`` (U*U + U*V)*2 (fc1 then the logits;
      ``attend="after"``: fc1 reads [h; context], ((U + E)*U + U*V)*2).

    E_emb = E (one ``embedding_dim`` for words and grid cells). Not counted: the initial
    state Dense of our model (B*E*U*2, the tutorial starts from zeros), elementwise ops
    (tanh, sigmoid, softmax, the loss), embedding lookups and the optimizer update, and
    work that is not necessary (:func:`redundant_flops`): anything at padded positions,
    or the tutorial recomputing W1 at every step.

    Example:
        >>> s = BenchShapes(batch_size=1, grid=1, feature_dim=1, embedding_dim=1, units=1,
        ...                 vocab_size=5, max_length=3)
        >>> t = flop_terms(s)
        >>> t["head"], sum(t.values())
        (24, 76)
        >>> flop_terms(s, positions=1)["head"], sum(flop_terms(s, positions=1).values())
        (12, 40)
    """
    Choices().check("attend", attend)
    b, g, c, e = s.batch_size, s.grid, s.feature_dim, s.embedding_dim
    u, a, v = s.units, int(s.attention_units), s.vocab_size
    n = s.steps * b if positions is None else int(positions)
    gru_in = e + e if attend == "before" else e
    head_in = u if attend == "before" else u + e
    return {
        "encoder": b * g * c * e * 2,
        "attention_keys": b * g * e * a * 2,
        "attention_query": n * u * a * 2,
        "attention_scores": n * g * a * 2,
        "attention_context": n * g * e * 2,
        "gru_input": n * gru_in * 3 * u * 2,
        "gru_recurrent": n * u * 3 * u * 2,
        "head": n * (head_in * u + u * v) * 2,
    }


def train_step_flops(s: BenchShapes, attend: str = "before", positions: int | None = None
                     ) -> int:
    """Necessary FLOPs of one train step: 3 x the forward matmuls of :func:`flop_terms`
    over ``positions`` real target positions (forward + backward, the usual 1 + 2 rule,
    also applied to the encoder projection).

    Example:
        >>> train_step_flops(BenchShapes(batch_size=1, grid=1, feature_dim=1,
        ...                              embedding_dim=1, units=1, vocab_size=5, max_length=2))
        120
    """
    return 3 * sum(flop_terms(s, attend, positions).values())


def redundant_flops(s: BenchShapes, impl: str, positions: int | None = None,
                    attend: str = "before") -> int:
    """Matmul FLOPs a train step executes beyond :func:`train_step_flops` (x 3 as there),
    with P = T * B - ``positions`` padded target positions.

    ``classic``: the tutorial's W1(features) at every step instead of once,
    (T - 1) * B*G*E*A*2, and every per-position term of :func:`flop_terms` at the P padded
    positions (it runs all T steps on every row). ``captioner``: the embedding half of
    the GRU input projection at the padded positions, P*E*3U*2 (one matmul over all
    positions before the loop; the recurrence skips a row's padded steps and the head
    runs on real positions only), and with ``attend="after"`` the attention at the
    padded positions (it runs for all positions at once after the loop).

    Example:
        >>> s = BenchShapes(batch_size=1, grid=1, feature_dim=1, embedding_dim=1,
        ...                 units=1, vocab_size=5, max_length=3)
        >>> redundant_flops(s, "classic"), redundant_flops(s, "captioner")
        (6, 0)
        >>> redundant_flops(s, "classic", positions=1), redundant_flops(s, "captioner", 1)
        (114, 18)
    """
    padded = s.steps * s.batch_size - (s.steps * s.batch_size if positions is None
                                       else int(positions))
    at_padded = flop_terms(s, attend, padded)
    if impl == "classic":
        keys = flop_terms(s)["attention_keys"]
        per_position = sum(v for k, v in at_padded.items()
                           if k not in ("encoder", "attention_keys"))  # not per image
        return 3 * ((s.steps - 1) * keys + per_position)
    e, u = s.embedding_dim, s.units
    extra = padded * e * 3 * u * 2
    if attend == "after":
        extra += sum(at_padded[k] for k in ("attention_query", "attention_scores",
                                            "attention_context"))
    return 3 * extra


def real_positions(tokens: np.ndarray, pad_id: int = Tokenizer.pad_id) -> int:
    """N: target positions (tokens[:, 1:]) that are not padding.

    Example:
        >>> real_positions(np.array([[1, 5, 2], [1, 2, 0]]))
        3
    """
    return int(np.count_nonzero(np.asarray(tokens)[:, 1:] != pad_id))


def random_batch(s: BenchShapes, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random grids (B, G, C) float32 in [0, 1) and targets (B, L) int32.

    Each target row is ``<start>``, random word ids, ``<end>`` at a random position
    >= L / 2, then padding. Row 0 always ends at the last position, so no padding column
    is trimmed and the longest row runs exactly T = L - 1 decoder steps (the others end
    earlier: :func:`real_positions` counts the real target positions).

    Example:
        >>> grids, tokens = random_batch(BenchShapes(batch_size=3, grid=4, feature_dim=2,
        ...                                          vocab_size=10, max_length=6))
        >>> grids.shape, tokens.shape, int(tokens[0, 0]), int(tokens[0, -1])
        ((3, 4, 2), (3, 6), 1, 2)
    """
    rng = np.random.default_rng(seed)
    b, length = s.batch_size, s.max_length
    grids = rng.random((b, s.grid, s.feature_dim), dtype=np.float32)
    tokens = rng.integers(Tokenizer.unk_id + 1, s.vocab_size, (b, length)).astype(np.int32)
    ends = rng.integers(math.ceil(length / 2), length, size=b)  # position of <end>
    ends[0] = length - 1
    pos = np.arange(length)[None, :]  # (1, L)
    tokens[:, 0] = Tokenizer.start_id
    tokens[pos == ends[:, None]] = Tokenizer.end_id
    tokens[pos > ends[:, None]] = Tokenizer.pad_id
    return grids, tokens


# ---- timing helpers ----------------------------------------------------------------------
def _fetch(out: Any) -> Any:
    """Copy every tensor of a nest to the host: the end of a timed call (``.numpy()``:
    ``np.asarray`` fails on a bfloat16 scalar)."""
    return tf.nest.map_structure(lambda x: x.numpy() if hasattr(x, "numpy") else np.asarray(x),
                                 out)


def _timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call, including fetching its outputs."""
    t0 = time.perf_counter()
    _fetch(fn())
    return time.perf_counter() - t0


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    return statistics.median(_timed(fn) for _ in range(max(1, repeats)))


def peak_gflop_per_s(dtype: str = "float32", seconds: float = 1.0, max_n: int = 4096,
                     seed: int = 0) -> tuple[float, int]:
    """Best GFLOP/s of an n x n x n matmul in ``dtype``; n doubles from 256 until one
    product takes >= ``seconds`` / 8 (or n = ``max_n``), then the best of about
    ``seconds`` worth of products counts. Returns (GFLOP/s, n).

    Example:
        >>> rate, n = peak_gflop_per_s("float32", seconds=0.01, max_n=256)
        >>> rate > 0, n
        (True, 256)
    """
    n = 256
    while True:
        a = tf.cast(tf.random.stateless_uniform((n, n), [seed, n]), dtype)  # (n, n)
        b = tf.cast(tf.random.stateless_uniform((n, n), [seed + 1, n]), dtype)
        _matmul_seconds(a, b)  # warm-up: kernel selection
        best = _matmul_seconds(a, b)
        if n >= max_n or best * 8 >= seconds:
            break
        n *= 2
    for _ in range(max(0, int(seconds / max(best, 1e-9)) - 1)):
        best = min(best, _matmul_seconds(a, b))
    return 2.0 * n**3 / best / 1e9, n


def _matmul_seconds(a: tf.Tensor, b: tf.Tensor) -> float:
    return _timed(lambda: tf.linalg.matmul(a, b)[0, 0])


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB (``ru_maxrss``: KiB on Linux, bytes on
    macOS), or None where the ``resource`` module does not exist (Windows).

    Example:
        >>> rss = peak_rss_mb()
        >>> rss is None or rss > 1.0
        True
    """
    if resource is None:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0**2 if sys.platform == "darwin" else rss / 1024.0


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def bench_config(precision: str = "float32", learning_rate: float = 1e-3) -> Config:
    """A project :class:`~captioner.config.Config` with ``train.precision`` set, for
    :func:`~captioner.train.steps.make_optimizer` (loss scaling under ``mixed_float16``).

    Example:
        >>> bench_config("mixed_bfloat16").train.precision
        'mixed_bfloat16'
    """
    Choices().check("precision", precision)
    cfg = Config()
    cfg.train.precision = precision
    cfg.train.learning_rate = learning_rate
    cfg.train.lr_schedule = "constant"
    return cfg


def make_bench_optimizer(cfg: Config, variables: Sequence[Any]) -> keras.optimizers.Optimizer:
    """The project's optimizer, built on ``variables`` (as the Trainer does)."""
    opt = make_optimizer(cfg, total_steps=1000)
    opt.build(list(variables))
    return opt


# ---- our model -----------------------------------------------------------------------------
class NeverEndIds:
    """Special ids for decoding that never stops early: ``end_id`` is -1, which no argmax
    or top-k returns, so every timed decode runs exactly ``max_length`` steps.

    Example:
        >>> NeverEndIds.start_id, NeverEndIds.end_id, NeverEndIds.pad_id
        (1, -1, 0)
    """

    start_id = Tokenizer.start_id
    end_id = -1
    pad_id = Tokenizer.pad_id


def build_ours(s: BenchShapes, precision: str = "float32", dropout: float | None = None,
               attend: str = "before", seed: int = 0, attention_kernel: str = "auto") -> Any:
    """Our CaptionModel for grids (B, G, C), weights built; ``dropout`` defaults to the
    project's ModelConfig default.

    The backbone (never run on grids) is a frozen one-stage 1x1 ``small_cnn`` with C
    filters at 2 * side pixels: it only fixes the grid (side x side) and C cheaply.

    Example:
        >>> m = build_ours(BenchShapes(batch_size=2, grid=4, feature_dim=8, embedding_dim=4,
        ...                            units=6, vocab_size=10, max_length=4))
        >>> (m.grid_size, m.feature_dim, len(m.backbone.trainable_weights))
        (4, 8, 0)
    """
    keras.utils.set_random_seed(seed)
    defaults = ModelConfig()
    model = CaptionModel(
        vocab_size=s.vocab_size, image_size=2 * s.side, backbone="small_cnn",
        trainable="frozen", cnn_filters=[s.feature_dim], cnn_kernels=[1, 1],
        embedding_dim=s.embedding_dim, units=s.units, attention=defaults.attention,
        attention_units=int(s.attention_units),
        dropout=defaults.dropout if dropout is None else dropout,
        init_state=defaults.init_state, positional=defaults.positional, attend=attend,
        attention_kernel=attention_kernel, dtype=keras.DTypePolicy(precision))
    model((tf.zeros((1, s.grid, s.feature_dim)), tf.ones((1, 2), "int32")))  # builds encoder
    return model


def ours_train_fn(model: Any, cfg: Config) -> tuple[TrainFn, keras.optimizers.Optimizer]:
    """Our compiled train step as ``(grids, tokens) -> loss`` (teacher forcing)."""
    opt = make_bench_optimizer(cfg, model.trainable_variables)
    step = make_train_step(model, opt, Tokenizer.pad_id, cfg.train.attention_reg)
    prob, seed = tf.constant(0.0), tf.constant([0, 0], tf.int32)

    def train(grids: tf.Tensor, tokens: tf.Tensor) -> tf.Tensor:
        return step(grids, tokens, prob, seed)["loss"]

    return train, opt


def ours_decoders(model: Any) -> dict[str, Callable[[tf.Tensor, int], Any]]:
    """Compiled greedy and beam-3 decoding from grids: ``fn(grids, max_length) -> dict``."""
    out = {}
    for name, options in (("greedy", DecodeOptions("greedy")),
                          ("beam3", DecodeOptions("beam", beam_size=3))):
        gen = make_generate_function(model, NeverEndIds, options, grids=True)  # type: ignore[arg-type]

        def decode(grids: tf.Tensor, max_length: int, gen=gen) -> Any:
            return gen(grids, tf.constant(max_length, tf.int32), tf.constant([0, 0], tf.int32))

        out[name] = decode
    return out


# ---- the classic tutorial, copied --------------------------------------------------------
class BahdanauAttention(keras.Model):
    """The tutorial's attention: ``W1(features)`` is recomputed at EVERY call (step).

    Example:
        >>> att = BahdanauAttention(4)
        >>> ctx, w = att(tf.ones((2, 9, 3)), tf.ones((2, 5)))
        >>> ctx.shape, w.shape
        (TensorShape([2, 3]), TensorShape([2, 9, 1]))
    """

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        pol = self.dtype_policy
        self.W1 = keras.layers.Dense(units, dtype=pol)
        self.W2 = keras.layers.Dense(units, dtype=pol)
        self.V = keras.layers.Dense(1, dtype=pol)

    def call(self, features: tf.Tensor, hidden: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        hidden_with_time_axis = tf.expand_dims(hidden, 1)  # (B, 1, U)
        attention_hidden_layer = tf.nn.tanh(
            self.W1(features) + self.W2(hidden_with_time_axis))  # (B, G, A)
        score = self.V(attention_hidden_layer)  # (B, G, 1)
        attention_weights = tf.nn.softmax(score, axis=1)  # (B, G, 1)
        context_vector = tf.reduce_sum(attention_weights * features, axis=1)  # (B, E)
        return context_vector, attention_weights


class CNNEncoder(keras.Model):
    """The tutorial's ``CNN_Encoder``: Dense(E) + ReLU over the cached grid (B, G, C)."""

    def __init__(self, embedding_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.fc = keras.layers.Dense(embedding_dim, dtype=self.dtype_policy)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.relu(self.fc(x))  # (B, G, E)


class RNNDecoder(keras.Model):
    """The tutorial's ``RNN_Decoder``: one step per call on (B, 1) previous ids.

    ``GRU(return_sequences=True, return_state=True)`` runs on the length-1 sequence
    [context; embedding] WITHOUT an initial state (so it always starts from zeros); the
    previous hidden only enters the attention query, as in the tutorial. Then fc1 (no
    activation) and fc2 give the step's logits (B, V).

    Example:
        >>> dec = RNNDecoder(embedding_dim=4, units=6, vocab_size=10)
        >>> logits, state, w = dec(tf.ones((2, 1), "int32"), tf.ones((2, 9, 4)),
        ...                        dec.reset_state(2))
        >>> logits.shape, state.shape, w.shape
        (TensorShape([2, 10]), TensorShape([2, 6]), TensorShape([2, 9, 1]))
    """

    def __init__(self, embedding_dim: int, units: int, vocab_size: int,
                 attention_units: int | None = None, **kwargs):
        super().__init__(**kwargs)
        pol = self.dtype_policy
        self.units = units
        self.embedding = keras.layers.Embedding(vocab_size, embedding_dim, dtype=pol)
        self.gru = keras.layers.GRU(units, return_sequences=True, return_state=True,
                                    recurrent_initializer="glorot_uniform", dtype=pol)
        self.fc1 = keras.layers.Dense(units, dtype=pol)
        self.fc2 = keras.layers.Dense(vocab_size, dtype=pol)
        self.attention = BahdanauAttention(attention_units or units, dtype=pol)

    def call(self, x: tf.Tensor, features: tf.Tensor, hidden: tf.Tensor
             ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        context_vector, attention_weights = self.attention(features, hidden)  # (B,E), (B,G,1)
        x = self.embedding(x)  # (B, 1, E)
        x = tf.concat([tf.expand_dims(context_vector, 1), tf.cast(x, context_vector.dtype)],
                      axis=-1)  # (B, 1, 2E)
        output, state = self.gru(x)  # (B, 1, U), (B, U)
        x = self.fc1(output)  # (B, 1, U)
        x = tf.reshape(x, (-1, x.shape[2]))  # (B, U)
        x = self.fc2(x)  # (B, V)
        return x, state, attention_weights

    def reset_state(self, batch_size: int) -> tf.Tensor:
        return tf.zeros((batch_size, self.units))


def build_classic(s: BenchShapes, precision: str = "float32", seed: int = 0
                  ) -> tuple[CNNEncoder, RNNDecoder]:
    """The tutorial's encoder and decoder for grids (B, G, C), weights built.

    Example:
        >>> enc, dec = build_classic(BenchShapes(batch_size=2, grid=4, feature_dim=8,
        ...                                      embedding_dim=4, units=6, vocab_size=10))
        >>> len(enc.trainable_variables), len(dec.trainable_variables)
        (2, 14)
    """
    keras.utils.set_random_seed(seed)
    pol = keras.DTypePolicy(precision)
    encoder = CNNEncoder(s.embedding_dim, dtype=pol)
    decoder = RNNDecoder(s.embedding_dim, s.units, s.vocab_size, s.attention_units, dtype=pol)
    features = encoder(tf.zeros((1, s.grid, s.feature_dim)))
    decoder(tf.ones((1, 1), "int32"), features, decoder.reset_state(1))
    return encoder, decoder


def classic_loss(real: tf.Tensor, pred: tf.Tensor, pad_id: int = Tokenizer.pad_id) -> tf.Tensor:
    """The tutorial's ``loss_function``: per-row cross-entropy, padding zeroed, then the
    mean over ALL rows (padded ones included).

    Example:
        >>> float(classic_loss(tf.constant([1, 0]), tf.zeros((2, 4))))  # log(4) / 2
        0.6931...
    """
    mask = tf.math.logical_not(tf.math.equal(real, pad_id))
    loss_ = keras.losses.sparse_categorical_crossentropy(real, tf.cast(pred, "float32"),
                                                         from_logits=True)  # (B,)
    loss_ *= tf.cast(mask, loss_.dtype)
    return tf.reduce_mean(loss_)


def make_classic_train_step(encoder: CNNEncoder, decoder: RNNDecoder,
                            optimizer: keras.optimizers.Optimizer,
                            start_id: int = Tokenizer.start_id) -> TrainFn:
    """The tutorial's ``train_step``: a Python ``for`` over the steps, unrolled in ONE
    ``tf.function`` (traced per target shape), teacher forcing, ``loss_function`` per step.

    Returns ``total_loss`` (the summed step losses over L); gradients are taken of the
    summed loss, as in the tutorial (scaled under ``mixed_float16``).
    """
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    variables = encoder.trainable_variables + decoder.trainable_variables

    @tf.function
    def train_step(img_tensor: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
        loss = 0.0
        hidden = decoder.reset_state(batch_size=target.shape[0])  # (B, U)
        dec_input = tf.expand_dims([start_id] * target.shape[0], 1)  # (B, 1)
        with tf.GradientTape() as tape:
            features = encoder(img_tensor)  # (B, G, E)
            for i in range(1, target.shape[1]):
                predictions, hidden, _ = decoder(dec_input, features, hidden)  # (B, V)
                loss += classic_loss(target[:, i], predictions)
                dec_input = tf.expand_dims(target[:, i], 1)  # teacher forcing
            scaled = optimizer.scale_loss(loss) if loss_scaled else loss
        total_loss = loss / int(target.shape[1])
        gradients = tape.gradient(scaled, variables)
        optimizer.apply_gradients(zip(gradients, variables))
        return total_loss

    return train_step


@dataclass
class ClassicDecode:
    """Result of :func:`classic_evaluate` for one image."""

    tokens: list[int]
    attention: np.ndarray  # (len(tokens), G)
    host_syncs: int


def to_host(*tensors: tf.Tensor) -> list[np.ndarray]:
    """One host round trip for a step's outputs (``.numpy()`` of each)."""
    return [t.numpy() for t in tensors]


def classic_evaluate(encoder: CNNEncoder, decoder: RNNDecoder, grid: np.ndarray | tf.Tensor,
                     max_length: int, start_id: int = Tokenizer.start_id,
                     end_id: int = Tokenizer.end_id,
                     fetch: Callable[..., list[np.ndarray]] = to_host) -> ClassicDecode:
    """The tutorial's ``evaluate``, greedy: EAGER, one image (grid (G, C)), one decoder
    call per step and one host sync per step (``fetch`` of the logits and attention,
    argmax on the host), stopping at ``end_id``.

    The tutorial fetches the attention and the id with two ``.numpy()`` calls; here they
    share one fetch. It samples with ``tf.random.categorical`` in its latest version; an
    argmax (as in its earlier version) keeps the comparison with greedy decoding fair.

    Example:
        >>> s = BenchShapes(batch_size=1, grid=4, feature_dim=8, embedding_dim=4, units=6,
        ...                 vocab_size=10)
        >>> enc, dec = build_classic(s)
        >>> out = classic_evaluate(enc, dec, np.ones((4, 8), np.float32), 3, end_id=-1)
        >>> len(out.tokens), out.attention.shape, out.host_syncs
        (3, (3, 4), 3)
    """
    grid = tf.convert_to_tensor(grid)
    attention_plot = np.zeros((max_length, int(grid.shape[0])), np.float32)  # (L, G)
    hidden = decoder.reset_state(batch_size=1)  # (1, U)
    features = encoder(tf.expand_dims(grid, 0))  # (1, G, E)
    dec_input = tf.expand_dims([start_id], 0)  # (1, 1)
    result: list[int] = []
    syncs = 0
    for i in range(max_length):
        predictions, hidden, attention_weights = decoder(dec_input, features, hidden)
        logits, weights = fetch(predictions, attention_weights)  # host sync
        syncs += 1
        attention_plot[i] = np.reshape(weights, (-1,))
        predicted_id = int(np.argmax(logits[0]))
        result.append(predicted_id)
        if predicted_id == end_id:
            break
        dec_input = tf.expand_dims([predicted_id], 0)
    return ClassicDecode(result, attention_plot[:len(result)], syncs)


# ---- measurements ------------------------------------------------------------------------
@dataclass
class TrainTiming:
    compile_s: float
    step_s: float
    first_loss: float
    last_loss: float


def time_train(train: TrainFn, grids: tf.Tensor, tokens: tf.Tensor, steps: int,
               warmup: int = 1) -> TrainTiming:
    """First call (trace + compile + one step), ``warmup`` untimed steps, then the mean
    step time over ``steps`` steps (synced once at the end)."""
    t0 = time.perf_counter()
    first = float(train(grids, tokens))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        train(grids, tokens)
    t0 = time.perf_counter()
    loss = None
    for _ in range(max(1, steps)):
        loss = train(grids, tokens)
    last = float(loss)
    return TrainTiming(compile_s, (time.perf_counter() - t0) / max(1, steps), first, last)


def time_ours_decoding(model: Any, grids: tf.Tensor, max_length: int, repeats: int
                       ) -> dict[str, Any]:
    """Greedy and beam-3 images/s over one batch (median of ``repeats`` calls after a
    compiling call), plus their compile times and the number of steps run."""
    out: dict[str, Any] = {}
    batch = int(grids.shape[0])
    for name, decode in ours_decoders(model).items():
        t0 = time.perf_counter()
        result = _fetch(decode(grids, max_length))
        out[f"{name}_compile_s"] = time.perf_counter() - t0
        out[f"{name}_steps"] = int(result["tokens"].shape[-1])
        seconds = _median_seconds(lambda decode=decode: decode(grids, max_length), repeats)
        out[f"{name}_images_per_s"] = batch / seconds
    return out


def time_classic_decoding(encoder: CNNEncoder, decoder: RNNDecoder, grids: np.ndarray,
                          max_length: int, images: int) -> dict[str, Any]:
    """Eager greedy images/s over ``images`` images, one at a time (after a 2-step
    warm-up); beam search does not exist in the tutorial (None)."""
    classic_evaluate(encoder, decoder, grids[0], min(2, max_length), end_id=NeverEndIds.end_id)
    n = max(1, min(images, len(grids)))
    t0 = time.perf_counter()
    steps = [len(classic_evaluate(encoder, decoder, grids[i], max_length,
                                  end_id=NeverEndIds.end_id).tokens) for i in range(n)]
    seconds = time.perf_counter() - t0
    return {"greedy_images_per_s": n / seconds, "greedy_steps": max(steps),
            "greedy_images_measured": n, "greedy_compile_s": 0.0,
            "beam3_images_per_s": None, "beam3_steps": None, "beam3_compile_s": None}


def _prepare(impl: str, s: BenchShapes, cfg: Config, attend: str, seed: int,
             attention_kernel: str = "auto") -> tuple[TrainFn, Any]:
    """The train function and the model (ours) or (encoder, decoder) (classic)."""
    if impl == "captioner":
        model = build_ours(s, cfg.train.precision, attend=attend, seed=seed,
                           attention_kernel=attention_kernel)
        train, _ = ours_train_fn(model, cfg)
        return train, model
    encoder, decoder = build_classic(s, cfg.train.precision, seed=seed)
    opt = make_bench_optimizer(cfg, encoder.trainable_variables + decoder.trainable_variables)
    return make_classic_train_step(encoder, decoder, opt), (encoder, decoder)


def run_bench(batch_size: int = 64, grid: int = 49, feature_dim: int = 1280,
              embedding_dim: int = 256, units: int = 512, vocab_size: int = 5000,
              max_length: int = 50, steps: int = 20, precision: str = "float32",
              impl: str = "captioner", end_to_end: bool = False,
              attention_units: int | None = None, seed: int = 0, *,
              attend: str = "before", attention_kernel: str = "auto", decode_repeats: int = 2,
              classic_decode_images: int = 2, peak_seconds: float = 1.0,
              e2e_backbones: Sequence[str] = ("small_cnn", "efficientnet_b0"),
              ) -> dict[str, Any]:
    """Train and decode on random grids; returns a JSON-ready dict (prints nothing).

    Keys: the config echoed back (``impl``, ``precision``, shapes, ``steps``, ``attend``,
    ``attention_kernel``: the one that ran, ``fused`` or ``tensorflow``,
    :mod:`captioner.model.kernels`),
    ``train_images_per_s`` (mean over ``steps`` steps after the compiling call and one
    warm-up step), ``train_step_s``, ``compile_s`` (wall time of the FIRST train step
    call: tracing + compile + one step), ``loss_first``/``loss_last``,
    ``greedy_images_per_s`` and ``beam3_images_per_s`` (one batch, the median of
    ``decode_repeats`` calls after compiling, with an ``<end>`` id that is never chosen
    so every decode runs the full ``max_length`` steps, reported as ``greedy_steps``;
    classic: eager greedy over ``classic_decode_images`` images one by one and beam3
    None), ``real_token_fraction`` (N / (T * B): the share of target positions that are
    not padding, :func:`real_positions`), ``train_gflop_per_step`` (necessary FLOPs over
    the N real positions, :func:`train_step_flops`), ``redundant_gflop_per_step``
    (:func:`redundant_flops`), ``train_gflop_per_s``,
    ``peak_gflop_per_s`` (a square matmul sized to ~``peak_seconds``, in float32 or the
    policy's compute dtype, see :func:`peak_gflop_per_s`), ``roofline_fraction`` =
    train_gflop_per_s / peak_gflop_per_s, ``peak_rss_mb`` and ``load_average`` (1-min,
    at the start: other work on the machine depresses every number; both None where the
    OS does not report them).
    With ``end_to_end`` an ``end_to_end`` dict from :func:`end_to_end_stages` is added.

    Example:
        >>> run_bench(steps=5, impl="classic")["greedy_images_per_s"]  # doctest: +SKIP
        1.5
    """
    Choices().check("bench_impl", impl, "impl")
    s = BenchShapes(batch_size, grid, feature_dim, embedding_dim, units, attention_units,
                    vocab_size, max_length)
    precision = resolve_precision(precision)  # "auto": this machine's choice
    cfg = bench_config(precision)
    load = load_average()
    grids_np, tokens_np = random_batch(s, seed)
    grids, tokens = tf.constant(grids_np), tf.constant(tokens_np)
    train, model = _prepare(impl, s, cfg, attend, seed, attention_kernel)
    fused = impl == "captioner" and model.decoder.recurrence.kernel is not None
    timing = time_train(train, grids, tokens, steps)
    if impl == "captioner":
        decoding = time_ours_decoding(model, grids, max_length, decode_repeats)
    else:
        decoding = time_classic_decoding(*model, grids_np, max_length, classic_decode_images)
    compute_dtype = keras.DTypePolicy(precision).compute_dtype
    peak, peak_n = peak_gflop_per_s(compute_dtype, peak_seconds)
    flop_attend = attend if impl == "captioner" else "before"
    positions = real_positions(tokens_np)
    flops = train_step_flops(s, flop_attend, positions)
    gflop_s = flops / timing.step_s / 1e9
    result = {
        "impl": impl, "precision": precision, "attend": attend if impl == "captioner" else
        "before (tutorial: GRU without state)",
        "attention_kernel": "fused" if fused else "tensorflow", **asdict(s),
        "decoder_steps": s.steps,
        "steps": steps, "seed": seed, "load_average": load, "cpu_count": os.cpu_count(),
        "train_images_per_s": batch_size / timing.step_s, "train_step_s": timing.step_s,
        "compile_s": timing.compile_s, "loss_first": timing.first_loss,
        "loss_last": timing.last_loss, **decoding,
        "real_token_fraction": positions / (s.steps * batch_size),
        "train_gflop_per_step": flops / 1e9,
        "redundant_gflop_per_step": redundant_flops(s, impl, positions, flop_attend) / 1e9,
        "train_gflop_per_s": gflop_s, "peak_gflop_per_s": peak, "peak_matmul_n": peak_n,
        "peak_dtype": compute_dtype, "roofline_fraction": gflop_s / peak,
    }
    if end_to_end:
        result["end_to_end"] = end_to_end_stages(s, precision, result["train_images_per_s"],
                                                 e2e_backbones, steps=steps, seed=seed)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


# ---- end to end: images, backbone, feature cache, train step --------------------------
def write_images(folder: Path, n: int, size: int, seed: int = 0) -> list[str]:
    """``n`` smooth random images of (size, 1.5 size), alternately JPEG and PNG, so the
    loader decodes both formats and resizes.

    Example:
        >>> import tempfile
        >>> paths = write_images(Path(tempfile.mkdtemp()), 2, 16)
        >>> [Path(p).suffix for p in paths]
        ['.jpg', '.png']
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size * 3 // 2, size), Image.Resampling.BICUBIC)
        path = folder / f"image_{i:05d}.{'jpg' if i % 2 == 0 else 'png'}"
        image.save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
        paths.append(str(path))
    return paths


def backbone_encoder(name: str, s: BenchShapes, image_size: int, precision: str
                     ) -> tuple[Callable[[Any], tf.Tensor], tuple[int, int]]:
    """A frozen, randomly initialised backbone as a compiled
    ``uint8 (B, S, S, 3) -> float32 (B, G', C')`` function, and its (G', C').

    ``small_cnn`` uses the project's default filters with the last stage set to C, so at
    32 * side pixels its grid is exactly (G, C); ``efficientnet_b0`` gives 1280 channels.
    """
    filters = [32, 64, 128, 256, s.feature_dim]
    net = build_backbone(name, image_size, None, "frozen", cnn_filters=filters,
                         dtype=keras.DTypePolicy(precision))
    gh, gw = net.grid_hw(image_size)
    channels = int(net.feature_dim)

    @tf.function(input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.uint8)])
    def encode(images: tf.Tensor) -> tf.Tensor:
        x = tf.cast(net.preprocess(images), net.compute_dtype)
        grid = net(x, training=False)  # (B, gh, gw, C')
        return tf.cast(tf.reshape(grid, (tf.shape(grid)[0], gh * gw, channels)), "float32")

    return encode, (gh * gw, channels)


def decode_rate(paths: Sequence[str], size: int) -> tuple[float, np.ndarray]:
    """Images/s of ``captioner.data.images.load_image`` (decode + resize, one thread) and the
    decoded images (N, S, S, 3) uint8."""
    t0 = time.perf_counter()
    images = np.stack([load_image(p, size) for p in paths])
    return len(paths) / (time.perf_counter() - t0), images


def _slowest(stages: dict[str, float], names: Sequence[str] | None = None) -> str:
    names = list(stages) if names is None else list(names)
    return min(names, key=lambda k: stages[k])


def end_to_end_stages(s: BenchShapes, precision: str, train_images_per_s: float,
                      backbones: Sequence[str] = ("small_cnn", "efficientnet_b0"),
                      n_images: int | None = None, captions_per_image: int = 5,
                      steps: int = 10, repeats: int = 2, seed: int = 0) -> dict[str, Any]:
    """Images/s of each stage that can feed the train step, and the slowest one.

    ``stage_images_per_s``: ``decode`` (``load_image`` on generated JPEG/PNG files at
    32 * side pixels, one thread), ``backbone_<name>`` (forward pass of one batch of B,
    frozen, random weights; a trainable backbone costs about 3x in training),
    ``feature_cache`` (``FeatureCache.pair_dataset`` streamed from the shards, no model
    compute; ``cache_memory_images_per_s`` is the in-memory variant) and ``train_step``
    (the train step from grids). ``bound_by`` is the slowest stage of all: the bound
    when training from images with the backbone in the step (images are decoded once
    per run, so ``decode`` only bounds a pipeline that decodes every epoch);
    ``bound_by_cached`` compares only ``feature_cache`` and ``train_step``, the two
    stages in the loop when training from a feature cache. The cache is extracted by the
    first of ``backbones`` (``extract_images_per_s``: decode + backbone + write).

    Example:
        >>> s = BenchShapes(batch_size=4, grid=9, feature_dim=16)
        >>> r = end_to_end_stages(s, "float32", 1e3, ["small_cnn"], steps=2)  # doctest: +SKIP
        >>> r["bound_by"] in r["stage_images_per_s"]                          # doctest: +SKIP
        True
    """
    size = 32 * s.side
    n = n_images or max(s.batch_size, 8)
    stages: dict[str, float] = {}
    grids: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="captioner-bench-") as tmp:
        paths = write_images(Path(tmp) / "images", n, size, seed)
        stages["decode"], images = decode_rate(paths, size)
        batch = tf.constant(images[:s.batch_size])  # (B, S, S, 3) uint8
        encoders = {}
        for name in backbones:
            encode, shape = backbone_encoder(name, s, size, precision)
            grids[name] = list(shape)
            encoders[name] = encode
            _fetch(encode(batch))  # compile
            stages[f"backbone_{name}"] = len(batch) / _median_seconds(lambda e=encode: e(batch),
                                                                       repeats)
        summary = extract_features(paths, encoders[backbones[0]], Path(tmp) / "cache",
                                   {"bench": backbones[0], "precision": precision}, size,
                                   batch_size=s.batch_size, shard_size=max(1, n // 2),
                                   workers=2, progress=False)
        cache = FeatureCache(Path(tmp) / "cache").open()
        pair_paths = [p for p in cache.paths for _ in range(captions_per_image)]
        _, tokens = random_batch(BenchShapes(batch_size=len(pair_paths), grid=1, feature_dim=1,
                                             vocab_size=s.vocab_size,
                                             max_length=s.max_length), seed)
        rates = benchmark_input(cache, pair_paths, tokens, s.batch_size, max(2, steps), seed)
    stages["feature_cache"] = rates["stream_images_per_s"]
    stages["train_step"] = train_images_per_s
    return {"stage_images_per_s": stages, "bound_by": _slowest(stages),
            "bound_by_cached": _slowest(stages, ["feature_cache", "train_step"]),
            "cache_memory_images_per_s": rates["memory_images_per_s"],
            "extract_images_per_s": summary.images_per_s, "image_size": size,
            "backbone_grids": grids, "images": n, "pairs": len(pair_paths)}


# ---- a config's whole train step, from pictures ------------------------------------------
def config_bench(cfg: Config, steps: int = 20, vocab_size: int = 40, seed: int = 0,
                 smiles: Sequence[str] = ()) -> dict[str, Any]:
    """Images/s of ``cfg``'s whole train step and, with ``smiles``, of its drawing.

    The model is ``cfg.model`` in ``train.precision`` with its backbone in the step, built
    and compiled as the Trainer does (:func:`~captioner.train.setup.build_model_and_optimizers`,
    :func:`~captioner.train.steps.make_train_step`), trained ``steps`` times on one random
    batch of ``train.batch_size`` uint8 pictures at ``model.image_size`` with random targets
    of ``data.max_length`` tokens (:func:`random_batch`) over ``vocab_size`` ids.
    ``smiles`` (``data.format: smiles``): two batches of them drawn in ``data.drawing``
    styles in this process (:func:`~captioner.data.drawing.draw_batch`), so
    ``bound_by`` says whether drawing or the step limits training when they share a core.

    Example:
        >>> from captioner.config import load_config
        >>> cfg = load_config("shapes", ["model.image_size=32", "model.cnn_filters=[8]",
        ...                              "model.units=8", "model.embedding_dim=8",
        ...                              "model.attention_units=8", "train.batch_size=4"])
        >>> r = config_bench(cfg, steps=1)
        >>> r["grid"], r["batch_size"], r["drawn_pictures_per_s"] is None
        (256, 4, True)
    """
    t = cfg.train
    b, size = t.batch_size, cfg.model.image_size
    keras.utils.set_random_seed(seed)
    objs = build_model_and_optimizers(tf.distribute.get_strategy(), cfg, vocab_size, 1000)
    step = make_train_step(objs.model, objs.optimizer, Tokenizer.pad_id, t.attention_reg,
                           backbone_optimizer=objs.backbone_optimizer)
    prob, step_seed = tf.constant(0.0), tf.constant([seed, 0], tf.int32)
    images = tf.constant(np.random.default_rng(seed).integers(
        0, 256, (b, size, size, 3), dtype=np.uint8))  # (B, S, S, 3)
    _, tokens = random_batch(BenchShapes(batch_size=b, grid=1, feature_dim=1,
                                         vocab_size=vocab_size,
                                         max_length=cfg.data.max_length), seed)

    def train(inputs: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        return step(inputs, targets, prob, step_seed)["loss"]

    timing = time_train(train, images, tf.constant(tokens), steps)
    rates = {"train_step": b / timing.step_s}
    if smiles:
        rates["drawing"] = _drawing_rate(list(smiles), b, size, cfg, seed)
    return {"image_size": size, "batch_size": b, "grid": objs.model.grid_size,
            "precision": resolve_precision(t.precision), "vocab_size": vocab_size,
            "train_step_ms": 1e3 * timing.step_s, "train_images_per_s": rates["train_step"],
            "drawn_pictures_per_s": rates.get("drawing"), "bound_by": _slowest(rates),
            "compile_s": timing.compile_s, "steps": steps,
            "first_loss": timing.first_loss, "last_loss": timing.last_loss,
            "load_average": load_average()}


def _drawing_rate(smiles: list[str], batch_size: int, size: int, cfg: Config, seed: int
                  ) -> float:
    """Pictures/s of :func:`~captioner.data.drawing.draw_batch` over two batches (after
    one untimed batch: fonts and toolkits load on first use)."""
    items = [(smiles[i % len(smiles)], example_seed(seed, i)) for i in range(3 * batch_size)]
    draw_batch(items[:batch_size], size, cfg.data.drawing)
    started = time.perf_counter()
    draw_batch(items[batch_size:], size, cfg.data.drawing)
    return 2 * batch_size / (time.perf_counter() - started)


# ---- command-line glue (the CLI prints the returned dict as one JSON line) ----------------
def bench_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`run_bench` with the flags of :func:`captioner.cli.add_bench_arguments`
    (defined there, so ``captioner bench --help`` needs no TensorFlow), or
    :func:`config_bench` with ``--config`` (and ``--set``): molecules to draw are the first
    ones of the config's ``data.path`` when its ``data.format`` is ``smiles``."""
    vocab = {"vocab_size": args.vocab_size} if args.vocab_size else {}  # else each default
    if args.config:
        cfg = load_config(args.config, args.overrides)
        smiles: list[str] = []
        if cfg.data.format == "smiles":
            rows = read_smiles_csv(cfg.data.path, cfg.data.text_column,
                                   limit=4 * cfg.train.batch_size)
            smiles = [s for _, _, s in rows if s]
            if not smiles:
                raise ValueError(f"{cfg.data.path}: no SMILES to draw in column "
                                 f"{cfg.data.text_column!r}")
        return {"config": str(args.config), "overrides": list(args.overrides),
                **config_bench(cfg, args.steps, seed=args.seed, smiles=smiles, **vocab)}
    return run_bench(batch_size=args.batch_size, grid=args.grid, feature_dim=args.feature_dim,
                     embedding_dim=args.embedding_dim, units=args.units,
                     max_length=args.max_length, steps=args.steps,
                     precision=args.precision, impl=args.impl, end_to_end=args.end_to_end,
                     attention_units=args.attention_units, seed=args.seed, attend=args.attend,
                     attention_kernel=args.attention_kernel,
                     classic_decode_images=args.classic_decode_images, **vocab)
