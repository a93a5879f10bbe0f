"""The main job: a bakery's real sales replayed through two tills into the archive.

Steps: prepare database and broker (``tillsync setup``); start the services (unless
they run already, e.g. under docker compose); create an account; sign in two tills in
mode ``archive_masterdata``; till 1 records the master data derived from the file and
till 2 receives it; both tills replay the tickets (rules in ``tillsync.bakery``) and
close each business day with a Z-report; till 2 is offline for the middle part of the
replay and catches up afterwards. While it is offline both tills change the same two
articles: on one, different fields (rebased automatically when till 2 is back), on
the other the same price (the cloud's value is kept and till 2 lists the difference).
The tills run in mode ``archive_masterdata_receipts``, so each also receives the other's
receipts and Z-reports. After the replay a restaurant scene shows the receipt handover:
both tills open the same table at the same moment (one receipt for the table, a notice
on the till that came second, its line booked onto the table's receipt); till 2 goes
offline and pays the old total while till 1 adds a line (the stale payment is refused
when till 2 is back, it re-totals and pays again); till 2 closes that day, so the
table's receipt is in its closing. Then wait until every outbox is empty, every record is archived and both tills
hold the same master data; compare archive and input. Last, a password reset: both
tills sign out, till 2 keeps selling, till 1 asks for a new password, a service
technician (a broker user made for the run) approves it, till 2 signs in with the new
password and uploads what it sold meanwhile. At the end the archive is checked as a
tax auditor would: every till's hash chain (``tillsync archive verify``), its
completeness (``tillsync archive status``), and each till's DSFinV-K export
(``tillsync archive export-dsfinvk``, written to the run's folder) must pass the
``dsfinvk`` library's validator.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import io
import json
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable
from uuid import UUID

import asyncpg
from dsfinvk.validate import validate_zip
from pydantic import Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.broker_admin import BrokerAdmin
from shared.fiscal import PaymentType
from shared.db import create_pool
from shared.settings import amqp_url_with_credentials
from shared.topology import ARCHIVE_WRITER_QUEUE, SIGNUP_USER
from tillsync.archive_status import archive_status
from tillsync.archive_tills import connect_archive, select_tills
from tillsync.archive_verify import verify_archive
from tillsync.bakery import ARTICLE_GROUPS, CASHIERS, PAYMENT_TYPES, VAT_RATES, BakeryExport, Ticket, read_export
from tillsync.dsfinvk_export import export_dsfinvk
from tillsync.ops import OpsSettings, add_technician, call_worker, remove_technician
from tillsync.processes import SERVICES, ServiceProcess, service_env
from tillsync.setup import SetupSettings, setup
from till_agent.booking import SaleLine
from till_agent.store import TillStore
from till_agent.till import AccountError, Till, TillSettings
from shared.models import (
    ApprovalMessage,
    ApprovePasswordReset,
    Cashier,
    ListPasswordResets,
    PasswordResetDecided,
    SyncMode,
)
from shared.topology import APPROVAL_DECISION_KEY, APPROVAL_QUERY_KEY

OFFLINE_FROM = 0.30  # till 2 goes offline at 30 % of the replay ...
OFFLINE_UNTIL = 0.60  # ... and comes back at 60 %


class DemoSettings(SetupSettings):
    """Settings of the demo (environment ``TILLSYNC_*``)."""

    demo_dir: Path = Field(default=Path("var/demo"), description="till stores and service logs of each run")
    drain_timeout_seconds: float = Field(default=600.0, gt=0)

    def cloud_amqp_url_for_tills(self) -> str:
        """The sign-up URL tills use: the broker of ``amqp_url`` with the sign-up user."""
        return amqp_url_with_credentials(self.amqp_url, SIGNUP_USER, self.signup_password)


@dataclass
class DemoReport:
    """The demo's result; ``ok`` when nothing is missing, duplicated or different."""

    account_name: str
    receipts_in_input: int
    receipts_archived: int
    zreports_expected: int
    zreports_archived: int
    masterdata_expected: int
    masterdata_archived: int
    receipt_events_archived: int
    records_expected: int
    records_archived: int
    missing: int
    duplicates: int
    unexpected: int
    content_mismatches: int
    input_total_cents: int
    archived_total_cents: int
    offline_till: str
    receipts_recorded_offline: int
    masterdata_same_on_all_tills: bool
    masterdata_rebased: int
    masterdata_differences_listed: int
    other_tills_records_visible: bool
    shared_receipts_closed: int
    shared_receipts_same_on_all_tills: bool
    shared_receipt_total_cents: int
    table_race_notices: int
    stale_payments_refused: int
    seconds: float
    run_dir: str
    password_reset_approved: bool | None = None  # None: the password-reset scene did not run
    sales_while_signed_out_archived: int = 0
    receipts_not_in_input: list[str] = field(default_factory=list)  # the scenes' receipt ids
    chains_intact: bool | None = None  # None: the archive checks did not run
    archive_complete: bool | None = None
    dsfinvk_exports: list[str] = field(default_factory=list)  # one ZIP per till
    dsfinvk_valid: bool | None = None
    ok: bool = field(init=False)

    def __post_init__(self) -> None:
        self.ok = (
            self.missing == 0
            and self.duplicates == 0
            and self.unexpected == 0
            and self.content_mismatches == 0
            and self.receipts_archived == self.receipts_in_input
            and self.input_total_cents == self.archived_total_cents
            and self.masterdata_same_on_all_tills
            and self.other_tills_records_visible
            and self.shared_receipts_closed == 1
            and self.shared_receipts_same_on_all_tills
            and self.password_reset_approved is not False
            and self.chains_intact is not False
            and self.archive_complete is not False
            and self.dsfinvk_valid is not False
        )

    def as_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False)


