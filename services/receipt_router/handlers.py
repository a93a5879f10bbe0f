"""Receipt handover router handlers: order the events of shared receipts, share records.

Rules (issue "receipt handover", DESIGN.md §1.3 mode ``archive_masterdata_receipts``):
- an open receipt is the sequence of its accepted events; each accepted event gets the
  receipt's next ``position`` (gapless from 1) in arrival order and is broadcast to
  ``<account>.receipts``, which every till that hands over receipts receives (the
  sender too); each line keeps the till that entered it;
- an account has at most one open receipt per table: a second opening of a table is
  refused and the refusal names the receipt that holds it;
- payment is optimistic: ``ReceiptPaid.seen_position`` must be the receipt's position
  (no event arrived since the payer totalled it) and the payments must add up to the
  sum of the standing lines, else it is refused with the events since;
- a paid receipt is closed and immutable: later events are refused;
- a refused event is kept in ``handover_refusals`` and the sending till is told why;
  the record itself is in the archive (the archive writer takes every record);
- closed receipts and Z-reports of every till are shared with the tills whose mode
  receives them; a closed receipt takes its (till, receipt number) once.
A redelivered event is recognised by its ``record_id``; its verdict is sent again.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg
import structlog

from shared.consumer import Delivery
from shared.models import (
    MAX_SHARED_RECORDS,
    SHARED_RECORDS_DAYS,
    CustomSyncFlags,
    Download,
    HandoverEvent,
    LineAdded,
    LinesMoved,
    LinesMovedIn,
    LineVoided,
    Receipt,
    ReceiptCatchUpDone,
    ReceiptCatchUpRequest,
    ReceiptEvent,
    ReceiptEventAccepted,
    ReceiptEventRefused,
    ReceiptOpened,
    ReceiptPaid,
    ReceiptSnapshot,
    RefusalCode,
    StandingLine,
    SyncMode,
    TableSet,
    TillRecordShared,
    Upload,
    ZReport,
    CustomerSet,
)
from shared.topology import (
    DOWNLOAD_EXCHANGE,
    download_categories,
    download_routing_key,
    hands_over_receipts,
    receipt_catchup_routing_key,
    stored_mode,
    till_direct_routing_key,
)
from shared.uploads import sender_problem, till_sender_problem

log = structlog.get_logger()


@dataclass
class _Till:
    account_id: UUID
    name: str
    mode: SyncMode
    custom: CustomSyncFlags | None


class Refusal(Exception):
    """An event the router does not apply: ``code`` and a reason for people."""

    def __init__(self, code: RefusalCode, reason: str, existing_receipt_id: UUID | None = None,
                 since: tuple[HandoverEvent, ...] = ()) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.existing_receipt_id = existing_receipt_id
        self.since = since


# accepted events with the name of the till that made them
_EVENTS = "select e.*, t.till_name from handover_events e left join tills t on t.till_id = e.till_id"


def event_from_row(row: asyncpg.Record | dict[str, Any]) -> HandoverEvent:
    """A ``HandoverEvent`` from a row of ``handover_events``."""
    return HandoverEvent.model_validate(
        {
            "receipt_id": row["receipt_id"],
            "position": row["position"],
            "record_id": row["record_id"],
            "till_id": row["till_id"],
            "till_name": row["till_name"] or "",
            "recorded_at": row["recorded_at"],
            "event": row["event"],
        }
    )


def when(moment: dt.datetime) -> str:
    """``2024-03-01 18:00:05 UTC``: a time as refusals show it."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _cents(amount: int) -> str:
    return f"{amount / 100:.2f} EUR"


