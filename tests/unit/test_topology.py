"""RabbitMQ topology (shared/topology.py): bindings by sync mode, till permissions, definitions file."""

from __future__ import annotations

import itertools
import json
import re
import uuid
from pathlib import Path

import pytest

from shared.models import CustomSyncFlags, SyncMode
from shared.topology import (
    ACCOUNT_SERVICE_QUEUE,
    ACCOUNT_SERVICE_QUEUE_SPEC,
    DEAD_LETTER_EXCHANGE,
    TOPOLOGY,
    UPLOAD_EXCHANGE,
    definitions,
    download_binding_keys,
    till_permissions,
    till_queue_name,
    upload_routing_key,
)

pytestmark = pytest.mark.unit

DEFINITIONS_FILE = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq" / "definitions.json"

ACCOUNT = uuid.UUID("11111111-1111-4111-8111-111111111111")
TILL = uuid.UUID("22222222-2222-4222-8222-222222222222")
OTHER_ACCOUNT = uuid.UUID("33333333-3333-4333-8333-333333333333")
OTHER_TILL = uuid.UUID("44444444-4444-4444-8444-444444444444")

# Download routing keys as the topology docstring documents them:
# ``<account_id>.<category>`` and ``<account_id>.till.<till_id>``.
DIRECT_KEY = f"{ACCOUNT}.till.{TILL}"
MASTERDATA = {"articles", "customers", "cashiers", "masterdata_other"}
EVERYTHING = MASTERDATA | {"receipts", "zreports"}

# custom flag → download category it switches on
FLAG_CATEGORY = {
    "download_articles": "articles",
    "download_customers": "customers",
    "download_cashiers": "cashiers",
    "download_other_masterdata": "masterdata_other",
    "download_receipts": "receipts",
    "download_zreports": "zreports",
}


def keys_for(categories: set[str]) -> set[str]:
    return {DIRECT_KEY} | {f"{ACCOUNT}.{c}" for c in categories}


def bound(mode: SyncMode, custom: CustomSyncFlags | None = None, enabled: bool = True) -> tuple[str, ...]:
    return download_binding_keys(ACCOUNT, TILL, enabled, mode, custom)


# ---------------------------------------------------------------------------
# bindings by sync mode (DESIGN.md §1.3)


def test_archive_mode_receives_only_messages_addressed_to_the_till() -> None:
    assert bound(SyncMode.ARCHIVE) == (DIRECT_KEY,)


def test_archive_masterdata_mode_receives_master_data_of_the_other_tills() -> None:
    keys = bound(SyncMode.ARCHIVE_MASTERDATA)
    assert set(keys) == keys_for(MASTERDATA)
    assert len(keys) == len(set(keys))


def test_archive_masterdata_receipts_mode_receives_everything() -> None:
    keys = bound(SyncMode.ARCHIVE_MASTERDATA_RECEIPTS)
    assert set(keys) == keys_for(EVERYTHING)
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize(
    "switched_on",
    [set(c) for n in range(len(FLAG_CATEGORY) + 1) for c in itertools.combinations(sorted(FLAG_CATEGORY), n)],
    ids=lambda s: "+".join(sorted(s)) or "none",
)
def test_custom_mode_receives_exactly_the_flagged_categories(switched_on: set[str]) -> None:
    flags = CustomSyncFlags(**{flag: flag in switched_on for flag in FLAG_CATEGORY})
    keys = bound(SyncMode.CUSTOM, flags)
    assert set(keys) == keys_for({FLAG_CATEGORY[f] for f in switched_on})
    assert len(keys) == len(set(keys))


def test_custom_upload_flags_do_not_change_the_download_bindings() -> None:
    uploads_off = CustomSyncFlags(upload_masterdata=False, upload_receipts=False, upload_zreports=False, download_receipts=True)
    uploads_on = CustomSyncFlags(download_receipts=True)
    assert set(bound(SyncMode.CUSTOM, uploads_off)) == set(bound(SyncMode.CUSTOM, uploads_on)) == keys_for({"receipts"})