class DemoError(RuntimeError):
    """The demo could not run; the message says what is missing."""


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}", markup=False),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


async def run_demo(
    settings: DemoSettings,
    input_path: Path,
    *,
    console: Console,
    start_services: bool = True,
    on_services_started: Callable[[dict[str, ServiceProcess]], None] | None = None,
    account_password: str | None = None,
    password_reset: bool = True,
) -> DemoReport:
    """Run the main job on ``input_path``; see the module docstring. Raises ``DemoError``.

    ``account_password``: the new account's password (default: a random strong one);
    ``password_reset``: end with the password-reset scene (which changes it).
    """
    started = time.monotonic()
    export = read_export(input_path)
    if len(export.articles) < 3 or len(export.business_days) < 1:
        raise DemoError(
            f"{input_path} has {len(export.articles)} articles: the demo's scenes need at least 3 (and one business day)"
        )
    console.print(
        f"Input: {input_path} — {len(export.tickets)} tickets, {len(export.articles)} articles, "
        f"{len(export.business_days)} business days"
    )
    for line in await setup(settings):
        console.print(f"Setup: {line}")
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(2)
    run_dir = (settings.demo_dir / run_id).resolve()
    processes: dict[str, ServiceProcess] = {}
    if start_services:
        env = service_env(settings.amqp_url, settings.database_url, settings.management_url)
        for name in SERVICES:
            processes[name] = ServiceProcess(name, env, run_dir / "logs")
            processes[name].start()
        for process in processes.values():
            await process.wait_ready()
        console.print(f"Services running: {', '.join(processes)} (logs in {run_dir / 'logs'})")
        if on_services_started:
            on_services_started(processes)
    tills: list[Till] = []
    try:
        till_settings = TillSettings(cloud_amqp_url=settings.cloud_amqp_url_for_tills())
        for i in (1, 2):
            store = TillStore.create(run_dir / f"till-{i}", f"DEMO-{run_id}-{i}", f"Kasse {i}")
            tills.append(Till(store, till_settings))
        account_name = f"bakery-{run_id.lower()}@demo.tillsync.example"
        password = account_password or secrets.token_urlsafe(12) + "Aa1!"
        await tills[0].create_account(account_name, password)
        for till in tills:
            await till.sign_in(account_name, password)
            await till.set_sync_mode(True, SyncMode.ARCHIVE_MASTERDATA_RECEIPTS)
            till.start_sync()
        console.print(f"Account {account_name}: 2 tills signed in, mode archive_masterdata_receipts")
        entities = _import_masterdata(tills[0], export)
        await _wait(lambda: tills[1].store.masterdata_state_hash() == tills[0].store.masterdata_state_hash()
                    and tills[0].status().pending == 0, settings.drain_timeout_seconds, "till 2 receiving the master data")
        console.print(f"Till 1 recorded {entities} master-data entities; till 2 received them through the cloud")
        ticket_receipts, offline_count = await _replay(export, tills, console)
        await _drain(tills, settings.drain_timeout_seconds, console)
        same = await _masterdata_settled(tills, settings.drain_timeout_seconds, console)
        scene = await _restaurant_scene(tills, export, settings.drain_timeout_seconds, console)
        _close_scene_day(tills, console)
        await _drain(tills, settings.drain_timeout_seconds, console)
        visible = await _other_tills_visible(tills, settings.drain_timeout_seconds, console)
        expected = {till.store.identity().till_id: till.store.recorded() for till in tills}
        report = await _verify(
            settings, export, tills, expected, ticket_receipts, account_name, offline_count, started, run_dir, console,
            same, scene, visible,
        )
        for till in tills:
            await till.stop_sync()
            await till.sign_out()
        report.receipts_not_in_input = [str(scene.receipt_id)] if scene.receipt_id else []
        if password_reset:
            approved, archived, sold = await _password_reset_scene(
                settings, tills, export, account_name, password, run_id, console
            )
            report = dataclasses.replace(
                report, password_reset_approved=approved, sales_while_signed_out_archived=archived,
                receipts_not_in_input=report.receipts_not_in_input + sold,
            )
        return dataclasses.replace(report, **await _archive_checks(settings, account_name, run_dir, console))
    finally:
        for till in tills:
            await till.stop_sync()
            till.close()
        for process in processes.values():
            process.stop()


