"""The legal archive enforced by PostgreSQL (migration 0007): the services' role may only
read and insert the archive; archive_records is partitioned by month; nothing inside the
retention period (default 10 years from the end of the record's calendar year) can be
deleted, only whole expired months can be purged."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import uuid
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner, Result

from shared.db import MIGRATIONS_DIR, load_migrations, migrate
from shared.settings import SERVICE_DATABASE_ROLE
from tests.support import (
    Environment, drop_database, fetchval, new_account_name, sell, signed_in_till, wait_until,
)
from tillsync.archive_verify import verify_till
from tillsync.cli import app
from tillsync.setup import SetupError, SetupSettings, setup

pytestmark = pytest.mark.integration

BERLIN = ZoneInfo("Europe/Berlin")  # the archive's calendar (archive_time_zone())

# Every archive table: named archive_*, password_reset_audit, or made append-only by a
# trigger, with every partition of each (whatever a later migration adds).
ARCHIVE_TABLES = r"""
select c.oid, c.relname::text as name, c.relispartition as partition
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where n.nspname = 'public' and c.relkind in ('r', 'p')
  and (c.relname like 'archive\_%' or c.relname = 'password_reset_audit'
       or exists (select 1 from pg_trigger t join pg_proc p on p.oid = t.tgfoid
                  where t.tgrelid = c.oid and p.proname like '%append_only%'))
order by c.relname
"""

# The privileges that would let the role change or remove archive rows (also through
# PUBLIC, another role, or a single column).
MAY_CHANGE = """
select has_any_column_privilege($1, $2::oid, 'UPDATE') as update_, has_table_privilege($1, $2::oid, 'DELETE') as delete_,
       has_table_privilege($1, $2::oid, 'TRUNCATE') as truncate_, has_any_column_privilege($1, $2::oid, 'REFERENCES') as references_,
       has_table_privilege($1, $2::oid, 'TRIGGER') as trigger_
"""

INSERT_AT = """
insert into archive_records (record_id, account_id, till_id, till_seq, kind, schema_version, content_sha256, payload,
                             recorded_at, archived_at)
values ($1, $2, $3, $4, 'receipt', 1, '\\x00', '{"test": true}', $5, $5)
returning tableoid::regclass::text
"""


def partition_of(at: dt.datetime) -> str:
    """The name of the monthly partition of an instant (calendar months in Europe/Berlin)."""
    return f"archive_records_{at.astimezone(BERLIN):%Y_%m}"


def this_year() -> int:
    return dt.datetime.now(BERLIN).year


async def insert_at(conn: asyncpg.Connection, archived_at: dt.datetime, record_id: uuid.UUID | None = None,
                    till_id: uuid.UUID | None = None, till_seq: int = 1) -> str:
    """As the owner (only the owner may date a row back): archive a row at ``archived_at``; its partition."""
    return await conn.fetchval(INSERT_AT, record_id or uuid.uuid4(), uuid.uuid4(), till_id or uuid.uuid4(), till_seq, archived_at)


async def partitions(env: Environment) -> set[str]:
    """The names of the partitions of archive_records."""
    conn = await env.db()
    try:
        return {r[0] for r in await conn.fetch("select partition_name from archive_partitions()")}
    finally:
        await conn.close()


async def cli(env: Environment, *args: str) -> Result:
    """``tillsync ARGS`` against ``env``'s database (in a thread: the CLI runs its own event loop)."""
    return await asyncio.to_thread(
        CliRunner().invoke, app, list(args),
        env={"TILLSYNC_DATABASE_URL": env.settings.database_url,
             "TILLSYNC_DATABASE_ADMIN_URL": env.settings.admin_database_url, "COLUMNS": "1000"},
    )


