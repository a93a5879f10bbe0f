"""``tillsync``: one command line for setup, services, the demo, ops and the till agent.

Errors are printed as one sentence naming what is wrong, with exit code 1.
"""

from __future__ import annotations

import asyncio
import importlib
import datetime as dt
import json
import logging
import re
import signal
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Optional
import uuid
from uuid import UUID

import aio_pika
import asyncpg
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.amqp import ORIGINAL_USER_HEADER, REASON_HEADER, connect
from shared.broker_admin import BrokerAdmin
from shared.fiscal import PaymentType, VatKey, line_amount
from shared.logging import configure_logging
from shared.models import (
    ENTITY_ADAPTER,
    ENTITY_KINDS,
    MAX_CENTS,
    MAX_QUANTITY,
    ApprovalError,
    ApprovalMessage,
    ApprovalReply,
    ApprovePasswordReset,
    Article,
    Cashier,
    CustomSyncFlags,
    ListPasswordResets,
    nfkc,
    PasswordResetDecided,
    PasswordResetInfo,
    PasswordResetList,
    Receipt,
    RejectPasswordReset,
    SyncMode,
    ZReport,
)
from shared.settings import BrokerSettings, ServiceSettings
from shared.topology import (
    till_broker_user,
    APPROVAL_DECISION_KEY,
    APPROVAL_QUERY_KEY,
    TOPOLOGY,
    dead_letter_queue_name,
    definitions,
    download_categories,
)
from tillsync.archive_cli import archive_app
from tillsync.bakery import read_export
from tillsync.console import err, out
from tillsync.console import error_line as _error_line
from tillsync.console import friendly as _friendly
from tillsync.demo import DemoSettings, run_demo, summary_table
from tillsync.ops import OpsError, OpsSettings, add_technician, call_worker, ops_user_name, remove_technician
from tillsync.processes import SERVICES
from tillsync.setup import SetupSettings, setup
from till_agent.booking import SaleLine
from till_agent.handover import ReceiptView
from till_agent.store import TillStore, TillStoreError
from till_agent.till import Till, TillSettings

app = typer.Typer(help="tillsync: cloud sync and legal archive for tills.", no_args_is_help=True)
till_app = typer.Typer(help="Commands of the till agent (one till per data directory).", no_args_is_help=True)
ops_app = typer.Typer(help="Commands for operators and service technicians.", no_args_is_help=True)
topology_app = typer.Typer(help="The RabbitMQ topology.", no_args_is_help=True)
technician_app = typer.Typer(help="Service technicians: their own broker users (admin).", no_args_is_help=True)
password_requests_app = typer.Typer(
    help="Password resets waiting for a technician's approval (run as the technician: TILLSYNC_OPS_USER).",
    no_args_is_help=True,
)
ops_app.add_typer(technician_app, name="technician")
ops_app.add_typer(password_requests_app, name="password-requests")
app.add_typer(till_app, name="till")
app.add_typer(ops_app, name="ops")
app.add_typer(topology_app, name="topology")
app.add_typer(archive_app, name="archive")

DEFINITIONS_PATH = Path(__file__).resolve().parent.parent / "deploy" / "rabbitmq" / "definitions.json"
@app.callback()
def _quiet_libraries() -> None:
    """Commands print their own messages; library chatter stays out (services log fully)."""
    configure_logging("WARNING")
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _read_password(password_stdin: bool, confirm: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return typer.prompt("Password", hide_input=True, confirmation_prompt=confirm)


# ---------------------------------------------------------------------------
# setup, services, topology, demo


@app.command("setup")
@_friendly
def setup_command() -> None:
    """Create the database and schema, the vhost, the sign-up user and the topology."""
    for line in asyncio.run(setup(SetupSettings())):
        out.print(line)


@app.command("service")
def service_command(
    name: str = typer.Argument(..., help=f"one of: {', '.join(SERVICES)}"),
) -> None:
    """Run one service in the foreground until SIGINT/SIGTERM."""
    if name not in SERVICES:
        _error_line(f"unknown service {name!r}; known: {', '.join(SERVICES)}")
        raise typer.Exit(2)
    importlib.import_module(f"{SERVICES[name]}.main").run()


@topology_app.command("export")
def topology_export(
    path: Path = typer.Option(DEFINITIONS_PATH, help="where to write the definitions file"),
    vhost: str = typer.Option("tillsync", help="vhost named in the file"),
    check: bool = typer.Option(False, help="only check that the file is up to date"),
) -> None:
    """Write the topology as a RabbitMQ definitions file (import it in the management UI)."""
    text = json.dumps(definitions(vhost), indent=2, sort_keys=True) + "\n"
    if check:
        if not path.exists() or path.read_text() != text:
            _error_line(f"{path} is not up to date; run `tillsync topology export`")
            raise typer.Exit(1)
        out.print(f"{path} is up to date")
        return
    path.write_text(text)
    out.print(f"wrote {path}")


@app.command("demo")
@_friendly
def demo_command(
    input: Path = typer.Option(..., "--input", help="a bakery till export (CSV) to replay"),
    as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object on the last line of stdout"),
    external_services: bool = typer.Option(
        False, help="the services run already (e.g. docker compose); do not start them"
    ),
) -> None:
    """Replay a bakery's sales through two tills into the archive and compare."""
    console = err if as_json else out
    # SIGTERM (e.g. from a timeout) stops the demo like Ctrl-C: its services are stopped too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    report = asyncio.run(
        run_demo(DemoSettings(), input, console=console, start_services=not external_services)
    )
    console.print(summary_table(report))
    if as_json:
        print(report.as_json(), flush=True)
    if not report.ok:
        _error_line("the archive does not match the input")
        raise typer.Exit(1)


# ---------------------------------------------------------------------------
# ops


@ops_app.command("dead-letters")
@_friendly
def dead_letters(
    queue: Optional[str] = typer.Argument(None, help="service queue whose dead letters to show (default: all)"),
    count: int = typer.Option(10, help="messages to show per queue (they stay in the queue)"),
) -> None:
    """Show how many messages each dead-letter queue holds and why they were refused."""
    settings = BrokerSettings()

    async def body() -> None:
        names = [q.name for q in TOPOLOGY.queues if q.name.endswith(".dead-letter")]
        if queue:
            names = [dead_letter_queue_name(queue)]
        user, password = settings.management_credentials
        connection = await connect(settings.amqp_url, "tillsync-ops", robust=False)
        try:
            async with BrokerAdmin(settings.management_url, user, password) as admin:
                for name in names:
                    channel = await connection.channel()
                    try:
                        declared = await channel.declare_queue(name, passive=True)  # exact count, no statistics lag
                    except aio_pika.exceptions.ChannelNotFoundEntity:
                        out.print(f"{name}: does not exist")
                        continue
                    messages = declared.declaration_result.message_count
                    shown = min(count, messages)
                    more = f" (showing the oldest {shown}; --count N for more)" if messages > shown else ""
                    out.print(f"{name}: {messages} message(s){more}")
                    if count and messages:
                        for message in await admin.get_messages(settings.vhost, name, count):
                            headers = message.get("properties", {}).get("headers", {})
                            reason = headers.get(REASON_HEADER) or _x_death_reason(headers)
                            message_id = message.get("properties", {}).get("message_id", "?")
                            sender = headers.get(ORIGINAL_USER_HEADER)
                            out.print(f"  - {message_id}" + (f" from {sender}" if sender else "") + f": {reason}")
        finally:
            await connection.close()

    asyncio.run(body())


