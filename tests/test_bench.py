"""The benchmark: result keys, the FLOP formula, the tutorial copy's structure, learning."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tensorflow as tf

from captioner.bench import (
    BenchShapes,
    bench_config,
    build_classic,
    build_ours,
    classic_evaluate,
    flop_terms,
    make_bench_optimizer,
    make_classic_train_step,
    ours_train_fn,
    random_batch,
    real_positions,
    redundant_flops,
    run_bench,
    to_host,
    train_step_flops,
)
from captioner.data.tokenizers import Tokenizer
from captioner.model.precision import resolve_precision

TINY = dict(batch_size=4, grid=9, feature_dim=16, embedding_dim=8, units=16, vocab_size=50,
            max_length=6)
SHAPES = BenchShapes(**TINY)
COMMON_KEYS = {
    "impl", "precision", "batch_size", "grid", "feature_dim", "embedding_dim", "units",
    "attention_units", "vocab_size", "max_length", "steps", "train_images_per_s",
    "greedy_images_per_s", "beam3_images_per_s", "compile_s", "train_gflop_per_s",
    "peak_gflop_per_s", "roofline_fraction", "peak_rss_mb", "real_token_fraction",
    "redundant_gflop_per_step",
}
RATES = ("train_images_per_s", "greedy_images_per_s", "compile_s", "train_gflop_per_s",
         "peak_gflop_per_s", "roofline_fraction", "peak_rss_mb")


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    """One tiny run of each implementation (ours also end to end, small_cnn only)."""
    common = dict(**TINY, steps=2, peak_seconds=0.05)
    return {"captioner": run_bench(impl="captioner", end_to_end=True,
                                   e2e_backbones=("small_cnn",), **common),
            "classic": run_bench(impl="classic", classic_decode_images=2, **common)}


def _counting(monkeypatch, layer, method: str = "call") -> list[int]:
    """Count calls of a Keras layer's ``call`` (or another method of any object)."""
    calls = [0]
    original = getattr(layer, method)

    def call(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(layer, method, call)
    return calls


# ---- results -------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["captioner", "classic"])
def test_run_bench_returns_every_key_positive(results, impl):
    r = results[impl]
    assert COMMON_KEYS <= set(r)
    assert r["impl"] == impl and r["precision"] == "float32" and r["steps"] == 2
    assert {k: r[k] for k in TINY} == TINY
    for key in RATES:
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
    if impl == "classic":
        assert r["beam3_images_per_s"] is None  # the tutorial has no beam search
    else:
        assert math.isfinite(r["beam3_images_per_s"]) and r["beam3_images_per_s"] > 0
        assert r["beam3_steps"] == TINY["max_length"]
    assert r["greedy_steps"] == TINY["max_length"]  # <end> never chosen: full length
    assert r["roofline_fraction"] == pytest.approx(r["train_gflop_per_s"]
                                                   / r["peak_gflop_per_s"])
    assert r["train_gflop_per_s"] == pytest.approx(
        r["train_gflop_per_step"] * r["train_images_per_s"] / TINY["batch_size"])
    # FLOPs count only the real target positions of the benchmark batch, for both impls
    n = real_positions(random_batch(SHAPES)[1])
    assert r["real_token_fraction"] == pytest.approx(n / (SHAPES.steps * SHAPES.batch_size))
    assert r["train_gflop_per_step"] == pytest.approx(train_step_flops(SHAPES, positions=n) / 1e9)
    assert r["redundant_gflop_per_step"] == pytest.approx(
        redundant_flops(SHAPES, impl, positions=n) / 1e9)


def test_end_to_end_reports_stages_and_the_slowest(results):
    e2e = results["captioner"]["end_to_end"]
    stages = e2e["stage_images_per_s"]
    assert set(stages) == {"decode", "backbone_small_cnn", "feature_cache", "train_step"}
    assert all(math.isfinite(v) and v > 0 for v in stages.values())
    assert e2e["bound_by"] in stages and stages[e2e["bound_by"]] == min(stages.values())
    assert e2e["bound_by_cached"] in ("feature_cache", "train_step")
    assert e2e["backbone_grids"]["small_cnn"] == [TINY["grid"], TINY["feature_dim"]]
    assert "end_to_end" not in results["classic"]


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="square"):
        BenchShapes(grid=50)
    with pytest.raises(ValueError, match="impl"):
        run_bench(impl="other")


