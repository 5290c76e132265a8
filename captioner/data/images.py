"""Loading images robustly: any Pillow-readable file to uint8 RGB; unreadable files are
reported with a reason, never silently dropped."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from captioner.data.manifests import LoadReport

ImageSource = str | Path | bytes | BinaryIO


class ImageError(ValueError):
    """An image that cannot be used: ``reason`` is one of :attr:`ImageLimits.reasons`
    (``missing`` only from callers that turn a missing file into an ImageError, like
    :meth:`captioner.generate.captioner.Captioner.generate`) and the message names the
    source.

    Example:
        >>> load_image(b"", 8)
        Traceback (most recent call last):
        ...
        captioner.data.images.ImageError: <bytes>: empty: no bytes
    """

    def __init__(self, source: str, reason: str, detail: str):
        super().__init__(f"{source}: {reason}: {detail}")
        self.source, self.reason, self.detail = source, reason, detail


@dataclass(frozen=True)
class ImageLimits:
    """What an input image may be: at most ``max_pixels`` (width x height, checked from
    the header before any pixel is decoded, so a decompression bomb costs nothing).

    Example:
        >>> ImageLimits().max_pixels
        64000000
    """

    max_pixels: int = 64_000_000
    reasons: tuple[str, ...] = ("empty", "not_an_image", "truncated", "too_large",
                                "unreadable", "missing")


def _name(source: ImageSource) -> str:
    return "<bytes>" if isinstance(source, bytes) else str(getattr(source, "name", source))


def _open(source: ImageSource) -> Image.Image:
    """Pillow image of ``source`` (path, bytes or binary file), header read only."""
    if isinstance(source, bytes):
        if not source:
            raise ImageError("<bytes>", "empty", "no bytes")
        return Image.open(io.BytesIO(source))
    if isinstance(source, (str, Path)) and Path(source).is_file() and not Path(source).stat(
            ).st_size:
        raise ImageError(str(source), "empty", "the file has no bytes")
    return Image.open(source)


def _check_whole(source: ImageSource, im: Image.Image) -> None:
    """A PNG whose last chunks are cut off decodes without complaint: verify its chunk
    structure (a PNG is re-read for it; other formats fail on load when cut)."""
    if im.format != "PNG":
        return
    if not isinstance(source, (bytes, str, Path)):
        return  # a stream cannot be read twice; load() still catches cut pixel data
    with _open(source) as again:
        again.verify()


# ---- images ------------------------------------------------------------------------------
def ink_square(im: Image.Image, margin: float, threshold: int = 200
               ) -> tuple[int, int, int] | None:
    """The square around ``im``'s ink (pixels whose grey level is below ``threshold``) as
    (left, top, side) in ``im``'s pixels: side the ink's longer side times
    ``1 + 2 * margin``, centred on the ink (it may reach past the picture); None when
    ``im`` has no ink.

    Example:
        >>> im = Image.new("RGB", (200, 100), "white")
        >>> im.paste((0, 0, 0), (150, 20, 170, 60))  # 20 x 40 px of ink
        >>> ink_square(im, 0.25)
        (130, 10, 60)
    """
    if margin < 0:
        raise ValueError(f"crop margin must be >= 0, got {margin}")
    ink = im.convert("L").point([255 if v < threshold else 0 for v in range(256)])
    bbox = ink.getbbox()  # (left, top, right, bottom) of the non-zero pixels
    if bbox is None:
        return None
    left, top, right, bottom = bbox
    side = int(round(max(bottom - top, right - left) * (1 + 2 * margin)))
    return (left + right - side) // 2, (top + bottom - side) // 2, side


def cut_square(im: Image.Image, box: tuple[int, int, int]) -> Image.Image:
    """The (left, top, side) square ``box`` of ``im`` (e.g. :func:`ink_square`), RGB,
    white where it reaches past the picture.

    Example:
        >>> cut_square(Image.new("RGB", (10, 10), "black"), (5, 5, 8)).getpixel((7, 7))
        (255, 255, 255)
    """
    x0, y0, side = box
    out = Image.new("RGB", (side, side), (255, 255, 255))
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    out.paste(rgb.crop((max(x0, 0), max(y0, 0), min(x0 + side, im.width),
                        min(y0 + side, im.height))), (max(-x0, 0), max(-y0, 0)))
    return out


def crop_to_ink(im: Image.Image, margin: float, threshold: int = 200) -> Image.Image:
    """``im`` cut to its :func:`ink_square`, white where the square reaches past the
    picture: a drawing on white at the scale of its content, whatever the canvas around
    it. A picture without ink comes back unchanged.

    Example:
        >>> im = Image.new("RGB", (200, 100), "white")
        >>> im.paste((0, 0, 0), (150, 20, 170, 60))  # 20 x 40 px of ink
        >>> out = crop_to_ink(im, 0.25)
        >>> out.size, out.getpixel((0, 0)), out.getpixel((30, 30))
        ((60, 60), (255, 255, 255), (0, 0, 0))
    """
    box = ink_square(im, margin, threshold)
    return im if box is None else cut_square(im, box)


def load_image(source: ImageSource, size: int | None,
               limits: ImageLimits | None = None, crop_margin: float | None = None
               ) -> np.ndarray:
    """Decode any Pillow-readable image (a path, bytes or a binary file) to (size, size, 3)
    uint8 RGB (``size=None``: the image's own (H, W, 3), e.g. to draw attention over what
    the user sees). ``crop_margin``: first :func:`crop_to_ink` with that margin (drawings
    on white, e.g. molecules; None reads the whole picture).

    Handles grayscale, palette, RGBA/LA (composited on white), 16-bit, CMYK and EXIF
    orientation. Raises :class:`ImageError` (reason ``empty``, ``not_an_image``,
    ``truncated``, ``too_large`` above ``limits.max_pixels``, or ``unreadable``) and
    FileNotFoundError for a missing path.
    """
    limits = limits or ImageLimits()
    name = _name(source)
    try:
        with _open(source) as im:
            width, height = im.size
            if width * height > limits.max_pixels:
                raise ImageError(name, "too_large", f"{width} x {height} pixels is more than "
                                 f"the limit of {limits.max_pixels:,}")
            _check_whole(source, im)
            return _to_rgb(im, size, crop_margin)
    except (ImageError, FileNotFoundError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(name, "too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise ImageError(name, "not_an_image", "Pillow does not recognise the bytes as an "
                         "image") from None
    except (OSError, SyntaxError) as exc:
        reason = "truncated" if "truncat" in str(exc).lower() else "unreadable"
        raise ImageError(name, reason, f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any other decoder failure
        raise ImageError(name, "unreadable", f"{type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class View:
    """What a reader sees of a picture before resizing it: ``pixels`` (H, W, 3) uint8 and,
    when it was cut to its ink, the square ``box`` (left, top, side) in the picture's
    pixels (None: the whole picture).

    Example:
        >>> im = Image.new("RGB", (200, 100), "white")
        >>> im.paste((0, 0, 0), (150, 20, 170, 60))
        >>> buf = io.BytesIO(); im.save(buf, "PNG")
        >>> view = load_view(buf.getvalue(), 0.25)
        >>> view.pixels.shape, view.box, view.to_view(150.0, 20.0)
        ((60, 60, 3), (130, 10, 60), (20.0, 10.0))
    """

    pixels: np.ndarray
    box: tuple[int, int, int] | None = None

    def to_view(self, x: float, y: float) -> tuple[float, float]:
        """(x, y) pixels of the picture -> of the view."""
        return (x, y) if self.box is None else (x - self.box[0], y - self.box[1])

    def resized(self, size: int) -> np.ndarray:
        """(size, size, 3) uint8: the model's input, as :func:`load_image` gives it."""
        return np.asarray(_resize_square(Image.fromarray(self.pixels), size), dtype=np.uint8)

    def png_data_url(self) -> str:
        """The view as a ``data:image/png;base64,...`` URL (e.g. for a page to show)."""
        buf = io.BytesIO()
        Image.fromarray(self.pixels).save(buf, "PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def load_view(source: ImageSource, crop_margin: float | None,
              limits: ImageLimits | None = None) -> View:
    """The :class:`View` of a picture that :func:`load_image` with ``crop_margin`` resizes
    to the model's input (the whole picture for None): what to draw attention over.
    Raises as :func:`load_image`."""
    whole = load_image(source, None, limits)
    if crop_margin is None:
        return View(whole)
    im = Image.fromarray(whole)
    box = ink_square(im, crop_margin)
    return View(whole) if box is None else View(np.asarray(cut_square(im, box)), box)


