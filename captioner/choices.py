"""Every set of allowed values, defined once.

Config validation, the command line, the layers, the decoders and the benchmark all
check against :class:`Choices`; nothing else lists these values. This module imports
nothing heavy, so the CLI can build its parser from it without TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


class ChoiceError(ValueError):
    """A value outside its set; the message names the key and the allowed values."""


@dataclass(frozen=True)
class Choices:
    """The allowed values of each setting (the first one is the default where the setting
    has one).

    Example:
        >>> Choices().check("attend", "sideways", key="model.attend")
        Traceback (most recent call last):
        ...
        captioner.choices.ChoiceError: model.attend must be one of before, after; got 'sideways'
        >>> Choices().check("decode_strategy", "beam")
        'beam'
    """

    data_format: tuple[str, ...] = ("csv", "jsonl", "coco", "karpathy", "flickr8k",
                                    "captions_csv", "auto", "shapes", "smiles")
    feature_dtype: tuple[str, ...] = ("float16", "float32")
    split_by: tuple[str, ...] = ("auto", "image", "smiles")
    tokenizer: tuple[str, ...] = ("word", "smiles", "char", "selfies")
    backbone: tuple[str, ...] = ("small_cnn", "efficientnet_b0", "mobilenet_v2", "resnet50",
                                 "inception_v3")
    trainable: tuple[str, ...] = ("frozen", "full", "fine_tune")
    attention: tuple[str, ...] = ("additive", "dot", "general")
    attend: tuple[str, ...] = ("before", "after")
    init_state: tuple[str, ...] = ("mean", "zeros")
    attention_kernel: tuple[str, ...] = ("auto", "fused", "tensorflow")
    cnn_padding: tuple[str, ...] = ("same", "reflect")
    cnn_norm: tuple[str, ...] = ("batch", "group", "plain")
    toolkit: tuple[str, ...] = ("rdkit", "indigo", "openbabel")
    drawing_style: tuple[str, ...] = ("mix", "rdkit_plain", "rdkit_default", "indigo_default",
                                      "openbabel_default", "thin_rotated_bw")
    compare: tuple[str, ...] = ("osra",)
    lr_schedule: tuple[str, ...] = ("constant", "cosine", "exponential")
    val_metric: tuple[str, ...] = ("auto", "exact_match", "bleu4")
    precision: tuple[str, ...] = ("float32", "mixed_bfloat16", "mixed_float16", "auto")
    strategy: tuple[str, ...] = ("default", "mirrored", "multi_worker")
    sampling_schedule: tuple[str, ...] = ("linear", "inverse_sigmoid")
    decode_strategy: tuple[str, ...] = ("greedy", "beam", "sample")
    #: the views of a picture that re-score a beam's candidates (``decode.rescore_views``)
    rescore_view: tuple[str, ...] = ("identity", "rot90", "rot180", "rot270", "mirror", "pad")
    checkpoint: tuple[str, ...] = ("best", "latest")
    metric_family: tuple[str, ...] = ("caption", "smiles")
    #: how a predicted molecule differs from its reference (``evaluate``'s ``error_kind``)
    smiles_error: tuple[str, ...] = ("none", "invalid", "stereo", "isomer", "atoms", "size")
    bench_impl: tuple[str, ...] = ("captioner", "classic")
    on_nonfinite: tuple[str, ...] = ("stop", "skip")
    on_image_error: tuple[str, ...] = ("raise", "skip")

    def check(self, name: str, value: object, key: str | None = None) -> str:
        """``value`` if it is one of ``name``'s values, else :class:`ChoiceError` naming
        ``key`` (default ``name``) and the allowed values."""
        allowed = self.values(name)
        if value not in allowed:
            raise ChoiceError(f"{key or name} must be one of {', '.join(allowed)}; "
                              f"got {value!r}")
        return str(value)

    def values(self, name: str) -> tuple[str, ...]:
        """The allowed values of ``name`` (a field of this class)."""
        if name not in {f.name for f in fields(self)}:
            raise KeyError(f"no set of choices called {name!r}")
        return getattr(self, name)
