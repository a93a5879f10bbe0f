"""``tillsync setup``: prepare PostgreSQL and RabbitMQ for the services (idempotent).

As the owner (``TILLSYNC_DATABASE_ADMIN_URL``): creates the database if missing, applies
the migrations (which create the services' role ``tillsync_service``), gives that role
the password of ``TILLSYNC_DATABASE_URL`` if it has one, sets the archive's retention
period if ``TILLSYNC_ARCHIVE_RETENTION_YEARS`` is set, and creates the archive's monthly
partitions due now; then checks that the services' URL connects as that role. Creates
the vhost, gives the service user full permissions in it, creates the shared sign-up
user with its narrow permissions, and declares the topology.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import asyncpg
from pydantic import Field

from shared.amqp import connect
from shared.broker_admin import BrokerAdmin, BrokerAdminError
from shared.db import ensure_archive_partitions, ensure_database, migrate
from shared.settings import SERVICE_DATABASE_ROLE, DatabaseAdminSettings, without_password
from shared.topology import OBSOLETE_BINDINGS, SIGNUP_PERMISSIONS, SIGNUP_USER, declare
from till_agent.till import DEFAULT_SIGNUP_PASSWORD

# §147 (3) AO: books and records are kept 10 years (also the migration's floor).
MIN_RETENTION_YEARS = 10


class SetupSettings(DatabaseAdminSettings):
    """Settings of ``tillsync setup`` and the demo (environment ``TILLSYNC_*``)."""

    signup_password: str = Field(default=DEFAULT_SIGNUP_PASSWORD, description="password of the shared sign-up user")
    archive_retention_years: int | None = Field(
        default=None,
        ge=MIN_RETENTION_YEARS,
        le=100,
        description="retention period of the archive in years (unset: keep the database's, 10 on a new one)",
    )


class SetupError(RuntimeError):
    """A component is missing or refused; the message says which and what to do."""


async def setup(settings: SetupSettings) -> list[str]:
    """Prepare database and broker; return one line per step done."""
    done = []
    admin_url = settings.admin_database_url
    service, admin = urlsplit(settings.database_url), urlsplit(admin_url)
    if (service.hostname, service.port, service.path) != (admin.hostname, admin.port, admin.path):
        raise SetupError(
            f"TILLSYNC_DATABASE_URL ({without_password(settings.database_url)}) and TILLSYNC_DATABASE_ADMIN_URL "
            f"({without_password(admin_url)}) must name the same server and database"
        )
    try:
        if await ensure_database(admin_url):
            done.append("created the database")
        conn = await asyncpg.connect(admin_url)
    except (OSError, asyncpg.PostgresError) as exc:
        raise SetupError(f"PostgreSQL is not reachable at {without_password(admin_url)}: {exc}") from exc
    try:
        applied = await migrate(conn)
        done.append(f"applied {len(applied)} migration(s)" if applied else "database schema is up to date")
        done.extend(await _prepare_archive(conn, settings))
    finally:
        await conn.close()
    done.append(await _check_service_role(settings))
    user, password = settings.management_credentials
    async with BrokerAdmin(settings.management_url, user, password) as broker:
        try:
            await broker.overview()
        except BrokerAdminError as exc:
            raise SetupError(
                f"the RabbitMQ management API is not reachable at {settings.management_url} ({exc}); "
                "enable it with `rabbitmq-plugins enable rabbitmq_management`"
            ) from exc
        await broker.create_vhost(settings.vhost)
        await broker.set_permissions(settings.vhost, user, ".*", ".*", ".*")
        await broker.put_user(SIGNUP_USER, settings.signup_password)
        await broker.set_permissions(settings.vhost, SIGNUP_USER, **SIGNUP_PERMISSIONS)
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


async def _prepare_archive(conn: asyncpg.Connection, settings: SetupSettings) -> list[str]:
    """As the owner: the services' role password, the retention period, the partitions due now."""
    done = []
    service = urlsplit(settings.database_url)
    if service.username == SERVICE_DATABASE_ROLE and service.password is not None:
        statement = await conn.fetchval(
            "select format('alter role %I password %L', $1::text, $2::text)", SERVICE_DATABASE_ROLE, unquote(service.password)
        )
        await conn.execute(statement)
        done.append(f"password of the services' role {SERVICE_DATABASE_ROLE} set")
    if settings.archive_retention_years is not None:
        try:
            await conn.execute("update archive_settings set retention_years = $1", settings.archive_retention_years)
        except asyncpg.PostgresError as exc:
            raise SetupError(f"TILLSYNC_ARCHIVE_RETENTION_YEARS={settings.archive_retention_years} refused: {exc}") from exc
    years = await conn.fetchval("select retention_years from archive_settings")
    created = await ensure_archive_partitions(conn)
    done.append(
        f"archive retention {years} years (from the end of each record's calendar year); "
        + (f"partitions created: {', '.join(created)}" if created else "monthly partitions in place")
    )
    return done


async def _check_service_role(settings: SetupSettings) -> str:
    """Connect as the services do; raise ``SetupError`` unless that is the services' role
    (or a role in it). A superuser is allowed with a warning: the archive's grants do not
    bind it (the triggers still do)."""
    try:
        conn = await asyncpg.connect(settings.database_url)
    except (OSError, asyncpg.PostgresError) as exc:
        raise SetupError(
            f"the services cannot connect with TILLSYNC_DATABASE_URL ({without_password(settings.database_url)}): {exc}"
        ) from exc
    try:
        row = await conn.fetchrow(
            "select current_user as name, rolsuper as superuser, pg_has_role(current_user, $1, 'member') as member "
            "from pg_roles where rolname = current_user",
            SERVICE_DATABASE_ROLE,
        )
    finally:
        await conn.close()
    if row["superuser"]:
        return (
            f"warning: the services connect as the superuser {row['name']}; connect them as {SERVICE_DATABASE_ROLE} "
            "(TILLSYNC_DATABASE_URL) so that PostgreSQL lets them only read and insert the archive"
        )
    if not row["member"]:
        raise SetupError(
            f"the services connect as {row['name']}, which is not the services' role {SERVICE_DATABASE_ROLE}: "
            f"set TILLSYNC_DATABASE_URL to connect as {SERVICE_DATABASE_ROLE} (or `grant {SERVICE_DATABASE_ROLE} to {row['name']}`)"
        )
    return f"the services connect as {row['name']}: the archive is read and insert only for them"