def _to_rgb(im: Image.Image, size: int | None, crop_margin: float | None = None) -> np.ndarray:
    """Decode an opened image: EXIF orientation, any mode -> RGB, optional crop to the
    ink, optional square resize."""
    if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation (exif_transpose copies always)
        im = ImageOps.exif_transpose(im)
    im.load()
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray((255.0 * arr / max(arr.max(), 1.0)).astype("uint8"))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.new("RGB", rgba.size, (255, 255, 255))
        im.paste(rgba, mask=rgba.getchannel("A"))
    im = im.convert("RGB")
    if crop_margin is not None:
        im = crop_to_ink(im, crop_margin)
    if size is not None:
        im = _resize_square(im, size)
    return np.asarray(im, dtype=np.uint8)


def _resize_square(im: Image.Image, size: int) -> Image.Image:
    return im.resize((size, size), Image.Resampling.BILINEAR)


def try_load_image(path: str, size: int, crop_margin: float | None = None
                   ) -> tuple[np.ndarray | None, str | None]:
    """(pixels, None), or (None, the reason) for a missing or unusable file."""
    if not Path(path).is_file():
        return None, "missing file"
    try:
        return load_image(path, size, crop_margin=crop_margin), None
    except ImageError as exc:
        return None, f"unreadable: {exc.reason}: {exc.detail}"


def load_images(paths: list[str], size: int, workers: int = 4,
                crop_margin: float | None = None) -> tuple[np.ndarray, np.ndarray, LoadReport]:
    """Load many images in parallel -> (images (N_ok, S, S, 3), ok mask (N,), report)."""
    report = LoadReport()
    out = np.zeros((len(paths), size, size, 3), np.uint8)
    ok = np.zeros(len(paths), bool)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        loaded = pool.map(lambda p: try_load_image(p, size, crop_margin), paths)
        for i, (arr, err) in enumerate(loaded):
            if err is None:
                out[i], ok[i] = arr, True
            else:
                report.add(paths[i], err)
    return out[ok], ok, report



def image_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive slices of an image array, the last one possibly smaller."""
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]
