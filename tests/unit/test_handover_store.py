"""Shared receipts in the till's store (till_agent/handover.py): the till's view, its own
events and the router's verdicts, on a real SQLite file; the router is played by the test."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator
from uuid import UUID

import pytest
from pydantic import ValidationError

from shared.fiscal import PaymentType, VatKey
from shared.models import (
    Cashier,
    HandoverEvent,
    LineAdded,
    LinesMoved,
    LineVoided,
    Receipt,
    ReceiptEvent,
    ReceiptEventRefused,
    ReceiptOpened,
    ReceiptPaid,
    ReceiptSnapshot,
    SignedIn,
    SyncMode,
    TableSet,
    TillRecordShared,
)
from till_agent.booking import SaleLine, closed_receipt
from till_agent.booking import handover_line
from till_agent.store import RECORD_ADAPTER, TillStore, TillStoreError

pytestmark = pytest.mark.unit

T0 = dt.datetime(2024, 3, 1, 18, 0, tzinfo=dt.UTC)
WAITER = Cashier(cashier_id="7", name="Ben")
OTHER_TILL = uuid.uuid4()


def make_store(tmp_path: Path, mode: SyncMode = SyncMode.ARCHIVE_MASTERDATA_RECEIPTS) -> TillStore:
    store = TillStore.create(tmp_path / uuid.uuid4().hex, serial_number="SN-1", till_name="Kasse A")
    till_id = uuid.uuid4()
    store.save_sign_in(
        SignedIn(
            account_id=uuid.uuid4(), account_name="owner@example.com", till_id=till_id, broker_username=f"till-{till_id}",
            broker_password="broker-Secret-1", vhost="tillsync", upload_exchange="till.upload", queue=f"till.{till_id}",
            last_till_seq=0, sync_enabled=True, sync_mode=mode,
        )
    )
    return store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TillStore]:
    s = make_store(tmp_path)
    yield s
    s.close()


def me(store: TillStore) -> UUID:
    till_id = store.identity().till_id
    assert till_id is not None
    return till_id


def opened(table: str | None = "5") -> ReceiptOpened:
    return ReceiptOpened(table_nr=table, business_day=T0.date(), opened_at=T0, cashier=WAITER)


def line(price: int = 350, text: str = "Bier") -> LineAdded:
    return LineAdded(line=handover_line(SaleLine("B1", text, Decimal("1"), price, VatKey.REGULAR)))


def own_events(store: TillStore) -> list[tuple[UUID, ReceiptEvent]]:
    """``(record_id, event)`` of the till's receipt events, in outbox order."""
    rows = store.unsent(1000)
    return [(r.record_id, RECORD_ADAPTER.validate_json(r.body)) for r in rows if r.kind == "receipt_event"]


def accept_all(store: TillStore, receipt_id: UUID, first_position: int = 1) -> int:
    """Play the router: accept the till's pending events of ``receipt_id`` in order."""
    position = first_position
    for record_id, record in own_events(store):
        if record.receipt_id != receipt_id or store._db.execute(
            "select state from handover_events where record_id = ?", (str(record_id),)
        ).fetchone()[0] != "pending":
            continue
        store.apply_handover_event(accepted(receipt_id, position, record.event, me(store), record_id), me(store))
        position += 1
    return position


def accepted(receipt_id: UUID, position: int, event: Any, till_id: UUID = OTHER_TILL, record_id: UUID | None = None) -> HandoverEvent:
    return HandoverEvent(
        receipt_id=receipt_id, position=position, record_id=record_id or uuid.uuid4(), till_id=till_id,
        till_name="Kasse B" if till_id == OTHER_TILL else "Kasse A", recorded_at=T0, event=event,
    )


def test_the_till_shows_its_own_events_before_the_router_confirms_them(store: TillStore) -> None:
    receipt_id = uuid.uuid4()
    store.record_receipt_event(receipt_id, opened(), T0)
    store.record_receipt_event(receipt_id, line(350), T0)
    view = store.shared_receipt(receipt_id)
    assert (view.status, view.table_nr, view.position, view.pending, view.total) == ("open", "5", 0, 2, 350)
    assert [v.confirmed for v in view.lines] == [False]
    # record and outbox row together: every event is a record for the archive
    assert [e.event.type for _, e in own_events(store)] == ["opened", "line_added"]

    accept_all(store, receipt_id)
    view = store.shared_receipt(receipt_id)
    assert (view.position, view.pending, view.total) == (2, 0, 350)
    assert [v.confirmed for v in view.lines] == [True]


