"""Export a trained run as a TensorFlow SavedModel that needs nothing but TensorFlow.

``export_run(run_dir, export_dir)`` writes TensorFlow Serving's versioned layout
(``export_dir/1/``, the next free number when versions exist). Its signatures:

* ``serving_default``: ``images`` tf.string (B,), encoded PNG/JPEG/GIF/BMP bytes of any
  size and mode -> greedy decoding;
* ``serving_beam``: the same input -> beam search with the exported ``beam_size``;
* ``serving_pixels``: ``pixels`` uint8 (B, H, W, 3) of any H, W -> greedy decoding.

A run that reads pictures cut to their ink (``decode.crop_margin``) is exported so: the
two byte signatures cut each picture in the graph (:func:`cut_to_ink`); ``serving_pixels``
takes pictures already cut (as ``captioner serve`` does, from the metadata's
``crop_margin_permille``: the margin x 1000, -1 for whole pictures).

Each returns ``text`` tf.string (B,), ``token_text`` tf.string (B, T) (each token's
string; empty for ``<end>`` and after it), ``tokens`` int32 (B, T) (``<end>`` included,
``<pad>`` = 0 after it), ``length`` int32 (B,), ``score`` float32 (B,) (sum of token
log-probs, ``<end>`` included), ``token_scores`` float32 (B, T), ``attention`` float32
(B, T, G) and ``valid`` bool (B,). Decoding the bytes, compositing alpha on white,
resizing (bilinear, antialiased) and the backbone's preprocessing run in the graph; the
vocabulary is a lookup table in the graph. A ``metadata`` function returns the grid shape,
input size and decoding settings.

Bad bytes: an element whose first bytes are no known image signature is not decoded: it
gets ``valid = False``, an empty ``text`` and zero outputs, and the rest of the batch is
decoded as usual. Bytes that carry an image signature but cannot be decoded (a truncated
or corrupt file) make TensorFlow's decoder fail the whole call with
``InvalidArgumentError``; the process (and a serving server) survives and later calls
work. ``captioner serve`` checks every image with Pillow first, so it never sends such
bytes. EXIF orientation is not applied in the graph (``captioner caption`` applies it).

Example:
    >>> export_run("runs/demo", "exports/demo")                      # doctest: +SKIP
    PosixPath('exports/demo/1')
    >>> m = tf.saved_model.load("exports/demo/1")                    # doctest: +SKIP
    >>> m.signatures["serving_default"](images=tf.constant([png_bytes]))["text"]  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorflow as tf

from captioner.data.tokenizers import Tokenizer
from captioner.generate.captioner import (
    Captioner,
    DecodeOptions,
    run_strategy,
)
from captioner.model.layers import CaptionModel


@dataclass(frozen=True)
class ExportOptions:
    """What an export fixes in its graph.

    Example:
        >>> ExportOptions(beam_size=3).beam_size
        3
    """

    max_length: int = 0  # 0: the run's decode.max_length
    beam_size: int = 3
    length_penalty: float = 0.0
    checkpoint: str = "best"


def image_signature_ok(data: tf.Tensor) -> tf.Tensor:
    """Whether a scalar tf.string starts like a PNG, JPEG, GIF or BMP file (bool ()).

    Example:
        >>> bool(image_signature_ok(tf.constant(b"\\x89PNG\\r\\n\\x1a\\n....")))
        True
        >>> bool(image_signature_ok(tf.constant(b"hello")))
        False
    """
    head = tf.strings.substr(data, 0, 8)
    prefixes = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
    hits = [tf.equal(tf.strings.substr(head, 0, len(p)), p) for p in prefixes]
    return tf.reduce_any(tf.stack(hits))


def to_rgb(image: tf.Tensor) -> tf.Tensor:
    """uint8 (H, W, 1|2|3|4) -> (H, W, 3): gray expanded, alpha composited on white.

    Example:
        >>> to_rgb(tf.constant([[[0, 0]]], tf.uint8)).numpy().tolist()  # transparent black
        [[[255, 255, 255]]]
    """
    x = tf.cast(image, "float32")  # (H, W, C)

    def on_white(color: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
        return color * (alpha / 255.0) + 255.0 * (1.0 - alpha / 255.0)  # (H, W, 3)

    def gray() -> tf.Tensor:
        return tf.tile(x[..., :1], [1, 1, 3])

    rgb = tf.switch_case(tf.shape(image)[-1] - 1, [
        gray,
        lambda: on_white(gray(), x[..., 1:2]),  # gray + alpha
        lambda: x[..., :3],
        lambda: on_white(x[..., :3], x[..., 3:4]),  # RGBA
    ])
    return tf.cast(tf.round(tf.clip_by_value(rgb, 0.0, 255.0)), tf.uint8)


def resize_to(image: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 (H, W, 3) -> uint8 (size, size, 3): bilinear with antialiasing (Pillow's
    BILINEAR filter widens with the scale as well); unchanged when already that size."""
    same = tf.logical_and(tf.equal(tf.shape(image)[0], size), tf.equal(tf.shape(image)[1], size))

    def resize() -> tf.Tensor:
        out = tf.image.resize(tf.cast(image, "float32"), (size, size), method="bilinear",
                              antialias=True)
        return tf.cast(tf.round(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)

    return tf.ensure_shape(tf.cond(same, lambda: image, resize), (size, size, 3))


def cut_to_ink(image: tf.Tensor, margin: float, threshold: int = 200) -> tf.Tensor:
    """uint8 (H, W, 3) -> the square around its ink plus ``margin``, white past the
    picture: :func:`captioner.data.images.crop_to_ink` in TensorFlow ops (the same grey
    levels as Pillow's, the same square). A picture without ink comes back unchanged.

    Example:
        >>> im = tf.fill((100, 200, 3), tf.constant(255, tf.uint8))
        >>> im = tf.tensor_scatter_nd_update(im, [[30, 160]], [[0, 0, 0]])
        >>> cut_to_ink(im, 1.0).shape.as_list()  # 1 px of ink -> 3 px with margin 1
        [3, 3, 3]
    """
    rgb = tf.cast(image, tf.int32)  # Pillow's "L": (R*19595 + G*38470 + B*7471 + 2**15) >> 16
    grey = tf.bitwise.right_shift(rgb[..., 0] * 19595 + rgb[..., 1] * 38470
                                  + rgb[..., 2] * 7471 + 32768, 16)  # (H, W)
    ink = grey < threshold
    rows = tf.where(tf.reduce_any(ink, axis=1))[:, 0]  # rows holding ink
    cols = tf.where(tf.reduce_any(ink, axis=0))[:, 0]

    def cut() -> tf.Tensor:
        top, bottom = tf.cast(rows[0], tf.int32), tf.cast(rows[-1], tf.int32) + 1
        left, right = tf.cast(cols[0], tf.int32), tf.cast(cols[-1], tf.int32) + 1
        longer = tf.cast(tf.maximum(bottom - top, right - left), tf.float64)
        side = tf.cast(tf.round(longer * (1 + 2 * margin)), tf.int32)  # half to even, as round()
        x0, y0 = (left + right - side) // 2, (top + bottom - side) // 2
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        pads = [[tf.maximum(-y0, 0), tf.maximum(y0 + side - height, 0)],
                [tf.maximum(-x0, 0), tf.maximum(x0 + side - width, 0)], [0, 0]]
        padded = tf.pad(image, pads, constant_values=255)
        y, x = tf.maximum(y0, 0), tf.maximum(x0, 0)
        return padded[y:y + side, x:x + side]

    return tf.cond(tf.size(rows) > 0, cut, lambda: image)


def decode_images(data: tf.Tensor, size: int, crop_margin: float | None = None
                  ) -> tuple[tf.Tensor, tf.Tensor]:
    """tf.string (B,) encoded images -> uint8 (B, size, size, 3) and valid (B,) bool; an
    element without an image signature becomes zeros with valid False. ``crop_margin``:
    each picture is first cut to its ink (:func:`cut_to_ink`)."""

    def one(item: tf.Tensor) -> tf.Tensor:
        def decode() -> tf.Tensor:
            image = to_rgb(tf.io.decode_image(item, expand_animations=False, dtype=tf.uint8))
            if crop_margin is not None:
                image = cut_to_ink(image, crop_margin)
            return resize_to(image, size)

        return tf.cond(image_signature_ok(item), decode,
                       lambda: tf.zeros((size, size, 3), tf.uint8))

    valid = tf.map_fn(image_signature_ok, data, fn_output_signature=tf.bool)  # (B,)
    pixels = tf.map_fn(one, data, fn_output_signature=tf.TensorSpec((size, size, 3), tf.uint8))
    return pixels, valid


class ExportModule(tf.Module):
    """The SavedModel's root: the model's variables, the vocabulary table and the
    signatures (see the module docstring).

    Example:
        >>> module = ExportModule(model, tokenizer, ExportOptions(max_length=20))  # doctest: +SKIP
        >>> module.caption_bytes(tf.constant([png]))["text"]                        # doctest: +SKIP
    """

    def __init__(self, model: CaptionModel, tokenizer: Tokenizer, options: ExportOptions,
                 crop_margin: float | None = None):
        super().__init__(name="captioner_export")
        self.model = model
        self.size = int(model.args["image_size"])
        self.crop_margin = crop_margin
        self.options = options
        self.ids = (tokenizer.start_id, tokenizer.end_id, tokenizer.pad_id)
        self.joiner = tokenizer.joiner
        self.skip_ids = tf.constant([tokenizer.pad_id, tokenizer.start_id], tf.int32)
        self.vocab = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.range(tokenizer.vocab_size, dtype=tf.int32),
                tf.constant(tokenizer.vocab, tf.string)), default_value="")
        greedy, beam = DecodeOptions("greedy"), DecodeOptions(
            "beam", beam_size=options.beam_size, n_best=1,
            length_penalty=options.length_penalty)
        string_spec = tf.TensorSpec((None,), tf.string, name="images")
        pixel_spec = tf.TensorSpec((None, None, None, 3), tf.uint8, name="pixels")
        self.caption_bytes = tf.function(lambda images: self._from_bytes(images, greedy),
                                         input_signature=[string_spec], autograph=False)
        self.caption_bytes_beam = tf.function(lambda images: self._from_bytes(images, beam),
                                              input_signature=[string_spec], autograph=False)
        self.caption_pixels = tf.function(lambda pixels: self._from_pixels(pixels, greedy),
                                          input_signature=[pixel_spec], autograph=False)
        gh, gw = model.grid_hw
        meta = {"grid_height": gh, "grid_width": gw, "image_size": self.size,
                "max_length": options.max_length, "beam_size": options.beam_size,
                "crop_margin_permille": -1 if crop_margin is None else round(1000 * crop_margin)}
        self.metadata = tf.function(lambda: {k: tf.constant(v, tf.int32)
                                             for k, v in meta.items()}, input_signature=[],
                                     autograph=False)

    def signatures(self) -> dict[str, Any]:
        """The concrete functions saved as signatures."""
        return {"serving_default": self.caption_bytes.get_concrete_function(),
                "serving_beam": self.caption_bytes_beam.get_concrete_function(),
                "serving_pixels": self.caption_pixels.get_concrete_function()}

    def _from_bytes(self, images: tf.Tensor, options: DecodeOptions) -> dict[str, tf.Tensor]:
        pixels, valid = decode_images(images, self.size, self.crop_margin)  # (B, S, S, 3), (B,)
        return self._decode(pixels, valid, options)

    def _from_pixels(self, pixels: tf.Tensor, options: DecodeOptions) -> dict[str, tf.Tensor]:
        resized = tf.map_fn(lambda im: resize_to(im, self.size), pixels,
                            fn_output_signature=tf.TensorSpec((self.size, self.size, 3),
                                                              tf.uint8))
        return self._decode(resized, tf.ones(tf.shape(pixels)[:1], tf.bool), options)

    def _decode(self, pixels: tf.Tensor, valid: tf.Tensor, options: DecodeOptions
                ) -> dict[str, tf.Tensor]:
        enc = self.model.encode(pixels, training=False)  # features (B, G, E), keys
        out = run_strategy(options, self.model, enc, self.ids,
                           tf.constant(self.options.max_length), tf.zeros((2,), tf.int32))
        out = {k: v[:, 0] for k, v in out.items()}  # the best candidate of each image
        mask = tf.cast(valid, "float32")  # (B,)
        tokens = tf.where(valid[:, None], out["tokens"], self.ids[2])  # (B, T)
        shown = self._shown(tokens)  # (B, T)
        words = tf.where(shown, self.vocab.lookup(tokens), "")  # (B, T)
        text = tf.strings.reduce_join(tf.ragged.boolean_mask(words, shown), axis=1,
                                      separator=self.joiner)  # (B,)
        return {
            "text": text,
            "token_text": words,
            "tokens": tokens,
            "length": tf.where(valid, out["lengths"], 0),  # (B,)
            "score": out["scores"] * mask,  # (B,)
            "token_scores": out["token_scores"] * mask[:, None],  # (B, T)
            "attention": out["attention"] * mask[:, None, None],  # (B, T, G)
            "valid": valid,
        }

    def _shown(self, tokens: tf.Tensor) -> tf.Tensor:
        """Which generated ids (B, T) are text, as ``Tokenizer.decode`` keeps them: before
        ``<end>``, not pad or start (bool (B, T))."""
        before_end = tf.equal(tf.cumsum(tf.cast(tf.equal(tokens, self.ids[1]), tf.int32),
                                        axis=1), 0)  # (B, T)
        special = tf.reduce_any(tf.equal(tokens[:, :, None], self.skip_ids), -1)  # (B, T)
        return tf.logical_and(before_end, tf.logical_not(special))