def _import_masterdata(till: Till, export: BakeryExport) -> int:
    at = min(t.at for t in export.tickets) - dt.timedelta(hours=1)
    entities = (*VAT_RATES, *PAYMENT_TYPES.values(), *CASHIERS.values(), *ARTICLE_GROUPS.values(), *export.articles.values())
    for entity in entities:
        till.save_entity(entity, at)
    return len(entities)


async def _wait(predicate: Callable[[], bool], timeout_seconds: float, what: str) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout_seconds:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)


def _change_articles_while_offline(tills: list[Till], export: BakeryExport, at: dt.datetime, console: Console) -> None:
    """Both tills change the same two articles while till 2 is offline (see module docstring)."""
    online, offline = tills
    first, second = sorted(export.articles.values(), key=lambda a: a.article_nr)[:2]
    online.save_entity(first.model_copy(update={"unit_price": first.unit_price + 10}), at)
    offline.save_entity(first.model_copy(update={"text": f"{first.text} BIO"[:200]}), at)
    online.save_entity(second.model_copy(update={"unit_price": second.unit_price + 20}), at)
    offline.save_entity(second.model_copy(update={"unit_price": second.unit_price + 30}), at)
    console.print(
        f"While till 2 is offline: till 1 raises the prices of {first.article_nr} and {second.article_nr}; "
        f"till 2 renames {first.article_nr} and sets another price for {second.article_nr}"
    )


async def _masterdata_settled(tills: list[Till], timeout_seconds: float, console: Console) -> bool:
    """Wait until both tills hold the same master data with nothing pending; report what happened."""
    def settled() -> bool:
        return all(
            t.status().pending == 0 and not t.relay.feed.status().catching_up and not t.store.pending_masterdata()
            for t in tills
        ) and len({t.store.masterdata_state_hash() for t in tills}) == 1

    try:
        await _wait(settled, min(timeout_seconds, 60.0), "the master data to settle")
    except DemoError:
        console.print("The tills' master data did not settle within 60 s")
        return False
    console.print("Master data: equal on both tills")
    for i, till in enumerate(tills, 1):
        outcomes = till.relay.feed.status().outcomes
        differences = till.differences()
        console.print(
            f"  till {i}: {outcomes.get('rebased', 0)} change(s) rebased, {len(differences)} difference(s) listed"
            + "".join(f"\n    {d.entity_kind} {d.entity_key}: {d.reason}" for d in differences)
        )
    return True


@dataclass
class _Scene:
    receipt_id: UUID | None = None
    closed: int = 0
    same: bool = False
    total: int = 0
    race_notices: int = 0
    stale_refused: int = 0


