"""Image backbones behind one interface: the from-scratch ``SmallCNN`` or a pretrained
``keras.applications`` network (EfficientNetB0, MobileNetV2, ResNet50, InceptionV3).

Every backbone offers what :class:`captioner.model.CaptionModel` uses:
``preprocess(images)`` ([0, 255] RGB -> the network's input scale, TF ops only),
``call(x, training)`` -> (B, gh, gw, C) and ``grid_hw(image_size)`` -> (gh, gw).

``weights``: ``"imagenet"`` (passed to ``keras.applications``, which downloads the file
once into ``~/.keras/models``), a local ``.h5``/``.weights.h5`` file (see
:func:`save_backbone_weights`) or ``None`` (random initialisation).

``trainable``: ``"frozen"`` (no trainable weights; always run in inference mode),
``"full"`` (everything trains) or ``"fine_tune"`` (layers from ``fine_tune_from`` on
train; the earlier ones are frozen, so their BatchNorm layers run in inference mode,
because Keras 3 BatchNormalization uses batch statistics only when ``training and
layer.trainable``). :func:`backbone_variables` returns the backbone's trainable
variables so a trainer can give them their own learning rate.

Mixed precision: the ``keras.applications`` constructors take no ``dtype``, so
:class:`PretrainedBackbone` builds its network while the global dtype policy is set
to its own policy and restores the previous policy afterwards. Variables stay float32;
with ``mixed_bfloat16`` the network computes in bfloat16. Pass ``dtype="float32"`` for
a float32 backbone under a mixed-precision model.

Example:
    >>> available_backbones()
    ('small_cnn', 'efficientnet_b0', 'mobilenet_v2', 'resnet50', 'inception_v3')
    >>> default_image_size("inception_v3")
    299
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import keras
import tensorflow as tf

from captioner.choices import Choices


@dataclass(frozen=True)
class BackboneSpec:
    """How to build and feed one ``keras.applications`` network.

    ``constructor`` is the ``keras.applications`` attribute, ``module`` the submodule
    holding its ``preprocess_input``, ``preprocessing`` one of ``"none"`` (the model
    rescales inside), ``"tf"`` ([-1, 1]) or ``"caffe"`` (BGR minus ImageNet means),
    ``default_size`` the input side the network was designed for.
    """

    constructor: str
    module: str
    preprocessing: str
    default_size: int = 224


def _default_specs() -> Mapping[str, BackboneSpec]:
    return MappingProxyType({
        "efficientnet_b0": BackboneSpec("EfficientNetB0", "efficientnet", "none"),
        "mobilenet_v2": BackboneSpec("MobileNetV2", "mobilenet_v2", "tf"),
        "resnet50": BackboneSpec("ResNet50", "resnet50", "caffe"),
        "inception_v3": BackboneSpec("InceptionV3", "inception_v3", "tf", 299),
    })


@dataclass(frozen=True)
class BackboneDefaults:
    """The pretrained backbones (immutable).

    ``specs`` maps each pretrained backbone name (``Choices().backbone`` after
    ``small_cnn``, in that order) to its :class:`BackboneSpec`; ``caffe_mean_bgr`` holds
    the ImageNet channel means in BGR order, subtracted by the ``"caffe"`` preprocessing.

    Example:
        >>> BackboneDefaults().specs["inception_v3"].default_size
        299
        >>> ("small_cnn", *BackboneDefaults().specs) == Choices().backbone
        True
    """

    caffe_mean_bgr: tuple[float, float, float] = (103.939, 116.779, 123.68)
    specs: Mapping[str, BackboneSpec] = field(default_factory=_default_specs)


def available_backbones() -> tuple[str, ...]:
    """Names accepted by :func:`build_backbone` (``model.backbone``), ``"small_cnn"``
    first."""
    return Choices().backbone


def default_image_size(name: str) -> int:
    """The input side a backbone was designed for (224; 299 for InceptionV3).

    Example:
        >>> default_image_size("resnet50")
        224
    """
    return 224 if name == "small_cnn" else backbone_spec(name).default_size


def backbone_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` of a pretrained backbone; ValueError for unknown names."""
    specs = BackboneDefaults().specs
    if name not in specs:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(specs)}")
    return specs[name]


