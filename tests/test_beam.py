"""Beam search and sampling with fake step functions whose outputs are known exactly."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from captioner.generate.decoding import (
    beam_search,
    greedy_search,
    sample_search,
    tile_for_beams,
    untile_beams,
)

PAD, START, END, A, B, C, D = range(7)
VOCAB = 7
MAX_LEN = 8
CODE_MOD = 2**20  # prefix codes stay exact in float32


# ---- fake models -------------------------------------------------------------------


def trace(count: tf.Tensor, tokens: tf.Tensor, code: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Attention that says who emitted it: rows [step + 1, row, token fed, prefix code].

    ``code`` (carried in the state) encodes every token fed along the beam, start included,
    so an attention row names the exact history it came from. Returns (attention (N, 4),
    updated code (N,)).
    """
    code = (code * VOCAB + tokens) % CODE_MOD
    rows = tf.range(tf.shape(tokens)[0])
    return tf.cast(tf.stack([count + 1, rows, tokens, code], -1), tf.float32), code


def prefix_code(fed: list[int]) -> int:
    code = 0
    for tok in fed:
        code = (code * VOCAB + tok) % CODE_MOD
    return code


def check_history(attention: np.ndarray, start: int, seq: list[int]) -> list[int]:
    """Assert ``attention`` (T, 4) is the trace of ``seq``'s own history; return its rows."""
    fed = [start, *seq[:-1]]
    for s, tok in enumerate(fed):
        assert attention[s, [0, 2, 3]].tolist() == [s + 1, tok, prefix_code(fed[:s + 1])]
    assert np.all(attention[len(seq):] == 0)
    return attention[:len(seq), 1].astype(int).tolist()


def lattice(rows: dict[int, dict[int, float]]) -> np.ndarray:
    """(V, V) float32 log-prob table by previous token; unlisted mass is spread evenly."""
    probs = np.full((VOCAB, VOCAB), 1.0 / VOCAB)
    for prev, given in rows.items():
        rest = (1.0 - sum(given.values())) / (VOCAB - len(given))
        probs[prev] = [given.get(tok, rest) for tok in range(VOCAB)]
    return np.log(probs).astype(np.float32)


def table_step(table: np.ndarray):
    """Next-token log-probs from the previous token only; state (step count, prefix code)."""
    table_t = tf.constant(table)

    def step(tokens, state):
        count, code = state
        attention, code = trace(count, tokens, code)
        return tf.gather(table_t, tokens), (count + 1, code), attention

    return step


def path_log_prob(table: np.ndarray, tokens: list[int], start: int = START) -> np.float32:
    """Sum of table log-probs along a path, in the float32 order beam search adds them."""
    total, prev = np.float32(0.0), start
    for tok in tokens:
        total, prev = np.float32(total + table[prev, tok]), tok
    return total


class ToyModel:
    """A small random model whose log-probs depend on the whole prefix through its state.

    State is the nest (step count, running token sum mod 3, prefix code), each (N,);
    log-probs are ``log_softmax(W[prev] + U[sum])``, so a beam fed the wrong state scores
    differently; attention is the ``trace``.
    """

    def __init__(self, seed: int, end_bias: float = 0.0, scale: float = 1.0):
        rng = np.random.default_rng(seed)
        self.w = rng.normal(0, scale, (VOCAB, VOCAB)).astype(np.float32)
        self.w[:, END] += end_bias
        self.u = rng.normal(0, scale, (3, VOCAB)).astype(np.float32)

    def step(self, tokens, state):
        count, total, code = state
        total = (total + tokens) % 3
        logits = tf.gather(self.w, tokens) + tf.gather(self.u, total)  # (N, V)
        attention, code = trace(count, tokens, code)
        return tf.nn.log_softmax(logits), (count + 1, total, code), attention

    def log_probs(self, start: int, prefix: list[int]) -> np.ndarray:
        """float64 next-token log-probs after ``prefix`` (replay, no TensorFlow)."""
        prev, total = ([start] + prefix)[-1], (start + sum(prefix)) % 3
        logits = self.w[prev].astype(np.float64) + self.u[total]
        return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()

    def initial_state(self, rows: int):
        return tuple(tf.zeros((rows,), tf.int32) for _ in range(3))


