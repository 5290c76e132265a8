"""The Show, Attend and Tell model: CNN backbone, dense encoder, GRU + attention decoder.

Shapes used in comments: B images, S image side, G grid cells, C backbone channels,
E embedding_dim, U GRU units, A attention units, T time steps, V vocabulary size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from captioner.backbones import build_backbone
from captioner.config import ModelConfig
from captioner.kernels import (
    AttentionKernel,
    KernelBuildError,
    KernelChoices,
    attention_kernel,
)


def _cast(x: Any, dtype: str) -> tf.Tensor:
    return tf.cast(x, dtype)


def _kernel(choice: str) -> AttentionKernel | None:
    """``model.attention_kernel`` -> the fused kernel or None; a build failure under
    ``fused`` becomes a ValueError naming the key."""
    try:
        return attention_kernel(choice)
    except KernelBuildError as exc:
        raise ValueError(f"model.attention_kernel=fused: {exc}") from exc


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
        if kind not in ("additive", "dot", "general"):
            raise ValueError(f"attention kind must be additive, dot or general, got {kind!r}")
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


# ---- the recurrence: one step, all steps, and the hand-written backward pass -----------
class GruGates(NamedTuple):
    """What the GRU's backward pass reads, each (B, U) float32."""

    z: tf.Tensor  # update gate
    r: tf.Tensor  # reset gate
    n: tf.Tensor  # candidate state
    hh: tf.Tensor  # recurrent part of the candidate's pre-activation (before the reset gate)


def gru_update(x: tf.Tensor, hr: tf.Tensor, h: tf.Tensor) -> tuple[tf.Tensor, GruGates]:
    """GRU in Keras' ``reset_after`` form, float32: input projection x (B, 3U) and recurrent
    projection hr (B, 3U), both with their biases, state h (B, U) -> new state (B, U)."""
    xz, xr, xh = tf.split(x, 3, axis=-1)
    hz, hr_, hh = tf.split(hr, 3, axis=-1)
    z = tf.sigmoid(xz + hz)
    r = tf.sigmoid(xr + hr_)
    n = tf.tanh(xh + r * hh)
    return z * h + (1.0 - z) * n, GruGates(z, r, n, hh)


