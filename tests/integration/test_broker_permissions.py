"""RabbitMQ itself refuses a till's cross-till and cross-account publishing and consuming.

Every assertion here is RabbitMQ's answer to a real connection made with the
credentials the account service created for a till at sign-in.
"""

from __future__ import annotations

import uuid

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused, ChannelPreconditionFailed

from shared.models import RECORD_KINDS
from shared.topology import (
    ACCOUNT_EXCHANGE,
    ARCHIVE_WRITER_QUEUE,
    DOWNLOAD_EXCHANGE,
    UPLOAD_EXCHANGE,
    till_queue_name,
    upload_routing_key,
)
from tests.support import STRONG_PASSWORD, new_account_name, new_till

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def tills(env, services, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Till A and B of one account, till C of another; all signed in."""
    tmp = tmp_path_factory.mktemp("tills")
    a, b, c = (new_till(env, tmp) for _ in range(3))
    first, second = new_account_name(), new_account_name()
    await a.create_account(first, STRONG_PASSWORD)
    await c.create_account(second, STRONG_PASSWORD)
    for till, account in ((a, first), (b, first), (c, second)):
        await till.sign_in(account, STRONG_PASSWORD)
    yield a, b, c
    for till in (a, b, c):
        till.close()


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """A consumer that does nothing: these tests only ask whether RabbitMQ lets it consume."""


async def _connect(env, till):  # type: ignore[no-untyped-def]
    identity = till.store.identity()
    return await aio_pika.connect(env.till_url(identity.broker_username, identity.broker_password))


async def _publish(connection, exchange: str, routing_key: str, user_id: str | None) -> None:  # type: ignore[no-untyped-def]
    channel = await connection.channel(publisher_confirms=True)
    target = await channel.get_exchange(exchange, ensure=False) if exchange else channel.default_exchange
    await target.publish(aio_pika.Message(b"{}", user_id=user_id), routing_key=routing_key, mandatory=False)
    await channel.close()


async def test_till_may_publish_its_own_routing_keys(env, tills) -> None:  # type: ignore[no-untyped-def]
    a, _, _ = tills
    ia = a.store.identity()
    async with await _connect(env, a) as connection:
        for kind in RECORD_KINDS:
            await _publish(connection, UPLOAD_EXCHANGE, upload_routing_key(ia.account_id, ia.till_id, kind), ia.broker_username)


async def test_publish_with_another_tills_routing_key_is_refused(env, tills) -> None:  # type: ignore[no-untyped-def]
    a, b, _ = tills
    ia, ib = a.store.identity(), b.store.identity()
    async with await _connect(env, a) as connection:
        with pytest.raises(ChannelAccessRefused, match="access to topic"):
            await _publish(connection, UPLOAD_EXCHANGE, upload_routing_key(ib.account_id, ib.till_id, "receipt"), ia.broker_username)


async def test_publish_with_another_accounts_routing_key_is_refused(env, tills) -> None:  # type: ignore[no-untyped-def]
    a, _, c = tills
    ia, ic = a.store.identity(), c.store.identity()
    async with await _connect(env, a) as connection:
        with pytest.raises(ChannelAccessRefused, match="access to topic"):
            await _publish(connection, UPLOAD_EXCHANGE, upload_routing_key(ic.account_id, ic.till_id, "receipt"), ia.broker_username)
        # own till id under another account id is refused too
        with pytest.raises(ChannelAccessRefused, match="access to topic"):
            await _publish(connection, UPLOAD_EXCHANGE, upload_routing_key(ic.account_id, ia.till_id, "receipt"), ia.broker_username)


async def test_publish_as_another_user_is_refused(env, tills) -> None:  # type: ignore[no-untyped-def]
    a, b, _ = tills
    ia, ib = a.store.identity(), b.store.identity()
    async with await _connect(env, a) as connection:
        with pytest.raises(ChannelPreconditionFailed, match="user_id property set to"):
            await _publish(connection, UPLOAD_EXCHANGE, upload_routing_key(ia.account_id, ia.till_id, "receipt"), ib.broker_username)


async def test_publish_to_other_exchanges_is_refused(env, tills) -> None:  # type: ignore[no-untyped-def]
    a, _, _ = tills
    ia = a.store.identity()
    async with await _connect(env, a) as connection:
        for exchange, key in (
            (DOWNLOAD_EXCHANGE, f"{ia.account_id}.articles"),
            (ACCOUNT_EXCHANGE, "account-service"),
            ("", ARCHIVE_WRITER_QUEUE),  # the default exchange, straight into a service queue
        ):
            with pytest.raises(ChannelAccessRefused):
                await _publish(connection, exchange, key, ia.broker_username)


async def test_till_reads_its_own_queue_only(env, tills) -> None:  # type: ignore[no-untyped-def]
    a, b, c = tills
    ia, ib, ic = (t.store.identity() for t in tills)
    async with await _connect(env, a) as connection:
        channel = await connection.channel()
        own = await channel.get_queue(till_queue_name(ia.till_id), ensure=False)
        tag = await own.consume(_ignore)
        await own.cancel(tag)
        for other in (till_queue_name(ib.till_id), till_queue_name(ic.till_id), ARCHIVE_WRITER_QUEUE):
            channel = await connection.channel()
            queue = await channel.get_queue(other, ensure=False)
            with pytest.raises(ChannelAccessRefused, match="access to queue"):
                await queue.consume(_ignore)


async def test_till_cannot_declare_or_bind(env, tills) -> None:  # type: ignore[no-untyped-def]
    a, _, _ = tills
    ia = a.store.identity()
    async with await _connect(env, a) as connection:
        channel = await connection.channel()
        with pytest.raises(ChannelAccessRefused):
            await channel.declare_queue(f"sneaky-{uuid.uuid4().hex[:6]}")
        channel = await connection.channel()
        with pytest.raises(ChannelAccessRefused):
            await channel.declare_exchange(f"sneaky-{uuid.uuid4().hex[:6]}", aio_pika.ExchangeType.FANOUT)
        channel = await connection.channel()
        own = await channel.get_queue(till_queue_name(ia.till_id), ensure=False)
        with pytest.raises(ChannelAccessRefused):
            await own.bind(UPLOAD_EXCHANGE, routing_key="#")  # would read every till's uploads


async def test_signup_user_can_only_send_account_requests(env, tills) -> None:  # type: ignore[no-untyped-def]
    a, _, _ = tills
    ia = a.store.identity()
    async with await aio_pika.connect(env.signup_url) as connection:
        with pytest.raises(ChannelAccessRefused):
            await _publish(connection, UPLOAD_EXCHANGE, upload_routing_key(ia.account_id, ia.till_id, "receipt"), None)
        channel = await connection.channel()
        queue = await channel.get_queue(till_queue_name(ia.till_id), ensure=False)
        with pytest.raises(ChannelAccessRefused):
            await queue.consume(_ignore)