def test_events_apply_in_position_order_only(store: TillStore) -> None:
    receipt_id = uuid.uuid4()
    first = accepted(receipt_id, 1, opened())
    third = accepted(receipt_id, 3, line(100))
    assert store.apply_handover_event(third, me(store)) == "gap"  # the till asks for a snapshot
    assert store.apply_handover_event(first, me(store)) == "applied"
    assert store.apply_handover_event(first, me(store)) == "old"
    snapshot = ReceiptSnapshot(
        request_id=uuid.uuid4(), receipt_id=receipt_id, status="open",
        events=(first, accepted(receipt_id, 2, line(250)), third),
    )
    store.apply_handover_snapshot(snapshot, me(store))
    view = store.shared_receipt(receipt_id)
    assert (view.position, view.total, view.opened_by, view.opened_by_name) == (3, 350, OTHER_TILL, "Kasse B")
    assert [v.till_name for v in view.lines] == ["Kasse B", "Kasse B"]


def test_the_till_that_pays_records_the_closed_receipt_under_its_next_number(store: TillStore) -> None:
    receipt_id = uuid.uuid4()
    store.apply_handover_event(accepted(receipt_id, 1, opened("2")), me(store))
    store.apply_handover_event(accepted(receipt_id, 2, line(400, "Wein")), me(store))
    voided = line(999, "Falsch")
    store.apply_handover_event(accepted(receipt_id, 3, voided), me(store))
    store.apply_handover_event(accepted(receipt_id, 4, LineVoided(line_id=voided.line.line_id)), me(store))
    # a cash sale first takes number 1
    store.book_receipt(
        lambda n: closed_receipt(receipt_number=n, lines=[SaleLine("1", "Brot", Decimal(1), 250, VatKey.REDUCED)],
                                 payment_type=PaymentType.CASH, payment_name="Bar", cashier=WAITER, opened_at=T0,
                                 closed_at=T0, business_day=T0.date()),
        T0,
    )
    paid = store.payment_for(receipt_id, PaymentType.CASH, "Bar", T0)
    assert (paid.seen_position, paid.total) == (4, 400)
    store.record_receipt_event(receipt_id, paid, T0)
    assert store.shared_receipt(receipt_id).payment_pending
    with pytest.raises(TillStoreError, match="being paid on this till"):
        store.record_receipt_event(receipt_id, line(), T0)

    [(record_id, _)] = own_events(store)
    assert store.apply_handover_event(accepted(receipt_id, 5, paid, me(store), record_id), me(store)) == "closed_here"
    view = store.shared_receipt(receipt_id)
    assert (view.status, view.closed_by, view.receipt_number) == ("closed", me(store), 2)
    receipts = [Receipt.model_validate_json(r.body) for r in store.unsent(100) if r.kind == "receipt"]
    closed = receipts[-1]
    assert (closed.receipt_id, closed.receipt_number, closed.total, closed.status) == (receipt_id, 2, 400, "closed")
    assert [x.text for x in closed.lines] == ["Wein"]
    assert closed.opened_at == T0 and closed.cashier == WAITER
    # the same verdict again (a redelivery, a snapshot) records nothing more
    store.apply_handover_event(accepted(receipt_id, 5, paid, me(store), record_id), me(store))
    store.apply_handover_snapshot(
        ReceiptSnapshot(request_id=uuid.uuid4(), receipt_id=receipt_id, status="closed",
                        events=(accepted(receipt_id, 5, paid, me(store), record_id),)), me(store),
    )
    assert len([r for r in store.unsent(100) if r.kind == "receipt"]) == 2


