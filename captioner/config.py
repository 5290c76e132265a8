"""Typed configuration: dataclasses loaded from YAML, overridable with ``key=value``.

Every tunable constant of the project lives here. A config file may set any subset
of keys; unknown keys and values of the wrong type are rejected with the key's full
dotted name, e.g. ``model.units``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from captioner.choices import ChoiceError, Choices
from captioner.fileio import atomic_write_text


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a wrong value."""


@dataclass
class ShapesConfig:
    """Parameters of the synthetic shapes dataset (``data.format: shapes``).

    Example:
        >>> ShapesConfig(n_images=200).image_size
        112
    """

    n_images: int = 6000
    image_size: int = 112
    min_objects: int = 1
    max_objects: int = 3
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1


@dataclass
class DrawingConfig:
    """How ``data.format: smiles`` draws its molecules: a new picture for every training
    example, in a style sampled from these ranges (:mod:`captioner.data.drawing`).

    ``toolkits`` and ``toolkit_weights``: the drawing libraries and how often each is
    picked. Canvas: the longer side in ``canvas_range`` pixels, the aspect ratio in
    ``aspect_range``; the drawing is padded to a square (never stretched) with an extra
    white margin in ``margin_range`` (fraction of the side), then resized to
    ``model.image_size``. ``crop_to_ink``: instead of padding, cut each picture to the
    square around its ink with a margin in ``margin_range`` (fraction of the ink's longer
    side), the way ``evaluate --crop-margin`` reads a picture: the molecule fills the
    picture whatever its canvas. ``*_prob`` are per-picture probabilities.
    ``coordgen_prob``: the chance that RDKit lays the molecule out with CoordGen instead
    of its own depictor (another 2D layout of the same molecule: rings, cages and chains
    placed differently). ``layout_jitter_prob``: the chance that every atom is moved off
    the layout (RDKit's, CoordGen's or Indigo's) by a Gaussian of a fraction in
    ``layout_jitter_range`` of the mean bond length (bonds a little longer or shorter,
    angles a little off, as other layout programs and hand drawings place them).
    ``faint_ink_prob``: the chance that the ink is lightened to a
    fraction in ``faint_ink_range`` of its darkness (grey lines and labels, as some
    toolkits and faded prints draw). ``degrade_prob``: the
    chance of scan-like damage, then each of blur, noise, JPEG, binarisation and a small
    elastic/perspective distortion with its own probability. ``val_style`` /
    ``eval_style`` at ``eval_size`` px draw the validation and evaluation molecules
    (seeded, the same every time). ``workers``: drawing processes; 0 draws in the
    training process, which measured faster than 2 processes on a 2-core machine.

    Example:
        >>> DrawingConfig().toolkits
        ['rdkit', 'indigo']
    """

    toolkits: list[str] = field(default_factory=lambda: ["rdkit", "indigo"])
    toolkit_weights: list[float] = field(default_factory=lambda: [0.6, 0.4])
    canvas_range: list[int] = field(default_factory=lambda: [128, 256])
    aspect_range: list[float] = field(default_factory=lambda: [0.75, 1.33])
    margin_range: list[float] = field(default_factory=lambda: [0.0, 0.15])
    crop_to_ink: bool = False
    bond_width_range: list[float] = field(default_factory=lambda: [1.0, 3.0])
    font_scale_range: list[float] = field(default_factory=lambda: [0.6, 1.4])
    rotate_prob: float = 0.5
    colour_prob: float = 0.5
    aromatic_prob: float = 0.3
    explicit_h_prob: float = 0.1
    explicit_methyl_prob: float = 0.15
    all_carbons_prob: float = 0.05
    serif_prob: float = 0.3
    coordgen_prob: float = 0.0
    faint_ink_prob: float = 0.0
    faint_ink_range: list[float] = field(default_factory=lambda: [0.3, 0.8])
    layout_jitter_prob: float = 0.0
    layout_jitter_range: list[float] = field(default_factory=lambda: [0.05, 0.15])
    degrade_prob: float = 0.25
    blur_prob: float = 0.4
    noise_prob: float = 0.4
    jpeg_prob: float = 0.4
    binarize_prob: float = 0.3
    distort_prob: float = 0.3
    val_style: str = "mix"
    eval_style: str = "rdkit_default"
    eval_size: int = 224
    workers: int = 0


