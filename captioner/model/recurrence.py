"""The decoder's recurrence: one step, all steps under teacher forcing, and the
hand-written backward pass (``tf.custom_gradient``).

Shapes used in comments: B images (n_t the rows still running at step t), G grid
cells, E embedding_dim, U GRU units, A attention units, T time steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import tensorflow as tf

from captioner.model.kernels import (
    AttentionKernel,
)


def _cast(x: Any, dtype: str) -> tf.Tensor:
    return tf.cast(x, dtype)



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