@pytest.mark.parametrize("mode", list(SyncMode))
def test_sync_switched_off_binds_nothing(mode: SyncMode) -> None:
    custom = CustomSyncFlags(**{flag: True for flag in FLAG_CATEGORY}) if mode == SyncMode.CUSTOM else None
    assert bound(mode, custom, enabled=False) == ()


def test_bindings_only_name_the_tills_own_account() -> None:
    for mode in SyncMode:
        for key in bound(mode, CustomSyncFlags(**{f: True for f in FLAG_CATEGORY})):
            assert key.startswith(f"{ACCOUNT}.")


# ---------------------------------------------------------------------------
# per-till permissions (regular expressions as RabbitMQ applies them: a search)


PERMS = till_permissions(ACCOUNT, TILL)


@pytest.mark.parametrize("kind", ["masterdata", "receipt", "zreport", "receipt_event", "catchup", "receipt_catchup"])
def test_topic_write_allows_the_tills_own_upload_keys(kind: str) -> None:
    assert re.search(PERMS.topic_write, f"{ACCOUNT}.{TILL}.{kind}")
    assert re.search(PERMS.topic_write, upload_routing_key(ACCOUNT, TILL, kind))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "key",
    [
        f"{ACCOUNT}.{OTHER_TILL}.receipt",  # another till of the same account
        f"{OTHER_ACCOUNT}.{TILL}.receipt",  # its till id under another account
        f"{OTHER_ACCOUNT}.{OTHER_TILL}.receipt",
        f"{ACCOUNT}.{TILL}.receipt.extra",  # extra segment
        f"x.{ACCOUNT}.{TILL}.receipt",  # extra leading segment
        f"{ACCOUNT}.{TILL}",  # no kind
        f"{ACCOUNT}.{TILL}.",
        f"{ACCOUNT}.{TILL}.*",
        f"{ACCOUNT}.{TILL}.#",
        f"{ACCOUNT}.*.receipt",
        f"{ACCOUNT}x{TILL}.receipt",  # the dot must be a dot
        f"{ACCOUNT}.{TILL}.voucher",  # a kind no service takes: it would be routed nowhere
        f"{ACCOUNT}.{TILL}.receipts",
        f"{ACCOUNT}.{TILL}.receipt_events",
        "#",
        "",
    ],
)
def test_topic_write_refuses_every_other_key(key: str) -> None:
    assert not re.search(PERMS.topic_write, key)


def test_topic_permissions_are_on_the_upload_exchange_and_allow_no_topic_read() -> None:
    assert PERMS.topic_exchange == UPLOAD_EXCHANGE
    assert not re.search(PERMS.topic_read, f"{ACCOUNT}.{TILL}.receipt")


def test_read_allows_only_the_tills_own_queue() -> None:
    own = till_queue_name(TILL)
    assert re.search(PERMS.read, own)
    for other in (till_queue_name(OTHER_TILL), own + ".x", "x" + own, own.replace(".", "x", 1), ACCOUNT_SERVICE_QUEUE, "archive-writer", UPLOAD_EXCHANGE, ""):
        assert not re.search(PERMS.read, other), other


def test_write_allows_only_the_upload_exchange() -> None:
    assert re.search(PERMS.write, UPLOAD_EXCHANGE)
    for other in ("till.download", "account.requests", DEAD_LETTER_EXCHANGE, UPLOAD_EXCHANGE + "x", "tillxupload", ""):
        assert not re.search(PERMS.write, other), other


def test_configure_allows_nothing() -> None:
    assert PERMS.configure == "^$"


def test_another_tills_permissions_do_not_cover_this_till() -> None:
    other = till_permissions(ACCOUNT, OTHER_TILL)
    assert not re.search(other.topic_write, f"{ACCOUNT}.{TILL}.receipt")
    assert not re.search(other.read, till_queue_name(TILL))


# ---------------------------------------------------------------------------
# the topology and the committed definitions file