@dataclass
class DataConfig:
    """Where the image-text pairs come from.

    ``format``: ``csv`` or ``jsonl`` (an image column/key and a text column/key, optional
    split column), ``coco`` (captions JSON, several files allowed), ``karpathy`` (split
    JSON), ``flickr8k`` (``Flickr8k.token.txt`` with the official split files beside it),
    ``captions_csv`` (the ``image,caption`` layout), ``auto`` (sniffed from the file),
    ``shapes`` (generated into ``path`` when missing) or ``smiles`` (a CSV whose
    ``text_column`` holds SMILES and no images: the pictures are drawn while training,
    see :class:`DrawingConfig`). ``split_by``: ``image``, ``smiles``
    (canonical SMILES) or ``auto`` (SMILES for SMILES targets). ``only_existing`` drops
    pairs whose image file is missing (counted) instead of reporting each one.
    ``feature_cache``: a folder where a frozen backbone's grids are extracted once
    (sharded TFRecords of ``feature_dtype``) and read back by training.

    Example:
        >>> DataConfig(format="csv", path="pairs.csv").text_column
        'caption'
    """

    format: str = "csv"
    path: str | list[str] = ""
    images_dir: str | None = None
    image_column: str = "image"
    text_column: str = "caption"
    split_column: str | None = "split"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    split_by: str = "auto"
    only_existing: bool = False
    max_length: int = 40
    limit: int | None = None
    load_workers: int = 4
    feature_cache: str | None = None
    feature_dtype: str = "float16"
    shard_size: int = 1024
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    drawing: DrawingConfig = field(default_factory=DrawingConfig)


@dataclass
class TokenizerConfig:
    """Which tokenizer to fit on the training texts (``word``, ``smiles``, ``char``, ``selfies``).

    Example:
        >>> TokenizerConfig(kind="smiles").kind
        'smiles'
    """

    kind: str = "word"
    lower: bool = True
    strip_punctuation: bool = True
    max_vocab: int | None = None
    min_count: int = 1


@dataclass
class ModelConfig:
    """Backbone, encoder and attention decoder sizes.

    ``backbone``: ``small_cnn`` (from scratch) or a ``keras.applications`` network
    (``efficientnet_b0``, ``mobilenet_v2``, ``resnet50``, ``inception_v3``) with its own
    preprocessing; the grid size G follows from the network and ``image_size``.
    ``weights``: ``imagenet`` (downloaded by Keras where a network exists), a local file,
    or null. ``trainable``: ``frozen``, ``full`` or ``fine_tune`` (from the layer named
    ``fine_tune_from``; its learning rate is ``train.backbone_learning_rate``).

    ``cnn_filters`` sets the from-scratch ``small_cnn``: one stride-2 stage per entry,
    so the grid side is ``image_size / 2**len(cnn_filters)`` (224 and 5 stages: 7x7).

    ``cnn_norm``: how ``small_cnn`` normalises each convolution: ``batch``
    (BatchNormalization: batch statistics while training, moving averages after),
    ``group`` (GroupNormalization, 8 groups: per picture, the same in training and
    inference) or ``plain`` (no normalisation: biases and He initialisation).

    ``attention_kernel`` (additive attention before the GRU): ``auto`` runs the scores and
    their gradient as a fused CPU kernel compiled on first use (:mod:`captioner.kernels`)
    when no GPU is visible and it builds, else TensorFlow ops; ``fused`` requires the
    kernel; ``tensorflow`` never uses it. Results agree to float32 rounding.

    Example:
        >>> ModelConfig(image_size=112, cnn_filters=[32, 64, 96, 128]).attention
        'additive'
    """

    backbone: str = "small_cnn"
    image_size: int = 224
    weights: str | None = None
    trainable: str = "full"
    fine_tune_from: str | None = None
    cnn_filters: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 256])
    cnn_kernels: list[int] = field(default_factory=lambda: [3, 3])
    cnn_padding: str = "same"
    cnn_norm: str = "batch"
    embedding_dim: int = 256
    units: int = 512
    attention: str = "additive"
    attention_units: int = 512
    dropout: float = 0.3
    init_state: str = "mean"
    positional: bool = True
    attend: str = "before"
    attention_kernel: str = "auto"


