"""Shapes of every layer, config round trips, attention variants and the GRU state."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from captioner.model.backbones import SmallCNN
from captioner.model.layers import AttentionDecoder, CaptionModel, FeatureEncoder, GridAttention

SMALL = dict(vocab_size=11, image_size=32, cnn_filters=[8, 16], embedding_dim=12, units=20,
             attention_units=10, dropout=0.0)


def small_model(**kw):
    return CaptionModel(**{**SMALL, **kw}).build_weights()


def test_small_cnn_grid_shape():
    cnn = SmallCNN([8, 16, 24, 32, 32])
    assert cnn.grid_hw(224) == (7, 7)
    out = cnn(tf.zeros((2, 224, 224, 3)))
    assert out.shape == (2, 7, 7, 32)


def test_encoder_shape_and_relu():
    enc = FeatureEncoder(embedding_dim=6, grid_size=49)
    out = enc(tf.random.normal((3, 49, 10)))
    assert out.shape == (3, 49, 6)
    assert float(tf.reduce_min(out)) >= 0.0


@pytest.mark.parametrize("kind, key_dim", [("additive", 7), ("general", 12), ("dot", 12)])
def test_attention_shapes_and_softmax(kind, key_dim):
    att = GridAttention(kind, units=7)
    feats, h = tf.random.normal((2, 49, 12)), tf.random.normal((2, 12))
    att.build(feats.shape, h.shape)
    keys = att.keys(feats)
    assert keys.shape == (2, 49, key_dim)
    alpha = att.weights_for(keys, h)
    assert alpha.shape == (2, 49)
    np.testing.assert_allclose(tf.reduce_sum(alpha, -1).numpy(), [1.0, 1.0], rtol=1e-5)
    context, alpha2 = att(feats, h)
    assert context.shape == (2, 12)
    np.testing.assert_allclose(alpha2.numpy(), alpha.numpy(), rtol=1e-6)


def test_dot_attention_rejects_mismatched_sizes():
    att = GridAttention("dot", units=4)
    with pytest.raises(ValueError, match="dot attention"):
        att.build((None, 49, 12), (None, 20))


def test_decoder_shapes():
    dec = AttentionDecoder(vocab_size=9, embedding_dim=12, units=20, attention_units=10)
    dec.build((None, 49, 12))
    enc = dec.prepare(tf.random.normal((3, 49, 12)))
    logits, alpha = dec(enc, tf.ones((3, 5), tf.int32))
    assert logits.shape == (3, 5, 9) and alpha.shape == (3, 5, 49)
    h0 = dec.initial_state(enc)
    log_probs, h1, a1 = dec.step(tf.ones((3,), tf.int32), h0, enc)
    assert log_probs.shape == (3, 9) and h1.shape == (3, 20) and a1.shape == (3, 49)
    np.testing.assert_allclose(tf.reduce_sum(tf.exp(log_probs), -1).numpy(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("attend", ["before", "after"])
def test_teacher_forcing_equals_stepwise_decoding(attend):
    """The unrolled training loop and the inference step compute the same thing,
    which also shows the GRU state is carried from step to step."""
    model = small_model(attend=attend)
    images = tf.random.uniform((2, 32, 32, 3), 0, 255, tf.int32)
    images = tf.cast(images, tf.uint8)
    tokens = tf.constant([[1, 4, 5, 6], [1, 7, 4, 4]])
    logits, alphas = model((images, tokens))
    enc = model.encode(images)
    h = model.decoder.initial_state(enc)
    for t in range(tokens.shape[1]):
        log_probs, h, alpha = model.decoder.step(tokens[:, t], h, enc)
        np.testing.assert_allclose(log_probs.numpy(), tf.nn.log_softmax(logits[:, t]).numpy(),
                                   atol=1e-5)
        np.testing.assert_allclose(alpha.numpy(), alphas[:, t].numpy(), atol=1e-6)


@pytest.mark.parametrize("attend", ["before", "after"])
def test_state_carries_history(attend):
    """Changing an early token changes later outputs: the state is not dropped."""
    model = small_model(attend=attend)
    images = tf.zeros((1, 32, 32, 3), tf.uint8)
    a, _ = model((images, tf.constant([[1, 4, 5, 5]])))
    b, _ = model((images, tf.constant([[1, 7, 5, 5]])))
    assert not np.allclose(a[0, 3].numpy(), b[0, 3].numpy())


@pytest.mark.parametrize("attend", ["before", "after"])
def test_keys_computed_once_per_image(monkeypatch, attend):
    model = small_model(attend=attend)
    calls = []
    original = model.decoder.attention.keys
    monkeypatch.setattr(model.decoder.attention, "keys",
                        lambda f: calls.append(1) or original(f))
    model((tf.zeros((2, 32, 32, 3), tf.uint8), tf.ones((2, 6), tf.int32)))
    assert len(calls) == 1


@pytest.mark.parametrize("init_state", ["mean", "zeros"])
def test_initial_state_choice(init_state):
    model = small_model(init_state=init_state)
    enc = model.encode(tf.random.uniform((2, 32, 32, 3), 0, 255).numpy().astype("uint8"))
    h0 = model.decoder.initial_state(enc).numpy()
    assert h0.shape == (2, 20)
    assert (np.all(h0 == 0)) == (init_state == "zeros")


@pytest.mark.parametrize("attention, attend", [("additive", "before"), ("general", "before"),
                                               ("dot", "before"), ("additive", "after")])
def test_model_rebuilds_from_config(attention, attend):
    kw = {"attention": attention, "attend": attend}
    if attention == "dot":
        kw["units"] = 12
    model = small_model(**kw)
    clone = CaptionModel.from_config(model.get_config()).build_weights()
    assert clone.count_params() == model.count_params()
    clone.set_weights(model.get_weights())
    x = (tf.random.uniform((2, 32, 32, 3), 0, 255, tf.int32), tf.ones((2, 3), tf.int32))
    np.testing.assert_allclose(model(x)[0].numpy(), clone(x)[0].numpy(), atol=1e-6)


def test_layer_configs_hold_init_arguments():
    assert SmallCNN([4, 8]).get_config()["filters"] == [4, 8]
    enc_cfg = FeatureEncoder(5, 16, 0.2, False).get_config()
    assert (enc_cfg["embedding_dim"], enc_cfg["grid_size"], enc_cfg["dropout"],
            enc_cfg["positional"]) == (5, 16, 0.2, False)
    assert GridAttention("general", 3).get_config()["kind"] == "general"
    dec_cfg = AttentionDecoder(9, 4, 6, "dot", 2, 0.1, "zeros", "after").get_config()
    assert (dec_cfg["vocab_size"], dec_cfg["attention"], dec_cfg["init_state"],
            dec_cfg["attend"]) == (9, "dot", "zeros", "after")


def test_attention_for_all_steps_matches_per_step():
    att = GridAttention("additive", units=5)
    feats, hs = tf.random.normal((2, 49, 6)), tf.random.normal((2, 3, 8))
    att.build(feats.shape, (None, 8))
    keys = att.keys(feats)
    together = att.weights_for(keys, hs).numpy()  # (B, T, G)
    for t in range(3):
        np.testing.assert_allclose(together[:, t], att.weights_for(keys, hs[:, t]).numpy(),
                                   atol=1e-6)


@pytest.mark.parametrize("attend", ["before", "after"])
def test_scheduled_sampling_path_shapes_and_zero_prob_equals_teacher_forcing(attend):
    model = small_model(attend=attend)
    x = (tf.zeros((2, 32, 32, 3), tf.uint8), tf.constant([[1, 4, 5, 6], [1, 7, 4, 4]]))
    tf_logits, _ = model(x)
    ss_logits, ss_alpha = model(x, sampling_prob=tf.constant(0.0), seed=tf.constant([1, 2]))
    assert ss_alpha.shape == (2, 4, 64)
    np.testing.assert_allclose(ss_logits.numpy(), tf_logits.numpy(), atol=1e-5)
    always, _ = model(x, sampling_prob=tf.constant(1.0), seed=tf.constant([1, 2]),
                      greedy_sampling=True)
    assert not np.allclose(always.numpy(), tf_logits.numpy())


def test_mixed_bfloat16_policy_runs():
    model = CaptionModel(**SMALL, dtype=keras.DTypePolicy("mixed_bfloat16")).build_weights()
    logits, alpha = model((tf.zeros((1, 32, 32, 3), tf.uint8), tf.ones((1, 3), tf.int32)))
    assert logits.dtype == tf.float32 and alpha.dtype == tf.float32
    assert model.decoder.kernel_emb.dtype == "float32"
    w = model.decoder.step_weights()  # the per-step matmuls run in bfloat16
    assert (w.hidden.dtype, w.ctx.dtype, w.v.dtype) == (tf.bfloat16,) * 3
    assert model.decoder.fc2.compute_dtype == "bfloat16"


@pytest.mark.parametrize("attention, attend", [("additive", "before"), ("general", "before"),
                                               ("dot", "before"), ("additive", "after")])
def test_hand_written_backward_equals_autodiff(attention, attend):
    """The teacher-forced recurrence's custom gradient matches TensorFlow's autodiff of the
    same steps (the scheduled-sampling loop with probability 0), for every variable."""
    from captioner.train.steps import caption_loss

    kw = {"attention": attention, "attend": attend, "units": 12 if attention == "dot" else 20}
    keras.utils.set_random_seed(3)
    model = small_model(**kw)
    images = tf.cast(tf.random.uniform((3, 32, 32, 3), 0, 255, tf.int32), tf.uint8)
    tokens = tf.constant([[1, 4, 5, 6, 7, 2], [1, 7, 4, 4, 2, 0], [1, 5, 5, 2, 0, 0]])

    def grads(**extra):
        with tf.GradientTape() as tape:
            logits, alphas = model((images, tokens[:, :-1]), training=True, **extra)
            loss, _, _ = caption_loss(logits, tokens[:, 1:], alphas, 0, 1.0)
        return [tf.convert_to_tensor(g).numpy()
                for g in tape.gradient(loss, model.trainable_variables)]

    custom = grads()
    autodiff = grads(sampling_prob=tf.constant(0.0), seed=tf.constant([1, 2]))
    for var, a, b in zip(model.trainable_variables, custom, autodiff):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(b).max()),
                                   err_msg=var.path)


@pytest.mark.parametrize("attention, attend", [("additive", "before"), ("general", "before"),
                                               ("additive", "after")])
def test_target_mask_skips_padding_with_the_same_loss_and_gradients(attention, attend):
    """Rows of different lengths, not sorted, one target column all padding: with
    ``target_mask`` the recurrence runs on the rows still real at each step only, yet the
    outputs at real positions, the loss and every gradient equal the unmasked computation
    (hand-written backward) and TensorFlow's autodiff of the scheduled loop."""
    from captioner.train.steps import caption_loss

    keras.utils.set_random_seed(4)
    model = small_model(attention=attention, attend=attend)
    images = tf.cast(tf.random.uniform((4, 32, 32, 3), 0, 255, tf.int32), tf.uint8)
    tokens = tf.constant([[1, 5, 2, 0, 0, 0, 0], [1, 4, 5, 6, 7, 2, 0],
                          [1, 2, 0, 0, 0, 0, 0], [1, 7, 4, 2, 0, 0, 0]])
    targets = tokens[:, 1:]
    mask = tf.not_equal(targets, 0)  # (B, T); the last column is all padding

    def run(**extra):
        with tf.GradientTape() as tape:
            logits, alphas = model((images, tokens[:, :-1]), training=True, **extra)
            loss, _, _ = caption_loss(logits, targets, alphas, 0, 1.0)
        grads = [tf.convert_to_tensor(g).numpy()
                 for g in tape.gradient(loss, model.trainable_variables)]
        return float(loss), tf.boolean_mask(logits, mask).numpy(), grads

    masked = run(target_mask=mask)
    for reference in (run(), run(sampling_prob=tf.constant(0.0), seed=tf.constant([1, 2]))):
        assert masked[0] == pytest.approx(reference[0], rel=1e-5)
        np.testing.assert_allclose(masked[1], reference[1], atol=1e-5)
        for var, a, b in zip(model.trainable_variables, masked[2], reference[2]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(b).max()),
                                       err_msg=var.path)


