"""Shared open receipts on the command line: two tills (two data directories) through the
real receipt handover router, broker and database."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from pathlib import Path
from uuid import UUID

import pytest
from typer.testing import CliRunner, Result

from shared.models import SyncMode
from services.account_service.main import main as account_service_main
from services.archive_writer.main import main as archive_writer_main
from services.masterdata_broadcaster.main import main as broadcaster_main
from tests.integration.conftest import RunningServices
from tests.integration.test_masterdata_sync import join, new_account, stop
from tests.support import Environment, fetchval, wait_until
from tillsync.cli import app

pytestmark = pytest.mark.integration

RECEIPTS = SyncMode.ARCHIVE_MASTERDATA_RECEIPTS


async def cli_till(env: Environment, tmp_path: Path, account: str, name: str, mode: SyncMode = RECEIPTS) -> Path:
    """A new till signed in to ``account`` in ``mode``, used from here on by the CLI only; its data directory."""
    till = await join(env, tmp_path, account, mode, name, start=False)
    data_dir = till.store.data_dir
    await stop(till)
    return data_dir


async def run(env: Environment, data_dir: Path, *args: str) -> Result:
    """``tillsync till ARGS --data-dir DATA_DIR`` against ``env`` (in a thread: the CLI runs its own event loop)."""
    return await asyncio.to_thread(
        CliRunner().invoke,
        app,
        ["till", *args, "--data-dir", str(data_dir)],
        env={"TILLSYNC_CLOUD_AMQP_URL": env.signup_url, "TILLSYNC_DATABASE_URL": env.settings.database_url, "COLUMNS": "1000"},
    )


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def fails(result: Result, *expected: str) -> str:
    """The command failed with exit code 1 and one line ``error: ...`` (on stderr) naming ``expected``.

    (stdout is not checked to be empty: the services of this test process log there.)"""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def opened_id(output: str) -> str:
    match = re.search(r"receipt ([0-9a-f-]{36}) opened", output)
    assert match, output
    return match.group(1)


def row_of(output: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is ``first_cell``."""
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in\n{output}")


async def with_articles(env: Environment, first: Path, *others: Path) -> None:
    """Beer (3.50) and wine (5.00) saved on ``first`` and received by ``others`` through the cloud."""
    ok(await run(env, first, "add-article", "--nr", "B1", "--text", "Bier", "--price-cents", "350", "--vat-key", "1"))
    ok(await run(env, first, "add-article", "--nr", "W1", "--text", "Wein", "--price-cents", "500", "--vat-key", "1"))
    ok(await run(env, first, "sync"))
    for other in others:
        ok(await run(env, other, "sync"))
        assert "Bier" in ok(await run(env, other, "masterdata", "article"))