# ---- runners -----------------------------------------------------------------------


def numpy_out(out: dict) -> dict:
    return {key: value.numpy() for key, value in out.items()}


def run_beam(step, starts, beam_size, max_length=MAX_LEN, compiled=False, state=None, **kw):
    """Beam search over len(starts) images; ``state`` is the per-image state (B rows)."""
    starts = tf.constant(starts, tf.int32)
    state = (tf.zeros_like(starts),) * 2 if state is None else state  # table_step's

    def go(start_ids):
        return beam_search(step, tile_for_beams(state, beam_size),
                           tile_for_beams(start_ids, beam_size), END, PAD, max_length,
                           beam_size, **kw)

    if compiled:
        go = tf.function(go, input_signature=[tf.TensorSpec((None,), tf.int32)])
    return numpy_out(go(starts))


def run_greedy(step, starts, state=None, max_length=MAX_LEN, compiled=False):
    starts = tf.constant(starts, tf.int32)
    state = (tf.zeros_like(starts),) * 2 if state is None else state  # table_step's

    def go():
        return greedy_search(step, state, starts, END, PAD, max_length)

    return numpy_out(tf.function(go)() if compiled else go())


def run_sample(step, starts, seed=(1, 2), state=None, max_length=MAX_LEN, compiled=False,
               **kw):
    starts = tf.constant(starts, tf.int32)
    state = (tf.zeros_like(starts),) * 2 if state is None else state  # table_step's

    def go():
        return sample_search(step, state, starts, END, PAD, max_length,
                             tf.constant(seed, tf.int32), **kw)

    return numpy_out(tf.function(go)() if compiled else go())


def trimmed(tokens: np.ndarray, length: int) -> list[int]:
    return tokens[:length].tolist()


# ---- beam search: the search itself ------------------------------------------------

# Greedy takes A (0.6) then <end> (0.38); beam 2 finds B (0.38) C (0.9) <end> (0.97).
GREEDY_TRAP = lattice({START: {A: 0.6, B: 0.38}, A: {C: 0.3, D: 0.3, END: 0.38},
                       B: {C: 0.9}, C: {END: 0.97}})


def test_beam_finds_the_sequence_greedy_misses_with_its_exact_score():
    step = table_step(GREEDY_TRAP)
    greedy = run_greedy(step, [START])
    out = run_beam(step, [START], beam_size=2, n_best=2, max_length=10)
    assert trimmed(greedy["tokens"][0], greedy["lengths"][0]) == [A, END]
    assert out["tokens"][0].tolist() == [[B, C, END], [A, END, PAD]]
    assert out["lengths"].tolist() == [[3, 2]]
    assert out["scores"][0, 0] == path_log_prob(GREEDY_TRAP, [B, C, END])
    assert out["scores"][0, 1] == greedy["scores"][0] == path_log_prob(GREEDY_TRAP, [A, END])
    np.testing.assert_array_equal(out["log_probs"], out["scores"])  # alpha = 0: raw sums
    assert out["finished"].tolist() == [[True, True]]
    assert out["tokens"].shape[-1] == 3  # stopped early: nothing alive can beat the pool


def test_attention_follows_each_beams_own_history():
    out = run_beam(table_step(GREEDY_TRAP), [START], beam_size=2, n_best=2, max_length=10)
    att = out["attention"][0]  # (n_best, T, 4)
    # B C <end>: B lived in row 1 at step 1, then B C moved to row 0 at step 2.
    assert check_history(att[0], START, [B, C, END]) == [0, 1, 0]
    assert check_history(att[1], START, [A, END]) == [0, 0]


def test_attention_history_is_gathered_when_beams_cross():
    """B D overtakes A C at step 1 (rows swap), then A C <end> wins from row 1 at step 2."""
    table = lattice({START: {A: 0.5, B: 0.4}, A: {C: 0.5}, B: {D: 0.9}, C: {END: 0.9},
                     D: {END: 0.5, C: 0.4}})
    out = run_beam(table_step(table), [START], beam_size=2, n_best=2)
    assert out["tokens"][0].tolist() == [[A, C, END], [B, D, END]]
    att = out["attention"][0]
    assert check_history(att[0], START, [A, C, END]) == [0, 0, 1]
    assert check_history(att[1], START, [B, D, END]) == [0, 1, 0]