def describe(event: HandoverEvent, till_names: dict[UUID, str]) -> str:
    """One line for people: what ``event`` did and on which till (e.g. in a refusal)."""
    e = event.event
    on = f"on till {till_names.get(event.till_id, event.till_id)}"
    if isinstance(e, LineAdded):
        return f"line {e.line.text!r} {e.line.quantity.normalize()} × {_cents(e.line.unit_price)} added {on}"
    if isinstance(e, LineVoided):
        return f"line {e.line_id} voided {on}"
    if isinstance(e, LinesMoved):
        return f"{len(e.line_ids)} line(s) moved to receipt {e.to_receipt_id} {on}"
    if isinstance(e, LinesMovedIn):
        return f"{len(e.lines)} line(s) moved in from receipt {e.from_receipt_id} {on}"
    if isinstance(e, TableSet):
        return f"moved to table {e.table_nr or '(none)'} {on}"
    if isinstance(e, CustomerSet):
        return f"customer set to {e.customer_nr or '(none)'} {on}"
    if isinstance(e, ReceiptPaid):
        return f"paid {_cents(e.total)} {on}"
    return f"opened {on}"


async def route_receipts(deliveries: list[Delivery[Upload]], conn: asyncpg.Connection) -> None:
    """Consume-adapter handler: events, receipts and Z-reports of a batch, in upload order."""
    tills = {
        r["till_id"]: _Till(r["account_id"], r["till_name"], *stored_mode(r["sync_mode"], r["custom_flags"]))
        for r in await conn.fetch(
            "select till_id, account_id, till_name, sync_mode, custom_flags from tills where till_id = any($1::uuid[])",
            list({d.body.till_id for d in deliveries}),
        )
    }
    for d in deliveries:
        problem = sender_problem(d)
        u = d.body
        till = tills.get(u.till_id)
        if problem:
            d.refuse(problem, outcome="wrong_sender")
        elif till is None or till.account_id != u.account_id:
            d.refuse(f"till {u.till_id} is not a till of account {u.account_id}", outcome="unknown_till")
        elif isinstance(u.record, ReceiptEvent):
            await _route_event(d, u.record, till, conn)
        else:
            await _share_record(d, u.record, till, conn)


# -- closed receipts and Z-reports ------------------------------------------------


async def _share_record(d: Delivery[Upload], record: Receipt | ZReport | Any, till: _Till, conn: asyncpg.Connection) -> None:
    u = d.body
    if not isinstance(record, (Receipt, ZReport)):
        d.refuse(f"a {record.kind} record is not routed by the receipt handover router", outcome="invalid")
        return
    category = "receipts" if isinstance(record, Receipt) else "zreports"
    if isinstance(record, Receipt) and record.status == "closed":
        assert record.receipt_number is not None
        other = await conn.fetchval(
            """
            with taken as (
                insert into receipt_numbers (till_id, receipt_number, account_id, receipt_id, record_id)
                values ($1, $2, $3, $4, $5) on conflict do nothing returning receipt_id
            )
            select coalesce((select receipt_id from taken),
                            (select receipt_id from receipt_numbers where till_id = $1 and receipt_number = $2))
            """,
            u.till_id, record.receipt_number, u.account_id, record.receipt_id, u.record_id,
        )
        if other != record.receipt_id:
            await conn.execute(
                """
                insert into receipt_number_collisions
                    (record_id, account_id, till_id, receipt_number, receipt_id, other_receipt_id)
                values ($1, $2, $3, $4, $5, $6) on conflict do nothing
                """,
                u.record_id, u.account_id, u.till_id, record.receipt_number, record.receipt_id, other,
            )
            log.warning("receipt_number_collision", receipt_number=record.receipt_number, other_receipt_id=str(other))
            d.outcome = "receipt_number_collision"
        await _check_shared_closing(d, record, conn)
    d.emit(
        DOWNLOAD_EXCHANGE,
        download_routing_key(u.account_id, category),
        Download(
            account_id=u.account_id,
            message=TillRecordShared(
                till_id=u.till_id, till_name=till.name, record_id=u.record_id, recorded_at=u.recorded_at, record=record
            ),
        ),
    )
    if d.outcome == "accepted":
        d.outcome = "shared"


