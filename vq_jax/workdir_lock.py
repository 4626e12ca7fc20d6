"""One training run per workdir: an exclusive lock held while `trainer.train` runs.

Two runs on one workdir would interleave checkpoints, the data position and metrics.jsonl, and
each would garbage-collect the other's steps. The lock is an `fcntl.flock` on
`WORKDIR/.lock.process_I` (one file per process index, so every process of a second
multi-process run finds its twin busy). The kernel releases it when the process ends, however
it ends (SIGKILL included), so a crashed run never leaves a stale lock; the file's text (pid,
host, start time) only serves the error message. On file systems without lock support the run
goes on with a warning.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import logging
import os
import socket
from types import TracebackType

from vq_jax.errors import UserError

logger = logging.getLogger(__name__)


class WorkdirBusyError(UserError):
    """Another live process trains in this workdir."""


class WorkdirLock:
    """Context manager: holds WORKDIR/.lock.process_I exclusively, or raises WorkdirBusyError."""

    def __init__(self, workdir: str, process_index: int = 0) -> None:
        self.workdir = workdir
        self.path = os.path.join(workdir, f".lock.process_{process_index}")
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1024, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise WorkdirBusyError(
                f"--workdir={self.workdir} is in use by another training run ({holder}); two runs "
                "on one workdir would overwrite each other's checkpoints. Wait for it to finish "
                "or stop it, or pass another --workdir."
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            logger.warning(
                "Cannot lock %s (%s); nothing stops a second run on this workdir.", self.path, e
            )
        started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Unlocks (the file stays: removing it would race with a run that just opened it)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:  # no lock support here (warned at acquire); closing is enough
                pass
            os.close(fd)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
