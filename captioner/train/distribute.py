"""Data-parallel training with ``tf.distribute``: ``train.strategy`` is ``default``,
``mirrored`` or ``multi_worker``; the strategies, the input split and the replica-level
pieces of :func:`~captioner.train.steps.make_train_step`, which builds one step for any
strategy (one device is its one-replica case).

Every step consumes one GLOBAL batch (``train.batch_size`` examples), split across the
replicas, and makes exactly the update a single device would make on that batch:

* Loss. :func:`~captioner.train.steps.training_loss` divides by the number of real tokens
  of the batch. A replica sees only its slice, so it all-reduces its token count first
  (:func:`token_share`) and divides its own ``sum of token NLLs + lambda * attention reg``
  by the GLOBAL count: the replicas' losses then add up to the single-device loss, and so
  do their gradients.
* Gradients. A Keras 3 optimizer called in a replica context all-reduces the gradients
  with SUM (``TFOptimizer._backend_update_step``) -- what the loss above needs -- but it
  clips them (``global_clipnorm``) and, for a ``LossScaleOptimizer``, checks them for
  inf/NaN *before* that all-reduce, i.e. per replica. So when the optimizer clips or
  scales the loss, :func:`apply_gradients` sums the gradients itself, clips the sum as one
  device would, and hands each replica ``sum / num_replicas``: the optimizer's clip is
  then a no-op, every replica sees the same finite-or-not gradients, and its SUM restores
  the sum.
* Variables are created under ``strategy.scope()``
  (:func:`~captioner.train.setup.build_model`, :func:`~captioner.train.setup.build_optimizers`),
  so checkpoints hold one value per variable and restore under any other strategy.

On one replica every all-reduce is the identity and :func:`apply_gradients` hands the
gradients straight to the optimizer.

Example:
    >>> strategy = make_strategy("default")
    >>> strategy.num_replicas_in_sync
    1
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from captioner.choices import Choices
from captioner.config import TrainConfig

SUM = tf.distribute.ReduceOp.SUM


# ---- strategies and devices -------------------------------------------------------------
def make_strategy(name: str, devices: list[str] | None = None) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy called ``name``.

    ``default``: the current (single-device) strategy. ``mirrored``: one replica per device
    of ``devices``, else per local GPU, else per logical CPU (see :func:`split_cpu`); the
    same object for the same devices within a process (:func:`mirrored_strategy`).
    ``multi_worker``: ``MultiWorkerMirroredStrategy`` over the cluster in ``TF_CONFIG``;
    create it before any other TensorFlow op of the process.

    Example:
        >>> make_strategy("default").num_replicas_in_sync
        1
        >>> make_strategy("ring")
        Traceback (most recent call last):
        ...
        captioner.choices.ChoiceError: train.strategy must be one of default, ...
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return mirrored_strategy(tuple(devices or local_devices()))
    if name == "multi_worker":
        check_tf_config(os.environ.get("TF_CONFIG"))
        return tf.distribute.MultiWorkerMirroredStrategy()
    Choices().check("strategy", name, "train.strategy")
    raise AssertionError(f"strategy {name!r} is allowed but not built")


@functools.cache
def mirrored_strategy(devices: tuple[str, ...]) -> tf.distribute.MirroredStrategy:
    """The process's one ``MirroredStrategy`` over ``devices``.

    Each new instance numbers its collective ops (the all-reduces of gradients and of
    synchronised batch-norm statistics) from the same keys, and the process's collective
    executor matches ops by those keys: a second model of other shapes trained under a new
    instance in the same process (a notebook, a sweep in a loop) failed with "Shape
    mismatch in the collective instance". One instance per device set keeps its keys unique.

    Example:
        >>> devices = tuple(local_devices())
        >>> mirrored_strategy(devices) is make_strategy("mirrored", list(devices))
        True
    """
    return tf.distribute.MirroredStrategy(list(devices))


def local_devices() -> list[str]:
    """Names of the local GPUs, or of the logical CPUs when there is no GPU.

    Example:
        >>> devices = local_devices()
        >>> len(devices) >= 1 and all(":CPU:" in d or ":GPU:" in d for d in devices)
        True
    """
    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in gpus or tf.config.list_logical_devices("CPU")]


def check_tf_config(raw: str | None) -> dict[str, Any]:
    """Parse and check a ``TF_CONFIG`` value: ``{"cluster": {...}, "task": {...}}``.

    Example:
        >>> check_tf_config('{"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
        ...                 '"task": {"type": "worker", "index": 1}}')["task"]["index"]
        1
        >>> check_tf_config(None)
        Traceback (most recent call last):
        ...
        ValueError: train.strategy=multi_worker needs the TF_CONFIG environment variable ...
    """
    example = ('e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
               '"task": {"type": "worker", "index": 0}}\'')
    if not raw:
        raise ValueError("train.strategy=multi_worker needs the TF_CONFIG environment "
                         f"variable (the cluster and this process's task), {example}")
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"TF_CONFIG is not valid JSON ({exc}); {example}") from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    task = tf_config.get("task") if isinstance(tf_config, dict) else None
    if not isinstance(cluster, dict) or not cluster or not isinstance(task, dict):
        raise ValueError(f"TF_CONFIG needs a 'cluster' mapping and a 'task' mapping; {example}")
    kind = task.get("type")
    members = cluster.get(kind) if isinstance(kind, str) else None
    index = task.get("index")
    if (not isinstance(members, list) or not isinstance(index, int)
            or not 0 <= index < len(members)):
        raise ValueError(f"TF_CONFIG task {task} names no member of the cluster "
                         f"{sorted(cluster)}; {example}")
    return tf_config


def split_cpu(n: int) -> list[str]:
    """Split the physical CPU into ``n`` logical devices; returns their names.

    Must run before TensorFlow initialises its devices (before the first op, tensor,
    variable, model or strategy of the process); afterwards it raises ``RuntimeError``
    unless the CPU is already split that way. For tests and CPU-only data parallelism.

    First thing in a fresh process, ``split_cpu(2)`` returns two names ending in
    ``CPU:0`` and ``CPU:1`` (``tests/test_distribute.py`` runs it in a subprocess).

    Example:
        >>> n = len(tf.config.list_logical_devices("CPU"))  # initialises the devices
        >>> len(split_cpu(n)) == n  # already split this way: nothing to do
        True
        >>> split_cpu(n + 1)
        Traceback (most recent call last):
        ...
        RuntimeError: split_cpu(...) came too late: TensorFlow has already initialised ...
    """
    if n < 1:
        raise ValueError(f"split_cpu needs n >= 1, got {n}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as exc:
        current = tf.config.list_logical_devices("CPU")
        if len(current) == n:
            return [d.name for d in current]
        raise RuntimeError(
            f"split_cpu({n}) came too late: TensorFlow has already initialised "
            f"{len(current)} logical CPU device(s). Call it first thing in a fresh process, "
            "before any TensorFlow op, model or strategy is created.") from exc
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def strategy_from_config(t: TrainConfig, log: Callable[[str], None] = print
                         ) -> tf.distribute.Strategy:
    """The strategy of ``train.strategy``, after splitting the CPU into ``train.logical_cpus``
    devices when that is above 1; logs the replica count of any strategy but ``default``.

    Call it before any other TensorFlow op of the process (see :func:`split_cpu`).

    Example:
        >>> strategy_from_config(TrainConfig()) is tf.distribute.get_strategy()
        True
    """
    if t.logical_cpus > 1:
        split_cpu(t.logical_cpus)
    strategy = make_strategy(t.strategy)
    replicas = strategy.num_replicas_in_sync
    if t.strategy != "default":
        log(f"train.strategy={t.strategy}: {replicas} replica(s), "
            f"{t.batch_size / replicas:g} examples each per step")
    return strategy


def worker_run_dir(strategy: tf.distribute.Strategy, t: TrainConfig, run_dir: Path) -> Path:
    """Where this process writes: ``run_dir``, except for the non-chief workers of a
    ``multi_worker`` run, which take part in every step and every checkpoint save
    (collective ops) but write into ``run_dir/workers/<task type><task index>`` instead.

    The chief is the ``chief`` task, or worker 0 of a cluster without one.

    Example:
        >>> worker_run_dir(make_strategy("default"), TrainConfig(), Path("runs/a")).as_posix()
        'runs/a'
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if t.strategy != "multi_worker" or resolver is None:
        return run_dir
    kind, index = resolver.task_type, resolver.task_id
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    if kind == "chief" or (not has_chief and kind == "worker" and index == 0):
        return run_dir
    return run_dir / "workers" / f"{kind}{index}"


