"""Loading images robustly: any Pillow-readable file to uint8 RGB; unreadable files are
reported with a reason, never silently dropped."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from captioner.data.manifests import LoadReport


# ---- images ------------------------------------------------------------------------------
def load_image(path: str | Path, size: int | None) -> np.ndarray:
    """Decode any Pillow-readable image to (size, size, 3) uint8 RGB (``size=None``: the
    image's own (H, W, 3), e.g. to draw attention over what the user sees).

    Handles grayscale, palette, RGBA/LA (composited on white), 16-bit, CMYK and EXIF
    orientation.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
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
        if size is not None:
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def try_load_image(path: str, size: int) -> tuple[np.ndarray | None, str | None]:
    if not Path(path).is_file():
        return None, "missing file"
    try:
        return load_image(path, size), None
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable"
        return None, f"unreadable: {type(exc).__name__}: {exc}"


def load_images(paths: list[str], size: int, workers: int = 4
                ) -> tuple[np.ndarray, np.ndarray, LoadReport]:
    """Load many images in parallel -> (images (N_ok, S, S, 3), ok mask (N,), report)."""
    report = LoadReport()
    out = np.zeros((len(paths), size, size, 3), np.uint8)
    ok = np.zeros(len(paths), bool)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, (arr, err) in enumerate(pool.map(lambda p: try_load_image(p, size), paths)):
            if err is None:
                out[i], ok[i] = arr, True
            else:
                report.add(paths[i], err)
    return out[ok], ok, report



def image_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive slices of an image array, the last one possibly smaller."""
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]
