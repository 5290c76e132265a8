"""The fused additive-attention kernel (captioner.kernels): both ops against NumPy and
TensorFlow references, the registered gradient, the recurrence and the model with and
without it, the build (fallback, errors, cache), the config key and the bench report."""

from __future__ import annotations

import logging
import os
import shutil
import stat

import keras
import numpy as np
import pytest
import tensorflow as tf

from captioner.model.kernels import (
    AttentionKernel,
    KernelBuild,
    KernelBuildError,
    attention_kernel,
    build_library,
)
from captioner.model.layers import AttentionDecoder, CaptionModel
from captioner.model.recurrence import Recurrence, StepWeights

# grids (B, G, C) go straight to the encoder: G = 4 (a 2x2 grid of 8 channels)
TINY_MODEL = dict(vocab_size=13, image_size=4, cnn_filters=[8], cnn_kernels=[1, 1],
                  embedding_dim=6, units=10, attention_units=7, dropout=0.0)


@pytest.fixture(scope="module")
def kernel() -> AttentionKernel:
    """The compiled kernel, built (or found in the cache) the way the model builds it."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler to build the attention kernel")
    return attention_kernel("fused")


def _normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype("float32")


def _close(actual, expected, rtol: float, err_msg: str = "") -> None:
    """allclose with a relative tolerance and an absolute one scaled by the largest value."""
    expected = np.asarray(expected)
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=rtol * 0.1 * scale,
                               err_msg=err_msg)


# ---- the forward op --------------------------------------------------------------------
SHAPES = [  # n rows used of b, grid cells g, attention units a
    (3, 3, 5, 8), (2, 5, 7, 37), (4, 4, 1, 16), (3, 3, 6, 1), (1, 1, 49, 64), (0, 2, 3, 5),
]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("n, b, g, a", SHAPES)
def test_scores_match_numpy(kernel, n, b, g, a, compiled):
    rng = np.random.default_rng(n * 1000 + g * 10 + a)
    keys, q, v = _normal(rng, b, g, a), _normal(rng, b, a), _normal(rng, a)
    th_ref = np.tanh(keys[:n].astype("float64") + q[:n, None].astype("float64"))
    scores_ref = th_ref @ v.astype("float64")

    def run(keys, q, v):
        return kernel.scores(keys[:n], q[:n], v)  # a dim-0 slice of a (b, ...) tensor

    fn = tf.function(run) if compiled else run
    th, scores = fn(tf.constant(keys), tf.constant(q), tf.constant(v))
    assert th.shape == (n, g, a) and scores.shape == (n, g)
    assert th.dtype == scores.dtype == tf.float32
    np.testing.assert_allclose(th.numpy(), th_ref, rtol=1e-5, atol=1e-6)
    _close(scores.numpy(), scores_ref, 1e-5)
    # the TensorFlow-op formulation the decoder uses without the kernel, too
    th_tf = tf.tanh(keys[:n] + q[:n, None])
    _close(scores.numpy(), tf.einsum("nga,a->ng", th_tf, v).numpy(), 1e-5)


# ---- the gradient op -------------------------------------------------------------------
def _grad_inputs(n: int, b: int, g: int, a: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    th = np.tanh(_normal(rng, n, g, a, scale=1.5))
    return th, _normal(rng, n, g), _normal(rng, a), _normal(rng, b, g, a)


def _grad_reference(th, ds, v, acc):
    th64, ds64 = th.astype("float64"), ds.astype("float64")
    dq = v * np.einsum("ng,nga->na", ds64, 1.0 - th64**2)
    dv = np.einsum("ng,nga->a", ds64, th64)
    acc_out = acc.astype("float64").copy()
    acc_out[:len(th)] += ds64[..., None] * th64**2
    return dq, dv, acc_out


def _check_grad(out, th, ds, v, acc):
    dq, dv, acc_out = (x.numpy() for x in out)
    dq_ref, dv_ref, acc_ref = _grad_reference(th, ds, v, acc)
    n = len(th)
    assert dq.shape == dq_ref.shape and dv.shape == dv_ref.shape and acc_out.shape == acc.shape
    _close(dq, dq_ref, 1e-5, "dq")
    _close(dv, dv_ref, 1e-5, "dv")
    _close(acc_out[:n], acc_ref[:n], 1e-5, "acc_out[:n]")
    np.testing.assert_array_equal(acc_out[n:], acc[n:], err_msg="rows n.. of acc changed")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("n, b, g, a", SHAPES)
def test_scores_grad_matches_numpy_and_leaves_acc_alone(kernel, n, b, g, a, compiled):
    th, ds, v, acc = _grad_inputs(n, b, g, a, seed=n + g + a)
    acc_t = tf.constant(acc)
    fn = tf.function(kernel.scores_grad) if compiled else kernel.scores_grad
    out = fn(tf.constant(th), tf.constant(ds), tf.constant(v), acc_t)
    _check_grad(out, th, ds, v, acc)
    np.testing.assert_array_equal(acc_t.numpy(), acc)  # the caller's tensor is unchanged
    out2 = fn(tf.constant(th), tf.constant(ds), tf.constant(v), acc_t)  # same again
    for first, second in zip(out, out2):
        np.testing.assert_array_equal(first.numpy(), second.numpy())


def test_scores_grad_never_changes_a_tensor_still_in_use(kernel):
    """Inside a graph acc may be updated in place only when nothing else reads it: an
    intermediate returned or used afterwards, a function argument and a variable keep
    their values; an intermediate used by the op alone gives the right result."""
    n, b, g, a = 2, 3, 4, 37
    th, ds, v, acc = _grad_inputs(n, b, g, a, seed=7)
    th_t, ds_t, v_t = tf.constant(th), tf.constant(ds), tf.constant(v)

    @tf.function
    def returned(acc_in):
        m = acc_in * 2.0
        return m, kernel.scores_grad(th_t, ds_t, v_t, m)

    m, out = returned(tf.constant(acc))
    np.testing.assert_array_equal(m.numpy(), 2.0 * acc)
    _check_grad(out, th, ds, v, 2.0 * acc)

    @tf.function
    def used_after(acc_in):
        m = acc_in + 1.0
        out = kernel.scores_grad(th_t, ds_t, v_t, m)
        with tf.control_dependencies([out[2]]):
            later = m * 3.0  # runs after the op: must still see m, not acc_out
        return out, later

    out, later = used_after(tf.constant(acc))
    _close(later.numpy(), 3.0 * (acc + 1.0), 1e-6)
    _check_grad(out, th, ds, v, acc + 1.0)

    @tf.function
    def consumed(acc_in):
        return kernel.scores_grad(th_t, ds_t, v_t, acc_in * 1.0)  # free to be reused

    for _ in range(2):  # the in-place path gives the same result every call
        _check_grad(consumed(tf.constant(acc)), th, ds, v, acc)

    var = tf.Variable(acc)
    _check_grad(kernel.scores_grad(th_t, ds_t, v_t, var), th, ds, v, acc)
    _check_grad(tf.function(lambda: kernel.scores_grad(th_t, ds_t, v_t, var))(),
                th, ds, v, acc)
    np.testing.assert_array_equal(var.numpy(), acc)


# ---- shape errors ----------------------------------------------------------------------
def _scores_args(bad: str):
    keys, q, v = tf.zeros((3, 4, 5)), tf.zeros((3, 5)), tf.zeros((5,))
    return {"query rows": (keys, q[:2], v), "query width": (keys, q[:, :4], v),
            "v length": (keys, q, v[:3]), "keys rank": (keys[0], q, v)}[bad]


def _grad_args(bad: str):
    th, ds, v, acc = tf.zeros((3, 4, 5)), tf.zeros((3, 4)), tf.zeros((5,)), tf.zeros((6, 4, 5))
    return {"ds rows": (th, ds[:2], v, acc), "ds cells": (th, ds[:, :3], v, acc),
            "v length": (th, ds, v[:4], acc), "acc rows < n": (th, ds, v, acc[:2]),
            "acc cells": (th, ds, v, acc[:, :3]), "acc width": (th, ds, v, acc[..., :4])}[bad]


def _shapes_in(message: str, *tensors: tf.Tensor) -> bool:
    return all(str(t.shape.as_list()).replace(" ", "") in message.replace(" ", "")
               for t in tensors)


@pytest.mark.parametrize("bad", ["query rows", "query width", "v length", "keys rank"])
def test_scores_rejects_bad_shapes_naming_them(kernel, bad):
    args = _scores_args(bad)
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        kernel.scores(*args)
    assert "AdditiveAttentionScores" in str(info.value)
    assert _shapes_in(str(info.value), *args), str(info.value)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)) as info:
        tf.function(kernel.scores)(*args)  # shape inference while tracing, or at run time
    assert "AdditiveAttentionScores" in str(info.value)


@pytest.mark.parametrize("bad", ["ds rows", "ds cells", "v length", "acc rows < n",
                                 "acc cells", "acc width"])
def test_scores_grad_rejects_bad_shapes_naming_them(kernel, bad):
    args = _grad_args(bad)
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        kernel.scores_grad(*args)
    assert "AdditiveAttentionScoresGrad" in str(info.value)
    assert _shapes_in(str(info.value), *args), str(info.value)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)) as info:
        tf.function(kernel.scores_grad)(*args)
    assert "AdditiveAttentionScoresGrad" in str(info.value)


def test_scores_grad_rank_error_names_the_shapes(kernel):
    args = (tf.zeros((4, 5)), tf.zeros((3, 4)), tf.zeros((5,)), tf.zeros((6, 4, 5)))
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        kernel.scores_grad(*args)  # eager: no shape function runs, only the kernel's check
    assert _shapes_in(str(info.value), *args), str(info.value)


# ---- the registered gradient -----------------------------------------------------------
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("uses", ["both", "scores", "th"])
def test_registered_gradient_matches_tensorflow_ops(kernel, uses, compiled):
    rng = np.random.default_rng(11)
    n, g, a = 3, 6, 37
    keys, q, v = (tf.constant(x) for x in (_normal(rng, n, g, a), _normal(rng, n, a),
                                           _normal(rng, a)))
    w_scores, w_th = tf.constant(_normal(rng, n, g)), tf.constant(_normal(rng, n, g, a))

    def loss_of(th, scores):
        loss = tf.constant(0.0)
        if uses in ("both", "scores"):
            loss += tf.reduce_sum(tf.sin(scores) * w_scores)
        if uses in ("both", "th"):
            loss += tf.reduce_sum(th * th * w_th)
        return loss

    def fused(keys, q, v):
        return kernel.scores(keys, q, v)

    def reference(keys, q, v):
        th = tf.tanh(keys + q[:, None])
        return th, tf.einsum("nga,a->ng", th, v)

    def grads(scores_fn, keys, q, v):
        with tf.GradientTape() as tape:
            tape.watch([keys, q, v])
            loss = loss_of(*scores_fn(keys, q, v))
        return [loss, *tape.gradient(loss, [keys, q, v],
                                     unconnected_gradients=tf.UnconnectedGradients.ZERO)]

    run = tf.function(grads) if compiled else grads
    ours = run(fused, keys, q, v)
    ref = run(reference, keys, q, v)
    for name, x, y in zip(["loss", "keys", "q", "v"], ours, ref):
        _close(x.numpy(), y.numpy(), 1e-5, name)
    assert float(tf.reduce_max(tf.abs(ours[1]))) > 0  # the gradient really flows


# ---- the recurrence --------------------------------------------------------------------
class _Counting:
    """Delegates to the kernel, counting calls (the recurrence must really use it)."""

    def __init__(self, kernel: AttentionKernel):
        self.kernel = kernel
        self.calls = {"scores": 0, "scores_grad": 0, "gru": 0, "gru_grad": 0}

    def _call(self, name, *args):
        self.calls[name] += 1
        return getattr(self.kernel, name)(*args)

    def scores(self, *args):
        return self._call("scores", *args)

    def scores_grad(self, *args):
        return self._call("scores_grad", *args)

    def gru(self, *args):
        return self._call("gru", *args)

    def gru_grad(self, *args):
        return self._call("gru_grad", *args)


def _unroll_inputs(t=5, b=4, g=6, u=5, a=7, e=3, seed=0):
    rng = np.random.default_rng(seed)
    w = StepWeights(hidden=_normal(rng, u, a + 3 * u, scale=0.4),
                    bias_h=_normal(rng, 3 * u, scale=0.1), ctx=_normal(rng, e, 3 * u, scale=0.4),
                    v=_normal(rng, a, 1), v_bias=_normal(rng, 1))
    tensors = {"x_all": _normal(rng, t, b, 3 * u), "h0": np.tanh(_normal(rng, b, u)),
               "keys": _normal(rng, b, g, a), "features": _normal(rng, b, g, e)}
    upstream = (_normal(rng, t, b, u), _normal(rng, t, b, g))
    return ({k: tf.constant(x) for k, x in tensors.items()},
            StepWeights(*(tf.constant(x) for x in w)), tuple(tf.constant(x) for x in upstream))


def _unroll_and_grads(rec, inputs, w, upstream, counts):
    with tf.GradientTape() as tape:
        tape.watch([*inputs.values(), *w])
        enc = {"keys": inputs["keys"], "features": inputs["features"]}
        hs, alphas = rec.unroll(inputs["x_all"], inputs["h0"], w, enc, counts)
        loss = tf.reduce_sum(hs * upstream[0]) + tf.reduce_sum(tf.square(alphas) * upstream[1])
    grads = tape.gradient(loss, [*inputs.values(), *w],
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return hs, alphas, grads


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("counts", [None, [4, 4, 3, 1, 0]], ids=["all rows", "ragged"])
def test_unroll_with_kernel_equals_tensorflow_ops(kernel, counts, compiled):
    inputs, w, upstream = _unroll_inputs()
    counts = None if counts is None else tf.constant(counts, tf.int32)
    counting = _Counting(kernel)
    fused, plain = Recurrence("additive", 7, counting), Recurrence("additive", 7, None)
    assert fused.kernel is counting and plain.kernel is None
    results = []
    for rec in (fused, plain):
        fn = tf.function(_unroll_and_grads) if compiled else _unroll_and_grads
        results.append(fn(rec, inputs, w, upstream, counts))
    assert min(counting.calls.values()) >= 1, counting.calls
    (hs, alphas, grads), (hs_ref, alphas_ref, grads_ref) = results
    _close(hs.numpy(), hs_ref.numpy(), 1e-5, "hs")
    _close(alphas.numpy(), alphas_ref.numpy(), 1e-5, "alphas")
    names = [*inputs, *StepWeights._fields]
    for name, x, y in zip(names, grads, grads_ref):
        assert x.shape == y.shape, name
        _close(x.numpy(), y.numpy(), 1e-4, name)
    for name in ("x_all", "h0", "keys", "features", "hidden", "ctx", "v"):
        assert np.abs(grads_ref[names.index(name)].numpy()).max() > 0, name  # not vacuous
    if counts is not None:  # rows past counts[t] carry their state, alpha 0
        np.testing.assert_array_equal(hs.numpy()[4, :], hs.numpy()[3, :])
        assert np.all(alphas.numpy()[4] == 0) and np.all(alphas.numpy()[3, 1:] == 0)


def test_recurrence_without_additive_scores_ignores_the_kernel(kernel):
    assert Recurrence("dot", 7, kernel).kernel is None
    assert Recurrence(None, 7, kernel).kernel is None
    for kw in ({"attention": "general"}, {"attend": "after"}):
        dec = AttentionDecoder(9, 4, 6, attention_units=5, attention_kernel="fused", **kw)
        assert dec.recurrence.kernel is None, kw
    dec = AttentionDecoder(9, 4, 6, attention_units=5, attention_kernel="fused")
    assert dec.recurrence.kernel is kernel


# ---- the model -------------------------------------------------------------------------
def _model_pair():
    keras.utils.set_random_seed(5)
    models = {}
    for choice in ("fused", "tensorflow"):
        model = CaptionModel(**TINY_MODEL, attention_kernel=choice)
        model((tf.zeros((1, 4, 8)), tf.ones((1, 2), tf.int32)))  # grids: builds the encoder
        models[choice] = model
    models["tensorflow"].set_weights(models["fused"].get_weights())
    return models


@pytest.fixture(scope="module")
def model_pair(kernel):
    return _model_pair()


def _batch():
    rng = np.random.default_rng(2)
    grids = tf.constant(_normal(rng, 4, 4, 8))
    tokens = tf.constant([[1, 4, 5, 6, 7, 2], [1, 7, 4, 2, 0, 0], [1, 5, 5, 9, 2, 0],
                          [1, 2, 0, 0, 0, 0]], tf.int32)
    return grids, tokens


def test_models_are_built_with_and_without_the_kernel(model_pair, kernel):
    assert model_pair["fused"].decoder.recurrence.kernel is kernel
    assert model_pair["tensorflow"].decoder.recurrence.kernel is None
    for choice, model in model_pair.items():
        assert model.get_config()["attention_kernel"] == choice
        assert model.decoder.get_config()["attention_kernel"] == choice
        clone = CaptionModel.from_config(model.get_config())
        assert clone.args["attention_kernel"] == choice
        assert (clone.decoder.recurrence.kernel is kernel) == (choice == "fused")


@pytest.mark.parametrize("mode", ["teacher forcing", "target mask", "scheduled sampling"])
def test_model_logits_alphas_and_gradients_agree(model_pair, mode):
    from captioner.train.steps import caption_loss

    grids, tokens = _batch()
    targets = tokens[:, 1:]
    extra = {"teacher forcing": {}, "target mask": {"target_mask": tf.not_equal(targets, 0)},
             "scheduled sampling": {"sampling_prob": tf.constant(0.5),
                                    "seed": tf.constant([3, 4])}}[mode]
    out = {}
    for choice, model in model_pair.items():
        with tf.GradientTape() as tape:
            logits, alphas = model((grids, tokens[:, :-1]), training=True, **extra)
            loss, _, _ = caption_loss(logits, targets, alphas, 0, 1.0)
        grads = tape.gradient(loss, model.trainable_variables)  # the backbone's: None (grids)
        out[choice] = (logits.numpy(), alphas.numpy(), float(loss),
                       [None if x is None else tf.convert_to_tensor(x).numpy() for x in grads])
    (logits, alphas, loss, grads), (logits_r, alphas_r, loss_r, grads_r) = (
        out["fused"], out["tensorflow"])
    mask = tf.not_equal(targets, 0).numpy()
    _close(logits[mask], logits_r[mask], 1e-5, "logits")
    _close(alphas, alphas_r, 1e-5, "alphas")
    assert loss == pytest.approx(loss_r, rel=1e-5)
    variables = model_pair["fused"].trainable_variables
    assert len(grads) == len(grads_r) == len(variables)
    compared = set()
    for var, x, y in zip(variables, grads, grads_r):
        assert (x is None) == (y is None), var.path
        if x is not None:
            _close(x, y, 1e-4, var.path)
            compared.add(var.path)
    for needed in ("attention/V/kernel", "attention/W1/kernel", "attention/W2/kernel",
                   "encoder/proj/kernel", "decoder/gru_recurrent"):  # really compared
        assert any(path.endswith(needed) for path in compared), (needed, compared)


def test_decoding_step_agrees(model_pair):
    grids, tokens = _batch()
    out = []
    for model in model_pair.values():
        enc = model.encode(grids)
        h = model.decoder.initial_state(enc)
        for t in range(3):
            log_probs, h, alpha = model.decoder.step(tokens[:, t], h, enc)
        out.append((log_probs.numpy(), h.numpy(), alpha.numpy()))
    for x, y in zip(*out):
        _close(x, y, 1e-5)


def test_fused_build_failure_in_the_model_names_the_config_key(monkeypatch):
    import captioner.model.recurrence as recurrence_module

    def broken(choice, build=None):
        raise KernelBuildError("no C++ compiler 'nope'")

    monkeypatch.setattr(recurrence_module, "attention_kernel", broken)
    dec = AttentionDecoder(9, 4, 6, attention_units=5, attention_kernel="fused")
    dec.build((None, 3, 4))  # neither constructing nor building resolves the kernel
    with pytest.raises(ValueError, match=r"model\.attention_kernel=fused.*nope"):
        dec(dec.prepare(tf.ones((2, 3, 4))), tf.ones((2, 3), tf.int32))  # the first use


def _counting_loader(monkeypatch, result=None):
    """Replace the kernel loader by one that records its calls and returns ``result``
    (by default what the real loader returns)."""
    import captioner.model.kernels as kernels_module

    real, calls = kernels_module._load, []

    def load(build):
        calls.append(build)
        return real(build) if result is None else result

    monkeypatch.setattr(kernels_module, "_load", load)
    return calls


@pytest.mark.filterwarnings("ignore:Layer .* looks like it has unbuilt state")
def test_constructing_the_model_does_not_build_or_load_the_kernel(monkeypatch):
    calls = _counting_loader(monkeypatch, KernelBuildError("no library: stub loader"))
    models = {choice: CaptionModel(**TINY_MODEL, attention_kernel=choice)
              for choice in ("fused", "auto", "tensorflow")}  # builds the decoder too
    AttentionDecoder(9, 4, 6, attention_units=5, attention_kernel="fused")
    clone = CaptionModel.from_config(models["fused"].get_config())
    assert calls == []
    models["tensorflow"]((tf.zeros((1, 4, 8)), tf.ones((1, 2), tf.int32)))
    assert calls == []  # tensorflow never loads it
    with pytest.raises(ValueError, match=r"model\.attention_kernel=fused.*stub loader"):
        clone((tf.zeros((1, 4, 8)), tf.ones((1, 2), tf.int32)))  # the first forward pass
    assert len(calls) == 1


def test_the_kernel_is_resolved_once_at_the_first_forward_pass(kernel, monkeypatch):
    calls = _counting_loader(monkeypatch)
    gpu = bool(tf.config.list_physical_devices("GPU"))
    for choice in ("fused", "auto"):
        calls.clear()
        model = CaptionModel(**TINY_MODEL, attention_kernel=choice)
        assert calls == []
        inputs = (tf.zeros((2, 4, 8)), tf.ones((2, 3), tf.int32))
        model(inputs)
        resolved = 0 if choice == "auto" and gpu else 1  # auto skips the CPU kernel on a GPU
        assert len(calls) == resolved, choice
        model(inputs, sampling_prob=tf.constant(0.5))
        enc = model.encode(inputs[0])
        model.decoder.step(inputs[1][:, 0], model.decoder.initial_state(enc), enc)
        model.decoder.cross_entropy(tf.constant([1, 2]), tf.zeros((2, 13)))
        assert len(calls) == resolved, choice  # kept, not resolved again
        expected = None if resolved == 0 else kernel
        assert model.decoder.recurrence.kernel is expected


# ---- choosing and building -------------------------------------------------------------
def _missing_compiler(tmp_path) -> str:
    # unique per test: _load and the fallback warning are cached per build / message
    return str(tmp_path / "nonexistent" / "g++")


def test_auto_and_tensorflow_choices(kernel):
    assert attention_kernel("tensorflow") is None
    if tf.config.list_physical_devices("GPU"):
        assert attention_kernel("auto") is None  # the ops are CPU-only
    else:
        assert attention_kernel("auto") is kernel  # the default build, loaded once
    assert attention_kernel("fused") is kernel


def test_choices_and_fallback(tmp_path, caplog):
    build = KernelBuild(compiler=_missing_compiler(tmp_path), cache_dir=tmp_path / "cache")
    assert attention_kernel("tensorflow", build) is None
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("auto never uses the CPU kernel when a GPU is visible")
    with caplog.at_level(logging.WARNING, logger="captioner"):
        assert attention_kernel("auto", build) is None
    warnings = [r for r in caplog.records
                if r.name == "captioner" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and build.compiler in warnings[0].getMessage()
    with pytest.raises(KernelBuildError, match="nonexistent/g\\+\\+"):
        attention_kernel("fused", build)
    for bad in ("bogus", "Fused", ""):
        with pytest.raises(ValueError, match="attention_kernel"):
            attention_kernel(bad, build)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_build_library_without_the_compiler_names_it(tmp_path):
    build = KernelBuild(compiler=_missing_compiler(tmp_path), cache_dir=tmp_path)
    with pytest.raises(KernelBuildError, match="nonexistent/g\\+\\+"):
        build_library(build)


def _fake_compiler(tmp_path, script: str) -> str:
    """An executable ``fake-g++`` in ``tmp_path`` running the shell ``script``: its path."""
    path = tmp_path / "fake-g++"
    path.write_text(f"#!/bin/sh\n{script}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_failing_compiler_reports_its_stderr(tmp_path):
    compiler = _fake_compiler(tmp_path, "echo 'compiling...' \necho boom >&2\nexit 1\n")
    build = KernelBuild(compiler=compiler, cache_dir=tmp_path / "cache")
    with pytest.raises(KernelBuildError, match="boom") as info:
        build_library(build)
    assert "exit 1" in str(info.value)
    with pytest.raises(KernelBuildError, match="boom"):
        attention_kernel("fused", build)
    assert not list((tmp_path / "cache").iterdir())  # no library, no temporary left


def test_a_build_that_fails_for_this_cpu_is_tried_again_without_avx512_fp16(tmp_path):
    """TensorFlow's Eigen headers do not compile with -march=native on a CPU with
    AVX512-FP16 (g++ 12): the build tries again without it, then without -march."""
    calls = tmp_path / "calls.txt"
    compiler = _fake_compiler(tmp_path, f"""echo "$*" >> {calls}
