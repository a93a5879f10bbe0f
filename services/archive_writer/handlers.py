"""Archive writer handler: write a batch of uploads into ``archive_records`` exactly once.

Per upload (GoBD: records kept complete and unchanged):
- the sender must be the till it names: AMQP ``user_id`` (validated by RabbitMQ) is
  ``till-<till_id>`` and the routing key is ``<account_id>.<till_id>.<kind>``;
- a new ``record_id`` at a new ``(till_id, till_seq)`` is archived;
- the same record again (same id, position and content hash) is a no-op;
- a ``record_id`` or ``(till_id, till_seq)`` already archived with other content is
  refused, kept in ``archive_conflicts`` and dead-lettered; the archive is not changed;
- the till's hash chain (shared/chain.py) is checked on arrival: an upload whose
  ``chain_hash`` does not match its content is dead-lettered; one whose ``prev_hash``
  does not link to the archived record before it (or whose hash the archived record
  after it does not link to) is refused like a conflict. Links to a record not yet
  archived are checked when that record arrives; ``tillsync archive verify`` re-checks all.

``archive_records`` is partitioned by month, so its exactly-once keys are kept in
``archive_record_keys`` (record_id primary key, ``(till_id, till_seq)`` unique, content
hash): one statement takes the keys of the new records and inserts exactly those rows
(migration 0007); repeats are judged against the keys.
"""

from __future__ import annotations

import hashlib
from typing import Any
from uuid import UUID

import asyncpg
import rfc8785

from shared.chain import canonical_with_and_without_chain, chain_hash_of_canonical
from shared.consumer import Delivery
from shared.models import Download, RecordRefused, Upload
from shared.topology import DOWNLOAD_EXCHANGE, till_direct_routing_key
from shared.uploads import sender_problem


def content_sha256(upload: Upload) -> bytes:
    """SHA-256 of the upload's canonical JSON (RFC 8785), the identity of its content."""
    return hashlib.sha256(rfc8785.dumps(upload.model_dump(mode="json"))).digest()


_INSERT = """
with batch as (
    select * from unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::bigint[], $5::text[], $6::int[], $7::bytea[],
                         $8::jsonb[], $9::timestamptz[], $10::bytea[], $11::bytea[])
        as b (record_id, account_id, till_id, till_seq, kind, schema_version, content_sha256, payload, recorded_at,
              prev_hash, chain_hash)
), taken as (
    insert into archive_record_keys (record_id, till_id, till_seq, content_sha256)
    select record_id, till_id, till_seq, content_sha256 from batch
    on conflict do nothing
    returning record_id
)
insert into archive_records
    (record_id, account_id, till_id, till_seq, kind, schema_version, content_sha256, payload, recorded_at,
     prev_hash, chain_hash)
select b.* from batch b join taken using (record_id)
returning record_id
"""

_AT_POSITIONS = """
select till_id, till_seq, prev_hash, chain_hash from archive_records
where (till_id, till_seq) in (select * from unnest($1::uuid[], $2::bigint[]))
"""

Item = tuple[Delivery[Upload], bytes, dict[str, Any]]

_EXISTING = """
select record_id, till_id, till_seq, content_sha256 from archive_record_keys
where record_id = any($1::uuid[])
   or (till_id, till_seq) in (select * from unnest($2::uuid[], $3::bigint[]))
"""


