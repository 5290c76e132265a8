"""Attention and training-history visualisation for the captioner.

Show, Attend and Tell style figures: the input image followed by one panel per
generated token, each with the (upsampled) soft-attention map overlaid.

matplotlib is optional and imported lazily inside the plotting functions;
``upsample_attention``, ``jet_colormap`` and ``overlay_attention`` only need
numpy and Pillow (handy for HTML reports).

Example:
    >>> import numpy as np
    >>> att = np.zeros(49, dtype=np.float32); att[19] = 1.0
    >>> upsample_attention(att, (7, 7), (224, 224)).shape
    (224, 224)
"""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.figure import Figure

__all__ = [
    "attention_figure",
    "attention_panel_count",
    "build_attention_figure",
    "jet_colormap",
    "overlay_attention",
    "plot_history",
    "upsample_attention",
]


# --------------------------------------------------------------------------- helpers


def _import_figure_class() -> type[Figure]:
    """Import matplotlib lazily (Agg backend) and return ``matplotlib.figure.Figure``.

    Figures are built with the object-oriented API (no pyplot state, nothing to
    close). The Agg backend is selected only if pyplot is not already in use, so
    an interactive session's backend is left alone.

    Example:
        >>> Figure = _import_figure_class()  # doctest: +SKIP
    """
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise ImportError(
            "captioner.visualize plotting needs matplotlib: pip install matplotlib"
        ) from exc
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure


def _prepare_out_path(out_path: str | Path) -> Path:
    """Return ``out_path`` as a Path, creating its parent directory.

    Example:
        >>> _prepare_out_path("/tmp/x.png").name
        'x.png'
    """
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as an (H, W, 3) uint8 array (gray or RGBA accepted).

    Example:
        >>> _as_rgb_uint8(np.zeros((4, 5), np.uint8)).shape
        (4, 5, 3)
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)  # (H, W, 3)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"image must be (H, W, 3), got shape {img.shape}")
    img = img[:, :, :3]  # (H, W, 3)
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img


def _check_hw(hw: tuple[int, int], name: str) -> tuple[int, int]:
    """Validate a (height, width) pair of positive ints.

    Example:
        >>> _check_hw((7, 7), "grid_hw")
        (7, 7)
    """
    if len(hw) != 2 or int(hw[0]) <= 0 or int(hw[1]) <= 0:
        raise ValueError(f"{name} must be two positive ints, got {hw!r}")
    return int(hw[0]), int(hw[1])


# --------------------------------------------------------------------------- numpy / PIL


def upsample_attention(
    attention_row: np.ndarray, grid_hw: tuple[int, int], out_hw: tuple[int, int]
) -> np.ndarray:
    """Upsample one attention vector to an image-sized map in [0, 1].

    The (G,) vector is reshaped row-major to ``grid_hw`` = (gh, gw) and resized
    bicubically (PIL mode "F") to ``out_hw`` = (H, W). Negative overshoot is
    clipped; the result is scaled so its max is 1 (an all-zero input stays zero).

    Raises:
        ValueError: if gh * gw != G or the sizes are not positive.

    Example:
        >>> row = np.zeros(12, np.float32); row[5] = 1.0
        >>> m = upsample_attention(row, (3, 4), (150, 200))
        >>> m.shape, m.dtype, float(m.max())
        ((150, 200), dtype('float32'), 1.0)
    """
    gh, gw = _check_hw(grid_hw, "grid_hw")
    out_h, out_w = _check_hw(out_hw, "out_hw")
    row = np.nan_to_num(np.asarray(attention_row, dtype=np.float32).reshape(-1))  # (G,)
    if row.size != gh * gw:
        raise ValueError(f"attention has G={row.size} values but grid_hw={grid_hw} needs {gh * gw}")
    grid = row.reshape(gh, gw)  # (gh, gw)
    resized = Image.fromarray(grid).resize((out_w, out_h), Image.Resampling.BICUBIC)
    heat = np.clip(np.asarray(resized, dtype=np.float32), 0.0, None)  # (H, W)
    peak = float(heat.max())
    if peak > 0.0:
        heat = heat / peak
    return heat.astype(np.float32)


