"""The service technician's side of password approval: ops broker users and the RPC to the
password-approval worker (``tillsync ops technician …``, ``tillsync ops password-requests …``).

A technician acts as their own broker user ``ops-<name>``, whose only permission is to
publish decisions and queries to ``password.approval``; RabbitMQ validates the
``user_id`` of every command, and the worker takes the approver from it.
"""

from __future__ import annotations

import aio_pika
from aio_pika.exceptions import DeliveryError, ProbableAuthenticationError
from aiormq.exceptions import ChannelAccessRefused
from pydantic import SecretStr, TypeAdapter

from shared.amqp import RpcClient, RpcTimeout
from shared.broker_admin import BrokerAdmin
from shared.models import ApprovalMessage, ApprovalReply
from shared.settings import BrokerSettings, amqp_url_with_credentials
from shared.topology import APPROVAL_EXCHANGE, OPS_USER_PREFIX, ops_broker_user, ops_permissions


class OpsSettings(BrokerSettings):
    """Where a technician reaches the broker (``TILLSYNC_AMQP_URL``: host and vhost) and as
    whom (``TILLSYNC_OPS_USER``: the name after ``ops-``, ``TILLSYNC_OPS_PASSWORD``)."""

    ops_user: str | None = None
    ops_password: SecretStr | None = None


class OpsError(RuntimeError):
    """The broker or the worker refused the technician's command; the message says why."""


def ops_user_name(name: str) -> str:
    """``anna`` or ``ops-anna`` → ``ops-anna``; ``ValueError`` for anything but letters, digits, ``.``, ``_``, ``-``."""
    short = name.strip().lower().removeprefix(OPS_USER_PREFIX)
    if not short or not all(c.isascii() and (c.isalnum() or c in "._-") for c in short) or len(short) > 64:
        raise ValueError(f"{name!r} is no technician name: use 1 to 64 letters, digits, '.', '_' or '-'")
    return ops_broker_user(short)


async def add_technician(settings: BrokerSettings, name: str, password: str, management_ui: bool) -> str:
    """Create (or reset the password of) the ops user for ``name``; returns the user name.

    ``management_ui``: the user may also log in to the management UI (tag ``management``)
    to publish a command there. Raises ``ValueError`` for a bad name or a short password."""
    user = ops_user_name(name)
    if len(password) < 12:
        raise ValueError("a technician's password needs at least 12 characters")
    admin_user, admin_password = settings.management_credentials
    async with BrokerAdmin(settings.management_url, admin_user, admin_password) as admin:
        if settings.vhost not in {v["name"] for v in await admin.vhosts()}:
            raise ValueError(f"the broker has no vhost {settings.vhost!r} (TILLSYNC_AMQP_URL); run `tillsync setup` first")
        await admin.put_user(user, password, tags="management" if management_ui else "")
        await admin.grant_permissions(settings.vhost, user, ops_permissions())
    return user


async def remove_technician(settings: BrokerSettings, name: str) -> bool:
    """Delete the ops user for ``name`` (its connections close); False if there was none."""
    admin_user, admin_password = settings.management_credentials
    async with BrokerAdmin(settings.management_url, admin_user, admin_password) as admin:
        return await admin.delete_user(ops_user_name(name))


async def call_worker(
    settings: OpsSettings, user: str, password: str, routing_key: str, message: ApprovalMessage, timeout_seconds: float = 20.0
) -> ApprovalReply:
    """Send ``message`` as ops user ``user`` and return the worker's answer.

    Raises ``OpsError`` naming the problem: credentials refused, no permission, no
    worker queue (``tillsync setup`` not run) or no answer in time."""
    url = amqp_url_with_credentials(settings.amqp_url, user, password)
    try:
        connection = await aio_pika.connect(url, client_properties={"connection_name": f"tillsync ops {user}"}, timeout=10)
    except ProbableAuthenticationError as exc:
        raise OpsError(f"the broker refused {user}: wrong password, or no such technician (`tillsync ops technician add`)") from exc
    except aio_pika.exceptions.AMQPConnectionError as exc:
        raise OpsError(
            f"the broker refused the connection to vhost {settings.vhost!r} for {user} (no such vhost, or no access there)"
        ) from exc
    except Exception as exc:
        raise OpsError(f"cannot reach the broker at {settings.amqp_url.split('@')[-1]}: {type(exc).__name__}: {exc}") from exc
    try:
        rpc = RpcClient(connection)
        await rpc.start()
        return await rpc.call(
            APPROVAL_EXCHANGE, routing_key, message, TypeAdapter(ApprovalReply), timeout_seconds=timeout_seconds,
            persistent=True, user_id=user,
        )
    except ChannelAccessRefused as exc:
        raise OpsError(f"{user} may not send this to {APPROVAL_EXCHANGE} (RabbitMQ refused it: {exc})") from exc
    except DeliveryError as exc:
        raise OpsError(f"nothing receives {APPROVAL_EXCHANGE}/{routing_key}: run `tillsync setup`") from exc
    except RpcTimeout as exc:
        raise OpsError("the password-approval worker did not answer; is it running? (`tillsync service password-approval-worker`)") from exc
    finally:
        await connection.close()
