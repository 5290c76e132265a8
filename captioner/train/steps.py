"""The training objective, the compiled train step (one for any ``tf.distribute``
strategy, one device being its one-replica case) and the evaluation step; the optimizer."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from captioner.config import Config
from captioner.model.backbones import backbone_variables
from captioner.model.layers import CaptionModel
from captioner.model.precision import resolve_precision
from captioner.train.distribute import (
    apply_gradients,
    replica_seed,
    synchronize_batch_norm,
    token_share,
)
from captioner.train.optimizers import FusedAdam

SUM = tf.distribute.ReduceOp.SUM


def caption_loss(logits: tf.Tensor, targets: tf.Tensor, alphas: tf.Tensor, pad_id: int,
                 attention_reg: float) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Masked cross-entropy plus doubly stochastic attention regularisation.

    ``loss = (sum of token NLLs + lambda * sum_images sum_cells (1 - sum_steps alpha)^2)
    / number of real tokens`` -- the paper's per-caption objective, summed over the
    batch and divided by the real-token count. Returns (loss, mean token NLL, reg term).
    """
    mask = tf.cast(tf.not_equal(targets, pad_id), "float32")  # (B, T)
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)  # (B, T)
    return _combine(tf.reduce_sum(nll * mask), mask, alphas, attention_reg)


