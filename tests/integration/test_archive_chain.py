"""Tamper evidence: tills chain their records, the archive writer checks the chain on arrival,
``tillsync archive verify`` re-checks every chain and names the first broken link."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner, Result

from shared.amqp import REASON_HEADER
from shared.chain import chain_hash
from shared.db import init_connection
from shared.models import Upload
from shared.topology import ARCHIVE_WRITER_QUEUE, upload_routing_key
from tests.support import (
    STRONG_PASSWORD,
    Environment,
    dead_letters_matching,
    fetchval,
    new_account_name,
    new_till,
    publish_as_till,
    sell,
    signed_in_till,
    wait_until,
)
from tillsync.cli import app
from till_agent.till import Till

pytestmark = pytest.mark.integration


async def verify(env: Environment, *args: str) -> Result:
    """``tillsync archive verify ARGS`` against ``env``'s database (in a thread: the CLI runs its own loop)."""
    return await asyncio.to_thread(
        CliRunner().invoke, app, ["archive", "verify", *args],
        env={"TILLSYNC_DATABASE_URL": env.settings.database_url, "COLUMNS": "1000"},
    )


async def superuser(env: Environment) -> asyncpg.Connection:
    """A connection that can do what the services cannot (the database owner)."""
    conn = await asyncpg.connect(env.infra.database_url_for(env.database))
    await init_connection(conn)
    return conn


async def fetchrow(env: Environment, query: str, *args: object) -> asyncpg.Record:
    conn = await env.db()
    try:
        return await conn.fetchrow(query, *args)
    finally:
        await conn.close()


async def selling_till(env: Environment, tmp_path: Path, account: str, name: str, receipts: int) -> Till:
    """A till of ``account`` (created by its first till) that sold ``receipts`` and closed the day, all uploaded."""
    first = not await fetchval(env, "select 1 from accounts where account_name = $1", account)
    till = await signed_in_till(env, tmp_path, account, name, create=first)
    sell(till, receipts)
    till.close_day(dt.datetime.now(dt.UTC).date(), dt.datetime.now(dt.UTC))
    till.start_sync()
    assert await till.relay.drain(30)
    await till.stop_sync()
    return till


async def archived_count(env: Environment, till: Till) -> int:
    return await fetchval(env, "select count(*) from archive_records where till_id = $1", till.store.identity().till_id)  # type: ignore[return-value]


async def test_a_record_changed_in_the_database_is_named_by_verify(services, env: Environment, tmp_path: Path) -> None:
    account = new_account_name()
    one = await selling_till(env, tmp_path, account, "Kasse 1", 6)
    two = await selling_till(env, tmp_path, account, "Kasse 2", 4)
    try:
        await wait_until(lambda: _equals(archived_count(env, one), 7), what="till 1's records archived")
        await wait_until(lambda: _equals(archived_count(env, two), 5), what="till 2's records archived")
        # the chain the archive keeps is the one the till made
        row = await fetchrow(
            env, "select prev_hash, chain_hash, payload from archive_records where till_id = $1 and till_seq = 2",
            one.store.identity().till_id,
        )
        assert bytes(row["chain_hash"]).hex() == row["payload"]["chain_hash"] == chain_hash(
            row["payload"]["prev_hash"], row["payload"]
        )
        intact = await verify(env, "--account", account)
        assert intact.exit_code == 0, intact.output
        assert "2 tills, 12 records: every chain intact" in intact.output

        # someone with the database's superuser rights changes one receipt, passing the triggers
        conn = await superuser(env)
        try:
            async with conn.transaction():
                await conn.execute("set local session_replication_role = replica")  # triggers off
                changed = await conn.fetchval(
                    """
                    update archive_records set payload = jsonb_set(payload, '{record,cashier,name}', '"Mallory"')
                    where till_id = $1 and till_seq = 4 returning record_id
                    """,
                    two.store.identity().till_id,
                )
        finally:
            await conn.close()
        broken = await verify(env, "--account", account)
        assert broken.exit_code == 1, broken.output
        lines = broken.output.splitlines()
        [bad] = [line for line in lines if line.startswith("BROKEN")]
        assert "Kasse 2" in bad and f"record {changed}" in bad and "till_seq 4" in bad, broken.output
        assert "its content changed after archiving" in bad and "no longer matches its content" in bad
        assert any(line.startswith("OK") and "Kasse 1" in line for line in lines), broken.output
        assert "1 of 2 tills has a broken chain" in broken.output
        assert "1 of 5 records fail the check" in broken.output  # the records after it still link
        # one till at a time
        only_one = await verify(env, "--till", str(one.store.identity().till_id))
        assert only_one.exit_code == 0 and "1 till, 7 records" in only_one.output, only_one.output
    finally:
        one.close()
        two.close()