case "$*" in *-mno-avx512fp16*) ;; *)
  echo "PacketMathFP16.h:740:49: error: expected initializer before '<' token" >&2
  exit 1;;
esac
while [ "$1" != "-o" ]; do shift; done
echo library > "$2"
""")
    build = KernelBuild(compiler=compiler, cache_dir=tmp_path / "cache")
    path = build_library(build)
    assert path == build.library_path() and path.read_text() == "library\n"
    tried = [line for line in calls.read_text().splitlines() if "-shared" in line]
    assert len(tried) == 2 and "-march=native" in tried[0].split()
    assert "-mno-avx512fp16" not in tried[0] and "-mno-avx512fp16" in tried[1].split()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [path.name]


def test_a_compiler_that_fails_every_way_reports_the_first_error(tmp_path):
    calls = tmp_path / "calls.txt"
    compiler = _fake_compiler(tmp_path, f'echo "$*" >> {calls}\necho "no: $*" >&2\nexit 1\n')
    with pytest.raises(KernelBuildError) as info:
        build_library(KernelBuild(compiler=compiler, cache_dir=tmp_path / "cache"))
    tried = [line.split() for line in calls.read_text().splitlines() if "-shared" in line]
    assert [("-march=native" in t, "-mno-avx512fp16" in t) for t in tried] == [
        (True, False), (True, True), (False, False)]
    assert "-mno-avx512fp16" not in str(info.value)  # the first command's messages


def test_build_caches_by_fingerprint(tmp_path):
    """The build's naming, caching and clean-up, on a one-line source with the kernel's
    compiler flags (compiling the kernel itself is what the ``kernel`` fixture does)."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler")
    source = tmp_path / "src" / "tiny_op.cc"
    source.parent.mkdir()
    source.write_text('extern "C" int tiny_op() { return 1; }\n')
    cache = tmp_path / "cache"
    build = KernelBuild(source=source, cache_dir=cache)
    fingerprint = build.fingerprint()
    assert len(fingerprint) == 16 and fingerprint == KernelBuild(
        source=source, cache_dir=cache).fingerprint()
    path = build_library(build)  # compiled here, never loaded
    assert path == cache / f"tiny_op-{fingerprint}.so" == build.library_path()
    assert path.is_file() and path.stat().st_size > 0
    assert sorted(cache.iterdir()) == [path]  # the temporary build directory is gone
    mtime = path.stat().st_mtime_ns
    assert build_library(KernelBuild(source=source, cache_dir=cache)) == path
    assert path.stat().st_mtime_ns == mtime and sorted(cache.iterdir()) == [path]

    source.write_text(source.read_text() + "// one more comment\n")
    edited = KernelBuild(source=source, cache_dir=cache)
    assert edited.fingerprint() != fingerprint and edited.library_path() != path
    assert KernelBuild(compiler="/nonexistent/g++", source=source, cache_dir=cache
                       ).fingerprint() != fingerprint
    assert KernelBuild(cache_dir=cache).fingerprint() != fingerprint  # the kernel's source


