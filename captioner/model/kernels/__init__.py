"""Compiled CPU kernels for the decoder step: additive-attention scores and the GRU
update, each with its backward op.

The decoder's additive attention does elementwise work over (B, G, A) at every step:
tanh(keys + q), the score, and in the backward pass th^2, dL/dq, dL/dV and the keys'
gradient sum. As TensorFlow ops that is about 14 passes over a 6 MB tensor per step; the
two ops of ``decoder_step.cc`` do the same math in 4, each row of A values handled while
it is in cache (3.2x faster on the step's attention part, see the README). The GRU update
(gates, candidate, new state) and its gradient are ~15 small TensorFlow ops each way; here
one op each. The training loss's softmax cross-entropy over (N, V) logits runs 3x faster
than TensorFlow's (27.7 -> 8.8 ms at N = 2,368, V = 5,000 on 2 cores).

:func:`attention_kernel` turns the ``model.attention_kernel`` setting into a kernel or
``None`` (TensorFlow ops); the decoder asks for it the first time it runs a step, not when
it is constructed. The library is compiled with g++ (``$CXX``) and TensorFlow's own
compile flags the first time it is asked for (about 6 s), cached under
``$CAPTIONER_CACHE`` (default ``~/.cache/captioner``) keyed by the source, the TensorFlow
version, the compiler and the CPU, and loaded from there afterwards.

Example:
    >>> import tensorflow as tf
    >>> k = attention_kernel("tensorflow")    # TensorFlow ops: no kernel
    >>> k is None
    True
    >>> k = attention_kernel("fused")         # doctest: +SKIP
    >>> th, scores = k.scores(tf.zeros((2, 49, 8)), tf.zeros((2, 8)),  # doctest: +SKIP
    ...                       tf.ones((8,)))
    >>> th.shape, scores.shape                # doctest: +SKIP
    (TensorShape([2, 49, 8]), TensorShape([2, 49]))
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tensorflow as tf
from tensorflow.python.framework import op_def_registry

from captioner.choices import Choices


class KernelBuildError(RuntimeError):
    """The kernel library could not be compiled or loaded (the message says why)."""


@dataclass(frozen=True)
class KernelBuild:
    """How the library is built: source, compiler, flags and where it is cached.

    Example:
        >>> b = KernelBuild(cache_dir=Path("/tmp/k"))
        >>> b.source.name, b.compiler_cmd[-1].startswith("-march")
        ('decoder_step.cc', True)
    """

    source: Path = Path(__file__).with_name("decoder_step.cc")
    cache_dir: Path = field(default_factory=lambda: Path(
        os.environ.get("CAPTIONER_CACHE", Path.home() / ".cache" / "captioner")) / "kernels")
    compiler: str = field(default_factory=lambda: os.environ.get("CXX", "g++"))
    timeout_s: float = 300.0

    @property
    def portable_cmd(self) -> list[str]:
        """The compile command for any CPU of the architecture (no ``-march``)."""
        return [self.compiler, "-shared", "-fPIC", "-O3", "-w"]

    @property
    def compiler_cmd(self) -> list[str]:
        return [*self.portable_cmd, "-march=native"]

    def compiler_cmds(self) -> list[list[str]]:
        """The compile commands to try, in order: for this CPU; for this CPU without
        AVX512-FP16 (TensorFlow 2.21's Eigen headers do not compile with it on, g++ 12 on
        a Xeon that has it: ``PacketMathFP16.h: expected initializer before '<'``); for
        any CPU of the architecture (no ``-march``). The first that compiles is kept.

        Example:
            >>> [cmd[5:] for cmd in KernelBuild(compiler="g++").compiler_cmds()]
            [['-march=native'], ['-march=native', '-mno-avx512fp16'], []]
        """
        native = self.compiler_cmd
        return [native, [*native, "-mno-avx512fp16"], self.portable_cmd]

    def tf_flags(self) -> list[str]:
        return [*tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]

    def fingerprint(self) -> str:
        """Hash of everything the binary depends on (so a stale one is never loaded)."""
        parts = [self.source.read_bytes(), tf.__version__.encode(),
                 " ".join(self.compiler_cmd + self.tf_flags()).encode(),
                 _compiler_version(self.compiler).encode(), _cpu_signature().encode()]
        return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]

    def library_path(self) -> Path:
        return self.cache_dir / f"{self.source.stem}-{self.fingerprint()}.so"


def _compiler_version(compiler: str) -> str:
    if shutil.which(compiler) is None:
        return "missing"
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.splitlines()[0] if done.stdout else "unknown"


def _cpu_signature() -> str:
    """The CPU's model and instruction-set flags (the library is built for this CPU)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [line for line in info if line.startswith(("model name", "flags"))]
    return platform.machine() + "\n" + "\n".join(dict.fromkeys(keep))