async def _restaurant_scene(tills: list[Till], export: BakeryExport, timeout_seconds: float, console: Console) -> _Scene:
    """The receipt handover on one table (see the module docstring)."""
    one, two = tills
    articles = sorted(export.articles.values(), key=lambda a: a.article_nr)[:3]
    user = CASHIERS["2"]
    waiter = Cashier(cashier_id=user.cashier_id, name=user.name)
    at = dt.datetime.now(dt.UTC)

    def line(n: int, quantity: int = 1) -> SaleLine:
        a = articles[n]
        return SaleLine(a.article_nr, a.text, Decimal(quantity), a.unit_price, a.vat_key)

    scene = _Scene()
    console.print("Restaurant scene: both tills open table T1 at the same moment")
    on_one = one.open_receipt(table_nr="T1", cashier=waiter, at=at)
    on_two = two.open_receipt(table_nr="T1", cashier=waiter, at=at)
    one.add_line(on_one, line(0, 2), at)
    two.add_line(on_two, line(1), at)

    def one_receipt() -> UUID | None:
        views = [t.store.open_receipt_of_table("T1") for t in tills]
        if any(v is None or v.pending or len(v.lines) != 2 for v in views):
            return None
        return views[0].receipt_id if views[0].receipt_id == views[1].receipt_id else None  # type: ignore[union-attr]

    await _wait(lambda: one_receipt() is not None, timeout_seconds, "one receipt for table T1 on both tills")
    table = one_receipt()
    assert table is not None
    scene.receipt_id = table
    scene.race_notices = sum(1 for t in tills for n in t.notices() if n.code == "table_taken")
    for i, till in enumerate(tills, 1):
        for notice in till.notices():
            console.print(f"  till {i} notice: {notice.message}")
    console.print(f"  table T1 is receipt {table} with both lines on both tills")

    await two.stop_sync()
    one.add_line(table, line(2), at)
    await _wait(lambda: not one.receipt(table).pending, timeout_seconds, "till 1's line accepted")
    stale = two.pay_receipt(table, PaymentType.CASH, PAYMENT_TYPES[PaymentType.CASH].name, at)
    console.print(
        f"  till 2, offline, takes {stale.total / 100:.2f} EUR for table T1 while till 1 added a line "
        f"(table now {one.receipt(table).total / 100:.2f} EUR)"
    )
    two.start_sync()
    await _wait(lambda: any(n.code == "stale_payment" for n in two.notices()) and not two.receipt(table).pending,
                timeout_seconds, "the stale payment's verdict on till 2")
    scene.stale_refused = sum(1 for n in two.notices() if n.code == "stale_payment")
    console.print(f"  till 2 notice: {[n for n in two.notices() if n.code == 'stale_payment'][-1].message}")
    paid = two.pay_receipt(table, PaymentType.CASH, PAYMENT_TYPES[PaymentType.CASH].name, dt.datetime.now(dt.UTC))
    await _wait(lambda: all(t.receipt(table).status == "closed" for t in tills) and two.receipt(table).receipt_number is not None,
                timeout_seconds, "table T1 closed on both tills")
    views = [t.receipt(table) for t in tills]
    scene.closed = 1
    scene.total = views[0].total
    scene.same = (
        [v.line.line_id for v in views[0].lines] == [v.line.line_id for v in views[1].lines]
        and views[0].total == views[1].total == paid.total == sum(v.line.amount for v in views[0].lines)
    )
    console.print(
        f"  till 2 pays {paid.total / 100:.2f} EUR again: accepted, receipt number {views[1].receipt_number} of till 2; "
        "table T1 is closed on both tills"
    )
    return scene