def next_version(export_dir: Path) -> int:
    """1 for a new folder, else one more than the largest numeric version inside.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); (d / "3").mkdir(); (d / "x").mkdir()
        >>> next_version(d), next_version(d / "new")
        (4, 1)
    """
    if not export_dir.is_dir():
        return 1
    versions = [int(p.name) for p in export_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def export_captioner(cap: Captioner, export_dir: str | Path, options: ExportOptions,
                     version: int | None = None) -> Path:
    """Save ``cap`` (its model must use TensorFlow ops: see :func:`export_run`) under
    ``export_dir/<version>``; returns that folder."""
    export_dir = Path(export_dir)
    version = version or next_version(export_dir)
    target = export_dir / str(version)
    if target.exists():
        raise FileExistsError(f"{target} exists: choose another --version or folder")
    max_length = options.max_length or cap.config.decode.max_length
    module = ExportModule(cap.model, cap.tokenizer,
                          ExportOptions(max_length, options.beam_size, options.length_penalty,
                                        options.checkpoint), cap.crop_margin)
    # Inference only: the recurrence's hand-written gradient is not saved.
    tf.saved_model.save(module, str(target), signatures=module.signatures(),
                        options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
    return target


def export_run(run_dir: str | Path, export_dir: str | Path,
               options: ExportOptions | None = None, version: int | None = None,
               crop_margin: float | str | None = "run") -> Path:
    """Rebuild a run with TensorFlow ops only (the compiled decoder kernels are not
    part of TensorFlow, so a SavedModel must not reference them) and export it.

    ``crop_margin`` as in :meth:`Captioner.load`: ``"run"`` keeps the run's
    ``decode.crop_margin``, a number makes the byte signatures cut each picture to its
    ink plus that margin, ``None`` reads whole pictures."""
    options = options or ExportOptions()
    cap = Captioner.load(run_dir, options.checkpoint, attention_kernel="tensorflow",
                         crop_margin=crop_margin)
    return export_captioner(cap, export_dir, options, version)