async def test_a_hash_recomputed_by_the_tamperer_breaks_the_next_link(services, env: Environment, tmp_path: Path) -> None:
    account = new_account_name()
    till = await selling_till(env, tmp_path, account, "Kasse 1", 3)
    try:
        await wait_until(lambda: _equals(archived_count(env, till), 4), what="the records archived")
        till_id = till.store.identity().till_id
        conn = await superuser(env)
        try:
            row = await conn.fetchrow("select payload from archive_records where till_id = $1 and till_seq = 2", till_id)
            payload = row["payload"]
            payload["record"]["cashier"]["name"] = "Mallory"
            payload["chain_hash"] = chain_hash(payload["prev_hash"], payload)
            async with conn.transaction():
                await conn.execute("set local session_replication_role = replica")
                await conn.execute(
                    """
                    update archive_records set payload = $2::jsonb, chain_hash = $3,
                        content_sha256 = sha256(convert_to($4, 'UTF8'))
                    where till_id = $1 and till_seq = 2
                    """,
                    till_id, payload, bytes.fromhex(payload["chain_hash"]), _canonical(payload),
                )
        finally:
            await conn.close()
        result = await verify(env, "--till", "Kasse 1", "--account", account)
        assert result.exit_code == 1, result.output
        [bad] = [line for line in result.output.splitlines() if line.startswith("BROKEN")]
        # record 2 is consistent in itself now, but its key kept the content hash of its
        # arrival; and the link from record 3 shows the change too
        assert "first broken link at till_seq 2" in bad and "changed after archiving" in bad, result.output
        assert "2 of 4 records fail the check" in result.output
    finally:
        till.close()


def _canonical(payload: dict) -> str:  # type: ignore[type-arg]
    import rfc8785

    return rfc8785.dumps(payload).decode()


async def test_uploads_that_break_the_chain_are_refused_on_arrival(services, env: Environment, tmp_path: Path) -> None:
    account = new_account_name()
    till = await selling_till(env, tmp_path, account, "Kasse 1", 2)
    try:
        await wait_until(lambda: _equals(archived_count(env, till), 3), what="the records archived")
        me = till.store.identity()
        [last] = [r for r in till.store.recorded() if r[1] == 3]
        fields = dict(
            account_id=me.account_id, till_id=me.till_id, till_seq=4, recorded_at=dt.datetime.now(dt.UTC),
            record=Upload.model_validate(
                await fetchval(env, "select payload from archive_records where record_id = $1", last[0])
            ).record,
        )
        key = upload_routing_key(me.account_id, me.till_id, "zreport")  # type: ignore[arg-type]
        # linked to something that is not record 3
        wrong_link = Upload.sealed("ab" * 32, record_id=uuid.uuid4(), **fields)
        await publish_as_till(env, till, wrong_link.model_dump_json().encode(), key)
        letters = await wait_until(
            lambda: dead_letters_matching(env, ARCHIVE_WRITER_QUEUE, str(wrong_link.record_id)), what="refused"
        )
        reason = letters[0].headers[REASON_HEADER]
        assert "breaks the hash chain" in reason and "is not the chain_hash" in reason and "till_seq 3" in reason
        assert await fetchval(
            env, "select reason from archive_conflicts where record_id = $1", wrong_link.record_id
        ) == reason  # kept for the operator, not lost
        # and the till that sent it hears of it: a notice, counted in its status
        till.start_sync()
        await wait_until(lambda: till.store.archive_refusals() == 1, what="the till told of the refusal")
        await till.stop_sync()
        [notice] = [n for n in till.notices() if n.code == "archive_refused"]
        assert notice.record_id == wrong_link.record_id and "till_seq 4" in notice.message and "breaks the hash chain" in notice.message
        # a chain_hash that does not fit the content (changed on the way)
        honest = Upload.sealed(
            await fetchval(env, "select encode(chain_hash, 'hex') from archive_records where record_id = $1", last[0]),
            record_id=uuid.uuid4(), **fields,
        )
        altered = json.loads(honest.model_dump_json())
        altered["recorded_at"] = "2020-01-01T00:00:00Z"
        await publish_as_till(env, till, json.dumps(altered).encode(), key)
        letters = await wait_until(
            lambda: dead_letters_matching(env, ARCHIVE_WRITER_QUEUE, str(honest.record_id)), what="refused"
        )
        assert "does not match its content" in letters[0].headers[REASON_HEADER]
        # the honest upload links and is archived
        await publish_as_till(env, till, honest.model_dump_json().encode(), key)
        await wait_until(lambda: _equals(archived_count(env, till), 4), what="the linked record archived")
        # the archived chain links, but what the till sent was not all archived: verify says so
        result = await verify(env, "--account", account)
        assert result.exit_code == 1, result.output
        assert "4 records link, but uploads were refused for breaking the chain" in result.output
        assert "1 uploads of this till were refused for breaking its chain" in result.output
    finally:
        till.close()