def test_a_receipt_paid_on_another_till_cannot_change_here(store: TillStore) -> None:
    receipt_id = uuid.uuid4()
    store.apply_handover_event(accepted(receipt_id, 1, opened()), me(store))
    store.apply_handover_event(accepted(receipt_id, 2, line(300)), me(store))
    pay = ReceiptPaid(seen_position=2, total=300, payments=(
        {"payment_type": "Bar", "payment_name": "Bar", "amount": 300},), closed_at=T0)  # type: ignore[arg-type]
    assert store.apply_handover_event(accepted(receipt_id, 3, pay), me(store)) == "applied"
    view = store.shared_receipt(receipt_id)
    assert (view.status, view.closed_by_name, view.receipt_number) == ("closed", "Kasse B", None)
    with pytest.raises(TillStoreError, match="was paid on till Kasse B"):
        store.payment_for(receipt_id, PaymentType.CASH, "Bar", T0)
    with pytest.raises(TillStoreError, match="closed receipt cannot change"):
        store.record_receipt_event(receipt_id, line(), T0)
    assert not [r for r in store.unsent(100) if r.kind == "receipt"]  # the other till numbers it


def test_a_refused_table_opening_books_the_lines_onto_the_tables_receipt(store: TillStore) -> None:
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    store.record_receipt_event(mine, opened("5"), T0)
    first = line(350, "Bier")
    second = line(200, "Wasser")
    store.record_receipt_event(mine, first, T0)
    store.record_receipt_event(mine, second, T0)
    [(opening, _), *_] = own_events(store)
    outcome = store.apply_handover_refused(
        ReceiptEventRefused(
            record_id=opening, receipt_id=mine, event_type="opened", code="table_taken",
            reason=f"table 5 already has open receipt {theirs}, opened on till Kasse B at {T0.isoformat()}",
            existing_receipt_id=theirs,
        )
    )
    assert outcome == "rebooked"
    view = store.shared_receipt(mine)
    assert (view.status, view.merged_into, view.lines) == ("refused", theirs, ())
    target = store.shared_receipt(theirs)
    assert [v.line.text for v in target.lines] == ["Bier", "Wasser"] and target.pending == 2
    rebooked = [e for _, e in own_events(store) if e.receipt_id == theirs]
    assert [e.event.line.line_id for e in rebooked] == [first.line.line_id, second.line.line_id]  # type: ignore[union-attr]
    [notice] = store.notices()
    assert notice.code == "table_taken" and "its lines were booked onto receipt" in notice.message
    assert "'Bier' 1 × 3.50 EUR, 'Wasser' 1 × 2.00 EUR" in notice.message
    with pytest.raises(TillStoreError, match="was not opened"):
        store.record_receipt_event(mine, line(), T0)
    # the router's later refusals of the old receipt's lines add no second notice
    for record_id, e in own_events(store):
        if e.receipt_id == mine and e.event.type == "line_added":
            assert store.apply_handover_refused(ReceiptEventRefused(
                record_id=record_id, receipt_id=mine, event_type="line_added", code="unknown_receipt", reason="not opened",
            )) == "old"
    assert len(store.notices()) == 1


def test_a_stale_payment_becomes_a_notice_and_the_receipt_can_be_paid_again(store: TillStore) -> None:
    receipt_id = uuid.uuid4()
    store.apply_handover_event(accepted(receipt_id, 1, opened()), me(store))
    store.apply_handover_event(accepted(receipt_id, 2, line(300)), me(store))
    stale = store.payment_for(receipt_id, PaymentType.CASH, "Bar", T0)
    store.record_receipt_event(receipt_id, stale, T0)
    since = accepted(receipt_id, 3, line(150, "Nachtisch"))
    store.apply_handover_event(since, me(store))
    [(record_id, _)] = own_events(store)
    assert store.apply_handover_refused(ReceiptEventRefused(
        record_id=record_id, receipt_id=receipt_id, event_type="paid", code="stale_payment",
        reason="the receipt changed after it was totalled", since=(since,),
    )) == "refused"
    [notice] = store.notices()
    assert notice.code == "stale_payment" and "pay it once more" in notice.message
    view = store.shared_receipt(receipt_id)
    assert (view.total, view.payment_pending, view.status) == (450, False, "open")
    again = store.payment_for(receipt_id, PaymentType.CASH, "Bar", T0)
    assert (again.seen_position, again.total) == (3, 450)


