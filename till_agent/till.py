"""The till agent: a till's local recording plus its link to the tillsync cloud.

Recording (``sell``, ``close_day``, ``save_entity``, ``delete_entity``, ``save_setting``,
and the events of shared receipts: ``open_receipt``, ``add_line``, ``void_line``,
``move_to_table``, ``set_customer``, ``move_lines``, ``pay_receipt``) is local and works
without network; it only writes the store (record + outbox row in
one transaction). ``start_sync``/``stop_sync`` run the outbox relay in the background,
which also receives the master data of the other tills (``relay.feed``).
Account actions (``create_account``, ``sign_in``, ``sign_out``, ``set_sync_mode``)
are requests to the account service through the shared sign-up broker user.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from pathlib import Path
from typing import Iterable
from uuid import UUID

import aio_pika
from pydantic import Field, TypeAdapter

from shared.amqp import RpcClient, RpcTimeout
from shared.fiscal import PaymentType
from shared.models import (
    CustomerSet,
    LineAdded,
    LinesMoved,
    LineVoided,
    ReceiptOpened,
    ReceiptPaid,
    TableSet,
    TillReceiptEvent,
    AccountCreated,
    AccountReply,
    AccountRequest,
    Cashier,
    CreateAccount,
    CustomSyncFlags,
    ErrorReply,
    MasterDataEntity,
    PasswordResetRequested,
    PasswordResetStatusQuery,
    PasswordResetStatusReply,
    RequestPasswordReset,
    MasterDataRecord,
    SharedSetting,
    is_local_only_setting,
    Receipt,
    SetSyncMode,
    SignedIn,
    SignedOut,
    SignIn,
    SignOut,
    SyncMode,
    SyncModeSet,
    ZReport,
)
from shared.settings import BaseTillsyncSettings
from shared.topology import ACCOUNT_EXCHANGE, ACCOUNT_SERVICE_ROUTING_KEY, SIGNUP_USER, download_categories, hands_over_receipts
from till_agent.booking import SaleLine, closed_receipt, handover_line, z_report
from till_agent.handover import Notice, ReceiptView
from till_agent.relay import OutboxRelay, RelayStatus
from till_agent.store import Difference, TillStore, TillStoreError
from till_agent.sync_lock import SyncLock

DEFAULT_SIGNUP_PASSWORD = "tillsync-signup"


class TillSettings(BaseTillsyncSettings):
    """Settings of a till agent (environment ``TILLSYNC_*``).

    ``cloud_amqp_url``: where the till reaches the tillsync broker, with the shared
    sign-up user (it may only send account requests); after sign-in the till uses
    its own broker user on the same host and vhost.
    """

    cloud_amqp_url: str = f"amqp://{SIGNUP_USER}:{DEFAULT_SIGNUP_PASSWORD}@127.0.0.1:5672/tillsync"
    till_data_dir: Path = Path("till-data")
    request_timeout_seconds: float = Field(default=30.0, gt=0)


class AccountError(RuntimeError):
    """The account service refused a request; ``code`` and ``details`` say why."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(reply.message)
        self.code = reply.code
        self.details = reply.details
        self.retry_after_seconds = reply.retry_after_seconds


class CloudUnreachable(RuntimeError):
    """The tillsync cloud could not be reached; local recording goes on."""


