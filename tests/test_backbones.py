"""Pretrained backbones: grid shapes, preprocessing, trainable modes, weights files, configs.

No ImageNet download: networks use ``weights=None`` or a file the test writes itself.
Images are small (96 px; 75 px for InceptionV3) and batches hold one or two images.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from captioner.model.backbones import (
    PretrainedBackbone,
    SmallCNN,
    available_backbones,
    backbone_variables,
    build_backbone,
    default_image_size,
    save_backbone_weights,
)

# name -> (small size, its grid, channels, documented size, its grid, keras module)
CASES = {
    "efficientnet_b0": (96, (3, 3), 1280, 224, (7, 7), keras.applications.efficientnet),
    "mobilenet_v2": (96, (3, 3), 1280, 224, (7, 7), keras.applications.mobilenet_v2),
    "resnet50": (96, (3, 3), 2048, 224, (7, 7), keras.applications.resnet50),
    "inception_v3": (75, (1, 1), 2048, 299, (8, 8), keras.applications.inception_v3),
}


@pytest.fixture(scope="module")
def frozen() -> dict[str, PretrainedBackbone]:
    """One frozen, randomly initialised backbone per name, built once for the module."""
    keras.utils.set_random_seed(0)
    return {name: PretrainedBackbone(name, case[0]) for name, case in CASES.items()}


def images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3)).astype("float32")


def different(a: np.ndarray, b: np.ndarray) -> bool:
    """Relative comparison: random-init networks give tiny (~1e-12) activations."""
    return not np.allclose(a, b, rtol=1e-3, atol=0.0)


def mobilenet(**kw) -> PretrainedBackbone:
    return PretrainedBackbone("mobilenet_v2", 96, **kw)


# ---- shapes -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_grid_shape_and_feature_dim(frozen, name):
    size, grid, channels, big, big_grid, _ = CASES[name]
    bb = frozen[name]
    out = bb(bb.preprocess(images(size, batch=1)))
    assert out.shape == (1, *grid, channels)
    assert bb.grid_hw(size) == grid and bb.feature_dim == channels
    assert bb.grid_hw(big) == big_grid  # shape inference only, no forward pass
    assert default_image_size(name) == big
    assert np.isfinite(out.numpy()).all()


def test_too_small_image_is_rejected(frozen):
    with pytest.raises(ValueError, match="image_size=74 is too small for inception_v3"):
        frozen["inception_v3"].grid_hw(74)


# ---- preprocessing ------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_preprocess_matches_keras_eager_and_in_tf_data(frozen, name):
    bb, module = frozen[name], CASES[name][5]
    pixels = images(8, seed=1)
    expected = module.preprocess_input(pixels.copy())
    eager = bb.preprocess(tf.constant(pixels))
    np.testing.assert_allclose(eager.numpy(), expected, rtol=1e-6, atol=1e-4)
    in_data = next(iter(tf.data.Dataset.from_tensors(pixels).map(bb.preprocess)))
    np.testing.assert_allclose(in_data.numpy(), expected, rtol=1e-6, atol=1e-4)
    in_graph = tf.function(bb.preprocess)(tf.constant(pixels.astype("uint8")))
    np.testing.assert_allclose(in_graph.numpy(),
                               module.preprocess_input(pixels.astype("uint8")), atol=1e-4)


def test_preprocess_ranges(frozen):
    pixels = tf.constant([[[[0, 128, 255]]]], "uint8")
    np.testing.assert_allclose(frozen["efficientnet_b0"].preprocess(pixels), [[[[0, 128, 255]]]])
    np.testing.assert_allclose(frozen["mobilenet_v2"].preprocess(pixels),
                               [[[[-1.0, 128 / 127.5 - 1, 1.0]]]], rtol=1e-4)
    np.testing.assert_allclose(frozen["resnet50"].preprocess(pixels),  # BGR minus means
                               [[[[255 - 103.939, 128 - 116.779, -123.68]]]], rtol=1e-5)


# ---- trainable modes ----------------------------------------------------------------------
def test_frozen_has_no_trainable_weights_and_bn_in_inference(frozen):
    bb = frozen["efficientnet_b0"]  # BatchNorm and dropout inside
    assert bb.trainable_mode == "frozen" and bb.trainable_weights == []
    assert backbone_variables(bb) == [] and len(bb.non_trainable_weights) == len(bb.weights)
    bn = next(lay for lay in bb.network.layers if isinstance(lay, keras.layers.BatchNormalization))
    mean_before = bn.moving_mean.numpy().copy()
    x = bb.preprocess(images(96))
    np.testing.assert_array_equal(bb(x, training=True).numpy(), bb(x, training=False).numpy())
    np.testing.assert_array_equal(bn.moving_mean.numpy(), mean_before)


def test_full_mode_trains_everything_and_bn_uses_batch_statistics():
    bb = mobilenet(trainable="full")
    assert len(backbone_variables(bb)) == len(bb.network.trainable_weights) > 0
    assert len(bb.trainable_weights) + len(bb.non_trainable_weights) == len(bb.weights)
    x = bb.preprocess(images(96))
    assert different(bb(x, training=True).numpy(), bb(x, training=False).numpy())


def test_fine_tune_trains_exactly_the_layers_from_the_named_one():
    bb = mobilenet(trainable="fine_tune", fine_tune_from="block_13_expand")
    layers = bb.network.layers
    start = [lay.name for lay in layers].index("block_13_expand")
    assert [lay.trainable for lay in layers] == [i >= start for i in range(len(layers))]
    expected = {id(v) for lay in layers[start:] for v in lay.trainable_weights}
    assert {id(v) for v in backbone_variables(bb)} == expected
    assert 0 < len(expected) < len(bb.network.weights)
    frozen_bn = bb.network.get_layer("block_12_project_BN")
    live_bn = bb.network.get_layer("block_13_expand_BN")
    assert not frozen_bn.trainable and live_bn.trainable
    before = [bn.moving_mean.numpy().copy() for bn in (frozen_bn, live_bn)]
    bb(bb.preprocess(images(96)), training=True)
    np.testing.assert_array_equal(frozen_bn.moving_mean.numpy(), before[0])  # inference mode
    assert different(live_bn.moving_mean.numpy(), before[1])  # batch statistics


def test_fine_tune_gradients_reach_only_the_trainable_part_in_tf_function():
    bb = mobilenet(trainable="fine_tune", fine_tune_from="block_16_expand")
    variables = backbone_variables(bb)

    @tf.function
    def grads(images):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(bb(bb.preprocess(images), training=True) ** 2)
        return tape.gradient(loss, variables)

    assert all(g is not None for g in grads(tf.constant(images(96, batch=1))))
    frozen_kernel = bb.network.get_layer("block_15_expand").kernel
    assert id(frozen_kernel) not in {id(v) for v in variables}


def test_fine_tune_bad_layer_names_list_valid_ones():
    with pytest.raises(ValueError, match=r"not a layer of mobilenet_v2.*block_13_expand"):
        mobilenet(trainable="fine_tune", fine_tune_from="block_13_expnd")
    with pytest.raises(ValueError, match="needs fine_tune_from"):
        PretrainedBackbone("resnet50", 96, trainable="fine_tune")
    with pytest.raises(ValueError, match="trainable must be one of"):
        PretrainedBackbone("resnet50", 96, trainable="partly")


# ---- weights --------------------------------------------------------------------------
def test_local_weights_file_round_trip(tmp_path):
    keras.utils.set_random_seed(1)
    source = mobilenet(weights=None)
    path = tmp_path / "w.weights.h5"
    save_backbone_weights(source, path)
    loaded = mobilenet(weights=str(path))
    other = mobilenet(weights=None)
    for a, b in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    x = source.preprocess(images(96))
    np.testing.assert_array_equal(loaded(x).numpy(), source(x).numpy())
    assert different(other(x).numpy(), source(x).numpy())
    assert loaded.get_config()["weights"] == str(path)


def test_legacy_h5_file_as_keras_applications_ships(tmp_path):
    legacy = pytest.importorskip("keras.src.legacy.saving.legacy_h5_format")
    h5py = pytest.importorskip("h5py")
    source = mobilenet(weights=None)
    path = tmp_path / "mobilenet_notop.h5"
    with h5py.File(path, "w") as f:  # the layout of Keras' downloaded *_notop.h5 files
        legacy.save_weights_to_hdf5_group(f, source.network)
    loaded = mobilenet(weights=str(path))
    for a, b in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_missing_weights_file_names_path_and_key(tmp_path):
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(FileNotFoundError, match=r"nope\.weights\.h5.*model\.weights"):
        PretrainedBackbone("resnet50", 96, weights=str(missing))
    with pytest.raises(FileNotFoundError, match="nope"):
        build_backbone("small_cnn", 32, weights=missing, cnn_filters=[8])


def test_imagenet_is_forwarded_to_keras_applications(monkeypatch):
    calls = []
    real = keras.applications.MobileNetV2

    def fake(**kwargs):
        calls.append(kwargs)
        return real(**{**kwargs, "weights": None})  # no download here

    monkeypatch.setattr(keras.applications, "MobileNetV2", fake)
    bb = mobilenet(weights="imagenet")
    assert calls[0]["weights"] == "imagenet" and calls[0]["include_top"] is False
    assert bb.get_config()["weights"] == "imagenet"


# ---- config ---------------------------------------------------------------------------
def test_config_round_trip_gives_same_outputs():
    bb = PretrainedBackbone("resnet50", 96, trainable="fine_tune",
                           fine_tune_from="conv5_block1_1_conv", name="bb")
    config = bb.get_config()
    assert {k: config[k] for k in ("name_", "image_size", "weights", "trainable",
                                   "fine_tune_from", "name")} == {
        "name_": "resnet50", "image_size": 96, "weights": None, "trainable": "fine_tune",
        "fine_tune_from": "conv5_block1_1_conv", "name": "bb"}
    clone = keras.layers.deserialize(keras.layers.serialize(bb))
    assert isinstance(clone, PretrainedBackbone) and clone.get_config() == config
    assert len(clone.trainable_weights) == len(bb.trainable_weights) > 0
    clone.set_weights(bb.get_weights())
    x = bb.preprocess(images(96, batch=1))
    np.testing.assert_allclose(clone(x).numpy(), bb(x).numpy(), rtol=1e-5, atol=1e-5)


# ---- mixed precision ------------------------------------------------------------------------
def test_mixed_bfloat16_output_is_finite_and_global_policy_restored():
    bb = build_backbone("mobilenet_v2", 96, trainable="frozen",
                        dtype=keras.DTypePolicy("mixed_bfloat16"))
    assert keras.config.dtype_policy().name == "float32"
    assert bb.network.get_layer("Conv1").compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in bb.weights)
    out = bb(bb.preprocess(images(96, batch=1)))
    assert out.dtype == tf.bfloat16 and out.shape == (1, 3, 3, 1280)
    assert np.isfinite(tf.cast(out, "float32").numpy()).all()


# ---- factory --------------------------------------------------------------------------
def test_build_backbone_names_and_errors():
    assert available_backbones() == ("small_cnn", "efficientnet_b0", "mobilenet_v2",
                                     "resnet50", "inception_v3")
    with pytest.raises(ValueError, match=r"unknown backbone 'vgg16'.*small_cnn.*resnet50"):
        build_backbone("vgg16", 224)
    with pytest.raises(ValueError, match="unknown backbone"):
        PretrainedBackbone("small_cnn", 224)
    with pytest.raises(ValueError, match="unknown backbone"):
        default_image_size("vgg16")
    with pytest.raises(ValueError, match="no 'imagenet' weights"):
        build_backbone("small_cnn", 32, weights="imagenet")


def test_build_backbone_small_cnn_weights_and_modes(tmp_path):
    kw = dict(cnn_filters=[8, 16], cnn_kernels=[3, 3])
    cnn = build_backbone("small_cnn", 32, **kw)
    assert isinstance(cnn, SmallCNN) and cnn.name == "backbone" and cnn.grid_hw(32) == (8, 8)
    assert len(backbone_variables(cnn)) == len(cnn.trainable_weights) == 12
    path = tmp_path / "cnn.weights.h5"
    save_backbone_weights(cnn, path)
    loaded = build_backbone("small_cnn", 32, weights=str(path), trainable="frozen", **kw)
    assert backbone_variables(loaded) == []
    x = cnn.preprocess(images(32))
    np.testing.assert_array_equal(loaded(x, training=True).numpy(), cnn(x).numpy())
    tuned = build_backbone("small_cnn", 32, trainable="fine_tune", fine_tune_from="conv1_0",
                           **kw)
    assert 0 < len(backbone_variables(tuned)) < 12
    mixed = build_backbone("small_cnn", 32, dtype=keras.DTypePolicy("mixed_bfloat16"), **kw)
    assert mixed(x).dtype == tf.bfloat16


@pytest.mark.parametrize("norm", ["batch", "group", "plain"])
def test_small_cnn_norms(norm):
    """group and none use no batch statistics: training and inference agree; batch
    normalisation in training mode does not (it normalises with the batch's own)."""
    from captioner.model.backbones import SmallCNN

    cnn = SmallCNN([8, 16], norm=norm)
    x = tf.random.stateless_uniform((4, 16, 16, 3), (1, 2))
    train, infer = cnn(x, training=True), cnn(x, training=False)
    assert train.shape == (4, 4, 4, 16)
    same = np.allclose(train.numpy(), infer.numpy(), atol=1e-5)
    assert same == (norm != "batch")
    alone = cnn(x[:1], training=True).numpy()  # a picture's features do not depend on the batch
    assert np.allclose(alone, train[:1].numpy(), atol=1e-5) == (norm != "batch")
    names = {w.path.split("/")[-2] for w in cnn.weights}
    assert any(n.startswith({"batch": "bn", "group": "gn", "plain": "conv"}[norm]) for n in names)
    clone = SmallCNN.from_config(cnn.get_config())
    assert clone.norm == norm