def jet_colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to jet-like RGB colours (pure numpy).

    Blue (0) -> cyan -> yellow -> red (1); inputs are clipped to [0, 1].

    Example:
        >>> jet_colormap(np.array([0.0, 1.0])).round(2).tolist()
        [[0.0, 0.0, 0.5], [0.5, 0.0, 0.0]]
    """
    x = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)  # (...)
    channels = [np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)]
    return np.stack(channels, axis=-1).astype(np.float32)  # (..., 3)


def overlay_attention(
    image: np.ndarray,
    attention_row: np.ndarray,
    grid_hw: tuple[int, int],
    alpha: float = 0.6,
) -> np.ndarray:
    """Blend a jet-coloured attention map onto an image (numpy + PIL only).

    The map is upsampled to the image size; each pixel is mixed with its jet
    colour with weight ``alpha * m`` where m in [0, 1] is the upsampled map, so
    unattended pixels keep their original colour and the attended region is
    tinted most strongly. Gray (H, W) and RGBA images are accepted.

    Example:
        >>> img = np.full((60, 80, 3), 128, np.uint8)
        >>> row = np.zeros(49, np.float32); row[24] = 1.0
        >>> out = overlay_attention(img, row, (7, 7))
        >>> out.shape, out.dtype
        ((60, 80, 3), dtype('uint8'))
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _as_rgb_uint8(image).astype(np.float32)  # (H, W, 3)
    heat = upsample_attention(attention_row, grid_hw, rgb.shape[:2])  # (H, W)
    colour = jet_colormap(heat) * 255.0  # (H, W, 3)
    weight = (alpha * heat)[:, :, None]  # (H, W, 1)
    blended = (1.0 - weight) * rgb + weight * colour  # (H, W, 3)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- matplotlib


