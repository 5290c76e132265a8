"""The units the Trainer is set up from, each alone: config checks, splits, tokenizer,
model and optimizers, prepared data and its batches, checkpoints, strategy and worker
directory, history."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from captioner.config import ConfigError, TrainConfig, apply_overrides
from captioner.data.manifests import Record
from captioner.data.tokenizers import Tokenizer
from captioner.train.checkpoints import Checkpoints
from captioner.train.distribute import strategy_from_config, worker_run_dir
from captioner.train.setup import (
    build_model,
    build_model_and_optimizers,
    build_optimizers,
    check_run_config,
    load_or_fit_tokenizer,
    prepare_data,
    read_splits,
    train_steps_per_epoch,
)
from captioner.train.steps import make_train_step, split_variables
from captioner.train.trainer import Trainer, load_history, write_history

DEFAULT = tf.distribute.get_strategy


# ---- config -----------------------------------------------------------------------------
def test_check_run_config_refuses_data_and_tokenizer_changes_allows_train(tiny_config,
                                                                          tmp_path):
    tiny_config.save(tmp_path / "config.json")
    check_run_config(apply_overrides(tiny_config, ["train.epochs=5",
                                                   "train.learning_rate=0.1",
                                                   "decode.beam_size=5"]), tmp_path)
    for override, section in (("data.max_length=7", "data"),
                              ("tokenizer.lower=false", "tokenizer"),
                              ("model.units=48", "model")):
        with pytest.raises(ConfigError, match=f"different '{section}' section"):
            check_run_config(apply_overrides(tiny_config, [override]), tmp_path)


# ---- records and tokenizer ---------------------------------------------------------------
def test_read_splits_groups_records_by_split(tiny_config):
    splits = read_splits(tiny_config)
    assert sorted(splits) == ["test", "train", "val"]
    assert all(splits[s] for s in splits)  # every split of the shapes data has records
    for name, records in splits.items():
        assert {r.split for r in records} == {name}
    assert sum(len(r) for r in splits.values()) >= 160  # one caption per image at least


def test_read_splits_needs_training_records(tiny_config, tmp_path):
    (tmp_path / "m.csv").write_text("image,caption,split\na.png,a red circle,val\n")
    cfg = apply_overrides(tiny_config, ["data.format=csv", f"data.path={tmp_path / 'm.csv'}"])
    with pytest.raises(ConfigError, match="no training pairs"):
        read_splits(cfg)


def test_load_or_fit_tokenizer_fits_once_then_keeps_the_saved_vocabulary(tiny_config,
                                                                         tmp_path):
    texts = ["A red circle.", "a blue square", "a red square"]
    tok = load_or_fit_tokenizer(tiny_config, tmp_path, texts)
    assert (tmp_path / "tokenizer.json").is_file()
    # lower-cased, punctuation stripped: a red circle blue square
    assert tok.vocab_size == len(Tokenizer.special_tokens) + 5
    assert tok.encode("a red circle") == [Tokenizer.start_id, *tok.encode(
        "a red circle", add_special=False), Tokenizer.end_id]
    again = load_or_fit_tokenizer(tiny_config, tmp_path, ["completely different words"])
    assert again.vocab == tok.vocab

    char = apply_overrides(tiny_config, ["tokenizer.kind=char", "tokenizer.lower=false"])
    (tmp_path / "char").mkdir()
    tok = load_or_fit_tokenizer(char, tmp_path / "char", ["Ab", "ba"])
    assert tok.kind == "char" and tok.vocab_size == len(Tokenizer.special_tokens) + 3


# ---- model and optimizers ----------------------------------------------------------------
def slot_names(variables) -> list[str]:
    """The names Keras gives Adam's m and v slots of ``variables``, in order."""
    return [f"{v.path.replace('/', '_')}_{kind}" for v in variables
            for kind in ("momentum", "velocity")]


def adam_slots_of(optimizer) -> list[str]:
    """The optimizer's slot variables' names (without the optimizer's own prefix)."""
    return [v.path.split("/", 1)[1] for v in optimizer.variables
            if v.path.endswith(("_momentum", "_velocity"))]


