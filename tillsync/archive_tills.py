"""Which tills an archive command works on: all, one account's, or those the user named."""

from __future__ import annotations

from uuid import UUID

import asyncpg

_TILLS = """
select t.till_id, t.till_name, t.serial_number, t.account_id, a.account_name
from tills t join accounts a using (account_id)
where ($1::text is null or a.account_name = lower($1::text))
  and ($2::text is null or t.till_id::text = lower($2::text) or t.serial_number = $2::text
       or lower(t.till_name) = lower($2::text))
order by a.account_name, t.till_name, t.serial_number, t.till_id
"""


class TillSelectionError(ValueError):
    """No till, or (where one is needed) more than one, matches what the user named;
    ``details`` lists the candidates."""

    def __init__(self, message: str, details: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.details = details


def till_label(till: asyncpg.Record) -> str:
    """``Kasse 1 (serial S-1, id …, account shop@example.com)``."""
    return f"{till['till_name']} (serial {till['serial_number']}, id {till['till_id']}, account {till['account_name']})"


async def select_tills(
    conn: asyncpg.Connection, till: str | None = None, account: str | None = None, *, one: bool = False
) -> list[asyncpg.Record]:
    """The tills to work on, as rows (till_id, till_name, serial_number, account_id, account_name),
    ordered by account name, till name and serial number.

    ``till``: a till id, serial number or name (name case-insensitive); ``account``: an
    account name. Without ``till`` every till (of the account), possibly none. ``one``:
    exactly one till is wanted. Raises ``TillSelectionError`` for an unknown account, a
    ``till`` that matches no till (listing the account's tills when ``account`` is given),
    or, with ``one``, a ``till`` that matches several (listing them).
    """
    till = till.strip() if till is not None else None
    if account is not None and not await conn.fetchval(
        "select 1 from accounts where account_name = lower($1::text)", account.strip()
    ):
        raise TillSelectionError(f"no account {account!r}")
    account = account.strip() if account is not None else None
    rows = await conn.fetch(_TILLS, account, till)
    if till is None:
        return rows
    where = f" in account {account}" if account else ""
    if not rows:
        known = await conn.fetch(_TILLS, account, None) if account else []
        raise TillSelectionError(
            f"no till {till!r}{where}: name a till by its id, serial number or name"
            + ("; the account's tills:" if known else ""),
            tuple(till_label(r) for r in known),
        )
    if one and len(rows) > 1:
        raise TillSelectionError(
            f"{till!r} names {len(rows)} tills{where}: name one by its serial number or id"
            + ("" if account else ", or narrow with --account"),
            tuple(till_label(r) for r in rows),
        )
    return rows


# The archive's readers name everything through pg_catalog first, then public: set by the
# client at connection start, it overrides search paths set for the role or database.
ARCHIVE_SEARCH_PATH = "pg_catalog, public"

# What could hide archived rows from a reader (the same as migration 0009's
# archive_integrity_problems(), run here itself so that a replaced function cannot hide it).
_INTEGRITY = r"""
select pg_catalog.format('row security is on for the archive table %s: policies could hide its rows', c.relname)
from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
where n.nspname = 'public' and (c.relname like 'archive\_%' or c.relname = 'password_reset_audit')
  and (c.relrowsecurity or c.relforcerowsecurity)
union all
select pg_catalog.format('partition %s of archive_records is being detached: its records are hidden', c.relname)
from pg_catalog.pg_inherits i join pg_catalog.pg_class c on c.oid = i.inhrelid
where i.inhparent = 'public.archive_records'::pg_catalog.regclass and i.inhdetachpending
union all
select 'archive_records_default is not the default partition of archive_records'
where not exists (select 1 from pg_catalog.pg_inherits i join pg_catalog.pg_class c on c.oid = i.inhrelid
                  where i.inhparent = 'public.archive_records'::pg_catalog.regclass and c.relname = 'archive_records_default')
union all
select pg_catalog.format('the %s constraint of %s on (%s) is missing: the archive relies on it', want.kind, want.tab, want.cols)
from (values ('archive_record_keys', 'p', 'record_id'), ('archive_record_keys', 'u', 'till_id, till_seq'),
             ('archive_records', 'p', 'record_id, archived_at')) want (tab, kind, cols)
where not exists (
    select 1 from pg_catalog.pg_constraint k
    where k.conrelid = ('public.' || want.tab)::pg_catalog.regclass and k.contype = want.kind::"char"
      and (select pg_catalog.string_agg(a.attname, ', ' order by x.ord)
           from pg_catalog.unnest(k.conkey) with ordinality x (attnum, ord)
           join pg_catalog.pg_attribute a on a.attrelid = k.conrelid and a.attnum = x.attnum) = want.cols
)
union all
select pg_catalog.format('%s on this connection is not public.%s: another schema shadows the archive', t, t)
from pg_catalog.unnest(array['archive_records', 'archive_record_keys', 'archive_conflicts', 'tills', 'accounts']) t
where pg_catalog.to_regclass(t) is distinct from pg_catalog.to_regclass('public.' || t)
"""


async def connect_archive(database_url: str, decode_json: bool = True) -> asyncpg.Connection:
    """A connection for reading the archive: search path ``pg_catalog, public`` (whatever
    the role or database sets), ``jsonb`` decoded to Python objects if ``decode_json``.
    Raises ``OSError`` or ``asyncpg.PostgresError`` when the database cannot be reached."""
    from shared.db import init_connection

    conn = await asyncpg.connect(database_url, server_settings={"search_path": ARCHIVE_SEARCH_PATH})
    if decode_json:
        await init_connection(conn)
    return conn


async def archive_integrity_problems(conn: asyncpg.Connection) -> list[str]:
    """What keeps the archive's checks from seeing every archived row, one sentence each
    (empty: nothing): row security on an archive table, a partition being detached, the
    default partition gone, an exactly-once constraint missing or changed, or a table of
    another schema shadowing the archive on this connection's search path. Read from
    ``pg_catalog`` here (migration 0009's DDL guard refuses the same changes)."""
    return [r[0] for r in await conn.fetch(_INTEGRITY)]


async def tills_without_row(conn: asyncpg.Connection) -> list[UUID]:
    """Tills with archived records (``archive_record_keys``) that ``tills`` does not list."""
    return [
        r["till_id"]
        for r in await conn.fetch(
            "select distinct k.till_id from archive_record_keys k where not exists "
            "(select 1 from tills t where t.till_id = k.till_id)"
        )
    ]
