"""AMQP plumbing shared by services and tills: connections, dead letters, request/reply.

- ``connect()`` opens one named robust connection (``connection_name`` shows in the
  management UI).
- ``dead_letter()`` republishes a refused message to the dead-letter exchange with its
  reason in headers (``x-tillsync-reason``) and the original routing key and user.
- ``RpcClient`` sends a request and awaits its reply through RabbitMQ's direct
  reply-to (``amq.rabbitmq.reply-to``): no reply queue to declare, so a user without
  configure or read permissions can call.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from pydantic import BaseModel, TypeAdapter

from shared.topology import DEAD_LETTER_EXCHANGE

REASON_HEADER = "x-tillsync-reason"
QUEUE_HEADER = "x-tillsync-queue"
ORIGINAL_ROUTING_KEY_HEADER = "x-tillsync-original-routing-key"
ORIGINAL_USER_HEADER = "x-tillsync-original-user-id"
REJECTED_AT_HEADER = "x-tillsync-rejected-at"
ORIGINAL_SIZE_HEADER = "x-tillsync-original-size"  # bytes of a body not kept whole in the dead letter
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"

R = TypeVar("R")


async def connect(url: str, connection_name: str, robust: bool = True) -> AbstractRobustConnection:
    """Open a (robust, by default) connection named ``connection_name``."""
    properties = {"connection_name": connection_name}
    if robust:
        return await aio_pika.connect_robust(url, client_properties=properties)
    return await aio_pika.connect(url, client_properties=properties)  # type: ignore[return-value]


async def dead_letter(
    channel: AbstractChannel,
    message: AbstractIncomingMessage,
    queue: str,
    reason: str,
    body: bytes | None = None,
    original_size: int | None = None,
) -> None:
    """Publish ``message`` (or ``body`` instead of its body) to the dead-letter exchange.

    Routing key is ``queue`` (each service queue's dead-letter queue is bound with
    it). Headers carry the reason, the source queue, the original routing key and the
    original ``user_id`` (the property itself is dropped: RabbitMQ would refuse a
    ``user_id`` that is not the publishing user); ``original_size`` (bytes), when
    given, goes into ``x-tillsync-original-size`` (a body kept only in part).
    ``channel`` must have publisher confirms; returns after the broker confirmed.
    """
    headers: dict[str, Any] = dict(message.headers or {})
    headers.update(
        {
            REASON_HEADER: reason[:4000],
            QUEUE_HEADER: queue,
            ORIGINAL_ROUTING_KEY_HEADER: message.routing_key or "",
            ORIGINAL_USER_HEADER: message.user_id or "",
            REJECTED_AT_HEADER: dt.datetime.now(dt.UTC).isoformat(),
        }
    )
    if original_size is not None:
        headers[ORIGINAL_SIZE_HEADER] = original_size
    exchange = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
    await exchange.publish(
        aio_pika.Message(
            body if body is not None else message.body,
            headers=headers,
            content_type=message.content_type,
            message_id=message.message_id,
            type=message.type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=queue,
    )


class Publisher:
    """Publishes wire models as persistent JSON messages on a channel with publisher
    confirms; ``publish()`` returns once the broker confirmed. Not mandatory: for
    download messages nobody bound (a till with sync off) is not an error."""

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}

    async def publish(self, exchange: str, routing_key: str, body: BaseModel) -> None:
        if exchange not in self._exchanges:
            self._exchanges[exchange] = await self._channel.get_exchange(exchange, ensure=False)
        await self._exchanges[exchange].publish(
            aio_pika.Message(
                body.model_dump_json().encode(),
                content_type="application/json",
                type=getattr(getattr(body, "message", body), "type", None),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=routing_key,
            mandatory=False,
        )


class RpcTimeout(TimeoutError):
    """No reply arrived in time; the request may or may not have been handled."""


class RpcClient:
    """Request/reply over RabbitMQ with direct reply-to and JSON wire models.

    Use one client per connection; ``start()`` before the first ``call()``.
    """

    def __init__(self, connection: aio_pika.abc.AbstractConnection) -> None:
        self._connection = connection
        self._channel: AbstractChannel | None = None
        self._pending: dict[str, asyncio.Future[bytes]] = {}

    async def start(self) -> None:
        """Open the channel and start consuming replies."""
        self._channel = await self._connection.channel(publisher_confirms=True)
        reply_queue = await self._channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await reply_queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    async def call(
        self,
        exchange: str,
        routing_key: str,
        request: BaseModel,
        reply_adapter: TypeAdapter[R],
        timeout_seconds: float = 30.0,
        persistent: bool = False,
        user_id: str | None = None,
    ) -> R:
        """Publish ``request`` and return the validated reply.

        Raises ``RpcTimeout`` after ``timeout_seconds``; ``pydantic.ValidationError``
        if the reply does not match ``reply_adapter``; ``aio_pika`` errors if the
        broker refuses the publish (e.g. no permission) or no queue is bound.
        Requests are non-persistent unless ``persistent``; they expire with the timeout.
        ``user_id``: the connection's user, for receivers that act on who sent it
        (RabbitMQ refuses a ``user_id`` that is not the connection's user).
        """
        if self._channel is None:
            raise RuntimeError("RpcClient.start() was not called")
        correlation_id = str(uuid.uuid4())
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            target = await self._channel.get_exchange(exchange, ensure=False)
            await target.publish(
                aio_pika.Message(
                    request.model_dump_json().encode(),
                    content_type="application/json",
                    correlation_id=correlation_id,
                    reply_to=DIRECT_REPLY_TO,
                    expiration=timeout_seconds,
                    user_id=user_id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
                ),
                routing_key=routing_key,
                mandatory=True,
            )
            try:
                body = await asyncio.wait_for(future, timeout_seconds)
            except asyncio.TimeoutError as exc:
                raise RpcTimeout(f"no reply from {exchange}/{routing_key} within {timeout_seconds:.0f} s") from exc
        finally:
            self._pending.pop(correlation_id, None)
        return reply_adapter.validate_json(body)

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
