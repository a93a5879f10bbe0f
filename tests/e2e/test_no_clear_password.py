"""After a full run, no log line, database row or persisted message holds a clear password.

The run includes the paths where a password could leak: account creation, sign-in,
a wrong password, a weak password refused, a malformed request carrying a password
that is dead-lettered, and a password reset (a weak one refused, one approved by a
technician, then used to sign in).
"""

from __future__ import annotations

import io
import json
import uuid

import aio_pika
import pytest
from rich.console import Console

from shared.models import ApprovalMessage, ApprovePasswordReset
from shared.topology import (
    ACCOUNT_EXCHANGE,
    ACCOUNT_SERVICE_QUEUE,
    ACCOUNT_SERVICE_ROUTING_KEY,
    APPROVAL_DECISION_KEY,
    dead_letter_queue_name,
)
from tests.e2e.conftest import one_business_day
from tests.support import new_account_name, new_till, wait_until
from tillsync.demo import run_demo
from tillsync.ops import OpsSettings, add_technician, call_worker
from till_agent.till import AccountError

pytestmark = pytest.mark.e2e

ACCOUNT_PASSWORD = "Zimtschnecke-7§"
WRONG_PASSWORD = "Falsches-Passwort-3!"
WEAK_PASSWORD = "schwach-ohne-ziffer"
MALFORMED_PASSWORD = "Kaputt-Anfrage-9#"
RESET_PASSWORD = "Vergessen-Neu-5%"
WEAK_RESET_PASSWORD = "vergessen-schwach"
TECHNICIAN_PASSWORD = "Techniker-Geheim-8"
SECRETS = (
    ACCOUNT_PASSWORD, WRONG_PASSWORD, WEAK_PASSWORD, MALFORMED_PASSWORD, RESET_PASSWORD, WEAK_RESET_PASSWORD, TECHNICIAN_PASSWORD
)


async def test_no_clear_password_in_logs_tables_or_persisted_messages(fresh_env, service_processes, admin, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for process in service_processes.values():
        process.start()
    for process in service_processes.values():
        await process.wait_ready()
    demo_output = io.StringIO()
    report = await run_demo(
        fresh_env.settings,
        one_business_day(tmp_path / "day.csv"),
        console=Console(file=demo_output),
        start_services=False,
        account_password=ACCOUNT_PASSWORD,
        password_reset=False,  # this test makes its own reset below
    )
    assert report.ok
    till = new_till(fresh_env, tmp_path / "extra")
    with pytest.raises(AccountError):
        await till.sign_in(report.account_name, WRONG_PASSWORD)
    with pytest.raises(AccountError):
        await till.create_account(new_account_name(), WEAK_PASSWORD)
    await till.sign_in(report.account_name, ACCOUNT_PASSWORD)
    # a password reset: all tills signed out, a weak new password refused, one approved
    await till.sign_out()
    with pytest.raises(AccountError):
        await till.request_password_reset(report.account_name, WEAK_RESET_PASSWORD)
    requested = await till.request_password_reset(report.account_name, RESET_PASSWORD)
    technician = await add_technician(fresh_env.settings, f"secrets-{uuid.uuid4().hex[:6]}", TECHNICIAN_PASSWORD, management_ui=False)
    decided = await call_worker(
        OpsSettings(amqp_url=fresh_env.settings.amqp_url), technician, TECHNICIAN_PASSWORD, APPROVAL_DECISION_KEY,
        ApprovalMessage(message=ApprovePasswordReset(
            request_id=requested.request_id, command_id=uuid.uuid4(), verification_code=requested.verification_code
        )),
    )
    assert decided.reply.reply == "decided"
    await till.sign_in(report.account_name, RESET_PASSWORD)
    # a request the account service cannot parse, with a password in it: dead-lettered
    async with await aio_pika.connect(fresh_env.signup_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(ACCOUNT_EXCHANGE, ensure=False)
        body = json.dumps({"request": {"command": "sign_in", "password": MALFORMED_PASSWORD, "nonsense": True}})
        await exchange.publish(aio_pika.Message(body.encode()), routing_key=ACCOUNT_SERVICE_ROUTING_KEY)
    dlq = dead_letter_queue_name(ACCOUNT_SERVICE_QUEUE)

    async def dead_lettered():  # type: ignore[no-untyped-def]
        facts = await admin.queue(fresh_env.vhost, dlq)
        return facts and facts.get("messages", 0) >= 1

    await wait_until(dead_lettered, timeout_seconds=20, interval=0.5, what="the malformed request in the dead-letter queue")
    for process in service_processes.values():
        process.stop()

    # 1. logs: every service log line, and what the demo printed
    logs = "".join(p.log_path.read_text() for p in service_processes.values()) + demo_output.getvalue()
    assert "account_created" in logs and "sign_in_refused" in logs  # the logs cover these requests
    assert "password_reset_requested" in logs and "password_reset_decided" in logs
    # 2. every row of every table, as text (as the owner: the services' role may not read schema_migrations)
    conn = await fresh_env.admin_db()
    try:
        tables = [r["tablename"] for r in await conn.fetch("select tablename from pg_tables where schemaname = 'public'")]
        dump = "\n".join(
            [str(row[0]) for table in tables for row in await conn.fetch(f'select t::text from "{table}" t')]
        )
    finally:
        await conn.close()
    assert "$argon2id$" in dump  # the accounts table was read
    # 3. persisted messages: whatever sits in the service queues and dead-letter queues
    messages = ""
    for queue in await admin.queues(fresh_env.vhost):
        if queue.get("durable") and queue.get("messages", 0):
            messages += json.dumps(await admin.get_messages(fresh_env.vhost, queue["name"], 1000))
    assert "redacted" in messages  # the dead-lettered request is there, scrubbed
    for secret in SECRETS:
        assert secret not in logs, "a clear password in the logs"
        assert secret not in dump, "a clear password in the database"
        assert secret not in messages, "a clear password in a persisted message"