def test_build_model_and_optimizers_split_the_variables(tiny_config):
    cfg = apply_overrides(tiny_config, ["train.backbone_learning_rate=1e-4",
                                        "train.precision=mixed_bfloat16"])
    objs = build_model_and_optimizers(DEFAULT(), cfg, vocab_size=20, total_steps=50)
    model = objs.model
    assert model.built and model.decoder.compute_dtype == "bfloat16"
    logits, _ = model((tf.zeros((1, 32, 32, 3), "uint8"), tf.ones((1, 3), "int32")))
    assert logits.shape == (1, 3, 20)  # (B, T, V): the vocabulary it was built for
    main, backbone = split_variables(model, True)
    assert backbone and len(main) + len(backbone) == len(model.trainable_variables)
    # each optimizer has Adam's m and v for exactly its group of variables
    assert adam_slots_of(objs.optimizer) == slot_names(main)
    assert adam_slots_of(objs.backbone_optimizer) == slot_names(backbone)
    assert objs.backbone_optimizer.learning_rate.numpy() == pytest.approx(1e-4)
    assert objs.optimizer.learning_rate.numpy() == pytest.approx(cfg.train.learning_rate)

    frozen = apply_overrides(cfg, ["model.trainable=frozen", "train.precision=float32"])
    model = build_model(DEFAULT(), frozen, vocab_size=20)
    optimizer, backbone_optimizer = build_optimizers(DEFAULT(), frozen, model, 50)
    assert backbone_optimizer is None  # nothing of the backbone trains
    assert adam_slots_of(optimizer) == slot_names(model.trainable_variables)


def test_the_trainer_builds_what_the_builder_builds(tiny_config, tmp_path):
    """The Trainer's model and optimizers are the builder's (same config, same schedule
    over epochs x steps_per_epoch), so tests of build_model_and_optimizers test them."""
    cfg = apply_overrides(tiny_config, ["train.lr_schedule=cosine", "train.epochs=3",
                                        "train.backbone_learning_rate=1e-4"])
    trainer = Trainer(cfg, tmp_path, log=lambda _: None)
    objs = build_model_and_optimizers(DEFAULT(), cfg, trainer.tokenizer.vocab_size,
                                      trainer.steps_per_epoch * 3)
    ours, theirs = trainer.model.get_config(), objs.model.get_config()
    assert ours.pop("name") != theirs.pop("name")  # Keras numbers the instances
    assert ours == theirs
    saved = json.loads((tmp_path / "model.json").read_text())
    assert saved.pop("name") and saved == json.loads(json.dumps(theirs))
    for ours, theirs in ((trainer.optimizer, objs.optimizer),
                         (trainer.backbone_optimizer, objs.backbone_optimizer)):
        a, b = ours.get_config(), theirs.get_config()
        assert a.pop("name") and b.pop("name")
        assert a == b and a["learning_rate"]["config"]["decay_steps"] == 12  # 3 x 4 steps
        assert [v.shape for v in ours.variables] == [v.shape for v in theirs.variables]


def test_a_cap_above_one_pass_is_logged_and_the_schedule_spans_the_real_epochs(tiny_config,
                                                                                 tmp_path):
    """An epoch never repeats a pair: a train.max_steps_per_epoch above one pass does
    nothing, and the Trainer says how long its epochs really are."""
    cfg = apply_overrides(tiny_config, ["train.lr_schedule=cosine", "train.epochs=3",
                                        "train.max_steps_per_epoch=1000"])
    lines: list[str] = []
    trainer = Trainer(cfg, tmp_path, log=lines.append)
    trainer.lock.release()
    one_pass = trainer.data.train.num_pairs // 16
    assert 0 < one_pass < 1000 and trainer.steps_per_epoch == one_pass
    note = [line for line in lines if line.startswith("train.max_steps_per_epoch=1000 ")]
    assert note == [f"train.max_steps_per_epoch=1000 is more than one pass over the "
                    f"{trainer.data.train.num_pairs} training pairs: an epoch is {one_pass} "
                    f"steps of 16, {3 * one_pass} steps in 3 epochs (raise train.epochs to "
                    f"train longer)"]
    schedule = trainer.optimizer.get_config()["learning_rate"]["config"]
    assert schedule["decay_steps"] == 3 * one_pass
    quiet: list[str] = []
    Trainer(tiny_config, tmp_path / "capped", log=quiet.append).lock.release()  # at most 4
    assert not [line for line in quiet if "max_steps_per_epoch" in line]


