"""``tillsync archive status`` against the real archive: tills upload through the real
broker (their own broker users) into the real archive writer and PostgreSQL; the check
reads the archive.

A receipt is withheld honestly: the till records the day (sales and Z-report) in its own
store while its sync is off; the test publishes the till's outbox rows itself, as the
till's broker user, all but one; later the till's own relay uploads its whole outbox
(the archived records are no-ops) and so the withheld receipt arrives. Other tills get
records made by hand (``till_agent.booking``), published as the till.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import uuid
from decimal import Decimal
from pathlib import Path
from uuid import UUID

import pytest
from typer.testing import CliRunner, Result

from shared.fiscal import PaymentType, VatKey
from shared.models import Cashier, Receipt, Upload, ZReport
from shared.topology import upload_routing_key
from tests.support import (
    STRONG_PASSWORD, Environment, fetchval, new_account_name, new_till, publish_as_till, sell, signed_in_till, wait_until,
)
from till_agent.booking import SaleLine, closed_receipt, z_report
from till_agent.store import RECORD_ADAPTER
from till_agent.till import Till
from tillsync.archive_status import DuplicateReceiptNumber, NumberRange, TillStatus, TotalDifference, archive_status, euros
from tillsync.cli import app

pytestmark = pytest.mark.integration

CASHIER = Cashier(cashier_id="1", name="Anna")


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def upload(
    till: Till, till_seq: int, record: Receipt | ZReport, record_id: UUID | None = None, recorded_at: dt.datetime | None = None
) -> Upload:
    """The upload of ``record`` as ``till`` would send it, chained to the upload made here for
    ``till_seq - 1`` (a made-up link where none was made: a gap): the one place this module
    builds uploads."""
    identity = till.store.identity()
    assert identity.account_id and identity.till_id
    prev = _chain.get((identity.till_id, till_seq - 1), "0" * 64) if till_seq > 1 else None
    made = Upload.sealed(
        prev,
        record_id=record_id or uuid.uuid4(),
        account_id=identity.account_id,
        till_id=identity.till_id,
        till_seq=till_seq,
        recorded_at=recorded_at or now(),
        record=record,
    )
    _chain[(identity.till_id, till_seq)] = made.chain_hash
    return made


_chain: dict[tuple[UUID, int], str] = {}  # (till, till_seq) -> chain_hash of the upload made for it


async def publish(env: Environment, till: Till, *uploads: Upload) -> None:
    """Publish ``uploads`` to ``till.upload`` as the till (its broker user and routing key)."""
    for u in uploads:
        await publish_as_till(
            env, till, u.model_dump_json().encode(), upload_routing_key(u.account_id, u.till_id, u.record.kind)
        )


async def archived(env: Environment, till: Till) -> int:
    return await fetchval(env, "select count(*) from archive_records where till_id = $1", till.store.identity().till_id)  # type: ignore[return-value]


async def wait_archived(env: Environment, till: Till, count: int) -> None:
    await wait_until(lambda: _has(env, till, count), what=f"{count} records of the till in the archive")


async def _has(env: Environment, till: Till, count: int) -> bool:
    return await archived(env, till) == count


def receipt(number: int, cents: int = 250, vat_key: VatKey = VatKey.REDUCED, card: bool = False) -> Receipt:
    """A closed receipt of one article with receipt number ``number``, made by hand."""
    at = now()
    return closed_receipt(
        receipt_number=number,
        lines=[SaleLine("1", "Brot", Decimal("1"), cents, vat_key)],
        payment_type=PaymentType.DEBIT_CARD if card else PaymentType.CASH,
        payment_name="EC-Karte" if card else "Bar",
        cashier=CASHIER,
        opened_at=at,
        closed_at=at,
        business_day=at.date(),
    )


def zreport(z_nr: int, receipts: list[Receipt], **changes: object) -> ZReport:
    """The Z-report of ``receipts`` as a till makes it, then with ``changes`` (validated)."""
    report = z_report(z_nr, now().date(), receipts, now())
    return ZReport.model_validate({**report.model_dump(), **changes})


@pytest.fixture(scope="module")
async def account(env: Environment, services, tmp_path_factory: pytest.TempPathFactory) -> str:  # type: ignore[no-untyped-def]
    name = new_account_name()
    founder = new_till(env, tmp_path_factory.mktemp("founder"), name="founder")
    await founder.create_account(name, STRONG_PASSWORD)
    founder.close()
    return name


async def signed_in(env: Environment, tmp_path: Path, account: str, name: str) -> Till:
    """A new till signed in to ``account``; its sync stays off (nothing is uploaded by itself)."""
    return await signed_in_till(env, tmp_path, account, name)


async def status_of(env: Environment, till: Till) -> TillStatus:
    conn = await env.db()
    try:
        [status] = await archive_status(conn, till=str(till.store.identity().till_id))
    finally:
        await conn.close()
    return status


async def archive_status_cli(env: Environment, *args: str) -> Result:
    """``tillsync archive status ARGS`` against ``env`` (in a thread: the CLI runs its own event loop)."""
    return await asyncio.to_thread(
        CliRunner().invoke,
        app,
        ["archive", "status", *args],
        env={"TILLSYNC_DATABASE_URL": env.settings.database_url, "COLUMNS": "1000"},
    )


_LOG_LINE = re.compile(r"^(\{\"|\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)")


def output(result: Result) -> list[str]:
    """The command's stdout lines without the log lines of the services running in this
    test process (they may log there meanwhile)."""
    return [line for line in result.stdout.splitlines() if not _LOG_LINE.match(line)]


def lines_of(result: Result, till: Till) -> list[str]:
    """The output lines about ``till``: its heading and its problems (``  - ...``)."""
    till_id = str(till.store.identity().till_id)
    lines = output(result)
    start = next(i for i, line in enumerate(lines) if till_id in line and not line.startswith("  - "))
    end = start + 1
    while end < len(lines) and lines[end].startswith("  - "):
        end += 1
    return lines[start:end]


async def test_a_withheld_receipt_makes_its_z_report_incomplete_until_it_arrives(
    env: Environment, account: str, tmp_path: Path
) -> None:
    till = await signed_in(env, tmp_path, account, "Kasse Theke")
    try:
        sell(till, 5)  # receipts 1-5, 2,50 € each, VAT key 2, cash
        day = now().date()
        till.close_day(day, now())
        rows = till.store.unsent(100)  # as the till's relay would send them (chained)
        records = {row.till_seq: RECORD_ADAPTER.validate_json(row.body) for row in rows}
        [withheld] = [seq for seq, r in records.items() if isinstance(r, Receipt) and r.receipt_number == 3]
        identity = till.store.identity()
        assert identity.account_id and identity.till_id
        await publish(
            env, till,
            *(row.upload(identity.account_id, identity.till_id) for row in rows if row.till_seq != withheld),
        )
        await wait_archived(env, till, len(rows) - 1)

        result = await archive_status_cli(env, "--till", str(till.store.identity().till_id))
        assert result.exit_code == 1, result.output
        heading, *problems = lines_of(result, till)
        assert "Kasse Theke" in heading and till.store.identity().serial_number in heading and "INCOMPLETE" in heading
        [z_line] = [p for p in problems if "Z 1 " in p]
        assert z_line.startswith(f"  - Z 1 of {day.isoformat()} (receipts 1–5): receipt 3 missing; ")
        assert "receipt count 5 in the Z-report, 4 in its receipts" in z_line
        assert "VAT key 2 gross 12,50 € in the Z-report, 10,00 € in its receipts" in z_line
        assert "payment Bar 12,50 € in the Z-report, 10,00 € in its receipts" in z_line
        assert "total 12,50 € in the Z-report, 10,00 € in its receipts" in z_line
        # the withheld record is also a gap in the till's till_seq
        assert any(p.startswith(f"  - till_seq {withheld} missing (1 record): not uploaded yet") and "or lost" in p for p in problems)
        assert output(result)[-1].startswith("1 till checked: 1 incomplete (1 incomplete Z-report, ")

        # the till syncs: its relay uploads the whole outbox, the withheld receipt arrives
        till.start_sync()
        await wait_archived(env, till, len(rows))
        await till.stop_sync()
        result = await archive_status_cli(env, "--till", str(till.store.identity().till_id))
        assert result.exit_code == 0, result.output
        assert output(result) == ["1 till checked: every till's archive is complete"]
        status = await status_of(env, till)
        assert status.complete and status.zreports == 1 and status.open_business_day is None
    finally:
        await till.stop_sync()
        till.close()


async def test_z_report_totals_that_differ_from_its_receipts_are_named(
    env: Environment, account: str, tmp_path: Path
) -> None:
    till = await signed_in(env, tmp_path, account, "Kasse Bistro")
    try:
        receipts = [receipt(1), receipt(2, 1190, VatKey.REGULAR, card=True), receipt(3, 500)]
        # made by hand: the Z-report counts a receipt 3 of 7,00 € and one receipt more
        forged = zreport(1, [receipts[0], receipts[1], receipt(3, 700)], receipt_count=4)
        await publish(env, till, *(upload(till, seq, r) for seq, r in enumerate([*receipts, forged], start=1)))
        await wait_archived(env, till, 4)

        status = await status_of(env, till)
        [problem] = status.incomplete_zreports
        assert (problem.z_nr, problem.receipt_numbers, problem.missing_receipts) == (1, NumberRange(1, 3), ())
        counted = [receipts[0], receipts[1], receipt(3, 700)]

        def key_2(rs: list[Receipt], part: str) -> int:
            return sum(getattr(v, part) for r in rs for v in r.vat if v.vat_key == VatKey.REDUCED)

        assert problem.differences == (
            TotalDifference("receipt_count", (), 4, 3),
            TotalDifference("vat", ("2",), 950, 750),
            TotalDifference("vat_net", ("2",), key_2(counted, "net"), key_2(receipts, "net")),
            TotalDifference("vat_tax", ("2",), key_2(counted, "vat"), key_2(receipts, "vat")),
            TotalDifference("business_case", ("Umsatz", "2"), 950, 750),
            TotalDifference("payment", ("Bar", "Bar"), 950, 750),
            TotalDifference("total", (), 2140, 1940),
        )
        assert not (status.till_seq_gaps or status.missing_z_numbers or status.duplicate_receipt_numbers)

        result = await archive_status_cli(env, "--till", till.store.identity().serial_number)
        assert result.exit_code == 1, result.output
        [z_line] = lines_of(result, till)[1:]
        assert z_line == (
            f"  - Z 1 of {now().date().isoformat()} (receipts 1–3): receipt count 4 in the Z-report, 3 in its receipts; "
            "VAT key 2 gross 9,50 € in the Z-report, 7,50 € in its receipts; "
            f"VAT key 2 net {euros(key_2(counted, 'net'))} in the Z-report, {euros(key_2(receipts, 'net'))} in its receipts; "
            f"VAT key 2 VAT {euros(key_2(counted, 'vat'))} in the Z-report, {euros(key_2(receipts, 'vat'))} in its receipts; "
            "business case Umsatz with VAT key 2 gross 9,50 € in the Z-report, 7,50 € in its receipts; "
            "payment Bar 9,50 € in the Z-report, 7,50 € in its receipts; "
            "total 21,40 € in the Z-report, 19,40 € in its receipts"
        )
    finally:
        till.close()


async def test_a_till_seq_gap_is_reported_with_both_possible_causes(env: Environment, account: str, tmp_path: Path) -> None:
    till = await signed_in(env, tmp_path, account, "Kasse Gap")
    try:
        await publish(env, till, *(upload(till, seq, receipt(n)) for n, seq in enumerate([1, 2, 5, 6, 9], start=1)))
        await wait_archived(env, till, 5)

        status = await status_of(env, till)
        assert status.till_seq_gaps == (NumberRange(3, 4), NumberRange(7, 8))
        assert (status.records, status.last_till_seq, status.incomplete_zreports, status.missing_z_numbers) == (5, 9, (), ())
        assert status.open_business_day is not None  # no Z-report yet: the receipts are the open business day
        assert (status.open_business_day.receipts, status.open_business_day.receipt_numbers) == (5, NumberRange(1, 5))
        assert status.open_business_day.total == 1250

        result = await archive_status_cli(env, "--till", "kasse gap")  # a till's name, in any case
        assert result.exit_code == 1, result.output
        heading, gap = lines_of(result, till)
        assert "open business day: 5 receipts (1–5), 12,50 €" in heading
        assert gap == (
            "  - till_seq 3–4, 7–8 missing (4 records): not uploaded yet (the till is offline or signed out, "
            "or in custom mode with an upload switch off) or lost"
        )
    finally:
        till.close()


async def test_a_missing_z_number_is_reported(env: Environment, account: str, tmp_path: Path) -> None:
    till = await signed_in(env, tmp_path, account, "Kasse Z")
    try:
        first, second = [receipt(1), receipt(2)], [receipt(3), receipt(4)]
        records = [*first, zreport(1, first), *second, zreport(3, second)]  # Z 2 never arrives
        await publish(env, till, *(upload(till, seq, r) for seq, r in enumerate(records, start=1)))
        await wait_archived(env, till, 6)

        status = await status_of(env, till)
        assert status.missing_z_numbers == (NumberRange(2, 2),)
        assert (status.zreports, status.last_z_nr) == (2, 3)
        assert not (status.till_seq_gaps or status.incomplete_zreports or status.receipts_in_no_zreport)
        assert status.problems() == ["Z 2 missing: Z-reports not uploaded yet or lost"]
    finally:
        till.close()


async def test_the_first_and_last_receipt_of_a_z_report_missing(env: Environment, account: str, tmp_path: Path) -> None:
    till = await signed_in(env, tmp_path, account, "Kasse Rand")
    try:
        day = [receipt(n) for n in range(1, 5)]
        records = [day[1], day[2], zreport(1, day)]  # receipts 1 and 4 never arrive
        await publish(env, till, *(upload(till, seq, record) for seq, record in enumerate(records, start=1)))
        await wait_archived(env, till, len(records))

        [problem] = (await status_of(env, till)).incomplete_zreports
        assert problem.missing_receipts == (NumberRange(1, 1), NumberRange(4, 4))
        assert str(problem).startswith(f"Z 1 of {now().date().isoformat()} (receipts 1–4): receipts 1, 4 missing; ")
    finally:
        till.close()


async def test_receipts_in_no_or_several_z_reports_and_a_z_number_twice(
    env: Environment, account: str, tmp_path: Path
) -> None:
    till = await signed_in(env, tmp_path, account, "Kasse Abdeckung")
    try:
        r = {n: receipt(n, 100 * n) for n in range(1, 11)}
        never_archived = [receipt(8), receipt(9)]
        z3 = zreport(3, never_archived)
        records = [
            r[1], r[2], r[3], zreport(1, [r[1], r[2], r[3]]),
            r[4], r[5], zreport(2, [r[3], r[4], r[5]]),  # receipt 3 once more
            r[6], r[7],  # in no Z-report
            z3, z3,  # Z 3 archived twice (two records); its receipts never arrive
            r[10],  # the open business day
        ]
        await publish(env, till, *(upload(till, seq, record) for seq, record in enumerate(records, start=1)))
        await wait_archived(env, till, len(records))

        status = await status_of(env, till)
        assert [(z.z_nr, z.receipt_numbers, z.missing_receipts) for z in status.incomplete_zreports] == [
            (3, NumberRange(8, 9), (NumberRange(8, 9),)), (3, NumberRange(8, 9), (NumberRange(8, 9),))
        ]
        assert TotalDifference("total", (), 500, 0) in status.incomplete_zreports[0].differences
        assert status.repeated_z_numbers == (3,)
        assert status.receipts_in_no_zreport == (NumberRange(6, 7),)
        assert status.receipts_in_several_zreports == (NumberRange(3, 3), NumberRange(8, 9))
        assert status.missing_z_numbers == () and status.till_seq_gaps == ()
        assert status.open_business_day is not None
        assert (status.open_business_day.receipt_numbers, status.open_business_day.total) == (NumberRange(10, 10), 1000)
        assert status.problems()[2:] == [
            "Z 3 archived more than once",
            "receipt numbers 6–7 are in no Z-report",
            "receipt numbers 3, 8–9 are in more than one Z-report",
        ]
    finally:
        till.close()


async def test_receipt_numbers_used_twice_are_reported_and_each_receipt_counted_once(
    env: Environment, account: str, tmp_path: Path
) -> None:
    till = await signed_in(env, tmp_path, account, "Kasse Doppelt")
    try:
        one, other_one, two = receipt(1), receipt(1, 300), receipt(2)
        still_open = Receipt.model_validate(
            {**two.model_dump(), "status": "open", "receipt_number": None, "closed_at": None, "payments": []}
        )
        # receipt 2 is archived in three records: open, closed, and its closed state again
        records = [one, other_one, still_open, two, two, zreport(1, [one, other_one, two])]
        await publish(env, till, *(upload(till, seq, r) for seq, r in enumerate(records, start=1)))
        await wait_archived(env, till, 6)

        status = await status_of(env, till)
        assert status.duplicate_receipt_numbers == (
            DuplicateReceiptNumber(1, tuple(sorted([one.receipt_id, other_one.receipt_id], key=str))),
        )
        assert status.incomplete_zreports == ()  # receipt 2 counted once, both receipts numbered 1 in the sums
        result = await archive_status_cli(env, "--till", str(till.store.identity().till_id))
        assert result.exit_code == 1, result.output
        [line] = lines_of(result, till)[1:]
        assert line.startswith("  - receipt number 1 carried by 2 receipts: ")
        assert str(one.receipt_id) in line and str(other_one.receipt_id) in line
    finally:
        till.close()


async def test_a_complete_till_is_reported_complete(env: Environment, tmp_path: Path) -> None:
    name = new_account_name()
    till = new_till(env, tmp_path, name="Kasse Komplett")
    await till.create_account(name, STRONG_PASSWORD)
    await till.sign_in(name, STRONG_PASSWORD)
    till.start_sync()
    try:
        sell(till, 3)
        till.close_day(now().date(), now())
        sell(till, 2, unit_price=199)  # the open business day
        await wait_archived(env, till, 6)
        await wait_until(lambda: till.status().pending == 0, what="the till's outbox uploaded")

        status = await status_of(env, till)
        assert status.complete and status.problems() == []
        assert (status.records, status.last_till_seq, status.zreports, status.last_z_nr) == (6, 6, 1, 1)
        assert status.open_business_day is not None
        assert (status.open_business_day.receipt_numbers, status.open_business_day.total) == (NumberRange(4, 5), 398)

        result = await archive_status_cli(env, "--account", name)
        assert result.exit_code == 0, result.output
        assert output(result) == ["1 till checked: every till's archive is complete"]
        result = await archive_status_cli(env, "--account", name.upper(), "--all")
        assert result.exit_code == 0, result.output
        heading, summary = output(result)
        assert heading == (
            f"Kasse Komplett (serial {till.store.identity().serial_number}, till {till.store.identity().till_id}) "
            f"of {name}: complete; 6 records (till_seq up to 6), 1 Z-report (up to Z 1); "
            "open business day: 2 receipts (4–5), 3,98 €"
        )
        assert summary == "1 till checked: every till's archive is complete"
    finally:
        await till.stop_sync()
        till.close()


async def test_unknown_accounts_and_tills_are_one_error_line(env: Environment, account: str) -> None:
    for args, expected in [
        (["--account", "nobody@example.com"], "error: no account 'nobody@example.com'"),
        (["--till", "K-unknown"], "error: no till 'K-unknown': name a till by its id, serial number or name"),
        (["--account", account, "--till", "K-unknown"], f"error: no till 'K-unknown' in account {account}"),
    ]:
        result = await archive_status_cli(env, *args)
        assert result.exit_code == 1, result.output
        assert any(line.startswith(expected) for line in result.stderr.splitlines()), result.stderr


async def test_a_z_report_changed_into_an_invalid_one_is_named_and_the_rest_still_checked(
    env: Environment, account: str, tmp_path: Path
) -> None:
    till = await signed_in(env, tmp_path, account, "Kasse Tamper")
    other = await signed_in(env, tmp_path, account, "Kasse Heil")
    try:
        receipts = [receipt(1), receipt(2)]
        await publish(env, till, *(upload(till, seq, r) for seq, r in enumerate([*receipts, zreport(1, receipts)], start=1)))
        await publish(env, other, *(upload(other, seq, r) for seq, r in enumerate([receipt(1), zreport(1, [receipt(1)])], start=1)))
        await wait_archived(env, till, 3)
        await wait_archived(env, other, 2)
        # someone with the superuser's powers changes the Z-report's total only
        conn = await env.admin_db()
        try:
            async with conn.transaction():
                await conn.execute("set local session_replication_role = replica")
                record_id = await conn.fetchval(
                    "update archive_records set payload = jsonb_set(payload, '{record,total}', '99999') "
                    "where till_id = $1 and kind = 'zreport' returning record_id",
                    till.store.identity().till_id,
                )
        finally:
            await conn.close()
        result = await archive_status_cli(env, "--account", account, "--all")
        assert result.exit_code == 1, result.output
        [bad] = [p for p in lines_of(result, till)[1:] if str(record_id) in p]
        assert "(till_seq 3) is no valid Z-report" in bad and "archive verify" in bad, result.output
        assert "complete" in lines_of(result, other)[0], result.output  # the other till is still checked
        export = await asyncio.to_thread(
            CliRunner().invoke, app,
            ["archive", "export-dsfinvk", "--till", str(till.store.identity().till_id), "--from", str(now().date()),
             "--to", str(now().date()), "--output", str(tmp_path / "x.zip")],
            env={"TILLSYNC_DATABASE_URL": env.settings.database_url, "COLUMNS": "1000"},
        )
        assert export.exit_code == 1 and f"archived record {record_id} (till_seq 3)" in export.stderr, export.output
        assert not (tmp_path / "x.zip").exists()
    finally:
        till.close()
        other.close()


async def test_refused_uploads_and_receipts_closed_twice_are_named_and_not_exported(
    env: Environment, account: str, tmp_path: Path
) -> None:
    till = await signed_in(env, tmp_path, account, "Kasse Zwei")
    try:
        first = receipt(1)
        # the same receipt closed again with other content (a till's bug or a forged upload)
        second = receipt(1, 900).model_copy(update={"receipt_id": first.receipt_id})
        z = zreport(1, [first])
        await publish(env, till, upload(till, 1, first), upload(till, 2, second), upload(till, 3, z))
        await wait_archived(env, till, 3)
        # an upload at a position the archive holds already: refused, kept in archive_conflicts
        await publish(env, till, upload(till, 3, receipt(2)))
        await wait_until(lambda: fetchval(env, "select count(*) from archive_conflicts where till_id = $1",
                                          till.store.identity().till_id), what="the refusal kept")
        result = await archive_status_cli(env, "--till", str(till.store.identity().till_id))
        assert result.exit_code == 1, result.output
        problems = lines_of(result, till)[1:]
        assert any(f"receipt {first.receipt_id} is archived closed in 2 different versions (BON_NR 1)" in p for p in problems), problems
        assert any("1 upload refused by the archive and kept in archive_conflicts, first till_seq 3" in p for p in problems), problems
        export = await asyncio.to_thread(
            CliRunner().invoke, app,
            ["archive", "export-dsfinvk", "--till", str(till.store.identity().till_id), "--from", str(now().date()),
             "--to", str(now().date()), "--output", str(tmp_path / "x.zip")],
            env={"TILLSYNC_DATABASE_URL": env.settings.database_url, "COLUMNS": "1000"},
        )
        assert export.exit_code == 1 and "is archived closed in two different versions" in export.stderr, export.output
        assert not (tmp_path / "x.zip").exists()
        # another till closes the same receipt (as if it had been paid there too)
        other = await signed_in(env, tmp_path, account, "Kasse Drei")
        try:
            taken = receipt(1).model_copy(update={"receipt_id": first.receipt_id})
            await publish(env, other, upload(other, 1, taken), upload(other, 2, zreport(1, [taken])))
            await wait_archived(env, other, 2)
            result = await archive_status_cli(env, "--till", str(other.store.identity().till_id))
            assert any(f"receipt {first.receipt_id} is archived closed by 2 tills" in p for p in lines_of(result, other)[1:])
            export = await asyncio.to_thread(
                CliRunner().invoke, app,
                ["archive", "export-dsfinvk", "--till", str(other.store.identity().till_id), "--from", str(now().date()),
                 "--to", str(now().date()), "--output", str(tmp_path / "y.zip")],
                env={"TILLSYNC_DATABASE_URL": env.settings.database_url, "COLUMNS": "1000"},
            )
            assert export.exit_code == 1 and "archived closed by another till too" in export.stderr, export.output
            assert f"receipt {first.receipt_id} also closed by till {till.store.identity().till_id}" in export.stderr
        finally:
            other.close()
    finally:
        till.close()


async def test_the_export_refuses_a_closing_that_differs_from_its_receipts_unless_allowed(
    env: Environment, account: str, tmp_path: Path
) -> None:
    till = await signed_in(env, tmp_path, account, "Kasse Differenz")
    try:
        receipts = [receipt(1), receipt(2, 700)]
        forged = zreport(1, [receipts[0], receipt(2, 500)])  # counts receipt 2 at 5,00 €
        await publish(env, till, *(upload(till, seq, r) for seq, r in enumerate([*receipts, forged], start=1)))
        await wait_archived(env, till, 3)

        async def export(*extra: str) -> Result:
            return await asyncio.to_thread(
                CliRunner().invoke, app,
                ["archive", "export-dsfinvk", "--till", str(till.store.identity().till_id), "--from", str(now().date()),
                 "--to", str(now().date()), "--output", str(tmp_path / "x.zip"), *extra],
                env={"TILLSYNC_DATABASE_URL": env.settings.database_url, "COLUMNS": "1000"},
            )

        refused = await export()
        assert refused.exit_code == 1 and "do not add up to it: nothing written" in refused.stderr, refused.output
        assert "  - Z-report 1 (" in refused.stderr and "total 7,50 € in the Z-report, 9,50 € in its receipts" in refused.stderr
        assert not (tmp_path / "x.zip").exists()
        allowed = await export("--allow-discrepancies")
        assert allowed.exit_code == 0 and (tmp_path / "x.zip").is_file(), allowed.output
        assert "warning: Z-report 1 (" in allowed.stderr and "total 7,50 € in the Z-report" in allowed.stderr
    finally:
        till.close()
