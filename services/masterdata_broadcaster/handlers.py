"""Master-data broadcaster handlers: judge changes, keep the feed, serve catch-ups.

Rules (DESIGN.md §3, server-authoritative master data with optimistic concurrency):
- a change offered for sharing (``record.shared``) by a till whose sync mode receives
  that kind is accepted only if it is based on the entity's current version (or, for
  a till's chain of not-yet-judged changes, on its own previous change), or creates a
  key the account has never had; a deleted key stays known as a tombstone;
- an accepted change gets the entity's next ``version`` and the account's next
  ``feed_seq`` (gapless per account); it is broadcast to ``<account>.<category>`` and
  the originating till is told the new version;
- any other change is a conflict: not applied, kept in ``masterdata_conflicts`` (the
  record itself is in the archive), and the originating till gets the cloud's current
  state;
- a change from a till whose mode does not take part in that kind is archived only
  and the till is told so.
A redelivered change is recognised by its ``record_id`` and its messages are sent
again (tills apply them idempotently); a ``record_id`` judged before that comes with
other content or from another till is dead-lettered (``replay_problem``), so no till
learns another's verdict.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from uuid import UUID

import asyncpg
import structlog
from pydantic import BaseModel

from shared.consumer import Delivery
from shared.models import (
    ENTITY_CATEGORY,
    CatchUpPage,
    CatchUpRequest,
    CustomSyncFlags,
    Download,
    EntityState,
    FeedEntry,
    MasterDataAccepted,
    MasterDataConflict,
    MasterDataNotShared,
    MasterDataRecord,
    SyncMode,
    Upload,
)
from shared.topology import (
    DOWNLOAD_EXCHANGE,
    catchup_routing_key,
    download_routing_key,
    masterdata_categories,
    stored_mode,
    till_direct_routing_key,
)
from shared.uploads import sender_problem, till_sender_problem

log = structlog.get_logger()

CATCHUP_PAGE_SIZE = 1000  # entities per catch-up page (a page of articles is ~250 kB)


def state_from_row(row: asyncpg.Record | dict[str, Any]) -> EntityState:
    """An ``EntityState`` from a row of ``masterdata_entities`` or ``masterdata_feed``."""
    return EntityState(
        entity_kind=row["entity_kind"],
        entity_key=row["entity_key"],
        version=row["version"],
        deleted=row["deleted"],
        data=row["data"],
        feed_seq=row["feed_seq"],
        record_id=row["record_id"],
        till_id=row["till_id"],
    )


def judge(record: MasterDataRecord, current: EntityState | None) -> str | None:
    """Why ``record`` may not be applied on top of ``current``, or None if it may.

    Accepted: a new key (``base_version`` and ``base_record_id`` both None); a change
    whose ``base_version`` is the current version; a change whose ``base_record_id`` is
    the record that made the current version (the till's own earlier change).
    """
    what = f"{record.entity_kind} {record.entity_key!r}"
    if current is None:
        if record.base_version is None and record.base_record_id is None:
            return None
        if record.base_record_id is not None:
            return f"based on the till's change {record.base_record_id}, which was not applied; {what} does not exist"
        return f"based on version {record.base_version}, but {what} does not exist in the cloud"
    now = f"version {current.version}{' (deleted)' if current.deleted else ''}"
    if record.base_record_id is not None:
        if current.record_id == record.base_record_id:
            return None
        return f"based on the till's change {record.base_record_id}, but the cloud's current {now} of {what} is another change"
    if record.base_version is None:
        return f"{what} already exists in the cloud ({now}); a new entity may not replace it"
    if record.base_version == current.version:
        return None
    return f"based on version {record.base_version} of {what}, but the cloud's current version is {now}"


def _download(account_id: UUID, message: Any) -> Download:
    return Download(account_id=account_id, message=message)


@dataclass
class _Till:
    account_id: UUID
    mode: SyncMode
    custom: CustomSyncFlags | None


async def broadcast_masterdata(deliveries: list[Delivery[Upload]], conn: asyncpg.Connection) -> None:
    """Consume-adapter handler: judge a batch of master-data uploads in upload order."""
    candidates: list[Delivery[Upload]] = []
    seen: dict[UUID, Delivery[Upload]] = {}
    repeats: list[Delivery[Upload]] = []
    for d in deliveries:
        problem = sender_problem(d)
        record = d.body.record
        if problem:
            d.refuse(problem, outcome="wrong_sender")
        elif not isinstance(record, MasterDataRecord):
            d.refuse(f"a {record.kind} record is not master data", outcome="invalid")
        elif not record.shared:
            d.outcome = "archived_only"
        elif d.body.record_id in seen:
            repeats.append(d)  # the same change twice in one batch: judged once, answered twice
        else:
            seen[d.body.record_id] = d
            candidates.append(d)
    if candidates:
        await _judge(candidates, conn)
    for d in repeats:
        first = seen[d.body.record_id]
        if (d.body.account_id, d.body.till_id) != (first.body.account_id, first.body.till_id):
            d.refuse(f"record_id {d.body.record_id} is already used by another till; the change is not applied",
                     outcome="record_id_reused")
            continue
        if d.body.record != first.body.record:
            d.refuse(f"record_id {d.body.record_id} came twice with other content; a record_id is never reused; "
                     "the change is not applied", outcome="record_id_reused")
            continue
        d.outgoing = list(first.outgoing)
        d.outcome = f"repeat_{first.outcome}"
        if first.refused:
            d.refuse(first.refused, outcome=d.outcome)


async def _judge(candidates: list[Delivery[Upload]], conn: asyncpg.Connection) -> None:
    tills = {
        r["till_id"]: _Till(r["account_id"], *stored_mode(r["sync_mode"], r["custom_flags"]))
        for r in await conn.fetch(
            "select till_id, account_id, sync_mode, custom_flags from tills where till_id = any($1::uuid[])",
            list({d.body.till_id for d in candidates}),
        )
    }
    fresh = await _repeats(candidates, conn)
    by_account: dict[UUID, list[Delivery[Upload]]] = defaultdict(list)
    for d in fresh:
        u = d.body
        record = u.record
        assert isinstance(record, MasterDataRecord)
        till = tills.get(u.till_id)
        if till is None or till.account_id != u.account_id:
            d.refuse(f"till {u.till_id} is not a till of account {u.account_id}", outcome="unknown_till")
            continue
        if record.category not in masterdata_categories(till.mode, till.custom):
            reason = (
                f"the till's sync mode ({till.mode.value}) does not take part in {record.category}; "
                "the change is archived but not shared"
            )
            d.emit(DOWNLOAD_EXCHANGE, till_direct_routing_key(u.account_id, u.till_id),
                   _download(u.account_id, MasterDataNotShared(record_id=u.record_id, reason=reason)))
            d.outcome = "not_shared"
            continue
        by_account[u.account_id].append(d)
    for account_id, group in by_account.items():
        await _judge_account(account_id, group, conn)


async def _earlier_verdicts(
    conn: asyncpg.Connection, record_ids: list[UUID], till_id: UUID | None = None
) -> tuple[dict[UUID, asyncpg.Record], dict[UUID, MasterDataConflict], dict[UUID, asyncpg.Record]]:
    """The changes among ``record_ids`` judged before (of ``till_id`` only, if given):
    the feed rows of the accepted ones, the conflict verdicts (with the entity's
    current state) of the refused ones, and the ``masterdata_conflicts`` rows of those."""
    accepted = {
        r["record_id"]: r
        for r in await conn.fetch(
            "select * from masterdata_feed where record_id = any($1::uuid[]) and ($2::uuid is null or till_id = $2)",
            record_ids, till_id,
        )
    }
    rows = await conn.fetch(
        """
        select c.record_id as conflict_record_id, c.reason, c.base_version, c.entity_kind as conflict_kind,
               c.entity_key as conflict_key, c.account_id as conflict_account_id, c.till_id as conflict_till_id,
               e.entity_kind is not null as exists, e.*
        from masterdata_conflicts c
        left join masterdata_entities e
          on e.account_id = c.account_id and e.entity_kind = c.entity_kind and e.entity_key = c.entity_key
        where c.record_id = any($1::uuid[]) and ($2::uuid is null or c.till_id = $2)
        """,
        record_ids, till_id,
    )
    conflicts = {
        r["conflict_record_id"]: MasterDataConflict(
            record_id=r["conflict_record_id"], entity_kind=r["conflict_kind"], entity_key=r["conflict_key"],
            base_version=r["base_version"], reason=r["reason"], current=state_from_row(r) if r["exists"] else None,
        )
        for r in rows
    }
    return accepted, conflicts, {r["conflict_record_id"]: r for r in rows}


def replay_problem(u: Upload, judged: asyncpg.Record | dict[str, Any], conflict: bool) -> str | None:
    """Why an upload whose ``record_id`` was judged before is not that change again, or None.

    ``judged``: its ``masterdata_feed`` row (accepted) or, with ``conflict``, its
    ``masterdata_conflicts`` row (keys prefixed ``conflict_``). The same till and account
    must send the same entity; an accepted change also the same deletion flag and data
    (a conflict row keeps only the entity and the base version)."""
    record = u.record
    assert isinstance(record, MasterDataRecord)
    prefix = "conflict_" if conflict else ""
    account_id, till_id = judged[f"{prefix}account_id"], judged[f"{prefix}till_id"]
    if (account_id, till_id) != (u.account_id, u.till_id):
        return f"record_id {u.record_id} is already used by another till; the change is not applied"
    kind, key = (judged["conflict_kind"], judged["conflict_key"]) if conflict else (judged["entity_kind"], judged["entity_key"])
    if (kind, key) != (record.entity_kind, record.entity_key):
        return (
            f"record_id {u.record_id} was judged before as a change of {kind} {key!r}, not of "
            f"{record.entity_kind} {record.entity_key!r}: a record_id is never reused; the change is not applied"
        )
    if conflict:
        differs = judged["base_version"] != record.base_version
    else:
        data = record.data.model_dump(mode="json") if record.data is not None else None
        differs = judged["deleted"] != record.deleted or judged["data"] != data
    if differs:
        return (
            f"record_id {u.record_id} was judged before with other content; a record_id is never reused; "
            "the change is not applied"
        )
    return None


async def _repeats(deliveries: list[Delivery[Upload]], conn: asyncpg.Connection) -> list[Delivery[Upload]]:
    """Send the messages of changes judged before again; return the deliveries not judged yet."""
    accepted, conflicts, conflict_rows = await _earlier_verdicts(conn, [d.body.record_id for d in deliveries])
    fresh = []
    for d in deliveries:
        u = d.body
        direct = till_direct_routing_key(u.account_id, u.till_id)
        judged = accepted.get(u.record_id)
        problem = replay_problem(u, judged, False) if judged is not None else None
        if problem is None and u.record_id in conflict_rows:
            problem = replay_problem(u, conflict_rows[u.record_id], True)
        if problem is not None:
            d.refuse(problem, outcome="record_id_reused")
        elif u.record_id in accepted:
            row = accepted[u.record_id]
            state = state_from_row(row)
            d.emit(DOWNLOAD_EXCHANGE, download_routing_key(u.account_id, row["category"]),
                   _download(u.account_id, FeedEntry(category=row["category"], prev_feed_seq=row["prev_feed_seq"], entity=state)))
            d.emit(DOWNLOAD_EXCHANGE, direct, _download(u.account_id, MasterDataAccepted(record_id=u.record_id, entity=state)))
            d.outcome = "repeat_accepted"
        elif u.record_id in conflicts:
            d.emit(DOWNLOAD_EXCHANGE, direct, _download(u.account_id, conflicts[u.record_id]))
            d.outcome = "repeat_conflict"
        else:
            fresh.append(d)
    return fresh


_ENTITIES = """
select * from masterdata_entities
where account_id = $1 and (entity_kind, entity_key) in (select * from unnest($2::text[], $3::text[]))
for update
"""

_UPSERT_ENTITIES = """
insert into masterdata_entities
    (account_id, entity_kind, entity_key, category, version, deleted, data, feed_seq, record_id, till_id)
select $1, * from unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::boolean[], $7::jsonb[],
                         $8::bigint[], $9::uuid[], $10::uuid[])