# ---- input --------------------------------------------------------------------------------
def distribute_batches(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset
                       ) -> tf.distribute.DistributedDataset:
    """Split each GLOBAL batch ``(inputs (B, ...), tokens (B, L))`` of ``dataset`` across the
    replicas: replica r of N gets the r-th contiguous slice of about B / N rows.

    Workers of a ``multi_worker`` run must build the same dataset (same seed and epoch);
    sharding is by data, so each keeps its own replicas' slices of every global batch.

    Example:
        >>> strategy = make_strategy("default")
        >>> ds = tf.data.Dataset.from_tensors((tf.zeros((4, 32, 32, 3), "uint8"),
        ...                                     tf.ones((4, 6), "int32")))
        >>> [t.shape for t in next(iter(distribute_batches(strategy, ds)))]
        [TensorShape([4, 32, 32, 3]), TensorShape([4, 6])]
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


# ---- the replica step's pieces (see captioner.train.steps.make_train_step) ----------------
def synchronize_batch_norm(model: keras.Model) -> int:
    """Make every BatchNormalization layer of ``model`` normalise a training batch with the
    statistics of the GLOBAL batch (all-reduced over replicas) instead of its replica's
    slice, as one device would; returns how many layers were switched.

    Without it the replicas' activations, gradients and moving statistics differ from a
    single device's (and from each other's). Inference is unaffected; on one replica the
    all-reduces are no-ops.

    Example:
        >>> synchronize_batch_norm(keras.Sequential([keras.layers.BatchNormalization()]))
        1
    """
    layers = [layer for layer in model._flatten_layers(include_self=False)  # all nested
              if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.synchronized = True
    return len(layers)


def token_share(targets: tf.Tensor, pad_id: int, ctx: tf.distribute.ReplicaContext
                ) -> tf.Tensor:
    """max(local real tokens, 1) / max(global real tokens, 1), a float32 scalar.

    ``training_loss`` divides the replica's sums by max(local tokens, 1); times this share
    they are divided by the global count instead, as on one device (where it is 1).

    Example:
        >>> ctx = tf.distribute.get_replica_context()  # the default one: a single replica
        >>> float(token_share(tf.constant([[5, 6, 0], [7, 0, 0]]), 0, ctx))
        1.0
    """
    local = tf.reduce_sum(tf.cast(tf.not_equal(targets, pad_id), "float32"))  # () of (b, T)
    total = ctx.all_reduce(SUM, local)
    return tf.maximum(local, 1.0) / tf.maximum(total, 1.0)


def replica_seed(seed: tf.Tensor, ctx: tf.distribute.ReplicaContext) -> tf.Tensor:
    """The step's (2,) seed, folded with the replica id when there are several replicas.

    Example:
        >>> replica_seed(tf.constant([7, 3]), tf.distribute.get_replica_context()).numpy()
        array([7, 3], dtype=int32)
    """
    if ctx.num_replicas_in_sync == 1:
        return seed
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, "int32"),
                                                    ctx.replica_id_in_sync_group)


def apply_gradients(optimizer: keras.optimizers.Optimizer, grads: Sequence[Any],
                    variables: Sequence[Any], ctx: tf.distribute.ReplicaContext) -> None:
    """Apply one replica's gradients (its share of the global-batch gradient).

    The optimizer all-reduces them with SUM. When it would also clip them or check them
    for inf/NaN (loss scaling) -- which it does before that all-reduce -- they are summed
    and clipped here and each replica passes ``sum / N``: clipping then acts on the global
    gradient, the optimizer's own clip is a no-op and its SUM gives back the clipped sum.
    """
    n = ctx.num_replicas_in_sync
    if n > 1 and (clip_settings(optimizer) or loss_scale(optimizer) is not None):
        grads = all_reduce_sum(grads, ctx)
        grads = [scale_gradient(g, 1.0 / n) for g in clip_gradients(grads, optimizer)]
    optimizer.apply_gradients(zip(grads, variables))


def all_reduce_sum(grads: Sequence[Any], ctx: tf.distribute.ReplicaContext) -> list[Any]:
    """Sum gradients over replicas; None stays None.

    ``IndexedSlices`` (the embedding's) stay slices, concatenated over replicas: Keras
    measures their norm over the slices, so clipping then matches a single device.
    """
    present = [i for i, g in enumerate(grads) if g is not None]
    summed = ctx.all_reduce(SUM, [grads[i] for i in present])
    out: list[Any] = list(grads)
    for i, g in zip(present, summed):
        out[i] = g
    return out


def scale_gradient(grad: Any, factor: float) -> Any:
    """``grad * factor`` for a Tensor, IndexedSlices or None."""
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values * factor, grad.indices, grad.dense_shape)
    return grad * factor


def clip_settings(optimizer: keras.optimizers.Optimizer) -> dict[str, float]:
    """The optimizer's active clipping options (those of the inner one for loss scaling).

    Example:
        >>> clip_settings(keras.optimizers.Adam(global_clipnorm=5.0))
        {'global_clipnorm': 5.0}
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    names = ("global_clipnorm", "clipnorm", "clipvalue")
    return {k: float(getattr(inner, k)) for k in names if getattr(inner, k, None)}


def loss_scale(optimizer: keras.optimizers.Optimizer) -> tf.Variable | None:
    """The dynamic loss scale of a ``LossScaleOptimizer``, else None."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.dynamic_scale
    return None


def clip_gradients(grads: Sequence[Any], optimizer: keras.optimizers.Optimizer) -> list[Any]:
    """Clip summed gradients as ``optimizer`` would clip a single device's.

    Gradients of a loss-scaled loss are S times the true ones, so the thresholds are too.
    Non-finite gradients stay non-finite (the loss-scale optimizer then skips the step).
    """
    settings = clip_settings(optimizer)
    scale = loss_scale(optimizer)
    factor = 1.0 if scale is None else tf.cast(scale, "float32")
    if "global_clipnorm" in settings:
        return tf.clip_by_global_norm(list(grads), settings["global_clipnorm"] * factor)[0]
    if "clipnorm" in settings:
        return [None if g is None else tf.clip_by_norm(g, settings["clipnorm"] * factor)
                for g in grads]
    if "clipvalue" in settings:
        v = settings["clipvalue"] * factor
        return [None if g is None else tf.clip_by_value(g, -v, v) for g in grads]
    return list(grads)