async def archive_uploads(deliveries: list[Delivery[Upload]], conn: asyncpg.Connection) -> None:
    """Consume-adapter handler: archive a batch in the caller's transaction.

    Uploads that repeat a ``record_id`` or position of an earlier one in the batch are
    judged in a later round, against what the earlier rounds archived: a repeat of an
    archived upload is a no-op or a conflict, and an upload whose earlier namesake was
    refused (e.g. a record_id reused with other content) is archived on its own merits.
    """
    pending: list[Item] = []
    for d in deliveries:
        problem = sender_problem(d)
        if problem:
            d.refuse(problem, outcome="wrong_sender")
            continue
        u = d.body
        payload = u.model_dump(mode="json")
        try:
            whole, body = canonical_with_and_without_chain(payload)  # each member made canonical once
            digest = hashlib.sha256(whole).digest()  # content_sha256(u)
            expected = chain_hash_of_canonical(u.prev_hash, body)
        except rfc8785.CanonicalizationError as exc:  # a deterministic refusal, not worth a retry
            d.refuse(f"record has no canonical JSON form (RFC 8785): {exc}", outcome="invalid")
            continue
        if expected != u.chain_hash:
            _refuse(
                d,
                f"chain_hash {u.chain_hash} of record {u.record_id} (till_seq {u.till_seq}) does not match its "
                f"content and prev_hash (SHA-256 gives {expected}): changed on the way or made wrongly",
                "invalid",
            )
            continue
        pending.append((d, digest, payload))
    while pending:
        first: list[Item] = []
        later: list[Item] = []
        seen_ids: set[UUID] = set()
        seen_positions: set[tuple[UUID, int]] = set()
        for item in pending:
            u = item[0].body
            position = (u.till_id, u.till_seq)
            if u.record_id in seen_ids or position in seen_positions:
                later.append(item)  # a repeat inside this batch: judged in the next round
            else:
                first.append(item)
                seen_ids.add(u.record_id)
                seen_positions.add(position)
        await _archive_round(first, conn)
        pending = later


async def _archive_round(first: list[Item], conn: asyncpg.Connection) -> None:
    """Archive ``first`` (no two share a record_id or position): the new ones are
    inserted, the others judged as repeats or conflicts."""
    first = await _linked(first, conn)
    inserted: set[UUID] = set()
    if first:
        rows = await conn.fetch(
            _INSERT,
            [d.body.record_id for d, _, _ in first],
            [d.body.account_id for d, _, _ in first],
            [d.body.till_id for d, _, _ in first],
            [d.body.till_seq for d, _, _ in first],
            [d.body.record.kind for d, _, _ in first],
            [d.body.schema_version for d, _, _ in first],
            [digest for _, digest, _ in first],
            [payload for _, _, payload in first],
            [d.body.recorded_at for d, _, _ in first],
            [bytes.fromhex(d.body.prev_hash) if d.body.prev_hash else None for d, _, _ in first],
            [bytes.fromhex(d.body.chain_hash) for d, _, _ in first],
        )
        inserted = {r["record_id"] for r in rows}
    leftovers = [item for item in first if item[0].body.record_id not in inserted]
    if leftovers:
        await _judge_repeats(leftovers, conn)


async def _linked(items: list[Item], conn: asyncpg.Connection) -> list[Item]:
    """The items whose chain links hold against the archive and the items before them in
    this batch; the others are refused, kept in ``archive_conflicts`` and dead-lettered.

    An item whose position is archived already is passed on untouched (a repeat or a
    conflict, judged after the insert).
    """
    if not items:
        return items
    tills = [d.body.till_id for d, _, _ in items for _ in range(3)]
    positions = [d.body.till_seq + step for d, _, _ in items for step in (-1, 0, 1)]
    archived = {
        (r["till_id"], r["till_seq"]): (_hex(r["prev_hash"]), _hex(r["chain_hash"]))
        for r in await conn.fetch(_AT_POSITIONS, tills, positions)
    }
    accepted: dict[tuple[UUID, int], str] = {}
    passed: list[Item] = []
    conflicts = []
    for item in sorted(items, key=lambda i: (str(i[0].body.till_id), i[0].body.till_seq)):
        d, digest, payload = item
        u = d.body
        if (u.till_id, u.till_seq) in archived:
            passed.append(item)
            continue
        problem = _link_problem(u, accepted, archived)
        if problem is None:
            accepted[(u.till_id, u.till_seq)] = u.chain_hash
            passed.append(item)
            continue
        reason = f"record {u.record_id} breaks the hash chain of till {u.till_id}: {problem}; the archive is not changed"
        _refuse(d, reason, "conflict")
        conflicts.append((u.record_id, u.account_id, u.till_id, u.till_seq, digest, payload, reason))
    await _keep_conflicts(conflicts, conn)
    return passed