@dataclass
class ScheduledSamplingConfig:
    """Probability of feeding the model's own previous prediction during training.

    The probability moves from ``start`` to ``end`` between ``from_epoch`` and
    ``to_epoch`` (``linear``) or along Bengio et al.'s ``inverse_sigmoid`` curve.

    Example:
        >>> ScheduledSamplingConfig(enabled=True, end=0.25).schedule
        'linear'
    """

    enabled: bool = False
    schedule: str = "linear"
    start: float = 0.0
    end: float = 0.25
    from_epoch: int = 1
    to_epoch: int = 10
    greedy: bool = False


@dataclass
class TrainConfig:
    """Optimisation, checkpoints, validation and devices.

    ``batch_size`` is the GLOBAL batch. ``strategy``: ``default`` (one device),
    ``mirrored`` (one replica per local GPU; without GPUs, per logical CPU) or
    ``multi_worker`` (``MultiWorkerMirroredStrategy`` over the cluster in ``TF_CONFIG``);
    the batch is split across the replicas and each step equals one device's step on it.
    ``logical_cpus`` > 1 splits the CPU into that many devices first (data parallelism
    without GPUs, or to try ``mirrored`` on a laptop).

    Checkpoints go into ``checkpoints/`` at the end of every epoch, every
    ``checkpoint_every`` steps when set, every ``checkpoint_minutes`` of training (checked
    after each step; fractions allowed; 0 turns it off) and on SIGTERM / SIGINT. A batch
    whose loss or gradients are not finite is not applied (on one replica; several
    replicas apply it, see ``make_train_step``); ``on_nonfinite``: ``stop``
    ends the run with an error naming the epoch and step (the checkpoints keep the last
    good weights), ``skip`` goes on and counts the skipped batches in the history
    (``skipped_nonfinite``).

    ``precise_bn_batches`` > 0: before each validation, the backbone's batch-norm moving
    statistics are recomputed with the current weights from the first that many batches
    of the epoch just trained (:mod:`captioner.train.batchnorm`; no effect without
    trainable batch norm or with a feature cache); 0 keeps the moving averages.

    ``max_minutes``: a time budget for the training loop (its steps, validations and
    checkpoints; not the set-up before the first step). The run measures its rate and ends
    at the step that fits (:mod:`captioner.train.budget`), ``epochs`` being the most it
    trains, the last epoch cut short where the budget ends; the cosine schedule decays to
    that step. None: ``epochs`` full epochs.

    ``attention_supervision`` > 0 (``data.format: smiles`` with SMILES tokens): the loss
    adds that weight times -log(attention on the grid cell of the atom being read), summed
    over the atom tokens whose picture reports atom positions (RDKit's drawings that were
    not distorted) and divided by the real-token count like the rest of the loss.

    Example:
        >>> TrainConfig(epochs=3).batch_size
        64
    """

    epochs: int = 10
    batch_size: int = 64
    max_steps_per_epoch: int | None = None
    max_minutes: float | None = None
    seed: int = 0
    learning_rate: float = 1e-3
    backbone_learning_rate: float | None = None
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_learning_rate: float = 1e-5
    decay_rate: float = 0.5
    clip_norm: float = 5.0
    attention_reg: float = 1.0
    attention_supervision: float = 0.0
    scheduled_sampling: ScheduledSamplingConfig = field(
        default_factory=ScheduledSamplingConfig
    )
    val_metric: str = "auto"
    val_limit: int | None = 500
    keep_checkpoints: int = 3
    checkpoint_every: int | None = None
    checkpoint_minutes: float = 10.0
    on_nonfinite: str = "stop"
    precise_bn_batches: int = 0
    precision: str = "float32"
    strategy: str = "default"
    logical_cpus: int = 0
    tensorboard: bool = True
    progress: bool = True


