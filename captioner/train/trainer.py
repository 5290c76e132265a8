"""Training: a run directory set up from the units of :mod:`captioner.train.setup`,
trained epoch by epoch with the compiled step of :mod:`captioner.train.steps`, validated,
checkpointed (:mod:`captioner.train.checkpoints`) and resumed where it stopped.

A run directory holds ``config.json`` (fully resolved), ``tokenizer.json``,
``model.json`` (the model's ``get_config``), ``checkpoints/`` (latest N),
``best/`` (best on the validation metric), ``history.json``, ``history.png``,
``tensorboard/``, ``skipped_images.txt`` and ``.lock`` (held while a training uses it).

Fault tolerance: checkpoints at every epoch's end, every ``train.checkpoint_minutes`` and
on SIGTERM / SIGINT; a resumed run continues at the exact step with the same batches,
optimizer state, schedule position and step seeds, so it ends with the weights an
uninterrupted run would have; every JSON file is written atomically, and a damaged newest
checkpoint is skipped for the previous one. ``tests/test_faults_training.py`` kills a
training with SIGKILL at random moments and checks all of this.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from captioner.config import Config
from captioner.data.features import FeatureCache
from captioner.data.tokenizers import SmilesTokenizer
from captioner.evaluate.metrics import validation_metric
from captioner.fileio import atomic_write_text
from captioner.generate.captioner import Captioner
from captioner.model.precision import precision_note
from captioner.train.batchnorm import recompute_batchnorm, trainable_batchnorm
from captioner.train.budget import TimeBudget
from captioner.train.checkpoints import Checkpoints, checkpoint_number
from captioner.train.distribute import distribute_batches, strategy_from_config, worker_run_dir
from captioner.train.runlock import RunLock
from captioner.train.setup import (
    PreparedData,
    build_model,
    build_optimizers,
    check_model_config,
    check_run_config,
    epoch_note,
    load_or_fit_tokenizer,
    prepare_data,
    read_run_json,
    read_splits,
    train_steps_per_epoch,
    validate_config,
    write_model_config,
)
from captioner.train.steps import make_eval_step, make_train_step, sampling_probability
from captioner.viz.figures import plot_history

SIGNAL_STATUS = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}


class NonFiniteLoss(RuntimeError):
    """A batch's loss or gradients were inf/NaN with ``train.on_nonfinite: stop``."""


class Preempted(SystemExit):
    """SIGTERM during training: a checkpoint was saved; the process exits with 143."""


