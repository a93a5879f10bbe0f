"""The demo's two weeks of real bakery sales, exported per till as DSFinV-K 2.4 through the
command line: the ZIP passes the ``dsfinvk`` library's validator and every closing's sums
equal its Z-report; the restaurant scene's shared receipt is under the paying till's closing."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import io
import zipfile
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from uuid import UUID
from zoneinfo import ZoneInfo

import pytest
from dsfinvk.validate import validate_zip
from rich.console import Console
from typer.testing import CliRunner

from shared.models import Receipt, ZReport
from tests.support import BAKERY_CSV, STRONG_PASSWORD, Environment, wait_until
from tillsync.cli import app
from tillsync.demo import run_demo
from till_agent.store import TillStore
from till_agent.till import Till, TillSettings

pytestmark = pytest.mark.e2e


def euros(text: str) -> Decimal:
    """A DSFinV-K number (``1.234,50``) as a Decimal."""
    return Decimal(text.replace(".", "").replace(",", "."))


def cents(amount: int) -> Decimal:
    return Decimal(amount).scaleb(-2)


def tables(path: Path) -> dict[str, list[dict[str, str]]]:
    with zipfile.ZipFile(path) as zf:
        return {
            name: list(csv.DictReader(io.StringIO(zf.read(name).decode("utf-8"), newline=""), delimiter=";"))
            for name in zf.namelist() if name.endswith(".csv")
        }


def validate(path: Path) -> tuple[list[str], str]:
    """The validator's errors and what it printed (it prints number-format and length problems)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        errors = validate_zip(str(path))
    return errors, printed.getvalue()


