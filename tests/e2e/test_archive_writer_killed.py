"""SIGKILL of the archive writer in the middle of the replay, then a restart: 0 missing, 0 duplicated."""

from __future__ import annotations

import asyncio
import io

import pytest
from rich.console import Console

from tests.support import BAKERY_CSV, wait_until
from tillsync.bakery import read_export
from tillsync.demo import run_demo

pytestmark = pytest.mark.e2e


async def test_archive_writer_killed_mid_replay_loses_and_duplicates_nothing(fresh_env, service_processes) -> None:  # type: ignore[no-untyped-def]
    for process in service_processes.values():
        process.start()
    for process in service_processes.values():
        await process.wait_ready()
    writer = service_processes["archive-writer"]
    export = read_export(BAKERY_CSV)
    expected_records = len(export.tickets)  # at least; plus master data and Z-reports
    killed_at: list[int] = []

    async def archived() -> int:
        conn = await fresh_env.db()
        try:
            return await conn.fetchval("select count(*) from archive_records")
        finally:
            await conn.close()

    async def kill_then_restart() -> None:
        await wait_until(lambda: _at_least(archived(), 300), timeout_seconds=120, interval=0.02, what="300 archived records")
        writer.kill()  # SIGKILL: no ack, no commit of the batch in flight
        killed_at.append(await archived())
        await asyncio.sleep(2)  # tills keep uploading into the queue meanwhile
        writer.start()
        await writer.wait_ready()

    chaos = asyncio.create_task(kill_then_restart())
    report = await run_demo(fresh_env.settings, BAKERY_CSV, console=Console(file=io.StringIO()), start_services=False)
    await chaos
    assert killed_at and killed_at[0] < expected_records, "the writer was not killed in the middle of the replay"
    assert writer.process is not None and writer.process.poll() is None  # the restarted writer runs
    assert report.missing == 0
    assert report.duplicates == 0
    assert report.receipts_archived == report.receipts_in_input == len(export.tickets)
    assert report.ok
    conn = await fresh_env.db()
    try:
        total = await conn.fetchval("select count(*) from archive_records")
        distinct = await conn.fetchval("select count(distinct (till_id, till_seq)) from archive_records")
        receipts = await conn.fetchval("select count(distinct payload->'record'->>'receipt_id') from archive_records where kind = 'receipt'")
        conflicts = await conn.fetchval("select count(*) from archive_conflicts")
    finally:
        await conn.close()
    assert report.records_expected == report.records_archived == (
        report.receipts_in_input + report.zreports_expected + report.masterdata_expected
        + report.shared_receipts_closed + report.receipt_events_archived
    )
    # the password-reset scene's sales come after the archive was compared
    assert total == distinct == report.records_expected + report.sales_while_signed_out_archived
    assert receipts == len(export.tickets) + len(report.receipts_not_in_input)
    assert conflicts == 0


async def _at_least(value, minimum: int) -> bool:  # type: ignore[no-untyped-def]
    return (await value) >= minimum