def test_state_is_gathered_with_the_beams():
    """State = number of A's fed along the beam; after C it decides between <end> and D."""
    no_a = lattice({START: {A: 0.55, B: 0.43}, A: {C: 0.5, D: 0.45}, B: {C: 0.9},
                    C: {D: 0.9}, D: {END: 0.9}})
    seen_a = lattice({A: {C: 0.5, D: 0.45}, C: {END: 0.9}, D: {END: 0.9}})
    tables = tf.constant(np.stack([no_a, seen_a]))  # (2, V, V)

    def step(tokens, count_a):
        count_a += tf.cast(tokens == A, tf.int32)
        log_probs = tf.gather_nd(tables, tf.stack([tf.minimum(count_a, 1), tokens], -1))
        return log_probs, count_a, tf.ones((tf.shape(tokens)[0], 1))

    out = run_beam(step, [START], beam_size=2, n_best=2, state=tf.zeros((1,), tf.int32))
    # After step 1 the beams swap rows (B C is best); with a stale state B C would see the
    # A count of row 0 and end at once (B C <end>, impossible under the model).
    assert out["tokens"][0].tolist() == [[B, C, D, END], [A, C, END, PAD]]
    expected = [path_log_prob(no_a, [B, C, D, END]),
                np.float32(path_log_prob(no_a, [A, C]) + seen_a[C, END])]
    assert out["scores"][0].tolist() == expected


def test_early_finished_hypothesis_is_kept_to_the_end():
    """<end> at step 0 is best; A A A ... stays alive (pool not full) and never ends."""
    table = lattice({START: {END: 0.5, A: 0.45}, A: {A: 0.9}})
    out = run_beam(table_step(table), [START], beam_size=2, n_best=2, max_length=5)
    assert out["tokens"].shape[-1] == 5  # ran to max_length: the pool never filled
    assert out["tokens"][0].tolist() == [[END, PAD, PAD, PAD, PAD], [A, A, A, A, A]]
    assert out["finished"].tolist() == [[True, False]]  # unfinished beam fills n_best
    assert out["lengths"].tolist() == [[1, 5]]
    assert out["scores"][0].tolist() == [table[START, END], path_log_prob(table, [A] * 5)]


@pytest.mark.parametrize(("alpha", "best_first"), [(0.0, "short"), (1.0, "long")])
def test_length_penalty_favours_longer_hypotheses(alpha, best_first):
    table = lattice({START: {END: 0.52, A: 0.46}, A: {B: 0.95}, B: {C: 0.95}, C: {D: 0.95},
                     D: {END: 0.95}})
    out = run_beam(table_step(table), [START], beam_size=2, n_best=2, length_penalty=alpha)
    short, long = [END, PAD, PAD, PAD, PAD], [A, B, C, D, END]
    expected = [short, long] if best_first == "short" else [long, short]
    assert out["tokens"][0].tolist() == expected
    raw = {1: table[START, END], 5: path_log_prob(table, [A, B, C, D, END])}
    lengths = out["lengths"][0].tolist()
    assert out["log_probs"][0].tolist() == [raw[n] for n in lengths]
    penalty = ((5 + np.array(lengths)) / 6) ** alpha
    np.testing.assert_allclose(out["scores"][0], out["log_probs"][0] / penalty, rtol=1e-6)
    assert out["scores"][0, 0] > out["scores"][0, 1]


def test_length_penalty_bound_is_taken_at_max_length():
    """The pool fills at step 1, but A A A ... (p = 0.99 each) still wins once normalised.

    Its raw sum is already below the worst pooled score; only the bound raw / lp(max_length)
    shows it can still win, so the search must go on to max_length.
    """
    table = lattice({START: {END: 0.45, B: 0.3, A: 0.2}, B: {END: 0.9}, A: {A: 0.99}})
    out = run_beam(table_step(table), [START], beam_size=2, n_best=2, length_penalty=1.0)
    assert out["tokens"].shape[-1] == MAX_LEN
    assert out["tokens"][0].tolist() == [[A] * MAX_LEN, [END] + [PAD] * (MAX_LEN - 1)]
    assert out["finished"].tolist() == [[False, True]]
    long = path_log_prob(table, [A] * MAX_LEN)
    np.testing.assert_allclose(out["scores"][0], [long / ((5 + MAX_LEN) / 6), table[START, END]],
                               rtol=1e-6)
    assert long < path_log_prob(table, [B, END]) / (7 / 6)  # raw alone says "stop"