def gru_update_grad(dh: tf.Tensor, h: tf.Tensor, g: GruGates
                    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Backward of :func:`gru_update`: dL/dh_new (B, U) -> dL/dx (B, 3U), dL/dhr (B, 3U)
    and the direct part of dL/dh (B, U)."""
    dn = dh * (1.0 - g.z) * (1.0 - g.n * g.n)  # through the tanh
    dz = dh * (h - g.n) * g.z * (1.0 - g.z)
    dr = dn * g.hh * g.r * (1.0 - g.r)
    return tf.concat([dz, dr, dn], -1), tf.concat([dz, dr, dn * g.r], -1), dh * g.z


class StepWeights(NamedTuple):
    """The recurrence's weights, read and cast once per call (never per step).

    ``hidden`` multiplies h_{t-1}: for additive attention before the GRU it is
    [W2 | U_r] (U, A + 3U), so the attention query and the GRU's recurrent projection are
    ONE matmul; otherwise U_r (U, 3U). Matmul weights are in the compute dtype.
    """

    hidden: tf.Tensor  # (U, A + 3U) or (U, 3U)
    bias_h: tf.Tensor  # (3U,) float32 recurrent bias
    ctx: tf.Tensor  # (E, 3U) context half of the GRU input projection ((0, 3U) if unused)
    v: tf.Tensor  # (A, 1) additive score vector ((0, 1) if unused)
    v_bias: tf.Tensor  # (1,) float32; shifts every score equally, so alpha ignores it


class TransposedWeights(NamedTuple):
    """``StepWeights.hidden`` and ``.ctx`` transposed once per backward pass, so that each
    step's dL/dh and dL/dctx are plain matmuls: oneDNN's ``transpose_b`` matmul of
    (64, 2048) x (512, 2048)^T measured ~3x slower (0.95 ms) than with W^T materialised
    (0.31 ms) on this CPU."""

    hidden: tf.Tensor  # (A + 3U, U) or (3U, U)
    ctx: tf.Tensor  # (3U, E)


class Recurrence:
    """The decoder's recurrence: ``step`` (shared by training, scheduled sampling and
    decoding) and ``unroll`` over all steps under teacher forcing, whose backward pass is
    written by hand (``tf.custom_gradient``).

    With ``attention`` (``attend="before"``) a step is alpha = softmax(score(keys, h));
    context = alpha . features; h = GRU(x + context @ W_ctx, h). Without it the step is the
    GRU alone. Elementwise math and the state are float32; matmuls run in the weights'
    (compute) dtype. The forward pass keeps tanh(keys + query) (n_t, G, A) of every step
    for the backward pass (additive attention; T*B*G*A values, ~315 MB at B=64, T=49,
    G=49, A=512 in float32, measured ~6% faster than recomputing it), and the backward pass
    computes every weight gradient after its loop as one matmul over all T*B rows instead
    of T small ones accumulated inside it. With ``kernel`` (:mod:`captioner.kernels`,
    additive attention only) the scores and their gradient are two fused ops (4 passes
    over (n_t, G, A) per step instead of ~14) and the GRU update and its gradient one op
    each; without it, TensorFlow ops.

    ``unroll(..., counts)`` runs step t on the first ``counts[t]`` rows only (rows sorted
    by length, longest first; ``counts`` non-increasing): the other rows' state is
    carried unchanged, their alpha is 0 and they get no gradient from step t.

    Example:
        >>> rec = Recurrence(None, 0)
        >>> w = StepWeights(tf.zeros((4, 12)), tf.zeros((12,)), tf.zeros((0, 12)),
        ...                 tf.zeros((0, 1)), tf.zeros((1,)))
        >>> hs, alphas = rec.unroll(tf.zeros((5, 2, 12)), tf.zeros((2, 4)), w, {})
        >>> hs.shape, alphas.shape
        (TensorShape([5, 2, 4]), TensorShape([5, 2, 0]))
        >>> hs, _ = rec.unroll(tf.ones((3, 2, 12)), tf.zeros((2, 4)), w, {},
        ...                    counts=tf.constant([2, 1, 0]))
        >>> bool(tf.reduce_all(hs[2] == hs[1]) and tf.reduce_all(hs[1, 1] == hs[0, 1]))
        True
    """

    def __init__(self, attention: str | None, attention_units: int,
                 kernel: AttentionKernel | None = None):
        self.attention = attention  # additive | dot | general, or None: the GRU alone
        self.split = attention_units if attention == "additive" else 0
        self.kernel = kernel if self.split else None  # decoder-step kernels, or TF ops

    # ---- one step ---------------------------------------------------------------------
    def scores(self, keys: tf.Tensor, q: tf.Tensor, w: StepWeights
               ) -> tuple[tf.Tensor, tf.Tensor | None]:
        """keys (B, G, A|U), query (B, A|U) -> scores (B, G) float32 and, for additive
        attention, th = tanh(keys + q) (B, G, A) (else None). With the kernel the query
        may be wider (B, K >= A): its first A columns are used."""
        if self.kernel is not None:  # float32 (keys already are after prepare())
            th, scores = self.kernel.scores(tf.cast(keys, "float32"), tf.cast(q, "float32"),
                                            tf.cast(w.v[:, 0], "float32"))
            return scores + w.v_bias, th  # (B, G), (B, G, A)
        q = tf.cast(q, keys.dtype)
        if self.split:
            th = tf.tanh(keys + q[:, None, :])  # (B, G, A)
            scores = tf.tensordot(th, tf.cast(w.v, th.dtype), 1)[..., 0]  # (B, G)
            return tf.cast(scores, "float32") + w.v_bias, th
        return tf.cast(tf.einsum("bgu,bu->bg", keys, q), "float32"), None

    def step(self, x: tf.Tensor, h: tf.Tensor, w: StepWeights, enc: dict[str, tf.Tensor]
             ) -> tuple[tf.Tensor, tf.Tensor, tuple[Any, ...]]:
        """x (B, 3U) projected embedding and h (B, U), float32 -> new state (B, U),
        alpha (B, G) (B, 0 without attention) and what the backward pass reads: the
        gates, and with attention ctx and tanh(keys + q) (additive) or q (bilinear)."""
        hc = tf.cast(h, w.hidden.dtype)
        hq = tf.matmul(hc, w.hidden)  # (B, A + 3U) or (B, 3U)
        if self.kernel is not None:  # additive: the kernels read q and hr out of hq
            q = hq = tf.cast(hq, "float32")

            def gru(x_in):  # gates come packed (B, 4U)
                return self.kernel.gru(x_in, hq, w.bias_h, h)
        else:
            hr = tf.cast(hq[:, self.split:], "float32") + w.bias_h  # (B, 3U)
            q = hq[:, :self.split] if self.split else hc  # (B, A) or (B, U)

            def gru(x_in):
                return gru_update(x_in, hr, h)
        if self.attention is None:
            h_new, gates = gru(x)
            return h_new, tf.zeros((tf.shape(h)[0], 0)), (gates,)
        scores, th = self.scores(enc["keys"], q, w)
        alpha = tf.nn.softmax(scores, axis=-1)  # (B, G)
        ctx = tf.einsum("bg,bge->be", tf.cast(alpha, w.ctx.dtype), enc["features"])  # (B, E)
        h_new, gates = gru(x + tf.cast(tf.matmul(ctx, w.ctx), "float32"))
        return h_new, alpha, (gates, ctx, th if self.split else q)

    # ---- all steps ----------------------------------------------------------------------
    def unroll(self, x_all: tf.Tensor, h0: tf.Tensor, w: StepWeights,
               enc: dict[str, tf.Tensor], counts: tf.Tensor | None = None
               ) -> tuple[tf.Tensor, tf.Tensor]:
        """x_all (T, B, 3U), h0 (B, U) float32 -> states (T, B, U), alphas (T, B, G);
        with ``counts`` (T,) int32 step t updates only the first counts[t] rows."""
        keys, features = (enc["keys"], enc["features"]) if self.attention else (w.v, w.v)

        @tf.custom_gradient
        def run(x_all, h0, keys, features, *weights):
            ws = StepWeights(*weights)
            enc = {"keys": keys, "features": features}
            hs, alphas, saved = self._forward(x_all, h0, ws, enc, counts)

            def grad(dhs, dalphas):
                dhs = tf.zeros_like(hs) if dhs is None else dhs
                dalphas = tf.zeros_like(alphas) if dalphas is None else dalphas
                return self._backward(dhs, dalphas, x_all, h0, hs, alphas, saved, ws, enc,
                                      counts)

            return (hs, alphas), grad

        return run(x_all, h0, keys, features, *w)

    def _active(self, enc: dict[str, tf.Tensor], n: tf.Tensor | None) -> dict[str, tf.Tensor]:
        """The first n rows of the per-image tensors (a dim-0 slice: no copy)."""
        if n is None or not self.attention:
            return enc
        return {k: v[:n] for k, v in enc.items()}

    def _forward(self, x_all, h0, w, enc, counts):
        steps, batch = tf.shape(x_all)[0], tf.shape(x_all)[1]
        dtypes = self._forward_dtypes(w, enc)

        def body(t, h):
            n = None if counts is None else counts[t]
            h_n, alpha, saved = self.step(_rows(x_all[t], n), _rows(h, n), w,
                                          self._active(enc, n))
            h = _merge_rows(h_n, h, n)  # (B, U)
            saved = tf.nest.map_structure(  # (n_t, ...) as is, or padded to (B, ...)
                lambda s, d: s if isinstance(d, Unstacked) else _pad_rows(s, batch, n),
                saved, dtypes[2])
            return h, (h, _pad_rows(alpha, batch, n), saved)

        _, (hs, alphas, saved) = _loop(body, steps, h0, dtypes)
        return hs, alphas, saved

    def _forward_dtypes(self, w: StepWeights, enc: dict[str, tf.Tensor]) -> tuple[Any, ...]:
        """Per-step outputs of the forward loop: state and alpha (stacked to (T, B, ...)),
        then what the backward pass reads: (gates, ctx, tanh(keys + q) or a bilinear q).
        Only the backward loop reads the gates and tanh: they stay per-step (n_t, ...)
        tensors (``Unstacked``: not padded, not copied); ctx and a bilinear q are stacked
        for the weight gradients after the loop. With the kernels the gates come packed
        (n_t, 4U)."""
        units = w.hidden.shape[0]
        if self.kernel is not None:
            saved: tuple[Any, ...] = (Unstacked("float32", (4 * units,)),)  # packed gates
        else:
            raw = Unstacked("float32", (units,))  # (n_t, U)
            saved = (GruGates(raw, raw, raw, raw),)
        if self.split:  # ctx, tanh(keys + q) (n_t, G, A)
            dtype = "float32" if self.kernel is not None else enc["keys"].dtype
            saved += (w.ctx.dtype, Unstacked(dtype, tuple(enc["keys"].shape[1:])))
        elif self.attention is not None:  # ctx, q
            saved += (w.ctx.dtype, w.hidden.dtype)
        return ("float32", "float32", saved)

    # ---- the backward pass ----------------------------------------------------------------
    def _backward(self, dhs, dalphas, x_all, h0, hs, alphas, saved, w, enc, counts):
        """Gradients of (x_all, h0, keys, features, *weights) from dL/dhs, dL/dalphas."""
        steps, batch = tf.shape(x_all)[0], tf.shape(x_all)[1]
        h_prev = tf.concat([h0[None], hs[:-1]], 0)  # (T, B, U)
        acc0 = self._grad_accumulators(enc, w)
        wt = TransposedWeights(tf.transpose(w.hidden), tf.transpose(w.ctx))

        def body(t, carry):
            dh, acc = carry
            n = None if counts is None else counts[t]
            dh = dhs[t] + dh  # (B, U)
            step_saved = tf.nest.map_structure(lambda s: _read_rows(s, t, n), saved)
            dh_n, acc, out = self._step_grad(
                _rows(dh, n), _rows(dalphas[t], n), _rows(h_prev[t], n), _rows(alphas[t], n),
                step_saved, w, wt, self._active(enc, n), acc, n)
            out = tf.nest.map_structure(lambda s: _pad_rows(s, batch, n), out)
            return (_merge_rows(dh_n, dh, n), acc), out

        (dh0, acc), outs = _loop(body, steps, (tf.zeros_like(h0), acc0),
                                 self._grad_dtypes(w), reverse=True)
        return (outs[0], dh0, *self._input_grads(acc, outs, alphas, saved, w, enc, h_prev))

    def _grad_accumulators(self, enc, w):
        """Loop-carried sums: recurrent bias (3U,), and for additive attention the keys'
        sum_t ds_t th_t^2 (B, G, A), sum_t ds_t (B, G) and V's gradient (A, 1)."""
        zeros = tf.zeros_like(w.bias_h)
        if not self.split:
            return (zeros,)
        keys = enc["keys"]
        return (zeros, tf.zeros(tf.shape(keys), "float32"),
                tf.zeros(tf.shape(keys)[:2], "float32"), tf.zeros(tf.shape(w.v), "float32"))

    def _grad_dtypes(self, w):
        """Per-step outputs of the backward loop: dx (float32), d[q | hr] and dctx, dq."""
        if self.attention is None:
            return ("float32", w.hidden.dtype)
        return ("float32", w.hidden.dtype, w.ctx.dtype, "float32")

    def _step_grad(self, dh, dalpha, h, alpha, saved, w, wt, enc, acc, n=None):
        """One step back on the (first n) active rows: dL/dh_t (n, U) -> dL/dh_{t-1},
        updated sums, per-step outputs."""
        cd = w.hidden.dtype
        gru_grad = gru_update_grad if self.kernel is None else self.kernel.gru_grad
        dx, dhr, dh_prev = gru_grad(dh, h, saved[0])  # (B, 3U), (B, 3U), (B, U)
        acc = (acc[0] + tf.reduce_sum(dhr, 0), *acc[1:])
        if self.attention is None:
            dhq = tf.cast(dhr, cd)
            dh_prev += tf.cast(tf.matmul(dhq, wt.hidden), "float32")
            return dh_prev, acc, (dx, dhq)
        dctx = tf.matmul(tf.cast(dx, w.ctx.dtype), wt.ctx)  # (B, E)
        dalpha += tf.cast(tf.einsum("bge,be->bg", enc["features"], dctx), "float32")
        ds = alpha * (dalpha - tf.reduce_sum(alpha * dalpha, -1, keepdims=True))  # (B, G)
        th = saved[2] if self.split else None  # (B, G, A) from the forward pass
        dq, acc = self._scores_grad(ds, w, enc, acc, n, th)
        if self.split:
            dhq = tf.concat([tf.cast(dq, cd), tf.cast(dhr, cd)], -1)  # (B, A + 3U)
        else:
            dhq = tf.cast(dhr, cd)
            dh_prev += dq
        dh_prev += tf.cast(tf.matmul(dhq, wt.hidden), "float32")  # (B, U)
        return dh_prev, acc, (dx, dhq, dctx, ds)

    def _scores_grad(self, ds, w, enc, acc, n, th):
        """dL/dscores (B, G) -> dL/dq (B, A|U) float32 and updated sums.

        Additive: with th = tanh(keys + q), dL/d(keys + q) = ds v (1 - th^2); as the
        softmax gradient ds sums to 0 over cells, dq = -v sum_g ds th^2, and the keys'
        gradient is v (sum_t ds_t - sum_t ds_t th_t^2), finished after the loop. ``th``
        is the forward pass's tanh (None for bilinear scores).
        """
        keys = enc["keys"]
        if not self.split:  # bilinear: scores = keys . q; the keys' part comes after the loop
            return tf.cast(tf.einsum("bg,bgu->bu", tf.cast(ds, keys.dtype), keys), "float32"), acc
        th = tf.ensure_shape(th, keys.shape)  # (B, G, A)
        bias, m, s, v = acc
        if self.kernel is not None:  # one pass over th; m updated in place on n rows
            dq, dv, m = self.kernel.scores_grad(th, ds, tf.cast(w.v[:, 0], "float32"), m)
            return dq, (bias, m, _add_rows(s, ds, n), v + dv[:, None])
        th2 = tf.cast(th * th, "float32")
        dq = -tf.einsum("bg,bga->ba", ds, th2) * tf.cast(w.v[:, 0], "float32")  # (B, A)
        dv = tf.einsum("bg,bga->a", ds, tf.cast(th, "float32"))[:, None]  # (A, 1)
        return dq, (bias, _add_rows(m, ds[:, :, None] * th2, n), _add_rows(s, ds, n), v + dv)

    def _input_grads(self, acc, outs, alphas, saved, w, enc, h_prev):
        """Gradients of (keys, features, *weights) once the loop is done, each as one
        matmul over all T*B rows."""
        cd = w.hidden.dtype
        d_hidden = _rows_matmul(tf.cast(h_prev, cd), outs[1])  # (U, A + 3U) or (U, 3U)
        if self.attention is None:
            zeros = [tf.zeros_like(x) for x in (w.v, w.v, w.ctx, w.v, w.v_bias)]
            return (*zeros[:2], d_hidden, acc[0], *zeros[2:])
        ctx = saved[1]  # (T, B, E)
        dx, _, dctx, ds = outs
        d_ctx_w = _rows_matmul(ctx, tf.cast(dx, cd))  # (E, 3U)
        d_features = tf.einsum("tbg,tbe->bge", tf.cast(alphas, dctx.dtype), dctx)  # (B, G, E)
        if self.split:
            _, m, s, dv = acc
            d_keys = tf.cast(w.v[:, 0], "float32") * (s[:, :, None] - m)  # (B, G, A)
        else:
            q = saved[2]  # (T, B, U)
            d_keys = tf.einsum("tbg,tbu->bgu", ds, tf.cast(q, "float32"))  # (B, G, U)
            dv = tf.zeros_like(w.v)
        keys = enc["keys"]
        return (tf.cast(d_keys, keys.dtype), tf.cast(d_features, enc["features"].dtype),
                d_hidden, acc[0], tf.cast(d_ctx_w, w.ctx.dtype), tf.cast(dv, w.v.dtype),
                tf.zeros_like(w.v_bias))


