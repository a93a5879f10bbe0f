"""The one consume adapter every service uses.

It validates each message against the service's wire model, binds the log context,
runs the service's handler on a batch of valid messages inside one database
transaction, and only after the commit publishes replies and the handler's outgoing
messages (with publisher confirms), dead-letters refused messages with their reason,
and acks. Handlers never ack and never build clients. A crash between commit and ack
redelivers the message, so handlers must recognise work already done and emit its
outgoing messages again (receivers are idempotent).

Failure handling:
- a body over ``max_body_bytes`` (default ``MAX_BODY_BYTES``, 1 MiB): dead-lettered
  without parsing, with its size and the limit as reason; the dead letter keeps only
  its first ``KEPT_BODY_BYTES`` and the original size (header ``x-tillsync-original-size``);
- invalid message (not JSON, wrong shape): dead-lettered with the validation error;
- handler refuses one message (``Delivery.refuse``): dead-lettered with its reason;
- database unreachable: the batch is kept (not acked) and retried with backoff;
- the database refuses the data itself (``asyncpg.DataError``, a constraint): a batch
  is split; the single message at fault is dead-lettered at once with the reason;
- any other exception: a batch is split and retried message by message; a single
  message is nacked for redelivery, and on its last allowed delivery
  (``x-delivery-count``) dead-lettered with the exception as reason. For
  request/reply queues (``error_reply`` given) the caller gets that error reply at
  once and the request is dead-lettered, since a caller cannot wait for redeliveries.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, TypeVar

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pydantic import BaseModel, TypeAdapter, ValidationError

from shared.amqp import DIRECT_REPLY_TO, Publisher, dead_letter
from shared.topology import DELIVERY_LIMIT

M = TypeVar("M")

MAX_BODY_BYTES = 1024 * 1024  # default limit of a message body: far above any till's record or request
KEPT_BODY_BYTES = 4096  # of a body over the limit, the dead letter keeps this much (for the operator)

TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncio.TimeoutError,
)


# The database refused the data itself (e.g. a character PostgreSQL cannot store, a
# violated check constraint): the same message would fail every time.
PERMANENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
)


@dataclass
class Delivery(Generic[M]):
    """One received message with its validated body and the handler's verdict."""

    message: AbstractIncomingMessage
    body: M
    reply: BaseModel | None = None
    refused: str | None = None
    outcome: str = "accepted"
    log: dict[str, Any] = field(default_factory=dict)
    outgoing: list[tuple[str, str, BaseModel]] = field(default_factory=list)

    @property
    def user_id(self) -> str | None:
        """The broker-validated user that published the message (None if unset)."""
        return self.message.user_id

    @property
    def routing_key(self) -> str:
        return self.message.routing_key or ""

    def emit(self, exchange: str, routing_key: str, body: BaseModel) -> None:
        """Publish ``body`` to ``exchange`` once the transaction committed (before the ack)."""
        self.outgoing.append((exchange, routing_key, body))

    def refuse(self, reason: str, outcome: str = "refused") -> None:
        """Mark this message as permanently refused: it will be dead-lettered with ``reason``."""
        self.refused = reason
        self.outcome = outcome


Handler = Callable[[list[Delivery[M]], asyncpg.Connection], Awaitable[None]]


def validation_summary(exc: ValidationError, limit: int = 10) -> str:
    """One line naming each validation error by its location (at most ``limit``)."""
    parts = []
    for error in exc.errors()[:limit]:
        location = ".".join(str(p) for p in error["loc"]) or "message"
        parts.append(f"{location}: {error['msg'].removeprefix('Value error, ')}")
    more = f" (+{exc.error_count() - limit} more)" if exc.error_count() > limit else ""
    return "; ".join(parts) + more


