"""One running peer per data dir: an exclusive lock on ``DATA_DIR/lock``.

Two peers on one data dir would share one peer ID (the key), one ledger and one control socket. The lock is
an ``flock`` on a file holding the owner's PID: the kernel drops it when the process exits, however it
exits, so a lock left behind by a crashed peer is stale by construction and simply taken over (and logged).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from .errors import P2PInferError
from .log import get_logger

log = get_logger("p2pinfer.datadir")

LOCK_FILE = "lock"


class DataDirInUse(P2PInferError):
    """Another running process holds the data dir."""


class DataDirLock:
    """``with DataDirLock(data_dir):`` — raises :class:`DataDirInUse` if another process holds it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(fd)
            os.close(fd)
            raise DataDirInUse(
                f"data dir {self.data_dir} is in use by another running p2pinfer process"
                f"{f' (pid {owner})' if owner else ''}; stop it, or give this one its own --data-dir") from None
        previous = _read_pid(fd)
        if previous and previous != os.getpid():
            log.info("datadir.stale_lock_taken", path=str(self.path), previous_pid=previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            finally:
                os.close(self._fd)  # closing the descriptor drops the flock
                self._fd = None

    def __enter__(self) -> "DataDirLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
