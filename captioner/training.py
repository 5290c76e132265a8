"""Training: the compiled train step, validation, checkpoints, resume and history.

A run directory holds ``config.json`` (fully resolved), ``tokenizer.json``,
``model.json`` (the model's ``get_config``), ``checkpoints/`` (latest N),
``best/`` (best on the validation metric), ``history.json``, ``history.png``,
``tensorboard/`` and ``skipped_images.txt``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from captioner.config import Config, ConfigError, config_from_dict
from captioner.data import (
    LoadReport,
    PairTensors,
    SplitData,
    build_split,
    epoch_batches,
    image_batches,
    read_records,
    steps_per_epoch,
)
from captioner.inference import Captioner
from captioner.metrics import validation_metric
from captioner.model import CaptionModel
from captioner.tokenizers import Tokenizer


def caption_loss(logits: tf.Tensor, targets: tf.Tensor, alphas: tf.Tensor, pad_id: int,
                 attention_reg: float) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Masked cross-entropy plus doubly stochastic attention regularisation.

    ``loss = (sum of token NLLs + lambda * sum_images sum_cells (1 - sum_steps alpha)^2)
    / number of real tokens`` -- the paper's per-caption objective, summed over the
    batch and divided by the real-token count. Returns (loss, mean token NLL, reg term).
    """
    mask = tf.cast(tf.not_equal(targets, pad_id), "float32")  # (B, T)
    n_tokens = tf.maximum(tf.reduce_sum(mask), 1.0)
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)  # (B, T)
    nll_sum = tf.reduce_sum(nll * mask)
    coverage = tf.reduce_sum(alphas * mask[:, :, None], axis=1)  # (B, G)
    reg_sum = tf.reduce_sum(tf.square(1.0 - coverage))
    loss = (nll_sum + attention_reg * reg_sum) / n_tokens
    return loss, nll_sum / n_tokens, attention_reg * reg_sum / n_tokens


def _trim(tokens: tf.Tensor, pad_id: int) -> tf.Tensor:
    """Drop padding columns that no row of the batch uses: (B, L) -> (B, L')."""
    length = tf.reduce_max(tf.reduce_sum(tf.cast(tf.not_equal(tokens, pad_id), "int32"), 1))
    return tokens[:, :length]