def sums(rows: list[dict[str, str]], key: tuple[str, ...], value: str) -> dict[str, dict[tuple[str, ...], Decimal]]:
    """Per Z_NR: the sum of column ``value`` per ``key`` columns."""
    result: dict[str, dict[tuple[str, ...], Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for row in rows:
        result[row["Z_NR"]][tuple(row[k] for k in key)] += euros(row[value])
    return {z: dict(v) for z, v in result.items()}


async def close_today(env: Environment, data_dir: Path, account: str, password: str) -> None:
    """Sign a demo till in again, record a Z-report for today, upload it, sign out."""
    till = Till(TillStore(data_dir), TillSettings(cloud_amqp_url=env.signup_url, request_timeout_seconds=20))
    try:
        await till.sign_in(account, password)
        till.start_sync()
        now = dt.datetime.now(dt.UTC)
        till.close_day(now.date(), now)
        await wait_until(lambda: till.status().pending == 0, 60, what="the Z-report uploaded")
        await till.stop_sync()
        await till.sign_out()
    finally:
        await till.stop_sync()
        till.close()


async def test_the_demo_exports_as_valid_dsfinvk_with_the_z_reports_sums(fresh_env, service_processes, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for process in service_processes.values():
        process.start()
    for process in service_processes.values():
        await process.wait_ready()
    password = STRONG_PASSWORD
    report = await run_demo(
        fresh_env.settings, BAKERY_CSV, console=Console(file=io.StringIO()), start_services=False,
        account_password=password, password_reset=False,
    )
    # 14 bakery days on each till, and till 2 closed the restaurant scene's day (the table's receipt)
    assert report.ok and report.zreports_archived == 29 and report.shared_receipts_closed == 1
    # the demo's own checks at its end: chains, completeness, one valid export per till
    assert report.chains_intact and report.archive_complete and report.dsfinvk_valid
    assert len(report.dsfinvk_exports) == 2 and all(Path(p).is_file() for p in report.dsfinvk_exports)
    shared_receipt = report.receipts_not_in_input[0]
    # till 1 closes today too, without receipts: an empty closing in its export
    await close_today(fresh_env, Path(report.run_dir) / "till-1", report.account_name, password)

    conn = await fresh_env.db()
    try:
        await wait_until(
            lambda: conn.fetchval("select count(*) = 30 from archive_records where kind = 'zreport'"), 60,
            what="the empty Z-report archived",
        )
        tills = {r["till_name"]: r for r in await conn.fetch("select till_id, serial_number, till_name from tills")}
        zreports: dict[UUID, dict[int, ZReport]] = defaultdict(dict)
        for r in await conn.fetch("select till_id, payload from archive_records where kind = 'zreport'"):
            z = ZReport.model_validate(r["payload"]["record"])
            zreports[r["till_id"]][z.z_nr] = z
        receipts = {
            r["payload"]["record"]["receipt_id"]: Receipt.model_validate(r["payload"]["record"])
            for r in await conn.fetch(
                "select payload from archive_records where kind = 'receipt' and payload->'record'->>'status' = 'closed'"
            )
        }
    finally:
        await conn.close()
    assert set(tills) == {"Kasse 1", "Kasse 2"}

    exported: dict[str, dict[str, list[dict[str, str]]]] = {}
    for name, till in tills.items():
        path = tmp_path / f"{name}.zip"
        result = await asyncio.to_thread(
            CliRunner().invoke, app,
            ["archive", "export-dsfinvk", "--till", till["serial_number"], "--account", report.account_name,
             "--from", "2021-01-01", "--to", str(dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)), "--output", str(path)],
            env={"TILLSYNC_DATABASE_URL": fresh_env.settings.database_url, "COLUMNS": "1000"},
        )
        assert result.exit_code == 0, result.output
        assert f"wrote {path}" in result.stdout and "15 closing(s)" in result.stdout, result.stdout
        assert "warning" not in result.stderr, result.stderr
        errors, printed = validate(path)
        assert errors == [] and printed == ""
        with zipfile.ZipFile(path) as zf:
            assert {"index.xml", "gdpdu-01-08-2002.dtd"} <= set(zf.namelist())
        exported[name] = data = tables(path)

        ours = zreports[till["till_id"]]
        assert len(ours) == 15
        closings = data["cashpointclosing.csv"]
        assert sorted(int(c["Z_NR"]) for c in closings) == sorted(ours)  # one row per Z-report
        assert all(c["Z_KASSE_ID"] == till["serial_number"] for c in closings)
        by_z = {int(c["Z_NR"]): c for c in closings}
        brutto = sums(data["transactions.csv"], (), "UMS_BRUTTO")
        payments = sums(data["datapayment.csv"], ("ZAHLART_TYP", "ZAHLART_NAME"), "BASISWAEH_BETRAG")
        z_payments = sums(data["payment.csv"], ("ZAHLART_TYP", "ZAHLART_NAME"), "Z_ZAHLART_BETRAG")
        bon_vat = sums(data["transactions_vat.csv"], ("UST_SCHLUESSEL",), "BON_BRUTTO")
        line_vat = sums(data["lines_vat.csv"], ("UST_SCHLUESSEL",), "POS_BRUTTO")
        cases = sums(data["businesscases.csv"], ("GV_TYP", "UST_SCHLUESSEL"), "Z_UMS_BRUTTO")
        bon_split = {c: sums(data["transactions_vat.csv"], ("UST_SCHLUESSEL",), c) for c in ("BON_NETTO", "BON_UST")}
        line_split = {c: sums(data["lines_vat.csv"], ("UST_SCHLUESSEL",), c) for c in ("POS_NETTO", "POS_UST")}
        case_split = {c: sums(data["businesscases.csv"], ("UST_SCHLUESSEL",), c) for c in ("Z_UMS_NETTO", "Z_UST")}
        count = defaultdict(int)
        for row in data["transactions.csv"]:
            count[row["Z_NR"]] += 1
        for z_nr, z in ours.items():
            key = str(z_nr)
            assert by_z[z_nr]["Z_BUCHUNGSTAG"] == z.business_day.isoformat()
            assert euros(by_z[z_nr]["Z_SE_ZAHLUNGEN"]) == cents(z.total)
            assert count.get(key, 0) == z.receipt_count
            assert brutto.get(key, {}).get((), Decimal(0)) == cents(z.total)
            want_payments = {(p.payment_type.value, p.payment_name): cents(p.amount) for p in z.totals_by_payment_type}
            assert payments.get(key, {}) == want_payments == z_payments.get(key, {})
            want_vat = {(str(int(v.vat_key)),): cents(v.gross) for v in z.totals_by_vat}
            assert bon_vat.get(key, {}) == want_vat == line_vat.get(key, {})
            want_cases = {(c.business_case.value, str(int(c.vat_key))): cents(c.gross) for c in z.totals_by_business_case}
            assert cases.get(key, {}) == want_cases
            # net and VAT per VAT key: the Z-report's, its receipts' and its business cases' sums agree
            for part, bon_column, line_column, case_column in (
                ("net", "BON_NETTO", "POS_NETTO", "Z_UMS_NETTO"), ("vat", "BON_UST", "POS_UST", "Z_UST")
            ):
                want = {(str(int(v.vat_key)),): cents(getattr(v, part)) for v in z.totals_by_vat}
                assert bon_split[bon_column].get(key, {}) == want == case_split[case_column].get(key, {}), (z_nr, part)
                assert line_split[line_column].get(key, {}) == want, (z_nr, part)  # the lines add up to it too
        # each receipt's VAT breakdown is exported as recorded
        for row in data["transactions_vat.csv"][:50]:
            vat = {int(v.vat_key): v for v in receipts[row["BON_ID"]].vat}[int(row["UST_SCHLUESSEL"])]
            assert (euros(row["BON_NETTO"]), euros(row["BON_UST"])) == (cents(vat.net), cents(vat.vat))
        # times are local (Europe/Berlin): January, UTC+1
        first = data["transactions.csv"][0]
        opened = receipts[first["BON_ID"]].opened_at.astimezone(ZoneInfo("Europe/Berlin"))
        assert first["BON_START"] == opened.strftime("%Y-%m-%dT%H:%M:%S")

    # every receipt of the input is exported once, plus the table's receipt
    all_bons = [row["BON_ID"] for data in exported.values() for row in data["transactions.csv"]]
    assert len(all_bons) == len(set(all_bons)) == report.receipts_in_input + 1

    # the shared receipt: under till 2's (the payer's) last closing, its lines named by the
    # till that entered them, till 1 listed as a terminal of that closing
    one, two = tills["Kasse 1"], tills["Kasse 2"]
    assert shared_receipt not in {row["BON_ID"] for row in exported["Kasse 1"]["transactions.csv"]}
    (bon,) = [row for row in exported["Kasse 2"]["transactions.csv"] if row["BON_ID"] == shared_receipt]
    assert bon["Z_NR"] == str(max(zreports[two["till_id"]]))
    assert bon["TERMINAL_ID"] == two["serial_number"]
    lines = [row for row in exported["Kasse 2"]["lines.csv"] if row["BON_ID"] == shared_receipt]
    archived_lines = receipts[shared_receipt].lines
    assert [row["POS_TERMINAL_ID"] for row in lines] == [
        one["serial_number"] if line.terminal_id == one["till_id"] else two["serial_number"] for line in archived_lines
    ]
    assert {row["POS_TERMINAL_ID"] for row in lines} == {one["serial_number"], two["serial_number"]}
    slaves = exported["Kasse 2"]["slaves.csv"]
    assert [(s["Z_NR"], s["TERMINAL_ID"], s["TERMINAL_SERIENNR"]) for s in slaves] == [
        (bon["Z_NR"], one["serial_number"], one["serial_number"])
    ]
    assert "slaves.csv" not in exported["Kasse 1"]  # no other till entered lines on till 1's receipts
    # till 1's last closing has no receipts: a closing row, nothing else
    last_one = str(max(zreports[one["till_id"]]))
    assert all(row["Z_NR"] != last_one for row in exported["Kasse 1"]["transactions.csv"])
    (empty,) = [c for c in exported["Kasse 1"]["cashpointclosing.csv"] if c["Z_NR"] == last_one]
    assert (empty["Z_START_ID"], empty["Z_ENDE_ID"], euros(empty["Z_SE_ZAHLUNGEN"])) == ("", "", 0)