async def _check_shared_closing(d: Delivery[Upload], record: Receipt, conn: asyncpg.Connection) -> None:
    """A closed receipt of a shared receipt must come from the till whose payment was
    accepted, once, with the handover's total; anything else is kept in
    ``shared_receipt_mismatches`` for the operator (the record stays archived)."""
    u = d.body
    shared = await conn.fetchrow("select * from handover_receipts where receipt_id = $1 for update", record.receipt_id)
    if shared is None:
        return
    problems = []
    if shared["account_id"] != u.account_id:
        problems.append("the shared receipt belongs to another account")
    elif shared["status"] != "closed" or shared["closed_by"] != u.till_id:
        problems.append("the shared receipt was not paid on this till")
    else:
        if shared["total"] != record.total:
            problems.append(f"total {record.total} differs from the shared receipt's {shared['total']} cents")
        if shared["receipt_number"] is not None and shared["receipt_number"] != record.receipt_number:
            problems.append(f"the shared receipt was closed already as receipt number {shared['receipt_number']}")
        first = await conn.fetchval(
            "select record_id from receipt_numbers where till_id = $1 and receipt_number = $2", u.till_id, record.receipt_number
        )
        if first is not None and first != u.record_id:
            problems.append(f"the shared receipt was closed already by record {first}")
    if problems:
        reason = f"closed receipt {record.receipt_id} (number {record.receipt_number}): " + "; ".join(problems)
        await conn.execute(
            "insert into shared_receipt_mismatches (record_id, account_id, till_id, receipt_id, reason) "
            "values ($1, $2, $3, $4, $5) on conflict do nothing",
            u.record_id, u.account_id, u.till_id, record.receipt_id, reason,
        )
        log.warning("shared_receipt_mismatch", reason=reason)
        d.outcome = "shared_receipt_mismatch"
        return
    await conn.execute(
        "update handover_receipts set receipt_number = $2, updated_at = now() where receipt_id = $1",
        record.receipt_id, record.receipt_number,
    )


# -- events of shared receipts ----------------------------------------------------


async def _route_event(d: Delivery[Upload], record: ReceiptEvent, till: _Till, conn: asyncpg.Connection) -> None:
    u = d.body
    done = await conn.fetch(f"{_EVENTS} where e.record_id = $1 order by e.accepted_at, e.position", u.record_id)
    earlier = await conn.fetchrow("select * from handover_refusals where record_id = $1", u.record_id)
    owners = {row["till_id"] for row in done} | ({earlier["till_id"]} if earlier is not None else set())
    if owners - {u.till_id}:
        d.refuse(f"record_id {u.record_id} is already used by another till; the event is not applied", outcome="record_id_taken")
        return
    problem = _replay_problem(u, record, done, earlier)
    if problem is not None:
        d.refuse(problem, outcome="record_id_reused")
        return
    if done:
        for row in done:
            _broadcast(d, event_from_row(row))
        d.outcome = "repeat_accepted"
        return
    if earlier is not None:
        await _tell_refusal(d, conn, earlier)
        d.outcome = "repeat_refused"
        return
    try:
        if not hands_over_receipts(till.mode, till.custom):
            raise Refusal(
                "not_taking_part",
                f"the till's sync mode ({till.mode.value}) does not hand over receipts; the event is archived only",
            )
        accepted = await _apply(u, record, till, conn)
    except Refusal as refusal:
        await conn.execute(
            """
            insert into handover_refusals
                (record_id, account_id, receipt_id, till_id, event_type, code, reason, existing_receipt_id, seen_position)
            values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            """,
            u.record_id, u.account_id, record.receipt_id, u.till_id, record.event.type, refusal.code,
            refusal.reason, refusal.existing_receipt_id, getattr(record.event, "seen_position", None),
        )
        _tell(d, ReceiptEventRefused(
            record_id=u.record_id, receipt_id=record.receipt_id, event_type=record.event.type, code=refusal.code,
            reason=refusal.reason, existing_receipt_id=refusal.existing_receipt_id, since=refusal.since,
        ))
        d.outcome = f"refused_{refusal.code}"
        d.log["reason"] = refusal.reason
        return
    for event in accepted:
        _broadcast(d, event)
    d.outcome = f"accepted_{record.event.type}"


