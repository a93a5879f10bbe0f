"""A forgotten password, reset with a service technician's approval, end to end: the
services as processes, two tills that keep selling while signed out, the ops command line."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.support import STRONG_PASSWORD, Environment, fetchval, new_account_name, new_till, sell, wait_until
from tillsync.cli import app
from tillsync.ops import add_technician
from till_agent.till import AccountError

pytestmark = pytest.mark.e2e

NEW_PASSWORD = "Neues-Passwort-2026!"
TECHNICIAN_PASSWORD = "Techniker-Passwort-1"


def ops(env: Environment, technician: str, *args: str) -> tuple[int, str]:
    """Run `tillsync ops password-requests ...` as the technician; (exit code, output)."""
    result = CliRunner().invoke(
        app,
        ["ops", "password-requests", *args],
        env={
            "TILLSYNC_AMQP_URL": env.settings.amqp_url,
            "TILLSYNC_OPS_USER": technician,
            "TILLSYNC_OPS_PASSWORD": TECHNICIAN_PASSWORD,
        },
    )
    return result.exit_code, result.output


async def test_a_forgotten_password_is_reset_after_approval_and_nothing_recorded_meanwhile_is_lost(
    fresh_env: Environment, service_processes, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    for process in service_processes.values():
        process.start()
    for process in service_processes.values():
        await process.wait_ready()
    account = new_account_name()
    one = new_till(fresh_env, tmp_path, name="Kasse 1")
    two = new_till(fresh_env, tmp_path, name="Kasse 2")
    await one.create_account(account, STRONG_PASSWORD)
    for till in (one, two):
        await till.sign_in(account, STRONG_PASSWORD)
        till.start_sync()
    sell(one, 3)
    sell(two, 2)
    for till in (one, two):
        assert await till.relay.drain(20)

    # asking while a till is signed in fails and names it
    await one.stop_sync()
    await one.sign_out()
    with pytest.raises(AccountError, match=r"still signed in: Kasse 2 \(SN-") as refused:
        await one.request_password_reset(account, NEW_PASSWORD)
    assert refused.value.code == "tills_signed_in"
    await two.stop_sync()
    await two.sign_out()

    # both tills keep selling while signed out
    sell(one, 4)
    sell(two, 5)
    with pytest.raises(AccountError, match="breaks these rules"):
        await one.request_password_reset(account, "kurz")
    requested = await one.request_password_reset(account, NEW_PASSWORD)
    sell(one, 1)

    technician = f"anna{uuid.uuid4().hex[:6]}"
    await add_technician(fresh_env.settings, technician, TECHNICIAN_PASSWORD, management_ui=False)
    code, listed = await asyncio.to_thread(ops, fresh_env, technician, "list")
    assert code == 0, listed
    assert str(requested.request_id) in listed and account in listed and "pending" in listed
    # until the approval the old password is the one
    with pytest.raises(AccountError, match="wrong"):
        await two.sign_in(account, NEW_PASSWORD)
    code, wrong = await asyncio.to_thread(ops, fresh_env, technician, "approve", str(requested.request_id), "--code", "ZZZZ-ZZZZ")
    assert code == 1 and "the verification code does not match" in wrong, wrong
    code, approved = await asyncio.to_thread(
        ops, fresh_env, technician, "approve", str(requested.request_id), "--code", requested.verification_code.lower()
    )
    assert code == 0, approved
    assert f"approved by ops-{technician}" in approved

    # one till signs in with the new password, sees the notice and uploads what it recorded
    signed_in = await one.sign_in(account, NEW_PASSWORD)
    assert any(f"approved by ops-{technician}" in n.message for n in signed_in.notices)
    with pytest.raises(AccountError, match="wrong"):
        await two.sign_in(account, STRONG_PASSWORD)  # the old password no longer works
    await asyncio.sleep(1.1)  # the throttle's delay after wrong passwords
    await two.sign_in(account, NEW_PASSWORD)
    for till in (one, two):
        till.start_sync()
    for till in (one, two):
        assert await till.relay.drain(30)
    till_ids = [one.store.identity().till_id, two.store.identity().till_id]
    await wait_until(
        lambda: fetchval(fresh_env, "select count(*) = 15 from archive_records where kind = 'receipt' and till_id = any($1::uuid[])", till_ids),
        what="every sale archived",
    )
    for till in (one, two):
        records = [record_id for record_id, _, _ in till.store.recorded("receipt")]
        archived = await fetchval(
            fresh_env, "select count(distinct record_id) from archive_records where record_id = any($1::uuid[])", records
        )
        assert archived == len(records)  # each exactly once (record_id is the key)
    # the audit trail names the approver
    actor = await fetchval(
        fresh_env, "select actor from password_reset_audit where request_id = $1 and action = 'approved'", requested.request_id
    )
    assert actor == f"ops-{technician}"
    for till in (one, two):
        await till.stop_sync()
        till.close()
