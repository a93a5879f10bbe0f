"""``tillsync archive retention`` and ``purge-expired``: the retention period and the
monthly partitions of the archive (ops).

``retention`` reads as the services' role (``TILLSYNC_DATABASE_URL``); ``purge-expired``
drops the monthly partitions wholly past the retention period, as the owner
(``TILLSYNC_DATABASE_ADMIN_URL``), through ``archive_purge_expired()`` (migration 0007):
PostgreSQL itself refuses to drop anything inside the period. A record archived in
calendar year Y is kept until the end of year Y + retention years (GoBD; §147 (3), (4) AO).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import asyncpg
import typer
from rich.table import Table

from shared.settings import DatabaseAdminSettings, ServiceSettings
from tillsync.console import friendly, out

ARCHIVE_TIME_ZONE = ZoneInfo("Europe/Berlin")  # archive_time_zone() of migration 0007


@dataclass(frozen=True)
class Partition:
    """One monthly partition of ``archive_records`` (``month``: its first day, Europe/Berlin);
    ``deletable_from`` is the first instant at which its records are past the retention
    period (1 January, 00:00 Europe/Berlin)."""

    name: str
    month: dt.date
    deletable_from: dt.datetime
    records: int | None = None  # counted when purged


@dataclass(frozen=True)
class ArchiveStatus:
    retention_years: int
    partitions: list[Partition]
    expired: list[Partition]
    records_without_partition: int  # rows in archive_records_default (normally 0)


async def archive_status(database_url: str) -> ArchiveStatus:
    """The retention period and the partitions, read as any role that may read the archive."""
    conn = await asyncpg.connect(database_url)
    try:
        years = await conn.fetchval("select retention_years from archive_settings")
        rows = await conn.fetch("select * from archive_partitions() where month is not null order by month")
        in_default = await conn.fetchval("select count(*) from archive_records_default")
    finally:
        await conn.close()
    partitions = [Partition(r["partition_name"], r["month"], r["deletable_from"]) for r in rows]
    expired = [p for p, r in zip(partitions, rows) if r["expired"]]
    return ArchiveStatus(years, partitions, expired, in_default)


async def purge_expired(admin_database_url: str, dry_run: bool = False) -> list[Partition]:
    """Drop (with ``dry_run``: only list) the monthly partitions wholly past the retention
    period, with their number of records. Needs the owner's URL."""
    conn = await asyncpg.connect(admin_database_url)
    try:
        rows = await conn.fetch("select * from archive_purge_expired($1)", dry_run)
    except asyncpg.InsufficientPrivilegeError as exc:
        raise PermissionError(
            f"{exc}: the purge runs as the database owner; TILLSYNC_DATABASE_ADMIN_URL names user "
            f"{conn.get_settings().session_authorization!r}"
        ) from None
    finally:
        await conn.close()
    return [Partition(r["partition_name"], r["month"], r["deletable_from"], r["records"]) for r in rows]


def _month(p: Partition) -> str:
    return p.month.strftime("%Y-%m")


def _date(instant: dt.datetime) -> str:
    """The day an instant falls on in the archive's calendar (Europe/Berlin)."""
    return instant.astimezone(ARCHIVE_TIME_ZONE).strftime("%Y-%m-%d")


@friendly
def retention_command() -> None:
    """Show the retention period, the monthly partitions and those past the period."""
    status = asyncio.run(archive_status(ServiceSettings().database_url))
    out.print(f"retention: {status.retention_years} years from the end of each record's calendar year (Europe/Berlin)")
    if status.partitions:
        first, last = status.partitions[0], status.partitions[-1]
        out.print(f"monthly partitions: {len(status.partitions)}, {_month(first)} to {_month(last)}; "
                  f"the oldest may be deleted from {_date(first.deletable_from)}")
    if status.records_without_partition:
        out.print(f"records waiting in the default partition: {status.records_without_partition} "
                  "(the archive writer moves them into their month's partition)")
    if status.expired:
        out.print(f"past the retention period: {', '.join(_month(p) for p in status.expired)} "
                  "(`tillsync archive purge-expired` drops them)")
    else:
        out.print("no partition is past the retention period")


@friendly
def purge_expired_command(
    dry_run: bool = typer.Option(False, "--dry-run", help="only list what would be dropped"),
) -> None:
    """Drop the monthly partitions whose records are all past the retention period, as
    the owner (TILLSYNC_DATABASE_ADMIN_URL); nothing inside the period can be dropped."""
    purged = asyncio.run(purge_expired(DatabaseAdminSettings().admin_database_url, dry_run))
    if not purged:
        out.print("nothing to purge: no partition is past the retention period")
        return
    table = Table(title=("would drop" if dry_run else "dropped") + f" {len(purged)} partition(s)")
    for column in ("partition", "month", "records", "deletable from"):
        table.add_column(column)
    for p in purged:
        table.add_row(p.name, _month(p), str(p.records), _date(p.deletable_from))
    out.print(table)