@dataclass
class DecodeConfig:
    """Decoding defaults for ``caption``, ``evaluate`` and validation.

    ``strategy``: greedy, beam or sample. Beam search keeps ``beam_size`` hypotheses and
    returns ``n_best`` with a GNMT ``length_penalty`` (0 = raw log-prob sums); sampling
    uses ``temperature`` and ``top_k`` (0 = all tokens). For SMILES,
    ``rerank_valid_smiles`` puts the best candidate RDKit can parse first.
    ``rescore_views`` (values of ``Choices().rescore_view``, e.g. ``[identity, rot90,
    rot180, rot270]``): beam search's candidates are ranked by their log-probability summed
    over the picture seen in these views (:mod:`captioner.generate.rescoring`; empty, the
    default: by the beam's own score).
    ``margin_views`` (margins, e.g. ``[0.05, 0.1, 0.15, 0.2, 0.25]``; picture files
    only): every picture is cut to its ink with each margin and decoded at each; the
    union of their candidates is scored by teacher forcing at every margin and what the
    candidates name (for SMILES, a molecule: its spellings pool) is ranked by the summed
    probabilities of its spellings, each the product over the margins
    (:mod:`captioner.generate.rescoring`; empty, the default: one reading, at
    ``crop_margin``). Not with ``rescore_views``.
    ``crop_margin``: every picture is cut to the square around its ink plus this margin
    (a fraction of the ink's longer side) before it is read -- by ``caption``,
    ``evaluate``, ``attention`` and ``serve``, whose attention then lies over that square
    (:func:`~captioner.data.images.load_view`); for drawings on white such as molecules,
    e.g. a run trained with ``data.drawing.crop_to_ink``. None reads whole pictures.

    Example:
        >>> DecodeConfig().max_length
        40
    """

    max_length: int = 40
    batch_size: int = 64
    strategy: str = "greedy"
    beam_size: int = 3
    n_best: int = 1
    length_penalty: float = 0.0
    temperature: float = 1.0
    top_k: int = 0
    rerank_valid_smiles: bool = True
    rescore_views: list[str] = field(default_factory=list)
    margin_views: list[float] = field(default_factory=list)
    crop_margin: float | None = None


@dataclass
class Config:
    """The whole configuration of a run.

    Example:
        >>> cfg = apply_overrides(Config(), ["model.units=128", "train.epochs=2"])
        >>> (cfg.model.units, cfg.train.epochs)
        (128, 2)
    """

    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON, atomically
        (:func:`~captioner.fileio.atomic_write_text`)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, key + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-5" (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (valid keys under "
            f"'{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from nested dicts (missing keys: defaults)."""
    cfg = _from_dict(Config, values or {})
    validate(cfg)
    return cfg


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _override_dict(assignment: str) -> dict[str, Any]:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key=value")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Return a copy of ``cfg`` with ``key=value`` overrides (values parsed as YAML)."""
    values = cfg.to_dict()
    for assignment in overrides or []:
        values = _merge(values, _override_dict(assignment))
    return config_from_dict(values)


BUILTIN_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def builtin_configs() -> list[str]:
    """Names of the configs shipped with the package (``captioner/configs/*.yaml``).

    Example:
        >>> {"shapes", "flickr8k", "smiles_qm9"} <= set(builtin_configs())
        True
    """
    return sorted(p.stem for p in BUILTIN_CONFIG_DIR.glob("*.yaml"))