async def _password_reset_scene(
    settings: DemoSettings, tills: list[Till], export: BakeryExport, account_name: str, password: str, run_id: str,
    console: Console,
) -> tuple[bool, int, list[str]]:
    """The owner forgot the password (both tills are signed out): till 2 keeps selling, till 1
    asks for a new password, a service technician approves it, till 2 signs in with it and
    uploads its sales. Returns (approved and the new password works and the old one not,
    how many sales made while signed out are archived, their receipt ids)."""
    one, two = tills
    console.print("Password reset: both tills are signed out; till 2 keeps selling, till 1 asks for a new password")
    article = sorted(export.articles.values(), key=lambda a: a.article_nr)[0]
    sold = [two.sell(
        [SaleLine(article.article_nr, article.text, Decimal(1), article.unit_price, article.vat_key)],
        payment_type=PaymentType.CASH, payment_name=PAYMENT_TYPES[PaymentType.CASH].name,
        cashier=Cashier(cashier_id=CASHIERS["1"].cashier_id, name=CASHIERS["1"].name), at=dt.datetime.now(dt.UTC),
    ) for _ in range(2)]
    new_password = secrets.token_urlsafe(12) + "Bb2!"
    requested = await one.request_password_reset(account_name, new_password)
    technician_password = secrets.token_urlsafe(16)
    technician = await add_technician(settings, f"demo-{run_id.lower()}", technician_password, management_ui=False)
    try:
        ops = OpsSettings(amqp_url=settings.amqp_url)
        listed = await call_worker(ops, technician, technician_password, APPROVAL_QUERY_KEY, ApprovalMessage(message=ListPasswordResets()))
        pending = [r for r in getattr(listed.reply, "requests", ()) if r.request_id == requested.request_id]
        console.print(f"  technician {technician} sees the request pending ({len(pending)} of the list) and approves it")
        decided = await call_worker(
            ops, technician, technician_password, APPROVAL_DECISION_KEY,
            ApprovalMessage(message=ApprovePasswordReset(
            request_id=requested.request_id, command_id=uuid.uuid4(), verification_code=requested.verification_code
        )),
        )
    finally:
        await remove_technician(settings, technician)
    approved = isinstance(decided.reply, PasswordResetDecided) and decided.reply.request.status == "approved"
    try:
        await two.sign_in(account_name, password)
        old_refused = False
    except AccountError:
        old_refused = True
    await asyncio.sleep(1.1)  # the sign-in throttle after a wrong password
    signed_in = await two.sign_in(account_name, new_password)
    for notice in signed_in.notices:
        console.print(f"  till 2 at sign-in: {notice.message}")
    two.start_sync()
    await _wait(lambda: two.status().pending == 0, settings.drain_timeout_seconds, "till 2 uploading its sales")
    await two.stop_sync()
    await two.sign_out()
    pool = await create_pool(settings.database_url, 1)
    try:
        archived = await _wait_count(
            pool, "select count(*) from archive_records where kind = 'receipt' and payload->'record'->>'receipt_id' = any($1::text[])",
            [str(r.receipt_id) for r in sold], len(sold), settings.drain_timeout_seconds,
        )
    finally:
        await pool.close()
    console.print(
        f"  approved: {approved}; the old password refused: {old_refused}; {archived} of {len(sold)} sales made while "
        "signed out archived"
    )
    return approved and old_refused, archived, [str(r.receipt_id) for r in sold]


async def _wait_count(pool: asyncpg.Pool, query: str, arg: Any, want: int, timeout_seconds: float) -> int:
    deadline = time.monotonic() + timeout_seconds
    while True:
        count = await pool.fetchval(query, arg)
        if count >= want or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.2)


async def _other_tills_visible(tills: list[Till], timeout_seconds: float, console: Console) -> bool:
    """Wait until each till holds the other's receipts and Z-reports (mode ``archive_masterdata_receipts``)."""
    def visible() -> bool:
        for till, other in ((tills[0], tills[1]), (tills[1], tills[0])):
            for kind in ("receipt", "zreport"):
                if len(till.store.shared_records(kind)) != len(other.store.recorded(kind)):
                    return False
        return True

    try:
        await _wait(visible, min(timeout_seconds, 120.0), "each till to hold the other's receipts and Z-reports")
    except DemoError as exc:
        console.print(str(exc))
        return False
    console.print(
        "Each till holds the other's receipts and Z-reports: "
        + ", ".join(f"till {i}: {len(t.store.shared_records('receipt'))} receipts, "
                    f"{len(t.store.shared_records('zreport'))} Z-reports" for i, t in enumerate(tills, 1))
    )
    return True


