"""Bad input on every service queue that takes messages from tills or technicians.

For each queue and each kind of bad input that applies to it (malformed JSON, wrong
schema, unknown kind, oversize body, a sender that is not who the message names, a
replayed ``record_id`` with other content, a very long list) one parametrized case
sends a valid message, the bad one and another valid one, and asserts:

- refused: dead-lettered with ``x-tillsync-reason`` naming what is wrong (and, on the
  request/reply queues, answered with that reason);
- counted: each receiving queue's dead-letter queue grows by exactly one, no other;
- the service keeps running and nothing else is lost: both valid messages are handled
  exactly once.

A burst of thousands of uploads with bad ones among them checks the same at volume.
Everything runs against the real broker, database and services.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Awaitable, Callable
from uuid import UUID

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused
from pydantic import TypeAdapter

from shared.amqp import DIRECT_REPLY_TO, ORIGINAL_SIZE_HEADER, REASON_HEADER
from shared.consumer import KEPT_BODY_BYTES
from shared.fiscal import PaymentType, VatKey
from shared.models import (
    DOWNLOAD_ADAPTER,
    AccountReply,
    AccountRequest,
    ApprovalMessage,
    ApprovalReply,
    ApprovePasswordReset,
    Article,
    CatchUpPage,
    CatchUpRequest,
    Cashier,
    CreateAccount,
    Download,
    ErrorCode,
    FeedEntry,
    ListPasswordResets,
    MasterDataRecord,
    AccountCreated,
    PasswordResetList,
    ReceiptCatchUpDone,
    ReceiptCatchUpRequest,
    ReceiptEvent,
    ReceiptOpened,
    RecordRefused,
    RejectPasswordReset,
    SignOut,
    SyncMode,
    Upload,
)
from shared.settings import DEFAULT_MAX_MESSAGE_BYTES
from shared.topology import (
    ACCOUNT_EXCHANGE,
    ACCOUNT_SERVICE_QUEUE,
    ACCOUNT_SERVICE_ROUTING_KEY,
    APPROVAL_DECISION_KEY,
    APPROVAL_EXCHANGE,
    APPROVAL_QUERY_KEY,
    ARCHIVE_WRITER_QUEUE,
    MASTERDATA_BROADCASTER_QUEUE,
    MASTERDATA_CATCHUP_QUEUE,
    PASSWORD_APPROVAL_QUEUE,
    RECEIPT_CATCHUP_QUEUE,
    RECEIPT_ROUTER_QUEUE,
    TOPOLOGY,
    UPLOAD_EXCHANGE,
    dead_letter_queue_name,
    till_queue_name,
)
from tests.support import STRONG_PASSWORD, Environment, fetchval, new_account_name, new_till, take_dead_letters, wait_until
from tillsync.ops import add_technician
from till_agent.booking import SaleLine, closed_receipt
from till_agent.till import Till

pytestmark = pytest.mark.integration

SERVICE_QUEUES = tuple(q.name for q in TOPOLOGY.queues if not q.name.endswith(".dead-letter"))
TECH_PASSWORD = "Techniker-Passwort-1"
OVERSIZE = DEFAULT_MAX_MESSAGE_BYTES + 1
ANNA = Cashier(cashier_id="1", name="Anna")


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def upload_queues(kind: str) -> set[str]:
    """The service queues an upload with routing-key kind ``kind`` reaches (from the topology)."""
    return {b.destination for b in TOPOLOGY.bindings if b.source == UPLOAD_EXCHANGE and b.routing_key.split(".")[-1] == kind}


# ---------------------------------------------------------------------------
# Who sends: a till (or a technician, or the sign-up user) over its own connection


@dataclass
class Sender:
    """A broker identity that publishes hand-made messages; for a till also its hash chain."""

    url: str
    user_id: str | None
    password: str | None = None
    account_id: UUID | None = None
    till_id: UUID | None = None
    till_seq: int = 0
    last_hash: str | None = None

    def upload(self, record: Any, *, commit: bool = True, **changes: Any) -> Upload:
        """The till's next upload of ``record`` (``commit``: it will be archived, so the
        chain moves on; else it takes the next position without moving)."""
        fields: dict[str, Any] = dict(
            record_id=uuid.uuid4(), account_id=self.account_id, till_id=self.till_id, till_seq=self.till_seq + 1,
            recorded_at=now(), record=record,
        )
        fields.update(changes)
        upload = Upload.sealed(self.last_hash, **fields)
        if commit:
            self.till_seq, self.last_hash = upload.till_seq, upload.chain_hash
        return upload

    def key(self, kind: str) -> str:
        return f"{self.account_id}.{self.till_id}.{kind}"

    async def publish(self, exchange: str, routing_key: str, *bodies: bytes) -> None:
        """Publish ``bodies`` in order with publisher confirms (as this identity's ``user_id``)."""
        async with await aio_pika.connect(self.url) as connection:
            channel = await connection.channel(publisher_confirms=True)
            target = await channel.get_exchange(exchange, ensure=False)
            for body in bodies:
                await target.publish(
                    aio_pika.Message(body, user_id=self.user_id, content_type="application/json"), routing_key=routing_key
                )

    async def call(self, exchange: str, routing_key: str, body: bytes, timeout_seconds: float = 20.0) -> bytes:
        """Send a request with RabbitMQ's direct reply-to and return the raw answer."""
        async with await aio_pika.connect(self.url) as connection:
            channel = await connection.channel(publisher_confirms=True)
            answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            correlation_id = str(uuid.uuid4())

            async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                if message.correlation_id == correlation_id and not answer.done():
                    answer.set_result(message.body)

            replies = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
            await replies.consume(on_reply, no_ack=True)
            target = await channel.get_exchange(exchange, ensure=False)
            await target.publish(
                aio_pika.Message(body, user_id=self.user_id, reply_to=DIRECT_REPLY_TO, correlation_id=correlation_id,
                                 content_type="application/json"),
                routing_key=routing_key,
            )
            return await asyncio.wait_for(answer, timeout_seconds)


def till_sender(env: Environment, till: Till) -> Sender:
    identity = till.store.identity()
    return Sender(
        url=env.till_url(identity.broker_username, identity.broker_password),  # type: ignore[arg-type]
        user_id=identity.broker_username, password=identity.broker_password, account_id=identity.account_id,
        till_id=identity.till_id,
    )


@dataclass
class World:
    """Account A with the sending till and a second till, account B with one till, a
    technician, the sign-up user, and a password-reset request waiting for a decision."""

    env: Environment
    sender: Sender  # till of account A, mode archive_masterdata_receipts; never syncs (its messages are hand-made)
    sibling: Sender  # another till of account A
    stranger: Sender  # till of account B, mode archive_masterdata
    ops: Sender
    signup: Sender
    sibling_till: Till
    reset_request_id: UUID
    reset_code: str
    downloads: dict[UUID, list[Download]] = field(default_factory=dict)

    async def take_downloads(self, till: Sender) -> list[Download]:
        """Everything that reached ``till``'s queue so far (taken and kept here)."""
        async with await aio_pika.connect(self.env.settings.amqp_url) as connection:
            channel = await connection.channel()
            queue = await channel.get_queue(till_queue_name(till.till_id), ensure=False)  # type: ignore[arg-type]
            seen = self.downloads.setdefault(till.till_id, [])  # type: ignore[arg-type]
            while (message := await queue.get(fail=False, no_ack=True)) is not None:
                seen.append(DOWNLOAD_ADAPTER.validate_json(message.body))
            return seen


@pytest.fixture(scope="module")
async def world(env, services, tmp_path_factory):  # type: ignore[no-untyped-def]
    tmp: Path = tmp_path_factory.mktemp("bad-input")
    first, second = new_account_name(), new_account_name()
    a1, a2, b1 = new_till(env, tmp, name="Kasse A1"), new_till(env, tmp, name="Kasse A2"), new_till(env, tmp, name="Kasse B1")
    await a1.create_account(first, STRONG_PASSWORD)
    await b1.create_account(second, STRONG_PASSWORD)
    for till, account in ((a1, first), (a2, first), (b1, second)):
        await till.sign_in(account, STRONG_PASSWORD)
    await a1.set_sync_mode(True, SyncMode.ARCHIVE_MASTERDATA_RECEIPTS)
    await b1.set_sync_mode(True, SyncMode.ARCHIVE_MASTERDATA)
    # a password reset waiting for a technician (for the replayed command id)
    reset_account = new_account_name()
    asker = new_till(env, tmp, name="Kasse R")
    await asker.create_account(reset_account, STRONG_PASSWORD)
    await asker.sign_in(reset_account, STRONG_PASSWORD)
    await asker.sign_out()
    requested = await asker.request_password_reset(reset_account, "Neues-Passwort-2026!")
    technician = await add_technician(env.settings, f"t{uuid.uuid4().hex[:8]}", TECH_PASSWORD, management_ui=False)
    yield World(
        env=env,
        sender=till_sender(env, a1),
        sibling=till_sender(env, a2),
        stranger=till_sender(env, b1),
        ops=Sender(url=env.till_url(technician, TECH_PASSWORD), user_id=technician),
        signup=Sender(url=env.signup_url, user_id=None),
        sibling_till=a2,
        reset_request_id=requested.request_id,
        reset_code=requested.verification_code,
    )
    for till in (a1, a2, b1, asker):
        till.close()


async def dead_letter_counts(env: Environment) -> dict[str, int]:
    """Messages now in each service queue's dead-letter queue (exact: a passive declare)."""
    counts = {}
    async with await aio_pika.connect(env.settings.amqp_url) as connection:
        channel = await connection.channel()
        for queue in SERVICE_QUEUES:
            declared = await channel.declare_queue(dead_letter_queue_name(queue), passive=True)
            counts[queue] = declared.declaration_result.message_count
    return counts


# ---------------------------------------------------------------------------
# Valid messages, one kind per queue, and how to see each was handled once


def receipt_record(number: int, lines: int = 1) -> Any:
    at = now()
    return closed_receipt(
        receipt_number=number,
        lines=[SaleLine(f"{n}", f"Brot {n}", Decimal("1"), 250, VatKey.REDUCED) for n in range(1, lines + 1)],
        payment_type=PaymentType.CASH, payment_name="Bar", cashier=ANNA, opened_at=at, closed_at=at, business_day=at.date(),
    )


def article_record(nr: str | None = None, price: int = 250) -> MasterDataRecord:
    nr = nr or f"A{uuid.uuid4().hex[:8]}"
    return MasterDataRecord(
        entity_kind="article", entity_key=nr, shared=True, data=Article(article_nr=nr, text="Brot", unit_price=price, vat_key=VatKey.REDUCED)
    )


def opened_record(table_nr: str | None = None) -> ReceiptEvent:
    return ReceiptEvent(receipt_id=uuid.uuid4(), event=ReceiptOpened(table_nr=table_nr, business_day=now().date(), opened_at=now(), cashier=ANNA))


@dataclass
class Sent:
    """A valid message that was sent, with the check that it was handled exactly once."""

    handled_once: Callable[[], Awaitable[bool]]
    body: Any = None  # the model sent (e.g. the upload whose record_id a replay reuses)


async def _count_is_one(env: Environment, query: str, key: Any) -> bool:
    return await fetchval(env, query, key) == 1


class Target:
    """One service queue: how to send it a valid message and who publishes to it."""

    queue: str

    async def send_valid(self, w: World) -> Sent:
        raise NotImplementedError


class UploadTarget(Target):
    def __init__(self, queue: str, kind: str, record: Callable[[World], Any], table: str) -> None:
        self.queue, self.kind, self._record, self._table = queue, kind, record, table

    async def send_valid(self, w: World) -> Sent:
        upload = w.sender.upload(self._record(w))
        await w.sender.publish(UPLOAD_EXCHANGE, w.sender.key(self.kind), upload.model_dump_json().encode())
        query = f"select count(*) from {self._table} where record_id = $1"
        return Sent(lambda: _count_is_one(w.env, query, upload.record_id), upload)


class CatchUpTarget(Target):
    def __init__(self, queue: str, kind: str, request: Callable[[World], Any], answer: type) -> None:
        self.queue, self.kind, self._request, self._answer = queue, kind, request, answer

    async def send_valid(self, w: World) -> Sent:
        request = self._request(w)
        await w.sender.publish(UPLOAD_EXCHANGE, w.sender.key(self.kind), request.model_dump_json().encode())

        async def answered_once() -> bool:
            answers = [
                d for d in await w.take_downloads(w.sender)
                if isinstance(d.message, self._answer) and d.message.request_id == request.request_id
                and getattr(d.message, "done", True)
            ]
            return len(answers) == 1

        return Sent(answered_once, request)


class RpcTarget(Target):
    def __init__(self, queue: str, exchange: str, key: str, sender: str, valid: Callable[[World], bytes], reply: TypeAdapter[Any], ok: type) -> None:
        self.queue, self.exchange, self.key, self.sender = queue, exchange, key, sender
        self._valid, self._reply, self._ok = valid, reply, ok

    def who(self, w: World) -> Sender:
        return getattr(w, self.sender)

    async def send_valid(self, w: World) -> Sent:
        answer = self._reply.validate_json(await self.who(w).call(self.exchange, self.key, self._valid(w)))
        ok = isinstance(answer.reply, self._ok)

        async def answered() -> bool:
            return ok

        return Sent(answered, answer)

    async def refused_with(self, w: World, body: bytes, key: str | None = None) -> Any:
        return self._reply.validate_json(await self.who(w).call(self.exchange, key or self.key, body)).reply


WRITER = UploadTarget(ARCHIVE_WRITER_QUEUE, "receipt", lambda w: receipt_record(w.sender.till_seq + 1), "archive_records")
BROADCASTER = UploadTarget(MASTERDATA_BROADCASTER_QUEUE, "masterdata", lambda w: article_record(), "masterdata_feed")
ROUTER = UploadTarget(RECEIPT_ROUTER_QUEUE, "receipt_event", lambda w: opened_record(), "handover_events")
CATCHUP = CatchUpTarget(
    MASTERDATA_CATCHUP_QUEUE, "catchup",
    lambda w: CatchUpRequest(request_id=uuid.uuid4(), account_id=w.sender.account_id, till_id=w.sender.till_id, since={"articles": 0}),
    CatchUpPage,
)
RECEIPT_CATCHUP = CatchUpTarget(
    RECEIPT_CATCHUP_QUEUE, "receipt_catchup",
    lambda w: ReceiptCatchUpRequest(request_id=uuid.uuid4(), account_id=w.sender.account_id, till_id=w.sender.till_id),
    ReceiptCatchUpDone,
)
ACCOUNTS = RpcTarget(
    ACCOUNT_SERVICE_QUEUE, ACCOUNT_EXCHANGE, ACCOUNT_SERVICE_ROUTING_KEY, "signup",
    lambda w: AccountRequest(request=CreateAccount(account_name=new_account_name(), password=STRONG_PASSWORD)).model_dump_json().encode(),  # type: ignore[arg-type]
    TypeAdapter(AccountReply), AccountCreated,
)
APPROVALS = RpcTarget(
    PASSWORD_APPROVAL_QUEUE, APPROVAL_EXCHANGE, APPROVAL_QUERY_KEY, "ops",
    lambda w: ApprovalMessage(message=ListPasswordResets()).model_dump_json().encode(),
    TypeAdapter(ApprovalReply), PasswordResetList,
)


# ---------------------------------------------------------------------------
# The bad messages


@dataclass
class Bad:
    """A bad message: who sends it with which key, what the reason must say, and which
    queues dead-letter it (default: every queue its routing key reaches)."""

    body: bytes
    reason: str
    key: str | None = None  # default: the target's
    sender: str | None = None  # default: the target's usual sender
    dead_letters: set[str] | None = None
    reply_code: Any = None  # request/reply queues: the refusal's code (None: dead-lettered, answered "invalid")
    before: tuple[str, bytes] | None = None  # request/reply queues: a valid request (key, body) sent just before
    unchanged: Callable[[], Awaitable[bool]] | None = None  # what the refusal must have left as it was


Build = Callable[[World, Target, Sent], Bad]


def upload_dict(w: World, target: Target, **changes: Any) -> dict[str, Any]:
    assert isinstance(target, UploadTarget)
    data = json.loads(w.sender.upload(target._record(w), commit=False).model_dump_json())
    data.update(changes)
    return data


def request_dict(w: World, target: Target) -> dict[str, Any]:
    assert isinstance(target, CatchUpTarget)
    return json.loads(target._request(w).model_dump_json())


def rpc_dict(w: World, target: Target) -> dict[str, Any]:
    assert isinstance(target, RpcTarget)
    return json.loads(target._valid(w))


def malformed(w: World, target: Target, first: Sent) -> Bad:
    return Bad(b'{"schema_version": 1, "record_id": "\xff\xfe', "invalid message: ")


def oversize(w: World, target: Target, first: Sent) -> Bad:
    body = b'{"padding": "' + b"x" * OVERSIZE + b'"}'
    return Bad(body, f"message body of {len(body)} bytes is over the limit of {DEFAULT_MAX_MESSAGE_BYTES} bytes")


def _schema(make: Callable[[World, Target], dict[str, Any]], drop: str, reason: str, value: Any = None) -> Build:
    """A message without the field ``drop`` (or with ``value`` in it, if given)."""

    def build(w: World, target: Target, first: Sent) -> Bad:
        data = make(w, target)
        if value is None:
            data.pop(drop)
        else:
            data[drop] = value
        return Bad(json.dumps(data).encode(), reason)

    return build


def unknown_upload_kind(w: World, target: Target, first: Sent) -> Bad:
    data = upload_dict(w, target)
    data["record"]["kind"] = "voucher"
    return Bad(json.dumps(data).encode(), "record: Input tag 'voucher'")


def unknown_event_type(w: World, target: Target, first: Sent) -> Bad:
    data = upload_dict(w, target)
    data["record"]["event"]["type"] = "refund"
    return Bad(json.dumps(data).encode(), "Input tag 'refund'")


def unknown_entity_kind(w: World, target: Target, first: Sent) -> Bad:
    data = upload_dict(w, target)
    data["record"]["entity_kind"] = "coupon"
    return Bad(json.dumps(data).encode(), "record.masterdata.entity_kind")


def unknown_category(w: World, target: Target, first: Sent) -> Bad:
    data = request_dict(w, target)
    data["since"] = {"vouchers": 0}
    return Bad(json.dumps(data).encode(), "since.vouchers")


def unknown_command(w: World, target: Target, first: Sent) -> Bad:
    data = rpc_dict(w, target)
    data["request"]["command"] = "delete_account"
    return Bad(json.dumps(data).encode(), "Input tag 'delete_account'")


def unknown_approval_type(w: World, target: Target, first: Sent) -> Bad:
    data = rpc_dict(w, target)
    data["message"]["type"] = "escalate"
    return Bad(json.dumps(data).encode(), "Input tag 'escalate'")


def _naming(who: str) -> Build:
    """A till publishes with its own routing key a message whose body names another till."""

    def build(w: World, target: Target, first: Sent) -> Bad:
        other: Sender = getattr(w, who)
        if isinstance(target, UploadTarget):
            data = upload_dict(w, target, account_id=str(other.account_id), till_id=str(other.till_id))
        else:
            data = request_dict(w, target)
            data.update(account_id=str(other.account_id), till_id=str(other.till_id))
        return Bad(json.dumps(data).encode(), f"user_id {w.sender.user_id!r} is not the till's broker user")

    return build


def key_of_another_kind(kind: str, body_of: Target | None = None) -> Build:
    """The sender's own routing key, but of another kind than the body's record (the
    target's, or ``body_of``'s)."""

    def build(w: World, target: Target, first: Sent) -> Bad:
        data = upload_dict(w, body_of or target)
        return Bad(json.dumps(data).encode(), "does not match the message", key=w.sender.key(kind),
                   dead_letters=upload_queues(kind))

    return build


def replayed_record_id(dead_letters: set[str], reason: str) -> Build:
    """The first valid upload's record_id and till_seq again, with other content."""

    def build(w: World, target: Target, first: Sent) -> Bad:
        original: Upload = first.body
        record = original.record
        if isinstance(record, MasterDataRecord):
            other = record.model_copy(update={"data": record.data.model_copy(update={"unit_price": 1})})  # type: ignore[union-attr]
        elif isinstance(record, ReceiptEvent):
            other = record.model_copy(update={"event": record.event.model_copy(update={"table_nr": "99"})})
        else:
            other = receipt_record(original.till_seq, lines=2)
        forged = Upload.sealed(original.prev_hash, **{**original.model_dump(exclude={"prev_hash", "chain_hash"}), "record": other})
        return Bad(forged.model_dump_json().encode(), reason, dead_letters=dead_letters)

    return build


def record_id_of_another_account(w: World, target: Target, first: Sent) -> Bad:
    """Account B's till sends an upload (its own, by key and body) under account A's record_id."""
    original: Upload = first.body
    forged = w.stranger.upload(original.record, commit=False, record_id=original.record_id)
    return Bad(forged.model_dump_json().encode(), "already", sender="stranger", key=w.stranger.key(target.kind))  # type: ignore[attr-defined]


def too_long_list(field_path: tuple[str, ...], items: int, reason: str) -> Build:
    """A message whose list at ``field_path`` has ``items`` entries, over the model's limit."""

    def build(w: World, target: Target, first: Sent) -> Bad:
        data = upload_dict(w, target) if isinstance(target, UploadTarget) else request_dict(w, target)
        *parents, last = field_path
        node = data
        for name in parents:
            node = node[name]
        node[last] = [str(uuid.uuid4()) for _ in range(items)]
        if last == "line_ids":
            node["type"], node["to_receipt_id"] = "lines_moved", str(uuid.uuid4())
            node.pop("table_nr"), node.pop("business_day"), node.pop("opened_at"), node.pop("cashier")
        return Bad(json.dumps(data).encode(), reason)

    return build


def receipt_over_the_limit(w: World, target: Target, first: Sent) -> Bad:
    """A receipt with 10,000 lines: valid by its model, but over the body limit."""
    upload = w.sender.upload(receipt_record(w.sender.till_seq + 1, lines=10_000), commit=False)
    body = upload.model_dump_json().encode()
    assert len(body) > DEFAULT_MAX_MESSAGE_BYTES
    return Bad(body, f"over the limit of {DEFAULT_MAX_MESSAGE_BYTES} bytes")


def sign_out_another_till(w: World, target: Target, first: Sent) -> Bad:
    """A sign-out naming A's other till with a secret that is not its own."""
    body = AccountRequest(request=SignOut(till_id=w.sibling.till_id, till_secret=w.sender.password))  # type: ignore[arg-type]

    async def still_signed_in() -> bool:
        return await fetchval(w.env, "select signed_in from tills where till_id = $1", w.sibling.till_id) is True

    return Bad(body.model_dump_json().encode(), "not signed in, or its credentials are not valid", dead_letters=set(),
               reply_code=ErrorCode.UNKNOWN_TILL, unchanged=still_signed_in)


def approval_for_the_query_key(w: World, target: Target, first: Sent) -> Bad:
    body = ApprovalMessage(message=ApprovePasswordReset(request_id=w.reset_request_id, command_id=uuid.uuid4(), verification_code=w.reset_code))
    return Bad(body.model_dump_json().encode(), "uses routing key 'decision'", reply_code="invalid")


def reused_command_id(w: World, target: Target, first: Sent) -> Bad:
    """A technician's command id used first to reject, then again to approve."""
    command_id = uuid.uuid4()
    reject = ApprovalMessage(message=RejectPasswordReset(request_id=w.reset_request_id, command_id=command_id, reason="Anrufer unbekannt"))
    body = ApprovalMessage(message=ApprovePasswordReset(request_id=w.reset_request_id, command_id=command_id, verification_code=w.reset_code))

    async def still_rejected() -> bool:
        return await fetchval(w.env, "select status from password_reset_requests where request_id = $1", w.reset_request_id) == "rejected"

    return Bad(body.model_dump_json().encode(), f"command id {command_id} was used for another command", key=APPROVAL_DECISION_KEY,
               reply_code="invalid", before=(APPROVAL_DECISION_KEY, reject.model_dump_json().encode()), unchanged=still_rejected)


@dataclass(frozen=True)
class Case:
    target: Target
    name: str
    build: Build

    @property
    def id(self) -> str:
        return f"{self.target.queue}-{self.name}"


UPLOAD_SENDER_CASES: list[tuple[str, Build]] = [
    ("another_till_of_the_account", _naming("sibling")),
    ("a_till_of_another_account", _naming("stranger")),
]
CASES = [
    # archive writer (receipts also reach the router)
    Case(WRITER, "malformed_json", malformed),
    Case(WRITER, "wrong_schema", _schema(upload_dict, "till_seq", "till_seq: Field required")),
    Case(WRITER, "unknown_kind", unknown_upload_kind),
    Case(WRITER, "oversize", oversize),
    *(Case(WRITER, name, build) for name, build in UPLOAD_SENDER_CASES),
    Case(WRITER, "key_of_another_kind", key_of_another_kind("zreport")),
    # the router shares closed receipts without keeping them; the archive refuses the other content
    Case(WRITER, "replayed_record_id", replayed_record_id({ARCHIVE_WRITER_QUEUE}, "already archived with other content")),
    Case(WRITER, "huge_list", receipt_over_the_limit),
    # master-data broadcaster (master data also reaches the archive writer)
    Case(BROADCASTER, "malformed_json", malformed),
    Case(BROADCASTER, "wrong_schema", _schema(upload_dict, "record", "record: Field required")),
    Case(BROADCASTER, "unknown_kind", unknown_entity_kind),
    Case(BROADCASTER, "oversize", oversize),
    *(Case(BROADCASTER, name, build) for name, build in UPLOAD_SENDER_CASES),
    Case(BROADCASTER, "key_of_another_kind", key_of_another_kind("masterdata", body_of=WRITER)),
    Case(BROADCASTER, "replayed_record_id", replayed_record_id(upload_queues("masterdata"), "with other content")),
    Case(BROADCASTER, "record_id_of_another_account", record_id_of_another_account),
    # receipt handover router (events also reach the archive writer)
    Case(ROUTER, "malformed_json", malformed),
    Case(ROUTER, "wrong_schema", _schema(upload_dict, "chain_hash", "chain_hash: Field required")),
    Case(ROUTER, "unknown_kind", unknown_event_type),
    Case(ROUTER, "oversize", oversize),
    *(Case(ROUTER, name, build) for name, build in UPLOAD_SENDER_CASES),
    Case(ROUTER, "key_of_another_kind", key_of_another_kind("receipt")),
    Case(ROUTER, "replayed_record_id", replayed_record_id(upload_queues("receipt_event"), "")),
    Case(ROUTER, "record_id_of_another_account", record_id_of_another_account),
    Case(ROUTER, "huge_list", too_long_list(("record", "event", "line_ids"), 1001, "line_ids: Tuple should have at most 1000 items")),
    # master-data catch-up requests
    Case(CATCHUP, "malformed_json", malformed),
    Case(CATCHUP, "wrong_schema", _schema(request_dict, "since", "since: Field required")),
    Case(CATCHUP, "unknown_kind", unknown_category),
    Case(CATCHUP, "oversize", oversize),
    *(Case(CATCHUP, name, build) for name, build in UPLOAD_SENDER_CASES),
    Case(CATCHUP, "huge_list", too_long_list(("verdicts_for",), 1001, "verdicts_for: Tuple should have at most 1000 items")),
    # receipt catch-up requests
    Case(RECEIPT_CATCHUP, "malformed_json", malformed),
    Case(RECEIPT_CATCHUP, "wrong_schema", _schema(request_dict, "request_id", "request_id: Field required")),
    Case(RECEIPT_CATCHUP, "oversize", oversize),
    *(Case(RECEIPT_CATCHUP, name, build) for name, build in UPLOAD_SENDER_CASES),
    Case(RECEIPT_CATCHUP, "huge_list", too_long_list(("receipt_ids",), 1001, "receipt_ids: Tuple should have at most 1000 items")),
    # account service (the sign-up user): refusals are answered
    Case(ACCOUNTS, "malformed_json", malformed),
    Case(ACCOUNTS, "wrong_schema", _schema(rpc_dict, "request", "request: Field required")),
    Case(ACCOUNTS, "unknown_kind", unknown_command),
    Case(ACCOUNTS, "oversize", oversize),
    Case(ACCOUNTS, "another_till_of_the_account", sign_out_another_till),
    # password-approval worker (a technician): refusals are answered
    Case(APPROVALS, "malformed_json", malformed),
    Case(APPROVALS, "wrong_schema", _schema(rpc_dict, "schema_version", "schema_version: Input should be 1", value=2)),
    Case(APPROVALS, "unknown_kind", unknown_approval_type),
    Case(APPROVALS, "oversize", oversize),
    Case(APPROVALS, "key_of_another_kind", approval_for_the_query_key),
    Case(APPROVALS, "replayed_command_id", reused_command_id),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_bad_input_is_refused_counted_and_nothing_else_is_lost(world: World, case: Case) -> None:
    env, target = world.env, case.target
    for queue in SERVICE_QUEUES:
        await take_dead_letters(env, queue)
    first = await target.send_valid(world)
    bad = case.build(world, target, first)
    expected = bad.dead_letters
    if expected is None:
        expected = upload_queues(target.kind) if isinstance(target, (UploadTarget, CatchUpTarget)) else {target.queue}  # type: ignore[attr-defined]
    sender: Sender = getattr(world, bad.sender) if bad.sender else target.who(world) if isinstance(target, RpcTarget) else world.sender
    if isinstance(target, RpcTarget):
        if bad.before is not None:
            await sender.call(target.exchange, *bad.before)
        refusal = await target.refused_with(world, bad.body, bad.key)
        code = getattr(refusal, "code", None)
        assert code == (bad.reply_code or ("invalid" if target is APPROVALS else ErrorCode.INVALID_REQUEST)), refusal
        shown = " ".join([refusal.message, *getattr(refusal, "details", ())])
        assert bad.reason in shown, shown
    else:
        await sender.publish(UPLOAD_EXCHANGE, bad.key or sender.key(target.kind), bad.body)  # type: ignore[attr-defined]
    second = await target.send_valid(world)

    # the service keeps running and nothing else is lost
    await wait_until(first.handled_once, what=f"the first valid message handled by {target.queue}")
    await wait_until(second.handled_once, what=f"the valid message after the bad one handled by {target.queue}")
    # counted: exactly one dead letter in each receiving queue's dead-letter queue, none elsewhere
    want = {queue: int(queue in expected) for queue in SERVICE_QUEUES}

    async def counted() -> bool:
        return await dead_letter_counts(env) == want

    await wait_until(counted, what=f"dead letters {want}")
    assert await first.handled_once() and await second.handled_once()
    assert await dead_letter_counts(env) == want
    if bad.unchanged is not None:
        assert await bad.unchanged()
    # refused with the reason
    for queue in expected:
        [letter] = await take_dead_letters(env, queue)
        reason = letter.headers[REASON_HEADER]
        assert bad.reason in reason, reason
        if case.name.startswith("replayed_record_id"):
            assert str(first.body.record_id) in reason, reason
        if "over the limit" in bad.reason:
            assert letter.headers[ORIGINAL_SIZE_HEADER] == len(bad.body)
            assert len(letter.body) <= KEPT_BODY_BYTES
            if target is ACCOUNTS:
                assert b"redacted" in letter.body  # a request that may hold a password is never kept


async def test_a_record_id_of_another_account_tells_its_tills_nothing(world: World) -> None:
    """Account B's till reusing A's record_id learns nothing about A's master data."""
    env = world.env
    original = (await BROADCASTER.send_valid(world)).body
    await wait_until(lambda: fetchval(env, "select count(*) from masterdata_feed where record_id = $1", original.record_id),
                     what="A's change accepted")
    await world.take_downloads(world.stranger)
    bad = record_id_of_another_account(world, BROADCASTER, Sent(lambda: None, original))  # type: ignore[arg-type,return-value]
    await world.stranger.publish(UPLOAD_EXCHANGE, world.stranger.key("masterdata"), bad.body)
    marker = world.stranger.upload(article_record())
    await world.stranger.publish(UPLOAD_EXCHANGE, world.stranger.key("masterdata"), marker.model_dump_json().encode())
    await wait_until(lambda: fetchval(env, "select count(*) from masterdata_feed where record_id = $1", marker.record_id),
                     what="B's own change accepted after")
    seen = await wait_until(
        lambda: _with_entry(world, marker.record_id), what="B's own change on B's queue"
    )
    # no feed entry, verdict or state of A's change; the archive tells B only that its own upload was refused
    about_a = [d for d in seen if str(original.record_id) in d.model_dump_json() or str(world.sender.till_id) in d.model_dump_json()]
    assert [type(d.message) for d in about_a] == [RecordRefused]
    assert "already used by another till" in about_a[0].message.reason  # type: ignore[union-attr]
    assert str(world.sender.till_id) not in about_a[0].message.reason  # type: ignore[union-attr]


async def _with_entry(world: World, record_id: UUID) -> list[Download] | None:
    seen = await world.take_downloads(world.stranger)
    return seen if any(isinstance(d.message, FeedEntry) and d.message.entity.record_id == record_id for d in seen) else None


async def test_an_upload_kind_no_service_takes_is_refused_by_the_broker(world: World) -> None:
    """A routing key with an unknown kind would reach no queue; the till's permission refuses it."""
    upload = world.sender.upload(receipt_record(1), commit=False)
    with pytest.raises(ChannelAccessRefused, match="access to topic"):
        await world.sender.publish(UPLOAD_EXCHANGE, world.sender.key("voucher"), upload.model_dump_json().encode())


async def test_a_burst_of_thousands_of_uploads_with_bad_ones_among_them(world: World) -> None:
    """2,000 receipts and Z-reports with 220 bad messages among them and one receipt of 2,000
    lines: every valid one archived and shared exactly once, every bad one dead-lettered by
    both receiving queues, the services still running."""
    env, sender = world.env, world.sender
    for queue in SERVICE_QUEUES:
        await take_dead_letters(env, queue)
    bodies: list[tuple[str, bytes]] = []
    valid: list[Upload] = []
    bad = 0
    long_receipt = None
    for n in range(2000):
        if n == 1000:
            long_receipt = sender.upload(receipt_record(sender.till_seq + 1, lines=2000))
            valid.append(long_receipt)
            body = long_receipt.model_dump_json().encode()
            assert len(body) < DEFAULT_MAX_MESSAGE_BYTES
            bodies.append(("receipt", body))
            continue
        upload = sender.upload(receipt_record(sender.till_seq + 1))
        valid.append(upload)
        bodies.append(("receipt", upload.model_dump_json().encode()))
        if n % 9 == 0:
            bad += 1
            data = json.loads(bodies[-1][1])
            variant = (n // 9) % 5
            if variant == 0:
                bodies.append(("receipt", b"{not json"))
            elif variant == 1:
                data["record"]["total"] += 1
                bodies.append(("receipt", json.dumps(data).encode()))
            elif variant == 2:
                data["till_id"] = str(world.sibling.till_id)
                bodies.append(("receipt", json.dumps(data).encode()))
            elif variant == 3:
                bodies.append(("zreport", json.dumps(data).encode()))  # a receipt under a Z-report's key
            else:
                data["record"]["kind"] = "voucher"
                bodies.append(("receipt", json.dumps(data).encode()))
    for _ in range(3):
        bodies.append(("receipt", b'{"padding": "' + b"x" * OVERSIZE + b'"}'))
        bad += 1
    async with await aio_pika.connect(sender.url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(UPLOAD_EXCHANGE, ensure=False)
        for start in range(0, len(bodies), 200):  # started in order on one channel: they arrive in order
            await asyncio.gather(*(
                exchange.publish(aio_pika.Message(body, user_id=sender.user_id), routing_key=sender.key(kind))
                for kind, body in bodies[start:start + 200]
            ))
    ids = [u.record_id for u in valid]
    marker = sender.upload(receipt_record(sender.till_seq + 1))
    await sender.publish(UPLOAD_EXCHANGE, sender.key("receipt"), marker.model_dump_json().encode())
    ids.append(marker.record_id)

    async def archived() -> bool:
        return await fetchval(env, "select count(*) from archive_records where record_id = any($1::uuid[])", ids) == len(ids)

    async def shared() -> bool:
        return await fetchval(env, "select count(*) from receipt_numbers where record_id = any($1::uuid[])", ids) == len(ids)

    await wait_until(archived, timeout_seconds=180, interval=0.5, what="every valid receipt archived")
    await wait_until(shared, timeout_seconds=180, interval=0.5, what="every valid receipt taken by the router")
    want = {queue: bad if queue in upload_queues("receipt") else 0 for queue in SERVICE_QUEUES}

    async def counted() -> bool:
        return await dead_letter_counts(env) == want

    await wait_until(counted, timeout_seconds=60, what=f"dead letters {want}")
    # exactly once each, and nothing of the bad ones archived
    assert await fetchval(
        env, "select count(*) from archive_records where till_id = $1 and till_seq > $2", sender.till_id, valid[0].till_seq - 1
    ) == len(ids)
    assert long_receipt is not None
    assert await fetchval(
        env, "select jsonb_array_length(payload -> 'record' -> 'lines') from archive_records where record_id = $1", long_receipt.record_id
    ) == 2000
    letters = [m for queue in upload_queues("receipt") for m in await take_dead_letters(env, queue)]
    reasons = {m.headers[REASON_HEADER].split(":")[0] for m in letters}
    assert len(letters) == 2 * bad and all(reasons), reasons


async def test_an_upload_after_a_refused_one_at_the_same_position_is_archived(fresh_env: Environment, tmp_path: Path) -> None:
    """A replayed record_id refused at till_seq n does not take the valid upload at n of the
    same batch with it (the archive writer judges repeats in a batch in rounds)."""
    from services.account_service.main import AccountServiceSettings
    from services.account_service.main import main as account_service_main
    from services.archive_writer.main import ArchiveWriterSettings
    from services.archive_writer.main import main as archive_writer_main

    env = fresh_env
    common = dict(amqp_url=env.settings.amqp_url, management_url=env.settings.management_url, database_url=env.settings.database_url)
    stop_accounts, stop_writer = asyncio.Event(), asyncio.Event()
    writer_settings = ArchiveWriterSettings(**common, batch_size=100, batch_window_seconds=0.5)  # type: ignore[arg-type]
    accounts = asyncio.create_task(account_service_main(AccountServiceSettings(**common), stop_accounts))  # type: ignore[arg-type]
    writer = asyncio.create_task(archive_writer_main(writer_settings, stop_writer))
    till = new_till(env, tmp_path)
    try:
        account = new_account_name()
        await till.create_account(account, STRONG_PASSWORD)
        await till.sign_in(account, STRONG_PASSWORD)
        sender = till_sender(env, till)
        first = sender.upload(receipt_record(1))
        await sender.publish(UPLOAD_EXCHANGE, sender.key("receipt"), first.model_dump_json().encode())
        await wait_until(lambda: fetchval(env, "select count(*) from archive_records where record_id = $1", first.record_id),
                         what="the first upload archived")
        stop_writer.set()
        await writer
        # while the writer is down: the first record_id again at till_seq 2, then the real record 2
        replayed = sender.upload(receipt_record(2, lines=2), commit=False, record_id=first.record_id)
        second = sender.upload(receipt_record(2))
        assert (replayed.till_seq, second.till_seq) == (2, 2)
        await sender.publish(UPLOAD_EXCHANGE, sender.key("receipt"), replayed.model_dump_json().encode(), second.model_dump_json().encode())
        stop_writer = asyncio.Event()
        writer = asyncio.create_task(archive_writer_main(writer_settings, stop_writer))
        await wait_until(lambda: fetchval(env, "select count(*) from archive_records where record_id = $1", second.record_id),
                         what="the valid record 2 archived")
        [letter] = await wait_until(lambda: take_dead_letters(env, ARCHIVE_WRITER_QUEUE), what="the replay dead-lettered")
        assert f"record_id {first.record_id} is already archived with other content" in letter.headers[REASON_HEADER]
        assert await fetchval(env, "select count(*) from archive_records where till_id = $1", sender.till_id) == 2
    finally:
        till.close()
        stop_writer.set()
        stop_accounts.set()
        await asyncio.gather(writer, accounts, return_exceptions=True)


async def test_ops_dead_letters_counts_them_and_names_reason_and_sender(world: World) -> None:
    """The on-call engineer's view: ``tillsync ops dead-letters <queue>`` shows how many
    messages were refused, each with its reason and the broker user that sent it."""
    from typer.testing import CliRunner

    from tillsync.cli import app

    env, sender = world.env, world.sender
    for queue in SERVICE_QUEUES:
        await take_dead_letters(env, queue)
    await sender.publish(UPLOAD_EXCHANGE, sender.key("receipt"), b"{not json")

    async def refused() -> bool:
        return (await dead_letter_counts(env))[ARCHIVE_WRITER_QUEUE] == 1

    await wait_until(refused, what="the malformed upload dead-lettered by the archive writer")
    shown = await asyncio.to_thread(
        CliRunner().invoke, app, ["ops", "dead-letters", ARCHIVE_WRITER_QUEUE],
        env={"TILLSYNC_AMQP_URL": env.settings.amqp_url, "TILLSYNC_MANAGEMENT_URL": env.settings.management_url, "COLUMNS": "1000"},
    )
    assert shown.exit_code == 0, shown.output
    assert f"{ARCHIVE_WRITER_QUEUE}.dead-letter: 1 message(s)" in shown.output, shown.output
    [line] = [line for line in shown.output.splitlines() if line.strip().startswith("- ")]
    assert f"from {sender.user_id}" in line and "invalid message" in line, shown.output