@ops_app.command("masterdata-conflicts")
@_friendly
def masterdata_conflicts(
    account_name: Optional[str] = typer.Argument(None, help="only this account (default: all)"),
    limit: int = typer.Option(20, min=1, help="show the newest N conflicts"),
) -> None:
    """Show the master-data changes the cloud did not apply, newest first, with the reason.

    The records themselves are in the archive; each till lists its own as differences."""
    settings = ServiceSettings()

    async def body() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            rows = await conn.fetch(
                """
                select c.detected_at, a.account_name, t.till_name, t.serial_number, c.entity_kind, c.entity_key,
                       c.base_version, c.current_version, c.reason, count(*) over () as total
                from masterdata_conflicts c
                join accounts a using (account_id)
                left join tills t using (till_id)
                where $1::text is null or a.account_name = lower($1::text)
                order by c.detected_at desc limit $2
                """,
                account_name, limit,
            )
        finally:
            await conn.close()
        if not rows:
            out.print("no master-data conflicts" + (f" for {account_name}" if account_name else ""))
            return
        table = Table(title=f"master-data conflicts: {rows[0]['total']} (newest {len(rows)})")
        for column in ("when (UTC)", "account", "till", "entity", "based on", "cloud had", "reason"):
            table.add_column(column)
        for r in rows:
            table.add_row(
                r["detected_at"].strftime("%Y-%m-%d %H:%M:%S"), r["account_name"],
                f"{r['till_name']} ({r['serial_number']})", f"{r['entity_kind']} {r['entity_key']}",
                str(r["base_version"] if r["base_version"] is not None else "new"),
                str(r["current_version"] or "-"), r["reason"],
            )
        out.print(table)

    asyncio.run(body())


@ops_app.command("receipt-refusals")
@_friendly
def receipt_refusals(
    account_name: Optional[str] = typer.Argument(None, help="only this account (default: all)"),
    limit: int = typer.Option(20, min=1, help="show the newest N refusals"),
) -> None:
    """Show the events of shared receipts the receipt handover router refused, newest first,
    and any receipt number used twice by one till.

    The records themselves are in the archive; each till lists its own as notices
    (`tillsync till notices`)."""
    settings = ServiceSettings()

    async def body() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            rows = await conn.fetch(
                """
                select r.refused_at, a.account_name, r.till_id, t.till_name, t.serial_number, r.receipt_id, r.event_type,
                       r.code, r.reason, count(*) over () as total
                from handover_refusals r
                join accounts a using (account_id)
                left join tills t using (till_id)
                where $1::text is null or a.account_name = lower($1::text)
                order by r.refused_at desc limit $2
                """,
                account_name, limit,
            )
            collisions = await conn.fetch(
                """
                select c.detected_at, a.account_name, c.till_id, t.till_name, t.serial_number, c.receipt_number,
                       c.receipt_id, c.other_receipt_id
                from receipt_number_collisions c
                join accounts a using (account_id)
                left join tills t using (till_id)
                where $1::text is null or a.account_name = lower($1::text)
                order by c.detected_at desc
                """,
                account_name,
            )
        finally:
            await conn.close()
        if not rows:
            out.print("no refused receipt events" + (f" for {account_name}" if account_name else ""))
        else:
            table = Table(title=f"refused receipt events: {rows[0]['total']} (newest {len(rows)})")
            for column in ("when (UTC)", "account", "till", "receipt", "event", "code", "reason"):
                table.add_column(column)
            for r in rows:
                table.add_row(
                    r["refused_at"].strftime("%Y-%m-%d %H:%M:%S"), r["account_name"], _till_label(r),
                    str(r["receipt_id"]), r["event_type"], r["code"], r["reason"],
                )
            out.print(table)
        if collisions:
            table = Table(title=f"receipt numbers used twice by one till: {len(collisions)}")
            for column in ("when (UTC)", "account", "till", "receipt number", "receipt", "number first taken by"):
                table.add_column(column)
            for c in collisions:
                table.add_row(
                    c["detected_at"].strftime("%Y-%m-%d %H:%M:%S"), c["account_name"], _till_label(c),
                    str(c["receipt_number"]), str(c["receipt_id"]), str(c["other_receipt_id"]),
                )
            out.print(table)

    asyncio.run(body())


def _till_label(row: Any) -> str:
    return f"{row['till_name']} ({row['serial_number']})" if row["till_name"] else f"till {row['till_id']}"


@technician_app.command("add")
@_friendly
def technician_add(
    name: str = typer.Argument(..., help="the technician's name; the broker user is ops-NAME"),
    password_stdin: bool = typer.Option(False, help="read the password from stdin instead of prompting"),
    management_ui: bool = typer.Option(False, "--management-ui", help="may also log in to the RabbitMQ management UI"),
) -> None:
    """Create a technician's broker user (or set a new password): it may only send
    password-reset decisions and queries. Uses the admin credentials of TILLSYNC_AMQP_URL."""
    user = asyncio.run(add_technician(BrokerSettings(), name, _read_password(password_stdin, confirm=True), management_ui))
    out.print(f"technician {user} can now list, approve and reject password resets (TILLSYNC_OPS_USER={user.removeprefix('ops-')})")


@ops_app.command("sign-out-till")
@_friendly
def ops_sign_out_till(
    account_name: str = typer.Argument(...),
    serial_number: str = typer.Argument(..., help="the till's serial number, as `till forgot-password` named it"),
) -> None:
    """Sign out a till that is lost or broken while signed in (administrator): its broker
    user is deleted and its connections close; the account's other tills and the
    archive are untouched. Then a password reset can be requested."""
    settings = ServiceSettings()

    async def body() -> str:
        conn = await asyncpg.connect(settings.database_url)
        try:
            till = await conn.fetchrow(
                "select t.till_id, t.till_name, t.signed_in from tills t join accounts a using (account_id) "
                "where a.account_name = lower($1) and t.serial_number = $2",
                account_name.strip(), serial_number,
            )
            if till is None:
                raise ValueError(f"account {account_name} has no till with serial number {serial_number!r}")
            if not till["signed_in"]:
                return f"till {till['till_name']} ({serial_number}) is signed out already"
            user, password = settings.management_credentials
            async with BrokerAdmin(settings.management_url, user, password) as admin:
                await admin.delete_user(till_broker_user(till["till_id"]))
            await conn.execute(
                "update tills set signed_in = false, secret_sha256 = null, signed_out_at = now() where till_id = $1",
                till["till_id"],
            )
            return f"till {till['till_name']} ({serial_number}) signed out; it must sign in again to sync"
        finally:
            await conn.close()

    out.print(asyncio.run(body()))


@technician_app.command("remove")
@_friendly
def technician_remove(name: str = typer.Argument(...)) -> None:
    """Delete a technician's broker user; their open connections close."""
    removed = asyncio.run(remove_technician(BrokerSettings(), name))
    out.print(f"technician {ops_user_name(name)} removed" if removed else f"there is no technician {ops_user_name(name)}")


def _ops_call(routing_key: str, message: Any, user: str | None, password_stdin: bool) -> ApprovalReply:
    settings = OpsSettings()
    name = user or settings.ops_user
    if not name:
        raise ValueError("who are you? give --user NAME or set TILLSYNC_OPS_USER (see `tillsync ops technician add`)")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif settings.ops_password is not None:
        password = settings.ops_password.get_secret_value()
    else:
        password = typer.prompt(f"Password of {ops_user_name(name)}", hide_input=True)
    reply = asyncio.run(call_worker(settings, ops_user_name(name), password, routing_key, ApprovalMessage(message=message)))
    if isinstance(reply.reply, ApprovalError):
        raise OpsError(reply.reply.message)
    return reply


OpsUser = typer.Option(None, "--user", help="technician name (default: $TILLSYNC_OPS_USER)")
OpsPasswordStdin = typer.Option(False, help="read the technician's password from stdin (else $TILLSYNC_OPS_PASSWORD or a prompt)")
RequestId = typer.Argument(..., help="the request's id, as listed")
CommandId = typer.Option(None, help="repeat a command with its id (a retry changes nothing twice)")


