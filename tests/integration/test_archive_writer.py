"""The archive writer against the real broker and database: once, never overwritten, refusals dead-lettered."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal

from pathlib import Path

import aio_pika
import asyncpg
import pytest

from shared.amqp import ORIGINAL_USER_HEADER, REASON_HEADER
from shared.fiscal import PaymentType, VatKey
from shared.models import Cashier, Upload
from shared.topology import ARCHIVE_WRITER_QUEUE, UPLOAD_EXCHANGE, upload_routing_key
from tests.support import (
    STRONG_PASSWORD, Environment, fetchval, new_account_name, new_till, sell, signed_in_till, take_dead_letters, wait_until,
)
from till_agent.booking import SaleLine, closed_receipt

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def till(env, services, tmp_path_factory):  # type: ignore[no-untyped-def]
    till = await signed_in_till(env, tmp_path_factory.mktemp("writer"), new_account_name(), create=True)
    yield till
    till.close()


@pytest.fixture
async def publisher(env, till):  # type: ignore[no-untyped-def]
    """Publish raw bodies as the till (its own credentials and user_id)."""
    identity = till.store.identity()
    connection = await aio_pika.connect(env.till_url(identity.broker_username, identity.broker_password))
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(UPLOAD_EXCHANGE, ensure=False)

    async def publish(body: bytes, kind: str = "receipt") -> None:
        await exchange.publish(
            aio_pika.Message(body, user_id=identity.broker_username, content_type="application/json"),
            routing_key=upload_routing_key(identity.account_id, identity.till_id, kind),  # type: ignore[arg-type]
        )

    yield publish
    await connection.close()


_seq = iter(range(1, 10_000))
_chain: dict[tuple[uuid.UUID, int], str] = {}  # (till, till_seq) -> chain_hash of the upload made for it


def make_upload(till, till_seq: int | None = None, total_cents: int = 250, **changes) -> Upload:  # type: ignore[no-untyped-def]
    identity = till.store.identity()
    now = dt.datetime.now(dt.UTC)
    receipt = closed_receipt(
        receipt_number=1,
        lines=[SaleLine("1", "Brot", Decimal("1"), total_cents, VatKey.REDUCED)],
        payment_type=PaymentType.CASH,
        payment_name="Bar",
        cashier=Cashier(cashier_id="1", name="Anna"),
        opened_at=now,
        closed_at=now,
        business_day=now.date(),
    )
    fields = dict(
        record_id=uuid.uuid4(),
        account_id=identity.account_id,
        till_id=identity.till_id,
        till_seq=till_seq or next(_seq),
        recorded_at=now,
        record=receipt,
    )
    fields.update(changes)
    upload = Upload.sealed(_chain.get((identity.till_id, fields["till_seq"] - 1)), **fields)
    if till_seq is None:
        _chain[(identity.till_id, upload.till_seq)] = upload.chain_hash
    return upload


async def archived(env, record_id):  # type: ignore[no-untyped-def]
    conn = await env.db()
    try:
        return await conn.fetch("select * from archive_records where record_id = $1", record_id)
    finally:
        await conn.close()


async def dead_letters(env) -> list[aio_pika.abc.AbstractIncomingMessage]:  # type: ignore[no-untyped-def]
    """Take every message now in the archive writer's dead-letter queue."""
    return await take_dead_letters(env, ARCHIVE_WRITER_QUEUE)


async def wait_for_dead_letter(env, predicate, what: str):  # type: ignore[no-untyped-def]
    seen: list = []

    async def found():  # type: ignore[no-untyped-def]
        seen.extend(await dead_letters(env))
        return next((m for m in seen if predicate(m)), None)

    return await wait_until(found, timeout_seconds=15, interval=0.2, what=what)


async def test_an_upload_is_archived_once_with_its_content_and_hash(env, till, publisher) -> None:  # type: ignore[no-untyped-def]
    upload = make_upload(till)
    await publisher(upload.model_dump_json().encode())
    rows = await wait_until(lambda: archived(env, upload.record_id), what="the record in the archive")
    assert len(rows) == 1
    row = rows[0]
    assert (row["till_id"], row["till_seq"], row["kind"]) == (upload.till_id, upload.till_seq, "receipt")
    assert Upload.model_validate(row["payload"]) == upload
    assert len(bytes(row["content_sha256"])) == 32


