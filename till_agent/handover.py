"""Shared open receipts on the till (receipt handover), part of the local store.

A shared receipt is the sequence of its events. The till keeps the events the router
accepted, at their positions, and its own events still waiting for a verdict; what it
shows (``ReceiptView``) is the accepted events in position order followed by its own
pending ones. Every own event is recorded with its outbox row in one transaction,
like every record. Verdicts come back on the till's queue:
- an accepted event (any till's) at the next position is applied; a later position
  means the till missed events, and it asks the router for the receipt's snapshot;
- a refused event stays in the archive and becomes a notice on this till;
- a refused opening of a table another till opened first: the lines this till booked
  meanwhile are booked again onto that receipt (one receipt per table) and a notice
  says so;
- this till's payment accepted: the till records the closed receipt (the fiscal
  record) under its next receipt number; numbers are per till, so tills never collide.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import dataclass
from typing import Any, Callable, Sequence
from uuid import UUID

from pydantic import TypeAdapter

from shared.fiscal import PaymentType
from shared.models import (
    MAX_RECEIPTS_ASKED,
    Cashier,
    CustomerSet,
    CustomSyncFlags,
    HandoverEvent,
    HandoverLine,
    LineAdded,
    LinesMoved,
    LinesMovedIn,
    LineVoided,
    Payment,
    Receipt,
    ReceiptEvent,
    ReceiptEventRefused,
    RecordRefused,
    ReceiptOpened,
    ReceiptPaid,
    ReceiptSnapshot,
    SyncMode,
    TableSet,
    TillRecordShared,
    TillReceiptEvent,
    ZReport,
)
from shared.topology import download_categories, hands_over_receipts
from till_agent.booking import shared_closed_receipt
from till_agent.db import TillStoreError, transaction

HANDOVER_SCHEMA = """
create table if not exists handover_receipts (
    receipt_id     text primary key,
    status         text not null,              -- open, closed, refused (its opening was refused)
    position       integer not null default 0, -- last accepted position applied
    table_nr       text,
    customer_nr    text,
    opened_by      text,
    opened_by_name text,
    opened_at      text,
    business_day   text,
    cashier        text,
    closed_by      text,
    closed_by_name text,
    closed_at      text,
    paid_record_id text,
    receipt_number integer,                    -- when this till closed it
    merged_into    text,
    created_at     text not null
);
create table if not exists handover_events (
    record_id  text not null,
    receipt_id text not null,
    position   integer,                        -- null while waiting for the router
    till_id    text,
    till_name  text,
    type       text not null,
    body       text not null,
    state      text not null,                  -- pending, accepted, refused, rebooked
    reason     text,
    own        integer not null default 0,
    primary key (record_id, receipt_id)
);
create unique index if not exists handover_events_position on handover_events (receipt_id, position);
create table if not exists receipt_notices (
    notice_id  integer primary key autoincrement,
    at         text not null,
    receipt_id text,
    record_id  text,
    code       text not null,
    message    text not null
);
create table if not exists shared_records (
    record_id   text primary key,
    till_id     text not null,
    till_name   text,
    kind        text not null,
    recorded_at text not null,
    body        text not null
);
"""

SHARED_RECORDS_OVERLAP = dt.timedelta(minutes=5)
MAX_COUNTED = 1000  # own events a payment may count in (ReceiptPaid.counted)

_EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(HandoverEvent.model_fields["event"].annotation)


@dataclass(frozen=True)
class ViewLine:
    """A line as the till shows it: ``confirmed`` once the router accepted it;
    ``till_id``/``till_name`` the till that entered it."""

    line: HandoverLine
    till_id: UUID | None
    till_name: str | None
    confirmed: bool


@dataclass(frozen=True)
class ReceiptView:
    """A shared receipt as this till sees it: accepted events, then its own pending ones.

    ``status``: ``open``, ``closed`` (paid; ``closed_by`` the till) or ``refused`` (its
    opening was refused; ``merged_into`` the receipt that holds the table). ``position``:
    the last accepted position; ``pending``: own events without a verdict;
    ``payment_pending``: this till's payment awaits the router. Amounts in cents.
    """

    receipt_id: UUID
    status: str
    table_nr: str | None
    customer_nr: str | None
    position: int
    pending: int
    lines: tuple[ViewLine, ...]
    total: int
    opened_by: UUID | None
    opened_by_name: str | None
    opened_at: dt.datetime | None
    cashier: Cashier | None
    closed_by: UUID | None
    closed_by_name: str | None
    closed_at: dt.datetime | None
    receipt_number: int | None
    payment_pending: bool
    merged_into: UUID | None


@dataclass(frozen=True)
class SharedRecord:
    """A receipt state or Z-report another till of the account recorded."""

    till_id: UUID
    till_name: str
    record: Receipt | ZReport


@dataclass(frozen=True)
class Notice:
    """Something the router refused or the till did on its own, for the people at the till."""

    notice_id: int
    at: dt.datetime
    receipt_id: UUID | None
    record_id: UUID | None
    code: str
    message: str


def _line_words(line: HandoverLine) -> str:
    """``'Bier' 2 × 3.50 EUR``: a line as notices name it."""
    return f"{line.text!r} {line.quantity.normalize()} × {line.unit_price / 100:.2f} EUR"


def when(moment: dt.datetime | None) -> str:
    """``2024-03-01 18:00:05 UTC``: a time as messages show it."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "?"


