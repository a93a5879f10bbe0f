"""The till's download side: its queue ``till.<till_id>`` and the master-data feed.

On every connect the till asks the cloud for the master-data changes of each category
it receives since the feed position it has applied (a new till from 0: a compacted
snapshot in pages). Feed entries are applied in feed order per category: an entry
whose ``prev_feed_seq`` is the till's position comes next; one from further ahead
waits in a small buffer, and if the missing entries do not arrive within
``gap_wait_seconds`` the till asks for a catch-up. Verdicts on the till's own changes
(accepted, conflict, not shared) are applied as they come. Each message is acked after
the store committed it; a message the till cannot read is logged and acked (the feed
is the full copy, so nothing the cloud accepted is lost by it).

Shared receipts (receipt handover): on every connect a till that hands over receipts
asks the router for the state of the account's open receipts and the verdicts on its
events sent meanwhile; accepted events are applied in position order per receipt, and
an event beyond the next position makes the till ask for that receipt's snapshot.
Refusals of its own events become notices; other tills' receipts and Z-reports are kept.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import aio_pika
import structlog
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from pydantic import ValidationError

from shared.models import (
    DOWNLOAD_ADAPTER,
    MAX_RECEIPTS_ASKED,
    CatchUpPage,
    CatchUpRequest,
    FeedEntry,
    MasterDataAccepted,
    MasterDataConflict,
    MasterDataNotShared,
    ReceiptCatchUpDone,
    ReceiptCatchUpRequest,
    ReceiptEventAccepted,
    ReceiptEventRefused,
    RecordRefused,
    ReceiptSnapshot,
    TillRecordShared,
)
from shared.topology import UPLOAD_EXCHANGE, catchup_routing_key, receipt_catchup_routing_key
from till_agent.store import Identity, TillStore

log = structlog.get_logger()

BATCH = 200  # queued messages applied in one store transaction at most


@dataclass
class CatchUpProgress:
    """Progress of one category's catch-up: entries received of ``total``."""

    request_id: uuid.UUID
    received: int = 0
    total: int | None = None
    asked_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class FeedStatus:
    """What the download side is doing: categories catching up (received, total) and the
    verdicts counted since start (``accepted``, ``conflict``, ``rebased`` ...)."""

    catching_up: dict[str, tuple[int, int | None]]
    outcomes: dict[str, int]
    receipts_catching_up: bool = False


