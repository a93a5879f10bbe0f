"""The till's local SQLite store: its identity, master data, receipts, Z-reports, outbox.

Every local change is written together with its outbox row in one SQLite transaction:
a new ``record_id`` (UUID4) and the next ``till_seq`` (gapless from 1, never reset),
so a record exists locally exactly when it is queued for upload. The relay reads
the outbox in ``till_seq`` order and marks rows sent after the broker confirmed them.

Master data (DESIGN.md §3, server-authoritative with a version per entity): each
local entity remembers the cloud version it is based on (``version``, ``base_data``),
its own change still waiting for the cloud's verdict (``pending_record_id``) and
whether it was changed while the till did not take part in master-data sync for its
kind (``dirty``). Cloud states (feed entries, catch-up pages) and verdicts on the
till's own changes are applied here, each in one transaction together with the feed
position; differences the owner must decide on are kept in ``masterdata_differences``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import sqlite3
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from uuid import UUID

import rfc8785
from pydantic import TypeAdapter

from shared.models import (
    ENTITY_ADAPTER,
    ENTITY_CATEGORY,
    MASTERDATA_CATEGORIES,
    CatchUpPage,
    CustomSyncFlags,
    EntityState,
    FeedEntry,
    MasterDataConflict,
    MasterDataCategory,
    MasterDataRecord,
    Receipt,
    RecordBody,
    SignedIn,
    SyncMode,
    Upload,
    ZReport,
    is_local_only_setting,
)
from shared.topology import masterdata_categories, stored_mode, upload_kinds
from till_agent.db import TillStoreError
from till_agent.db import transaction as _transaction
from till_agent.handover import HANDOVER_SCHEMA, HandoverStore
from till_agent.masterdata import changed_fields, rebase

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
    base_data   text,
    pending_record_id text,
    dirty       integer not null default 0,
    category    text,
    primary key (entity_kind, entity_key)
);
create table if not exists masterdata_differences (
    entity_kind   text not null,
    entity_key    text not null,
    local_data    text,
    local_deleted integer not null,
    cloud_version integer,
    cloud_data    text,
    cloud_deleted integer not null,
    reason        text not null,
    detected_at   text not null,
    fields        text,
    primary key (entity_kind, entity_key)
);
create table if not exists local_settings (key text primary key, value text not null);
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
    sent_at     text,
    md_category text,
    prev_hash   text,  -- the hash chain (shared/chain.py), set when the row is first about to be sent
    chain_hash  text
);
create index if not exists outbox_unsent on outbox (till_seq) where sent_at is null;
""" + HANDOVER_SCHEMA

# Made after the added columns below exist: the rows still to be chained, found without
# reading the chained ones (``_seal_through`` runs once per upload window).
_INDEXES = "create index if not exists outbox_unchained on outbox (till_seq) where chain_hash is null;"

# Columns added to stores made by earlier releases: (table, column, declaration).
_ADDED_COLUMNS = (
    ("masterdata", "base_data", "text"),
    ("masterdata", "pending_record_id", "text"),
    ("masterdata", "dirty", "integer not null default 0"),
    ("masterdata", "category", "text"),
    ("outbox", "md_category", "text"),
    ("outbox", "prev_hash", "text"),
    ("outbox", "chain_hash", "text"),
    ("masterdata_differences", "fields", "text"),
)

RECORD_ADAPTER: TypeAdapter[RecordBody] = TypeAdapter(RecordBody)




@dataclass(frozen=True)
class Difference:
    """A master-data entity whose till version differs from the cloud's, for the owner to decide.

    ``local_data``/``cloud_data`` are JSON dicts (None when deleted on that side).
    """

    entity_kind: str
    entity_key: str
    local_data: dict[str, Any] | None
    local_deleted: bool
    cloud_version: int | None
    cloud_data: dict[str, Any] | None
    cloud_deleted: bool
    reason: str
    detected_at: dt.datetime
    fields: tuple[str, ...] | None = None  # the fields the till's value differs in (None: all)


@dataclass(frozen=True)
class _Row:
    entity_kind: str
    entity_key: str
    data: dict[str, Any] | None
    deleted: bool
    version: int | None
    base_data: dict[str, Any] | None
    pending_record_id: str | None
    dirty: bool


def _loads(text: str | None) -> Any:
    return json.loads(text) if text is not None else None


def _dumps(value: Any) -> str | None:
    return json.dumps(value, sort_keys=True, separators=(",", ":")) if value is not None else None


