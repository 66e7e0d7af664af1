"""One run per directory: an exclusive lock file held for the whole ``fit``.

Two trainers writing one ``default_root_dir`` replace each other's step checkpoints, split
``last.ckpt`` between them and overwrite ``config.yaml``. The lock is ``flock`` on
``<dir>/.llama2-lightning.lock``: the kernel drops it when the holder exits however it exits
(SIGKILL included), so a crashed run never leaves a stale lock; the file only records who holds
it (pid, host, start time) for the error message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

LOCK_NAME = ".llama2-lightning.lock"


class RunDirectoryLocked(RuntimeError):
    """Another process holds the run directory."""


class RunLock:
    """``with RunLock(dir):`` fails at once with :class:`RunDirectoryLocked` naming the holder."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunDirectoryLocked(
                f"{self.directory} is in use by another run ({holder}); wait for it to finish, stop it, or give "
                "this run another trainer.default_root_dir"
            ) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def read_holder(directory: str | os.PathLike[str]) -> dict[str, object] | None:
    """The recorded holder of a directory's lock (whether or not it still runs), or None."""
    try:
        return json.loads((Path(directory) / LOCK_NAME).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw.decode())
        return f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "holder unknown"
