"""Wire models: one pydantic v2 model per message kind, the single source of truth.

Every model forbids unknown fields and is immutable. Messages that travel on their
own carry ``schema_version``. Money is integer cents, quantities are ``Decimal`` with
3 places, times are timezone-aware (serialised as ISO 8601 with offset). Fiscal field
names follow DSFinV-K 2.4; the DSFinV-K column is named in each field's description.

Message kinds:
- account requests and replies (request/reply over RabbitMQ, ``AccountRequest`` /
  ``AccountReply``),
- uploads from a till (``Upload``) whose ``record`` is a master-data change
  (``MasterDataRecord``), a receipt state (``Receipt``), a Z-report (``ZReport``) or
  an event of a shared open receipt (``ReceiptEvent``),
- a till's request to catch up on the master-data feed (``CatchUpRequest``) or on the
  shared receipts (``ReceiptCatchUpRequest``),
- messages to a till on ``till.download`` (``Download``): feed entries, catch-up pages,
  the verdicts on its own master-data changes and receipt events, the receipt events
  the router accepted, receipt snapshots, and other tills' receipts and Z-reports.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal, Union
from uuid import UUID

from pydantic import (
    AfterValidator,
    BeforeValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    field_serializer,
    model_validator,
)

from shared.chain import chain_hash
from shared.fiscal import QUANTITY_STEP, BusinessCase, PaymentType, VatKey, line_amount

SCHEMA_VERSION = 1


class WireModel(BaseModel):
    """Base of every wire model: unknown fields are an error; instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


MAX_CENTS = 10**11  # 1 billion euros: far beyond any till, far inside JSON's exact integers (2**53)
MAX_QUANTITY = Decimal(1_000_000)
MAX_COUNTER = 2**53 - 1  # sequence numbers stay exact in every JSON reader

Cents = Annotated[StrictInt, Field(ge=-MAX_CENTS, le=MAX_CENTS, description="amount in integer cents")]
# Sums (receipt totals, VAT per key, Z-report totals) may add up many amounts; they only
# have to stay exact JSON integers.
Total = Annotated[StrictInt, Field(ge=-MAX_COUNTER, le=MAX_COUNTER, description="sum in integer cents")]
Quantity = Annotated[
    Decimal,
    Field(
        max_digits=15,
        decimal_places=3,
        ge=-MAX_QUANTITY,
        le=MAX_QUANTITY,
        allow_inf_nan=False,
        description="quantity, 3 decimal places",
    ),
    AfterValidator(lambda q: q.quantize(QUANTITY_STEP)),
]
Counter = Annotated[StrictInt, Field(ge=1, le=MAX_COUNTER)]  # 1, 2, 3 ...
Count = Annotated[StrictInt, Field(ge=0, le=MAX_COUNTER)]
_CONTROL_CHARACTERS = {chr(c) for c in range(0x20) if chr(c) not in "\t\n\r"} | {"\x7f"}


def printable(text: str) -> str:
    """Return ``text``; raises ``ValueError`` if it has control characters (NUL and the like),
    which can be neither archived (PostgreSQL refuses NUL) nor printed."""
    if text.isprintable():  # the common case, checked in C
        return text
    bad = sorted({f"U+{ord(c):04X}" for c in text if c in _CONTROL_CHARACTERS})
    if bad:
        raise ValueError(f"contains control characters ({', '.join(bad)})")
    return text


# Length and pattern are checked first, in pydantic's core, then ``printable``.
def single_line(text: str) -> str:
    """Return ``text``; raises ``ValueError`` for control characters (tab and line breaks
    too) and invisible format characters (e.g. U+202E right-to-left override, U+200B zero
    width space), which make names and keys look like others."""
    if text.isprintable() and text.isascii():  # the common case, checked in C
        return text
    bad = sorted({f"U+{ord(c):04X}" for c in text if unicodedata.category(c) in ("Cc", "Cf")})
    if bad:
        raise ValueError(f"contains control characters or invisible characters ({', '.join(bad)})")
    return text


def not_blank(text: str) -> str:
    """Return ``text``; raises ``ValueError`` if it is only whitespace."""
    if not text.strip():
        raise ValueError("must not be blank")
    return text


def trimmed(text: str) -> str:
    """Return ``text``; raises ``ValueError`` if it starts or ends with whitespace."""
    if text != text.strip():
        raise ValueError("must not start or end with whitespace")
    return text


Text = Annotated[str, AfterValidator(printable)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(single_line)]
Key = Annotated[str, StringConstraints(min_length=1, max_length=100), AfterValidator(single_line), AfterValidator(trimmed)]


def _reveal(self: Any, secret: SecretStr) -> str:
    """Serialise a secret in clear text, only when dumping JSON for the wire."""
    return secret.get_secret_value()


# ---------------------------------------------------------------------------
# Sync modes (DESIGN.md §1.3)


class SyncMode(StrEnum):
    """A till's sync mode; ``custom`` carries explicit per-category flags."""

    ARCHIVE = "archive"  # Kassenarchiv
    ARCHIVE_MASTERDATA = "archive_masterdata"  # Kassenarchiv mit Stammdatenabgleich
    ARCHIVE_MASTERDATA_RECEIPTS = "archive_masterdata_receipts"  # ... und Belegübergabe
    CUSTOM = "custom"  # Individuell


class CustomSyncFlags(WireModel):
    """Per-category switches of the ``custom`` mode (*Individuell*); JSON true/false only."""

    upload_masterdata: StrictBool = True
    upload_receipts: StrictBool = True
    upload_zreports: StrictBool = True
    download_articles: StrictBool = False
    download_customers: StrictBool = False
    download_cashiers: StrictBool = False
    download_other_masterdata: StrictBool = False
    download_receipts: StrictBool = False
    download_zreports: StrictBool = False


# ---------------------------------------------------------------------------
# Master data (Stammdaten)


class Article(WireModel):
    """An article (DSFinV-K ``ARTIKELNUMMER``, ``ARTIKELTEXT``); price is gross cents."""

    entity: Literal["article"] = "article"
    article_nr: Key
    text: Name
    unit_price: Cents = Field(description="gross unit price in cents (STK_BR)")
    vat_key: VatKey
    article_group_nr: Key | None = None

    @property
    def key(self) -> str:
        return self.article_nr


