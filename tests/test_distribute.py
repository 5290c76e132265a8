"""Distributed training: one mirrored step on 2 logical CPUs == one single-device step on
the same global batch; the Trainer under mirrored and multi-worker strategies equals it on
one device; checkpoints restore across strategies; strategy errors.

The mirrored half (steps and a Trainer run) runs in a fresh interpreter (this file run as
a script), because the CPU can only be split into logical devices before TensorFlow
initialises them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from captioner.config import Config, apply_overrides
from captioner.train.distribute import (
    check_tf_config,
    distribute_batches,
    make_strategy,
    split_cpu,
)
from captioner.train.setup import build_model_and_optimizers
from captioner.train.steps import make_train_step, split_variables

TINY = ["model.image_size=32", "model.cnn_filters=[4, 8]", "model.embedding_dim=8",
        "model.units=8", "model.attention_units=8", "model.dropout=0.0",
        "train.learning_rate=0.01", "train.clip_norm=0.05"]  # clipping is active
VOCAB, PAD, REG, BATCH = 12, 0, 1.0, 8
GROUND = 0.5  # train.attention_supervision: the cells of global_batch weigh in the loss
ATOL = 1e-5


def tiny_config(*extra: str) -> Config:
    return apply_overrides(Config(), [*TINY, *extra])


def global_batch(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8 images (8, 32, 32, 3), tokens (8, 14) and cells (8, 14) of the 8x8 grid for every
    other word (-1 elsewhere): rows 0-3 (replica 0) have 10 words, rows 4-7 (replica 1)
    3, so the replicas hold different numbers of real tokens and of cells."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (BATCH, 32, 32, 3)).astype("uint8")
    tokens = np.zeros((BATCH, 14), "int32")
    cells = np.full((BATCH, 14), -1, "int32")
    for i in range(BATCH):
        n = 10 if i < BATCH // 2 else 3
        tokens[i, 0], tokens[i, n + 1] = 1, 2  # <start>, <end>
        tokens[i, 1:n + 1] = rng.integers(4, VOCAB, n)
        cells[i, 1:n + 1:2] = rng.integers(0, 64, len(range(1, n + 1, 2)))
    return images, tokens, cells


def local_values(strategy: tf.distribute.Strategy, variable) -> list[np.ndarray]:
    """Every replica's copy of a (possibly mirrored) Keras or tf variable."""
    value = getattr(variable, "value", variable)
    return [np.asarray(v) for v in strategy.experimental_local_results(value)]


def max_diff(strategy, reference: list, mirrored: list) -> float:
    """Largest |difference| between single-device variables and any replica's copy."""
    return max(float(np.abs(np.asarray(a) - b).max())
               for a, m in zip(reference, mirrored) for b in local_values(strategy, m))


# ---- the child process: 2 logical CPUs ------------------------------------------------------
def build_pair(case: str, mirrored: tf.distribute.Strategy):
    """(single-device objects, mirrored objects) with identical initial weights.

    ``adam``: the Trainer's optimizer (Adam, active global-norm clipping) for everything but
    the backbone, plain SGD (no clipping) for the backbone. SGD is not scale-invariant, so it
    catches averaged instead of summed gradients; it also keeps Adam off the conv kernels
    feeding BatchNorm, whose cancelling near-zero gradient components are rounding noise that
    Adam's g / (|g| + eps) would blow up to lr-sized differences. ``lso_sgd``: a loss-scale
    optimizer over SGD with active global-norm clipping.
    """
    cfg = tiny_config(*(["train.backbone_learning_rate=0.5"] if case == "adam" else []))
    pair = []
    for strategy in (make_strategy("default"), mirrored):
        keras.utils.set_random_seed(0)
        objs = build_model_and_optimizers(strategy, cfg, VOCAB, total_steps=100)
        main_vars, backbone_vars = split_variables(objs.model, case == "adam")
        with strategy.scope():
            if case == "adam":
                objs.backbone_optimizer = keras.optimizers.SGD(0.5)
                objs.backbone_optimizer.build(backbone_vars)
            else:
                objs.optimizer = keras.optimizers.LossScaleOptimizer(
                    keras.optimizers.SGD(0.5, global_clipnorm=0.05))
                objs.optimizer.build(main_vars)
        pair.append(objs)
    pair[1].model.set_weights(pair[0].model.get_weights())
    return pair