def test_the_payment_counts_the_tills_own_events_still_on_their_way(store: TillStore) -> None:
    receipt_id = uuid.uuid4()
    store.apply_handover_event(accepted(receipt_id, 1, opened()), me(store))
    store.record_receipt_event(receipt_id, line(100), T0)
    store.record_receipt_event(receipt_id, line(200), T0)
    paid = store.payment_for(receipt_id, PaymentType.CASH, "Bar", T0)
    lines = [record_id for record_id, _ in own_events(store)]
    # the accepted position 1, and its 2 lines the router must apply before the payment
    assert (paid.seen_position, paid.counted, paid.total) == (1, tuple(lines), 300)


def test_local_rules_refuse_what_the_router_would_refuse(store: TillStore, tmp_path: Path) -> None:
    receipt_id = uuid.uuid4()
    store.record_receipt_event(receipt_id, opened("5"), T0)
    with pytest.raises(TillStoreError, match="table 5 already has open receipt"):
        store.record_receipt_event(uuid.uuid4(), opened("5"), T0)
    with pytest.raises(TillStoreError, match="are not on receipt"):
        store.record_receipt_event(receipt_id, LineVoided(line_id=uuid.uuid4()), T0)
    with pytest.raises(TillStoreError, match="knows no shared receipt"):
        store.record_receipt_event(uuid.uuid4(), line(), T0)
    added = line(500)
    store.record_receipt_event(receipt_id, added, T0)
    store.record_receipt_event(receipt_id, LineVoided(line_id=added.line.line_id), T0)
    assert store.shared_receipt(receipt_id).total == 0
    with pytest.raises(TillStoreError, match="does not match the total"):
        store.record_receipt_event(
            receipt_id,
            ReceiptPaid(seen_position=3, total=500, payments=(  # type: ignore[arg-type]
                {"payment_type": "Bar", "payment_name": "Bar", "amount": 500},), closed_at=T0),
            T0,
        )
    archive_only = make_store(tmp_path, SyncMode.ARCHIVE_MASTERDATA)
    with pytest.raises(TillStoreError, match="does not hand over receipts"):
        archive_only.record_receipt_event(uuid.uuid4(), opened(), T0)
    archive_only.close()


def test_other_tills_records_are_kept_once_and_own_ones_skipped(store: TillStore) -> None:
    receipt = closed_receipt(
        receipt_number=1, lines=[SaleLine("1", "Brot", Decimal(1), 250, VatKey.REDUCED)], payment_type=PaymentType.CASH,
        payment_name="Bar", cashier=WAITER, opened_at=T0, closed_at=T0, business_day=T0.date(),
    )
    shared = TillRecordShared(till_id=OTHER_TILL, record_id=uuid.uuid4(), recorded_at=T0, record=receipt)
    assert store.apply_shared_record(shared, me(store)) == "shared_record"
    assert store.apply_shared_record(shared, me(store)) == "old"
    own = TillRecordShared(till_id=me(store), record_id=uuid.uuid4(), recorded_at=T0, record=receipt)
    assert store.apply_shared_record(own, me(store)) == "own"
    [kept] = store.shared_records("receipt")
    assert (kept.till_id, kept.record) == (OTHER_TILL, receipt)


def test_a_catch_up_names_the_open_receipts_and_the_sent_events_without_verdict(store: TillStore) -> None:
    receipt_id = uuid.uuid4()
    store.record_receipt_event(receipt_id, opened(), T0)
    store.record_receipt_event(receipt_id, line(), T0)
    rows = store.unsent(10)
    store.mark_sent([rows[0].till_seq])  # the opening went out, the line did not yet
    receipts, verdicts_for = store.receipts_awaiting_verdicts()
    assert receipts == [receipt_id] and verdicts_for == [rows[0].record_id]
    assert store.pending_receipt_events() == 2