# ---- config and bench --------------------------------------------------------------------
def test_config_key_is_validated_and_reaches_the_model(kernel):
    from captioner.config import Config, ConfigError, apply_overrides, config_from_dict

    with pytest.raises(ConfigError, match=r"model\.attention_kernel"):
        apply_overrides(Config(), ["model.attention_kernel=bogus"])
    with pytest.raises(ConfigError, match=r"model\.attention_kernel"):
        config_from_dict({"model": {"attention_kernel": "cuda"}})
    assert Config().model.attention_kernel == "auto"
    sizes = ["model.image_size=16", "model.cnn_filters=[4]", "model.embedding_dim=4",
             "model.units=6", "model.attention_units=5"]
    for choice in ("fused", "tensorflow"):
        cfg = apply_overrides(Config(), [*sizes, f"model.attention_kernel={choice}"])
        assert cfg.model.attention_kernel == choice
        model = CaptionModel.from_model_config(cfg.model, vocab_size=9)
        assert model.get_config()["attention_kernel"] == choice
        assert (model.decoder.recurrence.kernel is kernel) == (choice == "fused")


def test_bench_flag_accepts_the_choices_only():
    import argparse

    from captioner.cli import add_bench_arguments

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    assert parser.parse_args([]).attention_kernel == "auto"
    assert parser.parse_args(["--attention-kernel", "fused"]).attention_kernel == "fused"
    with pytest.raises(SystemExit):
        parser.parse_args(["--attention-kernel", "bogus"])


