"""SQLite helpers of the till's local store."""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from typing import Iterator


class TillStoreError(RuntimeError):
    """The local store is missing, not initialised, or asked for something impossible."""


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One SQLite transaction; inside an open one (``TillStore.batch``) it is part of that."""
    if db.in_transaction:
        yield
        return
    db.execute("begin immediate")
    try:
        yield
    except BaseException:
        db.execute("rollback")
        raise
    db.execute("commit")
