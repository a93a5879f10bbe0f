"""A till keeps selling with the broker unreachable or its credentials revoked, and catches up."""

from __future__ import annotations

import datetime as dt

import pytest

from shared.topology import till_broker_user
from tests.support import STRONG_PASSWORD, new_account_name, new_till, sell, wait_until
from till_agent.store import TillStore
from till_agent.till import Till, TillSettings

pytestmark = pytest.mark.integration


async def archive_of(env, till_id):  # type: ignore[no-untyped-def]
    conn = await env.db()
    try:
        return await conn.fetch("select record_id, till_seq from archive_records where till_id = $1", till_id)
    finally:
        await conn.close()


async def assert_archived_exactly_once(env, till: Till) -> None:
    identity = till.store.identity()
    recorded = till.store.recorded()

    async def complete():  # type: ignore[no-untyped-def]
        return len(await archive_of(env, identity.till_id)) >= len(recorded)

    await wait_until(complete, what="every record in the archive")
    rows = await archive_of(env, identity.till_id)
    assert sorted((r["record_id"], r["till_seq"]) for r in rows) == sorted((rid, seq) for rid, seq, _ in recorded)
    assert [r["till_seq"] for r in sorted(rows, key=lambda r: r["till_seq"])] == list(range(1, len(recorded) + 1))


async def test_selling_goes_on_with_the_broker_unreachable(env, services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    online = new_till(env, tmp_path, serial="OFFLINE-1")
    name = new_account_name()
    await online.create_account(name, STRONG_PASSWORD)
    await online.sign_in(name, STRONG_PASSWORD)
    online.close()
    # the same till, but the network path to the broker is gone (nothing listens there)
    unreachable = Till(
        TillStore(tmp_path / "OFFLINE-1"), TillSettings(cloud_amqp_url="amqp://tillsync-signup:x@127.0.0.1:1/tillsync")
    )
    unreachable.start_sync()
    sell(unreachable, 25)
    unreachable.close_day(dt.datetime.now(dt.UTC).date(), dt.datetime.now(dt.UTC))
    await wait_until(lambda: unreachable.status().state == "offline", what="the relay to report offline")
    assert unreachable.status().pending == 26
    await unreachable.stop_sync()
    unreachable.close()
    # network is back
    back = Till(TillStore(tmp_path / "OFFLINE-1"), TillSettings(cloud_amqp_url=env.signup_url))
    back.start_sync()
    assert await back.relay.drain(30)
    await back.stop_sync()
    await assert_archived_exactly_once(env, back)


async def test_selling_goes_on_with_revoked_credentials(env, services, admin, tmp_path) -> None:  # type: ignore[no-untyped-def]
    till = new_till(env, tmp_path)
    name = new_account_name()
    await till.create_account(name, STRONG_PASSWORD)
    signed_in = await till.sign_in(name, STRONG_PASSWORD)
    till.start_sync()
    sell(till, 10)
    assert await till.relay.drain(20)
    # the credentials are revoked while the till runs (e.g. by an operator)
    await admin.delete_user(till_broker_user(signed_in.till_id))
    sell(till, 15)
    await wait_until(
        lambda: till.status().state == "offline" and "credentials refused" in till.status().detail,
        what="the relay to report refused credentials",
    )
    assert till.status().pending == 15
    # the owner signs in again: new credentials, the relay catches up by itself
    await till.sign_in(name, STRONG_PASSWORD)
    assert await till.relay.drain(30)
    await till.stop_sync()
    await assert_archived_exactly_once(env, till)