@pytest.mark.parametrize("choice", ["fused", "tensorflow"])
def test_bench_reports_the_kernel_that_ran(kernel, choice):
    from captioner.bench import run_bench

    result = run_bench(batch_size=4, grid=4, feature_dim=8, embedding_dim=8, units=8,
                       vocab_size=20, max_length=6, steps=2, peak_seconds=0.05,
                       decode_repeats=1, attention_kernel=choice)
    assert result["attention_kernel"] == choice
    assert np.isfinite(result["loss_first"]) and result["train_images_per_s"] > 0


def test_a_second_build_in_the_same_process_is_refused(kernel, tmp_path):
    """Ops are registered once per process: another build's library must not be returned
    as a kernel without ops (auto falls back, fused raises)."""
    source = tmp_path / "decoder_step.cc"
    source.write_text(KernelBuild().source.read_text() + "\n// another build\n")
    other = KernelBuild(source=source, cache_dir=tmp_path / "cache")
    other.library_path().parent.mkdir()
    other.library_path().write_bytes(b"not a library")  # built already: found, never loaded
    with pytest.raises(KernelBuildError, match="already loaded"):
        attention_kernel("fused", other)
    assert attention_kernel("auto", other) is None


# ---- the wider query, the GRU update and the cross-entropy ------------------------------
def test_scores_read_the_first_a_columns_of_a_wider_query(kernel):
    """The decoder passes the whole fused-matmul output h [W2 | U_r] as the query."""
    rng = np.random.default_rng(5)
    n, g, a, extra = 3, 4, 6, 9
    keys, wide, v = (tf.constant(x) for x in (_normal(rng, n, g, a), _normal(rng, n, a + extra),
                                              _normal(rng, a)))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(wide)
        th, scores = kernel.scores(keys, wide, v)
        th_ref, scores_ref = kernel.scores(keys, wide[:, :a], v)
        loss, loss_ref = (tf.reduce_sum(tf.sin(s)) for s in (scores, scores_ref))
    np.testing.assert_array_equal(th.numpy(), th_ref.numpy())
    np.testing.assert_array_equal(scores.numpy(), scores_ref.numpy())
    dq, dq_ref = tape.gradient(loss, wide), tape.gradient(loss_ref, wide)
    assert dq.shape == (n, a + extra)
    _close(dq.numpy(), dq_ref.numpy(), 1e-6)
    assert not np.any(dq.numpy()[:, a:]) and np.any(dq.numpy()[:, :a])


