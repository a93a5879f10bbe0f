"""The RabbitMQ topology, declared once as data.

Everything the services and tills rely on is a value here: exchanges, queues with
their arguments, bindings, routing-key shapes and the per-till queue and
permissions. ``definitions()`` renders the static part in RabbitMQ's definitions
format (exported to ``deploy/rabbitmq/definitions.json``; a test keeps them equal),
``declare()`` applies it over AMQP, and ``download_binding_keys()`` is the one pure
function from a till's sync mode to the bindings of its queue.

Routing keys:
- upload: ``<account_id>.<till_id>.<kind>`` with kind
  ``masterdata|receipt|zreport|receipt_event`` (records), ``catchup`` (a till asking
  for the master-data feed) or ``receipt_catchup`` (asking for the shared receipts);
  a till's topic permission allows only its own ``<account_id>.<till_id>.`` prefix.
- download: ``<account_id>.<category>`` for changes a whole account receives, and
  ``<account_id>.till.<till_id>`` for messages addressed to one till.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Literal
from uuid import UUID

import aio_pika
from aio_pika.abc import AbstractChannel
from pydantic import BaseModel, ConfigDict

from shared.models import MASTERDATA_CATEGORIES, RECORD_KINDS, CustomSyncFlags, MasterDataCategory, RecordKind, SyncMode

UPLOAD_EXCHANGE = "till.upload"
DOWNLOAD_EXCHANGE = "till.download"
ACCOUNT_EXCHANGE = "account.requests"
APPROVAL_EXCHANGE = "password.approval"
DEAD_LETTER_EXCHANGE = "tillsync.dead-letter"

ARCHIVE_WRITER_QUEUE = "archive-writer"
MASTERDATA_BROADCASTER_QUEUE = "masterdata-broadcaster"
MASTERDATA_CATCHUP_QUEUE = "masterdata-catchup"
CATCHUP_KIND = "catchup"  # routing-key suffix of a till's catch-up request
RECEIPT_ROUTER_QUEUE = "receipt-handover-router"
RECEIPT_CATCHUP_QUEUE = "receipt-catchup"
RECEIPT_CATCHUP_KIND = "receipt_catchup"  # routing-key suffix of a till's receipt catch-up request
ACCOUNT_SERVICE_QUEUE = "account-service"
PASSWORD_APPROVAL_QUEUE = "password-approval"
APPROVAL_REQUEST_KEY = "request"  # the account service: a new reset request
APPROVAL_DECISION_KEY = "decision"  # ops: approve / reject
APPROVAL_QUERY_KEY = "query"  # ops: list
ACCOUNT_SERVICE_ROUTING_KEY = ACCOUNT_SERVICE_QUEUE
# Every routing-key kind a till may publish with on till.upload: a key with any other
# kind would reach no queue, so the till's topic permission refuses it at the broker.
TILL_UPLOAD_KINDS: tuple[str, ...] = (*RECORD_KINDS, CATCHUP_KIND, RECEIPT_CATCHUP_KIND)

DEFAULT_VHOST = "tillsync"
SIGNUP_USER = "tillsync-signup"
TILL_USER_PREFIX = "till-"
OPS_USER_PREFIX = "ops-"
TILL_QUEUE_PREFIX = "till."

DELIVERY_LIMIT = 10  # redeliveries of one message before a service queue dead-letters it
ACCOUNT_REQUEST_TTL_MS = 30_000  # an account request older than this is void (the caller gave up)
TILL_QUEUE_MAX_LENGTH = 100_000  # the per-till queue is a fast path; the feed is the full copy

DownloadCategory = Literal["articles", "customers", "cashiers", "masterdata_other", "receipts", "zreports"]
DOWNLOAD_CATEGORIES: tuple[DownloadCategory, ...] = (*MASTERDATA_CATEGORIES, "receipts", "zreports")


class ExchangeSpec(BaseModel):
    """An exchange: name, type (``topic``, ``direct``, ...) and arguments."""

    model_config = ConfigDict(frozen=True)
    name: str
    type: Literal["topic", "direct", "fanout", "headers"]
    durable: bool = True
    arguments: dict[str, Any] = {}


class QueueSpec(BaseModel):
    """A queue with its ``x-`` arguments (queue type, delivery limit, dead-letter exchange)."""

    model_config = ConfigDict(frozen=True)
    name: str
    durable: bool = True
    arguments: dict[str, Any] = {}


class BindingSpec(BaseModel):
    """A binding of queue ``destination`` to exchange ``source`` with a binding key."""

    model_config = ConfigDict(frozen=True)
    source: str
    destination: str
    routing_key: str


class Topology(BaseModel):
    """A set of exchanges, queues and bindings, declared together."""

    model_config = ConfigDict(frozen=True)
    exchanges: tuple[ExchangeSpec, ...]
    queues: tuple[QueueSpec, ...]
    bindings: tuple[BindingSpec, ...]


def dead_letter_queue_name(queue: str) -> str:
    """Name of the queue that holds the dead letters of service queue ``queue``."""
    return f"{queue}.dead-letter"


def service_queue(name: str, sources: Iterable[tuple[str, str]], single_active_consumer: bool = False) -> Topology:
    """A service's quorum queue, its dead-letter queue, and the bindings to it.

    ``sources``: ``(exchange, binding key)`` pairs the queue is bound with. The queue
    dead-letters (at least once) to ``DEAD_LETTER_EXCHANGE`` with routing key
    ``name`` after ``DELIVERY_LIMIT`` redeliveries or a reject; the dead-letter queue
    is bound there with the same key. ``single_active_consumer``: of N running
    instances one consumes at a time (the others stand by), which keeps the queue's
    order (RabbitMQ ``x-single-active-consumer``).
    """
    dlq = dead_letter_queue_name(name)
    return Topology(
        exchanges=(),
        queues=(
            QueueSpec(
                name=name,
                arguments={
                    "x-queue-type": "quorum",
                    "x-delivery-limit": DELIVERY_LIMIT,
                    "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
                    "x-dead-letter-routing-key": name,
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                    **({"x-single-active-consumer": True} if single_active_consumer else {}),
                },
            ),
            QueueSpec(name=dlq, arguments={"x-queue-type": "quorum"}),
        ),
        bindings=(
            *(BindingSpec(source=ex, destination=name, routing_key=key) for ex, key in sources),
            BindingSpec(source=DEAD_LETTER_EXCHANGE, destination=dlq, routing_key=name),
        ),
    )


def _merge(*parts: Topology) -> Topology:
    return Topology(
        exchanges=tuple(e for p in parts for e in p.exchanges),
        queues=tuple(q for p in parts for q in p.queues),
        bindings=tuple(b for p in parts for b in p.bindings),
    )


# The account service's request queue is the one exception to "service queues are
# quorum queues": requests carry clear passwords, so they are transient (classic,
# non-durable queue, non-persistent messages) and expire after ACCOUNT_REQUEST_TTL_MS,
# when the caller has already been told that the request timed out.
ACCOUNT_SERVICE_QUEUE_SPEC = QueueSpec(
    name=ACCOUNT_SERVICE_QUEUE,
    durable=False,
    arguments={"x-queue-type": "classic", "x-message-ttl": ACCOUNT_REQUEST_TTL_MS},
)

TOPOLOGY = _merge(
    Topology(
        exchanges=(
            ExchangeSpec(name=UPLOAD_EXCHANGE, type="topic"),
            ExchangeSpec(name=DOWNLOAD_EXCHANGE, type="topic"),
            ExchangeSpec(name=ACCOUNT_EXCHANGE, type="direct"),
            ExchangeSpec(name=APPROVAL_EXCHANGE, type="topic"),
            ExchangeSpec(name=DEAD_LETTER_EXCHANGE, type="direct"),
        ),
        queues=(ACCOUNT_SERVICE_QUEUE_SPEC, QueueSpec(name=dead_letter_queue_name(ACCOUNT_SERVICE_QUEUE), arguments={"x-queue-type": "quorum"})),
        bindings=(
            BindingSpec(source=ACCOUNT_EXCHANGE, destination=ACCOUNT_SERVICE_QUEUE, routing_key=ACCOUNT_SERVICE_ROUTING_KEY),
            BindingSpec(
                source=DEAD_LETTER_EXCHANGE,
                destination=dead_letter_queue_name(ACCOUNT_SERVICE_QUEUE),
                routing_key=ACCOUNT_SERVICE_QUEUE,
            ),
        ),
    ),
    service_queue(ARCHIVE_WRITER_QUEUE, [(UPLOAD_EXCHANGE, f"*.*.{kind}") for kind in RECORD_KINDS]),
    # Master-data changes are judged in upload order (a till's later change may build on
    # its earlier one), so one broadcaster instance consumes at a time.
    service_queue(MASTERDATA_BROADCASTER_QUEUE, [(UPLOAD_EXCHANGE, "*.*.masterdata")], single_active_consumer=True),
    service_queue(MASTERDATA_CATCHUP_QUEUE, [(UPLOAD_EXCHANGE, f"*.*.{CATCHUP_KIND}")]),
    # Events of a shared receipt are positioned in arrival order (the table race is
    # decided by it), so one router instance consumes at a time.
    service_queue(
        RECEIPT_ROUTER_QUEUE,
        [(UPLOAD_EXCHANGE, f"*.*.{kind}") for kind in ("receipt_event", "receipt", "zreport")],
        single_active_consumer=True,
    ),
    service_queue(RECEIPT_CATCHUP_QUEUE, [(UPLOAD_EXCHANGE, f"*.*.{RECEIPT_CATCHUP_KIND}")]),
    # Reset requests and ops decisions in one queue, so they are applied in arrival order.
    service_queue(
        PASSWORD_APPROVAL_QUEUE,
        [(APPROVAL_EXCHANGE, key) for key in (APPROVAL_REQUEST_KEY, APPROVAL_DECISION_KEY, APPROVAL_QUERY_KEY)],
        single_active_consumer=True,
    ),
)

# Bindings of earlier releases that ``tillsync setup`` removes (the archive writer used
# to take everything on till.upload; catch-up requests are not records).
OBSOLETE_BINDINGS: tuple[BindingSpec, ...] = (
    BindingSpec(source=UPLOAD_EXCHANGE, destination=ARCHIVE_WRITER_QUEUE, routing_key="#"),
)


# ---------------------------------------------------------------------------
# Routing keys and per-till resources


def upload_routing_key(account_id: UUID, till_id: UUID, kind: RecordKind) -> str:
    """``<account_id>.<till_id>.<kind>``: the only routing keys a till may publish with."""
    return f"{account_id}.{till_id}.{kind}"


def catchup_routing_key(account_id: UUID, till_id: UUID) -> str:
    """``<account_id>.<till_id>.catchup``: a till's catch-up request on ``till.upload``."""
    return f"{account_id}.{till_id}.{CATCHUP_KIND}"