def build_library(build: KernelBuild) -> Path:
    """Compile the library into the cache (if not there yet) and return its path: with the
    first of :meth:`KernelBuild.compiler_cmds` that compiles; when none does, the error
    holds the first command's messages."""
    target = build.library_path()
    if target.is_file():
        return target
    if shutil.which(build.compiler) is None:
        raise KernelBuildError(f"no C++ compiler {build.compiler!r} on PATH (set CXX, or "
                               "model.attention_kernel=tensorflow)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        errors: list[KernelBuildError] = []
        tf_flags = build.tf_flags()
        for flags in build.compiler_cmds():
            failed = _compile(build, [*flags, str(build.source), "-o", str(out), *tf_flags])
            if failed is None:
                os.replace(out, target)  # atomic: a concurrent build writes the same bytes
                if errors:
                    logging.getLogger("captioner").info(
                        "kernel compiled as %s after: %s", " ".join(flags),
                        str(errors[0]).splitlines()[-1])
                return target
            errors.append(failed)
        raise errors[0]


def _compile(build: KernelBuild, cmd: list[str]) -> KernelBuildError | None:
    """Run one compile command: None when it succeeded, else the error to report (a
    compiler that runs out of time raises it: no other command is tried)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=build.timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise KernelBuildError(f"compiling {build.source} took over {build.timeout_s} s"
                               ) from exc
    if done.returncode == 0:
        return None
    tail = "\n".join(done.stderr.strip().splitlines()[-15:])
    return KernelBuildError(f"compiling {build.source} failed ({' '.join(cmd[:1])} "
                            f"exit {done.returncode}):\n{tail}")


class AttentionKernel:
    """The loaded ops (float32): ``scores``, ``scores_grad``, ``gru`` and ``gru_grad``.

    * ``scores(keys (N, G, A), q (N, K), v (A,))``, K >= A, with q's first A columns ->
      th = tanh(keys + q) (N, G, A), scores = th . v (N, G). Differentiable (a registered
      gradient in TensorFlow ops).
    * ``scores_grad(th (N, G, A), ds (N, G), v (A,), acc (B, G, A))`` with B >= N ->
      dq = v sum_g ds (1 - th^2) (N, A), dv = sum ds th (A,), and acc with
      acc[:N] += ds th^2 (updated in place when TensorFlow allows).
    * ``gru(x (N, 3U), hq (N, K), bias (3U,), h (N, U))``, K >= 3U -> h_new (N, U) and
      gates (N, 4U) = [z, r, n, hh] of Keras' ``reset_after`` GRU whose recurrent
      projection is hq[:, K - 3U:] + bias (see :func:`captioner.model.gru_update`).
    * ``gru_grad(dh (N, U), h (N, U), gates (N, 4U))`` -> dL/dx (N, 3U), dL/dhr (N, 3U)
      and the direct part of dL/dh, dh z (N, U) (:func:`captioner.model.gru_update_grad`).
    * ``cross_entropy(labels (N,) int32, logits (N, V))`` -> the loss (N,) of
      ``tf.nn.sparse_softmax_cross_entropy_with_logits``, differentiable in the logits.

    Example:
        >>> import numpy as np
        >>> k = attention_kernel("fused")                            # doctest: +SKIP
        >>> keys, q, v = tf.ones((1, 2, 3)), tf.zeros((1, 3)), tf.ones((3,))
        >>> np.round(k.scores(keys, q, v)[1].numpy(), 4)            # doctest: +SKIP
        array([[2.2848, 2.2848]], dtype=float32)
    """

    def __init__(self, library: Any, path: Path):
        self.library = library
        self.path = path

    def scores(self, keys: tf.Tensor, q: tf.Tensor, v: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return self.library.additive_attention_scores(keys, q, v)

    def scores_grad(self, th: tf.Tensor, ds: tf.Tensor, v: tf.Tensor, acc: tf.Tensor
                    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        return self.library.additive_attention_scores_grad(th, ds, v, acc)

    def cross_entropy(self, labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
        return self.library.softmax_xent(logits, tf.cast(labels, "int32"))[0]

    def gru(self, x: tf.Tensor, hq: tf.Tensor, bias: tf.Tensor, h: tf.Tensor
            ) -> tuple[tf.Tensor, tf.Tensor]:
        return self.library.gru_update(x, hq, bias, h)

    def gru_grad(self, dh: tf.Tensor, h: tf.Tensor, gates: tf.Tensor
                 ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        return self.library.gru_update_grad(dh, h, gates)


def _scores_gradient(op: Any, dth: tf.Tensor | None, dscores: tf.Tensor | None
                     ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Gradient of AdditiveAttentionScores in TensorFlow ops (for autodiff callers:
    scheduled sampling; the teacher-forced recurrence calls ``scores_grad`` itself)."""
    _, query, v = op.inputs
    th = op.outputs[0]  # (N, G, A)
    dscores = tf.zeros_like(op.outputs[1]) if dscores is None else dscores
    dth_total = dscores[:, :, None] * v  # (N, G, A)
    if dth is not None:
        dth_total += dth
    d_pre = dth_total * (1.0 - th * th)  # (N, G, A)
    dv = tf.einsum("ng,nga->a", dscores, th)
    unused = tf.shape(query)[1] - tf.shape(v)[0]  # query columns after the first A
    dq = tf.pad(tf.reduce_sum(d_pre, 1), [[0, 0], [0, unused]])  # (N, K)
    return d_pre, dq, dv


def _gru_gradient(kernel: AttentionKernel, op: Any, dh_new: tf.Tensor, _dgates: Any
                  ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Gradient of GruUpdate (x, hq, bias, h) for autodiff callers. The gates output is
    what the hand-written backward pass reads; it carries no gradient of its own."""
    _, hq, _, h = op.inputs
    dx, dhr, dh = kernel.gru_grad(dh_new, h, op.outputs[1])  # (N, 3U), (N, 3U), (N, U)
    query_cols = tf.shape(hq)[1] - tf.shape(dhr)[1]  # hq's columns before the GRU's
    dhq = tf.pad(dhr, [[0, 0], [query_cols, 0]])  # (N, K)
    return dx, dhq, tf.reduce_sum(dhr, 0), dh


def _xent_gradient(op: Any, dloss: tf.Tensor, _dbackprop: Any) -> tuple[tf.Tensor, None]:
    """Gradient of SoftmaxXent in the logits: backprop (softmax - onehot) scaled by dloss
    (first order, as TensorFlow's own op)."""
    return op.outputs[1] * dloss[:, None], None


_LOAD_LOCK = threading.Lock()  # functools.cache alone would let two threads both load


@functools.cache
def _load(build: KernelBuild) -> AttentionKernel | KernelBuildError:
    """Build and load once per process; a failure is remembered, not retried. Only one
    build can be loaded in a process: loading a second library with the same ops would
    register their kernels twice and break every later call."""
    try:
        path = build_library(build)
        if op_def_registry.get("AdditiveAttentionScores") is not None:
            return KernelBuildError(f"another build of {build.source.name} is already loaded "
                                    "in this process (one build per process)")
        library = tf.load_op_library(str(path))
    except (KernelBuildError, OSError, tf.errors.NotFoundError) as exc:
        return exc if isinstance(exc, KernelBuildError) else KernelBuildError(
            f"loading the attention kernel failed: {exc}")
    kernel = AttentionKernel(library, path)
    tf.RegisterGradient("AdditiveAttentionScores")(_scores_gradient)
    tf.RegisterGradient("GruUpdate")(functools.partial(_gru_gradient, kernel))
    tf.RegisterGradient("SoftmaxXent")(_xent_gradient)
    return kernel


def attention_kernel(choice: str, build: KernelBuild | None = None) -> AttentionKernel | None:
    """The kernel for ``model.attention_kernel = choice``, or None for TensorFlow ops.

    ``auto`` uses it on a machine without a visible GPU (the ops are CPU-only) and falls
    back to TensorFlow ops with a warning when it cannot be built; ``fused`` raises
    :class:`KernelBuildError` then.
    """
    Choices().check("attention_kernel", choice, "model.attention_kernel")
    if choice == "tensorflow" or (choice == "auto" and tf.config.list_physical_devices("GPU")):
        return None
    with _LOAD_LOCK:  # replicas may trace their first step in threads at the same time
        loaded = _load(build or KernelBuild())
        if isinstance(loaded, AttentionKernel):
            return loaded
        if choice == "fused":
            raise loaded
        _warn_once(str(loaded))
    return None


@functools.cache
def _warn_once(message: str) -> None:
    logging.getLogger("captioner").warning(
        "model.attention_kernel=auto: using TensorFlow ops for attention (slower): %s",
        message)