def _gru_inputs(n, u, k, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(tf.constant(x) for x in (_normal(rng, n, 3 * u), _normal(rng, n, k),
                                          _normal(rng, 3 * u), _normal(rng, n, u)))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("n, u, k", [(4, 5, 15), (3, 8, 31), (1, 1, 3), (0, 4, 12)])
def test_gru_matches_tensorflow_ops(kernel, n, u, k, compiled):
    from captioner.model.recurrence import gru_update, gru_update_grad

    x, hq, bias, h = _gru_inputs(n, u, k, seed=n + u + k)
    dh = tf.constant(_normal(np.random.default_rng(1), n, u))

    def both(x, hq, bias, h, dh):
        h_new, gates = kernel.gru(x, hq, bias, h)
        return (h_new, gates, *kernel.gru_grad(dh, h, gates))

    def reference(x, hq, bias, h, dh):
        h_new, g = gru_update(x, hq[:, k - 3 * u:] + bias, h)
        return (h_new, tf.concat(list(g), -1), *gru_update_grad(dh, h, g))

    run = tf.function(both) if compiled else both
    ours, ref = run(x, hq, bias, h, dh), reference(x, hq, bias, h, dh)
    for name, a, b in zip(["h_new", "gates", "dx", "dhr", "dh"], ours, ref):
        assert a.shape == b.shape, name
        _close(a.numpy(), b.numpy(), 1e-5, name)


def test_gru_registered_gradient_matches_tensorflow_ops(kernel):
    """Scheduled sampling differentiates through ``step``: GruUpdate's registered
    gradient must equal autodiff of the TensorFlow-op GRU (x, hq, bias and h)."""
    from captioner.model.recurrence import gru_update

    n, u, k = 4, 5, 19  # 4 query columns before the GRU's 15
    inputs = _gru_inputs(n, u, k, seed=3)
    w = tf.constant(_normal(np.random.default_rng(4), n, u))

    def grads(fn):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = tf.reduce_sum(tf.sin(fn(*inputs)) * w)
        return tape.gradient(loss, inputs, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    ours = grads(lambda x, hq, b, h: kernel.gru(x, hq, b, h)[0])
    ref = grads(lambda x, hq, b, h: gru_update(x, hq[:, k - 3 * u:] + b, h)[0])
    for name, a, b in zip(["x", "hq", "bias", "h"], ours, ref):
        _close(a.numpy(), b.numpy(), 1e-5, name)
    assert not np.any(ours[1].numpy()[:, :k - 3 * u])  # the query columns get nothing here


@pytest.mark.parametrize("bad", ["x width", "hq narrow", "bias length", "rows"])
def test_gru_rejects_bad_shapes_naming_them(kernel, bad):
    x, hq, bias, h = _gru_inputs(3, 4, 12)
    x, hq, bias, h = {"x width": (x[:, :-1], hq, bias, h), "hq narrow": (x, hq[:, :-1], bias, h),
                      "bias length": (x, hq, bias[:-1], h), "rows": (x, hq, bias, h[:2])}[bad]
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        kernel.gru(x, hq, bias, h)
    assert "GruUpdate" in str(info.value) and _shapes_in(str(info.value), x, hq, bias, h)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("scale", [1.0, 80.0])  # 80: exp overflows without the max shift
def test_cross_entropy_matches_tensorflow(kernel, scale, compiled):
    rng = np.random.default_rng(int(scale))
    logits = tf.constant(_normal(rng, 7, 301, scale=scale))
    labels = tf.constant(rng.integers(0, 301, 7).astype("int32"))
    w = tf.constant(_normal(rng, 7))

    def run(xent, logits):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            nll = xent(labels, logits)
            loss = tf.reduce_sum(nll * w)
        return nll, tape.gradient(loss, logits)

    fn = tf.function(run) if compiled else run
    nll, grad = fn(kernel.cross_entropy, logits)
    nll_ref, grad_ref = fn(tf.nn.sparse_softmax_cross_entropy_with_logits, logits)
    assert np.all(np.isfinite(nll.numpy())) and nll.shape == (7,)
    _close(nll.numpy(), nll_ref.numpy(), 1e-5, "nll")
    _close(grad.numpy(), grad_ref.numpy(), 1e-5, "grad")


def test_cross_entropy_rejects_a_label_out_of_range(kernel):
    logits = tf.zeros((3, 5))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"label 5 at row 1 .*\[0, 5\)"):
        kernel.cross_entropy(tf.constant([0, 5, 2]), logits)


def test_decoder_cross_entropy_with_and_without_the_kernel(model_pair):
    fused, plain = model_pair["fused"], model_pair["tensorflow"]
    rng = np.random.default_rng(2)
    logits = tf.constant(_normal(rng, 5, 13, scale=3.0))
    labels = tf.constant([0, 12, 3, 3, 7])
    assert fused.decoder.recurrence.kernel is not None and plain.decoder.recurrence.kernel is None
    _close(fused.decoder.cross_entropy(labels, logits).numpy(),
           plain.decoder.cross_entropy(labels, logits).numpy(), 1e-5)