def receipt_catchup_routing_key(account_id: UUID, till_id: UUID) -> str:
    """``<account_id>.<till_id>.receipt_catchup``: a till's request for the shared receipts."""
    return f"{account_id}.{till_id}.{RECEIPT_CATCHUP_KIND}"


def till_broker_user(till_id: UUID) -> str:
    """The RabbitMQ user name of a till: ``till-<till_id>``."""
    return f"{TILL_USER_PREFIX}{till_id}"


def till_queue_name(till_id: UUID) -> str:
    """The till's own download queue: ``till.<till_id>``."""
    return f"{TILL_QUEUE_PREFIX}{till_id}"


def till_queue_spec(till_id: UUID) -> QueueSpec:
    """The per-till download queue: quorum, bounded, oldest dropped first (catch-up repairs)."""
    return QueueSpec(
        name=till_queue_name(till_id),
        arguments={
            "x-queue-type": "quorum",
            "x-max-length": TILL_QUEUE_MAX_LENGTH,
            "x-overflow": "drop-head",
        },
    )


class UserPermissions(BaseModel):
    """A broker user's vhost permissions and its topic permission on one exchange (tills: the
    upload exchange; ops users: the password-approval exchange)."""

    model_config = ConfigDict(frozen=True)
    configure: str
    write: str
    read: str
    topic_exchange: str
    topic_write: str
    topic_read: str