def _replay_problem(
    u: Upload, record: ReceiptEvent, done: list[asyncpg.Record], earlier: asyncpg.Record | None
) -> str | None:
    """Why an event whose ``record_id`` the router has seen before (accepted: ``done``,
    refused: ``earlier``) is not that event again, or None: a record_id is never reused,
    so other content is refused instead of answered with the first event's verdict."""
    if done:
        mine = [row for row in done if row["receipt_id"] == record.receipt_id]
        if not mine or event_from_row(mine[0]).event != record.event:
            return f"record_id {u.record_id} was accepted before with another event; the event is not applied"
    elif earlier is not None and (earlier["receipt_id"], earlier["event_type"]) != (record.receipt_id, record.event.type):
        return f"record_id {u.record_id} was refused before as another event; the event is not applied"
    return None


def _broadcast(d: Delivery[Upload], event: HandoverEvent) -> None:
    d.emit(
        DOWNLOAD_EXCHANGE,
        download_routing_key(d.body.account_id, "receipts"),
        Download(account_id=d.body.account_id, message=ReceiptEventAccepted(event=event)),
    )


def _tell(d: Delivery[Any], message: Any) -> None:
    account_id, till_id = d.body.account_id, d.body.till_id
    d.emit(DOWNLOAD_EXCHANGE, till_direct_routing_key(account_id, till_id), Download(account_id=account_id, message=message))


async def _tell_refusal(d: Delivery[Any], conn: asyncpg.Connection, row: asyncpg.Record) -> None:
    """Send a stored refusal again (a stale payment with the events after the position it saw)."""
    since: tuple[HandoverEvent, ...] = ()
    if row["code"] == "stale_payment":
        since = await _events_after(conn, row["receipt_id"], row["seen_position"] or 0)
    _tell(d, ReceiptEventRefused(
        record_id=row["record_id"], receipt_id=row["receipt_id"], event_type=row["event_type"], code=row["code"],
        reason=row["reason"], existing_receipt_id=row["existing_receipt_id"], since=since,
    ))


async def _events_after(conn: asyncpg.Connection, receipt_id: UUID, position: int) -> tuple[HandoverEvent, ...]:
    rows = await conn.fetch(f"{_EVENTS} where e.receipt_id = $1 and e.position > $2 order by e.position", receipt_id, position)
    return tuple(event_from_row(r) for r in rows)


async def _till_names(conn: asyncpg.Connection, account_id: UUID) -> dict[UUID, str]:
    rows = await conn.fetch("select till_id, till_name from tills where account_id = $1", account_id)
    return {r["till_id"]: r["till_name"] for r in rows}


async def _locked_receipt(conn: asyncpg.Connection, receipt_id: UUID, account_id: UUID) -> asyncpg.Record:
    """The open receipt ``receipt_id`` of the account, locked; ``Refusal`` if unknown or closed."""
    row = await conn.fetchrow("select * from handover_receipts where receipt_id = $1 for update", receipt_id)
    if row is None or row["account_id"] != account_id:
        opening = await conn.fetchrow(
            "select reason, existing_receipt_id from handover_refusals "
            "where receipt_id = $1 and account_id = $2 and event_type = 'opened' order by refused_at limit 1",
            receipt_id, account_id,
        )
        if opening is not None:
            raise Refusal(
                "unknown_receipt", f"receipt {receipt_id} was not opened: {opening['reason']}", opening["existing_receipt_id"]
            )
        raise Refusal("unknown_receipt", f"receipt {receipt_id} was never opened")
    if row["status"] == "closed":
        names = await _till_names(conn, account_id)
        closed_by = names.get(row["closed_by"], row["closed_by"])
        raise Refusal(
            "receipt_closed",
            f"receipt {receipt_id} was paid on till {closed_by} at {when(row['closed_at'])}; "
            "a closed receipt cannot change",
            receipt_id,
        )
    return row


async def _check_table_free(conn: asyncpg.Connection, account_id: UUID, table_nr: str) -> None:
    """Raise ``Refusal`` (``table_taken``, naming the open receipt that holds it) unless ``table_nr`` is free."""
    row = await conn.fetchrow(
        """
        select r.receipt_id, r.opened_at, t.till_name from handover_receipts r left join tills t on t.till_id = r.opened_by
        where r.account_id = $1 and r.table_nr = $2 and r.status = 'open'
        """,
        account_id, table_nr,
    )
    if row is None:
        return
    raise Refusal(
        "table_taken",
        f"table {table_nr} already has open receipt {row['receipt_id']}, opened on till {row['till_name']} "
        f"at {when(row['opened_at'])}",
        row["receipt_id"],
    )


