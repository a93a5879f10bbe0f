"""The store's sync lock: one syncing process per till store, the refusal names the holder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from till_agent.sync_lock import SYNC_LOCK_FILE, StoreInUse, SyncLock

pytestmark = pytest.mark.unit


def test_second_holder_is_refused_naming_the_first_until_it_releases(tmp_path: Path) -> None:
    first, second = SyncLock(tmp_path), SyncLock(tmp_path)
    first.acquire()
    first.acquire()  # held already: no-op
    with pytest.raises(StoreInUse, match=rf"synced by another process \(pid {os.getpid()}: "):
        second.acquire()
    assert not second.held
    first.release()
    assert (tmp_path / SYNC_LOCK_FILE).read_text() == ""
    second.acquire()
    assert second.held
    second.release()
    second.release()  # not held: no-op
