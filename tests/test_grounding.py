"""Tests for attention grounding scores (7x7 grid over 112x112: cell centres 8, 24, ...)."""

from __future__ import annotations

import numpy as np
import pytest

from captioner.data.shapes import render_sample
from captioner.evaluate.grounding import (
    match_phrases,
    parse_phrases,
    peak_cell_center,
    point_in_box,
    shapes_grounding,
)

GRID = (7, 7)
IMAGE = (112, 112)
RED_CIRCLE = {"color": "red", "shape": "circle", "box": [0, 0, 30, 30]}  # cells (0..1, 0..1)
BLUE_SQUARE = {"color": "blue", "shape": "square", "box": [70, 70, 110, 110]}  # cells 4..6
NOWHERE = (3, 3)  # centre (56, 56): inside neither box


def attention(peaks: list[tuple[int, int]], grid: tuple[int, int] = GRID) -> np.ndarray:
    """One softmax-like row per word, peaked at the given (row, col) cell."""
    rows = np.full((len(peaks), grid[0] * grid[1]), 0.1 / (grid[0] * grid[1]))
    for t, (row, col) in enumerate(peaks):
        rows[t, row * grid[1] + col] += 0.9
    return rows


def score(words: str, peaks: list[tuple[int, int]], objects: list[dict]) -> dict:
    return shapes_grounding([words.split()], [attention(peaks)], [objects], IMAGE, GRID)


def test_peak_cell_center_maps_argmax_to_pixels() -> None:
    assert peak_cell_center(attention([(0, 0)])[0], GRID, IMAGE) == (8.0, 8.0)
    assert peak_cell_center(attention([(2, 5)])[0], GRID, IMAGE) == (88.0, 40.0)
    assert peak_cell_center(attention([(1, 3)], (2, 4))[0], (2, 4), (100, 200)) == (175.0, 75.0)
    assert peak_cell_center(attention([(6, 6)]).reshape(7, 7), GRID, IMAGE) == (104.0, 104.0)


def test_point_in_box_is_inclusive() -> None:
    assert point_in_box((0, 0), [0, 0, 10, 10]) and point_in_box((10, 10), [0, 0, 10, 10])
    assert not point_in_box((10.5, 5), [0, 0, 10, 10])


def test_peak_inside_box_is_fully_grounded() -> None:
    result = score("a red circle", [NOWHERE, (0, 0), (1, 1)], [RED_CIRCLE])
    assert result == {"grounding": 1.0, "grounded": 2, "object_words": 2}


def test_peak_in_wrong_cell_is_not_grounded() -> None:
    result = score("a red circle", [(0, 0), NOWHERE, (5, 5)], [RED_CIRCLE])
    assert result == {"grounding": 0.0, "grounded": 0, "object_words": 2}


def test_mixed_gives_exact_fraction() -> None:
    words = "a red circle left of a blue square"
    peaks = [NOWHERE, (0, 1), NOWHERE, NOWHERE, NOWHERE, NOWHERE, (5, 5), (0, 0)]
    result = score(words, peaks, [RED_CIRCLE, BLUE_SQUARE])
    assert result == {"grounding": 0.5, "grounded": 2, "object_words": 4}


def test_non_object_words_are_ignored() -> None:
    # Only "of" looks at the circle: no object word is grounded, relation words never count.
    words = "a red circle left of a blue square"
    peaks = [(0, 0), NOWHERE, NOWHERE, (0, 0), (0, 0), (5, 5), NOWHERE, NOWHERE]
    assert score(words, peaks, [RED_CIRCLE, BLUE_SQUARE])["grounded"] == 0


def test_prediction_in_non_canonical_order_matches_by_identity() -> None:
    # Canonical order is red circle, blue square; the prediction names them reversed.
    words = "a blue square right of a red circle"
    peaks = [NOWHERE, (6, 6), (5, 4), NOWHERE, NOWHERE, NOWHERE, (1, 0), (0, 1)]
    result = score(words, peaks, [RED_CIRCLE, BLUE_SQUARE])
    assert result == {"grounding": 1.0, "grounded": 4, "object_words": 4}
    # Looking at the canonical-order objects instead is wrong.
    swapped = [NOWHERE, (0, 0), (0, 0), NOWHERE, NOWHERE, NOWHERE, (6, 6), (6, 6)]
    assert score(words, swapped, [RED_CIRCLE, BLUE_SQUARE])["grounded"] == 0


def test_duplicate_identities_prefer_canonical_position() -> None:
    left = {"color": "red", "shape": "circle", "box": [0, 0, 30, 30]}
    right = {"color": "red", "shape": "circle", "box": [80, 0, 110, 30]}
    words = "a red circle left of a red circle"
    peaks = [NOWHERE, (0, 0), (1, 1), NOWHERE, NOWHERE, NOWHERE, (0, 6), (1, 5)]
    assert score(words, peaks, [left, right])["grounding"] == 1.0
    # Both phrases looking at the left circle: only the first one is right.
    peaks_left = peaks[:6] + [(0, 0), (1, 1)]
    assert score(words, peaks_left, [left, right])["grounding"] == 0.5
    assert match_phrases(parse_phrases(words.split()), [left, right]) == [0, 1]
    # A wrong first phrase: the second phrase still prefers the second (canonical) object.
    words = "a green triangle left of a red circle"
    peaks = [NOWHERE, (0, 0), (0, 0), NOWHERE, NOWHERE, NOWHERE, (0, 6), (1, 5)]
    assert score(words, peaks, [left, right]) == {
        "grounding": 0.5,
        "grounded": 2,
        "object_words": 4,
    }
    assert match_phrases(parse_phrases(words.split()), [left, right]) == [-1, 1]