class ArticleGroup(WireModel):
    """A group of articles (*Warengruppe*, DSFinV-K ``WARENGR_ID``)."""

    entity: Literal["article_group"] = "article_group"
    group_nr: Key
    name: Name

    @property
    def key(self) -> str:
        return self.group_nr


class Customer(WireModel):
    """A customer; restaurant tables are customers with ``is_table``."""

    entity: Literal["customer"] = "customer"
    customer_nr: Key
    name: Name
    is_table: bool = False

    @property
    def key(self) -> str:
        return self.customer_nr


class CashierUser(WireModel):
    """A cashier (*Bediener*, DSFinV-K ``BEDIENER_ID`` / ``BEDIENER_NAME``)."""

    entity: Literal["cashier"] = "cashier"
    cashier_id: Key
    name: Name

    @property
    def key(self) -> str:
        return self.cashier_id


class Discount(WireModel):
    """A discount: either ``percent`` or a fixed ``amount`` in cents, not both."""

    entity: Literal["discount"] = "discount"
    discount_nr: Key
    name: Name
    percent: Annotated[Decimal, Field(gt=0, le=100, decimal_places=2)] | None = None
    amount: Cents | None = None

    @model_validator(mode="after")
    def _one_of_percent_or_amount(self) -> Discount:
        if (self.percent is None) == (self.amount is None):
            raise ValueError("a discount has exactly one of percent or amount")
        return self

    @property
    def key(self) -> str:
        return self.discount_nr


class PaymentTypeEntity(WireModel):
    """A payment type of the till (DSFinV-K ``ZAHLART_TYP`` and ``ZAHLART_NAME``)."""

    entity: Literal["payment_type"] = "payment_type"
    payment_type_nr: Key
    name: Name
    payment_type: PaymentType

    @property
    def key(self) -> str:
        return self.payment_type_nr


class VatRate(WireModel):
    """A VAT rate for a DSFinV-K ``UST_SCHLUESSEL`` (``UST_SATZ`` in percent)."""

    entity: Literal["vat_rate"] = "vat_rate"
    vat_key: VatKey
    percent: Annotated[Decimal, Field(ge=0, le=100, decimal_places=2)]
    description: Name

    @property
    def key(self) -> str:
        return str(int(self.vat_key))


# Settings that describe one till's own hardware and place never leave the till
# (DESIGN.md §1.3): the till agent keeps them local and the cloud refuses them.
LOCAL_ONLY_SETTING_PREFIXES: tuple[str, ...] = ("printer.", "display.")
LOCAL_ONLY_SETTING_KEYS: tuple[str, ...] = ("stock.default_location",)


def is_local_only_setting(setting_key: str) -> bool:
    """True for the printer setup (``printer.*``), display settings (``display.*``) and the
    default stock location (``stock.default_location``), in any case: settings that stay on one till."""
    key = setting_key.strip().lower()
    return key in LOCAL_ONLY_SETTING_KEYS or any(key.startswith(p) for p in LOCAL_ONLY_SETTING_PREFIXES)


class SharedSetting(WireModel):
    """A setting shared by all tills of an account (e.g. receipt footer text).

    Local-only settings (``is_local_only_setting``) are refused here, so no till can
    upload one and no service accepts one.
    """

    entity: Literal["shared_setting"] = "shared_setting"
    setting_key: Key
    value: Annotated[Text, Field(max_length=10_000)]

    @model_validator(mode="after")
    def _not_local_only(self) -> SharedSetting:
        if is_local_only_setting(self.setting_key):
            raise ValueError(
                f"setting {self.setting_key!r} is local to one till (printer, display, default stock location) "
                "and is never uploaded"
            )
        return self

    @property
    def key(self) -> str:
        return self.setting_key


MasterDataEntity = Annotated[
    Union[Article, ArticleGroup, Customer, CashierUser, Discount, PaymentTypeEntity, VatRate, SharedSetting],
    Field(discriminator="entity"),
]
EntityKind = Literal[
    "article", "article_group", "customer", "cashier", "discount", "payment_type", "vat_rate", "shared_setting"
]
ENTITY_KINDS: tuple[EntityKind, ...] = (
    "article", "article_group", "customer", "cashier", "discount", "payment_type", "vat_rate", "shared_setting"
)
ENTITY_ADAPTER: TypeAdapter[Any] = TypeAdapter(MasterDataEntity)

# The download categories of master data (the switches of the custom mode, DESIGN.md §1.3).
MasterDataCategory = Literal["articles", "customers", "cashiers", "masterdata_other"]
MASTERDATA_CATEGORIES: tuple[MasterDataCategory, ...] = ("articles", "customers", "cashiers", "masterdata_other")
ENTITY_CATEGORY: dict[str, MasterDataCategory] = {
    "article": "articles",
    "article_group": "articles",
    "customer": "customers",
    "cashier": "cashiers",
    "discount": "masterdata_other",
    "payment_type": "masterdata_other",
    "vat_rate": "masterdata_other",
    "shared_setting": "masterdata_other",
}


class MasterDataRecord(WireModel):
    """One master-data version: an upsert of ``data`` or a deletion (tombstone).

    ``base_version`` is the cloud version the change was based on (``None`` for a
    new entity); ``base_record_id`` names the till's own earlier change it builds on
    while that one has no verdict yet. The cloud accepts the change only if its base
    is still the entity's current version (DESIGN.md §3, optimistic concurrency).
    ``shared``: the till takes part in master-data sync for this kind and offers the
    change to the account's shared master data; ``False``: archive only.
    """

    kind: Literal["masterdata"] = "masterdata"
    entity_kind: EntityKind
    entity_key: Key
    base_version: Count | None = None
    base_record_id: UUID | None = None
    shared: bool = False
    deleted: bool = False
    data: MasterDataEntity | None = None

    @property
    def category(self) -> MasterDataCategory:
        return ENTITY_CATEGORY[self.entity_kind]

    @model_validator(mode="after")
    def _data_matches(self) -> MasterDataRecord:
        if self.deleted:
            if self.data is not None:
                raise ValueError("a deletion carries no data")
            return self
        if self.data is None:
            raise ValueError("data is required unless deleted")
        if self.data.entity != self.entity_kind:
            raise ValueError(f"data is a {self.data.entity}, entity_kind says {self.entity_kind}")
        if self.data.key != self.entity_key:
            raise ValueError(f"entity_key {self.entity_key!r} differs from the data's key {self.data.key!r}")
        return self


