"""What a training run is set up from, one unit each, in the order the
:class:`~captioner.train.trainer.Trainer` calls them:

1. :func:`check_run_config` and :func:`validate_config`: refuse a config that does not fit
   the run directory or does not combine;
2. (:func:`~captioner.train.distribute.strategy_from_config`: the strategy, before any other
   TensorFlow op;)
3. :func:`read_splits`: the records of the train, val and test splits;
4. :func:`load_or_fit_tokenizer`: the run's ``tokenizer.json``, fitted on the training texts
   the first time;
5. :func:`build_model`, then :func:`build_optimizers` (together
   :func:`build_model_and_optimizers`): every variable created under the strategy's scope.
   The Trainer calls the two halves apart because the optimizers' schedule needs the number
   of steps, known only after :func:`prepare_data`, which needs the model (a frozen
   backbone fills ``data.feature_cache``);
6. :func:`prepare_data`: the images (or cached grids) in memory and the encoded targets,
   as :class:`PreparedData`, whose :meth:`~PreparedData.batches` are one epoch's batches;
7. :func:`train_steps_per_epoch` (and :func:`epoch_note` when the cap of
   ``train.max_steps_per_epoch`` is above one pass).

Checkpoints are :class:`captioner.train.checkpoints.Checkpoints`. Every JSON file of the run
directory is written with :func:`~captioner.fileio.atomic_write_text` (never half-written), and
:class:`~captioner.train.runlock.RunLock` keeps a second training off a run directory
in use.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from captioner.config import Config, ConfigError, TrainConfig, config_from_dict
from captioner.data.drawn import DrawnExamples, draw_split
from captioner.data.features import FeatureCache
from captioner.data.formats import read_records
from captioner.data.manifests import LoadReport, Record
from captioner.data.splits import (
    PairTensors,
    SplitData,
    build_split,
    epoch_batches,
    steps_per_epoch,
)
from captioner.data.tokenizers import Tokenizer
from captioner.fileio import atomic_write_text
from captioner.model.layers import CaptionModel
from captioner.model.precision import resolve_precision
from captioner.train.feature_cache import ensure_feature_cache
from captioner.train.steps import make_optimizer, split_variables

SPLITS = ("train", "val", "test")


# ---- the run directory --------------------------------------------------------------------


def read_run_json(path: Path) -> object:
    """The JSON of a run-directory file; ValueError naming it when it does not parse."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is unreadable (not valid JSON: {exc})") from exc


# ---- the config ---------------------------------------------------------------------------
def check_run_config(cfg: Config, run_dir: Path) -> None:
    """On an existing run (``run_dir/config.json``), refuse a config whose ``data``,
    ``tokenizer`` or ``model`` section differs from the saved one; ``train`` and ``decode``
    may change (more epochs, another learning rate...).

    Example:
        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp())
        >>> check_run_config(Config(), run)  # no run yet: anything goes
        >>> Config().save(run / "config.json")
        >>> changed = Config(); changed.model.units = 7
        >>> check_run_config(changed, run)
        Traceback (most recent call last):
        ...
        captioner.config.ConfigError: ... holds a run with a different 'model' section; ...
    """
    saved = run_dir / "config.json"
    if not saved.is_file():
        return
    old = config_from_dict(read_run_json(saved))
    for section in ("data", "tokenizer", "model"):
        if getattr(old, section) != getattr(cfg, section):
            raise ConfigError(f"{run_dir} holds a run with a different '{section}' "
                              "section; use a new --run-dir or the same config")


def validate_config(cfg: Config) -> None:
    """Refuse the training options that do not combine (each is valid alone).

    Example:
        >>> cfg = Config(); cfg.data.feature_cache = "cache"
        >>> validate_config(cfg)
        Traceback (most recent call last):
        ...
        captioner.config.ConfigError: data.feature_cache needs model.trainable: frozen ...
    """
    if cfg.data.feature_cache and cfg.model.trainable != "frozen":
        raise ConfigError("data.feature_cache needs model.trainable: frozen (a cached "
                          "grid cannot change while the backbone trains)")
    # "auto" never means mixed_float16; comparing the name asks no device before the
    # distribution strategy has split the CPU
    if cfg.train.backbone_learning_rate and cfg.train.precision == "mixed_float16":
        raise ConfigError("train.backbone_learning_rate does not combine with "
                          "train.precision: mixed_float16 (one loss scale per step)")
    if cfg.train.max_minutes is not None and cfg.train.strategy == "multi_worker":
        raise ConfigError("train.max_minutes does not combine with train.strategy: "
                          "multi_worker (each worker would time its own end and the workers "
                          "must stop at one step); set train.epochs instead")