def run_case(case: str, mirrored: tf.distribute.Strategy, steps: int, out: Path) -> dict:
    """``steps`` single-device and mirrored steps on the same global batches."""
    single, multi = build_pair(case, mirrored)
    step_1 = make_train_step(single.model, single.optimizer, PAD, REG,
                             backbone_optimizer=single.backbone_optimizer,
                             attention_supervision=GROUND)
    step_n = make_train_step(multi.model, multi.optimizer, PAD, REG,
                             backbone_optimizer=multi.backbone_optimizer, strategy=mirrored,
                             global_batch_size=BATCH, attention_supervision=GROUND)
    batches = [global_batch(seed) for seed in range(steps)]
    dataset = tf.data.Dataset.from_tensor_slices(tuple(np.stack(x) for x in zip(*batches)))
    args = (tf.constant(0.0), tf.constant([0, 0]))
    losses, rows = [], []
    for (images, tokens, cells), (dist_images, dist_tokens, dist_cells) in zip(
            batches, distribute_batches(mirrored, dataset)):
        rows.append([t.numpy().tolist() for t in mirrored.experimental_local_results(dist_tokens)])
        a = step_1(tf.constant(images), tf.constant(tokens), *args, tf.constant(cells))
        b = step_n(dist_images, dist_tokens, *args, dist_cells)
        losses.append({k: [float(a[k]), float(b[k])] for k in a})
    opts = [o for o in (single.optimizer, single.backbone_optimizer) if o is not None]
    multi_opts = [o for o in (multi.optimizer, multi.backbone_optimizer) if o is not None]
    result = {"losses": losses, "rows": rows,
              "expected_rows": [[h.tolist() for h in np.split(t, 2)] for _, t, _ in batches],
              "weight_diff": max_diff(mirrored, single.model.get_weights(), multi.model.weights),
              "optimizer_diff": max_diff(mirrored, [v.numpy() for o in opts for v in o.variables],
                                         [v for o in multi_opts for v in o.variables])}
    if case == "adam":
        save_checkpoints(single, multi, mirrored, out, result)
    return result


def save_checkpoints(single, multi, mirrored, out: Path, result: dict) -> None:
    """Mirrored -> disk for the parent's default-strategy restore; single-device -> a fresh
    mirrored model here."""
    tf.train.Checkpoint(model=multi.model, optimizer=multi.optimizer).write(
        str(out / "mirrored" / "ckpt"))
    np.savez(out / "mirrored_values.npz",
             *[v.numpy() for v in multi.model.weights],
             *[v.numpy() for v in multi.optimizer.variables])
    path = tf.train.Checkpoint(model=single.model).write(str(out / "single" / "ckpt"))
    fresh = build_model_and_optimizers(mirrored, tiny_config(), VOCAB, total_steps=100)
    tf.train.Checkpoint(model=fresh.model).read(path).assert_existing_objects_matched()
    result["restored_into_mirrored_diff"] = max_diff(mirrored, single.model.get_weights(),
                                                     fresh.model.weights)


def child(out: Path, trainer_overrides: list[str]) -> None:
    """Entry point of the subprocess: split the CPU, compare the steps, train the shapes
    run with ``train.strategy=mirrored`` (``trainer_overrides``) into ``out/mirrored_run``,
    write ``results.json``."""
    from captioner.config import load_config
    from captioner.train.trainer import train

    started = time.perf_counter()
    devices = split_cpu(2)
    mirrored = make_strategy("mirrored")
    results = {"devices": devices, "replicas": mirrored.num_replicas_in_sync,
               "adam": run_case("adam", mirrored, steps=2, out=out),
               "lso_sgd": run_case("lso_sgd", mirrored, steps=1, out=out)}
    # a second model of other shapes (conftest's TINY) trained in the same process: it
    # failed with a collective "Shape mismatch" when each model had its own strategy object
    log: list[str] = []
    config = Path(__file__).resolve().parent.parent / "configs" / "shapes.yaml"
    train(load_config(config, trainer_overrides), out / "mirrored_run", log=log.append)
    results["trainer_log"] = log
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results))


def strategy_overrides(shapes_dir: Path) -> list[str]:
    """The tiny shapes run every strategy test trains (precise BN: batch-norm statistics
    recomputed before validation)."""
    from .conftest import TINY

    return [*TINY, f"data.path={shapes_dir}", "train.precise_bn_batches=2"]


