"""Decoding strategies. They take a step function and never see the model.

A step function maps ``(tokens (N,), state) -> (log_probs (N, V), state, attention (N, G))``
where ``state`` is any nest of tensors with leading dimension N. Everything here is
plain TensorFlow control flow, so it runs eagerly and compiles inside ``tf.function``.

``greedy_search`` and ``sample_search`` run one row per image (N = B). ``beam_search`` runs
K rows per image (N = B*K): the caller tiles per-image constants with ``tile_for_beams``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import tensorflow as tf

StepFn = Callable[[tf.Tensor, Any], tuple[tf.Tensor, Any, tf.Tensor]]
ChooseFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


# ---- one row per image: greedy and sampling ----------------------------------------


def _sequential_search(step_fn: StepFn, initial_state: Any, start_ids: tf.Tensor, end_id: int,
                       pad_id: int, max_length: int | tf.Tensor,
                       choose: ChooseFn) -> dict[str, tf.Tensor]:
    """Shared loop of greedy and sampling; ``choose(t, log_probs (B, V)) -> ids (B,)``."""
    start_ids = tf.cast(start_ids, "int32")
    batch = tf.shape(start_ids)[0]
    max_length = tf.cast(max_length, "int32")
    tokens_ta = tf.TensorArray("int32", size=0, dynamic_size=True)
    lp_ta = tf.TensorArray("float32", size=0, dynamic_size=True)
    attn_ta = tf.TensorArray("float32", size=0, dynamic_size=True)

    def cond(t, _prev, _state, finished, *_):
        return tf.logical_and(t < max_length, tf.logical_not(tf.reduce_all(finished)))

    def body(t, prev, state, finished, scores, lengths, tokens_ta, lp_ta, attn_ta):
        log_probs, state, attn = step_fn(prev, state)  # (B, V), nest, (B, G)
        best = tf.cast(choose(t, log_probs), "int32")  # (B,)
        best_lp = tf.gather(log_probs, best, axis=1, batch_dims=1)  # (B,)
        live = tf.logical_not(finished)
        token = tf.where(live, best, pad_id)
        token_lp = tf.where(live, tf.cast(best_lp, "float32"), 0.0)  # (B,)
        scores += token_lp
        lengths += tf.cast(live, "int32")
        attn = tf.where(live[:, None], tf.cast(attn, "float32"), 0.0)
        finished = tf.logical_or(finished, tf.equal(token, end_id))
        return (t + 1, token, state, finished, scores, lengths,
                tokens_ta.write(t, token), lp_ta.write(t, token_lp), attn_ta.write(t, attn))

    init = (tf.constant(0), start_ids, initial_state, tf.zeros((batch,), "bool"),
            tf.zeros((batch,), "float32"), tf.zeros((batch,), "int32"), tokens_ta, lp_ta,
            attn_ta)
    _, _, _, _, scores, lengths, tokens_ta, lp_ta, attn_ta = tf.while_loop(cond, body, init)
    return {
        "tokens": tf.transpose(tokens_ta.stack(), [1, 0]),  # (B, T)
        "lengths": lengths,  # (B,)
        "scores": scores,  # (B,)
        "token_scores": tf.transpose(lp_ta.stack(), [1, 0]),  # (B, T), 0 past the end
        "attention": tf.transpose(attn_ta.stack(), [1, 0, 2]),  # (B, T, G)
    }


def greedy_search(step_fn: StepFn, initial_state: Any, start_ids: tf.Tensor, end_id: int,
                  pad_id: int, max_length: int | tf.Tensor) -> dict[str, tf.Tensor]:
    """Batched greedy decoding; each row stops at its own ``end_id``.

    Returns ``tokens`` (B, T) int32 (generated ids, ``end_id`` included, ``pad_id`` after),
    ``lengths`` (B,) (tokens up to and including ``end_id``), ``scores`` (B,) (sum of the
    chosen tokens' log-probs), ``token_scores`` (B, T) (each chosen token's log-prob, 0
    after the end) and ``attention`` (B, T, G) (zeros after the end). T is the
    number of steps actually run: at most ``max_length``, fewer when every row ended.

    Example:
        >>> def step(tokens, state):  # always predicts token 2 (= end) with log-prob 0
        ...     n = tf.shape(tokens)[0]
        ...     return tf.math.log(tf.one_hot(tf.fill([n], 2), 4)), state, tf.ones((n, 3)) / 3
        >>> out = greedy_search(step, tf.zeros((2, 1)), tf.ones((2,), "int32"), 2, 0, 5)
        >>> out["tokens"].numpy().tolist(), out["lengths"].numpy().tolist()
        ([[2], [2]], [1, 1])
    """

    def argmax(_t: tf.Tensor, log_probs: tf.Tensor) -> tf.Tensor:
        return tf.argmax(log_probs, axis=-1, output_type="int32")  # (B,)

    return _sequential_search(step_fn, initial_state, start_ids, end_id, pad_id, max_length,
                              argmax)


def _top_k_filter(logits: tf.Tensor, top_k: int) -> tf.Tensor:
    """Keep exactly the ``top_k`` largest logits of each row (ties: lowest id), -inf the rest."""
    _, ids = tf.math.top_k(logits, k=top_k)  # (B, k)
    vocab = tf.shape(logits)[-1]
    keep = tf.reduce_any(tf.equal(ids[:, :, None], tf.range(vocab)), axis=1)  # (B, V)
    return tf.where(keep, logits, float("-inf"))


def sample_search(step_fn: StepFn, initial_state: Any, start_ids: tf.Tensor, end_id: int,
                  pad_id: int, max_length: int | tf.Tensor, seed: tf.Tensor,
                  temperature: float = 1.0, top_k: int = 0) -> dict[str, tf.Tensor]:
    """Batched ancestral sampling; same rows, stopping rule and outputs as ``greedy_search``.

    Each step draws ``tf.random.stateless_categorical(log_probs / temperature)``, optionally
    restricted to the ``top_k`` most likely tokens (0 = no filter; 1 = greedy). ``seed`` is a
    (2,) int32/int64 tensor; step t uses ``stateless_fold_in(seed, t)``, so the result is a
    pure function of the seed (eager and ``tf.function`` agree). ``scores`` sum the chosen
    tokens' log-probs under the model, i.e. before temperature and filtering.

    Example:
        >>> def step(tokens, state):  # <end> (= 2) has all the mass after token 3
        ...     after_3 = tf.math.log(tf.one_hot([2, 2], 4))
        ...     lp = tf.where(tokens[:, None] == 3, after_3, tf.math.log([[.1, .1, .1, .7]] * 2))
        ...     return lp, state, tf.ones((2, 1))
        >>> out = sample_search(step, tf.zeros((2,)), tf.ones((2,), "int32"), 2, 0, 6,
        ...                     seed=tf.constant([1, 2]), top_k=1)
        >>> out["tokens"].numpy().tolist()
        [[3, 2], [3, 2]]
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    seed = tf.convert_to_tensor(seed)

    def draw(t: tf.Tensor, log_probs: tf.Tensor) -> tf.Tensor:
        logits = tf.cast(log_probs, "float32") / temperature  # (B, V)
        if top_k > 0:
            logits = _top_k_filter(logits, top_k)
        step_seed = tf.random.experimental.stateless_fold_in(seed, t)  # (2,)
        ids = tf.random.stateless_categorical(logits, 1, seed=step_seed, dtype="int32")
        return ids[:, 0]  # (B,)

    return _sequential_search(step_fn, initial_state, start_ids, end_id, pad_id, max_length,
                              draw)