# ---------------------------------------------------------------------------
# Receipts (Belege) and Z-reports (Kassenabschlüsse)


class LineFields(WireModel):
    """What every booked line has (DSFinV-K lines.csv). ``amount`` = quantity × unit_price, half up."""

    article_nr: Key = Field(description="ARTIKELNUMMER")
    text: Name = Field(description="ARTIKELTEXT")
    quantity: Quantity = Field(description="MENGE; negative for a return")
    unit_price: Cents = Field(description="STK_BR, gross unit price in cents")
    amount: Cents = Field(description="gross line amount in cents")
    vat_key: VatKey = Field(description="UST_SCHLUESSEL")

    def _label(self) -> str:
        return "line"

    @model_validator(mode="after")
    def _amount_matches(self) -> LineFields:
        if self.quantity == 0:
            raise ValueError(f"{self._label()}: quantity must not be 0")
        expected = line_amount(self.quantity, self.unit_price)
        if self.amount != expected:
            raise ValueError(
                f"{self._label()}: amount {self.amount} != quantity {self.quantity} × unit_price "
                f"{self.unit_price} = {expected}"
            )
        return self


class ReceiptLine(LineFields):
    """One line of a receipt (DSFinV-K lines.csv), numbered ``line_no`` (POS_ZEILE).

    ``terminal_id``: the till that entered the line (POS_TERMINAL_ID) when the receipt
    was shared (receipt handover); None: the till that recorded the receipt.
    """

    line_no: Counter = Field(description="POS_ZEILE")
    terminal_id: UUID | None = Field(default=None, description="POS_TERMINAL_ID, the till that entered the line")

    def _label(self) -> str:
        return f"line {self.line_no}"


class VatAmount(WireModel):
    """Gross, net and VAT in cents for one VAT key (DSFinV-K ``BRUTTO``/``NETTO``/``UST``)."""

    vat_key: VatKey
    gross: Total
    net: Total
    vat: Total

    @model_validator(mode="after")
    def _net_plus_vat(self) -> VatAmount:
        if self.net + self.vat != self.gross:
            raise ValueError(f"VAT key {int(self.vat_key)}: net {self.net} + vat {self.vat} != gross {self.gross}")
        return self


class Payment(WireModel):
    """One payment (DSFinV-K ``ZAHLART_TYP``, ``ZAHLART_NAME``, ``ZAHLART_BETRAG`` in cents)."""

    payment_type: PaymentType
    payment_name: Name
    amount: Total


class Cashier(WireModel):
    """The cashier who booked a receipt (``BEDIENER_ID``, ``BEDIENER_NAME``)."""

    cashier_id: Key
    name: Name


class TseData(WireModel):
    """Optional data of the technical security system (DSFinV-K transactions_tse.csv)."""

    tse_serial: Name = Field(description="TSE_ID / serial")
    transaction_number: Count = Field(description="TSE_TANR")
    signature_counter: Count = Field(description="TSE_TA_SIGZ")
    start: AwareDatetime = Field(description="TSE_TA_START")
    end: AwareDatetime = Field(description="TSE_TA_ENDE")
    signature: Annotated[Text, Field(min_length=1, max_length=1000)] = Field(description="TSE_TA_SIG")


def _check_vat_breakdown(lines_by_key: dict[VatKey, int], vat: tuple[VatAmount, ...], what: str) -> None:
    given = {v.vat_key: v.gross for v in vat}
    if len(given) != len(vat):
        raise ValueError(f"{what}: a VAT key appears twice in the VAT breakdown")
    expected = {k: g for k, g in lines_by_key.items()}
    if given != expected:
        raise ValueError(f"{what}: VAT breakdown {given} does not match the lines {expected}")


class Receipt(WireModel):
    """One state of a receipt (*Beleg*): ``open`` while booked, ``closed`` when paid.

    Rules checked here: line numbers are unique; the VAT breakdown equals the sums of
    the lines per VAT key; ``total`` equals the sum of the lines; a closed receipt
    has a receipt number, a close time and payments that add up to ``total``.
    """

    kind: Literal["receipt"] = "receipt"
    receipt_id: UUID = Field(description="the receipt across its states")
    receipt_number: Counter | None = Field(default=None, description="BON_NR, per till")
    receipt_type: Literal["Beleg", "AVBelegabbruch", "AVSonstige"] = Field(default="Beleg", description="BON_TYP")
    business_case: BusinessCase = Field(default=BusinessCase.SALE, description="GV_TYP")
    status: Literal["open", "closed"]
    business_day: dt.date
    opened_at: AwareDatetime = Field(description="BON_START")
    closed_at: AwareDatetime | None = Field(default=None, description="BON_ENDE")
    cashier: Cashier
    lines: tuple[ReceiptLine, ...]
    vat: tuple[VatAmount, ...]
    total: Total = Field(description="gross total in cents")
    payments: tuple[Payment, ...] = ()
    tse: TseData | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Receipt:
        numbers = [line.line_no for line in self.lines]
        if len(set(numbers)) != len(numbers):
            raise ValueError("line numbers repeat")
        by_key: dict[VatKey, int] = {}
        for line in self.lines:
            by_key[line.vat_key] = by_key.get(line.vat_key, 0) + line.amount
        _check_vat_breakdown(by_key, self.vat, "receipt")
        lines_total = sum(line.amount for line in self.lines)
        if self.total != lines_total:
            raise ValueError(f"total {self.total} != sum of the lines {lines_total}")
        if self.status == "closed":
            if self.receipt_number is None or self.closed_at is None:
                raise ValueError("a closed receipt needs receipt_number and closed_at")
            paid = sum(p.amount for p in self.payments)
            if paid != self.total:
                raise ValueError(f"payments {paid} != total {self.total}")
        return self


class PaymentTotal(WireModel):
    """Z-report total of one payment type in cents."""

    payment_type: PaymentType
    payment_name: Name
    amount: Total


class BusinessCaseTotal(WireModel):
    """Z-report total of one business case and VAT key (DSFinV-K Z_GV_TYP)."""

    business_case: BusinessCase
    vat_key: VatKey
    gross: Total