def _request_line(r: PasswordResetInfo) -> str:
    """One request on one line: id, account, where and when asked, age (OVERDUE past 48 h), status."""
    age = f"{r.age_hours:.1f} h old" + (", OVERDUE" if r.overdue else "")
    warnings = []
    if r.superseded_recently:
        warnings.append(f"{r.superseded_recently} other request(s) of this account superseded in 14 days")
    if r.signed_in_since:
        warnings.append(f"signed in with the old password since: {', '.join(r.signed_in_since)}")
    state = (
        f"pending, expires {_utc(r.expires_at)} UTC" if r.status == "pending"
        else f"{r.status} by {r.decided_by} at {_utc(r.decided_at)} UTC" + (f": {r.reason}" if r.reason else "")
    )
    warn = f"  CHECK: {'; '.join(warnings)}" if warnings and r.status == "pending" else ""
    return f"{r.request_id}  {r.account_name}  asked on {r.requested_on} at {_utc(r.requested_at)} UTC ({age})  {state}{warn}"


@password_requests_app.command("list")
@_friendly
def password_requests_list(
    all_: bool = typer.Option(False, "--all", help="also the requests decided in the last 30 days"),
    user: Optional[str] = OpsUser,
    password_stdin: bool = OpsPasswordStdin,
) -> None:
    """List the pending password resets, oldest first, with their age; those waiting longer
    than 48 h are flagged OVERDUE; a request expires after 14 days."""
    reply = _ops_call(APPROVAL_QUERY_KEY, ListPasswordResets(include_decided=all_), user, password_stdin)
    assert isinstance(reply.reply, PasswordResetList)
    requests = reply.reply.requests
    if not requests:
        out.print("no pending password resets" if not all_ else "no password resets in the last 30 days")
        return
    overdue = sum(1 for r in requests if r.overdue)
    out.print(f"{len(requests)} password reset(s)" + (f", {overdue} OVERDUE" if overdue else "") + ", oldest first:")
    for r in requests:
        out.print(_request_line(r))


def _decide(message: Any, user: str | None, password_stdin: bool) -> None:
    reply = _ops_call(APPROVAL_DECISION_KEY, message, user, password_stdin)
    assert isinstance(reply.reply, PasswordResetDecided)
    r = reply.reply.request
    again = " (this command was applied before; nothing changed)" if reply.reply.repeat else ""
    out.print(f"request {r.request_id} of {r.account_name}: {r.status} by {r.decided_by} at {_utc(r.decided_at)} (UTC){again}")


@password_requests_app.command("approve")
@_friendly
def password_requests_approve(
    request_id: UUID = RequestId,
    code: str = typer.Option(..., "--code", help="the verification code the caller reads from the till that asked"),
    command_id: Optional[UUID] = CommandId,
    user: Optional[str] = OpsUser,
    password_stdin: bool = OpsPasswordStdin,
) -> None:
    """Approve a password reset once the caller has read you its verification code: the
    new password replaces the old one at once."""
    _decide(
        ApprovePasswordReset(request_id=request_id, command_id=command_id or uuid.uuid4(), verification_code=code),
        user, password_stdin,
    )


@password_requests_app.command("reject")
@_friendly
def password_requests_reject(
    request_id: UUID = RequestId,
    reason: str = typer.Option(..., "--reason", help="why, shown to the owner at the next sign-in"),
    command_id: Optional[UUID] = CommandId,
    user: Optional[str] = OpsUser,
    password_stdin: bool = OpsPasswordStdin,
) -> None:
    """Reject a password reset; the old password stays valid."""
    _decide(RejectPasswordReset(request_id=request_id, command_id=command_id or uuid.uuid4(), reason=reason), user, password_stdin)


def _x_death_reason(headers: dict[str, Any]) -> str:
    deaths = headers.get("x-death") or []
    if deaths:
        return f"{deaths[0].get('reason')} in {deaths[0].get('queue')} (count {deaths[0].get('count')})"
    return "no reason recorded"


# ---------------------------------------------------------------------------
# till agent

DataDir = typer.Option(None, "--data-dir", help="the till's data directory (default: $TILLSYNC_TILL_DATA_DIR or ./till-data)")


def _open_till(data_dir: Path | None) -> Till:
    settings = TillSettings()
    return Till(TillStore(data_dir or settings.till_data_dir), settings)