# ---- records and tokenizer ----------------------------------------------------------------
def read_splits(cfg: Config) -> dict[str, list[Record]]:
    """The records of ``cfg.data`` by split: ``{"train": [...], "val": [...], "test": [...]}``
    (SMILES targets for a ``smiles`` tokenizer); there must be training records."""
    kind = cfg.tokenizer.kind
    records = read_records(cfg.data, smiles_targets=kind in ("smiles", "selfies"), kind=kind)
    by_split = {s: [r for r in records if r.split == s] for s in SPLITS}
    if not by_split["train"]:
        raise ConfigError(f"no training pairs in {cfg.data.path}")
    return by_split


def load_or_fit_tokenizer(cfg: Config, run_dir: Path, texts: list[str]) -> Tokenizer:
    """The run's tokenizer: ``run_dir/tokenizer.json`` when it exists (a resumed run keeps
    its vocabulary), else a ``cfg.tokenizer`` one fitted on ``texts`` and saved there.

    Example:
        >>> import tempfile
        >>> run, cfg = Path(tempfile.mkdtemp()), Config()
        >>> tok = load_or_fit_tokenizer(cfg, run, ["a red circle", "a blue square"])
        >>> tok.vocab_size - len(Tokenizer.special_tokens)  # a red circle blue square
        5
        >>> load_or_fit_tokenizer(cfg, run, ["other words"]).vocab == tok.vocab
        True
    """
    path = run_dir / "tokenizer.json"
    if path.is_file():
        try:
            return Tokenizer.load(path)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is unreadable: {exc}") from exc
    t = cfg.tokenizer
    options = {"word": dict(lower=t.lower, strip_punctuation=t.strip_punctuation,
                            max_vocab=t.max_vocab, min_count=t.min_count),
               "char": dict(lower=t.lower), "smiles": {}, "selfies": {}}[t.kind]
    tok = Tokenizer.create(t.kind, **options).fit(texts)
    tok.save(path)  # atomic
    return tok


# ---- model and optimizers, under the strategy ----------------------------------------------
@dataclass
class TrainingObjects:
    """A model and its optimizers, their variables created under one strategy's scope."""

    model: CaptionModel
    optimizer: keras.optimizers.Optimizer
    backbone_optimizer: keras.optimizers.Optimizer | None = None


def build_model(strategy: tf.distribute.Strategy, cfg: Config, vocab_size: int
                ) -> CaptionModel:
    """The ``cfg.model`` model in ``train.precision``, its weights built inside
    ``strategy.scope()`` (mirrored under a multi-device strategy)."""
    policy = keras.DTypePolicy(resolve_precision(cfg.train.precision))
    with strategy.scope():
        return CaptionModel.from_model_config(cfg.model, vocab_size, policy).build_weights()


def build_optimizers(strategy: tf.distribute.Strategy, cfg: Config, model: CaptionModel,
                     total_steps: int, decay_steps: tf.Variable | None = None
                     ) -> tuple[keras.optimizers.Optimizer, keras.optimizers.Optimizer | None]:
    """(optimizer, backbone optimizer or None), built on the model's variables inside
    ``strategy.scope()``: :func:`~captioner.train.steps.make_optimizer` over
    ``total_steps`` (or the ``decay_steps`` variable of a time budget); with
    ``train.backbone_learning_rate`` the backbone's trainable variables (if any) get their
    own, at that peak rate.

    A Keras 3 optimizer binds the strategy that is current when it is constructed, so it
    must be built here, not outside.
    """
    t = cfg.train
    main_vars, backbone_vars = split_variables(model, bool(t.backbone_learning_rate))
    with strategy.scope():
        optimizer = make_optimizer(cfg, total_steps, decay_steps=decay_steps)
        optimizer.build(main_vars)
        backbone_optimizer = None
        if backbone_vars:
            backbone_optimizer = make_optimizer(cfg, total_steps, t.backbone_learning_rate,
                                                decay_steps)
            backbone_optimizer.build(backbone_vars)
    return optimizer, backbone_optimizer