class ZReport(WireModel):
    """End-of-day closing of one till (*Kassenabschluss*, DSFinV-K ``Z_NR``, ``Z_BUCHUNGSTAG``).

    Rules checked here: the VAT totals, payment totals and business-case totals each
    add up to ``total``; receipt numbers are given iff ``receipt_count`` > 0.
    """

    kind: Literal["zreport"] = "zreport"
    z_nr: Counter = Field(description="Z_NR")
    business_day: dt.date = Field(description="Z_BUCHUNGSTAG")
    created_at: AwareDatetime = Field(description="Z_ERSTELLUNG")
    receipt_count: Count
    first_receipt_number: Counter | None = None
    last_receipt_number: Counter | None = None
    totals_by_vat: tuple[VatAmount, ...]
    totals_by_payment_type: tuple[PaymentTotal, ...]
    totals_by_business_case: tuple[BusinessCaseTotal, ...]
    total: Total

    @model_validator(mode="after")
    def _consistent(self) -> ZReport:
        for name, parts in (
            ("totals_by_vat", [v.gross for v in self.totals_by_vat]),
            ("totals_by_payment_type", [p.amount for p in self.totals_by_payment_type]),
            ("totals_by_business_case", [b.gross for b in self.totals_by_business_case]),
        ):
            if sum(parts) != self.total:
                raise ValueError(f"{name} add up to {sum(parts)}, total is {self.total}")
        has_numbers = self.first_receipt_number is not None and self.last_receipt_number is not None
        if (self.receipt_count > 0) != has_numbers:
            raise ValueError("first/last receipt number are given exactly when receipt_count > 0")
        if has_numbers and self.first_receipt_number > self.last_receipt_number:  # type: ignore[operator]
            raise ValueError("first_receipt_number > last_receipt_number")
        return self


# ---------------------------------------------------------------------------
# Receipt handover: open receipts shared by the receipt-mode tills of an account
#
# An open receipt (e.g. a restaurant table) is a sequence of events. Any till whose
# mode hands over receipts records events; the receipt handover router orders them:
# each accepted event gets the receipt's next ``position`` (gapless from 1) and is
# broadcast to those tills. Payment is optimistic (``ReceiptPaid.seen_position``); a
# paid receipt is closed and immutable. Every event is also a record in the archive,
# accepted or not.


# A table's number or name, in Unicode normal form NFKC: "Café" typed either way, or a
# full-width "９", names the same table.
def nfkc(value: Any) -> Any:
    """A text in Unicode normal form NFKC (anything else as it is, for the type checks)."""
    return unicodedata.normalize("NFKC", value) if isinstance(value, str) else value


# Characters that show as nothing (variation selectors, fillers, the combining grapheme
# joiner ...): "5" with one of them would look like table 5 but be another table.
_BLANK_LOOKING = frozenset(
    [0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x2800, 0x3164, 0xFFA0, *range(0x180B, 0x1810), *range(0xFE00, 0xFE10),
     *range(0xE0100, 0xE01F0)]
)


def visible(text: str) -> str:
    """Return ``text``; raises ``ValueError`` for characters that show as nothing or a
    combining mark at the start (they make a name look like another)."""
    bad = sorted({f"U+{ord(c):04X}" for c in text if ord(c) in _BLANK_LOOKING})
    if bad:
        raise ValueError(f"contains characters that show as nothing ({', '.join(bad)})")
    if text and unicodedata.category(text[0]).startswith("M"):
        raise ValueError("must not start with a combining mark")
    return text


# normalised first, so the key rules (length, no surrounding whitespace ...) hold for what is stored
TableNr = Annotated[Key, BeforeValidator(nfkc), AfterValidator(visible)]


class HandoverLine(LineFields):
    """A line of an open receipt; ``line_id`` is made by the till that enters it."""

    line_id: UUID

    def _label(self) -> str:
        return f"line {self.line_id}"


class ReceiptOpened(WireModel):
    """First event of a shared receipt; ``table_nr`` (a customer with ``is_table``) or None.
    An account has at most one open receipt per table."""

    type: Literal["opened"] = "opened"
    table_nr: TableNr | None = None
    business_day: dt.date
    opened_at: AwareDatetime = Field(description="BON_START")
    cashier: Cashier


class LineAdded(WireModel):
    """A line booked onto the receipt. ``expected_table_nr``: the line is meant for the
    receipt of that table (a line booked again after a lost table race); it is refused
    (``table_changed``) if the receipt has moved to another table meanwhile."""

    type: Literal["line_added"] = "line_added"
    line: HandoverLine
    expected_table_nr: TableNr | None = None


class LineVoided(WireModel):
    """A standing line of the receipt taken off again (refers to the line it voids)."""

    type: Literal["line_voided"] = "line_voided"
    line_id: UUID


class TableSet(WireModel):
    """The receipt moves to another table (None: to no table)."""

    type: Literal["table_set"] = "table_set"
    table_nr: TableNr | None


class CustomerSet(WireModel):
    """The receipt is booked for a customer (None: for none)."""

    type: Literal["customer_set"] = "customer_set"
    customer_nr: Key | None


class LinesMoved(WireModel):
    """Split: standing lines move to another open receipt of the account. The router
    appends ``LinesMovedIn`` (same ``record_id``) to the target receipt."""

    type: Literal["lines_moved"] = "lines_moved"
    line_ids: tuple[UUID, ...] = Field(min_length=1, max_length=1000)
    to_receipt_id: UUID

    @model_validator(mode="after")
    def _distinct(self) -> LinesMoved:
        if len(set(self.line_ids)) != len(self.line_ids):
            raise ValueError("a line is named twice")
        return self


class ReceiptPaid(WireModel):
    """Payment, closing the receipt (optimistic). ``seen_position``: the last accepted
    position the payer had applied; ``counted``: the payer's own events on the receipt
    still on their way, which it counted in (in order). Accepted only if the events
    after ``seen_position`` are exactly those (no other till's event came in, none of
    them was refused) and the payments add up to the sum of the standing lines,
    ``total`` in cents."""

    type: Literal["paid"] = "paid"
    seen_position: Count
    counted: tuple[UUID, ...] = Field(default=(), max_length=1000)
    total: Total
    payments: tuple[Payment, ...] = Field(min_length=1, max_length=20)
    closed_at: AwareDatetime = Field(description="BON_ENDE")

    @model_validator(mode="after")
    def _payments_add_up(self) -> ReceiptPaid:
        paid = sum(p.amount for p in self.payments)
        if paid != self.total:
            raise ValueError(f"payments {paid} != total {self.total}")
        return self