async def _append(
    conn: asyncpg.Connection, receipt_id: UUID, position: int, u: Upload, event: Any, till_name: str
) -> HandoverEvent:
    accepted = HandoverEvent(
        receipt_id=receipt_id, position=position, record_id=u.record_id, till_id=u.till_id, till_name=till_name,
        recorded_at=u.recorded_at, event=event,
    )
    await conn.execute(
        """
        insert into handover_events (receipt_id, position, record_id, till_id, event_type, event, recorded_at)
        values ($1, $2, $3, $4, $5, $6, $7)
        """,
        receipt_id, position, u.record_id, u.till_id, event.type, event.model_dump(mode="json"), u.recorded_at,
    )
    return accepted


async def _standing_lines(conn: asyncpg.Connection, receipt_id: UUID, line_ids: tuple[UUID, ...]) -> list[asyncpg.Record]:
    rows = await conn.fetch(
        """
        select l.*, t.till_name from handover_lines l left join tills t on t.till_id = l.till_id
        where l.line_id = any($1::uuid[]) and l.receipt_id = $2 and not l.voided
        """,
        list(line_ids), receipt_id,
    )
    missing = set(line_ids) - {r["line_id"] for r in rows}
    if missing:
        raise Refusal("unknown_line", f"line(s) {', '.join(sorted(map(str, missing)))} are not standing on receipt {receipt_id}")
    return rows


