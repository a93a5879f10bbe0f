"""The plain-SQL migrations runner against a real PostgreSQL."""

from __future__ import annotations

import shutil
import uuid

import asyncpg
import pytest

from shared.db import MIGRATIONS_DIR, MigrationError, load_migrations, migrate
from tests.support import drop_database

pytestmark = pytest.mark.integration


@pytest.fixture
async def empty_database(infra):  # type: ignore[no-untyped-def]
    name = f"tillsync_test_empty_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(infra.database_url)
    await admin.execute(f'create database "{name}"')
    await admin.close()
    conn = await asyncpg.connect(infra.database_url_for(name))
    yield conn
    await conn.close()
    await drop_database(infra, name)


async def test_migrations_apply_once_and_are_recorded(empty_database) -> None:  # type: ignore[no-untyped-def]
    applied = await migrate(empty_database)
    assert [m.version for m in applied] == [m.version for m in load_migrations()]
    assert await migrate(empty_database) == []
    rows = await empty_database.fetch("select version, checksum from schema_migrations order by version")
    assert [(r["version"], r["checksum"]) for r in rows] == [(m.version, m.checksum) for m in load_migrations()]
    tables = {r["tablename"] for r in await empty_database.fetch("select tablename from pg_tables where schemaname = 'public'")}
    assert {"accounts", "tills", "archive_records", "archive_conflicts", "sign_in_failures"} <= tables


async def test_a_changed_migration_is_refused(empty_database, tmp_path) -> None:  # type: ignore[no-untyped-def]
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    await migrate(empty_database, directory)
    first = sorted(directory.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited after it was applied\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(empty_database, directory)


async def test_archive_keys_are_enforced_by_the_database(empty_database) -> None:  # type: ignore[no-untyped-def]
    await migrate(empty_database)
    insert = """
        insert into archive_records (record_id, account_id, till_id, till_seq, kind, schema_version,
                                     content_sha256, payload, recorded_at)
        values ($1, $2, $3, $4, 'receipt', 1, '\\x00', '{}', now())
    """
    account, till = uuid.uuid4(), uuid.uuid4()
    record = uuid.uuid4()
    await empty_database.execute(insert, record, account, till, 1)
    with pytest.raises(asyncpg.UniqueViolationError):
        await empty_database.execute(insert, record, account, till, 2)  # same record_id
    with pytest.raises(asyncpg.UniqueViolationError):
        await empty_database.execute(insert, uuid.uuid4(), account, till, 1)  # same (till_id, till_seq)
