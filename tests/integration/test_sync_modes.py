"""Custom mode switches, the sync switch, local-only settings and what the broadcaster refuses."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path

import aio_pika
import pytest

from shared.models import CatchUpRequest, CustomSyncFlags, Customer, MasterDataRecord, SyncMode, Upload
from shared.topology import (
    ARCHIVE_WRITER_QUEUE,
    MASTERDATA_BROADCASTER_QUEUE,
    MASTERDATA_CATCHUP_QUEUE,
    catchup_routing_key,
    upload_routing_key,
)
from tests.integration.test_masterdata_sync import archived_ids, bread, join, new_account, now, price_of, stop
from tests.support import Environment, dead_letters_matching, publish_as_till, sell, wait_until
from till_agent.till import Till

pytestmark = pytest.mark.integration


async def test_custom_mode_receives_only_the_switched_on_categories(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    source = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 1")
    custom = await join(env, tmp_path, account, SyncMode.ARCHIVE, "Kasse 2")
    try:
        await custom.set_sync_mode(True, SyncMode.CUSTOM, CustomSyncFlags(download_articles=True))
        source.save_entity(bread("K1", 199), now())
        source.save_entity(Customer(customer_nr="T4", name="Tisch 4", is_table=True), now())
        await wait_until(lambda: price_of(custom, "K1") == 199, what="the article on the custom till")
        await wait_until(lambda: source.status().pending == 0, what="the source's uploads")
        assert custom.store.entity("customer", "T4") is None
        # its own customer is archived but not shared: the custom till does not take part in customers
        custom.save_entity(Customer(customer_nr="T9", name="Tisch 9"), now())
        await wait_until(lambda: custom.status().pending == 0, what="the custom till's upload")
        recorded = {record_id for record_id, _, _ in custom.store.recorded("masterdata")}
        await wait_until(lambda: _contains(env, custom, recorded), what="the custom till's customer archived")
        assert custom.store.unsent(10) == []
        assert source.store.entity("customer", "T9") is None
    finally:
        await stop(source, custom)


async def _contains(env: Environment, till: Till, ids: set[uuid.UUID]) -> bool:
    return ids <= await archived_ids(env, till)


async def test_an_upload_switch_off_keeps_those_records_in_the_outbox(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    till = await join(env, tmp_path, account, SyncMode.ARCHIVE, "Kasse 1")
    try:
        await till.set_sync_mode(True, SyncMode.CUSTOM, CustomSyncFlags(upload_receipts=False))
        sell(till, 4)
        till.close_day(dt.date.today(), now())
        await wait_until(lambda: till.status().pending == 4, what="only the receipts left")
        assert till.status().held == 4
        receipts = {record_id for record_id, _, _ in till.store.recorded("receipt")}
        assert not receipts & await archived_ids(env, till)
        await till.set_sync_mode(True, SyncMode.CUSTOM, CustomSyncFlags(upload_receipts=True))
        await wait_until(lambda: _contains(env, till, receipts), what="the receipts archived after switching on")
    finally:
        await stop(till)


async def test_the_sync_switch_off_means_no_connection_and_a_growing_outbox(
    services, env: Environment, tmp_path: Path
) -> None:
    account = await new_account(env, tmp_path)
    till = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 1")
    user = till.store.identity().broker_username
    try:
        await wait_until(lambda: _connections(env, user), what="the till connected")
        await till.set_sync_mode(False, SyncMode.ARCHIVE_MASTERDATA)
        await wait_until(lambda: till.status().state == "sync_off", what="the relay switched off")
        await wait_until(lambda: _no_connections(env, user), what="the till's connection gone")
        sell(till, 3)
        await wait_until(lambda: till.status().pending == 3, what="the outbox growing")
        assert await _no_connections(env, user)
        await till.set_sync_mode(True, SyncMode.ARCHIVE_MASTERDATA)
        await wait_until(lambda: till.status().pending == 0, what="the outbox uploaded after switching on")
    finally:
        await stop(till)


async def _connections(env: Environment, user: str | None) -> bool:
    return bool(await env.admin.connections_of(user))


async def _no_connections(env: Environment, user: str | None) -> bool:
    return not await env.admin.connections_of(user)


async def test_local_only_settings_never_leave_the_till(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    till = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 1")
    other = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 2")
    try:
        assert till.save_setting("printer.model", "TM-T88", now()) is False
        assert till.save_setting("display.brightness", "80", now()) is False
        assert till.save_setting("stock.default_location", "Lager 2", now()) is False
        assert till.save_setting("receipt.footer", "Danke!", now()) is True
        assert till.store.local_settings() == {
            "display.brightness": "80", "printer.model": "TM-T88", "stock.default_location": "Lager 2"
        }
        assert [kind for _, _, kind in till.store.recorded()] == ["masterdata"]
        await wait_until(lambda: other.store.masterdata("shared_setting"), what="the shared setting on the other till")
        assert other.store.masterdata("shared_setting") == [
            {"entity": "shared_setting", "setting_key": "receipt.footer", "value": "Danke!"}
        ]
        # a hand-made upload of a local-only setting is refused by the cloud, with the reason
        identity = till.store.identity()
        upload = {
            "schema_version": 1, "record_id": str(uuid.uuid4()), "account_id": str(identity.account_id),
            "till_id": str(identity.till_id), "till_seq": 9_999, "recorded_at": now().isoformat(), "prev_hash": None, "chain_hash": "0" * 64,
            "record": {
                "kind": "masterdata", "entity_kind": "shared_setting", "entity_key": "printer.port", "shared": True,
                "data": {"entity": "shared_setting", "setting_key": "printer.port", "value": "/dev/usb/lp0"},
            },
        }
        await publish_as_till(env, till, json.dumps(upload).encode(), upload_routing_key(identity.account_id, identity.till_id, "masterdata"))
        for queue in (ARCHIVE_WRITER_QUEUE, MASTERDATA_BROADCASTER_QUEUE):
            letters = await wait_until(lambda q=queue: dead_letters_matching(env, q, upload["record_id"]),
                                       what=f"the local-only setting dead-lettered by {queue}")
            assert "local to one till" in letters[0].headers["x-tillsync-reason"]
        assert uuid.UUID(upload["record_id"]) not in await archived_ids(env, till)
    finally:
        await stop(till, other)


async def test_a_catch_up_request_naming_another_till_is_refused(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    asker = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 1", start=False)
    victim = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 2", start=False)
    try:
        me = asker.store.identity()
        request = CatchUpRequest(
            request_id=uuid.uuid4(), account_id=me.account_id, till_id=victim.store.identity().till_id, since={"articles": 0}
        )
        # the asker may only publish with its own routing key, so the body names the victim
        await publish_as_till(env, asker, request.model_dump_json().encode(), catchup_routing_key(me.account_id, me.till_id))
        letters = await wait_until(lambda: dead_letters_matching(env, MASTERDATA_CATCHUP_QUEUE, str(request.request_id)),
                                   what="the forged catch-up dead-lettered")
        assert "is not the till's broker user" in letters[0].headers["x-tillsync-reason"]
    finally:
        await stop(asker, victim)


async def _take_downloads(env: Environment, till: Till) -> list:  # type: ignore[type-arg]
    from shared.models import DOWNLOAD_ADAPTER
    from shared.topology import till_queue_name

    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(till_queue_name(till.store.identity().till_id), ensure=False)
        taken = []
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            taken.append(DOWNLOAD_ADAPTER.validate_json(message.body).message)
        return taken
    finally:
        await connection.close()


async def test_a_repeated_change_is_judged_once_and_its_verdict_sent_again(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    till = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse 1", start=False)
    identity = till.store.identity()
    key = upload_routing_key(identity.account_id, identity.till_id, "masterdata")

    chain: list[str | None] = [None]

    def upload(nr: str, seq: int) -> tuple[str, bytes]:
        made = Upload.sealed(
            chain[-1], record_id=uuid.uuid4(), account_id=identity.account_id, till_id=identity.till_id,
            till_seq=seq, recorded_at=now(),
            record=MasterDataRecord(entity_kind="article", entity_key=nr, shared=True, data=bread(nr)),
        )
        chain.append(made.chain_hash)
        return str(made.record_id), made.model_dump_json().encode()

    accepted_id, accepted = upload("D1", 1)
    conflict_id, conflicting = upload("D1", 2)  # a second "new" D1: its key exists by then
    for body in (accepted, conflicting, accepted, conflicting):
        await publish_as_till(env, till, body, key)
    verdicts: list = []  # type: ignore[type-arg]

    async def four_verdicts() -> bool:
        verdicts.extend(m for m in await _take_downloads(env, till) if m.type != "feed_entry")
        return len(verdicts) >= 4

    await wait_until(four_verdicts, what="a verdict for each delivery")
    assert sorted((v.type, str(v.record_id)) for v in verdicts) == sorted(
        [("masterdata_accepted", accepted_id)] * 2 + [("masterdata_conflict", conflict_id)] * 2
    )
    conflict = next(v for v in verdicts if v.type == "masterdata_conflict")
    assert conflict.current.version == 1 and str(conflict.current.record_id) == accepted_id
    conn = await env.db()
    try:
        assert await conn.fetchval("select count(*) from masterdata_feed where account_id = $1", identity.account_id) == 1
        assert await conn.fetchval("select count(*) from masterdata_conflicts where account_id = $1", identity.account_id) == 1
    finally:
        await conn.close()
    till.close()