def build_model_and_optimizers(strategy: tf.distribute.Strategy, cfg: Config,
                               vocab_size: int, total_steps: int) -> TrainingObjects:
    """:func:`build_model`, then :func:`build_optimizers` on it -- what the Trainer builds --
    so that every variable (weights, Adam moments, iterations) belongs to ``strategy``.

    ``tf.train.Checkpoint(model=..., optimizer=...)`` of these objects restores under any
    other strategy.

    Example:
        >>> from captioner.config import apply_overrides
        >>> cfg = apply_overrides(Config(), ["model.image_size=32", "model.cnn_filters=[4]",
        ...                                  "model.units=8", "model.embedding_dim=8",
        ...                                  "train.backbone_learning_rate=1e-4"])
        >>> objs = build_model_and_optimizers(tf.distribute.get_strategy(), cfg, 12, 100)
        >>> objs.model.built, objs.optimizer.built, objs.backbone_optimizer.built
        (True, True, True)
        >>> main, backbone = split_variables(objs.model, True)
        >>> len(objs.optimizer.variables) == 2 + 2 * len(main)  # iterations, lr, m and v
        True
        >>> len(objs.backbone_optimizer.variables) == 2 + 2 * len(backbone) > 2
        True
    """
    model = build_model(strategy, cfg, vocab_size)
    return TrainingObjects(model, *build_optimizers(strategy, cfg, model, total_steps))


def write_model_config(run_dir: Path, model: CaptionModel) -> Path:
    """Write ``run_dir/model.json``, the model's ``get_config()`` (atomically); returns its
    path."""
    return atomic_write_text(run_dir / "model.json",
                             json.dumps(model.get_config(), indent=2) + "\n")


def check_model_config(run_dir: Path, model: CaptionModel, vocab_size: int) -> None:
    """Refuse a run directory whose saved ``model.json`` does not describe ``model``: its
    output layer's vocabulary size differs from ``tokenizer.json``'s (``vocab_size``), or
    its architecture differs (another key's value). ValueError naming which. No
    ``model.json`` yet: nothing to check.
    """
    path = run_dir / "model.json"
    if not path.is_file():
        return
    saved = read_run_json(path)
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is unreadable (not a JSON object)")
    if saved.get("vocab_size", vocab_size) != vocab_size:
        raise ValueError(f"{run_dir}: tokenizer.json has {vocab_size} tokens but the saved "
                         f"model (model.json, the checkpoints' output layer) has "
                         f"{saved['vocab_size']}: the tokenizer is not this run's")
    new = json.loads(json.dumps(model.get_config()))
    saved.setdefault("cnn_norm", "batch")  # written before the choice existed
    ignore = {"dtype", "name", "trainable"}  # the precision may change between sessions
    differ = sorted(k for k in set(saved) | set(new)
                    if k not in ignore and saved.get(k) != new.get(k))
    if differ:
        raise ValueError(f"{run_dir}: model.json describes another architecture than the "
                         f"config's model (differs in {', '.join(differ)}); use a new "
                         f"--run-dir or the run's own config")


