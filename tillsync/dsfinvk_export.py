"""DSFinV-K 2.4 export of a till's archive: ``tillsync archive export-dsfinvk``.

A tax auditor asks for the *Digitale Schnittstelle der Finanzverwaltung für
Kassensysteme* (DSFinV-K, version 2.4): one ZIP with a CSV file per table, an
``index.xml`` that describes them (GDPdU *Beschreibungsstandard*) and the GDPdU DTD
``gdpdu-01-08-2002.dtd``. The export covers the closings (*Kassenabschlüsse*, our
Z-reports) of one till whose business day lies in ``[date_from, date_to]``, each with
the closed receipts ``first_receipt_number..last_receipt_number`` of that till.

Rows are made with the model classes of the ``dsfinvk`` library (pretix), which know
the DSFinV-K columns and number formats; this module maps our records to them
(``_closing_rows``). The CSV files are written as the library's ``Collection.write``
writes them (same columns, ``;``, ``CRLF``, minimal quoting), but row by row into
temporary files instead of holding every row in memory, so an export of years of
receipts needs memory for one closing only; receipts are read from PostgreSQL with a
server-side cursor in one read-only snapshot.

What is mapped (DSFinV-K 2.4 section, file):

- 3.1.2 ``transactions.csv`` (Bonkopf): ``BON_ID`` = receipt id, ``BON_NR``,
  ``BON_TYP``, ``TERMINAL_ID`` = the recording (paying) till, ``BON_STORNO`` 0,
  ``BON_START``/``BON_ENDE`` = opened/closed, ``BEDIENER_ID``/``BEDIENER_NAME`` =
  cashier, ``UMS_BRUTTO`` = total;
- 3.1.2.1 ``transactions_vat.csv``: the receipt's VAT breakdown (gross, net, VAT per
  ``UST_SCHLUESSEL``), as recorded on the receipt;
- 3.1.2.3 ``datapayment.csv``: each payment (``ZAHLART_TYP``, ``ZAHLART_NAME``,
  ``BASISWAEH_BETRAG``; the base currency EUR, so no foreign-currency columns);
- 3.1.1 ``lines.csv`` (Bonpos): ``POS_ZEILE``, ``ARTIKELTEXT``, ``POS_TERMINAL_ID`` =
  the till that entered the line (on a shared receipt the line's ``terminal_id``,
  else the recording till), ``GV_TYP`` = the receipt's business case, ``P_STORNO`` 0,
  ``ART_NR``, ``MENGE``, ``STK_BR`` = gross unit price;
- 3.1.1.1 ``lines_vat.csv``: per line its ``UST_SCHLUESSEL``, ``POS_BRUTTO`` = amount
  and net/VAT split from it (``shared.fiscal.split_gross``, as the till splits);
- 3.1.2.5 ``transactions_tse.csv`` and 3.2.7 ``tse.csv``: the receipt's TSE data where
  the till recorded it (``TSE_TANR``, ``TSE_TA_SIGZ``, ``TSE_TA_SIG``, start and end as
  UTC ``YYYY-MM-DDThh:mm:ss.fffZ``; ``TSE_SERIAL``);
- 3.2.1 ``cashpointclosing.csv`` (Stamm_Abschluss): ``Z_BUCHUNGSTAG``, first and last
  ``BON_ID``, ``Z_SE_ZAHLUNGEN`` and ``Z_SE_BARZAHLUNGEN`` from the Z-report;
- 3.2.3 ``cashregister.csv``: ``KASSE_SERIENNR``, base currency ``EUR``,
  ``KEINE_UST_ZUORDNUNG`` 0 (every line carries its VAT key);
- 3.2.4 ``slaves.csv`` (Stamm_Terminals): the other tills that entered lines of the
  closing's receipts (receipt handover);
- 3.2.6 ``vat.csv``: the VAT keys of the closing with their rate (``shared.fiscal``);
- 3.3.1 ``businesscases.csv``, 3.3.2 ``payment.csv``, 3.3.3 ``cash_per_currency.csv``:
  the Z-report's own totals per business case and VAT key (gross; net and VAT the sums
  of its receipts' own, as the Z-report's per VAT key), per payment type, and its cash
  in EUR.

The closing's key columns are ``Z_KASSE_ID`` = the till's serial number (its till id
if the serial is longer than the 50 characters DSFinV-K allows), ``Z_ERSTELLUNG`` =
the Z-report's creation time and ``Z_NR``. All times are local time Europe/Berlin
(DSFinV-K's ``LocalDateTime``; the library formats without converting). Money is
euros from integer cents.

Not mapped, because tillsync's records do not hold it: the company and its locations
(``NAME``, ``STRASSE`` …, ``STNR``, ``USTID``; no ``location.csv``), the till's brand,
model and software, customers and tables (a closed receipt carries neither:
``KUNDE_*`` and ``allocation_groups.csv`` stay out), ``INHAUS``, article groups on
lines, price details and sub-items (``itemamounts.csv``, ``subitems.csv``), references
(``references.csv``), agencies (``pa.csv``), and of the TSE its algorithm, time format,
public key, certificate and ``TSE_TA_VORGANGSART``. Tables without rows are left out
of the ZIP and of ``index.xml``.

``index.xml`` declares every column as a ``VariableColumn`` (no ``VariablePrimaryKey``)
and the timestamp and date columns as ``AlphaNumeric``, not ``Date``: the ``dsfinvk``
library's validator (``dsfinvk.validate``) refuses both primary keys and ``Date``
columns. Both forms are allowed by the GDPdU DTD.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import importlib.resources
import os
import re
import signal
import tempfile
import threading
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, AsyncIterator, Callable, Iterable, Optional
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg
import typer
from dsfinvk import models as dm
from dsfinvk.fields import BooleanField, NumericField, StringField
from dsfinvk.table import Model
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shared.consumer import validation_summary
from shared.fiscal import VAT_PERCENT, PaymentType, VatKey, split_gross
from shared.models import Receipt, ZReport
from shared.settings import ServiceSettings
from tillsync.archive_status import closing_differences
from tillsync.archive_tills import archive_integrity_problems, connect_archive, select_tills
from tillsync.console import err, friendly, out, words

BERLIN = ZoneInfo("Europe/Berlin")
DTD_NAME = "gdpdu-01-08-2002.dtd"
BASE_CURRENCY = "EUR"  # money in tillsync is cents of euros (DESIGN.md §2)
TSE_PROCESS_TYPE = "Kassenbeleg-V1"  # processType of a receipt's FinishTransaction (DSFinV-K 2.4 Anhang I, TR-03153)
MAX_KASSE_ID = 50  # DSFinV-K: Z_KASSE_ID, TERMINAL_ID, POS_TERMINAL_ID are at most 50 characters

# The tables this export can write, in the order of DSFinV-K 2.4 chapter 3.
TABLES: tuple[type[Model], ...] = (
    dm.Bonpos,
    dm.Bonpos_USt,
    dm.Bonkopf,
    dm.Bonkopf_USt,
    dm.Bonkopf_Zahlarten,
    dm.TSE_Transaktionen,
    dm.Stamm_Abschluss,
    dm.Stamm_Kassen,
    dm.Stamm_Terminals,
    dm.Stamm_USt,
    dm.Stamm_TSE,
    dm.Z_GV_Typ,
    dm.Z_Zahlart,
    dm.Z_Waehrungen,
)

# UST_BESCHR per key (DSFinV-K 2.4, Anhang "Stamm_USt": the descriptions of the keys).
VAT_DESCRIPTIONS: dict[VatKey, str] = {
    VatKey.REGULAR: "Regelsteuersatz",
    VatKey.REDUCED: "Ermäßigter Steuersatz",
    VatKey.AVERAGE_24_1_3: "Durchschnittsatz (§ 24 Abs. 1 Nr. 3 UStG)",
    VatKey.AVERAGE_24_1_1: "Durchschnittsatz (§ 24 Abs. 1 Nr. 1 UStG)",
    VatKey.NOT_TAXABLE: "Nicht Steuerbar",
    VatKey.TAX_FREE: "Umsatzsteuerfrei",
    VatKey.NO_VAT_SHOWN: "UmsatzsteuerNichtErmittelbar",
    VatKey.HISTORIC_REGULAR_16: "Historischer Regelsteuersatz (16 %)",
    VatKey.HISTORIC_REDUCED_5: "Historischer ermäßigter Steuersatz (5 %)",
}

# Values never shortened to the column's maximum length: a cut signature is worthless.
_NEVER_CUT = frozenset({"TSE_TA_SIG"})


# ---------------------------------------------------------------------------
# errors and results


class ExportError(ValueError):
    """The export cannot be made; the message says why, ``details`` lists particulars."""

    def __init__(self, message: str, details: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.details = tuple(details)


class UnknownTill(ExportError):
    """No till matches the given id, serial number or name (in the given account)."""


class InvalidRange(ExportError):
    """``date_from`` lies after ``date_to``."""


class NoClosingInRange(ExportError):
    """The till has no Z-report with a business day in the range."""


class IncompleteClosing(ExportError):
    """A Z-report's receipts are not all in the archive (yet): ``missing`` maps each
    such Z_NR to its missing receipt numbers (BON_NR)."""

    def __init__(self, message: str, details: Iterable[str], missing: dict[int, list[int]]) -> None:
        super().__init__(message, details)
        self.missing = missing


class InconsistentArchive(ExportError):
    """The archive holds two different records for one Z_NR or BON_NR of the till, or
    Z-reports whose receipt ranges overlap: which one is the till's is not for an export
    to decide (see ``tillsync archive status``)."""


@dataclass(frozen=True)
class TillRef:
    """A till as named in ``tills``/``accounts``."""

    till_id: UUID
    account_id: UUID
    account_name: str
    serial_number: str
    till_name: str

    @property
    def kasse_id(self) -> str:
        """``Z_KASSE_ID`` (DSFinV-K 2.4, 3.2.1): the serial number, or the till id if the
        serial is longer than DSFinV-K's 50 characters."""
        return _kasse_id(self.serial_number, self.till_id)

    def describe(self) -> str:
        return f"{self.till_name} (serial {self.serial_number}, id {self.till_id}, account {self.account_name})"


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote.

    ``closings``/``receipts``/``lines``: rows of cashpointclosing.csv, transactions.csv
    and lines.csv; ``tables``: the CSV files in the ZIP; ``discrepancies``: closings
    whose receipts do not add up to the Z-report (the ZIP holds both as archived);
    ``shortened``: texts cut to DSFinV-K's maximum column length (the archive keeps
    them whole)."""

    path: Path
    till: TillRef
    date_from: dt.date
    date_to: dt.date
    closings: int
    first_z_nr: int
    last_z_nr: int
    receipts: int
    lines: int
    tables: tuple[str, ...]
    discrepancies: tuple[str, ...] = ()
    shortened: int = 0


# (closings done, closings in all, the one just written): (0, n, None) once the checks passed, then per closing
ProgressCallback = Callable[[int, int, Optional[ZReport]], None]


# ---------------------------------------------------------------------------
# finding the till


async def resolve_till(conn: asyncpg.Connection, till: str, account: str | None = None) -> TillRef:
    """The one till named by ``till``: its till id, serial number or name (case
    insensitive), in account ``account`` (an account name) if given.

    Raises ``TillSelectionError`` for an unknown account, no matching till or several."""
    [row] = await select_tills(conn, till, account, one=True)
    return TillRef(**dict(row))


# ---------------------------------------------------------------------------
# the export


async def export_dsfinvk(
    db: asyncpg.Connection | asyncpg.Pool,
    till_id: UUID,
    date_from: dt.date,
    date_to: dt.date,
    path: Path,
    on_progress: ProgressCallback | None = None,
    allow_discrepancies: bool = False,
) -> ExportSummary:
    """Write the DSFinV-K 2.4 ZIP of till ``till_id`` for the Z-reports whose business
    day is in ``[date_from, date_to]`` to ``path`` (replaced atomically; nothing is
    written on error). ``on_progress(0, total, None)`` is called once the archive passed
    the checks, then ``on_progress(done, total, zreport)`` after each closing. A closing
    whose receipts do not add up to its Z-report (``tillsync archive status``'s rule) is
    refused (``InconsistentArchive``, nothing written) unless ``allow_discrepancies``: then
    both are written as archived and the summary lists the differences.

    Reads ``archive_records`` (kinds ``zreport`` and closed ``receipt``), ``tills`` and
    ``accounts`` in one read-only snapshot; never writes to the database.

    Raises ``InvalidRange`` (from > to), ``UnknownTill``, ``NoClosingInRange``,
    ``IncompleteClosing`` (a Z-report's receipts not all archived: the Z_NR and the
    missing BON_NR), ``InconsistentArchive``; ``OSError`` if ``path`` cannot be written.
    """
    _check_range(date_from, date_to)
    async with _connection(db) as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(
            """
            select t.till_id, t.account_id, a.account_name, t.serial_number, t.till_name
            from tills t join accounts a using (account_id) where t.till_id = $1
            """,
            till_id,
        )
        if row is None:
            raise UnknownTill(f"there is no till {till_id}")
        till = TillRef(**dict(row))
        problems = await archive_integrity_problems(conn)
        if problems:
            raise InconsistentArchive("the archive's checks cannot see every archived row: nothing exported", problems)
        closings = await _closings(conn, till, date_from, date_to)
        await _check_receipts_archived(conn, till, closings)
        serials = {
            r["till_id"]: r["serial_number"]
            for r in await conn.fetch("select till_id, serial_number from tills where account_id = $1", till.account_id)
        }
        numbered = [z for z in closings if z.receipt_count]
        await _check_receipts_of_this_till(conn, till, numbered)
        low = min((z.first_receipt_number for z in numbered), default=1)  # type: ignore[type-var]
        high = max((z.last_receipt_number for z in numbered), default=0)  # type: ignore[type-var]
        receipts = _ReceiptsInOrder(
            conn.cursor(
                """
                select record_id, till_seq, (payload->'record')::text as record from archive_records
                where account_id = $1 and till_id = $2 and kind = 'receipt' and payload->'record'->>'status' = 'closed'
                  and (payload->'record'->>'receipt_number')::bigint between $3 and $4
                order by (payload->'record'->>'receipt_number')::bigint
                """,
                till.account_id, till.till_id, low, high,
                prefetch=500,
            ),
            till,
        )
        counts = {"receipts": 0, "lines": 0}
        discrepancies: list[str] = []
        if on_progress:
            on_progress(0, len(closings), None)
        with _ZipWriter(path) as zip_writer:
            for done, zreport in enumerate(closings, start=1):
                of_closing = await receipts.through(zreport.first_receipt_number, zreport.last_receipt_number)
                _closing_rows(zip_writer, till, zreport, of_closing, serials)
                found = _discrepancies(zreport, of_closing)
                if found and not allow_discrepancies:
                    raise InconsistentArchive(
                        f"the receipts of Z-report {zreport.z_nr} ({zreport.business_day}) of till {till.describe()} do not "
                        "add up to it: nothing written; see `tillsync archive status` (or export as archived with "
                        "--allow-discrepancies)",
                        found,
                    )
                discrepancies.extend(found)
                counts["receipts"] += len(of_closing)
                counts["lines"] += sum(len(r.lines) for r in of_closing)
                if on_progress:
                    on_progress(done, len(closings), zreport)
            tables = zip_writer.finish()
    return ExportSummary(
        path=path, till=till, date_from=date_from, date_to=date_to, closings=len(closings),
        first_z_nr=closings[0].z_nr, last_z_nr=closings[-1].z_nr, receipts=counts["receipts"], lines=counts["lines"],
        tables=tables, discrepancies=tuple(discrepancies), shortened=zip_writer.shortened,
    )


async def _check_receipts_of_this_till(conn: asyncpg.Connection, till: TillRef, closings: list[ZReport]) -> None:
    """``InconsistentArchive`` if a receipt of the closings is archived closed by another
    till of the account too: a receipt belongs to one closing (the paying till's)."""
    if not closings:
        return
    rows = await conn.fetch(
        """
        select distinct mine.payload->'record'->>'receipt_id' as receipt_id, other.till_id
        from archive_records mine join archive_records other
          on other.account_id = mine.account_id and other.kind = 'receipt' and other.till_id <> mine.till_id
         and other.payload->'record'->>'status' = 'closed'
         and other.payload->'record'->>'receipt_id' = mine.payload->'record'->>'receipt_id'
        where mine.account_id = $1 and mine.till_id = $2 and mine.kind = 'receipt'
          and mine.payload->'record'->>'status' = 'closed'
          and (mine.payload->'record'->>'receipt_number')::bigint between $3 and $4
        """,
        till.account_id, till.till_id, min(z.first_receipt_number for z in closings),  # type: ignore[type-var]
        max(z.last_receipt_number for z in closings),  # type: ignore[type-var]
    )
    if rows:
        raise InconsistentArchive(
            f"{len(rows)} receipt(s) of till {till.describe()} are archived closed by another till too: a receipt "
            "belongs to one closing; nothing exported, see `tillsync archive status`",
            [f"receipt {r['receipt_id']} also closed by till {r['till_id']}" for r in rows],
        )


def _valid(model: Any, row: asyncpg.Record, till: TillRef) -> Any:
    """``row["record"]`` as ``model``; ``InconsistentArchive`` naming the record if it is none
    (changed after archiving: ``tillsync archive verify`` tells)."""
    try:
        return model.model_validate_json(row["record"])
    except ValidationError as exc:
        raise InconsistentArchive(
            f"archived record {row['record_id']} (till_seq {row['till_seq']}) of till {till.describe()} is no valid "
            f"{words(model.__name__)}: {validation_summary(exc)}; run `tillsync archive verify`"
        ) from None


def _check_range(date_from: dt.date, date_to: dt.date) -> None:
    if date_from > date_to:
        raise InvalidRange(f"the range starts ({date_from}) after it ends ({date_to})")


@contextlib.asynccontextmanager
async def _connection(db: asyncpg.Connection | asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            yield conn
    else:
        yield db


async def _closings(conn: asyncpg.Connection, till: TillRef, date_from: dt.date, date_to: dt.date) -> list[ZReport]:
    """The till's Z-reports of the range in Z_NR order; ``NoClosingInRange`` if none,
    ``InconsistentArchive`` for two different Z-reports of one Z_NR or receipt ranges
    that do not ascend with Z_NR (a till numbers both from 1 upwards)."""
    rows = await conn.fetch(
        """
        select record_id, till_seq, (payload->'record')::text as record from archive_records
        where account_id = $1 and till_id = $2 and kind = 'zreport'
          and (payload->'record'->>'business_day')::date between $3 and $4
        order by (payload->'record'->>'z_nr')::bigint, record_id
        """,
        till.account_id, till.till_id, date_from, date_to,
    )
    closings: list[ZReport] = []
    for r in rows:
        zreport = _valid(ZReport, r, till)
        if closings and closings[-1].z_nr == zreport.z_nr:
            if closings[-1] != zreport:
                raise InconsistentArchive(f"the archive holds two different Z-reports {zreport.z_nr} of till {till.describe()}")
            continue  # the same Z-report archived twice
        closings.append(zreport)
    if not closings:
        span = await conn.fetchrow(
            """
            select min((payload->'record'->>'business_day')::date) as first, max((payload->'record'->>'business_day')::date) as last
            from archive_records where account_id = $1 and till_id = $2 and kind = 'zreport'
            """,
            till.account_id, till.till_id,
        )
        has = f"its Z-reports cover {span['first']} to {span['last']}" if span["first"] else "it has no Z-report in the archive"
        raise NoClosingInRange(f"till {till.describe()} has no Z-report with a business day from {date_from} to {date_to}; {has}")
    last = 0
    for zreport in closings:
        if zreport.receipt_count:
            assert zreport.first_receipt_number is not None and zreport.last_receipt_number is not None
            if zreport.first_receipt_number <= last:
                raise InconsistentArchive(
                    f"Z-report {zreport.z_nr} of till {till.describe()} covers receipts {zreport.first_receipt_number}.."
                    f"{zreport.last_receipt_number}, which overlap or precede those of an earlier Z-report"
                )
            last = zreport.last_receipt_number
    return closings


async def _check_receipts_archived(conn: asyncpg.Connection, till: TillRef, closings: list[ZReport]) -> None:
    """Every BON_NR ``first..last`` of every closing must be archived as exactly one closed
    receipt: raises ``IncompleteClosing`` naming the Z_NR and missing numbers, or
    ``InconsistentArchive`` for a number taken by two receipts. Computed in PostgreSQL
    (only the gaps come back)."""
    numbered = [z for z in closings if z.receipt_count]
    if not numbered:
        return
    rows = await conn.fetch(
        """
        with z (z_nr, first, last) as (select * from unnest($3::bigint[], $4::bigint[], $5::bigint[])),
        archived as (
            select (payload->'record'->>'receipt_number')::bigint as receipt_number,
                   count(distinct payload->'record'->>'receipt_id') as receipts
            from archive_records
            where account_id = $1 and till_id = $2 and kind = 'receipt' and payload->'record'->>'status' = 'closed'
              and (payload->'record'->>'receipt_number')::bigint between $6 and $7
            group by 1
        )
        select z.z_nr, n.receipt_number, coalesce(a.receipts, 0) as receipts
        from z cross join lateral generate_series(z.first, z.last) as n (receipt_number)
        left join archived a using (receipt_number)
        where coalesce(a.receipts, 0) <> 1
        order by z.z_nr, n.receipt_number
        """,
        till.account_id, till.till_id,
        [z.z_nr for z in numbered], [z.first_receipt_number for z in numbered], [z.last_receipt_number for z in numbered],
        numbered[0].first_receipt_number, numbered[-1].last_receipt_number,
    )
    twice = [r["receipt_number"] for r in rows if r["receipts"] > 1]
    if twice:
        raise InconsistentArchive(
            f"receipt number(s) {_ranges(twice)} of till {till.describe()} were archived for different receipts; "
            "see `tillsync archive status`"
        )
    missing: dict[int, list[int]] = {}
    for r in rows:
        missing.setdefault(r["z_nr"], []).append(r["receipt_number"])
    if missing:
        by_z = {z.z_nr: z for z in numbered}
        raise IncompleteClosing(
            f"the archive does not hold every receipt of {len(missing)} Z-report(s) of till {till.describe()}: "
            "the till has not uploaded them yet or they were refused; see `tillsync archive status`",
            [
                f"Z-report {z_nr} (business day {by_z[z_nr].business_day}, receipts {by_z[z_nr].first_receipt_number}.."
                f"{by_z[z_nr].last_receipt_number}): receipt(s) {_ranges(numbers)} missing"
                for z_nr, numbers in missing.items()
            ],
            missing,
        )


def _ranges(numbers: list[int]) -> str:
    """``[3, 4, 5, 9]`` → ``"3-5, 9"`` (sorted input)."""
    parts: list[str] = []
    start = previous = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == previous + 1:
            previous = n
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if n is not None:
            start = previous = n
    return ", ".join(parts)


class _ReceiptsInOrder:
    """The closed receipts of a cursor ordered by BON_NR, handed out closing by closing."""

    def __init__(self, cursor: Any, till: TillRef) -> None:
        self._till = till
        self._rows = cursor.__aiter__()
        self._head: Receipt | None = None
        self._last: Receipt | None = None
        self._done = False

    async def _peek(self) -> Receipt | None:
        while self._head is None and not self._done:
            try:
                row = await self._rows.__anext__()
            except StopAsyncIteration:
                self._done = True
                break
            receipt = _valid(Receipt, row, self._till)
            if self._last is not None and receipt.receipt_id == self._last.receipt_id:
                if receipt != self._last:
                    raise InconsistentArchive(
                        f"receipt {receipt.receipt_id} (BON_NR {receipt.receipt_number}) of till {self._till.describe()} "
                        "is archived closed in two different versions: which one is the till's is not for an export to "
                        "decide; see `tillsync archive status`"
                    )
                continue  # the same closed receipt archived twice (same number, same receipt)
            self._head = receipt
        return self._head

    async def through(self, first: int | None, last: int | None) -> list[Receipt]:
        """The receipts numbered ``first..last`` (none for an empty closing); those
        numbered lower and not yet taken are skipped (they belong to no exported closing)."""
        taken: list[Receipt] = []
        if first is None or last is None:
            return taken
        while (head := await self._peek()) is not None and head.receipt_number <= last:  # type: ignore[operator]
            self._last, self._head = head, None
            if head.receipt_number >= first:  # type: ignore[operator]
                taken.append(head)
        return taken


# ---------------------------------------------------------------------------
# mapping (DSFinV-K 2.4, chapter 3)


def _kasse_id(serial_number: str, till_id: UUID) -> str:
    return serial_number if len(serial_number) <= MAX_KASSE_ID else str(till_id)


def _local(at: dt.datetime) -> dt.datetime:
    """DSFinV-K ``LocalDateTime``: local time in Germany (the library does not convert)."""
    return at.astimezone(BERLIN)


def _tse_time(at: dt.datetime) -> str:
    """TSE log time as UTC ``YYYY-MM-DDThh:mm:ss.fffZ`` (DSFinV-K 2.4, 3.1.2.5)."""
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _euros(cents: int) -> Decimal:
    return Decimal(cents).scaleb(-2)


def _closing_rows(out: _ZipWriter, till: TillRef, z: ZReport, receipts: list[Receipt], serials: dict[UUID, str]) -> None:
    """Every row of one closing (``z`` with its ``receipts`` in BON_NR order) into ``out``.

    ``serials``: the serial number of each till of the account (a till that entered
    lines is named by ``_kasse_id`` of its serial, or by its till id if unknown)."""
    key = {"Z_KASSE_ID": till.kasse_id, "Z_ERSTELLUNG": _local(z.created_at), "Z_NR": z.z_nr}

    def terminal_id(till_id: UUID) -> str:
        serial = serials.get(till_id)
        return _kasse_id(serial, till_id) if serial is not None else str(till_id)

    terminals: set[UUID] = set()
    tses: dict[str, int] = {}
    vat_keys: set[VatKey] = {v.vat_key for v in z.totals_by_vat}
    for receipt in receipts:
        bon = {**key, "BON_ID": str(receipt.receipt_id)}
        cashier = receipt.cashier
        out.add(  # 3.1.2 Bonkopf
            dm.Bonkopf, **bon, BON_NR=receipt.receipt_number, BON_TYP=receipt.receipt_type, TERMINAL_ID=till.kasse_id,
            BON_STORNO=False, BON_START=_local(receipt.opened_at), BON_ENDE=_local(receipt.closed_at),  # type: ignore[arg-type]
            BEDIENER_ID=cashier.cashier_id, BEDIENER_NAME=cashier.name, UMS_BRUTTO=_euros(receipt.total),
        )
        for vat in receipt.vat:  # 3.1.2.1 Bonkopf_USt: as on the receipt
            out.add(
                dm.Bonkopf_USt, **bon, UST_SCHLUESSEL=int(vat.vat_key),
                BON_BRUTTO=_euros(vat.gross), BON_NETTO=_euros(vat.net), BON_UST=_euros(vat.vat),
            )
            vat_keys.add(vat.vat_key)
        for payment in receipt.payments:  # 3.1.2.3 Bonkopf_Zahlarten, in the base currency
            out.add(
                dm.Bonkopf_Zahlarten, **bon, ZAHLART_TYP=payment.payment_type.value, ZAHLART_NAME=payment.payment_name,
                BASISWAEH_BETRAG=_euros(payment.amount),
            )
        line_splits = _line_splits(receipt)
        for line in receipt.lines:  # 3.1.1 Bonpos and 3.1.1.1 Bonpos_USt
            entered_on = line.terminal_id or till.till_id
            if entered_on != till.till_id:
                terminals.add(entered_on)
            out.add(
                dm.Bonpos, **bon, POS_ZEILE=str(line.line_no), ARTIKELTEXT=line.text,
                POS_TERMINAL_ID=terminal_id(entered_on), GV_TYP=receipt.business_case.value,
                P_STORNO=False, ART_NR=line.article_nr, MENGE=line.quantity, STK_BR=_euros(line.unit_price),
            )
            net, vat_cents = line_splits[line.line_no]
            out.add(
                dm.Bonpos_USt, **bon, POS_ZEILE=str(line.line_no), UST_SCHLUESSEL=int(line.vat_key),
                POS_BRUTTO=_euros(line.amount), POS_NETTO=_euros(net), POS_UST=_euros(vat_cents),
            )
            vat_keys.add(line.vat_key)
        if receipt.tse is not None:  # 3.1.2.5 TSE_Transaktionen
            tse = receipt.tse
            tse_id = tses.setdefault(tse.tse_serial, len(tses) + 1)
            out.add(
                dm.TSE_Transaktionen, **bon, TSE_ID=tse_id, TSE_TANR=tse.transaction_number,
                TSE_TA_START=_tse_time(tse.start), TSE_TA_ENDE=_tse_time(tse.end),
                TSE_TA_SIGZ=tse.signature_counter, TSE_TA_SIG=tse.signature,
                TSE_TA_VORGANGSART=TSE_PROCESS_TYPE,
            )
    cash = sum(p.amount for p in z.totals_by_payment_type if p.payment_type == PaymentType.CASH)
    out.add(  # 3.2.1 Stamm_Abschluss
        dm.Stamm_Abschluss, **key, Z_BUCHUNGSTAG=z.business_day.isoformat(),
        Z_START_ID=str(receipts[0].receipt_id) if receipts else None,
        Z_ENDE_ID=str(receipts[-1].receipt_id) if receipts else None,
        Z_SE_ZAHLUNGEN=_euros(sum(p.amount for p in z.totals_by_payment_type)), Z_SE_BARZAHLUNGEN=_euros(cash),
    )
    out.add(  # 3.2.3 Stamm_Kassen
        dm.Stamm_Kassen, **key, KASSE_SERIENNR=till.serial_number, KASSE_BASISWAEH_CODE=BASE_CURRENCY,
        KEINE_UST_ZUORDNUNG=False,
    )
    for other in sorted(terminals, key=terminal_id):  # 3.2.4 Stamm_Terminals: the other tills that entered lines
        out.add(dm.Stamm_Terminals, **key, TERMINAL_ID=terminal_id(other), TERMINAL_SERIENNR=serials.get(other))
    for vat_key in sorted(vat_keys):  # 3.2.6 Stamm_USt
        out.add(
            dm.Stamm_USt, **key, UST_SCHLUESSEL=int(vat_key), UST_SATZ=VAT_PERCENT[vat_key],
            UST_BESCHR=VAT_DESCRIPTIONS[vat_key],
        )
    for serial, tse_id in tses.items():  # 3.2.7 Stamm_TSE
        out.add(dm.Stamm_TSE, **key, TSE_ID=tse_id, TSE_SERIAL=serial)
    # net and VAT per business case and VAT key: the sums of the receipts' own (as the Z-report's per VAT key)
    split: dict[tuple[str, VatKey], tuple[int, int, int]] = {}
    for receipt in receipts:
        for vat in receipt.vat:
            gross, net, vat_cents = split.get((receipt.business_case.value, vat.vat_key), (0, 0, 0))
            split[(receipt.business_case.value, vat.vat_key)] = (gross + vat.gross, net + vat.net, vat_cents + vat.vat)
    for case in z.totals_by_business_case:  # 3.3.1 Z_GV_Typ: the Z-report's own totals, no agency (0)
        gross, net, vat_cents = split.get((case.business_case.value, case.vat_key), (None, 0, 0))
        if gross != case.gross:  # the receipts do not add up to it (warned): split its own gross
            net, vat_cents = split_gross(case.gross, case.vat_key)
        out.add(
            dm.Z_GV_Typ, **key, GV_TYP=case.business_case.value, AGENTUR_ID=0, UST_SCHLUESSEL=int(case.vat_key),
            Z_UMS_BRUTTO=_euros(case.gross), Z_UMS_NETTO=_euros(net), Z_UST=_euros(vat_cents),
        )
    for payment_total in z.totals_by_payment_type:  # 3.3.2 Z_Zahlart
        out.add(
            dm.Z_Zahlart, **key, ZAHLART_TYP=payment_total.payment_type.value, ZAHLART_NAME=payment_total.payment_name,
            Z_ZAHLART_BETRAG=_euros(payment_total.amount),
        )
    out.add(dm.Z_Waehrungen, **key, ZAHLART_WAEH=BASE_CURRENCY, ZAHLART_BETRAG_WAEH=_euros(cash))  # 3.3.3, cash in EUR


def _line_splits(receipt: Receipt) -> dict[int, tuple[int, int]]:
    """Net and VAT in cents of each line (by POS_ZEILE): the line's own split
    (``shared.fiscal.split_gross``), with each VAT key's rounding difference spread a cent
    at a time over that key's lines, largest first, so the lines add up to the receipt's recorded net and VAT
    (DSFinV-K 2.4: Bonpos_USt sums to Bonkopf_USt)."""
    splits = {line.line_no: split_gross(line.amount, line.vat_key) for line in receipt.lines}
    for vat in receipt.vat:
        lines = [line for line in receipt.lines if line.vat_key == vat.vat_key]
        difference = vat.net - sum(splits[line.line_no][0] for line in lines)
        step = 1 if difference > 0 else -1
        largest_first = sorted(lines, key=lambda line: (-abs(line.amount), line.line_no))
        for i in range(abs(difference)):  # a cent each, largest lines first
            line = largest_first[i % len(largest_first)]
            net, vat_cents = splits[line.line_no]
            splits[line.line_no] = (net + step, vat_cents - step)
    return splits


def _discrepancies(z: ZReport, receipts: list[Receipt]) -> list[str]:
    """Where the exported receipts do not add up to their Z-report: one sentence each
    (the rule of ``tillsync archive status``)."""
    return [f"Z-report {z.z_nr} ({z.business_day}): {d}" for d in closing_differences(z, receipts)]


# ---------------------------------------------------------------------------
# writing the ZIP


class _ZipWriter:
    """CSV files of DSFinV-K tables, written row by row into a temporary directory,
    then zipped with ``index.xml`` and the DTD into ``path`` (atomically).

    The CSV dialect is that of ``dsfinvk.collection.Collection.write``: a header of the
    model's field names, ``;`` between columns, ``CRLF`` after each record, ``"`` around
    values that need it, UTF-8."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shortened = 0
        self._dir = tempfile.TemporaryDirectory(prefix="tillsync-dsfinvk-")
        self._files: dict[type[Model], tuple[IO[str], csv.DictWriter[str]]] = {}
        self._columns: dict[type[Model], dict[str, Any]] = {}

    def __enter__(self) -> _ZipWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle, _ in self._files.values():
            handle.close()
        self._dir.cleanup()

    def add(self, model: type[Model], **values: Any) -> None:
        """One row of ``model``'s table; text longer than the column allows is cut
        (counted in ``shortened``), except a TSE signature."""
        columns = self._columns.setdefault(model, {f.name: f for f in model._fields})
        for name, value in values.items():
            spec = columns[name]
            if isinstance(value, str) and isinstance(spec, StringField) and spec.max_length and name not in _NEVER_CUT:
                if len(value) > spec.max_length:
                    values[name] = value[: spec.max_length]
                    self.shortened += 1
        record = model(**values)
        if model not in self._files:
            handle = open(Path(self._dir.name) / record._filename, "w", encoding="utf-8", newline="")
            writer = csv.DictWriter(handle, fieldnames=[f.name for f in model._fields], delimiter=";", lineterminator="\r\n")
            writer.writeheader()
            self._files[model] = (handle, writer)
        self._files[model][1].writerow(record._data)

    def finish(self) -> tuple[str, ...]:
        """Write the ZIP; returns the CSV files it holds, in DSFinV-K order."""
        written = [model for model in TABLES if model in self._files]
        for handle, _ in self._files.values():
            handle.close()
        partial = self.path.with_name(self.path.name + ".part")
        partial.unlink(missing_ok=True)  # a leftover, or a link placed there: never written through
        try:
            handle = os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb")
            with handle, zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for model in written:
                    zf.write(Path(self._dir.name) / model._filename, model._filename)
                for name, data in (("index.xml", index_xml(written).encode()), (DTD_NAME, gdpdu_dtd())):
                    member = zipfile.ZipInfo(name, date_time=dt.datetime.now().timetuple()[:6])
                    member.external_attr, member.compress_type = 0o644 << 16, zipfile.ZIP_DEFLATED
                    zf.writestr(member, data)
            os.replace(partial, self.path)
        finally:
            partial.unlink(missing_ok=True)
        return tuple(model._filename for model in written)


def gdpdu_dtd() -> bytes:
    """The GDPdU DTD (version 01-08-2002) shipped with tillsync."""
    return (importlib.resources.files("tillsync") / DTD_NAME).read_bytes()


def index_xml(tables: Iterable[type[Model]]) -> str:
    """``index.xml`` (GDPdU *Beschreibungsstandard*) describing the CSV files of ``tables``.

    Per table: file, name, description, UTF-8, decimal comma and ``.`` for thousands,
    data from line 2 (line 1 is the header), ``;`` between columns, CRLF between
    records, ``"`` around text; per column in field order ``Numeric`` with
    ``Accuracy`` = decimal places (booleans are ``Numeric`` 0/1) or ``AlphaNumeric``
    with ``MaxLength``. Timestamps and dates are declared ``AlphaNumeric`` and no
    ``VariablePrimaryKey`` is given: ``dsfinvk.validate`` refuses ``Date`` columns and
    primary keys (both are optional in the GDPdU DTD)."""
    root = ET.Element("DataSet")
    ET.SubElement(root, "Version").text = "1.0"
    media = ET.SubElement(root, "Media")
    ET.SubElement(media, "Name").text = "DSFinV-K"
    for model in tables:
        table = ET.SubElement(media, "Table")
        ET.SubElement(table, "URL").text = model._filename
        ET.SubElement(table, "Name").text = model.__name__
        ET.SubElement(table, "Description").text = _first_line(model.__doc__) or model.__name__
        ET.SubElement(table, "UTF8")
        ET.SubElement(table, "DecimalSymbol").text = ","
        ET.SubElement(table, "DigitGroupingSymbol").text = "."
        ET.SubElement(ET.SubElement(table, "Range"), "From").text = "2"
        layout = ET.SubElement(table, "VariableLength")
        ET.SubElement(layout, "ColumnDelimiter").text = ";"
        ET.SubElement(layout, "RecordDelimiter").text = _RECORD_DELIMITER_MARK
        ET.SubElement(layout, "TextEncapsulator").text = '"'
        for column in model._fields:
            element = ET.SubElement(layout, "VariableColumn")
            ET.SubElement(element, "Name").text = column.name
            if column.__doc__:
                ET.SubElement(element, "Description").text = column.__doc__
            if isinstance(column, NumericField):
                numeric = ET.SubElement(element, "Numeric")
                if column.places:
                    ET.SubElement(numeric, "Accuracy").text = str(column.places)
            elif isinstance(column, BooleanField):
                ET.SubElement(element, "Numeric")
            else:  # text, and the timestamps and dates (see above)
                ET.SubElement(element, "AlphaNumeric")
                if isinstance(column, StringField) and column.max_length:
                    ET.SubElement(element, "MaxLength").text = str(column.max_length)
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode")
    # CR LF as character references: written raw, an XML reader would turn them into LF
    body = body.replace(_RECORD_DELIMITER_MARK, "&#13;&#10;")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE DataSet SYSTEM "{DTD_NAME}">\n{body}\n'


_RECORD_DELIMITER_MARK = "@@CRLF@@"


def _first_line(doc: str | None) -> str:
    """``"3.1.1  Datei: Bonpos"`` from the model's docstring (its DSFinV-K section)."""
    for line in (doc or "").splitlines():
        if line.strip():
            return re.sub(r"\s+", " ", line.strip())
    return ""


# ---------------------------------------------------------------------------
# command line: tillsync archive export-dsfinvk


def default_output(till: TillRef, date_from: dt.date, date_to: dt.date) -> Path:
    """``dsfinvk_<serial>_<from>_<to>.zip`` in the working directory (unsafe characters as ``_``)."""
    serial = re.sub(r"[^A-Za-z0-9._-]", "_", till.serial_number)
    return Path(f"dsfinvk_{serial}_{date_from}_{date_to}.zip")


def export_dsfinvk_command(
    till: str = typer.Option(..., "--till", help="the till: its id, serial number or name"),
    date_from: dt.datetime = typer.Option(..., "--from", formats=["%Y-%m-%d"], help="first business day, YYYY-MM-DD"),
    date_to: dt.datetime = typer.Option(..., "--to", formats=["%Y-%m-%d"], help="last business day, YYYY-MM-DD"),
    account: Optional[str] = typer.Option(None, "--account", help="the till's account name, when tills of several accounts match"),
    output: Optional[Path] = typer.Option(
        None, "--output", help="the ZIP to write (default: dsfinvk_<serial>_<from>_<to>.zip here); replaced if it exists"
    ),
    allow_discrepancies: bool = typer.Option(
        False, "--allow-discrepancies",
        help="write closings whose receipts do not add up to their Z-report as archived (default: refuse)",
    ),
) -> None:
    """Write a till's DSFinV-K 2.4 export for a tax audit (ZIP: CSV files, index.xml, DTD).

    It holds the till's closings (Z-reports) whose business day lies from --from to --to,
    with their receipts. Refused when the range holds no Z-report, or a Z-report's
    receipts are not all in the archive yet (`tillsync archive status`). Database:
    TILLSYNC_DATABASE_URL."""
    friendly(_run_export)(till, date_from.date(), date_to.date(), account, output, allow_discrepancies)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _run_export(
    till: str, date_from: dt.date, date_to: dt.date, account: str | None, output: Path | None, allow_discrepancies: bool
) -> None:
    _check_range(date_from, date_to)
    if output is not None and (output.is_symlink() or (output.exists() and not output.is_file())):
        raise ExportError(f"{output} exists and is no regular file: name a new file or a regular file to replace")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupted)  # clean up the partial files, as on Ctrl-C
    settings = ServiceSettings()

    async def body() -> ExportSummary:
        conn = await connect_archive(settings.database_url, decode_json=False)
        try:
            found = await resolve_till(conn, till, account)
            path = output or default_output(found, date_from, date_to)
            progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}", markup=False),
                TimeElapsedColumn(), console=err, transient=False,
            )

            def advance(done: int, total: int, zreport: ZReport | None) -> None:
                if zreport is None:  # the checks passed: the bar shows from here on
                    progress.start()
                    progress.add_task("Closings", total=total, info="")
                    return
                progress.update(progress.task_ids[0], completed=done, info=f"Z {zreport.z_nr} {zreport.business_day}")

            try:
                if path.is_symlink() or (path.exists() and not path.is_file()):
                    raise ExportError(f"{path} exists and is no regular file: name a new file or a regular file to replace")
                return await export_dsfinvk(
                    conn, found.till_id, date_from, date_to, path, on_progress=advance, allow_discrepancies=allow_discrepancies
                )
            finally:
                if progress.task_ids:
                    progress.stop()
        finally:
            await conn.close()

    summary = asyncio.run(body())
    out.print(
        f"wrote {summary.path}: DSFinV-K 2.4 export of till {summary.till.describe()}, {summary.closings} closing(s) "
        f"(Z {summary.first_z_nr}..{summary.last_z_nr}), {summary.receipts} receipts, {summary.lines} lines; "
        f"files: {', '.join(summary.tables)}, index.xml, {DTD_NAME}"
    )
    if summary.shortened:
        err.print(f"note: {summary.shortened} text(s) longer than DSFinV-K allows were cut; the archive keeps them whole")
    for problem in summary.discrepancies:
        err.print(f"warning: {problem}")
