"""Fault tolerance of training and run directories: SIGKILL at random moments, SIGTERM,
non-finite losses, damaged checkpoints, mismatched or missing run-directory files and two
trainings on one run directory."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from captioner.config import apply_overrides
from captioner.generate.captioner import Captioner
from captioner.model.restore import unreadable
from captioner.train.runlock import RunLock
from captioner.train.trainer import NonFiniteLoss, Trainer

from .conftest import TINY, copy_run

QUIET = {"log": lambda _msg: None}
RESUMED = re.compile(r"resuming .* at epoch (\d+), step (\d+) \(global step (\d+)\)")


def _model_tensors(run_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the newest checkpoint (model, optimizer, counters) by key; not the
    serialized object graph, which holds Keras' per-process layer names (``caption_model``
    in a fresh process, ``caption_model_1`` after another model was built)."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(run_dir / "checkpoints")))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if "save_counter" not in k and k != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _check_run_dir_parses(run_dir: Path) -> None:
    """history.json and the checkpoint state parse; the newest checkpoint reads in full."""
    if (run_dir / "history.json").exists():
        json.loads((run_dir / "history.json").read_text())
    for name in ("config.json", "model.json", "tokenizer.json"):
        if (run_dir / name).exists():
            json.loads((run_dir / name).read_text())
    state = tf.train.get_checkpoint_state(str(run_dir / "checkpoints"))
    if state is not None and state.model_checkpoint_path:
        assert unreadable(state.model_checkpoint_path) is None


# ---- SIGKILL at random moments ------------------------------------------------------------
def test_sigkill_at_random_moments_resumes_exactly(project_root, shapes_dir, tmp_path):
    overrides = [*TINY, f"data.path={shapes_dir}", "train.epochs=3",
                 "train.max_steps_per_epoch=8", "train.batch_size=8",
                 "train.checkpoint_minutes=0.005", "train.tensorboard=false"]
    config = project_root / "configs" / "shapes.yaml"
    from captioner.config import load_config

    # the uninterrupted reference (also makes the shapes data before the subprocesses run)
    reference = tmp_path / "reference"
    Trainer(load_config(config, overrides), reference, **QUIET).fit()
    expected = _model_tensors(reference)

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "captioner", "train", "--config", str(config),
           "--run-dir", str(run)] + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    rng = random.Random(1234)

    def start(n: int):
        log = tmp_path / f"log{n}.txt"
        return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                env=env, cwd=project_root), log

    def wait_for(cond, proc, limit=60.0) -> None:
        end = time.monotonic() + limit
        while not cond():
            assert proc.poll() is None, "the training ended before it could be killed"
            assert time.monotonic() < end, "timed out"
            time.sleep(0.01)

    def ckpt_count() -> int:
        state = tf.train.get_checkpoint_state(str(run / "checkpoints"))
        return 0 if state is None else len(state.all_model_checkpoint_paths)

    def ckpt_path() -> str | None:
        return tf.train.latest_checkpoint(str(run / "checkpoints"))

    # each: wait for an event, then a random delay -> the kill lands during steps,
    # during a checkpoint write or during validation (history.json written at epoch end)
    moments = [
        ("after the first checkpoint", lambda: ckpt_count() >= 1, (0.0, 0.15)),
        ("mid-epoch, after a new checkpoint", None, (0.0, 0.4)),
        ("around an epoch's end / validation",
         lambda: (run / "history.json").exists(), (0.0, 0.05)),
    ]
    kills, resumed_steps = 0, []
    for n, (_what, event, (lo, hi)) in enumerate(moments):
        proc, log = start(n)
        before = ckpt_path()
        if event is None:
            event = (lambda b: lambda: ckpt_path() not in (None, b))(before)
        try:
            wait_for(event, proc)
        except AssertionError:
            proc.kill()
            proc.wait()
            raise
        time.sleep(rng.uniform(lo, hi))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        assert proc.wait(timeout=30) in (-signal.SIGKILL, 0)
        _check_run_dir_parses(run)
        if n > 0:  # a checkpoint existed before this start: it resumed from a step > 0
            found = RESUMED.search(log.read_text())
            assert found, log.read_text()
            resumed_steps.append(int(found.group(3)))
            assert resumed_steps[-1] > 0
    proc, log = start(len(moments))
    assert proc.wait(timeout=120) == 0, log.read_text()
    text = log.read_text()
    assert RESUMED.search(text), text
    _check_run_dir_parses(run)
    history = json.loads((run / "history.json").read_text())
    assert history["epoch"] == [1, 2, 3]
    assert kills >= 2, kills
    print(f"SIGKILLs {kills}/{len(moments)}, resumed at global steps {resumed_steps}")
    got = _model_tensors(run)
    assert got.keys() == expected.keys()
    for key in expected:  # weights, Adam moments, iterations, epoch and step counters
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    reference_history = json.loads((reference / "history.json").read_text())
    np.testing.assert_allclose(history["loss"], reference_history["loss"], rtol=1e-6)


# ---- SIGTERM / SIGINT ---------------------------------------------------------------------
def _signal_at(trainer: Trainer, monkeypatch, global_step: int, signum: int) -> None:
    original = trainer.step_in_epoch.assign_add

    def send(value):
        out = original(value)
        if int(trainer.optimizer.iterations.numpy()) == global_step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(trainer.step_in_epoch, "assign_add", send)


def test_sigterm_mid_epoch_saves_that_step_and_exits_143(tiny_config, tmp_path, monkeypatch):
    cfg = apply_overrides(tiny_config, ["train.epochs=2", "train.checkpoint_minutes=0"])
    previous = signal.getsignal(signal.SIGTERM)
    lines: list[str] = []
    first = Trainer(cfg, tmp_path, log=lines.append)
    _signal_at(first, monkeypatch, 6, signal.SIGTERM)
    with pytest.raises(SystemExit) as exited:
        first.fit()
    monkeypatch.undo()
    assert exited.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers put back
    assert any("SIGTERM" in line and "exiting with status 143" in line for line in lines)
    second = Trainer(cfg, tmp_path, **QUIET)  # the lock was released too
    assert (int(second.epoch.numpy()), int(second.step_in_epoch.numpy()),
            int(second.optimizer.iterations.numpy())) == (1, 2, 6)
    second.fit()
    assert int(second.optimizer.iterations.numpy()) == 8
    assert json.loads((tmp_path / "history.json").read_text())["epoch"] == [1, 2]


def test_sigint_saves_then_raises_keyboard_interrupt(tiny_config, tmp_path, monkeypatch):
    cfg = apply_overrides(tiny_config, ["train.checkpoint_minutes=0"])
    first = Trainer(cfg, tmp_path, **QUIET)
    _signal_at(first, monkeypatch, 3, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    monkeypatch.undo()
    again = Trainer(cfg, tmp_path, **QUIET)
    assert int(again.step_in_epoch.numpy()) == 3


# ---- non-finite losses --------------------------------------------------------------------
def _poison_calls(monkeypatch, trainer_module, calls: set[int]) -> None:
    """Make the compiled step see a NaN weight on the given (1-based) calls; the weight is
    put back after each (the step must not have applied an update)."""
    real = trainer_module.make_train_step

    def make(model, *args, **kwargs):
        step, count = real(model, *args, **kwargs), [0]
        var = model.trainable_variables[-1]

        def poisoned(*a):
            count[0] += 1
            if count[0] not in calls:
                return step(*a)
            saved = var.numpy()
            var.assign(np.full_like(saved, np.nan))
            out = step(*a)
            var.assign(saved)
            return out

        return poisoned

    monkeypatch.setattr(trainer_module, "make_train_step", make)


def test_nonfinite_loss_stops_with_the_epoch_and_step_and_keeps_the_checkpoint(
        tiny_config, tmp_path, monkeypatch):
    import captioner.train.trainer as trainer_module

    cfg = apply_overrides(tiny_config, ["train.checkpoint_every=1"])
    _poison_calls(monkeypatch, trainer_module, {3})
    trainer = Trainer(cfg, tmp_path, **QUIET)
    with pytest.raises(NonFiniteLoss, match=r"epoch 1, step 3 \(global step 3\)"):
        trainer.fit()
    latest = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    reader = tf.train.load_checkpoint(latest)
    assert reader.get_tensor("step_in_epoch/.ATTRIBUTES/VARIABLE_VALUE") == 2
    for key in reader.get_variable_to_shape_map():
        value = np.asarray(reader.get_tensor(key))
        if value.dtype.kind == "f":
            assert np.all(np.isfinite(value)) or key.startswith("best"), key
    assert all(np.all(np.isfinite(w.numpy())) for w in trainer.model.weights)
    assert int(trainer.optimizer.iterations.numpy()) == 2  # the poisoned update not applied


def test_nonfinite_loss_skip_counts_the_batches(tiny_config, tmp_path, monkeypatch):
    import captioner.train.trainer as trainer_module

    cfg = apply_overrides(tiny_config, ["train.on_nonfinite=skip"])
    _poison_calls(monkeypatch, trainer_module, {2, 3})
    trainer = Trainer(cfg, tmp_path, **QUIET)
    history = trainer.fit()
    assert history["skipped_nonfinite"] == [2]
    assert int(trainer.optimizer.iterations.numpy()) == 2  # 4 batches, 2 applied
    assert np.isfinite(history["loss"][0])
    assert all(np.all(np.isfinite(w.numpy())) for w in trainer.model.weights)


def test_on_nonfinite_is_validated(tiny_config):
    from captioner.config import ConfigError, validate

    with pytest.raises(ConfigError, match="train.on_nonfinite"):
        validate(apply_overrides(tiny_config, ["train.on_nonfinite=ignore"]))
    with pytest.raises(ConfigError, match="train.checkpoint_minutes"):
        validate(apply_overrides(tiny_config, ["train.checkpoint_minutes=-1"]))


# ---- damaged checkpoints ------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".data-00000-of-00001", ".index"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(trained_run, tmp_path,
                                                              project_root, shapes_dir, suffix):
    run = copy_run(trained_run, tmp_path)  # 2 epochs, a checkpoint at each epoch's end
    newest = tf.train.latest_checkpoint(str(run / "checkpoints"))
    damaged = Path(newest + suffix)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # truncated
    lines: list[str] = []
    again = Trainer(_trained_run_config(project_root, shapes_dir), run, log=lines.append)
    assert any(newest in line and "skipped" in line for line in lines), lines
    assert int(again.epoch.numpy()) == 1  # the previous checkpoint: epoch 1's end
    again.fit()
    assert json.loads((run / "history.json").read_text())["epoch"] == [1, 2]
    _check_run_dir_parses(run)


def test_captioner_load_skips_a_damaged_checkpoint(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    newest = tf.train.latest_checkpoint(str(run / "checkpoints"))
    Path(newest + ".data-00000-of-00001").write_bytes(b"garbage")
    assert Captioner.load(run, checkpoint="latest").model.built


# ---- run directories ----------------------------------------------------------------------
def _trained_run_config(project_root, shapes_dir):
    from captioner.config import load_config

    return load_config(project_root / "configs" / "shapes.yaml",
                       [*TINY, f"data.path={shapes_dir}", "train.epochs=2"])


def test_tokenizer_of_another_vocabulary_is_refused(trained_run, tmp_path, project_root,
                                                    shapes_dir):
    run = copy_run(trained_run, tmp_path)
    tok = json.loads((run / "tokenizer.json").read_text())
    tok["vocab"].append("zebra")
    (run / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match=r"tokenizer.json has \d+ tokens") as info:
        Captioner.load(run)
    assert str(run) in str(info.value)
    with pytest.raises(ValueError, match=r"tokenizer.json has \d+ tokens"):
        Trainer(_trained_run_config(project_root, shapes_dir), run, **QUIET)
    assert RunLock(run).acquire().held  # the refused trainer released its lock


def test_checkpoint_of_another_architecture_is_refused(trained_run, tmp_path, project_root,
                                                       shapes_dir):
    run = copy_run(trained_run, tmp_path)
    model = json.loads((run / "model.json").read_text())
    model["units"] = 48
    (run / "model.json").write_text(json.dumps(model))
    with pytest.raises(ValueError, match="does not fit the model") as info:
        Captioner.load(run)
    assert str(run) in str(info.value)
    with pytest.raises(ValueError, match="another architecture.*units"):
        Trainer(_trained_run_config(project_root, shapes_dir), run, **QUIET)


def test_missing_or_unreadable_run_directory_is_named(trained_run, tmp_path, project_root,
                                                      shapes_dir):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Captioner.load(missing)
    run = copy_run(trained_run, tmp_path)
    (run / "config.json").write_text('{"model": ')  # half-written by something else
    with pytest.raises(ValueError, match=str(run / "config.json")):
        Trainer(_trained_run_config(project_root, shapes_dir), run, **QUIET)
    with pytest.raises(ValueError, match=str(run)):
        Captioner.load(run)
    (run / "config.json").write_text((trained_run / "config.json").read_text())
    (run / "history.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=str(run / "history.json")):
        Trainer(_trained_run_config(project_root, shapes_dir), run, **QUIET)


def test_second_training_on_the_same_run_directory_is_refused(trained_run, tmp_path,
                                                              project_root, shapes_dir):
    run = copy_run(trained_run, tmp_path)  # its two epochs are done: fit() trains nothing
    config = _trained_run_config(project_root, shapes_dir)
    first = Trainer(config, run, **QUIET)
    with pytest.raises(RuntimeError, match=rf"in use by another training \(PID {os.getpid()}\)"):
        Trainer(config, run, **QUIET)
    assert first.fit()["epoch"] == [1, 2]  # releases the lock when it ends
    Trainer(config, run, **QUIET).lock.release()


def test_second_training_in_another_process_is_refused(tmp_path):
    lock = RunLock(tmp_path).acquire()
    code = ("import sys; from captioner.train.runlock import RunLock\n"
            "try:\n    RunLock(sys.argv[1]).acquire()\nexcept RuntimeError as e:\n"
            "    print(e); sys.exit(3)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    lock.release()
    assert out.returncode == 3
    assert f"PID {os.getpid()}" in out.stdout and str(tmp_path) in out.stdout


def test_lock_without_fcntl_takes_over_a_stale_pid(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(f"{dead.pid}\n")
    lock = RunLock(tmp_path)
    lock._acquire_exclusive_file()  # the stale lock is free
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    with pytest.raises(RuntimeError, match=f"PID {os.getpid()}"):
        RunLock(tmp_path)._acquire_exclusive_file()  # a live holder is not
    lock.release()


def test_config_is_read_with_safe_load_and_train_uses_no_pickle(project_root):
    source = (project_root / "captioner" / "config.py").read_text()
    assert "yaml.safe_load" in source and "yaml.load(" not in source
    for path in (project_root / "captioner" / "train").glob("*.py"):
        assert "pickle" not in path.read_text(), path
