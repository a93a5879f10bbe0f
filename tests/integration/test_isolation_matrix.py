"""The isolation matrix, asserted against the real RabbitMQ: what a till of account A may not do.

Every attempt is made over a real connection with the credentials the account service
created for till A1 at sign-in (account A also has till A2; account B has till B1).
Each must be refused by the broker itself (``ACCESS_REFUSED``, or ``PRECONDITION_FAILED``
for a forged ``user_id``), and nothing may arrive anywhere: no message in any queue of
the vhost, no queue added, no binding changed. Only the account service runs here, so a
message that got through would wait in its queue, visible. Also: signing out revokes a
connected till within 1 s, and repeated wrong passwords are slowed down.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aio_pika
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractChannel
from aiormq.exceptions import ChannelAccessRefused, ChannelPreconditionFailed

from services.account_service.main import AccountServiceSettings
from services.account_service.main import main as account_service_main
from shared.models import ErrorCode, SignOut
from shared.topology import (
    ACCOUNT_EXCHANGE,
    ACCOUNT_SERVICE_ROUTING_KEY,
    APPROVAL_DECISION_KEY,
    APPROVAL_EXCHANGE,
    ARCHIVE_WRITER_QUEUE,
    DEAD_LETTER_EXCHANGE,
    DOWNLOAD_EXCHANGE,
    TILL_UPLOAD_KINDS,
    TOPOLOGY,
    UPLOAD_EXCHANGE,
    download_routing_key,
    till_direct_routing_key,
    till_queue_name,
    till_queue_spec,
)
from tests.support import STRONG_PASSWORD, Environment, new_account_name, new_till, wait_until
from till_agent.till import AccountError, Till

pytestmark = pytest.mark.integration

SERVICE_QUEUES = tuple(q.name for q in TOPOLOGY.queues)  # dead-letter queues included


@pytest_asyncio.fixture(scope="module")
async def account_service(env: Environment) -> AsyncIterator[AccountServiceSettings]:
    """The account service alone (3 free sign-in attempts, then 2 s, doubling, at most 4 s)."""
    settings = AccountServiceSettings(
        amqp_url=env.settings.amqp_url, management_url=env.settings.management_url, database_url=env.settings.database_url,
        signin_free_attempts=3, signin_base_delay_seconds=2.0, signin_max_delay_seconds=4.0,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(account_service_main(settings, stop))
    await asyncio.sleep(0.5)
    if task.done():
        task.result()
    yield settings
    stop.set()
    await asyncio.gather(task, return_exceptions=True)


@dataclass(frozen=True)
class TillKeys:
    account_id: uuid.UUID
    till_id: uuid.UUID
    user: str
    password: str

    def key(self, kind: str) -> str:
        return f"{self.account_id}.{self.till_id}.{kind}"

    @property
    def queue(self) -> str:
        return till_queue_name(self.till_id)


@dataclass(frozen=True)
class Tills:
    a1: TillKeys
    a2: TillKeys
    b1: TillKeys


def _keys(till: Till) -> TillKeys:
    i = till.store.identity()
    return TillKeys(i.account_id, i.till_id, i.broker_username, i.broker_password)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
async def tills(env, account_service, tmp_path_factory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("matrix")
    first, second = new_account_name(), new_account_name()
    a1, a2, b1 = (new_till(env, tmp, name=n) for n in ("Kasse A1", "Kasse A2", "Kasse B1"))
    await a1.create_account(first, STRONG_PASSWORD)
    await b1.create_account(second, STRONG_PASSWORD)
    for till, account in ((a1, first), (a2, first), (b1, second)):
        await till.sign_in(account, STRONG_PASSWORD)
    yield Tills(_keys(a1), _keys(a2), _keys(b1))
    for till in (a1, a2, b1):
        till.close()


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """A consumer that does nothing: only whether RabbitMQ lets it consume matters."""


async def _publish(channel: AbstractChannel, exchange: str, routing_key: str, user_id: str | None) -> None:
    target = await channel.get_exchange(exchange, ensure=False) if exchange else channel.default_exchange
    await target.publish(aio_pika.Message(b'{"marker": "isolation-matrix"}', user_id=user_id), routing_key=routing_key)


async def _queue(channel: AbstractChannel, name: str) -> aio_pika.abc.AbstractQueue:
    return await channel.get_queue(name, ensure=False)


@dataclass(frozen=True)
class Attempt:
    """Something till A1 tries: ``act(tills, channel)``; the broker must answer ``error``
    with a message containing ``match``."""

    name: str
    act: Callable[[Tills, AbstractChannel], Awaitable[Any]]
    error: type[Exception] = ChannelAccessRefused
    match: str = "ACCESS_REFUSED"


def publish(name: str, exchange: str, key: Callable[[Tills], str], user: Callable[[Tills], str] | None = None, **kw: Any) -> Attempt:
    return Attempt(
        f"publish-{name}", lambda t, ch: _publish(ch, exchange, key(t), (user or (lambda t: t.a1.user))(t)), **kw
    )


def consume(name: str, queue: Callable[[Tills], str]) -> Attempt:
    async def act(t: Tills, ch: AbstractChannel) -> None:
        await (await _queue(ch, queue(t))).consume(_ignore)

    return Attempt(f"consume-{name}", act, match="access to queue")


def on_queue(verb: str, name: str, queue: Callable[[Tills], str], call: Callable[[aio_pika.abc.AbstractQueue, Tills], Awaitable[Any]]) -> Attempt:
    async def act(t: Tills, ch: AbstractChannel) -> None:
        await call(await _queue(ch, queue(t)), t)

    return Attempt(f"{verb}-{name}", act)


ATTEMPTS: list[Attempt] = [
    # publish to the upload exchange with keys that are not the till's own, for every kind a till may use
    *(publish(f"with_B_keys-{kind}", UPLOAD_EXCHANGE, lambda t, k=kind: t.b1.key(k), match="access to topic") for kind in TILL_UPLOAD_KINDS),
    *(publish(f"with_A2_keys-{kind}", UPLOAD_EXCHANGE, lambda t, k=kind: t.a2.key(k), match="access to topic") for kind in TILL_UPLOAD_KINDS),
    publish("own_till_under_B_account", UPLOAD_EXCHANGE, lambda t: f"{t.b1.account_id}.{t.a1.till_id}.receipt", match="access to topic"),
    publish("B_till_under_own_account", UPLOAD_EXCHANGE, lambda t: f"{t.a1.account_id}.{t.b1.till_id}.receipt", match="access to topic"),
    publish("own_keys_with_a_wildcard", UPLOAD_EXCHANGE, lambda t: f"{t.a1.account_id}.{t.a1.till_id}.#", match="access to topic"),
    publish("own_keys_of_an_unknown_kind", UPLOAD_EXCHANGE, lambda t: t.a1.key("voucher"), match="access to topic"),
    # publish with the own key as another user (RabbitMQ validates user_id)
    publish("as_B_user", UPLOAD_EXCHANGE, lambda t: t.a1.key("receipt"), lambda t: t.b1.user,
            error=ChannelPreconditionFailed, match="user_id property set to"),
    publish("as_A2_user", UPLOAD_EXCHANGE, lambda t: t.a1.key("receipt"), lambda t: t.a2.user,
            error=ChannelPreconditionFailed, match="user_id property set to"),
    # publish to any other exchange
    publish("download_to_own_account", DOWNLOAD_EXCHANGE, lambda t: download_routing_key(t.a1.account_id, "articles"),
            match="access to exchange"),
    publish("download_to_B", DOWNLOAD_EXCHANGE, lambda t: till_direct_routing_key(t.b1.account_id, t.b1.till_id),
            match="access to exchange"),
    publish("account_requests", ACCOUNT_EXCHANGE, lambda t: ACCOUNT_SERVICE_ROUTING_KEY, match="access to exchange"),
    publish("password_approval", APPROVAL_EXCHANGE, lambda t: APPROVAL_DECISION_KEY, match="access to exchange"),
    publish("dead_letters", DEAD_LETTER_EXCHANGE, lambda t: ARCHIVE_WRITER_QUEUE, match="access to exchange"),
    publish("default_exchange_to_B_queue", "", lambda t: t.b1.queue, match="access to exchange"),
    *(publish(f"default_exchange_to-{q}", "", lambda t, q=q: q, match="access to exchange") for q in SERVICE_QUEUES),
    # consume (or get) anything but the own queue
    consume("B_queue", lambda t: t.b1.queue),
    consume("A2_queue", lambda t: t.a2.queue),
    *(consume(q, lambda t, q=q: q) for q in SERVICE_QUEUES),
    on_queue("get", "B_queue", lambda t: t.b1.queue, lambda q, t: q.get(fail=False)),
    # declare, bind, unbind, delete, purge
    Attempt("declare-queue", lambda t, ch: ch.declare_queue(f"sneaky-{uuid.uuid4().hex[:6]}")),
    Attempt("declare-own_queue_again", lambda t, ch: ch.declare_queue(
        t.a1.queue, durable=True, arguments=till_queue_spec(t.a1.till_id).arguments)),
    Attempt("declare-exchange", lambda t, ch: ch.declare_exchange(f"sneaky-{uuid.uuid4().hex[:6]}", aio_pika.ExchangeType.FANOUT)),
    on_queue("bind", "own_queue_to_all_uploads", lambda t: t.a1.queue, lambda q, t: q.bind(UPLOAD_EXCHANGE, routing_key="#")),
    on_queue("bind", "own_queue_to_B_downloads", lambda t: t.a1.queue,
             lambda q, t: q.bind(DOWNLOAD_EXCHANGE, routing_key=download_routing_key(t.b1.account_id, "articles"))),
    on_queue("bind", "own_queue_to_A2_downloads", lambda t: t.a1.queue,
             lambda q, t: q.bind(DOWNLOAD_EXCHANGE, routing_key=till_direct_routing_key(t.a2.account_id, t.a2.till_id))),
    on_queue("bind", "B_queue_to_all_downloads", lambda t: t.b1.queue, lambda q, t: q.bind(DOWNLOAD_EXCHANGE, routing_key="#")),
    Attempt("bind-download_exchange_to_upload_exchange", lambda t, ch: _exchange_bind(ch)),
    on_queue("unbind", "own_queue", lambda t: t.a1.queue,
             lambda q, t: q.unbind(DOWNLOAD_EXCHANGE, routing_key=till_direct_routing_key(t.a1.account_id, t.a1.till_id))),
    on_queue("unbind", "B_queue", lambda t: t.b1.queue,
             lambda q, t: q.unbind(DOWNLOAD_EXCHANGE, routing_key=till_direct_routing_key(t.b1.account_id, t.b1.till_id))),
    on_queue("delete", "own_queue", lambda t: t.a1.queue, lambda q, t: q.delete(if_unused=False, if_empty=False)),
    on_queue("delete", "B_queue", lambda t: t.b1.queue, lambda q, t: q.delete(if_unused=False, if_empty=False)),
    on_queue("delete", "archive_writer_queue", lambda t: ARCHIVE_WRITER_QUEUE, lambda q, t: q.delete(if_unused=False, if_empty=False)),
    Attempt("delete-upload_exchange", lambda t, ch: _delete_exchange(ch, UPLOAD_EXCHANGE)),
    on_queue("purge", "B_queue", lambda t: t.b1.queue, lambda q, t: q.purge()),
    on_queue("purge", "A2_queue", lambda t: t.a2.queue, lambda q, t: q.purge()),
    on_queue("purge", "archive_writer_queue", lambda t: ARCHIVE_WRITER_QUEUE, lambda q, t: q.purge()),
]


async def _exchange_bind(channel: AbstractChannel) -> None:
    download = await channel.get_exchange(DOWNLOAD_EXCHANGE, ensure=False)
    await download.bind(UPLOAD_EXCHANGE, routing_key="#")


async def _delete_exchange(channel: AbstractChannel, name: str) -> None:
    exchange = await channel.get_exchange(name, ensure=False)
    await exchange.delete()


async def vhost_state(env: Environment, admin, tills: Tills) -> tuple[dict[str, int], dict[str, set[tuple[str, str]]]]:  # type: ignore[no-untyped-def]
    """Messages in every queue of the vhost (by name) and the bindings of the tills' and service queues."""
    queues = {q["name"]: q for q in await admin.queues(env.vhost)}
    counts = {}
    async with await aio_pika.connect(env.settings.amqp_url) as connection:
        channel = await connection.channel()
        for name in queues:
            declared = await channel.declare_queue(name, passive=True)  # exact, no statistics lag
            counts[name] = declared.declaration_result.message_count
    bindings = {}
    for name in (tills.a1.queue, tills.a2.queue, tills.b1.queue, *SERVICE_QUEUES):
        bindings[name] = {(b["source"], b["routing_key"]) for b in await admin.queue_bindings(env.vhost, name)}
    return counts, bindings


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=[a.name for a in ATTEMPTS])
async def test_a_till_cannot_reach_beyond_its_own_keys_and_queue(env, admin, tills: Tills, attempt: Attempt) -> None:  # type: ignore[no-untyped-def]
    before = await vhost_state(env, admin, tills)
    async with await aio_pika.connect(env.till_url(tills.a1.user, tills.a1.password)) as connection:
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(attempt.error, match=attempt.match):
            await attempt.act(tills, channel)
        assert channel.is_closed  # the broker closed the channel
    counts, bindings = await vhost_state(env, admin, tills)
    assert set(counts) == set(before[0])  # no queue added or deleted
    assert counts == {name: 0 for name in counts}  # nothing arrived anywhere
    assert bindings == before[1]