def reference_beam(model: ToyModel, start: int, k: int, max_length: int, alpha: float,
                   n_best: int) -> list[tuple[list[int], float]]:
    """Plain-Python beam search over explicit hypotheses, no early stop (same semantics)."""
    alive, finished = [([], 0.0)], []
    for _ in range(max_length):
        cands = sorted(((raw + lp, seq + [tok]) for seq, raw in alive
                        for tok, lp in enumerate(model.log_probs(start, seq))),
                       key=lambda c: -c[0])[:2 * k]
        finished += [(seq, raw) for raw, seq in cands[:k] if seq[-1] == END]
        alive = [(seq, raw) for raw, seq in cands if seq[-1] != END][:k]
    ranked = sorted(finished + alive, key=lambda h: -h[1] / ((5 + len(h[0])) / 6) ** alpha)
    return ranked[:n_best]


@pytest.mark.parametrize(("k", "alpha"), [(2, 0.0), (3, 0.0), (3, 0.8)])
def test_matches_a_plain_python_reference(k, alpha):
    model, starts = ToyModel(seed=7), [START, A, C]
    out = run_beam(model.step, starts, beam_size=k, n_best=k, max_length=6,
                   state=model.initial_state(len(starts)), length_penalty=alpha)
    for b, start in enumerate(starts):
        ref = reference_beam(model, start, k, 6, alpha, k)
        got = [trimmed(out["tokens"][b, i], out["lengths"][b, i]) for i in range(k)]
        assert got == [seq for seq, _ in ref]
        for i, seq in enumerate(got):
            assert all(row // k == b for row in check_history(out["attention"][b, i], start, seq))
        np.testing.assert_allclose(out["log_probs"][b], [raw for _, raw in ref], rtol=1e-5,
                                   atol=1e-6)


def test_n_best_are_sorted_distinct_and_well_formed():
    model, starts, k = ToyModel(seed=7, end_bias=0.5), [START, B, D], 4
    out = run_beam(model.step, starts, beam_size=k, n_best=k, length_penalty=0.6,
                   state=model.initial_state(3))
    steps = out["tokens"].shape[-1]
    for b, start in enumerate(starts):
        assert np.all(np.diff(out["scores"][b]) <= 0)
        seqs = [tuple(trimmed(out["tokens"][b, i], out["lengths"][b, i])) for i in range(k)]
        assert len(set(seqs)) == k
        for i, seq in enumerate(seqs):
            n = len(seq)
            assert (seq[-1] == END) == out["finished"][b, i] and END not in seq[:-1]
            assert np.all(out["tokens"][b, i, n:] == PAD)
            rows = check_history(out["attention"][b, i], start, list(seq))
            assert all(row // k == b for row in rows)  # never left its image's rows
            replay = sum(model.log_probs(start, list(seq[:j]))[seq[j]] for j in range(n))
            np.testing.assert_allclose(out["log_probs"][b, i], replay, rtol=1e-5)
            penalty = ((5 + n) / 6) ** 0.6
            np.testing.assert_allclose(out["scores"][b, i], replay / penalty, rtol=1e-5)
        assert steps <= MAX_LEN


# ---- beam search: K = 1 is greedy, eager == compiled -------------------------------


def scripted_step(script: np.ndarray):
    """Row b emits script[b, t] at step t with probability 0.5 (the greedy tests' fake)."""
    script_t = tf.constant(script, tf.int32)

    def step(tokens, state):
        t, code = state
        ids = tf.gather(script_t, t, axis=1, batch_dims=1)  # (B,)
        probs = 0.5 * tf.one_hot(ids, VOCAB) + 0.5 / (VOCAB - 1) * (1 - tf.one_hot(ids, VOCAB))
        attention, code = trace(t, tokens, code)
        return tf.math.log(probs), (t + 1, code), attention

    return step


SCRIPT = np.array([[A, B, END, C, C, C, C, C], [A, END, D, D, D, D, D, D],
                   [B, B, B, B, B, B, B, B]])


def assert_beam_is_greedy(beam: dict, greedy: dict) -> None:
    np.testing.assert_array_equal(beam["tokens"][:, 0], greedy["tokens"])
    np.testing.assert_array_equal(beam["lengths"][:, 0], greedy["lengths"])
    np.testing.assert_array_equal(beam["scores"][:, 0], greedy["scores"])
    np.testing.assert_array_equal(beam["log_probs"][:, 0], greedy["scores"])
    np.testing.assert_array_equal(beam["attention"][:, 0], greedy["attention"])


@pytest.mark.parametrize("compiled", [False, True])
def test_beam_of_one_is_greedy_on_a_scripted_step(compiled):
    step, starts = scripted_step(SCRIPT), [START] * 3
    greedy = run_greedy(step, starts, max_length=6)
    assert greedy["lengths"].tolist() == [3, 2, 6]  # ends at different steps, one never
    assert_beam_is_greedy(run_beam(step, starts, 1, max_length=6, compiled=compiled), greedy)


@pytest.mark.parametrize("compiled", [False, True])
def test_beam_of_one_is_greedy_on_a_random_toy_model(compiled):
    model, starts = ToyModel(seed=7), [START, A, B, C, D]
    state = model.initial_state(len(starts))
    greedy = run_greedy(model.step, starts, state=state)
    assert len(set(greedy["lengths"].tolist())) > 2  # rows end at different steps
    beam = run_beam(model.step, starts, 1, state=state, compiled=compiled)
    assert_beam_is_greedy(beam, greedy)


def test_eager_and_compiled_beam_search_agree():
    model, starts = ToyModel(seed=11), [START, A, D]
    kw = {"beam_size": 3, "n_best": 2, "length_penalty": 0.7,
          "state": model.initial_state(3)}
    eager = run_beam(model.step, starts, **kw)
    compiled = run_beam(model.step, starts, compiled=True, **kw)
    for key in eager:  # graph rewrites may round the length penalty differently
        np.testing.assert_allclose(eager[key], compiled[key], rtol=1e-6)


def test_argument_checks():
    step = table_step(GREEDY_TRAP)
    with pytest.raises(ValueError, match="n_best"):
        run_beam(step, [START], beam_size=2, n_best=3)
    with pytest.raises(ValueError, match="length_penalty"):
        run_beam(step, [START], beam_size=2, length_penalty=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        run_sample(step, [START], temperature=0.0)


def test_tile_and_untile_beams():
    nest = {"h": tf.constant([[1.0, 2.0], [3.0, 4.0]]), "n": tf.constant([5, 6])}
    tiled = tile_for_beams(nest, 3)
    assert tiled["h"].numpy()[:, 0].tolist() == [1, 1, 1, 3, 3, 3]
    assert tiled["n"].numpy().tolist() == [5, 5, 5, 6, 6, 6]
    back = untile_beams(tiled, 3)
    assert back["h"].shape == (2, 3, 2)
    np.testing.assert_array_equal(back["h"].numpy()[:, 2], nest["h"].numpy())


# ---- sampling ----------------------------------------------------------------------


def uniform_step(vocab: int = 50):
    """High entropy: every token but <end> equally likely; <end> never sampled."""
    log_probs = np.where(np.arange(vocab) == END, -np.inf, -np.log(vocab - 1.0))

    def step(tokens, state):
        n = tf.shape(tokens)[0]
        return tf.tile(tf.constant(log_probs, tf.float32)[None], [n, 1]), state, tf.ones((n, 1))

    return step


def test_sampling_is_deterministic_for_a_seed_and_varies_with_it():
    step, starts = uniform_step(), [START] * 4
    first, again = run_sample(step, starts, seed=(3, 4)), run_sample(step, starts, seed=(3, 4))
    compiled = run_sample(step, starts, seed=(3, 4), compiled=True)
    other = run_sample(step, starts, seed=(5, 6))
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
        np.testing.assert_array_equal(first[key], compiled[key])
    assert first["tokens"].shape == (4, MAX_LEN)
    assert not np.array_equal(first["tokens"], other["tokens"])
    assert len({tuple(row) for row in first["tokens"].tolist()}) == 4  # rows differ too
    assert all(len(set(row)) > 1 for row in first["tokens"].tolist())  # and so do steps


def test_top_k_of_one_is_greedy():
    model, starts = ToyModel(seed=5, end_bias=0.3), [START, A, B, C]
    state = model.initial_state(4)
    greedy = run_greedy(model.step, starts, state=state)
    sampled = run_sample(model.step, starts, state=state, top_k=1, temperature=3.0)
    for key in greedy:
        np.testing.assert_array_equal(sampled[key], greedy[key])


def test_tiny_temperature_is_greedy():
    model, starts = ToyModel(seed=5, end_bias=0.3), [START, A, B, C]
    state = model.initial_state(4)
    greedy = run_greedy(model.step, starts, state=state)
    sampled = run_sample(model.step, starts, state=state, temperature=1e-4)
    np.testing.assert_array_equal(sampled["tokens"], greedy["tokens"])
    np.testing.assert_allclose(sampled["scores"], greedy["scores"], rtol=1e-6)


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.7, 2)])
def test_samples_respect_end_pad_top_k_and_score_rules(temperature, top_k):
    model, starts = ToyModel(seed=9, end_bias=0.5, scale=1.0), [START, A, B, C, D, START]
    out = run_sample(model.step, starts, state=model.initial_state(6), seed=(7, 8),
                     temperature=temperature, top_k=top_k)
    steps = out["tokens"].shape[1]
    assert 0 < out["lengths"].min() < steps == out["lengths"].max()  # some end, some don't
    for b, start in enumerate(starts):
        n, row = out["lengths"][b], out["tokens"][b].tolist()
        assert END not in row[:n - 1] and (row[n - 1] == END or n == steps)
        assert all(tok == PAD for tok in row[n:])
        assert check_history(out["attention"][b], start, row[:n]) == [b] * n
        log_probs = [model.log_probs(start, row[:j]) for j in range(n)]
        if top_k:
            assert all(row[j] in np.argsort(-lp)[:top_k] for j, lp in enumerate(log_probs))
        score = sum(lp[row[j]] for j, lp in enumerate(log_probs))  # before temperature
        np.testing.assert_allclose(out["scores"][b], score, rtol=1e-5)


