"""``tillsync archive export-dsfinvk`` refusals, on tills that upload through the real
broker and archive writer into PostgreSQL.

An incomplete closing is made with the till's own switches: in the custom mode with
receipt upload off, its Z-report is archived while its last receipt stays in the till's
outbox; switched back, the till uploads it and the export goes through. A receipt
number used twice comes from records made by hand, published as the till.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import uuid
import zipfile
from decimal import Decimal
from pathlib import Path

import pytest
from dsfinvk.validate import validate_zip
from typer.testing import CliRunner, Result

from shared.fiscal import PaymentType, VatKey
from shared.models import Cashier, CustomSyncFlags, SyncMode, Upload
from shared.topology import upload_routing_key
from tests.integration.test_masterdata_sync import join, new_account, stop
from tests.support import Environment, fetchval, publish_as_till, sell, wait_until
from till_agent.booking import SaleLine, closed_receipt, z_report
from till_agent.till import Till
from tillsync.cli import app
from tillsync.dsfinvk_export import IncompleteClosing, export_dsfinvk

pytestmark = pytest.mark.integration


async def export(env: Environment, *args: str) -> Result:
    """``tillsync archive export-dsfinvk ARGS`` against ``env``'s database (in a thread: the CLI runs its own loop)."""
    return await asyncio.to_thread(
        CliRunner().invoke, app, ["archive", "export-dsfinvk", *args],
        env={"TILLSYNC_DATABASE_URL": env.settings.database_url, "COLUMNS": "1000"},
    )


def refused(result: Result, *expected: str) -> list[str]:
    """Exit code 1, an ``error: ...`` line naming ``expected``; returns the stderr lines."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr
    return lines


async def archived(env: Environment, till: Till, kind: str, count: int) -> bool:
    """The archive holds ``count`` records of ``kind`` of ``till``."""
    return await fetchval(
        env, "select count(*) = $3 from archive_records where till_id = $1 and kind = $2", till.store.identity().till_id, kind,
        count,
    ) is True


async def test_refusals_name_the_till_the_range_and_the_missing_receipts(services, env: Environment, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    account = await new_account(env, tmp_path)
    other_account = await new_account(env, tmp_path)
    till = await join(env, tmp_path, account, SyncMode.ARCHIVE, "Kasse 1")
    namesake = await join(env, tmp_path, other_account, SyncMode.ARCHIVE, "Kasse 1", start=False)
    serial = till.store.identity().serial_number
    today = dt.datetime.now(dt.UTC).date()
    day = ["--from", str(today), "--to", str(today)]
    try:
        sell(till, 2)
        await wait_until(lambda: archived(env, till, "receipt", 2), what="the first receipts archived")
        await wait_until(lambda: till.status().pending == 0, what="the first receipts uploaded")
        await till.set_sync_mode(True, SyncMode.CUSTOM, CustomSyncFlags(upload_receipts=False))
        sell(till, 1)  # receipt 3 stays in the till's outbox
        till.close_day(today, dt.datetime.now(dt.UTC))
        await wait_until(lambda: archived(env, till, "zreport", 1), what="the Z-report archived")
        assert await archived(env, till, "receipt", 2)

        # the till: unknown, ambiguous (same name in two accounts), unknown account
        refused(await export(env, "--till", "Kasse 9", *day), "no till 'Kasse 9': name a till by its id, serial number or name")
        lines = refused(await export(env, "--till", "kasse 1", *day), "'kasse 1' names 2 tills", "--account")
        assert len(lines) == 3  # the candidates, one a line
        assert account in lines[1] + lines[2] and other_account in lines[1] + lines[2]
        refused(await export(env, "--till", "Kasse 1", "--account", "nobody@example.com", *day), "no account 'nobody@example.com'")
        lines = refused(await export(env, "--till", "Kasse 9", "--account", account, *day), f"no till 'Kasse 9' in account {account}", "the account's tills:")
        assert serial in lines[1]  # its tills are listed

        # the range: reversed, or without a Z-report
        refused(await export(env, "--till", serial, "--from", str(today), "--to", "2021-01-01"), "after it ends")
        refused(
            await export(env, "--till", serial, "--from", "2021-01-01", "--to", "2021-01-31"),
            "has no Z-report with a business day from 2021-01-01 to 2021-01-31", f"its Z-reports cover {today} to {today}",
        )

        # the closing's receipt 3 is not archived: refused, nothing written
        output = tmp_path / "export.zip"
        lines = refused(
            await export(env, "--till", "Kasse 1", "--account", account, *day, "--output", str(output)),
            "does not hold every receipt of 1 Z-report(s)", "tillsync archive status",
        )
        assert lines[1] == f"  - Z-report 1 (business day {today}, receipts 1..3): receipt(s) 3 missing"
        assert not output.exists() and not list(tmp_path.glob("*.part"))
        conn = await env.db()
        try:
            with pytest.raises(IncompleteClosing) as raised:
                await export_dsfinvk(conn, till.store.identity().till_id, today, today, output)  # type: ignore[arg-type]
        finally:
            await conn.close()
        assert raised.value.missing == {1: [3]}

        # receipts uploaded again: the till sends receipt 3 and the export goes through
        await till.set_sync_mode(True, SyncMode.ARCHIVE)
        await wait_until(lambda: archived(env, till, "receipt", 3), what="receipt 3 archived")
        result = await export(env, "--till", serial, *day, "--output", str(output))
        assert result.exit_code == 0, result.output
        assert "1 closing(s) (Z 1..1), 3 receipts, 3 lines" in result.stdout
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert validate_zip(str(output)) == []
        assert printed.getvalue() == ""
        with zipfile.ZipFile(output) as zf:
            assert zf.read("transactions.csv").count(b"\r\n") == 1 + 3
    finally:
        await stop(till, namesake)


async def test_a_receipt_number_archived_for_two_receipts_is_refused(services, env: Environment, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A faulty till reuses receipt number 1 for another receipt (records made by hand,
    published as the till): which one the Z-report counts is not for the export to guess."""
    account = await new_account(env, tmp_path)
    till = await join(env, tmp_path, account, SyncMode.ARCHIVE, "Kasse 1")
    identity = till.store.identity()
    assert identity.account_id and identity.till_id
    today = dt.datetime.now(dt.UTC).date()
    try:
        sell(till, 1)
        await wait_until(lambda: archived(env, till, "receipt", 1), what="receipt 1 archived")
        at = dt.datetime.now(dt.UTC)
        again = closed_receipt(
            receipt_number=1, lines=[SaleLine("1", "Brot", Decimal(1), 250, VatKey.REDUCED)], payment_type=PaymentType.CASH,
            payment_name="Bar", cashier=Cashier(cashier_id="1", name="Anna"), opened_at=at, closed_at=at, business_day=today,
        )
        prev = "0" * 64  # hand-made, far after the till's own records: linked to a made-up predecessor
        for seq, record in ((100, again), (101, z_report(1, today, [again], at))):
            u = Upload.sealed(prev, record_id=uuid.uuid4(), account_id=identity.account_id, till_id=identity.till_id,
                              till_seq=seq, recorded_at=at, record=record)
            prev = u.chain_hash
            await publish_as_till(env, till, u.model_dump_json().encode(), upload_routing_key(u.account_id, u.till_id, u.record.kind))
        await wait_until(lambda: archived(env, till, "zreport", 1), what="the Z-report archived")
        refused(
            await export(env, "--till", identity.serial_number, "--from", str(today), "--to", str(today)),
            "receipt number(s) 1 of till Kasse 1", "archived for different receipts",
        )
    finally:
        await stop(till)
