"""The till's local SQLite store (till_agent/store.py), on a real file in tmp_path."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

import pytest

from shared.chain import chain_hash
from shared.fiscal import PaymentType, VatKey
from shared.models import Article, Cashier, MasterDataRecord, Receipt, SignedIn, SyncMode
from till_agent.booking import SaleLine, closed_receipt, z_report
from till_agent.store import RECORD_ADAPTER, TillStore, TillStoreError

pytestmark = pytest.mark.unit

DAY = dt.date(2024, 3, 1)
T0 = dt.datetime(2024, 3, 1, 8, 0, tzinfo=dt.UTC)
CASHIER = Cashier(cashier_id="1", name="Anna")
LINES = [SaleLine("A1", "Brezel", Decimal("2"), 95, VatKey.REDUCED)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TillStore]:
    s = TillStore.create(tmp_path / "till", serial_number="SN-0001", till_name="Kasse 1")
    yield s
    s.close()


def receipt(number: int | None, **changes: Any) -> Receipt:
    r = closed_receipt(
        receipt_number=number or 1,
        lines=LINES,
        payment_type=PaymentType.CASH,
        payment_name="Bar",
        cashier=CASHIER,
        opened_at=T0,
        closed_at=T0 + dt.timedelta(seconds=30),
        business_day=DAY,
    )
    if changes:
        r = Receipt.model_validate({**r.model_dump(), **changes})
    return r


def open_receipt() -> Receipt:
    return receipt(None, status="open", receipt_number=None, closed_at=None, payments=())


def sell(store: TillStore) -> tuple[Receipt, uuid.UUID]:
    r = receipt(store.next_receipt_number())
    return r, store.record_receipt(r, T0)


def article(nr: str = "A1", price: int = 95) -> MasterDataRecord:
    return MasterDataRecord(
        entity_kind="article",
        entity_key=nr,
        data=Article(article_nr=nr, text="Brezel", unit_price=price, vat_key=VatKey.REDUCED),
    )


def close_day(store: TillStore) -> uuid.UUID:
    report = z_report(store.next_z_nr(), DAY, store.receipts_for_closing(DAY), T0 + dt.timedelta(hours=10))
    return store.record_zreport(report, T0 + dt.timedelta(hours=10))


def signed_in(last_till_seq: int, **changes: Any) -> SignedIn:
    till_id = uuid.uuid4()
    data: dict[str, Any] = {
        "account_id": uuid.uuid4(),
        "account_name": "owner@example.com",
        "till_id": till_id,
        "broker_username": f"till-{till_id}",
        "broker_password": "broker-Secret-1",
        "vhost": "tillsync",
        "upload_exchange": "till.upload",
        "queue": f"till.{till_id}",
        "last_till_seq": last_till_seq,
        "sync_enabled": True,
        "sync_mode": SyncMode.ARCHIVE,
    }
    data.update(changes)
    return SignedIn(**data)


def seqs(store: TillStore) -> list[int]:
    return [seq for _, seq, _ in store.recorded()]


# ---------------------------------------------------------------------------
# creating and opening


def test_opening_a_directory_without_a_till_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(TillStoreError, match="tillsync till init"):
        TillStore(tmp_path)


def test_a_store_cannot_be_created_twice(tmp_path: Path) -> None:
    TillStore.create(tmp_path, "SN-1", "Kasse 1").close()
    with pytest.raises(TillStoreError):
        TillStore.create(tmp_path, "SN-2", "Kasse 2")


def test_a_new_store_knows_its_serial_number_and_is_signed_out(store: TillStore) -> None:
    identity = store.identity()
    assert (identity.serial_number, identity.till_name) == ("SN-0001", "Kasse 1")
    assert identity.signed_in is False
    assert identity.till_id is None and identity.broker_password is None
    assert store.outbox_counts() == (0, 0)
    assert store.next_receipt_number() == 1
    assert store.next_z_nr() == 1


def test_the_store_survives_reopening(store: TillStore) -> None:
    sell(store)
    store.record_masterdata(article(), T0)
    again = TillStore(store.data_dir)
    try:
        assert again.recorded() == store.recorded()
        assert again.next_receipt_number() == 2
    finally:
        again.close()


# ---------------------------------------------------------------------------
# till_seq and record_id


def test_till_seq_is_gapless_from_1_across_all_kinds(store: TillStore) -> None:
    store.record_masterdata(article("A1"), T0)
    sell(store)
    sell(store)
    close_day(store)
    store.record_masterdata(article("A2"), T0)
    store.record_receipt(open_receipt(), T0)
    assert seqs(store) == [1, 2, 3, 4, 5, 6]
    assert [kind for _, _, kind in store.recorded()] == ["masterdata", "receipt", "receipt", "zreport", "masterdata", "receipt"]


def test_every_record_gets_a_unique_record_id_which_is_returned(store: TillStore) -> None:
    returned = [store.record_masterdata(article("A1"), T0), sell(store)[1], sell(store)[1], close_day(store)]
    recorded = [record_id for record_id, _, _ in store.recorded()]
    assert recorded == returned
    assert len(set(recorded)) == len(recorded)


def test_the_same_content_twice_is_two_records(store: TillStore) -> None:
    first = store.record_masterdata(article("A1"), T0)
    second = store.record_masterdata(article("A1"), T0)
    assert first != second
    assert seqs(store) == [1, 2]


def test_a_refused_record_uses_no_till_seq(store: TillStore) -> None:
    store.record_masterdata(article(), T0)
    with pytest.raises(TillStoreError):
        store.record_receipt(receipt(5), T0)
    with pytest.raises(TillStoreError):
        store.record_masterdata(article(), dt.datetime(2024, 3, 1, 8, 0))  # naive time
    store.record_masterdata(article(), T0)
    assert seqs(store) == [1, 2]


# ---------------------------------------------------------------------------
# receipts


def test_closed_receipts_are_numbered_from_1(store: TillStore) -> None:
    assert store.next_receipt_number() == 1
    sell(store)
    assert store.next_receipt_number() == 2
    sell(store)
    assert store.next_receipt_number() == 3


@pytest.mark.parametrize("wrong", [2, 3, 100])
def test_a_closed_receipt_must_carry_the_next_receipt_number(store: TillStore, wrong: int) -> None:
    with pytest.raises(TillStoreError):
        store.record_receipt(receipt(wrong), T0)
    assert store.next_receipt_number() == 1
    assert store.outbox_counts() == (0, 0)


def test_a_receipt_number_cannot_be_used_twice(store: TillStore) -> None:
    sell(store)
    with pytest.raises(TillStoreError):
        store.record_receipt(receipt(1), T0)  # a new receipt with the used number 1
    assert store.next_receipt_number() == 2
    assert seqs(store) == [1]


def test_an_open_receipt_needs_no_number_and_can_then_be_closed(store: TillStore) -> None:
    opened = open_receipt()
    store.record_receipt(opened, T0)
    assert store.next_receipt_number() == 1
    closed = receipt(1, receipt_id=opened.receipt_id)
    store.record_receipt(closed, T0 + dt.timedelta(minutes=1))
    assert [kind for _, _, kind in store.recorded()] == ["receipt", "receipt"]
    assert store.receipts_for_closing(DAY) == [closed]


@pytest.mark.parametrize("change", ["same", "reopened", "other_total"])
def test_a_closed_receipt_cannot_change(store: TillStore, change: str) -> None:
    closed, _ = sell(store)
    if change == "same":
        again = closed
    elif change == "reopened":
        again = Receipt.model_validate(
            {**closed.model_dump(), "status": "open", "receipt_number": None, "closed_at": None, "payments": ()}
        )
    else:
        again = receipt(2, receipt_id=closed.receipt_id, payments=[{"payment_type": "ECKarte", "payment_name": "EC", "amount": closed.total}])
    before = store.recorded()
    with pytest.raises(TillStoreError):
        store.record_receipt(again, T0 + dt.timedelta(minutes=1))
    assert store.recorded() == before
    assert store.receipts_for_closing(DAY) == [closed]


def test_a_zreport_takes_the_days_receipts_once(store: TillStore) -> None:
    sold = [sell(store)[0] for _ in range(3)]
    assert store.receipts_for_closing(DAY) == sold
    close_day(store)
    assert store.receipts_for_closing(DAY) == []
    assert store.next_z_nr() == 2


def test_a_zreport_number_out_of_sequence_is_refused(store: TillStore) -> None:
    report = z_report(2, DAY, [], T0)
    with pytest.raises(TillStoreError):
        store.record_zreport(report, T0)
    assert store.next_z_nr() == 1
    assert store.outbox_counts() == (0, 0)


# ---------------------------------------------------------------------------
# outbox


def test_unsent_gives_rows_in_till_seq_order_up_to_the_limit(store: TillStore) -> None:
    md = article()
    store.record_masterdata(md, T0)
    r, _ = sell(store)
    close_day(store)
    rows = store.unsent(2)
    assert [row.till_seq for row in rows] == [1, 2]
    assert [row.kind for row in rows] == ["masterdata", "receipt"]
    assert RECORD_ADAPTER.validate_json(rows[0].body) == md
    assert RECORD_ADAPTER.validate_json(rows[1].body) == r
    assert rows[1].recorded_at == T0
    assert [row.till_seq for row in store.unsent(100)] == [1, 2, 3]
    assert [(row.record_id, row.till_seq, row.kind) for row in store.unsent(100)] == store.recorded()


def test_mark_sent_removes_rows_from_unsent_and_counts_them(store: TillStore) -> None:
    for i in range(5):
        store.record_masterdata(article(f"A{i}"), T0)
    assert store.outbox_counts() == (5, 0)
    store.mark_sent([1, 2])
    assert [row.till_seq for row in store.unsent(100)] == [3, 4, 5]
    assert store.outbox_counts() == (3, 2)
    store.mark_sent([4])
    assert [row.till_seq for row in store.unsent(100)] == [3, 5]
    assert store.outbox_counts() == (2, 3)
    store.mark_sent([])
    assert store.outbox_counts() == (2, 3)
    store.mark_sent([3, 5])
    assert store.unsent(100) == []
    assert store.outbox_counts() == (0, 5)


def test_sent_records_stay_recorded(store: TillStore) -> None:
    store.record_masterdata(article(), T0)
    store.mark_sent([1])
    assert seqs(store) == [1]
    store.record_masterdata(article(), T0)
    assert seqs(store) == [1, 2]


# ---------------------------------------------------------------------------
# sign-in and sign-out


def test_sign_in_keeps_the_identity(store: TillStore) -> None:
    reply = signed_in(0)
    store.save_sign_in(reply)
    identity = store.identity()
    assert identity.signed_in is True
    assert (identity.account_id, identity.till_id, identity.account_name) == (reply.account_id, reply.till_id, reply.account_name)
    assert (identity.broker_username, identity.vhost) == (reply.broker_username, reply.vhost)
    assert identity.broker_password == reply.broker_password.get_secret_value()
    assert identity.serial_number == "SN-0001"


def test_sign_in_continues_till_seq_after_the_servers_last(store: TillStore) -> None:
    store.record_masterdata(article(), T0)  # queued before the first sign-in
    store.save_sign_in(signed_in(41))  # the archive already holds up to 41 (e.g. a re-installed till)
    store.record_masterdata(article(), T0)
    sell(store)
    assert seqs(store) == [42, 43, 44]


def test_sign_in_never_moves_till_seq_backwards(store: TillStore) -> None:
    first = signed_in(0)
    store.save_sign_in(first)
    for i in range(5):
        store.record_masterdata(article(f"A{i}"), T0)
    # the same till signs in again while the archive is behind it (uploads pending)
    store.save_sign_in(first.model_copy(update={"last_till_seq": 2}))
    store.record_masterdata(article(), T0)
    store.save_sign_in(first.model_copy(update={"last_till_seq": 0}))
    store.record_masterdata(article(), T0)
    assert seqs(store) == [1, 2, 3, 4, 5, 6, 7]


def test_sign_in_with_equal_last_till_seq_continues_gaplessly(store: TillStore) -> None:
    first = signed_in(0)
    store.save_sign_in(first)
    for i in range(3):
        store.record_masterdata(article(f"A{i}"), T0)
    store.save_sign_in(first.model_copy(update={"last_till_seq": 3}))
    store.record_masterdata(article(), T0)
    assert seqs(store) == [1, 2, 3, 4]


def test_sign_out_keeps_the_outbox_and_forgets_the_broker_credentials(store: TillStore) -> None:
    reply = signed_in(0)
    store.save_sign_in(reply)
    store.record_masterdata(article(), T0)
    sell(store)
    store.mark_sent([1])
    pending_before = store.unsent(100)
    store.save_sign_out()
    assert store.unsent(100) == pending_before
    assert store.outbox_counts() == (1, 1)
    identity = store.identity()
    assert identity.signed_in is False
    assert identity.broker_password is None and identity.broker_username is None
    assert identity.account_id == reply.account_id  # the account stays
    # recording goes on offline, and till_seq is never reset
    sell(store)
    assert seqs(store) == [1, 2, 3]
    assert store.outbox_counts() == (2, 1)


def test_sign_in_after_sign_out_keeps_the_pending_records(store: TillStore) -> None:
    store.save_sign_in(signed_in(0))
    sell(store)
    store.save_sign_out()
    sell(store)
    store.save_sign_in(signed_in(0))
    assert [row.till_seq for row in store.unsent(100)] == [1, 2]


def test_records_queued_before_a_sign_in_are_not_placed_on_positions_the_archive_already_holds(store: TillStore) -> None:
    sell(store)  # a re-installed till sells offline before its first sign-in: till_seq 1
    store.save_sign_in(signed_in(41))  # the archive holds till_seq 1..41 of this serial number's till
    assert all(row.till_seq > 41 for row in store.unsent(100))


def test_sign_in_keeps_the_servers_sync_settings_including_custom_flags(store: TillStore) -> None:
    from shared.models import CustomSyncFlags

    flags = CustomSyncFlags(download_receipts=True, upload_zreports=False)
    store.save_sign_in(signed_in(0, sync_mode=SyncMode.CUSTOM, custom=flags))
    enabled, mode, custom_json = store.sync_settings()
    assert (enabled, mode) == (True, "custom")
    assert custom_json is not None and CustomSyncFlags.model_validate_json(custom_json) == flags


def test_concurrent_bookings_on_one_till_never_share_a_receipt_number(tmp_path: Path) -> None:
    """Two processes (here: two connections in two threads) sell on the same till at once."""
    import threading

    TillStore.create(tmp_path / "shared-till", "SN-2", "Kasse 2").close()
    numbers: list[int] = []
    errors: list[BaseException] = []

    def cashier() -> None:
        own = TillStore(tmp_path / "shared-till")
        try:
            for _ in range(25):
                booked = own.book_receipt(lambda number: receipt(number), T0)
                numbers.append(booked.receipt_number)  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
        finally:
            own.close()

    threads = [threading.Thread(target=cashier) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(numbers) == list(range(1, 51))


def test_zreports_follow_the_business_days_in_order(store: TillStore) -> None:
    day = T0.date()
    store.close_day(day, lambda z_nr, receipts: z_report(z_nr, day, receipts, T0), T0)
    earlier = day - dt.timedelta(days=1)
    with pytest.raises(TillStoreError, match="before the last Z-report's business day"):
        store.close_day(earlier, lambda z_nr, receipts: z_report(z_nr, earlier, receipts, T0), T0)
    # the same day again (a second closing) and later days are fine
    store.close_day(day, lambda z_nr, receipts: z_report(z_nr, day, receipts, T0), T0)
    assert store.next_z_nr() == 3


def test_sign_in_continues_receipt_and_z_numbers_after_the_archives(store: TillStore) -> None:
    store.save_sign_in(signed_in(30, last_receipt_number=25, last_z_nr=4))
    assert (store.next_receipt_number(), store.next_z_nr()) == (26, 5)
    store.save_sign_in(signed_in(0, last_receipt_number=3, last_z_nr=1))  # never backwards
    assert (store.next_receipt_number(), store.next_z_nr()) == (26, 5)


def test_a_receipt_of_an_earlier_day_still_open_goes_into_the_next_zreport(store: TillStore) -> None:
    """Every receipt ends up in exactly one Z-report, even when a later day was closed first."""
    later = DAY + dt.timedelta(days=1)
    store.close_day(later, lambda z_nr, receipts: z_report(z_nr, later, receipts, T0), T0)
    late_receipt, _ = sell(store)  # booked on DAY, after the Z-report of the day after
    report = store.close_day(later, lambda z_nr, receipts: z_report(z_nr, later, receipts, T0), T0)
    assert report.receipt_count == 1 and report.first_receipt_number == late_receipt.receipt_number
    assert store.receipts_for_closing(later) == []


# ---------------------------------------------------------------------------
# the hash chain (shared/chain.py)


def test_uploads_are_chained_in_till_seq_order_from_the_first(store: TillStore) -> None:
    reply = signed_in(0)
    store.save_sign_in(reply)
    for _ in range(3):
        sell(store)
    rows = store.unsent(10)
    uploads = [row.upload(reply.account_id, reply.till_id) for row in rows]
    assert uploads[0].prev_hash is None
    for before, after in zip(uploads, uploads[1:]):
        assert after.prev_hash == before.chain_hash
    for upload in uploads:
        assert upload.chain_hash == chain_hash(upload.prev_hash, upload.model_dump(mode="json"))
    # once made, a row's hashes never change: sent later, the same upload goes out
    store.mark_sent([rows[0].till_seq])
    assert [r.chain_hash for r in store.unsent(10)] == [u.chain_hash for u in uploads[1:]]


def test_a_held_row_is_chained_in_its_place(store: TillStore) -> None:
    reply = signed_in(0, sync_mode=SyncMode.ARCHIVE_MASTERDATA)
    store.save_sign_in(reply)
    sell(store)
    store.start_receiving(["articles"])
    store.save_masterdata("article", "A1", Article(article_nr="A1", text="Brezel", unit_price=95, vat_key=VatKey.REDUCED), T0)
    sell(store)
    sent = store.unsent(10)
    assert [r.till_seq for r in sent] == [1, 3]
    held = store._db.execute("select chain_hash from outbox where till_seq = 2").fetchone()["chain_hash"]
    assert held is not None and sent[1].prev_hash == held


def test_a_reinstalled_store_continues_the_archives_chain(store: TillStore) -> None:
    archive_last = "ab" * 32
    reply = signed_in(41, last_chain_hash=archive_last)
    store.save_sign_in(reply)
    sell(store)
    [row] = store.unsent(10)
    assert (row.till_seq, row.prev_hash) == (42, archive_last)


def test_rows_are_chained_anew_for_another_till(store: TillStore) -> None:
    store.save_sign_in(signed_in(0))
    sell(store)
    first = store.unsent(10)[0].chain_hash
    other = signed_in(0)
    store.save_sign_in(other)  # the store signs in as another till before the row went out
    [row] = store.unsent(10)
    assert row.chain_hash != first
    upload = row.upload(other.account_id, other.till_id)
    assert upload.chain_hash == chain_hash(None, upload.model_dump(mode="json"))


def test_chaining_finds_the_unchained_rows_without_reading_the_chained_ones(store: TillStore) -> None:
    """``_seal_through`` runs once per upload window: with 100,000 rows waiting it must not
    read every row chained before (a partial index on the unchained rows), also in a store
    made by an earlier release (the index is made when the store is opened)."""
    query = "explain query plan select till_seq from outbox where chain_hash is null and till_seq <= 5 order by till_seq limit 1000"
    assert "USING INDEX outbox_unchained" in " ".join(str(tuple(r)) for r in store._db.execute(query))
    store._db.execute("drop index outbox_unchained")  # as in a store of an earlier release
    reopened = TillStore(store.data_dir)
    assert "USING INDEX outbox_unchained" in " ".join(str(tuple(r)) for r in reopened._db.execute(query))