on conflict (account_id, entity_kind, entity_key) do update set
    category = excluded.category, version = excluded.version, deleted = excluded.deleted, data = excluded.data,
    feed_seq = excluded.feed_seq, record_id = excluded.record_id, till_id = excluded.till_id, changed_at = now()
"""

_INSERT_FEED = """
insert into masterdata_feed
    (account_id, feed_seq, prev_feed_seq, category, entity_kind, entity_key, version, deleted, data, record_id, till_id)
select $1, * from unnest($2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::boolean[],
                         $9::jsonb[], $10::uuid[], $11::uuid[])
"""


async def _judge_account(account_id: UUID, deliveries: list[Delivery[Upload]], conn: asyncpg.Connection) -> None:
    # The account's feed row is locked first: one judge per account at a time, so
    # feed_seq stays gapless and the category heads consistent.
    last_feed_seq = await conn.fetchval(
        """
        insert into account_feeds as f (account_id, last_feed_seq) values ($1, 0)
        on conflict (account_id) do update set last_feed_seq = f.last_feed_seq
        returning last_feed_seq
        """,
        account_id,
    )
    heads = {r["category"]: r["last_feed_seq"] for r in await conn.fetch(
        "select category, last_feed_seq from feed_category_heads where account_id = $1", account_id)}
    records = [d.body.record for d in deliveries]
    current: dict[tuple[str, str], EntityState] = {
        (r["entity_kind"], r["entity_key"]): state_from_row(r)
        for r in await conn.fetch(
            _ENTITIES, account_id, [r.entity_kind for r in records], [r.entity_key for r in records]  # type: ignore[union-attr]
        )
    }
    feed: list[tuple[EntityState, int, str]] = []
    conflicts: list[tuple[Any, ...]] = []
    for d in deliveries:
        u = d.body
        record = u.record
        assert isinstance(record, MasterDataRecord)
        key = (record.entity_kind, record.entity_key)
        now = current.get(key)
        reason = judge(record, now)
        direct = till_direct_routing_key(account_id, u.till_id)
        if reason is not None:
            conflicts.append((u.record_id, account_id, u.till_id, record.entity_kind, record.entity_key,
                              record.base_version, record.base_record_id, now.version if now else None, reason))
            d.emit(DOWNLOAD_EXCHANGE, direct, _download(account_id, MasterDataConflict(
                record_id=u.record_id, entity_kind=record.entity_kind, entity_key=record.entity_key,
                base_version=record.base_version, reason=reason, current=now)))
            d.outcome = "conflict"
            d.log["reason"] = reason
            continue
        last_feed_seq += 1
        category = record.category
        prev = heads.get(category, 0)
        heads[category] = last_feed_seq
        state = EntityState(
            entity_kind=record.entity_kind, entity_key=record.entity_key, version=(now.version + 1) if now else 1,
            deleted=record.deleted, data=record.data, feed_seq=last_feed_seq, record_id=u.record_id, till_id=u.till_id,
        )
        current[key] = state
        feed.append((state, prev, category))
        d.emit(DOWNLOAD_EXCHANGE, download_routing_key(account_id, category),
               _download(account_id, FeedEntry(category=category, prev_feed_seq=prev, entity=state)))
        d.emit(DOWNLOAD_EXCHANGE, direct, _download(account_id, MasterDataAccepted(record_id=u.record_id, entity=state)))
        d.outcome = "accepted"
        d.log["version"] = state.version
    if feed:
        await conn.execute("update account_feeds set last_feed_seq = $2 where account_id = $1", account_id, last_feed_seq)
        await conn.execute(
            """
            insert into feed_category_heads (account_id, category, last_feed_seq)
            select $1, * from unnest($2::text[], $3::bigint[])
            on conflict (account_id, category) do update set last_feed_seq = excluded.last_feed_seq
            """,
            account_id, list(heads), list(heads.values()),
        )
        latest = {(s.entity_kind, s.entity_key): s for s, _, _ in feed}.values()
        datas = [s.data.model_dump(mode="json") if s.data else None for s in latest]
        await conn.execute(
            _UPSERT_ENTITIES, account_id, [s.entity_kind for s in latest], [s.entity_key for s in latest],
            [ENTITY_CATEGORY[s.entity_kind] for s in latest], [s.version for s in latest], [s.deleted for s in latest],
            datas, [s.feed_seq for s in latest], [s.record_id for s in latest], [s.till_id for s in latest],
        )
        await conn.execute(
            _INSERT_FEED, account_id, [s.feed_seq for s, _, _ in feed], [p for _, p, _ in feed], [c for _, _, c in feed],
            [s.entity_kind for s, _, _ in feed], [s.entity_key for s, _, _ in feed], [s.version for s, _, _ in feed],
            [s.deleted for s, _, _ in feed], [s.data.model_dump(mode="json") if s.data else None for s, _, _ in feed],
            [s.record_id for s, _, _ in feed], [s.till_id for s, _, _ in feed],
        )
    if conflicts:
        await conn.executemany(
            """
            insert into masterdata_conflicts
                (record_id, account_id, till_id, entity_kind, entity_key, base_version, base_record_id, current_version, reason)
            values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            on conflict (record_id) do nothing
            """,
            conflicts,
        )


# ---------------------------------------------------------------------------
# Catch-up


def catchup_problem(delivery: Delivery[CatchUpRequest]) -> str | None:
    """Why a catch-up request cannot be from the till it names, or None."""
    request = delivery.body
    return till_sender_problem(delivery, request.till_id, catchup_routing_key(request.account_id, request.till_id))


def catchup_log_context(request: CatchUpRequest) -> dict[str, Any]:
    return {
        "account_id": str(request.account_id),
        "till_id": str(request.till_id),
        "request_id": str(request.request_id),
        "since": dict(request.since),
    }


Publish = Callable[[str, str, BaseModel], Awaitable[None]]
PAGES_IN_FLIGHT = 4  # catch-up pages published and not yet confirmed, at most


async def _resend_verdicts(request: CatchUpRequest, conn: asyncpg.Connection, direct: str, publish: Publish) -> None:
    """Send again the verdicts on the till's changes it names (only its own records),
    before the pages: a till applies a verdict on its own change before later states."""
    if not request.verdicts_for:
        return
    accepted, conflicts, _ = await _earlier_verdicts(conn, list(request.verdicts_for), request.till_id)
    for record_id, row in accepted.items():
        await publish(DOWNLOAD_EXCHANGE, direct, _download(request.account_id, MasterDataAccepted(
            record_id=record_id, entity=state_from_row(row))))
    for verdict in conflicts.values():
        await publish(DOWNLOAD_EXCHANGE, direct, _download(request.account_id, verdict))


async def serve_catchups(
    deliveries: list[Delivery[CatchUpRequest]],
    conn: asyncpg.Connection,
    publish: Publish,
    page_size: int = CATCHUP_PAGE_SIZE,
) -> None:
    """Consume-adapter handler: answer catch-up requests with compacted pages.

    All pages of one request are read in one REPEATABLE READ snapshot, so the last
    page's ``head_feed_seq`` is exactly where the till's state now stands; entries
    accepted later reach the till as feed entries after it. Pages are published while
    the next is read (``publish`` with confirms, at most ``PAGES_IN_FLIGHT`` unconfirmed),
    so the till applies page 1 while page 2 is built and no request is held in memory
    whole. The handler only reads; a redelivered request sends its pages again, which
    tills apply idempotently.
    """
    await conn.execute("set transaction isolation level repeatable read, read only")
    for d in deliveries:
        request = d.body
        problem = catchup_problem(d)
        if problem:
            d.refuse(problem, outcome="wrong_sender")
            continue
        known = await conn.fetchval(
            "select true from tills where till_id = $1 and account_id = $2", request.till_id, request.account_id
        )
        if not known:
            d.refuse(f"till {request.till_id} is not a till of account {request.account_id}", outcome="unknown_till")
            continue
        direct = till_direct_routing_key(request.account_id, request.till_id)
        await _resend_verdicts(request, conn, direct, publish)
        in_flight: deque[asyncio.Task[None]] = deque()
        sent = 0
        try:
            for category, since in request.since.items():
                total = await conn.fetchval(
                    "select count(*) from masterdata_entities where account_id = $1 and category = $2 and feed_seq > $3",
                    request.account_id, category, since,
                )
                head = await conn.fetchval(
                    "select last_feed_seq from feed_category_heads where account_id = $1 and category = $2",
                    request.account_id, category,
                ) or 0
                cursor, page = since, 1
                while True:
                    rows = await conn.fetch(
                        """
                        select * from masterdata_entities
                        where account_id = $1 and category = $2 and feed_seq > $3
                        order by feed_seq limit $4
                        """,
                        request.account_id, category, cursor, page_size,
                    )
                    done = len(rows) < page_size
                    message = _download(request.account_id, CatchUpPage(
                        request_id=request.request_id, category=category, page=page, total_entries=total,
                        entries=tuple(state_from_row(r) for r in rows), done=done, head_feed_seq=max(head, since)))
                    if len(in_flight) >= PAGES_IN_FLIGHT:
                        await in_flight.popleft()
                    in_flight.append(asyncio.ensure_future(publish(DOWNLOAD_EXCHANGE, direct, message)))
                    sent += len(rows)
                    if done:
                        break
                    cursor = rows[-1]["feed_seq"]
                    page += 1
            await asyncio.gather(*in_flight)
        finally:
            for task in in_flight:
                task.cancel()
        d.outcome = "served"
        d.log["entries"] = sent
