"""Master-data sync between tills through the real broadcaster, broker and database."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from uuid import UUID

import aio_pika
import pytest
from typer.testing import CliRunner

from shared.fiscal import VatKey
from shared.models import Article, Customer, SyncMode
from shared.topology import DOWNLOAD_EXCHANGE, till_direct_routing_key, till_queue_name
from tillsync.cli import app
from tests.support import STRONG_PASSWORD, Environment, fetchval, new_account_name, new_till, sell, wait_until
from till_agent.store import TillStore
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


async def cloud_entities(env: Environment, account_id: UUID) -> dict[tuple[str, str], tuple[int, bool, object]]:
    conn = await env.db()
    try:
        rows = await conn.fetch(
            "select entity_kind, entity_key, version, deleted, data from masterdata_entities where account_id = $1", account_id
        )
    finally:
        await conn.close()
    return {(r["entity_kind"], r["entity_key"]): (r["version"], r["deleted"], r["data"]) for r in rows}


async def archived_articles(env: Environment, nr: str) -> list[dict]:
    conn = await env.db()
    try:
        rows = await conn.fetch(
            """
            select payload->'record' as record from archive_records
            where kind = 'masterdata' and payload->'record'->>'entity_key' = $1 order by archived_at
            """,
            nr,
        )
    finally:
        await conn.close()
    return [r["record"] for r in rows]


async def two_tills_sharing(env: Environment, tmp_path: Path, article: Article) -> tuple[Till, Till]:
    """Two master-data tills of a new account that both know ``article`` (version 1); the
    second is then taken offline."""
    account = await new_account(env, tmp_path)
    online = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 1")
    offline = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 2")
    online.save_entity(article, now())
    await wait_until(lambda: price_of(offline, article.article_nr) == article.unit_price, what="the article on the second till")
    await offline.stop_sync()
    return online, offline


async def test_edits_on_different_fields_while_offline_are_rebased(services, env: Environment, tmp_path: Path) -> None:
    online, offline = await two_tills_sharing(env, tmp_path, bread("R1", 250, "Brot"))
    try:
        online.save_entity(bread("R1", 270, "Brot"), now())  # the price, online
        offline.save_entity(bread("R1", 250, "Bauernbrot"), now())  # the text, offline
        await wait_until(lambda: online.status().pending == 0, what="the online change uploaded")
        offline.start_sync()
        merged = {"text": "Bauernbrot", "unit_price": 270}

        def has_merged(till: Till) -> bool:
            entity = till.store.entity("article", "R1")
            return entity is not None and {k: entity["data"][k] for k in merged} == merged and not entity["pending"]

        await wait_until(lambda: has_merged(offline) and has_merged(online), what="the rebased article on both tills")
        assert online.store.entity("article", "R1")["version"] == offline.store.entity("article", "R1")["version"] == 3
        assert offline.differences() == []
        # both edits and the rebased change are in the archive
        records = await archived_articles(env, "R1")
        texts_prices = [(r["data"]["text"], r["data"]["unit_price"]) for r in records]
        assert ("Brot", 270) in texts_prices and ("Bauernbrot", 250) in texts_prices and ("Bauernbrot", 270) in texts_prices
    finally:
        await stop(online, offline)


async def test_edits_of_the_same_field_keep_the_cloud_value_and_list_the_difference(
    services, env: Environment, tmp_path: Path
) -> None:
    online, offline = await two_tills_sharing(env, tmp_path, bread("P1", 250))
    account = offline.store.identity().account_name
    try:
        online.save_entity(bread("P1", 280), now())
        lost_edit = offline.save_entity(bread("P1", 300), now())
        await wait_until(lambda: online.status().pending == 0, what="the online change uploaded")
        offline.start_sync()
        await wait_until(lambda: offline.differences(), what="the difference listed on the offline till")
        [difference] = offline.differences()
        assert (difference.entity_key, difference.local_data["unit_price"], difference.cloud_data["unit_price"]) == ("P1", 300, 280)
        assert "version" in difference.reason
        assert price_of(offline, "P1") == 280 and price_of(online, "P1") == 280
        assert {r["data"]["unit_price"] for r in await archived_articles(env, "P1")} == {250, 280, 300}
        account_id = offline.store.identity().account_id
        conn = await env.db()
        try:
            conflict = await conn.fetchrow("select * from masterdata_conflicts where account_id = $1", account_id)
        finally:
            await conn.close()
        assert conflict["entity_key"] == "P1" and conflict["current_version"] == 2
        assert lost_edit.base_version == 1
        # the owner and the on-call engineer see it on the command line
        env_vars = {"TILLSYNC_DATABASE_URL": env.settings.database_url, "COLUMNS": "250"}
        listed = await asyncio.to_thread(
            CliRunner().invoke, app, ["till", "differences", "--data-dir", str(offline.store.data_dir)], env=env_vars
        )
        assert listed.exit_code == 0 and "P1" in listed.output and '"unit_price": 300' in listed.output, listed.output
        ops = await asyncio.to_thread(CliRunner().invoke, app, ["ops", "masterdata-conflicts", account], env=env_vars)
        assert ops.exit_code == 0 and "article P1" in ops.output and "version 2" in ops.output, ops.output
        # the owner chooses the till's price: it becomes a new change on top of the cloud's
        assert offline.resolve("till", now(), "article", "P1") == 1
        await wait_until(lambda: price_of(online, "P1") == 300, what="the owner's choice on the other till")
        assert offline.differences() == []
    finally:
        await stop(online, offline)


async def test_a_till_with_an_old_article_list_joins_without_overwriting(services, env: Environment, tmp_path: Path) -> None:
    """The seed's warning: prices changed and an article deleted; a till with the old list joins."""
    account = await new_account(env, tmp_path)
    first = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 1")
    second = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 2")
    old_list = [bread(f"S{i}", 100 + i) for i in range(20)]
    try:
        for article in old_list:
            first.save_entity(article, now())
        await wait_until(lambda: len(second.store.masterdata("article")) == 20, what="the article list on the second till")
        first.save_entity(bread("S1", 555), now())
        second.save_entity(bread("S2", 666), now())
        second.delete_entity("article", "S3", now())
        await wait_until(
            lambda: price_of(first, "S2") == 666 and price_of(second, "S1") == 555 and price_of(first, "S3") is None,
            what="the changes on both tills",
        )
        account_id = first.store.identity().account_id
        before = await cloud_entities(env, account_id)
        # the new till imports the old list before it joins, then joins in master-data mode
        newcomer = new_till(env, tmp_path, name="Kasse 3")
        for article in old_list:
            newcomer.save_entity(article, now())
        await newcomer.sign_in(account, STRONG_PASSWORD)
        await newcomer.set_sync_mode(True, SyncMode.ARCHIVE_MASTERDATA)
        newcomer.start_sync()
        await wait_until(lambda: newcomer.status().pending == 0 and not newcomer.relay.feed.status().catching_up,
                         what="the new till caught up and uploaded")
        await wait_until(lambda: len(newcomer.differences()) == 3, what="three differences listed")
        assert await cloud_entities(env, account_id) == before, "a cloud entity was overwritten"
        assert {d.entity_key for d in newcomer.differences()} == {"S1", "S2", "S3"}
        assert newcomer.store.entity("article", "S3")["deleted"] is True
        assert price_of(newcomer, "S1") == 555 and price_of(newcomer, "S2") == 666
        assert newcomer.store.masterdata_state_hash() == first.store.masterdata_state_hash()
        await stop(newcomer)
    finally:
        await stop(first, second)


