"""Loss, train step, checkpoints, resume and save -> load round trips."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from captioner.config import ConfigError
from captioner.data.images import load_image
from captioner.generate.captioner import Captioner
from captioner.model.layers import CaptionModel
from captioner.train.steps import (
    caption_loss,
    grounding_loss,
    make_optimizer,
    make_train_step,
    sampling_probability,
    training_loss,
)
from captioner.train.trainer import Trainer

from .conftest import copy_run


def test_caption_loss_by_hand():
    logits = tf.math.log(tf.constant([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3] * 3]]))
    targets = tf.constant([[1, 1, 0]])  # last position is padding (pad_id 0)
    alphas = tf.constant([[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]])
    loss, nll, reg = caption_loss(logits, targets, alphas, pad_id=0, attention_reg=2.0)
    expected_nll = (-np.log(0.25) - np.log(0.8)) / 2
    # coverage over real steps: [1.5, 0.5] -> (1-1.5)^2 + (1-0.5)^2 = 0.5; x2 / 2 tokens
    np.testing.assert_allclose(nll.numpy(), expected_nll, rtol=1e-6)
    np.testing.assert_allclose(reg.numpy(), 0.5, rtol=1e-6)
    np.testing.assert_allclose(loss.numpy(), expected_nll + 0.5, rtol=1e-6)


def test_train_step_lowers_loss_on_a_fixed_batch(tiny_config):
    keras.utils.set_random_seed(0)
    model = CaptionModel.from_model_config(tiny_config.model, vocab_size=12).build_weights()
    opt = make_optimizer(tiny_config, total_steps=1000)
    step = make_train_step(model, opt, pad_id=0, attention_reg=0.0)
    assert opt.built  # its slot variables exist before the first call: traced once, not twice
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 255, (8, 32, 32, 3)), tf.uint8)
    tokens = tf.constant(np.concatenate([np.ones((8, 1)), rng.integers(4, 12, (8, 5)),
                                         np.full((8, 1), 2), np.zeros((8, 2))], 1), tf.int32)
    args = (tf.constant(0.0), tf.constant([0, 0]))
    first = float(step(images, tokens, *args)["nll"])
    assert step.experimental_get_tracing_count() == 1
    for _ in range(80):
        last = float(step(images, tokens, *args)["nll"])
    assert last < 0.3 * first
    assert int(opt.iterations.numpy()) == 81
    assert step.experimental_get_tracing_count() == 1


def _fixed_batch(rng: np.random.Generator) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """8 random pictures, <start> 5 tokens <end> <pad> <pad>, and a cell for tokens 1-3."""
    images = tf.constant(rng.integers(0, 255, (8, 32, 32, 3)), tf.uint8)
    tokens = tf.constant(np.concatenate([np.ones((8, 1)), rng.integers(4, 12, (8, 5)),
                                         np.full((8, 1), 2), np.zeros((8, 2))], 1), tf.int32)
    cells = np.full((8, 9), -1, np.int32)
    cells[:, 1:4] = rng.integers(0, 64, (8, 3))  # an 8x8 grid (tiny_config: 32 px, /4)
    return images, tokens, tf.constant(cells)


def test_grounding_term_of_the_training_loss(tiny_config):
    keras.utils.set_random_seed(0)
    model = CaptionModel.from_model_config(tiny_config.model, vocab_size=12).build_weights()
    images, tokens, cells = _fixed_batch(np.random.default_rng(0))
    terms = training_loss(model, images, tokens, 0, 0.5, cells=cells, attention_supervision=2.0)
    _, alphas = model((images, tokens[:, :-1]), training=True, logits=False,
                      target_mask=tf.not_equal(tokens[:, 1:], 0))  # (B, T, G)
    assert alphas.shape[-1] == 64
    picked = np.take_along_axis(alphas.numpy(), np.maximum(cells.numpy()[:, 1:, None], 0), -1)
    by_hand = -np.log(picked[:, :3, 0] + 1e-6).sum()  # 24 supervised tokens
    assert float(grounding_loss(alphas, cells[:, 1:])) == pytest.approx(by_hand, rel=1e-4)
    np.testing.assert_allclose(terms["ground"], 2.0 * by_hand / 48, rtol=1e-4)  # 48 tokens
    np.testing.assert_allclose(terms["loss"], terms["nll"] + terms["reg"] + terms["ground"],
                               rtol=1e-6)
    unsupervised = training_loss(model, images, tokens, 0, 0.5, cells=tf.fill(cells.shape, -1),
                                 attention_supervision=2.0)
    assert float(unsupervised["ground"]) == 0.0
    assert float(unsupervised["loss"]) == pytest.approx(float(terms["loss"] - terms["ground"]),
                                                        rel=1e-5)


def test_attention_supervision_moves_the_attention_to_the_atoms(tiny_config):
    """Trained with cells, the attention of the supervised steps peaks on their cells."""
    keras.utils.set_random_seed(0)
    model = CaptionModel.from_model_config(tiny_config.model, vocab_size=12).build_weights()
    opt = make_optimizer(tiny_config, total_steps=1000)
    step = make_train_step(model, opt, pad_id=0, attention_reg=0.0, attention_supervision=1.0)
    images, tokens, cells = _fixed_batch(np.random.default_rng(1))
    args = (tf.constant(0.0), tf.constant([0, 0]))
    first = step(images, tokens, *args, cells)
    assert float(first["ground"]) > 0
    np.testing.assert_allclose(first["loss"], first["nll"] + first["reg"] + first["ground"],
                               rtol=1e-5)
    for _ in range(60):
        last = step(images, tokens, *args, cells)
    assert float(last["ground"]) < 0.2 * float(first["ground"])
    _, alphas = model((images, tokens[:, :-1]), training=False, logits=False)  # (B, T, G)
    peaks = np.argmax(alphas.numpy()[:, :3], -1)
    assert (peaks == cells.numpy()[:, 1:4]).mean() > 0.5  # chance: 1/64
    assert float(step(images, tokens, *args)["ground"]) == 0.0  # no cells: no term


def test_scheduled_sampling_probability_schedule(tiny_config):
    from captioner.config import apply_overrides

    cfg = apply_overrides(tiny_config, ["train.scheduled_sampling.enabled=true",
                                        "train.scheduled_sampling.start=0.0",
                                        "train.scheduled_sampling.end=0.5",
                                        "train.scheduled_sampling.from_epoch=1",
                                        "train.scheduled_sampling.to_epoch=5"])
    probs = [sampling_probability(cfg, e) for e in range(1, 7)]
    assert probs[0] == 0.0 and probs[-1] == 0.5
    assert probs == sorted(probs)
    np.testing.assert_allclose(probs[2], 0.25)
    assert sampling_probability(tiny_config, 3) == 0.0


def test_training_writes_the_run_directory(trained_run):
    for name in ("config.json", "tokenizer.json", "model.json", "history.json", "history.png",
                 "skipped_images.txt"):
        assert (trained_run / name).is_file(), name
    assert tf.train.latest_checkpoint(str(trained_run / "checkpoints"))
    assert tf.train.latest_checkpoint(str(trained_run / "best"))
    assert list((trained_run / "tensorboard").glob("events.out.tfevents.*"))
    history = json.loads((trained_run / "history.json").read_text())
    assert history["epoch"] == [1, 2]
    assert all(np.isfinite(history["loss"])) and all(np.isfinite(history["val_loss"]))
    assert history["val_metric_name"] == ["exact_match", "exact_match"]


def test_save_load_gives_identical_generations(trained_run, shapes_dir):
    images = sorted((shapes_dir / "images").glob("*.png"))[:6]
    a = Captioner.load(trained_run).generate(images)
    b = Captioner.load(trained_run).generate(images)
    assert a.texts == b.texts and a.tokens == b.tokens
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
    np.testing.assert_allclose(a.attention, b.attention, atol=1e-7)
    assert a.attention.shape[0] == 6 and a.attention.shape[2] == 64  # 8x8 grid at 32 px


def test_generation_stops_at_end_and_attention_is_aligned(trained_run, shapes_dir):
    cap = Captioner.load(trained_run)
    images = sorted((shapes_dir / "images").glob("*.png"))[:6]
    out = cap.generate(images, max_length=5)
    assert out.attention.shape[1] <= 5
    for ids, att in zip(out.tokens, out.attention):
        assert cap.tokenizer.end_id not in ids and cap.tokenizer.pad_id not in ids
        assert len(ids) <= 5
        np.testing.assert_allclose(att[: len(ids)].sum(-1), 1.0, rtol=1e-4)


def test_loaded_model_matches_trained_weights(trained_run):
    """Every trainable variable of the loaded model equals a tensor in the checkpoint,
    and the restored weights differ from a fresh initialisation."""
    cap = Captioner.load(trained_run, checkpoint="latest")
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(trained_run / "checkpoints")))
    saved = [reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
             if "OPTIMIZER_SLOT" not in k and k.endswith("VARIABLE_VALUE")]
    for var in cap.model.trainable_variables:
        value = var.numpy()
        assert any(s.shape == value.shape and np.array_equal(s, value) for s in saved), var.path
    fresh = CaptionModel.from_config(cap.model.get_config()).build_weights()
    assert any(not np.array_equal(a.numpy(), b.numpy())
               for a, b in zip(fresh.trainable_variables, cap.model.trainable_variables))


def _weights(model):
    return [w.numpy() for w in model.weights]


def test_resume_continues_at_the_saved_step(tiny_config, trained_run, tmp_path, monkeypatch):
    from captioner.config import apply_overrides

    # the straight run: trained_run, the same config trained 2 x 4 steps without a stop
    cfg = apply_overrides(tiny_config, ["train.epochs=2", "train.max_steps_per_epoch=4",
                                        "train.checkpoint_every=1"])
    straight = Captioner.load(trained_run, checkpoint="latest")

    # interrupt the same training after 6 steps (epoch 2, step 2) ...
    run = tmp_path / "interrupted"
    first = Trainer(cfg, run, log=lambda _: None)
    original = first.step_in_epoch.assign_add

    def stop_after_six(value):
        out = original(value)
        if int(first.optimizer.iterations.numpy()) == 6:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(first.step_in_epoch, "assign_add", stop_after_six)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    monkeypatch.undo()

    # ... and resume: it starts at epoch 2, step 2, and ends where the straight run did.
    second = Trainer(cfg, run, log=lambda _: None)
    assert int(second.epoch.numpy()) == 1 and int(second.step_in_epoch.numpy()) == 2
    assert int(second.optimizer.iterations.numpy()) == 6
    second.fit()
    assert int(second.optimizer.iterations.numpy()) == 8
    for a, b in zip(_weights(straight.model), _weights(second.model)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    history = json.loads((run / "history.json").read_text())
    assert history["epoch"] == [1, 2]


def test_more_epochs_on_a_finished_run_continue_it(tiny_config, trained_run, tmp_path):
    from captioner.config import apply_overrides

    run = copy_run(trained_run, tmp_path)
    more = Trainer(apply_overrides(tiny_config, ["train.epochs=3"]), run, log=lambda _: None)
    assert int(more.epoch.numpy()) == 2
    more.fit()
    assert json.loads((run / "history.json").read_text())["epoch"] == [1, 2, 3]


def test_changed_model_on_existing_run_is_refused(tiny_config, trained_run, tmp_path):
    from captioner.config import apply_overrides

    run = copy_run(trained_run, tmp_path)
    with pytest.raises(ConfigError, match="model"):
        Trainer(apply_overrides(tiny_config, ["model.units=48", "train.epochs=2"]), run,
                log=lambda _: None)


def test_mixed_bfloat16_training_step_runs(tiny_config, tmp_path):
    from captioner.config import apply_overrides

    cfg = apply_overrides(tiny_config, ["train.precision=mixed_bfloat16"])
    trainer = Trainer(cfg, tmp_path, log=lambda _: None)
    history = trainer.fit()
    assert np.isfinite(history["loss"][0])
    assert trainer.model.decoder.compute_dtype == "bfloat16"
    assert isinstance(trainer.model.dtype_policy, keras.DTypePolicy)


def test_scheduled_sampling_trains_in_the_compiled_step(tiny_config, tmp_path):
    from captioner.config import apply_overrides

    cfg = apply_overrides(tiny_config, ["train.epochs=2", "train.scheduled_sampling.enabled=true",
                                        "train.scheduled_sampling.start=0.1",
                                        "train.scheduled_sampling.end=0.5",
                                        "train.scheduled_sampling.to_epoch=2"])
    history = Trainer(cfg, tmp_path, log=lambda _: None).fit()
    assert history["sampling_prob"] == [0.1, 0.5]
    assert all(np.isfinite(history["loss"]))


def test_training_from_a_feature_cache(tiny_config, tmp_path):
    """A frozen backbone's grids are extracted once; training and validation read them,
    and the saved run still captions images end to end."""
    from captioner.config import apply_overrides
    from captioner.data.features import FeatureCache

    cache_dir = tmp_path / "cache"
    cfg = apply_overrides(tiny_config, ["model.trainable=frozen",
                                        f"data.feature_cache={cache_dir}",
                                        "data.shard_size=64"])
    trainer = Trainer(cfg, tmp_path / "run", log=lambda _: None)
    cache = FeatureCache(cache_dir).open()
    n_images = sum(s.num_images for s in (trainer.data.train, trainer.data.val,
                                          trainer.data.test))
    assert len(cache.paths) == n_images and cache.grid_shape == (64, 16)
    assert trainer.data.train.images is None
    assert trainer.data.val.images.shape == (trainer.data.val.num_images, 64, 16)
    frozen = [w.numpy() for w in trainer.model.backbone.weights]
    history = trainer.fit()
    assert np.isfinite(history["loss"][0]) and history["val_metric"][0] is not None
    for before, after in zip(frozen, trainer.model.backbone.weights):
        np.testing.assert_array_equal(before, after.numpy())
    # cached grids equal what the restored model computes from the pixels
    cap = Captioner.load(tmp_path / "run", checkpoint="latest")
    image = trainer.data.val.paths[0]
    from captioner.data.images import load_image

    grid = cap.model.grid(load_image(image, 32)[None]).numpy()[0]
    np.testing.assert_allclose(grid, trainer.data.val.images[0].astype(np.float32),
                               rtol=2e-2, atol=2e-2)
    from_pixels = cap.generate([image])
    from_grid = cap.generate(trainer.data.val.images[:1])
    assert from_pixels.texts == from_grid.texts
    # a second trainer on the same cache extracts nothing
    again = Trainer(apply_overrides(cfg, ["train.epochs=2"]), tmp_path / "run",
                    log=lambda _: None)
    assert again.cache.paths == cache.paths


def test_feature_cache_needs_a_frozen_backbone(tiny_config, tmp_path):
    from captioner.config import apply_overrides

    cfg = apply_overrides(tiny_config, [f"data.feature_cache={tmp_path / 'c'}"])
    with pytest.raises(ConfigError, match="model.trainable: frozen"):
        Trainer(cfg, tmp_path / "run", log=lambda _: None)


def test_backbone_learning_rate_uses_its_own_optimizer(tiny_config, tmp_path):
    from captioner.config import apply_overrides

    cfg = apply_overrides(tiny_config, ["train.backbone_learning_rate=1e-4"])
    trainer = Trainer(cfg, tmp_path, log=lambda _: None)
    assert trainer.backbone_optimizer is not None
    trainer.fit()
    assert int(trainer.backbone_optimizer.iterations.numpy()) == 4
    assert int(trainer.optimizer.iterations.numpy()) == 4
    lr = trainer.backbone_optimizer.learning_rate
    assert float(lr.numpy() if hasattr(lr, "numpy") else lr) <= 1e-4


def test_extract_features_then_train_reuses_the_cache(tiny_config, tmp_path):
    from captioner.config import apply_overrides
    from captioner.train.feature_cache import extract_for_config

    cfg = apply_overrides(tiny_config, ["model.trainable=frozen",
                                        f"data.feature_cache={tmp_path / 'cache'}"])
    messages = []
    first = extract_for_config(cfg, log=messages.append)
    grids, _ = first.load_all()
    trainer = Trainer(cfg, tmp_path / "run", log=messages.append)
    assert "up-to-date" in messages[-1]  # the trainer's backbone gives the same fingerprint
    again, _ = trainer.cache.load_all()
    np.testing.assert_array_equal(grids, again)
    fresh = trainer.model.grid(np.stack([load_image(p, 32)
                                         for p in first.paths[:2]])).numpy()
    np.testing.assert_allclose(fresh, grids[:2].astype(np.float32), rtol=2e-2, atol=2e-2)
