"""The till's local SQLite store: its identity, master data, receipts, Z-reports, outbox.

Every local change is written together with its outbox row in one SQLite transaction:
a new ``record_id`` (UUID4) and the next ``till_seq`` (gapless from 1, never reset),
so a record exists locally exactly when it is queued for upload. The relay reads
the outbox in ``till_seq`` order and marks rows sent after the broker confirmed them.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from uuid import UUID

from pydantic import TypeAdapter

from shared.models import MasterDataRecord, Receipt, RecordBody, SignedIn, ZReport

STORE_FILE = "till.sqlite3"

_SCHEMA = """
create table if not exists settings (key text primary key, value text not null);
create table if not exists masterdata (
    entity_kind text not null,
    entity_key  text not null,
    data        text,
    deleted     integer not null default 0,
    version     integer,
    updated_at  text not null,
    primary key (entity_kind, entity_key)
);
create table if not exists receipts (
    receipt_id     text primary key,
    record_id      text not null unique,
    receipt_number integer unique,
    business_day   text not null,
    status         text not null,
    total          integer not null,
    z_nr           integer,
    body           text not null
);
create index if not exists receipts_day on receipts (business_day, z_nr);
create table if not exists zreports (
    z_nr         integer primary key,
    record_id    text not null unique,
    business_day text not null,
    body         text not null
);
create table if not exists outbox (
    till_seq    integer primary key,
    record_id   text not null unique,
    kind        text not null,
    body        text not null,
    recorded_at text not null,
    sent_at     text
);
create index if not exists outbox_unsent on outbox (till_seq) where sent_at is null;
"""

RECORD_ADAPTER: TypeAdapter[RecordBody] = TypeAdapter(RecordBody)


class TillStoreError(RuntimeError):
    """The local store is missing, not initialised, or asked for something impossible."""


@dataclass(frozen=True)
class OutboxRow:
    """One queued record: position, id, kind and the record's JSON."""

    till_seq: int
    record_id: UUID
    kind: str
    body: str
    recorded_at: dt.datetime


@dataclass(frozen=True)
class Identity:
    """Who the till is in the cloud, once it has signed in (None fields before)."""

    serial_number: str
    till_name: str
    account_name: str | None
    account_id: UUID | None
    till_id: UUID | None
    broker_username: str | None
    broker_password: str | None
    vhost: str | None
    signed_in: bool