def make_train_step(model: CaptionModel, optimizer: keras.optimizers.Optimizer, pad_id: int,
                    attention_reg: float, scheduled_sampling: bool = False,
                    greedy_sampling: bool = False) -> Callable[..., dict[str, tf.Tensor]]:
    """Compile one training step (teacher forcing, or scheduled sampling when enabled)."""
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    @tf.function(reduce_retracing=True)
    def train_step(images, tokens, sampling_prob, seed):
        tokens = _trim(tokens, pad_id)
        inp, tgt = tokens[:, :-1], tokens[:, 1:]  # (B, T), (B, T)
        with tf.GradientTape() as tape:
            logits, alphas = model((images, inp), training=True,
                                   sampling_prob=sampling_prob if scheduled_sampling else None,
                                   seed=seed, greedy_sampling=greedy_sampling)
            loss, nll, reg = caption_loss(logits, tgt, alphas, pad_id, attention_reg)
            scaled = optimizer.scale_loss(loss) if loss_scaled else loss
        variables = model.trainable_variables
        grads = tape.gradient(scaled, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return {"loss": loss, "nll": nll, "reg": reg}

    return train_step


def make_eval_step(model: CaptionModel, pad_id: int) -> Callable[..., tf.Tensor]:
    """Compile the validation loss: (sum of token NLLs, number of tokens) of a batch."""

    @tf.function(reduce_retracing=True)
    def eval_step(images, tokens):
        tokens = _trim(tokens, pad_id)
        logits, alphas = model((images, tokens[:, :-1]), training=False)
        _, nll, _ = caption_loss(logits, tokens[:, 1:], alphas, pad_id, 0.0)
        n = tf.reduce_sum(tf.cast(tf.not_equal(tokens[:, 1:], pad_id), "float32"))
        return tf.stack([nll * n, n])

    return eval_step


def make_optimizer(cfg: Config, total_steps: int) -> keras.optimizers.Optimizer:
    t = cfg.train
    lr: Any = t.learning_rate
    if t.lr_schedule == "cosine":
        decay_steps = max(1, total_steps - t.warmup_steps)
        lr = keras.optimizers.schedules.CosineDecay(
            0.0 if t.warmup_steps else t.learning_rate, decay_steps,
            alpha=t.min_learning_rate / t.learning_rate,
            warmup_target=t.learning_rate if t.warmup_steps else None,
            warmup_steps=t.warmup_steps)
    elif t.lr_schedule == "exponential":
        per_epoch = max(1, total_steps // max(1, t.epochs))
        lr = keras.optimizers.schedules.ExponentialDecay(t.learning_rate, per_epoch, t.decay_rate)
    opt = keras.optimizers.Adam(learning_rate=lr, global_clipnorm=t.clip_norm)
    if t.precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def sampling_probability(cfg: Config, epoch: int) -> float:
    """Scheduled-sampling probability for 1-based ``epoch``."""
    ss = cfg.train.scheduled_sampling
    if not ss.enabled:
        return 0.0
    span = max(1, ss.to_epoch - ss.from_epoch)
    frac = min(1.0, max(0.0, (epoch - ss.from_epoch) / span))
    if ss.schedule == "inverse_sigmoid":
        k = 5.0  # steepness: the curve goes from ~1% to ~99% of the way across the span
        frac = 1.0 / (1.0 + math.exp(-k * (2.0 * frac - 1.0)))
    return ss.start + (ss.end - ss.start) * frac


def restore_weights(model: CaptionModel, run_dir: str | Path, which: str = "best") -> str:
    """Restore model weights from ``best/`` (falling back to ``checkpoints/``)."""
    run_dir = Path(run_dir)
    dirs = ["best", "checkpoints"] if which == "best" else ["checkpoints"]
    for sub in dirs:
        path = tf.train.latest_checkpoint(str(run_dir / sub))
        if path:
            tf.train.Checkpoint(model=model).restore(path).expect_partial()
            return path
    raise FileNotFoundError(f"no checkpoint in {run_dir}/best or {run_dir}/checkpoints")


@dataclass
class PreparedData:
    """Splits in memory and the training targets.

    Example:
        >>> trainer = Trainer(load_config("configs/shapes.yaml"), "runs/demo")  # doctest: +SKIP
        >>> trainer.data.train.num_images, trainer.data.tokens.shape            # doctest: +SKIP
        (4800, (4800, 16))
    """

    train: SplitData
    val: SplitData
    test: SplitData
    tokens: np.ndarray  # (N_pairs, L) int32
    val_tokens: np.ndarray  # (N_val_pairs, L) int32
    report: LoadReport


class Trainer:
    """Trains a model into a run directory and resumes it where it stopped.

    Example:
        >>> from captioner.config import load_config
        >>> cfg = load_config("configs/shapes.yaml", ["train.epochs=1"])  # doctest: +SKIP
        >>> Trainer(cfg, "runs/try").fit()                                # doctest: +SKIP
    """

    def __init__(self, cfg: Config, run_dir: str | Path, log: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.log = log
        self.cfg = self._resolve_config(cfg)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        keras.utils.set_random_seed(self.cfg.train.seed)
        self.data, self.tokenizer = self._prepare_data()
        self.model = self._build_model()
        t = self.cfg.train
        self.steps_per_epoch = steps_per_epoch(self.data.train.num_pairs, t.batch_size,
                                               t.max_steps_per_epoch)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"train.batch_size={t.batch_size} exceeds the "
                              f"{self.data.train.num_pairs} training pairs")
        self.optimizer = make_optimizer(self.cfg, self.steps_per_epoch * t.epochs)
        self.optimizer.build(self.model.trainable_variables)
        self.epoch = tf.Variable(0, dtype="int64", trainable=False)  # completed epochs
        self.step_in_epoch = tf.Variable(0, dtype="int64", trainable=False)
        self.best = tf.Variable(-np.inf, dtype="float64", trainable=False)
        self.ckpt = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                        epoch=self.epoch, step_in_epoch=self.step_in_epoch,
                                        best=self.best)
        self.manager = tf.train.CheckpointManager(self.ckpt, str(self.run_dir / "checkpoints"),
                                                  max_to_keep=t.keep_checkpoints)
        self.best_manager = tf.train.CheckpointManager(self.ckpt, str(self.run_dir / "best"), 1)
        self.history = self._load_history()
        self._restore()

    # ---- set-up ----------------------------------------------------------------------
    def _resolve_config(self, cfg: Config) -> Config:
        """On an existing run, keep its data/model/tokenizer; allow train/decode changes."""
        saved = self.run_dir / "config.json"
        if not saved.is_file():
            return cfg
        old = config_from_dict(json.loads(saved.read_text()))
        for section in ("data", "tokenizer", "model"):
            if getattr(old, section) != getattr(cfg, section):
                raise ConfigError(f"{self.run_dir} holds a run with a different '{section}' "
                                  "section; use a new --run-dir or the same config")
        return cfg

    def _prepare_data(self) -> tuple[PreparedData, Tokenizer]:
        """Read and split the records, load the images once, fit (or reload) the tokenizer."""
        cfg = self.cfg
        records = read_records(cfg.data, smiles_targets=cfg.tokenizer.kind == "smiles")
        by_split = {s: [r for r in records if r.split == s] for s in ("train", "val", "test")}
        if not by_split["train"]:
            raise ConfigError(f"no training pairs in {cfg.data.path}")
        report = LoadReport()
        size, workers = cfg.model.image_size, cfg.data.load_workers
        splits = {s: build_split(rs, size, workers, report) for s, rs in by_split.items()}
        report.write(self.run_dir / "skipped_images.txt")
        if report.count:
            self.log(f"skipped {report.count} unusable images "
                     f"(listed in {self.run_dir / 'skipped_images.txt'})")
        tokenizer = self._tokenizer(splits["train"].pair_text)
        L = cfg.data.max_length
        data = PreparedData(splits["train"], splits["val"], splits["test"],
                            tokenizer.encode_batch(splits["train"].pair_text, L),
                            tokenizer.encode_batch(splits["val"].pair_text, L), report)
        return data, tokenizer

    def _tokenizer(self, texts: list[str]) -> Tokenizer:
        path = self.run_dir / "tokenizer.json"
        if path.is_file():
            return Tokenizer.load(path)
        t = self.cfg.tokenizer
        options = {"word": dict(lower=t.lower, strip_punctuation=t.strip_punctuation,
                                max_vocab=t.max_vocab, min_count=t.min_count),
                   "char": dict(lower=t.lower), "smiles": {}}[t.kind]
        tok = Tokenizer.create(t.kind, **options).fit(texts)
        tok.save(path)
        return tok

    def _build_model(self) -> CaptionModel:
        self.cfg.save(self.run_dir / "config.json")
        policy = keras.DTypePolicy(self.cfg.train.precision)
        model = CaptionModel.from_model_config(self.cfg.model, self.tokenizer.vocab_size, policy)
        (self.run_dir / "model.json").write_text(json.dumps(model.get_config(), indent=2) + "\n")
        return model.build_weights()

    def _load_history(self) -> dict[str, list[Any]]:
        path = self.run_dir / "history.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _restore(self) -> None:
        latest = self.manager.latest_checkpoint
        if latest:
            self.ckpt.restore(latest).assert_existing_objects_matched()
            done = int(self.epoch.numpy())
            self.history = {k: v[:done] for k, v in self.history.items()}
            self.log(f"resuming {self.run_dir} at epoch {done + 1}, "
                     f"step {int(self.step_in_epoch.numpy())}")

    # ---- training --------------------------------------------------------------------
    @property
    def val_metric_name(self) -> str:
        name = self.cfg.train.val_metric
        if name == "auto":
            return "bleu4" if self.cfg.tokenizer.kind == "word" else "exact_match"
        return name

    def fit(self) -> dict[str, list[Any]]:
        """Train until ``train.epochs`` are complete; returns the history."""
        t = self.cfg.train
        ss = t.scheduled_sampling
        train_step = make_train_step(self.model, self.optimizer, self.tokenizer.pad_id,
                                     t.attention_reg, ss.enabled, ss.greedy)
        eval_step = make_eval_step(self.model, self.tokenizer.pad_id)
        writer = (tf.summary.create_file_writer(str(self.run_dir / "tensorboard"))
                  if t.tensorboard else tf.summary.create_noop_writer())
        try:
            while int(self.epoch.numpy()) < t.epochs:
                self._run_epoch(train_step, eval_step, writer)
        except KeyboardInterrupt:
            path = self.manager.save()
            self.log(f"interrupted: saved {path}; run the same command to resume")
            raise
        return self.history

    def _run_epoch(self, train_step, eval_step, writer) -> None:
        t = self.cfg.train
        epoch = int(self.epoch.numpy()) + 1
        skip = int(self.step_in_epoch.numpy())
        prob = sampling_probability(self.cfg, epoch)
        if not hasattr(self, "_pairs"):
            self._pairs = PairTensors.from_arrays(self.data.train.images, self.data.tokens,
                                                  self.data.train.pair_image)
        batches = self._pairs.batches(epoch_batches(self.data.train.num_pairs, t.batch_size,
                                                    t.seed, epoch, skip, t.max_steps_per_epoch))
        started, losses = time.perf_counter(), []
        bar = self._progress(epoch, skip)
        for images, tokens in batches:
            seed = tf.constant([t.seed, int(self.optimizer.iterations.numpy())], "int32")
            out = train_step(images, tokens, tf.constant(prob, "float32"), seed)
            losses.append(float(out["nll"]))
            self.step_in_epoch.assign_add(1)
            step = int(self.optimizer.iterations.numpy())
            self._log_step(bar, writer, out, step, started, len(losses))
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                self.manager.save()
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - started
        record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else None,
                  "images_per_s": len(losses) * t.batch_size / max(seconds, 1e-9),
                  "seconds": seconds, "sampling_prob": prob,
                  "learning_rate": self._current_lr(), **self._validate(eval_step)}
        self._end_epoch(record, writer)

    def _progress(self, epoch: int, skip: int):
        if not self.cfg.train.progress:
            return None
        from tqdm import tqdm

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
        texts = self.captioner().generate(val.images[:limit], strategy="greedy").texts
        split = self.tokenizer.tokenize
        metric = validation_metric(self.val_metric_name, texts, val.references[:limit], split)
        return {"val_loss": float(totals[0] / max(totals[1], 1.0)), "val_metric": metric,
                "val_metric_name": self.val_metric_name}

    def captioner(self) -> Captioner:
        """A :class:`Captioner` over the weights being trained (compiled once, cached)."""
        if not hasattr(self, "_captioner"):
            self._captioner = Captioner(self.cfg, self.tokenizer, self.model)
        return self._captioner

    def _end_epoch(self, record: dict[str, Any], writer) -> None:
        self.epoch.assign_add(1)
        self.step_in_epoch.assign(0)
        metric = record["val_metric"]
        improved = metric is not None and metric > float(self.best.numpy())
        if improved:
            self.best.assign(metric)
        self.manager.save(checkpoint_number=record["epoch"])
        if improved or metric is None:
            self.best_manager.save(checkpoint_number=record["epoch"])
        for key, value in record.items():
            self.history.setdefault(key, []).append(value)
        self._write_history()
        with writer.as_default(step=record["epoch"]):
            for key in ("loss", "val_loss", "val_metric", "images_per_s", "learning_rate"):
                if record.get(key) is not None:
                    tf.summary.scalar(f"epoch/{key}", record[key])
        writer.flush()
        self.log(self._summary(record, improved))

    def _write_history(self) -> None:
        (self.run_dir / "history.json").write_text(json.dumps(self.history, indent=2) + "\n")
        try:
            from captioner.visualize import plot_history

            plot_history(self.history, self.run_dir / "history.png")
        except ImportError as exc:
            self.log(f"history plot skipped: {exc}")

    def _summary(self, r: dict[str, Any], improved: bool) -> str:
        def fmt(v):
            return "n/a" if v is None else f"{v:.4f}"

        star = " (best)" if improved else ""
        return (f"epoch {r['epoch']}/{self.cfg.train.epochs}: loss {fmt(r['loss'])} "
                f"val_loss {fmt(r['val_loss'])} {r['val_metric_name']} "
                f"{fmt(r['val_metric'])}{star} | {r['images_per_s']:.0f} img/s, "
                f"{r['seconds']:.0f} s")


def train(cfg: Config, run_dir: str | Path, log: Callable[[str], None] = print
          ) -> dict[str, list[Any]]:
    """Train (or resume) a run; returns the history."""
    return Trainer(cfg, run_dir, log).fit()


def caption_split(captioner: Captioner, split: SplitData, batch_size: int
                  ) -> list[dict[str, Any]]:
    """Generate for every image of a split, keeping references and metadata."""
    rows = []
    for start, batch in zip(range(0, split.num_images, batch_size),
                            image_batches(split.images, batch_size)):
        gen = captioner.generate(batch)
        for i in range(len(batch)):
            j = start + i
            rows.append({"image": split.paths[j], "text": gen.texts[i],
                         "tokens": gen.tokens[i], "attention": gen.attention[i],
                         "references": split.references[j], "meta": split.meta[j]})
    return rows