class Trainer:
    """Trains a model into a run directory and resumes it where it stopped.

    Set-up (the constructor), in order: check the config against the run directory,
    make the strategy (before any other TensorFlow op), seed, read the splits, load or fit
    the tokenizer, save ``config.json``, build the model (``model.json``), prepare the data
    (and the feature cache), build the optimizers over ``epochs x steps_per_epoch`` steps
    (with ``train.max_minutes``, over the steps its :class:`TimeBudget` plans),
    then restore the latest checkpoint if there is one. The run directory is locked
    (:class:`~captioner.train.runlock.RunLock`) from the constructor to the end of
    :meth:`fit`: a second training on it is refused. From the command line::

        python -m captioner train --config configs/shapes.yaml --run-dir runs/try

    and from Python ``Trainer(load_config("configs/shapes.yaml"), "runs/try").fit()``
    (``captioner.train.trainer.train``); ``tests/test_training.py`` and
    ``tests/test_cli.py`` run tiny ones.
    """

    def __init__(self, cfg: Config, run_dir: str | Path, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        t = cfg.train
        check_run_config(cfg, Path(run_dir))
        validate_config(cfg)
        self.strategy = strategy_from_config(t, log)  # before any other TensorFlow op
        self.run_dir = worker_run_dir(self.strategy, t, Path(run_dir))
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"run directory {self.run_dir} exists and is not a directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.run_dir).acquire()
        try:
            self._set_up(cfg, log)
        except BaseException:
            self.lock.release()
            raise

    def _set_up(self, cfg: Config, log: Callable[[str], None]) -> None:
        t = cfg.train
        keras.utils.set_random_seed(t.seed)
        note = precision_note(t.precision)  # what "auto" chose, or emulated bfloat16
        if note:
            log(note)
        records = read_splits(cfg)
        self.tokenizer = load_or_fit_tokenizer(cfg, self.run_dir,
                                               [r.text for r in records["train"]])
        cfg.save(self.run_dir / "config.json")  # atomic
        self.model = build_model(self.strategy, cfg, self.tokenizer.vocab_size)
        check_model_config(self.run_dir, self.model, self.tokenizer.vocab_size)
        write_model_config(self.run_dir, self.model)
        self.data: PreparedData = prepare_data(cfg, self.run_dir, records, self.tokenizer,
                                               self.model, log)
        self.steps_per_epoch = train_steps_per_epoch(t, self.data.train.num_pairs)
        note = epoch_note(t, self.data.train.num_pairs)
        if note:
            log(note)
        cap = self.steps_per_epoch * t.epochs
        self.budget = None if t.max_minutes is None else TimeBudget(
            t.max_minutes, cap, t.warmup_steps, log=log)
        self.optimizer, self.backbone_optimizer = build_optimizers(
            self.strategy, cfg, self.model, cap,
            None if self.budget is None else self.budget.decay_steps)
        self.checkpoints = Checkpoints(self.run_dir, self.model, self.optimizer,
                                       self.backbone_optimizer, keep=t.keep_checkpoints,
                                       state=None if self.budget is None
                                       else self.budget.variables())
        self.history = load_history(self.run_dir)
        self._captioner: Captioner | None = None
        self._signal: int | None = None
        self._unsaved = False  # steps trained since the last checkpoint
        self._last_save = time.monotonic()
        restored = self.checkpoints.restore(log)
        done = int(self.epoch.numpy())  # 0 without a checkpoint
        have = len(self.history.get("epoch", []))
        if have < done:
            log(f"history.json holds {have} epochs but the checkpoint {done}: the records "
                f"of the missing epochs are lost")
        self.history = {k: v[:done] for k, v in self.history.items()}  # completed epochs
        if restored:
            log(f"resuming {self.run_dir} at epoch {done + 1}, "
                f"step {int(self.step_in_epoch.numpy())} (global step "
                f"{int(self.optimizer.iterations.numpy())}) from {restored}")

    @property
    def epoch(self) -> tf.Variable:
        """Completed epochs (int64 variable, checkpointed)."""
        return self.checkpoints.epoch

    @property
    def step_in_epoch(self) -> tf.Variable:
        """Steps done of the current epoch (int64 variable, checkpointed)."""
        return self.checkpoints.step_in_epoch

    @property
    def best(self) -> tf.Variable:
        """The best validation metric so far (float64 variable, checkpointed)."""
        return self.checkpoints.best

    @property
    def cache(self) -> FeatureCache | None:
        """The feature cache the training grids are read from (``data.feature_cache``)."""
        return self.data.cache

    @property
    def val_metric_name(self) -> str:
        name = self.cfg.train.val_metric
        if name == "auto":
            return "bleu4" if self.cfg.tokenizer.kind == "word" else "exact_match"
        return name

    # ---- training --------------------------------------------------------------------
    def fit(self) -> dict[str, list[Any]]:
        """Train until ``train.epochs`` are complete, or the step a ``train.max_minutes``
        budget plans (:class:`~captioner.train.budget.TimeBudget`); returns the history.

        While it runs, SIGTERM and SIGINT (in the main thread) save a checkpoint at the
        step they arrive after, then SIGTERM exits with status 143 (:class:`Preempted`)
        and SIGINT raises KeyboardInterrupt; the previous handlers are put back after. A
        non-finite loss with ``train.on_nonfinite: stop`` raises :class:`NonFiniteLoss`.
        The run directory's lock is released when it returns or raises.
        """
        self.lock.acquire()
        previous = self._install_signal_handlers()
        try:
            return self._fit()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.lock.release()

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Handlers that note SIGTERM / SIGINT for the loop; returns the previous ones."""
        self._signal = None
        if threading.current_thread() is not threading.main_thread():
            return {}

        def note(signum, _frame):
            self._signal = signum

        return {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}

    def _save(self) -> str:
        path = self.checkpoints.save_latest()
        self._unsaved, self._last_save = False, time.monotonic()
        return path

    def _stop_on_signal(self) -> None:
        """After a noted SIGTERM / SIGINT: save (unless just saved), log and leave."""
        signum, self._signal = self._signal, None
        path = self._save() if self._unsaved else self.checkpoints.latest_manager.latest_checkpoint
        name = signal.Signals(signum).name
        self.log(f"{name}: checkpoint {path} holds epoch {int(self.epoch.numpy()) + 1}, step "
                 f"{int(self.step_in_epoch.numpy())}; run the same command to resume")
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.log(f"{name}: exiting with status {SIGNAL_STATUS[signum]}")
        raise Preempted(SIGNAL_STATUS[signum])

    def _fit(self) -> dict[str, list[Any]]:
        t, ss = self.cfg.train, self.cfg.train.scheduled_sampling
        train_step = make_train_step(self.model, self.optimizer, self.tokenizer.pad_id,
                                     t.attention_reg, ss.enabled, ss.greedy,
                                     self.backbone_optimizer, strategy=self.strategy,
                                     global_batch_size=t.batch_size,
                                     attention_supervision=t.attention_supervision)
        eval_step = make_eval_step(self.model, self.tokenizer.pad_id)
        writer = (tf.summary.create_file_writer(str(self.run_dir / "tensorboard"))
                  if t.tensorboard else tf.summary.create_noop_writer())
        self._last_save = time.monotonic()
        if self.budget is not None:
            self.budget.start(int(self.optimizer.iterations.numpy()))
            self.log(f"train.max_minutes={t.max_minutes:g}: at most "
                     f"{self.budget.cap:,} steps ({t.epochs} epochs of {self.steps_per_epoch:,});"
                     f" the end is planned from the rate after {self.budget.probe_steps} steps"
                     f" and after each validation")
        try:
            while int(self.epoch.numpy()) < t.epochs and not self._budget_spent():
                self._run_epoch(train_step, eval_step, writer)
                if self._signal is not None:
                    self._stop_on_signal()
        except KeyboardInterrupt:
            if self._unsaved:
                path = self._save()
                self.log(f"interrupted: saved {path}; run the same command to resume")
            raise
        return self.history

    def _run_epoch(self, train_step, eval_step, writer) -> None:
        """One epoch (from the step it stopped at), validation, history and checkpoints."""
        t = self.cfg.train
        epoch = int(self.epoch.numpy()) + 1
        skip = int(self.step_in_epoch.numpy())
        prob = sampling_probability(self.cfg, epoch)
        batches = distribute_batches(self.strategy, self.data.batches(t, epoch, skip))
        started, n_steps = time.perf_counter(), 0
        bar = self._progress(epoch, skip)
        ckpts = self.checkpoints
        for inputs, tokens, *cells in batches:  # each global batch split by replica
            seed = tf.constant([t.seed, int(self.optimizer.iterations.numpy())], "int32")
            out = train_step(inputs, tokens, tf.constant(prob, "float32"), seed, *cells)
            n_steps, self._unsaved = n_steps + 1, True
            if float(out["nonfinite"]) > 0:  # the update was not applied
                where = (f"epoch {epoch}, step {int(self.step_in_epoch.numpy()) + 1} "
                         f"(global step {int(self.optimizer.iterations.numpy()) + 1})")
                if t.on_nonfinite == "stop":
                    raise NonFiniteLoss(
                        f"non-finite loss or gradients ({float(out['loss'])}) at {where}; "
                        f"the update was not applied and nothing was saved: the latest "
                        f"checkpoint in {ckpts.run_dir / 'checkpoints'} holds the last good "
                        f"weights (train.on_nonfinite: skip goes past such batches)")
                self.log(f"skipped a non-finite batch at {where}")
                ckpts.skipped.assign_add(1)
            else:
                ckpts.loss_sum.assign_add(float(out["nll"]))
            self.step_in_epoch.assign_add(1)
            step = int(self.optimizer.iterations.numpy())
            self._log_step(bar, writer, out, step, started, n_steps)
            if self._checkpoint_due(step):
                self._save()
            if self._signal is not None:
                self._stop_on_signal()
            if self.budget is not None and self.budget.after_step(step):
                self.log(f"epoch {epoch} ends at step {step:,}, where the time budget "
                         f"planned ({int(self.step_in_epoch.numpy()):,} of its "
                         f"{self.steps_per_epoch:,} steps)")
                break
        if bar is not None:
            bar.close()
        validating = time.perf_counter()  # the epoch's steps end, its validation starts
        seconds = validating - started
        self._precise_bn(epoch)
        done = int(self.step_in_epoch.numpy()) - int(ckpts.skipped.numpy())
        record = {"epoch": epoch,
                  "loss": float(ckpts.loss_sum.numpy()) / done if done > 0 else None,
                  "images_per_s": n_steps * t.batch_size / max(seconds, 1e-9),
                  "seconds": seconds, "sampling_prob": prob,
                  "learning_rate": self._current_lr(),
                  "skipped_nonfinite": int(ckpts.skipped.numpy()),
                  **self._validate(eval_step)}
        record["global_step"] = step = int(self.optimizer.iterations.numpy())
        if self.budget is not None:
            self.budget.after_validation(step, time.perf_counter() - validating)
        self._end_epoch(record, writer)

    def _budget_spent(self) -> bool:
        """Whether a time budget's planned end is reached."""
        return (self.budget is not None
                and self.budget.spent(int(self.optimizer.iterations.numpy())))

    def _precise_bn(self, epoch: int, batches: int | None = None) -> int:
        """Recompute the backbone's batch-norm statistics with the current weights from
        the first ``batches`` (default ``train.precise_bn_batches``) training batches of
        1-based ``epoch`` (:func:`~captioner.train.batchnorm.recompute_batchnorm`); returns
        the batches used (0: off, no trainable batch norm, or cached grids)."""
        k = self.cfg.train.precise_bn_batches if batches is None else batches
        if not k or self.data.cache is not None or not trainable_batchnorm(self.model):
            return 0
        data = self.data.batches(self.cfg.train, epoch).take(k)
        return recompute_batchnorm(self.model, (batch[0] for batch in data))  # the inputs

    def recalibrate(self, batches: int = 16) -> dict[str, Any]:
        """Recompute the batch-norm statistics of a trained run's newest checkpoint from
        ``batches`` batches of its last epoch (what ``train.precise_bn_batches`` does
        before each validation, for runs trained without it), validate, and save the
        result as a new checkpoint -- and as ``best/`` when its validation metric is at
        least the best so far (or there is no validation metric). Returns the validation
        record (``val_loss``, ``val_metric``, ``val_metric_name``, ``batches``,
        ``checkpoint``, ``best``)."""
        epoch = int(self.epoch.numpy())
        if epoch < 1 or int(self.step_in_epoch.numpy()):
            raise ValueError(f"{self.run_dir}: recalibrate needs a checkpoint at the end of an "
                             f"epoch (this one holds {epoch} epochs and "
                             f"{int(self.step_in_epoch.numpy())} steps of the next): finish "
                             f"training first")
        self.lock.acquire()
        try:
            used = self._precise_bn(epoch, batches)
            if not used:
                raise ValueError(f"{self.run_dir}: nothing to recalibrate (no trainable batch "
                                 f"norm in the backbone, cached grids, or --batches 0)")
            record = self._validate(make_eval_step(self.model, self.tokenizer.pad_id))
            metric = record["val_metric"]
            improved = metric is None or metric >= float(self.best.numpy())
            if metric is not None and improved:
                self.best.assign(metric)
            path = self.checkpoints.save_latest()
            if improved:
                self.checkpoints.save_best(checkpoint_number(path))
        finally:
            self.lock.release()
        return {**record, "batches": used, "checkpoint": path, "best": improved}

    def _checkpoint_due(self, step: int) -> bool:
        """Every ``train.checkpoint_every`` steps, and ``train.checkpoint_minutes`` after
        the last save."""
        t = self.cfg.train
        if t.checkpoint_every and step % t.checkpoint_every == 0:
            return True
        return bool(t.checkpoint_minutes) and (
            time.monotonic() - self._last_save >= 60.0 * t.checkpoint_minutes)

    def _progress(self, epoch: int, skip: int):
        if not self.cfg.train.progress:
            return None
        return tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {epoch}",
                    unit="step", dynamic_ncols=True, mininterval=1.0)

    def _log_step(self, bar, writer, out, step, started, n_steps) -> None:
        every = 10
        if bar is not None:
            bar.update(1)
            if n_steps % every == 0:
                rate = n_steps * self.cfg.train.batch_size / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{float(out['nll']):.3f}", img_s=f"{rate:.0f}")
        if step % every == 0:
            with writer.as_default(step=step):
                for key, value in out.items():
                    tf.summary.scalar(f"train/{key}", value)

    def _current_lr(self) -> float:
        lr = self.optimizer.learning_rate
        return float(lr.numpy() if hasattr(lr, "numpy") else lr)

    def _validate(self, eval_step) -> dict[str, Any]:
        val, t = self.data.val, self.cfg.train
        if val.num_pairs == 0:
            return {"val_loss": None, "val_metric": None, "val_metric_name": self.val_metric_name}
        totals = np.zeros(2)
        idx = np.arange(val.num_pairs)
        for start in range(0, val.num_pairs, t.batch_size):
            sel = idx[start:start + t.batch_size]
            totals += eval_step(tf.constant(val.images[val.pair_image[sel]]),
                                tf.constant(self.data.val_tokens[sel])).numpy()
        limit = t.val_limit or val.num_images
        texts = self.captioner().generate(val.images[:limit], strategy="greedy",
                                          margin_views=()).texts  # pixels, read once
        selfies = self.tokenizer.kind == "selfies"  # its texts are SMILES; re-encoding can fail
        split = SmilesTokenizer().tokenize if selfies else self.tokenizer.tokenize
        metric = validation_metric(self.val_metric_name, texts, val.references[:limit], split)
        return {"val_loss": float(totals[0] / max(totals[1], 1.0)), "val_metric": metric,
                "val_metric_name": self.val_metric_name}

    def captioner(self) -> Captioner:
        """A :class:`Captioner` over the weights being trained (compiled once, cached)."""
        if self._captioner is None:
            self._captioner = Captioner(self.cfg, self.tokenizer, self.model)
        return self._captioner

    def _end_epoch(self, record: dict[str, Any], writer) -> None:
        """Write the history with the epoch's record, THEN the epoch's checkpoint: a crash
        between the two leaves a history one epoch ahead, which resuming trims (the
        other order would lose the epoch's record)."""
        for key, value in record.items():
            self.history.setdefault(key, []).append(value)
        write_history(self.run_dir, self.history, self.log)
        improved = self.checkpoints.end_epoch(None, record["val_metric"])
        self._unsaved, self._last_save = False, time.monotonic()
        with writer.as_default(step=record["epoch"]):
            for key in ("loss", "val_loss", "val_metric", "images_per_s", "learning_rate"):
                if record.get(key) is not None:
                    tf.summary.scalar(f"epoch/{key}", record[key])
        writer.flush()
        self.log(self._summary(record, improved))

    def _summary(self, r: dict[str, Any], improved: bool) -> str:
        def fmt(v):
            return "n/a" if v is None else f"{v:.4f}"

        star = " (best)" if improved else ""
        return (f"epoch {r['epoch']}/{self.cfg.train.epochs}: loss {fmt(r['loss'])} "
                f"val_loss {fmt(r['val_loss'])} {r['val_metric_name']} "
                f"{fmt(r['val_metric'])}{star} | {r['images_per_s']:.0f} img/s, "
                f"{r['seconds']:.0f} s")


def load_history(run_dir: Path) -> dict[str, list[Any]]:
    """The run's ``history.json`` (one list per key, one entry per epoch), or {}."""
    path = run_dir / "history.json"
    history = read_run_json(path) if path.is_file() else {}
    if not isinstance(history, dict):
        raise ValueError(f"{path} is unreadable (not a JSON object of lists)")
    return history


def write_history(run_dir: Path, history: dict[str, list[Any]],
                  log: Callable[[str], None] = print) -> None:
    """Write ``history.json`` (atomically) and, when matplotlib is installed,
    ``history.png``."""
    atomic_write_text(run_dir / "history.json", json.dumps(history, indent=2) + "\n")
    try:
        plot_history(history, run_dir / "history.png")
    except ImportError as exc:
        log(f"history plot skipped: {exc}")


def train(cfg: Config, run_dir: str | Path, log: Callable[[str], None] = print
          ) -> dict[str, list[Any]]:
    """Train (or resume) a run; returns the history."""
    return Trainer(cfg, run_dir, log).fit()