def test_committed_definitions_file_equals_the_declared_topology() -> None:
    rendered = json.dumps(definitions("tillsync"), indent=2, sort_keys=True) + "\n"
    committed = DEFINITIONS_FILE.read_text()
    # compare parsed first for a readable diff, then byte for byte as `--check` does
    assert json.loads(committed) == json.loads(rendered), "run `tillsync topology export`"
    assert committed == rendered, "run `tillsync topology export`"


def test_definitions_name_the_vhost_everywhere() -> None:
    defs = definitions("some-vhost")
    assert defs["vhosts"] == [{"name": "some-vhost"}]
    for section in ("exchanges", "queues", "bindings"):
        assert defs[section], section
        assert all(item["vhost"] == "some-vhost" for item in defs[section])


QUEUES = {q.name: q for q in TOPOLOGY.queues}
EXCHANGES = {e.name: e for e in TOPOLOGY.exchanges}
# Queues that hold dead letters: the destinations of bindings from the dead-letter exchange.
DEAD_LETTER_QUEUES = {b.destination for b in TOPOLOGY.bindings if b.source == DEAD_LETTER_EXCHANGE}
SERVICE_QUEUES = sorted(set(QUEUES) - DEAD_LETTER_QUEUES - {ACCOUNT_SERVICE_QUEUE})


def test_names_are_unique() -> None:
    assert len(QUEUES) == len(TOPOLOGY.queues)
    assert len(EXCHANGES) == len(TOPOLOGY.exchanges)
    assert len(set(TOPOLOGY.bindings)) == len(TOPOLOGY.bindings)


def test_there_are_service_queues_to_check() -> None:
    assert SERVICE_QUEUES, "no service queue found besides the account-service request queue"


@pytest.mark.parametrize("name", SERVICE_QUEUES)
def test_service_queues_are_quorum_queues_with_delivery_limit_and_dead_letter_exchange(name: str) -> None:
    queue = QUEUES[name]
    assert queue.durable
    assert queue.arguments.get("x-queue-type") == "quorum"
    limit = queue.arguments.get("x-delivery-limit")
    assert isinstance(limit, int) and limit > 0
    dlx = queue.arguments.get("x-dead-letter-exchange")
    assert dlx in EXCHANGES


@pytest.mark.parametrize("name", SERVICE_QUEUES)
def test_dead_letters_of_a_service_queue_reach_a_declared_queue(name: str) -> None:
    queue = QUEUES[name]
    dlx = queue.arguments["x-dead-letter-exchange"]
    key = queue.arguments.get("x-dead-letter-routing-key", name)
    targets = {b.destination for b in TOPOLOGY.bindings if b.source == dlx and b.routing_key == key}
    assert targets and targets <= set(QUEUES)
    assert name not in targets


@pytest.mark.parametrize("name", sorted(DEAD_LETTER_QUEUES))
def test_dead_letter_queues_are_durable_quorum_queues(name: str) -> None:
    assert QUEUES[name].durable
    assert QUEUES[name].arguments.get("x-queue-type") == "quorum"


def test_the_account_service_request_queue_is_the_transient_exception() -> None:
    # Requests carry clear passwords: classic, non-durable, with a message TTL.
    assert QUEUES[ACCOUNT_SERVICE_QUEUE] == ACCOUNT_SERVICE_QUEUE_SPEC
    assert ACCOUNT_SERVICE_QUEUE_SPEC.durable is False
    assert ACCOUNT_SERVICE_QUEUE_SPEC.arguments.get("x-queue-type") != "quorum"
    assert ACCOUNT_SERVICE_QUEUE_SPEC.arguments.get("x-message-ttl", 0) > 0
    # refused account requests are dead-lettered by the consumer with the queue name as key
    assert any(
        b.source == DEAD_LETTER_EXCHANGE and b.routing_key == ACCOUNT_SERVICE_QUEUE and b.destination in QUEUES
        for b in TOPOLOGY.bindings
    )


def test_every_binding_refers_to_a_declared_exchange_and_queue() -> None:
    for binding in TOPOLOGY.bindings:
        assert binding.source in EXCHANGES, binding
        assert binding.destination in QUEUES, binding


