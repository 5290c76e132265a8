"""Training to a time budget (``train.max_minutes``).

How many steps a run can take in an hour depends on the machine: the same QM9 recipe
trained at 144 to 269 pictures/s on machines of one kind (README). With
``train.max_minutes`` the run measures its own rate and plans the global step it ends
at, so that training -- its steps, validations and checkpoints -- fits the budget, with
``train.epochs`` as the upper bound. The cosine schedule decays to that planned end
(:func:`~captioner.train.steps.make_optimizer` reads it from a variable), so a run on a
slow machine ends with a fully decayed learning rate instead of being cut off high, and
one on a fast machine uses the time it has.

The plan is made after ``probe_steps`` steps (timed from the end of the first, which
compiles) and revised after every validation (whose time is then part of the rate, and
the last one's duration is kept back for the final one). The planned end, the decay
horizon and the seconds spent are checkpointed with the run, so a resumed run keeps its
schedule and counts the time already spent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import tensorflow as tf


def plan_end_step(done: int, steps_per_s: float, seconds_left: float, cap: int) -> int:
    """The global step a run should end at: ``done`` plus the steps that ``steps_per_s``
    fits in ``seconds_left``, at most ``cap``, never before ``done``.

    Example:
        >>> plan_end_step(100, 2.5, 40.0, cap=1000)
        200
        >>> plan_end_step(100, 2.5, 4000.0, cap=1000), plan_end_step(100, 2.5, -5.0, cap=1000)
        (1000, 100)
    """
    return int(min(cap, done + max(0, math.floor(steps_per_s * seconds_left))))


class TimeBudget:
    """The planned end of a run that must train in at most ``minutes``.

    ``end_step`` (int64: the global step training stops at), ``decay_steps`` (float32:
    the cosine schedule's decay horizon, ``end_step - warmup_steps``) and ``seconds``
    (float64: wall seconds of training so far) are variables for the run's checkpoint.
    The Trainer calls :meth:`start` when its loop starts, :meth:`after_step` after every
    step (true: stop now) and :meth:`after_validation` after every epoch's validation.

    Example:
        >>> clock = iter([0.0, 5.0, 15.0, 25.0]).__next__
        >>> budget = TimeBudget(1.0, cap=10_000, warmup_steps=0, probe_steps=2, clock=clock)
        >>> budget.start(0)
        >>> budget.after_step(1)  # the first step (compiling) ends at 5 s
        False
        >>> budget.after_step(2), budget.after_step(3)  # then 2 steps in 20 s: 0.1 step/s
        train.max_minutes=1: ending at step 6 (of at most 10,000) at 0.10 steps/s, 0.4 min spent
        (False, False)
        >>> int(budget.end_step.numpy()), float(budget.seconds.numpy())  # 35 s left
        (6, 25.0)
    """

    def __init__(self, minutes: float, cap: int, warmup_steps: int, probe_steps: int = 50,
                 log: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic):
        self.budget_s, self.cap, self.warmup = 60.0 * minutes, cap, warmup_steps
        self.probe_steps, self.log, self.clock = probe_steps, log, clock
        self.end_step = tf.Variable(cap, dtype="int64", trainable=False)
        self.decay_steps = tf.Variable(float(max(1, cap - warmup_steps)), dtype="float32",
                                       trainable=False)
        self.seconds = tf.Variable(0.0, dtype="float64", trainable=False)
        self._reserve = 0.0  # the last validation's seconds, kept for the final one
        self._first_step, self._last = 0, 0.0
        self._first_time: float | None = None  # when the rate's first step ended

    def variables(self) -> dict[str, tf.Variable]:
        """What the run's checkpoint saves, by name."""
        return {"budget_end_step": self.end_step, "budget_decay_steps": self.decay_steps,
                "budget_seconds": self.seconds}

    def start(self, step: int) -> None:
        """The loop starts (or resumes) at global ``step``; the rate is measured from the
        end of the next step (the first one compiles)."""
        self._first_step = step
        self._last = self.clock()
        self._first_time = None

    def spent(self, step: int) -> bool:
        """Whether the planned end is reached at global ``step``."""
        return step >= int(self.end_step.numpy())

    def _tick(self) -> float:
        now = self.clock()
        self.seconds.assign_add(now - self._last)
        self._last = now
        return now

    def after_step(self, step: int) -> bool:
        """Count the time of the step that ended at global ``step``; plan the end once
        ``probe_steps`` steps have run in this process. True when training should stop."""
        now = self._tick()
        if self._first_time is None:
            self._first_step, self._first_time = step, now
        elif step - self._first_step == self.probe_steps:
            self._plan(step)
        return self.spent(step)

    def after_validation(self, step: int, validation_s: float) -> None:
        """Count the validation just done (``validation_s`` of it) and plan again, unless
        the planned end is reached (a run ended by its budget stays ended)."""
        self._tick()
        self._reserve = validation_s
        if not self.spent(step):
            self._plan(step)

    def _plan(self, step: int) -> None:
        if self._first_time is None or step <= self._first_step:
            return
        elapsed = self._last - self._first_time
        if elapsed <= 0:
            return
        rate = (step - self._first_step) / elapsed  # steps/s, validations included
        left = self.budget_s - float(self.seconds.numpy()) - self._reserve
        end = max(step, plan_end_step(step, rate, left, self.cap))
        if end != int(self.end_step.numpy()):
            self.log(f"train.max_minutes={self.budget_s / 60:g}: ending at step {end:,} "
                     f"(of at most {self.cap:,}) at {rate:.2f} steps/s, "
                     f"{float(self.seconds.numpy()) / 60:.1f} min spent")
        self.end_step.assign(end)
        self.decay_steps.assign(float(max(1, end - self.warmup)))
