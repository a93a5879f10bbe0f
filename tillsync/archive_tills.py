"""Which tills an archive command works on: all, one account's, or one named by the user."""

from __future__ import annotations

import asyncpg

_TILLS = """
select t.till_id, t.till_name, t.serial_number, t.account_id, a.account_name
from tills t join accounts a using (account_id)
where ($1::text is null or a.account_name = lower($1::text))
  and ($2::text is null or t.till_id::text = lower($2::text) or t.serial_number = $2::text
       or lower(t.till_name) = lower($2::text))
order by a.account_name, t.till_name, t.serial_number
"""


class TillSelectionError(ValueError):
    """No till, or more than one, matches what the user named; ``details`` lists candidates."""

    def __init__(self, message: str, details: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.details = details


def till_label(till: asyncpg.Record) -> str:
    """``Kasse 1 (serial S-1, account shop@example.com)``."""
    return f"{till['till_name']} (serial {till['serial_number']}, account {till['account_name']})"


async def select_tills(conn: asyncpg.Connection, till: str | None = None, account: str | None = None) -> list[asyncpg.Record]:
    """The tills to work on, as rows (till_id, till_name, serial_number, account_id, account_name).

    ``till``: a till id, serial number or name (case-insensitive); ``account``: an account
    name. Without ``till`` every till (of the account). Raises ``TillSelectionError`` for
    an unknown account, no matching till, or a till name that is not unique.
    """
    if account is not None and not await conn.fetchval(
        "select 1 from accounts where account_name = lower($1::text)", account
    ):
        raise TillSelectionError(f"no account {account!r}")
    rows = await conn.fetch(_TILLS, account, till)
    where = f" in account {account}" if account else ""
    if till is None:
        if not rows:
            raise TillSelectionError(f"no tills{where}")
        return rows
    if not rows:
        raise TillSelectionError(f"no till {till!r}{where}: name a till by its id, serial number or name")
    if len(rows) > 1:
        raise TillSelectionError(
            f"{till!r} names {len(rows)} tills{where}; name one by its id",
            tuple(f"{r['till_id']}: {till_label(r)}" for r in rows),
        )
    return rows
