"""``tillsync archive verify``: re-check every till's hash chain in the archive.

Tamper evidence (GoBD: records kept unchanged; §146 (4) AO: no change without the
original being recognisable). Each archived record is checked against itself and its
predecessor (shared/chain.py):

- its key, taken on arrival in ``archive_record_keys`` (append-only, migration 0007), is
  there with the same record, position, arrival time and content hash: a record deleted
  or moved away (its key remains), or a row without a key (slipped in), is a broken link;
- its columns are the values in its payload (record_id, account, till, till_seq, kind,
  recorded_at, schema version);
- ``content_sha256``, stored on arrival (row and key), is still the SHA-256 of the
  payload's RFC 8785 JSON;
- its ``chain_hash`` (column and payload) is still SHA-256(prev_hash || canonical JSON);
- its ``prev_hash`` is the ``chain_hash`` of the record at ``till_seq - 1``.

The first record that fails is the first broken link of that till's chain. A
``till_seq`` never archived (not uploaded yet, or refused: ``tillsync archive status``
tells) leaves the link across it unchecked; that is reported, not counted as broken.
Uploads the archive writer refused because they break the chain (kept in
``archive_conflicts``) are counted as broken: what the till chained is not what is
archived. Rows archived before the chain existed are counted as unchained; a row
without chain hashes after the till's chain began is broken.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable
from uuid import UUID

import asyncpg
import rfc8785
from pydantic import ValidationError

from shared.chain import chain_hash
from shared.consumer import validation_summary
from shared.models import Upload
from tillsync.archive_status import NumberRange

# every key of the till with its row (none: the row is gone or was moved to another time)
_ROWS = """
select k.record_id as key_record_id, k.till_seq as key_till_seq, k.content_sha256 as key_content_sha256,
       k.archived_at as key_archived_at,
       r.record_id, r.account_id, r.till_id, r.till_seq, r.kind, r.schema_version, r.content_sha256, r.payload,
       r.recorded_at, r.archived_at, r.prev_hash, r.chain_hash,
       (archive_deletable_from(m.month) <= now() and to_regclass('public.' || archive_partition_name(m.month)) is null)
           as purged