async def test_a_table_opened_on_one_till_is_paid_on_another(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    a = await cli_till(env, tmp_path, account, "Kasse A")
    b = await cli_till(env, tmp_path, account, "Kasse B")
    await with_articles(env, a, b)

    receipt_id = opened_id(ok(await run(env, a, "open-table", "5")))
    short = receipt_id[:8]
    added = ok(await run(env, a, "add", "table:5", "B1:2", "W1:1"))
    line_ids = re.findall(r"line ([0-9a-f]{8}):", added)
    assert len(line_ids) == 2 and "2 × Bier à 3.50 = 7.00 EUR" in added and "total 12.00 EUR" in added, added
    before_sync = ok(await run(env, a, "receipt", short))
    assert [row_of(before_sync, i)[-2:] for i in line_ids] == [["Kasse A", "waiting"]] * 2, before_sync
    assert "(the opening is not confirmed by the router yet)" in before_sync
    assert "3 event(s) of this till wait for the router" in before_sync

    synced = ok(await run(env, a, "sync"))
    assert "in sync" in synced and "shared receipts up to date (1 open)" in synced, synced
    assert await fetchval(env, "select total from handover_receipts where receipt_id = $1", UUID(receipt_id)) == 1200

    ok(await run(env, b, "sync"))
    listed = ok(await run(env, b, "receipts"))
    assert row_of(listed, short) == [short, "5", "2", "12.00", "0", "Kasse A"], listed
    paid = ok(await run(env, b, "pay", "table:5", "--card"))
    assert f"receipt {short} (table 5): 12.00 EUR paid (ECKarte)" in paid, paid

    # A has not heard of the payment yet and books one more beer onto the table
    late = ok(await run(env, a, "add", short, "B1:1"))
    [late_line] = re.findall(r"line ([0-9a-f]{8}):", late)

    ok(await run(env, b, "sync"))
    on_b = ok(await run(env, b, "receipt", receipt_id))
    assert "status: closed: paid on Kasse B" in on_b and "receipt number: 1 (this till's)" in on_b, on_b

    synced = ok(await run(env, a, "sync"))
    assert "1 notices (1 new): `tillsync till notices`" in synced, synced
    on_a = ok(await run(env, a, "receipt", "table:5"))  # no open receipt: the table's last closed one
    assert f"receipt {receipt_id}" in on_a and "status: closed: paid on Kasse B" in on_a, on_a
    assert "total: 12.00 EUR" in on_a and late_line not in on_a
    for line_id, (text, qty, price, amount) in zip(line_ids, [("Bier", "2", "3.50", "7.00"), ("Wein", "1", "5.00", "5.00")]):
        assert row_of(on_a, line_id)[2:] == [text, qty, price, amount, "Kasse A", "confirmed"], on_a
    notices = ok(await run(env, a, "notices"))
    assert "receipt_closed" in notices and "line 'Bier' 1 × 3.50 EUR on receipt" in notices and "was paid on till Kasse B" in notices, notices
    assert "0 events waiting for the router, 1 notices" in ok(await run(env, a, "status"))
    fails(await run(env, a, "pay", short), "was paid on till Kasse B", "a closed receipt cannot change")
    assert await fetchval(
        env,
        "select code from handover_refusals r join tills t using (till_id) join accounts a on a.account_id = r.account_id "
        "where t.till_name = 'Kasse A' and a.account_name = $1",
        account,
    ) == "receipt_closed"

    # B's closed receipt and its Z-report reach A
    ok(await run(env, b, "close-day"))
    ok(await run(env, b, "sync"))

    async def others_on_a() -> str | None:
        ok(await run(env, a, "sync"))
        shown = ok(await run(env, a, "others"))
        return shown if "1 Z-reports of other tills" in shown and "1 receipts of other tills" in shown else None

    shown = await wait_until(others_on_a, timeout_seconds=30, interval=0.5, what="B's receipt and Z-report on A")
    zreports, receipts = shown.split("receipts of other tills")
    assert row_of(zreports, "Kasse B") == ["Kasse B", "1", dt.datetime.now(dt.UTC).date().isoformat(), "1", "12.00"], shown
    closed = row_of(receipts, "Kasse B")
    assert closed[:4] == ["Kasse B", "1", short, "closed"] and closed[5:] == ["2", "12.00", "EC-Karte"], shown


async def test_lines_are_voided_split_off_and_the_table_moved(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    a = await cli_till(env, tmp_path, account, "Kasse A")
    await with_articles(env, a)
    receipt_id = opened_id(ok(await run(env, a, "open-table", "3", "--cashier", "2")))
    _, wine, more_beer = re.findall(r"line ([0-9a-f]{8}):", ok(await run(env, a, "add", "table:3", "B1:1", "W1:2", "B1:3")))
    assert "total 14.00 EUR" in ok(await run(env, a, "void", "table:3", wine))
    split = ok(await run(env, a, "split", receipt_id, "new", more_beer))
    new_id = re.search(r"to receipt ([0-9a-f-]{36})", split).group(1)  # type: ignore[union-attr]
    assert "1 line(s) (10.50 EUR) moved" in split and "total now 3.50 EUR" in split, split
    ok(await run(env, a, "move-table", receipt_id[:8], "4"))
    fails(await run(env, a, "move-table", receipt_id[:8]), "give the new TABLE, or --no-table")
    fails(await run(env, a, "void", receipt_id[:8], wine), f"no line {wine} on receipt {receipt_id[:8]}")

    ok(await run(env, a, "sync"))
    listed = ok(await run(env, a, "receipts"))
    assert row_of(listed, receipt_id[:8]) == [receipt_id[:8], "4", "1", "3.50", "0", "Kasse A"], listed
    assert row_of(listed, new_id[:8]) == [new_id[:8], "-", "1", "10.50", "0", "Kasse A"], listed
    conn = await env.db()
    try:
        rows = {
            r["receipt_id"]: r
            for r in await conn.fetch(
                "select receipt_id, table_nr, total, status from handover_receipts where receipt_id = any($1::uuid[])",
                [UUID(receipt_id), UUID(new_id)],
            )
        }
        moved = await conn.fetchval(
            "select receipt_id from handover_lines where (line ->> 'line_id') like $1", more_beer[:8] + "%"
        )
    finally:
        await conn.close()
    assert (rows[UUID(receipt_id)]["table_nr"], rows[UUID(receipt_id)]["total"]) == ("4", 350)
    assert (rows[UUID(new_id)]["table_nr"], rows[UUID(new_id)]["total"]) == (None, 1050)
    assert moved == UUID(new_id)

    ok(await run(env, a, "pay", "table:4"))
    ok(await run(env, a, "pay", new_id[:8], "--card"))
    # closing the day before the payments are accepted: said, and they go into the next Z-report
    closed = await run(env, a, "close-day")
    assert closed.exit_code == 0 and "Z-report 1" in closed.stdout, closed.output
    assert "warning: 2 payment(s) of shared receipts" in closed.stderr and "into the next one" in closed.stderr
    ok(await run(env, a, "sync"))
    second = ok(await run(env, a, "close-day"))
    assert "Z-report 2" in second and "2 receipts, 14.00 EUR" in second, second
    assert "no open shared receipts" in ok(await run(env, a, "receipts"))
    every = ok(await run(env, a, "receipts", "--all"))
    assert row_of(every, receipt_id[:8])[-1] == "closed" and row_of(every, new_id[:8])[-1] == "closed", every
    numbers = {ok(await run(env, a, "receipt", r)).split("receipt number: ")[1].split()[0] for r in (receipt_id, new_id)}
    assert numbers == {"1", "2"}


async def test_bad_input_is_one_clear_line(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    a = await cli_till(env, tmp_path, account, "Kasse A")
    archive_only = await cli_till(env, tmp_path, account, "Kasse M", SyncMode.ARCHIVE_MASTERDATA)
    await with_articles(env, a, archive_only)
    receipt_id = opened_id(ok(await run(env, a, "open-table", "9")))
    ok(await run(env, a, "add", receipt_id, "B1:1"))

    fails(await run(env, a, "receipt", "deadbeef"), "this till knows no shared receipt deadbeef")
    fails(await run(env, a, "add", "abc", "B1:1"), "'abc' is no receipt id", "first 8 hex digits")
    fails(await run(env, a, "pay", "table:10"), "this till knows no open receipt for table 10")
    fails(await run(env, a, "add", "table:9", "B1:x"), "quantity must be a number")
    fails(await run(env, a, "add", "table:9", "B1:1", "ZZ:1"), "known article number")
    fails(await run(env, a, "add", "table:9", "B1:1", "B1:0"), "quantity must not be 0")
    fails(await run(env, a, "open-table", "9"), "table 9 already has open receipt " + receipt_id)
    # nothing of a refused command was recorded
    shown = ok(await run(env, a, "receipt", "table:9"))
    assert "1 lines" in shown and "total: 3.50 EUR" in shown and "2 event(s) of this till wait for the router" in shown, shown

    ok(await run(env, a, "pay", "table:9"))
    fails(await run(env, a, "pay", receipt_id[:8]), "is being paid on this till")
    ok(await run(env, a, "sync"))
    fails(await run(env, a, "pay", receipt_id[:8]), "was paid on this till", "a closed receipt cannot change")
    fails(await run(env, a, "add", receipt_id[:8], "B1:1"), "a closed receipt cannot change")
    fails(await run(env, archive_only, "open-table", "1"), "does not hand over receipts", "archive_masterdata_receipts")
    fails(await run(env, archive_only, "pay", "table:9"), "does not hand over receipts")


async def test_a_table_opened_twice_leaves_a_notice_and_one_receipt(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    a = await cli_till(env, tmp_path, account, "Kasse A")
    b = await cli_till(env, tmp_path, account, "Kasse B")
    await with_articles(env, a, b)
    # both open table 7 before either has synced
    on_a = opened_id(ok(await run(env, a, "open-table", "7")))
    ok(await run(env, a, "add", "table:7", "B1:1"))
    on_b = opened_id(ok(await run(env, b, "open-table", "7")))
    ok(await run(env, b, "add", "table:7", "B1:2"))
    assert "no notices" in ok(await run(env, b, "notices"))

    ok(await run(env, a, "sync"))
    synced = ok(await run(env, b, "sync"))
    assert "1 notices (1 new)" in synced, synced
    notices = ok(await run(env, b, "notices"))
    assert "table_taken" in notices and f"table 7 already has open receipt {on_a}" in notices, notices
    assert f"its lines were booked onto receipt {on_a}" in notices
    listed = ok(await run(env, b, "receipts"))
    assert row_of(listed, on_a[:8]) == [on_a[:8], "7", "2", "10.50", "0", "Kasse A"] and on_b[:8] not in listed, listed
    own = ok(await run(env, b, "receipt", on_b[:8]))
    assert f"status: not opened: another till had opened its table first; its table is on receipt {on_a}" in own, own
    fails(await run(env, b, "add", on_b[:8], "B1:1"), "was not opened")
    assert "1 open, 0 events waiting for the router, 1 notices" in ok(await run(env, b, "status"))

    ops = await asyncio.to_thread(
        CliRunner().invoke, app, ["ops", "receipt-refusals", account],
        env={"TILLSYNC_DATABASE_URL": env.settings.database_url, "COLUMNS": "1000"},
    )
    assert ops.exit_code == 0, ops.output
    refusal = next(line for line in ops.output.splitlines() if "table_taken" in line)
    assert "Kasse B" in refusal and on_b in refusal and "opened" in refusal and "already has open receipt" in refusal, ops.output
    assert "receipt numbers used twice" not in ops.output
    none = await asyncio.to_thread(
        CliRunner().invoke, app, ["ops", "receipt-refusals", "nobody@example.com"],
        env={"TILLSYNC_DATABASE_URL": env.settings.database_url},
    )
    assert none.exit_code == 0 and "no refused receipt events for nobody@example.com" in none.output, none.output


async def test_till_sync_says_when_the_router_does_not_answer(fresh_env: Environment, tmp_path: Path) -> None:
    """Every service but the receipt handover router runs: the events are uploaded, no verdict comes."""
    cloud = RunningServices(fresh_env)
    cloud.tasks = [
        asyncio.create_task(account_service_main(cloud.account_settings, cloud.stop)),
        asyncio.create_task(archive_writer_main(cloud.writer_settings, cloud.stop)),
        asyncio.create_task(broadcaster_main(cloud.broadcaster_settings, cloud.stop)),
    ]
    try:
        account = await new_account(fresh_env, tmp_path)
        a = await cli_till(fresh_env, tmp_path, account, "Kasse A")
        quiet = await cli_till(fresh_env, tmp_path, account, "Kasse B")
        ok(await run(fresh_env, a, "add-article", "--nr", "B1", "--text", "Bier", "--price-cents", "350"))
        ok(await run(fresh_env, a, "open-table", "1"))
        ok(await run(fresh_env, a, "add", "table:1", "B1:1"))

        result = await run(fresh_env, a, "sync", "--timeout", "3")
        assert result.exit_code == 1, result.output
        [last] = result.stderr.strip().splitlines()
        assert last.startswith("error: not in sync: ") and "records not uploaded" not in last, result.output
        assert "2 receipt events await the receipt handover router; is it running?" in last, result.output
        assert "2 events waiting for the router" in ok(await run(fresh_env, a, "status"))

        result = await run(fresh_env, quiet, "sync", "--timeout", "3")
        assert result.exit_code == 1, result.output
        assert "the receipt handover router did not answer with the open receipts; is it running?" in result.output
    finally:
        await cloud.close()
