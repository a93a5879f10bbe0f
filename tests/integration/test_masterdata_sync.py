"""Master-data sync between tills through the real broadcaster, broker and database."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from uuid import UUID

import pytest

from shared.fiscal import VatKey
from shared.models import Article, Customer, SyncMode
from tests.support import STRONG_PASSWORD, Environment, new_account_name, new_till, sell, wait_until
from till_agent.till import Till

pytestmark = pytest.mark.integration


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def bread(nr: str = "A1", price: int = 250, text: str = "Brot") -> Article:
    return Article(article_nr=nr, text=text, unit_price=price, vat_key=VatKey.REDUCED)


async def join(env: Environment, tmp_path: Path, account: str, mode: SyncMode, name: str, start: bool = True) -> Till:
    """A new till signed in to ``account`` in ``mode``, syncing unless ``start`` is False."""
    till = new_till(env, tmp_path, name=name)
    await till.sign_in(account, STRONG_PASSWORD)
    if mode != SyncMode.ARCHIVE:
        await till.set_sync_mode(True, mode)
    if start:
        till.start_sync()
    return till


async def new_account(env: Environment, tmp_path: Path) -> str:
    account = new_account_name()
    founder = new_till(env, tmp_path, name="founder")
    await founder.create_account(account, STRONG_PASSWORD)
    founder.close()
    return account


def price_of(till: Till, nr: str) -> int | None:
    entity = till.store.entity("article", nr)
    return None if entity is None or entity["deleted"] else entity["data"]["unit_price"]


async def archived_ids(env: Environment, till: Till) -> set[UUID]:
    conn = await env.db()
    try:
        rows = await conn.fetch("select record_id from archive_records where till_id = $1", till.store.identity().till_id)
    finally:
        await conn.close()
    return {r["record_id"] for r in rows}


async def stop(*tills: Till) -> None:
    for till in tills:
        await till.stop_sync()
        till.close()


async def test_a_price_change_reaches_the_masterdata_tills_only(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    archive = await join(env, tmp_path, account, SyncMode.ARCHIVE, "Kasse 1")
    second = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 2")
    third = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 3")
    try:
        second.save_entity(bread(price=250), now())
        await wait_until(lambda: price_of(third, "A1") == 250, what="the new article on the third till")
        second.save_entity(bread(price=275), now())
        await wait_until(lambda: price_of(third, "A1") == 275, what="the price change on the third till")
        assert third.store.entity("article", "A1")["version"] == 2
        await wait_until(lambda: second.store.entity("article", "A1")["version"] == 2, what="the new version on the second till")
        # the archive-mode till receives nothing, and its own articles stay its own
        archive.save_entity(bread("B7", 120, "Brezel"), now())
        sell(archive, 3)
        await wait_until(lambda: archive.status().pending == 0, what="the archive till's uploads")
        assert archive.store.entity("article", "A1") is None
        assert third.store.entity("article", "B7") is None
        recorded = {record_id for record_id, _, _ in archive.store.recorded()}
        await wait_until(lambda: _superset(env, archive, recorded), what="everything the archive till recorded in the archive")
    finally:
        await stop(archive, second, third)


async def _superset(env: Environment, till: Till, recorded: set[UUID]) -> bool:
    return recorded <= await archived_ids(env, till)
