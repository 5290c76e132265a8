"""One training at a time per run directory: :class:`RunLock` (no TensorFlow import, so
another process can test the lock cheaply)."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class RunLock:
    """An exclusive lock on a run directory (``run_dir/.lock``) for one training at a time.

    ``acquire()`` raises RuntimeError naming the run directory and the PID holding it.
    With ``fcntl`` it is an ``flock`` on the file (the kernel frees it when the process
    dies, however it dies); without (Windows), the file is created with ``O_EXCL`` and
    holds the PID, and a lock whose PID is no longer running is taken over as stale.

    Example:
        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp())
        >>> first = RunLock(run).acquire()
        >>> RunLock(run).acquire()
        Traceback (most recent call last):
        ...
        RuntimeError: ... is in use by another training (PID ...); ...
        >>> first.release(); RunLock(run).acquire().release()
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        try:
            import fcntl
        except ImportError:  # no flock: an O_EXCL file holding the PID
            self._acquire_exclusive_file()
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise self._in_use(holder) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _acquire_exclusive_file(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self.path.read_text(errors="replace").strip()
                if holder.isdigit() and not _pid_alive(int(holder)):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise self._in_use(holder or "unknown") from None
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return
        raise self._in_use("unknown")

    def _in_use(self, holder: str) -> RuntimeError:
        return RuntimeError(f"{self.run_dir} is in use by another training (PID {holder}); "
                            f"wait for it to finish or use another --run-dir (lock file "
                            f"{self.path})")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            import fcntl
        except ImportError:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            return
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __del__(self):
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True
