"""Two till-agent processes over the same local store (same data directory).

Only one process at a time may sync a till (upload its outbox, consume its queue): a
second ``tillsync till sync`` is refused with a message naming the process that syncs
(``till_agent.sync_lock``), while other processes may go on selling
(``tillsync till sell``). Afterwards the archive equals what the till recorded.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from shared.models import SyncMode
from tests.faults.chaos import assert_archive_equals_recorded
from tests.support import new_account_name, sell, signed_in_till, wait_until
from till_agent.sync_lock import SYNC_LOCK_FILE
from tillsync.bakery import read_export

pytestmark = pytest.mark.fault

REFUSAL = re.compile(r"synced by another process \(pid (\d+)")


async def _tillsync(env_vars: dict[str, str], *args: str) -> tuple[int, str]:
    """Run ``tillsync <args>`` as its own process; returns (exit code, output)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tillsync.cli", *args,
        env={**os.environ, **env_vars, "COLUMNS": "400", "TILLSYNC_LOG_LEVEL": "WARNING"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode(errors="replace")


async def test_second_sync_process_is_refused_while_sales_from_other_processes_are_kept(  # type: ignore[no-untyped-def]
    env, services, replay_csv: Path, tmp_path: Path
) -> None:
    export = read_export(replay_csv)
    article = sorted(export.articles.values(), key=lambda a: a.article_nr)[0]
    till = await signed_in_till(env, tmp_path, new_account_name(), create=True)
    await till.set_sync_mode(True, SyncMode.ARCHIVE_MASTERDATA_RECEIPTS)
    till.save_entity(article, export.tickets[0].at)
    data_dir = till.store.data_dir
    env_vars = {"TILLSYNC_CLOUD_AMQP_URL": env.signup_url}
    sync = ("till", "sync", "--timeout", "90", "--data-dir", str(data_dir))
    sell_one = ("till", "sell", f"{article.article_nr}:1", "--data-dir", str(data_dir))

    # this test process syncs the till and sells; other processes sell and try to sync
    till.start_sync()
    try:
        assert f"pid {os.getpid()}" in (data_dir / SYNC_LOCK_FILE).read_text()

        async def sell_here() -> None:
            for _ in range(10):
                sell(till, 20)
                await asyncio.sleep(0.05)

        (code, output), *sales, _ = await asyncio.gather(
            _tillsync(env_vars, *sync), _tillsync(env_vars, *sell_one), _tillsync(env_vars, *sell_one), sell_here()
        )
        assert code == 1, f"a second syncing process was not refused:\n{output}"
        named = REFUSAL.search(output)
        assert named and int(named.group(1)) == os.getpid(), f"the refusal does not name the syncing process:\n{output}"
        assert all(c == 0 for c, _ in sales), f"selling from another process failed: {sales}"
        await wait_until(lambda: till.status().pending == 0, 60, what="the syncing till uploading every sale")
    finally:
        await till.stop_sync()
        till.close()

    # two syncs started at once (plus a sale): at most one is refused, and only for the other
    first, second, sold = await asyncio.gather(_tillsync(env_vars, *sync), _tillsync(env_vars, *sync), _tillsync(env_vars, *sell_one))
    outputs = f"--- first ({first[0]}):\n{first[1]}\n--- second ({second[0]}):\n{second[1]}"
    assert sold[0] == 0, sold[1]
    assert 0 in (first[0], second[0]), f"neither sync worked:\n{outputs}"
    for code, output in (first, second):
        assert code == 0 or REFUSAL.search(output), f"a sync failed for another reason than the other sync:\n{outputs}"
    final = await _tillsync(env_vars, *sync)  # uploads a sale made after the syncs finished
    assert final[0] == 0, final[1]
    assert not (data_dir / SYNC_LOCK_FILE).read_text(), "a finished sync left its note in the lock file"

    comparison = await assert_archive_equals_recorded(env, [data_dir], "two till-agent processes over one store")
    assert comparison.recorded == 1 + 200 + 3  # the article, the sales of this process and of the others