async def _replay(export: BakeryExport, tills: list[Till], console: Console) -> tuple[dict[int, tuple[int, UUID]], int]:
    """Sell every ticket on its till; Z-report per till per day. Returns ticket → (till, receipt_id)."""
    offline_from = int(len(export.tickets) * OFFLINE_FROM)
    offline_until = int(len(export.tickets) * OFFLINE_UNTIL)
    offline = tills[1]
    receipts: dict[int, tuple[int, UUID]] = {}
    offline_count = 0
    pending_at_start = 0
    by_day: dict[dt.date, list[Ticket]] = {}
    for ticket in export.tickets:
        by_day.setdefault(ticket.business_day, []).append(ticket)
    index = 0
    with _progress(console) as progress:
        task = progress.add_task("Replaying tickets", total=len(export.tickets), info="")
        for day, tickets in sorted(by_day.items()):
            for ticket in tickets:
                if index == offline_from:
                    await offline.stop_sync()
                    _change_articles_while_offline(tills, export, ticket.at.astimezone(dt.UTC), progress.console)
                    pending_at_start = offline.store.outbox_counts()[0]
                    progress.console.print(
                        f"Till 2 goes offline at ticket {index + 1} and keeps selling "
                        f"({pending_at_start} records of it not uploaded yet)"
                    )
                if index == offline_until:
                    offline.start_sync()
                    pending = offline.store.outbox_counts()[0]
                    progress.console.print(
                        f"Till 2 is back online: {pending} records to upload, "
                        f"{pending - pending_at_start} of them recorded while offline"
                    )
                till = tills[ticket.till_index]
                receipt = sell_ticket(till, export, ticket, day)
                receipts[ticket.ticket_number] = (ticket.till_index, receipt.receipt_id)
                if till is offline and not offline.syncing:
                    offline_count += 1
                index += 1
                pending = sum(t.store.outbox_counts()[0] for t in tills) if index % 100 == 0 else None
                progress.update(task, advance=1, info=f"{day}" + (f", {pending} awaiting upload" if pending is not None else ""))
                await asyncio.sleep(0)
            closing_at = (max(t.at for t in tickets) + dt.timedelta(minutes=5)).astimezone(dt.UTC)
            for till in tills:
                till.close_day(day, closing_at)
    if not offline.syncing:
        offline.start_sync()
    return receipts, offline_count


def sell_ticket(till: Till, export: BakeryExport, ticket: Ticket, day: dt.date) -> Any:
    """Record ``ticket`` of the bakery file as a closed receipt on ``till`` (its lines by the
    export's articles, its payment type, cashier and time; ``day``: its business day) and
    return the receipt."""
    return till.sell(
        [_sale_line(export, line) for line in ticket.lines],
        payment_type=ticket.payment_type,
        payment_name=PAYMENT_TYPES[ticket.payment_type].name,
        cashier=ticket.cashier,
        at=ticket.at.astimezone(dt.UTC),
        business_day=day,
    )


def _sale_line(export: BakeryExport, line: Any) -> SaleLine:
    article = export.articles[line.article_name]
    return SaleLine(article.article_nr, article.text, line.quantity, line.unit_price, article.vat_key)


async def _drain(tills: list[Till], timeout_seconds: float, console: Console) -> None:
    total = sum(sum(till.store.outbox_counts()) for till in tills)
    with _progress(console) as progress:
        task = progress.add_task("Uploading", total=total, info="")
        deadline = time.monotonic() + timeout_seconds
        while True:
            statuses = [till.status() for till in tills]
            pending = sum(s.pending for s in statuses)
            rate = sum(s.rate_per_second for s in statuses)
            progress.update(task, completed=total - pending, info=f"{pending} pending, {rate:.0f}/s")
            if pending == 0:
                return
            if time.monotonic() > deadline:
                states = "; ".join(f"till {i + 1}: {s.state} {s.detail}" for i, s in enumerate(statuses))
                raise DemoError(f"{pending} records still not uploaded after {timeout_seconds:.0f} s ({states})")
            await asyncio.sleep(0.2)