# ---- the first n rows of a batch (rows sorted by length, longest first) ----------------
def _rows(x: tf.Tensor, n: tf.Tensor | None) -> tf.Tensor:
    """The first n rows of x (all with n None); a dim-0 slice shares x's buffer."""
    return x if n is None else x[:n]


def _pad_rows(x: tf.Tensor, batch: tf.Tensor, n: tf.Tensor | None) -> tf.Tensor:
    """(n, ...) -> (B, ...) with zero rows after the first n."""
    return x if n is None else tf.pad(x, [[0, batch - n]] + [[0, 0]] * (x.shape.rank - 1))


def _merge_rows(head: tf.Tensor, full: tf.Tensor, n: tf.Tensor | None) -> tf.Tensor:
    """New first n rows ``head`` (n, ...), the rest of ``full`` (B, ...) unchanged."""
    if n is None:
        return head
    return tf.ensure_shape(tf.concat([head, full[n:]], 0), full.shape)


def _add_rows(acc: tf.Tensor, update: tf.Tensor, n: tf.Tensor | None) -> tf.Tensor:
    """acc (B, ...) + update (n, ...) on the first n rows."""
    if n is None:
        return acc + update
    return acc + _pad_rows(update, tf.shape(acc)[0], n)


class Unstacked:
    """A :func:`_loop` output kept as a ``tf.TensorArray`` of per-step tensors of any row
    count (not padded, not stacked); ``_read_rows`` reads step t. ``shape``: the
    per-step shape after the rows, e.g. (U,) for (n_t, U) tensors."""

    def __init__(self, dtype: Any, shape: tuple[int | None, ...] = ()):
        self.dtype = dtype
        self.shape = shape


