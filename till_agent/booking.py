"""Building receipts and Z-reports on the till (pure functions, no I/O).

Amounts are integer cents; a line's amount is quantity × unit price rounded half up;
VAT per key is split from the gross sum of the lines with that key
(``shared.fiscal.split_gross``), so net + VAT = gross for every key.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Iterable

from shared.fiscal import BusinessCase, PaymentType, VatKey, line_amount, split_gross
from shared.models import (
    BusinessCaseTotal,
    Cashier,
    HandoverLine,
    Payment,
    PaymentTotal,
    Receipt,
    ReceiptLine,
    VatAmount,
    ZReport,
)


@dataclass(frozen=True)
class SaleLine:
    """One line as the cashier books it: article, quantity (negative = return), gross unit price in cents."""

    article_nr: str
    text: str
    quantity: Decimal
    unit_price: int
    vat_key: VatKey


def handover_line(line: SaleLine) -> HandoverLine:
    """``line`` as a line of a shared receipt, with a fresh ``line_id``; amount = quantity ×
    unit price in cents, half up."""
    return HandoverLine(
        line_id=uuid.uuid4(), article_nr=line.article_nr, text=line.text, quantity=line.quantity,
        unit_price=line.unit_price, amount=line_amount(line.quantity, line.unit_price), vat_key=line.vat_key,
    )


def summed_vat(amounts: Iterable[VatAmount]) -> tuple[VatAmount, ...]:
    """Gross/net/VAT per VAT key (ascending key), each the sum of ``amounts`` of that key (cents)."""
    sums: dict[VatKey, tuple[int, int, int]] = {}
    for v in amounts:
        gross, net, vat = sums.get(v.vat_key, (0, 0, 0))
        sums[v.vat_key] = (gross + v.gross, net + v.net, vat + v.vat)
    return tuple(VatAmount(vat_key=k, gross=g, net=n, vat=t) for k, (g, n, t) in sorted(sums.items()))


def vat_breakdown(amounts: Iterable[tuple[VatKey, int]]) -> tuple[VatAmount, ...]:
    """Gross/net/VAT per VAT key (ascending key) from ``(vat_key, gross cents)`` pairs."""
    gross: dict[VatKey, int] = {}
    for key, amount in amounts:
        gross[key] = gross.get(key, 0) + amount
    result = []
    for key in sorted(gross):
        net, vat = split_gross(gross[key], key)
        result.append(VatAmount(vat_key=key, gross=gross[key], net=net, vat=vat))
    return tuple(result)


def closed_receipt(
    *,
    receipt_number: int,
    lines: list[SaleLine],
    payment_type: PaymentType,
    payment_name: str,
    cashier: Cashier,
    opened_at: dt.datetime,
    closed_at: dt.datetime,
    business_day: dt.date,
) -> Receipt:
    """A receipt paid at once: lines numbered from 1, VAT breakdown, one payment of the total.

    Raises ``pydantic.ValidationError`` naming the problem for inconsistent input
    (e.g. a naive datetime).
    """
    amounts = [line_amount(line.quantity, line.unit_price) for line in lines]
    return _closed(
        receipt_id=uuid.uuid4(),
        receipt_number=receipt_number,
        lines=[
            {"article_nr": line.article_nr, "text": line.text, "quantity": line.quantity,
             "unit_price": line.unit_price, "amount": amount, "vat_key": line.vat_key}
            for line, amount in zip(lines, amounts)
        ],
        payments=(Payment(payment_type=payment_type, payment_name=payment_name, amount=sum(amounts)),),
        cashier=cashier,
        opened_at=opened_at,
        closed_at=closed_at,
        business_day=business_day,
    )


def shared_closed_receipt(
    *,
    receipt_id: uuid.UUID,
    receipt_number: int,
    lines: list[tuple[HandoverLine, uuid.UUID | None]],
    payments: tuple[Payment, ...],
    cashier: Cashier,
    opened_at: dt.datetime,
    closed_at: dt.datetime,
    business_day: dt.date,
) -> Receipt:
    """The fiscal state of a paid shared receipt: its standing lines in receipt order,
    numbered from 1 (POS_ZEILE), each with the till that entered it (``(line, till_id)``
    pairs; POS_TERMINAL_ID), the VAT breakdown and the accepted payments.

    Raises ``pydantic.ValidationError`` if the payments do not add up to the lines.
    """
    return _closed(
        receipt_id=receipt_id,
        receipt_number=receipt_number,
        lines=[line.model_dump(exclude={"line_id"}) | {"terminal_id": till_id} for line, till_id in lines],
        payments=payments,
        cashier=cashier,
        opened_at=opened_at,
        closed_at=closed_at,
        business_day=business_day,
    )


def _closed(
    *,
    receipt_id: uuid.UUID,
    receipt_number: int,
    lines: list[dict[str, object]],
    payments: tuple[Payment, ...],
    cashier: Cashier,
    opened_at: dt.datetime,
    closed_at: dt.datetime,
    business_day: dt.date,
) -> Receipt:
    receipt_lines = tuple(ReceiptLine(line_no=i, **line) for i, line in enumerate(lines, start=1))  # type: ignore[arg-type]
    return Receipt(
        receipt_id=receipt_id,
        receipt_number=receipt_number,
        status="closed",
        business_day=business_day,
        opened_at=opened_at,
        closed_at=closed_at,
        cashier=cashier,
        lines=receipt_lines,
        vat=vat_breakdown((line.vat_key, line.amount) for line in receipt_lines),
        total=sum(line.amount for line in receipt_lines),
        payments=payments,
    )


def z_report(z_nr: int, business_day: dt.date, receipts: list[Receipt], created_at: dt.datetime) -> ZReport:
    """The Z-report of ``receipts`` (closed, of one till and business day).

    Totals per VAT key (gross, net and VAT each the sum of the receipts' own, so the
    closing equals its receipts to the cent: DSFinV-K 2.4 Z_GV_Typ / Bonkopf_USt), per
    payment type and per business case and VAT key; first and last receipt number; an
    empty day gives a Z-report with zero totals.
    """
    by_payment: dict[tuple[PaymentType, str], int] = {}
    by_case: dict[tuple[BusinessCase, VatKey], int] = {}
    for receipt in receipts:
        for payment in receipt.payments:
            key = (payment.payment_type, payment.payment_name)
            by_payment[key] = by_payment.get(key, 0) + payment.amount
        for line in receipt.lines:
            case_key = (receipt.business_case, line.vat_key)
            by_case[case_key] = by_case.get(case_key, 0) + line.amount
    numbers = [r.receipt_number for r in receipts if r.receipt_number is not None]
    return ZReport(
        z_nr=z_nr,
        business_day=business_day,
        created_at=created_at,
        receipt_count=len(receipts),
        first_receipt_number=min(numbers) if numbers else None,
        last_receipt_number=max(numbers) if numbers else None,
        totals_by_vat=summed_vat(v for r in receipts for v in r.vat),
        totals_by_payment_type=tuple(
            PaymentTotal(payment_type=t, payment_name=n, amount=a) for (t, n), a in sorted(by_payment.items())
        ),
        totals_by_business_case=tuple(
            BusinessCaseTotal(business_case=c, vat_key=k, gross=g) for (c, k), g in sorted(by_case.items())
        ),
        total=sum(r.total for r in receipts),
    )