# ---- beam search: K rows per image -------------------------------------------------


def tile_for_beams(nest: Any, beam_size: int) -> Any:
    """Repeat every row of every tensor ``beam_size`` times: row b -> rows b*K .. b*K+K-1.

    Example:
        >>> tile_for_beams(tf.constant([[1], [2]]), 3).numpy()[:, 0].tolist()
        [1, 1, 1, 2, 2, 2]
    """
    return tf.nest.map_structure(lambda x: tf.repeat(x, beam_size, axis=0), nest)


def untile_beams(nest: Any, beam_size: int) -> Any:
    """Reshape every tensor (B*K, ...) -> (B, K, ...), undoing ``tile_for_beams``'s layout.

    Example:
        >>> untile_beams(tf.range(6), 3).numpy().tolist()
        [[0, 1, 2], [3, 4, 5]]
    """

    def split(x: tf.Tensor) -> tf.Tensor:
        x = tf.convert_to_tensor(x)
        shape = tf.shape(x)
        return tf.reshape(x, tf.concat([[shape[0] // beam_size, beam_size], shape[1:]], 0))

    return tf.nest.map_structure(split, nest)


class _Hyps(NamedTuple):
    """M hypotheses per image; every field has leading dims (B, M)."""

    score: tf.Tensor  # (B, M) float32 ranking key, -inf for empty slots
    raw: tf.Tensor  # (B, M) float32 sum of token log-probs
    length: tf.Tensor  # (B, M) int32 generated tokens (``<end>`` included)
    seq: tf.Tensor  # (B, M, L) int32, pad_id past the length
    token_lp: tf.Tensor  # (B, M, L) float32 each token's log-prob, 0 past the length
    attn: tf.Tensor  # (B, M, L, G) float32, zeros past the length
    finished: tf.Tensor  # (B, M) bool: ended with ``<end>``


class _BeamConfig(NamedTuple):
    beam_size: int
    end_id: int
    alpha: float
    max_length: tf.Tensor  # () int32


def _empty_hyps(batch: tf.Tensor, width: int, max_length: tf.Tensor, grid: tf.Tensor,
                pad_id: int, first_raw: float) -> _Hyps:
    """Hypotheses with no tokens; slot 0 has raw score ``first_raw``, the others -inf."""
    raw = tf.tile(tf.concat([[first_raw], tf.fill([width - 1], float("-inf"))], 0)[None],
                  [batch, 1])  # (B, M)
    return _Hyps(score=raw, raw=raw, length=tf.zeros([batch, width], "int32"),
                 seq=tf.fill([batch, width, max_length], pad_id),
                 token_lp=tf.zeros([batch, width, max_length], "float32"),
                 attn=tf.zeros([batch, width, max_length, grid], "float32"),
                 finished=tf.zeros([batch, width], "bool"))


def _gather_hyps(hyps: _Hyps, index: tf.Tensor) -> _Hyps:
    """Pick hypotheses per image: ``index`` (B, M') into the M slots."""
    return tf.nest.map_structure(lambda x: tf.gather(x, index, batch_dims=1), hyps)


def _best_hyps(hyps: _Hyps, k: int) -> _Hyps:
    """The k highest-scoring hypotheses per image, best first (ties keep the lower slot)."""
    _, index = tf.math.top_k(hyps.score, k=k)  # (B, k)
    return _gather_hyps(hyps, index)


def _concat_hyps(first: _Hyps, second: _Hyps) -> _Hyps:
    return tf.nest.map_structure(lambda a, b: tf.concat([a, b], axis=1), first, second)


def _length_norm(length: tf.Tensor, alpha: float) -> tf.Tensor:
    """GNMT length penalty ((5 + len) / 6) ** alpha; exactly 1 when alpha == 0."""
    if alpha == 0:
        return tf.ones_like(tf.cast(length, "float32"))
    return ((5.0 + tf.cast(length, "float32")) / 6.0) ** alpha


def _expand(t: tf.Tensor, log_probs: tf.Tensor, attn: tf.Tensor, alive: _Hyps,
            cfg: _BeamConfig) -> tuple[_Hyps, tf.Tensor]:
    """The 2K best one-token continuations of the alive beams, sorted by raw log-prob.

    Returns the candidates (``finished`` marks those ending with ``<end>``) and the alive
    slot each one extends (B, 2K).
    """
    k = cfg.beam_size
    batch = tf.shape(alive.raw)[0]
    vocab = tf.shape(log_probs)[-1]
    log_probs = tf.reshape(tf.cast(log_probs, "float32"), [batch, k, vocab])  # (B, K, V)
    total = alive.raw[:, :, None] + log_probs  # (B, K, V)
    raw, flat = tf.math.top_k(tf.reshape(total, [batch, k * vocab]), k=2 * k)  # (B, 2K)
    parent, token = flat // vocab, flat % vocab  # (B, 2K)
    step_lp = tf.gather(tf.reshape(log_probs, [batch, k * vocab]), flat, batch_dims=1)  # (B, 2K)
    hist = _gather_hyps(alive, parent)
    step_attn = tf.reshape(tf.cast(attn, "float32"), [batch, k, -1])  # (B, K, G)
    step_attn = tf.gather(step_attn, parent, batch_dims=1)  # (B, 2K, G)
    at_t = tf.equal(tf.range(cfg.max_length), t)  # (L,)
    seq = tf.where(at_t, token[:, :, None], hist.seq)  # (B, 2K, L)
    token_lp = tf.where(at_t, step_lp[:, :, None], hist.token_lp)  # (B, 2K, L)
    attn_hist = tf.where(at_t[:, None], step_attn[:, :, None, :], hist.attn)  # (B, 2K, L, G)
    cands = _Hyps(score=raw, raw=raw, length=hist.length + 1, seq=seq, token_lp=token_lp,
                  attn=attn_hist,
                  finished=tf.equal(token, cfg.end_id))
    return cands, parent


def _advance(t: tf.Tensor, log_probs: tf.Tensor, attn: tf.Tensor, state: Any, alive: _Hyps,
             pool: _Hyps, done: tf.Tensor, cfg: _BeamConfig
             ) -> tuple[tf.Tensor, Any, _Hyps, _Hyps, tf.Tensor]:
    """One beam step: update the finished pool, pick the new alive beams, reorder ``state``.

    Like fairseq, a continuation ending in ``<end>`` is finished only when it ranks in the
    top K of its image's K*V continuations (so K=1 is exactly greedy), while the alive set
    takes the K best non-ending ones among the top 2K, so finishing never shrinks the beam.
    """
    k = cfg.beam_size
    cands, parent = _expand(t, log_probs, attn, alive, cfg)  # (B, 2K)
    top = tf.nest.map_structure(lambda x: x[:, :k], cands)  # (B, K)
    ended = tf.logical_and(top.finished, top.raw > float("-inf"))  # (B, K)
    normed = top.raw / _length_norm(top.length, cfg.alpha)  # (B, K)
    top = top._replace(score=tf.where(ended, normed, float("-inf")), finished=ended)
    pool = _best_hyps(_concat_hyps(pool, top), k)  # pooled first: they win ties

    open_raw = tf.where(cands.finished, float("-inf"), cands.raw)  # (B, 2K)
    _, pick = tf.math.top_k(open_raw, k=k)  # (B, K)
    alive = _gather_hyps(cands._replace(score=open_raw, raw=open_raw), pick)
    parent = tf.gather(parent, pick, batch_dims=1)  # (B, K)
    batch = tf.shape(parent)[0]
    rows = tf.reshape(tf.range(batch)[:, None] * k + parent, [-1])  # (B*K,)
    state = tf.nest.map_structure(lambda x: tf.gather(x, rows), state)
    tokens = tf.reshape(tf.gather(alive.seq, t, axis=2), [-1])  # (B*K,)

    best_open = tf.reduce_max(alive.raw, axis=1) / _length_norm(cfg.max_length, cfg.alpha)
    beaten = best_open <= tf.reduce_min(pool.score, axis=1)  # (B,)
    done = tf.logical_or(done, tf.logical_and(tf.reduce_all(pool.finished, axis=1), beaten))
    return tokens, state, alive, pool, done


def _check_beam_args(beam_size: int, n_best: int, length_penalty: float) -> None:
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be in [1, beam_size={beam_size}], got {n_best}")
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")


def beam_search(step_fn: StepFn, initial_state: Any, start_ids: tf.Tensor, end_id: int,
                pad_id: int, max_length: int | tf.Tensor, beam_size: int, n_best: int = 1,
                length_penalty: float = 0.0) -> dict[str, tf.Tensor]:
    """Batched beam search returning the ``n_best`` hypotheses of each image, best first.

    Tiling contract: with B images and K = ``beam_size`` (a Python int), the step function
    always works on B*K rows. The CALLER tiles everything per image: ``initial_state`` has
    leading dim B*K (rows b*K .. b*K+K-1 belong to image b; use ``tile_for_beams``),
    ``start_ids`` is (B*K,), and per-image constants the step function closes over (encoder
    features, attention keys) must be tiled the same way. Only the ``state`` nest is
    reordered (``tf.gather`` on rows) when beams are reordered; closed-over constants never
    move, which is correct because beams never leave their image's block of K rows.

    At step 0 only beam 0 of each image is live. Each step ranks the K*V continuations of an
    image; an ``end_id`` continuation in the top K enters a pool of K finished hypotheses,
    and the K best non-ending continuations stay alive. Finished hypotheses are ranked by
    ``log_prob_sum / ((5 + len) / 6) ** length_penalty`` (len counts ``<end>``; 0 = raw
    sums; larger values favour longer sequences). An image is done once its pool is full and
    no alive beam can beat the worst pooled score (its raw score, the upper bound of any
    extension, normalised at ``max_length``); the loop stops when every image is done or
    after ``max_length`` steps, when the still-unfinished alive beams join the ranking
    (normalised at their length) so every image returns ``n_best`` results. With
    ``beam_size=1`` and ``length_penalty=0`` this is exactly ``greedy_search``.

    Returns ``tokens`` (B, n_best, T) int32 (``end_id`` included, ``pad_id`` after),
    ``lengths`` (B, n_best) int32, ``scores`` (B, n_best) normalised, ``log_probs``
    (B, n_best) raw sums, ``token_scores`` (B, n_best, T) each token's log-prob (they sum
    to ``log_probs``; 0 past the end), ``finished`` (B, n_best) bool (ended with ``end_id``) and
    ``attention`` (B, n_best, T, G) float32: each sequence's own attention history, zeros
    past its end. T is the number of steps run (<= ``max_length``, which must be >= 1).

    Example:
        >>> table = tf.math.log([[.25, .25, .25, .25], [.05, .05, .3, .6],  # 2 = <end>
        ...                      [.25, .25, .25, .25], [.4 / 3, .4 / 3, .6, .4 / 3]])
        >>> def step(tokens, state):  # next-token log-probs depend on the previous token
        ...     return tf.gather(table, tokens), state, tf.ones((tf.shape(tokens)[0], 1))
        >>> k = 2  # one image, tiled to K rows by the caller
        >>> out = beam_search(step, tile_for_beams(tf.zeros((1, 4)), k), tf.fill([k], 1),
        ...                   end_id=2, pad_id=0, max_length=5, beam_size=k, n_best=2)
        >>> out["tokens"].numpy().tolist()
        [[[3, 2], [2, 0]]]
        >>> out["lengths"].numpy().tolist(), out["attention"].shape
        ([[2, 1]], TensorShape([1, 2, 2, 1]))
    """
    _check_beam_args(beam_size, n_best, length_penalty)
    k, alpha = beam_size, float(length_penalty)
    start_ids = tf.cast(start_ids, "int32")  # (B*K,)
    max_length = tf.cast(max_length, "int32")
    tf.debugging.assert_positive(max_length, message="beam_search needs max_length >= 1")
    batch = tf.shape(start_ids)[0] // k
    cfg = _BeamConfig(beam_size=k, end_id=end_id, alpha=alpha, max_length=max_length)

    # Step 0 runs before the loop: it fixes the attention width G of the history buffers.
    log_probs, state, attn = step_fn(start_ids, initial_state)  # (B*K, V), nest, (B*K, G)
    grid = tf.shape(attn)[-1]
    alive = _empty_hyps(batch, k, max_length, grid, pad_id, first_raw=0.0)
    pool = _empty_hyps(batch, k, max_length, grid, pad_id, first_raw=float("-inf"))
    done = tf.zeros([batch], "bool")
    tokens, state, alive, pool, done = _advance(tf.constant(0), log_probs, attn, state,
                                                alive, pool, done, cfg)

    def cond(t, _tokens, _state, _alive, _pool, done):
        return tf.logical_and(t < max_length, tf.logical_not(tf.reduce_all(done)))

    def body(t, tokens, state, alive, pool, done):
        log_probs, state, attn = step_fn(tokens, state)  # (B*K, V), nest, (B*K, G)
        return (t + 1, *_advance(t, log_probs, attn, state, alive, pool, done, cfg))

    init = (tf.constant(1), tokens, state, alive, pool, done)
    steps, _, _, alive, pool, done = tf.while_loop(cond, body, init)
    return _final_ranking(steps, alive, pool, done, n_best, alpha)


def _final_ranking(steps: tf.Tensor, alive: _Hyps, pool: _Hyps, done: tf.Tensor, n_best: int,
                   alpha: float) -> dict[str, tf.Tensor]:
    """Rank the pool together with the unfinished beams of images that are not done."""
    open_score = alive.raw / _length_norm(alive.length, alpha)  # (B, K)
    open_score = tf.where(done[:, None], float("-inf"), open_score)
    best = _best_hyps(_concat_hyps(pool, alive._replace(score=open_score)), n_best)
    return {
        "tokens": best.seq[:, :, :steps],  # (B, n_best, T)
        "lengths": best.length,  # (B, n_best)
        "scores": best.score,  # (B, n_best)
        "log_probs": best.raw,  # (B, n_best)
        "token_scores": best.token_lp[:, :, :steps],  # (B, n_best, T)
        "finished": best.finished,  # (B, n_best)
        "attention": best.attn[:, :, :steps],  # (B, n_best, T, G)
    }
