"""Archive writer handler: write a batch of uploads into ``archive_records`` exactly once.

Per upload (GoBD: records kept complete and unchanged):
- the sender must be the till it names: AMQP ``user_id`` (validated by RabbitMQ) is
  ``till-<till_id>`` and the routing key is ``<account_id>.<till_id>.<kind>``;
- a new ``record_id`` at a new ``(till_id, till_seq)`` is archived;
- the same record again (same id, position and content hash) is a no-op;
- a ``record_id`` or ``(till_id, till_seq)`` already archived with other content is
  refused, kept in ``archive_conflicts`` and dead-lettered; the archive is not changed.

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

from shared.consumer import Delivery
from shared.models import Upload
from shared.uploads import sender_problem


def content_sha256(upload: Upload) -> bytes:
    """SHA-256 of the upload's canonical JSON (RFC 8785), the identity of its content."""
    return hashlib.sha256(rfc8785.dumps(upload.model_dump(mode="json"))).digest()


_INSERT = """
with batch as (
    select * from unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::bigint[], $5::text[], $6::int[], $7::bytea[],
                         $8::jsonb[], $9::timestamptz[])
        as b (record_id, account_id, till_id, till_seq, kind, schema_version, content_sha256, payload, recorded_at)
), taken as (
    insert into archive_record_keys (record_id, till_id, till_seq, content_sha256)
    select record_id, till_id, till_seq, content_sha256 from batch
    on conflict do nothing
    returning record_id
)
insert into archive_records
    (record_id, account_id, till_id, till_seq, kind, schema_version, content_sha256, payload, recorded_at)
select b.* from batch b join taken using (record_id)
returning record_id
"""

_EXISTING = """
select record_id, till_id, till_seq, content_sha256 from archive_record_keys
where record_id = any($1::uuid[])
   or (till_id, till_seq) in (select * from unnest($2::uuid[], $3::bigint[]))
"""


async def archive_uploads(deliveries: list[Delivery[Upload]], conn: asyncpg.Connection) -> None:
    """Consume-adapter handler: archive a batch in the caller's transaction."""
    first: list[tuple[Delivery[Upload], bytes, dict[str, Any]]] = []
    later: list[tuple[Delivery[Upload], bytes, dict[str, Any]]] = []
    seen_ids: set[UUID] = set()
    seen_positions: set[tuple[UUID, int]] = set()
    for d in deliveries:
        problem = sender_problem(d)
        if problem:
            d.refuse(problem, outcome="wrong_sender")
            continue
        u = d.body
        payload = u.model_dump(mode="json")
        try:
            digest = content_sha256(u)
        except rfc8785.CanonicalizationError as exc:  # a deterministic refusal, not worth a retry
            d.refuse(f"record has no canonical JSON form (RFC 8785): {exc}", outcome="invalid")
            continue
        item = (d, digest, payload)
        position = (u.till_id, u.till_seq)
        if u.record_id in seen_ids or position in seen_positions:
            later.append(item)  # a repeat inside this batch: judged against the first
        else:
            first.append(item)
            seen_ids.add(u.record_id)
            seen_positions.add(position)
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
        )
        inserted = {r["record_id"] for r in rows}
    leftovers = [item for item in first if item[0].body.record_id not in inserted] + later
    if leftovers:
        await _judge_repeats(leftovers, conn)


async def _judge_repeats(items: list[tuple[Delivery[Upload], bytes, dict[str, Any]]], conn: asyncpg.Connection) -> None:
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
        if same_id is not None:
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
        d.refuse(reason, outcome="conflict")
        conflicts.append((u.record_id, u.account_id, u.till_id, u.till_seq, digest, payload, reason))
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
