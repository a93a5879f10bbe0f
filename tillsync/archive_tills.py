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


async def archive_integrity_problems(conn: asyncpg.Connection) -> list[str]:
    """What keeps the archive's checks from seeing every archived row, one sentence each
    (empty: nothing): row security on an archive table, a partition being detached, the
    default partition gone, an exactly-once constraint missing (migration 0009), or a
    table of another schema shadowing the archive on this connection's search path."""
    problems = [r[0] for r in await conn.fetch("select * from public.archive_integrity_problems()")]
    for table in ("archive_records", "archive_record_keys", "archive_conflicts", "tills", "accounts"):
        if await conn.fetchval("select to_regclass($1) is distinct from to_regclass('public.' || $1)", table):
            problems.append(f"{table} on this connection is not public.{table}: another schema shadows the archive")
    return problems


async def tills_without_row(conn: asyncpg.Connection) -> list[UUID]:
    """Tills with archived records (``archive_record_keys``) that ``tills`` does not list."""
    return [
        r["till_id"]
        for r in await conn.fetch(
            "select distinct k.till_id from archive_record_keys k where not exists "
            "(select 1 from tills t where t.till_id = k.till_id)"
        )
    ]
