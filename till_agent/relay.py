"""The outbox relay: uploads the till's outbox to ``till.upload``, at least once, in order.

Each outbox row is published as an ``Upload`` with publisher confirms, ``mandatory``
(an unroutable record is an error, not a silent drop), ``message_id`` = ``record_id``
and ``user_id`` = the till's broker user, which RabbitMQ checks. Rows are marked sent
only after the broker confirmed them; anything unconfirmed is sent again later, and the
archive writer ignores the repeat. While the broker is unreachable, the credentials
are refused or the till is signed out, the relay waits and retries with backoff;
the till keeps recording meanwhile. With the sync switch off the relay does not
connect at all and the outbox grows. On each connection the relay also runs the
till's ``FeedClient`` (its download queue) and reconnects if that fails.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Callable

import aio_pika
import structlog
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import ProbableAuthenticationError

from shared.settings import amqp_url_with_credentials
from shared.topology import UPLOAD_EXCHANGE, upload_routing_key
from till_agent.feed import FeedClient
from till_agent.store import Identity, OutboxRow, TillStore

log = structlog.get_logger()


@dataclass(frozen=True)
class RelayStatus:
    """What the relay is doing: ``state`` in connecting/idle/uploading/offline/signed_out/sync_off/stopped
    (``idle`` and ``uploading`` mean connected).

    ``pending`` counts every unsent record; ``held`` those kept back by the custom
    mode's upload switches (they wait until the switch is on again).
    """

    state: str
    detail: str
    pending: int
    sent: int
    rate_per_second: float
    held: int = 0


class OutboxRelay:
    """Uploads one till's outbox; ``run()`` until stopped, ``drain()`` to wait for empty.

    ``broker_url``: the AMQP URL the till reaches the cloud at (its credentials are
    taken from the store at each connect). ``window``: records in flight at once.
    """

    def __init__(
        self,
        store: TillStore,
        broker_url: str,
        window: int = 500,
        max_backoff_seconds: float = 15.0,
        poll_seconds: float = 0.2,
        on_sent: Callable[[int], None] | None = None,
    ) -> None:
        self._store = store
        self._broker_url = broker_url
        self._window = window
        self._max_backoff = max_backoff_seconds
        self._poll = poll_seconds
        self._on_sent = on_sent
        self._wake = asyncio.Event()
        self._state = ("connecting", "")
        self._sent_times: collections.deque[tuple[float, int]] = collections.deque()
        self._connection: AbstractConnection | None = None
        self.feed = FeedClient(store, on_new_records=self.wake)

    def wake(self) -> None:
        """Tell the relay that new records are waiting."""
        self._wake.set()

    def status(self) -> RelayStatus:
        pending, sent = self._store.outbox_counts()
        now = time.monotonic()
        while self._sent_times and now - self._sent_times[0][0] > 5.0:
            self._sent_times.popleft()
        recent = sum(n for _, n in self._sent_times)
        span = max(now - self._sent_times[0][0], 1.0) if self._sent_times else 1.0
        return RelayStatus(self._state[0], self._state[1], pending, sent, recent / span, self._store.held_by_switches())

    async def run(self, stop: asyncio.Event) -> None:
        """Upload until ``stop`` is set; never raises for broker trouble."""
        backoff = 0.5
        while not stop.is_set():
            identity = self._store.identity()
            if not identity.signed_in or not identity.broker_username or not identity.broker_password:
                self._state = ("signed_out", "the till is signed out; records wait for the next sign-in")
                await self._sleep(stop, 1.0)
                continue
            if not self._store.sync_settings()[0]:
                self._state = ("sync_off", "the sync switch is off; records wait in the outbox")
                await self._sleep(stop, 1.0)
                continue
            url = amqp_url_with_credentials(self._broker_url, identity.broker_username, identity.broker_password)
            if self._state[0] != "offline":
                self._state = ("connecting", "")
            try:
                self._connection = await aio_pika.connect(
                    url, client_properties={"connection_name": f"till {identity.serial_number}"}, timeout=10
                )
                async with self._connection:
                    channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
                    exchange = await channel.get_exchange(UPLOAD_EXCHANGE, ensure=False)
                    backoff = 0.5
                    feed = asyncio.create_task(
                        self.feed.run(self._connection, identity, self._store.queue_name()), name="feed"
                    )
                    try:
                        await self._upload_loop(stop, exchange, identity, feed)
                    finally:
                        feed.cancel()
                        await asyncio.gather(feed, return_exceptions=True)
            except ProbableAuthenticationError as exc:
                self._state = ("offline", f"credentials refused by the broker ({exc}); will retry")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker down, connection closed, publish refused ...
                self._state = ("offline", f"{type(exc).__name__}: {exc}")
            finally:
                self._connection = None
            if stop.is_set():
                break
            log.info("relay_offline", detail=self._state[1], retry_in_seconds=backoff)
            await self._sleep(stop, backoff)
            backoff = min(backoff * 2, self._max_backoff)
        self._state = ("stopped", "")

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        stop_wait = asyncio.ensure_future(stop.wait())
        wake_wait = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({stop_wait, wake_wait}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            wake_wait.cancel()
        self._wake.clear()

    async def _upload_loop(
        self, stop: asyncio.Event, exchange: aio_pika.abc.AbstractExchange, identity: Identity, feed: asyncio.Task[None]
    ) -> None:
        while not stop.is_set():
            if feed.done():
                feed.result()  # raises what stopped the download side
                raise ConnectionError("the download queue was closed")
            if not self._store.sync_settings()[0]:
                return  # switched off: drop the connection
            rows = self._store.unsent(self._window)
            if not rows:
                self._state = ("idle", "")
                await self._sleep(stop, self._poll)
                if self._connection is None or self._connection.is_closed:
                    raise ConnectionError("connection closed")
                continue
            self._state = ("uploading", "")
            results = await asyncio.gather(*(self._publish(exchange, identity, row) for row in rows), return_exceptions=True)
            confirmed = [row.till_seq for row, result in zip(rows, results) if not isinstance(result, BaseException)]
            self._store.mark_sent(confirmed)
            if confirmed:
                self._sent_times.append((time.monotonic(), len(confirmed)))
                if self._on_sent:
                    self._on_sent(len(confirmed))
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                raise failures[0]

    async def _publish(self, exchange: aio_pika.abc.AbstractExchange, identity: Identity, row: OutboxRow) -> None:
        upload = row.upload(identity.account_id, identity.till_id)  # type: ignore[arg-type]
        await exchange.publish(
            aio_pika.Message(
                upload.model_dump_json().encode(),
                content_type="application/json",
                message_id=str(row.record_id),
                user_id=identity.broker_username,
                type=row.kind,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=upload_routing_key(identity.account_id, identity.till_id, row.kind),  # type: ignore[arg-type]
            mandatory=True,
        )

    async def disconnect(self) -> None:
        """Drop the current connection (the run loop reconnects with backoff)."""
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()

    async def drain(self, timeout_seconds: float) -> bool:
        """Wait until every record that may be uploaded now is; False if ``timeout_seconds`` passed first."""
        deadline = time.monotonic() + timeout_seconds
        self.wake()
        while True:
            status = self.status()
            if status.pending - status.held == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)