# ---- data ---------------------------------------------------------------------------------
@dataclass
class PreparedData:
    """The splits in memory and the encoded targets of a run.

    Without a feature cache every split holds its images, (N_img, S, S, 3) uint8; with
    one (``cache``), ``val`` and ``test`` hold their grids, (N_img, G, C) in the stored
    dtype, and ``train`` none: its batches are read from the cache's shards.
    """

    train: SplitData
    val: SplitData
    test: SplitData
    tokens: np.ndarray  # (N_pairs, L) int32, the training pairs' targets
    val_tokens: np.ndarray  # (N_val_pairs, L) int32
    report: LoadReport  # the images that could not be used
    cache: FeatureCache | None = None
    drawn: DrawnExamples | None = None  # data.format smiles: training pictures drawn
    _pairs: PairTensors | None = field(default=None, init=False, repr=False)

    def batches(self, t: TrainConfig, epoch: int, skip: int = 0) -> tf.data.Dataset:
        """The (inputs (B, ...), tokens (B, L)) batches of 1-based ``epoch`` in its seeded
        order (``train.seed``), after the ``skip`` already trained: images gathered from
        memory, or cached grids read from the shards through tf.data; pictures drawn
        while training, with the atoms' cells (B, L) as a third element when the source
        was made with a grid (``train.attention_supervision``)."""
        train = self.train
        if self.drawn is not None:
            return self.drawn.batches(t.batch_size, epoch, skip, t.max_steps_per_epoch)
        if self.cache is not None:
            pair_paths = [train.paths[i] for i in train.pair_image]
            return self.cache.pair_dataset(pair_paths, self.tokens, t.batch_size, t.seed,
                                           epoch, skip=skip, max_steps=t.max_steps_per_epoch)
        if self._pairs is None:  # the images as one tensor, made once
            self._pairs = PairTensors.from_arrays(train.images, self.tokens, train.pair_image)
        return self._pairs.batches(epoch_batches(train.num_pairs, t.batch_size, t.seed, epoch,
                                                 skip, t.max_steps_per_epoch))


def prepare_data(cfg: Config, run_dir: Path, records: dict[str, list[Record]],
                 tokenizer: Tokenizer, model: CaptionModel,
                 log: Callable[[str], None] = print) -> PreparedData:
    """Load each image of ``records`` once and encode the train and val targets to
    ``data.max_length`` tokens; list the unusable images in ``run_dir/skipped_images.txt``.
    Training texts longer than that are cut to it: their number is logged and kept in
    the report (``truncated`` of ``texts``).

    With ``data.feature_cache``, the grids of ``model``'s frozen backbone are extracted
    into the cache first unless they are there (every image of every split, in sorted
    order), and the val and test grids are read from it instead of the images.
    With ``data.format: smiles`` nothing is loaded: see :func:`prepare_drawn_data`.
    """
    if cfg.data.format == "smiles":
        grid_hw = (model.backbone.grid_hw(cfg.model.image_size)
                   if cfg.train.attention_supervision else None)
        return prepare_drawn_data(cfg, records, tokenizer, log, grid_hw)
    report, cache = LoadReport(), None
    size, workers = cfg.model.image_size, cfg.data.load_workers
    if not cfg.data.feature_cache:
        splits = {s: build_split(rs, size, workers, report) for s, rs in records.items()}
    else:
        paths = sorted({r.image for rs in records.values() for r in rs})
        cache = ensure_feature_cache(cfg, model, paths, log)
        report.failures.extend(cache.skipped)
        skip = {p for p, _ in cache.skipped}
        splits = {s: build_split(rs, size, load=False, skip=skip) for s, rs in records.items()}
        grids, _ = cache.load_all()  # (N_cached, G, C) stored dtype
        for s in ("val", "test"):
            rows = [cache.index_of(p) for p in splits[s].paths]
            splits[s].images = grids[rows]  # (N_img, G, C)
    skipped = run_dir / "skipped_images.txt"
    report.write(skipped)
    if report.count:
        log(f"skipped {report.count} unusable images (listed in {skipped})")
    L = cfg.data.max_length
    train = tokenizer.encode_counted(splits["train"].pair_text, L)  # ids (N_pairs, L)
    report.texts, report.truncated = len(train.ids), train.truncated
    if report.truncated:  # cut, never silently
        log(f"truncated {report.truncated} of {report.texts} training texts to "
            f"data.max_length={L}")
    return PreparedData(splits["train"], splits["val"], splits["test"], train.ids,
                        tokenizer.encode_batch(splits["val"].pair_text, L), report, cache)


def _molecules_split(texts: list[str], images: np.ndarray | None) -> SplitData:
    """A split of molecules, one pair per molecule, named by its SMILES."""
    return SplitData(images, list(texts), [[t] for t in texts], [{} for _ in texts],
                     np.arange(len(texts), dtype=np.int64), list(texts))


