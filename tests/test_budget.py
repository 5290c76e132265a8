"""Training to a time budget (``train.max_minutes``): the plan from a measured rate, the
schedule that ends there, the Trainer stopping at it, and resuming."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from captioner.config import ConfigError, apply_overrides, validate
from captioner.train.budget import TimeBudget, plan_end_step
from captioner.train.setup import validate_config
from captioner.train.steps import make_optimizer
from captioner.train.trainer import Trainer


def fake_clock(times):
    return iter(times).__next__


def test_plan_end_step_fits_the_rate_into_the_time_left():
    assert plan_end_step(0, 2.0, 30.0, cap=1000) == 60
    assert plan_end_step(10, 2.0, 30.4, cap=1000) == 70  # whole steps only
    assert plan_end_step(10, 2.0, 30.0, cap=50) == 50  # never past the epochs
    assert plan_end_step(10, 2.0, -3.0, cap=50) == 10  # over budget: stop now


def test_the_budget_plans_after_the_probe_and_again_after_each_validation():
    lines: list[str] = []
    # start at 0 s; the first step (compiling) ends at 3 s, the next ones at 4, 5, 6 and
    # 7 s; a validation of 2 s ends at 9 s
    budget = TimeBudget(0.3, cap=100, warmup_steps=2, probe_steps=2, log=lines.append,
                        clock=fake_clock([0.0, 3.0, 4.0, 5.0, 6.0, 7.0, 9.0]))
    budget.start(0)
    assert [budget.after_step(s) for s in (1, 2, 3)] == [False, False, False]
    # 1 step/s from the end of the first step: 13 more steps fit in the 13 s left of 18
    assert int(budget.end_step.numpy()) == 16 and float(budget.decay_steps.numpy()) == 14.0
    assert [budget.after_step(s) for s in (4, 5)] == [False, False]
    budget.after_validation(5, validation_s=2.0)
    # 4 steps in 6 s; 18 - 9 s spent - 2 s kept for the last validation = 7 s: 4 steps
    assert int(budget.end_step.numpy()) == 9 and float(budget.decay_steps.numpy()) == 7.0
    assert float(budget.seconds.numpy()) == 9.0
    assert lines[-1].startswith("train.max_minutes=0.3: ending at step 9 (of at most 100)")


def test_a_budget_that_has_ended_stays_ended():
    budget = TimeBudget(1.0, cap=100, warmup_steps=0, probe_steps=1,
                        clock=fake_clock([0.0, 1.0, 70.0, 71.0]), log=lambda _m: None)
    budget.start(0)
    assert not budget.after_step(1)
    assert budget.after_step(2)  # 69 s for a step when 59 were left: end at step 2
    budget.after_validation(2, validation_s=1.0)
    assert int(budget.end_step.numpy()) == 2 and budget.spent(2)


def test_the_cosine_schedule_follows_the_budget_variable(tiny_config):
    cfg = apply_overrides(tiny_config, ["train.lr_schedule=cosine", "train.warmup_steps=0",
                                        "train.learning_rate=0.01", "train.min_learning_rate=0"])
    decay = tf.Variable(100.0)
    schedule = make_optimizer(cfg, 100, decay_steps=decay)._learning_rate  # Keras keeps it
    assert isinstance(schedule, keras.optimizers.schedules.CosineDecay)
    assert float(schedule(50)) == pytest.approx(0.005)
    decay.assign(50.0)
    assert float(schedule(50)) == pytest.approx(0.0, abs=1e-9)
    assert float(schedule(25)) == pytest.approx(0.005)


def test_max_minutes_must_be_positive_and_on_one_process(tiny_config):
    with pytest.raises(ConfigError, match="train.max_minutes"):
        validate(apply_overrides(tiny_config, ["train.max_minutes=0"]))
    with pytest.raises(ConfigError, match="train.max_minutes does not combine"):
        validate_config(apply_overrides(tiny_config, ["train.max_minutes=5",
                                                      "train.strategy=multi_worker"]))


def test_a_budget_that_is_not_reached_changes_nothing(tiny_config, tmp_path):
    """60 minutes for a run of seconds: the same steps, schedule and weights as without."""
    base = apply_overrides(tiny_config, ["train.lr_schedule=cosine", "train.epochs=2",
                                         "train.warmup_steps=1"])
    weights = []
    for name, extra in (("plain", []), ("budget", ["train.max_minutes=60"])):
        trainer = Trainer(apply_overrides(base, extra), tmp_path / name, log=lambda _m: None)
        history = trainer.fit()
        assert history["epoch"] == [1, 2]
        weights.append([v.numpy() for v in trainer.model.weights])
    assert all(np.array_equal(a, b) for a, b in zip(*weights, strict=True))


def test_the_trainer_stops_where_the_budget_ends_and_stays_stopped(tiny_config, tmp_path):
    """A budget spent by the first validation: the run ends after epoch 1 of 5, with the
    schedule's end moved there, and running it again trains nothing more."""
    cfg = apply_overrides(tiny_config, ["train.lr_schedule=cosine", "train.epochs=5",
                                        "train.warmup_steps=0", "train.max_minutes=0.0001"])
    lines: list[str] = []
    trainer = Trainer(cfg, tmp_path, log=lines.append)
    history = trainer.fit()
    steps = trainer.steps_per_epoch
    assert history["epoch"] == [1] and history["global_step"] == [steps]
    assert int(trainer.optimizer.iterations.numpy()) == steps
    assert int(trainer.budget.end_step.numpy()) == steps
    assert float(trainer.budget.decay_steps.numpy()) == steps
    assert float(trainer.budget.seconds.numpy()) > 0
    assert any(line.startswith("train.max_minutes=0.0001: at most ") for line in lines)
    assert any(line.startswith(f"train.max_minutes=0.0001: ending at step {steps} ")
               for line in lines)
    again = Trainer(cfg, tmp_path, log=lambda _m: None)  # restores the budget's variables
    assert int(again.budget.end_step.numpy()) == steps
    assert again.fit()["epoch"] == [1]
    assert int(again.optimizer.iterations.numpy()) == steps


def test_a_budget_given_to_a_run_that_started_without_one(tiny_config, tmp_path):
    cfg = apply_overrides(tiny_config, ["train.epochs=1"])
    Trainer(cfg, tmp_path, log=lambda _m: None).fit()
    lines: list[str] = []
    more = apply_overrides(cfg, ["train.epochs=3", "train.max_minutes=0.0001"])
    history = Trainer(more, tmp_path, log=lines.append).fit()
    assert any("holds no budget_end_step, budget_decay_steps, budget_seconds" in line
               for line in lines)
    assert history["epoch"] == [1, 2]  # one more epoch, then the budget is spent