@pytest.fixture(scope="module")
def mirrored_results(shapes_dir, tmp_path_factory) -> tuple[dict, Path]:
    """The subprocess's results and its output folder (checkpoints, ``mirrored_run``)."""
    out = tmp_path_factory.mktemp("distribute")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    overrides = [*strategy_overrides(shapes_dir), "train.strategy=mirrored",
                 "train.logical_cpus=2"]
    proc = subprocess.run([sys.executable, __file__, str(out), json.dumps(overrides)],
                          capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text()), out


# ---- tests ---------------------------------------------------------------------------------
def test_mirrored_step_equals_single_device_step(mirrored_results):
    results, _ = mirrored_results
    assert results["replicas"] == 2
    for case in ("adam", "lso_sgd"):
        r = results[case]
        # replica 0 holds the first half of each global batch (the long captions)
        assert r["rows"] == r["expected_rows"]
        for logged in r["losses"]:
            for key, (single, mirrored) in logged.items():
                assert single == pytest.approx(mirrored, rel=1e-5), (case, key)
            assert logged["ground"][0] > 0, case  # the attention supervision took part
        assert r["weight_diff"] < ATOL, case  # every weight (incl. BN statistics), every replica
        assert r["optimizer_diff"] < ATOL, case  # Adam moments, iterations, loss scale


def test_checkpoint_from_mirrored_restores_under_default_strategy(mirrored_results):
    results, out = mirrored_results
    assert results["adam"]["restored_into_mirrored_diff"] == 0.0
    cfg = tiny_config("train.backbone_learning_rate=0.5")  # as saved: Adam over non-backbone
    objs = build_model_and_optimizers(make_strategy("default"), cfg, VOCAB, 100)
    status = tf.train.Checkpoint(model=objs.model, optimizer=objs.optimizer).read(
        str(out / "mirrored" / "ckpt"))
    status.assert_existing_objects_matched()
    saved = np.load(out / "mirrored_values.npz")
    expected = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    restored = [v.numpy() for v in objs.model.weights + objs.optimizer.variables]
    assert len(restored) == len(expected)
    for a, b in zip(restored, expected):
        np.testing.assert_array_equal(a, b)
    assert int(objs.optimizer.iterations.numpy()) == 2


def test_explicit_default_strategy_on_distributed_batches_equals_plain_tensors():
    """The one-replica case: the step built for the named default strategy, fed through
    distribute_batches, makes the update of the step built with no strategy argument on
    plain tensors (what bench.py calls)."""
    images, tokens, _ = global_batch(0)
    strategy = make_strategy("default")
    pair = [build_model_and_optimizers(strategy, tiny_config(), VOCAB, 100) for _ in "ab"]
    pair[1].model.set_weights(pair[0].model.get_weights())
    args = (tf.constant(0.0), tf.constant([0, 0]))
    a = make_train_step(pair[0].model, pair[0].optimizer, PAD, REG)(images, tokens, *args)
    step = make_train_step(pair[1].model, pair[1].optimizer, PAD, REG, strategy=strategy,
                           global_batch_size=BATCH)
    (dist_images, dist_tokens), = distribute_batches(
        strategy, tf.data.Dataset.from_tensors((images, tokens)))
    b = step(dist_images, dist_tokens, *args)
    assert {k: float(v) for k, v in a.items()} == pytest.approx(
        {k: float(v) for k, v in b.items()}, rel=1e-6)
    for x, y in zip(pair[0].model.get_weights(), pair[1].model.get_weights()):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_make_strategy_names_and_errors(monkeypatch):
    assert make_strategy("default") is tf.distribute.get_strategy()
    with pytest.raises(ValueError, match="default, mirrored, multi_worker"):
        make_strategy("horovod")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG environment variable"):
        make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        make_strategy("multi_worker")