def packed_caption_loss(head: Callable[[tf.Tensor], tf.Tensor], outs: tf.Tensor,
                        targets: tf.Tensor, alphas: tf.Tensor, pad_id: int,
                        attention_reg: float, cross_entropy: Callable[..., tf.Tensor] | None
                        = None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """:func:`caption_loss` from the head's inputs ``outs`` (B, T, U'): ``head`` runs only
    on the N real target positions, (N, U') -> (N, V) float32 logits, since the logits of
    padding are never needed. Same results as ``caption_loss(head(outs), ...)``.
    ``cross_entropy(labels, logits)`` defaults to TensorFlow's sparse softmax one."""
    real = tf.not_equal(targets, pad_id)  # (B, T)
    where = tf.where(real)  # (N, 2)
    logits = head(tf.gather_nd(outs, where))  # (N, V)
    xent = cross_entropy or tf.nn.sparse_softmax_cross_entropy_with_logits
    nll = xent(tf.gather_nd(targets, where), logits)  # (N,)
    return _combine(tf.reduce_sum(nll), tf.cast(real, "float32"), alphas, attention_reg)


def _combine(nll_sum: tf.Tensor, mask: tf.Tensor, alphas: tf.Tensor, attention_reg: float
             ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(loss, mean token NLL, reg term) from the summed NLL and the (B, T) token mask."""
    n_tokens = tf.maximum(tf.reduce_sum(mask), 1.0)
    coverage = tf.reduce_sum(alphas * mask[:, :, None], axis=1)  # (B, G)
    reg_sum = tf.reduce_sum(tf.square(1.0 - coverage))
    loss = (nll_sum + attention_reg * reg_sum) / n_tokens
    return loss, nll_sum / n_tokens, attention_reg * reg_sum / n_tokens


def grounding_loss(alphas: tf.Tensor, cells: tf.Tensor) -> tf.Tensor:
    """Sum of -log(attention on the given cell) over the target positions that have one:
    ``alphas`` (B, T, G), ``cells`` (B, T) int32 flat cell indices, -1 where none.

    Example:
        >>> alphas = tf.constant([[[0.5, 0.5], [0.9, 0.1]]])  # (1, 2, 2)
        >>> round(float(grounding_loss(alphas, tf.constant([[1, -1]]))), 4)  # -log 0.5
        0.6931
    """
    alphas = tf.cast(alphas, "float32")
    picked = tf.reduce_sum(alphas * tf.one_hot(cells, tf.shape(alphas)[-1]), -1)  # (B, T)
    has = tf.cast(cells >= 0, "float32")  # (B, T)
    return -tf.reduce_sum(has * tf.math.log(picked + 1e-6))


def _trim(tokens: tf.Tensor, pad_id: int) -> tf.Tensor:
    """Drop padding columns that no row of the batch uses: (B, L) -> (B, L')."""
    length = tf.reduce_max(tf.reduce_sum(tf.cast(tf.not_equal(tokens, pad_id), "int32"), 1))
    return tokens[:, :length]


def training_loss(model: CaptionModel, inputs: tf.Tensor, tokens: tf.Tensor, pad_id: int,
                  attention_reg: float, sampling_prob: tf.Tensor | None = None,
                  seed: tf.Tensor | None = None, greedy_sampling: bool = False,
                  cells: tf.Tensor | None = None, attention_supervision: float = 0.0
                  ) -> dict[str, tf.Tensor]:
    """The training forward pass and loss of one batch, tokens (B, L) -> ``{"loss", "nll"
    (mean token NLL), "reg", "ground"}``: teacher forcing (or scheduled sampling with
    ``sampling_prob``), the recurrence skipping each row's padded steps (``target_mask``)
    and the output head on the real target positions only (:func:`packed_caption_loss`).
    With ``cells`` (B, L) -- the atom cell of each token position, -1 where none,
    aligned with ``tokens`` -- ``ground`` is ``attention_supervision`` times
    :func:`grounding_loss` over the real-token count, and ``loss = nll + reg + ground``."""
    inp, tgt = tokens[:, :-1], tokens[:, 1:]  # (B, T), (B, T)
    outs, alphas = model((inputs, inp), training=True, sampling_prob=sampling_prob, seed=seed,
                         greedy_sampling=greedy_sampling, logits=False,
                         target_mask=tf.not_equal(tgt, pad_id))  # alphas (B, T, G)
    loss, nll, reg = packed_caption_loss(lambda x: model.decoder.head(x, training=True), outs,
                                         tgt, alphas, pad_id, attention_reg,
                                         model.decoder.cross_entropy)
    ground = tf.zeros_like(loss)
    if cells is not None and attention_supervision:
        n_tokens = tf.maximum(tf.reduce_sum(tf.cast(tf.not_equal(tgt, pad_id), "float32")), 1.0)
        ground = attention_supervision * grounding_loss(alphas, cells[:, 1:]) / n_tokens
    return {"loss": loss + ground, "nll": nll, "reg": reg, "ground": ground}


def make_train_step(model: CaptionModel, optimizer: keras.optimizers.Optimizer, pad_id: int,
                    attention_reg: float, scheduled_sampling: bool = False,
                    greedy_sampling: bool = False,
                    backbone_optimizer: keras.optimizers.Optimizer | None = None, *,
                    strategy: tf.distribute.Strategy | None = None,
                    global_batch_size: int | None = None,
                    attention_supervision: float = 0.0
                    ) -> Callable[..., dict[str, tf.Tensor]]:
    """Compile one training step (teacher forcing, or scheduled sampling when enabled) for
    ``strategy``, by default the current one (one device outside any ``strategy.scope()``).

    ``step(inputs, tokens, sampling_prob, seed)`` takes a GLOBAL batch -- ``inputs`` uint8
    images (B, S, S, 3) or cached grids (B, G, C), ``tokens`` (B, L) int32 -- as plain
    tensors on one device or split by :func:`~captioner.train.distribute.distribute_batches`,
    the scheduled-sampling probability (float32 scalar) and a (2,) int32 seed, and returns
    the global batch's ``{"loss", "nll", "reg", "ground"}`` (float32 scalars,
    :func:`training_loss`) and ``"nonfinite"`` (1.0 when the loss or a gradient was
    inf/NaN, else 0.0). On one replica such an update is NOT applied -- weights, optimizer
    moments and ``optimizer.iterations`` unchanged; with several replicas it is (their all-reduce
    cannot run inside ``tf.cond``), so only the caller's stop keeps the weights out of
    the checkpoints; with ``mixed_float16`` the loss-scale optimizer does its own skipping
    and this is 0.0.
    Whatever the number of replicas, the update equals one device's on that batch (see
    :mod:`captioner.train.distribute`): each replica divides its sums by the GLOBAL real-token
    count, the optimizer sums the replicas' gradients (clipping and loss scaling act on the
    sum), scheduled sampling draws from a per-replica seed and, with several replicas, the
    model's BatchNorm layers switch to global-batch statistics. Dropout masks come from
    Keras seed generators that advance in lockstep on every replica, so row i of each
    replica's slice gets the same mask (still random from step to step).

    ``step(inputs, tokens, sampling_prob, seed, cells)`` also takes the atoms' cells
    (B, L) int32 (:func:`~captioner.data.drawn.atom_cells`), weighted by
    ``attention_supervision`` in the loss.

    With ``backbone_optimizer`` the backbone's trainable variables get their own optimizer
    (and learning rate). ``global_batch_size`` (``train.batch_size``), when given, must give
    every replica an example. (XLA, ``jit_compile=True``, measured 3x slower on a 2-core
    AVX-512 CPU, so it is not used.) The step is traced without AutoGraph: it is written in
    TensorFlow control flow (``tf.cond``, ``tf.while_loop``), so a Python ``if`` on a
    tensor fails when traced instead of being rewritten.

    Example:
        >>> from captioner.config import apply_overrides
        >>> cfg = apply_overrides(Config(), ["model.image_size=32", "model.cnn_filters=[4]",
        ...                                  "model.units=8", "model.embedding_dim=8",
        ...                                  "model.attention_units=8"])
        >>> model = CaptionModel.from_model_config(cfg.model, vocab_size=12).build_weights()
        >>> optimizer = make_optimizer(cfg, total_steps=100)
        >>> step = make_train_step(model, optimizer, pad_id=0, attention_reg=1.0)
        >>> images = tf.zeros((2, 32, 32, 3), "uint8")  # (B, S, S, 3)
        >>> tokens = tf.constant([[1, 5, 6, 2, 0], [1, 7, 2, 0, 0]])  # (B, L): <start>...<end>
        >>> out = step(images, tokens, tf.constant(0.0), tf.constant([0, 0]))
        >>> sorted(out), int(optimizer.iterations.numpy()), float(out["nonfinite"])
        (['ground', 'loss', 'nll', 'nonfinite', 'reg'], 1, 0.0)
        >>> bool(abs(out["loss"] - out["nll"] - out["reg"]) < 1e-5 and out["reg"] > 0)
        True
        >>> make_train_step(model, optimizer, 0, 1.0, global_batch_size=0)
        Traceback (most recent call last):
        ...
        ValueError: train.batch_size=0 is the GLOBAL batch: ... number of replicas (1)
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if global_batch_size is not None and global_batch_size < replicas:
        raise ValueError(f"train.batch_size={global_batch_size} is the GLOBAL batch: it must "
                         f"be at least the number of replicas ({replicas})")
    if replicas > 1:
        synchronize_batch_norm(model)
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    main_vars, backbone_vars = split_variables(model, backbone_optimizer is not None)
    with strategy.scope():  # slot variables now: made in the first call, they cost a 2nd trace
        for opt, variables in ((optimizer, main_vars), (backbone_optimizer, backbone_vars)):
            if opt is not None and not opt.built:
                opt.build(variables)

    def replica_step(inputs, tokens, sampling_prob, seed, cells=None):
        ctx = tf.distribute.get_replica_context()
        tokens = _trim(tokens, pad_id)  # (b, L') this replica's rows
        if cells is not None:
            cells = cells[:, :tf.shape(tokens)[1]]  # (b, L')
        share = token_share(tokens[:, 1:], pad_id, ctx)  # this replica's tokens / global tokens
        with tf.GradientTape() as tape:
            terms = {k: share * v for k, v in training_loss(
                model, inputs, tokens, pad_id, attention_reg,
                sampling_prob if scheduled_sampling else None, replica_seed(seed, ctx),
                greedy_sampling, cells, attention_supervision).items()}
            loss = terms["loss"]
            scaled = optimizer.scale_loss(loss) if loss_scaled else loss
        grads = tape.gradient(scaled, main_vars + backbone_vars)
        # 1.0 when this replica's loss or a gradient is inf/NaN, summed over replicas so
        # that every replica takes the same branch
        bad = ctx.all_reduce(SUM, 1.0 - tf.cast(all_finite(loss, grads), "float32"))

        def apply():
            apply_gradients(optimizer, grads[:len(main_vars)], main_vars, ctx)
            if backbone_vars:
                apply_gradients(backbone_optimizer, grads[len(main_vars):], backbone_vars, ctx)
            return tf.constant(True)

        if loss_scaled:  # the loss-scale optimizer skips (and rescales) on its own
            apply()
            bad = tf.zeros_like(bad)
        elif replicas > 1:  # cross-replica sums cannot run inside tf.cond: applied anyway
            apply()
        else:  # never apply a non-finite update: the weights stay the last good ones
            tf.cond(bad > 0, lambda: tf.constant(False), apply)
        share_bad = bad / tf.cast(ctx.num_replicas_in_sync, "float32")  # sums to 0 or 1
        # this replica's shares, () each
        return {**terms, "nonfinite": tf.minimum(share_bad, 1.0)}

    @tf.function(reduce_retracing=True, autograph=False)
    def train_step(inputs, tokens, sampling_prob, seed, cells=None):
        args = (inputs, tokens, sampling_prob, seed) + (() if cells is None else (cells,))
        per_replica = strategy.run(replica_step, args=args)
        return {k: strategy.reduce(SUM, v, axis=None) for k, v in per_replica.items()}

    return train_step


def all_finite(loss: tf.Tensor, grads: list[Any]) -> tf.Tensor:
    """True when ``loss`` and every gradient (``IndexedSlices`` by their values) are finite."""
    checks = [tf.reduce_all(tf.math.is_finite(loss))]
    for g in grads:
        if g is not None:
            values = g.values if isinstance(g, tf.IndexedSlices) else g
            checks.append(tf.reduce_all(tf.math.is_finite(tf.cast(values, "float32"))))
    return tf.reduce_all(tf.stack(checks))


def split_variables(model: CaptionModel, separate_backbone: bool
                    ) -> tuple[list[Any], list[Any]]:
    """Trainable variables -> (the rest, the backbone's) or (all, []) when not separate."""
    if not separate_backbone:
        return list(model.trainable_variables), []
    ids = {id(v) for v in backbone_variables(model.backbone)}
    main = [v for v in model.trainable_variables if id(v) not in ids]
    return main, [v for v in model.trainable_variables if id(v) in ids]


def make_eval_step(model: CaptionModel, pad_id: int) -> Callable[..., tf.Tensor]:
    """Compile the validation loss: (sum of token NLLs, number of tokens) of a batch."""

    @tf.function(reduce_retracing=True, autograph=False)
    def eval_step(images, tokens):
        tokens = _trim(tokens, pad_id)
        outs, alphas = model((images, tokens[:, :-1]), training=False, logits=False,
                             target_mask=tf.not_equal(tokens[:, 1:], pad_id))
        _, nll, _ = packed_caption_loss(model.decoder.head, outs, tokens[:, 1:], alphas,
                                        pad_id, 0.0, model.decoder.cross_entropy)
        n = tf.reduce_sum(tf.cast(tf.not_equal(tokens[:, 1:], pad_id), "float32"))
        return tf.stack([nll * n, n])

    return eval_step


def make_optimizer(cfg: Config, total_steps: int, learning_rate: float | None = None,
                   decay_steps: tf.Variable | None = None) -> keras.optimizers.Optimizer:
    """Adam (:class:`~captioner.train.optimizers.FusedAdam`) with global-norm clipping and the
    configured schedule (peak ``learning_rate``, default ``train.learning_rate``); loss
    scaling for ``mixed_float16``. The cosine schedule decays over ``total_steps`` after
    the warm-up, or over ``decay_steps`` when given: a variable read at every step, which
    a time budget moves (:class:`~captioner.train.budget.TimeBudget`)."""
    t = cfg.train
    peak = learning_rate or t.learning_rate
    lr: Any = peak
    if t.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(
            0.0 if t.warmup_steps else peak,
            max(1, total_steps - t.warmup_steps) if decay_steps is None else decay_steps,
            alpha=min(1.0, t.min_learning_rate / peak),
            warmup_target=peak if t.warmup_steps else None,
            warmup_steps=t.warmup_steps)
    elif t.lr_schedule == "exponential":
        per_epoch = max(1, total_steps // max(1, t.epochs))
        lr = keras.optimizers.schedules.ExponentialDecay(peak, per_epoch, t.decay_rate)
    opt = FusedAdam(learning_rate=lr, global_clipnorm=t.clip_norm)
    if resolve_precision(t.precision) == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def sampling_probability(cfg: Config, epoch: int) -> float:
    """Scheduled-sampling probability for 1-based ``epoch``."""
    ss = cfg.train.scheduled_sampling
    if not ss.enabled:
        return 0.0
    span = max(1, ss.to_epoch - ss.from_epoch)
    frac = min(1.0, max(0.0, (epoch - ss.from_epoch) / span))
    if ss.schedule == "inverse_sigmoid":
        k = 5.0  # steepness: the curve goes from ~1% to ~99% of the way across the span
        frac = 1.0 / (1.0 + math.exp(-k * (2.0 * frac - 1.0)))
    return ss.start + (ss.end - ss.start) * frac

