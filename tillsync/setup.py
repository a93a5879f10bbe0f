"""``tillsync setup``: prepare PostgreSQL and RabbitMQ for the services (idempotent).

Creates the database if missing and applies the migrations; creates the vhost, gives
the service user full permissions in it, creates the shared sign-up user with its
narrow permissions, and declares the topology.
"""

from __future__ import annotations

import asyncpg
from pydantic import Field

from shared.amqp import connect
from shared.broker_admin import BrokerAdmin, BrokerAdminError
from shared.db import ensure_database, migrate
from shared.settings import ServiceSettings
from shared.topology import OBSOLETE_BINDINGS, SIGNUP_PERMISSIONS, SIGNUP_USER, declare
from till_agent.till import DEFAULT_SIGNUP_PASSWORD


class SetupSettings(ServiceSettings):
    """Settings of ``tillsync setup`` and the demo (environment ``TILLSYNC_*``)."""

    signup_password: str = Field(default=DEFAULT_SIGNUP_PASSWORD, description="password of the shared sign-up user")


class SetupError(RuntimeError):
    """A component is missing or refused; the message says which and what to do."""


async def setup(settings: SetupSettings) -> list[str]:
    """Prepare database and broker; return one line per step done."""
    done = []
    try:
        if await ensure_database(settings.database_url):
            done.append("created the database")
        conn = await asyncpg.connect(settings.database_url)
    except (OSError, asyncpg.PostgresError) as exc:
        raise SetupError(f"PostgreSQL is not reachable at {settings.database_url}: {exc}") from exc
    try:
        applied = await migrate(conn)
        done.append(f"applied {len(applied)} migration(s)" if applied else "database schema is up to date")
    finally:
        await conn.close()
    user, password = settings.management_credentials
    async with BrokerAdmin(settings.management_url, user, password) as admin:
        try:
            await admin.overview()
        except BrokerAdminError as exc:
            raise SetupError(
                f"the RabbitMQ management API is not reachable at {settings.management_url} ({exc}); "
                "enable it with `rabbitmq-plugins enable rabbitmq_management`"
            ) from exc
        await admin.create_vhost(settings.vhost)
        await admin.set_permissions(settings.vhost, user, ".*", ".*", ".*")
        await admin.put_user(SIGNUP_USER, settings.signup_password)
        await admin.set_permissions(settings.vhost, SIGNUP_USER, **SIGNUP_PERMISSIONS)
        done.append(f"vhost {settings.vhost!r} with sign-up user {SIGNUP_USER!r}")
    connection = await connect(settings.amqp_url, "tillsync-setup", robust=False)
    try:
        channel = await connection.channel()
        await declare(channel)
        for binding in OBSOLETE_BINDINGS:
            queue = await channel.get_queue(binding.destination, ensure=False)
            await queue.unbind(binding.source, routing_key=binding.routing_key)
    finally:
        await connection.close()
    done.append("topology declared")
    return done