from archive_record_keys k
cross join lateral (select date_trunc('month', k.archived_at at time zone archive_time_zone())::date as month) m
left join archive_records r on r.record_id = k.record_id and r.archived_at = k.archived_at
where k.till_id = $1
order by k.till_seq
"""

# rows of the till that no key of theirs accounts for (slipped in, or moved between tills)
_ROWS_WITHOUT_KEY = """
select r.record_id, r.till_seq, r.kind, r.payload from archive_records r
where r.till_id = $1 and not exists (
    select 1 from archive_record_keys k
    where k.record_id = r.record_id and k.archived_at = r.archived_at and k.till_id = r.till_id and k.till_seq = r.till_seq
)
order by r.till_seq
"""

_CHAIN_REFUSALS = """
select count(*) filter (where reason like '%breaks the hash chain%') as chain, count(*) as all_refused
from archive_conflicts where till_id = $1
"""


@dataclass(frozen=True)
class BrokenLink:
    """The first record of a till whose check failed: where and every reason found."""

    till_seq: int
    record_id: UUID
    kind: str
    label: str  # e.g. "receipt BON_NR 12 of 2021-01-05"
    problems: tuple[str, ...]


@dataclass
class ChainReport:
    """The verdict on one till's chain.

    ``records``: records checked; ``broken``: records that failed a check (also those
    gone from the archive and rows without a key); ``first_broken``: the first of them;
    ``missing``: till_seq ranges never archived; ``unchained``: rows
    archived before chaining; ``chain_refusals``: uploads refused for breaking the chain
    (counted as broken); ``other_refusals``: other refused uploads (``archive_conflicts``);
    ``purged``: records whose month was dropped past the retention period (keys remain);
    ``last_hash``: chain_hash of the last row.
    """

    till_id: UUID
    till_name: str
    serial_number: str
    account_name: str
    records: int = 0
    broken: int = 0
    first_broken: BrokenLink | None = None
    missing: list[NumberRange] = field(default_factory=list)
    unchained: int = 0
    chain_refusals: int = 0
    other_refusals: int = 0
    purged: int = 0
    last_hash: str | None = None

    @property
    def intact(self) -> bool:
        return self.broken == 0 and self.chain_refusals == 0

    def note_broken(self, link: BrokenLink) -> None:
        self.broken += 1
        if self.first_broken is None or link.till_seq < self.first_broken.till_seq:
            self.first_broken = link


def record_label(kind: str, payload: dict[str, Any]) -> str:
    """A few words naming an archived record for people: what it is and its number."""
    record = payload.get("record") if isinstance(payload, dict) else None
    if not isinstance(record, dict):
        return kind
    if kind == "receipt" and record.get("receipt_number") is not None:
        return f"receipt BON_NR {record['receipt_number']} of {record.get('business_day')}"
    if kind == "zreport":
        return f"Z-report Z_NR {record.get('z_nr')} of {record.get('business_day')}"
    if kind == "masterdata":
        return f"master data {record.get('entity_kind')} {record.get('entity_key')!r}"
    if kind == "receipt_event":
        event = record.get("event")
        return f"receipt event {event.get('type') if isinstance(event, dict) else '?'} of receipt {record.get('receipt_id')}"
    return kind


def _hex(value: bytes | None) -> str | None:
    return bytes(value).hex() if value is not None else None


def row_problems(row: asyncpg.Record | dict[str, Any], previous_hash: str | None, previous_known: bool) -> list[str]:
    """Every reason the archived ``row`` is not as it arrived or does not link on.

    ``previous_hash``: chain_hash column of the row at ``till_seq - 1`` (``previous_known``
    says whether that row is in the archive). An empty list: the row is intact.
    """
    payload = row["payload"]
    problems: list[str] = []
    if not isinstance(payload, dict):
        return ["its payload is no JSON object"]
    expected_columns = {
        "record_id": str(row["record_id"]),
        "account_id": str(row["account_id"]),
        "till_id": str(row["till_id"]),
        "till_seq": row["till_seq"],
        "schema_version": row["schema_version"],
    }
    for name, value in expected_columns.items():
        if payload.get(name) != value:
            problems.append(f"column {name} is {value!r} but the payload says {payload.get(name)!r}")
    try:
        payload_recorded_at = dt.datetime.fromisoformat(str(payload.get("recorded_at")).replace("Z", "+00:00"))
    except ValueError:
        payload_recorded_at = None
    if payload_recorded_at != row["recorded_at"]:
        problems.append(f"column recorded_at is {row['recorded_at']} but the payload says {payload.get('recorded_at')!r}")
    record = payload.get("record")
    if not isinstance(record, dict) or record.get("kind") != row["kind"]:
        problems.append(f"column kind is {row['kind']!r} but the payload's record is another kind")
    try:
        Upload.model_validate(payload)
    except ValidationError as exc:
        problems.append(f"its payload is no valid upload: {validation_summary(exc)}")
    try:
        canonical = rfc8785.dumps(payload)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        return problems + [f"its payload has no canonical JSON form: {exc}"]
    stored_digest = bytes(row["content_sha256"])
    arrival_digest = bytes(row["key_content_sha256"]) if row.get("key_content_sha256") is not None else stored_digest
    if hashlib.sha256(canonical).digest() != stored_digest or stored_digest != arrival_digest:
        problems.append(
            f"its content changed after archiving (SHA-256 on arrival {arrival_digest.hex()[:16]}…, "
            f"now {hashlib.sha256(canonical).hexdigest()[:16]}…)"
        )
    column_prev, column_chain = _hex(row["prev_hash"]), _hex(row["chain_hash"])
    payload_prev, payload_chain = payload.get("prev_hash"), payload.get("chain_hash")
    if column_chain is None and payload_chain is None:
        return problems  # archived before chaining: nothing more to check
    if payload_chain != column_chain or payload_prev != column_prev:
        problems.append("the chain hashes in its columns differ from those in its payload")
    try:
        recomputed = chain_hash(payload_prev, payload)
    except ValueError as exc:
        return problems + [f"its prev_hash is malformed: {exc}"]
    if recomputed != payload_chain:
        problems.append(f"its chain_hash {str(payload_chain)[:16]}… no longer matches its content ({recomputed[:16]}…)")
    if previous_known and previous_hash is not None and payload_prev != previous_hash:
        problems.append(
            f"its prev_hash {str(payload_prev)[:16]}… is not the chain_hash {previous_hash[:16]}… of the record at "
            f"till_seq {row['till_seq'] - 1}"
        )
    if not previous_known and payload_prev is None and row["till_seq"] > 1:
        problems.append(f"it starts a chain at till_seq {row['till_seq']} (only a till's first record may)")
    return problems


async def verify_till(
    conn: asyncpg.Connection, till: asyncpg.Record | dict[str, Any], on_record: Callable[[int], None] | None = None
) -> ChainReport:
    """Check every archived record of ``till`` (a row with till_id, till_name,
    serial_number, account_name) in ``till_seq`` order, streaming, in one snapshot;
    ``on_record(n)`` is called with the number of records checked since its last call."""
    report = ChainReport(till["till_id"], till["till_name"], till["serial_number"], till["account_name"])
    previous_seq, previous_hash, chain_began = 0, None, None
    pending = 0
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        async for row in conn.cursor(_ROWS, till["till_id"], prefetch=1000):
            seq = row["key_till_seq"]
            if seq != previous_seq + 1:
                report.missing.append(NumberRange(previous_seq + 1, seq - 1))
            report.records += 1
            if row["record_id"] is None and row["purged"]:  # its month was dropped past the retention period
                report.purged += 1
                previous_seq, previous_hash = seq, None
                continue
            if row["record_id"] is None:
                report.note_broken(BrokenLink(seq, row["key_record_id"], "?", "a record", (
                    f"it is gone from archive_records: its key from {row['key_archived_at']:%Y-%m-%d %H:%M:%S %Z} remains "
                    "(deleted, or moved to another archive time)",
                )))
                previous_seq, previous_hash = seq, None
                continue
            known = seq == previous_seq + 1
            problems = row_problems(row, previous_hash, known)
            if row["till_seq"] != seq:
                problems.append(f"column till_seq is {row['till_seq']} but it was archived at till_seq {seq}")
            unchained = row["chain_hash"] is None and isinstance(row["payload"], dict) and row["payload"].get("chain_hash") is None
            if unchained and chain_began is not None:
                problems.append(f"it has no chain hashes, although the till's chain began at till_seq {chain_began} "
                                "(its hashes were removed)")
            elif unchained:
                report.unchained += 1
            elif chain_began is None:
                chain_began = seq
            if problems:
                report.note_broken(
                    BrokenLink(seq, row["record_id"], row["kind"], record_label(row["kind"], row["payload"]), tuple(problems))
                )
            previous_seq, previous_hash = seq, _hex(row["chain_hash"])
            pending += 1
            if on_record is not None and pending >= 500:
                on_record(pending)
                pending = 0
        for row in await conn.fetch(_ROWS_WITHOUT_KEY, till["till_id"]):
            report.note_broken(BrokenLink(row["till_seq"], row["record_id"], row["kind"], record_label(row["kind"], row["payload"]), (
                "this row has no key from archiving (archive_record_keys): it did not come through the archive "
                "writer, or was moved",
            )))
        refusals = await conn.fetchrow(_CHAIN_REFUSALS, till["till_id"])
        report.chain_refusals = refusals["chain"]
        report.other_refusals = refusals["all_refused"] - refusals["chain"]
    if on_record is not None and pending:
        on_record(pending)
    report.last_hash = previous_hash
    return report


async def verify_archive(
    conn: asyncpg.Connection,
    tills: list[asyncpg.Record],
    on_record: Callable[[int], None] | None = None,
) -> list[ChainReport]:
    """Check the chains of ``tills`` (rows with till_id, till_name, serial_number,
    account_name), one after the other; one report per till in the given order."""
    return [await verify_till(conn, till, on_record) for till in tills]
