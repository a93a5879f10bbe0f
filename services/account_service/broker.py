"""The account service's hold on RabbitMQ: a till's user, permissions and queue; the
hand-over of password-reset requests to the password-approval worker."""

from __future__ import annotations

from uuid import UUID

import aio_pika
from aio_pika.abc import AbstractChannel

from shared.broker_admin import BrokerAdmin
from shared.models import ApprovalMessage, PasswordResetRequest
from shared.topology import (
    APPROVAL_EXCHANGE,
    APPROVAL_REQUEST_KEY,
    DOWNLOAD_EXCHANGE,
    all_download_binding_keys,
    declare_queue,
    till_broker_user,
    till_permissions,
    till_queue_spec,
)


class RabbitTillBroker:
    """Creates and deletes till broker users (management API) and binds till queues (AMQP)."""

    def __init__(self, admin: BrokerAdmin, channel: AbstractChannel, vhost: str) -> None:
        self._admin = admin
        self._channel = channel
        self._vhost = vhost

    async def create_till_user(self, account_id: UUID, till_id: UUID, secret: str) -> None:
        """Create (or reset) the till's user with ``secret``; only its own keys and queue."""
        user = till_broker_user(till_id)
        await self._admin.put_user(user, secret)
        await self._admin.grant_permissions(self._vhost, user, till_permissions(account_id, till_id))

    async def delete_till_user(self, till_id: UUID) -> int:
        """Delete the till's user and close its connections; return how many it had open.

        RabbitMQ closes a deleted user's connections itself; any still listed
        afterwards are closed through the management API.
        """
        user = till_broker_user(till_id)
        open_connections = len(await self._admin.connections_of(user))
        await self._admin.delete_user(user)
        await self._admin.close_connections_of(user, reason="till signed out")
        return open_connections

    async def bind_till_queue(self, account_id: UUID, till_id: UUID, keys: tuple[str, ...]) -> None:
        """Declare the till's queue and make its bindings on ``till.download`` exactly ``keys``."""
        queue = await declare_queue(self._channel, till_queue_spec(till_id))
        for key in all_download_binding_keys(account_id, till_id):
            if key in keys:
                await queue.bind(DOWNLOAD_EXCHANGE, routing_key=key)
            else:
                await queue.unbind(DOWNLOAD_EXCHANGE, routing_key=key)


class RabbitApprovalQueue:
    """Publishes reset requests to ``password.approval`` (routing key ``request``),
    persistent and mandatory, as broker user ``user`` (RabbitMQ checks the ``user_id``);
    returns once the broker confirmed. ``channel`` must have publisher confirms."""

    def __init__(self, channel: AbstractChannel, user: str) -> None:
        self._channel = channel
        self._user = user

    async def submit(self, request: PasswordResetRequest) -> None:
        exchange = await self._channel.get_exchange(APPROVAL_EXCHANGE, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                ApprovalMessage(message=request).model_dump_json().encode(),
                content_type="application/json",
                message_id=str(request.request_id),
                user_id=self._user,
                type=request.type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=APPROVAL_REQUEST_KEY,
            mandatory=True,
        )
