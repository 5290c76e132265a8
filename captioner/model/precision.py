"""What ``train.precision`` means on this machine.

``auto`` is ``mixed_bfloat16`` where the hardware computes bfloat16 natively (a GPU of
compute capability 8.0 or newer; an x86 CPU with AVX512-BF16 or AMX-BF16; an Arm CPU
with the BF16 extension) and ``float32`` elsewhere: without those instructions
TensorFlow emulates bfloat16, and a mixed_bfloat16 step costs several times a float32
one (the README gives the measurement and the command). The other values are used as
given. Weights are float32 variables under every policy, so a run trained in one
precision is read in another.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from captioner.choices import Choices


@dataclass(frozen=True)
class Bfloat16Support:
    """Whether this machine computes bfloat16 natively, and what says so.

    Example:
        >>> Bfloat16Support(False, "no bfloat16 flag in /proc/cpuinfo").native
        False
    """

    native: bool
    reason: str


def cpu_bfloat16_flags(cpuinfo: str) -> list[str]:
    """The bfloat16 features named in a Linux ``/proc/cpuinfo`` text: ``avx512_bf16``
    and ``amx_bf16`` on x86 (``flags`` lines), ``bf16`` on Arm (``Features`` lines).

    Example:
        >>> cpu_bfloat16_flags("flags : fpu avx2 avx512f avx512_bf16 amx_tile")
        ['avx512_bf16']
        >>> cpu_bfloat16_flags("Features : fp asimd bf16 i8mm")
        ['bf16']
        >>> cpu_bfloat16_flags("flags : fpu avx2 avx512f avx512bw")
        []
    """
    wanted = {"flags": ("avx512_bf16", "amx_bf16"), "features": ("bf16",)}
    found: list[str] = []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        names = wanted.get(key.strip().lower(), ())
        found += [n for n in names if n in value.split() and n not in found]
    return found


def _cpu_support() -> Bfloat16Support:
    system = platform.system()
    if system == "Linux":
        try:
            flags = cpu_bfloat16_flags(Path("/proc/cpuinfo").read_text(errors="replace"))
        except OSError as exc:
            return Bfloat16Support(False, f"/proc/cpuinfo unreadable ({exc})")
        if flags:
            return Bfloat16Support(True, f"CPU flag {flags[0]}")
        return Bfloat16Support(False, "no bfloat16 flag in /proc/cpuinfo")
    if system == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"],
                                 capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        return Bfloat16Support(out == "1", f"sysctl hw.optional.arm.FEAT_BF16={out or '?'}")
    return Bfloat16Support(False, f"CPU features unknown on {system or 'this system'}")


@functools.cache
def bfloat16_support() -> Bfloat16Support:
    """This machine's :class:`Bfloat16Support`: the first GPU TensorFlow sees decides
    (compute capability >= 8.0), else the CPU's features. Looked up once per process."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        cc = tuple(details.get("compute_capability") or (0, 0))
        return Bfloat16Support(cc >= (8, 0), f"GPU compute capability {cc[0]}.{cc[1]}")
    return _cpu_support()


def resolve_precision(precision: str, support: Bfloat16Support | None = None) -> str:
    """The Keras dtype policy name for ``train.precision``: ``auto`` by ``support``
    (default: :func:`bfloat16_support`), any other value as it is.

    Example:
        >>> resolve_precision("auto", Bfloat16Support(True, "CPU flag avx512_bf16"))
        'mixed_bfloat16'
        >>> resolve_precision("auto", Bfloat16Support(False, "no flag"))
        'float32'
        >>> resolve_precision("mixed_float16")
        'mixed_float16'
    """
    Choices().check("precision", precision, "train.precision")
    if precision != "auto":
        return precision
    return "mixed_bfloat16" if (support or bfloat16_support()).native else "float32"


def precision_note(precision: str) -> str | None:
    """A line for the training log: what ``auto`` chose and why, or a warning when
    ``mixed_bfloat16`` is asked for on a machine that emulates bfloat16; else None."""
    if precision not in ("auto", "mixed_bfloat16"):
        return None
    support = bfloat16_support()
    if precision == "auto":
        return (f"train.precision=auto: {resolve_precision(precision, support)} "
                f"({'native bfloat16' if support.native else 'no native bfloat16'}: "
                f"{support.reason})")
    if support.native:
        return None
    return (f"warning: train.precision=mixed_bfloat16 on a machine without native bfloat16 "
            f"({support.reason}): TensorFlow emulates it, several times slower than "
            "float32; train.precision=auto picks float32 here")