# ---- FLOPs ---------------------------------------------------------------------------------
def test_flop_formula_by_hand():
    s = BenchShapes(batch_size=2, grid=4, feature_dim=3, embedding_dim=5, units=6,
                    attention_units=7, vocab_size=11, max_length=4)  # T = 3
    assert flop_terms(s) == {
        "encoder": 2 * 4 * 3 * 5 * 2,  # 240
        "attention_keys": 2 * 4 * 5 * 7 * 2,  # 560, once per image
        "attention_query": 3 * 2 * 6 * 7 * 2,  # 504
        "attention_scores": 3 * 2 * 4 * 7 * 2,  # 336
        "attention_context": 3 * 2 * 4 * 5 * 2,  # 240
        "gru_input": 3 * 2 * 10 * 18 * 2,  # 2160
        "gru_recurrent": 3 * 2 * 6 * 18 * 2,  # 1296
        "head": 3 * 2 * (36 + 66) * 2,  # 1224
    }
    assert train_step_flops(s) == 3 * 6560
    # attend="after": GRU input is the embedding only, fc1 reads [h; context]
    assert train_step_flops(s, "after") == 3 * (6560 - 1080 - 1224 + 3 * 2 * (66 + 66) * 2)
    assert redundant_flops(s, "captioner") == 0
    assert redundant_flops(s, "classic") == 3 * 2 * 560  # W1 again at T - 1 = 2 steps