@pytest.fixture(scope="module")
async def archived(env, services, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A receipt archived through the services: (record_id, archived_at)."""
    till = await signed_in_till(env, tmp_path_factory.mktemp("immutable"), new_account_name(), create=True)
    till.start_sync()
    try:
        sell(till, 1)
        till_id = till.store.identity().till_id
        await wait_until(lambda: fetchval(env, "select count(*) from archive_records where till_id = $1", till_id), what="archived")
    finally:
        await till.stop_sync()
        till.close()
    conn = await env.db()
    try:
        row = await conn.fetchrow("select record_id, archived_at from archive_records where till_id = $1", till_id)
    finally:
        await conn.close()
    return row["record_id"], row["archived_at"]


async def test_the_services_role_cannot_update_or_delete_an_archive_row(env: Environment, archived) -> None:  # type: ignore[no-untyped-def]
    record_id, archived_at = archived
    partition = partition_of(archived_at)
    conn = await env.db()
    try:
        assert await conn.fetchval("select current_user") == SERVICE_DATABASE_ROLE
        before = await conn.fetchrow("select * from archive_records where record_id = $1", record_id)
        for statement in (
            "update archive_records set payload = '{}'::jsonb where record_id = $1",
            "delete from archive_records where record_id = $1",
            f"update {partition} set payload = '{{}}'::jsonb where record_id = $1",
            f"delete from {partition} where record_id = $1",
            "delete from archive_record_keys where record_id = $1",
            "delete from archive_conflicts where record_id = $1",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                await conn.execute(statement, record_id)
        for statement in (
            "truncate archive_records", f"truncate {partition}", "truncate archive_records_default",
            "delete from password_reset_audit", "update archive_settings set retention_years = 100",
            "drop table archive_records_default", "alter table archive_records detach partition archive_records_default",
            "create table archive_copy (x int)", "select archive_purge_expired()",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
        # nor can it date a new row back into a month past the retention period
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="time of archiving"):
            await conn.execute(INSERT_AT, uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), 1, dt.datetime(2001, 1, 1, tzinfo=dt.UTC))
        assert await conn.fetchrow("select * from archive_records where record_id = $1", record_id) == before
    finally:
        await conn.close()


async def test_the_owner_is_refused_by_the_triggers_on_every_partition(env: Environment, archived) -> None:  # type: ignore[no-untyped-def]
    record_id, archived_at = archived
    partition = partition_of(archived_at)
    conn = await env.admin_db()
    try:
        for statement in (
            "update archive_records set payload = '{}'::jsonb where record_id = $1",
            "delete from archive_records where record_id = $1",
            f"update {partition} set payload = '{{}}'::jsonb where record_id = $1",
            f"delete from {partition} where record_id = $1",
            "delete from archive_record_keys where record_id = $1",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="is append-only"):
                await conn.execute(statement, record_id)
        for statement in (f"truncate {partition}", "truncate archive_records_default", "truncate archive_record_keys",
                          "truncate password_reset_audit", "truncate archive_settings"):
            with pytest.raises(asyncpg.PostgresError, match="is append-only"):
                await conn.execute(statement)
        assert await conn.fetchval("select count(*) from archive_records where record_id = $1", record_id) == 1
    finally:
        await conn.close()


async def test_the_services_role_may_only_read_and_insert_the_archive(env: Environment, archived) -> None:  # type: ignore[no-untyped-def]
    conn = await env.admin_db()
    try:
        # a later migration's tables: ordinary ones are usable, archive ones insert-only
        await conn.execute("create table later_ordinary (x int); create table archive_later (x int)")
        # and a grant of update/delete on an archive table is taken back at once
        await conn.execute(f"grant update, delete, truncate on archive_records, archive_conflicts to {SERVICE_DATABASE_ROLE}")
        await conn.execute("grant update (payload) on archive_records_default to public")
        tables = await conn.fetch(ARCHIVE_TABLES)
        names = {t["name"] for t in tables}
        assert {"archive_records", "archive_record_keys", "archive_conflicts", "archive_settings", "password_reset_audit",
                "archive_records_default", "archive_later", partition_of(dt.datetime.now(dt.UTC))} <= names
        assert sum(t["partition"] for t in tables) >= 3  # default, this month, next month
        for table in tables:
            may = await conn.fetchrow(MAY_CHANGE, SERVICE_DATABASE_ROLE, table["oid"])
            assert not any(may.values()), f"{SERVICE_DATABASE_ROLE} may change {table['name']}: {dict(may)}"
        for name in ("archive_records", "archive_record_keys", "archive_conflicts", "password_reset_audit"):
            assert await conn.fetchval("select has_table_privilege($1, $2, 'SELECT, INSERT')", SERVICE_DATABASE_ROLE, name), name
        assert await conn.fetchval("select has_table_privilege($1, 'archive_settings', 'SELECT')", SERVICE_DATABASE_ROLE)
        assert not await conn.fetchval("select has_table_privilege($1, 'archive_settings', 'INSERT')", SERVICE_DATABASE_ROLE)
        for name in ("masterdata_entities", "handover_receipts", "password_reset_requests", "later_ordinary"):
            assert await conn.fetchval("select has_table_privilege($1, $2, 'SELECT, INSERT, UPDATE, DELETE')",
                                       SERVICE_DATABASE_ROLE, name), name
        # the archive's tills are known through accounts and tills: never deleted by the services
        for name in ("accounts", "tills"):
            assert await conn.fetchval("select has_table_privilege($1, $2, 'SELECT, INSERT, UPDATE')", SERVICE_DATABASE_ROLE, name)
            assert not await conn.fetchval("select has_table_privilege($1, $2, 'DELETE')", SERVICE_DATABASE_ROLE, name)
        for column in ("till_id", "account_id", "serial_number"):  # what finds a till's records
            assert not await conn.fetchval("select has_column_privilege($1, 'tills', $2, 'UPDATE')", SERVICE_DATABASE_ROLE, column)
        role = await conn.fetchrow(
            """
            select r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolbypassrls,
                   has_schema_privilege(r.rolname, 'public', 'CREATE') as create_in_schema,
                   has_database_privilege(r.rolname, current_database(), 'CREATE') as create_in_database,
                   (select count(*) from pg_class c where c.relowner = r.oid) as owns,
                   has_function_privilege(r.rolname, 'archive_purge_expired(boolean)', 'EXECUTE') as may_purge,
                   has_function_privilege(r.rolname, 'archive_ensure_partitions()', 'EXECUTE') as may_ensure
            from pg_roles r where r.rolname = $1
            """,
            SERVICE_DATABASE_ROLE,
        )
        assert dict(role) == {"rolsuper": False, "rolcreaterole": False, "rolcreatedb": False, "rolbypassrls": False,
                              "create_in_schema": False, "create_in_database": False, "owns": 0,
                              "may_purge": False, "may_ensure": True}
    finally:
        await conn.execute("drop table later_ordinary")
        await conn.close()


async def test_a_row_lands_in_its_months_partition_and_ensuring_partitions_is_idempotent(env: Environment) -> None:
    conn = await env.db()  # the services' role
    try:
        assert await conn.fetch("select archive_ensure_partitions()") == []  # all there already
        now = await conn.fetchval("select now()")
        next_month = (now.astimezone(BERLIN).replace(day=1) + dt.timedelta(days=32)).replace(day=15)
        assert {partition_of(now), partition_of(next_month), "archive_records_default"} <= await partitions(env)
        async with conn.transaction():
            landed = await conn.fetchval(
                """
                with k as (insert into archive_record_keys (record_id, till_id, till_seq, content_sha256)
                           values ($1, $2, 1, '\\x01') returning record_id)
                insert into archive_records (record_id, account_id, till_id, till_seq, kind, schema_version, content_sha256,
                                             payload, recorded_at)
                select record_id, $3, $2, 1, 'receipt', 1, '\\x01', '{}', now() from k
                returning tableoid::regclass::text
                """,
                uuid.uuid4(), uuid.uuid4(), uuid.uuid4(),
            )
            assert landed == partition_of(await conn.fetchval("select now()"))
    finally:
        await conn.close()


async def test_rows_that_arrived_without_their_partition_move_into_it(env: Environment) -> None:
    month = dt.datetime(this_year() - 10, 1, 15, 12, tzinfo=BERLIN)  # inside the retention period
    admin = await env.admin_db()
    try:
        record_id = uuid.uuid4()
        assert await insert_at(admin, month, record_id) == "archive_records_default"
    finally:
        await admin.close()
    conn = await env.db()
    try:
        assert [r[0] for r in await conn.fetch("select archive_ensure_partitions()")] == [partition_of(month)]
        assert await conn.fetchval("select tableoid::regclass::text from archive_records where record_id = $1", record_id) == partition_of(month)
        assert await conn.fetchval("select count(*) from archive_records_default") == 0
        assert await conn.fetch("select archive_ensure_partitions()") == []
        assert await conn.fetchval("select count(*) from archive_record_keys where record_id = $1", record_id) == 1
    finally:
        await conn.close()


async def test_nothing_inside_the_retention_period_can_be_dropped(env: Environment, archived) -> None:  # type: ignore[no-untyped-def]
    _, archived_at = archived
    partition = partition_of(archived_at)
    conn = await env.admin_db()
    try:
        for statement, reason in (
            (f"drop table {partition}", "inside the retention period"),
            ("drop table archive_records_default", "part of the archive"),
            ("drop table archive_record_keys", "part of the archive"),
            ("drop table archive_conflicts", "part of the archive"),
            ("drop table password_reset_audit", "part of the archive"),
            ("drop table archive_records", "part of the archive"),
            (f"alter table archive_records detach partition {partition}", "detaching a partition of the archive is refused"),
            ("alter table archive_records detach partition archive_records_default", "detaching a partition"),
            (f"alter table archive_records detach partition {partition} concurrently", "detaching a partition"),
            ("alter table archive_records alter column payload type jsonb using payload || '{}'::jsonb",
             "rewriting the archive table"),
            ("alter table archive_records detach /**/ partition archive_records_default", "not the default partition"),
            ("alter table archive_records enable row level security", "row security is on"),
            ("alter table archive_record_keys drop constraint archive_record_keys_till_id_till_seq_key",
             "constraint archive_record_keys_till_id_till_seq_key of archive_record_keys is missing"),
            ("alter table archive_record_keys alter column content_sha256 type bytea using content_sha256 || ''::bytea",
             "rewriting the archive table archive_record_keys"),
            (f"alter table {partition} rename to old_records", "is not archive_records_default nor one calendar month"),
            ("alter table archive_conflicts rename to old_conflicts", "cannot be dropped, renamed or moved"),
            (f"alter table {partition} disable trigger archive_records_row_append_only", "cannot be disabled"),
            ("alter table archive_records disable trigger all", "cannot be disabled"),
            ("drop trigger archive_records_append_only on archive_records", "dropping the trigger"),
            ("alter table archive_records drop column payload", "dropping the table column payload"),
            ("drop function archive_is_append_only() cascade", "dropping the trigger"),
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match=reason):
                await conn.execute(statement)
        assert await conn.fetchval("select count(*) from archive_records where archived_at = $1", archived_at) >= 1
    finally:
        await conn.close()


async def test_expired_months_are_purged_and_nothing_else(env: Environment) -> None:
    year = this_year()
    expired_at = dt.datetime(year - 11, 12, 31, 23, 30, tzinfo=BERLIN)  # kept until the end of year - 1
    kept_at = dt.datetime(year - 10, 1, 1, 0, 30, tzinfo=BERLIN)  # kept until the end of this year
    expired_id, till_id = uuid.uuid4(), uuid.uuid4()
    admin = await env.admin_db()
    try:
        await insert_at(admin, expired_at, expired_id, till_id, 1)
        await insert_at(admin, kept_at, till_id=till_id, till_seq=2)
        await admin.fetch("select archive_ensure_partitions()")
        # past the retention period a row still cannot be deleted: only its whole month dropped
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="is append-only"):
            await admin.execute("delete from archive_records where record_id = $1", expired_id)
    finally:
        await admin.close()
    status = await cli(env, "archive", "retention")
    assert status.exit_code == 0, status.output
    assert "retention: 10 years" in status.output and f"past the retention period: {year - 11}-12" in status.output
    dry = await cli(env, "archive", "purge-expired", "--dry-run")
    assert dry.exit_code == 0 and "would drop 1 partition(s)" in dry.output, dry.output
    assert await fetchval(env, "select count(*) from archive_records where record_id = $1", expired_id) == 1
    purged = await cli(env, "archive", "purge-expired")
    assert purged.exit_code == 0, purged.output
    line = next(line for line in purged.output.splitlines() if partition_of(expired_at) in line)
    assert f"{year - 11}-12" in line and " 1 " in line and f"{year}-01-01" in line, purged.output
    names = await partitions(env)
    assert partition_of(expired_at) not in names and partition_of(kept_at) in names
    assert await fetchval(env, "select count(*) from archive_records where till_id = $1", till_id) == 1
    # the key stays: the purged record is never archived again
    conn = await env.db()
    try:
        # verify counts it as purged, not as a broken link (the kept row, made by hand here, is no valid record)
        report = await verify_till(conn, {"till_id": till_id, "till_name": "K", "serial_number": "K", "account_name": "A"})
        assert report.purged == 1 and report.first_broken is not None and report.first_broken.till_seq == 2
        with pytest.raises(asyncpg.UniqueViolationError, match="archived already"):
            await conn.execute(
                "insert into archive_records (record_id, account_id, till_id, till_seq, kind, schema_version, content_sha256, "
                "payload, recorded_at) values ($1, $2, $3, 1, 'receipt', 1, '\\x00', '{}', now())",
                expired_id, uuid.uuid4(), till_id,
            )
    finally:
        await conn.close()
    again = await cli(env, "archive", "purge-expired")
    assert again.exit_code == 0 and "nothing to purge" in again.output, again.output
    denied = await asyncio.to_thread(
        CliRunner().invoke, app, ["archive", "purge-expired"],
        env={"TILLSYNC_DATABASE_ADMIN_URL": env.settings.database_url},  # the services' role may not purge
    )
    assert denied.exit_code == 1 and "permission denied" in denied.stderr, denied.output


async def test_a_record_is_archived_once_across_months(env: Environment) -> None:
    record_id, till_id = uuid.uuid4(), uuid.uuid4()
    first = dt.datetime(this_year() - 10, 1, 10, tzinfo=BERLIN)
    later = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    conn = await env.admin_db()
    try:
        await insert_at(conn, first, record_id, till_id, 7)
        with pytest.raises(asyncpg.UniqueViolationError, match="archived already"):
            await insert_at(conn, later, record_id, till_id, 7)  # the same record again, in another month
        with pytest.raises(asyncpg.UniqueViolationError):
            await insert_at(conn, later, uuid.uuid4(), till_id, 7)  # another record at the same till_seq
    finally:
        await conn.close()


async def test_the_migration_moves_archived_rows_into_monthly_partitions(infra, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Rows archived before migration 0007 keep their content and time, land in their month
    (Europe/Berlin: 23:30 UTC on 31 December is already January) and get their keys."""
    before = tmp_path / "before-0007"
    before.mkdir()
    for migration in sorted(MIGRATIONS_DIR.glob("*.sql")):
        if int(migration.name[:4]) < 7:
            shutil.copy(migration, before)
    name = f"tillsync_test_move_{uuid.uuid4().hex[:8]}"
    server = await asyncpg.connect(infra.database_url)
    await server.execute(f'create database "{name}"')
    await server.close()
    conn = await asyncpg.connect(infra.database_url_for(name))
    try:
        await migrate(conn, before)
        till_id = uuid.uuid4()
        times = [dt.datetime(2025, 12, 31, 23, 30, tzinfo=dt.UTC), dt.datetime(2025, 12, 31, 22, 30, tzinfo=dt.UTC),
                 dt.datetime(2014, 3, 1, 12, tzinfo=dt.UTC)]
        ids = [uuid.uuid4() for _ in times]
        for seq, (record_id, at) in enumerate(zip(ids, times), 1):
            await insert_at(conn, at, record_id, till_id, seq)
        rows_before = await conn.fetch("select * from archive_records order by till_seq")
        assert [m.version for m in await migrate(conn)] == [m.version for m in load_migrations() if m.version >= 7]
        rows_after = await conn.fetch("select * from archive_records order by till_seq")
        # the same rows; later migrations may add columns (0008: the hash chain, empty for them)
        assert [{k: r[k] for k in rows_before[0].keys()} for r in rows_after] == [dict(r) for r in rows_before]
        placed = dict(await conn.fetch("select record_id, tableoid::regclass::text from archive_records"))
        assert placed == {ids[0]: "archive_records_2026_01", ids[1]: "archive_records_2025_12", ids[2]: "archive_records_2014_03"}
        assert await conn.fetchval("select count(*) from archive_record_keys where till_id = $1", till_id) == 3
        assert await conn.fetchval("select to_regclass('archive_records_unpartitioned')") is None
        with pytest.raises(asyncpg.UniqueViolationError):
            await insert_at(conn, dt.datetime.now(dt.UTC), uuid.uuid4(), till_id, 2)
    finally:
        await conn.close()
        await drop_database(infra, name)


async def test_retention_is_configurable_never_below_ten_years_nor_shortened_over_protected_records(
    fresh_env: Environment, tmp_path: Path
) -> None:
    assert await fetchval(fresh_env, "select retention_years from archive_settings") == 10
    with pytest.raises(ValidationError, match="archive_retention_years"):
        SetupSettings(archive_retention_years=9)
    admin = await fresh_env.admin_db()
    try:
        with pytest.raises(asyncpg.CheckViolationError):
            await admin.execute("update archive_settings set retention_years = 9")
        # a month past 10 years but inside 12
        at = dt.datetime(this_year() - 11, 6, 15, tzinfo=BERLIN)
        await insert_at(admin, at)
        await admin.fetch("select archive_ensure_partitions()")
    finally:
        await admin.close()
    lines = await setup(fresh_env.settings.model_copy(update={"archive_retention_years": 12}))
    assert any("archive retention 12 years" in line for line in lines), lines
    assert any(f"the services connect as {SERVICE_DATABASE_ROLE}" in line for line in lines), lines
    assert await fetchval(fresh_env, "select retention_years from archive_settings") == 12
    purged = await cli(fresh_env, "archive", "purge-expired")
    assert purged.exit_code == 0 and "nothing to purge" in purged.output, purged.output
    admin = await fresh_env.admin_db()
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="inside the retention period"):
            await admin.execute(f"drop table {partition_of(at)}")
    finally:
        await admin.close()
    with pytest.raises(SetupError, match="cannot be shortened from 12 to 10 years"):
        await setup(fresh_env.settings.model_copy(update={"archive_retention_years": 10}))
    assert await fetchval(fresh_env, "select retention_years from archive_settings") == 12