class StandingLine(WireModel):
    """A line with the till that entered it (lines keep their till when they move)."""

    line: HandoverLine
    till_id: UUID
    till_name: str = ""


class LinesMovedIn(WireModel):
    """Made by the router on the target receipt of ``LinesMoved``; never uploaded."""

    type: Literal["lines_moved_in"] = "lines_moved_in"
    from_receipt_id: UUID
    lines: tuple[StandingLine, ...] = Field(min_length=1)


TillReceiptEvent = Annotated[
    Union[ReceiptOpened, LineAdded, LineVoided, TableSet, CustomerSet, LinesMoved, ReceiptPaid],
    Field(discriminator="type"),
]
ReceiptEventType = Literal[
    "opened", "line_added", "line_voided", "table_set", "customer_set", "lines_moved", "paid", "lines_moved_in"
]


class ReceiptEvent(WireModel):
    """A record: one event of the shared open receipt ``receipt_id``, made on a till."""

    kind: Literal["receipt_event"] = "receipt_event"
    receipt_id: UUID
    event: TillReceiptEvent


RecordBody = Annotated[Union[MasterDataRecord, Receipt, ZReport, ReceiptEvent], Field(discriminator="kind")]
RecordKind = Literal["masterdata", "receipt", "zreport", "receipt_event"]
RECORD_KINDS: tuple[RecordKind, ...] = ("masterdata", "receipt", "zreport", "receipt_event")


Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class Upload(WireModel):
    """A record uploaded by a till to the ``till.upload`` exchange.

    ``record_id`` (made by the till) is the idempotency key; ``till_seq`` is gapless
    per till from 1. The routing key is ``<account_id>.<till_id>.<record.kind>``
    and the AMQP ``user_id`` is the till's broker user.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    record_id: UUID
    account_id: UUID
    till_id: UUID
    till_seq: Counter
    recorded_at: AwareDatetime
    record: RecordBody
    prev_hash: Sha256Hex | None = Field(
        description="chain_hash of the till's record at till_seq - 1; None where the till's chain starts"
    )
    chain_hash: Sha256Hex = Field(description="SHA-256 over prev_hash and this upload's canonical JSON (shared/chain.py)")

    @classmethod
    def sealed(cls, prev_hash: str | None, **fields: Any) -> Upload:
        """An upload of ``fields`` chained to ``prev_hash`` (its ``chain_hash`` computed here).

        Raises ``pydantic.ValidationError`` for invalid fields.
        """
        unsealed = cls.model_validate({**fields, "prev_hash": prev_hash, "chain_hash": "0" * 64})
        return unsealed.model_copy(update={"chain_hash": chain_hash(prev_hash, unsealed.model_dump(mode="json"))})


UPLOAD_ADAPTER: TypeAdapter[Upload] = TypeAdapter(Upload)


# ---------------------------------------------------------------------------
# Master-data feed: catch-up requests (till → cloud) and downloads (cloud → till)


class EntityState(WireModel):
    """The cloud's state of one master-data entity at one version.

    ``feed_seq``: position of the change that made this version in the account's feed;
    ``record_id``/``till_id``: the uploaded record and the till it came from.
    """

    entity_kind: EntityKind
    entity_key: Key
    version: Counter
    deleted: bool
    data: MasterDataEntity | None
    feed_seq: Counter
    record_id: UUID
    till_id: UUID

    @model_validator(mode="after")
    def _data_iff_live(self) -> EntityState:
        if self.deleted != (self.data is None):
            raise ValueError("an entity state has data exactly when it is not deleted")
        return self

    @property
    def category(self) -> MasterDataCategory:
        return ENTITY_CATEGORY[self.entity_kind]


class FeedEntry(WireModel):
    """One accepted master-data change, broadcast to the tills whose mode receives it.

    ``prev_feed_seq`` is the feed position of the previous change of the same category
    in this account (0 for the first): a till that has applied up to ``prev_feed_seq``
    of that category applies this entry next; any other gap means it missed entries.
    """

    type: Literal["feed_entry"] = "feed_entry"
    category: MasterDataCategory
    prev_feed_seq: Count
    entity: EntityState


class CatchUpRequest(WireModel):
    """A till asks for every master-data change after ``since[category]`` (a feed_seq).

    Published on ``till.upload`` with routing key ``<account_id>.<till_id>.catchup``.
    The answer is the verdicts on ``verdicts_for`` already judged (a verdict published
    while the till's queue was unbound is not lost), then a series of ``CatchUpPage``
    messages per category on the till's queue.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: UUID
    account_id: UUID
    till_id: UUID
    since: dict[MasterDataCategory, Count] = Field(min_length=1)
    verdicts_for: tuple[UUID, ...] = Field(
        default=(),
        max_length=1000,
        description="the till's uploaded changes still without a verdict; the cloud sends the verdicts again",
    )


class CatchUpPage(WireModel):
    """One page of a catch-up, compacted: the latest state of each entity changed after
    the request's ``since`` (tombstones included), in feed order.

    ``total_entries`` is the number of entries the whole catch-up of this category
    sends (for progress); the last page has ``done`` and ``head_feed_seq``, the feed
    position the till has caught up to in this category.
    """

    type: Literal["catchup_page"] = "catchup_page"
    request_id: UUID
    category: MasterDataCategory
    page: Counter
    total_entries: Count
    entries: tuple[EntityState, ...]
    done: bool
    head_feed_seq: Count


class MasterDataAccepted(WireModel):
    """Verdict to the originating till: its change ``record_id`` is now ``version``."""

    type: Literal["masterdata_accepted"] = "masterdata_accepted"
    record_id: UUID
    entity: EntityState


class MasterDataConflict(WireModel):
    """Verdict to the originating till: its change was not applied.

    ``current`` is the cloud's current state (``None`` if the entity does not exist);
    ``reason`` says why (based on an older version, or a new entity whose key exists).
    The record stays in the archive.
    """

    type: Literal["masterdata_conflict"] = "masterdata_conflict"
    record_id: UUID
    entity_kind: EntityKind
    entity_key: Key
    base_version: Count | None
    reason: str
    current: EntityState | None


class MasterDataNotShared(WireModel):
    """Verdict to the originating till: its change was archived but not shared, because
    the till's sync mode does not take part in this kind of master data (any more)."""

    type: Literal["masterdata_not_shared"] = "masterdata_not_shared"
    record_id: UUID
    reason: str


# ---------------------------------------------------------------------------
# Receipt handover: what the router tells the tills


class HandoverEvent(WireModel):
    """An accepted event at its ``position`` on receipt ``receipt_id`` (gapless from 1).
    ``record_id``/``till_id``/``till_name``: the uploaded record and the till that made it."""

    receipt_id: UUID
    position: Counter
    record_id: UUID
    till_id: UUID
    till_name: str = ""
    recorded_at: AwareDatetime
    event: Annotated[
        Union[ReceiptOpened, LineAdded, LineVoided, TableSet, CustomerSet, LinesMoved, ReceiptPaid, LinesMovedIn],
        Field(discriminator="type"),
    ]


class ReceiptEventAccepted(WireModel):
    """Broadcast to every till of the account that hands over receipts (the sender too)."""

    type: Literal["receipt_event"] = "receipt_event"
    event: HandoverEvent


RefusalCode = Literal[
    "table_taken",  # another receipt of the account is open for this table
    "receipt_exists",  # the receipt id is taken
    "unknown_receipt",  # never opened (or its opening was refused)
    "receipt_closed",  # paid already: closed receipts are immutable
    "stale_payment",  # events arrived after the position the payer saw
    "payment_mismatch",  # payments do not add up to the receipt's total
    "unknown_line",  # a void or move names a line that is not standing on the receipt
    "duplicate_line",  # a line id already used
    "bad_target",  # a move to a receipt that is not open (or to itself)
    "table_changed",  # a line meant for a table whose receipt has moved to another table
    "not_taking_part",  # the till's sync mode does not hand over receipts
]


class ReceiptEventRefused(WireModel):
    """Verdict to the sending till: its event ``record_id`` was not applied (it stays in
    the archive). ``existing_receipt_id``: the receipt that holds the table
    (``table_taken``) or the receipt's state; ``since``: the events after the position
    a refused payment saw, so the till can re-total."""

    type: Literal["receipt_event_refused"] = "receipt_event_refused"
    record_id: UUID
    receipt_id: UUID
    event_type: ReceiptEventType
    code: RefusalCode
    reason: str
    existing_receipt_id: UUID | None = None
    since: tuple[HandoverEvent, ...] = ()


MAX_RECEIPTS_ASKED = 1000  # receipts and verdicts one catch-up request may name
SHARED_RECORDS_DAYS = 31  # a till new to receiving receipts / Z-reports gets those of this many days
MAX_SHARED_RECORDS = 5000  # other tills' records one catch-up sends at most (the oldest; the rest follow)


class ReceiptCatchUpRequest(WireModel):
    """A till asks for the state of shared receipts: every open receipt of the account
    plus ``receipt_ids`` (those it still shows open), and the verdicts on its events
    ``verdicts_for`` that it has not seen. Routing key ``<account_id>.<till_id>.receipt_catchup``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: UUID
    account_id: UUID
    till_id: UUID
    receipt_ids: tuple[UUID, ...] = Field(default=(), max_length=MAX_RECEIPTS_ASKED)
    verdicts_for: tuple[UUID, ...] = Field(default=(), max_length=MAX_RECEIPTS_ASKED)
    shared_since: AwareDatetime | None = Field(
        default=None,
        description="also the other tills' receipts and Z-reports archived at or after this time (from the as_of "
        "of the till's last catch-up); None: those of the last SHARED_RECORDS_DAYS days",
    )


class ReceiptSnapshot(WireModel):
    """Answer to a catch-up: every accepted event of one receipt, in position order."""

    type: Literal["receipt_snapshot"] = "receipt_snapshot"
    request_id: UUID
    receipt_id: UUID
    status: Literal["open", "closed"]
    events: tuple[HandoverEvent, ...]


class ReceiptCatchUpDone(WireModel):
    """Last answer to a receipt catch-up: ``receipts`` snapshots (and ``shared_records``
    other tills' records) were sent before it; ``unknown_receipts``: the named receipts
    the router does not know (for this account)."""

    type: Literal["receipt_catchup_done"] = "receipt_catchup_done"
    request_id: UUID
    receipts: Count
    unknown_receipts: tuple[UUID, ...] = ()
    shared_records: Count = Field(default=0, description="other tills' receipts and Z-reports sent before it")
    as_of: AwareDatetime | None = Field(
        default=None,
        description="where the next catch-up of other tills' records starts: the router's time of the answer, or "
        "with more_shared_records the archive time of the last record sent",
    )
    more_shared_records: bool = Field(default=False, description="MAX_SHARED_RECORDS were sent and more are waiting")


class TillRecordShared(WireModel):
    """A receipt state or Z-report another till of the account recorded, for the tills
    whose mode receives receipts / Z-reports (DESIGN.md §1.3)."""

    type: Literal["till_record"] = "till_record"
    till_id: UUID
    till_name: str = ""
    record_id: UUID
    recorded_at: AwareDatetime
    record: Annotated[Union[Receipt, ZReport], Field(discriminator="kind")]


class RecordRefused(WireModel):
    """To the till that uploaded it: the archive refused its record ``record_id`` at
    ``till_seq`` (``reason``: e.g. another record is archived at that till_seq, or the
    record breaks the till's hash chain). The archive keeps the refused upload for the
    operator (``archive_conflicts``); the till shows it as a notice."""

    type: Literal["record_refused"] = "record_refused"
    record_id: UUID
    till_seq: Counter
    kind: str
    reason: str


class Download(WireModel):
    """Envelope of every message a till receives on its queue ``till.<till_id>``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    account_id: UUID
    message: Annotated[
        Union[
            FeedEntry,
            CatchUpPage,
            MasterDataAccepted,
            MasterDataConflict,
            MasterDataNotShared,
            ReceiptEventAccepted,
            ReceiptEventRefused,
            ReceiptSnapshot,
            ReceiptCatchUpDone,
            TillRecordShared,
            RecordRefused,
        ],
        Field(discriminator="type"),
    ]


DOWNLOAD_ADAPTER: TypeAdapter[Download] = TypeAdapter(Download)
CATCHUP_ADAPTER: TypeAdapter[CatchUpRequest] = TypeAdapter(CatchUpRequest)
RECEIPT_CATCHUP_ADAPTER: TypeAdapter[ReceiptCatchUpRequest] = TypeAdapter(ReceiptCatchUpRequest)


# ---------------------------------------------------------------------------
# Account service requests and replies


class CreateAccount(WireModel):
    """Create a server account. ``password`` must follow the password rules."""

    command: Literal["create_account"] = "create_account"
    account_name: Annotated[Text, Field(min_length=1, max_length=320)]
    password: SecretStr

    reveal_password = field_serializer("password", when_used="json")(_reveal)


class SignIn(WireModel):
    """Sign a till in to an account; ``serial_number`` is the till's own, stable one."""

    command: Literal["sign_in"] = "sign_in"
    account_name: Annotated[Text, Field(min_length=1, max_length=320)]
    password: SecretStr
    serial_number: Key
    till_name: Name
    installation_id: UUID | None = Field(default=None, description="the till's local store, made at `till init`")
    replace: bool = Field(default=False, description="this installation replaces a signed-in one of the same serial")

    reveal_password = field_serializer("password", when_used="json")(_reveal)


class TillAuth(WireModel):
    """Proof that a request comes from a signed-in till: its id and broker secret."""

    till_id: UUID
    till_secret: SecretStr

    reveal_secret = field_serializer("till_secret", when_used="json")(_reveal)


class SignOut(TillAuth):
    """Sign a till out: its broker user is deleted and its connections closed."""

    command: Literal["sign_out"] = "sign_out"


class SetSyncMode(TillAuth):
    """Store a till's sync switch and sync mode; ``custom`` is required for ``custom`` mode."""

    command: Literal["set_sync_mode"] = "set_sync_mode"
    sync_enabled: bool
    sync_mode: SyncMode
    custom: CustomSyncFlags | None = None

    @model_validator(mode="after")
    def _custom_only_for_custom(self) -> SetSyncMode:
        if (self.sync_mode == SyncMode.CUSTOM) != (self.custom is not None):
            raise ValueError("custom flags are given exactly when sync_mode is custom")
        return self


class RequestPasswordReset(WireModel):
    """"Forgot password" on a till: ask for ``new_password`` to become the account's
    password once a service technician approves it. Allowed only while every till of
    the account is signed out; the old password stays valid until the approval."""

    command: Literal["request_password_reset"] = "request_password_reset"
    account_name: Annotated[Text, Field(min_length=1, max_length=320)]
    new_password: SecretStr
    serial_number: Key = Field(description="the till the owner asks on")
    till_name: Name
    installation_id: UUID = Field(description="the till's local store: it must be one that signed in to the account")

    reveal_password = field_serializer("new_password", when_used="json")(_reveal)


class PasswordResetStatusQuery(WireModel):
    """Where a reset request stands, asked by the till that made it (it knows the request
    id and the verification code; the owner may not know any valid password)."""

    command: Literal["password_reset_status"] = "password_reset_status"
    request_id: UUID
    verification_code: Annotated[str, StringConstraints(max_length=20)]


class AccountRequest(WireModel):
    """Envelope of every account-service request."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request: Annotated[
        Union[CreateAccount, SignIn, SignOut, SetSyncMode, RequestPasswordReset, PasswordResetStatusQuery],
        Field(discriminator="command"),
    ]


class AccountCreated(WireModel):
    reply: Literal["account_created"] = "account_created"
    account_id: UUID
    account_name: str


class AccountNotice(WireModel):
    """A message for the account's owner, shown on a till at sign-in."""

    at: AwareDatetime
    message: str


class SignedIn(WireModel):
    """Credentials and facts a till needs after sign-in (broker user, queue, last till_seq)."""

    reply: Literal["signed_in"] = "signed_in"
    account_id: UUID
    account_name: str
    till_id: UUID
    broker_username: str
    broker_password: SecretStr
    vhost: str
    upload_exchange: str
    queue: str
    last_till_seq: Count = Field(description="highest till_seq the archive holds for this till")
    last_receipt_number: Count = Field(default=0, description="highest receipt number (BON_NR) archived for this till")
    last_z_nr: Count = Field(default=0, description="highest Z_NR archived for this till")
    last_chain_hash: Sha256Hex | None = Field(
        default=None, description="chain_hash of the record at last_till_seq (None: none, or archived unchained)"
    )
    sync_enabled: bool
    sync_mode: SyncMode
    custom: CustomSyncFlags | None = None
    notices: tuple[AccountNotice, ...] = Field(
        default=(), description="news for the account since this till last signed in (e.g. a password reset decided)"
    )

    reveal_password = field_serializer("broker_password", when_used="json")(_reveal)


class SignedOut(WireModel):
    reply: Literal["signed_out"] = "signed_out"
    till_id: UUID
    connections_closed: Count


class SyncModeSet(WireModel):
    reply: Literal["sync_mode_set"] = "sync_mode_set"
    till_id: UUID
    sync_enabled: bool
    sync_mode: SyncMode
    custom: CustomSyncFlags | None = None
    routing_keys: tuple[str, ...] = Field(description="binding keys of the till's queue on till.download")


class PasswordResetRequested(WireModel):
    """The reset request is recorded and waits for a service technician's approval.
    ``verification_code``: the owner reads it to the technician, who approves only a
    request whose code the caller knows (so no stranger's request is approved instead)."""

    reply: Literal["password_reset_requested"] = "password_reset_requested"
    request_id: UUID
    requested_at: AwareDatetime
    verification_code: str


class PasswordResetStatusReply(WireModel):
    """A reset request's status (``pending``, ``approved``, ``rejected``, ``expired``,
    ``superseded``), with who decided when and why."""

    reply: Literal["password_reset_status"] = "password_reset_status"
    request_id: UUID
    status: str
    requested_at: AwareDatetime
    decided_by: str | None = None
    decided_at: AwareDatetime | None = None
    reason: str | None = None


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    INVALID_ACCOUNT_NAME = "invalid_account_name"
    WEAK_PASSWORD = "weak_password"
    ACCOUNT_EXISTS = "account_exists"
    WRONG_CREDENTIALS = "wrong_credentials"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    TILL_IN_USE = "till_in_use"
    UNKNOWN_TILL = "unknown_till"
    UNKNOWN_ACCOUNT = "unknown_account"
    TILLS_SIGNED_IN = "tills_signed_in"
    TOO_MANY_REQUESTS = "too_many_requests"
    UNKNOWN_REQUEST = "unknown_request"
    INTERNAL = "internal"


class ErrorReply(WireModel):
    """A refused request: ``message`` for people, ``details`` one item per problem."""

    reply: Literal["error"] = "error"
    code: ErrorCode
    message: str
    details: tuple[str, ...] = ()
    retry_after_seconds: float | None = None


class AccountReply(WireModel):
    """Envelope of every account-service reply."""

    schema_version: Literal[1] = SCHEMA_VERSION
    reply: Annotated[
        Union[AccountCreated, SignedIn, SignedOut, SyncModeSet, PasswordResetRequested, PasswordResetStatusReply, ErrorReply],
        Field(discriminator="reply"),
    ]


# ---------------------------------------------------------------------------
# Password approval: the account service and ops talk to the password-approval worker
#
# Published to the topic exchange ``password.approval``: the account service with
# routing key ``request`` (a new reset request, the password already hashed), ops users
# with ``decision`` (approve / reject) or ``query`` (list), each with its AMQP
# ``user_id`` (validated by RabbitMQ; the worker takes the approver from it) and a
# ``reply_to`` for the answer (``ApprovalReply``). Ops users may publish only
# ``decision`` and ``query``; tills may not publish to the exchange at all.

ARGON2_HASH = Annotated[str, StringConstraints(pattern=r"^\$argon2id\$", max_length=500)]


class PasswordResetRequest(WireModel):
    """A new reset request (account service → worker). ``password_hash``: argon2id of
    the new password; the clear password is never sent on."""

    type: Literal["password_reset_request"] = "password_reset_request"
    request_id: UUID
    account_id: UUID
    account_name: str
    password_hash: ARGON2_HASH
    requested_at: AwareDatetime
    requested_on: Annotated[Text, Field(min_length=1, max_length=400)] = Field(
        description="the till the owner asked on: name (serial number)"
    )
    verification_code: Annotated[str, StringConstraints(pattern=r"^[0-9A-Z]{4}-[0-9A-Z]{4}$")]


class ApprovePasswordReset(WireModel):
    """Ops: make the request's password the account's password. ``command_id`` makes a
    repeated command (a retry) a no-op answered like the first."""

    type: Literal["approve"] = "approve"
    request_id: UUID
    command_id: UUID
    verification_code: Annotated[str, StringConstraints(strip_whitespace=True, to_upper=True, max_length=20)] = Field(
        description="the code the caller read from the till that asked; must match the request's"
    )


class RejectPasswordReset(WireModel):
    """Ops: refuse the request; the old password stays. ``reason`` is shown to the owner."""

    type: Literal["reject"] = "reject"
    request_id: UUID
    command_id: UUID
    reason: Annotated[Name, AfterValidator(not_blank)]


class ListPasswordResets(WireModel):
    """Ops: list the pending requests (``include_decided``: also the decided ones of the
    last ``days`` days)."""

    type: Literal["list"] = "list"
    include_decided: bool = False
    days: Annotated[StrictInt, Field(ge=1, le=366)] = 30


class ApprovalMessage(WireModel):
    """Envelope of every message to the password-approval worker."""

    schema_version: Literal[1] = SCHEMA_VERSION
    message: Annotated[
        Union[PasswordResetRequest, ApprovePasswordReset, RejectPasswordReset, ListPasswordResets],
        Field(discriminator="type"),
    ]


PasswordResetStatus = Literal["pending", "approved", "rejected", "expired", "superseded"]


class PasswordResetInfo(WireModel):
    """One request as ops see it; ``overdue``: pending for longer than the 48 h target;
    ``age_hours`` since it was requested; warnings for the technician (the verification
    code is not shown: the caller must read it out): ``superseded_recently`` (other requests of the
    account replaced in the last 14 days) and ``signed_in_since`` (tills that signed in
    with the old password after the request)."""

    request_id: UUID
    account_name: str
    requested_on: str
    requested_at: AwareDatetime
    age_hours: float
    overdue: bool
    expires_at: AwareDatetime
    status: PasswordResetStatus
    decided_by: str | None = None
    decided_at: AwareDatetime | None = None
    reason: str | None = None
    superseded_recently: Count = 0
    signed_in_since: tuple[str, ...] = ()


class PasswordResetDecided(WireModel):
    """Answer to approve / reject: the request's status now. ``repeat``: the command was
    applied before (same ``command_id``) and nothing changed now."""

    reply: Literal["decided"] = "decided"
    request: PasswordResetInfo
    repeat: bool = False


class PasswordResetList(WireModel):
    reply: Literal["list"] = "list"
    requests: tuple[PasswordResetInfo, ...]


class ApprovalError(WireModel):
    """A refused ops command, e.g. an unknown, expired or already decided request."""

    reply: Literal["error"] = "error"
    code: Literal["unknown_request", "not_pending", "expired", "not_ops", "invalid", "wrong_code", "internal"]
    message: str


class ApprovalReply(WireModel):
    """Envelope of every answer of the password-approval worker."""

    schema_version: Literal[1] = SCHEMA_VERSION
    reply: Annotated[Union[PasswordResetDecided, PasswordResetList, ApprovalError], Field(discriminator="reply")]


APPROVAL_ADAPTER: TypeAdapter[ApprovalMessage] = TypeAdapter(ApprovalMessage)


def to_wire(model: BaseModel) -> bytes:
    """Serialise a wire model to JSON bytes (secrets revealed: only for the wire)."""
    return model.model_dump_json().encode()


def json_dict(model: BaseModel) -> dict[str, Any]:
    """The JSON-compatible dict of a model (what goes on the wire)."""
    return model.model_dump(mode="json")
