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
    KernelBuildError,
    attention_kernel,
)


def _cast(x: Any, dtype: str) -> tf.Tensor:
    return tf.cast(x, dtype)


def resolve_kernel(choice: str) -> AttentionKernel | None:
    """``model.attention_kernel`` -> the fused kernel or None (TensorFlow ops); a build
    failure under ``fused`` becomes a ValueError naming the key.

    Example:
        >>> resolve_kernel("tensorflow") is None
        True
    """
    try:
        return attention_kernel(choice)
    except KernelBuildError as exc:
        raise ValueError(f"model.attention_kernel=fused: {exc}") from exc


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


class StepSaved(NamedTuple):
    """What a forward step keeps for the backward pass. An absent field is ``()`` (a
    structure without tensors for ``tf.nest``, loops and TensorArrays): ``ctx`` with
    attention only, ``th`` with additive scores only, ``q`` with bilinear ones only.

    The same structure holds one step's tensors (n_t rows), the forward loop's per-step
    dtypes and its outputs over all steps (:meth:`Recurrence._forward_dtypes`)."""

    gates: Any  # GruGates of (n_t, U) float32, or (n_t, 4U) [z, r, n, hh] from the kernel
    ctx: Any = ()  # (n_t, E) attention context, compute dtype
    th: Any = ()  # (n_t, G, A) tanh(keys + q), additive scores
    q: Any = ()  # (n_t, U) query h_{t-1}, bilinear (dot / general) scores


class StepGrads(NamedTuple):
    """One backward step's outputs, stacked to (T, B, ...) for the weight gradients after
    the loop; ``dctx`` and ``ds`` (with attention only) are ``()`` without it."""

    dx: Any  # (n_t, 3U) float32 dL/dx, the GRU input projection
    dhq: Any  # (n_t, A + 3U) or (n_t, 3U) dL/d[q | hr], compute dtype
    dctx: Any = ()  # (n_t, E) dL/dctx, compute dtype
    ds: Any = ()  # (n_t, G) float32 dL/dscores


class GradSums(NamedTuple):
    """The backward loop's carried sums: the recurrent bias's gradient, and for additive
    attention (else ``()``) the keys' sum_t ds_t th_t^2, sum_t ds_t and V's gradient."""

    bias: Any  # (3U,) float32
    m: Any = ()  # (B, G, A) float32 sum_t ds_t th_t^2
    s: Any = ()  # (B, G) float32 sum_t ds_t
    v: Any = ()  # (A, 1) float32 dL/dV


