"""Wire models (shared/models.py): extra fields, schema version, fiscal consistency, secrets."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from shared.fiscal import BusinessCase, PaymentType, VatKey
from shared.models import (
    UPLOAD_ADAPTER,
    AccountRequest,
    Article,
    BusinessCaseTotal,
    Cashier,
    CreateAccount,
    MasterDataRecord,
    Payment,
    PaymentTotal,
    Receipt,
    ReceiptLine,
    SetSyncMode,
    SignedIn,
    SignIn,
    SignOut,
    SyncMode,
    TillAuth,
    Upload,
    VatAmount,
    ZReport,
)

pytestmark = pytest.mark.unit

T0 = dt.datetime(2024, 3, 1, 9, 30, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(minutes=3)
DAY = T0.date()
CASHIER = Cashier(cashier_id="1", name="Anna")


def half_up(value: Fraction) -> int:
    """Commercial rounding: to the nearest integer, halves away from zero."""
    magnitude = abs(value)
    rounded = int(magnitude + Fraction(1, 2))  # floor for non-negative values
    return rounded if value >= 0 else -rounded


def expected_amount(quantity: str, unit_price: int) -> int:
    return half_up(Fraction(Decimal(quantity)) * unit_price)


def line_data(line_no: int, quantity: str, unit_price: int, vat_key: VatKey, amount: int | None = None) -> dict[str, Any]:
    return {
        "line_no": line_no,
        "article_nr": f"A{line_no}",
        "text": f"Article {line_no}",
        "quantity": Decimal(quantity),
        "unit_price": unit_price,
        "amount": expected_amount(quantity, unit_price) if amount is None else amount,
        "vat_key": vat_key,
    }


def vat_data(vat_key: VatKey, gross: int) -> dict[str, Any]:
    # Only net + vat = gross is checked by the model; the split itself is booking's job.
    return {"vat_key": vat_key, "gross": gross, "net": gross - gross // 10, "vat": gross // 10}


def receipt_data(**changes: Any) -> dict[str, Any]:
    """A consistent closed receipt: 2 × 1,50 € at 7 % and 1 × 2,50 € at 19 %, paid cash."""
    lines = [line_data(1, "2", 150, VatKey.REDUCED), line_data(2, "1", 250, VatKey.REGULAR)]
    total = sum(line["amount"] for line in lines)
    data: dict[str, Any] = {
        "receipt_id": uuid.uuid4(),
        "receipt_number": 1,
        "status": "closed",
        "business_day": DAY,
        "opened_at": T0,
        "closed_at": T1,
        "cashier": CASHIER,
        "lines": lines,
        "vat": [vat_data(VatKey.REDUCED, lines[0]["amount"]), vat_data(VatKey.REGULAR, lines[1]["amount"])],
        "total": total,
        "payments": [{"payment_type": PaymentType.CASH, "payment_name": "Bar", "amount": total}],
    }
    data.update(changes)
    return data


def zreport_data(**changes: Any) -> dict[str, Any]:
    """A consistent Z-report: 1000 cents at 7 % and 500 at 19 %, paid 900 cash and 600 by card."""
    data: dict[str, Any] = {
        "z_nr": 1,
        "business_day": DAY,
        "created_at": T1,
        "receipt_count": 3,
        "first_receipt_number": 1,
        "last_receipt_number": 3,
        "totals_by_vat": [vat_data(VatKey.REDUCED, 1000), vat_data(VatKey.REGULAR, 500)],
        "totals_by_payment_type": [
            {"payment_type": PaymentType.CASH, "payment_name": "Bar", "amount": 900},
            {"payment_type": PaymentType.DEBIT_CARD, "payment_name": "EC", "amount": 600},
        ],
        "totals_by_business_case": [
            {"business_case": BusinessCase.SALE, "vat_key": VatKey.REDUCED, "gross": 1000},
            {"business_case": BusinessCase.SALE, "vat_key": VatKey.REGULAR, "gross": 500},
        ],
        "total": 1500,
    }
    data.update(changes)
    return data


def article(nr: str = "A1") -> Article:
    return Article(article_nr=nr, text="Brezel", unit_price=95, vat_key=VatKey.REDUCED)


def upload(record: Any) -> Upload:
    return Upload.sealed(
        None,
        record_id=uuid.uuid4(),
        account_id=uuid.uuid4(),
        till_id=uuid.uuid4(),
        till_seq=7,
        recorded_at=T1,
        record=record,
    )


def signed_in(**changes: Any) -> SignedIn:
    data: dict[str, Any] = {
        "account_id": uuid.uuid4(),
        "account_name": "owner@example.com",
        "till_id": uuid.uuid4(),
        "broker_username": "till-x",
        "broker_password": "broker-Secret-123",
        "vhost": "tillsync",
        "upload_exchange": "till.upload",
        "queue": "till.x",
        "last_till_seq": 0,
        "sync_enabled": True,
        "sync_mode": SyncMode.ARCHIVE,
    }
    data.update(changes)
    return SignedIn(**data)


def error_fields(exc: pytest.ExceptionInfo[ValidationError]) -> list[tuple[str, ...]]:
    return [tuple(str(p) for p in e["loc"]) for e in exc.value.errors()]


# ---------------------------------------------------------------------------
# extra fields and schema version


@pytest.mark.parametrize(
    ("model", "data"),
    [
        (Article, {"article_nr": "A1", "text": "Brezel", "unit_price": 95, "vat_key": 2}),
        (Cashier, {"cashier_id": "1", "name": "Anna"}),
        (Payment, {"payment_type": "Bar", "payment_name": "Bar", "amount": 1}),
        (Receipt, receipt_data()),
        (ZReport, zreport_data()),
    ],
)
def test_an_unknown_field_is_refused_and_named(model: type, data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as exc:
        model(**data, colour="red")
    assert ("colour",) in error_fields(exc)
    assert "colour" in str(exc.value)


def test_an_unknown_field_deep_inside_an_upload_is_refused_and_named() -> None:
    wire = json.loads(upload(Receipt(**receipt_data())).model_dump_json())
    wire["record"]["lines"][0]["discount"] = 10
    with pytest.raises(ValidationError) as exc:
        Upload.model_validate(wire)
    assert any(loc[-1] == "discount" and "lines" in loc for loc in error_fields(exc))


def test_an_unknown_field_inside_an_account_request_is_refused() -> None:
    wire = {"request": {"command": "sign_out", "till_id": str(uuid.uuid4()), "till_secret": "s", "admin": True}}
    with pytest.raises(ValidationError) as exc:
        AccountRequest.model_validate(wire)
    assert any(loc[-1] == "admin" for loc in error_fields(exc))


def test_schema_version_defaults_to_1() -> None:
    assert upload(article_record()).schema_version == 1
    assert AccountRequest(request=SignOut(till_id=uuid.uuid4(), till_secret="s")).schema_version == 1


@pytest.mark.parametrize("version", [0, 2, "2"])
def test_any_other_schema_version_is_refused(version: Any) -> None:
    wire = json.loads(upload(article_record()).model_dump_json())
    wire["schema_version"] = version
    with pytest.raises(ValidationError) as exc:
        Upload.model_validate(wire)
    assert ("schema_version",) in error_fields(exc)
    request = {"schema_version": version, "request": {"command": "sign_out", "till_id": str(uuid.uuid4()), "till_secret": "s"}}
    with pytest.raises(ValidationError):
        AccountRequest.model_validate(request)


def test_models_are_immutable() -> None:
    a = article()
    with pytest.raises(ValidationError):
        a.unit_price = 1  # type: ignore[misc]


# ---------------------------------------------------------------------------
# receipt lines: amount = quantity × unit price, half up


@pytest.mark.parametrize(
    ("quantity", "unit_price"),
    [
        ("1", 90),
        ("3", 120),
        ("0.333", 150),  # 49.95 → 50
        ("2.5", 1),  # 2.5 → 3
        ("0.001", 500),  # 0.5 → 1
        ("0.001", 499),  # 0.499 → 0
        ("1.255", 100),  # 125.5 → 126
        ("-1", 90),  # a return
        ("-2.5", 1),  # a return of a half: -2.5 → -3
        ("-0.333", 150),
        ("4", 0),  # a free line
        ("-1", 0),
    ],
)
def test_line_amount_is_quantity_times_unit_price_rounded_half_up(quantity: str, unit_price: int) -> None:
    amount = expected_amount(quantity, unit_price)
    line = ReceiptLine(**line_data(1, quantity, unit_price, VatKey.REGULAR, amount=amount))
    assert line.amount == amount
    for wrong in (amount - 1, amount + 1):
        with pytest.raises(ValidationError):
            ReceiptLine(**line_data(1, quantity, unit_price, VatKey.REGULAR, amount=wrong))


@pytest.mark.parametrize(("quantity", "unit_price"), [("1", 90), ("0.5", 3), ("2.345", 199), ("0.001", 500)])
def test_returning_a_quantity_refunds_exactly_what_it_cost(quantity: str, unit_price: int) -> None:
    sale = ReceiptLine(**line_data(1, quantity, unit_price, VatKey.REGULAR))
    ret = ReceiptLine(**line_data(2, "-" + quantity, unit_price, VatKey.REGULAR))
    assert ret.amount == -sale.amount


@pytest.mark.parametrize("quantity", ["1", "1.5", "-2", "0.1", "12.34"])
def test_quantity_gets_three_decimal_places(quantity: str) -> None:
    line = ReceiptLine(**line_data(1, quantity, 100, VatKey.REGULAR))
    assert line.quantity == Decimal(quantity)
    assert line.quantity.as_tuple().exponent == -3
    assert json.loads(line.model_dump_json())["quantity"] == str(Decimal(quantity).quantize(Decimal("0.001")))


@pytest.mark.parametrize("quantity", ["1.2345", "0.0001", "-3.0005"])
def test_quantity_with_more_than_three_places_is_refused(quantity: str) -> None:
    data = line_data(1, quantity, 100, VatKey.REGULAR)
    with pytest.raises(ValidationError) as exc:
        ReceiptLine(**data)
    assert ("quantity",) in error_fields(exc)


# ---------------------------------------------------------------------------
# receipts


def test_a_consistent_closed_receipt_is_accepted() -> None:
    receipt = Receipt(**receipt_data())
    assert receipt.total == sum(line.amount for line in receipt.lines)


def test_an_open_receipt_needs_no_number_close_time_or_payment() -> None:
    receipt = Receipt(**receipt_data(status="open", receipt_number=None, closed_at=None, payments=[]))
    assert receipt.status == "open"


def test_total_must_be_the_sum_of_the_lines() -> None:
    good = receipt_data()
    for wrong in (good["total"] + 1, good["total"] - 1, 0):
        payments = [{"payment_type": PaymentType.CASH, "payment_name": "Bar", "amount": wrong}]
        with pytest.raises(ValidationError, match="total"):
            Receipt(**receipt_data(total=wrong, payments=payments))


def test_vat_breakdown_must_match_the_lines_per_key() -> None:
    lines = receipt_data()["lines"]
    reduced, regular = lines[0]["amount"], lines[1]["amount"]
    wrong_breakdowns = [
        [vat_data(VatKey.REDUCED, reduced + 1), vat_data(VatKey.REGULAR, regular - 1)],  # sums still right
        [vat_data(VatKey.REDUCED, reduced + regular)],  # one key missing
        [vat_data(VatKey.REDUCED, reduced), vat_data(VatKey.REGULAR, regular), vat_data(VatKey.TAX_FREE, 0)],
        [vat_data(VatKey.REGULAR, reduced), vat_data(VatKey.REDUCED, regular)],  # keys swapped
        [vat_data(VatKey.REDUCED, reduced), vat_data(VatKey.REDUCED, 0), vat_data(VatKey.REGULAR, regular)],
        [],
    ]
    for vat in wrong_breakdowns:
        with pytest.raises(ValidationError):
            Receipt(**receipt_data(vat=vat))


def test_vat_amount_net_plus_vat_must_be_gross() -> None:
    VatAmount(vat_key=VatKey.REGULAR, gross=119, net=100, vat=19)
    with pytest.raises(ValidationError):
        VatAmount(vat_key=VatKey.REGULAR, gross=119, net=100, vat=20)


def test_line_numbers_must_not_repeat() -> None:
    lines = [line_data(1, "1", 100, VatKey.REGULAR), line_data(1, "1", 100, VatKey.REGULAR)]
    with pytest.raises(ValidationError):
        Receipt(
            **receipt_data(
                lines=lines,
                vat=[vat_data(VatKey.REGULAR, 200)],
                total=200,
                payments=[{"payment_type": "Bar", "payment_name": "Bar", "amount": 200}],
            )
        )


@pytest.mark.parametrize("missing", ["receipt_number", "closed_at"])
def test_a_closed_receipt_needs_number_and_close_time(missing: str) -> None:
    with pytest.raises(ValidationError):
        Receipt(**receipt_data(**{missing: None}))


def test_a_closed_receipt_needs_payments_that_add_up_to_the_total() -> None:
    total = receipt_data()["total"]
    for payments in (
        [],
        [{"payment_type": "Bar", "payment_name": "Bar", "amount": total - 1}],
        [{"payment_type": "Bar", "payment_name": "Bar", "amount": total}, {"payment_type": "Bar", "payment_name": "Bar", "amount": 1}],
    ):
        with pytest.raises(ValidationError, match="payments"):
            Receipt(**receipt_data(payments=payments))
    split = [
        {"payment_type": "Bar", "payment_name": "Bar", "amount": total - 100},
        {"payment_type": "ECKarte", "payment_name": "EC", "amount": 100},
    ]
    assert Receipt(**receipt_data(payments=split)).total == total


def test_a_receipt_with_a_return_and_a_free_line_is_consistent() -> None:
    lines = [
        line_data(1, "2", 120, VatKey.REDUCED),
        line_data(2, "-1", 120, VatKey.REDUCED),
        line_data(3, "1", 0, VatKey.REDUCED),
    ]
    total = sum(line["amount"] for line in lines)
    receipt = Receipt(
        **receipt_data(
            lines=lines,
            vat=[vat_data(VatKey.REDUCED, total)],
            total=total,
            payments=[{"payment_type": "Bar", "payment_name": "Bar", "amount": total}],
        )
    )
    assert receipt.total == 120


@pytest.mark.parametrize("field", ["opened_at", "closed_at"])
def test_naive_datetimes_are_refused_in_a_receipt(field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        Receipt(**receipt_data(**{field: dt.datetime(2024, 3, 1, 9, 30)}))
    assert (field,) in error_fields(exc)


def test_naive_datetimes_are_refused_in_an_upload_and_a_zreport() -> None:
    with pytest.raises(ValidationError):
        Upload.sealed(
            None,
            record_id=uuid.uuid4(),
            account_id=uuid.uuid4(),
            till_id=uuid.uuid4(),
            till_seq=1,
            recorded_at=dt.datetime(2024, 3, 1, 9, 30),
            record=article_record(),
        )
    with pytest.raises(ValidationError):
        ZReport(**zreport_data(created_at=dt.datetime(2024, 3, 1, 20, 0)))


# ---------------------------------------------------------------------------
# Z-reports


def test_a_consistent_zreport_is_accepted() -> None:
    assert ZReport(**zreport_data()).total == 1500


@pytest.mark.parametrize(
    "changes",
    [
        {"total": 1501},
        {"totals_by_vat": [vat_data(VatKey.REDUCED, 1000), vat_data(VatKey.REGULAR, 499)]},
        {"totals_by_payment_type": [{"payment_type": "Bar", "payment_name": "Bar", "amount": 900}]},
        {"totals_by_business_case": [{"business_case": "Umsatz", "vat_key": 1, "gross": 1499}]},
    ],
)
def test_zreport_totals_must_add_up(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ZReport(**zreport_data(**changes))


def test_zreport_receipt_numbers_are_given_exactly_when_there_are_receipts() -> None:
    with pytest.raises(ValidationError):
        ZReport(**zreport_data(first_receipt_number=None, last_receipt_number=None))
    with pytest.raises(ValidationError):
        ZReport(**zreport_data(receipt_count=0))
    with pytest.raises(ValidationError):
        ZReport(**zreport_data(first_receipt_number=4, last_receipt_number=3))
    empty = ZReport(
        **zreport_data(
            receipt_count=0,
            first_receipt_number=None,
            last_receipt_number=None,
            totals_by_vat=[],
            totals_by_payment_type=[],
            totals_by_business_case=[],
            total=0,
        )
    )
    assert empty.total == 0


# ---------------------------------------------------------------------------
# master data


def article_record(**changes: Any) -> MasterDataRecord:
    data: dict[str, Any] = {"entity_kind": "article", "entity_key": "A1", "data": article("A1")}
    data.update(changes)
    return MasterDataRecord(**data)


def test_an_upsert_carries_matching_data() -> None:
    record = article_record()
    assert record.data is not None and record.data.key == record.entity_key


def test_a_deletion_carries_no_data() -> None:
    assert article_record(deleted=True, data=None).data is None
    with pytest.raises(ValidationError, match="deletion"):
        article_record(deleted=True)


def test_an_upsert_without_data_is_refused() -> None:
    with pytest.raises(ValidationError):
        article_record(data=None)


def test_data_kind_must_match_entity_kind() -> None:
    with pytest.raises(ValidationError):
        article_record(entity_kind="customer")


def test_data_key_must_match_entity_key() -> None:
    with pytest.raises(ValidationError):
        article_record(entity_key="A2")
    with pytest.raises(ValidationError):
        MasterDataRecord(entity_kind="cashier", entity_key="7", data={"entity": "cashier", "cashier_id": "8", "name": "Bo"})


# ---------------------------------------------------------------------------
# secrets


PASSWORD = "Clear-Text-Pw-93!"


@pytest.mark.parametrize(
    ("model", "secret"),
    [
        (SignIn(account_name="owner@example.com", password=PASSWORD, serial_number="S-1", till_name="Kasse 1"), PASSWORD),
        (CreateAccount(account_name="owner@example.com", password=PASSWORD), PASSWORD),
        (signed_in(broker_password=PASSWORD), PASSWORD),
        (TillAuth(till_id=uuid.uuid4(), till_secret=PASSWORD), PASSWORD),
        (SignOut(till_id=uuid.uuid4(), till_secret=PASSWORD), PASSWORD),
        (
            SetSyncMode(till_id=uuid.uuid4(), till_secret=PASSWORD, sync_enabled=True, sync_mode=SyncMode.ARCHIVE),
            PASSWORD,
        ),
    ],
    ids=["SignIn", "CreateAccount", "SignedIn", "TillAuth", "SignOut", "SetSyncMode"],
)
def test_secrets_are_hidden_in_repr_and_str_but_travel_on_the_wire(model: Any, secret: str) -> None:
    assert secret not in repr(model)
    assert secret not in str(model)
    assert secret in model.model_dump_json()
    # and the wire form parses back to the same secret
    again = type(model).model_validate_json(model.model_dump_json())
    assert again == model


def test_a_secret_inside_a_request_envelope_is_hidden_in_repr_but_sent() -> None:
    request = AccountRequest(
        request=SignIn(account_name="owner@example.com", password=PASSWORD, serial_number="S-1", till_name="Kasse 1")
    )
    assert PASSWORD not in repr(request)
    assert PASSWORD not in str(request)
    assert json.loads(request.model_dump_json())["request"]["password"] == PASSWORD


# ---------------------------------------------------------------------------
# uploads and account requests


@pytest.mark.parametrize("kind", ["masterdata", "receipt", "zreport"])
def test_upload_json_round_trip_is_equal(kind: str) -> None:
    record = {
        "masterdata": article_record(),
        "receipt": Receipt(**receipt_data()),
        "zreport": ZReport(**zreport_data()),
    }[kind]
    original = upload(record)
    wire = original.model_dump_json()
    assert Upload.model_validate_json(wire) == original
    assert UPLOAD_ADAPTER.validate_json(wire) == original
    assert json.loads(wire)["record"]["kind"] == kind


def test_upload_record_is_chosen_by_kind() -> None:
    wire = json.loads(upload(Receipt(**receipt_data())).model_dump_json())
    wire["record"]["kind"] = "zreport"
    with pytest.raises(ValidationError):
        Upload.model_validate(wire)


def test_till_seq_starts_at_1() -> None:
    wire = json.loads(upload(article_record()).model_dump_json())
    wire["till_seq"] = 0
    with pytest.raises(ValidationError):
        Upload.model_validate(wire)


@pytest.mark.parametrize(
    ("inner", "expected"),
    [
        ({"command": "create_account", "account_name": "a@b.de", "password": PASSWORD}, CreateAccount),
        (
            {"command": "sign_in", "account_name": "a@b.de", "password": PASSWORD, "serial_number": "S", "till_name": "K"},
            SignIn,
        ),
        ({"command": "sign_out", "till_id": str(uuid.uuid4()), "till_secret": "s"}, SignOut),
        (
            {
                "command": "set_sync_mode",
                "till_id": str(uuid.uuid4()),
                "till_secret": "s",
                "sync_enabled": True,
                "sync_mode": "archive",
            },
            SetSyncMode,
        ),
    ],
)
def test_account_request_is_discriminated_by_command(inner: dict[str, Any], expected: type) -> None:
    request = TypeAdapter(AccountRequest).validate_json(json.dumps({"schema_version": 1, "request": inner}))
    assert type(request.request) is expected
    assert request.request.command == inner["command"]


def test_an_unknown_command_is_refused() -> None:
    with pytest.raises(ValidationError):
        AccountRequest.model_validate({"request": {"command": "delete_account", "till_id": str(uuid.uuid4()), "till_secret": "s"}})


def test_a_request_without_command_is_refused() -> None:
    with pytest.raises(ValidationError):
        AccountRequest.model_validate({"request": {"account_name": "a@b.de", "password": PASSWORD}})


def test_custom_flags_are_given_exactly_for_custom_mode() -> None:
    common = {"till_id": uuid.uuid4(), "till_secret": "s", "sync_enabled": True}
    with pytest.raises(ValidationError):
        SetSyncMode(**common, sync_mode=SyncMode.CUSTOM)
    with pytest.raises(ValidationError):
        SetSyncMode(**common, sync_mode=SyncMode.ARCHIVE, custom={"download_receipts": True})
    assert SetSyncMode(**common, sync_mode=SyncMode.CUSTOM, custom={"download_receipts": True}).custom is not None


def test_money_must_be_integer_cents() -> None:
    with pytest.raises(ValidationError):
        Payment(payment_type=PaymentType.CASH, payment_name="Bar", amount=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        PaymentTotal(payment_type=PaymentType.CASH, payment_name="Bar", amount="100")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        BusinessCaseTotal(business_case=BusinessCase.SALE, vat_key=VatKey.REGULAR, gross=1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("cents", [10**11 + 1, -(10**11) - 1, 99999999999999999999])
def test_amounts_beyond_the_plausible_range_are_refused(cents: int) -> None:
    """Every amount stays an exact JSON integer, so the archive can always hash it (RFC 8785)."""
    from shared.models import MAX_CENTS, Article

    with pytest.raises(ValidationError, match="unit_price"):
        Article(article_nr="1", text="x", unit_price=cents, vat_key=1)
    assert Article(article_nr="1", text="x", unit_price=MAX_CENTS, vat_key=1).unit_price == MAX_CENTS


def test_a_zero_quantity_line_is_refused() -> None:
    from shared.models import ReceiptLine

    with pytest.raises(ValidationError, match="quantity must not be 0"):
        ReceiptLine(line_no=1, article_nr="1", text="x", quantity="0", unit_price=100, amount=0, vat_key=1)


@pytest.mark.parametrize("text", ["B\x00C", "tab\x0bvertical", "bell\x07"])
def test_control_characters_are_refused_in_texts(text: str) -> None:
    """PostgreSQL cannot store NUL; such a record must be refused at the till, not lost later."""
    from shared.models import Article

    with pytest.raises(ValidationError, match="control characters"):
        Article(article_nr="1", text=text, unit_price=100, vat_key=1)
    assert Article(article_nr="1", text="Café «Crème», 0,5 l", unit_price=100, vat_key=1)