class Till:
    """One till: its store, its relay and its requests to the account service."""

    def __init__(self, store: TillStore, settings: TillSettings) -> None:
        self.store = store
        self.settings = settings
        self.relay = OutboxRelay(store, settings.cloud_amqp_url)
        self._relay_stop: asyncio.Event | None = None
        self._relay_task: asyncio.Task[None] | None = None
        self._sync_lock = SyncLock(store.data_dir)

    # -- account requests ------------------------------------------------------

    async def _request(
        self, request: CreateAccount | SignIn | SignOut | SetSyncMode | RequestPasswordReset | PasswordResetStatusQuery
    ) -> AccountReply:
        try:
            connection = await aio_pika.connect(
                self.settings.cloud_amqp_url,
                client_properties={"connection_name": f"till {self.store.identity().serial_number} account"},
                timeout=10,
            )
        except Exception as exc:
            raise CloudUnreachable(f"cannot reach the tillsync cloud: {type(exc).__name__}: {exc}") from exc
        try:
            rpc = RpcClient(connection)
            await rpc.start()
            try:
                reply = await rpc.call(
                    ACCOUNT_EXCHANGE,
                    ACCOUNT_SERVICE_ROUTING_KEY,
                    AccountRequest(request=request),
                    TypeAdapter(AccountReply),
                    timeout_seconds=self.settings.request_timeout_seconds,
                )
            except RpcTimeout as exc:
                raise CloudUnreachable(f"the account service did not answer: {exc}") from exc
            except aio_pika.exceptions.DeliveryError as exc:
                raise CloudUnreachable("the account service is not set up on this broker (request unroutable)") from exc
        finally:
            await connection.close()
        if isinstance(reply.reply, ErrorReply):
            raise AccountError(reply.reply)
        return reply

    async def create_account(self, account_name: str, password: str) -> AccountCreated:
        """Create a server account. Raises ``AccountError`` (bad name, weak password, taken)."""
        reply = await self._request(CreateAccount(account_name=account_name, password=password))
        assert isinstance(reply.reply, AccountCreated)
        return reply.reply

    async def sign_in(self, account_name: str, password: str, replace: bool = False) -> SignedIn:
        """Sign this till in and keep its credentials.

        ``replace``: this installation replaces another one of the same serial number
        that is still signed in (a re-installed till). Raises ``AccountError`` for wrong
        credentials (or too many attempts) or another signed-in installation (code
        ``till_in_use``), and ``RuntimeError`` for another account than the one this
        till belongs to.
        """
        identity = self.store.identity()
        if identity.account_name and identity.account_name != account_name.strip().lower():
            raise RuntimeError(
                f"this till belongs to account {identity.account_name}; its receipts, Z-reports and numbering "
                "stay with that account. To use it for another account, set it up anew (`tillsync till init` "
                "in a new data directory)"
            )
        reply = await self._request(
            SignIn(
                account_name=account_name,
                password=password,
                serial_number=identity.serial_number,
                till_name=identity.till_name,
                installation_id=self.store.installation_id(),
                replace=replace,
            )
        )
        signed_in = reply.reply
        assert isinstance(signed_in, SignedIn)
        if identity.account_id and identity.account_id != signed_in.account_id:
            raise RuntimeError(f"this till belongs to account {identity.account_name}, not to {signed_in.account_name}")
        self.store.save_sign_in(signed_in)
        self.relay.wake()
        return signed_in

    async def request_password_reset(self, account_name: str, new_password: str) -> PasswordResetRequested:
        """"Forgot password": ask for ``new_password`` to become the account's password once
        a service technician approves it (target: 48 h). Every till of the account must be
        signed out; they keep recording meanwhile and upload after signing in with the new
        password. Raises ``AccountError`` (a till still signed in, each named; a weak
        password; an unknown account) and ``RuntimeError`` if this till is signed in or
        belongs to another account."""
        identity = self.store.identity()
        if identity.signed_in:
            raise RuntimeError("this till is signed in; sign it (and every other till of the account) out first")
        if identity.account_name and identity.account_name != account_name.strip().lower():
            raise RuntimeError(f"this till belongs to account {identity.account_name}")
        reply = await self._request(
            RequestPasswordReset(
                account_name=account_name,
                new_password=new_password,
                serial_number=identity.serial_number,
                till_name=identity.till_name,
                installation_id=self.store.installation_id(),
            )
        )
        assert isinstance(reply.reply, PasswordResetRequested)
        self.store.save_password_reset(reply.reply.request_id, reply.reply.verification_code)
        return reply.reply

    async def password_reset_status(self) -> PasswordResetStatusReply:
        """The status of the last reset request made on this till (approved, rejected with
        the reason, expired ...). Raises ``RuntimeError`` if this till made none and
        ``AccountError`` if the cloud does not know it (yet)."""
        last = self.store.password_reset()
        if last is None:
            raise RuntimeError("no password reset was requested on this till (`tillsync till forgot-password`)")
        reply = await self._request(PasswordResetStatusQuery(request_id=last[0], verification_code=last[1]))
        assert isinstance(reply.reply, PasswordResetStatusReply)
        return reply.reply

    def _auth(self) -> tuple[UUID, str]:
        identity = self.store.identity()
        if not identity.signed_in or identity.till_id is None or identity.broker_password is None:
            raise RuntimeError("this till is not signed in")
        return identity.till_id, identity.broker_password

    async def sign_out(self) -> int:
        """Sign out; return how many records are kept for upload after the next sign-in."""
        till_id, secret = self._auth()
        await self.relay.disconnect()
        reply = await self._request(SignOut(till_id=till_id, till_secret=secret))
        assert isinstance(reply.reply, SignedOut)
        self.store.save_sign_out()
        return self.store.outbox_counts()[0]

    async def set_sync_mode(
        self, sync_enabled: bool, mode: SyncMode, custom: CustomSyncFlags | None = None, force: bool = False
    ) -> SyncModeSet:
        """Store the sync switch and mode in the cloud (rebinding the till's queue) and locally.

        Leaving the receipt handover while events of this till's shared receipts (a
        payment above all) still wait for the router would have them refused: raises
        ``TillStoreError`` then, unless ``force``."""
        waiting = self.store.pending_receipt_events()
        if waiting and not force and not hands_over_receipts(mode, custom):
            paying = len(self.store.payments_awaiting_verdict())
            raise TillStoreError(
                f"{waiting} events of shared receipts ({paying} payment(s)) wait for the receipt handover router; in "
                f"mode {mode.value} they would be refused. Sync first (`tillsync till sync`), or switch anyway with --force"
            )
        till_id, secret = self._auth()
        reply = await self._request(
            SetSyncMode(till_id=till_id, till_secret=secret, sync_enabled=sync_enabled, sync_mode=mode, custom=custom)
        )
        assert isinstance(reply.reply, SyncModeSet)
        before = set(self.store.participating_categories())
        received_before = set(download_categories(*self.store.mode()))
        self.store.save_sync_mode(sync_enabled, mode.value, custom.model_dump_json() if custom else None)
        if {"receipts", "zreports"} & (set(download_categories(mode, custom)) - received_before):
            self.store.forget_shared_records_as_of()  # a kind received anew: its last 31 days come first
        # categories received from now on are caught up first; shared changes wait for that
        self.store.start_receiving(c for c in self.store.participating_categories() if c not in before)
        self.relay.feed.refresh()
        self.relay.wake()
        if not sync_enabled:
            await self.relay.disconnect()
        return reply.reply

    # -- local recording --------------------------------------------------------

    def sell(
        self,
        lines: list[SaleLine],
        *,
        payment_type: PaymentType,
        payment_name: str,
        cashier: Cashier,
        at: dt.datetime,
        business_day: dt.date | None = None,
        opened_at: dt.datetime | None = None,
    ) -> Receipt:
        """Book and close a receipt now (offline-safe); returns it with its receipt number."""
        receipt = self.store.book_receipt(
            lambda number: closed_receipt(
                receipt_number=number,
                lines=lines,
                payment_type=payment_type,
                payment_name=payment_name,
                cashier=cashier,
                opened_at=opened_at or at,
                closed_at=at,
                business_day=business_day or at.date(),
            ),
            at,
        )
        self.relay.wake()
        return receipt

    def close_day(self, business_day: dt.date, at: dt.datetime) -> ZReport:
        """Record the Z-report of ``business_day`` over the receipts not yet closed out.

        Raises ``TillStoreError`` for a business day more than one day after ``at`` or
        before the last Z-report's.
        """
        if business_day > at.date() + dt.timedelta(days=1):
            raise TillStoreError(f"business day {business_day} lies in the future")
        report = self.store.close_day(business_day, lambda z_nr, receipts: z_report(z_nr, business_day, receipts, at), at)
        self.relay.wake()
        return report

    def save_entity(self, entity: MasterDataEntity, at: dt.datetime) -> MasterDataRecord | None:
        """Record a new or changed master-data entity (based on the version the till knows);
        None if it equals the till's current value (nothing recorded).

        A ``SharedSetting`` with a local-only key (printer, display, default stock
        location) is refused by the model with ``ValueError``; use ``save_setting``.
        """
        saved = self.store.save_masterdata(entity.entity, entity.key, entity, at)
        self.relay.wake()
        return saved[1] if saved else None

    def delete_entity(self, entity_kind: str, entity_key: str, at: dt.datetime) -> MasterDataRecord:
        """Record the deletion (tombstone) of a master-data entity; ``TillStoreError`` if unknown
        or already deleted."""
        saved = self.store.save_masterdata(entity_kind, entity_key, None, at)
        assert saved is not None
        self.relay.wake()
        return saved[1]

    def import_entities(self, entities: Iterable[MasterDataEntity], at: dt.datetime) -> dict[str, int]:
        """Take a bulk import (e.g. an article list) without overwriting the account's data.

        Returns counts per outcome: ``created``, ``changed`` (only where the till does not
        share the kind), ``unchanged`` and ``listed`` (differs from the current value: see
        ``differences()``; ``resolve(keep="till")`` applies it). Rule: ``TillStore.import_masterdata``.
        """
        counts: dict[str, int] = {}
        with self.store.batch():
            for entity in entities:
                outcome = self.store.import_masterdata(entity, at)
                counts[outcome] = counts.get(outcome, 0) + 1
        self.relay.wake()
        return counts

    def save_setting(self, key: str, value: str, at: dt.datetime) -> bool:
        """Save a setting: local-only ones (``printer.*``, ``display.*``,
        ``stock.default_location``) stay on this till; any other is a shared setting.
        Returns True if the setting is shared (uploaded) and False if it stays local."""
        if key != key.strip() or not key:
            raise ValueError(f"setting key {key!r} must not be empty or start or end with whitespace")
        if is_local_only_setting(key):
            self.store.set_local_setting(key, value)
            return False
        self.save_entity(SharedSetting(setting_key=key, value=value), at)
        return True

    # -- shared receipts (receipt handover) ----------------------------------------

    def open_receipt(
        self, *, cashier: Cashier, at: dt.datetime, table_nr: str | None = None, business_day: dt.date | None = None
    ) -> UUID:
        """Open a shared receipt (for ``table_nr``, a table's customer number, or none);
        returns its ``receipt_id``. Works offline; the router decides the table race
        (see ``till_agent.handover``). Raises ``TillStoreError`` if this till's mode does
        not hand over receipts or it knows an open receipt for the table."""
        receipt_id = uuid.uuid4()
        event = ReceiptOpened(table_nr=table_nr, business_day=business_day or at.date(), opened_at=at, cashier=cashier)
        self.store.record_receipt_event(receipt_id, event, at)
        self.relay.wake()
        return receipt_id

    def add_line(self, receipt_id: UUID, line: SaleLine, at: dt.datetime) -> UUID:
        """Book ``line`` onto an open shared receipt; returns the new line's ``line_id``.
        Raises ``TillStoreError`` for a closed, unknown or refused receipt."""
        added = handover_line(line)
        self._receipt_event(receipt_id, LineAdded(line=added), at)
        return added.line_id

    def void_line(self, receipt_id: UUID, line_id: UUID, at: dt.datetime) -> UUID:
        """Take a standing line off an open shared receipt; returns the event's record id."""
        return self._receipt_event(receipt_id, LineVoided(line_id=line_id), at)

    def move_to_table(self, receipt_id: UUID, table_nr: str | None, at: dt.datetime) -> UUID:
        """Move an open shared receipt to another table (None: to no table)."""
        return self._receipt_event(receipt_id, TableSet(table_nr=table_nr), at)

    def set_customer(self, receipt_id: UUID, customer_nr: str | None, at: dt.datetime) -> UUID:
        """Book an open shared receipt for a customer (None: for none)."""
        return self._receipt_event(receipt_id, CustomerSet(customer_nr=customer_nr), at)

    def move_lines(self, receipt_id: UUID, line_ids: Iterable[UUID], to_receipt_id: UUID, at: dt.datetime) -> UUID:
        """Split: move standing lines to another open shared receipt."""
        return self._receipt_event(receipt_id, LinesMoved(line_ids=tuple(line_ids), to_receipt_id=to_receipt_id), at)

    def pay_receipt(self, receipt_id: UUID, payment_type: PaymentType, payment_name: str, at: dt.datetime) -> ReceiptPaid:
        """Pay the whole shared receipt as this till sees it (optimistic): the router
        accepts it only if no event arrived since; then this till records the closed
        receipt under its next receipt number. Raises ``TillStoreError`` for a receipt
        that is closed (paid on another till), unknown or being paid here already."""
        paid = self.store.payment_for(receipt_id, payment_type, payment_name, at)
        self._receipt_event(receipt_id, paid, at)
        return paid

    def _receipt_event(self, receipt_id: UUID, event: TillReceiptEvent, at: dt.datetime) -> UUID:
        record_id = self.store.record_receipt_event(receipt_id, event, at)
        self.relay.wake()
        return record_id

    def receipt(self, receipt_id: UUID) -> ReceiptView:
        """A shared receipt as this till shows it; ``TillStoreError`` if unknown here."""
        return self.store.shared_receipt(receipt_id)

    def open_receipts(self) -> list[ReceiptView]:
        """The open shared receipts this till knows, oldest first."""
        return self.store.shared_receipts("open")

    def notices(self, since_id: int = 0) -> list[Notice]:
        """What the router refused of this till's events (and what the till did about it)."""
        return self.store.notices(since_id)

    def differences(self) -> list[Difference]:
        """Master data whose till value differs from the cloud's, awaiting the owner's choice."""
        return self.store.differences()

    def resolve(self, keep: str, at: dt.datetime, entity_kind: str | None = None, entity_key: str | None = None) -> int:
        """Settle listed differences (one, or all if no entity is named): ``keep`` is
        ``"cloud"`` or ``"till"`` (upload the till's value as a new change). Returns how
        many were settled. Raises ``TillStoreError`` for an entity that is not listed."""
        if (entity_kind is None) != (entity_key is None):
            raise TillStoreError("name both the kind and the key of the entity, or neither for all")
        targets = [(entity_kind, entity_key)] if entity_kind else [(d.entity_kind, d.entity_key) for d in self.differences()]
        for kind, key in targets:
            self.store.resolve_difference(kind, key, keep, at)  # type: ignore[arg-type]
        self.relay.wake()
        return len(targets)

    # -- sync --------------------------------------------------------------------

    def start_sync(self) -> None:
        """Run the outbox relay in the background (no-op if running).

        Takes the store's sync lock first (``till_agent.sync_lock``): raises
        ``StoreInUse``, naming the other process, if another process syncs this till."""
        if self._relay_task is not None and not self._relay_task.done():
            return
        self._sync_lock.acquire()
        self._relay_stop = asyncio.Event()
        self._relay_task = asyncio.create_task(self.relay.run(self._relay_stop), name="outbox-relay")

    async def stop_sync(self) -> None:
        """Stop the relay and drop its connection: the till is offline from now on."""
        if self._relay_stop is not None:
            self._relay_stop.set()
        await self.relay.disconnect()
        try:
            if self._relay_task is not None:
                await self._relay_task
        finally:
            self._relay_task = None
            self._sync_lock.release()

    @property
    def syncing(self) -> bool:
        return self._relay_task is not None and not self._relay_task.done()

    def status(self) -> RelayStatus:
        return self.relay.status()

    def close(self) -> None:
        self._sync_lock.release()
        self.store.close()