def _read_rows(saved: Any, t: tf.Tensor, n: tf.Tensor | None) -> tf.Tensor:
    """Step t of a stacked (T, B, ...) output (its first n rows) or of a TensorArray."""
    if isinstance(saved, tf.TensorArray):
        return saved.read(t)
    return _rows(saved[t], n)


def _rows_matmul(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """sum over all (t, b) rows of a^T b: (T, B, I), (T, B, J) -> (I, J)."""
    return tf.matmul(tf.reshape(a, (-1, a.shape[-1])), tf.reshape(b, (-1, b.shape[-1])),
                     transpose_a=True)


def _loop(body: Callable[[tf.Tensor, Any], tuple[Any, Any]], steps: tf.Tensor, init: Any,
          dtypes: Any, reverse: bool = False) -> tuple[Any, Any]:
    """``carry, out = body(t, carry)`` for t = 0 .. steps - 1 (or backwards) in one
    ``tf.while_loop``; returns the final carry and the outputs stacked to (T, ...), or as
    the TensorArray itself where ``dtypes`` holds an :class:`Unstacked`."""

    def array(d: Any) -> tf.TensorArray:
        if isinstance(d, Unstacked):
            return tf.TensorArray(d.dtype, size=steps, infer_shape=False,
                                  element_shape=tf.TensorShape([None, *d.shape]))
        return tf.TensorArray(d, size=steps)

    arrays = tf.nest.map_structure(array, dtypes)

    def step(i, carry, arrays):
        t = steps - 1 - i if reverse else i
        carry, out = body(t, carry)
        arrays = tf.nest.map_structure(lambda a, o: a.write(t, o), arrays, out)
        return i + 1, carry, arrays

    _, carry, arrays = tf.while_loop(lambda i, *_: i < steps, step,
                                     (tf.constant(0), init, arrays))
    return carry, tf.nest.map_structure(lambda a, d: a if isinstance(d, Unstacked)
                                        else a.stack(), arrays, dtypes)


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
    every policy (matmuls run in the compute dtype).

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
        if attend not in ("before", "after"):
            raise ValueError(f"attend must be 'before' or 'after', got {attend!r}")
        KernelChoices().check(attention_kernel)
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
        fused = attention == "additive" and attend == "before"
        self.recurrence = Recurrence(attention if attend == "before" else None,
                                     attention_units,
                                     _kernel(attention_kernel) if fused else None)

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
                 embedding_dim: int = 256, units: int = 512, attention: str = "additive",
                 attention_units: int = 512, dropout: float = 0.3, init_state: str = "mean",
                 positional: bool = True, attend: str = "before",
                 attention_kernel: str = "auto", **kwargs):
        super().__init__(**kwargs)
        self.args = dict(vocab_size=vocab_size, image_size=image_size, backbone=backbone,
                         weights=weights, trainable=trainable, fine_tune_from=fine_tune_from,
                         cnn_filters=list(cnn_filters), cnn_kernels=list(cnn_kernels),
                         cnn_padding=cnn_padding, embedding_dim=embedding_dim, units=units,
                         attention=attention, attention_units=attention_units, dropout=dropout,
                         init_state=init_state, positional=positional, attend=attend,
                         attention_kernel=attention_kernel)
        pol = self.dtype_policy
        self.backbone = build_backbone(backbone, image_size, weights, trainable, fine_tune_from,
                                       cnn_filters, cnn_kernels, cnn_padding, dtype=pol)
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
                   embedding_dim=cfg.embedding_dim, units=cfg.units,
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