def _uuid(text: str | None) -> UUID | None:
    return UUID(text) if text else None


def _time(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text) if text else None


class HandoverStore:
    """The shared-receipt part of ``TillStore`` (uses its connection and outbox)."""

    _db: sqlite3.Connection

    # provided by TillStore
    def sync_settings(self) -> tuple[bool, str, str | None]: ...  # pragma: no cover
    def mode(self) -> tuple[SyncMode, CustomSyncFlags | None]: ...  # pragma: no cover
    def _enqueue(self, record: Any, recorded_at: dt.datetime, record_id: UUID | None = None) -> tuple[UUID, int]: ...  # pragma: no cover
    def book_receipt(self, build: Callable[[int], Receipt], recorded_at: dt.datetime) -> Receipt: ...  # pragma: no cover
    def _get(self, key: str) -> str | None: ...  # pragma: no cover
    def _set(self, **values: str | None) -> None: ...  # pragma: no cover

    def hands_over_receipts(self) -> bool:
        """True if this till's sync mode takes part in shared receipts."""
        return hands_over_receipts(*self.mode())

    def receives_shared_records(self) -> bool:
        """True if this till's sync mode receives the other tills' receipts or Z-reports."""
        received = download_categories(*self.mode())
        return "receipts" in received or "zreports" in received

    def shared_records_since(self) -> dt.datetime | None:
        """Where the next catch-up of other tills' records starts: right at the last record
        of a catch-up that had more to send, else a few minutes before the router's time
        of the last one (records archived while it ran are not missed); None if there was none."""
        as_of = self._get("shared_records_as_of")
        if not as_of:
            return None
        exact = self._get("shared_records_more") == "1"
        return dt.datetime.fromisoformat(as_of) - (dt.timedelta(0) if exact else SHARED_RECORDS_OVERLAP)

    def save_shared_records_as_of(self, as_of: dt.datetime, more: bool = False) -> None:
        """Remember how far the catch-ups of other tills' records got (``more``: a page
        ended there and the rest is still to come)."""
        self._set(shared_records_as_of=as_of.isoformat(), shared_records_more="1" if more else "0")

    def forget_shared_records_as_of(self) -> None:
        """Start the catch-ups of other tills' records anew (a kind is received anew)."""
        self._set(shared_records_as_of=None)

    # -- reading ------------------------------------------------------------------

    def _receipt_row(self, receipt_id: UUID) -> sqlite3.Row | None:
        return self._db.execute("select * from handover_receipts where receipt_id = ?", (str(receipt_id),)).fetchone()

    def _events(self, receipt_id: UUID) -> list[sqlite3.Row]:
        """Accepted events by position, then own pending ones in outbox order."""
        return self._db.execute(
            """
            select e.*, o.till_seq from handover_events e left join outbox o on o.record_id = e.record_id
            where e.receipt_id = ? and (e.state = 'accepted' or (e.state = 'pending' and e.own))
            order by e.state = 'pending', e.position, o.till_seq
            """,
            (str(receipt_id),),
        ).fetchall()

    def shared_receipt(self, receipt_id: UUID) -> ReceiptView:
        """The receipt as this till shows it; ``TillStoreError`` if the till does not know it."""
        row = self._receipt_row(receipt_id)
        if row is None:
            raise TillStoreError(f"this till knows no shared receipt {receipt_id}")
        return self._view(row)

    def _view(self, row: sqlite3.Row) -> ReceiptView:
        receipt_id = UUID(row["receipt_id"])
        lines: dict[UUID, ViewLine] = {}
        table_nr, customer_nr = row["table_nr"], row["customer_nr"]
        pending = 0
        payment_pending = False
        for e in self._events(receipt_id):
            event = _EVENT_ADAPTER.validate_json(e["body"])
            confirmed = e["state"] == "accepted"
            pending += not confirmed
            till_id, till_name = _uuid(e["till_id"]), e["till_name"]
            if isinstance(event, LineAdded):
                lines[event.line.line_id] = ViewLine(event.line, till_id, till_name, confirmed)
            elif isinstance(event, (LineVoided, LinesMoved)):
                for line_id in (event.line_id,) if isinstance(event, LineVoided) else event.line_ids:
                    lines.pop(line_id, None)
            elif isinstance(event, LinesMovedIn):
                for moved in event.lines:
                    lines[moved.line.line_id] = ViewLine(moved.line, moved.till_id, moved.till_name, confirmed)
            elif isinstance(event, TableSet) and not confirmed:
                table_nr = event.table_nr
            elif isinstance(event, CustomerSet) and not confirmed:
                customer_nr = event.customer_nr
            elif isinstance(event, ReceiptPaid) and not confirmed:
                payment_pending = True
        for moved_in in self._own_moves_into(receipt_id):
            pending += 1  # the router appends the lines here at the next position
            lines.update((v.line.line_id, v) for v in moved_in)
        return ReceiptView(
            receipt_id=receipt_id,
            status=row["status"],
            table_nr=table_nr,
            customer_nr=customer_nr,
            position=row["position"],
            pending=pending,
            lines=tuple(lines.values()),
            total=sum(v.line.amount for v in lines.values()),
            opened_by=_uuid(row["opened_by"]),
            opened_by_name=row["opened_by_name"],
            opened_at=_time(row["opened_at"]),
            cashier=Cashier.model_validate_json(row["cashier"]) if row["cashier"] else None,
            closed_by=_uuid(row["closed_by"]),
            closed_by_name=row["closed_by_name"],
            closed_at=_time(row["closed_at"]),
            receipt_number=row["receipt_number"],
            payment_pending=payment_pending,
            merged_into=_uuid(row["merged_into"]),
        )

    def _own_pending_records(self, receipt_id: UUID) -> list[UUID]:
        """Record ids of this till's events that will add a position to ``receipt_id``,
        in outbox order: its own pending events there and its pending moves into it."""
        rows = self._db.execute(
            """
            select e.record_id from handover_events e join outbox o on o.record_id = e.record_id
            where e.own and e.state = 'pending'
              and (e.receipt_id = ? or (e.type = 'lines_moved' and json_extract(e.body, '$.to_receipt_id') = ?))
            order by o.till_seq
            """,
            (str(receipt_id), str(receipt_id)),
        ).fetchall()
        return [UUID(r[0]) for r in rows]

    def _own_moves_into(self, receipt_id: UUID) -> list[list[ViewLine]]:
        """The lines of this till's moves into ``receipt_id`` still waiting for the router,
        as the source receipts show them (unconfirmed here)."""
        moves = []
        for e in self._db.execute(
            "select receipt_id, body from handover_events where own and state = 'pending' and type = 'lines_moved' "
            "and json_extract(body, '$.to_receipt_id') = ?",
            (str(receipt_id),),
        ).fetchall():
            event = _EVENT_ADAPTER.validate_json(e["body"])
            known = self._line_data(UUID(e["receipt_id"]))
            moves.append([
                ViewLine(known[i].line, known[i].till_id, known[i].till_name, False) for i in event.line_ids if i in known
            ])
        return moves

    def _line_data(self, receipt_id: UUID) -> dict[UUID, ViewLine]:
        """Every line ever booked onto or moved into ``receipt_id`` (voided ones too), by id."""
        found: dict[UUID, ViewLine] = {}
        for e in self._events(receipt_id):
            event = _EVENT_ADAPTER.validate_json(e["body"])
            if isinstance(event, LineAdded):
                found[event.line.line_id] = ViewLine(event.line, _uuid(e["till_id"]), e["till_name"], False)
            elif isinstance(event, LinesMovedIn):
                found.update((m.line.line_id, ViewLine(m.line, m.till_id, m.till_name, False)) for m in event.lines)
        return found

    def find_shared_receipts(self, id_prefix: str) -> list[ReceiptView]:
        """The shared receipts whose id (hex digits, no dashes) starts with ``id_prefix``."""
        rows = self._db.execute(
            "select * from handover_receipts where replace(receipt_id, '-', '') like ? order by created_at",
            (id_prefix.lower().replace("-", "") + "%",),
        ).fetchall()
        return [self._view(r) for r in rows]

    def shared_receipts(self, status: str | None = "open") -> list[ReceiptView]:
        """The shared receipts this till knows (those with ``status``, or all), oldest first."""
        rows = self._db.execute(
            "select * from handover_receipts where (? is null or status = ?) order by coalesce(opened_at, created_at)",
            (status, status),
        ).fetchall()
        return [self._view(r) for r in rows]

    def open_receipt_of_table(self, table_nr: str) -> ReceiptView | None:
        """The open receipt this till knows for ``table_nr`` (its own unconfirmed ones too)."""
        for view in self.shared_receipts("open"):
            if view.table_nr == table_nr:
                return view
        return None

    def notices(self, since_id: int = 0) -> list[Notice]:
        """Notices after ``since_id``, oldest first."""
        rows = self._db.execute("select * from receipt_notices where notice_id > ? order by notice_id", (since_id,)).fetchall()
        return [
            Notice(r["notice_id"], dt.datetime.fromisoformat(r["at"]), _uuid(r["receipt_id"]), _uuid(r["record_id"]), r["code"], r["message"])
            for r in rows
        ]

    def shared_records(self, kind: str) -> list[SharedRecord]:
        """The receipts (``receipt``) or Z-reports (``zreport``) other tills recorded, oldest first."""
        rows = self._db.execute(
            "select till_id, till_name, body from shared_records where kind = ? order by recorded_at, record_id", (kind,)
        ).fetchall()
        model = Receipt if kind == "receipt" else ZReport
        return [SharedRecord(UUID(r["till_id"]), r["till_name"] or "", model.model_validate_json(r["body"])) for r in rows]

    def receipts_awaiting_verdicts(self, limit: int = MAX_RECEIPTS_ASKED) -> tuple[list[UUID], list[UUID]]:
        """``(receipt_ids, record_ids)`` for a catch-up: the receipts this till shows open or
        has events waiting on, and its uploaded events still without a verdict."""
        receipts = [
            UUID(r[0])
            for r in self._db.execute(
                """
                select receipt_id from handover_receipts where status = 'open'
                union select receipt_id from handover_events where own and state = 'pending'
                limit ?
                """,
                (limit,),
            )
        ]
        records = [
            UUID(r[0])
            for r in self._db.execute(
                """
                select e.record_id from handover_events e join outbox o on o.record_id = e.record_id
                where e.own and e.state = 'pending' and o.sent_at is not null order by o.till_seq limit ?
                """,
                (limit,),
            )
        ]
        return receipts, records

    def payments_awaiting_verdict(self) -> list[UUID]:
        """The shared receipts this till has paid whose payment the router has not judged yet."""
        rows = self._db.execute(
            "select receipt_id from handover_events where own and state = 'pending' and type = 'paid' order by receipt_id"
        ).fetchall()
        return [UUID(r[0]) for r in rows]

    def pending_receipt_events(self) -> int:
        """Own events of shared receipts without a verdict yet."""
        return self._db.execute("select count(*) from handover_events where own and state = 'pending'").fetchone()[0]

    # -- recording own events -------------------------------------------------------

    def _open_view(self, receipt_id: UUID) -> ReceiptView:
        view = self.shared_receipt(receipt_id)
        if view.status == "closed":
            closed_by = "this till" if str(view.closed_by) == self._get("till_id") else f"till {view.closed_by_name}"
            raise TillStoreError(
                f"receipt {receipt_id} was paid on {closed_by} at {when(view.closed_at)}; a closed receipt cannot change"
            )
        if view.status == "refused":
            into = f"; its table is on receipt {view.merged_into}" if view.merged_into else ""
            raise TillStoreError(f"receipt {receipt_id} was not opened (see `tillsync till notices`){into}")
        return view

    def record_receipt_event(self, receipt_id: UUID, event: TillReceiptEvent, recorded_at: dt.datetime) -> UUID:
        """Check ``event`` against this till's view of the receipt, then store and queue it.

        Raises ``TillStoreError`` naming the problem: the till does not hand over
        receipts; the receipt is closed, unknown or its opening was refused; a table
        already has an open receipt; a line is not standing; the till's own payment is
        still waiting; the payment does not add up to the receipt's total.
        """
        if not self.hands_over_receipts():
            _, mode, _ = self.sync_settings()
            raise TillStoreError(
                f"this till's sync mode ({mode}) does not hand over receipts; shared receipts need "
                "archive_masterdata_receipts (or custom with download_receipts and upload_receipts). "
                "Use `till sell` for a receipt paid at once"
            )
        with transaction(self._db):
            if isinstance(event, ReceiptOpened):
                if self._receipt_row(receipt_id) is not None:
                    raise TillStoreError(f"receipt {receipt_id} exists already")
                self._check_table_free(event.table_nr)
                self._db.execute(
                    """
                    insert into handover_receipts (receipt_id, status, table_nr, opened_by, opened_by_name, opened_at,
                                                   business_day, cashier, created_at)
                    values (?, 'open', ?, ?, ?, ?, ?, ?, ?)
                    """,
                    (str(receipt_id), event.table_nr, self._get("till_id"), self._get("till_name"),
                     event.opened_at.isoformat(), event.business_day.isoformat(), event.cashier.model_dump_json(),
                     recorded_at.isoformat()),
                )
            else:
                view = self._open_view(receipt_id)
                if view.payment_pending:
                    raise TillStoreError(f"receipt {receipt_id} is being paid on this till; wait for the cloud's answer")
                standing = {v.line.line_id for v in view.lines}
                if isinstance(event, (LineVoided, LinesMoved)):
                    named = (event.line_id,) if isinstance(event, LineVoided) else event.line_ids
                    missing = [str(i) for i in named if i not in standing]
                    if missing:
                        raise TillStoreError(f"line(s) {', '.join(missing)} are not on receipt {receipt_id}")
                if isinstance(event, LinesMoved):
                    target = self._open_view(event.to_receipt_id)
                    if target.receipt_id == receipt_id:
                        raise TillStoreError("lines cannot move to the receipt they are on")
                    if target.payment_pending:
                        raise TillStoreError(f"receipt {target.receipt_id} is being paid on this till; wait for the cloud's answer")
                if isinstance(event, TableSet):
                    if event.table_nr == view.table_nr:
                        raise TillStoreError(f"receipt {receipt_id} is on table {event.table_nr} already")
                    self._check_table_free(event.table_nr)
                if isinstance(event, ReceiptPaid):
                    if event.total != view.total:
                        raise TillStoreError(f"the payment of {event.total} cents does not match the total of {view.total} cents")
            return self._enqueue_event(receipt_id, event, recorded_at)

    def _check_table_free(self, table_nr: str | None) -> None:
        if table_nr is None:
            return
        holder = self.open_receipt_of_table(table_nr)
        if holder is not None:
            raise TillStoreError(f"table {table_nr} already has open receipt {holder.receipt_id}; book onto that one")

    def _enqueue_event(self, receipt_id: UUID, event: TillReceiptEvent, recorded_at: dt.datetime) -> UUID:
        record_id, _ = self._enqueue(ReceiptEvent(receipt_id=receipt_id, event=event), recorded_at)
        self._db.execute(
            "insert into handover_events (record_id, receipt_id, till_id, till_name, type, body, state, own) "
            "values (?, ?, ?, ?, ?, ?, 'pending', 1)",
            (str(record_id), str(receipt_id), self._get("till_id"), self._get("till_name"), event.type, event.model_dump_json()),
        )
        return record_id

    def payment_for(
        self, receipt_id: UUID, payment_type: PaymentType, payment_name: str, closed_at: dt.datetime
    ) -> ReceiptPaid:
        """The payment of the whole receipt as this till sees it now: its total, the last
        accepted position, and this till's events on the receipt still on their way (its
        own events and moves into it), which the router must apply first and alone."""
        view = self._open_view(receipt_id)
        counted = self._own_pending_records(receipt_id)
        if len(counted) > MAX_COUNTED:
            raise TillStoreError(
                f"{len(counted)} events of this till on receipt {receipt_id} still wait for the router; sync before paying"
            )
        return ReceiptPaid(
            seen_position=view.position,
            counted=tuple(counted),
            total=view.total,
            payments=(Payment(payment_type=payment_type, payment_name=payment_name, amount=view.total),),
            closed_at=closed_at,
        )

    # -- applying the router's messages ---------------------------------------------------

    def apply_handover_event(self, accepted: HandoverEvent, till_id: UUID | None) -> str:
        """Apply an accepted event: ``applied``, ``old`` (applied before), ``gap`` (events
        before it are missing: ask for the receipt's snapshot) or ``closed_here`` (this
        till's payment was accepted and the closed receipt recorded)."""
        receipt_id = str(accepted.receipt_id)
        row = self._receipt_row(accepted.receipt_id)
        position = row["position"] if row is not None else 0
        if accepted.position <= position:
            return "old"
        if accepted.position != position + 1:
            return "gap"
        event = accepted.event
        if row is None:
            self._db.execute(
                "insert into handover_receipts (receipt_id, status, created_at) values (?, 'open', ?)",
                (receipt_id, dt.datetime.now(dt.UTC).isoformat()),
            )
        own = self._db.execute(
            "select 1 from handover_events where record_id = ? and receipt_id = ? and own",
            (str(accepted.record_id), receipt_id),
        ).fetchone()
        if own:
            self._db.execute(
                "update handover_events set state = 'accepted', position = ?, till_id = ?, till_name = ?, body = ? "
                "where record_id = ? and receipt_id = ?",
                (accepted.position, str(accepted.till_id), accepted.till_name, event.model_dump_json(),
                 str(accepted.record_id), receipt_id),
            )
        else:
            self._db.execute(
                "insert into handover_events (record_id, receipt_id, position, till_id, till_name, type, body, state, own) "
                "values (?, ?, ?, ?, ?, ?, ?, 'accepted', ?)",
                (str(accepted.record_id), receipt_id, accepted.position, str(accepted.till_id), accepted.till_name, event.type,
                 event.model_dump_json(), int(till_id is not None and accepted.till_id == till_id)),
            )
        changes: dict[str, Any] = {"position": accepted.position}
        if isinstance(event, ReceiptOpened):
            changes.update(
                status="open" if row is None or row["status"] != "refused" else "refused",
                table_nr=event.table_nr, opened_by=str(accepted.till_id), opened_by_name=accepted.till_name,
                opened_at=event.opened_at.isoformat(),
                business_day=event.business_day.isoformat(), cashier=event.cashier.model_dump_json(),
            )
        elif isinstance(event, TableSet):
            changes["table_nr"] = event.table_nr
        elif isinstance(event, CustomerSet):
            changes["customer_nr"] = event.customer_nr
        elif isinstance(event, ReceiptPaid):
            changes.update(
                status="closed", closed_by=str(accepted.till_id), closed_by_name=accepted.till_name,
                closed_at=event.closed_at.isoformat(),
                paid_record_id=str(accepted.record_id),
            )
        assignments = ", ".join(f"{c} = ?" for c in changes)
        self._db.execute(f"update handover_receipts set {assignments} where receipt_id = ?", (*changes.values(), receipt_id))
        if isinstance(event, ReceiptPaid) and till_id is not None and accepted.till_id == till_id:
            self._record_closed(accepted.receipt_id, event)
            return "closed_here"
        return "applied"

    def _record_closed(self, receipt_id: UUID, paid: ReceiptPaid) -> None:
        """Record the fiscal closed receipt under this till's next receipt number (once)."""
        row = self._receipt_row(receipt_id)
        assert row is not None
        if row["receipt_number"] is None:
            self._book_closed(row, [v for v in self._view(row).lines if v.confirmed], paid)

    def _notice(self, receipt_id: UUID | None, record_id: UUID | None, code: str, message: str) -> None:
        self._db.execute(
            "insert into receipt_notices (at, receipt_id, record_id, code, message) values (?, ?, ?, ?, ?)",
            (dt.datetime.now(dt.UTC).isoformat(), str(receipt_id) if receipt_id else None,
             str(record_id) if record_id else None, code, message),
        )

    def apply_record_refused(self, refused: RecordRefused) -> str:
        """Keep the archive's refusal of one of this till's records as a notice (code
        ``archive_refused``; once per record). Returns ``archive_refused`` or ``repeat``."""
        with transaction(self._db):
            if self._db.execute(
                "select 1 from receipt_notices where record_id = ? and code = 'archive_refused'", (str(refused.record_id),)
            ).fetchone():
                return "repeat"
            self._notice(
                None, refused.record_id, "archive_refused",
                f"the archive refused this till's {refused.kind} record {refused.record_id} (till_seq {refused.till_seq}): "
                f"{refused.reason}. The archive keeps what was sent for the operator; tell your service technician",
            )
        return "archive_refused"

    def archive_refusals(self) -> int:
        """How many of this till's records the archive refused (notices ``archive_refused``)."""
        return int(self._db.execute("select count(*) from receipt_notices where code = 'archive_refused'").fetchone()[0])

    def apply_handover_refused(self, refused: ReceiptEventRefused, till_id: UUID | None = None) -> str:
        """Apply the refusal of one of this till's events: the event is marked refused and a
        notice written; the events a refused payment did not count (``since``) are applied,
        so the receipt shows its new total at once; a refused opening of a taken table
        books this till's lines onto the receipt that holds it. Returns ``refused``,
        ``rebooked`` or ``old``."""
        row = self._db.execute(
            "select * from handover_events where record_id = ? and receipt_id = ? and own",
            (str(refused.record_id), str(refused.receipt_id)),
        ).fetchone()
        if row is None or row["state"] in ("refused", "rebooked", "accepted"):
            return "old"
        self._db.execute(
            "update handover_events set state = 'refused', reason = ? where record_id = ? and receipt_id = ?",
            (refused.reason, str(refused.record_id), str(refused.receipt_id)),
        )
        if refused.event_type == "opened":
            return self._rebook(refused)
        for event in refused.since:
            if event.receipt_id == refused.receipt_id:
                self.apply_handover_event(event, till_id)
        what = {
            "line_added": "line",
            "line_voided": "void",
            "paid": "payment",
            "table_set": "table change",
            "customer_set": "customer change",
            "lines_moved": "move of lines",
            "opened": "opening",
        }.get(refused.event_type, refused.event_type)
        event = _EVENT_ADAPTER.validate_json(row["body"])
        if isinstance(event, LineAdded):
            what = f"line {_line_words(event.line)}"
        message = f"{what} on receipt {refused.receipt_id} refused: {refused.reason}"
        if isinstance(event, LineAdded) and refused.code in ("receipt_closed", "table_changed", "unknown_receipt"):
            message += "; book it again where it belongs"
        if refused.code == "stale_payment":
            message += "; the receipt was totalled again, pay it once more"
        self._notice(refused.receipt_id, refused.record_id, refused.code, message)
        return "refused"

    def _rebook(self, refused: ReceiptEventRefused) -> str:
        """This till's opening of a receipt was refused (most often: another till opened
        the table first). What it recorded on that receipt meanwhile:

        - if it was paid here, the guest has paid: the receipt is recorded as a receipt
          paid at once (the fiscal record, under this till's next number) and nothing
          goes onto the other receipt;
        - else the lines still standing on it (voided ones are left out) are booked onto
          the receipt that holds the table, each for the table it was meant for
          (``expected_table_nr``, following this till's own table moves): should that
          receipt have moved to another table or been paid by then, the router refuses
          the line and the till says so. Lines this till had moved to another receipt
          (a split) are booked there. If the till already knows the table's receipt is
          closed or on another table, or there is none, it books nothing and the notice
          lists the lines. A customer set is not repeated.

        Returns ``rebooked`` (records queued), ``recorded_as_sale`` or ``refused``."""
        raced = refused.code in ("table_taken", "receipt_exists")
        target = refused.existing_receipt_id if raced else None
        lost = self._receipt_row(refused.receipt_id)
        lost_view = self._view(lost) if lost is not None else None
        table_nr = lost["table_nr"] if lost is not None else None
        self._db.execute(
            "update handover_receipts set status = 'refused', merged_into = ? where receipt_id = ?",
            (str(target) if target else None, str(refused.receipt_id)),
        )
        pending = self._db.execute(
            """
            select e.record_id, e.type, e.body from handover_events e join outbox o on o.record_id = e.record_id
            where e.receipt_id = ? and e.own and e.state = 'pending' order by o.till_seq
            """,
            (str(refused.receipt_id),),
        ).fetchall()
        events = [(e["record_id"], _EVENT_ADAPTER.validate_json(e["body"])) for e in pending]
        paid = next((event for _, event in events if isinstance(event, ReceiptPaid)), None)
        message = f"{refused.reason}. This till's receipt {refused.receipt_id} was not opened"
        if paid is not None and lost is not None and lost_view is not None:
            for record_id, _ in events:
                self._db.execute(
                    "update handover_events set state = 'refused', reason = ? where record_id = ? and receipt_id = ?",
                    ("paid here: recorded as a receipt paid at once", record_id, str(refused.receipt_id)),
                )
            receipt = self._book_closed(lost, lost_view.lines, paid)
            self._notice(
                refused.receipt_id, refused.record_id, refused.code,
                f"{message}; it had been paid here ({paid.total / 100:.2f} EUR), so it is recorded as receipt "
                f"{receipt.receipt_number} of this till, paid at once; nothing of it goes onto another receipt",
            )
            return "recorded_as_sale"
        known = self._receipt_row(target) if target else None
        if target and known is None:
            self._db.execute(
                "insert into handover_receipts (receipt_id, status, created_at) values (?, 'open', ?)",
                (str(target), dt.datetime.now(dt.UTC).isoformat()),
            )
        unfit = target is None or (
            known is not None and known["position"] > 0 and (known["status"] != "open" or known["table_nr"] != table_nr)
        )
        # what became of each line this till entered on the lost receipt
        standing: dict[UUID, tuple[HandoverLine, str | None]] = {}  # still there: (line, the table it was meant for)
        moved: list[tuple[UUID, HandoverLine]] = []  # moved on by this till: (the receipt it went to, line)
        others: list[str] = []
        for record_id, event in events:
            if isinstance(event, LineAdded):
                standing[event.line.line_id] = (event.line, table_nr)
            elif isinstance(event, LineVoided):
                standing.pop(event.line_id, None)
            elif isinstance(event, TableSet):
                table_nr = event.table_nr  # later lines were meant for the new table
            elif isinstance(event, LinesMoved):
                moved += [(event.to_receipt_id, standing.pop(i)[0]) for i in event.line_ids if i in standing]
            else:
                others.append({"customer_set": "a customer"}.get(event.type, event.type))
            self._db.execute(
                "update handover_events set state = 'rebooked', reason = ? where record_id = ? and receipt_id = ?",
                (f"receipt {refused.receipt_id} was not opened; its lines were booked anew", record_id, str(refused.receipt_id)),
            )
        now = dt.datetime.now(dt.UTC)
        booked: dict[UUID, list[str]] = {}
        not_booked: list[str] = []
        for line, meant in standing.values():
            if unfit:
                not_booked.append(_line_words(line))
                continue
            assert target is not None
            self._enqueue_event(target, LineAdded(line=line, expected_table_nr=meant), now)
            booked.setdefault(target, []).append(_line_words(line))
        for to, line in moved:
            destination = self._receipt_row(to)
            if destination is None or destination["status"] != "open":
                not_booked.append(_line_words(line))
                continue
            self._enqueue_event(to, LineAdded(line=line), now)
            booked.setdefault(to, []).append(_line_words(line))
        for receipt_id, words in booked.items():
            if receipt_id == target:
                message += f"; its lines were booked onto receipt {receipt_id}: {', '.join(words)}"
            else:
                message += f"; the lines it had moved to receipt {receipt_id} were booked there: {', '.join(words)}"
        if not_booked:
            closed = f"receipt {target} is closed or on another table now, so " if target and unfit else ""
            message += f"; {closed}its lines were NOT booked (book them again): {', '.join(not_booked)}"
        if others:
            message += f"; not repeated there (do it again): {', '.join(others)}"
        self._notice(refused.receipt_id, refused.record_id, refused.code, message)
        return "rebooked" if booked else "refused"

    def _book_closed(self, row: sqlite3.Row, lines: Sequence[ViewLine], paid: ReceiptPaid) -> Receipt:
        """Record the shared receipt ``row`` paid here as a closed receipt (the fiscal
        record) of ``lines`` with ``paid``'s payments, under this till's next receipt number;
        each line keeps the till that entered it (POS_TERMINAL_ID)."""
        here = _uuid(self._get("till_id"))
        receipt = self.book_receipt(
            lambda number: shared_closed_receipt(
                receipt_id=UUID(row["receipt_id"]),
                receipt_number=number,
                lines=[(v.line, v.till_id or here) for v in lines],
                payments=paid.payments,
                cashier=Cashier.model_validate_json(row["cashier"]),
                opened_at=dt.datetime.fromisoformat(row["opened_at"]),
                closed_at=paid.closed_at,
                business_day=dt.date.fromisoformat(row["business_day"]),
            ),
            dt.datetime.now(dt.UTC),
        )
        self._db.execute(
            "update handover_receipts set receipt_number = ? where receipt_id = ?", (receipt.receipt_number, row["receipt_id"])
        )
        return receipt

    def apply_handover_snapshot(self, snapshot: ReceiptSnapshot, till_id: UUID | None) -> int:
        """Apply the accepted events of a snapshot this till has not applied; returns how
        many records were queued (a payment of this till found accepted)."""
        queued = 0
        for event in snapshot.events:
            outcome = self.apply_handover_event(event, till_id)
            queued += outcome == "closed_here"
        return queued

    def apply_shared_record(self, shared: TillRecordShared, till_id: UUID | None) -> str:
        """Keep another till's receipt state or Z-report (``shared``), once; own ones are skipped."""
        if till_id is not None and shared.till_id == till_id:
            return "own"
        cursor = self._db.execute(
            "insert into shared_records (record_id, till_id, till_name, kind, recorded_at, body) values (?, ?, ?, ?, ?, ?) "
            "on conflict (record_id) do nothing",
            (str(shared.record_id), str(shared.till_id), shared.till_name, shared.record.kind, shared.recorded_at.isoformat(),
             shared.record.model_dump_json()),
        )
        return "shared_record" if cursor.rowcount else "old"