async def test_a_new_till_holds_its_imported_changes_until_it_has_the_cloud_data(
    services, env: Environment, tmp_path: Path
) -> None:
    account = await new_account(env, tmp_path)
    first = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 1")
    try:
        first.save_entity(bread("H1", 300), first_time := now())
        await wait_until(lambda: first.status().pending == 0, what="the first till's article uploaded")
        newcomer = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 2", start=False)
        newcomer.save_entity(bread("H1", 100), now())  # stale, made after joining and before the first download
        newcomer.save_entity(bread("H2", 200), now())  # new to the account
        assert newcomer.store.unsent(10) == [], "shared changes must wait for the initial download"
        newcomer.start_sync()
        await wait_until(lambda: price_of(first, "H2") == 200, what="the new till's own article on the first till")
        await wait_until(lambda: [d.entity_key for d in newcomer.differences()] == ["H1"], what="the stale price listed")
        assert price_of(first, "H1") == price_of(newcomer, "H1") == 300
        assert first_time
        await stop(newcomer)
    finally:
        await stop(first)


async def test_switching_to_masterdata_mode_brings_the_current_master_data(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    source = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 1")
    switcher = await join(env, tmp_path, account, SyncMode.ARCHIVE, "Kasse 2")
    try:
        for i in range(250):
            source.save_entity(bread(f"W{i}", 100 + i), now())
        source.save_entity(Customer(customer_nr="T1", name="Tisch 1", is_table=True), now())
        source.delete_entity("article", "W7", now())
        await wait_until(lambda: source.status().pending == 0 and source.store.entity("article", "W7")["version"] == 2,
                         what="the source till's changes accepted")
        assert switcher.store.masterdata("article") == []
        await switcher.set_sync_mode(True, SyncMode.ARCHIVE_MASTERDATA)
        await wait_until(
            lambda: switcher.store.masterdata_state_hash() == source.store.masterdata_state_hash(),
            what="the full master data on the switched till",
        )
        assert len(switcher.store.masterdata("article")) == 249
        assert switcher.store.masterdata("customer")[0]["name"] == "Tisch 1"
    finally:
        await stop(source, switcher)


async def feed_head(env: Environment, account_id: UUID) -> int:
    query = "select coalesce(max(last_feed_seq), 0) from account_feeds where account_id = $1"
    return int(await fetchval(env, query, account_id) or 0)  # type: ignore[arg-type]


async def test_a_till_offline_during_10000_changes_ends_with_the_same_master_data(
    services, env: Environment, tmp_path: Path
) -> None:
    account = await new_account(env, tmp_path)
    writer = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 1")
    online = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 2")
    offline = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 3")
    try:
        offline.save_entity(bread("X0", 1), now())
        await wait_until(lambda: price_of(online, "X0") == 1, what="a first article everywhere")
        await offline.stop_sync()
        changes = 0
        for round_ in range(5):
            for i in range(1_900):
                writer.save_entity(bread(f"X{i}", 100 * round_ + i), now())
                changes += 1
        for i in range(0, 1_900, 19):
            writer.delete_entity("article", f"X{i}", now())
            changes += 1
        while changes < 10_000:
            writer.save_entity(Customer(customer_nr=f"C{changes}", name=f"Kunde {changes}"), now())
            changes += 1
        account_id = writer.store.identity().account_id
        await wait_until(lambda: _head_is(env, account_id, 10_001), timeout_seconds=120, what="10,000 changes accepted")
        heads = await category_heads(env, account_id)
        await wait_until(lambda: caught_up_to(online, heads), timeout_seconds=120, what="the always-online till up to date")
        offline.start_sync()
        await wait_until(lambda: caught_up_to(offline, heads), timeout_seconds=120, what="the offline till caught up")
        await wait_until(lambda: writer.status().pending == 0, what="the writer's verdicts")
        head_hash = writer.store.masterdata_state_hash()
        assert online.store.masterdata_state_hash() == head_hash
        assert offline.store.masterdata_state_hash() == head_hash
        assert offline.store.entity("article", "X19")["deleted"] is True
        assert len(offline.store.masterdata("article")) == 1_900 - 100
    finally:
        await stop(writer, online, offline)


async def category_heads(env: Environment, account_id: UUID) -> dict[str, int]:
    conn = await env.db()
    try:
        rows = await conn.fetch("select category, last_feed_seq from feed_category_heads where account_id = $1", account_id)
    finally:
        await conn.close()
    return {r["category"]: r["last_feed_seq"] for r in rows}


def caught_up_to(till: Till, heads: dict[str, int]) -> bool:
    return all(till.store.feed_position(c) == head for c, head in heads.items())


async def _head_is(env: Environment, account_id: UUID, head: int) -> bool:
    return await feed_head(env, account_id) == head


async def test_a_verdict_lost_while_the_till_queue_was_unbound_is_sent_again(
    services, env: Environment, tmp_path: Path
) -> None:
    first, second = await two_tills_sharing(env, tmp_path, bread("V1", 100))
    try:
        first.save_entity(bread("V1", 110), now())
        await wait_until(lambda: first.store.entity("article", "V1")["version"] == 2, what="version 2 accepted")
        refused, _ = second.store.save_masterdata("article", "V1", bread("V1", 120), now())
        identity = second.store.identity()
        direct = till_direct_routing_key(identity.account_id, identity.till_id)
        connection = await aio_pika.connect(env.settings.amqp_url)
        try:
            channel = await connection.channel()
            queue = await channel.get_queue(till_queue_name(identity.till_id), ensure=False)
            await queue.unbind(DOWNLOAD_EXCHANGE, routing_key=direct)  # the verdict will find no queue
            second.start_sync()
            await wait_until(lambda: _conflict_recorded(env, refused), what="the conflict judged")
            await asyncio.sleep(0.5)
            assert second.store.entity("article", "V1")["pending"] and second.differences() == []
            await queue.bind(DOWNLOAD_EXCHANGE, routing_key=direct)
        finally:
            await connection.close()
        await second.stop_sync()
        second.start_sync()  # the catch-up request names the change without a verdict
        await wait_until(lambda: second.differences(), what="the conflict listed after the verdict was sent again")
        assert price_of(second, "V1") == 110 and not second.store.entity("article", "V1")["pending"]
    finally:
        await stop(first, second)


async def _conflict_recorded(env: Environment, record_id: UUID) -> bool:
    return bool(await fetchval(env, "select 1 from masterdata_conflicts where record_id = $1", record_id))


async def test_an_import_or_a_detour_through_archive_mode_never_overwrites_the_account(
    services, env: Environment, tmp_path: Path
) -> None:
    account = await new_account(env, tmp_path)
    first = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 1")
    second = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 2")
    old_list = [bread(f"I{i}", 100 + i) for i in range(5)]
    try:
        first.import_entities(old_list, now())
        await wait_until(lambda: len(second.store.masterdata("article")) == 5, what="the list on the second till")
        second.save_entity(bread("I1", 130), now())
        second.delete_entity("article", "I2", now())
        await wait_until(lambda: price_of(first, "I1") == 130 and price_of(first, "I2") is None, what="the changes on till 1")
        # till 1 imports the old list again: nothing is overwritten, nothing comes back
        assert first.import_entities(old_list, now()) == {"listed": 2, "unchanged": 3}
        # till 1 takes a detour through archive mode and changes things there
        await first.set_sync_mode(True, SyncMode.ARCHIVE)
        first.save_entity(bread("I3", 999), now())
        first.delete_entity("article", "I4", now())
        await first.set_sync_mode(True, SyncMode.ARCHIVE_MASTERDATA)
        await wait_until(lambda: {d.entity_key for d in first.differences()} == {"I1", "I2", "I3", "I4"},
                         what="the import and the detour listed on till 1")
        await wait_until(lambda: first.status().pending == 0 and not first.store.pending_masterdata(), what="till 1 settled")
        assert price_of(first, "I3") == 103 and price_of(first, "I4") == 104
        assert [price_of(second, f"I{i}") for i in range(5)] == [100, 130, None, 103, 104]
        account_id = first.store.identity().account_id
        assert {key: v for (_, key), (v, _, _) in (await cloud_entities(env, account_id)).items()} == {
            "I0": 1, "I1": 2, "I2": 2, "I3": 1, "I4": 1
        }
    finally:
        await stop(first, second)


async def test_till_sync_ends_only_when_the_cloud_has_judged_every_change(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    till = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 1", start=False)
    till.import_entities([bread(f"J{i}", 100 + i) for i in range(300)], now())
    data_dir = till.store.data_dir
    till.close()
    result = await asyncio.to_thread(
        CliRunner().invoke, app, ["till", "sync", "--data-dir", str(data_dir)],
        env={"TILLSYNC_CLOUD_AMQP_URL": env.signup_url, "COLUMNS": "200"},
    )
    assert result.exit_code == 0 and "in sync" in result.output, result.output
    store = TillStore(data_dir)
    try:
        assert store.pending_masterdata() == 0
        assert {store.entity("article", f"J{i}")["version"] for i in range(300)} == {1}
    finally:
        store.close()


async def test_till_sync_of_a_replaced_installation_fails_and_says_why(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    old = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 1", start=False)
    serial = old.store.identity().serial_number
    new = new_till(env, tmp_path / "new", serial=serial, name="Kasse 1")
    await new.sign_in(account, STRONG_PASSWORD, replace=True)
    result = await asyncio.to_thread(
        CliRunner().invoke, app, ["till", "sync", "--timeout", "10", "--data-dir", str(old.store.data_dir)],
        env={"TILLSYNC_CLOUD_AMQP_URL": env.signup_url, "COLUMNS": "200"},
    )
    assert result.exit_code == 1 and "not in sync" in result.output and "sign in again" in result.output, result.output
    old.close()
    new.close()
