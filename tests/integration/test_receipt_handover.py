"""Shared open receipts through the real receipt handover router, broker and database."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import aio_pika
import pytest

from shared.fiscal import PaymentType, VatKey
from shared.models import (
    DOWNLOAD_ADAPTER,
    Cashier,
    Download,
    RecordRefused,
    ReceiptCatchUpDone,
    ReceiptCatchUpRequest,
    ReceiptEvent,
    ReceiptOpened,
    CustomSyncFlags,
    HandoverLine,
    LineAdded,
    LinesMoved,
    LineVoided,
    Payment,
    Receipt,
    ReceiptPaid,
    SyncMode,
    Upload,
)
from shared.topology import (
    RECEIPT_CATCHUP_QUEUE,
    RECEIPT_ROUTER_QUEUE,
    UPLOAD_EXCHANGE,
    receipt_catchup_routing_key,
    till_queue_name,
    upload_routing_key,
)
from tests.integration.test_masterdata_sync import join, new_account, now, stop
from tests.support import Environment, dead_letters_matching, fetchval, publish_as_till, sell, wait_until
from till_agent.booking import SaleLine
from till_agent.store import TillStoreError
from till_agent.till import Till

pytestmark = pytest.mark.integration

RECEIPTS = SyncMode.ARCHIVE_MASTERDATA_RECEIPTS
WAITER = Cashier(cashier_id="7", name="Ben")


async def receipt_tills(env: Environment, tmp_path: Path, *names: str) -> list[Till]:
    """Tills named ``names`` of one new account, syncing in mode ``archive_masterdata_receipts``."""
    account = await new_account(env, tmp_path)
    return [await join(env, tmp_path, account, RECEIPTS, name) for name in names]


def beer(n: int = 1, price: int = 350) -> SaleLine:
    return SaleLine(f"B{n}", f"Bier {n}", Decimal("1"), price, VatKey.REGULAR)


def confirmed_line_ids(till: Till, receipt_id: UUID) -> list[UUID] | None:
    """The line ids in order, once every line the till shows is confirmed by the router."""
    view = till.receipt(receipt_id)
    if view.pending or not all(v.confirmed for v in view.lines):
        return None
    return [v.line.line_id for v in view.lines]


def knows(till: Till, receipt_id: UUID) -> bool:
    try:
        return till.receipt(receipt_id).position >= 1
    except TillStoreError:
        return False


async def router_lines(env: Environment, receipt_id: UUID) -> list[UUID]:
    """Standing line ids of a receipt in the router's event order."""
    conn = await env.db()
    try:
        rows = await conn.fetch(
            """
            select l.line_id from handover_lines l
            join handover_events e on e.receipt_id = l.receipt_id and e.event_type = 'line_added'
                 and (e.event -> 'line' ->> 'line_id')::uuid = l.line_id
            where l.receipt_id = $1 and not l.voided order by e.position
            """,
            receipt_id,
        )
    finally:
        await conn.close()
    return [r["line_id"] for r in rows]


async def archived_closed_receipt(env: Environment, till: Till) -> Receipt:
    """The closed receipt ``till`` archived last (waits until there is one)."""
    payload = await wait_until(
        lambda: fetchval(
            env,
            "select payload -> 'record' from archive_records where kind = 'receipt' and till_id = $1 order by till_seq desc limit 1",
            till.store.identity().till_id,
        ),
        what="the closed receipt archived",
    )
    return Receipt.model_validate(payload)


async def test_two_tills_opening_the_same_table_end_with_one_receipt(services, env: Environment, tmp_path: Path) -> None:
    a, b = await receipt_tills(env, tmp_path, "Kasse A", "Kasse B")
    try:
        # both open table 5 before either hears of the other
        on_a = a.open_receipt(table_nr="5", cashier=WAITER, at=now())
        on_b = b.open_receipt(table_nr="5", cashier=WAITER, at=now())
        a.add_line(on_a, beer(1), now())
        b.add_line(on_b, beer(2), now())
        b.add_line(on_b, beer(3), now())

        def one_receipt_for_table() -> UUID | None:
            views = [t.store.open_receipt_of_table("5") for t in (a, b)]
            if any(v is None or v.pending or len(v.lines) != 3 for v in views):
                return None
            return views[0].receipt_id if views[0].receipt_id == views[1].receipt_id else None  # type: ignore[union-attr]

        winner = await wait_until(one_receipt_for_table, timeout_seconds=30, what="one receipt with all lines on both tills")
        loser_till, loser_receipt = (b, on_b) if winner == on_a else (a, on_a)
        assert loser_till.receipt(loser_receipt).status == "refused"
        assert loser_till.receipt(loser_receipt).merged_into == winner
        [notice] = loser_till.notices()
        assert notice.code == "table_taken" and "table 5 already has open receipt" in notice.message
        assert "booked onto receipt" in notice.message
        assert not (a if loser_till is b else b).notices()
        assert await fetchval(env, "select count(*) from handover_receipts where table_nr = '5' and status = 'open'") == 1
        assert sorted(await router_lines(env, winner)) == sorted(v.line.line_id for v in a.receipt(winner).lines)
        # nothing the loser recorded is lost: its refused opening and lines are archived
        refused_ids = [r for r, _, k in loser_till.store.recorded("receipt_event")]
        archived = await wait_until(
            lambda: fetchval(env, "select count(*) from archive_records where record_id = any($1::uuid[])", refused_ids),
            what="every event archived",
        )
        await wait_until(
            lambda: fetchval(env, "select count(*) = $2 from archive_records where record_id = any($1::uuid[])", refused_ids, len(refused_ids)),
            what="every event archived",
        )
        assert archived
    finally:
        await stop(a, b)


