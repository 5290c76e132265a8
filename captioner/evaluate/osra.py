"""OSRA, the rule-based optical structure recognition program, as a baseline reader.

:func:`read_images` runs ``osra`` (Debian/Ubuntu: ``apt-get install osra``) on image
files, one process per image (``osra`` takes exactly one file per call), ``workers`` of
them at a time, each with a timeout. How its output becomes one prediction per image:

* ``osra FILE`` prints one SMILES per structure it recognised, one per line (nothing
  when it finds none). The first whitespace-separated field of every non-empty line is a
  structure (:func:`parse_osra_output`).
* Each of our images shows one molecule, so all the structures OSRA found in it are its
  answer for that molecule: they are joined with ``"."`` (one multi-fragment SMILES;
  usually there is exactly one). No structure gives ``""``, which the SMILES metrics
  count as invalid (no answer).
* A non-zero exit status, a timeout or a program that cannot start gives ``""`` too,
  with the reason in :attr:`OsraResult.error`; it never stops the other images.

A missing program raises :class:`OsraUnavailable` before anything runs. ``osra`` runs
without the ``BABEL_*`` environment variables (:func:`osra_environment`): importing Open
Babel's Python package points them at its own plugins, and OSRA's Open Babel (the system
library) then prints nothing or aborts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROGRAM = "osra"


class OsraUnavailable(RuntimeError):
    """The ``osra`` program is not installed (or not on ``PATH``)."""


@dataclass(frozen=True)
class OsraResult:
    """OSRA's answer for one image.

    ``structures`` are the SMILES it printed (one per recognised structure), ``smiles``
    their ``"."``-join (``""``: no answer), ``error`` why it failed (``None`` when it ran
    to the end, even if it found nothing) and ``seconds`` the wall time of the call.

    Example:
        >>> OsraResult("a.png", ("CCO", "O"), 0.1).smiles
        'CCO.O'
    """

    image: str
    structures: tuple[str, ...]
    seconds: float
    error: str | None = None

    @property
    def smiles(self) -> str:
        return ".".join(self.structures)


@dataclass(frozen=True)
class OsraReadings:
    """:func:`read_images`' answers, in the order of the images, and how long they took.

    ``seconds_per_image`` is the mean wall time of one ``osra`` call; ``wall_seconds``
    the whole run with ``workers`` calls at a time.

    Example:
        >>> r = OsraReadings([OsraResult("a.png", ("CCO",), 0.2),
        ...                   OsraResult("b.png", (), 0.4, "timeout after 30 s")], 0.5, 2,
        ...                  "osra", "2.1.3")
        >>> r.smiles, r.failed, r.no_answer, round(r.seconds_per_image, 3)
        (['CCO', ''], 1, 1, 0.3)
    """

    results: list[OsraResult]
    wall_seconds: float
    workers: int
    program: str
    version: str | None

    @property
    def smiles(self) -> list[str]:
        return [r.smiles for r in self.results]

    @property
    def failed(self) -> int:
        """Images where ``osra`` failed (exit status, timeout, could not start)."""
        return sum(r.error is not None for r in self.results)

    @property
    def no_answer(self) -> int:
        """Images without a prediction: failures plus runs that found no structure."""
        return sum(not r.structures for r in self.results)

    @property
    def seconds_per_image(self) -> float | None:
        if not self.results:
            return None
        return sum(r.seconds for r in self.results) / len(self.results)

    def summary(self) -> dict[str, Any]:
        """How the run went, for ``metrics.json``: name, program, version, timings (mean
        seconds per ``osra`` call, wall seconds, images per wall second), workers, the
        numbers of failures and of images without an answer, and up to 10 distinct errors.

        Example:
            >>> r = OsraReadings([OsraResult("a.png", ("CCO",), 0.25)], 0.5, 1, "/usr/bin/osra",
            ...                  "2.1.3")
            >>> s = r.summary()
            >>> s["name"], s["seconds_per_image"], s["images_per_s"], s["failed"]
            ('OSRA 2.1.3', 0.25, 2.0, 0)
        """
        return {"name": f"OSRA {self.version}" if self.version else "OSRA",
                "program": self.program, "version": self.version,
                "seconds_per_image": self.seconds_per_image, "wall_seconds": self.wall_seconds,
                "images_per_s": len(self.results) / max(self.wall_seconds, 1e-9),
                "workers": self.workers, "failed": self.failed, "no_answer": self.no_answer,
                "errors": sorted({r.error for r in self.results if r.error})[:10]}


def osra_program() -> str:
    """The path of the ``osra`` program, or :class:`OsraUnavailable` saying how to get it."""
    path = shutil.which(PROGRAM)
    if path is None:
        raise OsraUnavailable(f"the '{PROGRAM}' program is not on PATH (Debian/Ubuntu: "
                              f"apt-get install {PROGRAM})")
    return path


def osra_version(program: str) -> str | None:
    """The version ``osra --version`` prints (e.g. ``"2.1.3"``), None if it says none.

    Example:
        >>> osra_version("/nonexistent/osra") is None
        True
    """
    try:
        out = subprocess.run([program, "--version"], capture_output=True, text=True,
                             timeout=30, env=osra_environment()).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "version" in line:
            return line.split("version", 1)[1].strip(" :") or None
    return None


def parse_osra_output(stdout: str) -> tuple[str, ...]:
    """The structures in ``osra``'s standard output: the first field of each non-empty
    line (later fields, printed by options such as ``-p``, are dropped).

    Example:
        >>> parse_osra_output("Oc1ccccc1\\n")
        ('Oc1ccccc1',)
        >>> parse_osra_output("CCO 0.95\\n\\n[Na+] 0.40\\n"), parse_osra_output("")
        (('CCO', '[Na+]'), ())
    """
    return tuple(line.split()[0] for line in stdout.splitlines() if line.strip())


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def osra_environment() -> dict[str, str]:
    """This process's environment without ``BABEL_*`` variables (Open Babel's plugin and
    data folders, which belong to the Python package's Open Babel, not OSRA's).

    Example:
        >>> os.environ["BABEL_LIBDIR"] = "/site-packages/openbabel/lib"
        >>> "BABEL_LIBDIR" in osra_environment(), "PATH" in osra_environment()
        (False, True)
        >>> del os.environ["BABEL_LIBDIR"]
    """
    return {k: v for k, v in os.environ.items() if not k.startswith("BABEL_")}


def read_image(path: str | Path, program: str, timeout: float = 30.0) -> OsraResult:
    """Run ``osra`` on one image file; failures come back as an empty result with its
    ``error`` (``exit status N: <last stderr line>``, ``timeout after T s``, ...)."""
    started = time.perf_counter()
    try:
        proc = subprocess.run([program, str(path)], capture_output=True, text=True,
                              timeout=timeout, env=osra_environment())
    except subprocess.TimeoutExpired:  # run() has killed the process
        return OsraResult(str(path), (), time.perf_counter() - started,
                          f"timeout after {timeout:g} s")
    except OSError as exc:
        return OsraResult(str(path), (), time.perf_counter() - started,
                          f"could not run {program}: {exc}")
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        detail = _last_line(proc.stderr) or _last_line(proc.stdout)
        return OsraResult(str(path), (), seconds, f"exit status {proc.returncode}: {detail}")
    return OsraResult(str(path), parse_osra_output(proc.stdout), seconds)


def read_images(paths: Sequence[str | Path], workers: int | None = None,
                timeout: float = 30.0, program: str | None = None) -> OsraReadings:
    """OSRA's answer for every image in ``paths`` (same order), ``workers`` ``osra``
    processes at a time (default: the number of CPUs).

    Raises :class:`OsraUnavailable` when ``program`` (default: ``osra`` on ``PATH``) is
    missing; anything that goes wrong with one image only empties that image's answer.
    """
    program = program or osra_program()
    if shutil.which(program) is None:
        raise OsraUnavailable(f"{program} is not an executable program (Debian/Ubuntu: "
                              f"apt-get install {PROGRAM})")
    workers = max(1, workers or os.cpu_count() or 1)
    started = time.perf_counter()
    # Threads only wait: the work happens in the osra processes they start.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda p: read_image(p, program, timeout), paths))
    return OsraReadings(results, time.perf_counter() - started, workers, program,
                        osra_version(program))