@pytest.mark.parametrize("raw, message", [
    ('{"task": {"type": "worker", "index": 0}}', "'cluster' mapping"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "no member"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', "no member"),
    ('[1, 2]', "'cluster' mapping"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": ["worker"], "index": 0}}', "no member"),
])
def test_check_tf_config_rejects_bad_clusters(raw, message):
    with pytest.raises(ValueError, match=message):
        check_tf_config(raw)


def test_split_cpu_after_initialisation_is_a_clear_error():
    tf.constant(0)  # devices are initialised in this process
    n = len(tf.config.list_logical_devices("CPU"))
    with pytest.raises(RuntimeError, match="came too late"):
        split_cpu(n + 1)
    assert len(split_cpu(n)) == n  # already split that way: nothing to do
    with pytest.raises(ValueError):
        split_cpu(0)


def test_global_batch_must_feed_every_replica():
    objs = build_model_and_optimizers(make_strategy("default"), tiny_config(), VOCAB, 100)
    with pytest.raises(ValueError, match="GLOBAL batch"):
        make_train_step(objs.model, objs.optimizer, PAD, REG,
                        strategy=make_strategy("default"), global_batch_size=0)


if __name__ == "__main__":
    child(Path(sys.argv[1]), json.loads(sys.argv[2]))


# ---- the Trainer under each strategy (mirrored: the subprocess; multi-worker: the CLI) ---
def cli_train(root: Path, run_dir: Path, overrides: list[str], env: dict | None = None
              ) -> subprocess.Popen:
    """Start ``python -m captioner train`` on configs/shapes.yaml with ``overrides``."""
    cmd = [sys.executable, "-m", "captioner", "train", "--config",
           str(root / "configs" / "shapes.yaml"), "--run-dir", str(run_dir)]
    for override in overrides:
        cmd += ["--set", override]
    return subprocess.Popen(cmd, cwd=root, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def checkpoint_values(run_dir: Path) -> dict[str, np.ndarray]:
    """Every saved tensor of a run's latest checkpoint (weights, Adam moments, counters)."""
    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints"))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k != "_CHECKPOINTABLE_OBJECT_GRAPH" and not k.startswith("save_counter")}


def assert_same_training(a: Path, b: Path, rel: float, atol: float) -> None:
    """Two runs' histories and latest checkpoints agree (within rel / atol)."""
    ha, hb = (json.loads((r / "history.json").read_text()) for r in (a, b))
    for key in ("loss", "val_loss"):
        assert hb[key] == pytest.approx(ha[key], rel=rel), key
    va, vb = checkpoint_values(a), checkpoint_values(b)
    assert sorted(va) == sorted(vb) and len(va) > 20
    for key in va:
        np.testing.assert_allclose(vb[key], va[key], rtol=rel, atol=atol, err_msg=key)


@pytest.fixture(scope="module")
def single_run(project_root, shapes_dir, tmp_path_factory) -> tuple[list[str], Path]:
    """(overrides, run): the tiny shapes run on one device, trained once for this module
    as the reference."""
    from captioner.config import load_config
    from captioner.train.trainer import train

    overrides = strategy_overrides(shapes_dir)
    run = tmp_path_factory.mktemp("strategies") / "single"
    train(load_config(project_root / "configs" / "shapes.yaml", overrides), run,
          log=lambda _msg: None)
    return overrides, run


def test_trainer_mirrored_on_two_cpus_equals_default_then_resumes_under_default(
        project_root, single_run, mirrored_results):
    """``train.strategy=mirrored`` over 2 logical CPUs (the subprocess) trains the same
    epoch as one device (same losses, same weights and optimizer state), and the run
    resumes without it."""
    from captioner.config import load_config
    from captioner.train.trainer import train

    overrides, single = single_run
    results, out = mirrored_results
    mirrored = out / "mirrored_run"
    assert any("train.strategy=mirrored: 2 replica(s), 8 examples each per step" in m
               for m in results["trainer_log"])
    assert_same_training(single, mirrored, rel=1e-4, atol=1e-5)

    messages: list[str] = []
    cfg = load_config(project_root / "configs" / "shapes.yaml", [*overrides, "train.epochs=2"])
    history = train(cfg, mirrored, log=messages.append)
    assert any(m.startswith(f"resuming {mirrored} at epoch 2") for m in messages)
    assert history["epoch"] == [1, 2]


def test_trainer_multi_worker_two_processes(project_root, single_run, tmp_path):
    """Two local workers (TF_CONFIG) train one run together: the chief writes the run
    directory, worker 1 its own subfolder, both see the same global losses, and the result
    equals the single-device run."""
    import socket

    overrides, single = single_run
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            ports.append(s.getsockname()[1])
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    run = tmp_path / "multi"
    procs = [cli_train(project_root, run, [*overrides, "train.strategy=multi_worker"],
                       {"TF_CONFIG": json.dumps({"cluster": cluster,
                                                 "task": {"type": "worker", "index": i}})})
             for i in range(2)]
    logs = [finish(p) for p in procs]
    assert f"run directory: {run} (1 epochs)" in logs[0]
    assert f"run directory: {run / 'workers' / 'worker1'} (1 epochs)" in logs[1]
    assert_same_training(run, run / "workers" / "worker1", rel=1e-6, atol=1e-7)
    assert_same_training(single, run, rel=1e-4, atol=1e-5)