def resolve_config(path_or_name: str | Path) -> Path:
    """The config file meant by ``path_or_name``: an existing file, else the built-in
    config of that name (``shapes`` or ``shapes.yaml`` -> ``captioner/configs/shapes.yaml``).

    A file always wins over a built-in name. Neither: :class:`ConfigError` listing the
    built-in names.

    Example:
        >>> resolve_config("shapes") == BUILTIN_CONFIG_DIR / "shapes.yaml"
        True
        >>> resolve_config("no_such_config")
        Traceback (most recent call last):
        ...
        captioner.config.ConfigError: config file not found: no_such_config (not a file, nor
        a built-in config: coco, flickr8k, shapes, ...)
    """
    path = Path(path_or_name)
    if path.is_file():
        return path
    if path.parent == Path(".") and path.suffix in ("", ".yaml", ".yml"):
        builtin = BUILTIN_CONFIG_DIR / f"{path.stem}.yaml"
        if builtin.is_file():
            return builtin
    raise ConfigError(f"config file not found: {path_or_name} (not a file, nor a built-in "
                      f"config: {', '.join(builtin_configs()) or 'none installed'})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML (or JSON) config file, or a built-in config by name
    (:func:`builtin_configs`, e.g. ``"shapes"``), apply overrides and validate.

    Relative ``data.path`` / ``data.images_dir`` stay as written: they are resolved
    against the working directory when the data is read.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = resolve_config(path)
        try:
            text = path.read_text()
            values = (json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)) or {}
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML/JSON: {exc}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    try:
        cfg = config_from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    return apply_overrides(cfg, overrides)


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def _validate_drawing(dr: DrawingConfig) -> None:
    choices = Choices()
    for i, name in enumerate(dr.toolkits):
        try:
            choices.check("toolkit", name, f"data.drawing.toolkits[{i}]")
        except ChoiceError as exc:
            raise ConfigError(str(exc)) from None
    _require(len(dr.toolkit_weights) == len(dr.toolkits) and dr.toolkits
             and min(dr.toolkit_weights) >= 0 and sum(dr.toolkit_weights) > 0,
             "data.drawing.toolkit_weights", "one non-negative weight per toolkit, not all 0")
    for key in ("canvas_range", "aspect_range", "margin_range", "bond_width_range",
                "font_scale_range", "faint_ink_range", "layout_jitter_range"):
        lo_hi = getattr(dr, key)
        _require(len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1], f"data.drawing.{key}",
                 "two numbers [low, high] with 0 <= low <= high")
    _require(dr.canvas_range[0] >= 32, "data.drawing.canvas_range", "at least 32 pixels")
    _require(dr.faint_ink_range[1] <= 1.0, "data.drawing.faint_ink_range",
             "fractions of the ink's darkness in [0, 1]")
    _require(dr.layout_jitter_range[1] <= 0.5, "data.drawing.layout_jitter_range",
             "fractions of the mean bond length, at most 0.5 (atoms would swap places)")
    for f in dataclasses.fields(dr):
        if f.name.endswith("_prob"):
            _require(0.0 <= getattr(dr, f.name) <= 1.0, f"data.drawing.{f.name}",
                     "a probability in [0, 1]")
    _require(dr.workers >= 0, "data.drawing.workers", "0 (draw in the training process) or more")
    _require(dr.eval_size >= 32, "data.drawing.eval_size", "at least 32 pixels")


