"""Password-reset requests, ops decisions and their rules, against the real services."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import aio_pika
import asyncpg
import pytest
from pydantic import TypeAdapter
from typer.testing import CliRunner
from aiormq.exceptions import ChannelAccessRefused

from shared.amqp import RpcClient
from shared.models import (
    ApprovalError,
    ApprovalReply,
    ApprovalMessage,
    ApprovePasswordReset,
    ListPasswordResets,
    PasswordResetDecided,
    PasswordResetList,
    RejectPasswordReset,
)
from shared.topology import (
    APPROVAL_DECISION_KEY,
    APPROVAL_EXCHANGE,
    APPROVAL_QUERY_KEY,
    APPROVAL_REQUEST_KEY,
    PASSWORD_APPROVAL_QUEUE,
)
from tests.support import STRONG_PASSWORD, Environment, dead_letters_matching, fetchval, new_account_name, new_till, wait_until
from tillsync.cli import app
from tillsync.ops import OpsError, OpsSettings, add_technician, call_worker
from till_agent.till import AccountError, Till

pytestmark = pytest.mark.integration

NEW_PASSWORD = "Neues-Passwort-2026!"
TECH_PASSWORD = "Techniker-Passwort-1"


async def signed_out_account(env: Environment, tmp_path: Path) -> tuple[str, Till]:
    """A new account whose only till signed in once and signed out again."""
    account = new_account_name()
    till = new_till(env, tmp_path, name="Kasse 1")
    await till.create_account(account, STRONG_PASSWORD)
    await till.sign_in(account, STRONG_PASSWORD)
    await till.sign_out()
    return account, till


async def technician(env: Environment) -> str:
    user = await add_technician(env.settings, f"t{uuid.uuid4().hex[:8]}", TECH_PASSWORD, management_ui=False)
    return user


async def as_ops(env: Environment, user: str, message: object, key: str = APPROVAL_DECISION_KEY):  # type: ignore[no-untyped-def]
    reply = await call_worker(OpsSettings(amqp_url=env.settings.amqp_url), user, TECH_PASSWORD, key, ApprovalMessage(message=message))
    return reply.reply


async def test_a_till_cannot_send_an_approval(services, env: Environment, tmp_path: Path) -> None:
    account = new_account_name()
    till = new_till(env, tmp_path)
    await till.create_account(account, STRONG_PASSWORD)
    await till.sign_in(account, STRONG_PASSWORD)
    identity = till.store.identity()
    connection = await aio_pika.connect(env.till_url(identity.broker_username, identity.broker_password))
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(APPROVAL_EXCHANGE, ensure=False)
        body = ApprovalMessage(message=ApprovePasswordReset(request_id=uuid.uuid4(), command_id=uuid.uuid4(), verification_code="AAAA-AAAA"))
        with pytest.raises(ChannelAccessRefused, match="access to exchange 'password.approval'"):
            await exchange.publish(aio_pika.Message(body.model_dump_json().encode()), routing_key=APPROVAL_DECISION_KEY)
    finally:
        await connection.close()
    # and a technician may not forge a reset request (its topic permission allows decisions and queries only)
    user = await technician(env)
    connection = await aio_pika.connect(env.till_url(user, TECH_PASSWORD))
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(APPROVAL_EXCHANGE, ensure=False)
        with pytest.raises(ChannelAccessRefused, match="access to topic 'request' in exchange 'password.approval'"):
            await exchange.publish(aio_pika.Message(b"{}"), routing_key=APPROVAL_REQUEST_KEY)
    finally:
        await connection.close()


async def test_a_decision_from_a_non_ops_user_is_refused(services, env: Environment, tmp_path: Path) -> None:
    account, till = await signed_out_account(env, tmp_path)
    requested = await till.request_password_reset(account, NEW_PASSWORD)
    # the service user (guest) may publish anything, but the worker wants an ops user_id
    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(APPROVAL_EXCHANGE, ensure=False)
        body = ApprovalMessage(message=ApprovePasswordReset(request_id=requested.request_id, command_id=uuid.uuid4(), verification_code=requested.verification_code))
        await exchange.publish(aio_pika.Message(body.model_dump_json().encode(), user_id="guest"), routing_key=APPROVAL_DECISION_KEY)
    finally:
        await connection.close()
    letters = await wait_until(lambda: dead_letters_matching(env, PASSWORD_APPROVAL_QUEUE, str(requested.request_id)), what="refused")
    assert "only ops users" in letters[0].headers["x-tillsync-reason"]
    assert await fetchval(env, "select status from password_reset_requests where request_id = $1", requested.request_id) == "pending"


async def test_old_requests_are_flagged_after_48_hours_and_expire_after_14_days(services, env: Environment, tmp_path: Path) -> None:
    user = await technician(env)
    account, till = await signed_out_account(env, tmp_path)
    old = await till.request_password_reset(account, NEW_PASSWORD)
    other_account, other = await signed_out_account(env, tmp_path)
    ancient = await other.request_password_reset(other_account, NEW_PASSWORD)
    await wait_until(lambda: fetchval(env, "select count(*) = 2 from password_reset_requests where request_id = any($1::uuid[])",
                                      [old.request_id, ancient.request_id]), what="both recorded")
    conn = await env.db()
    try:
        await conn.execute("update password_reset_requests set requested_at = now() - interval '49 hours' where request_id = $1", old.request_id)
        await conn.execute("update password_reset_requests set requested_at = now() - interval '15 days' where request_id = $1", ancient.request_id)
    finally:
        await conn.close()
    listed = await as_ops(env, user, ListPasswordResets(), APPROVAL_QUERY_KEY)
    assert isinstance(listed, PasswordResetList)
    by_id = {r.request_id: r for r in listed.requests}
    assert by_id[old.request_id].overdue and by_id[old.request_id].age_hours >= 49
    assert ancient.request_id not in by_id  # expired: no longer pending
    refused = await as_ops(env, user, ApprovePasswordReset(request_id=ancient.request_id, command_id=uuid.uuid4(), verification_code=ancient.verification_code))
    assert isinstance(refused, ApprovalError) and refused.code == "expired"
    assert await fetchval(env, "select status from password_reset_requests where request_id = $1", ancient.request_id) == "expired"
    # the old password still works for the expired one; the owner hears of the expiry at sign-in
    signed_in = await other.sign_in(other_account, STRONG_PASSWORD)
    assert any("expired without approval" in n.message for n in signed_in.notices)


async def test_decisions_are_idempotent_audited_and_a_newer_request_supersedes(services, env: Environment, tmp_path: Path) -> None:
    user = await technician(env)
    account, till = await signed_out_account(env, tmp_path)
    first = await till.request_password_reset(account, "Erstes-Passwort-1!")
    second = await till.request_password_reset(account, NEW_PASSWORD)
    await wait_until(lambda: fetchval(env, "select status from password_reset_requests where request_id = $1", first.request_id),
                     what="recorded")
    superseded = await as_ops(env, user, ApprovePasswordReset(request_id=first.request_id, command_id=uuid.uuid4(), verification_code=first.verification_code))
    assert isinstance(superseded, ApprovalError) and superseded.code == "not_pending" and "superseded" in superseded.message

    wrong = await as_ops(env, user, ApprovePasswordReset(
        request_id=second.request_id, command_id=uuid.uuid4(), verification_code=first.verification_code))
    assert isinstance(wrong, ApprovalError) and wrong.code == "wrong_code"  # the code of another request
    command = ApprovePasswordReset(request_id=second.request_id, command_id=uuid.uuid4(), verification_code=second.verification_code)
    listed = await as_ops(env, user, ListPasswordResets(), APPROVAL_QUERY_KEY)
    [shown] = [r for r in listed.requests if r.request_id == second.request_id]
    assert shown.superseded_recently == 1  # the technician is warned
    approved = await as_ops(env, user, command)
    again = await as_ops(env, user, command)  # a retry of the same command
    assert isinstance(approved, PasswordResetDecided) and approved.request.status == "approved" and not approved.repeat
    assert isinstance(again, PasswordResetDecided) and again.repeat and again.request.decided_by == user
    late_reject = await as_ops(env, user, RejectPasswordReset(request_id=second.request_id, command_id=uuid.uuid4(), reason="zu spät"))
    assert isinstance(late_reject, ApprovalError) and f"approved by {user}" in late_reject.message
    # a command id used before belongs to its command only
    reused = await as_ops(env, user, RejectPasswordReset(request_id=first.request_id, command_id=command.command_id, reason="x"))
    assert isinstance(reused, ApprovalError) and reused.code == "invalid" and "was used for another command" in reused.message
    conn = await env.db()
    try:
        audit = [(r["action"], r["actor"]) for r in await conn.fetch(
            "select action, actor from password_reset_audit where account_id = (select account_id from accounts where account_name = $1) "
            "order by audit_id", account)]
    finally:
        await conn.close()
    assert audit == [("requested", "account-service"), ("superseded", "system"), ("requested", "account-service"), ("approved", user)]
    conn = await env.db()
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await conn.execute("delete from password_reset_audit")  # the services' role
    finally:
        await conn.close()
    conn = await env.admin_db()
    try:
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("delete from password_reset_audit")  # the owner: the trigger
    finally:
        await conn.close()
    with pytest.raises(AccountError, match="wrong"):
        await till.sign_in(account, STRONG_PASSWORD)
    signed_in = await till.sign_in(account, NEW_PASSWORD)
    assert [n.message for n in signed_in.notices if "approved" in n.message]


async def test_a_rejected_request_keeps_the_old_password_and_tells_the_owner(services, env: Environment, tmp_path: Path) -> None:
    user = await technician(env)
    account, till = await signed_out_account(env, tmp_path)
    requested = await till.request_password_reset(account, NEW_PASSWORD)
    await wait_until(lambda: fetchval(env, "select 1 from password_reset_requests where request_id = $1", requested.request_id), what="recorded")
    rejected = await as_ops(env, user, RejectPasswordReset(request_id=requested.request_id, command_id=uuid.uuid4(), reason="Anrufer nicht verifiziert"))
    assert isinstance(rejected, PasswordResetDecided) and rejected.request.status == "rejected"
    with pytest.raises(AccountError, match="wrong"):
        await till.sign_in(account, NEW_PASSWORD)
    signed_in = await till.sign_in(account, STRONG_PASSWORD)
    assert any("rejected by" in n.message and "Anrufer nicht verifiziert" in n.message for n in signed_in.notices)


async def test_reset_requests_are_refused_with_the_reason(services, env: Environment, tmp_path: Path) -> None:
    account, till = await signed_out_account(env, tmp_path)
    with pytest.raises(AccountError, match="there is no account named nobody"):
        await new_till(env, tmp_path).request_password_reset("nobody@example.com", NEW_PASSWORD)
    with pytest.raises(RuntimeError, match="this till belongs to account"):
        await till.request_password_reset("other@example.com", NEW_PASSWORD)
    with pytest.raises(AccountError) as weak:
        await till.request_password_reset(account, "schwach")
    assert weak.value.code == "weak_password" and any("digit" in d for d in weak.value.details)
    await till.sign_in(account, STRONG_PASSWORD)
    with pytest.raises(RuntimeError, match="this till is signed in"):
        await till.request_password_reset(account, NEW_PASSWORD)
    with pytest.raises(OpsError, match="the broker refused ops-nobody"):
        await call_worker(OpsSettings(amqp_url=env.settings.amqp_url), "ops-nobody", "x" * 12, APPROVAL_QUERY_KEY,
                          ApprovalMessage(message=ListPasswordResets()))


async def test_requests_are_limited_and_sign_ins_meanwhile_are_shown(services, env: Environment, tmp_path: Path) -> None:
    user = await technician(env)
    account, till = await signed_out_account(env, tmp_path)
    for _ in range(5):
        last = await till.request_password_reset(account, NEW_PASSWORD)
        await wait_until(lambda r=last: fetchval(env, "select 1 from password_reset_requests where request_id = $1", r.request_id),
                         what="recorded")
    with pytest.raises(AccountError, match="5 password resets were requested for this account in the last hour") as limited:
        await till.request_password_reset(account, NEW_PASSWORD)
    assert limited.value.code == "too_many_requests"
    other = new_till(env, tmp_path, name="Kasse 2")
    await other.sign_in(account, STRONG_PASSWORD)  # someone knows the old password after all
    listed = await as_ops(env, user, ListPasswordResets(), APPROVAL_QUERY_KEY)
    [shown] = [r for r in listed.requests if r.request_id == last.request_id]
    assert shown.superseded_recently == 4 and shown.signed_in_since and shown.signed_in_since[0].startswith("Kasse 2 (")


async def test_an_answer_goes_only_to_the_callers_direct_reply_to(services, env: Environment, tmp_path: Path) -> None:
    user = await technician(env)
    account = new_account_name()
    till = new_till(env, tmp_path)
    await till.create_account(account, STRONG_PASSWORD)
    await till.sign_in(account, STRONG_PASSWORD)
    queue_name = till.store.queue_name()
    connection = await aio_pika.connect(env.till_url(user, TECH_PASSWORD))
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(APPROVAL_EXCHANGE, ensure=False)
        body = ApprovalMessage(message=ListPasswordResets(include_decided=True))
        await exchange.publish(
            aio_pika.Message(body.model_dump_json().encode(), user_id=user, reply_to=queue_name), routing_key=APPROVAL_QUERY_KEY
        )
        # a message the worker cannot read, with a proper reply-to: answered at once
        rpc = RpcClient(connection)
        await rpc.start()
        reply = await rpc.call(APPROVAL_EXCHANGE, APPROVAL_DECISION_KEY, ApprovalMessage.model_construct(
            schema_version=1, message=ListPasswordResets()), TypeAdapter(ApprovalReply), timeout_seconds=10, user_id=user)
        assert isinstance(reply.reply, ApprovalError) and reply.reply.code == "invalid"
    finally:
        await connection.close()
    admin = await aio_pika.connect(env.settings.amqp_url)
    try:
        queue = await (await admin.channel()).get_queue(queue_name)
        assert await queue.get(fail=False, no_ack=True) is None  # nothing was sent to the till's queue
    finally:
        await admin.close()


async def test_a_till_lost_while_signed_in_is_signed_out_by_the_administrator(services, env: Environment, tmp_path: Path) -> None:
    account, till = await signed_out_account(env, tmp_path)
    lost = new_till(env, tmp_path, serial="SN-LOST", name="Kasse verloren")
    await lost.sign_in(account, STRONG_PASSWORD)
    lost.close()  # the store is gone with the till
    with pytest.raises(AccountError, match=r"still signed in: Kasse verloren \(SN-LOST\)"):
        await till.request_password_reset(account, NEW_PASSWORD)
    result = await asyncio.to_thread(
        CliRunner().invoke, app, ["ops", "sign-out-till", account, "SN-LOST"],
        env={"TILLSYNC_DATABASE_URL": env.settings.database_url, "TILLSYNC_AMQP_URL": env.settings.amqp_url,
             "TILLSYNC_MANAGEMENT_URL": env.settings.management_url},
    )
    assert result.exit_code == 0 and "Kasse verloren (SN-LOST) signed out" in result.output, result.output
    assert await fetchval(env, "select signed_in from tills where serial_number = 'SN-LOST'") is False
    assert (await till.request_password_reset(account, NEW_PASSWORD)).verification_code


async def test_the_till_that_asked_can_see_a_rejection_without_any_password(services, env: Environment, tmp_path: Path) -> None:
    user = await technician(env)
    account, till = await signed_out_account(env, tmp_path)
    requested = await till.request_password_reset(account, NEW_PASSWORD)
    status = await wait_until(lambda: _status_or_none(till), what="the request recorded")
    assert status.status == "pending"
    await as_ops(env, user, RejectPasswordReset(request_id=requested.request_id, command_id=uuid.uuid4(), reason="Rückruf fehlgeschlagen"))
    status = await till.password_reset_status()
    assert (status.status, status.decided_by, status.reason) == ("rejected", user, "Rückruf fehlgeschlagen")
    # another till (not knowing the code) learns nothing
    other = new_till(env, tmp_path)
    other.store.save_password_reset(requested.request_id, "AAAA-AAAA")
    with pytest.raises(AccountError, match="no password reset request"):
        await other.password_reset_status()


async def _status_or_none(till: Till):  # type: ignore[no-untyped-def]
    try:
        return await till.password_reset_status()
    except AccountError:
        return None


async def test_a_stranger_cannot_ask_and_a_signed_in_till_blocks_the_approval(services, env: Environment, tmp_path: Path) -> None:
    user = await technician(env)
    account, till = await signed_out_account(env, tmp_path)
    identity = till.store.identity()
    # the same serial number and name, but not the till's local store
    stranger = new_till(env, tmp_path / "elsewhere", serial=identity.serial_number, name=identity.till_name)
    with pytest.raises(AccountError, match="has never been signed in to it"):
        await stranger.request_password_reset(account, "Fremdes-Passwort-1!")
    requested = await till.request_password_reset(account, NEW_PASSWORD)
    await wait_until(lambda: fetchval(env, "select 1 from password_reset_requests where request_id = $1", requested.request_id),
                     what="recorded")
    other = new_till(env, tmp_path, name="Kasse 2")
    await other.sign_in(account, STRONG_PASSWORD)  # someone signs in with the old password meanwhile
    refused = await as_ops(env, user, ApprovePasswordReset(
        request_id=requested.request_id, command_id=uuid.uuid4(), verification_code=requested.verification_code))
    assert isinstance(refused, ApprovalError) and "signed in again (with the old password) since the request" in refused.message
    assert await fetchval(env, "select status from password_reset_requests where request_id = $1", requested.request_id) == "pending"
