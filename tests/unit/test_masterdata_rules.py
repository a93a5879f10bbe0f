"""The master-data rules without I/O: the broadcaster's judge, the till's rebase, the
till store applying feed entries, catch-up pages and verdicts (SQLite file in tmp_path)."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from services.masterdata_broadcaster.handlers import judge
from shared.fiscal import VatKey
from shared.models import (
    Article,
    CatchUpPage,
    CustomSyncFlags,
    EntityState,
    FeedEntry,
    MasterDataConflict,
    MasterDataRecord,
    SharedSetting,
    SyncMode,
    is_local_only_setting,
)
from shared.topology import masterdata_categories, upload_kinds
from till_agent.masterdata import changed_fields, rebase
from till_agent.store import TillStore, TillStoreError

pytestmark = pytest.mark.unit

T0 = dt.datetime(2024, 3, 1, 8, 0, tzinfo=dt.UTC)
OTHER_TILL = uuid.uuid4()


def bread(price: int = 250, text: str = "Brot", nr: str = "A1") -> Article:
    return Article(article_nr=nr, text=text, unit_price=price, vat_key=VatKey.REDUCED)


def state(version: int, data: Article | None, feed_seq: int | None = None, till_id: uuid.UUID = OTHER_TILL,
          record_id: uuid.UUID | None = None, key: str = "A1") -> EntityState:
    return EntityState(
        entity_kind="article", entity_key=key, version=version, deleted=data is None, data=data,
        feed_seq=feed_seq or version, record_id=record_id or uuid.uuid4(), till_id=till_id,
    )


def change(base_version: int | None = None, base_record_id: uuid.UUID | None = None, data: Article | None = None) -> MasterDataRecord:
    return MasterDataRecord(entity_kind="article", entity_key="A1", base_version=base_version,
                            base_record_id=base_record_id, shared=True, data=data or bread())


# ---------------------------------------------------------------------------
# the broadcaster's judge


def test_a_new_key_is_accepted_and_an_existing_one_is_not() -> None:
    assert judge(change(), None) is None
    reason = judge(change(), state(3, bread()))
    assert reason is not None and "already exists" in reason and "version 3" in reason


def test_a_deleted_key_cannot_come_back_as_a_new_entity() -> None:
    reason = judge(change(), state(2, None))
    assert reason is not None and "(deleted)" in reason


def test_a_change_on_the_current_version_is_accepted_and_on_an_older_one_not() -> None:
    assert judge(change(2, data=bread(300)), state(2, bread())) is None
    reason = judge(change(1, data=bread(300)), state(2, bread()))
    assert reason is not None and "based on version 1" in reason and "current version is version 2" in reason


def test_a_chain_of_own_changes_is_accepted_only_on_top_of_the_own_previous_one() -> None:
    mine = uuid.uuid4()
    assert judge(change(1, base_record_id=mine, data=bread(300)), state(2, bread(), record_id=mine)) is None
    reason = judge(change(1, base_record_id=mine, data=bread(300)), state(2, bread()))
    assert reason is not None and str(mine) in reason


def test_an_edit_of_an_entity_the_cloud_never_had_is_a_conflict() -> None:
    reason = judge(change(4, data=bread()), None)
    assert reason is not None and "does not exist" in reason


# ---------------------------------------------------------------------------
# the till's rebase


def test_changed_fields_names_added_removed_and_changed_fields() -> None:
    assert changed_fields({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == {"b", "c"}
    assert changed_fields({"a": 1, "b": 2}, {"a": 1}) == {"b"}


def test_disjoint_changes_are_merged() -> None:
    base = bread(250, "Brot").model_dump(mode="json")
    mine = bread(250, "Bauernbrot").model_dump(mode="json")
    theirs = bread(270, "Brot").model_dump(mode="json")
    assert rebase(base, mine, theirs) == bread(270, "Bauernbrot").model_dump(mode="json")


def test_overlapping_changes_and_deletions_are_not_merged() -> None:
    base = bread(250).model_dump(mode="json")
    assert rebase(base, bread(300).model_dump(mode="json"), bread(280).model_dump(mode="json")) is None
    assert rebase(base, None, bread(280).model_dump(mode="json")) is None
    assert rebase(base, bread(300).model_dump(mode="json"), None) is None
    assert rebase(None, bread(300).model_dump(mode="json"), bread(280).model_dump(mode="json")) is None


# ---------------------------------------------------------------------------
# modes and settings


def test_each_mode_takes_part_in_the_master_data_it_receives() -> None:
    assert masterdata_categories(SyncMode.ARCHIVE, None) == ()
    assert masterdata_categories(SyncMode.ARCHIVE_MASTERDATA, None) == ("articles", "customers", "cashiers", "masterdata_other")
    assert masterdata_categories(SyncMode.CUSTOM, CustomSyncFlags(download_customers=True, download_receipts=True)) == ("customers",)


def test_custom_upload_switches_choose_the_uploaded_kinds() -> None:
    assert upload_kinds(SyncMode.ARCHIVE, None) == ("masterdata", "receipt", "zreport", "receipt_event")
    # the receipt switch covers the events of shared receipts too
    assert upload_kinds(SyncMode.CUSTOM, CustomSyncFlags(upload_receipts=False)) == ("masterdata", "zreport")


@pytest.mark.parametrize(
    "key", ["printer.model", "printer.port", "display.brightness", "stock.default_location", "Printer.Model", "STOCK.Default_Location"]
)
def test_local_only_settings_cannot_be_shared(key: str) -> None:
    assert is_local_only_setting(key)
    with pytest.raises(ValueError, match="local to one till"):
        SharedSetting(setting_key=key, value="x")


@pytest.mark.parametrize("key", ["receipt.footer", "printers", "printer", "stock.reorder_level", "displayname", "stock.default_locationx"])
def test_other_settings_are_shared(key: str) -> None:
    assert not is_local_only_setting(key)
    assert SharedSetting(setting_key=key, value="x").key == key


# ---------------------------------------------------------------------------
# the till store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TillStore]:
    s = TillStore.create(tmp_path / "till", serial_number="SN-1", till_name="Kasse 1")
    s.save_sync_mode(True, SyncMode.ARCHIVE_MASTERDATA.value, None)
    for category in ("articles", "customers", "cashiers", "masterdata_other"):
        s.apply_catchup_page(page([], head=0, category=category), None)  # an empty account
    yield s
    s.close()


def entry(s: EntityState, prev: int) -> FeedEntry:
    return FeedEntry(category="articles", prev_feed_seq=prev, entity=s)


def page(entries: list[EntityState], head: int, done: bool = True, category: str = "articles") -> CatchUpPage:
    return CatchUpPage(request_id=uuid.uuid4(), category=category, page=1, total_entries=len(entries),  # type: ignore[arg-type]
                       entries=tuple(entries), done=done, head_feed_seq=head)


def conflict(record_id: uuid.UUID, current: EntityState | None) -> MasterDataConflict:
    return MasterDataConflict(record_id=record_id, entity_kind="article", entity_key="A1", base_version=1,
                              reason="based on version 1, but the cloud's current version is version 2", current=current)


def data(store: TillStore, key: str = "A1") -> dict[str, Any]:
    entity = store.entity("article", key)
    assert entity is not None
    return entity


def test_feed_entries_apply_in_order_and_move_the_position(store: TillStore) -> None:
    store.apply_feed_entry(entry(state(1, bread(250), feed_seq=5), prev=0), None)
    store.apply_feed_entry(entry(state(2, bread(260), feed_seq=9), prev=5), None)
    assert data(store)["data"]["unit_price"] == 260 and data(store)["version"] == 2
    assert store.feed_position("articles") == 9
    # an old state never replaces a newer one
    store.apply_feed_entry(entry(state(1, bread(250), feed_seq=5), prev=0), None)
    assert data(store)["data"]["unit_price"] == 260


def test_shared_changes_wait_until_the_category_is_caught_up(store: TillStore) -> None:
    store.start_receiving(["articles", "customers", "cashiers", "masterdata_other"])
    record_id, record = store.save_masterdata("article", "A1", bread(), T0)
    assert record.shared and record.base_version is None
    assert store.unsent(10) == []
    store.apply_catchup_page(page([], head=0), None)
    assert [row.record_id for row in store.unsent(10)] == [record_id]


def test_a_second_change_before_the_verdict_builds_on_the_first(store: TillStore) -> None:
    store.apply_feed_entry(entry(state(1, bread(250)), prev=0), None)
    first, _ = store.save_masterdata("article", "A1", bread(260), T0)
    _, second = store.save_masterdata("article", "A1", bread(270), T0)
    assert (second.base_version, second.base_record_id) == (1, first)


def test_a_conflict_on_other_fields_is_rebased_onto_the_cloud_version(store: TillStore) -> None:
    store.apply_feed_entry(entry(state(1, bread(250, "Brot")), prev=0), None)
    mine, _ = store.save_masterdata("article", "A1", bread(250, "Bauernbrot"), T0)
    # another till's price change arrives while the change waits for its verdict: the till keeps its value
    assert store.apply_feed_entry(entry(state(2, bread(270, "Brot"), feed_seq=2), prev=1), None) == "pending"
    assert data(store)["data"]["text"] == "Bauernbrot"
    assert store.apply_conflict(conflict(mine, state(2, bread(270, "Brot"), feed_seq=2))) == "rebased"
    assert data(store)["data"] == bread(270, "Bauernbrot").model_dump(mode="json")
    rebased = store.unsent(10)[-1]
    assert '"base_version":2' in rebased.body and data(store)["pending"]


def test_a_conflict_on_the_same_field_keeps_the_cloud_value_and_lists_it(store: TillStore) -> None:
    store.apply_feed_entry(entry(state(1, bread(250)), prev=0), None)
    mine, _ = store.save_masterdata("article", "A1", bread(300), T0)
    assert store.apply_conflict(conflict(mine, state(2, bread(280), feed_seq=2))) == "kept_cloud"
    assert data(store)["data"]["unit_price"] == 280 and not data(store)["pending"]
    [difference] = store.differences()
    assert (difference.local_data["unit_price"], difference.cloud_data["unit_price"], difference.cloud_version) == (300, 280, 2)
    # the owner keeps the till's value: a new change on top of version 2
    new = store.resolve_difference("article", "A1", "till", T0)
    assert new is not None and store.differences() == []
    assert data(store)["data"]["unit_price"] == 300
    assert '"base_version":2' in store.unsent(10)[-1].body


def test_keeping_the_cloud_value_drops_the_listing_only(store: TillStore) -> None:
    store.apply_feed_entry(entry(state(1, bread(250)), prev=0), None)
    mine, _ = store.save_masterdata("article", "A1", bread(300), T0)
    store.apply_conflict(conflict(mine, state(2, bread(280), feed_seq=2)))
    outbox = store.outbox_counts()
    assert store.resolve_difference("article", "A1", "cloud", T0) is None
    assert store.differences() == [] and store.outbox_counts() == outbox
    with pytest.raises(TillStoreError, match="no difference"):
        store.resolve_difference("article", "A1", "cloud", T0)


def test_a_verdict_on_a_superseded_change_is_ignored(store: TillStore) -> None:
    store.apply_feed_entry(entry(state(1, bread(250)), prev=0), None)
    first, _ = store.save_masterdata("article", "A1", bread(260), T0)
    store.save_masterdata("article", "A1", bread(270), T0)
    assert store.apply_conflict(conflict(first, state(2, bread(280), feed_seq=2))) == "superseded"
    assert data(store)["data"]["unit_price"] == 270


def test_a_deletion_in_the_cloud_is_kept_against_a_local_edit(store: TillStore) -> None:
    store.apply_feed_entry(entry(state(1, bread(250)), prev=0), None)
    mine, _ = store.save_masterdata("article", "A1", bread(300), T0)
    assert store.apply_conflict(conflict(mine, state(2, None, feed_seq=2))) == "kept_cloud"
    assert data(store)["deleted"] is True
    assert store.differences()[0].cloud_deleted is True


def test_entities_changed_outside_master_data_sync_are_listed_or_shared_after_the_catch_up(store: TillStore) -> None:
    store.apply_feed_entry(entry(state(1, bread(500, nr="A5"), feed_seq=1, key="A5"), prev=0), None)
    store.apply_feed_entry(entry(state(1, bread(600, nr="A6"), feed_seq=2, key="A6"), prev=1), None)
    store.save_sync_mode(True, SyncMode.ARCHIVE.value, None)
    store.save_masterdata("article", "A1", bread(100), T0)  # differs from the cloud
    store.save_masterdata("article", "A2", bread(200, nr="A2"), T0)  # same as the cloud
    store.save_masterdata("article", "A3", bread(300, nr="A3"), T0)  # unknown to the cloud
    store.save_masterdata("article", "A5", bread(555, nr="A5"), T0)  # known, unchanged in the cloud since
    store.save_masterdata("article", "A6", None, T0)  # deleted here only
    outbox = store.outbox_counts()[0]
    store.save_sync_mode(True, SyncMode.ARCHIVE_MASTERDATA.value, None)
    store.start_receiving(["articles"])
    shared = store.apply_catchup_page(page([state(4, bread(150), feed_seq=3), state(1, bread(200, nr="A2"), feed_seq=4, key="A2")], head=4), None)
    assert shared == 1 and store.outbox_counts()[0] == outbox + 1  # only A3 is offered, as a new entity
    # changes made outside master-data sync are listed, never pushed: the account's value is used
    assert [d.entity_key for d in store.differences()] == ["A1", "A5", "A6"]
    assert data(store, "A5")["data"]["unit_price"] == 500 and data(store, "A6")["deleted"] is False
    assert store.differences()[2].local_deleted is True
    assert data(store)["data"]["unit_price"] == 150 and data(store, "A2")["version"] == 1
    offered = store.unsent(10)[-1]
    assert '"entity_key":"A3"' in offered.body and '"shared":true' in offered.body
    assert store.feed_position("articles") == 4 and store.caught_up("articles")


def test_the_state_hash_covers_versions_and_tombstones(store: TillStore, tmp_path: Path) -> None:
    other = TillStore.create(tmp_path / "other", serial_number="SN-2", till_name="Kasse 2")
    try:
        for s in (store, other):
            s.apply_catchup_page(page([state(1, bread()), state(2, None, feed_seq=2, key="A9")], head=2), None)
        assert store.masterdata_state_hash() == other.masterdata_state_hash()
        other.apply_feed_entry(entry(state(2, bread(251), feed_seq=3), prev=2), None)
        assert store.masterdata_state_hash() != other.masterdata_state_hash()
    finally:
        other.close()


def test_an_import_on_a_sharing_till_lists_differences_instead_of_overwriting(store: TillStore) -> None:
    store.apply_feed_entry(entry(state(2, bread(130, nr="A1"), feed_seq=1, key="A1"), prev=0), None)
    store.apply_feed_entry(entry(state(3, None, feed_seq=2, key="A2"), prev=1), None)  # deleted in the account
    store.apply_feed_entry(entry(state(1, bread(300, nr="A3"), feed_seq=3, key="A3"), prev=2), None)
    outbox = store.outbox_counts()[0]
    outcomes = [store.import_masterdata(a, T0) for a in (bread(115, nr="A1"), bread(120, nr="A2"), bread(300, nr="A3"), bread(9, nr="A4"))]
    assert outcomes == ["listed", "listed", "unchanged", "created"]
    assert store.outbox_counts()[0] == outbox + 1  # only the new A4
    assert data(store, "A1")["data"]["unit_price"] == 130 and data(store, "A2")["deleted"] is True
    listed = {d.entity_key: d for d in store.differences()}
    assert listed["A1"].local_data["unit_price"] == 115 and listed["A2"].cloud_deleted
    # the owner may still apply the imported price
    store.resolve_difference("article", "A1", "till", T0)
    assert data(store, "A1")["data"]["unit_price"] == 115 and '"base_version":2' in store.unsent(10)[-1].body


def test_saving_the_same_value_again_records_nothing(store: TillStore) -> None:
    assert store.save_masterdata("article", "A1", bread(), T0) is not None
    before = store.outbox_counts()
    assert store.save_masterdata("article", "A1", bread(), T0) is None
    assert store.outbox_counts() == before
    store.save_masterdata("article", "A1", None, T0)
    with pytest.raises(TillStoreError, match="no article 'A1' to delete"):
        store.save_masterdata("article", "A1", None, T0)


@pytest.mark.parametrize("text", ["Brot\tfrisch", "Brot\nfrisch", "Brot\u202e", "Br\u200bot"])
def test_names_and_keys_are_single_visible_lines(text: str) -> None:
    with pytest.raises(ValueError, match="control characters or invisible characters"):
        bread(text=text)
    with pytest.raises(ValueError, match="control characters or invisible characters"):
        bread(nr=text)


def test_custom_switches_are_strict_booleans() -> None:
    with pytest.raises(ValueError, match="valid boolean"):
        CustomSyncFlags.model_validate_json('{"download_articles": "yes"}')


def _listed_price_difference(store: TillStore) -> None:
    """The till set 300 on version 1; the cloud kept another till's 280 (version 2)."""
    store.apply_feed_entry(entry(state(1, bread(250, "Milch")), prev=0), None)
    mine, _ = store.save_masterdata("article", "A1", bread(300, "Milch"), T0)
    assert store.apply_conflict(conflict(mine, state(2, bread(280, "Milch"), feed_seq=2))) == "kept_cloud"