def preprocess_images(images: tf.Tensor, mode: str) -> tf.Tensor:
    """uint8 or float RGB pixels in [0, 255] (..., 3) -> float32 network input (..., 3).

    Matches ``keras.applications.imagenet_utils.preprocess_input`` for ``"tf"`` and
    ``"caffe"``; ``"none"`` only casts. Pure TF ops, so it runs in ``tf.data``.

    Example:
        >>> preprocess_images(tf.constant([[0.0, 127.5, 255.0]]), "tf").numpy()
        array([[-1.,  0.,  1.]], dtype=float32)
        >>> preprocess_images(tf.constant([[123.68, 116.779, 103.939]]), "caffe").numpy()
        array([[0., 0., 0.]], dtype=float32)
    """
    x = tf.cast(images, "float32")
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "caffe":
        mean_bgr = tf.constant(BackboneDefaults().caffe_mean_bgr, "float32")
        return x[..., ::-1] - mean_bgr  # RGB -> BGR, centred
    if mode == "none":
        return x
    raise ValueError(f"preprocessing must be 'none', 'tf' or 'caffe', got {mode!r}")


# ---- argument checks ------------------------------------------------------------------
def _check_trainable(trainable: str | bool, fine_tune_from: str | None) -> str:
    """Normalises ``trainable`` (a bool from Keras' own config means full/frozen)."""
    if isinstance(trainable, bool):
        trainable = "full" if trainable else "frozen"
    Choices().check("trainable", trainable)
    if trainable == "fine_tune" and not fine_tune_from:
        raise ValueError("trainable='fine_tune' needs fine_tune_from=<layer name>")
    if trainable != "fine_tune" and fine_tune_from:
        raise ValueError(f"fine_tune_from={fine_tune_from!r} is only used with "
                         f"trainable='fine_tune', got trainable={trainable!r}")
    return trainable


def _check_weights(weights: str | os.PathLike | None) -> str | None:
    """``None``, ``"imagenet"`` or the path of an existing weights file (as a str)."""
    if weights is None or weights == "imagenet":
        return weights
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"backbone weights file not found: {path!r} (model.weights must be 'imagenet', "
            "null for random initialisation, or an existing .h5/.weights.h5 file)")
    return path