class InputGrads(NamedTuple):
    """Gradients of the keys, the features and the weights (:class:`StepWeights`'
    fields), computed after the backward loop."""

    keys: tf.Tensor  # (B, G, A|U), keys' dtype ((0, 1) zeros without attention)
    features: tf.Tensor  # (B, G, E), features' dtype ((0, 1) zeros without attention)
    hidden: tf.Tensor  # like StepWeights.hidden
    bias_h: tf.Tensor  # (3U,) float32
    ctx: tf.Tensor  # (E, 3U)
    v: tf.Tensor  # (A, 1)
    v_bias: tf.Tensor  # (1,) zeros: the scores' bias does not change alpha


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
    each; without it, TensorFlow ops. ``kernel`` may be the kernel itself, None, or a
    ``model.attention_kernel`` choice (``auto``, ``fused``, ``tensorflow``) resolved by
    :func:`resolve_kernel` the first time :attr:`kernel` is read (the first step or
    unroll), not when the recurrence is made: that is when the library gets compiled and
    loaded, and when ``fused`` raises if it cannot be.

    ``unroll(..., counts)`` runs step t on the first ``counts[t]`` rows only (rows sorted
    by length, longest first; ``counts`` non-increasing): the other rows' state is
    carried unchanged, their alpha is 0 and they get no gradient from step t.

    Example:
        >>> Recurrence("additive", 4, "tensorflow").kernel is None  # resolved on first read
        True
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
                 kernel: AttentionKernel | str | None = None):
        self.attention = attention  # additive | dot | general, or None: the GRU alone
        self.split = attention_units if attention == "additive" else 0
        # decoder-step kernels, TF ops (None), a choice not resolved yet (str), or the
        # ValueError its resolution raised
        self._kernel: Any = kernel if self.split else None

    @property
    def kernel(self) -> AttentionKernel | None:
        """The decoder-step kernels, or None for TensorFlow ops. A ``model.attention_kernel``
        choice is resolved on the first read (building or loading the library) and the
        result kept; so is a failure, raised again (as a new ValueError) at every read."""
        if isinstance(self._kernel, str):
            try:
                self._kernel = resolve_kernel(self._kernel)
            except ValueError as exc:
                self._kernel = exc
        if isinstance(self._kernel, ValueError):
            raise ValueError(str(self._kernel)) from self._kernel.__cause__
        return self._kernel

    # ---- one step ---------------------------------------------------------------------
    def scores(self, keys: tf.Tensor, q: tf.Tensor, w: StepWeights
               ) -> tuple[tf.Tensor, tf.Tensor | None]:
        """keys (B, G, A|U), query (B, A|U) -> scores (B, G) float32 and, for additive
        attention, th = tanh(keys + q) (B, G, A) (else None). With the kernel the query
        may be wider (B, K >= A): its first A columns are used."""
        kernel = self.kernel
        if kernel is not None:  # float32 (keys already are after prepare())
            th, scores = kernel.scores(tf.cast(keys, "float32"), tf.cast(q, "float32"),
                                       tf.cast(w.v[:, 0], "float32"))
            return scores + w.v_bias, th  # (B, G), (B, G, A)
        q = tf.cast(q, keys.dtype)
        if self.split:
            th = tf.tanh(keys + q[:, None, :])  # (B, G, A)
            scores = tf.tensordot(th, tf.cast(w.v, th.dtype), 1)[..., 0]  # (B, G)
            return tf.cast(scores, "float32") + w.v_bias, th
        return tf.cast(tf.einsum("bgu,bu->bg", keys, q), "float32"), None

    def step(self, x: tf.Tensor, h: tf.Tensor, w: StepWeights, enc: dict[str, tf.Tensor]
             ) -> tuple[tf.Tensor, tf.Tensor, StepSaved]:
        """x (B, 3U) projected embedding and h (B, U), float32 -> new state (B, U),
        alpha (B, G) (B, 0 without attention) and what the backward pass reads
        (:class:`StepSaved`): the gates, and with attention ctx and tanh(keys + q)
        (additive) or q (bilinear)."""
        kernel = self.kernel
        hc = tf.cast(h, w.hidden.dtype)  # (B, U)
        hq = tf.matmul(hc, w.hidden)  # (B, A + 3U) or (B, 3U)
        if kernel is not None:  # additive: the kernels read q and hr out of hq
            q = hq = tf.cast(hq, "float32")

            def gru(x_in):  # gates come packed (B, 4U)
                return kernel.gru(x_in, hq, w.bias_h, h)
        else:
            hr = tf.cast(hq[:, self.split:], "float32") + w.bias_h  # (B, 3U)
            q = hq[:, :self.split] if self.split else hc  # (B, A) or (B, U)

            def gru(x_in):
                return gru_update(x_in, hr, h)
        if self.attention is None:
            h_new, gates = gru(x)  # (B, U), gates
            return h_new, tf.zeros((tf.shape(h)[0], 0)), StepSaved(gates)  # alpha (B, 0)
        scores, th = self.scores(enc["keys"], q, w)  # (B, G), (B, G, A) or None
        alpha = tf.nn.softmax(scores, axis=-1)  # (B, G)
        ctx = tf.einsum("bg,bge->be", tf.cast(alpha, w.ctx.dtype), enc["features"])  # (B, E)
        h_new, gates = gru(x + tf.cast(tf.matmul(ctx, w.ctx), "float32"))  # (B, U), gates
        if self.split:
            return h_new, alpha, StepSaved(gates, ctx=ctx, th=th)
        return h_new, alpha, StepSaved(gates, ctx=ctx, q=q)

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
        """-> states (T, B, U), alphas (T, B, G) and :class:`StepSaved` over all steps."""
        steps, batch = tf.shape(x_all)[0], tf.shape(x_all)[1]
        saved_dtypes = self._forward_dtypes(w, enc)

        def body(t, h):
            n = None if counts is None else counts[t]
            h_n, alpha, saved = self.step(_rows(x_all[t], n), _rows(h, n), w,
                                          self._active(enc, n))
            h = _merge_rows(h_n, h, n)  # (B, U)
            saved = tf.nest.map_structure(  # (n_t, ...) as is, or padded to (B, ...)
                lambda s, d: s if isinstance(d, Unstacked) else _pad_rows(s, batch, n),
                saved, saved_dtypes)
            return h, (h, _pad_rows(alpha, batch, n), saved)  # (B, U), (B, G), StepSaved

        _, (hs, alphas, saved) = _loop(body, steps, h0, ("float32", "float32", saved_dtypes))
        return hs, alphas, saved

    def _forward_dtypes(self, w: StepWeights, enc: dict[str, tf.Tensor]) -> StepSaved:
        """The forward loop's :class:`StepSaved` outputs (the loop also stacks the state
        and alpha to (T, B, ...)). Only the backward loop reads the gates and tanh: they
        stay per-step (n_t, ...) tensors (``Unstacked``: not padded, not copied); ctx and a
        bilinear q are stacked to (T, B, ...) for the weight gradients after the loop.
        With the kernels the gates come packed (n_t, 4U)."""
        units = w.hidden.shape[0]
        if self.kernel is not None:
            gates: Any = Unstacked("float32", (4 * units,))  # packed gates (n_t, 4U)
        else:
            raw = Unstacked("float32", (units,))  # (n_t, U)
            gates = GruGates(raw, raw, raw, raw)
        if self.split:  # ctx, tanh(keys + q) (n_t, G, A)
            dtype = "float32" if self.kernel is not None else enc["keys"].dtype
            return StepSaved(gates, ctx=w.ctx.dtype,
                             th=Unstacked(dtype, tuple(enc["keys"].shape[1:])))
        if self.attention is not None:  # ctx, q
            return StepSaved(gates, ctx=w.ctx.dtype, q=w.hidden.dtype)
        return StepSaved(gates)

    # ---- the backward pass ----------------------------------------------------------------
    def _backward(self, dhs, dalphas, x_all, h0, hs, alphas, saved, w, enc, counts):
        """Gradients of (x_all, h0, keys, features, *weights) from dL/dhs, dL/dalphas: a
        flat tuple in that order, as ``tf.custom_gradient`` wants it."""
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
            out = tf.nest.map_structure(lambda s: _pad_rows(s, batch, n), out)  # (B, ...)
            return (_merge_rows(dh_n, dh, n), acc), out

        (dh0, acc), outs = _loop(body, steps, (tf.zeros_like(h0), acc0),
                                 self._grad_dtypes(w), reverse=True)
        g = self._input_grads(acc, outs, alphas, saved, w, enc, h_prev)
        weights = StepWeights(hidden=g.hidden, bias_h=g.bias_h, ctx=g.ctx, v=g.v,
                              v_bias=g.v_bias)
        return (outs.dx, dh0, g.keys, g.features, *weights)  # unroll's run() argument order

    def _grad_accumulators(self, enc, w) -> GradSums:
        """Loop-carried sums (:class:`GradSums`), all zero."""
        bias = tf.zeros_like(w.bias_h)  # (3U,)
        if not self.split:
            return GradSums(bias)
        keys = enc["keys"]
        return GradSums(bias, m=tf.zeros(tf.shape(keys), "float32"),  # (B, G, A)
                        s=tf.zeros(tf.shape(keys)[:2], "float32"),  # (B, G)
                        v=tf.zeros(tf.shape(w.v), "float32"))  # (A, 1)

    def _grad_dtypes(self, w) -> StepGrads:
        """Per-step outputs of the backward loop (:class:`StepGrads`): their dtypes."""
        if self.attention is None:
            return StepGrads("float32", w.hidden.dtype)
        return StepGrads("float32", w.hidden.dtype, dctx=w.ctx.dtype, ds="float32")

    def _step_grad(self, dh, dalpha, h, alpha, saved: StepSaved, w, wt, enc, acc: GradSums,
                   n=None) -> tuple[tf.Tensor, GradSums, StepGrads]:
        """One step back on the (first n) active rows: dL/dh_t (n, U) -> dL/dh_{t-1},
        updated sums, per-step outputs."""
        cd = w.hidden.dtype
        kernel = self.kernel
        gru_grad = gru_update_grad if kernel is None else kernel.gru_grad
        dx, dhr, dh_prev = gru_grad(dh, h, saved.gates)  # (B, 3U), (B, 3U), (B, U)
        acc = acc._replace(bias=acc.bias + tf.reduce_sum(dhr, 0))  # (3U,)
        if self.attention is None:
            dhq = tf.cast(dhr, cd)  # (B, 3U)
            dh_prev += tf.cast(tf.matmul(dhq, wt.hidden), "float32")
            return dh_prev, acc, StepGrads(dx, dhq)
        dctx = tf.matmul(tf.cast(dx, w.ctx.dtype), wt.ctx)  # (B, E)
        dalpha += tf.cast(tf.einsum("bge,be->bg", enc["features"], dctx), "float32")
        ds = alpha * (dalpha - tf.reduce_sum(alpha * dalpha, -1, keepdims=True))  # (B, G)
        th = saved.th if self.split else None  # (B, G, A) from the forward pass
        dq, acc = self._scores_grad(ds, w, enc, acc, n, th)
        if self.split:
            dhq = tf.concat([tf.cast(dq, cd), tf.cast(dhr, cd)], -1)  # (B, A + 3U)
        else:
            dhq = tf.cast(dhr, cd)  # (B, 3U)
            dh_prev += dq
        dh_prev += tf.cast(tf.matmul(dhq, wt.hidden), "float32")  # (B, U)
        return dh_prev, acc, StepGrads(dx, dhq, dctx=dctx, ds=ds)

    def _scores_grad(self, ds, w, enc, acc: GradSums, n, th
                     ) -> tuple[tf.Tensor, GradSums]:
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
        kernel = self.kernel
        if kernel is not None:  # one pass over th; m updated in place on n rows
            dq, dv, m = kernel.scores_grad(th, ds, tf.cast(w.v[:, 0], "float32"), acc.m)
            return dq, acc._replace(m=m, s=_add_rows(acc.s, ds, n), v=acc.v + dv[:, None])
        th2 = tf.cast(th * th, "float32")  # (B, G, A)
        dq = -tf.einsum("bg,bga->ba", ds, th2) * tf.cast(w.v[:, 0], "float32")  # (B, A)
        dv = tf.einsum("bg,bga->a", ds, tf.cast(th, "float32"))[:, None]  # (A, 1)
        return dq, acc._replace(m=_add_rows(acc.m, ds[:, :, None] * th2, n),
                                s=_add_rows(acc.s, ds, n), v=acc.v + dv)

    def _input_grads(self, acc: GradSums, outs: StepGrads, alphas, saved: StepSaved, w, enc,
                     h_prev) -> InputGrads:
        """Gradients of (keys, features, *weights) once the loop is done, each as one
        matmul over all T*B rows; ``outs`` and ``saved`` are stacked to (T, B, ...)."""
        cd = w.hidden.dtype
        d_hidden = _rows_matmul(tf.cast(h_prev, cd), outs.dhq)  # (U, A + 3U) or (U, 3U)
        if self.attention is None:  # keys and features are stand-ins: w.v
            return InputGrads(keys=tf.zeros_like(w.v), features=tf.zeros_like(w.v),
                              hidden=d_hidden, bias_h=acc.bias, ctx=tf.zeros_like(w.ctx),
                              v=tf.zeros_like(w.v), v_bias=tf.zeros_like(w.v_bias))
        ctx = saved.ctx  # (T, B, E)
        dctx = outs.dctx  # (T, B, E)
        d_ctx_w = _rows_matmul(ctx, tf.cast(outs.dx, cd))  # (E, 3U)
        d_features = tf.einsum("tbg,tbe->bge", tf.cast(alphas, dctx.dtype), dctx)  # (B, G, E)
        if self.split:
            dv = acc.v  # (A, 1)
            d_keys = tf.cast(w.v[:, 0], "float32") * (acc.s[:, :, None] - acc.m)  # (B, G, A)
        else:
            q = saved.q  # (T, B, U)
            d_keys = tf.einsum("tbg,tbu->bgu", outs.ds, tf.cast(q, "float32"))  # (B, G, U)
            dv = tf.zeros_like(w.v)  # (0, 1)
        keys = enc["keys"]
        return InputGrads(keys=tf.cast(d_keys, keys.dtype),
                          features=tf.cast(d_features, enc["features"].dtype),
                          hidden=d_hidden, bias_h=acc.bias,
                          ctx=tf.cast(d_ctx_w, w.ctx.dtype), v=tf.cast(dv, w.v.dtype),
                          v_bias=tf.zeros_like(w.v_bias))


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

