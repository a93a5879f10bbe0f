"""Reading a bakery till export (the "French bakery daily sales" format) for the demo.

Format: CSV with header ``,date,time,ticket_number,article,Quantity,unit_price``; one
line per receipt line; ``ticket_number`` like ``150040.0``; ``Quantity`` a float
(negative = returned or voided); ``unit_price`` gross in French notation (``"0,90 €"``).
Times are local time of the shop (Europe/Paris).

The file has no article numbers, VAT rates, payment types or cashiers. The importer
derives them by these deterministic rules (documented in the README):
- article number: ``A`` + the first 8 hex digits of SHA-256 of the article name, so
  the same name gets the same number in every file;
- article price in the master data: the unit price of the article's first sale in
  the file; a line sold at another price keeps its own price (open price);
- VAT key: beverages (name starts with ``CAFE``, ``BOISSON``, ``THE ``, ``JUS`` or
  ``EAU``) are DSFinV-K key 1 (19 %); everything else is food, key 2 (7 %);
  article group ``2`` (Getränke) or ``1`` (Backwaren) accordingly;
- payment: a ticket whose total is below 10,00 € (or negative) is paid cash
  (``Bar``), otherwise by debit card (``ECKarte``);
- cashier: ``1`` (Frühschicht) for tickets before 13:00, ``2`` (Spätschicht) after;
- till: tickets with an even ticket number go to till 1, odd ones to till 2;
- the line's quantity is kept as it is (3 decimal places); the amount is
  quantity × unit price rounded half up; a zero price is a free line.
Every problem in the file raises ``BakeryFormatError`` with its line number.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from zoneinfo import ZoneInfo

from shared.fiscal import PaymentType, VatKey, line_amount
from shared.models import MAX_CENTS, MAX_QUANTITY, Article, printable, ArticleGroup, Cashier, CashierUser, PaymentTypeEntity, VatRate

SHOP_TIME_ZONE = ZoneInfo("Europe/Paris")
EXPECTED_COLUMNS = ["", "date", "time", "ticket_number", "article", "Quantity", "unit_price"]
BEVERAGE_PREFIXES = ("CAFE", "BOISSON", "THE ", "JUS", "EAU")
CASH_LIMIT_CENTS = 1000
LATE_SHIFT_FROM = dt.time(13, 0)
_PRICE = re.compile(r"^\s*(-?\d+)(?:,(\d{1,2}))?\s*€\s*$")

CASHIERS = {
    "1": CashierUser(cashier_id="1", name="Frühschicht"),
    "2": CashierUser(cashier_id="2", name="Spätschicht"),
}
PAYMENT_TYPES = {
    PaymentType.CASH: PaymentTypeEntity(payment_type_nr="1", name="Bar", payment_type=PaymentType.CASH),
    PaymentType.DEBIT_CARD: PaymentTypeEntity(payment_type_nr="2", name="EC-Karte", payment_type=PaymentType.DEBIT_CARD),
}
ARTICLE_GROUPS = {
    VatKey.REDUCED: ArticleGroup(group_nr="1", name="Backwaren"),
    VatKey.REGULAR: ArticleGroup(group_nr="2", name="Getränke"),
}
VAT_RATES = (
    VatRate(vat_key=VatKey.REGULAR, percent=Decimal("19"), description="Regelsteuersatz"),
    VatRate(vat_key=VatKey.REDUCED, percent=Decimal("7"), description="ermäßigter Steuersatz"),
)


class BakeryFormatError(ValueError):
    """The input file is not in the bakery export format; the message names the line."""


@dataclass(frozen=True)
class TicketLine:
    article_name: str
    quantity: Decimal
    unit_price: int  # gross cents


@dataclass(frozen=True)
class Ticket:
    """One receipt of the input: number, local time and lines in file order."""

    ticket_number: int
    at: dt.datetime  # aware, shop time zone
    lines: tuple[TicketLine, ...]

    @property
    def business_day(self) -> dt.date:
        return self.at.date()

    @property
    def total(self) -> int:
        """Gross total in cents (sum of quantity × unit price per line, half up)."""
        return sum(line_amount(line.quantity, line.unit_price) for line in self.lines)

    @property
    def till_index(self) -> int:
        """0 for till 1 (even ticket numbers), 1 for till 2 (odd)."""
        return self.ticket_number % 2

    @property
    def payment_type(self) -> PaymentType:
        return PaymentType.CASH if self.total < CASH_LIMIT_CENTS else PaymentType.DEBIT_CARD

    @property
    def cashier(self) -> Cashier:
        user = CASHIERS["1" if self.at.time() < LATE_SHIFT_FROM else "2"]
        return Cashier(cashier_id=user.cashier_id, name=user.name)


@dataclass(frozen=True)
class BakeryExport:
    tickets: tuple[Ticket, ...]
    articles: dict[str, Article]  # by article name

    @property
    def business_days(self) -> list[dt.date]:
        return sorted({t.business_day for t in self.tickets})


def article_nr(name: str) -> str:
    """The article number derived from an article name (see module docstring)."""
    return "A" + hashlib.sha256(name.encode()).hexdigest()[:8].upper()


def vat_key_of(name: str) -> VatKey:
    """VAT key by the beverage rule (see module docstring)."""
    return VatKey.REGULAR if name.upper().startswith(BEVERAGE_PREFIXES) else VatKey.REDUCED


def parse_price(text: str) -> int:
    """``"1,20 €"`` → 120 (cents). Raises ``ValueError`` for anything else."""
    match = _PRICE.match(text)
    if not match:
        raise ValueError(f"unit_price {text!r} is not like '0,90 €'")
    euros, cents = match.group(1), (match.group(2) or "0").ljust(2, "0")
    sign = -1 if euros.startswith("-") else 1
    return sign * (abs(int(euros)) * 100 + int(cents))


def _number(text: str, column: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{column} {text!r} is not a number") from None


def read_export(path: Path) -> BakeryExport:
    """Read and check a bakery export; raises ``BakeryFormatError`` naming the line."""
    path = Path(path)
    if path.is_dir():
        raise BakeryFormatError(f"{path}: is a directory, not a file")
    if not path.is_file():
        raise BakeryFormatError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise BakeryFormatError(f"{path}: line {line}: not UTF-8 text (byte {raw[exc.start]:#04x})") from None
    tickets: dict[int, list[tuple[dt.datetime, TicketLine]]] = {}
    first_price: dict[str, tuple[dt.datetime, int]] = {}
    with io.StringIO(text, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != EXPECTED_COLUMNS:
            raise BakeryFormatError(f"{path}: line 1: expected the columns {EXPECTED_COLUMNS}, found {header}")
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(EXPECTED_COLUMNS):
                raise BakeryFormatError(f"{path}: line {line_no}: expected {len(EXPECTED_COLUMNS)} fields, found {len(row)}")
            _, date_s, time_s, ticket_s, article, quantity_s, price_s = row
            try:
                at = dt.datetime.combine(dt.date.fromisoformat(date_s), dt.time.fromisoformat(time_s), SHOP_TIME_ZONE)
                ticket_f = _number(ticket_s, "ticket_number")
                if not ticket_f.is_finite() or ticket_f != ticket_f.to_integral_value() or ticket_f <= 0:
                    raise ValueError(f"ticket_number {ticket_s!r} is not a positive whole number")
                quantity = _number(quantity_s, "Quantity")
                if not quantity.is_finite():
                    raise ValueError(f"Quantity {quantity_s!r} is not a number")
                if abs(quantity) > MAX_QUANTITY:
                    raise ValueError(f"Quantity {quantity_s!r} is beyond ±{MAX_QUANTITY}")
                if quantity != quantity.quantize(Decimal("0.001")):
                    raise ValueError(f"Quantity {quantity_s!r} has more than 3 decimal places")
                quantity = quantity.quantize(Decimal("0.001"))
                if quantity == 0:
                    raise ValueError("Quantity is 0")
                price = parse_price(price_s)
                if abs(price) > MAX_CENTS or abs(line_amount(quantity, price)) > MAX_CENTS:
                    raise ValueError(f"unit_price {price_s!r} × Quantity {quantity_s!r} is beyond ±{MAX_CENTS} cents")
            except (ValueError, InvalidOperation) as exc:
                raise BakeryFormatError(f"{path}: line {line_no}: {exc}") from exc
            name = article.strip()
            if not name:
                raise BakeryFormatError(f"{path}: line {line_no}: article name is empty")
            try:
                printable(name)
            except ValueError as exc:
                raise BakeryFormatError(f"{path}: line {line_no}: article name {exc}") from None
            number = int(ticket_f)
            entries = tickets.setdefault(number, [])
            if entries and entries[0][0] != at:
                raise BakeryFormatError(
                    f"{path}: line {line_no}: ticket {number} has lines at {entries[0][0]:%Y-%m-%d %H:%M} and {at:%Y-%m-%d %H:%M}"
                )
            entries.append((at, TicketLine(name, quantity, price)))
            if name not in first_price or at < first_price[name][0]:
                first_price[name] = (at, price)
    if not tickets:
        raise BakeryFormatError(f"{path}: no tickets in the file")
    numbers: dict[str, str] = {}
    articles = {}
    for name, (_, price) in sorted(first_price.items()):
        nr = article_nr(name)
        if nr in numbers:
            raise BakeryFormatError(f"{path}: article names {numbers[nr]!r} and {name!r} give the same article number")
        numbers[nr] = name
        key = vat_key_of(name)
        articles[name] = Article(
            article_nr=nr, text=name, unit_price=price, vat_key=key, article_group_nr=ARTICLE_GROUPS[key].group_nr
        )
    ordered = sorted(tickets.items(), key=lambda item: (item[1][0][0], item[0]))
    return BakeryExport(
        tickets=tuple(Ticket(number, entries[0][0], tuple(line for _, line in entries)) for number, entries in ordered),
        articles=articles,
    )
