"""Training: the compiled train step, validation, checkpoints, resume and history.

A run directory holds ``config.json`` (fully resolved), ``tokenizer.json``,
``model.json`` (the model's ``get_config``), ``checkpoints/`` (latest N),
``best/`` (best on the validation metric), ``history.json``, ``history.png``,
``tensorboard/`` and ``skipped_images.txt``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from captioner.config import Config, ConfigError, config_from_dict
from captioner.data.features import FeatureCache
from captioner.data.formats import read_records
from captioner.data.images import image_batches
from captioner.data.manifests import LoadReport, Record
from captioner.data.splits import (
    PairTensors,
    SplitData,
    build_split,
    epoch_batches,
    steps_per_epoch,
)
from captioner.data.tokenizers import Tokenizer
from captioner.evaluate.metrics import validation_metric
from captioner.generate.captioner import Captioner
from captioner.model.layers import CaptionModel
from captioner.train.feature_cache import ensure_feature_cache
from captioner.train.steps import (
    make_eval_step,
    make_optimizer,
    make_train_step,
    sampling_probability,
    split_variables,
)


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
        self._validate_config()
        self.strategy = self._make_strategy()  # before any other TensorFlow op
        self.run_dir = self._worker_run_dir(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        keras.utils.set_random_seed(self.cfg.train.seed)
        records = self._read_splits()
        self.tokenizer = self._tokenizer([r.text for r in records["train"]])
        self.model = self._build_model()
        self.cache = self._feature_cache(records) if self.cfg.data.feature_cache else None
        self.data = self._prepare_data(records)
        t = self.cfg.train
        self.steps_per_epoch = steps_per_epoch(self.data.train.num_pairs, t.batch_size,
                                               t.max_steps_per_epoch)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"train.batch_size={t.batch_size} exceeds the "
                              f"{self.data.train.num_pairs} training pairs")
        total = self.steps_per_epoch * t.epochs
        main_vars, backbone_vars = split_variables(self.model, bool(t.backbone_learning_rate))
        with self.strategy.scope():  # a Keras optimizer binds the strategy it is built in
            self.optimizer = make_optimizer(self.cfg, total)
            self.optimizer.build(main_vars)
            self.backbone_optimizer = None
            if backbone_vars:
                self.backbone_optimizer = make_optimizer(self.cfg, total,
                                                         t.backbone_learning_rate)
                self.backbone_optimizer.build(backbone_vars)
        self.epoch = tf.Variable(0, dtype="int64", trainable=False)  # completed epochs
        self.step_in_epoch = tf.Variable(0, dtype="int64", trainable=False)
        self.best = tf.Variable(-np.inf, dtype="float64", trainable=False)
        extra = {"backbone_optimizer": self.backbone_optimizer} if backbone_vars else {}
        self.ckpt = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                        epoch=self.epoch, step_in_epoch=self.step_in_epoch,
                                        best=self.best, **extra)
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

    def _validate_config(self) -> None:
        cfg = self.cfg
        if cfg.data.feature_cache and cfg.model.trainable != "frozen":
            raise ConfigError("data.feature_cache needs model.trainable: frozen (a cached "
                              "grid cannot change while the backbone trains)")
        if cfg.train.backbone_learning_rate and cfg.train.precision == "mixed_float16":
            raise ConfigError("train.backbone_learning_rate does not combine with "
                              "train.precision: mixed_float16 (one loss scale per step)")

    def _make_strategy(self) -> tf.distribute.Strategy:
        """``train.strategy`` (after splitting the CPU into ``train.logical_cpus``)."""
        from captioner.train.distribute import make_strategy, split_cpu  # imports this module

        t = self.cfg.train
        if t.logical_cpus > 1:
            split_cpu(t.logical_cpus)
        strategy = make_strategy(t.strategy)
        replicas = strategy.num_replicas_in_sync
        if t.strategy != "default":
            self.log(f"train.strategy={t.strategy}: {replicas} replica(s), "
                     f"{t.batch_size / replicas:g} examples each per step")
        return strategy

    def _worker_run_dir(self, run_dir: Path) -> Path:
        """Where this process writes: the run directory, except for the non-chief workers
        of a ``multi_worker`` run, which take part in every step and every checkpoint save
        (collective ops) but write into ``run_dir/workers/<task>`` instead."""
        resolver = getattr(self.strategy, "cluster_resolver", None)
        if self.cfg.train.strategy != "multi_worker" or resolver is None:
            return run_dir
        kind, index = resolver.task_type, resolver.task_id
        has_chief = "chief" in resolver.cluster_spec().as_dict()
        if kind == "chief" or (not has_chief and kind == "worker" and index == 0):
            return run_dir
        return run_dir / "workers" / f"{kind}{index}"

    def _read_splits(self) -> dict[str, list[Record]]:
        cfg = self.cfg
        records = read_records(cfg.data, smiles_targets=cfg.tokenizer.kind == "smiles")
        by_split = {s: [r for r in records if r.split == s] for s in ("train", "val", "test")}
        if not by_split["train"]:
            raise ConfigError(f"no training pairs in {cfg.data.path}")
        return by_split

    def _feature_cache(self, records: dict[str, list[Record]]) -> FeatureCache:
        """Extract (or reuse) the frozen backbone's grids of every image of every split."""
        paths = sorted({r.image for rs in records.values() for r in rs})
        return ensure_feature_cache(self.cfg, self.model, paths, self.log)

    def _prepare_data(self, records: dict[str, list[Record]]) -> PreparedData:
        """Load each image once (or its cached grid) and encode the training targets."""
        cfg = self.cfg
        report = LoadReport()
        size, workers = cfg.model.image_size, cfg.data.load_workers
        if self.cache is None:
            splits = {s: build_split(rs, size, workers, report) for s, rs in records.items()}
        else:
            report.failures.extend(self.cache.skipped)
            skip = {p for p, _ in self.cache.skipped}
            splits = {s: build_split(rs, size, load=False, skip=skip)
                      for s, rs in records.items()}
            grids, _ = self.cache.load_all()
            for s in ("val", "test"):
                rows = [self.cache.index_of(p) for p in splits[s].paths]
                splits[s].images = grids[rows]  # (N_img, G, C) stored dtype
        report.write(self.run_dir / "skipped_images.txt")
        if report.count:
            self.log(f"skipped {report.count} unusable images "
                     f"(listed in {self.run_dir / 'skipped_images.txt'})")
        L = cfg.data.max_length
        return PreparedData(splits["train"], splits["val"], splits["test"],
                            self.tokenizer.encode_batch(splits["train"].pair_text, L),
                            self.tokenizer.encode_batch(splits["val"].pair_text, L), report)

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
        with self.strategy.scope():  # mirrored variables under a multi-device strategy
            model = CaptionModel.from_model_config(self.cfg.model, self.tokenizer.vocab_size,
                                                   policy)
            model.build_weights()
        (self.run_dir / "model.json").write_text(json.dumps(model.get_config(), indent=2) + "\n")
        return model

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
        train_step = self._train_step()
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

    @property
    def distributed(self) -> bool:
        """Whether steps run through ``strategy.run`` (any strategy but ``default``)."""
        return self.cfg.train.strategy != "default"

    def _train_step(self) -> Callable[..., dict[str, tf.Tensor]]:
        """The compiled train step: single-device, or split across the strategy's replicas
        (same update on the same global batch)."""
        t = self.cfg.train
        ss = t.scheduled_sampling
        if not self.distributed:
            return make_train_step(self.model, self.optimizer, self.tokenizer.pad_id,
                                   t.attention_reg, ss.enabled, ss.greedy,
                                   self.backbone_optimizer)
        from captioner.train.distribute import make_distributed_train_step  # imports this module

        return make_distributed_train_step(
            self.strategy, self.model, self.optimizer, self.tokenizer.pad_id, t.attention_reg,
            t.batch_size, ss.enabled, ss.greedy, self.backbone_optimizer)

    def _run_epoch(self, train_step, eval_step, writer) -> None:
        t = self.cfg.train
        epoch = int(self.epoch.numpy()) + 1
        skip = int(self.step_in_epoch.numpy())
        prob = sampling_probability(self.cfg, epoch)
        batches = self._batches(epoch, skip)
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

    def _batches(self, epoch: int, skip: int) -> tf.data.Dataset:
        """(inputs, tokens) batches of one epoch: images from memory, or cached grids read
        from the shards through tf.data."""
        t, train = self.cfg.train, self.data.train
        if self.cache is not None:
            pair_paths = [train.paths[i] for i in train.pair_image]
            ds = self.cache.pair_dataset(pair_paths, self.data.tokens, t.batch_size, t.seed,
                                         epoch, skip=skip, max_steps=t.max_steps_per_epoch)
        else:
            if not hasattr(self, "_pairs"):
                self._pairs = PairTensors.from_arrays(train.images, self.data.tokens,
                                                      train.pair_image)
            ds = self._pairs.batches(epoch_batches(train.num_pairs, t.batch_size, t.seed,
                                                   epoch, skip, t.max_steps_per_epoch))
        if not self.distributed:
            return ds
        from captioner.train.distribute import distribute_batches  # imports this module

        return distribute_batches(self.strategy, ds)  # each global batch split by replica

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
            from captioner.viz.figures import plot_history

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

