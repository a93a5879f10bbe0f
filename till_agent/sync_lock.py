"""One syncing process per till store: an exclusive lock on ``<data_dir>/sync.lock``.

The process that syncs a till (uploads its outbox and consumes its queue
``till.<till_id>``) holds an ``fcntl.flock`` on the lock file for as long as it syncs.
Two syncing processes over one store would be competing consumers of the till's one
queue: each would receive only part of the master-data feed and of the answers to its
own catch-up requests. A second process that tries to sync is refused with
``StoreInUse`` naming the process that holds the lock. Recording (selling, closing the
day, master-data changes) from other processes stays possible meanwhile: SQLite
serialises those writes (``begin immediate``) and the syncing process uploads them.
The operating system drops the lock when the process ends, also on SIGKILL.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from till_agent.db import TillStoreError

SYNC_LOCK_FILE = "sync.lock"


class StoreInUse(TillStoreError):
    """Another process syncs this till's store; the message names it (pid and command)."""


class SyncLock:
    """The sync lock of the till store in ``data_dir`` (not held until ``acquire()``)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / SYNC_LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock without waiting and note this process (pid and command line) in
        the file. No-op if held already. Raises ``StoreInUse`` naming the process that
        holds it, ``OSError`` if the file cannot be opened."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "pid unknown: it is just starting"
            os.close(fd)
            raise StoreInUse(
                f"the till in {self.path.parent} is synced by another process ({holder}); only one process at a "
                "time may upload a till's records and receive its queue. Stop that process or wait until it has "
                "finished; selling and the other local commands work meanwhile"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (no-op if not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