class FeedClient:
    """Consumes one till's queue on a connection the relay opened (see module docstring).

    ``on_new_records`` is called when applying a message queued new records (a rebased
    change, entities shared after a catch-up) so the relay uploads them.
    """

    def __init__(
        self,
        store: TillStore,
        on_new_records: Callable[[], None] = lambda: None,
        gap_wait_seconds: float = 1.0,
        catchup_timeout_seconds: float = 60.0,
        buffer_limit: int = 10_000,
    ) -> None:
        self._store = store
        self._on_new_records = on_new_records
        self._gap_wait = gap_wait_seconds
        self._catchup_timeout = catchup_timeout_seconds
        self._buffer_limit = buffer_limit
        self._catching_up: dict[str, CatchUpProgress] = {}
        self._buffer: dict[str, dict[int, FeedEntry]] = {}
        self._gap_since: dict[str, float] = {}
        self._outcomes: dict[str, int] = {}
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._identity: Identity | None = None
        self._refresh = asyncio.Event()
        self._receipts_request: uuid.UUID | None = None
        self._receipts_asked_at = 0.0
        self._receipt_gaps: set[uuid.UUID] = set()

    def status(self) -> FeedStatus:
        return FeedStatus(
            {c: (p.received, p.total) for c, p in self._catching_up.items()},
            dict(self._outcomes),
            self._receipts_request is not None,
        )

    def refresh(self) -> None:
        """Ask again for the categories not caught up (after a sync-mode change)."""
        self._refresh.set()

    async def run(self, connection: AbstractConnection, identity: Identity, queue_name: str) -> None:
        """Consume the till's queue until cancelled or the connection fails (raises then).

        Messages that are waiting are applied together, up to ``BATCH`` in one store
        transaction, and acked together after it committed.
        """
        self._identity = identity
        self._reset()
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=2 * BATCH)
        self._exchange = await channel.get_exchange(UPLOAD_EXCHANGE, ensure=False)
        queue = await channel.get_queue(queue_name, ensure=False)
        inbox: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        channel.close_callbacks.add(lambda *_: inbox.put_nowait(None))  # wake up and fail
        await self._ask(self._store.participating_categories())
        await self._ask_receipts()
        watcher = asyncio.create_task(self._watch(), name="feed-watch")
        try:
            await queue.consume(inbox.put)  # inside: a failure here must stop the watcher too
            while True:
                getting = asyncio.ensure_future(inbox.get())
                await asyncio.wait({getting, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if watcher.done():
                    getting.cancel()
                    watcher.result()  # raises what stopped it
                first = await getting
                batch = [first]
                while len(batch) < BATCH and not inbox.empty():
                    batch.append(inbox.get_nowait())
                if any(m is None for m in batch):
                    raise ConnectionError("the download channel was closed")
                await self._handle_batch(batch)  # type: ignore[arg-type]
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)  # never outlives this connection

    def _reset(self) -> None:
        self._catching_up.clear()
        self._buffer.clear()
        self._gap_since.clear()
        self._receipts_request = None
        self._receipt_gaps.clear()

    async def _handle_batch(self, batch: list[AbstractIncomingMessage]) -> None:
        new_records = False
        try:
            with self._store.batch():
                for message in batch:
                    new_records = self._handle(message) or new_records
        except Exception:
            # nothing of the batch was stored; the feed is the full copy, so start over from
            # the stored positions (the catch-up also asks for the verdicts again)
            log.exception("download_batch_failed", size=len(batch))
            self._reset()
            await self._ask(self._store.participating_categories())
            await self._ask_receipts()
        await batch[-1].ack(multiple=True)
        if new_records:
            self._on_new_records()

    async def _watch(self) -> None:
        """Every 0.25 s: ask for categories with a lasting gap, a stalled or a new catch-up."""
        while True:
            try:
                await asyncio.wait_for(self._refresh.wait(), 0.25)
            except asyncio.TimeoutError:
                pass
            refresh = self._refresh.is_set()
            self._refresh.clear()
            now = time.monotonic()
            participating = set(self._store.participating_categories())
            for c in list(self._catching_up):
                if c not in participating:
                    del self._catching_up[c]
            wanted = []
            for c in participating:
                progress = self._catching_up.get(c)
                if progress is not None:
                    if now - progress.asked_at > self._catchup_timeout:
                        wanted.append(c)  # no page for a long time: ask again
                elif refresh and not self._store.caught_up(c):
                    wanted.append(c)
                elif self._buffer.get(c) and now - self._gap_since.get(c, now) >= self._gap_wait:
                    wanted.append(c)
            if wanted:
                await self._ask(wanted)
            receipts_stalled = self._receipts_request is not None and now - self._receipts_asked_at > self._catchup_timeout
            idle = self._receipts_request is None
            if (self._receipt_gaps and idle) or (refresh and idle) or receipts_stalled:
                await self._ask_receipts()

    async def _request(self, request: CatchUpRequest | ReceiptCatchUpRequest, routing_key: str) -> None:
        """Publish a catch-up request as this till (mandatory: an unroutable one is an error)."""
        assert self._exchange is not None and self._identity is not None
        await self._exchange.publish(
            aio_pika.Message(
                request.model_dump_json().encode(),
                content_type="application/json",
                message_id=str(request.request_id),
                user_id=self._identity.broker_username,
                type=routing_key.rsplit(".", 1)[-1],
            ),
            routing_key=routing_key,
            mandatory=True,
        )

    async def _ask_receipts(self) -> None:
        """Ask the router for the shared receipts' state (if this till hands them over)."""
        if self._exchange is None or self._identity is None:
            return
        if not (
            self._store.hands_over_receipts()
            or self._store.receives_shared_records()
            or self._store.receipts_awaiting_verdicts(1)[1]  # out of the receipt mode, a payment's verdict may be due
        ):
            self._receipt_gaps.clear()
            return
        identity = self._identity
        assert identity.account_id and identity.till_id
        receipt_ids, verdicts_for = self._store.receipts_awaiting_verdicts()
        request = ReceiptCatchUpRequest(
            request_id=uuid.uuid4(),
            account_id=identity.account_id,
            till_id=identity.till_id,
            receipt_ids=tuple(dict.fromkeys([*receipt_ids, *self._receipt_gaps]))[:MAX_RECEIPTS_ASKED],
            verdicts_for=tuple(verdicts_for),
            shared_since=self._store.shared_records_since(),
        )
        self._receipts_request = request.request_id
        self._receipts_asked_at = time.monotonic()
        self._receipt_gaps.clear()
        await self._request(request, receipt_catchup_routing_key(identity.account_id, identity.till_id))
        log.info("receipt_catchup_requested", receipts=len(request.receipt_ids), verdicts_for=len(request.verdicts_for))

    async def _ask(self, categories: tuple[str, ...] | list[str]) -> None:
        if not categories or self._exchange is None or self._identity is None:
            return
        identity = self._identity
        assert identity.account_id and identity.till_id
        request = CatchUpRequest(
            request_id=uuid.uuid4(),
            account_id=identity.account_id,
            till_id=identity.till_id,
            since={c: self._store.feed_position(c) for c in categories},  # type: ignore[misc]
            verdicts_for=tuple(self._store.awaiting_verdicts()),
        )
        for c in categories:
            self._catching_up[c] = CatchUpProgress(request.request_id)
            self._gap_since.pop(c, None)
        await self._request(request, catchup_routing_key(identity.account_id, identity.till_id))
        log.info("catchup_requested", since=dict(request.since), request_id=str(request.request_id))

    def _count(self, outcome: str) -> None:
        self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1

    def _handle(self, message: AbstractIncomingMessage) -> bool:
        """Apply one message (inside the batch's transaction); True if records were queued."""
        try:
            download = DOWNLOAD_ADAPTER.validate_json(message.body)
        except ValidationError as exc:
            log.warning("download_unreadable", message_id=message.message_id, error=str(exc)[:500])
            return False
        till_id = self._identity.till_id if self._identity else None
        body = download.message
        if isinstance(body, FeedEntry):
            self._on_entry(body, till_id)
        elif isinstance(body, CatchUpPage):
            return self._on_page(body, till_id) > 0
        elif isinstance(body, MasterDataAccepted):
            self._count(self._store.apply_accepted(body.entity))
        elif isinstance(body, MasterDataConflict):
            outcome = self._store.apply_conflict(body)
            self._count(outcome)
            log.info("masterdata_conflict", entity_kind=body.entity_kind, entity_key=body.entity_key, outcome=outcome, reason=body.reason)
            return outcome in ("rebased", "resubmitted")
        elif isinstance(body, MasterDataNotShared):
            self._count(self._store.apply_not_shared(body.record_id))
        elif isinstance(body, ReceiptEventAccepted):
            outcome = self._store.apply_handover_event(body.event, till_id)
            if outcome == "gap":
                self._receipt_gaps.add(body.event.receipt_id)
            self._count(f"receipt_{outcome}")
            return outcome == "closed_here"
        elif isinstance(body, ReceiptEventRefused):
            outcome = self._store.apply_handover_refused(body, till_id)
            self._count(f"receipt_{outcome}")
            log.info("receipt_event_refused", receipt_id=str(body.receipt_id), code=body.code, reason=body.reason)
            return outcome in ("rebooked", "recorded_as_sale")
        elif isinstance(body, ReceiptSnapshot):
            return self._store.apply_handover_snapshot(body, till_id) > 0
        elif isinstance(body, ReceiptCatchUpDone):
            if body.request_id == self._receipts_request:
                self._receipts_request = None
                if body.as_of is not None and self._store.receives_shared_records():
                    self._store.save_shared_records_as_of(body.as_of, body.more_shared_records)
                self._count("receipts_caught_up")
                if body.more_shared_records:
                    self._refresh.set()  # the next page of other tills' records
        elif isinstance(body, TillRecordShared):
            self._count(self._store.apply_shared_record(body, till_id))
        elif isinstance(body, RecordRefused):
            self._count(self._store.apply_record_refused(body))
            log.warning("record_refused_by_archive", record_id=str(body.record_id), till_seq=body.till_seq, reason=body.reason)
        return False

    def _on_entry(self, entry: FeedEntry, till_id: uuid.UUID | None) -> None:
        c = entry.category
        if c not in self._store.participating_categories():
            return
        if c in self._catching_up:
            self._hold(entry)
            return
        position = self._store.feed_position(c)
        if entry.entity.feed_seq <= position:
            return
        if entry.prev_feed_seq != position:
            self._hold(entry)
            return
        self._count(self._store.apply_feed_entry(entry, till_id))
        self._drain(c, till_id)

    def _hold(self, entry: FeedEntry) -> None:
        held = self._buffer.setdefault(entry.category, {})
        if len(held) >= self._buffer_limit:
            held.clear()  # the catch-up brings it all anyway
        held[entry.prev_feed_seq] = entry
        self._gap_since.setdefault(entry.category, time.monotonic())

    def _drain(self, category: str, till_id: uuid.UUID | None) -> None:
        held = self._buffer.get(category)
        while held:
            position = self._store.feed_position(category)
            for prev in [p for p in held if held[p].entity.feed_seq <= position]:
                del held[prev]
            entry = held.pop(position, None)
            if entry is None:
                break
            self._count(self._store.apply_feed_entry(entry, till_id))
        if not held:
            self._gap_since.pop(category, None)

    def _on_page(self, page: CatchUpPage, till_id: uuid.UUID | None) -> int:
        progress = self._catching_up.get(page.category)
        if progress is None or progress.request_id != page.request_id:
            return 0  # an answer to an older request
        progress.received += len(page.entries)
        progress.total = page.total_entries
        progress.asked_at = time.monotonic()
        shared = self._store.apply_catchup_page(page, till_id)
        if page.done:
            del self._catching_up[page.category]
            self._count("caught_up")
            log.info("caught_up", category=page.category, feed_seq=page.head_feed_seq, entries=progress.received)
            self._drain(page.category, till_id)
        return shared