def attention_panel_count(n_tokens: int) -> int:
    """Number of panels ``attention_figure`` draws: the image plus one per token.

    Example:
        >>> attention_panel_count(4)
        5
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    return 1 + n_tokens


def _check_attention(attention: np.ndarray, n_tokens: int) -> np.ndarray:
    """Validate a (T, G) attention matrix against the number of tokens.

    Example:
        >>> _check_attention(np.zeros((3, 49)), 2).shape
        (3, 49)
    """
    att = np.asarray(attention, dtype=np.float32)  # (T, G)
    if att.ndim != 2:
        raise ValueError(f"attention must be (T, G), got shape {att.shape}")
    if att.shape[0] < n_tokens:
        raise ValueError(f"attention has T={att.shape[0]} rows but {n_tokens} tokens were given")
    return att


def build_attention_figure(
    image: np.ndarray,
    tokens: list[str],
    attention: np.ndarray,
    grid_hw: tuple[int, int],
    cols: int = 5,
    title: str | None = None,
) -> Figure:
    """Build (without saving) the Show-Attend-Tell figure; see ``attention_figure``.

    The returned matplotlib Figure has exactly ``attention_panel_count(len(tokens))``
    axes (unused grid cells are removed), panel 0 being the plain image.

    Example:
        >>> fig = build_attention_figure(img, ["a", "dog"], att, (7, 7))  # doctest: +SKIP
        >>> len(fig.axes)  # doctest: +SKIP
        3
    """
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    att = _check_attention(attention, len(tokens))  # (T, G)
    rgb = _as_rgb_uint8(image)  # (H, W, 3)
    n_panels = attention_panel_count(len(tokens))
    n_cols = min(cols, n_panels)
    n_rows = math.ceil(n_panels / n_cols)
    figure_cls = _import_figure_class()
    fig = figure_cls(figsize=(3.0 * n_cols, 3.0 * n_rows + 0.4), dpi=100)
    caption = title if title is not None else " ".join(tokens)
    for idx in range(n_panels):
        ax = fig.add_subplot(n_rows, n_cols, idx + 1)
        ax.axis("off")
        ax.imshow(rgb)
        if idx == 0:
            ax.set_title(textwrap.fill(caption, width=28), fontsize=9)
            continue
        heat = upsample_attention(att[idx - 1], grid_hw, rgb.shape[:2])  # (H, W)
        ax.imshow(heat, cmap="jet", alpha=0.6, vmin=0.0, vmax=1.0)
        ax.set_title(tokens[idx - 1], fontsize=11)
    fig.tight_layout()
    return fig


def attention_figure(
    image: np.ndarray,
    tokens: list[str],
    attention: np.ndarray,
    grid_hw: tuple[int, int],
    out_path: str | Path,
    cols: int = 5,
    title: str | None = None,
) -> Path:
    """Save a PNG grid: the image, then one attention overlay per token.

    ``image`` is (H, W, 3) uint8, ``attention`` is (T, G) with T >= len(tokens)
    (padding rows beyond len(tokens) are ignored), G = gh * gw. The first panel is
    titled with ``title`` (default: the tokens joined by spaces); every other
    panel shows the image with its upsampled map in "jet" at alpha 0.6 and the
    token as title. Exactly ``attention_panel_count(len(tokens))`` panels are
    drawn, ``cols`` per row; the figure height grows with the number of rows.

    Raises:
        ValueError: if T < len(tokens) or G does not match ``grid_hw``.
        ImportError: if matplotlib is not installed.

    Example:
        >>> attention_figure(img, ["a", "dog"], att, (7, 7), "att.png")  # doctest: +SKIP
        PosixPath('att.png')
    """
    fig = build_attention_figure(image, tokens, attention, grid_hw, cols=cols, title=title)
    path = _prepare_out_path(out_path)
    fig.savefig(path, format="png", dpi=100)
    return path


def _series(history: dict[str, Any], key: str, epochs: list[Any]) -> tuple[list, list]:
    """Return (epochs, values) for ``history[key]`` with None / NaN entries dropped.

    Example:
        >>> _series({"loss": [1.0, None, 0.5]}, "loss", [1, 2, 3])
        ([1, 3], [1.0, 0.5])
    """
    values = history.get(key) or []
    xs, ys = [], []
    for epoch, value in zip(epochs, values):
        if value is None or not math.isfinite(float(value)):
            continue
        xs.append(epoch)
        ys.append(float(value))
    return xs, ys


def _history_epochs(history: dict[str, Any]) -> list[Any]:
    """Epoch numbers from ``history["epoch"]`` or 1..n from the longest series.

    Example:
        >>> _history_epochs({"loss": [3.0, 2.0]})
        [1, 2]
    """
    if history.get("epoch"):
        return list(history["epoch"])
    lengths = [len(history.get(k) or []) for k in ("loss", "val_loss", "val_metric")]
    return list(range(1, max(lengths) + 1))


def _plot_lines(ax: Any, series: list[tuple[str, list, list]], ylabel: str) -> None:
    """Draw labelled lines on ``ax`` or a "no data" note if all are empty.

    Example:
        >>> _plot_lines(ax, [("loss", [1, 2], [0.9, 0.7])], "loss")  # doctest: +SKIP
    """
    from matplotlib.ticker import MaxNLocator

    drawn = False
    for label, xs, ys in series:
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
            drawn = True
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def plot_history(history: dict[str, Any], out_path: str | Path) -> Path:
    """Plot training curves to a PNG: losses (left panel) and validation metric (right).

    ``history`` may hold "epoch", "loss", "val_loss", "val_metric" (lists; None or
    NaN entries are skipped) and "val_metric_name" (axis label, default "metric").
    Missing keys give empty curves; without "epoch" the x axis is 1..n.

    Example:
        >>> plot_history({"epoch": [1, 2], "loss": [2.0, 1.5], "val_loss": [2.1, None],
        ...               "val_metric": [0.1, 0.2], "val_metric_name": "bleu4"},
        ...              "history.png")  # doctest: +SKIP
        PosixPath('history.png')
    """
    epochs = _history_epochs(history)
    metric_name = str(history.get("val_metric_name") or "metric")
    figure_cls = _import_figure_class()
    fig = figure_cls(figsize=(10.0, 4.0), dpi=100)
    ax_loss, ax_metric = fig.subplots(1, 2)
    losses = [(k, *_series(history, k, epochs)) for k in ("loss", "val_loss")]
    _plot_lines(ax_loss, losses, "loss")
    ax_loss.set_title("loss")
    _plot_lines(ax_metric, [(f"val {metric_name}", *_series(history, "val_metric", epochs))],
                metric_name)
    ax_metric.set_title(f"validation {metric_name}")
    fig.tight_layout()
    path = _prepare_out_path(out_path)
    fig.savefig(path, format="png", dpi=100)
    return path