async def test_lines_added_concurrently_are_in_the_same_order_on_every_till(services, env: Environment, tmp_path: Path) -> None:
    a, b, c = await receipt_tills(env, tmp_path, "Kasse A", "Kasse B", "Kasse C")
    try:
        receipt_id = a.open_receipt(table_nr="12", cashier=WAITER, at=now())
        await wait_until(lambda: knows(b, receipt_id) and knows(c, receipt_id), what="the receipt on B and C")

        async def book(till: Till, first: int) -> list[UUID]:
            ids = []
            for i in range(first, first + 100):
                ids.append(till.add_line(receipt_id, beer(i, 300 + i), now()))
                if i % 10 == 0:
                    await asyncio.sleep(0)  # let the relays upload meanwhile
            return ids

        from_a, from_b = await asyncio.gather(book(a, 0), book(b, 1000))
        orders = await wait_until(
            lambda: all(len(confirmed_line_ids(t, receipt_id) or []) == 200 for t in (a, b, c)) and [confirmed_line_ids(t, receipt_id) for t in (a, b, c)],
            timeout_seconds=60,
            what="all 200 lines confirmed on every till",
        )
        assert orders[0] == orders[1] == orders[2]
        assert orders[0] == await router_lines(env, receipt_id)
        assert set(orders[0]) == set(from_a) | set(from_b)
        # each line keeps the till that entered it
        till_of = {v.line.line_id: v.till_id for v in c.receipt(receipt_id).lines}
        assert {till_of[i] for i in from_a} == {a.store.identity().till_id}
        assert {till_of[i] for i in from_b} == {b.store.identity().till_id}
        # the lines really interleaved: neither till's lines all came first
        positions = {line_id: n for n, line_id in enumerate(orders[0])}
        assert max(positions[i] for i in from_a) > min(positions[i] for i in from_b)
        assert max(positions[i] for i in from_b) > min(positions[i] for i in from_a)
        total = sum(v.line.amount for v in c.receipt(receipt_id).lines)
        assert c.receipt(receipt_id).total == total
        assert await fetchval(env, "select total from handover_receipts where receipt_id = $1", receipt_id) == total
    finally:
        await stop(a, b, c)


async def test_a_receipt_paid_on_another_till_while_offline_is_closed_on_return(services, env: Environment, tmp_path: Path) -> None:
    a, b = await receipt_tills(env, tmp_path, "Kasse A", "Kasse B")
    try:
        receipt_id = a.open_receipt(table_nr="3", cashier=WAITER, at=now())
        a.add_line(receipt_id, beer(1), now())
        await wait_until(lambda: confirmed_line_ids(b, receipt_id) if knows(b, receipt_id) else None, what="the line on B")
        await a.stop_sync()  # A goes offline

        b.pay_receipt(receipt_id, PaymentType.CASH, "Bar", now())
        await wait_until(lambda: b.receipt(receipt_id).status == "closed", what="B's payment accepted")
        late_line = a.add_line(receipt_id, beer(2), now())  # A still shows the receipt open
        late_record = a.store.recorded("receipt_event")[-1][0]
        assert a.receipt(receipt_id).status == "open"

        a.start_sync()  # A is back
        await wait_until(lambda: a.receipt(receipt_id).status == "closed", what="A shows the receipt closed")
        view = a.receipt(receipt_id)
        assert view.closed_by == b.store.identity().till_id and view.closed_by_name == "Kasse B"
        with pytest.raises(TillStoreError, match="was paid on till Kasse B"):
            a.pay_receipt(receipt_id, PaymentType.CASH, "Bar", now())
        with pytest.raises(TillStoreError, match="closed receipt cannot change"):
            a.add_line(receipt_id, beer(3), now())
        notices = await wait_until(a.notices, what="a notice on A")
        assert notices[0].code == "receipt_closed" and notices[0].record_id == late_record
        assert "was paid on till Kasse B" in notices[0].message
        assert late_line not in {v.line.line_id for v in a.receipt(receipt_id).lines}
        # refused, reported and archived, not lost
        await wait_until(lambda: fetchval(env, "select count(*) from archive_records where record_id = $1", late_record), what="archived")
        assert await fetchval(env, "select code from handover_refusals where record_id = $1", late_record) == "receipt_closed"
        # B recorded the closed receipt under its own number; its total is the sum of its lines
        [(_, number, _)] = [r for r in b.store.recorded("receipt")]
        receipt = await archived_closed_receipt(env, b)
        assert receipt.receipt_id == receipt_id and receipt.receipt_number == 1 and receipt.status == "closed"
        assert receipt.total == sum(line.amount for line in receipt.lines) == 350
        assert [line.text for line in receipt.lines] == ["Bier 1"]
    finally:
        await stop(a, b)


async def test_a_stale_payment_is_refused_and_the_total_stays_the_sum_of_the_lines(
    services, env: Environment, tmp_path: Path
) -> None:
    a, b = await receipt_tills(env, tmp_path, "Kasse A", "Kasse B")
    try:
        receipt_id = a.open_receipt(table_nr="8", cashier=WAITER, at=now())
        a.add_line(receipt_id, beer(1, 400), now())
        await wait_until(lambda: confirmed_line_ids(b, receipt_id) if knows(b, receipt_id) else None, what="the line on B")
        await b.stop_sync()  # B totals and pays without hearing of A's next line
        a.add_line(receipt_id, beer(2, 250), now())
        await wait_until(lambda: confirmed_line_ids(a, receipt_id) and len(a.receipt(receipt_id).lines) == 2, what="A's 2nd line accepted")
        stale = b.pay_receipt(receipt_id, PaymentType.CASH, "Bar", now())
        assert stale.total == 400
        b.start_sync()

        notices = await wait_until(b.notices, what="the refusal on B")
        assert notices[0].code == "stale_payment"
        assert "'Bier 2'" in notices[0].message and "Kasse A" in notices[0].message
        await wait_until(lambda: b.receipt(receipt_id).total == 650 and not b.receipt(receipt_id).pending, what="B re-totalled")
        assert b.receipt(receipt_id).status == "open"
        assert not b.store.recorded("receipt"), "no closed receipt for a refused payment"

        paid = b.pay_receipt(receipt_id, PaymentType.DEBIT_CARD, "EC-Karte", now())
        assert paid.total == 650
        await wait_until(lambda: a.receipt(receipt_id).status == "closed" and b.receipt(receipt_id).receipt_number, what="closed")
        for till in (a, b):
            view = till.receipt(receipt_id)
            assert view.total == sum(v.line.amount for v in view.lines) == 650
        assert await fetchval(env, "select total from handover_receipts where receipt_id = $1", receipt_id) == 650
        receipt = await archived_closed_receipt(env, b)
        assert receipt.total == sum(line.amount for line in receipt.lines) == sum(p.amount for p in receipt.payments) == 650
    finally:
        await stop(a, b)