def test_unmatched_phrase_counts_as_ungrounded() -> None:
    words = "a red circle above a green triangle"  # no green triangle in the image
    peaks = [NOWHERE, (0, 0), (0, 0), NOWHERE, NOWHERE, (5, 5), (5, 5)]
    result = score(words, peaks, [RED_CIRCLE, BLUE_SQUARE])
    assert result == {"grounding": 0.5, "grounded": 2, "object_words": 4}


def test_repeated_phrase_cannot_reuse_an_object() -> None:
    words = "a red circle left of a red circle"
    peaks = [NOWHERE, (0, 0), (0, 0), NOWHERE, NOWHERE, NOWHERE, (0, 0), (0, 0)]
    result = score(words, peaks, [RED_CIRCLE])
    assert result == {"grounding": 0.5, "grounded": 2, "object_words": 4}


def test_incomplete_phrases_count_as_object_words() -> None:
    words = "a red above a square"
    assert [p.positions for p in parse_phrases(words.split())] == [(1,), (4,)]
    result = score(words, [NOWHERE, (0, 0), NOWHERE, NOWHERE, (6, 6)], [RED_CIRCLE, BLUE_SQUARE])
    assert result == {"grounding": 0.0, "grounded": 0, "object_words": 2}


def test_no_object_words_gives_zero_without_error() -> None:
    assert score("a above of", [NOWHERE] * 3, [RED_CIRCLE]) == {
        "grounding": 0.0,
        "grounded": 0,
        "object_words": 0,
    }
    assert shapes_grounding([], [], [], IMAGE, GRID)["object_words"] == 0


def test_scores_pool_over_captions_and_allow_longer_attention() -> None:
    att_a = attention([NOWHERE, (0, 0), (0, 0), NOWHERE])  # extra step (e.g. <end>)
    att_b = attention([NOWHERE, (3, 3), (5, 5)])
    result = shapes_grounding(
        [["a", "red", "circle"], ["a", "blue", "square"]],
        [att_a, att_b],
        [[RED_CIRCLE], [BLUE_SQUARE]],
        IMAGE,
        GRID,
    )
    assert result == {"grounding": 0.75, "grounded": 3, "object_words": 4}


def test_grid_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="49"):
        peak_cell_center(np.ones(48), GRID, IMAGE)
    with pytest.raises(ValueError, match="7x7"):
        shapes_grounding([["a", "red", "circle"]], [np.ones((3, 64))], [[RED_CIRCLE]], IMAGE, GRID)
    with pytest.raises(ValueError, match="7x7"):  # even without object words
        shapes_grounding([["a"]], [np.ones((1, 36))], [[RED_CIRCLE]], IMAGE, GRID)


def test_other_input_errors_raise() -> None:
    with pytest.raises(ValueError, match="fewer steps"):
        score("a red circle", [(0, 0)] * 2, [RED_CIRCLE])
    with pytest.raises(ValueError, match="captions"):
        shapes_grounding([["a"]], [], [[RED_CIRCLE]], IMAGE, GRID)


def test_oracle_attention_on_generated_samples_is_fully_grounded() -> None:
    """Attention peaked at the cell containing each object's box centre scores 1.0."""
    rng = np.random.default_rng(0)
    words_list, atts, objects_list = [], [], []
    for _ in range(30):
        _, caption, objects, word_objects = render_sample(rng)
        peaks = []
        for index in word_objects:
            x0, y0, x1, y1 = objects[index]["box"] if index >= 0 else (50, 50, 60, 60)
            peaks.append((int((y0 + y1) / 2 // 16), int((x0 + x1) / 2 // 16)))
        words_list.append(caption.split())
        atts.append(attention(peaks))
        objects_list.append(objects)
    result = shapes_grounding(words_list, atts, objects_list, IMAGE, GRID)
    assert result["grounding"] == 1.0 and result["object_words"] > 60


def test_molecule_grounding_hand_made_maps():
    from captioner.evaluate.grounding import molecule_grounding

    # "C(=O)O": atom tokens at 0, 3, 5; atoms drawn in cells (0,0), (0,6) and (6,6)
    atoms = [{"symbol": "C", "x": 5, "y": 5}, {"symbol": "O", "x": 220, "y": 5},
             {"symbol": "O", "x": 220, "y": 220}]
    att = np.zeros((6, 49))
    att[0, 0] = 1.0  # right cell
    att[3, 6] = 1.0  # right cell
    att[5, 0] = 1.0  # wrong cell
    out = molecule_grounding([list("C(=O)O")], [att], ["C(=O)O"], [atoms], [(224, 224)], (7, 7))
    assert out == {"grounding": 2 / 3, "grounded": 2, "object_words": 3, "molecules": 1,
                   "within_one_cell": 2 / 3}  # the miss is 6 cells away
    att[5, 40] = 2.0  # peak now at (5, 5): a neighbour of the atom's cell (6, 6)
    out = molecule_grounding([list("C(=O)O")], [att], ["C(=O)O"], [atoms], [(224, 224)], (7, 7))
    assert out["grounding"] == 2 / 3 and out["within_one_cell"] == 1.0
    # a prediction that differs from the reference is not scored
    out = molecule_grounding([list("C(=O)N")], [att], ["C(=O)O"], [atoms], [(224, 224)], (7, 7))
    assert out["molecules"] == 0 and out["object_words"] == 0 and out["grounding"] == 0.0
    # non-square image: x in a 300-wide image maps to columns of 300/7 px
    wide = [{"symbol": "C", "x": 299, "y": 0}]
    att1 = np.zeros((1, 49))
    att1[0, 6] = 1.0
    assert molecule_grounding([["C"]], [att1], ["C"], [wide], [(100, 300)], (7, 7))[
        "grounding"] == 1.0