def prepare_drawn_data(cfg: Config, records: dict[str, list[Record]], tokenizer: Tokenizer,
                       log: Callable[[str], None] = print,
                       grid_hw: tuple[int, int] | None = None) -> PreparedData:
    """``data.format: smiles``: the training molecules are drawn while training
    (:class:`~captioner.data.drawn.DrawnExamples`; with ``grid_hw``, the backbone's grid,
    its batches carry the atoms' cells too), the first ``train.val_limit``
    validation molecules once, in ``data.drawing.val_style`` (seeded by
    ``train.seed``). The test molecules keep no pictures (``evaluate`` draws them)."""
    dr, size, L = cfg.data.drawing, cfg.model.image_size, cfg.data.max_length
    train = [r.text for r in records["train"]]
    val = [r.text for r in records["val"]][: cfg.train.val_limit or None]
    encoded = tokenizer.encode_counted(train, L)  # ids (N_train, L)
    report = LoadReport(texts=len(train), truncated=encoded.truncated)
    if report.truncated:
        log(f"truncated {report.truncated} of {report.texts} training SMILES to "
            f"data.max_length={L}")
    started = time.perf_counter()
    val_images = draw_split(val, size, dr.val_style, cfg.train.seed, dr)  # (N_val, S, S, 3)
    log(f"{len(train)} training molecules drawn while training ({', '.join(dr.toolkits)}; "
        f"{dr.workers} drawing processes); {len(val)} validation molecules drawn in "
        f"{dr.val_style} style in {time.perf_counter() - started:.1f} s")
    drawn = DrawnExamples(train, encoded.ids, size, dr, cfg.train.seed, grid_hw=grid_hw)
    return PreparedData(_molecules_split(train, None), _molecules_split(val, val_images),
                        _molecules_split([r.text for r in records["test"]], None), encoded.ids,
                        tokenizer.encode_batch(val, L), report, drawn=drawn)


def train_steps_per_epoch(t: TrainConfig, num_pairs: int) -> int:
    """Steps of one epoch over ``num_pairs`` training pairs (full global batches, at most
    ``train.max_steps_per_epoch``); a config that leaves none is refused.

    Example:
        >>> t = TrainConfig(batch_size=16, max_steps_per_epoch=4)
        >>> train_steps_per_epoch(t, 100), train_steps_per_epoch(t, 40)
        (4, 2)
        >>> train_steps_per_epoch(t, 15)
        Traceback (most recent call last):
        ...
        captioner.config.ConfigError: train.batch_size=16 exceeds the 15 training pairs
    """
    n = steps_per_epoch(num_pairs, t.batch_size, t.max_steps_per_epoch)
    if n < 1:
        raise ConfigError(f"train.batch_size={t.batch_size} exceeds the "
                          f"{num_pairs} training pairs")
    return n


def epoch_note(t: TrainConfig, num_pairs: int) -> str | None:
    """What to tell a user whose ``train.max_steps_per_epoch`` is more than one pass over
    the ``num_pairs`` training pairs (an epoch never repeats a pair, so the cap does
    nothing), or None.

    Example:
        >>> t = TrainConfig(batch_size=16, epochs=3, max_steps_per_epoch=8)
        >>> print(epoch_note(t, 100).replace(": ", ":\\n"))
        train.max_steps_per_epoch=8 is more than one pass over the 100 training pairs:
        an epoch is 6 steps of 16, 18 steps in 3 epochs (raise train.epochs to train longer)
        >>> epoch_note(t, 200) is None
        True
    """
    n = train_steps_per_epoch(t, num_pairs)
    if not t.max_steps_per_epoch or t.max_steps_per_epoch <= n:
        return None
    return (f"train.max_steps_per_epoch={t.max_steps_per_epoch} is more than one pass over "
            f"the {num_pairs:,} training pairs: an epoch is {n:,} steps of {t.batch_size}, "
            f"{n * t.epochs:,} steps in {t.epochs} epochs (raise train.epochs to train longer)")