def test_a_listed_difference_follows_the_cloud(store: TillStore) -> None:
    _listed_price_difference(store)
    store.apply_feed_entry(entry(state(3, None, feed_seq=3), prev=2), None)  # deleted on another till
    [difference] = store.differences()
    assert (difference.cloud_version, difference.cloud_deleted, difference.local_data["unit_price"]) == (3, True, 300)


def test_keeping_the_till_value_takes_only_the_listed_fields(store: TillStore) -> None:
    _listed_price_difference(store)
    store.apply_feed_entry(entry(state(3, bread(280, "Vollmilch"), feed_seq=3), prev=2), None)  # renamed meanwhile
    assert store.differences()[0].cloud_data["text"] == "Vollmilch"
    store.resolve_difference("article", "A1", "till", T0)
    assert data(store)["data"] == bread(300, "Vollmilch").model_dump(mode="json")
    assert '"base_version":3' in store.unsent(10)[-1].body


def test_a_listed_difference_ends_when_the_cloud_takes_the_value_or_the_owner_sets_one(store: TillStore) -> None:
    _listed_price_difference(store)
    store.apply_feed_entry(entry(state(3, bread(300, "Milch"), feed_seq=3), prev=2), None)  # another till set 300
    assert store.differences() == []
    _, _ = store.save_masterdata("article", "A1", bread(310, "Milch"), T0)
    record = store.unsent(10)[-1]
    store.apply_conflict(conflict(record.record_id, state(4, bread(320, "Milch"), feed_seq=4)))
    assert [d.entity_key for d in store.differences()] == ["A1"]
    store.save_masterdata("article", "A1", bread(330, "Milch"), T0)  # the owner's new value settles it
    assert store.differences() == []


def test_editing_another_field_keeps_the_listed_difference(store: TillStore) -> None:
    _listed_price_difference(store)
    store.save_masterdata("article", "A1", bread(280, "Semmel"), T0)  # the text, not the listed price
    assert [d.fields for d in store.differences()] == [("unit_price",)]