def till_permissions(account_id: UUID, till_id: UUID) -> UserPermissions:
    """Permissions of a till's broker user (regular expressions, RabbitMQ access control).

    The till may publish only to ``till.upload`` and only with routing keys
    ``<account_id>.<till_id>.<kind>`` of its own account and till and a kind of
    ``TILL_UPLOAD_KINDS`` (any other kind would be routed nowhere and lost unseen); it
    may read only its own queue; it may not declare, delete or bind anything.
    """
    kinds = "|".join(re.escape(kind) for kind in TILL_UPLOAD_KINDS)
    return UserPermissions(
        configure="^$",
        write=f"^{re.escape(UPLOAD_EXCHANGE)}$",
        read=f"^{re.escape(till_queue_name(till_id))}$",
        topic_exchange=UPLOAD_EXCHANGE,
        topic_write=f"^{re.escape(str(account_id))}\\.{re.escape(str(till_id))}\\.({kinds})$",
        topic_read="^$",
    )


def ops_broker_user(name: str) -> str:
    """The RabbitMQ user of a service technician: ``ops-<name>``."""
    return f"{OPS_USER_PREFIX}{name}"


def ops_permissions() -> UserPermissions:
    """Permissions of an ops user: publish only decisions and queries to ``password.approval``
    (answers come through direct reply-to), nothing else."""
    return UserPermissions(
        configure="^$",
        write=f"^{re.escape(APPROVAL_EXCHANGE)}$",
        read="^$",
        topic_exchange=APPROVAL_EXCHANGE,
        topic_write=f"^({APPROVAL_DECISION_KEY}|{APPROVAL_QUERY_KEY})$",
        topic_read="^$",
    )