def test_target_mask_runs_each_row_only_to_its_length(monkeypatch):
    """The step sees n_t rows: 4, 3, 2, 1 at t = 0..3 for lengths 2, 4, 1, 3, and
    alphas at padded positions are 0."""
    model = small_model()
    rows = []
    original = model.decoder.recurrence.step

    def step(x, h, w, enc):
        rows.append(int(x.shape[0]))
        return original(x, h, w, enc)

    monkeypatch.setattr(model.decoder.recurrence, "step", step)
    mask = tf.constant([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]) > 0
    _, alphas = model((tf.zeros((4, 32, 32, 3), tf.uint8), tf.ones((4, 4), tf.int32)),
                      target_mask=mask)  # eager: the loop body runs once per step
    assert rows == [4, 3, 2, 1]
    np.testing.assert_allclose(tf.reduce_sum(alphas, -1).numpy(), mask.numpy(), atol=1e-6)


@pytest.mark.parametrize("attend", ["before", "after"])
def test_mixed_bfloat16_stays_close_to_float32(attend):
    """Same (briefly trained) weights in both policies: the loss within 2e-2 relative,
    teacher-forced argmax >= 90% and greedy tokens >= 80% equal, attention within 0.05,
    and not bit-identical (bfloat16 really runs)."""
    from captioner.data.tokenizers import Tokenizer
    from captioner.generate.captioner import DecodeOptions, make_generate_function
    from captioner.train.steps import caption_loss, make_train_step

    kw = {**SMALL, "vocab_size": 40, "units": 32, "embedding_dim": 16, "attend": attend}
    keras.utils.set_random_seed(0)
    f32 = CaptionModel(**kw).build_weights()
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 255, (8, 32, 32, 3)), tf.uint8)
    tokens = tf.constant(np.concatenate([np.ones((8, 1)), rng.integers(4, 40, (8, 10)),
                                         np.full((8, 1), 2)], 1), tf.int32)
    step = make_train_step(f32, keras.optimizers.Adam(1e-2), 0, 0.0)
    for _ in range(40):
        step(images, tokens, tf.constant(0.0), tf.constant([0, 0]))
    bf16 = CaptionModel(**kw, dtype=keras.DTypePolicy("mixed_bfloat16")).build_weights()
    bf16.set_weights(f32.get_weights())
    out = []
    for model in (f32, bf16):
        logits, alphas = model((images, tokens[:, :-1]))
        loss = float(caption_loss(logits, tokens[:, 1:], alphas, 0, 1.0)[0])
        greedy = make_generate_function(model, Tokenizer, DecodeOptions("greedy"))
        ids = greedy(images, tf.constant(12), tf.constant([0, 0]))["tokens"].numpy()
        out.append((loss, logits.numpy(), alphas.numpy(), ids))
    (l32, z32, a32, g32), (l16, z16, a16, g16) = out
    assert abs(l16 - l32) <= 2e-2 * l32
    assert (z16.argmax(-1) == z32.argmax(-1)).mean() >= 0.9
    assert (g16 == g32).mean() >= 0.8
    assert np.abs(a16 - a32).max() <= 0.05
    assert not np.array_equal(z16, z32)


