"""Tests for captioner.visualize (numpy/PIL helpers and matplotlib figures)."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from PIL import Image

import captioner.viz.figures as viz

mpl = pytest.importorskip("matplotlib")
mpl.use("Agg")


def _one_hot(grid_hw: tuple[int, int], row: int, col: int) -> np.ndarray:
    att = np.zeros(grid_hw[0] * grid_hw[1], dtype=np.float32)  # (G,)
    att[row * grid_hw[1] + col] = 1.0
    return att


def _cell_rect(grid_hw, out_hw, row, col):
    """Pixel rectangle [y0, y1) x [x0, x1) covered by grid cell (row, col)."""
    cell_h, cell_w = out_hw[0] / grid_hw[0], out_hw[1] / grid_hw[1]
    return (
        math.floor(row * cell_h),
        math.ceil((row + 1) * cell_h),
        math.floor(col * cell_w),
        math.ceil((col + 1) * cell_w),
    )


@pytest.fixture()
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)  # (H, W, 3)


# --------------------------------------------------------------------------- upsample


@pytest.mark.parametrize(
    ("grid_hw", "out_hw"),
    [((7, 7), (224, 224)), ((8, 8), (299, 299)), ((7, 7), (150, 200)), ((3, 5), (90, 40))],
)
def test_upsample_shape_dtype_range(grid_hw, out_hw):
    rng = np.random.default_rng(1)
    att = rng.random(grid_hw[0] * grid_hw[1]).astype(np.float32)  # (G,)
    heat = viz.upsample_attention(att, grid_hw, out_hw)  # (H, W)
    assert heat.shape == out_hw
    assert heat.dtype == np.float32
    assert heat.min() >= 0.0
    assert heat.max() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("grid_hw", "out_hw", "cell"),
    [
        ((7, 7), (224, 224), (2, 5)),
        ((8, 8), (299, 299), (6, 1)),
        ((7, 7), (150, 200), (2, 5)),
        ((3, 5), (90, 40), (0, 4)),
    ],
)
def test_upsample_peak_in_cell(grid_hw, out_hw, cell):
    heat = viz.upsample_attention(_one_hot(grid_hw, *cell), grid_hw, out_hw)  # (H, W)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    y0, y1, x0, x1 = _cell_rect(grid_hw, out_hw, *cell)
    assert y0 <= y < y1 and x0 <= x < x1
    # Smooth, not nearest-neighbour: values fall off inside the cell and it's not blocky.
    assert len(np.unique(heat[y0:y1, x0:x1])) > 4
    # Far corner of the image gets (almost) nothing.
    far_y = 0 if cell[0] >= grid_hw[0] / 2 else out_hw[0] - 1
    far_x = 0 if cell[1] >= grid_hw[1] / 2 else out_hw[1] - 1
    assert heat[far_y, far_x] < 0.05


def test_upsample_row_major_layout():
    # Cell (0, 2) of a 2x3 grid must land top-right, not bottom-left (column-major bug).
    heat = viz.upsample_attention(_one_hot((2, 3), 0, 2), (2, 3), (20, 30))
    assert heat[:10, 20:].mean() > heat[10:, :10].mean() + 0.3


def test_upsample_all_zero_gives_zeros():
    heat = viz.upsample_attention(np.zeros(49, np.float32), (7, 7), (224, 224))
    assert heat.shape == (224, 224)
    assert not heat.any()


def test_upsample_scale_invariant():
    att = np.random.default_rng(2).random(64).astype(np.float32)
    a = viz.upsample_attention(att, (8, 8), (64, 64))
    b = viz.upsample_attention(att * 0.01, (8, 8), (64, 64))
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(("g", "grid_hw"), [(49, (8, 8)), (64, (7, 7)), (50, (7, 7))])
def test_upsample_mismatched_grid_raises(g, grid_hw):
    with pytest.raises(ValueError, match="grid_hw"):
        viz.upsample_attention(np.ones(g, np.float32), grid_hw, (32, 32))


# --------------------------------------------------------------------------- overlay


def test_jet_colormap_endpoints():
    cmap = viz.jet_colormap(np.array([0.0, 0.5, 1.0]))  # (3, 3)
    assert cmap.shape == (3, 3)
    assert cmap[0, 2] > cmap[0, 0]  # low -> blue
    assert cmap[2, 0] > cmap[2, 2]  # high -> red
    assert cmap[1, 1] == pytest.approx(1.0)  # middle -> green-ish


def test_overlay_keeps_shape_dtype_and_changes_peak_most():
    img = np.full((150, 200, 3), 100, dtype=np.uint8)  # (H, W, 3)
    out = viz.overlay_attention(img, _one_hot((7, 7), 2, 5), (7, 7), alpha=0.6)
    assert out.shape == img.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(np.int32) - img.astype(np.int32)).sum(axis=2)  # (H, W)
    y, x = np.unravel_index(np.argmax(diff), diff.shape)
    y0, y1, x0, x1 = _cell_rect((7, 7), (150, 200), 2, 5)
    assert y0 <= y < y1 and x0 <= x < x1
    assert diff.max() > 50
    assert diff[-1, 0] == 0  # far from the peak: untouched


def test_overlay_zero_attention_and_alpha_zero_leave_image():
    img = np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = viz.overlay_attention(img, np.zeros(49, np.float32), (7, 7))
    np.testing.assert_array_equal(out, img)
    out = viz.overlay_attention(img, _one_hot((7, 7), 3, 3), (7, 7), alpha=0.0)
    np.testing.assert_array_equal(out, img)


def test_overlay_grayscale_and_bad_alpha():
    gray = np.full((30, 30), 50, dtype=np.uint8)  # (H, W)
    out = viz.overlay_attention(gray, _one_hot((3, 3), 1, 1), (3, 3))
    assert out.shape == (30, 30, 3)
    with pytest.raises(ValueError):
        viz.overlay_attention(gray, _one_hot((3, 3), 1, 1), (3, 3), alpha=1.5)


# --------------------------------------------------------------------------- attention figure


def test_attention_panel_count():
    assert viz.attention_panel_count(0) == 1
    assert viz.attention_panel_count(7) == 8
    with pytest.raises(ValueError):
        viz.attention_panel_count(-1)


@pytest.mark.parametrize(("n_tokens", "cols"), [(3, 5), (7, 5), (10, 4), (1, 1)])
def test_build_attention_figure_panels(image, n_tokens, cols):
    tokens = [f"w{i}" for i in range(n_tokens)]
    att = np.random.default_rng(4).random((n_tokens + 3, 49)).astype(np.float32)  # (T, G)
    fig = viz.build_attention_figure(image, tokens, att, (7, 7), cols=cols, title="my caption")
    assert len(fig.axes) == viz.attention_panel_count(n_tokens) == 1 + n_tokens
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "my caption"
    assert titles[1:] == tokens
    assert all(not ax.axison for ax in fig.axes)
    assert all(len(ax.images) == 2 for ax in fig.axes[1:])  # image + heat map
    assert len(fig.axes[0].images) == 1
    rows = math.ceil((1 + n_tokens) / min(cols, 1 + n_tokens))
    assert fig.get_size_inches()[1] == pytest.approx(3.0 * rows + 0.4)


def test_build_attention_figure_default_title_is_caption(image):
    fig = viz.build_attention_figure(image, ["a", "dog"], np.ones((2, 49)), (7, 7))
    assert fig.axes[0].get_title() == "a dog"


def test_attention_figure_writes_png(image, tmp_path):
    tokens = ["a", "dog", "runs", "on", "grass", "<end>"]
    att = np.random.default_rng(5).random((9, 64)).astype(np.float32)  # (T, G), padded
    out = viz.attention_figure(image, tokens, att, (8, 8), tmp_path / "sub" / "att.png", cols=4)
    assert out == tmp_path / "sub" / "att.png" and out.is_file()
    with Image.open(out) as png:
        assert png.format == "PNG"
        width, height = png.size
    # 7 panels at 4 columns -> 2 rows of 3-inch panels at 100 dpi.
    assert width == 1200 and height == 640


def test_attention_figure_too_few_rows_raises(image, tmp_path):
    with pytest.raises(ValueError, match="T=2"):
        viz.attention_figure(image, ["a", "b", "c"], np.ones((2, 49)), (7, 7), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_attention_figure_bad_grid_raises(image, tmp_path):
    with pytest.raises(ValueError):
        viz.attention_figure(image, ["a"], np.ones((1, 49)), (8, 8), tmp_path / "x.png")


# --------------------------------------------------------------------------- history


def test_plot_history_png_with_none(tmp_path):
    history = {
        "epoch": [1, 2, 3, 4],
        "loss": [3.0, 2.5, None, 1.9],
        "val_loss": [3.2, None, 2.4, float("nan")],
        "val_metric": [None, 0.1, 0.15, 0.2],
        "val_metric_name": "exact_match",
    }
    out = viz.plot_history(history, tmp_path / "hist.png")
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (1000, 400)
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.std() > 5  # something was drawn


def test_plot_history_missing_keys(tmp_path):
    out = viz.plot_history({"loss": [1.0, 0.5]}, tmp_path / "h.png")
    with Image.open(out) as png:
        assert png.format == "PNG"
    out = viz.plot_history({}, tmp_path / "empty.png")
    assert out.is_file()


def test_series_drops_none_and_nan():
    xs, ys = viz._series({"v": [1.0, None, float("nan"), 4.0]}, "v", [1, 2, 3, 4])
    assert xs == [1, 4] and ys == [1.0, 4.0]


def test_module_doctests():
    result = doctest.testmod(viz, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