async def _verify(
    settings: DemoSettings,
    export: BakeryExport,
    tills: list[Till],
    expected: dict[UUID | None, list[tuple[UUID, int, str]]],
    ticket_receipts: dict[int, tuple[int, UUID]],
    account_name: str,
    offline_count: int,
    started: float,
    run_dir: Path,
    console: Console,
    masterdata_same: bool,
    scene: _Scene,
    other_tills_visible: bool,
) -> DemoReport:
    account_id = tills[0].store.identity().account_id
    expected_ids = {record_id: kind for records in expected.values() for record_id, _, kind in records}
    pool = await create_pool(settings.database_url, 1)
    try:
        rows = await _wait_for_archive(
            settings, pool, account_id, len(expected_ids), settings.drain_timeout_seconds, console
        )
    finally:
        await pool.close()
    archived_ids = {r["record_id"] for r in rows}
    # the bakery's receipts; the restaurant scene's table receipt is reported on its own
    receipts = [r for r in rows if r["kind"] == "receipt" and UUID(r["payload"]["record"]["receipt_id"]) != scene.receipt_id]
    zreports = [r for r in rows if r["kind"] == "zreport"]
    receipt_keys = {(r["till_id"], r["payload"]["record"]["receipt_id"]) for r in receipts}
    z_keys = {(r["till_id"], r["payload"]["record"]["z_nr"]) for r in zreports}
    by_receipt_id = {UUID(r["payload"]["record"]["receipt_id"]): r["payload"]["record"] for r in receipts}
    mismatches = 0
    for ticket in export.tickets:
        _, receipt_id = ticket_receipts[ticket.ticket_number]
        archived = by_receipt_id.get(receipt_id)
        if archived is None:
            continue  # counted as missing
        got = [(l["text"], l["quantity"], l["unit_price"]) for l in archived["lines"]]
        want = [(l.article_name, str(l.quantity), l.unit_price) for l in ticket.lines]
        if got != want or archived["total"] != ticket.total:
            mismatches += 1
    return DemoReport(
        account_name=account_name,
        receipts_in_input=len(export.tickets),
        receipts_archived=len(receipt_keys),
        zreports_expected=sum(1 for k in expected_ids.values() if k == "zreport"),
        zreports_archived=len(z_keys),
        masterdata_expected=sum(1 for k in expected_ids.values() if k == "masterdata"),
        masterdata_archived=sum(1 for r in rows if r["kind"] == "masterdata"),
        receipt_events_archived=sum(1 for r in rows if r["kind"] == "receipt_event"),
        records_expected=len(expected_ids),
        records_archived=len(rows),
        missing=len(set(expected_ids) - archived_ids),
        duplicates=(len(receipts) - len(receipt_keys)) + (len(zreports) - len(z_keys)),
        unexpected=len(archived_ids - set(expected_ids)),
        content_mismatches=mismatches,
        input_total_cents=sum(t.total for t in export.tickets),
        archived_total_cents=sum(  # the bakery's days (the restaurant scene's closing is not in the input)
            r["payload"]["record"]["total"] for r in zreports
            if dt.date.fromisoformat(r["payload"]["record"]["business_day"]) in set(export.business_days)
        ),
        offline_till="Kasse 2",
        receipts_recorded_offline=offline_count,
        masterdata_same_on_all_tills=masterdata_same,
        masterdata_rebased=sum(t.relay.feed.status().outcomes.get("rebased", 0) for t in tills),
        masterdata_differences_listed=sum(len(t.differences()) for t in tills),
        other_tills_records_visible=other_tills_visible,
        shared_receipts_closed=scene.closed,
        shared_receipts_same_on_all_tills=scene.same,
        shared_receipt_total_cents=scene.total,
        table_race_notices=scene.race_notices,
        stale_payments_refused=scene.stale_refused,
        seconds=round(time.monotonic() - started, 1),
        run_dir=str(run_dir),
    )


