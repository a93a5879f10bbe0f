"""The account service against the real broker and database, through the till agent."""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal

import aio_pika
import pytest

from shared.fiscal import PaymentType, VatKey
from shared.models import Cashier, CustomSyncFlags, ErrorCode, SyncMode
from shared.topology import DOWNLOAD_EXCHANGE, download_binding_keys, till_broker_user, till_queue_name
from tests.support import STRONG_PASSWORD, new_account_name, new_till, sell, wait_until
from till_agent.booking import SaleLine
from till_agent.till import AccountError

pytestmark = pytest.mark.integration


async def test_create_account_refuses_a_name_without_email_syntax(env, services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    till = new_till(env, tmp_path)
    with pytest.raises(AccountError) as refused:
        await till.create_account("not an email", STRONG_PASSWORD)
    assert refused.value.code == ErrorCode.INVALID_ACCOUNT_NAME
    assert "not an email address" in str(refused.value)


async def test_create_account_names_every_broken_password_rule(env, services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    till = new_till(env, tmp_path)
    with pytest.raises(AccountError) as refused:
        await till.create_account(new_account_name(), "abc def")
    assert refused.value.code == ErrorCode.WEAK_PASSWORD
    details = " | ".join(refused.value.details)
    for rule in ("8 characters", "upper-case", "digit", "special characters", "whitespace"):
        assert rule in details
    assert "lower-case" not in details  # that rule holds
    conn = await env.db()
    try:
        assert await conn.fetchval("select count(*) from accounts where account_name like 'shop-%'") == 0
    finally:
        await conn.close()


async def test_account_names_are_unique_case_insensitively(env, services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    till = new_till(env, tmp_path)
    name = new_account_name()
    created = await till.create_account(name, STRONG_PASSWORD)
    assert created.account_name == name.lower()
    with pytest.raises(AccountError) as refused:
        await till.create_account(name.upper(), STRONG_PASSWORD)
    assert refused.value.code == ErrorCode.ACCOUNT_EXISTS


async def test_unknown_account_answers_exactly_like_a_wrong_password(env, services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    till = new_till(env, tmp_path)
    name = new_account_name()
    await till.create_account(name, STRONG_PASSWORD)
    with pytest.raises(AccountError) as wrong_password:
        await till.sign_in(name, "Wrong-pass1!")
    with pytest.raises(AccountError) as unknown_name:
        await till.sign_in(new_account_name(), "Wrong-pass1!")
    assert (wrong_password.value.code, str(wrong_password.value), wrong_password.value.details) == (
        unknown_name.value.code,
        str(unknown_name.value),
        unknown_name.value.details,
    )
    assert wrong_password.value.code == ErrorCode.WRONG_CREDENTIALS


async def test_same_serial_number_gets_the_same_till_and_continues_its_sequence(env, services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    name = new_account_name()
    first = new_till(env, tmp_path / "first", serial="SERIAL-42")
    await first.create_account(name, STRONG_PASSWORD)
    signed_in = await first.sign_in(name, STRONG_PASSWORD)
    first.start_sync()
    sell(first, 5)
    assert await first.relay.drain(20)
    await first.stop_sync()

    async def archived() -> int:
        conn = await env.db()
        try:
            return await conn.fetchval("select count(*) from archive_records where till_id = $1", signed_in.till_id)
        finally:
            await conn.close()

    await wait_until(lambda: _eq(archived(), 5), what="5 archived records")
    first.close_day(dt.datetime.now(dt.UTC).date(), dt.datetime.now(dt.UTC))
    first.start_sync()
    assert await first.relay.drain(20)
    await first.stop_sync()
    await wait_until(lambda: _eq(archived(), 6), what="6 archived records")
    # the till is re-installed: a new local store with the same serial number
    reinstalled = new_till(env, tmp_path / "reinstalled", serial="SERIAL-42")
    # the old installation never signed out: taking over needs the owner's word
    with pytest.raises(AccountError, match="another installation of till SERIAL-42") as refused:
        await reinstalled.sign_in(name, STRONG_PASSWORD)
    assert refused.value.code == ErrorCode.TILL_IN_USE
    again = await reinstalled.sign_in(name, STRONG_PASSWORD, replace=True)
    assert again.till_id == signed_in.till_id
    assert (again.last_till_seq, again.last_receipt_number, again.last_z_nr) == (6, 5, 1)
    receipt = reinstalled.sell(
        [SaleLine("1", "Brot", Decimal("1"), 250, VatKey.REDUCED)],
        payment_type=PaymentType.CASH,
        payment_name="Bar",
        cashier=Cashier(cashier_id="1", name="Anna"),
        at=dt.datetime.now(dt.UTC),
    )
    zreport = reinstalled.close_day(dt.datetime.now(dt.UTC).date(), dt.datetime.now(dt.UTC))
    # sequence, receipt number (BON_NR) and Z number continue: no number is used twice
    assert [row.till_seq for row in reinstalled.store.unsent(10)] == [7, 8]
    assert (receipt.receipt_number, zreport.z_nr) == (6, 2)


async def _eq(value_coro, expected):  # type: ignore[no-untyped-def]
    return (await value_coro) == expected


async def test_sign_out_deletes_the_broker_user_and_closes_its_connections(env, services, admin, tmp_path) -> None:  # type: ignore[no-untyped-def]
    till = new_till(env, tmp_path)
    name = new_account_name()
    await till.create_account(name, STRONG_PASSWORD)
    signed_in = await till.sign_in(name, STRONG_PASSWORD)
    user = till_broker_user(signed_in.till_id)
    assert await admin.user_exists(user)
    # a connection of the till that is still open when the sign-out arrives
    connection = await aio_pika.connect(
        env.till_url(signed_in.broker_username, signed_in.broker_password.get_secret_value())
    )
    closed = asyncio.Event()
    connection.close_callbacks.add(lambda *_: closed.set())
    await wait_until(lambda: _has_connection(admin, user), what="the till's connection in the management API")
    from shared.models import SignOut

    reply = await till._request(SignOut(till_id=signed_in.till_id, till_secret=signed_in.broker_password))
    assert reply.reply.connections_closed == 1
    till.store.save_sign_out()
    await asyncio.wait_for(closed.wait(), 10)
    assert not await admin.user_exists(user)
    with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(env.till_url(signed_in.broker_username, signed_in.broker_password.get_secret_value()))
    conn = await env.db()
    try:
        row = await conn.fetchrow("select signed_in, secret_sha256 from tills where till_id = $1", signed_in.till_id)
    finally:
        await conn.close()
    assert row["signed_in"] is False and row["secret_sha256"] is None
    # signing out twice is refused with a clear reason
    with pytest.raises(AccountError) as refused:
        await till._request(SignOut(till_id=signed_in.till_id, till_secret=signed_in.broker_password))
    assert refused.value.code == ErrorCode.UNKNOWN_TILL


async def _has_connection(admin, user: str) -> bool:  # type: ignore[no-untyped-def]
    return bool(await admin.connections_of(user))


async def test_sign_out_keeps_unsent_records_and_says_how_many(env, services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    till = new_till(env, tmp_path)
    name = new_account_name()
    await till.create_account(name, STRONG_PASSWORD)
    await till.sign_in(name, STRONG_PASSWORD)
    sell(till, 3)
    assert await till.sign_out() == 3
    assert till.store.outbox_counts() == (3, 0)
    assert not till.store.identity().signed_in


async def test_sync_mode_is_stored_and_the_queue_rebound(env, services, admin, tmp_path) -> None:  # type: ignore[no-untyped-def]
    till = new_till(env, tmp_path)
    name = new_account_name()
    await till.create_account(name, STRONG_PASSWORD)
    signed_in = await till.sign_in(name, STRONG_PASSWORD)
    account_id, till_id = signed_in.account_id, signed_in.till_id

    async def bound_keys() -> set[str]:
        bindings = await admin.queue_bindings(env.vhost, till_queue_name(till_id))
        return {b["routing_key"] for b in bindings if b["source"] == DOWNLOAD_EXCHANGE}

    assert await bound_keys() == set(download_binding_keys(account_id, till_id, True, SyncMode.ARCHIVE, None))
    custom = CustomSyncFlags(download_articles=True, download_receipts=True)
    for enabled, mode, flags in (
        (True, SyncMode.ARCHIVE_MASTERDATA_RECEIPTS, None),
        (True, SyncMode.CUSTOM, custom),
        (True, SyncMode.ARCHIVE_MASTERDATA, None),
        (False, SyncMode.ARCHIVE_MASTERDATA, None),
    ):
        result = await till.set_sync_mode(enabled, mode, flags)
        expected = set(download_binding_keys(account_id, till_id, enabled, mode, flags))
        assert set(result.routing_keys) == expected
        assert await bound_keys() == expected
        conn = await env.db()
        try:
            row = await conn.fetchrow("select sync_enabled, sync_mode, custom_flags from tills where till_id = $1", till_id)
        finally:
            await conn.close()
        assert (row["sync_enabled"], row["sync_mode"]) == (enabled, mode.value)
        assert (row["custom_flags"] is None) == (flags is None)
    # stored modes survive a new sign-in
    again = await till.sign_in(name, STRONG_PASSWORD)
    assert (again.sync_enabled, again.sync_mode) == (False, SyncMode.ARCHIVE_MASTERDATA)


async def test_clear_password_is_not_stored(env, services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    till = new_till(env, tmp_path)
    name = new_account_name()
    await till.create_account(name, STRONG_PASSWORD)
    conn = await env.db()
    try:
        stored = await conn.fetchval("select password_hash from accounts where account_name = $1", name)
    finally:
        await conn.close()
    assert stored.startswith("$argon2id$") and STRONG_PASSWORD not in stored


async def test_the_same_installation_may_sign_in_again_while_signed_in(env, services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    name = new_account_name()
    till = new_till(env, tmp_path, serial="SERIAL-77")
    await till.create_account(name, STRONG_PASSWORD)
    first = await till.sign_in(name, STRONG_PASSWORD)
    again = await till.sign_in(name, STRONG_PASSWORD)  # e.g. the first reply was lost
    assert again.till_id == first.till_id
    till.close()