@pytest.mark.parametrize("kernels, padding", [([3, 3], "reflect"), ([2, 1], "same"), ([3], "same")])
def test_cnn_kernels_and_padding_keep_the_grid(kernels, padding):
    cnn = SmallCNN([4, 8, 8, 8], kernels, padding)
    assert cnn(tf.zeros((1, 112, 112, 3))).shape == (1, 7, 7, 8)
    n_convs = sum(isinstance(layer, keras.layers.Conv2D) for layer in cnn.net.layers)
    assert n_convs == 4 * len(kernels)
    assert SmallCNN.from_config(cnn.get_config()).padding == padding


def test_reflect_padding_has_no_border_artifact():
    """A constant image gives identical features in every cell with reflect padding,
    but not with zero padding."""
    images = tf.fill((1, 32, 32, 3), 200.0)
    for padding, uniform in (("reflect", True), ("same", False)):
        keras.utils.set_random_seed(1)
        cnn = SmallCNN([4, 8], padding=padding)
        out = cnn(SmallCNN.preprocess(images)).numpy()[0]  # (8, 8, C)
        assert np.allclose(out, out[3, 3], atol=1e-5) == uniform, padding


def test_pretrained_backbone_in_the_model():
    model = CaptionModel(vocab_size=9, image_size=96, backbone="mobilenet_v2",
                         trainable="frozen", embedding_dim=8, units=8,
                         attention_units=8).build_weights()
    assert model.grid_hw == (3, 3) and model.feature_dim == 1280
    backbone_ids = {id(v) for v in model.backbone.weights}
    assert not any(id(v) in backbone_ids for v in model.trainable_variables)
    images = tf.random.uniform((2, 96, 96, 3), 0, 255, tf.int32)
    grids = model.grid(tf.cast(images, tf.uint8))
    assert grids.shape == (2, 9, 1280)
    a, _ = model((tf.cast(images, tf.uint8), tf.ones((2, 3), tf.int32)))
    b, _ = model((grids, tf.ones((2, 3), tf.int32)))  # cached grids give the same result
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    clone = CaptionModel.from_config(model.get_config())
    assert clone.args["backbone"] == "mobilenet_v2" and clone.grid_hw == (3, 3)