class TillStore:
    """SQLite store of one till in ``data_dir`` (file ``till.sqlite3``)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / STORE_FILE
        if not self.path.exists():
            raise TillStoreError(f"no till here: {self.path} does not exist (run `tillsync till init` first)")
        self._db = self._connect(self.path)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        db.row_factory = sqlite3.Row
        db.execute("pragma journal_mode = wal")
        db.execute("pragma synchronous = full")
        db.execute("pragma foreign_keys = on")
        return db

    @classmethod
    def create(cls, data_dir: Path, serial_number: str, till_name: str) -> TillStore:
        """Create a new store in ``data_dir``; raises ``TillStoreError`` if one exists."""
        data_dir = Path(data_dir)
        if data_dir.exists() and not data_dir.is_dir():
            raise TillStoreError(f"{data_dir} is a file, not a directory for a till")
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / STORE_FILE
        if path.exists():
            raise TillStoreError(f"a till already exists in {data_dir}")
        if not serial_number.strip() or not till_name.strip():
            raise TillStoreError("serial number and till name must not be empty")
        data_dir.chmod(0o700)  # the store holds the till's broker secret
        db = cls._connect(path)
        path.chmod(0o600)
        db.executescript(_SCHEMA)
        with _transaction(db):
            db.executemany(
                "insert into settings (key, value) values (?, ?)",
                [
                    ("serial_number", serial_number.strip()),
                    ("till_name", till_name.strip()),
                    ("last_till_seq", "0"),
                    ("last_receipt_number", "0"),
                    ("last_z_nr", "0"),
                    ("signed_in", "0"),
                ],
            )
        db.close()
        return cls(data_dir)

    def close(self) -> None:
        self._db.close()

    # -- settings -----------------------------------------------------------

    def _get(self, key: str) -> str | None:
        row = self._db.execute("select value from settings where key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def _set(self, **values: str | None) -> None:
        for key, value in values.items():
            if value is None:
                self._db.execute("delete from settings where key = ?", (key,))
            else:
                self._db.execute(
                    "insert into settings (key, value) values (?, ?) on conflict (key) do update set value = excluded.value",
                    (key, value),
                )

    def identity(self) -> Identity:
        """The till's serial number, name and (after sign-in) cloud identity."""

        def as_uuid(key: str) -> UUID | None:
            value = self._get(key)
            return UUID(value) if value else None

        return Identity(
            serial_number=self._get("serial_number") or "",
            till_name=self._get("till_name") or "",
            account_name=self._get("account_name"),
            account_id=as_uuid("account_id"),
            till_id=as_uuid("till_id"),
            broker_username=self._get("broker_username"),
            broker_password=self._get("broker_password"),
            vhost=self._get("vhost"),
            signed_in=self._get("signed_in") == "1",
        )

    def save_sign_in(self, signed_in: SignedIn) -> None:
        """Keep the credentials and sync settings of a sign-in; continue after the archive's last ``till_seq``.

        A store that signs in as this till for the first time (a new or re-installed
        till whose serial number the cloud knows) may have queued records before it
        learnt how far the archive already is. None of them was ever uploaded as this
        till, so the unsent rows move, in order, to the positions after the archive's
        ``last_till_seq``. A store that knew the till already keeps its numbering: its
        unsent rows may be in the archive already (confirmation lost) and a repeat is
        recognised by its ``(record_id, till_seq)``.
        """
        with _transaction(self._db):
            new_to_this_till = self._get("till_id") != str(signed_in.till_id)
            self._set(
                account_name=signed_in.account_name,
                account_id=str(signed_in.account_id),
                till_id=str(signed_in.till_id),
                broker_username=signed_in.broker_username,
                broker_password=signed_in.broker_password.get_secret_value(),
                vhost=signed_in.vhost,
                queue=signed_in.queue,
                sync_enabled="1" if signed_in.sync_enabled else "0",
                sync_mode=signed_in.sync_mode.value,
                custom_flags=signed_in.custom.model_dump_json() if signed_in.custom else None,
                signed_in="1",
            )
            server_last = signed_in.last_till_seq
            first_unsent = self._db.execute("select min(till_seq) from outbox where sent_at is null").fetchone()[0]
            if new_to_this_till and first_unsent is not None and first_unsent <= server_last:
                last_sent = self._db.execute("select coalesce(max(till_seq), 0) from outbox where sent_at is not null").fetchone()[0]
                start = max(server_last, last_sent) + 1
                unsent = [r[0] for r in self._db.execute("select till_seq from outbox where sent_at is null order by till_seq")]
                # two steps, through negative numbers, so no intermediate position collides
                self._db.executemany(
                    "update outbox set till_seq = ? where till_seq = ?", [(-(start + i), seq) for i, seq in enumerate(unsent)]
                )
                self._db.execute("update outbox set till_seq = -till_seq where till_seq < 0")
                self._set(last_till_seq=str(start + len(unsent) - 1))
            elif server_last > int(self._get("last_till_seq") or 0):
                self._set(last_till_seq=str(server_last))
            # receipt and Z numbers continue after the archive's (a re-installed till)
            for key, server_value in (
                ("last_receipt_number", signed_in.last_receipt_number),
                ("last_z_nr", signed_in.last_z_nr),
            ):
                if server_value > int(self._get(key) or 0):
                    self._set(**{key: str(server_value)})

    def save_sign_out(self) -> None:
        """Forget the broker credentials; the account, data and outbox stay."""
        with _transaction(self._db):
            self._set(broker_username=None, broker_password=None, signed_in="0")

    def save_sync_mode(self, sync_enabled: bool, sync_mode: str, custom_json: str | None) -> None:
        with _transaction(self._db):
            self._set(sync_enabled="1" if sync_enabled else "0", sync_mode=sync_mode, custom_flags=custom_json)

    def sync_settings(self) -> tuple[bool, str, str | None]:
        """``(sync_enabled, sync_mode, custom_flags_json)`` as last stored."""
        return self._get("sync_enabled") != "0", self._get("sync_mode") or "archive", self._get("custom_flags")

    # -- local changes, each with its outbox row -----------------------------

    def _enqueue(self, record: MasterDataRecord | Receipt | ZReport, recorded_at: dt.datetime) -> tuple[UUID, int]:
        if recorded_at.tzinfo is None:
            raise TillStoreError("recorded_at must carry a time zone")
        till_seq = int(self._get("last_till_seq") or 0) + 1
        record_id = uuid.uuid4()
        self._db.execute(
            "insert into outbox (till_seq, record_id, kind, body, recorded_at) values (?, ?, ?, ?, ?)",
            (till_seq, str(record_id), record.kind, record.model_dump_json(), recorded_at.isoformat()),
        )
        self._set(last_till_seq=str(till_seq))
        return record_id, till_seq

    def next_receipt_number(self) -> int:
        """The receipt number (BON_NR) the next closed receipt gets; per till, from 1."""
        return int(self._get("last_receipt_number") or 0) + 1

    def record_receipt(self, receipt: Receipt, recorded_at: dt.datetime) -> UUID:
        """Store a receipt state and queue it; returns its ``record_id``.

        A closed receipt must carry ``next_receipt_number()``; raises ``TillStoreError``
        for a receipt number out of sequence or a change to a closed receipt.
        """
        with _transaction(self._db):
            return self._insert_receipt(receipt, recorded_at)

    def book_receipt(self, build: Callable[[int], Receipt], recorded_at: dt.datetime) -> Receipt:
        """Close a receipt under the next receipt number, atomically.

        ``build(receipt_number)`` makes the closed receipt; number, record and outbox
        row are written in one transaction, so concurrent bookings on one till never
        get the same number.
        """
        with _transaction(self._db):
            receipt = build(self.next_receipt_number())
            self._insert_receipt(receipt, recorded_at)
        return receipt

    def _insert_receipt(self, receipt: Receipt, recorded_at: dt.datetime) -> UUID:
        existing = self._db.execute("select status from receipts where receipt_id = ?", (str(receipt.receipt_id),)).fetchone()
        if existing is not None and existing["status"] == "closed":
            raise TillStoreError(f"receipt {receipt.receipt_id} is closed and cannot change")
        if receipt.status == "closed":
            expected = self.next_receipt_number()
            if receipt.receipt_number != expected:
                raise TillStoreError(f"receipt number {receipt.receipt_number} out of sequence, expected {expected}")
            self._set(last_receipt_number=str(expected))
        record_id, _ = self._enqueue(receipt, recorded_at)
        self._db.execute(
            """
            insert into receipts (receipt_id, record_id, receipt_number, business_day, status, total, body)
            values (?, ?, ?, ?, ?, ?, ?)
            on conflict (receipt_id) do update set record_id = excluded.record_id,
                receipt_number = excluded.receipt_number, status = excluded.status,
                total = excluded.total, body = excluded.body
            """,
            (
                str(receipt.receipt_id),
                str(record_id),
                receipt.receipt_number,
                receipt.business_day.isoformat(),
                receipt.status,
                receipt.total,
                receipt.model_dump_json(),
            ),
        )
        return record_id

    def receipts_for_closing(self, business_day: dt.date) -> list[Receipt]:
        """Closed receipts of ``business_day`` or earlier not yet in a Z-report, by receipt number.

        Earlier days count too, so every receipt ends up in exactly one Z-report even if
        a later day was closed first.
        """
        rows = self._db.execute(
            "select body from receipts where business_day <= ? and status = 'closed' and z_nr is null "
            "order by receipt_number",
            (business_day.isoformat(),),
        ).fetchall()
        return [Receipt.model_validate_json(r["body"]) for r in rows]

    def next_z_nr(self) -> int:
        return int(self._get("last_z_nr") or 0) + 1

    def record_zreport(self, zreport: ZReport, recorded_at: dt.datetime) -> UUID:
        """Store a Z-report, mark its receipts closed-out, queue it; returns its ``record_id``.

        Raises ``TillStoreError`` for a Z number out of sequence or a business day
        before the last Z-report's (Z-reports follow the business days in order).
        """
        with _transaction(self._db):
            return self._insert_zreport(zreport, recorded_at)

    def close_day(
        self, business_day: dt.date, build: Callable[[int, list[Receipt]], ZReport], recorded_at: dt.datetime
    ) -> ZReport:
        """Record the Z-report of ``business_day`` atomically: next Z number, open receipts, record."""
        with _transaction(self._db):
            zreport = build(self.next_z_nr(), self.receipts_for_closing(business_day))
            self._insert_zreport(zreport, recorded_at)
        return zreport

    def _insert_zreport(self, zreport: ZReport, recorded_at: dt.datetime) -> UUID:
        expected = self.next_z_nr()
        if zreport.z_nr != expected:
            raise TillStoreError(f"Z number {zreport.z_nr} out of sequence, expected {expected}")
        last_day = self._get("last_z_business_day")
        if last_day and zreport.business_day.isoformat() < last_day:
            raise TillStoreError(
                f"business day {zreport.business_day} is before the last Z-report's business day {last_day}"
            )
        record_id, _ = self._enqueue(zreport, recorded_at)
        self._db.execute(
            "insert into zreports (z_nr, record_id, business_day, body) values (?, ?, ?, ?)",
            (zreport.z_nr, str(record_id), zreport.business_day.isoformat(), zreport.model_dump_json()),
        )
        self._db.execute(
            "update receipts set z_nr = ? where business_day <= ? and status = 'closed' and z_nr is null",
            (zreport.z_nr, zreport.business_day.isoformat()),
        )
        self._set(last_z_nr=str(expected), last_z_business_day=zreport.business_day.isoformat())
        return record_id

    def record_masterdata(self, record: MasterDataRecord, recorded_at: dt.datetime) -> UUID:
        """Store a master-data change (or tombstone) locally and queue it."""
        with _transaction(self._db):
            record_id, _ = self._enqueue(record, recorded_at)
            self._db.execute(
                """
                insert into masterdata (entity_kind, entity_key, data, deleted, updated_at) values (?, ?, ?, ?, ?)
                on conflict (entity_kind, entity_key) do update set data = excluded.data,
                    deleted = excluded.deleted, updated_at = excluded.updated_at
                """,
                (
                    record.entity_kind,
                    record.entity_key,
                    record.data.model_dump_json() if record.data else None,
                    int(record.deleted),
                    recorded_at.isoformat(),
                ),
            )
        return record_id

    def masterdata(self, entity_kind: str) -> list[dict[str, Any]]:
        """Live entities of one kind as dicts."""
        rows = self._db.execute(
            "select data from masterdata where entity_kind = ? and not deleted order by entity_key", (entity_kind,)
        ).fetchall()
        return [json.loads(r["data"]) for r in rows]

    # -- outbox ---------------------------------------------------------------

    def unsent(self, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` unsent outbox rows in ``till_seq`` order."""
        rows = self._db.execute(
            "select till_seq, record_id, kind, body, recorded_at from outbox where sent_at is null order by till_seq limit ?",
            (limit,),
        ).fetchall()
        return [
            OutboxRow(r["till_seq"], UUID(r["record_id"]), r["kind"], r["body"], dt.datetime.fromisoformat(r["recorded_at"]))
            for r in rows
        ]

    def mark_sent(self, till_seqs: list[int]) -> None:
        """Mark outbox rows as confirmed by the broker."""
        if not till_seqs:
            return
        now = dt.datetime.now(dt.UTC).isoformat()
        with _transaction(self._db):
            self._db.executemany("update outbox set sent_at = ? where till_seq = ?", [(now, s) for s in till_seqs])

    def outbox_counts(self) -> tuple[int, int]:
        """``(pending, sent)`` row counts of the outbox."""
        row = self._db.execute(
            "select count(*) filter (where sent_at is null) as pending, count(sent_at) as sent from outbox"
        ).fetchone()
        return row["pending"], row["sent"]

    def recorded(self, kind: str | None = None) -> list[tuple[UUID, int, str]]:
        """``(record_id, till_seq, kind)`` of every record this till made (optionally one kind)."""
        query = "select record_id, till_seq, kind from outbox"
        rows = self._db.execute(query + (" where kind = ?" if kind else "") + " order by till_seq", (kind,) if kind else ()).fetchall()
        return [(UUID(r["record_id"]), r["till_seq"], r["kind"]) for r in rows]


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("begin immediate")
    try:
        yield
    except BaseException:
        db.execute("rollback")
        raise
    db.execute("commit")
