"""A throwaway vhost and database for the benchmarks, set up like production and removed after."""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from typing import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from shared.broker_admin import BrokerAdmin
from shared.settings import DatabaseAdminSettings
from shared.topology import TILL_USER_PREFIX
from tillsync.setup import SetupSettings, setup


@asynccontextmanager
async def throwaway_environment(base: DatabaseAdminSettings) -> AsyncIterator[tuple[SetupSettings, BrokerAdmin]]:
    """Yield settings of a new vhost and database on ``base``'s servers (``tillsync setup``
    done) and a management client; afterwards delete the till users made in the vhost,
    the vhost and the database (as the owner, through the server's ``postgres`` database,
    as ``shared.db.ensure_database`` does: the configured one may not exist)."""
    suffix = secrets.token_hex(4)
    vhost, database = f"tillsync-bench-{suffix}", f"tillsync_bench_{suffix}"
    settings = SetupSettings(
        amqp_url=urlunsplit(urlsplit(base.amqp_url)._replace(path="/" + vhost)),
        management_url=base.management_url,
        database_url=urlunsplit(urlsplit(base.database_url)._replace(path="/" + database)),
        database_admin_url=urlunsplit(urlsplit(base.admin_database_url)._replace(path="/" + database)),
    )
    user, password = settings.management_credentials
    admin = BrokerAdmin(settings.management_url, user, password)
    try:
        await setup(settings)
        yield settings, admin
    finally:
        try:
            for permission in await admin.vhost_permissions(vhost):
                if permission["user"].startswith(TILL_USER_PREFIX):
                    await admin.delete_user(permission["user"])
            await admin.delete_vhost(vhost)
        finally:
            await admin.close()
            server = await asyncpg.connect(urlunsplit(urlsplit(base.admin_database_url)._replace(path="/postgres")))
            try:
                await server.execute(f'drop database if exists "{database}" with (force)')
            finally:
                await server.close()
