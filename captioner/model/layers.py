"""The Show, Attend and Tell model: CNN backbone, dense encoder, GRU + attention decoder.

Shapes used in comments: B images, S image side, G grid cells, C backbone channels,
E embedding_dim, U GRU units, A attention units, T time steps, V vocabulary size.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from captioner.choices import Choices
from captioner.config import ModelConfig
from captioner.model.backbones import build_backbone
from captioner.model.recurrence import (
    Recurrence,
    StepWeights,
    _cast,
)


class FeatureEncoder(keras.layers.Layer):
    """Projects every grid cell: dropout -> Dense(E) (+ learned cell position) -> ReLU.

    Example:
        >>> enc = FeatureEncoder(embedding_dim=16, grid_size=49)
        >>> enc(tf.zeros((2, 49, 32))).shape
        TensorShape([2, 49, 16])
    """

    def __init__(self, embedding_dim: int = 256, grid_size: int = 49, dropout: float = 0.0,
                 positional: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.embedding_dim = embedding_dim
        self.grid_size = grid_size
        self.dropout_rate = dropout
        self.positional = positional
        self.dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self.dense = keras.layers.Dense(embedding_dim, name="proj", dtype=self.dtype_policy)

    def build(self, input_shape: Any) -> None:
        self.dense.build(input_shape)
        self.position = self.add_weight(
            name="position", shape=(self.grid_size, self.embedding_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        ) if self.positional else None

    def call(self, grid: tf.Tensor, training: bool = False) -> tf.Tensor:
        x = self.dense(self.dropout(grid, training=training))  # (B, G, E)
        if self.position is not None:
            x = x + _cast(self.position, x.dtype)[None]
        return tf.nn.relu(x)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "embedding_dim": self.embedding_dim,
                "grid_size": self.grid_size, "dropout": self.dropout_rate,
                "positional": self.positional}


class GridAttention(keras.layers.Layer):
    """Attention over grid cells with ``additive`` (Bahdanau), ``dot`` or ``general`` scores.

    ``keys(features)`` depends only on the image, so callers compute it once per image
    and reuse it at every step; ``weights(keys, hidden)`` is the per-step part.

    Example:
        >>> att = GridAttention("additive", units=8)
        >>> feats, h = tf.ones((2, 49, 16)), tf.ones((2, 12))
        >>> att.build(feats.shape, h.shape)
        >>> att.weights_for(att.keys(feats), h).shape
        TensorShape([2, 49])
    """

    def __init__(self, kind: str = "additive", units: int = 512, **kwargs):
        super().__init__(**kwargs)
        Choices().check("attention", kind)
        self.kind = kind
        self.units = units

    def build(self, features_shape: Any, hidden_shape: Any = None) -> None:
        feat_dim = int(features_shape[-1])
        hidden_dim = int(hidden_shape[-1]) if hidden_shape is not None else feat_dim
        if self.kind == "additive":
            self.w1 = keras.layers.Dense(self.units, name="W1", dtype=self.dtype_policy)
            self.w2 = keras.layers.Dense(self.units, use_bias=False, name="W2",
                                         dtype=self.dtype_policy)
            self.v = keras.layers.Dense(1, name="V", dtype=self.dtype_policy)
            self.w1.build((None, feat_dim))
            self.w2.build((None, hidden_dim))
            self.v.build((None, self.units))
        elif self.kind == "general":
            self.wg = keras.layers.Dense(hidden_dim, use_bias=False, name="W",
                                         dtype=self.dtype_policy)
            self.wg.build((None, feat_dim))
        elif feat_dim != hidden_dim:
            raise ValueError(
                f"dot attention needs feature dim ({feat_dim}) == hidden ({hidden_dim})")
        self.built = True

    def keys(self, features: tf.Tensor) -> tf.Tensor:
        """Per-image part of the score, computed once: (B, G, E) -> (B, G, A|U)."""
        if self.kind == "additive":
            return self.w1(features)  # (B, G, A)
        if self.kind == "general":
            return self.wg(features)  # (B, G, U)
        return features  # (B, G, U)

    def weights_for(self, keys: tf.Tensor, hidden: tf.Tensor) -> tf.Tensor:
        """Softmax attention over cells: hidden (B, U) -> (B, G), or for all steps at
        once hidden (B, T, U) -> (B, T, G); float32."""
        steps = hidden.shape.rank == 3
        if self.kind == "additive":
            query = self.w2(hidden)  # (B, A) or (B, T, A)
            if steps:
                query, keys = query[:, :, None, :], keys[:, None, :, :]  # (B,T,1,A), (B,1,G,A)
            else:
                query = query[:, None, :]  # (B, 1, A)
            th = tf.tanh(keys + _cast(query, keys.dtype))  # (B, G, A) or (B, T, G, A)
            scores = tf.squeeze(self.v(th), -1)  # (B, G) or (B, T, G)
        else:
            pattern = "bgu,btu->btg" if steps else "bgu,bu->bg"
            scores = tf.einsum(pattern, keys, _cast(hidden, keys.dtype))
        return tf.nn.softmax(tf.cast(scores, "float32"), axis=-1)

    def call(self, features: tf.Tensor, hidden: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        alpha = self.weights_for(self.keys(features), hidden)  # (B, G)
        context = tf.einsum("bg,bge->be", _cast(alpha, features.dtype), features)  # (B, E)
        return context, alpha

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "kind": self.kind, "units": self.units}


class AttentionDecoder(keras.layers.Layer):
    """GRU decoder with attention; the GRU state is carried from step to step.

    ``attend="before"`` (Show, Attend and Tell, the default), step t:
    alpha_t = attention(keys, h_{t-1}); context_t = sum_g alpha_tg * features_g;
    h_t = GRU([embed(y_{t-1}); context_t], h_{t-1}); logits_t = Dense(V)(dropout(Dense(U)(h_t))).

    ``attend="after"`` (the spatial attention of Lu et al. 2017, "Knowing When to Look"):
    h_t = GRU(embed(y_{t-1}), h_{t-1}); alpha_t = attention(keys, h_t);
    logits_t = Dense(V)(dropout(Dense(U)([h_t; context_t]))). The state then holds only
    the words so far, so every word must look at the image when it is emitted; under
    teacher forcing the attention for all steps runs as one batched op after the loop.

    The GRU is written out (Keras ``reset_after`` form) so the embedding half of the
    input projection runs for all steps in one matmul under teacher forcing, and the
    output head runs once over all steps after the loop. The loop itself is a
    :class:`Recurrence` with a hand-written backward pass; its state is float32 under
    every policy (matmuls run in the compute dtype). ``attention_kernel`` is checked
    here but resolved on first use (the first step, unroll or :meth:`cross_entropy`):
    only then is the kernel library built or loaded, and a ``fused`` build failure
    raised.

    Example:
        >>> dec = AttentionDecoder(vocab_size=10, embedding_dim=8, units=12, attention_units=6)
        >>> dec.build((None, 49, 8))
        >>> enc = dec.prepare(tf.ones((2, 49, 8)))
        >>> logits, alpha = dec(enc, tf.ones((2, 5), "int32"))
        >>> (logits.shape, alpha.shape)
        (TensorShape([2, 5, 10]), TensorShape([2, 5, 49]))
    """

    def __init__(self, vocab_size: int, embedding_dim: int = 256, units: int = 512,
                 attention: str = "additive", attention_units: int = 512,
                 dropout: float = 0.0, init_state: str = "mean", attend: str = "before",
                 attention_kernel: str = "auto", **kwargs):
        super().__init__(**kwargs)
        Choices().check("attend", attend)
        Choices().check("attention_kernel", attention_kernel)
        self.attend = attend
        self.attention_kernel = attention_kernel
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.units = units
        self.attention_kind = attention
        self.attention_units = attention_units
        self.dropout_rate = dropout
        self.init_state = init_state
        pol = self.dtype_policy
        self.embedding = keras.layers.Embedding(vocab_size, embedding_dim, name="embedding",
                                                dtype=pol)
        self.attention = GridAttention(attention, attention_units, name="attention", dtype=pol)
        self.fc1 = keras.layers.Dense(units, activation="relu", name="fc1", dtype=pol)
        self.head_dropout = keras.layers.Dropout(dropout, dtype=pol)
        self.fc2 = keras.layers.Dense(vocab_size, name="logits", dtype=pol)
        self.init_dense = (keras.layers.Dense(units, activation="tanh", name="init_h", dtype=pol)
                           if init_state == "mean" else None)
        # the kernel choice is resolved (the library built or loaded) on first use
        self.recurrence = Recurrence(attention if attend == "before" else None,
                                     attention_units, attention_kernel)

    def build(self, features_shape: Any) -> None:
        feat_dim, u = int(features_shape[-1]), self.units
        self.embedding.build((None,))
        self.attention.build((None, None, feat_dim), (None, u))
        glorot, orth = keras.initializers.GlorotUniform(), keras.initializers.Orthogonal()
        self.kernel_emb = self.add_weight(name="gru_kernel_emb", shape=(self.embedding_dim, 3 * u),
                                          initializer=glorot)
        self.kernel_ctx = (self.add_weight(name="gru_kernel_ctx", shape=(feat_dim, 3 * u),
                                           initializer=glorot) if self.attend == "before" else None)
        self.recurrent = self.add_weight(name="gru_recurrent", shape=(u, 3 * u), initializer=orth)
        self.bias = self.add_weight(name="gru_bias", shape=(2, 3 * u), initializer="zeros")
        self.fc1.build((None, u if self.attend == "before" else u + feat_dim))
        self.fc2.build((None, u))
        if self.init_dense is not None:
            self.init_dense.build((None, feat_dim))
        self.built = True

    # ---- pieces shared by training and decoding -------------------------------------
    def prepare(self, features: tf.Tensor) -> dict[str, tf.Tensor]:
        """Per-image tensors reused at every step: features and attention keys (additive:
        float32 under every policy, as tanh(keys + q) over (B, G, A) at every step runs
        about 2x faster in float32 than in bfloat16 on a CPU)."""
        keys = self.attention.keys(features)  # (B, G, A|U)
        if self.attention_kind == "additive":
            keys = _cast(keys, "float32")
        return {"features": features, "keys": keys}

    def initial_state(self, enc: dict[str, tf.Tensor]) -> tf.Tensor:
        """The first GRU state (B, U), float32."""
        features = enc["features"]  # (B, G, E)
        if self.init_dense is None:
            return tf.zeros((tf.shape(features)[0], self.units), "float32")
        return tf.cast(self.init_dense(tf.reduce_mean(features, axis=1)), "float32")  # (B, U)

    def embed_projection(self, tokens: tf.Tensor) -> tf.Tensor:
        """Embedding half of the GRU input projection: (...,) ids -> (..., 3U) float32."""
        emb = self.embedding(tokens)  # (..., E)
        kernel = _cast(self.kernel_emb, emb.dtype)
        return tf.cast(tf.tensordot(emb, kernel, axes=1), "float32") + _cast(self.bias[0],
                                                                              "float32")

    def step_weights(self) -> StepWeights:
        """The recurrence's weights in the compute dtype; read once per call, not per step
        (pass them to :meth:`step` in a decoding loop)."""
        cd = self.compute_dtype

        def read(variable: Any) -> tf.Tensor:
            return tf.cast(tf.convert_to_tensor(variable), cd)

        hidden, ctx = read(self.recurrent), tf.zeros((0, 3 * self.units), cd)
        v, v_bias = tf.zeros((0, 1), cd), tf.zeros((1,), "float32")
        if self.attend == "before":
            ctx = read(self.kernel_ctx)
        if self.attend == "before" and self.attention_kind == "additive":
            att = self.attention
            hidden = tf.concat([read(att.w2.kernel), hidden], 1)  # (U, A + 3U) = [W2 | U_r]
            v, v_bias = read(att.v.kernel), tf.cast(tf.convert_to_tensor(att.v.bias), "float32")
        return StepWeights(hidden, _cast(self.bias[1], "float32"), ctx, v, v_bias)

    def attend_to(self, enc: dict[str, tf.Tensor], query: tf.Tensor
                  ) -> tuple[tf.Tensor, tf.Tensor]:
        """Attention for (B, U) or (B, T, U) queries -> context (.., E), alpha (.., G)."""
        alpha = self.attention.weights_for(enc["keys"], query)  # (B, G) or (B, T, G)
        pattern = "btg,bge->bte" if query.shape.rank == 3 else "bg,bge->be"
        features = enc["features"]
        return tf.einsum(pattern, _cast(alpha, features.dtype), features), alpha

    def cell(self, x_emb: tf.Tensor, h: tf.Tensor, enc: dict[str, tf.Tensor],
             weights: StepWeights | None = None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """One step: (B, 3U) projected embedding, (B, U) state -> new state (B, U),
        alpha (B, G) and the head's input (B, U) or (B, U + E)."""
        w = self.step_weights() if weights is None else weights
        h_new, alpha, _ = self.recurrence.step(tf.cast(x_emb, "float32"), h, w, enc)
        if self.attend == "after":
            context, alpha = self.attend_to(enc, h_new)
            return h_new, alpha, tf.concat([_cast(h_new, context.dtype), context], -1)
        return h_new, alpha, h_new

    def head(self, h: tf.Tensor, training: bool = False) -> tf.Tensor:
        """Output head over any leading dims: (..., U[+E]) -> (..., V) float32 logits."""
        logits = self.fc2(self.head_dropout(self.fc1(h), training=training))
        return tf.cast(logits, "float32")

    def cross_entropy(self, labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
        """Token NLLs (N,) of float32 logits (N, V): the fused kernel's when the decoder
        has one (:mod:`captioner.kernels`), else TensorFlow's sparse softmax one."""
        kernel = self.recurrence.kernel
        if kernel is None:
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        return kernel.cross_entropy(labels, logits)

    def step(self, tokens: tf.Tensor, h: tf.Tensor, enc: dict[str, tf.Tensor],
             weights: StepWeights | None = None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Inference step: (N,) previous ids -> (N, V) log-probs, (N, U) state, (N, G) alpha.

        ``weights`` (:meth:`step_weights`), when given, are reused instead of read again.
        """
        h_new, alpha, out = self.cell(self.embed_projection(tokens), h, enc, weights)
        return tf.nn.log_softmax(self.head(out)), h_new, alpha

    # ---- training ---------------------------------------------------------------------
    def call(self, enc: dict[str, tf.Tensor], tokens_in: tf.Tensor, training: bool = False,
             sampling_prob: tf.Tensor | None = None, seed: tf.Tensor | None = None,
             greedy_sampling: bool = False, logits: bool = True,
             target_mask: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """Unroll over ``tokens_in`` (B, T) -> logits (B, T, V) float32, alpha (B, T, G).

        With ``sampling_prob`` (scheduled sampling), each row's input at step t > 0 is,
        with that probability, the model's own prediction from step t - 1. With
        ``logits=False`` the head is not run: the first result is its input (B, T, U[+E])
        (the train step runs :meth:`head` on the real target positions only).

        ``target_mask`` (B, T), true where the target of a position is real (not padding),
        lets teacher forcing skip the recurrence on padded positions: a row's steps after
        its last real target are not run (its state is carried, its alpha is 0), so only
        the outputs at real positions are meaningful. Scheduled sampling ignores it.
        """
        h0 = self.initial_state(enc)
        if sampling_prob is not None:
            outs, alphas = self._scheduled(enc, tokens_in, h0, sampling_prob, seed,
                                           greedy_sampling)
        else:
            outs, alphas = self._teacher_forced(enc, tokens_in, h0, target_mask)
        if not logits:
            return outs, alphas
        return self.head(outs, training=training), alphas  # (B, T, V), (B, T, G)

    def _teacher_forced(self, enc, tokens_in, h0, target_mask=None):
        """All steps of the recurrence, then (attend="after") attention for all at once."""
        if target_mask is None:
            hs, alphas = self._unroll(enc, tokens_in, h0)
        else:
            hs, alphas = self._unroll_by_length(enc, tokens_in, h0, target_mask)
        if self.attend == "before":
            return hs, alphas  # (B, T, U), (B, T, G)
        context, alphas = self.attend_to(enc, hs)  # (B, T, E), (B, T, G)
        return tf.concat([_cast(hs, context.dtype), context], -1), alphas

    def _unroll(self, enc, tokens_in, h0, counts=None):
        """The recurrence over all steps: (B, T) ids -> states (B, T, U), alphas (B, T, G)."""
        x_all = tf.transpose(self.embed_projection(tokens_in), [1, 0, 2])  # (T, B, 3U)
        hs, alphas = self.recurrence.unroll(x_all, h0, self.step_weights(), enc, counts)
        return tf.transpose(hs, [1, 0, 2]), tf.transpose(alphas, [1, 0, 2])

    def _unroll_by_length(self, enc, tokens_in, h0, target_mask):
        """:meth:`_unroll` on the rows sorted by length (longest first), step t only on the
        rows whose length exceeds t, then back to the input order."""
        steps = tf.shape(tokens_in)[1]
        position = tf.range(1, steps + 1)[None, :]  # (1, T)
        lengths = tf.reduce_max(tf.where(tf.cast(target_mask, "bool"), position, 0), 1)  # (B,)
        order = tf.argsort(lengths, direction="DESCENDING", stable=True)  # (B,)
        counts = tf.reduce_sum(tf.cast(lengths[None, :] >= position[0, :, None], "int32"),
                               1)  # (T,) rows still running at each step
        sorted_enc = {k: tf.gather(v, order) for k, v in enc.items()}
        hs, alphas = self._unroll(sorted_enc, tf.gather(tokens_in, order), tf.gather(h0, order),
                                  counts)
        back = tf.math.invert_permutation(order)  # (B,)
        return tf.gather(hs, back), tf.gather(alphas, back)

    def _scheduled(self, enc, tokens_in, h0, sampling_prob, seed, greedy):
        tokens_t = tf.transpose(tokens_in)  # (T, B)
        steps, batch = tf.shape(tokens_t)[0], tf.shape(tokens_t)[1]
        seed = tf.zeros((2,), "int32") if seed is None else tf.cast(seed, "int32")
        out_dtype = "float32" if self.attend == "before" else self.compute_dtype
        outs = tf.TensorArray(out_dtype, size=steps)
        alphas = tf.TensorArray("float32", size=steps)
        weights = self.step_weights()

        def body(t, prev_pred, h, outs, alphas):
            step_seed = seed + tf.stack([0, t])
            coin = tf.random.stateless_uniform((batch,), step_seed) < sampling_prob
            use_pred = tf.logical_and(coin, t > 0)
            tok = tf.where(use_pred, prev_pred, tokens_t[t])  # (B,)
            h, alpha, out = self.cell(self.embed_projection(tok), h, enc, weights)
            logits = tf.stop_gradient(self.head(out))  # (B, V)
            if greedy:
                pred = tf.argmax(logits, -1, output_type=tokens_t.dtype)
            else:
                pred = tf.cast(tf.random.stateless_categorical(
                    logits, 1, step_seed + tf.constant([1, 0]))[:, 0], tokens_t.dtype)
            return t + 1, pred, h, outs.write(t, out), alphas.write(t, alpha)

        init = (tf.constant(0), tokens_t[0], h0, outs, alphas)
        _, _, _, outs, alphas = tf.while_loop(lambda t, *_: t < steps, body, init)
        return (tf.transpose(outs.stack(), [1, 0, 2]),  # (B, T, U[+E])
                tf.transpose(alphas.stack(), [1, 0, 2]))  # (B, T, G)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "vocab_size": self.vocab_size,
                "embedding_dim": self.embedding_dim, "units": self.units,
                "attention": self.attention_kind, "attention_units": self.attention_units,
                "dropout": self.dropout_rate, "init_state": self.init_state,
                "attend": self.attend, "attention_kernel": self.attention_kernel}


class CaptionModel(keras.Model):
    """Backbone -> encoder -> attention decoder, rebuilt from ``get_config`` alone.

    Inputs are uint8 images (B, S, S, 3), or grids (B, G, C) that the backbone already
    produced (a feature cache of a frozen backbone); the rank tells which.

    Example:
        >>> model = CaptionModel(vocab_size=20, image_size=32, cnn_filters=[8, 16],
        ...                      embedding_dim=8, units=8, attention_units=8)
        >>> logits, alpha = model((tf.zeros((2, 32, 32, 3), "uint8"), tf.ones((2, 4), "int32")))
        >>> (logits.shape, alpha.shape, model.grid_hw, model.feature_dim)
        (TensorShape([2, 4, 20]), TensorShape([2, 4, 64]), (8, 8), 16)
    """

    def __init__(self, vocab_size: int, image_size: int = 224, backbone: str = "small_cnn",
                 weights: str | None = None, trainable: str = "full",
                 fine_tune_from: str | None = None,
                 cnn_filters: list[int] | tuple[int, ...] = (32, 64, 128, 256, 256),
                 cnn_kernels: list[int] | tuple[int, ...] = (3, 3), cnn_padding: str = "same",
                 cnn_norm: str = "batch", embedding_dim: int = 256, units: int = 512,
                 attention: str = "additive", attention_units: int = 512, dropout: float = 0.3,
                 init_state: str = "mean",
                 positional: bool = True, attend: str = "before",
                 attention_kernel: str = "auto", **kwargs):
        super().__init__(**kwargs)
        self.args = dict(vocab_size=vocab_size, image_size=image_size, backbone=backbone,
                         weights=weights, trainable=trainable, fine_tune_from=fine_tune_from,
                         cnn_filters=list(cnn_filters), cnn_kernels=list(cnn_kernels),
                         cnn_padding=cnn_padding, cnn_norm=cnn_norm,
                         embedding_dim=embedding_dim, units=units,
                         attention=attention, attention_units=attention_units, dropout=dropout,
                         init_state=init_state, positional=positional, attend=attend,
                         attention_kernel=attention_kernel)
        pol = self.dtype_policy
        self.backbone = build_backbone(backbone, image_size, weights, trainable, fine_tune_from,
                                       cnn_filters, cnn_kernels, cnn_padding, dtype=pol,
                                       cnn_norm=cnn_norm)
        gh, gw = self.backbone.grid_hw(image_size)
        self.grid_hw = (gh, gw)
        self.encoder = FeatureEncoder(embedding_dim, gh * gw, dropout, positional,
                                      name="encoder", dtype=pol)
        self.decoder = AttentionDecoder(vocab_size, embedding_dim, units, attention,
                                        attention_units, dropout, init_state, attend,
                                        attention_kernel, name="decoder", dtype=pol)
        self.decoder.build((None, gh * gw, embedding_dim))

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, vocab_size: int, dtype: Any = None
                          ) -> CaptionModel:
        return cls(vocab_size=vocab_size, image_size=cfg.image_size, backbone=cfg.backbone,
                   weights=cfg.weights, trainable=cfg.trainable,
                   fine_tune_from=cfg.fine_tune_from, cnn_filters=cfg.cnn_filters,
                   cnn_kernels=cfg.cnn_kernels, cnn_padding=cfg.cnn_padding,
                   cnn_norm=cfg.cnn_norm, embedding_dim=cfg.embedding_dim, units=cfg.units,
                   attention=cfg.attention, attention_units=cfg.attention_units,
                   dropout=cfg.dropout, init_state=cfg.init_state, positional=cfg.positional,
                   attend=cfg.attend, attention_kernel=cfg.attention_kernel, dtype=dtype)

    @property
    def grid_size(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def feature_dim(self) -> int:
        """Channels C of the backbone's grid."""
        return int(self.backbone.feature_dim)

    def grid(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        """uint8 images (B, S, S, 3) -> backbone grid (B, G, C)."""
        x = _cast(self.backbone.preprocess(images), self.compute_dtype)
        grid = self.backbone(x, training=training)  # (B, gh, gw, C)
        return tf.reshape(grid, (tf.shape(grid)[0], self.grid_size, grid.shape[-1]))

    def encode(self, inputs: tf.Tensor, training: bool = False) -> dict[str, tf.Tensor]:
        """Images (B, S, S, 3) or cached grids (B, G, C) -> decoder inputs (features, keys)."""
        grid = self.grid(inputs, training) if len(inputs.shape) == 4 else inputs  # (B, G, C)
        grid = _cast(grid, self.compute_dtype)
        return self.decoder.prepare(self.encoder(grid, training=training))  # (B, G, E)

    def call(self, inputs: tuple[tf.Tensor, tf.Tensor], training: bool = False,
             sampling_prob: tf.Tensor | None = None, seed: tf.Tensor | None = None,
             greedy_sampling: bool = False, logits: bool = True,
             target_mask: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """(images or grids, tokens_in (B, T)) -> logits (B, T, V), alpha (B, T, G); see
        :meth:`AttentionDecoder.call` for the other arguments."""
        images, tokens_in = inputs
        enc = self.encode(images, training=training)
        return self.decoder(enc, tokens_in, training=training, sampling_prob=sampling_prob,
                            seed=seed, greedy_sampling=greedy_sampling, logits=logits,
                            target_mask=target_mask)

    def build_weights(self) -> CaptionModel:
        """Create every weight with one tiny forward pass (needed before restoring)."""
        size = self.args["image_size"]
        self((tf.zeros((1, size, size, 3), "uint8"), tf.ones((1, 2), "int32")))
        return self

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), **self.args}
