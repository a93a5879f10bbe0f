"""A business day of the real bakery file, replayed through two tills: the archive equals the input."""

from __future__ import annotations

import io
from collections import Counter
from decimal import Decimal

import pytest
from rich.console import Console

from tests.e2e.conftest import one_business_day
from tillsync.bakery import read_export
from tillsync.demo import run_demo

pytestmark = pytest.mark.e2e


async def test_a_business_day_is_archived_equal_to_the_input(fresh_env, service_processes, tmp_path) -> None:  # type: ignore[no-untyped-def]
    day_file = one_business_day(tmp_path / "day.csv", "2021-01-03")  # a day with a return
    for process in service_processes.values():
        process.start()
    for process in service_processes.values():
        await process.wait_ready()
    report = await run_demo(
        fresh_env.settings, day_file, console=Console(file=io.StringIO()), start_services=False
    )
    export = read_export(day_file)
    assert report.ok
    assert report.receipts_in_input == len(export.tickets) > 100
    assert report.missing == 0 and report.duplicates == 0
    # both tills edited the same two articles while till 2 was offline: one rebased, one listed
    assert report.masterdata_same_on_all_tills
    assert (report.masterdata_rebased, report.masterdata_differences_listed) == (1, 1)
    # the restaurant scene: one receipt for the table, the stale payment refused, then paid
    assert report.shared_receipts_closed == 1 and report.shared_receipts_same_on_all_tills
    assert (report.table_race_notices, report.stale_payments_refused) == (1, 1)
    assert report.other_tills_records_visible

    # Independently of the demo's own check: compare the archive with the input file.
    conn = await fresh_env.db()
    try:
        rows = await conn.fetch("select till_id, kind, payload from archive_records")
    finally:
        await conn.close()
    # the restaurant scene's table (a shared receipt, with its events) is not a bakery ticket
    shared = {r["payload"]["record"]["receipt_id"] for r in rows if r["kind"] == "receipt_event"}
    assert len(shared) == 2  # both tills opened table T1: one receipt won, the other was refused
    # ... and the password-reset scene's sales, made while the tills were signed out
    assert report.password_reset_approved and report.sales_while_signed_out_archived == 2
    shared |= set(report.receipts_not_in_input)
    receipts = [r["payload"]["record"] for r in rows if r["kind"] == "receipt" and r["payload"]["record"]["receipt_id"] not in shared]
    archived = Counter(
        (r["business_day"], tuple((l["text"], l["quantity"], l["unit_price"]) for l in r["lines"]), r["total"])
        for r in receipts
    )
    expected = Counter(
        (
            t.business_day.isoformat(),
            tuple((l.article_name, str(l.quantity), l.unit_price) for l in t.lines),
            t.total,
        )
        for t in export.tickets
    )
    assert archived == expected
    # the return in the input is archived with its negative quantity and amount
    returns = [l for r in receipts for l in r["lines"] if Decimal(l["quantity"]) < 0]
    assert returns and len(returns) == sum(1 for t in export.tickets for l in t.lines if l.quantity < 0)
    assert all(l["amount"] <= 0 for l in returns)
    # two tills share the day (even/odd ticket numbers); one Z-report each adds up to the day
    tills = Counter(r["till_id"] for r in rows if r["kind"] == "receipt" and r["payload"]["record"]["receipt_id"] not in shared)
    assert len(tills) == 2
    assert sorted(tills.values()) == sorted(Counter(t.ticket_number % 2 for t in export.tickets).values())
    zreports = [r["payload"]["record"] for r in rows if r["kind"] == "zreport" and r["payload"]["record"]["business_day"] == "2021-01-03"]
    assert len(zreports) == 2 and sum(z["total"] for z in zreports) == sum(t.total for t in export.tickets)
    # the paying till closed the restaurant scene's day: its one receipt is the table's
    [scene_day] = [r["payload"]["record"] for r in rows if r["kind"] == "zreport" and r["payload"]["record"]["business_day"] != "2021-01-03"]
    assert scene_day["receipt_count"] == 1 and scene_day["total"] == report.shared_receipt_total_cents
    # the demo's archive checks: chains intact, nothing missing, a valid DSFinV-K export per till
    assert report.chains_intact and report.archive_complete and report.dsfinvk_valid and len(report.dsfinvk_exports) == 2
    masterdata = [r["payload"]["record"] for r in rows if r["kind"] == "masterdata"]
    # every article of the input, plus the rename made on till 2 while it was offline
    renamed = {f"{a.text} BIO" for a in sorted(export.articles.values(), key=lambda a: a.article_nr)[:1]}
    assert {m["data"]["text"] for m in masterdata if m["entity_kind"] == "article"} == set(export.articles) | renamed

