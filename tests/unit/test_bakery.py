"""Reading the bakery till export (tillsync/bakery.py).

The real file is read from ../shared/data/ (DESIGN.md §5), never copied into the repo.
Expectations are derived from the data README and the rules in the module docstring.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import re
from collections import defaultdict
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from shared.fiscal import PaymentType, VatKey
from tests.support import BAKERY_CSV
from tillsync.bakery import BakeryExport, BakeryFormatError, Ticket, TicketLine, article_nr, parse_price, read_export, vat_key_of

pytestmark = pytest.mark.unit

DATA_FILE = BAKERY_CSV
PARIS = ZoneInfo("Europe/Paris")
HEADER = ",date,time,ticket_number,article,Quantity,unit_price\n"
BEVERAGES = ("CAFE", "BOISSON", "THE ", "JUS", "EAU")  # from the module docstring


def half_up(value: Fraction) -> int:
    magnitude = int(abs(value) + Fraction(1, 2))
    return magnitude if value >= 0 else -magnitude


def cents(price: str) -> int:
    """``"1,20 €"`` → 120, independently of the importer."""
    return int(Decimal(price.replace("€", "").strip().replace(",", ".")) * 100)


@pytest.fixture(scope="module")
def raw_rows() -> list[dict[str, str]]:
    if not DATA_FILE.is_file():
        pytest.fail(f"the real input {DATA_FILE} is missing (DESIGN.md §5)")
    with DATA_FILE.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def export() -> BakeryExport:
    return read_export(DATA_FILE)


# ---------------------------------------------------------------------------
# the real file


def test_the_real_file_has_2013_tickets_and_3327_lines(export: BakeryExport) -> None:
    # numbers from shared/data/README.md
    assert len(export.tickets) == 2013
    assert sum(len(t.lines) for t in export.tickets) == 3327


def test_every_ticket_number_appears_once(export: BakeryExport) -> None:
    numbers = [t.ticket_number for t in export.tickets]
    assert len(numbers) == len(set(numbers))


def test_every_line_of_the_file_is_kept_as_it_is(export: BakeryExport, raw_rows: list[dict[str, str]]) -> None:
    expected: dict[int, list[TicketLine]] = defaultdict(list)
    for row in raw_rows:
        expected[int(float(row["ticket_number"]))].append(
            TicketLine(row["article"].strip(), Decimal(row["Quantity"]).quantize(Decimal("0.001")), cents(row["unit_price"]))
        )
    got = {t.ticket_number: list(t.lines) for t in export.tickets}
    assert got == dict(expected)


def test_ticket_times_are_the_shops_local_time(export: BakeryExport, raw_rows: list[dict[str, str]]) -> None:
    first_row = {}
    for row in raw_rows:
        first_row.setdefault(int(float(row["ticket_number"])), row)
    for ticket in export.tickets:
        row = first_row[ticket.ticket_number]
        assert ticket.at.tzinfo is not None
        assert ticket.at.utcoffset() == dt.timedelta(hours=1)  # Paris in January (CET)
        assert ticket.at.replace(tzinfo=None) == dt.datetime.fromisoformat(f"{row['date']}T{row['time']}")
        assert ticket.business_day == dt.date.fromisoformat(row["date"])


def test_negative_quantities_are_preserved(export: BakeryExport, raw_rows: list[dict[str, str]]) -> None:
    expected = sorted(Decimal(r["Quantity"]) for r in raw_rows if Decimal(r["Quantity"]) < 0)
    got = sorted(line.quantity for t in export.tickets for line in t.lines if line.quantity < 0)
    assert expected, "the real file has returns"
    assert got == expected


def test_zero_prices_are_kept_as_free_lines(export: BakeryExport, raw_rows: list[dict[str, str]]) -> None:
    expected = sum(1 for r in raw_rows if cents(r["unit_price"]) == 0)
    got = sum(1 for t in export.tickets for line in t.lines if line.unit_price == 0)
    assert expected and got == expected


def test_quantities_have_three_decimal_places(export: BakeryExport) -> None:
    assert all(line.quantity.as_tuple().exponent == -3 for t in export.tickets for line in t.lines)


def test_ticket_total_is_the_sum_of_quantity_times_price_half_up(export: BakeryExport) -> None:
    for ticket in export.tickets:
        expected = sum(half_up(Fraction(line.quantity) * line.unit_price) for line in ticket.lines)
        assert ticket.total == expected, ticket.ticket_number


# ---------------------------------------------------------------------------
# derivation rules (module docstring)


def test_even_tickets_go_to_till_1_and_odd_ones_to_till_2(export: BakeryExport) -> None:
    for ticket in export.tickets:
        assert ticket.till_index == (0 if ticket.ticket_number % 2 == 0 else 1)
    assert {t.till_index for t in export.tickets} == {0, 1}


def test_payment_is_cash_below_10_euros_else_debit_card(export: BakeryExport) -> None:
    for ticket in export.tickets:
        total = sum(half_up(Fraction(line.quantity) * line.unit_price) for line in ticket.lines)
        expected = PaymentType.CASH if total < 1000 else PaymentType.DEBIT_CARD
        assert ticket.payment_type == expected, ticket.ticket_number
    assert {t.payment_type for t in export.tickets} == {PaymentType.CASH, PaymentType.DEBIT_CARD}


def ticket(number: int, at: dt.datetime, *lines: tuple[str, str, int]) -> Ticket:
    return Ticket(number, at, tuple(TicketLine(n, Decimal(q), p) for n, q, p in lines))


AT = dt.datetime(2021, 1, 2, 9, 0, tzinfo=PARIS)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ((("PAIN", "1", 999),), PaymentType.CASH),  # 9,99 €
        ((("PAIN", "1", 1000),), PaymentType.DEBIT_CARD),  # exactly 10,00 € is not below
        ((("PAIN", "2", 500),), PaymentType.DEBIT_CARD),
        ((("PAIN", "1", 1200), ("PAIN", "-1", 300)), PaymentType.CASH),  # 9,00 €
        ((("PAIN", "-1", 1500),), PaymentType.CASH),  # a refund: negative
        ((("PAIN", "1", 0),), PaymentType.CASH),
    ],
)
def test_payment_rule_at_its_edges(lines: tuple[tuple[str, str, int], ...], expected: PaymentType) -> None:
    assert ticket(1, AT, *lines).payment_type == expected


@pytest.mark.parametrize(
    ("time", "cashier_id"),
    [(dt.time(7, 0), "1"), (dt.time(12, 59), "1"), (dt.time(13, 0), "2"), (dt.time(13, 1), "2"), (dt.time(19, 56), "2")],
)
def test_cashier_is_the_early_shift_before_13_and_the_late_shift_after(time: dt.time, cashier_id: str) -> None:
    at = dt.datetime.combine(dt.date(2021, 1, 2), time, PARIS)
    assert ticket(2, at, ("PAIN", "1", 100)).cashier.cashier_id == cashier_id


def test_cashier_rule_on_the_real_file(export: BakeryExport) -> None:
    for t in export.tickets:
        assert t.cashier.cashier_id == ("1" if t.at.time() < dt.time(13, 0) else "2")
    assert {t.cashier.cashier_id for t in export.tickets} == {"1", "2"}


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("CAFE OU EAU", VatKey.REGULAR),
        ("BOISSON 33CL", VatKey.REGULAR),
        ("THE VERT", VatKey.REGULAR),
        ("JUS D'ORANGE", VatKey.REGULAR),
        ("EAU MINERALE", VatKey.REGULAR),
        ("BAGUETTE", VatKey.REDUCED),
        ("PAIN AU CHOCOLAT", VatKey.REDUCED),
        ("TARTELETTE", VatKey.REDUCED),
        ("GATEAU EAU DE VIE", VatKey.REDUCED),  # a beverage word not at the start
        ("THEIERE", VatKey.REDUCED),  # the prefix is "THE " with a space, not "THE"
    ],
)
def test_vat_key_by_beverage_prefix(name: str, key: VatKey) -> None:
    assert vat_key_of(name) == key


def test_articles_of_the_real_file_follow_the_vat_and_group_rules(export: BakeryExport) -> None:
    names = {line.article_name for t in export.tickets for line in t.lines}
    assert set(export.articles) == names
    for name, art in export.articles.items():
        beverage = name.upper().startswith(BEVERAGES)
        assert art.vat_key == (VatKey.REGULAR if beverage else VatKey.REDUCED), name
        assert art.article_group_nr == ("2" if beverage else "1"), name
        assert art.text == name
    assert {a.vat_key for a in export.articles.values()} == {VatKey.REGULAR, VatKey.REDUCED}


def test_article_price_is_the_price_of_its_first_sale(export: BakeryExport, raw_rows: list[dict[str, str]]) -> None:
    first: dict[str, tuple[dt.datetime, int]] = {}
    for row in raw_rows:  # file order; an earlier time wins, equal times keep the first in the file
        at = dt.datetime.fromisoformat(f"{row['date']}T{row['time']}")
        name = row["article"].strip()
        if name not in first or at < first[name][0]:
            first[name] = (at, cents(row["unit_price"]))
    assert {n: a.unit_price for n, a in export.articles.items()} == {n: p for n, (_, p) in first.items()}


def test_article_number_is_a_plus_8_hex_digits_of_sha256_of_the_name(export: BakeryExport) -> None:
    for name, art in export.articles.items():
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        assert art.article_nr.upper() == ("A" + digest).upper()
        assert re.fullmatch(r"A[0-9A-Fa-f]{8}", art.article_nr)


def test_article_numbers_are_stable_across_calls_and_equal_for_equal_names() -> None:
    assert article_nr("BAGUETTE") == article_nr("BAGUETTE")
    assert article_nr("BAGUETTE") == article_nr("".join(["BAGU", "ETTE"]))
    assert article_nr("BAGUETTE") != article_nr("PAIN")


def test_article_numbers_are_stable_across_reads_and_unique(export: BakeryExport) -> None:
    again = read_export(DATA_FILE)
    assert {n: a.article_nr for n, a in again.articles.items()} == {n: a.article_nr for n, a in export.articles.items()}
    numbers = [a.article_nr for a in export.articles.values()]
    assert len(numbers) == len(set(numbers))


def test_the_same_article_in_two_files_gets_the_same_number(tmp_path: Path) -> None:
    one = write(tmp_path / "one.csv", HEADER + '0,2021-01-02,08:38,1.0,BAGUETTE,1.0,"0,90 €"\n')
    two = write(
        tmp_path / "two.csv",
        HEADER + '0,2021-01-03,09:00,7.0,PAIN,1.0,"1,15 €"\n1,2021-01-03,09:00,7.0,BAGUETTE,2.0,"0,95 €"\n',
    )
    assert read_export(one).articles["BAGUETTE"].article_nr == read_export(two).articles["BAGUETTE"].article_nr


@pytest.mark.parametrize(("text", "expected"), [("0,90 €", 90), ("1,20 €", 120), ("12 €", 1200), ("1,5 €", 150), ("0,00 €", 0)])
def test_parse_price_reads_french_notation(text: str, expected: int) -> None:
    assert parse_price(text) == expected


@pytest.mark.parametrize("text", ["1.20 EUR", "1.20 €", "1,20", "€ 1,20", "1,205 €", "", "abc"])
def test_parse_price_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        parse_price(text)


def test_tickets_are_ordered_by_time(export: BakeryExport) -> None:
    times = [t.at for t in export.tickets]
    assert times == sorted(times)
    assert export.business_days == sorted({t.business_day for t in export.tickets})


# ---------------------------------------------------------------------------
# bad input: BakeryFormatError naming the line


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


GOOD_LINE = '0,2021-01-02,08:38,150040.0,BAGUETTE,1.0,"0,90 €"\n'


def refuse(path: Path, line_no: int) -> BakeryFormatError:
    with pytest.raises(BakeryFormatError) as exc:
        read_export(path)
    assert re.search(rf"\bline {line_no}\b", str(exc.value)), str(exc.value)
    return exc.value


def test_a_good_small_file_is_read(tmp_path: Path) -> None:
    export = read_export(write(tmp_path / "ok.csv", HEADER + GOOD_LINE))
    assert len(export.tickets) == 1 and export.tickets[0].lines[0].unit_price == 90


@pytest.mark.parametrize(
    "header",
    [
        "date,time,ticket_number,article,Quantity,unit_price\n",
        ",date,time,ticket,article,Quantity,unit_price\n",
        ",date,time,ticket_number,article,quantity,unit_price\n",
        ",date,time,ticket_number,article,Quantity,unit_price,extra\n",
    ],
)
def test_a_bad_header_names_line_1(tmp_path: Path, header: str) -> None:
    refuse(write(tmp_path / "bad.csv", header + GOOD_LINE), 1)


def test_an_empty_file_names_line_1(tmp_path: Path) -> None:
    refuse(write(tmp_path / "empty.csv", ""), 1)


def test_a_file_with_only_the_header_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BakeryFormatError):
        read_export(write(tmp_path / "header.csv", HEADER))


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BakeryFormatError):
        read_export(tmp_path / "missing.csv")


@pytest.mark.parametrize(
    "bad_line",
    [
        '1,2021-01-02,08:40,150041.0,PAIN,1.0,"1.20 EUR"\n',  # price not in French notation
        "1,2021-01-02,08:40,150041.0,PAIN,abc,\"1,20 €\"\n",  # quantity not a number
        '1,2021-01-02,08:40,150041.0,PAIN,0.0,"1,20 €"\n',  # quantity zero
        '1,2021-13-02,08:40,150041.0,PAIN,1.0,"1,20 €"\n',  # no such date
        '1,2021-01-02,8h40,150041.0,PAIN,1.0,"1,20 €"\n',  # not a time
        '1,2021-01-02,08:40,150041.5,PAIN,1.0,"1,20 €"\n',  # not a whole ticket number
        '1,2021-01-02,08:40,-3.0,PAIN,1.0,"1,20 €"\n',  # not a positive ticket number
        '1,2021-01-02,08:40,x,PAIN,1.0,"1,20 €"\n',
        '1,2021-01-02,08:40,150041.0,  ,1.0,"1,20 €"\n',  # empty article name
        '1,2021-01-02,08:40,150041.0,PAIN,1.0\n',  # a field missing
        '1,2021-01-02,08:40,150041.0,PAIN,1.0,"1,20 €",x\n',  # a field too many
    ],
    ids=[
        "price-EUR",
        "quantity-abc",
        "quantity-0",
        "bad-date",
        "bad-time",
        "fractional-ticket",
        "negative-ticket",
        "ticket-x",
        "empty-article",
        "missing-field",
        "extra-field",
    ],
)
def test_a_bad_line_is_refused_with_its_line_number(tmp_path: Path, bad_line: str) -> None:
    # header is line 1, the good line is line 2, the bad one line 3
    refuse(write(tmp_path / "bad.csv", HEADER + GOOD_LINE + bad_line), 3)


def test_a_ticket_with_lines_at_two_times_is_refused_with_the_line_number(tmp_path: Path) -> None:
    text = (
        HEADER
        + GOOD_LINE
        + '1,2021-01-02,08:38,150040.0,PAIN,1.0,"1,15 €"\n'
        + '2,2021-01-02,08:39,150041.0,PAIN,1.0,"1,15 €"\n'
        + '3,2021-01-02,08:45,150040.0,CROISSANT,1.0,"1,10 €"\n'
    )
    error = refuse(write(tmp_path / "bad.csv", text), 5)
    assert "150040" in str(error)


def test_a_ticket_on_two_days_is_refused_with_the_line_number(tmp_path: Path) -> None:
    text = HEADER + GOOD_LINE + '1,2021-01-03,08:38,150040.0,PAIN,1.0,"1,15 €"\n'
    refuse(write(tmp_path / "bad.csv", text), 3)


def test_the_line_number_counts_physical_lines_after_blank_ones(tmp_path: Path) -> None:
    text = HEADER + GOOD_LINE + "\n" + '1,2021-01-02,08:40,150041.0,PAIN,abc,"1,20 €"\n'
    refuse(write(tmp_path / "bad.csv", text), 4)


@pytest.mark.parametrize("quantity", ["NaN", "nan", "sNaN", "Infinity", "-Infinity", "inf"])
def test_a_quantity_that_is_not_a_finite_number_is_refused_with_its_line_number(tmp_path: Path, quantity: str) -> None:
    bad = f'1,2021-01-02,08:40,150041.0,PAIN,{quantity},"1,20 €"\n'
    refuse(write(tmp_path / "bad.csv", HEADER + GOOD_LINE + bad), 3)


@pytest.mark.parametrize("number", ["Infinity", "inf", "NaN", "sNaN", "-Infinity"])
def test_a_ticket_number_that_is_not_a_finite_number_is_refused_with_its_line_number(tmp_path: Path, number: str) -> None:
    bad = f'1,2021-01-02,08:40,{number},PAIN,1.0,"1,20 €"\n'
    refuse(write(tmp_path / "bad.csv", HEADER + GOOD_LINE + bad), 3)
