"""Views of a picture for re-scoring a beam (captioner.generate.rescoring), its config
key and its command-line flag; the re-scoring itself is tested on a trained run in
test_inference."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import tensorflow as tf

from captioner.choices import Choices
from captioner.config import Config, ConfigError, apply_overrides
from captioner.generate.rescoring import view_images


@pytest.fixture(scope="module")
def pictures() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)  # (B, S, S, 3)


def test_turns_and_mirror_are_numpy_s(pictures):
    for view, k in (("rot90", 1), ("rot180", 2), ("rot270", 3)):
        np.testing.assert_array_equal(view_images(tf.constant(pictures), view),
                                      np.rot90(pictures, k, axes=(1, 2)))
    np.testing.assert_array_equal(view_images(tf.constant(pictures), "mirror"),
                                  pictures[:, :, ::-1])
    np.testing.assert_array_equal(view_images(tf.constant(pictures), "identity"), pictures)


def test_pad_shrinks_the_picture_inside_a_white_border(pictures):
    black = np.zeros((1, 40, 40, 3), np.uint8)
    out = view_images(tf.constant(black), "pad").numpy()  # border 4 px of 48, back to 40
    assert out.shape == (1, 40, 40, 3) and out.dtype == np.uint8
    assert (out[:, :2] == 255).all() and (out[:, :, :2] == 255).all()  # white edges
    assert (out[:, :, -2:] == 255).all() and (out[:, -2:] == 255).all()
    assert (out[:, 6:-6, 6:-6] == 0).all()  # the picture inside, smaller
    assert view_images(tf.constant(pictures), "pad").shape == pictures.shape


@pytest.mark.parametrize("view", Choices().rescore_view)
def test_each_view_is_the_same_eagerly_and_traced(pictures, view):
    traced = tf.function(lambda x: view_images(x, view), autograph=False)
    np.testing.assert_array_equal(traced(tf.constant(pictures)),
                                  view_images(tf.constant(pictures), view))


def test_an_unknown_view_is_named():
    with pytest.raises(ValueError, match="decode.rescore_views must be one of identity"):
        view_images(tf.zeros((1, 4, 4, 3), tf.uint8), "rot45")
    with pytest.raises(ConfigError, match=r"decode.rescore_views\[1\] must be one of"):
        apply_overrides(Config(), ["decode.rescore_views=[identity, upside]"])
    cfg = apply_overrides(Config(), ["decode.rescore_views=[identity, rot180]"])
    assert cfg.decode.rescore_views == ["identity", "rot180"]


def test_the_flag_takes_a_list_or_none():
    from captioner.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["caption", "--run", "r", "x.png", "--rescore-views",
                              "identity, rot90,rot270"])
    assert args.rescore_views == ("identity", "rot90", "rot270")
    assert parser.parse_args(["evaluate", "--run", "r", "--out", "o", "--rescore-views",
                              "none"]).rescore_views == ()
    assert parser.parse_args(["caption", "--run", "r", "x.png"]).rescore_views is None
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    with pytest.raises(argparse.ArgumentTypeError, match="among identity"):
        next(a for a in sub.choices["caption"]._actions
             if a.dest == "rescore_views").type("identity,sideways")


def test_the_views_script_ranks_by_validity_then_each_set_of_views(load_script):
    script = load_script("rescore_views")
    views = ("identity", "rot90", "mirror")
    texts = [["C1CC", "CCO", "CC"],  # 1: beam's first invalid, the molecule second
             ["CC", "CO", "OC"],  # 2: the views move "OC" (= CO, the molecule) up
             ["CN", "CC", "CO"]]  # 3: the beam is right; rot90 would move it down
    scores = np.array([[[-1, -2, -3], [-1, -2, -3], [-1, -2, -3]],
                       [[-1, -2, -3], [-1, -9, -1], [-9, -9, -1]],
                       [[-1, -2, -3], [-9, -1, -1], [-1, -9, -1]]], float)  # (P, V, K)
    refs = ["OCC", "CO", "NC"]
    out = script.exact_by_views(texts, scores, refs, views, rerank=True)
    assert out["identity"] == pytest.approx(2 / 3)  # picture 1 by validity, 3 as beamed
    assert out["identity,mirror"] == pytest.approx(3 / 3)  # 2: -19 / -19 / -5
    assert out["identity,rot90"] == pytest.approx(1 / 3)  # 2: -2 / -11 / -4; 3: CC first
    assert out["identity,rot90,mirror"] == pytest.approx(2 / 3)
    assert out["top_k"] == 1.0
    plain = script.exact_by_views(texts, scores, refs, views, rerank=False)
    assert plain["identity"] == pytest.approx(1 / 3)  # "C1CC" stays first without re-ranking