async def test_a_lost_reply_and_a_retry_add_the_line_once(services, env: Environment, tmp_path: Path) -> None:
    a, b = await receipt_tills(env, tmp_path, "Kasse A", "Kasse B")
    try:
        receipt_id = a.open_receipt(table_nr="4", cashier=WAITER, at=now())
        await wait_until(lambda: knows(a, receipt_id) and knows(b, receipt_id), what="the receipt on both")
        await a.stop_sync()
        line_id = a.add_line(receipt_id, beer(1), now())
        [row] = a.store.unsent(10)
        identity = a.store.identity()
        # the till's send reaches the router, then the connection is cut before the till
        # hears anything: no confirm (the row stays unsent) and the broadcast is lost
        connection = await aio_pika.connect(env.till_url(identity.broker_username, identity.broker_password))
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(UPLOAD_EXCHANGE, ensure=False)
        upload = row.upload(identity.account_id, identity.till_id)  # type: ignore[arg-type]
        await exchange.publish(
            aio_pika.Message(upload.model_dump_json().encode(), user_id=identity.broker_username, message_id=str(row.record_id)),
            routing_key=upload_routing_key(identity.account_id, identity.till_id, "receipt_event"),
        )
        await connection.close()
        await wait_until(lambda: fetchval(env, "select count(*) from handover_lines where line_id = $1", line_id), what="accepted")
        await wait_until(lambda: confirmed_line_ids(b, receipt_id), what="the line on B")
        admin_conn = await aio_pika.connect(env.settings.amqp_url)
        purge_channel = await admin_conn.channel()
        await (await purge_channel.get_queue(till_queue_name(identity.till_id))).purge()
        await admin_conn.close()
        assert a.receipt(receipt_id).pending == 1

        a.start_sync()  # the till retries: the same record again
        await wait_until(lambda: confirmed_line_ids(a, receipt_id), what="A's line confirmed")
        await wait_until(lambda: a.store.unsent(10) == [], what="the retry confirmed")
        await asyncio.sleep(0.5)  # give a duplicate time to appear if the router made one
        assert confirmed_line_ids(a, receipt_id) == confirmed_line_ids(b, receipt_id) == [line_id]
        assert await fetchval(env, "select count(*) from handover_events where record_id = $1", row.record_id) == 1
        assert await router_lines(env, receipt_id) == [line_id]
        assert await fetchval(env, "select position from handover_receipts where receipt_id = $1", receipt_id) == 2
    finally:
        await stop(a, b)