# ---- per-token scores -----------------------------------------------------------------


def test_token_scores_are_each_tokens_log_prob_along_its_own_beam():
    table = GREEDY_TRAP
    out = run_beam(table_step(table), [START], beam_size=2, n_best=2, max_length=10)
    for i, seq in enumerate([[B, C, END], [A, END]]):
        fed = [START, *seq[:-1]]
        expect = [table[p, t] for p, t in zip(fed, seq)]
        np.testing.assert_allclose(out["token_scores"][0, i, :len(seq)], expect, rtol=1e-6)
        assert np.all(out["token_scores"][0, i, len(seq):] == 0)
    greedy = run_greedy(table_step(table), [START])
    np.testing.assert_allclose(greedy["token_scores"][0, :2], [table[START, A], table[A, END]],
                               rtol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
def test_token_scores_sum_to_the_raw_score_when_beams_cross(compiled):
    model, starts, k = ToyModel(seed=3, end_bias=0.3), [START, B, D], 3
    out = run_beam(model.step, starts, beam_size=k, n_best=k, length_penalty=0.6,
                   state=model.initial_state(3), compiled=compiled)
    for b, start in enumerate(starts):
        for i in range(k):
            n = out["lengths"][b, i]
            seq = trimmed(out["tokens"][b, i], n)
            replay = [model.log_probs(start, seq[:s])[tok] for s, tok in enumerate(seq)]
            np.testing.assert_allclose(out["token_scores"][b, i, :n], replay, rtol=1e-4,
                                       atol=1e-5)
            np.testing.assert_allclose(out["token_scores"][b, i].sum(), out["log_probs"][b, i],
                                       rtol=1e-5, atol=1e-5)