@till_app.command("init")
@_friendly
def till_init(
    serial: str = typer.Option(..., help="the till's own serial number"),
    name: str = typer.Option(..., help="a name for the till, e.g. 'Kasse 1'"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Create a new till's local store."""
    settings = TillSettings()
    TillStore.create(data_dir or settings.till_data_dir, serial, name).close()
    out.print(f"till {name!r} ({serial}) created in {data_dir or settings.till_data_dir}")


@till_app.command("create-account")
@_friendly
def till_create_account(
    account_name: str = typer.Argument(..., help="email-shaped account name"),
    password_stdin: bool = typer.Option(False, help="read the password from stdin instead of prompting"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Create a server account (the password never leaves this prompt in clear except to the cloud)."""
    till = _open_till(data_dir)
    created = asyncio.run(till.create_account(account_name, _read_password(password_stdin, confirm=True)))
    out.print(f"account {created.account_name} created")


@till_app.command("sign-in")
@_friendly
def till_sign_in(
    account_name: str = typer.Argument(...),
    password_stdin: bool = typer.Option(False, help="read the password from stdin instead of prompting"),
    replace: bool = typer.Option(
        False, "--replace", help="this installation replaces another one of the same serial number that is still signed in"
    ),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Sign this till in to an account."""
    till = _open_till(data_dir)
    signed_in = asyncio.run(till.sign_in(account_name, _read_password(password_stdin, confirm=False), replace=replace))
    pending, _ = till.store.outbox_counts()
    out.print(
        f"signed in to {signed_in.account_name} as till {signed_in.till_id} (mode {signed_in.sync_mode.value}); "
        f"{pending} records waiting for upload"
    )
    for notice in signed_in.notices:
        out.print(f"notice of {_utc(notice.at)} (UTC): {notice.message}")


@till_app.command("forgot-password")
@_friendly
def till_forgot_password(
    account_name: str = typer.Argument(...),
    password_stdin: bool = typer.Option(False, help="read the new password from stdin instead of prompting"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Ask for a new account password; a service technician must approve it.

    Sign out every till of the account first. The tills keep selling meanwhile; the old
    password stays valid until the approval; then sign in with the new one."""
    till = _open_till(data_dir)
    requested = asyncio.run(till.request_password_reset(account_name, _read_password(password_stdin, confirm=True)))
    out.print(f"password reset requested: {requested.request_id}")
    out.print(f"verification code: {requested.verification_code}")
    out.print(
        "Call the service technician and read them the request and the code: they approve only a request whose code "
        "you know (the target is 48 hours; an unapproved request expires after 14 days). The old password stays "
        "valid until then. Keep selling: the tills upload everything after signing in with the new password"
    )


@till_app.command("reset-status")
@_friendly
def till_reset_status(data_dir: Optional[Path] = DataDir) -> None:
    """Show where the password reset requested on this till stands (works signed out)."""
    till = _open_till(data_dir)
    status = asyncio.run(till.password_reset_status())
    decided = f" by {status.decided_by} at {_utc(status.decided_at)} UTC" if status.decided_at else ""
    why = f": {status.reason}" if status.reason else ""
    next_step = {
        "pending": "waiting for the service technician; the old password stays valid",
        "approved": "sign in with the new password",
        "rejected": "the old password stays valid; call the service technician or ask again",
        "expired": "the old password stays valid; ask again if needed",
        "superseded": "a newer request replaced it",
    }.get(status.status, "")
    out.print(
        f"password reset {status.request_id} (requested {_utc(status.requested_at)} UTC): {status.status}{decided}{why}"
        + (f" — {next_step}" if next_step else "")
    )


@till_app.command("sign-out")
@_friendly
def till_sign_out(data_dir: Optional[Path] = DataDir) -> None:
    """Sign this till out; unsent records are kept and uploaded after the next sign-in."""
    till = _open_till(data_dir)
    pending = asyncio.run(till.sign_out())
    out.print(f"signed out; {pending} records not yet uploaded are kept and will be uploaded after the next sign-in")


@till_app.command("mode")
@_friendly
def till_mode(
    mode: SyncMode = typer.Argument(..., help="archive, archive_masterdata, archive_masterdata_receipts or custom"),
    sync: bool = typer.Option(True, "--sync/--no-sync", help="the sync switch"),
    custom: Optional[str] = typer.Option(
        None, help='custom switches as JSON, e.g. \'{"download_articles": true}\'; switches not named keep their value'
    ),
    force: bool = typer.Option(
        False, "--force", help="leave the receipt handover although this till's receipt events (payments) still wait"
    ),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Set the till's sync switch and sync mode."""
    till = _open_till(data_dir)
    if custom and mode != SyncMode.CUSTOM:
        raise ValueError("--custom is only for mode custom")
    flags = None
    if mode == SyncMode.CUSTOM:
        # switches not named keep their current value (or the default when the till was not custom yet)
        _, current_mode, current_json = till.store.sync_settings()
        current = CustomSyncFlags.model_validate_json(current_json) if current_mode == "custom" and current_json else CustomSyncFlags()
        try:
            given = json.loads(custom) if custom else {}
        except ValueError as exc:
            raise ValueError(f"--custom is not valid JSON: {exc}") from None
        if not isinstance(given, dict):
            raise ValueError('--custom must be a JSON object, e.g. \'{"download_articles": true}\'')
        unknown = sorted(set(given) - set(CustomSyncFlags.model_fields))
        if unknown:
            raise ValueError(f"unknown switch(es) {', '.join(unknown)}; known: {', '.join(CustomSyncFlags.model_fields)}")
        flags = CustomSyncFlags.model_validate({**current.model_dump(), **given})
    result = asyncio.run(till.set_sync_mode(sync, mode, flags, force=force))
    out.print(f"sync {'on' if result.sync_enabled else 'off'}, mode {result.sync_mode.value}" + _switches(result.custom))


def _switches(flags: CustomSyncFlags | None) -> str:
    if flags is None:
        return ""
    on = [name for name, value in flags.model_dump().items() if value]
    return f" (switched on: {', '.join(on) or 'none'})"


@till_app.command("add-article")
@_friendly
def till_add_article(
    article_nr: str = typer.Option(..., "--nr"),
    text: Optional[str] = typer.Option(None, help="article text (required for a new article)"),
    price_cents: Optional[int] = typer.Option(None, help="gross unit price in cents (required for a new article)"),
    vat_key: Optional[int] = typer.Option(None, help="DSFinV-K UST_SCHLUESSEL (1 = 19 %, 2 = 7 % ...; new: 1)"),
    group: Optional[str] = typer.Option(None, help="article group number"),
    restore: bool = typer.Option(False, "--restore", help="bring back an article that was deleted"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Add an article, or change the given fields of an existing one."""
    till = _open_till(data_dir)
    existing = till.store.entity("article", article_nr)
    if existing and existing["deleted"] and not restore:
        raise ValueError(f"article {article_nr} was deleted; give --restore to bring it back")
    current = existing["data"] if existing and not existing["deleted"] else None
    if current is None and (text is None or price_cents is None):
        raise ValueError(f"article {article_nr} is new: give --text and --price-cents")
    fields = dict(current or {"article_nr": article_nr, "vat_key": 1})
    fields.update({k: v for k, v in (("text", text), ("unit_price", price_cents), ("vat_key", vat_key),
                                    ("article_group_nr", group)) if v is not None})
    record = till.save_entity(Article.model_validate(fields), dt.datetime.now(dt.UTC))
    if record is None:
        out.print(f"article {article_nr} unchanged")
    else:
        out.print(f"article {article_nr} {'changed' if current else 'restored' if existing else 'saved'}")


@till_app.command("import-articles")
@_friendly
def till_import_articles(
    path: Path = typer.Argument(..., help="a bakery till export (CSV)"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Import the articles of a bakery export as master data (rules: README, 'Demo data')."""
    till = _open_till(data_dir)
    export = read_export(path)
    counts = till.import_entities(export.articles.values(), dt.datetime.now(dt.UTC))
    out.print(
        f"{len(export.articles)} articles read: {counts.get('created', 0)} new, {counts.get('unchanged', 0)} unchanged"
        + (f", {counts['changed']} changed" if counts.get("changed") else "")
        + (f", {counts['listed']} differ from the account's current value and are listed, not applied "
           "(`tillsync till differences`)" if counts.get("listed") else "")
    )


@till_app.command("sell")
@_friendly
def till_sell(
    items: list[str] = typer.Argument(..., help="ARTICLE_NR:QUANTITY[:PRICE_CENTS] ... (negative quantity = return)"),
    card: bool = typer.Option(False, "--card", help="paid by debit card instead of cash"),
    cashier: str = typer.Option("1", help="cashier id"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Book and pay a receipt (works offline)."""
    till = _open_till(data_dir)
    articles = {a["article_nr"]: a for a in till.store.masterdata("article")}
    lines = [_sale_line(item, articles) for item in items]
    payment = PaymentType.DEBIT_CARD if card else PaymentType.CASH
    receipt = till.sell(
        lines,
        payment_type=payment,
        payment_name="EC-Karte" if card else "Bar",
        cashier=Cashier(cashier_id=cashier, name=f"Bediener {cashier}"),
        at=dt.datetime.now(dt.UTC),
    )
    out.print(f"receipt {receipt.receipt_number}: {receipt.total / 100:.2f} EUR ({payment.value})")


def _sale_line(item: str, articles: dict[str, dict[str, Any]]) -> SaleLine:
    """``ARTICLE_NR:QUANTITY[:PRICE_CENTS]`` → a sale line (article numbers may contain ':')."""
    parsed = None
    for parts in (item.rsplit(":", 1), item.rsplit(":", 2)):
        if len(parts) >= 2 and parts[0] in articles:
            parsed = parts
            break
    if parsed is None:
        raise ValueError(f"{item!r}: expected ARTICLE_NR:QUANTITY[:PRICE_CENTS] with a known article number")
    article = articles[parsed[0]]
    if not all(part.isascii() for part in parsed[1:]):
        raise ValueError(f"{item!r}: write quantity and price with the digits 0-9")
    try:
        quantity = Decimal(parsed[1])
        price = int(parsed[2]) if len(parsed) == 3 else article["unit_price"]
    except (InvalidOperation, ValueError):
        raise ValueError(f"{item!r}: quantity must be a number and price whole cents") from None
    if not quantity.is_finite():
        raise ValueError(f"{item!r}: quantity must be a finite number")
    if quantity == 0:
        raise ValueError(f"{item!r}: quantity must not be 0 (a negative quantity books a return)")
    if abs(quantity) > MAX_QUANTITY:
        raise ValueError(f"{item!r}: quantity must be within ±{MAX_QUANTITY}")
    if abs(price) > MAX_CENTS:
        raise ValueError(f"{item!r}: price must be within ±{MAX_CENTS} cents")
    return SaleLine(article["article_nr"], article["text"], quantity, price, VatKey(article["vat_key"]))


@till_app.command("close-day")
@_friendly
def till_close_day(
    day: Optional[str] = typer.Option(None, help="business day YYYY-MM-DD (default: today, UTC)"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Record the Z-report of a business day."""
    till = _open_till(data_dir)
    business_day = dt.date.fromisoformat(day) if day else dt.datetime.now(dt.UTC).date()
    waiting = till.store.payments_awaiting_verdict()
    report = till.close_day(business_day, dt.datetime.now(dt.UTC))
    out.print(f"Z-report {report.z_nr} for {business_day}: {report.receipt_count} receipts, {report.total / 100:.2f} EUR")
    if waiting:
        err.print(
            f"warning: {len(waiting)} payment(s) of shared receipts ({', '.join(_short_id(r) for r in waiting)}) wait for the "
            "receipt handover router: they are not in this Z-report; once accepted they get receipt numbers and go "
            "into the next one (`tillsync till sync`)"
        )


@till_app.command("sync")
@_friendly
def till_sync(
    timeout: float = typer.Option(120.0, help="give up after this many seconds"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Sync now: catch up on the other tills' master data and shared receipts, upload the outbox.

    Shows progress bars; exits 1 if the till is not caught up, records remain or events
    of shared receipts still wait for the router's verdict."""
    till = _open_till(data_dir)
    identity = till.store.identity()
    pending, _ = till.store.outbox_counts()
    if not identity.signed_in:
        raise RuntimeError(f"this till is signed out; {pending} records wait for the next sign-in")
    enabled, mode, _ = till.store.sync_settings()
    if not enabled:
        raise RuntimeError(f"the sync switch is off; {pending} records wait. Turn it on: `tillsync till mode {mode} --sync`")
    categories = till.store.participating_categories()
    receipts = till.store.hands_over_receipts() or till.store.receives_shared_records()
    notices_before = len(till.notices())

    def receipts_done() -> bool:
        """Every uploaded receipt event of this till has its verdict (whatever its mode is
        now: a payment's verdict makes the fiscal receipt), and for a till that hands
        over receipts the catch-up this connection asks for has been answered."""
        feed = till.relay.feed.status()
        if till.store.receipts_awaiting_verdicts(1)[1]:
            return False
        return not receipts or (not feed.receipts_catching_up and feed.outcomes.get("receipts_caught_up", 0) > 0)

    def done() -> bool:
        status = till.status()
        feed = till.relay.feed.status()
        return (
            status.state == "idle"  # connected: an offline till is not in sync
            and status.pending - status.held == 0
            and not feed.catching_up
            and all(till.store.caught_up(c) for c in categories)
            and not till.store.awaiting_verdicts(1)
            and receipts_done()
        )

    async def body() -> Any:
        till.start_sync()
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn())
        with Progress(*columns, console=out) as progress:
            upload = progress.add_task("Uploading", total=max(pending, 1), info="")
            download = progress.add_task("Master data", total=None, info="", visible=bool(categories))
            shared = progress.add_task("Shared receipts", total=None, info="", visible=receipts)
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                await asyncio.sleep(0.1)
                last = till.status()
                feed = till.relay.feed.status()
                received = sum(r for r, _ in feed.catching_up.values())
                total = sum(t or 0 for _, t in feed.catching_up.values())
                progress.update(
                    upload, total=max(pending, last.pending, 1), completed=max(pending, last.pending) - last.pending,
                    info=f"{last.pending} pending ({last.held} held by the upload switches), "
                    f"{last.rate_per_second:.0f}/s {last.state} {last.detail}",
                )
                progress.update(
                    download, total=total or None, completed=received,
                    info=f"catching up on {', '.join(feed.catching_up)}" if feed.catching_up else "up to date",
                )
                if receipts:
                    waiting = len(till.store.receipts_awaiting_verdicts()[1])
                    progress.update(
                        shared,
                        info=f"{waiting} events of this till wait for the router" if waiting
                        else "up to date" if receipts_done() else "asking the router for the open receipts",
                    )
                hopeless = last.state == "offline" and "credentials refused" in last.detail
                finished = done()
                if finished or hopeless or asyncio.get_running_loop().time() > deadline:
                    break
        await till.stop_sync()
        return last, finished

    last, finished = asyncio.run(body())
    if not finished:
        hint = "; sign in again" if "credentials refused" in last.detail else ""
        uploaded = not last.pending - last.held
        problems = []
        if last.state != "idle" and uploaded:
            problems.append(f"not connected ({last.state}: {last.detail}){hint}")
        if not uploaded:
            problems.append(f"{last.pending - last.held} records not uploaded ({last.state}{': ' + last.detail if last.detail else ''}){hint}")
        behind = [c for c in categories if not till.store.caught_up(c) or c in till.relay.feed.status().catching_up]
        if behind:
            problems.append(f"the master-data download of {', '.join(behind)} got no complete answer")
        waiting = len(till.store.awaiting_verdicts())
        if waiting:
            problems.append(f"{waiting} master-data changes of this till await the cloud's verdict")
        if (behind or waiting) and uploaded:
            problems.append("is the master-data broadcaster running? (run `tillsync till sync` again later)")
        if not receipts_done():
            events = len(till.store.receipts_awaiting_verdicts()[1])
            running = "; is it running? (run `tillsync till sync` again later)" if uploaded and last.state == "idle" else ""
            if events:
                problems.append(f"{events} receipt events await the receipt handover router{running}")
            else:
                problems.append(f"the receipt handover router did not answer with the open receipts{running}")
        raise RuntimeError("not in sync: " + "; ".join(problems))
    differences = len(till.differences())
    notices = len(till.notices())
    new_notices = notices - notices_before
    refused = till.store.archive_refusals()
    out.print(
        f"in sync: all records uploaded{f' ({last.held} held by the upload switches)' if last.held else ''}"
        + (f", but the archive refused {refused} of them (see the notices)" if refused else "")
        + (f"; master data up to date ({', '.join(categories)})" if categories else "")
        + (f"; shared receipts up to date ({len(till.open_receipts())} open)" if receipts else "")
        + (f"; {differences} master-data differences to decide: `tillsync till differences`" if differences else "")
        + (f"; {notices} notices{f' ({new_notices} new)' if new_notices else ''}: `tillsync till notices`" if notices else "")
    )


@till_app.command("upload")
@_friendly
def till_upload(
    timeout: float = typer.Option(120.0, help="give up after this many seconds"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Same as `till sync`: upload the outbox (and catch up on master data and shared receipts)."""
    till_sync(timeout=timeout, data_dir=data_dir)


ENTITY_KIND_HELP = "article, article_group, customer, cashier, discount, payment_type, vat_rate or shared_setting"


@till_app.command("masterdata")
@_friendly
def till_masterdata(
    kind: str = typer.Argument("article", help=ENTITY_KIND_HELP),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """List the till's master data of one kind with the cloud version each is based on."""
    if kind not in ENTITY_KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of: {ENTITY_KIND_HELP}")
    till = _open_till(data_dir)
    rows = till.store.masterdata(kind)
    uploads = till.store.upload_kinds()
    table = Table(title=f"{kind}: {len(rows)}")
    table.add_column("key")
    table.add_column("data")
    table.add_column("version", justify="right")
    table.add_column("state")
    for data in rows:
        key = ENTITY_ADAPTER.validate_python(data).key
        entity = till.store.entity(kind, key) or {}
        state = (
            ("kept in the outbox (upload switch off)" if "masterdata" not in uploads else "waiting for the cloud")
            if entity.get("pending") else "changed here, not shared" if entity.get("dirty") else ""
        )
        shown = {k: v for k, v in data.items() if k != "entity"}
        table.add_row(key, json.dumps(shown, ensure_ascii=False), str(entity.get("version") or "-"), state)
    out.print(table)


@till_app.command("delete")
@_friendly
def till_delete(
    kind: str = typer.Argument(..., help=ENTITY_KIND_HELP),
    key: str = typer.Argument(..., help="the entity's key, e.g. the article number"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Delete a master-data entity (a tombstone: no till can bring it back by mistake)."""
    if kind not in ENTITY_KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of: {ENTITY_KIND_HELP}")
    till = _open_till(data_dir)
    entity = till.store.entity(kind, key)
    if entity is None or entity["deleted"]:
        raise TillStoreError(f"there is no {kind} {key!r} on this till")
    till.delete_entity(kind, key, dt.datetime.now(dt.UTC))
    out.print(f"{kind} {key} deleted")


@till_app.command("setting")
@_friendly
def till_setting(
    key: str = typer.Argument(..., help="e.g. receipt.footer (shared) or printer.model (stays on this till)"),
    value: str = typer.Argument(...),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Save a setting. Printer, display and default stock location settings stay on this till."""
    till = _open_till(data_dir)
    before = till.store.entity("shared_setting", key)
    uploaded = till.save_setting(key, value, dt.datetime.now(dt.UTC))
    if uploaded and before is not None and not before["deleted"] and before["data"]["value"] == value:
        out.print(f"setting {key} unchanged")
    elif not uploaded:
        out.print(f"setting {key} saved (local to this till, never uploaded)")
    elif "masterdata_other" in till.store.participating_categories():
        out.print(f"setting {key} saved (shared with the account's tills that receive other master data)")
    else:
        out.print(f"setting {key} saved (archived; not shared: this till's sync mode does not share other master data)")


def _short(data: dict[str, Any] | None, deleted: bool, fields: tuple[str, ...] | None) -> str:
    """The listed ``fields`` of ``data`` (every field if None)."""
    if deleted or data is None:
        return "(deleted)"
    shown = {k: v for k, v in data.items() if k != "entity" and (fields is None or k in fields)}
    return json.dumps(shown, ensure_ascii=False)


@till_app.command("differences")
@_friendly
def till_differences(data_dir: Optional[Path] = DataDir) -> None:
    """List the master data whose value on this till differs from the cloud's.

    The till uses the cloud's value until you decide: `tillsync till resolve`."""
    till = _open_till(data_dir)
    differences = till.differences()
    if not differences:
        out.print("no differences: this till's master data agrees with the cloud")
        return
    table = Table(title=f"{len(differences)} master-data differences (the cloud's value is in use)")
    for column in ("kind", "key", "this till", "cloud", "why"):
        table.add_column(column)
    for d in differences:
        table.add_row(
            d.entity_kind, d.entity_key, _short(d.local_data, d.local_deleted, d.fields),
            _short(d.cloud_data, d.cloud_deleted, d.fields) + f" v{d.cloud_version or '-'}", d.reason,
        )
    out.print(table)
    out.print("decide with: tillsync till resolve --keep cloud|till (KIND KEY | --all)")


@till_app.command("resolve")
@_friendly
def till_resolve(
    kind: Optional[str] = typer.Argument(None, help=ENTITY_KIND_HELP),
    key: Optional[str] = typer.Argument(None),
    keep: str = typer.Option(..., help="cloud: drop this till's value; till: upload it as a new change"),
    all_: bool = typer.Option(False, "--all", help="decide every listed difference the same way"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Decide listed master-data differences: keep the cloud's value or upload the till's."""
    if keep not in ("cloud", "till"):
        raise ValueError("--keep must be 'cloud' or 'till'")
    if all_ == (kind is not None):
        raise ValueError("name one entity (KIND KEY) or give --all")
    if kind is not None and key is None:
        raise ValueError("give the key of the entity after its kind")
    if kind is not None and kind not in ENTITY_KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of: {ENTITY_KIND_HELP}")
    till = _open_till(data_dir)
    count = till.resolve(keep, dt.datetime.now(dt.UTC), kind, key)
    what = "kept the cloud's value" if keep == "cloud" else "queued this till's value as a new change (sync to upload)"
    out.print(f"{count} difference(s) settled: {what}")


@till_app.command("status")
@_friendly
def till_status(data_dir: Optional[Path] = DataDir) -> None:
    """Show the till's identity, sync settings and outbox."""
    till = _open_till(data_dir)
    identity = till.store.identity()
    enabled, mode, custom_json = till.store.sync_settings()
    pending, sent = till.store.outbox_counts()
    held = till.store.held_by_switches()
    flags = CustomSyncFlags.model_validate_json(custom_json) if mode == "custom" and custom_json else None
    table = Table(show_header=False)
    for key, value in (
        ("till", f"{identity.till_name} ({identity.serial_number})"),
        ("account", identity.account_name or "-"),
        ("till id", str(identity.till_id or "-")),
        ("signed in", "yes" if identity.signed_in else "no"),
        ("sync", f"{'on' if enabled else 'off'}, mode {mode}" + _switches(flags)),
        ("outbox", f"{pending} pending, {sent} sent" + (f", {held} held by the upload switches" if held else "")
         + (f", {till.store.archive_refusals()} refused by the archive (`tillsync till notices`)"
            if till.store.archive_refusals() else "")),
        ("master data", ", ".join(f"{n} {kind}" for kind, n in sorted(till.store.masterdata_counts().items())) or "none"),
        ("master-data sync", ", ".join(
            f"{c} at feed {till.store.feed_position(c)}{'' if till.store.caught_up(c) else ' (not caught up)'}"
            for c in till.store.participating_categories()) or "none (mode does not receive master data)"),
        ("differences", f"{len(till.differences())} to decide" if till.differences() else "none"),
        ("shared receipts", _shared_receipts_summary(till, mode)),
    ):
        table.add_row(key, value)
    out.print(table)



# ---------------------------------------------------------------------------
# shared receipts (receipt handover)

RECEIPT_HELP = "the receipt: its id, its first 8 or more hex digits, or table:N (the open receipt of table N)"
LINE_HELP = "a line: its id or its first 8 or more hex digits (`tillsync till receipt` lists them)"
_ID_DIGITS = re.compile(r"[0-9a-f]{8,32}")


def _short_id(value: UUID | None) -> str:
    return str(value)[:8] if value else "-"


def _eur(cents: int) -> str:
    return f"{cents / 100:.2f}"


def _utc(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _quantity(value: Decimal) -> str:
    return format(value.normalize(), "f")


def _id_digits(ref: str, what: str) -> str:
    """The hex digits of an id or id prefix the user typed; ``ValueError`` if it is none."""
    digits = ref.strip().lower().replace("-", "")
    if not _ID_DIGITS.fullmatch(digits):
        raise ValueError(f"{ref!r} is no {what}: give the id or at least its first 8 hex digits")
    return digits


def _named(view: ReceiptView) -> str:
    """``3f2a1b4c (table 5)``: a receipt as the commands name it."""
    return _short_id(view.receipt_id) + (f" (table {view.table_nr})" if view.table_nr else "")


def _resolve_receipt(till: Till, ref: str, last_closed: bool = False) -> ReceiptView:
    """The shared receipt ``ref`` names on this till (see ``RECEIPT_HELP``).

    ``table:N`` is the table's open receipt; with ``last_closed`` the table's last closed
    receipt if none is open. Raises ``ValueError`` if no receipt or several match."""
    ref = ref.strip()
    if not till.store.hands_over_receipts():
        _, mode, _ = till.store.sync_settings()
        hint = f"; this till's mode ({mode}) does not hand over receipts"
    else:
        hint = ""
    if ref.lower().startswith("table:"):
        table_nr = nfkc(ref[len("table:"):].strip())  # tables are named in NFKC (shared.models.TableNr)
        if not table_nr:
            raise ValueError("give the table after table:, e.g. table:5")
        matches = [v for v in till.open_receipts() if v.table_nr == table_nr]
        if not matches and last_closed:
            closed = [v for v in till.store.shared_receipts("closed") if v.table_nr == table_nr]
            matches = sorted(closed, key=lambda v: v.closed_at or dt.datetime.min.replace(tzinfo=dt.UTC))[-1:]
        if not matches:
            raise ValueError(f"this till knows no open receipt for table {table_nr} (`tillsync till receipts` lists them){hint}")
        if len(matches) > 1:
            raise ValueError(
                f"table {table_nr} has {len(matches)} open receipts on this till "
                f"({', '.join(_short_id(v.receipt_id) for v in matches)}) until the router's verdict on the "
                "later opening arrives (`tillsync till sync`); give the receipt id"
            )
        return matches[0]
    digits = _id_digits(ref, "receipt id")
    if len(digits) == 32:
        return till.receipt(UUID(digits))
    matches = till.store.find_shared_receipts(digits)
    if not matches:
        raise ValueError(f"this till knows no shared receipt {ref} (`tillsync till receipts --all` lists them){hint}")
    if len(matches) > 1:
        raise ValueError(
            f"{ref} matches {len(matches)} receipts ({', '.join(str(v.receipt_id) for v in matches)}); give more digits"
        )
    return matches[0]


def _resolve_lines(view: ReceiptView, refs: list[str]) -> list[UUID]:
    """The line ids ``refs`` name among the lines ``view`` shows; ``ValueError`` otherwise."""
    line_ids = []
    for ref in refs:
        digits = _id_digits(ref, "line id")
        matches = [v.line.line_id for v in view.lines if v.line.line_id.hex.startswith(digits)]
        if not matches:
            raise ValueError(
                f"no line {ref} on receipt {_named(view)} (`tillsync till receipt {_short_id(view.receipt_id)}` lists them)"
            )
        if len(matches) > 1:
            raise ValueError(f"{ref} matches {len(matches)} lines of receipt {_named(view)}; give more digits")
        line_ids.append(matches[0])
    return line_ids


def _cashier(cashier_id: str) -> Cashier:
    return Cashier(cashier_id=cashier_id, name=f"Bediener {cashier_id}")


def _open_shared_receipt(data_dir: Path | None, table: str | None, cashier: str) -> None:
    till = _open_till(data_dir)
    receipt_id = till.open_receipt(cashier=_cashier(cashier), at=dt.datetime.now(dt.UTC), table_nr=table)
    table = till.receipt(receipt_id).table_nr  # as stored (NFKC)
    out.print(
        f"receipt {receipt_id} opened" + (f" for table {table}" if table else "")
        + " (recorded here; `tillsync till sync` shares it)"
    )


@till_app.command("open-table")
@_friendly
def till_open_table(
    table: str = typer.Argument(..., help="the table number (a customer marked as table)"),
    cashier: str = typer.Option("1", help="cashier id"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Open a shared receipt for a table (works offline); prints its id.

    Needs mode archive_masterdata_receipts (or custom with download_receipts and
    upload_receipts). If another till opened the table first, the router refuses this
    opening and the lines booked meanwhile go onto that till's receipt (a notice says so)."""
    _open_shared_receipt(data_dir, table, cashier)


@till_app.command("open-receipt")
@_friendly
def till_open_receipt(
    table: Optional[str] = typer.Option(None, help="the table number; without it the receipt has no table"),
    cashier: str = typer.Option("1", help="cashier id"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Open a shared receipt, for no table unless --table is given (works offline); prints its id."""
    _open_shared_receipt(data_dir, table, cashier)


@till_app.command("add")
@_friendly
def till_add(
    receipt: str = typer.Argument(..., help=RECEIPT_HELP),
    items: list[str] = typer.Argument(..., help="ARTICLE_NR:QUANTITY[:PRICE_CENTS] ... (negative quantity = return)"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Book lines onto an open shared receipt (works offline); prints the new line ids."""
    till = _open_till(data_dir)
    view = _resolve_receipt(till, receipt)
    articles = {a["article_nr"]: a for a in till.store.masterdata("article")}
    lines = [_sale_line(item, articles) for item in items]
    # every line is checked before the first is recorded
    amounts = [line_amount(s.quantity, s.unit_price) for s in lines]
    at = dt.datetime.now(dt.UTC)
    with till.store.batch():
        line_ids = [till.add_line(view.receipt_id, line, at) for line in lines]
    for line, line_id, amount in zip(lines, line_ids, amounts):
        out.print(f"line {_short_id(line_id)}: {_quantity(line.quantity)} × {line.text} à {_eur(line.unit_price)} = {_eur(amount)} EUR")
    out.print(
        f"receipt {_named(view)}: total {_eur(till.receipt(view.receipt_id).total)} EUR on this till "
        "(recorded here; `tillsync till sync` shares it)"
    )


@till_app.command("void")
@_friendly
def till_void(
    receipt: str = typer.Argument(..., help=RECEIPT_HELP),
    line: str = typer.Argument(..., help=LINE_HELP),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Take a line off an open shared receipt again (works offline)."""
    till = _open_till(data_dir)
    view = _resolve_receipt(till, receipt)
    [line_id] = _resolve_lines(view, [line])
    till.void_line(view.receipt_id, line_id, dt.datetime.now(dt.UTC))
    out.print(
        f"line {_short_id(line_id)} voided on receipt {_named(view)}: total "
        f"{_eur(till.receipt(view.receipt_id).total)} EUR on this till (recorded here; `tillsync till sync` shares it)"
    )


@till_app.command("move-table")
@_friendly
def till_move_table(
    receipt: str = typer.Argument(..., help=RECEIPT_HELP),
    table: Optional[str] = typer.Argument(None, help="the new table number"),
    no_table: bool = typer.Option(False, "--no-table", help="take the receipt off its table"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Move an open shared receipt to another table, or off its table (works offline)."""
    if table is not None and no_table:
        raise ValueError("give either the new TABLE or --no-table, not both")
    if table is None and not no_table:
        raise ValueError("give the new TABLE, or --no-table to take the receipt off its table")
    till = _open_till(data_dir)
    view = _resolve_receipt(till, receipt)
    till.move_to_table(view.receipt_id, table, dt.datetime.now(dt.UTC))
    where = f"to table {table}" if table else "off its table"
    out.print(f"receipt {_named(view)} moved {where} (recorded here; `tillsync till sync` shares it)")


@till_app.command("split")
@_friendly
def till_split(
    receipt: str = typer.Argument(..., help=RECEIPT_HELP),
    to_receipt: str = typer.Argument(..., help="the receipt the lines move to (like RECEIPT), or new: a new receipt without table"),
    lines: list[str] = typer.Argument(..., help="the lines to move: " + LINE_HELP),
    cashier: str = typer.Option("1", help="cashier id of a new receipt"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Split: move lines of an open shared receipt to another open one (works offline)."""
    till = _open_till(data_dir)
    view = _resolve_receipt(till, receipt)
    line_ids = _resolve_lines(view, lines)
    at = dt.datetime.now(dt.UTC)
    with till.store.batch():  # a new receipt is opened only if the move is recorded too
        if to_receipt.strip().lower() == "new":
            target_id = till.open_receipt(cashier=_cashier(cashier), at=at)
        else:
            target_id = _resolve_receipt(till, to_receipt).receipt_id
        till.move_lines(view.receipt_id, line_ids, target_id, at)
    moved = sum(v.line.amount for v in view.lines if v.line.line_id in line_ids)
    target = till.receipt(target_id)
    out.print(
        f"{len(line_ids)} line(s) ({_eur(moved)} EUR) moved from receipt {_named(view)} to receipt {target_id}"
        + (f" (table {target.table_nr})" if target.table_nr else "")
        + f"; total now {_eur(till.receipt(view.receipt_id).total)} EUR on this till. The lines show on the other "
        "receipt once the router has accepted the move (`tillsync till sync`)"
    )


@till_app.command("pay")
@_friendly
def till_pay(
    receipt: str = typer.Argument(..., help=RECEIPT_HELP),
    card: bool = typer.Option(False, "--card", help="paid by debit card instead of cash"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Pay a whole shared receipt as this till shows it (works offline).

    The router accepts the payment only if no other till changed the receipt since; then
    this till records the closed receipt under its next receipt number. A stale payment
    is refused with a notice, and the receipt shows its new total: pay it again."""
    till = _open_till(data_dir)
    view = _resolve_receipt(till, receipt)
    payment = PaymentType.DEBIT_CARD if card else PaymentType.CASH
    paid = till.pay_receipt(view.receipt_id, payment, "EC-Karte" if card else "Bar", dt.datetime.now(dt.UTC))
    out.print(
        f"receipt {_named(view)}: {_eur(paid.total)} EUR paid ({payment.value}) on this till; the receipt closes and "
        "gets this till's next receipt number once the router accepts the payment (`tillsync till sync`)"
    )


def _opened_by(view: ReceiptView) -> str:
    return view.opened_by_name or (str(view.opened_by) if view.opened_by else "(not confirmed yet)")


def _receipt_status(view: ReceiptView) -> str:
    if view.status == "closed":
        return f"closed: paid on {view.closed_by_name or view.closed_by} at {_utc(view.closed_at)} (UTC)"
    if view.status == "refused":
        into = f"; its table is on receipt {view.merged_into}" if view.merged_into else ""
        return f"not opened: another till had opened its table first{into}"
    if view.payment_pending:
        return "open; this till's payment waits for the router's answer"
    return "open"


@till_app.command("receipts")
@_friendly
def till_receipts(
    all_: bool = typer.Option(False, "--all", help="also closed receipts and refused openings"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """List the open shared receipts this till knows (as of its last sync)."""
    till = _open_till(data_dir)
    views = till.store.shared_receipts(None if all_ else "open")
    if not views:
        _, mode, _ = till.store.sync_settings()
        why = "" if till.store.hands_over_receipts() else f" (this till's mode {mode} does not hand over receipts)"
        out.print(f"no {'' if all_ else 'open '}shared receipts{why}")
        return
    table = Table(title=f"{len(views)} {'' if all_ else 'open '}shared receipts")
    columns = ["receipt", "table", "lines", "total EUR", "waiting events", "opened by"] + (["status"] if all_ else [])
    for column in columns:
        table.add_column(column, justify="right" if column in ("lines", "total EUR", "waiting events") else "left")
    for v in views:
        status = [v.status + (", paying" if v.payment_pending else "")] if all_ else []
        table.add_row(
            _short_id(v.receipt_id), v.table_nr or "-", str(len(v.lines)), _eur(v.total), str(v.pending), _opened_by(v), *status
        )
    out.print(table)


@till_app.command("receipt")
@_friendly
def till_receipt(
    receipt: str = typer.Argument(..., help=RECEIPT_HELP + "; for a table without open receipt its last closed one"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Show one shared receipt: its lines (which till entered each, confirmed or waiting), status and total."""
    till = _open_till(data_dir)
    view = _resolve_receipt(till, receipt, last_closed=True)
    identity = till.store.identity()
    out.print(f"receipt {view.receipt_id}")
    out.print(f"table: {view.table_nr or '-'}" + (f", customer {view.customer_nr}" if view.customer_nr else ""))
    opened_on = f"on {view.opened_by_name or view.opened_by} " if view.opened_by else ""
    confirmed = "" if view.position else " (the opening is not confirmed by the router yet)"
    by = f" by {view.cashier.name} ({view.cashier.cashier_id})" if view.cashier else ""
    out.print(f"opened: {opened_on}at {_utc(view.opened_at)} (UTC){by}{confirmed}")
    out.print(f"status: {_receipt_status(view)}")
    table = Table(title=f"{len(view.lines)} lines")
    for column in ("line", "article", "text", "qty", "price EUR", "amount EUR", "entered on", "state"):
        table.add_column(column, justify="right" if column in ("qty", "price EUR", "amount EUR") else "left")
    for v in view.lines:
        table.add_row(
            _short_id(v.line.line_id), v.line.article_nr, v.line.text, _quantity(v.line.quantity),
            _eur(v.line.unit_price), _eur(v.line.amount),
            v.till_name or (identity.till_name if v.till_id in (None, identity.till_id) else str(v.till_id)),
            "confirmed" if v.confirmed else "waiting",
        )
    out.print(table)
    out.print(f"total: {_eur(view.total)} EUR")
    if view.pending:
        out.print(f"{view.pending} event(s) of this till wait for the router (`tillsync till sync`)")
    if view.receipt_number is not None:
        out.print(f"receipt number: {view.receipt_number} (this till's)")


@till_app.command("notices")
@_friendly
def till_notices(data_dir: Optional[Path] = DataDir) -> None:
    """List what the router refused of this till's receipt events (and what the till did
    about it) and the records the archive refused."""
    till = _open_till(data_dir)
    notices = till.notices()
    if not notices:
        out.print("no notices: the router refused none of this till's receipt events, the archive none of its records")
        return
    table = Table(title=f"{len(notices)} notices")
    for column in ("#", "when (UTC)", "receipt", "code", "message"):
        table.add_column(column)
    for n in notices:
        table.add_row(str(n.notice_id), _utc(n.at), _short_id(n.receipt_id), n.code, n.message)
    out.print(table)


@till_app.command("others")
@_friendly
def till_others(
    kind: Optional[str] = typer.Option(None, "--kind", help="zreport or receipt (default: both)"),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """List the Z-reports and receipts other tills of the account recorded, as received by this till."""
    if kind not in (None, "zreport", "receipt"):
        raise ValueError("--kind must be 'zreport' or 'receipt'")
    till = _open_till(data_dir)
    received = download_categories(*till.store.mode())
    mode = till.store.mode()[0].value

    for shown in ("zreport", "receipt") if kind is None else (kind,):
        what = "Z-reports" if shown == "zreport" else "receipts"
        records = till.store.shared_records(shown)
        if not records:
            why = "" if ("zreports" if shown == "zreport" else "receipts") in received else f" (this till's mode {mode} does not receive them)"
            out.print(f"no {what} of other tills{why}")
            continue
        table = Table(title=f"{len(records)} {what} of other tills")
        if shown == "zreport":
            for column in ("till", "Z nr", "business day", "receipts", "total EUR"):
                table.add_column(column, justify="right" if column in ("receipts", "total EUR") else "left")
            for record in records:
                z = record.record
                assert isinstance(z, ZReport)
                table.add_row(record.till_name, str(z.z_nr), z.business_day.isoformat(), str(z.receipt_count), _eur(z.total))
        else:
            for column in ("till", "receipt number", "receipt", "status", "closed (UTC)", "lines", "total EUR", "paid"):
                table.add_column(column, justify="right" if column in ("lines", "total EUR") else "left")
            for record in records:
                r = record.record
                assert isinstance(r, Receipt)
                table.add_row(
                    record.till_name, str(r.receipt_number or "-"), _short_id(r.receipt_id), r.status, _utc(r.closed_at),
                    str(len(r.lines)), _eur(r.total), ", ".join(p.payment_name for p in r.payments) or "-",
                )
        out.print(table)


def _shared_receipts_summary(till: Till, mode: str) -> str:
    """The `till status` line of the shared receipts."""
    if not till.store.hands_over_receipts():
        return f"not handed over (mode {mode})"
    notices = len(till.notices())
    return (
        f"{len(till.open_receipts())} open, {till.store.pending_receipt_events()} events waiting for the router, "
        f"{notices} notices" + (" (`tillsync till notices`)" if notices else "")
    )

if __name__ == "__main__":
    app()