def test_a_lost_table_race_books_the_standing_lines_for_the_table_they_were_meant_for(store: TillStore) -> None:
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    store.record_receipt_event(mine, opened("5"), T0)
    wrong, right = line(999, "Falsch"), line(350, "Bier")
    store.record_receipt_event(mine, wrong, T0)
    store.record_receipt_event(mine, right, T0)
    store.record_receipt_event(mine, LineVoided(line_id=wrong.line.line_id), T0)
    store.record_receipt_event(mine, TableSet(table_nr="6"), T0)
    later = line(200, "Wasser")
    store.record_receipt_event(mine, later, T0)  # meant for table 6
    [(opening, _), *_] = own_events(store)
    store.apply_handover_refused(ReceiptEventRefused(
        record_id=opening, receipt_id=mine, event_type="opened", code="table_taken", reason="table 5 is taken",
        existing_receipt_id=theirs,
    ))
    target = store.shared_receipt(theirs)
    assert [v.line.text for v in target.lines] == ["Bier", "Wasser"] and target.total == 550
    rebooked = {e.event.line.line_id: e.event.expected_table_nr for _, e in own_events(store)  # type: ignore[union-attr]
                if e.receipt_id == theirs and e.event.type == "line_added"}
    # the router refuses the later line unless the receipt is on table 6 (so it never lands on table 5's bill)
    assert rebooked == {right.line.line_id: "5", later.line.line_id: "6"}  # the voided line is left out
    [notice] = store.notices()
    assert "'Falsch'" not in notice.message  # voided before: not named as booked


def test_a_lost_receipt_paid_here_is_recorded_as_a_sale_not_billed_again(store: TillStore) -> None:
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    store.record_receipt_event(mine, opened("5"), T0)
    store.record_receipt_event(mine, line(450, "Menü"), T0)
    store.record_receipt_event(mine, store.payment_for(mine, PaymentType.CASH, "Bar", T0), T0)
    [(opening, _), *_] = own_events(store)
    assert store.apply_handover_refused(ReceiptEventRefused(
        record_id=opening, receipt_id=mine, event_type="opened", code="table_taken", reason="table 5 is taken",
        existing_receipt_id=theirs,
    )) == "recorded_as_sale"
    assert not [e for _, e in own_events(store) if e.receipt_id == theirs]  # nothing billed on the other receipt
    [sale] = [Receipt.model_validate_json(r.body) for r in store.unsent(100) if r.kind == "receipt"]
    assert (sale.receipt_id, sale.receipt_number, sale.total, sale.status) == (mine, 1, 450, "closed")
    assert store.shared_receipt(mine).receipt_number == 1
    [notice] = store.notices()
    assert "recorded as receipt 1 of this till, paid at once" in notice.message
    # the router's refusal of the payment itself adds nothing
    paid_record = [r for r, e in own_events(store) if e.receipt_id == mine and e.event.type == "paid"][0]
    assert store.apply_handover_refused(ReceiptEventRefused(
        record_id=paid_record, receipt_id=mine, event_type="paid", code="unknown_receipt", reason="not opened",
    )) == "old"


def test_lines_split_off_show_on_the_target_receipt_before_the_router_confirms(store: TillStore) -> None:
    source, target = uuid.uuid4(), uuid.uuid4()
    store.apply_handover_event(accepted(source, 1, opened("1")), me(store))
    moved = line(500, "Menü")
    store.apply_handover_event(accepted(source, 2, moved), me(store))
    store.apply_handover_event(accepted(target, 1, opened("2")), me(store))
    store.record_receipt_event(source, LinesMoved(line_ids=(moved.line.line_id,), to_receipt_id=target), T0)
    assert store.shared_receipt(source).total == 0
    view = store.shared_receipt(target)
    assert (view.total, view.pending, [v.confirmed for v in view.lines]) == (500, 1, [False])
    # paying the target now counts the move, which the router appends to it first
    [(move, _)] = own_events(store)
    paid = store.payment_for(target, PaymentType.CASH, "Bar", T0)
    assert (paid.seen_position, paid.counted) == (1, (move,))


def test_a_stale_payments_refusal_brings_the_events_it_missed(store: TillStore) -> None:
    receipt_id = uuid.uuid4()
    store.apply_handover_event(accepted(receipt_id, 1, opened()), me(store))
    store.apply_handover_event(accepted(receipt_id, 2, line(300)), me(store))
    store.record_receipt_event(receipt_id, store.payment_for(receipt_id, PaymentType.CASH, "Bar", T0), T0)
    [(record_id, _)] = own_events(store)
    missed = accepted(receipt_id, 3, line(150, "Nachtisch"))  # its broadcast never arrived
    store.apply_handover_refused(ReceiptEventRefused(
        record_id=record_id, receipt_id=receipt_id, event_type="paid", code="stale_payment", reason="changed", since=(missed,),
    ), me(store))
    view = store.shared_receipt(receipt_id)
    assert (view.position, view.total) == (3, 450)