def _link_problem(
    u: Upload, accepted: dict[tuple[UUID, int], str], archived: dict[tuple[UUID, int], tuple[str | None, str | None]]
) -> str | None:
    """Why ``u`` does not fit between its neighbours in the chain, or None.

    The record before must be the one ``u.prev_hash`` names (unchecked if it is not archived
    yet, or was archived before chaining); the archived record after must name ``u``.
    """
    before = (u.till_id, u.till_seq - 1)
    known_before = before in accepted or before in archived
    previous_hash = accepted[before] if before in accepted else archived[before][1] if before in archived else None
    if known_before and previous_hash is not None and u.prev_hash != previous_hash:
        return (
            f"its prev_hash {u.prev_hash} is not the chain_hash {previous_hash} of the archived record at "
            f"till_seq {u.till_seq - 1}"
        )
    if not known_before and u.prev_hash is None and u.till_seq > 1:
        return f"it has no prev_hash at till_seq {u.till_seq} (only a till's first record starts a chain)"
    after = archived.get((u.till_id, u.till_seq + 1))
    if after is not None and after[0] is not None and after[0] != u.chain_hash:
        return (
            f"the archived record at till_seq {u.till_seq + 1} links to a predecessor with chain_hash {after[0]}, "
            f"not to this record's {u.chain_hash}"
        )
    return None


def _refuse(d: Delivery[Upload], reason: str, outcome: str) -> None:
    """Refuse the upload (dead-lettered with ``reason``) and tell the till that sent it
    (its direct routing key; a till with sync off is not bound and learns nothing)."""
    d.refuse(reason, outcome=outcome)
    u = d.body
    d.emit(
        DOWNLOAD_EXCHANGE,
        till_direct_routing_key(u.account_id, u.till_id),
        Download(
            account_id=u.account_id,
            message=RecordRefused(record_id=u.record_id, till_seq=u.till_seq, kind=u.record.kind, reason=reason),
        ),
    )


def _hex(value: bytes | None) -> str | None:
    return bytes(value).hex() if value is not None else None


async def _keep_conflicts(conflicts: list[tuple[Any, ...]], conn: asyncpg.Connection) -> None:
    """Keep refused uploads in ``archive_conflicts`` (rows as ``(record_id, account_id,
    till_id, till_seq, content_sha256, payload, reason)``) for the operator."""
    if conflicts:
        await conn.executemany(
            """
            insert into archive_conflicts
                (record_id, account_id, till_id, till_seq, content_sha256, payload, reason)
            values ($1, $2, $3, $4, $5, $6, $7)
            on conflict do nothing
            """,
            conflicts,
        )


async def _judge_repeats(items: list[Item], conn: asyncpg.Connection) -> None:
    existing = await conn.fetch(
        _EXISTING,
        [d.body.record_id for d, _, _ in items],
        [d.body.till_id for d, _, _ in items],
        [d.body.till_seq for d, _, _ in items],
    )
    by_id = {r["record_id"]: r for r in existing}
    by_position = {(r["till_id"], r["till_seq"]): r for r in existing}
    conflicts = []
    for d, digest, payload in items:
        u = d.body
        same_id = by_id.get(u.record_id)
        if (
            same_id is not None
            and same_id["till_id"] == u.till_id
            and same_id["till_seq"] == u.till_seq
            and bytes(same_id["content_sha256"]) == digest
        ):
            d.outcome = "duplicate"
            continue
        if same_id is not None and same_id["till_id"] != u.till_id:
            # the other till (maybe of another account) is not named to this one; the
            # operator finds it by the record_id
            reason = f"record_id {u.record_id} is already used by another till; record {u.record_id} is refused"
        elif same_id is not None:
            reason = (
                f"record_id {u.record_id} is already archived with other content or position "
                f"(till {same_id['till_id']} till_seq {same_id['till_seq']}); the archived record is kept"
            )
        else:
            other = by_position.get((u.till_id, u.till_seq))
            other_id = other["record_id"] if other is not None else "?"
            reason = (
                f"till_seq {u.till_seq} of till {u.till_id} is already archived as record {other_id}; "
                f"record {u.record_id} is refused"
            )
        _refuse(d, reason, "conflict")
        conflicts.append((u.record_id, u.account_id, u.till_id, u.till_seq, digest, payload, reason))
    await _keep_conflicts(conflicts, conn)
