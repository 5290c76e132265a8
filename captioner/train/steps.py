"""The training objective and the compiled train and evaluation steps."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from captioner.config import Config
from captioner.model.layers import CaptionModel
from captioner.train.optimizers import FusedAdam


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


def _trim(tokens: tf.Tensor, pad_id: int) -> tf.Tensor:
    """Drop padding columns that no row of the batch uses: (B, L) -> (B, L')."""
    length = tf.reduce_max(tf.reduce_sum(tf.cast(tf.not_equal(tokens, pad_id), "int32"), 1))
    return tokens[:, :length]


def training_loss(model: CaptionModel, inputs: tf.Tensor, tokens: tf.Tensor, pad_id: int,
                  attention_reg: float, sampling_prob: tf.Tensor | None = None,
                  seed: tf.Tensor | None = None, greedy_sampling: bool = False
                  ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The training forward pass and loss of one batch, tokens (B, L) -> (loss, mean token
    NLL, reg): teacher forcing (or scheduled sampling with ``sampling_prob``), the
    recurrence skipping each row's padded steps (``target_mask``) and the output head on
    the real target positions only (:func:`packed_caption_loss`)."""
    inp, tgt = tokens[:, :-1], tokens[:, 1:]  # (B, T), (B, T)
    outs, alphas = model((inputs, inp), training=True, sampling_prob=sampling_prob, seed=seed,
                         greedy_sampling=greedy_sampling, logits=False,
                         target_mask=tf.not_equal(tgt, pad_id))
    return packed_caption_loss(lambda x: model.decoder.head(x, training=True), outs, tgt,
                               alphas, pad_id, attention_reg, model.decoder.cross_entropy)


def make_train_step(model: CaptionModel, optimizer: keras.optimizers.Optimizer, pad_id: int,
                    attention_reg: float, scheduled_sampling: bool = False,
                    greedy_sampling: bool = False,
                    backbone_optimizer: keras.optimizers.Optimizer | None = None
                    ) -> Callable[..., dict[str, tf.Tensor]]:
    """Compile one training step (teacher forcing, or scheduled sampling when enabled).

    ``inputs`` are uint8 images or cached grids. With ``backbone_optimizer`` the backbone's
    trainable variables get their own optimizer (and learning rate); the loss is
    :func:`training_loss`. (XLA, ``jit_compile=True``, measured 3x slower on a 2-core
    AVX-512 CPU, so it is not used.)
    """
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    main_vars, backbone_vars = split_variables(model, backbone_optimizer is not None)

    @tf.function(reduce_retracing=True)
    def train_step(inputs, tokens, sampling_prob, seed):
        with tf.GradientTape() as tape:
            loss, nll, reg = training_loss(
                model, inputs, _trim(tokens, pad_id), pad_id, attention_reg,
                sampling_prob if scheduled_sampling else None, seed, greedy_sampling)
            scaled = optimizer.scale_loss(loss) if loss_scaled else loss
        grads = tape.gradient(scaled, main_vars + backbone_vars)
        optimizer.apply_gradients(zip(grads[:len(main_vars)], main_vars))
        if backbone_vars:
            backbone_optimizer.apply_gradients(zip(grads[len(main_vars):], backbone_vars))
        return {"loss": loss, "nll": nll, "reg": reg}

    return train_step


def split_variables(model: CaptionModel, separate_backbone: bool
                    ) -> tuple[list[Any], list[Any]]:
    """Trainable variables -> (the rest, the backbone's) or (all, []) when not separate."""
    if not separate_backbone:
        return list(model.trainable_variables), []
    from captioner.model.backbones import backbone_variables

    ids = {id(v) for v in backbone_variables(model.backbone)}
    main = [v for v in model.trainable_variables if id(v) not in ids]
    return main, [v for v in model.trainable_variables if id(v) in ids]


def make_eval_step(model: CaptionModel, pad_id: int) -> Callable[..., tf.Tensor]:
    """Compile the validation loss: (sum of token NLLs, number of tokens) of a batch."""

    @tf.function(reduce_retracing=True)
    def eval_step(images, tokens):
        tokens = _trim(tokens, pad_id)
        outs, alphas = model((images, tokens[:, :-1]), training=False, logits=False,
                             target_mask=tf.not_equal(tokens[:, 1:], pad_id))
        _, nll, _ = packed_caption_loss(model.decoder.head, outs, tokens[:, 1:], alphas,
                                        pad_id, 0.0, model.decoder.cross_entropy)
        n = tf.reduce_sum(tf.cast(tf.not_equal(tokens[:, 1:], pad_id), "float32"))
        return tf.stack([nll * n, n])

    return eval_step


def make_optimizer(cfg: Config, total_steps: int, learning_rate: float | None = None
                   ) -> keras.optimizers.Optimizer:
    """Adam (:class:`~captioner.optimizers.FusedAdam`) with global-norm clipping and the
    configured schedule (peak ``learning_rate``, default ``train.learning_rate``); loss
    scaling for ``mixed_float16``."""
    t = cfg.train
    peak = learning_rate or t.learning_rate
    lr: Any = peak
    if t.lr_schedule == "cosine":
        decay_steps = max(1, total_steps - t.warmup_steps)
        lr = keras.optimizers.schedules.CosineDecay(
            0.0 if t.warmup_steps else peak, decay_steps,
            alpha=min(1.0, t.min_learning_rate / peak),
            warmup_target=peak if t.warmup_steps else None,
            warmup_steps=t.warmup_steps)
    elif t.lr_schedule == "exponential":
        per_epoch = max(1, total_steps // max(1, t.epochs))
        lr = keras.optimizers.schedules.ExponentialDecay(peak, per_epoch, t.decay_rate)
    opt = FusedAdam(learning_rate=lr, global_clipnorm=t.clip_norm)
    if t.precision == "mixed_float16":
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