def test_flops_count_real_positions_only():
    """N = 4 of the T * B = 6 target positions are real: per-position terms scale with N,
    the per-image ones (encoder, keys) with B; padded work is redundant."""
    s = BenchShapes(batch_size=2, grid=4, feature_dim=3, embedding_dim=5, units=6,
                    attention_units=7, vocab_size=11, max_length=4)  # T = 3
    full, real = flop_terms(s), flop_terms(s, positions=4)
    for k in full:
        per_image = k in ("encoder", "attention_keys")
        assert real[k] == (full[k] if per_image else full[k] * 4 // 6), k
    assert train_step_flops(s, positions=4) == 3 * sum(real.values())
    per_position_at_2 = sum(full.values()) - 240 - 560  # per-position terms over 6 ...
    per_position_at_2 = per_position_at_2 // 3  # ... over the 2 padded positions
    assert redundant_flops(s, "classic", positions=4) == 3 * (2 * 560 + per_position_at_2)
    assert redundant_flops(s, "captioner", positions=4) == 3 * 2 * 5 * 18 * 2  # embedding half
    after = redundant_flops(s, "captioner", positions=4, attend="after")
    assert after == 3 * (2 * 5 * 18 * 2 + 2 * (6 * 7 + 4 * 7 + 4 * 5) * 2)
    tokens = np.array([[1, 5, 6, 2], [1, 2, 0, 0]])
    assert real_positions(tokens) == 4


def test_random_batch_targets():
    grids, tokens = random_batch(SHAPES, seed=1)
    assert grids.shape == (4, 9, 16) and grids.dtype == np.float32
    assert (tokens[:, 0] == Tokenizer.start_id).all()
    for row in tokens:
        end = int(np.flatnonzero(row == Tokenizer.end_id)[0])
        assert end >= TINY["max_length"] / 2
        assert (row[end + 1:] == Tokenizer.pad_id).all() and (row[1:end] > 3).all()
    assert tokens[0, -1] == Tokenizer.end_id  # one full row: T = L - 1 steps, no trimming
    lengths = (tokens[:, 1:] != Tokenizer.pad_id).sum(1)
    assert real_positions(tokens) == lengths.sum() < SHAPES.steps * SHAPES.batch_size


# ---- structure: the tutorial's W1 per step, ours once per batch ------------------------
def test_classic_recomputes_w1_every_step_ours_once(monkeypatch):
    grids, tokens = (tf.constant(x) for x in random_batch(SHAPES))
    steps = SHAPES.steps
    model = build_ours(SHAPES, dropout=0.0)
    att = model.decoder.attention
    w1, w2 = _counting(monkeypatch, att.w1), _counting(monkeypatch, att.w2)
    step = _counting(monkeypatch, model.decoder.recurrence, "step")
    model((grids, tokens[:, :-1]), training=True)  # eager: the loop body runs T times
    # W2 h is fused with the GRU's recurrent matmul, h @ [W2 | U_r], once per step
    assert (w1[0], w2[0], step[0]) == (1, 0, steps)

    encoder, decoder = build_classic(SHAPES)
    cw1, cw2 = (_counting(monkeypatch, decoder.attention.W1),
                _counting(monkeypatch, decoder.attention.W2))
    opt = make_bench_optimizer(bench_config(), encoder.trainable_variables
                               + decoder.trainable_variables)
    make_classic_train_step(encoder, decoder, opt)(grids, tokens)  # traces the Python loop
    assert (cw1[0], cw2[0]) == (steps, steps)


def test_ours_computes_attention_keys_once_per_batch_in_the_compiled_step(monkeypatch):
    model = build_ours(SHAPES, dropout=0.0)
    keys = _counting(monkeypatch, model.decoder.attention.w1)
    train, _ = ours_train_fn(model, bench_config())
    grids, tokens = (tf.constant(x) for x in random_batch(SHAPES))
    train(grids, tokens)
    assert keys[0] == 1


def test_classic_decoding_is_eager_with_one_host_sync_per_step(monkeypatch):
    encoder, decoder = build_classic(SHAPES)
    eager: list[bool] = []
    original = decoder.call

    def call(*args, **kwargs):
        eager.append(tf.executing_eagerly())
        return original(*args, **kwargs)

    monkeypatch.setattr(decoder, "call", call)
    fetches = [0]

    def fetch(*tensors):
        fetches[0] += 1
        return to_host(*tensors)

    grid = random_batch(SHAPES)[0][0]
    out = classic_evaluate(encoder, decoder, grid, 7, end_id=-1, fetch=fetch)
    assert len(out.tokens) == 7 and out.attention.shape == (7, SHAPES.grid)
    assert eager == [True] * 7 and fetches[0] == 7 == out.host_syncs
    assert not hasattr(classic_evaluate, "get_concrete_function")  # not a tf.function
    np.testing.assert_allclose(out.attention.sum(-1), 1.0, rtol=1e-5)


# ---- both learn ----------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["captioner", "classic"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(impl):
    cfg = bench_config(learning_rate=1e-2)
    if impl == "captioner":
        train, _ = ours_train_fn(build_ours(SHAPES, dropout=0.0), cfg)
    else:
        encoder, decoder = build_classic(SHAPES)
        opt = make_bench_optimizer(cfg, encoder.trainable_variables
                                   + decoder.trainable_variables)
        train = make_classic_train_step(encoder, decoder, opt)
    grids, tokens = (tf.constant(x) for x in random_batch(SHAPES))
    first = float(train(grids, tokens))
    for _ in range(15):
        last = float(train(grids, tokens))
    assert last < 0.8 * first


@pytest.mark.parametrize("impl", ["captioner", "classic"])
def test_mixed_float16_step_is_loss_scaled_and_finite(impl):
    cfg = bench_config("mixed_float16")
    if impl == "captioner":
        train, opt = ours_train_fn(build_ours(SHAPES, "mixed_float16"), cfg)
    else:
        encoder, decoder = build_classic(SHAPES, "mixed_float16")
        opt = make_bench_optimizer(cfg, encoder.trainable_variables
                                   + decoder.trainable_variables)
        train = make_classic_train_step(encoder, decoder, opt)
    grids, tokens = (tf.constant(x) for x in random_batch(SHAPES))
    assert type(opt).__name__ == "LossScaleOptimizer"
    assert math.isfinite(float(train(grids, tokens)))


# ---- a config's whole train step (bench --config) -------------------------------------------
def _bench_cli(capsys, *args: str) -> tuple[int, dict | str]:
    from captioner.cli import main

    rc = main(["bench", "--steps", "2", *args])
    out, err = capsys.readouterr()
    return rc, (json.loads(out.strip().splitlines()[-1]) if rc == 0 else err)


def test_config_bench_times_the_configs_step_with_its_overrides(capsys, tiny_smiles_overrides,
                                                                tmp_path):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("smiles\nCCO\nc1ccccc1O\nCC(=O)N\nC1CC1\n")
    sets = [a for o in tiny_smiles_overrides for a in ("--set", o)]
    rc, r = _bench_cli(capsys, "--config", "smiles_qm9", *sets, "--set",
                       f"data.path={csv_path}", "--set", "train.batch_size=4")
    assert rc == 0, r
    assert (r["config"], r["image_size"], r["batch_size"], r["grid"]) == ("smiles_qm9", 32, 4, 64)
    # the recipe's train.precision is "auto": what this machine computes natively
    assert r["precision"] == resolve_precision("auto") and r["vocab_size"] == 40
    assert r["steps"] == 2
    assert r["train_step_ms"] > 0 and r["drawn_pictures_per_s"] > 0
    assert math.isclose(r["train_images_per_s"], 4 / (r["train_step_ms"] / 1e3))
    slower = min(("train_step", r["train_images_per_s"]), ("drawing", r["drawn_pictures_per_s"]),
                 key=lambda kv: kv[1])[0]
    assert r["bound_by"] == slower
    assert math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])


def test_config_bench_without_drawing_and_with_a_missing_smiles_file(capsys, tiny_overrides,
                                                                     tiny_smiles_overrides,
                                                                     tmp_path):
    sets = [a for o in tiny_overrides for a in ("--set", o)]
    rc, r = _bench_cli(capsys, "--config", "shapes", *sets, "--vocab-size", "12")
    assert rc == 0, r
    assert r["drawn_pictures_per_s"] is None and r["bound_by"] == "train_step"
    assert (r["grid"], r["batch_size"], r["vocab_size"]) == (64, 16, 12)
    missing = tmp_path / "absent.csv"
    sets = [a for o in tiny_smiles_overrides for a in ("--set", o)]
    rc, err = _bench_cli(capsys, "--config", "smiles_qm9", *sets, "--set", f"data.path={missing}")
    assert rc == 2 and str(missing) in err
    empty = tmp_path / "empty.csv"
    empty.write_text("smiles\n\n")
    rc, err = _bench_cli(capsys, "--config", "smiles_qm9", *sets, "--set", f"data.path={empty}")
    assert rc == 2 and f"{empty}: no SMILES to draw" in err