SIGNUP_PERMISSIONS = {"configure": "^$", "write": f"^{re.escape(ACCOUNT_EXCHANGE)}$", "read": "^$"}
"""The shared sign-up user may only publish account requests (replies use direct reply-to)."""


def stored_mode(sync_mode: str, custom_flags: Any) -> tuple[SyncMode, CustomSyncFlags | None]:
    """A till's mode as stored (``tills.sync_mode``/``custom_flags`` as a dict, or the
    till's own settings as JSON text): ``(mode, custom flags or None)``."""
    if not custom_flags:
        return SyncMode(sync_mode), None
    if isinstance(custom_flags, str):
        return SyncMode(sync_mode), CustomSyncFlags.model_validate_json(custom_flags)
    return SyncMode(sync_mode), CustomSyncFlags.model_validate(custom_flags)


def download_categories(mode: SyncMode, custom: CustomSyncFlags | None) -> tuple[DownloadCategory, ...]:
    """Which kinds of other tills' changes a till in ``mode`` receives (DESIGN.md §1.3)."""
    if mode == SyncMode.ARCHIVE:
        return ()
    if mode == SyncMode.ARCHIVE_MASTERDATA:
        return MASTERDATA_CATEGORIES
    if mode == SyncMode.ARCHIVE_MASTERDATA_RECEIPTS:
        return DOWNLOAD_CATEGORIES
    flags = custom or CustomSyncFlags()
    wanted = {
        "articles": flags.download_articles,
        "customers": flags.download_customers,
        "cashiers": flags.download_cashiers,
        "masterdata_other": flags.download_other_masterdata,
        "receipts": flags.download_receipts,
        "zreports": flags.download_zreports,
    }
    return tuple(c for c in DOWNLOAD_CATEGORIES if wanted[c])


def masterdata_categories(mode: SyncMode, custom: CustomSyncFlags | None) -> tuple[MasterDataCategory, ...]:
    """The master-data categories a till in ``mode`` receives, and so takes part in:
    its changes of these kinds are shared with the account's other tills."""
    received = download_categories(mode, custom)
    return tuple(c for c in MASTERDATA_CATEGORIES if c in received)


def upload_kinds(mode: SyncMode, custom: CustomSyncFlags | None) -> tuple[RecordKind, ...]:
    """The record kinds a till in ``mode`` uploads: all, except those switched off in ``custom``."""
    if mode != SyncMode.CUSTOM:
        return RECORD_KINDS
    flags = custom or CustomSyncFlags()
    wanted = {
        "masterdata": flags.upload_masterdata,
        "receipt": flags.upload_receipts,
        "receipt_event": flags.upload_receipts,
        "zreport": flags.upload_zreports,
    }
    return tuple(k for k in RECORD_KINDS if wanted[k])