def _layer_index(layers: Sequence[keras.layers.Layer], name: str, network: str) -> int:
    names = [layer.name for layer in layers]
    if name in names:
        return names.index(name)
    close = difflib.get_close_matches(name, names, n=3)
    sample = names[1::max(1, len(names) // 8)][:8]
    hint = f" Did you mean {close}?" if close else ""
    raise ValueError(f"fine_tune_from={name!r} is not a layer of {network}.{hint} "
                     f"Valid names include {sample} ({len(names)} layers in all).")


def _apply_trainable(owner: keras.layers.Layer, layers: Sequence[keras.layers.Layer],
                     mode: str, fine_tune_from: str | None, network: str) -> None:
    """Sets ``trainable`` flags: all off (frozen), all on (full), or on from a layer."""
    owner.trainable = mode != "frozen"  # recursive in Keras 3
    if mode == "fine_tune":
        start = _layer_index(layers, fine_tune_from, network)
        for layer in layers[:start]:
            layer.trainable = False  # frozen BatchNorm then runs in inference mode


def _build_network(spec: BackboneSpec, weights: str | None,
                   policy: keras.DTypePolicy) -> keras.Model:
    """The ``include_top=False`` network, its layers built under ``policy``.

    The input side is left open so ``compute_output_shape`` gives the grid for any size.
    """
    constructor = getattr(keras.applications, spec.constructor)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        return constructor(include_top=False, weights=weights, input_shape=(None, None, 3))
    finally:
        keras.config.set_dtype_policy(previous)


@keras.saving.register_keras_serializable(package="captioner")
class PretrainedBackbone(keras.layers.Layer):
    """A ``keras.applications`` network without its classifier, as a grid encoder.

    ``name_`` is the backbone (see :class:`BackboneDefaults`); ``name`` stays the Keras layer name.
    ``network`` is the wrapped ``keras.Model``: its layer names are the valid values of
    ``fine_tune_from`` (e.g. ``"block_13_expand"`` for MobileNetV2, ``"conv5_block1_1_conv"``
    for ResNet50, ``"block6a_expand_conv"`` for EfficientNetB0, ``"mixed8"`` for
    InceptionV3). The layer is built on construction, so its weights exist at once.

    A local weights file is loaded into a network built with ``weights=None``. For
    EfficientNet, ``"imagenet"`` also adds a fixed input rescaling layer that a file
    cannot carry, so use ImageNet weights offline by putting Keras' own file
    (e.g. ``efficientnetb0_notop.h5``) into ``~/.keras/models`` and keeping
    ``"imagenet"``. MobileNetV2 loads its 224-pixel ImageNet weights at every size.

    Note: setting ``trainable = True`` on a parent model afterwards unfreezes every
    layer again (Keras propagates the flag); rebuild the backbone instead.

    Example:
        >>> bb = PretrainedBackbone("mobilenet_v2", image_size=96)
        >>> bb(bb.preprocess(tf.zeros((1, 96, 96, 3), "uint8"))).shape
        TensorShape([1, 3, 3, 1280])
        >>> bb.grid_hw(224), bb.feature_dim, bb.trainable_mode, len(bb.trainable_weights)
        ((7, 7), 1280, 'frozen', 0)
    """

    def __init__(self, name_: str, image_size: int, weights: str | None = None,
                 trainable: str = "frozen", fine_tune_from: str | None = None, **kwargs):
        self.spec = backbone_spec(name_)
        mode = _check_trainable(trainable, fine_tune_from)
        source = _check_weights(weights)
        super().__init__(**kwargs)
        self.name_, self.image_size = name_, int(image_size)
        self.weights_source, self.trainable_mode = source, mode
        self.fine_tune_from = fine_tune_from
        self.network = _build_network(self.spec, "imagenet" if source == "imagenet" else None,
                                      self.dtype_policy)
        if source not in (None, "imagenet"):
            self.network.load_weights(source)
        self.grid_hw(self.image_size)  # fails early when the image is too small
        _apply_trainable(self, self.network.layers, mode, fine_tune_from, name_)
        self.built = True

    @property
    def feature_dim(self) -> int:
        """Channels C of the output grid (1280 or 2048)."""
        return int(self.network.output_shape[-1])

    def grid_hw(self, image_size: int) -> tuple[int, int]:
        """Output grid (gh, gw) for a square ``image_size`` input, from the network's
        own shape inference (no forward pass)."""
        try:
            shape = self.network.compute_output_shape((None, image_size, image_size, 3))
        except ValueError as err:
            raise ValueError(f"image_size={image_size} is too small for {self.name_}: "
                             f"{err}") from err
        return int(shape[1]), int(shape[2])

    def preprocess(self, images: tf.Tensor) -> tf.Tensor:
        """[0, 255] RGB (B, S, S, 3) -> this network's input (B, S, S, 3) float32, as
        ``keras.applications.<module>.preprocess_input`` would give."""
        return preprocess_images(images, self.spec.preprocessing)

    def call(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        if self.trainable_mode == "frozen":
            training = False  # BatchNorm statistics and dropout stay in inference mode
        return self.network(images, training=training)  # (B, gh, gw, C)

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return tuple(self.network.compute_output_shape(tuple(input_shape)))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "name_": self.name_, "image_size": self.image_size,
                "weights": self.weights_source, "trainable": self.trainable_mode,
                "fine_tune_from": self.fine_tune_from}


class ReflectPad(keras.layers.Layer):
    """Pads height and width by mirroring: ``before`` pixels at the top/left, ``after`` at
    the bottom/right, so convolutions see no artificial dark frame at the image border.

    Example:
        >>> ReflectPad(1, 1)(tf.reshape(tf.range(4.0), (1, 2, 2, 1)))[0, :, :, 0].numpy()
        array([[3., 2., 3., 2.],
               [1., 0., 1., 0.],
               [3., 2., 3., 2.],
               [1., 0., 1., 0.]], dtype=float32)
    """

    def __init__(self, before: int = 1, after: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.before, self.after = before, after

    def call(self, x: tf.Tensor) -> tf.Tensor:
        pad = [[0, 0], [self.before, self.after], [self.before, self.after], [0, 0]]
        return tf.pad(x, pad, mode="REFLECT")  # (B, H + before + after, W + ..., C)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "before": self.before, "after": self.after}


class SmallCNN(keras.layers.Layer):
    """A small CNN trained from scratch: one stride-2 stage per entry of ``filters``.

    Each stage is convKxK/2 -> norm -> ReLU -> convKxK -> norm -> ReLU with the kernel
    sizes of ``kernels`` (default 3 and 3), so a 224x224 image and five stages give a 7x7
    grid. ``norm``: ``batch`` (BatchNormalization), ``group`` (GroupNormalization with 8
    groups, or fewer when the filters do not divide: no batch statistics, so training
    and inference compute the same function) or ``plain`` (none: a bias instead, He-initialised).
    Small kernels (e.g. ``[2, 1]``: non-overlapping patches) keep each grid cell's
    receptive field on its own patch, which makes attention maps easy to read.
    ``padding="reflect"`` mirrors the border instead of padding with zeros, so cells at
    the image border do not stand out just for being at the border.

    Example:
        >>> cnn = SmallCNN(filters=[8, 16])
        >>> cnn(tf.zeros((2, 32, 32, 3))).shape
        TensorShape([2, 8, 8, 16])
    """

    def __init__(self, filters: list[int] | tuple[int, ...] = (32, 64, 128, 256, 256),
                 kernels: list[int] | tuple[int, ...] = (3, 3), padding: str = "same",
                 norm: str = "batch", **kwargs):
        super().__init__(**kwargs)
        Choices().check("cnn_padding", padding)
        Choices().check("cnn_norm", norm)
        self.filters = list(filters)
        self.kernels = list(kernels)
        self.padding = padding
        self.norm = norm
        layers: list[keras.layers.Layer] = []
        for i, f in enumerate(self.filters):
            for j, (kernel, stride) in enumerate(zip(self.kernels, (2, 1))):
                layers += self._conv(f, kernel, stride, f"{i}_{j}")
                layers += self._norm(f, f"{i}_{j}")
                layers.append(keras.layers.ReLU(dtype=self.dtype_policy))
        self.net = keras.Sequential(layers, name="stages")

    def _norm(self, filters: int, name: str) -> list[keras.layers.Layer]:
        if self.norm == "batch":
            return [keras.layers.BatchNormalization(momentum=0.9, name=f"bn{name}",
                                                    dtype=self.dtype_policy)]
        if self.norm == "group":
            groups = next(g for g in (8, 4, 2, 1) if filters % g == 0)
            return [keras.layers.GroupNormalization(groups, name=f"gn{name}",
                                                    dtype=self.dtype_policy)]
        return []

    def _conv(self, filters: int, kernel: int, stride: int, name: str) -> list[keras.layers.Layer]:
        pad = []
        if self.padding == "reflect" and kernel > 1:
            before = (kernel - 1) // 2
            pad = [ReflectPad(before, kernel - 1 - before, name=f"pad{name}",
                              dtype=self.dtype_policy)]
        mode = "valid" if self.padding == "reflect" else "same"
        plain = self.norm == "plain"  # no normalisation: a bias, and He init for the ReLUs
        return pad + [keras.layers.Conv2D(filters, kernel, strides=stride, padding=mode,
                                          use_bias=plain, name=f"conv{name}",
                                          kernel_initializer="he_normal" if plain
                                          else "glorot_uniform",
                                          dtype=self.dtype_policy)]

    def grid_hw(self, image_size: int) -> tuple[int, int]:
        side = image_size // 2 ** len(self.filters)
        return side, side

    @property
    def feature_dim(self) -> int:
        """Channels C of the grid: the last stage's filters."""
        return self.filters[-1]

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        gh, gw = self.grid_hw(int(input_shape[1]))
        return (input_shape[0], gh, gw, self.filters[-1])

    @staticmethod
    def preprocess(images: tf.Tensor) -> tf.Tensor:
        """uint8 or float pixels in [0, 255] -> floats in [-1, 1]."""
        return tf.cast(images, "float32") / 127.5 - 1.0  # (B, S, S, 3)

    def call(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.net(images, training=training)  # (B, gh, gw, C)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "filters": self.filters, "kernels": self.kernels,
                "padding": self.padding, "norm": self.norm}


def build_backbone(name: str, image_size: int, weights: str | None = None,
                   trainable: str = "full", fine_tune_from: str | None = None,
                   cnn_filters: Sequence[int] = (32, 64, 128, 256, 256),
                   cnn_kernels: Sequence[int] = (3, 3), cnn_padding: str = "same",
                   dtype: Any = None, cnn_norm: str = "batch") -> keras.layers.Layer:
    """A built backbone layer named ``"backbone"``: ``SmallCNN`` or a pretrained network.

    ``cnn_*`` only apply to ``small_cnn``, whose ``weights`` may be ``None`` or a file
    written by :func:`save_backbone_weights` (it has no ImageNet weights).

    Example:
        >>> cnn = build_backbone("small_cnn", 32, cnn_filters=[8, 16])
        >>> type(cnn).__name__, cnn.grid_hw(32), len(backbone_variables(cnn))
        ('SmallCNN', (8, 8), 12)
    """
    if name == "small_cnn":
        return _build_small_cnn(image_size, weights, trainable, fine_tune_from, cnn_filters,
                                cnn_kernels, cnn_padding, dtype, cnn_norm)
    if name not in BackboneDefaults().specs:
        raise ValueError(f"unknown backbone {name!r}; available: "
                         f"{', '.join(available_backbones())}")
    return PretrainedBackbone(name, image_size, weights, trainable, fine_tune_from,
                              name="backbone", dtype=dtype)


def _build_small_cnn(image_size: int, weights: str | None, trainable: str,
                     fine_tune_from: str | None, filters: Sequence[int],
                     kernels: Sequence[int], padding: str, dtype: Any,
                     norm: str = "batch") -> keras.layers.Layer:
    if weights == "imagenet":
        raise ValueError("small_cnn is trained from scratch and has no 'imagenet' weights; "
                         "set model.weights to null or a file from save_backbone_weights")
    mode = _check_trainable(trainable, fine_tune_from)
    source = _check_weights(weights)
    cnn = SmallCNN(filters, kernels, padding, norm, name="backbone", dtype=dtype)
    cnn(keras.KerasTensor((None, image_size, image_size, 3)))  # symbolic call: creates weights
    if source is not None:
        cnn.net.load_weights(source)
    _apply_trainable(cnn, cnn.net.layers, mode, fine_tune_from, "small_cnn")
    return cnn


def save_backbone_weights(layer: keras.layers.Layer, path: str | os.PathLike) -> None:
    """Writes the ``.weights.h5`` file that ``weights=path`` loads back.

    Pretrained backbones also load the legacy ``.h5`` files of ``keras.applications``.
    """
    network = layer.network if isinstance(layer, PretrainedBackbone) else layer.net
    network.save_weights(os.fspath(path))


def backbone_variables(layer: keras.layers.Layer) -> list[keras.Variable]:
    """The backbone's trainable variables (empty when frozen), e.g. for their own
    learning rate: ``{id(v) for v in backbone_variables(model.backbone)}``."""
    return list(layer.trainable_variables)