async def test_a_reinstalled_till_continues_its_chain(services, env: Environment, tmp_path: Path) -> None:
    account = new_account_name()
    first = await selling_till(env, tmp_path / "first", account, "Kasse 1", 2)
    serial = first.store.identity().serial_number
    await wait_until(lambda: _equals(archived_count(env, first), 3), what="the records archived")
    first.close()
    # a new local store with the same serial number: it never saw the archived records
    again = new_till(env, tmp_path / "again", serial=serial, name="Kasse 1")
    try:
        signed_in = await again.sign_in(account, STRONG_PASSWORD, replace=True)
        assert signed_in.last_till_seq == 3 and signed_in.last_chain_hash is not None
        sell(again, 2)
        again.start_sync()
        assert await again.relay.drain(30)
        await again.stop_sync()
        await wait_until(lambda: _equals(archived_count(env, again), 5), what="the new records archived")
        prev = await fetchval(
            env, "select payload->>'prev_hash' from archive_records where till_id = $1 and till_seq = 4",
            signed_in.till_id,
        )
        assert prev == signed_in.last_chain_hash
        result = await verify(env, "--account", account)
        assert result.exit_code == 0 and "5 records: every chain intact" in result.output, result.output
    finally:
        again.close()


async def test_verify_names_what_it_cannot_find(services, env: Environment) -> None:
    unknown = await verify(env, "--account", "nobody@example.com")
    assert unknown.exit_code == 1 and "no account 'nobody@example.com'" in unknown.stderr, unknown.output
    no_till = await verify(env, "--till", "no such till")
    assert no_till.exit_code == 1 and "no till 'no such till'" in no_till.stderr, no_till.output


async def _equals(value, expected) -> bool:  # type: ignore[no-untyped-def]
    return (await value) == expected


# Tampering with the superuser's powers, each on a till of its own: (what is done to till_seq 2, what verify says)
TAMPERING = {
    "deleted": ("delete from archive_records where till_id = $1 and till_seq = 2", "it is gone from archive_records"),
    "chain fields removed, hashes recomputed": (
        """
        update archive_records set payload = payload - 'prev_hash' - 'chain_hash', prev_hash = null, chain_hash = null,
            content_sha256 = sha256(convert_to((payload - 'prev_hash' - 'chain_hash')::text, 'UTF8'))
        where till_id = $1 and till_seq = 2
        """,
        "it has no chain hashes, although the till's chain began at till_seq 1",
    ),
    "moved to another archive time": (
        "update archive_records set archived_at = archived_at - interval '1 day' where till_id = $1 and till_seq = 2",
        "it is gone from archive_records",
    ),
    "recorded_at column changed": (
        "update archive_records set recorded_at = recorded_at - interval '400 days' where till_id = $1 and till_seq = 2",
        "column recorded_at is",
    ),
}


async def test_deleted_moved_and_unchained_records_are_broken_links(services, env: Environment, tmp_path: Path) -> None:
    account = new_account_name()
    tills = {case: await selling_till(env, tmp_path / str(i), account, f"Kasse {i}", 3) for i, case in enumerate(TAMPERING)}
    try:
        for till in tills.values():
            await wait_until(lambda t=till: _equals(archived_count(env, t), 4), what="the records archived")
        conn = await superuser(env)
        try:
            for case, (statement, _) in TAMPERING.items():
                async with conn.transaction():
                    await conn.execute("set local session_replication_role = replica")  # triggers off
                    await conn.execute(statement, tills[case].store.identity().till_id)
        finally:
            await conn.close()
        for case, (_, expected) in TAMPERING.items():
            result = await verify(env, "--till", str(tills[case].store.identity().till_id))
            assert result.exit_code == 1, (case, result.output)
            [bad] = [line for line in result.output.splitlines() if line.startswith("BROKEN")]
            assert "first broken link at till_seq 2" in bad and expected in bad, (case, result.output)
    finally:
        for till in tills.values():
            till.close()


async def test_a_shadowing_search_path_and_a_replaced_check_function_cannot_hide_records(
    services, env: Environment, tmp_path: Path
) -> None:
    account = new_account_name()
    till = await selling_till(env, tmp_path, account, "Kasse 1", 3)
    try:
        await wait_until(lambda: _equals(archived_count(env, till), 4), what="the records archived")
        conn = await superuser(env)
        try:
            # the owner shadows the archive for the services' role and replaces the database's own check
            await conn.execute(
                f"""
                create schema shadow;
                create view shadow.archive_records as select * from public.archive_records where till_seq < 3;
                create view shadow.archive_record_keys as select * from public.archive_record_keys where till_seq < 3;
                grant usage on schema shadow to tillsync_service;
                grant select on all tables in schema shadow to tillsync_service;
                alter role tillsync_service in database "{env.database}" set search_path = shadow, public;
                create or replace function archive_integrity_problems() returns setof text language sql
                    as $$ select null::text where false $$;
                """
            )
        finally:
            await conn.close()
        result = await verify(env, "--account", account)
        # read through pg_catalog and public only: every record is seen, and the chain is intact
        assert result.exit_code == 0 and "4 records: every chain intact" in result.output, result.output
        conn = await superuser(env)
        try:
            # with its check function replaced, the database's own guard lets row security on ...
            await conn.execute("alter table archive_records enable row level security")
        finally:
            await conn.close()
        # ... but the readers check the catalog themselves
        result = await verify(env, "--account", account)
        assert result.exit_code == 1 and "row security is on for the archive table archive_records" in result.output, result.output
    finally:
        till.close()