def test_every_queue_is_bound_somewhere() -> None:
    destinations = {b.destination for b in TOPOLOGY.bindings}
    assert set(QUEUES) <= destinations


def _topic_matches(pattern: str, key: str) -> bool:
    regex = "^" + re.escape(pattern).replace(r"\#", ".*").replace(r"\*", "[^.]+") + "$"
    return re.match(regex, key) is not None


def _receivers(key: str) -> set[str]:
    return {b.destination for b in TOPOLOGY.bindings if b.source == UPLOAD_EXCHANGE and _topic_matches(b.routing_key, key)}


def test_uploads_reach_the_services_that_need_them() -> None:
    from shared.topology import (
        ARCHIVE_WRITER_QUEUE,
        MASTERDATA_BROADCASTER_QUEUE,
        MASTERDATA_CATCHUP_QUEUE,
        RECEIPT_CATCHUP_QUEUE,
        RECEIPT_ROUTER_QUEUE,
        catchup_routing_key,
        receipt_catchup_routing_key,
    )

    assert _receivers(upload_routing_key(ACCOUNT, TILL, "masterdata")) == {ARCHIVE_WRITER_QUEUE, MASTERDATA_BROADCASTER_QUEUE}
    assert _receivers(upload_routing_key(ACCOUNT, TILL, "receipt")) == {ARCHIVE_WRITER_QUEUE, RECEIPT_ROUTER_QUEUE}
    assert _receivers(upload_routing_key(ACCOUNT, TILL, "zreport")) == {ARCHIVE_WRITER_QUEUE, RECEIPT_ROUTER_QUEUE}
    # events of shared receipts are records (archived) and are ordered by the router
    assert _receivers(upload_routing_key(ACCOUNT, TILL, "receipt_event")) == {ARCHIVE_WRITER_QUEUE, RECEIPT_ROUTER_QUEUE}
    # a catch-up request is not a record: it does not reach the archive
    assert _receivers(catchup_routing_key(ACCOUNT, TILL)) == {MASTERDATA_CATCHUP_QUEUE}
    assert _receivers(receipt_catchup_routing_key(ACCOUNT, TILL)) == {RECEIPT_CATCHUP_QUEUE}


def test_master_data_changes_are_judged_by_one_consumer_at_a_time() -> None:
    from shared.topology import MASTERDATA_BROADCASTER_QUEUE

    [queue] = [q for q in TOPOLOGY.queues if q.name == MASTERDATA_BROADCASTER_QUEUE]
    assert queue.arguments["x-single-active-consumer"] is True


def test_receipt_events_are_ordered_by_one_router_at_a_time() -> None:
    from shared.topology import RECEIPT_ROUTER_QUEUE

    [queue] = [q for q in TOPOLOGY.queues if q.name == RECEIPT_ROUTER_QUEUE]
    assert queue.arguments["x-single-active-consumer"] is True


def test_a_till_may_publish_its_catch_up_requests() -> None:
    from shared.topology import catchup_routing_key, receipt_catchup_routing_key

    assert re.match(till_permissions(ACCOUNT, TILL).topic_write, catchup_routing_key(ACCOUNT, TILL))
    assert re.match(till_permissions(ACCOUNT, TILL).topic_write, receipt_catchup_routing_key(ACCOUNT, TILL))


def test_only_tills_that_send_and_receive_receipts_hand_them_over() -> None:
    from shared.models import CustomSyncFlags
    from shared.topology import hands_over_receipts

    assert hands_over_receipts(SyncMode.ARCHIVE_MASTERDATA_RECEIPTS, None)
    assert not hands_over_receipts(SyncMode.ARCHIVE_MASTERDATA, None)
    assert not hands_over_receipts(SyncMode.ARCHIVE, None)
    assert hands_over_receipts(SyncMode.CUSTOM, CustomSyncFlags(download_receipts=True))
    assert not hands_over_receipts(SyncMode.CUSTOM, CustomSyncFlags(download_receipts=True, upload_receipts=False))
    assert not hands_over_receipts(SyncMode.CUSTOM, CustomSyncFlags(download_zreports=True))