@dataclass(frozen=True)
class OutboxRow:
    """One queued record: position, id, kind, the record's JSON and its place in the till's hash chain."""

    till_seq: int
    record_id: UUID
    kind: str
    body: str
    recorded_at: dt.datetime
    prev_hash: str | None = None
    chain_hash: str | None = None

    def upload_fields(self, account_id: UUID, till_id: UUID) -> dict[str, Any]:
        """The fields of this row's upload as till ``till_id`` of ``account_id``, without the chain."""
        return dict(
            record_id=self.record_id, account_id=account_id, till_id=till_id, till_seq=self.till_seq,
            recorded_at=self.recorded_at, record=RECORD_ADAPTER.validate_json(self.body),
        )

    def upload(self, account_id: UUID, till_id: UUID) -> Upload:
        """The upload of this row as till ``till_id`` of ``account_id`` (chain fields as stored).

        Raises ``pydantic.ValidationError`` for a row not chained yet (``TillStore.unsent`` chains)."""
        return Upload(**self.upload_fields(account_id, till_id), prev_hash=self.prev_hash, chain_hash=self.chain_hash)


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


class TillStore(HandoverStore):
    """SQLite store of one till in ``data_dir`` (file ``till.sqlite3``)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / STORE_FILE
        if not self.path.exists():
            raise TillStoreError(f"no till here: {self.path} does not exist (run `tillsync till init` first)")
        self._db = self._connect(self.path)
        self._upgrade()

    def _upgrade(self) -> None:
        """Bring a store made by an earlier release up to this schema."""
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "insert into settings (key, value) values ('installation_id', ?) on conflict (key) do nothing",
            (str(uuid.uuid4()),),
        )
        for table, column, declaration in _ADDED_COLUMNS:
            columns = {r["name"] for r in self._db.execute(f"pragma table_info({table})")}
            if column not in columns:
                self._db.execute(f"alter table {table} add column {column} {declaration}")
        self._db.executescript(_INDEXES)

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
        db.executescript(_INDEXES)
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
                    ("installation_id", str(uuid.uuid4())),
                ],
            )
        db.close()
        return cls(data_dir)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Run several store calls in one transaction (all or nothing, one disk sync)."""
        with _transaction(self._db):
            yield

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
            if new_to_this_till:  # chained as another till (or not yet): chained anew as this one
                self._db.execute("update outbox set prev_hash = null, chain_hash = null where sent_at is null")
            # where this till's chain continues when the archive holds records this store never made
            self._set(
                chain_anchor_seq=str(server_last) if signed_in.last_chain_hash else None,
                chain_anchor_hash=signed_in.last_chain_hash,
            )
            # receipt and Z numbers continue after the archive's (a re-installed till)
            for key, server_value in (
                ("last_receipt_number", signed_in.last_receipt_number),
                ("last_z_nr", signed_in.last_z_nr),
            ):
                if server_value > int(self._get(key) or 0):
                    self._set(**{key: str(server_value)})

    def save_password_reset(self, request_id: UUID, verification_code: str) -> None:
        """Keep the id and verification code of the reset request made on this till."""
        with _transaction(self._db):
            self._set(password_reset_request=str(request_id), password_reset_code=verification_code)

    def password_reset(self) -> tuple[UUID, str] | None:
        """``(request_id, verification_code)`` of the last reset request made on this till."""
        request_id, code = self._get("password_reset_request"), self._get("password_reset_code")
        return (UUID(request_id), code) if request_id and code else None

    def installation_id(self) -> UUID:
        """This local store's own id (made at ``till init``), told to the cloud at sign-in."""
        return UUID(self._get("installation_id"))

    def queue_name(self) -> str:
        """The till's download queue as the cloud named it at sign-in."""
        queue = self._get("queue")
        if not queue:
            raise TillStoreError("this till has not signed in yet")
        return queue

    def save_sign_out(self) -> None:
        """Forget the broker credentials; the account, data and outbox stay."""
        with _transaction(self._db):
            self._set(broker_username=None, broker_password=None, signed_in="0")

    def save_sync_mode(self, sync_enabled: bool, sync_mode: str, custom_json: str | None) -> None:
        with _transaction(self._db):
            self._set(sync_enabled="1" if sync_enabled else "0", sync_mode=sync_mode, custom_flags=custom_json)

    def mode(self) -> tuple[SyncMode, CustomSyncFlags | None]:
        """This till's sync mode and its custom flags (None unless custom)."""
        _, mode, custom = self.sync_settings()
        return stored_mode(mode, custom)

    def sync_settings(self) -> tuple[bool, str, str | None]:
        """``(sync_enabled, sync_mode, custom_flags_json)`` as last stored."""
        return self._get("sync_enabled") != "0", self._get("sync_mode") or "archive", self._get("custom_flags")

    # -- local changes, each with its outbox row -----------------------------

    def _enqueue(
        self, record: MasterDataRecord | Receipt | ZReport, recorded_at: dt.datetime, record_id: UUID | None = None
    ) -> tuple[UUID, int]:
        if recorded_at.tzinfo is None:
            raise TillStoreError("recorded_at must carry a time zone")
        till_seq = int(self._get("last_till_seq") or 0) + 1
        record_id = record_id or uuid.uuid4()
        # a shared master-data change waits until the till has caught up on its category
        md_category = record.category if isinstance(record, MasterDataRecord) and record.shared else None
        self._db.execute(
            "insert into outbox (till_seq, record_id, kind, body, recorded_at, md_category) values (?, ?, ?, ?, ?, ?)",
            (till_seq, str(record_id), record.kind, record.model_dump_json(), recorded_at.isoformat(), md_category),
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
        """Store a master-data change (or tombstone) of ``record``'s entity and queue it.

        Only the entity, key, data and deletion of ``record`` are used; its base and
        ``shared`` are set by ``save_masterdata``. Returns the new ``record_id``.
        """
        with _transaction(self._db):
            return self._save_masterdata(
                record.entity_kind, record.entity_key, None if record.deleted else record.data, recorded_at
            )[0]

    # -- master data ------------------------------------------------------------

    def participating_categories(self) -> tuple[MasterDataCategory, ...]:
        """The master-data categories this till's sync mode receives and so shares."""
        return masterdata_categories(*self.mode())

    def save_masterdata(
        self, entity_kind: str, entity_key: str, data: Any | None, recorded_at: dt.datetime
    ) -> tuple[UUID, MasterDataRecord] | None:
        """Record a change of one entity (``data`` an entity model, or None to delete it).

        If the till takes part in master-data sync for the entity's kind, the change is
        offered to the cloud (``shared``) based on the version the till knows, or on its
        own change still awaiting a verdict; otherwise it is archived only and the entity
        is marked as changed locally. Returns ``(record_id, record)``, or None if ``data``
        equals the till's current value (no new version). Raises ``TillStoreError`` for
        deleting an entity the till does not have.
        """
        with _transaction(self._db):
            row = self._md_row(entity_kind, entity_key)
            if data is not None and row is not None and not row.deleted and row.data == data.model_dump(mode="json"):
                return None
            # the owner's new value of a listed field (or a deletion) settles a listed difference
            listed = self._db.execute(
                "select fields from masterdata_differences where entity_kind = ? and entity_key = ?", (entity_kind, entity_key)
            ).fetchone()
            if listed is not None:
                fields = _loads(listed["fields"])
                new = data.model_dump(mode="json") if data is not None else None
                now = row.data if row is not None and not row.deleted else None
                if fields is None or new is None or now is None or any(new.get(f) != now.get(f) for f in fields):
                    self._db.execute(
                        "delete from masterdata_differences where entity_kind = ? and entity_key = ?", (entity_kind, entity_key)
                    )
            return self._save_masterdata(entity_kind, entity_key, data, recorded_at)

    def _save_masterdata(
        self, entity_kind: str, entity_key: str, data: Any | None, recorded_at: dt.datetime, base: _Row | None = None
    ) -> tuple[UUID, MasterDataRecord]:
        row = base or self._md_row(entity_kind, entity_key)
        if data is None and (row is None or (row.deleted and base is None)):
            raise TillStoreError(f"there is no {entity_kind} {entity_key!r} to delete")
        category = ENTITY_CATEGORY[entity_kind]
        shared = category in self.participating_categories()
        record = MasterDataRecord(
            entity_kind=entity_kind,  # type: ignore[arg-type]
            entity_key=entity_key,
            base_version=row.version if row else None,
            base_record_id=UUID(row.pending_record_id) if shared and row and row.pending_record_id else None,
            shared=shared,
            deleted=data is None,
            data=data,
        )
        record_id, _ = self._enqueue(record, recorded_at)
        payload = data.model_dump(mode="json") if data is not None else None
        self._db.execute(
            """
            insert into masterdata (entity_kind, entity_key, data, deleted, updated_at, pending_record_id, dirty, category)
            values (?, ?, ?, ?, ?, ?, ?, ?)
            on conflict (entity_kind, entity_key) do update set data = excluded.data, deleted = excluded.deleted,
                updated_at = excluded.updated_at, pending_record_id = excluded.pending_record_id,
                dirty = excluded.dirty, category = excluded.category
            """,
            (
                entity_kind,
                entity_key,
                _dumps(payload),
                int(data is None),
                recorded_at.isoformat(),
                str(record_id) if shared else (row.pending_record_id if row else None),
                0 if shared else 1,
                category,
            ),
        )
        return record_id, record

    def _md_row(self, entity_kind: str, entity_key: str) -> _Row | None:
        r = self._db.execute(
            "select * from masterdata where entity_kind = ? and entity_key = ?", (entity_kind, entity_key)
        ).fetchone()
        if r is None:
            return None
        return _Row(
            r["entity_kind"], r["entity_key"], _loads(r["data"]), bool(r["deleted"]), r["version"],
            _loads(r["base_data"]), r["pending_record_id"], bool(r["dirty"]),
        )

    def _write_cloud_state(self, state: EntityState, pending_record_id: str | None = None) -> None:
        """Make the cloud's ``state`` the till's value of the entity (version and base too)."""
        data = _dumps(state.data.model_dump(mode="json")) if state.data is not None else None
        self._db.execute(
            """
            insert into masterdata
                (entity_kind, entity_key, data, deleted, version, updated_at, base_data, pending_record_id, dirty, category)
            values (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)
            on conflict (entity_kind, entity_key) do update set data = excluded.data, deleted = excluded.deleted,
                version = excluded.version, updated_at = excluded.updated_at, base_data = excluded.base_data,
                pending_record_id = excluded.pending_record_id, dirty = 0, category = excluded.category
            """,
            (
                state.entity_kind, state.entity_key, data, int(state.deleted), state.version,
                dt.datetime.now(dt.UTC).isoformat(), data, pending_record_id, state.category,
            ),
        )
        self._refresh_difference(state.entity_kind, state.entity_key, state.version, _loads(data))

    def _note_difference(self, row: _Row, state: EntityState | None, reason: str) -> None:
        """List the till's value of ``row`` against the cloud's ``state`` for the owner."""
        self._list_difference(
            row.entity_kind, row.entity_key, row.data, row.deleted,
            state.version if state else None,
            state.data.model_dump(mode="json") if state and state.data is not None else None,
            state.deleted if state else True, reason,
        )

    def _list_difference(
        self, entity_kind: str, entity_key: str, local_data: dict[str, Any] | None, local_deleted: bool,
        cloud_version: int | None, cloud_data: dict[str, Any] | None, cloud_deleted: bool, reason: str,
    ) -> None:
        # the fields the till's value differs in (None: all, when one side is deleted)
        fields = (
            None if local_deleted or cloud_deleted or local_data is None or cloud_data is None
            else sorted(changed_fields(cloud_data, local_data))
        )
        self._db.execute(
            """
            insert into masterdata_differences (entity_kind, entity_key, local_data, local_deleted, cloud_version,
                cloud_data, cloud_deleted, reason, detected_at, fields)
            values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            on conflict (entity_kind, entity_key) do update set local_data = excluded.local_data,
                local_deleted = excluded.local_deleted, cloud_version = excluded.cloud_version,
                cloud_data = excluded.cloud_data, cloud_deleted = excluded.cloud_deleted, reason = excluded.reason,
                detected_at = excluded.detected_at, fields = excluded.fields
            """,
            (
                entity_kind, entity_key, _dumps(local_data), int(local_deleted), cloud_version, _dumps(cloud_data),
                int(cloud_deleted), reason, dt.datetime.now(dt.UTC).isoformat(), _dumps(fields),
            ),
        )

    def _refresh_difference(self, entity_kind: str, entity_key: str, version: int, data: dict[str, Any] | None) -> None:
        """Keep a listed difference's cloud side current (it shows what the owner decides
        against); drop it once the cloud holds the till's listed value."""
        diff = self._db.execute(
            "select * from masterdata_differences where entity_kind = ? and entity_key = ?", (entity_kind, entity_key)
        ).fetchone()
        if diff is None or (diff["cloud_version"] is not None and diff["cloud_version"] >= version):
            return
        local, fields = _loads(diff["local_data"]), _loads(diff["fields"])
        if bool(diff["local_deleted"]) == (data is None) and (
            data is None or (fields is not None and all(data.get(f) == (local or {}).get(f) for f in fields)) or data == local
        ):
            self._db.execute(
                "delete from masterdata_differences where entity_kind = ? and entity_key = ?", (entity_kind, entity_key)
            )
            return
        self._db.execute(
            """
            update masterdata_differences set cloud_version = ?, cloud_data = ?, cloud_deleted = ?
            where entity_kind = ? and entity_key = ?
            """,
            (version, _dumps(data), int(data is None), entity_kind, entity_key),
        )

    def _is_own_record(self, record_id: UUID) -> bool:
        return self._db.execute("select 1 from outbox where record_id = ?", (str(record_id),)).fetchone() is not None

    def _apply_state(self, state: EntityState, till_id: UUID | None) -> str:
        """Apply one cloud state (feed entry or catch-up entity); returns what happened."""
        row = self._md_row(state.entity_kind, state.entity_key)
        if row is None:
            self._write_cloud_state(state)
            return "applied"
        if row.version is not None and state.version <= row.version:
            return "known"
        cloud = state.data.model_dump(mode="json") if state.data is not None else None
        same = row.deleted == state.deleted and row.data == cloud
        if state.till_id == till_id and self._is_own_record(state.record_id):
            return self._own_change_accepted(row, state)
        if row.pending_record_id is not None and row.version is not None:
            return "pending"  # the verdict on the till's own change decides
        if row.pending_record_id is not None or row.dirty:
            # the till's own value, never based on this cloud version: the cloud's wins
            if not same:
                self._note_difference(
                    row, state,
                    "this till has its own value for an entity the cloud already had; the cloud's value is kept",
                )
            self._write_cloud_state(state, pending_record_id=row.pending_record_id)
            return "kept_cloud" if not same else "adopted"
        self._write_cloud_state(state)
        return "applied"

    def _own_change_accepted(self, row: _Row, state: EntityState) -> str:
        if row.version is not None and state.version <= row.version:
            return "known"
        base = _dumps(state.data.model_dump(mode="json")) if state.data is not None else None
        pending = None if row.pending_record_id == str(state.record_id) else row.pending_record_id
        self._db.execute(
            "update masterdata set version = ?, base_data = ?, pending_record_id = ? where entity_kind = ? and entity_key = ?",
            (state.version, base, pending, state.entity_kind, state.entity_key),
        )
        self._refresh_difference(state.entity_kind, state.entity_key, state.version, _loads(base))
        return "accepted"

    def feed_position(self, category: str) -> int:
        """The last feed_seq of ``category`` this till has applied (0: none)."""
        return int(self._get(f"feed_seq.{category}") or 0)

    def caught_up(self, category: str) -> bool:
        """Whether the till has caught up on ``category`` since it started receiving it."""
        return self._get(f"feed_caught_up.{category}") == "1"

    def held_categories(self) -> tuple[MasterDataCategory, ...]:
        """Categories whose shared changes wait in the outbox until the till has caught up."""
        return tuple(c for c in self.participating_categories() if not self.caught_up(c))

    def start_receiving(self, categories: Iterable[str]) -> None:
        """Mark ``categories`` as newly received: shared changes wait for their catch-up."""
        with _transaction(self._db):
            for c in categories:
                self._set(**{f"feed_caught_up.{c}": "0"})

    def apply_feed_entry(self, entry: FeedEntry, till_id: UUID | None) -> str:
        """Apply one feed entry and advance the category's feed position to it."""
        with _transaction(self._db):
            outcome = self._apply_state(entry.entity, till_id)
            self._set(**{f"feed_seq.{entry.category}": str(entry.entity.feed_seq)})
        return outcome

    def apply_catchup_page(self, page: CatchUpPage, till_id: UUID | None) -> int:
        """Apply a catch-up page; the last one also sets the feed position and submits the
        entities changed here while the till did not take part (see ``_submit_dirty``).
        Returns the number of new records queued."""
        with _transaction(self._db):
            for state in page.entries:
                self._apply_state(state, till_id)
            if not page.done:
                return 0
            position = max(self.feed_position(page.category), page.head_feed_seq)
            self._set(**{f"feed_seq.{page.category}": str(position), f"feed_caught_up.{page.category}": "1"})
            return self._submit_dirty(page.category)

    def _submit_dirty(self, category: str) -> int:
        """Settle the entities changed here while the till did not take part in ``category``.

        One the cloud has (the till knows its version) is listed as a difference and the
        cloud's value is used again: a change made outside master-data sync is never
        pushed to the other tills without the owner's choice (``resolve_difference``).
        One the cloud has never had is offered as a new entity (it overwrites nothing; if
        another till created the key meanwhile, the cloud refuses it and it is listed).
        Returns the number of records queued.
        """
        if category not in self.participating_categories():
            return 0
        rows = self._db.execute(
            "select entity_kind, entity_key from masterdata where dirty = 1 and category = ?", (category,)
        ).fetchall()
        now = dt.datetime.now(dt.UTC)
        queued = 0
        for r in rows:
            row = self._md_row(r["entity_kind"], r["entity_key"])
            assert row is not None
            if row.version is not None:
                cloud_deleted = row.base_data is None
                if row.deleted != cloud_deleted or row.data != row.base_data:
                    self._list_difference(
                        row.entity_kind, row.entity_key, row.data, row.deleted, row.version, row.base_data, cloud_deleted,
                        "changed on this till while its sync mode did not share this kind of master data; "
                        "the account's value is used until you decide",
                    )
                self._db.execute(
                    "update masterdata set data = base_data, deleted = ?, dirty = 0 where entity_kind = ? and entity_key = ?",
                    (int(cloud_deleted), row.entity_kind, row.entity_key),
                )
                continue
            if row.deleted:
                self._db.execute(
                    "update masterdata set dirty = 0 where entity_kind = ? and entity_key = ?", (row.entity_kind, row.entity_key)
                )
                continue  # created and deleted here, never known to the cloud: nothing to share
            self._save_masterdata(row.entity_kind, row.entity_key, ENTITY_ADAPTER.validate_python(row.data), now, base=row)
            queued += 1
        return queued

    def import_masterdata(self, entity: Any, recorded_at: dt.datetime) -> str:
        """Take one entity of a bulk import (e.g. an article list) without overwriting.

        Returns ``created`` (new key: recorded like ``save_masterdata``), ``unchanged``
        (equal to the till's current value) or ``listed``: the till already has this key
        (live, or deleted) with another value, and shares its kind with the account, so
        the imported value is listed as a difference instead of replacing newer data or
        bringing a deleted entity back. A till that does not share the kind records it
        as a local change (listed when it joins master-data sync).
        """
        with _transaction(self._db):
            row = self._md_row(entity.entity, entity.key)
            data = entity.model_dump(mode="json")
            if row is not None and not row.deleted and row.data == data:
                return "unchanged"
            if row is None or ENTITY_CATEGORY[entity.entity] not in self.participating_categories():
                self._save_masterdata(entity.entity, entity.key, entity, recorded_at, base=row)
                return "created" if row is None else "changed"
            self._list_difference(
                row.entity_kind, row.entity_key, data, False, row.version, row.data, row.deleted,
                "the imported value differs from the account's current one (deleted there)" if row.deleted
                else "the imported value differs from the account's current one",
            )
            return "listed"

    def apply_accepted(self, state: EntityState) -> str:
        """The cloud accepted this till's change ``state.record_id`` as ``state.version``."""
        with _transaction(self._db):
            row = self._md_row(state.entity_kind, state.entity_key)
            if row is None:
                self._write_cloud_state(state)
                return "applied"
            return self._own_change_accepted(row, state)

    def apply_not_shared(self, record_id: UUID) -> str:
        """The cloud archived this till's change but did not share it (mode changed meanwhile)."""
        with _transaction(self._db):
            cur = self._db.execute(
                "update masterdata set pending_record_id = null, dirty = 1 where pending_record_id = ?", (str(record_id),)
            )
            return "marked_local" if cur.rowcount else "superseded"

    def apply_conflict(self, conflict: MasterDataConflict) -> str:
        """The cloud refused this till's change; rebase it, or keep the cloud's value and list it.

        Returns ``superseded`` (a later change of the till is pending: its verdict
        decides), ``adopted`` (same content), ``rebased`` (re-queued on top of the
        cloud's version), ``resubmitted`` (the cloud has no such entity) or
        ``kept_cloud`` (listed in ``differences()``).
        """
        with _transaction(self._db):
            row = self._md_row(conflict.entity_kind, conflict.entity_key)
            if row is None or row.pending_record_id != str(conflict.record_id):
                return "superseded"
            current = conflict.current
            now = dt.datetime.now(dt.UTC)
            if current is None:
                data = None if row.deleted else ENTITY_ADAPTER.validate_python(row.data)
                if data is None:
                    self._db.execute(
                        "update masterdata set pending_record_id = null where entity_kind = ? and entity_key = ?",
                        (row.entity_kind, row.entity_key),
                    )
                    return "adopted"
                self._save_masterdata(
                    row.entity_kind, row.entity_key, data, now, base=dataclasses.replace(row, version=None, pending_record_id=None)
                )
                return "resubmitted"
            cloud = current.data.model_dump(mode="json") if current.data is not None else None
            if row.deleted == current.deleted and row.data == cloud:
                self._write_cloud_state(current)  # a difference listed earlier stays for the owner
                return "adopted"
            merged = rebase(row.base_data if row.version is not None else None, None if row.deleted else row.data, cloud)
            if merged is not None and merged != cloud:
                self._write_cloud_state(current)
                rebased = self._md_row(row.entity_kind, row.entity_key)
                self._save_masterdata(row.entity_kind, row.entity_key, ENTITY_ADAPTER.validate_python(merged), now, base=rebased)
                return "rebased"
            if merged is None:
                self._note_difference(row, current, conflict.reason)
            self._write_cloud_state(current)
            return "kept_cloud" if merged is None else "adopted"

    def differences(self) -> list[Difference]:
        """Entities whose till value differs from the cloud's and awaits the owner's choice."""
        rows = self._db.execute("select * from masterdata_differences order by entity_kind, entity_key").fetchall()
        return [
            Difference(
                r["entity_kind"], r["entity_key"], _loads(r["local_data"]), bool(r["local_deleted"]), r["cloud_version"],
                _loads(r["cloud_data"]), bool(r["cloud_deleted"]), r["reason"], dt.datetime.fromisoformat(r["detected_at"]),
                tuple(_loads(r["fields"])) if r["fields"] is not None else None,
            )
            for r in rows
        ]

    def resolve_difference(self, entity_kind: str, entity_key: str, keep: str, at: dt.datetime) -> UUID | None:
        """Settle one listed difference: ``keep="cloud"`` drops the till's value,
        ``keep="till"`` uploads it as a new change on top of the cloud's version.

        Returns the new record's id (``till``) or None (``cloud``). Raises
        ``TillStoreError`` if no such difference is listed or ``keep`` is neither.
        """
        if keep not in ("cloud", "till"):
            raise TillStoreError(f"keep must be 'cloud' or 'till', not {keep!r}")
        with _transaction(self._db):
            diff = self._db.execute(
                "select * from masterdata_differences where entity_kind = ? and entity_key = ?", (entity_kind, entity_key)
            ).fetchone()
            if diff is None:
                raise TillStoreError(f"no difference is listed for {entity_kind} {entity_key!r}")
            self._db.execute(
                "delete from masterdata_differences where entity_kind = ? and entity_key = ?", (entity_kind, entity_key)
            )
            if keep == "cloud":
                return None
            row = self._md_row(entity_kind, entity_key)
            local, fields = _loads(diff["local_data"]), _loads(diff["fields"])
            if diff["local_deleted"]:
                if row is None or row.deleted:
                    return None  # deleted on both sides already
                data = None
            elif fields is None or row is None or row.deleted or row.data is None:
                data = ENTITY_ADAPTER.validate_python(local)  # the till's whole value
            else:
                # only the fields listed, on top of the entity as it is now (newer changes of
                # other fields stay)
                data = ENTITY_ADAPTER.validate_python({**row.data, **{f: local[f] for f in fields if f in local}})
                if data.model_dump(mode="json") == row.data:
                    return None
            record_id, _ = self._save_masterdata(entity_kind, entity_key, data, at, base=row)
            return record_id

    def masterdata(self, entity_kind: str) -> list[dict[str, Any]]:
        """Live entities of one kind as dicts, by key."""
        rows = self._db.execute(
            "select data from masterdata where entity_kind = ? and not deleted order by entity_key", (entity_kind,)
        ).fetchall()
        return [json.loads(r["data"]) for r in rows]

    def entity(self, entity_kind: str, entity_key: str) -> dict[str, Any] | None:
        """One entity as ``{data, deleted, version, pending, dirty}``, or None if unknown."""
        row = self._md_row(entity_kind, entity_key)
        if row is None:
            return None
        return {
            "data": row.data, "deleted": row.deleted, "version": row.version,
            "pending": row.pending_record_id is not None, "dirty": row.dirty,
        }

    def awaiting_verdicts(self, limit: int = 1000) -> list[UUID]:
        """Shared changes uploaded (confirmed by the broker) whose verdict has not arrived."""
        rows = self._db.execute(
            """
            select m.pending_record_id from masterdata m join outbox o on o.record_id = m.pending_record_id
            where o.sent_at is not null order by o.till_seq limit ?
            """,
            (limit,),
        )
        return [UUID(r[0]) for r in rows]

    def pending_masterdata(self) -> int:
        """Entities with a change of this till still waiting for the cloud's verdict."""
        return self._db.execute("select count(*) from masterdata where pending_record_id is not null").fetchone()[0]

    def masterdata_counts(self) -> dict[str, int]:
        """Live entities per kind."""
        rows = self._db.execute("select entity_kind, count(*) as n from masterdata where not deleted group by entity_kind")
        return {r["entity_kind"]: r["n"] for r in rows}

    def masterdata_state_hash(self, categories: Iterable[str] = MASTERDATA_CATEGORIES) -> str:
        """SHA-256 (hex) of the canonical JSON (RFC 8785) of every entity of ``categories``:
        kind, key, version, deletion and data. Two tills with the same hash have the same master data."""
        wanted = set(categories)
        rows = self._db.execute(
            "select entity_kind, entity_key, version, deleted, data from masterdata order by entity_kind, entity_key"
        ).fetchall()
        state = [
            [r["entity_kind"], r["entity_key"], r["version"], bool(r["deleted"]), _loads(r["data"])]
            for r in rows
            if ENTITY_CATEGORY[r["entity_kind"]] in wanted
        ]
        return hashlib.sha256(rfc8785.dumps(state)).hexdigest()

    # -- local-only settings ------------------------------------------------------

    def set_local_setting(self, key: str, value: str) -> None:
        """Store a setting that never leaves the till (printer, display, default stock location)."""
        if not is_local_only_setting(key):
            raise TillStoreError(f"{key!r} is not a local-only setting")
        with _transaction(self._db):
            self._db.execute(
                "insert into local_settings (key, value) values (?, ?) on conflict (key) do update set value = excluded.value",
                (key, value),
            )

    def local_settings(self) -> dict[str, str]:
        return {r["key"]: r["value"] for r in self._db.execute("select key, value from local_settings order by key")}

    # -- outbox ---------------------------------------------------------------

    def upload_kinds(self) -> tuple[str, ...]:
        """The record kinds this till uploads (the upload switches of the custom mode)."""
        return upload_kinds(*self.mode())

    def unsent(self, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` unsent outbox rows to upload now, in ``till_seq`` order.

        Held back (they stay queued): kinds whose upload switch is off (custom mode),
        and shared master-data changes of a category the till has not caught up on yet.
        Rows are chained (``prev_hash``/``chain_hash``) once the till has signed in.
        """
        kinds = self.upload_kinds()
        if not kinds:
            return []
        held = self.held_categories()
        not_held = f"and (md_category is null or md_category not in ({','.join('?' * len(held))}))" if held else ""
        query = f"""
            select till_seq, record_id, kind, body, recorded_at, prev_hash, chain_hash from outbox
            where sent_at is null and kind in ({",".join("?" * len(kinds))}) {not_held}
            order by till_seq limit ?
        """
        rows = self._db.execute(query, (*kinds, *held, limit)).fetchall()
        if rows and any(r["chain_hash"] is None for r in rows) and self._get("till_id"):
            self._seal_through(rows[-1]["till_seq"])
            rows = self._db.execute(query, (*kinds, *held, limit)).fetchall()
        return [
            OutboxRow(
                r["till_seq"], UUID(r["record_id"]), r["kind"], r["body"], dt.datetime.fromisoformat(r["recorded_at"]),
                r["prev_hash"], r["chain_hash"],
            )
            for r in rows
        ]

    def _seal_through(self, till_seq: int, chunk: int = 1000) -> None:
        """Chain every outbox row up to ``till_seq`` not chained yet, in ``till_seq`` order
        (shared/chain.py), held rows included: a row's hash depends on all before it.

        Needs the identity of a sign-in (the upload names account and till); raises
        ``TillStoreError`` before one.
        """
        account_id, till_id = self._get("account_id"), self._get("till_id")
        if not account_id or not till_id:
            raise TillStoreError("this till has not signed in yet: its records cannot be chained")
        while True:
            rows = self._db.execute(
                "select till_seq, record_id, kind, body, recorded_at from outbox "
                "where chain_hash is null and till_seq <= ? order by till_seq limit ?",
                (till_seq, chunk),
            ).fetchall()
            if not rows:
                return
            updates = []
            prev, expected = self._chain_before(rows[0]["till_seq"]), rows[0]["till_seq"]
            for r in rows:
                if r["till_seq"] != expected:  # a row chained meanwhile lies between
                    prev = self._chain_before(r["till_seq"])
                row = OutboxRow(r["till_seq"], UUID(r["record_id"]), r["kind"], r["body"], dt.datetime.fromisoformat(r["recorded_at"]))
                sealed = Upload.sealed(prev, **row.upload_fields(UUID(account_id), UUID(till_id)))
                updates.append((sealed.prev_hash, sealed.chain_hash, r["till_seq"]))
                prev, expected = sealed.chain_hash, r["till_seq"] + 1
            with _transaction(self._db):
                self._db.executemany(
                    "update outbox set prev_hash = ?, chain_hash = ? where till_seq = ? and chain_hash is null", updates
                )

    def _chain_before(self, till_seq: int) -> str | None:
        """The chain hash of the record before ``till_seq``: this till's own row, else the
        archive's last hash told at sign-in, else None (the chain starts)."""
        row = self._db.execute("select chain_hash from outbox where till_seq = ?", (till_seq - 1,)).fetchone()
        if row is not None and row["chain_hash"] is not None:
            return str(row["chain_hash"])
        if row is None and self._get("chain_anchor_seq") == str(till_seq - 1):
            return self._get("chain_anchor_hash")
        return None

    def mark_sent(self, till_seqs: list[int]) -> None:
        """Mark outbox rows as confirmed by the broker."""
        if not till_seqs:
            return
        now = dt.datetime.now(dt.UTC).isoformat()
        with _transaction(self._db):
            self._db.executemany("update outbox set sent_at = ? where till_seq = ?", [(now, s) for s in till_seqs])

    def held_by_switches(self) -> int:
        """Unsent rows of kinds whose upload switch is off (custom mode): kept, not uploaded."""
        kinds = self.upload_kinds()
        if not kinds:
            return self.outbox_counts()[0]
        return self._db.execute(
            f"select count(*) from outbox where sent_at is null and kind not in ({','.join('?' * len(kinds))})",
            kinds,
        ).fetchone()[0]

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