async def _wait_for_archive(
    settings: DemoSettings,
    pool: asyncpg.Pool,
    account_id: UUID | None,
    expected: int,
    timeout_seconds: float,
    console: Console,
) -> list[asyncpg.Record]:
    """Poll the archive until it holds ``expected`` records of the account.

    Shows progress. After 30 s without progress: if the archive writer's queue is empty
    the missing records were refused (dead-lettered) and waiting longer is pointless;
    otherwise it says where to look and waits until ``timeout_seconds``.
    """
    deadline = time.monotonic() + timeout_seconds
    last_count, last_change, warned = -1, time.monotonic(), False
    user, password = settings.management_credentials
    async with BrokerAdmin(settings.management_url, user, password) as admin:
        with _progress(console) as progress:
            task = progress.add_task("Archiving", total=expected, info="")
            while True:
                count = await pool.fetchval("select count(*) from archive_records where account_id = $1", account_id)
                progress.update(task, completed=count)
                if count != last_count:
                    last_count, last_change = count, time.monotonic()
                elif time.monotonic() - last_change > 30:
                    queue = await admin.queue(settings.vhost, ARCHIVE_WRITER_QUEUE) or {}
                    if queue.get("messages", 0) == 0:
                        progress.console.print(
                            f"The archive writer has taken every upload, {expected - count} records were refused: "
                            "see `tillsync ops dead-letters`"
                        )
                        break
                    if not warned:
                        progress.console.print(
                            f"No progress for 30 s with {queue.get('messages')} uploads waiting: is the archive "
                            "writer running? (management UI: queue 'archive-writer', consumers)"
                        )
                        warned = True
                if count >= expected or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
    return await pool.fetch(
        "select record_id, till_id, kind, payload from archive_records where account_id = $1", account_id
    )


def _close_scene_day(tills: list[Till], console: Console) -> None:
    """Close the restaurant scene's business day (today) on each till that has receipts of it."""
    now = dt.datetime.now(dt.UTC)
    for till in tills:
        if till.store.receipts_for_closing(now.date()):
            report = till.close_day(now.date(), now)
            console.print(f"{till.store.identity().till_name} closes {now.date()}: Z {report.z_nr}, {report.receipt_count} receipt(s)")


async def _archive_checks(settings: DemoSettings, account_name: str, run_dir: Path, console: Console) -> dict[str, Any]:
    """The tax auditor's view of the run's account: chains, completeness, and a DSFinV-K
    export per till (into ``run_dir``) checked by the ``dsfinvk`` library's validator.
    Returns the ``DemoReport`` fields ``chains_intact``, ``archive_complete``,
    ``dsfinvk_exports`` and ``dsfinvk_valid``."""
    conn = await connect_archive(settings.database_url)
    try:
        tills = await select_tills(conn, account=account_name)
        chains = await verify_archive(conn, tills)
        for chain in chains:
            verdict = "intact" if chain.intact else f"BROKEN at till_seq {chain.first_broken.till_seq}"  # type: ignore[union-attr]
            console.print(f"Archive verify: {chain.till_name}: {chain.records} records, hash chain {verdict}")
        statuses = await archive_status(conn, account_name=account_name)
        for status in statuses:
            console.print(f"Archive status: {status.till_name}: {'complete' if status.complete else 'INCOMPLETE'}; {status.facts()}")
            for problem in status.problems():
                console.print(f"  - {problem}")
        exports, valid = [], True
        for till in tills:
            days = await conn.fetchrow(
                """
                select min((payload->'record'->>'business_day')::date) as first, max((payload->'record'->>'business_day')::date) as last
                from archive_records where till_id = $1 and kind = 'zreport'
                """,
                till["till_id"],
            )
            if days["first"] is None:
                continue
            path = run_dir / f"dsfinvk-{till['serial_number']}.zip"
            summary = await export_dsfinvk(conn, till["till_id"], days["first"], days["last"], path)
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):  # the validator prints format problems
                errors = validate_zip(str(path))
            problems = errors + printed.getvalue().splitlines()
            valid = valid and not problems and not summary.discrepancies
            exports.append(str(path))
            console.print(
                f"DSFinV-K export {path.name}: {summary.closings} closings, {summary.receipts} receipts, "
                + ("valid (dsfinvk validator)" if not problems else f"INVALID: {'; '.join(problems[:3])}")
            )
    finally:
        await conn.close()
    return {
        "chains_intact": all(c.intact for c in chains),
        "archive_complete": all(s.complete for s in statuses),
        "dsfinvk_exports": exports,
        "dsfinvk_valid": valid and bool(exports),
    }


def summary_table(report: DemoReport) -> Table:
    """A two-column table of the report for people."""
    table = Table(title="tillsync demo — archive vs. input", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in asdict(report).items():
        if key in ("run_dir", "receipts_not_in_input", "dsfinvk_exports"):
            continue
        table.add_row(key, str(value))
    return table