def hands_over_receipts(mode: SyncMode, custom: CustomSyncFlags | None) -> bool:
    """True if a till in ``mode`` takes part in shared open receipts: it receives the
    other tills' receipts and uploads its own (``archive_masterdata_receipts``, or
    ``custom`` with ``download_receipts`` and ``upload_receipts``)."""
    return "receipts" in download_categories(mode, custom) and "receipt_event" in upload_kinds(mode, custom)


def download_routing_key(account_id: UUID, category: DownloadCategory) -> str:
    """Routing key of a change every till of the account in a matching mode receives."""
    return f"{account_id}.{category}"


def till_direct_routing_key(account_id: UUID, till_id: UUID) -> str:
    """Routing key of a message addressed to one till (notices, catch-up pages)."""
    return f"{account_id}.till.{till_id}"


def download_binding_keys(
    account_id: UUID, till_id: UUID, sync_enabled: bool, mode: SyncMode, custom: CustomSyncFlags | None
) -> tuple[str, ...]:
    """The binding keys of a till's queue on ``till.download``: a pure function of its mode.

    Sync switched off: no bindings. Otherwise the till's direct key plus one key per
    download category of its mode.
    """
    if not sync_enabled:
        return ()
    return (
        till_direct_routing_key(account_id, till_id),
        *(download_routing_key(account_id, c) for c in download_categories(mode, custom)),
    )


def all_download_binding_keys(account_id: UUID, till_id: UUID) -> tuple[str, ...]:
    """Every binding key a till's queue can ever have (used to remove stale bindings)."""
    return download_binding_keys(account_id, till_id, True, SyncMode.ARCHIVE_MASTERDATA_RECEIPTS, None)


# ---------------------------------------------------------------------------
# Rendering and declaring


def definitions(vhost: str = DEFAULT_VHOST, topology: Topology = TOPOLOGY) -> dict[str, Any]:
    """The topology in RabbitMQ's definitions format (import via management UI or API)."""
    return {
        "vhosts": [{"name": vhost}],
        "exchanges": [
            {
                "name": e.name,
                "vhost": vhost,
                "type": e.type,
                "durable": e.durable,
                "auto_delete": False,
                "internal": False,
                "arguments": e.arguments,
            }
            for e in topology.exchanges
        ],
        "queues": [
            {"name": q.name, "vhost": vhost, "durable": q.durable, "auto_delete": False, "arguments": q.arguments}
            for q in topology.queues
        ],
        "bindings": [
            {
                "source": b.source,
                "vhost": vhost,
                "destination": b.destination,
                "destination_type": "queue",
                "routing_key": b.routing_key,
                "arguments": {},
            }
            for b in topology.bindings
        ],
    }


async def declare(channel: AbstractChannel, topology: Topology = TOPOLOGY) -> None:
    """Declare every exchange, queue and binding of ``topology`` on ``channel`` (idempotent).

    Raises ``aio_pika.exceptions.ChannelPreconditionFailed`` if an existing entity has
    different arguments.
    """
    exchanges = {}
    for e in topology.exchanges:
        exchanges[e.name] = await channel.declare_exchange(
            e.name, aio_pika.ExchangeType(e.type), durable=e.durable, arguments=e.arguments
        )
    queues = {}
    for q in topology.queues:
        queues[q.name] = await declare_queue(channel, q)
    for b in topology.bindings:
        await queues[b.destination].bind(b.source, routing_key=b.routing_key)


def bindings_to(queue: str, topology: Topology = TOPOLOGY) -> tuple[BindingSpec, ...]:
    """The bindings of ``topology`` whose destination is ``queue``."""
    return tuple(b for b in topology.bindings if b.destination == queue)


async def declare_queue(channel: AbstractChannel, spec: QueueSpec) -> aio_pika.abc.AbstractQueue:
    """Declare one queue from its spec (idempotent)."""
    return await channel.declare_queue(spec.name, durable=spec.durable, arguments=spec.arguments)