async def _apply(u: Upload, record: ReceiptEvent, till: _Till, conn: asyncpg.Connection) -> list[HandoverEvent]:
    """Apply one event; returns the accepted events (two for a move); raises ``Refusal``."""
    event = record.event
    receipt_id = record.receipt_id
    if isinstance(event, ReceiptOpened):
        existing = await conn.fetchrow("select account_id from handover_receipts where receipt_id = $1", receipt_id)
        if existing is not None:
            raise Refusal("receipt_exists", f"receipt {receipt_id} was opened before", receipt_id)
        if event.table_nr is not None:
            await _check_table_free(conn, u.account_id, event.table_nr)
        await conn.execute(
            """
            insert into handover_receipts (receipt_id, account_id, status, position, total, table_nr, opened_by, opened_at)
            values ($1, $2, 'open', 1, 0, $3, $4, $5)
            """,
            receipt_id, u.account_id, event.table_nr, u.till_id, event.opened_at,
        )
        return [await _append(conn, receipt_id, 1, u, event, till.name)]

    receipt = await _locked_receipt(conn, receipt_id, u.account_id)
    position = receipt["position"] + 1
    total = receipt["total"]
    changes: dict[str, Any] = {}
    accepted: list[HandoverEvent] = []
    if isinstance(event, LineAdded):
        line = event.line
        if event.expected_table_nr is not None and receipt["table_nr"] != event.expected_table_nr:
            raise Refusal(
                "table_changed",
                f"the line is meant for table {event.expected_table_nr}, but receipt {receipt_id} is now "
                + (f"on table {receipt['table_nr']}" if receipt["table_nr"] else "on no table"),
                receipt_id,
            )
        if await conn.fetchval("select 1 from handover_lines where line_id = $1", line.line_id):
            raise Refusal("duplicate_line", f"line id {line.line_id} is already used")
        await conn.execute(
            "insert into handover_lines (line_id, receipt_id, till_id, amount, line) values ($1, $2, $3, $4, $5)",
            line.line_id, receipt_id, u.till_id, line.amount, line.model_dump(mode="json"),
        )
        total += line.amount
    elif isinstance(event, LineVoided):
        (line,) = await _standing_lines(conn, receipt_id, (event.line_id,))
        await conn.execute("update handover_lines set voided = true where line_id = $1", event.line_id)
        total -= line["amount"]
    elif isinstance(event, TableSet):
        if event.table_nr is not None and event.table_nr != receipt["table_nr"]:
            await _check_table_free(conn, u.account_id, event.table_nr)
        changes["table_nr"] = event.table_nr
    elif isinstance(event, CustomerSet):
        changes["customer_nr"] = event.customer_nr
    elif isinstance(event, LinesMoved):
        if event.to_receipt_id == receipt_id:
            raise Refusal("bad_target", "lines cannot move to the receipt they are on")
        try:
            target = await _locked_receipt(conn, event.to_receipt_id, u.account_id)
        except Refusal as refusal:
            raise Refusal("bad_target", f"cannot move lines: {refusal.reason}", refusal.existing_receipt_id) from None
        lines = await _standing_lines(conn, receipt_id, event.line_ids)
        by_id = {r["line_id"]: r for r in lines}
        moved = sum(r["amount"] for r in lines)
        await conn.execute(
            "update handover_lines set receipt_id = $2 where line_id = any($1::uuid[])", list(event.line_ids), event.to_receipt_id
        )
        total -= moved
        moved_in = LinesMovedIn(
            from_receipt_id=receipt_id,
            lines=tuple(
                StandingLine(line=by_id[i]["line"], till_id=by_id[i]["till_id"], till_name=by_id[i]["till_name"] or "")
                for i in event.line_ids
            ),
        )
        target_position = target["position"] + 1
        accepted.append(await _append(conn, event.to_receipt_id, target_position, u, moved_in, till.name))
        await conn.execute(
            "update handover_receipts set position = $2, total = total + $3, updated_at = now() where receipt_id = $1",
            event.to_receipt_id, target_position, moved,
        )
    elif isinstance(event, ReceiptPaid):
        since = await _events_after(conn, receipt_id, event.seen_position)
        if [e.record_id for e in since] != list(event.counted):
            others = [e for e in since if e.record_id not in event.counted]
            if others:
                names = await _till_names(conn, u.account_id)
                what = "; ".join(describe(e, names) for e in others[:5])
                more = f"; and {len(others) - 5} more" if len(others) > 5 else ""
                reason = f"the receipt changed after it was totalled: {what}{more}; total now {_cents(total)}"
            else:
                reason = (
                    "the payment counted on events of this till that were refused or not yet applied; "
                    f"total now {_cents(total)}"
                )
            raise Refusal("stale_payment", reason, receipt_id, since)
        if event.total != total:
            raise Refusal(
                "payment_mismatch", f"payments add up to {_cents(event.total)}, the receipt's lines to {_cents(total)}", receipt_id
            )
        changes.update(status="closed", closed_by=u.till_id, closed_at=event.closed_at, paid_record_id=u.record_id)
    else:  # pragma: no cover - the model admits no other event
        raise Refusal("unknown_receipt", f"event {event.type} cannot be applied")
    accepted.insert(0, await _append(conn, receipt_id, position, u, event, till.name))
    columns = ["position", "total", *changes]
    assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(columns, start=2))
    await conn.execute(
        f"update handover_receipts set {assignments}, updated_at = now() where receipt_id = $1",
        receipt_id, position, total, *changes.values(),
    )
    return accepted


# -- catch-up ----------------------------------------------------------------------


def receipt_catchup_log_context(request: ReceiptCatchUpRequest) -> dict[str, Any]:
    """Fields bound to each receipt catch-up request's log line."""
    return {
        "account_id": str(request.account_id),
        "till_id": str(request.till_id),
        "request_id": str(request.request_id),
        "receipts_named": len(request.receipt_ids),
        "verdicts_for": len(request.verdicts_for),
    }


