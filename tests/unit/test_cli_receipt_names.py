"""Naming a shared receipt on the command line (by id prefix or table), with a fake store."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from decimal import Decimal
from uuid import UUID

import pytest

from shared.fiscal import VatKey
from shared.models import HandoverLine
from tillsync.cli import _resolve_receipt
from till_agent.handover import ReceiptView, ViewLine

pytestmark = pytest.mark.unit


@dataclass
class FakeStore:
    views: list[ReceiptView]
    receipt_mode: bool = True

    def shared_receipts(self, status: str | None = "open") -> list[ReceiptView]:
        return [v for v in self.views if status is None or v.status == status]

    def find_shared_receipts(self, id_prefix: str) -> list[ReceiptView]:
        return [v for v in self.views if v.receipt_id.hex.startswith(id_prefix)]

    def hands_over_receipts(self) -> bool:
        return self.receipt_mode

    def sync_settings(self) -> tuple[bool, str, str | None]:
        return True, "archive_masterdata_receipts" if self.receipt_mode else "archive", None


@dataclass
class FakeTill:
    store: FakeStore

    def open_receipts(self) -> list[ReceiptView]:
        return self.store.shared_receipts("open")

    def receipt(self, receipt_id: UUID) -> ReceiptView:
        return next(v for v in self.store.views if v.receipt_id == receipt_id)


def view(receipt_id: str, table_nr: str | None, status: str = "open", closed_minute: int = 0) -> ReceiptView:
    line = HandoverLine(line_id=uuid.uuid4(), article_nr="B1", text="Bier", quantity=Decimal("1"), unit_price=350,
                        amount=350, vat_key=VatKey.REGULAR)
    return ReceiptView(
        receipt_id=UUID(receipt_id), status=status, table_nr=table_nr, customer_nr=None, position=1, pending=0,
        lines=(ViewLine(line, None, None, False),), total=350, opened_by=None, opened_by_name=None, opened_at=None, cashier=None,
        closed_by=None, closed_by_name=None,
        closed_at=dt.datetime(2026, 1, 1, 12, closed_minute, tzinfo=dt.UTC) if status == "closed" else None,
        receipt_number=None, payment_pending=False, merged_into=None,
    )


def test_a_receipt_is_named_by_a_unique_prefix_or_its_table() -> None:
    views = [
        view("aaaaaaaa-1111-4111-8111-111111111111", "5"),
        view("aaaaaaaa-2222-4222-8222-222222222222", "5"),  # the till's own opening, not yet refused
        view("bbbbbbbb-3333-4333-8333-333333333333", "6", "closed", closed_minute=1),
        view("bbbbbbbb-4444-4444-8444-444444444444", "6", "closed", closed_minute=2),
    ]
    till = FakeTill(FakeStore(views))
    assert _resolve_receipt(till, "AAAAAAAA-1111").receipt_id == views[0].receipt_id  # type: ignore[arg-type]
    assert _resolve_receipt(till, str(views[3].receipt_id)).receipt_id == views[3].receipt_id  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="aaaaaaaa matches 2 receipts"):
        _resolve_receipt(till, "aaaaaaaa")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="table 5 has 2 open receipts on this till"):
        _resolve_receipt(till, "table:5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no open receipt for table 6"):
        _resolve_receipt(till, "table:6")  # type: ignore[arg-type]
    assert _resolve_receipt(till, "table:6", last_closed=True).receipt_id == views[3].receipt_id  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is no receipt id"):
        _resolve_receipt(till, "aaaa")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"does not hand over receipts"):
        _resolve_receipt(FakeTill(FakeStore([], receipt_mode=False)), "table:1")  # type: ignore[arg-type]