@pytest.mark.parametrize("kind", TILL_UPLOAD_KINDS)
async def test_a_till_may_publish_its_own_keys_and_read_its_own_queue(env, admin, tills: Tills, kind: str) -> None:  # type: ignore[no-untyped-def]
    """The control for the matrix: the same connection may do what it is for, and it arrives."""
    receiving = sorted(b.destination for b in TOPOLOGY.bindings if b.source == UPLOAD_EXCHANGE and b.routing_key.endswith(f".{kind}"))
    assert receiving
    async with await aio_pika.connect(env.till_url(tills.a1.user, tills.a1.password)) as connection:
        channel = await connection.channel(publisher_confirms=True)
        await _publish(channel, UPLOAD_EXCHANGE, tills.a1.key(kind), tills.a1.user)
        own = await _queue(channel, tills.a1.queue)
        await own.cancel(await own.consume(_ignore))
    counts, _ = await vhost_state(env, admin, tills)
    assert {name: n for name, n in counts.items() if n} == {name: 1 for name in receiving}
    async with await aio_pika.connect(env.settings.amqp_url) as connection:  # as the operator: take them out again
        channel = await connection.channel()
        for name in receiving:
            await (await channel.get_queue(name)).purge()


@pytest.mark.parametrize("what", ["publish_upload", "consume_till_queue", "declare_queue"])
async def test_the_signup_user_can_only_send_account_requests(env, tills: Tills, what: str) -> None:  # type: ignore[no-untyped-def]
    async with await aio_pika.connect(env.signup_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(ChannelAccessRefused):
            if what == "publish_upload":
                await _publish(channel, UPLOAD_EXCHANGE, tills.a1.key("receipt"), None)
            elif what == "consume_till_queue":
                await (await _queue(channel, tills.a1.queue)).consume(_ignore)
            else:
                await channel.declare_queue(f"sneaky-{uuid.uuid4().hex[:6]}")


async def test_sign_out_revokes_a_connected_till_within_a_second(env, admin, account_service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """From the sign-out reply to the broker closing the till's open connection: at most 1 s."""
    till = new_till(env, tmp_path)
    account = new_account_name()
    await till.create_account(account, STRONG_PASSWORD)
    signed_in = await till.sign_in(account, STRONG_PASSWORD)
    secret = signed_in.broker_password.get_secret_value()
    connection = await aio_pika.connect(env.till_url(signed_in.broker_username, secret))
    closed_at: list[float] = []
    connection.close_callbacks.add(lambda *_: closed_at.append(time.monotonic()))
    channel = await connection.channel()
    await (await _queue(channel, till_queue_name(signed_in.till_id))).consume(_ignore)  # a till listening on its queue
    await wait_until(lambda: admin.connections_of(signed_in.broker_username), what="the till's connection in the management API")
    try:
        reply = await till._request(SignOut(till_id=signed_in.till_id, till_secret=signed_in.broker_password))
        replied_at = time.monotonic()
        assert reply.reply.connections_closed == 1
        await wait_until(lambda: closed_at, timeout_seconds=5, interval=0.01, what="the broker closing the connection")
        assert closed_at[0] - replied_at <= 1.0
        with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
            await aio_pika.connect(env.till_url(signed_in.broker_username, secret))
    finally:
        await connection.close()
        till.close()


async def test_repeated_wrong_passwords_are_slowed_down(env, account_service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Policy of the test service: 3 free attempts, then a lock of 2 s, doubling up to 4 s; per account name."""
    till = new_till(env, tmp_path)
    name, other = new_account_name(), new_account_name()
    await till.create_account(name, STRONG_PASSWORD)
    await till.create_account(other, STRONG_PASSWORD)
    for attempt in range(1, 4):
        with pytest.raises(AccountError) as refused:
            await till.sign_in(name, "Wrong-pass1!")
        assert refused.value.code == ErrorCode.WRONG_CREDENTIALS
        assert refused.value.retry_after_seconds == (2.0 if attempt == 3 else None)  # the lock this failure started
    # locked now: even the right password is not checked until the lock ends
    with pytest.raises(AccountError) as locked:
        await till.sign_in(name, STRONG_PASSWORD)
    assert locked.value.code == ErrorCode.TOO_MANY_ATTEMPTS
    assert locked.value.retry_after_seconds is not None and 0 < locked.value.retry_after_seconds <= 2.0
    # another account name is not slowed down by it
    assert (await new_till(env, tmp_path / "other").sign_in(other, STRONG_PASSWORD)).account_name == other
    await asyncio.sleep(locked.value.retry_after_seconds + 0.2)
    # the next wrong password doubles the lock (capped at 4 s)
    with pytest.raises(AccountError) as refused:
        await till.sign_in(name, "Wrong-pass1!")
    assert (refused.value.code, refused.value.retry_after_seconds) == (ErrorCode.WRONG_CREDENTIALS, 4.0)
    with pytest.raises(AccountError) as locked:
        await till.sign_in(name, STRONG_PASSWORD)
    assert locked.value.code == ErrorCode.TOO_MANY_ATTEMPTS
    assert locked.value.retry_after_seconds is not None and 0 < locked.value.retry_after_seconds <= 4.0
    await asyncio.sleep(locked.value.retry_after_seconds + 0.2)
    signed_in = await till.sign_in(name, STRONG_PASSWORD)
    assert signed_in.account_name == name