def test_a_table_is_one_table_however_its_name_is_typed(store: TillStore) -> None:
    assert opened("Cafe\u0301").table_nr == opened("Caf\u00e9").table_nr == "Café"
    assert opened("\uff19").table_nr == "9"  # a full-width digit
    for look_alike in ("5\u034f", "5\ufe0f", "5\u180b", "\u3164", "\u2800", "\u0335"):
        with pytest.raises(ValidationError, match="show as nothing|combining mark"):
            opened(look_alike)
    store.record_receipt_event(uuid.uuid4(), opened("Caf\u00e9"), T0)
    with pytest.raises(TillStoreError, match="already has open receipt"):
        store.record_receipt_event(uuid.uuid4(), opened("Cafe\u0301"), T0)


def test_an_opening_refused_for_another_reason_is_not_left_open(store: TillStore) -> None:
    receipt_id = uuid.uuid4()
    store.record_receipt_event(receipt_id, opened("Q"), T0)
    store.record_receipt_event(receipt_id, line(350), T0)
    [(opening, _), _] = own_events(store)
    assert store.apply_handover_refused(ReceiptEventRefused(
        record_id=opening, receipt_id=receipt_id, event_type="opened", code="not_taking_part",
        reason="the till's sync mode (archive) does not hand over receipts",
    )) == "refused"
    assert store.shared_receipt(receipt_id).status == "refused"
    assert store.open_receipt_of_table("Q") is None  # the table is free again on this till
    [notice] = store.notices()
    assert "its lines were NOT booked (book them again): 'Bier' 1 × 3.50 EUR" in notice.message
    store.record_receipt_event(uuid.uuid4(), opened("Q"), T0)


def test_pointless_or_clashing_moves_are_refused_on_the_till(store: TillStore) -> None:
    source, target = uuid.uuid4(), uuid.uuid4()
    store.apply_handover_event(accepted(source, 1, opened("1")), me(store))
    moved = line(400)
    store.apply_handover_event(accepted(source, 2, moved), me(store))
    store.apply_handover_event(accepted(target, 1, opened("2")), me(store))
    with pytest.raises(TillStoreError, match="is on table 1 already"):
        store.record_receipt_event(source, TableSet(table_nr="1"), T0)
    store.record_receipt_event(target, store.payment_for(target, PaymentType.CASH, "Bar", T0), T0)
    with pytest.raises(TillStoreError, match="is being paid on this till"):
        store.record_receipt_event(source, LinesMoved(line_ids=(moved.line.line_id,), to_receipt_id=target), T0)
    assert store.payments_awaiting_verdict() == [target]


def test_lines_split_off_a_lost_receipt_are_booked_where_they_were_moved(store: TillStore) -> None:
    mine, theirs, split = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    store.record_receipt_event(mine, opened("40"), T0)
    beer, wine = line(350, "Bier"), line(1500, "Wein")
    store.record_receipt_event(mine, beer, T0)
    store.record_receipt_event(mine, wine, T0)
    store.record_receipt_event(split, opened(None), T0)
    store.record_receipt_event(mine, LinesMoved(line_ids=(wine.line.line_id,), to_receipt_id=split), T0)
    [(opening, _), *_] = own_events(store)
    store.apply_handover_refused(ReceiptEventRefused(
        record_id=opening, receipt_id=mine, event_type="opened", code="table_taken", reason="table 40 is taken",
        existing_receipt_id=theirs,
    ))
    assert [v.line.text for v in store.shared_receipt(theirs).lines] == ["Bier"]  # the wine is not billed to table 40
    assert [v.line.text for v in store.shared_receipt(split).lines] == ["Wein"]
    [notice] = store.notices()
    assert f"the lines it had moved to receipt {split} were booked there: 'Wein'" in notice.message