class ConsumeAdapter(Generic[M]):
    """Consume ``queue`` with ``handler`` in batches (see module docstring).

    ``batch_size``/``batch_window_seconds``: a batch is up to ``batch_size`` messages
    collected for at most ``batch_window_seconds`` after the first. ``concurrency``
    batches run at once, each in its own transaction. ``log_context(body)`` gives the
    fields bound to each message's log line. ``redact(body_bytes)`` replaces a body
    before it is dead-lettered (for requests that carry secrets). Replies go only to
    RabbitMQ's direct reply-to; ``invalid_reply(reason)`` answers a message that is not
    valid (else the caller only times out). ``max_body_bytes``: a longer body is refused
    unread (see module docstring).
    """

    def __init__(
        self,
        *,
        channel: AbstractChannel,
        publish_channel: AbstractChannel,
        queue: AbstractQueue,
        adapter: TypeAdapter[M],
        handler: Handler[M],
        pool: asyncpg.Pool,
        log_context: Callable[[M], dict[str, Any]] = lambda _body: {},
        batch_size: int = 1,
        batch_window_seconds: float = 0.0,
        concurrency: int = 1,
        redact: Callable[[bytes], bytes] | None = None,
        error_reply: Callable[[Exception], BaseModel] | None = None,
        invalid_reply: Callable[[str], BaseModel] | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._channel = channel
        self._publish_channel = publish_channel
        self._queue = queue
        self._adapter = adapter
        self._handler = handler
        self._pool = pool
        self._log_context = log_context
        self._batch_size = batch_size
        self._window = batch_window_seconds
        self._concurrency = concurrency
        self._redact = redact
        self._error_reply = error_reply
        self._invalid_reply = invalid_reply
        self._max_body_bytes = max_body_bytes
        self._publisher = Publisher(publish_channel)
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._consumer_tag: str | None = None
        self._log = structlog.get_logger().bind(queue=queue.name)

    async def start(self) -> None:
        """Set the prefetch and start consuming."""
        await self._channel.set_qos(prefetch_count=max(2 * self._batch_size * self._concurrency, 10))
        self._workers = [asyncio.create_task(self._work(), name=f"consume-{i}") for i in range(self._concurrency)]
        self._consumer_tag = await self._queue.consume(self._inbox.put)

    async def stop(self) -> None:
        """Stop consuming; unfinished messages stay unacked and are redelivered."""
        if self._consumer_tag is not None:
            try:
                await self._queue.cancel(self._consumer_tag)
            except Exception:  # the channel may already be gone
                pass
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def _next_batch(self) -> list[AbstractIncomingMessage]:
        batch = [await self._inbox.get()]
        deadline = time.monotonic() + self._window
        while len(batch) < self._batch_size:
            try:
                batch.append(self._inbox.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._inbox.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._process(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                # e.g. the channel closed under us: give the messages back so they do not
                # sit unacked; those already settled make the nack fail harmlessly
                for message in batch:
                    try:
                        await message.nack(requeue=True)
                    except Exception:
                        pass
                try:
                    self._log.exception("batch_failed", size=len(batch))
                except Exception:  # not even logging works: keep consuming regardless
                    pass

    async def _process(self, messages: list[AbstractIncomingMessage]) -> None:
        started = time.monotonic()
        valid: list[Delivery[M]] = []
        for message in messages:
            size = len(message.body)
            if size > self._max_body_bytes:
                await self._refuse_invalid(
                    message,
                    f"message body of {size} bytes is over the limit of {self._max_body_bytes} bytes; not read "
                    + ("(the dead letter keeps none of it: it may hold secrets)" if self._redact
                       else f"(the dead letter keeps its first {KEPT_BODY_BYTES} bytes)"),
                    oversize=True,
                )
                continue
            try:
                body = self._adapter.validate_json(message.body)
            except ValidationError as exc:
                await self._refuse_invalid(message, f"invalid message: {validation_summary(exc)}")
                continue
            delivery = Delivery(message=message, body=body)
            delivery.log = {"message_id": message.message_id, **self._log_context(body)}
            valid.append(delivery)
        if not valid:
            return
        try:
            await self._run_handler(valid)
        except Exception as exc:
            if len(valid) > 1:
                self._log.warning("batch_split_after_error", size=len(valid), error=repr(exc))
                for delivery in valid:
                    await self._process([delivery.message])
                return
            await self._give_back(valid[0], exc)
            return
        await self._finish(valid, started)

    async def _run_handler(self, deliveries: list[Delivery[M]]) -> None:
        """Run the handler in one transaction; retry while the database is unreachable."""
        delay = 0.5
        while True:
            try:
                async with self._pool.acquire() as conn:
                    async with conn.transaction():
                        await self._handler(deliveries, conn)
                return
            except TRANSIENT_DB_ERRORS as exc:
                self._log.warning("database_unavailable", retry_in_seconds=delay, error=repr(exc))
                for d in deliveries:
                    d.reply, d.refused, d.outcome = None, None, "accepted"
                    d.outgoing.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _finish(self, deliveries: list[Delivery[M]], started: float) -> None:
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        await self._publish_outgoing(deliveries)
        for d in deliveries:
            if d.reply is not None:
                await self._reply(d.message, d.reply)
            if d.refused is not None:
                await self._dead_letter(d.message, d.refused)
        if self._concurrency == 1:
            # One worker handles deliveries in order, so every earlier delivery of this
            # channel is settled already: one ack with ``multiple`` settles the batch.
            await max(deliveries, key=lambda d: d.message.delivery_tag or 0).message.ack(multiple=True)
        else:
            for d in deliveries:
                await d.message.ack()
        for d in deliveries:
            with structlog.contextvars.bound_contextvars(**d.log):
                log = self._log.warning if d.refused else self._log.info
                log("message_handled", outcome=d.outcome, reason=d.refused, batch_ms=elapsed_ms, batch_size=len(deliveries))

    async def _publish_outgoing(self, deliveries: list[Delivery[M]]) -> None:
        """Publish every delivery's outgoing messages, in order, and wait for the confirms.

        Not mandatory: a download message nobody is bound for (a till in another mode or
        with sync off) is not an error; tills repair what they miss from the feed.
        """
        messages = [item for d in deliveries for item in d.outgoing]
        if messages:
            # started in order on one channel, so the broker receives them in order
            await asyncio.gather(*(self._publisher.publish(name, key, body) for name, key, body in messages))

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str, oversize: bool = False) -> None:
        """Dead-letter ``message`` with ``reason``; of an ``oversize`` body only the first
        ``KEPT_BODY_BYTES`` are kept (and redacted like any other, if this queue redacts)."""
        body = message.body[:KEPT_BODY_BYTES] if oversize else message.body
        if self._redact:
            body = self._redact(body)
        original_size = len(message.body) if oversize else None
        await dead_letter(self._publish_channel, message, self._queue.name, reason, body=body, original_size=original_size)

    async def _reply(self, message: AbstractIncomingMessage, reply: BaseModel) -> None:
        """Answer through RabbitMQ's direct reply-to only: a ``reply_to`` naming any other
        queue (e.g. another till's) is not answered."""
        if not (message.reply_to or "").startswith(DIRECT_REPLY_TO):
            return
        await self._publish_channel.default_exchange.publish(
            aio_pika.Message(reply.model_dump_json().encode(), content_type="application/json", correlation_id=message.correlation_id),
            routing_key=message.reply_to,  # type: ignore[arg-type]
            mandatory=False,
        )

    async def _refuse_invalid(self, message: AbstractIncomingMessage, reason: str, oversize: bool = False) -> None:
        if self._invalid_reply is not None:
            await self._reply(message, self._invalid_reply(reason))
        await self._dead_letter(message, reason, oversize=oversize)
        await message.ack()
        self._log.warning("message_handled", outcome="invalid", reason=reason, message_id=message.message_id)

    async def _give_back(self, delivery: Delivery[M], exc: Exception) -> None:
        deliveries = int((delivery.message.headers or {}).get("x-delivery-count", 0) or 0)
        with structlog.contextvars.bound_contextvars(**delivery.log):
            if isinstance(exc, PERMANENT_DB_ERRORS):
                if self._error_reply is not None:
                    delivery.reply = self._error_reply(exc)
                delivery.refuse(f"the database refused the data: {exc!r}", outcome="refused_by_database")
                await self._finish([delivery], time.monotonic())
            elif self._error_reply is not None:
                delivery.reply = self._error_reply(exc)
                delivery.refuse(f"handler failed: {exc!r}", outcome="failed")
                self._log.error("handler_failed", error=repr(exc), exc_info=exc)
                await self._finish([delivery], time.monotonic())
            elif deliveries + 1 >= DELIVERY_LIMIT:
                await self._dead_letter(delivery.message, f"handler failed {deliveries + 1} times: {exc!r}")
                await delivery.message.ack()
                self._log.error("message_handled", outcome="dead_lettered_after_retries", error=repr(exc))
            else:
                await delivery.message.nack(requeue=True)
                self._log.error("message_handled", outcome="redelivered", error=repr(exc), exc_info=exc)
