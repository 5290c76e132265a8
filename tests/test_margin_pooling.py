"""``decode.margin_views``: each picture read cut at several margins, the readings pooled."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import tensorflow as tf

from captioner.cli import build_parser
from captioner.config import Config, ConfigError, apply_overrides
from captioner.data.chem import canonical_smiles
from captioner.data.images import load_image
from captioner.evaluate.runs import evaluate
from captioner.generate.captioner import Captioner
from captioner.generate.rescoring import pool_readings
from captioner.serve.backends import RunBackend

MARGINS = (0.05, 0.15, 0.3)


def test_pool_sums_spellings_and_multiplies_margins():
    logp = np.log([[0.3, 0.5], [0.2, 0.5], [0.4, 0.5], [0.9, 0.01]])  # (N, M)
    ranked = pool_readings(["A", "A", "B", "C"], logp)
    # A: (0.3 + 0.2) * 0.5 = 0.25 beats B: 0.2; C reads best at one margin, 0.009 in all
    assert [r.key for r in ranked] == ["A", "B", "C"]
    assert [r.index for r in ranked] == [0, 2, 3]  # each name spelled by its best candidate
    np.testing.assert_allclose([r.score for r in ranked], np.log([0.25, 0.2, 0.009]))
    one = pool_readings(["A", "B"], np.log([[0.4], [0.6]]))
    assert [r.key for r in one] == ["B", "A"]


@pytest.fixture(scope="module")
def cap(drawn_run):
    return Captioner.load(drawn_run)


@pytest.fixture(scope="module")
def pictures(drawn_run, tmp_path_factory):
    """Six molecules drawn into files by ``evaluate`` (RDKit defaults, 64 px)."""
    out = tmp_path_factory.mktemp("margins") / "eval"
    evaluate(drawn_run, out, limit=6, log=lambda _m: None)
    return sorted((out / "images").glob("*.png"))


def forced(cap, paths, margin, cands) -> np.ndarray:
    """(B,) teacher-forced log-probability of candidate i's tokens (+ ``<end>`` when it
    ended) in picture i cut at ``margin``."""
    pixels = np.stack([load_image(p, cap.image_size, crop_margin=margin) for p in paths])
    ended = [len(c.tokens) < cap.config.decode.max_length for c in cands]
    ids = [c.tokens + [cap.tokenizer.end_id] * e for c, e in zip(cands, ended)]
    tokens = np.full((len(ids), 1, max(map(len, ids))), cap.tokenizer.pad_id, np.int32)
    for i, row in enumerate(ids):
        tokens[i, 0, :len(row)] = row  # (B, 1, T)
    return cap.scorer(("identity",))(tf.constant(pixels), tf.constant(tokens)).numpy()[:, 0, 0]


def test_one_margin_read_greedily_is_that_margins_greedy_reading(cap, pictures):
    own = cap.crop_margin
    plain = cap.generate(pictures)
    pooled = cap.generate(pictures, margin_views=[own])
    assert pooled.texts == plain.texts and pooled.tokens == plain.tokens
    # teacher forcing against step-by-step decoding: equal up to rounding (bfloat16 where
    # the CPU has it: ~5e-4 of a 24-token score of an untrained model)
    np.testing.assert_allclose(pooled.scores, plain.scores, rtol=2e-3)
    np.testing.assert_allclose(pooled.attention, plain.attention, atol=2e-3)
    np.testing.assert_allclose(pooled.token_scores, plain.token_scores, atol=2e-2)
    assert [c[0].view_score for c in pooled.candidates] == pytest.approx(pooled.scores, abs=1e-4)


def test_the_union_of_the_margins_readings_is_ranked_by_what_it_names(cap, pictures):
    gen = cap.generate(pictures, strategy="beam", beam_size=3, n_best=3, margin_views=MARGINS)
    for cands in gen.candidates:
        assert 1 <= len(cands) <= 3
        names = [canonical_smiles(c.text) or c.text for c in cands]
        assert len(set(names)) == len(names)  # one candidate per molecule
        valid = [canonical_smiles(c.text) is not None for c in cands]
        assert valid == sorted(valid, reverse=True)  # valid SMILES first (the run re-ranks)
        for group in (True, False):
            scores = [c.view_score for c, v in zip(cands, valid) if v is group]
            assert scores == sorted(scores, reverse=True)
    best = [c[0] for c in gen.candidates]
    by_hand = sum(forced(cap, pictures, m, best) for m in MARGINS)
    # the pooled probability holds the best spelling's product over the margins, at least
    assert (np.array([c.view_score for c in best]) >= by_hand - 1e-4).all()
    own = forced(cap, pictures, cap.crop_margin, best)
    np.testing.assert_allclose(gen.scores, own, rtol=1e-4)  # read as the run reads
    assert gen.attention.shape[0] == len(pictures)
    np.testing.assert_allclose(gen.attention.sum(-1)[gen.token_scores != 0], 1.0, atol=1e-3)
    assert json.loads(json.dumps(gen.records(cap.tokenizer)))[0]["n_best"][0]["view_score"] \
        == pytest.approx(best[0].view_score)


def test_unreadable_files_are_skipped_and_counted(cap, pictures, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a picture")
    gen = cap.generate([pictures[0], bad, pictures[1]], margin_views=MARGINS, on_error="skip")
    assert gen.images == [str(pictures[0]), str(pictures[1])]
    assert [path for path, _err in gen.failures] == [str(bad)]
    assert gen.texts == cap.generate(pictures[:2], margin_views=MARGINS).texts


def test_margins_need_files_and_exclude_views(cap, pictures):
    pixels, _ = cap.load_images(pictures)
    with pytest.raises(ValueError, match="need image paths, not arrays"):
        cap.generate(pixels, margin_views=MARGINS)
    with pytest.raises(ValueError, match="give one of them"):
        cap.generate(pictures, strategy="beam", beam_size=2, margin_views=MARGINS,
                     rescore_views=["identity"])
    with pytest.raises(ValueError, match="distinct margins >= 0"):
        cap.generate(pictures, margin_views=[0.1, -0.1])
    assert cap.generate(pixels, margin_views=()).texts == cap.generate(pictures).texts


def test_the_runs_margins_are_its_default_and_validated(cap, pictures, monkeypatch):
    monkeypatch.setattr(cap.config.decode, "margin_views", list(MARGINS))
    assert cap.margin_views() == MARGINS and cap.margin_views(()) == ()
    assert cap.generate(pictures).texts == cap.generate(pictures, margin_views=MARGINS).texts
    cfg = apply_overrides(Config(), ["decode.margin_views=[0.05, 0.15]"])
    assert cfg.decode.margin_views == [0.05, 0.15]
    for bad, message in (("[0.1, -0.2]", r"decode.margin_views\[1\]: must be a margin >= 0"),
                         ("[0.1, 0.1]", "lists a margin twice")):
        with pytest.raises(ConfigError, match=message):
            apply_overrides(Config(), [f"decode.margin_views={bad}"])
    with pytest.raises(ConfigError, match="set one of them"):
        apply_overrides(Config(), ["decode.margin_views=[0.1]", "decode.rescore_views=[rot90]"])


def test_cli_flag_and_evaluate_record_the_margins(drawn_run, tmp_path):
    parser = build_parser()
    args = parser.parse_args(["caption", "--run", "r", "x.png", "--margin-views", "0.1,0.2"])
    assert args.margin_views == (0.1, 0.2)
    assert parser.parse_args(["evaluate", "--run", "r", "--out", "o", "--margin-views",
                              "none"]).margin_views == ()
    assert parser.parse_args(["caption", "--run", "r", "x.png"]).margin_views is None
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    margins = next(a for a in sub.choices["caption"]._actions if a.dest == "margin_views").type
    for bad in ("0.1,0.1", "-0.1", "a,b", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="distinct numbers >= 0"):
            margins(bad)
    metrics = evaluate(drawn_run, tmp_path / "eval", limit=4, margin_views=MARGINS,
                       log=lambda _m: None)
    assert metrics["decode"]["margin_views"] == list(MARGINS)
    plain = evaluate(drawn_run, tmp_path / "plain", limit=4, log=lambda _m: None)
    assert plain["decode"]["margin_views"] == []


def test_the_server_reads_each_upload_once(drawn_run, monkeypatch):
    with pytest.raises(ValueError, match="the server reads each upload once"):
        RunBackend(drawn_run, margin_views=MARGINS)
    backend = RunBackend(drawn_run)
    monkeypatch.setattr(backend.cap.config.decode, "margin_views", list(MARGINS))
    pixels = np.full((1, backend.image_size, backend.image_size, 3), 255, np.uint8)
    assert backend.caption(pixels)[0]["text"] == backend.cap.generate(
        pixels, margin_views=()).texts[0]
