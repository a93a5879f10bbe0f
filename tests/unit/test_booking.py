"""Booking receipts and Z-reports on the till (till_agent/booking.py)."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from decimal import Decimal
from fractions import Fraction

import pytest
from pydantic import ValidationError

from shared.fiscal import BusinessCase, PaymentType, VatKey
from shared.models import Cashier, Receipt
from till_agent.booking import SaleLine, closed_receipt, z_report

pytestmark = pytest.mark.unit

DAY = dt.date(2024, 3, 1)
T0 = dt.datetime(2024, 3, 1, 8, 0, tzinfo=dt.UTC)
CASHIER = Cashier(cashier_id="1", name="Anna")
# Rates by law for the keys used here (DSFinV-K Stamm_USt; DESIGN.md §2).
PERCENT = {VatKey.REGULAR: 19, VatKey.REDUCED: 7, VatKey.NOT_TAXABLE: 0}


def half_up(value: Fraction) -> int:
    magnitude = int(abs(value) + Fraction(1, 2))
    return magnitude if value >= 0 else -magnitude


def amount_of(line: SaleLine) -> int:
    return half_up(Fraction(line.quantity) * line.unit_price)


def vat_from_gross(gross: int, key: VatKey) -> int:
    """VAT contained in a gross amount: gross × p / (100 + p), rounded half up."""
    p = PERCENT[key]
    return half_up(Fraction(gross * p, 100 + p))


def sale(nr: str, quantity: str, unit_price: int, key: VatKey) -> SaleLine:
    return SaleLine(article_nr=nr, text=f"Article {nr}", quantity=Decimal(quantity), unit_price=unit_price, vat_key=key)


def book(number: int, lines: list[SaleLine], payment: PaymentType = PaymentType.CASH, name: str = "Bar", minute: int = 0) -> Receipt:
    return closed_receipt(
        receipt_number=number,
        lines=lines,
        payment_type=payment,
        payment_name=name,
        cashier=CASHIER,
        opened_at=T0 + dt.timedelta(minutes=minute),
        closed_at=T0 + dt.timedelta(minutes=minute, seconds=30),
        business_day=DAY,
    )


MIXED = [
    sale("A1", "2", 135, VatKey.REDUCED),  # bread
    sale("A2", "1", 250, VatKey.REGULAR),  # coffee
    sale("A3", "0.333", 1999, VatKey.REDUCED),  # by weight
    sale("A1", "-1", 135, VatKey.REDUCED),  # a return
    sale("A4", "1", 0, VatKey.REGULAR),  # free
    sale("A5", "3", 333, VatKey.REGULAR),
]


# ---------------------------------------------------------------------------
# closed_receipt


def test_lines_are_numbered_from_1_in_booking_order() -> None:
    receipt = book(1, MIXED)
    assert [line.line_no for line in receipt.lines] == list(range(1, len(MIXED) + 1))
    assert [line.article_nr for line in receipt.lines] == [s.article_nr for s in MIXED]
    assert [line.quantity for line in receipt.lines] == [s.quantity for s in MIXED]


def test_line_amounts_are_quantity_times_unit_price_half_up() -> None:
    receipt = book(1, MIXED)
    assert [line.amount for line in receipt.lines] == [amount_of(s) for s in MIXED]


def test_total_is_the_sum_of_the_lines_and_paid_in_one_payment() -> None:
    receipt = book(7, MIXED, PaymentType.DEBIT_CARD, "EC-Karte")
    expected_total = sum(amount_of(s) for s in MIXED)
    assert receipt.total == expected_total
    assert len(receipt.payments) == 1
    payment = receipt.payments[0]
    assert (payment.payment_type, payment.payment_name, payment.amount) == (PaymentType.DEBIT_CARD, "EC-Karte", expected_total)


def test_the_receipt_is_closed_with_the_given_number_times_and_cashier() -> None:
    receipt = book(42, MIXED, minute=5)
    assert receipt.status == "closed"
    assert receipt.receipt_number == 42
    assert receipt.opened_at == T0 + dt.timedelta(minutes=5)
    assert receipt.closed_at == T0 + dt.timedelta(minutes=5, seconds=30)
    assert receipt.business_day == DAY
    assert receipt.cashier == CASHIER
    assert receipt.business_case == BusinessCase.SALE


def test_vat_breakdown_has_one_entry_per_key_with_the_gross_of_its_lines() -> None:
    receipt = book(1, MIXED)
    gross: dict[VatKey, int] = defaultdict(int)
    for s in MIXED:
        gross[s.vat_key] += amount_of(s)
    assert {v.vat_key: v.gross for v in receipt.vat} == dict(gross)
    assert len(receipt.vat) == len(gross)


def test_vat_is_computed_from_the_gross_per_key_and_net_is_the_rest() -> None:
    receipt = book(1, MIXED)
    for v in receipt.vat:
        assert v.vat == vat_from_gross(v.gross, v.vat_key), v
        assert v.net + v.vat == v.gross


@pytest.mark.parametrize("key", [VatKey.REGULAR, VatKey.REDUCED])
@pytest.mark.parametrize("gross", [100, 107, 119, 250, 999, 1000, 12345, -350])
def test_vat_split_at_19_and_7_percent(key: VatKey, gross: int) -> None:
    receipt = book(1, [sale("X", "1", gross, key)])
    (v,) = receipt.vat
    assert (v.vat_key, v.gross) == (key, gross)
    assert v.vat == vat_from_gross(gross, key)
    assert v.net == gross - v.vat


def test_vat_of_a_key_is_split_from_the_sum_not_summed_per_line() -> None:
    # three lines of 10 cents at 19 %: per line VAT would be 2 cents each (6); on the sum 30 it is 5
    lines = [sale(f"L{i}", "1", 10, VatKey.REGULAR) for i in range(3)]
    (v,) = book(1, lines).vat
    assert v.gross == 30
    assert v.vat == vat_from_gross(30, VatKey.REGULAR)


def test_a_naive_time_is_refused() -> None:
    with pytest.raises(ValidationError):
        closed_receipt(
            receipt_number=1,
            lines=MIXED,
            payment_type=PaymentType.CASH,
            payment_name="Bar",
            cashier=CASHIER,
            opened_at=dt.datetime(2024, 3, 1, 8, 0),
            closed_at=T0,
            business_day=DAY,
        )


def test_each_receipt_gets_its_own_id() -> None:
    assert book(1, MIXED).receipt_id != book(1, MIXED).receipt_id


# ---------------------------------------------------------------------------
# z_report


def day_of_receipts() -> list[Receipt]:
    receipts = [
        book(3, [sale("A1", "2", 135, VatKey.REDUCED), sale("A2", "1", 250, VatKey.REGULAR)], minute=1),
        book(4, [sale("A2", "2", 250, VatKey.REGULAR)], PaymentType.DEBIT_CARD, "EC-Karte", minute=2),
        book(5, [sale("A1", "-1", 135, VatKey.REDUCED)], minute=3),  # a refund
        book(6, [sale("A3", "1.25", 1999, VatKey.REDUCED), sale("A4", "1", 0, VatKey.REGULAR)], minute=4),
    ]
    # a tip (not taxable) booked as its own business case
    tip = book(7, [sale("T", "1", 200, VatKey.NOT_TAXABLE)], minute=5)
    receipts.append(Receipt.model_validate({**tip.model_dump(), "business_case": BusinessCase.TIP}))
    return receipts


def test_zreport_counts_and_numbers_the_receipts() -> None:
    receipts = day_of_receipts()
    report = z_report(1, DAY, receipts, T0 + dt.timedelta(hours=12))
    numbers = [r.receipt_number for r in receipts]
    assert report.receipt_count == len(receipts)
    assert report.first_receipt_number == min(numbers)  # type: ignore[type-var]
    assert report.last_receipt_number == max(numbers)  # type: ignore[type-var]
    assert (report.z_nr, report.business_day) == (1, DAY)


def test_zreport_first_and_last_do_not_depend_on_the_order_given() -> None:
    receipts = day_of_receipts()
    report = z_report(2, DAY, list(reversed(receipts)), T0)
    assert report.first_receipt_number == min(r.receipt_number for r in receipts)  # type: ignore[type-var]
    assert report.last_receipt_number == max(r.receipt_number for r in receipts)  # type: ignore[type-var]


def test_zreport_total_is_the_sum_of_the_receipts() -> None:
    receipts = day_of_receipts()
    assert z_report(1, DAY, receipts, T0).total == sum(r.total for r in receipts)


def test_zreport_totals_per_vat_key() -> None:
    receipts = day_of_receipts()
    report = z_report(1, DAY, receipts, T0)
    gross: dict[VatKey, int] = defaultdict(int)
    for r in receipts:
        for line in r.lines:
            gross[line.vat_key] += line.amount
    assert {v.vat_key: v.gross for v in report.totals_by_vat} == dict(gross)
    assert len(report.totals_by_vat) == len(gross)
    for v in report.totals_by_vat:
        assert v.net + v.vat == v.gross
        assert v.vat == vat_from_gross(v.gross, v.vat_key)
    assert sum(v.gross for v in report.totals_by_vat) == report.total


def test_zreport_totals_per_payment_type() -> None:
    receipts = day_of_receipts()
    report = z_report(1, DAY, receipts, T0)
    paid: dict[tuple[PaymentType, str], int] = defaultdict(int)
    for r in receipts:
        for p in r.payments:
            paid[(p.payment_type, p.payment_name)] += p.amount
    got = {(p.payment_type, p.payment_name): p.amount for p in report.totals_by_payment_type}
    assert got == dict(paid)
    assert len(report.totals_by_payment_type) == len(paid)
    assert sum(p.amount for p in report.totals_by_payment_type) == report.total


def test_zreport_totals_per_business_case_and_vat_key() -> None:
    receipts = day_of_receipts()
    report = z_report(1, DAY, receipts, T0)
    by_case: dict[tuple[BusinessCase, VatKey], int] = defaultdict(int)
    for r in receipts:
        for line in r.lines:
            by_case[(r.business_case, line.vat_key)] += line.amount
    got = {(b.business_case, b.vat_key): b.gross for b in report.totals_by_business_case}
    assert got == dict(by_case)
    assert len(report.totals_by_business_case) == len(by_case)
    assert BusinessCase.TIP in {b.business_case for b in report.totals_by_business_case}
    assert sum(b.gross for b in report.totals_by_business_case) == report.total


def test_an_empty_day_gives_zero_totals_and_no_receipt_numbers() -> None:
    report = z_report(3, DAY, [], T0)
    assert report.receipt_count == 0
    assert report.first_receipt_number is None
    assert report.last_receipt_number is None
    assert report.total == 0
    assert sum(v.gross for v in report.totals_by_vat) == 0
    assert sum(p.amount for p in report.totals_by_payment_type) == 0
    assert sum(b.gross for b in report.totals_by_business_case) == 0


def test_a_day_of_one_refund_has_a_negative_total() -> None:
    refund = book(1, [sale("A1", "-2", 135, VatKey.REDUCED)])
    report = z_report(1, DAY, [refund], T0)
    assert report.total == -270
    assert report.first_receipt_number == report.last_receipt_number == 1
