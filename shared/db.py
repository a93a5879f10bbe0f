"""PostgreSQL access: one asyncpg pool per process and the plain-SQL migrations runner.

Migrations are the files ``deploy/migrations/NNNN_<name>.sql``, applied in order, each
in its own transaction, recorded in ``schema_migrations`` with a SHA-256 of the file.
A recorded migration whose file changed afterwards is an error, never silently
re-applied. A PostgreSQL advisory lock keeps concurrent runners apart.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "deploy" / "migrations"
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_ID = 0x7111_5_0C  # advisory lock key for migrations


class MigrationError(RuntimeError):
    """A migration file is malformed, missing, or changed after it was applied."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


async def init_connection(conn: asyncpg.Connection) -> None:
    """Per-connection setup: ``jsonb`` values are encoded from and decoded to Python objects."""
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(dsn: str, max_size: int = 5) -> asyncpg.Pool:
    """Create the process's asyncpg pool; ``jsonb`` values are decoded to Python objects."""
    return await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, init=init_connection)


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Read the migration files of ``directory`` in version order.

    Raises ``MigrationError`` for a file name not of the form ``NNNN_name.sql`` or a
    repeated or missing version number.
    """
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_FILE.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        migrations.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migration versions must be 1..n without gaps, found {versions}")
    return migrations


async def migrate(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Apply the migrations not yet applied; return those applied now.

    Raises ``MigrationError`` if an applied migration's file changed.
    """
    migrations = load_migrations(directory)
    await conn.execute("select pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute(
            """
            create table if not exists schema_migrations (
                version integer primary key,
                name text not null,
                checksum text not null,
                applied_at timestamptz not null default now()
            )
            """
        )
        applied = {r["version"]: r["checksum"] for r in await conn.fetch("select version, checksum from schema_migrations")}
        done = []
        for m in migrations:
            if m.version in applied:
                if applied[m.version] != m.checksum:
                    raise MigrationError(
                        f"migration {m.version:04d}_{m.name} changed after it was applied; add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "insert into schema_migrations (version, name, checksum) values ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
            done.append(m)
        return done
    finally:
        await conn.execute("select pg_advisory_unlock($1)", _LOCK_ID)


async def ensure_archive_partitions(conn: asyncpg.Connection | asyncpg.Pool) -> list[str]:
    """Create the monthly partitions of ``archive_records`` that should exist now (the
    current and the next month, and every month with rows in the default partition,
    which move into it); return the names of those created now. Idempotent; the
    services' role may call it (``archive_ensure_partitions()``, migration 0007).

    Raises ``asyncpg.LockNotAvailableError`` when the archive stayed locked for 10 s."""
    return [r[0] for r in await conn.fetch("select archive_ensure_partitions()")]


async def ensure_database(dsn: str) -> bool:
    """Create the database named in ``dsn`` if it does not exist; True if it was created.

    Connects to the server's ``postgres`` database to do so.
    """
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    if not name:
        raise ValueError(f"database URL names no database: {dsn}")
    admin_dsn = urlunsplit(parts._replace(path="/postgres"))
    conn = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval("select 1 from pg_database where datname = $1", name)
        if exists:
            return False
        await conn.execute(f'create database "{name}"')
        return True
    finally:
        await conn.close()
