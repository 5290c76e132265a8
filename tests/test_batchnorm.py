"""Precise batch norm: statistics recomputed for the current weights, by the trainer
before each validation (``train.precise_bn_batches``) and by ``captioner recalibrate``."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from captioner.model.layers import CaptionModel
from captioner.train.batchnorm import recompute_batchnorm, trainable_batchnorm


def _model(norm: str = "batch") -> CaptionModel:
    return CaptionModel(vocab_size=8, image_size=32, cnn_filters=[8, 16], cnn_norm=norm,
                        embedding_dim=8, units=8, attention_units=8).build_weights()


def _stats(model: CaptionModel) -> list[np.ndarray]:
    return [v.numpy().copy() for layer in trainable_batchnorm(model)
            for v in (layer.moving_mean, layer.moving_variance)]


def _batches(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (4, 32, 32, 3), dtype="uint8") for _ in range(n)]


def test_statistics_are_the_mean_of_the_batch_moments():
    model = _model()
    assert len(trainable_batchnorm(model)) == 4  # two per stage
    b1, b2 = _batches(2)
    assert recompute_batchnorm(model, [b1]) == 1
    one = _stats(model)
    np.testing.assert_allclose(model.grid(b1), model.grid(b1, training=True), atol=1e-4)
    recompute_batchnorm(model, [b2])
    two = _stats(model)
    assert recompute_batchnorm(model, iter([b1, b2])) == 2
    for got, a, b in zip(_stats(model), one, two):
        np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-5, atol=1e-6)
    assert all(layer.momentum == 0.9 for layer in trainable_batchnorm(model))


def test_a_failure_leaves_the_statistics_as_they_were():
    model = _model()
    before = _stats(model)

    def broken():
        yield _batches(1)[0]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        recompute_batchnorm(model, broken())
    for got, old in zip(_stats(model), before):
        np.testing.assert_array_equal(got, old)
    assert all(layer.momentum == 0.9 for layer in trainable_batchnorm(model))
    assert recompute_batchnorm(model, []) == 0
    for got, old in zip(_stats(model), before):
        np.testing.assert_array_equal(got, old)


def test_nothing_to_do_without_batch_norm():
    model = _model("group")
    assert trainable_batchnorm(model) == []
    assert recompute_batchnorm(model, _batches(1)) == 0


def test_trainer_recomputes_before_validating_and_saves_it(tiny_config, tmp_path):
    from captioner.generate.captioner import Captioner
    from captioner.train.trainer import Trainer

    cfg = replace(tiny_config, train=replace(tiny_config.train, precise_bn_batches=2))
    trainer = Trainer(cfg, tmp_path / "run", log=lambda _m: None)
    trainer.fit()
    trained = _stats(trainer.model)
    for layer in trainable_batchnorm(trainer.model):  # spoil them, then recompute
        layer.moving_mean.assign(np.zeros(layer.moving_mean.shape, "float32"))
    assert trainer._precise_bn(1) == 2  # the first 2 batches of epoch 1: the same stats
    for got, want in zip(_stats(trainer.model), trained):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    saved = Captioner.load(tmp_path / "run", "latest").model
    for got, want in zip(_stats(saved), trained):
        np.testing.assert_array_equal(got, want)


def test_recalibrate_a_run_trained_without_it(trained_run, tmp_path, capsys):
    from captioner.cli import main
    from captioner.generate.captioner import Captioner

    from .conftest import copy_run

    run = copy_run(trained_run, tmp_path)
    moving = _stats(Captioner.load(run, "latest").model)
    assert main(["recalibrate", "--run", str(run), "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "batch-norm statistics from 2 batches: val_loss" in out and "ckpt-3" in out
    recalibrated = _stats(Captioner.load(run, "latest").model)
    assert any(not np.allclose(a, b) for a, b in zip(recalibrated, moving))
    best = _stats(Captioner.load(run, "best").model)  # best/ holds it when at least as good
    assert all(np.array_equal(a, b) for a, b in zip(best, recalibrated)) == ("(best)" in out)
    assert main(["recalibrate", "--run", str(tmp_path / "nowhere")]) == 2