def validate(cfg: Config) -> None:
    """Allowed values (:class:`~captioner.choices.Choices`) and the cross-field checks
    that a type annotation cannot express."""
    m, t, d, dc = cfg.model, cfg.train, cfg.data, cfg.decode
    choices = Choices()
    for key, name, value in (
            ("data.format", "data_format", d.format),
            ("data.feature_dtype", "feature_dtype", d.feature_dtype),
            ("data.split_by", "split_by", d.split_by),
            ("tokenizer.kind", "tokenizer", cfg.tokenizer.kind),
            ("model.backbone", "backbone", m.backbone),
            ("model.trainable", "trainable", m.trainable),
            ("model.attention", "attention", m.attention),
            ("model.attend", "attend", m.attend),
            ("model.init_state", "init_state", m.init_state),
            ("model.attention_kernel", "attention_kernel", m.attention_kernel),
            ("model.cnn_padding", "cnn_padding", m.cnn_padding),
            ("model.cnn_norm", "cnn_norm", m.cnn_norm),
            ("data.drawing.val_style", "drawing_style", d.drawing.val_style),
            ("data.drawing.eval_style", "drawing_style", d.drawing.eval_style),
            ("train.lr_schedule", "lr_schedule", t.lr_schedule),
            ("train.val_metric", "val_metric", t.val_metric),
            ("train.precision", "precision", t.precision),
            ("train.strategy", "strategy", t.strategy),
            ("train.on_nonfinite", "on_nonfinite", t.on_nonfinite),
            ("train.scheduled_sampling.schedule", "sampling_schedule",
             t.scheduled_sampling.schedule),
            ("decode.strategy", "decode_strategy", dc.strategy)):
        try:
            choices.check(name, value, key)
        except ChoiceError as exc:
            raise ConfigError(str(exc)) from None
    _require((m.trainable == "fine_tune") == (m.fine_tune_from is not None),
             "model.fine_tune_from", "names the first trainable layer, with trainable: fine_tune")
    _require(m.attention != "dot" or m.embedding_dim == m.units, "model.attention",
             "'dot' scores need model.embedding_dim == model.units")
    _require(len(m.cnn_kernels) in (1, 2) and min(m.cnn_kernels) >= 1, "model.cnn_kernels",
             "one or two kernel sizes (>= 1): the stride-2 conv and the optional second conv")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    side = m.image_size / 2 ** len(m.cnn_filters)
    _require(m.backbone != "small_cnn" or (side >= 1 and side == int(side)), "model.image_size",
             f"must be divisible by 2**len(model.cnn_filters) = {2 ** len(m.cnn_filters)}")
    _validate_drawing(d.drawing)
    _require(t.logical_cpus >= 0, "train.logical_cpus", "must be 0 (no split) or more")
    _require(1 <= dc.n_best <= dc.beam_size, "decode.n_best", "must be in 1..decode.beam_size")
    for i, view in enumerate(dc.rescore_views):
        try:
            choices.check("rescore_view", view, f"decode.rescore_views[{i}]")
        except ChoiceError as exc:
            raise ConfigError(str(exc)) from None
    for i, margin in enumerate(dc.margin_views):
        _require(margin >= 0, f"decode.margin_views[{i}]", f"must be a margin >= 0, got {margin}")
    _require(len(set(dc.margin_views)) == len(dc.margin_views), "decode.margin_views",
             f"lists a margin twice: {dc.margin_views}")
    _require(not (dc.margin_views and dc.rescore_views), "decode.margin_views",
             "and decode.rescore_views both choose among the candidates: set one of them")
    _require(dc.temperature > 0, "decode.temperature", "must be positive")
    _require(dc.crop_margin is None or dc.crop_margin >= 0, "decode.crop_margin",
             "must be null (whole pictures) or a margin >= 0")
    _require(not (d.format == "smiles" and d.drawing.crop_to_ink) or dc.crop_margin is not None,
             "decode.crop_margin", "must be set (e.g. 0.15) when data.drawing.crop_to_ink trains "
             "on pictures cut to their ink, so that the run reads pictures the same way")
    _require(dc.max_length >= 1, "decode.max_length", "must be at least 1")
    _require(d.max_length >= 3, "data.max_length", "must be at least 3")
    _require(t.batch_size >= 1, "train.batch_size", "must be positive")
    _require(t.max_minutes is None or t.max_minutes > 0, "train.max_minutes",
             "must be positive (minutes of training), or null for no time budget")
    _require(t.attention_supervision >= 0, "train.attention_supervision",
             "must be 0 (off) or a positive weight")
    _require(not t.attention_supervision or (d.format == "smiles"
                                             and cfg.tokenizer.kind == "smiles"),
             "train.attention_supervision", "needs data.format: smiles (pictures drawn while "
             "training, which know where their atoms are) and tokenizer.kind: smiles")
    _require(t.precise_bn_batches >= 0, "train.precise_bn_batches",
             "must be 0 (off) or a number of batches")
    _require(t.checkpoint_minutes >= 0, "train.checkpoint_minutes",
             "must be 0 (off) or a positive number of minutes")