async def test_tills_selling_offline_never_collide_on_receipt_numbers(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    a = await join(env, tmp_path, account, RECEIPTS, "Kasse A", start=False)
    b = await join(env, tmp_path, account, RECEIPTS, "Kasse B", start=False)
    try:
        # both offline: cash sales and a paid table each, interleaved
        tables = {}
        for n, till in enumerate((a, b)):
            tables[till] = till.open_receipt(table_nr=f"T{n}", cashier=WAITER, at=now())
            till.add_line(tables[till], beer(n), now())
        for _ in range(15):
            sell(a)
            sell(b)
        for till in (a, b):
            till.pay_receipt(tables[till], PaymentType.CASH, "Bar", now())
        a.start_sync()
        b.start_sync()
        for till in (a, b):
            await wait_until(lambda: till.receipt(tables[till]).receipt_number, timeout_seconds=30, what="the table closed")
            await till.relay.drain(30)
        till_ids = [t.store.identity().till_id for t in (a, b)]
        conn = await env.db()
        try:
            await wait_until(
                lambda: conn.fetchval("select count(*) = 32 from archive_records where kind = 'receipt' and till_id = any($1::uuid[])", till_ids),
                what="all receipts archived",
            )
            rows = await conn.fetch(
                """
                select till_id, (payload -> 'record' ->> 'receipt_number')::int as number,
                       payload -> 'record' ->> 'receipt_id' as receipt_id
                from archive_records where kind = 'receipt' and till_id = any($1::uuid[])
                """,
                till_ids,
            )
            await wait_until(lambda: conn.fetchval("select count(*) = 32 from receipt_numbers where till_id = any($1::uuid[])", till_ids), what="numbers routed")
            assert await conn.fetchval("select count(*) from receipt_number_collisions") == 0
        finally:
            await conn.close()
        for till_id in till_ids:
            numbers = sorted(r["number"] for r in rows if r["till_id"] == till_id)
            assert numbers == list(range(1, 17))  # per till, gapless, no repeats
        assert len({r["receipt_id"] for r in rows}) == 32  # every receipt archived once
        assert a.receipt(tables[a]).receipt_number == 16 and b.receipt(tables[b]).receipt_number == 16
    finally:
        await stop(a, b)


async def test_other_tills_receipts_and_zreports_are_visible_in_receipt_mode(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    a = await join(env, tmp_path, account, SyncMode.ARCHIVE, "Kasse A")
    b = await join(env, tmp_path, account, RECEIPTS, "Kasse B")
    c = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse C")
    try:
        sell(a, 3)
        report = a.close_day(dt.date.today(), now())
        await wait_until(lambda: len(b.store.shared_records("zreport")) == 1, what="A's Z-report on B")
        await wait_until(lambda: len(b.store.shared_records("receipt")) == 3, what="A's receipts on B")
        [shown] = b.store.shared_records("zreport")
        assert (shown.till_id, shown.till_name, shown.record) == (a.store.identity().till_id, "Kasse A", report)
        await a.relay.drain(10)
        await asyncio.sleep(0.3)
        assert c.store.shared_records("zreport") == [] and c.store.shared_records("receipt") == []
        with pytest.raises(TillStoreError, match="does not hand over receipts"):
            c.open_receipt(table_nr="1", cashier=WAITER, at=now())
        # custom mode: Z-reports switched on, receipts off
        d = await join(env, tmp_path, account, SyncMode.ARCHIVE, "Kasse D")
        await d.set_sync_mode(True, SyncMode.CUSTOM, CustomSyncFlags(download_zreports=True))
        sell(a, 1)
        second = a.close_day(dt.date.today(), now())
        # the earlier Z-report comes with D's first catch-up, the new one live
        await wait_until(lambda: [s.record for s in d.store.shared_records("zreport")] == [report, second], what="the Z-reports on D")
        await wait_until(lambda: len(b.store.shared_records("receipt")) == 4, what="the 4th receipt on B")
        assert d.store.shared_records("receipt") == []
        with pytest.raises(TillStoreError, match="does not hand over receipts"):
            d.open_receipt(cashier=WAITER, at=now())
        await stop(d)
    finally:
        await stop(a, b, c)


async def test_a_till_switching_to_receipt_mode_gets_the_open_receipts(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    a = await join(env, tmp_path, account, RECEIPTS, "Kasse A")
    late = await join(env, tmp_path, account, SyncMode.ARCHIVE_MASTERDATA, "Kasse Spät")
    try:
        receipt_id = a.open_receipt(table_nr="9", cashier=WAITER, at=now())
        for i in range(5):
            a.add_line(receipt_id, beer(i), now())
        await wait_until(lambda: confirmed_line_ids(a, receipt_id) and len(a.receipt(receipt_id).lines) == 5, what="lines accepted")
        await late.set_sync_mode(True, RECEIPTS)
        await wait_until(lambda: knows(late, receipt_id) and confirmed_line_ids(late, receipt_id) == confirmed_line_ids(a, receipt_id), what="the open receipt on the late till")
        a.add_line(receipt_id, beer(9), now())
        await wait_until(lambda: len(late.receipt(receipt_id).lines) == 6, what="the next line on the late till")
        with pytest.raises(TillStoreError, match="table 9 already has open receipt"):
            late.open_receipt(table_nr="9", cashier=WAITER, at=now())
    finally:
        await stop(a, late)


def record_unchecked(till: Till, receipt_id: UUID, event: Any) -> UUID:
    """Queue an event the till's own checks would refuse (as a faulty or old till might send it)."""
    with till.store.batch():
        record_id = till.store._enqueue_event(receipt_id, event, now())
    till.relay.wake()
    return record_id


async def refusal(env: Environment, till: Till, record_id: UUID) -> str:
    """The code of the router's refusal of ``record_id`` once the till shows it as a notice."""
    notices = await wait_until(lambda: [n for n in till.notices() if n.record_id == record_id], what=f"a notice for {record_id}")
    assert await fetchval(env, "select code from handover_refusals where record_id = $1", record_id) == notices[0].code
    await wait_until(lambda: fetchval(env, "select count(*) from archive_records where record_id = $1", record_id), what="archived")
    return notices[0].code


async def test_voids_table_moves_and_splits_reach_every_till(services, env: Environment, tmp_path: Path) -> None:
    a, b = await receipt_tills(env, tmp_path, "Kasse A", "Kasse B")
    try:
        first = a.open_receipt(table_nr="1", cashier=WAITER, at=now())
        lines = [a.add_line(first, beer(i, 100 * (i + 1)), now()) for i in range(3)]
        second = b.open_receipt(table_nr="2", cashier=WAITER, at=now())
        b.add_line(second, beer(9, 50), now())
        await wait_until(lambda: knows(a, second) and knows(b, first) and len(b.receipt(first).lines) == 3, what="both receipts on both")

        a.void_line(first, lines[0], now())
        b.move_to_table(first, "7", now())  # any receipt-mode till may add events
        b.move_lines(first, [lines[2]], second, now())  # split: the third line goes to table 2
        b.set_customer(second, "K-42", now())

        def settled() -> bool:
            views = [t.receipt(r) for t in (a, b) for r in (first, second)]
            return all(v.pending == 0 for v in views) and views[0].table_nr == "7" and views[3].customer_nr == "K-42"

        await wait_until(settled, what="every event on both tills")
        for till in (a, b):
            assert [v.line.line_id for v in till.receipt(first).lines] == [lines[1]]
            assert till.receipt(first).total == 200
            moved = [v for v in till.receipt(second).lines if v.line.line_id == lines[2]]
            assert moved and moved[0].till_id == a.store.identity().till_id  # the line keeps its till
            assert till.receipt(second).total == 350
        assert await fetchval(env, "select total from handover_receipts where receipt_id = $1", first) == 200
        assert await fetchval(env, "select total from handover_receipts where receipt_id = $1", second) == 350
        with pytest.raises(TillStoreError, match="table 2 already has open receipt"):
            a.move_to_table(first, "2", now())
    finally:
        await stop(a, b)


async def test_the_router_refuses_events_that_break_the_rules(services, env: Environment, tmp_path: Path) -> None:
    a, b = await receipt_tills(env, tmp_path, "Kasse A", "Kasse B")
    try:
        receipt_id = a.open_receipt(table_nr="1", cashier=WAITER, at=now())
        line_id = a.add_line(receipt_id, beer(1, 300), now())
        closed = a.open_receipt(table_nr="2", cashier=WAITER, at=now())
        a.pay_receipt(closed, PaymentType.CASH, "Bar", now())
        await wait_until(lambda: knows(b, receipt_id) and not b.receipt(receipt_id).pending and len(b.receipt(receipt_id).lines) == 1
                         and knows(b, closed) and b.receipt(closed).status == "closed", what="the receipts on B")

        wrong_total = ReceiptPaid(
            seen_position=2, total=100, payments=(Payment(payment_type=PaymentType.CASH, payment_name="Bar", amount=100),),
            closed_at=now(),
        )
        cases = {
            "payment_mismatch": (receipt_id, wrong_total),
            "duplicate_line": (receipt_id, LineAdded(line=HandoverLine(
                line_id=line_id, article_nr="B2", text="Bier 2", quantity=Decimal(1), unit_price=1, amount=1, vat_key=VatKey.REGULAR))),
            "unknown_line": (receipt_id, LineVoided(line_id=uuid.uuid4())),
            "bad_target": (receipt_id, LinesMoved(line_ids=(line_id,), to_receipt_id=closed)),
            "unknown_receipt": (uuid.uuid4(), LineVoided(line_id=line_id)),
            "receipt_closed": (closed, LineVoided(line_id=line_id)),
        }
        sent = {code: record_unchecked(b, rid, event) for code, (rid, event) in cases.items()}
        for code, record_id in sent.items():
            assert await refusal(env, b, record_id) == code
        # the receipt is unchanged by all of it
        assert await router_lines(env, receipt_id) == [line_id]
        assert await fetchval(env, "select position from handover_receipts where receipt_id = $1", receipt_id) == 2

        # a till whose mode does not hand over receipts: archived, refused, told
        await b.set_sync_mode(True, SyncMode.CUSTOM, CustomSyncFlags(download_receipts=False))
        outsider = record_unchecked(b, receipt_id, LineVoided(line_id=line_id))
        # the custom till no longer receives receipts, but its own verdicts still reach it
        assert await refusal(env, b, outsider) == "not_taking_part"
        assert await router_lines(env, receipt_id) == [line_id]
    finally:
        await stop(a, b)


async def test_bad_receipt_messages_are_dead_lettered_with_the_reason(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    a = await join(env, tmp_path, account, RECEIPTS, "Kasse A", start=False)
    b = await join(env, tmp_path, account, RECEIPTS, "Kasse B", start=False)
    try:
        me = a.store.identity()
        key = upload_routing_key(me.account_id, me.till_id, "receipt_event")
        broken = {
            "schema_version": 1, "record_id": str(uuid.uuid4()), "account_id": str(me.account_id), "till_id": str(me.till_id),
            "till_seq": 1, "recorded_at": now().isoformat(), "prev_hash": None, "chain_hash": "0" * 64,
            "record": {"kind": "receipt_event", "receipt_id": str(uuid.uuid4()),
                       "event": {"type": "paid", "seen_position": 1, "total": 500, "closed_at": now().isoformat(),
                                 "payments": [{"payment_type": "Bar", "payment_name": "Bar", "amount": 400}]}},
        }
        await publish_as_till(env, a, json.dumps(broken).encode(), key)
        letters = await wait_until(lambda: dead_letters_matching(env, RECEIPT_ROUTER_QUEUE, broken["record_id"]), what="dead-lettered")
        assert "payments 400 != total 500" in letters[0].headers["x-tillsync-reason"]

        # a till may only publish with its own routing key, so a forged event names another till in its body
        forged = {**broken, "record_id": str(uuid.uuid4()), "till_id": str(b.store.identity().till_id)}
        forged["record"] = {"kind": "receipt_event", "receipt_id": str(uuid.uuid4()),
                            "event": {"type": "line_voided", "line_id": str(uuid.uuid4())}}
        await publish_as_till(env, a, json.dumps(forged).encode(), key)
        letters = await wait_until(lambda: dead_letters_matching(env, RECEIPT_ROUTER_QUEUE, forged["record_id"]), what="dead-lettered")
        assert "is not the till's broker user" in letters[0].headers["x-tillsync-reason"]
        assert await fetchval(env, "select count(*) from handover_refusals where account_id = $1", me.account_id) == 0
    finally:
        await stop(a, b)


async def test_paying_while_another_till_adds_lines_never_loses_a_line(services, env: Environment, tmp_path: Path) -> None:
    a, b = await receipt_tills(env, tmp_path, "Kasse A", "Kasse B")
    try:
        receipt_id = a.open_receipt(table_nr="6", cashier=WAITER, at=now())
        a.add_line(receipt_id, beer(0, 100), now())
        await wait_until(lambda: knows(b, receipt_id) and not b.receipt(receipt_id).pending and b.receipt(receipt_id).lines, what="B sees it")
        added: list[UUID] = []

        async def keep_adding() -> None:
            for i in range(1, 300):
                try:
                    added.append(a.add_line(receipt_id, beer(i, 100 + i), now()))
                except TillStoreError:
                    return  # A has heard that the receipt is closed
                await asyncio.sleep(0.03)

        async def pay_until_accepted() -> int:
            attempts = 0
            while b.receipt(receipt_id).status != "closed":
                if not b.receipt(receipt_id).payment_pending:
                    b.pay_receipt(receipt_id, PaymentType.CASH, "Bar", now())
                    attempts += 1
                await asyncio.sleep(0.02)
            return attempts

        _, attempts = await asyncio.gather(keep_adding(), pay_until_accepted())
        await wait_until(lambda: a.receipt(receipt_id).status == "closed" and not a.receipt(receipt_id).pending, what="A settled")
        stale = [n for n in b.notices() if n.code == "stale_payment"]
        assert len(stale) == attempts - 1
        closed_number = await wait_until(lambda: b.receipt(receipt_id).receipt_number, what="B numbered the receipt")
        on_receipt = {v.line.line_id for v in b.receipt(receipt_id).lines}
        refused = {n.record_id for n in a.notices() if n.code == "receipt_closed"}
        # every line A booked is on the receipt or was refused (and told), none lost
        assert len(on_receipt) - 1 + len(refused) == len(added)
        for till in (a, b):
            view = till.receipt(receipt_id)
            assert view.total == sum(v.line.amount for v in view.lines)
        assert await fetchval(env, "select total from handover_receipts where receipt_id = $1", receipt_id) == b.receipt(receipt_id).total
        receipt = await archived_closed_receipt(env, b)
        assert receipt.receipt_number == closed_number
        assert receipt.total == sum(x.amount for x in receipt.lines) == b.receipt(receipt_id).total
        assert len(receipt.lines) == len(on_receipt)
    finally:
        await stop(a, b)


async def test_a_till_that_missed_events_asks_for_the_receipt_again(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    a = await join(env, tmp_path, account, RECEIPTS, "Kasse A")
    c = await join(env, tmp_path, account, RECEIPTS, "Kasse C")
    try:
        receipt_id = a.open_receipt(table_nr="11", cashier=WAITER, at=now())
        await wait_until(lambda: knows(c, receipt_id), what="the receipt on C")
        identity = c.store.identity()
        connection = await aio_pika.connect(env.settings.amqp_url)
        try:
            channel = await connection.channel()
            queue = await channel.get_queue(till_queue_name(identity.till_id))
            key = f"{identity.account_id}.receipts"
            await queue.unbind("till.download", key)  # C misses what happens now (as if dropped)
            missed = a.add_line(receipt_id, beer(1), now())
            await wait_until(lambda: fetchval(env, "select count(*) from handover_lines where line_id = $1", missed), what="accepted")
            await queue.bind("till.download", key)
        finally:
            await connection.close()
        later = a.add_line(receipt_id, beer(2), now())
        await wait_until(lambda: confirmed_line_ids(c, receipt_id) == [missed, later], what="C caught up through a snapshot")
        assert c.relay.feed.status().outcomes.get("receipt_gap", 0) >= 1
    finally:
        await stop(a, c)


async def publish_unconfirmed(env: Environment, till: Till) -> None:
    """Publish the till's unsent rows as its relay would, but the till hears nothing back
    (a reply lost): the rows stay unsent and are sent again when the till syncs."""
    identity = till.store.identity()
    for row in till.store.unsent(100):
        upload = row.upload(identity.account_id, identity.till_id)  # type: ignore[arg-type]
        await publish_as_till(env, till, upload.model_dump_json().encode(),
                              upload_routing_key(identity.account_id, identity.till_id, row.kind))  # type: ignore[arg-type]


async def test_a_line_from_a_lost_table_race_never_lands_on_another_tables_bill(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    a = await join(env, tmp_path, account, RECEIPTS, "Kasse A")
    c = await join(env, tmp_path, account, RECEIPTS, "Kasse C", start=False)
    d = await join(env, tmp_path, account, RECEIPTS, "Kasse D", start=False)
    try:
        moved = a.open_receipt(table_nr="5", cashier=WAITER, at=now())
        paid = a.open_receipt(table_nr="6", cashier=WAITER, at=now())
        a.add_line(paid, beer(1, 500), now())
        await wait_until(lambda: not a.receipt(moved).pending and not a.receipt(paid).pending, what="A's receipts accepted")
        # C and D open the same tables offline; their openings reach the router, the replies are lost
        on_c = c.open_receipt(table_nr="5", cashier=WAITER, at=now())
        line_c = c.add_line(on_c, beer(2, 700), now())
        on_d = d.open_receipt(table_nr="6", cashier=WAITER, at=now())
        line_d = d.add_line(on_d, beer(3, 800), now())
        for till in (c, d):
            await publish_unconfirmed(env, till)
            await wait_until(lambda t=till: fetchval(env, "select count(*) = 2 from handover_refusals where till_id = $1",
                                                     t.store.identity().till_id), what="the opening and line refused")
        # meanwhile table 5's receipt moves to table 7 and table 6 is paid
        a.move_to_table(moved, "7", now())
        a.pay_receipt(paid, PaymentType.CASH, "Bar", now())
        await wait_until(lambda: a.receipt(moved).table_nr == "7" and a.receipt(paid).status == "closed", what="moved and paid")
        c.start_sync()
        d.start_sync()
        for till, line_id, code in ((c, line_c, "table_changed"), (d, line_d, "receipt_closed")):
            notices = await wait_until(lambda t=till: [n for n in t.notices() if n.code == code], what=f"the {code} notice")
            assert "book it again" in notices[0].message and "'Bier" in notices[0].message
            # the guest's line is on no other table's bill
            assert await fetchval(env, "select count(*) from handover_lines where line_id = $1", line_id) == 0
        assert a.receipt(moved).total == 0 and a.receipt(paid).total == 500
    finally:
        await stop(a, c, d)


async def test_the_payer_records_its_receipt_even_after_leaving_the_receipt_mode(services, env: Environment, tmp_path: Path) -> None:
    a, b = await receipt_tills(env, tmp_path, "Kasse A", "Kasse B")
    try:
        receipt_id = a.open_receipt(table_nr="W", cashier=WAITER, at=now())
        a.add_line(receipt_id, beer(1, 990), now())
        await wait_until(lambda: knows(b, receipt_id) and len(b.receipt(receipt_id).lines) == 1
                         and not b.receipt(receipt_id).pending, what="B sees the line")
        await b.stop_sync()
        b.pay_receipt(receipt_id, PaymentType.CASH, "Bar", now())
        await publish_unconfirmed(env, b)
        b.store.mark_sent([r.till_seq for r in b.store.unsent(10)])  # the confirm arrived, the verdict did not
        await wait_until(lambda: a.receipt(receipt_id).status == "closed", what="the payment accepted")
        connection = await aio_pika.connect(env.settings.amqp_url)
        try:
            channel = await connection.channel()
            await (await channel.get_queue(till_queue_name(b.store.identity().till_id))).purge()  # the broadcast lost
        finally:
            await connection.close()
        await b.set_sync_mode(True, SyncMode.ARCHIVE_MASTERDATA, force=True)  # the owner insists
        b.start_sync()
        receipt = await archived_closed_receipt(env, b)
        assert receipt.receipt_id == receipt_id and receipt.total == 990
        assert b.receipt(receipt_id).receipt_number == receipt.receipt_number
    finally:
        await stop(a, b)


async def test_another_tills_record_id_and_oversized_catch_ups_are_refused(services, env: Environment, tmp_path: Path) -> None:
    victim_account = await new_account(env, tmp_path)
    victim = await join(env, tmp_path, victim_account, RECEIPTS, "Opfer")
    account = await new_account(env, tmp_path)
    x = await join(env, tmp_path, account, RECEIPTS, "Kasse X", start=False)
    try:
        secret = victim.open_receipt(table_nr="1", cashier=WAITER, at=now())
        victim.add_line(secret, SaleLine("S1", "Geheimes Menü", Decimal(1), 4200, VatKey.REGULAR), now())
        await wait_until(lambda: not victim.receipt(secret).pending and victim.receipt(secret).lines, what="accepted")
        [(stolen, _, _), *_] = victim.store.recorded("receipt_event")
        me = x.store.identity()
        forged = Upload.sealed(
            None,
            record_id=stolen, account_id=me.account_id, till_id=me.till_id, till_seq=1, recorded_at=now(),
            record=ReceiptEvent(receipt_id=uuid.uuid4(), event=ReceiptOpened(
                table_nr="1", business_day=now().date(), opened_at=now(), cashier=WAITER)),
        )
        await publish_as_till(env, x, forged.model_dump_json().encode(), upload_routing_key(me.account_id, me.till_id, "receipt_event"))
        letters = await wait_until(lambda: dead_letters_matching(env, RECEIPT_ROUTER_QUEUE, str(stolen)), what="dead-lettered")
        assert "already used by another till" in letters[0].headers["x-tillsync-reason"]

        too_many = ReceiptCatchUpRequest.model_construct(
            request_id=uuid.uuid4(), account_id=me.account_id, till_id=me.till_id,
            receipt_ids=tuple(uuid.uuid4() for _ in range(1001)), verdicts_for=(), schema_version=1,
        )
        await publish_as_till(env, x, too_many.model_dump_json().encode(), receipt_catchup_routing_key(me.account_id, me.till_id))
        letters = await wait_until(lambda: dead_letters_matching(env, RECEIPT_CATCHUP_QUEUE, str(too_many.request_id)), what="refused")
        assert "receipt_ids" in letters[0].headers["x-tillsync-reason"] and "1000" in letters[0].headers["x-tillsync-reason"]
        many = ReceiptCatchUpRequest(
            request_id=uuid.uuid4(), account_id=me.account_id, till_id=me.till_id,
            receipt_ids=(secret, *(uuid.uuid4() for _ in range(999))),
        )
        await publish_as_till(env, x, many.model_dump_json().encode(), receipt_catchup_routing_key(me.account_id, me.till_id))
        taken: list[Download] = []

        async def answered() -> bool:
            taken.extend(await _queued_downloads(env, x))
            types = {type(t.message) for t in taken}
            return ReceiptCatchUpDone in types and RecordRefused in types

        await wait_until(answered, what="the answer and the archive's refusal on X's queue")
        # the archive writer refused the forged upload too (its record_id is archived) and told X
        assert [t.message.record_id for t in taken if isinstance(t.message, RecordRefused)] == [stolen]
        answers = [t for t in taken if not isinstance(t.message, RecordRefused)]
        assert len(answers) == 1  # one answer, not one per unknown receipt; the other account's receipt is unknown here
        done = answers[0].message
        assert isinstance(done, ReceiptCatchUpDone) and done.receipts == 0 and len(done.unknown_receipts) == 1000
    finally:
        await stop(victim, x)


async def _queued_downloads(env: Environment, till: Till) -> list[Download]:
    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(till_queue_name(till.store.identity().till_id))
        taken = []
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            taken.append(DOWNLOAD_ADAPTER.validate_json(message.body))
        return taken
    finally:
        await connection.close()


async def test_a_second_closing_of_a_shared_receipt_is_flagged(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    a = await join(env, tmp_path, account, RECEIPTS, "Kasse A")
    try:
        receipt_id = a.open_receipt(table_nr="2", cashier=WAITER, at=now())
        a.add_line(receipt_id, beer(1, 600), now())
        a.pay_receipt(receipt_id, PaymentType.CASH, "Bar", now())
        await wait_until(lambda: a.receipt(receipt_id).receipt_number, what="closed")
        first = await archived_closed_receipt(env, a)
        forged = Receipt.model_validate({**first.model_dump(), "receipt_number": 2, "total": 0, "lines": [], "vat": [],
                                         "payments": [{"payment_type": "Bar", "payment_name": "Bar", "amount": 0}]})
        with a.store.batch():  # as a faulty till might: the store itself refuses to change a closed receipt
            a.store._enqueue(forged, now())
        a.relay.wake()
        reason = await wait_until(
            lambda: fetchval(env, "select reason from shared_receipt_mismatches where receipt_id = $1", receipt_id), what="flagged"
        )
        assert "total 0 differs from the shared receipt's 600 cents" in reason and "closed already as receipt number 1" in reason
        assert await fetchval(env, "select receipt_number from handover_receipts where receipt_id = $1", receipt_id) == 1
    finally:
        await stop(a)


async def test_a_payment_counting_a_refused_event_of_its_own_is_stale(services, env: Environment, tmp_path: Path) -> None:
    a, b = await receipt_tills(env, tmp_path, "Kasse A", "Kasse B")
    try:
        receipt_id = a.open_receipt(table_nr="V", cashier=WAITER, at=now())
        wrong = a.add_line(receipt_id, beer(1, 500), now())
        a.add_line(receipt_id, beer(2, 300), now())
        await wait_until(lambda: knows(b, receipt_id) and len(b.receipt(receipt_id).lines) == 2
                         and not a.receipt(receipt_id).pending, what="both lines everywhere")
        await a.stop_sync()
        b.void_line(receipt_id, wrong, now())  # B takes the line off ...
        await wait_until(lambda: not b.receipt(receipt_id).pending, what="B's void accepted")
        a.void_line(receipt_id, wrong, now())  # ... and A, offline, too: A's void will be refused
        paid = a.pay_receipt(receipt_id, PaymentType.CASH, "Bar", now())
        assert paid.total == 300 and len(paid.counted) == 1
        a.start_sync()
        notices = await wait_until(lambda: [n for n in a.notices() if n.code == "stale_payment"], what="the payment refused")
        assert "voided on till Kasse B" in notices[0].message
        assert [n.code for n in a.notices()] == ["unknown_line", "stale_payment"]
        await wait_until(lambda: not a.receipt(receipt_id).pending, what="A settled")
        assert a.receipt(receipt_id).status == "open" and a.receipt(receipt_id).total == 300
        a.pay_receipt(receipt_id, PaymentType.CASH, "Bar", now())
        await wait_until(lambda: a.receipt(receipt_id).receipt_number, what="paid")
    finally:
        await stop(a, b)


async def test_a_till_that_starts_receiving_gets_the_other_tills_recent_records(services, env: Environment, tmp_path: Path) -> None:
    account = await new_account(env, tmp_path)
    a = await join(env, tmp_path, account, SyncMode.ARCHIVE, "Kasse A")
    try:
        sell(a, 2)
        report = a.close_day(dt.date.today(), now())
        assert await a.relay.drain(20)
        await wait_until(lambda: fetchval(env, "select count(*) = 3 from archive_records where till_id = $1",
                                          a.store.identity().till_id), what="archived")
        late = await join(env, tmp_path, account, RECEIPTS, "Kasse Spät")
        zonly = await join(env, tmp_path, account, SyncMode.ARCHIVE, "Kasse Z")
        await zonly.set_sync_mode(True, SyncMode.CUSTOM, CustomSyncFlags(download_zreports=True))
        await wait_until(lambda: len(late.store.shared_records("receipt")) == 2 and late.store.shared_records("zreport"),
                         what="the earlier records on the late till")
        assert [r.record for r in late.store.shared_records("zreport")] == [report]
        assert late.store.shared_records("receipt")[0].till_name == "Kasse A"
        await wait_until(lambda: zonly.store.shared_records("zreport"), what="the Z-report on the Z-only till")
        await asyncio.sleep(0.3)
        assert zonly.store.shared_records("receipt") == [] and zonly.store.shared_receipts(None) == []
        # the next catch-up starts where the last ended: nothing twice
        await late.stop_sync()
        sell(a, 1)
        assert await a.relay.drain(20)
        late.start_sync()
        await wait_until(lambda: len(late.store.shared_records("receipt")) == 3, what="the new receipt")
        await stop(late, zonly)
    finally:
        await stop(a)


async def test_a_payment_waiting_for_the_router_keeps_the_till_in_the_receipt_mode(services, env: Environment, tmp_path: Path) -> None:
    a, = await receipt_tills(env, tmp_path, "Kasse A")
    try:
        receipt_id = a.open_receipt(table_nr="40", cashier=WAITER, at=now())
        a.add_line(receipt_id, beer(1), now())
        await wait_until(lambda: not a.receipt(receipt_id).pending, what="accepted")
        await a.stop_sync()
        a.pay_receipt(receipt_id, PaymentType.CASH, "Bar", now())
        with pytest.raises(TillStoreError, match=r"1 events of shared receipts \(1 payment\(s\)\) wait for the receipt handover router"):
            await a.set_sync_mode(True, SyncMode.ARCHIVE_MASTERDATA)
        a.start_sync()
        await wait_until(lambda: a.receipt(receipt_id).receipt_number, what="paid and numbered")
        await a.set_sync_mode(True, SyncMode.ARCHIVE_MASTERDATA)  # nothing waits now
    finally:
        await stop(a)


async def test_an_exact_second_closing_of_a_shared_receipt_is_flagged(services, env: Environment, tmp_path: Path) -> None:
    a, = await receipt_tills(env, tmp_path, "Kasse A")
    try:
        receipt_id = a.open_receipt(table_nr="3", cashier=WAITER, at=now())
        a.add_line(receipt_id, beer(1, 600), now())
        a.pay_receipt(receipt_id, PaymentType.CASH, "Bar", now())
        await wait_until(lambda: a.receipt(receipt_id).receipt_number, what="closed")
        first = await archived_closed_receipt(env, a)
        with a.store.batch():  # the same closed receipt once more, as a new record
            a.store._enqueue(first, now())
        a.relay.wake()
        reason = await wait_until(
            lambda: fetchval(env, "select reason from shared_receipt_mismatches where receipt_id = $1", receipt_id), what="flagged"
        )
        assert "was closed already by record" in reason
    finally:
        await stop(a)