# ---- data --------------------------------------------------------------------------------
def _prepared(cfg, run_dir: Path, extra: list[Record] | None = None, log=None):
    records = read_splits(cfg)
    records["train"] += extra or []
    tok = load_or_fit_tokenizer(cfg, run_dir, [r.text for r in records["train"]])
    model = build_model(DEFAULT(), cfg, tok.vocab_size)
    return records, tok, prepare_data(cfg, run_dir, records, tok, model,
                                      log or (lambda _: None))


def test_prepare_data_loads_images_encodes_targets_and_lists_skipped(tiny_config, tmp_path):
    messages: list[str] = []
    missing = Record(str(tmp_path / "missing.png"), "a red circle", "train")
    records, tok, data = _prepared(tiny_config, tmp_path, [missing], messages.append)
    L = tiny_config.data.max_length
    train, val = data.train, data.val
    assert data.cache is None
    assert train.images.shape == (train.num_images, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.num_images == len({r.image for r in records["train"]}) - 1  # missing one
    assert data.tokens.shape == (train.num_pairs, L) and data.tokens.dtype == np.int32
    assert data.val_tokens.shape == (val.num_pairs, L)
    assert (data.tokens[:, 0] == tok.start_id).all()
    assert (data.tokens == tok.end_id).sum(1).tolist() == [1] * train.num_pairs
    assert data.test.images.shape == (data.test.num_images, 32, 32, 3)
    assert data.report.count == 1
    listed = (tmp_path / "skipped_images.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(str(tmp_path / "missing.png") + "\t")
    assert messages == [f"skipped 1 unusable images (listed in {tmp_path / 'skipped_images.txt'})"]


def test_prepared_batches_follow_the_seeded_epoch_order(tiny_config, tmp_path):
    _, _, data = _prepared(tiny_config, tmp_path)
    t, L = tiny_config.train, tiny_config.data.max_length  # batch 16, at most 4 steps
    epoch1 = [(x.numpy(), y.numpy()) for x, y in data.batches(t, epoch=1)]
    assert len(epoch1) == train_steps_per_epoch(t, data.train.num_pairs) == 4
    for images, tokens in epoch1:
        assert images.shape == (16, 32, 32, 3) and tokens.shape == (16, L)
    rest = [(x.numpy(), y.numpy()) for x, y in data.batches(t, epoch=1, skip=1)]
    assert len(rest) == 3
    for (a, b), (c, d) in zip(epoch1[1:], rest):  # resuming skips the trained batches
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    epoch2 = next(iter(data.batches(t, epoch=2)))[1].numpy()
    assert not np.array_equal(epoch2, epoch1[0][1])  # another order
    # each batch's rows are training pairs: image and target of the same pair
    rows = {tuple(r) for r in data.tokens.tolist()}
    assert all(tuple(r) in rows for _, tokens in epoch1 for r in tokens.tolist())


def test_prepare_data_from_a_feature_cache(tiny_config, tmp_path):
    cfg = apply_overrides(tiny_config, ["model.trainable=frozen",
                                        f"data.feature_cache={tmp_path / 'cache'}"])
    messages: list[str] = []
    _, _, data = _prepared(cfg, tmp_path, log=messages.append)
    assert data.cache is not None and "feature cache" in messages[0]
    assert data.train.images is None  # read from the shards, batch by batch
    assert data.val.images.shape == (data.val.num_images, 64, 16)  # (N_img, G, C)
    assert data.test.images.shape == (data.test.num_images, 64, 16)
    grids, tokens = next(iter(data.batches(cfg.train, epoch=1)))
    assert grids.shape == (16, 64, 16) and tokens.shape == (16, cfg.data.max_length)


# ---- checkpoints --------------------------------------------------------------------------
def _trained_objects(cfg, seed: int, steps: int):
    keras.utils.set_random_seed(seed)
    objs = build_model_and_optimizers(DEFAULT(), cfg, vocab_size=12, total_steps=100)
    step = make_train_step(objs.model, objs.optimizer, 0, 1.0,
                           backbone_optimizer=objs.backbone_optimizer)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (4, 32, 32, 3)).astype("uint8")
    tokens = np.array([[1, 5, 6, 2, 0]] * 4, "int32")
    for _ in range(steps):
        step(images, tokens, tf.constant(0.0), tf.constant([0, 0]))
    return objs


def test_checkpoints_restore_round_trip(tiny_config, tmp_path):
    cfg = apply_overrides(tiny_config, ["train.backbone_learning_rate=1e-3"])
    objs = _trained_objects(cfg, seed=0, steps=2)
    saved = Checkpoints(tmp_path, objs.model, objs.optimizer, objs.backbone_optimizer)
    saved.epoch.assign(3)
    saved.step_in_epoch.assign(5)
    saved.best.assign(0.75)
    path = saved.save_latest()
    assert Path(path).parent == tmp_path / "checkpoints"

    fresh = _trained_objects(cfg, seed=1, steps=0)
    loaded = Checkpoints(tmp_path, fresh.model, fresh.optimizer, fresh.backbone_optimizer)
    assert loaded.restore() == path
    assert (int(loaded.epoch.numpy()), int(loaded.step_in_epoch.numpy()),
            float(loaded.best.numpy())) == (3, 5, 0.75)
    assert int(fresh.optimizer.iterations.numpy()) == 2
    assert int(fresh.backbone_optimizer.iterations.numpy()) == 2
    for a, b in zip(objs.model.weights + objs.optimizer.variables
                    + objs.backbone_optimizer.variables,
                    fresh.model.weights + fresh.optimizer.variables
                    + fresh.backbone_optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_checkpoints_keep_the_latest_n_and_the_best(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    ckpts = Checkpoints(tmp_path, model, keras.optimizers.SGD(), keep=2)
    assert ckpts.restore() is None and float(ckpts.best.numpy()) == -np.inf
    ckpts.step_in_epoch.assign(7)
    assert ckpts.end_epoch(1, 0.5) is True
    assert int(ckpts.step_in_epoch.numpy()) == 0 and int(ckpts.epoch.numpy()) == 1
    assert ckpts.end_epoch(2, 0.2) is False
    assert ckpts.end_epoch(3, 0.9) is True
    assert ckpts.end_epoch(4, None) is False  # no metric: best/ follows the latest
    latest = tf.train.get_checkpoint_state(str(tmp_path / "checkpoints"))
    assert [Path(p).name for p in latest.all_model_checkpoint_paths] == ["ckpt-3", "ckpt-4"]
    assert Path(ckpts.best_manager.latest_checkpoint).name == "ckpt-4"
    assert float(ckpts.best.numpy()) == 0.9
    assert len(list((tmp_path / "best").glob("ckpt-*.index"))) == 1


# ---- strategy, worker directory, history --------------------------------------------------
def test_strategy_from_config_default_logs_nothing():
    messages: list[str] = []
    assert strategy_from_config(TrainConfig(), messages.append) is tf.distribute.get_strategy()
    assert messages == []


def _fake_worker(kind: str, index: int, cluster: dict) -> SimpleNamespace:
    resolver = SimpleNamespace(task_type=kind, task_id=index,
                               cluster_spec=lambda: tf.train.ClusterSpec(cluster))
    return SimpleNamespace(cluster_resolver=resolver)


@pytest.mark.parametrize("kind, index, cluster, sub", [
    ("worker", 0, {"worker": ["a:1", "b:1"]}, None),  # no chief: worker 0 is the chief
    ("worker", 1, {"worker": ["a:1", "b:1"]}, "worker1"),
    ("chief", 0, {"chief": ["c:1"], "worker": ["a:1"]}, None),
    ("worker", 0, {"chief": ["c:1"], "worker": ["a:1"]}, "worker0"),
])
def test_worker_run_dir(kind, index, cluster, sub, tmp_path):
    t = TrainConfig(strategy="multi_worker")
    expected = tmp_path if sub is None else tmp_path / "workers" / sub
    assert worker_run_dir(_fake_worker(kind, index, cluster), t, tmp_path) == expected
    # other strategies always write into the run directory
    assert worker_run_dir(_fake_worker(kind, index, cluster), TrainConfig(), tmp_path) == tmp_path


def test_history_round_trip_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    assert load_history(tmp_path) == {}
    history = {"epoch": [1, 2], "loss": [2.0, 1.5], "val_loss": [2.1, 1.7],
               "val_metric": [0.1, 0.3], "val_metric_name": ["exact_match"] * 2}
    write_history(tmp_path, history, log=pytest.fail)
    assert load_history(tmp_path) == history
    assert (tmp_path / "history.png").stat().st_size > 1000
