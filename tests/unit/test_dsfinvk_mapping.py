"""The DSFinV-K mapping and ZIP writer (tillsync/dsfinvk_export.py) on hand-made records."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import uuid
import xml.etree.ElementTree as ET
import zipfile
from decimal import Decimal
from pathlib import Path

import pytest
from dsfinvk.collection import Collection
from dsfinvk import models as dm
from dsfinvk.models import Bonkopf, Bonpos
from dsfinvk.validate import validate_zip

from shared.fiscal import PaymentType, VatKey
from shared.models import Cashier, Receipt, TseData
from till_agent.booking import SaleLine, closed_receipt, z_report
from tillsync.archive_status import euros
from tillsync.dsfinvk_export import (
    DTD_NAME,
    TABLES,
    TillRef,
    _closing_rows,
    _discrepancies,
    _ranges,
    _ZipWriter,
    gdpdu_dtd,
    index_xml,
)

pytestmark = pytest.mark.unit

TILL = TillRef(uuid.uuid4(), uuid.uuid4(), "shop@example.com", "SN-1", "Kasse 1")
OTHER = uuid.uuid4()  # another till of the account
SERIALS = {TILL.till_id: TILL.serial_number, OTHER: "SN-2"}
DAY = dt.date(2024, 7, 1)
T0 = dt.datetime(2024, 7, 1, 6, 30, tzinfo=dt.UTC)  # 08:30 in Berlin (summer time)


def receipt(number: int, *lines: SaleLine, payment: PaymentType = PaymentType.CASH, cashier: str = "Anna") -> Receipt:
    return closed_receipt(
        receipt_number=number, lines=list(lines), payment_type=payment, payment_name=payment.value,
        cashier=Cashier(cashier_id="1", name=cashier), opened_at=T0, closed_at=T0 + dt.timedelta(minutes=2),
        business_day=DAY,
    )


BREAD = SaleLine("A1", "Brot", Decimal("2"), 1234_50, VatKey.REDUCED)  # 2 × 1.234,50 €
COFFEE = SaleLine("B7", "Kaffee; \"groß\"", Decimal("1"), 250, VatKey.REGULAR)


def write(tmp_path: Path, receipts: list[Receipt]) -> tuple[Path, _ZipWriter]:
    path = tmp_path / "export.zip"
    with _ZipWriter(path) as writer:
        _closing_rows(writer, TILL, z_report(1, DAY, receipts, T0 + dt.timedelta(hours=10)), receipts, SERIALS)
        writer.finish()
    return path, writer


def read(path: Path) -> dict[str, list[dict[str, str]]]:
    with zipfile.ZipFile(path) as zf:
        return {
            n: list(csv.DictReader(io.StringIO(zf.read(n).decode(), newline=""), delimiter=";"))
            for n in zf.namelist() if n.endswith(".csv")
        }


def validated(path: Path) -> list[str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        errors = validate_zip(str(path))
    assert printed.getvalue() == ""  # the validator prints number-format and length problems
    return errors


def test_a_closing_maps_to_valid_dsfinvk_tables(tmp_path: Path) -> None:
    shared = receipt(2, BREAD, COFFEE, payment=PaymentType.DEBIT_CARD)
    shared = shared.model_copy(update={"lines": (shared.lines[0], shared.lines[1].model_copy(update={"terminal_id": OTHER}))})
    path, writer = write(tmp_path, [receipt(1, BREAD), shared])
    assert validated(path) == []
    data = read(path)
    assert set(data) == {
        "lines.csv", "lines_vat.csv", "transactions.csv", "transactions_vat.csv", "datapayment.csv",
        "cashpointclosing.csv", "cashregister.csv", "slaves.csv", "vat.csv", "businesscases.csv", "payment.csv",
        "cash_per_currency.csv",
    }
    first = data["transactions.csv"][0]
    assert (first["Z_KASSE_ID"], first["Z_NR"], first["BON_NR"], first["BON_TYP"]) == ("SN-1", "1", "1", "Beleg")
    assert (first["BON_START"], first["BON_ENDE"], first["Z_ERSTELLUNG"]) == (
        "2024-07-01T08:30:00", "2024-07-01T08:32:00", "2024-07-01T18:30:00"  # Europe/Berlin, UTC+2
    )
    assert (first["UMS_BRUTTO"], first["BEDIENER_ID"], first["BEDIENER_NAME"], first["BON_STORNO"]) == ("2.469,00", "1", "Anna", "0")
    line = data["lines.csv"][0]
    assert (line["MENGE"], line["STK_BR"], line["ART_NR"], line["GV_TYP"], line["POS_TERMINAL_ID"]) == (
        "2,000", "1.234,50000", "A1", "Umsatz", "SN-1"
    )
    # the line entered on the other till names it, and the closing lists it as a terminal
    assert [r["POS_TERMINAL_ID"] for r in data["lines.csv"] if r["BON_ID"] == str(shared.receipt_id)] == ["SN-1", "SN-2"]
    assert [(r["TERMINAL_ID"], r["TERMINAL_SERIENNR"]) for r in data["slaves.csv"]] == [("SN-2", "SN-2")]
    assert data["lines.csv"][2]["ARTIKELTEXT"] == 'Kaffee; "groß"'  # quoted in the file, read back whole
    assert [(r["UST_SCHLUESSEL"], r["POS_BRUTTO"], r["POS_NETTO"], r["POS_UST"]) for r in data["lines_vat.csv"]][2] == (
        "1", "2,50000", "2,10000", "0,40000"
    )
    assert [(r["ZAHLART_TYP"], r["Z_ZAHLART_BETRAG"]) for r in data["payment.csv"]] == [("Bar", "2.469,00"), ("ECKarte", "2.471,50")]
    (closing,) = data["cashpointclosing.csv"]
    assert (closing["Z_BUCHUNGSTAG"], closing["Z_START_ID"], closing["Z_SE_ZAHLUNGEN"], closing["Z_SE_BARZAHLUNGEN"]) == (
        "2024-07-01", first["BON_ID"], "4.940,50", "2.469,00"
    )
    assert [(r["UST_SCHLUESSEL"], r["UST_SATZ"]) for r in data["vat.csv"]] == [("1", "19,00"), ("2", "7,00")]
    assert [(r["ZAHLART_WAEH"], r["ZAHLART_BETRAG_WAEH"]) for r in data["cash_per_currency.csv"]] == [("EUR", "2.469,00")]
    assert writer.shortened == 0


def test_the_csv_files_are_those_the_library_s_collection_writes(tmp_path: Path) -> None:
    receipts = [receipt(1, BREAD, COFFEE), receipt(2, COFFEE)]
    path, _ = write(tmp_path, receipts)
    collection = Collection()
    ours = zipfile.ZipFile(path)
    for name, model in (("transactions.csv", Bonkopf), ("lines.csv", Bonpos)):
        for row in csv.DictReader(io.StringIO(ours.read(name).decode(), newline=""), delimiter=";"):
            record = model()
            record._data.update({k: v or None for k, v in row.items()})
            collection.add(record)
    (tmp_path / "index.xml").write_text("<DataSet/>")
    (tmp_path / DTD_NAME).write_bytes(gdpdu_dtd())
    collection.write(str(tmp_path / "library.zip"), str(tmp_path / "index.xml"), str(tmp_path / DTD_NAME))
    library = zipfile.ZipFile(tmp_path / "library.zip")
    for name in ("transactions.csv", "lines.csv"):
        assert ours.read(name) == library.read(name)
    assert ours.read("lines.csv").count(b"\r\n") == 1 + 3  # header and three lines


def test_index_xml_describes_the_tables_as_the_validator_and_the_dtd_want() -> None:
    text = index_xml(TABLES)
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE DataSet SYSTEM "gdpdu-01-08-2002.dtd">\n')
    assert "<RecordDelimiter>&#13;&#10;</RecordDelimiter>" in text
    root = ET.fromstring(text.split("\n", 2)[2])
    assert root.findtext("Version") == "1.0"
    tables = root.findall("./Media/Table")
    assert [t.findtext("URL") for t in tables] == [m._filename for m in TABLES]
    bonkopf = next(t for t in tables if t.findtext("URL") == "transactions.csv")
    assert bonkopf.findtext("./VariableLength/RecordDelimiter") == "\r\n"
    assert [c.findtext("Name") for c in bonkopf.findall("./VariableLength/VariableColumn")] == [f.name for f in Bonkopf._fields]
    columns = {c.findtext("Name"): c for c in bonkopf.findall("./VariableLength/VariableColumn")}
    assert columns["UMS_BRUTTO"].findtext("./Numeric/Accuracy") == "2"
    assert columns["BON_NR"].find("Numeric") is not None and columns["BON_NR"].find("./Numeric/Accuracy") is None
    assert columns["BON_START"].find("AlphaNumeric") is not None  # not Date: the validator refuses Date columns
    assert columns["BON_ID"].findtext("MaxLength") == "40"
    assert not root.findall(".//VariablePrimaryKey") and not root.findall(".//Date")
    # element order of a Table as the GDPdU DTD declares it
    assert [e.tag for e in bonkopf] == [
        "URL", "Name", "Description", "UTF8", "DecimalSymbol", "DigitGroupingSymbol", "Range", "VariableLength"
    ]
    assert b"<!ELEMENT VariableLength" in gdpdu_dtd()


def test_tse_data_is_exported_where_recorded_and_long_names_are_cut(tmp_path: Path) -> None:
    tse = TseData(
        tse_serial="ab" * 32, transaction_number=17, signature_counter=42, start=T0, end=T0 + dt.timedelta(seconds=3),
        signature="S" * 600,
    )
    signed = receipt(1, BREAD, cashier="A" * 80).model_copy(update={"tse": tse})
    path, writer = write(tmp_path, [signed, receipt(2, COFFEE)])
    data = read(path)
    (row,) = data["transactions_tse.csv"]
    assert (row["TSE_ID"], row["TSE_TANR"], row["TSE_TA_SIGZ"]) == ("1", "17", "42")
    assert (row["TSE_TA_START"], row["TSE_TA_ENDE"]) == ("2024-07-01T06:30:00.000Z", "2024-07-01T06:30:03.000Z")
    assert row["TSE_TA_SIG"] == "S" * 600  # a signature is never cut
    assert [(r["TSE_ID"], r["TSE_SERIAL"]) for r in data["tse.csv"]] == [("1", "ab" * 32)]
    assert data["transactions.csv"][0]["BEDIENER_NAME"] == "A" * 50  # DSFinV-K: at most 50 characters
    assert writer.shortened == 1
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert validate_zip(str(path)) == []
    # the validator's only remark: the uncut signature is longer than DSFinV-K's 512 characters
    assert printed.getvalue().count("more than 512 characters") == 1 and printed.getvalue().count("\n") == 1


def test_discrepancies_name_what_does_not_add_up() -> None:
    receipts = [receipt(1, BREAD), receipt(2, COFFEE)]
    z = z_report(1, DAY, receipts, T0)
    assert _discrepancies(z, receipts) == []
    found = _discrepancies(z, receipts[:1])
    assert all(f.startswith("Z-report 1 (2024-07-01): ") for f in found)
    # every figure that differs, in the words of `tillsync archive status`
    assert found[0].endswith("receipt count 2 in the Z-report, 1 in its receipts")
    assert any(f.endswith(f"total {euros(z.total)} in the Z-report, {euros(receipts[0].total)} in its receipts") for f in found)
    coffee_key = str(int(COFFEE.vat_key))
    assert any(f.split(": ", 1)[1].startswith(f"VAT key {coffee_key} gross ") for f in found)  # coffee's VAT key
    assert any(f.split(": ", 1)[1].startswith("payment ") for f in found)


def test_ranges() -> None:
    assert _ranges([3]) == "3"
    assert _ranges([3, 4, 5, 9, 11, 12]) == "3-5, 9, 11-12"


def test_the_zip_is_never_written_through_a_link_at_its_partial_file(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "out.zip.part").symlink_to(victim)
    with _ZipWriter(tmp_path / "out.zip") as writer:
        writer.add(dm.Stamm_USt, Z_KASSE_ID="K", Z_ERSTELLUNG=T0, Z_NR=1, UST_SCHLUESSEL=1, UST_SATZ=Decimal("19"), UST_BESCHR="x")
        writer.finish()
    assert victim.read_text() == "keep me"
    assert zipfile.is_zipfile(tmp_path / "out.zip") and not (tmp_path / "out.zip").is_symlink()
    assert not (tmp_path / "out.zip.part").exists()
