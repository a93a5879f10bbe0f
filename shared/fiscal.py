"""Fiscal vocabulary and money arithmetic shared by the till agent and the services.

Money is integer cents everywhere; quantities are ``Decimal`` with 3 places. VAT keys
and payment types use the DSFinV-K code lists (DSFinV-K 2.4, Anhang "Stamm_USt",
``UST_SCHLUESSEL``; "Zahlarten", ``ZAHLART_TYP``).
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from enum import IntEnum, StrEnum

QUANTITY_STEP = Decimal("0.001")


class VatKey(IntEnum):
    """DSFinV-K ``UST_SCHLUESSEL``: the tax key of a line, not its rate."""

    REGULAR = 1  # Regelsteuersatz, 19 %
    REDUCED = 2  # ermäßigter Steuersatz, 7 %
    AVERAGE_24_1_3 = 3  # Durchschnittsatz § 24 (1) Nr. 3 UStG
    AVERAGE_24_1_1 = 4  # Durchschnittsatz § 24 (1) Nr. 1 UStG
    NOT_TAXABLE = 5  # nicht steuerbar, 0 %
    TAX_FREE = 6  # umsatzsteuerfrei, 0 %
    NO_VAT_SHOWN = 7  # UmsatzSt nicht ermittelbar (§ 25a UStG etc.)
    HISTORIC_REGULAR_16 = 11  # 16 %, 2020-07-01 .. 2020-12-31
    HISTORIC_REDUCED_5 = 12  # 5 %, 2020-07-01 .. 2020-12-31


# Percent per key for the keys whose rate is fixed by law (DSFinV-K 2.4, Stamm_USt).
VAT_PERCENT: dict[VatKey, Decimal] = {
    VatKey.REGULAR: Decimal("19"),
    VatKey.REDUCED: Decimal("7"),
    VatKey.AVERAGE_24_1_3: Decimal("9"),
    VatKey.AVERAGE_24_1_1: Decimal("5.5"),
    VatKey.NOT_TAXABLE: Decimal("0"),
    VatKey.TAX_FREE: Decimal("0"),
    VatKey.NO_VAT_SHOWN: Decimal("0"),
    VatKey.HISTORIC_REGULAR_16: Decimal("16"),
    VatKey.HISTORIC_REDUCED_5: Decimal("5"),
}


class PaymentType(StrEnum):
    """DSFinV-K ``ZAHLART_TYP``."""

    CASH = "Bar"
    NON_CASH = "Unbar"
    DEBIT_CARD = "ECKarte"
    CREDIT_CARD = "Kreditkarte"
    PAYMENT_SERVICE = "ElZahlungsdienstleister"
    VOUCHER = "GuthabenKarte"
    NONE = "Keine"


class BusinessCase(StrEnum):
    """DSFinV-K ``GV_TYP`` (the subset a till of this kind books)."""

    SALE = "Umsatz"
    TIP = "TrinkgeldAN"
    DEPOSIT = "Pfand"
    DISCOUNT = "Rabatt"


def round_cents(value: Decimal) -> int:
    """Round a Decimal amount of cents half up (commercial rounding) to an int.

    Raises ``ValueError`` for a value that is not finite or too large to round exactly.
    """
    try:
        return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    except (InvalidOperation, OverflowError, ValueError) as exc:
        raise ValueError(f"amount {value} cents is out of range") from exc


def line_amount(quantity: Decimal, unit_price: int) -> int:
    """Gross line amount in cents: ``quantity`` (3 places) × ``unit_price`` (cents), half up."""
    return round_cents(quantity * unit_price)


def split_gross(gross: int, vat_key: VatKey) -> tuple[int, int]:
    """Split a gross amount (cents) into ``(net, vat)`` cents for ``vat_key``.

    VAT is computed from the gross amount and rounded half up; net is the rest, so
    ``net + vat == gross`` always holds.
    """
    percent = VAT_PERCENT[vat_key]
    vat = round_cents(Decimal(gross) * percent / (Decimal(100) + percent))
    return gross - vat, vat