async def serve_receipt_catchups(deliveries: list[Delivery[ReceiptCatchUpRequest]], conn: asyncpg.Connection) -> None:
    """Consume-adapter handler: answer each request with the snapshots of every open
    receipt of the account and of the receipts it names or has events on, the stored
    refusals of ``verdicts_for``, and ``ReceiptCatchUpDone`` last."""
    for d in deliveries:
        r = d.body
        problem = till_sender_problem(d, r.till_id, receipt_catchup_routing_key(r.account_id, r.till_id))
        if problem:
            d.refuse(problem, outcome="wrong_sender")
            continue
        till = await conn.fetchrow("select account_id, sync_mode, custom_flags from tills where till_id = $1", r.till_id)
        if till is None or till["account_id"] != r.account_id:
            d.refuse(f"till {r.till_id} is not a till of account {r.account_id}", outcome="unknown_till")
            continue
        as_of = await conn.fetchval("select now()")
        mode, custom = stored_mode(till["sync_mode"], till["custom_flags"])
        shared, last_archived = await _send_shared_records(d, conn, r, download_categories(mode, custom))
        more = shared == MAX_SHARED_RECORDS
        open_too = hands_over_receipts(mode, custom)
        receipt_ids = [
            row["receipt_id"]
            for row in await conn.fetch(
                """
                select receipt_id from handover_receipts
                where account_id = $1 and ((status = 'open' and $4) or receipt_id = any($2::uuid[])
                      or receipt_id in (select receipt_id from handover_events where record_id = any($3::uuid[])))
                order by opened_at, receipt_id
                """,
                r.account_id, list(r.receipt_ids), list(r.verdicts_for), open_too,
            )
        ]
        events: dict[UUID, list[HandoverEvent]] = {i: [] for i in receipt_ids}
        statuses = {
            row["receipt_id"]: row["status"]
            for row in await conn.fetch("select receipt_id, status from handover_receipts where receipt_id = any($1::uuid[])", receipt_ids)
        }
        for row in await conn.fetch(
            f"{_EVENTS} where e.receipt_id = any($1::uuid[]) order by e.receipt_id, e.position", receipt_ids
        ):
            events[row["receipt_id"]].append(event_from_row(row))
        for receipt_id in receipt_ids:
            _tell(d, ReceiptSnapshot(
                request_id=r.request_id, receipt_id=receipt_id, status=statuses[receipt_id], events=tuple(events[receipt_id])
            ))
        unknown = tuple(sorted(set(r.receipt_ids) - set(receipt_ids)))
        for row in await conn.fetch(
            "select * from handover_refusals where record_id = any($1::uuid[]) and till_id = $2", list(r.verdicts_for), r.till_id
        ):
            await _tell_refusal(d, conn, row)
        _tell(d, ReceiptCatchUpDone(
            request_id=r.request_id, receipts=len(receipt_ids), unknown_receipts=unknown, shared_records=shared,
            as_of=last_archived if more else as_of, more_shared_records=more,
        ))
        d.outcome = "served"
        d.log["shared_records"] = shared


async def _send_shared_records(
    d: Delivery[ReceiptCatchUpRequest], conn: asyncpg.Connection, r: ReceiptCatchUpRequest, categories: tuple[str, ...]
) -> tuple[int, Any]:
    """Send the other tills' receipts and Z-reports archived at or after ``r.shared_since``
    (or in the last ``SHARED_RECORDS_DAYS`` days), oldest first, at most
    ``MAX_SHARED_RECORDS`` (the till asks for the rest); only the kinds the till's mode
    receives. Read from the archive (written by the archive writer); live ones arrive
    through ``route_receipts``. Returns (how many, the archive time of the last)."""
    kinds = [k for k, c in (("receipt", "receipts"), ("zreport", "zreports")) if c in categories]
    if not kinds:
        return 0, None
    rows = await conn.fetch(
        """
        select a.record_id, a.till_id, t.till_name, a.recorded_at, a.payload -> 'record' as record, a.archived_at
        from archive_records a left join tills t on t.till_id = a.till_id
        where a.account_id = $1 and a.kind = any($2::text[]) and a.till_id <> $3
          and a.archived_at >= coalesce($4, now() - make_interval(days => $5::int))
        order by a.archived_at, a.record_id limit $6
        """,
        r.account_id, kinds, r.till_id, r.shared_since, SHARED_RECORDS_DAYS, MAX_SHARED_RECORDS,
    )
    for row in rows:
        _tell(d, TillRecordShared(
            till_id=row["till_id"], till_name=row["till_name"] or "", record_id=row["record_id"],
            recorded_at=row["recorded_at"], record=row["record"],
        ))
    return len(rows), (rows[-1]["archived_at"] if rows else None)