async def test_a_redelivered_record_is_a_no_op(env, till, publisher) -> None:  # type: ignore[no-untyped-def]
    upload = make_upload(till)
    body = upload.model_dump_json().encode()
    for _ in range(3):
        await publisher(body)
    # the same content with other key order and spacing is the same record
    await publisher(json.dumps(json.loads(body), indent=2, sort_keys=True).encode())
    marker = make_upload(till)
    await publisher(marker.model_dump_json().encode())
    await wait_until(lambda: archived(env, marker.record_id), what="the marker record")
    assert len(await archived(env, upload.record_id)) == 1
    conn = await env.db()
    try:
        assert await conn.fetchval("select count(*) from archive_conflicts where record_id = $1", upload.record_id) == 0
    finally:
        await conn.close()


async def test_same_record_id_with_other_content_is_refused_and_reported(env, till, publisher) -> None:  # type: ignore[no-untyped-def]
    original = make_upload(till, total_cents=250)
    await publisher(original.model_dump_json().encode())
    await wait_until(lambda: archived(env, original.record_id), what="the original record")
    forged = make_upload(till, till_seq=original.till_seq, total_cents=1, record_id=original.record_id)
    await publisher(forged.model_dump_json().encode())
    message = await wait_for_dead_letter(
        env, lambda m: str(original.record_id) in m.headers.get(REASON_HEADER, ""), "dead letter"
    )
    assert "already archived with other content" in message.headers[REASON_HEADER]
    assert message.headers[ORIGINAL_USER_HEADER] == till.store.identity().broker_username
    rows = await archived(env, original.record_id)
    assert len(rows) == 1 and rows[0]["payload"]["record"]["total"] == 250  # never overwritten
    conn = await env.db()
    try:
        conflict = await conn.fetchrow("select * from archive_conflicts where record_id = $1", original.record_id)
    finally:
        await conn.close()
    assert conflict is not None and conflict["payload"]["record"]["total"] == 1


async def test_a_second_record_at_a_taken_till_seq_is_refused(env, till, publisher) -> None:  # type: ignore[no-untyped-def]
    first = make_upload(till)
    await publisher(first.model_dump_json().encode())
    await wait_until(lambda: archived(env, first.record_id), what="the first record")
    second = make_upload(till, till_seq=first.till_seq)
    await publisher(second.model_dump_json().encode())
    message = await wait_for_dead_letter(
        env, lambda m: str(second.record_id) in m.headers.get(REASON_HEADER, ""), "dead letter of the second record"
    )
    assert f"till_seq {first.till_seq}" in message.headers[REASON_HEADER]
    assert await archived(env, second.record_id) == []


async def test_invalid_messages_are_dead_lettered_with_their_reason(env, till, publisher) -> None:  # type: ignore[no-untyped-def]
    not_json = b"this is not json"
    await publisher(not_json)
    message = await wait_for_dead_letter(env, lambda m: m.body == not_json, "dead letter of the non-JSON body")
    assert message.headers[REASON_HEADER].startswith("invalid message: ")
    # valid JSON, wrong shape: the reason names the field
    bad = json.loads(make_upload(till).model_dump_json())
    bad["record"]["total"] = 999
    bad["unknown_field"] = 1
    body = json.dumps(bad).encode()
    await publisher(body)
    message = await wait_for_dead_letter(env, lambda m: m.body == body, "dead letter of the inconsistent receipt")
    reason = message.headers[REASON_HEADER]
    assert "unknown_field" in reason and "total 999" in reason


async def test_a_body_naming_another_till_is_refused(env, till, publisher) -> None:  # type: ignore[no-untyped-def]
    impostor = make_upload(till, till_id=uuid.uuid4())
    await publisher(impostor.model_dump_json().encode())
    message = await wait_for_dead_letter(
        env, lambda m: str(impostor.record_id) in m.body.decode(), "dead letter of the impostor record"
    )
    assert "is not the till's broker user" in message.headers[REASON_HEADER]
    assert await archived(env, impostor.record_id) == []


async def test_archived_records_cannot_be_changed_or_deleted(services, env: Environment, tmp_path: Path) -> None:
    till = new_till(env, tmp_path)
    account = new_account_name()
    await till.create_account(account, STRONG_PASSWORD)
    await till.sign_in(account, STRONG_PASSWORD)
    till.start_sync()
    try:
        sell(till, 1)
        await wait_until(lambda: fetchval(env, "select count(*) from archive_records where till_id = $1",
                                          till.store.identity().till_id), what="archived")
    finally:
        await till.stop_sync()
        till.close()
    # the triggers refuse whoever connects, the owner too (the services' role is refused
    # by its grants before: tests/integration/test_archive_immutability.py)
    conn = await env.admin_db()
    try:
        for statement in (
            "update archive_records set payload = '{}'::jsonb",
            "delete from archive_records",
            "truncate archive_records",
            "delete from archive_conflicts",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="is append-only"):
                await conn.execute(statement)
        assert await conn.fetchval("select count(*) from archive_records") >= 1
    finally:
        await conn.close()
