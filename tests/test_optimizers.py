"""FusedAdam: the same updates, slots and checkpoints as Keras' Adam."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from captioner.config import Config
from captioner.train.optimizers import FusedAdam
from captioner.train.steps import make_optimizer


def _variables(seed: int) -> list[keras.Variable]:
    rng = np.random.default_rng(seed)
    return [keras.Variable(rng.normal(size=(6, 4)).astype("float32"), name="w"),
            keras.Variable(rng.normal(size=(4,)).astype("float32"), name="b"),
            keras.Variable(rng.normal(size=(10, 3)).astype("float32"), name="emb")]


def _grads(step: int) -> list:
    rng = np.random.default_rng(100 + step)
    sparse = tf.IndexedSlices(tf.constant(rng.normal(size=(2, 3)).astype("float32")),
                              tf.constant([1, 7]), tf.constant([10, 3]))
    return [tf.constant(rng.normal(size=(6, 4)).astype("float32") * 3),
            tf.constant(rng.normal(size=(4,)).astype("float32")), sparse]


def _train(opt: keras.optimizers.Optimizer, steps: int, compiled: bool) -> list[np.ndarray]:
    variables = _variables(0)
    opt.build(variables)

    def apply(grads):
        opt.apply_gradients(zip(grads, variables))

    fn = tf.function(apply) if compiled else apply
    for step in range(steps):
        fn(_grads(step))
    return [v.numpy() for v in variables] + [s.numpy() for s in opt.variables[1:]]


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_fused_adam_matches_keras_adam(compiled, clip):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, 2, 0.5)
    ours = _train(FusedAdam(schedule, global_clipnorm=clip), 5, compiled)
    ref = _train(keras.optimizers.Adam(schedule, global_clipnorm=clip), 5, compiled)
    assert len(ours) == len(ref) == 3 + 6  # weights, then m and v of each
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the weights moved (a test that a no-op update would fail)
    assert not np.allclose(ours[0], _variables(0)[0].numpy())


def test_fused_adam_checkpoint_restores_into_keras_adam(tmp_path):
    variables = _variables(0)
    opt = FusedAdam(0.01)
    opt.build(variables)
    opt.apply_gradients(zip(_grads(0), variables))
    path = tf.train.Checkpoint(optimizer=opt).save(str(tmp_path / "ckpt"))
    other = keras.optimizers.Adam(0.01)
    other.build(_variables(1))
    tf.train.Checkpoint(optimizer=other).restore(path).assert_existing_objects_matched()
    assert int(other.iterations.numpy()) == 1
    for a, b in zip(opt.variables, other.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_make_optimizer_is_fused_adam_and_amsgrad_falls_back():
    assert isinstance(make_optimizer(Config(), total_steps=10), FusedAdam)
    ours = _train(FusedAdam(0.05, amsgrad=True), 3, compiled=True)
    ref = _train(keras.optimizers.Adam(0.05, amsgrad=True), 3, compiled=True)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-6)
