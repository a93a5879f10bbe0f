"""``tillsync archive status``: is the archive of each till complete?

GoBD (Rz. 30 ff., *Vollständigkeit*) and §146a AO ask that every record of a till is
kept, and a tax auditor checks a closing (DSFinV-K ``Z_NR``) against its receipts
(``BON_NR``). Per till this module checks, from ``archive_records`` alone (read only):

- ``till_seq`` runs 1, 2, 3 … without a gap (a gap: records not uploaded yet — the till
  is offline or signed out, or in ``custom`` mode with an upload switch off — or lost;
  records after the highest archived ``till_seq`` cannot be seen from the archive);
- Z-reports (``Z_NR``) run 1 … n without a gap, each number once;
- every Z-report: each receipt number from its ``first_receipt_number`` to its
  ``last_receipt_number`` is archived as a closed receipt of the till, and its
  ``receipt_count``, ``total``, gross, net and VAT per VAT key (``UST_SCHLUESSEL``, DSFinV-K
  Z_Waren / Z_UST), gross per business case and VAT key (``GV_TYP``, Z_GV_TYP) and amount
  per payment type and name (``ZAHLART_TYP`` / ``ZAHLART_NAME``, Z_Zahlart) equal the sums
  of those receipts (a Z-report sums its receipts' own net and VAT);
- each receipt number of a till belongs to one receipt, and each receipt number up to the
  last Z-report's is in exactly one Z-report. Receipts after a till's last Z-report
  belong to its open business day (not a problem; shown).

A receipt can be archived in more than one record (its states, a repeat): it is
counted once, by ``receipt_id``, in its first closed state (lowest ``till_seq``). Only
closed receipts have numbers. The work is done in PostgreSQL, in one read-only
repeatable-read snapshot: the receipts are read once, summed per segment of receipt
numbers between the Z-reports' boundaries (jsonb expansion of their VAT and payment lists,
hash aggregation), gaps found with window functions (``lag``); Python gets a few rows
per Z-report and per gap and compares them (see ``_RECEIPTS_BY_ZREPORT``). About 20 s
for a till with a million receipts on a development machine.

Money is integer cents; the command line shows euros as ``12,30 €``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import datetime as dt
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Optional
from uuid import UUID

import asyncpg
import typer
from pydantic import ValidationError
from rich.text import Text

from shared.consumer import validation_summary
from shared.models import Receipt, ZReport
from shared.settings import ServiceSettings
from tillsync.archive_tills import archive_integrity_problems, connect_archive, select_tills
from tillsync.console import friendly, out


# ---------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class NumberRange:
    """Consecutive numbers ``first`` … ``last`` (both included; ``first <= last``)."""

    first: int
    last: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}–{self.last}"


Measure = Literal["receipt_count", "vat", "vat_net", "vat_tax", "business_case", "payment", "total"]
_MEASURE_ORDER: dict[str, int] = {
    "receipt_count": 0, "vat": 1, "vat_net": 2, "vat_tax": 3, "business_case": 4, "payment": 5, "total": 6
}


@dataclass(frozen=True)
class TotalDifference:
    """One figure of a Z-report that differs from the sum of its receipts.

    ``measure``/``key``: ``receipt_count`` (a count, ``key`` empty), ``total`` (cents),
    ``vat`` (gross cents, ``key = (UST_SCHLUESSEL,)``), ``business_case`` (gross cents,
    ``key = (GV_TYP, UST_SCHLUESSEL)``), ``payment`` (cents, ``key = (ZAHLART_TYP,
    ZAHLART_NAME)``). ``in_zreport``: what the Z-report says; ``in_receipts``: the sum
    over its archived receipts.
    """

    measure: Measure
    key: tuple[str, ...]
    in_zreport: int
    in_receipts: int

    @property
    def what(self) -> str:
        """The figure in words, e.g. ``VAT key 1 gross`` or ``payment ECKarte (EC-Karte)``."""
        if self.measure == "receipt_count":
            return "receipt count"
        if self.measure == "total":
            return "total"
        if self.measure == "vat":
            return f"VAT key {self.key[0]} gross"
        if self.measure == "vat_net":
            return f"VAT key {self.key[0]} net"
        if self.measure == "vat_tax":
            return f"VAT key {self.key[0]} VAT"
        if self.measure == "business_case":
            return f"business case {self.key[0]} with VAT key {self.key[1]} gross"
        payment_type, payment_name = self.key
        return f"payment {payment_type}" + ("" if payment_name == payment_type else f" ({payment_name})")

    def __str__(self) -> str:
        show = str if self.measure == "receipt_count" else euros
        return f"{self.what} {show(self.in_zreport)} in the Z-report, {show(self.in_receipts)} in its receipts"


@dataclass(frozen=True)
class ZReportProblem:
    """A Z-report whose receipts are not all archived or do not add up to its totals.

    ``receipt_numbers``: the range the Z-report covers (None for a day without receipts);
    ``missing_receipts``: numbers in that range without an archived closed receipt.
    """

    z_nr: int
    business_day: dt.date
    record_id: UUID
    receipt_numbers: NumberRange | None
    missing_receipts: tuple[NumberRange, ...]
    differences: tuple[TotalDifference, ...]

    def __str__(self) -> str:
        parts = []
        if self.missing_receipts:
            count = sum(r.count for r in self.missing_receipts)
            parts.append(f"{'receipt' if count == 1 else 'receipts'} {ranges_text(self.missing_receipts)} missing")
        parts.extend(str(d) for d in self.differences)
        covers = f" (receipts {self.receipt_numbers})" if self.receipt_numbers else " (no receipts)"
        return f"Z {self.z_nr} of {self.business_day.isoformat()}{covers}: " + "; ".join(parts)


@dataclass(frozen=True)
class DuplicateReceiptNumber:
    """A receipt number (``BON_NR``) that two or more different receipts of one till carry."""

    receipt_number: int
    receipt_ids: tuple[UUID, ...]


@dataclass(frozen=True)
class OpenBusinessDay:
    """The closed receipts after a till's last Z-report (not yet closed out; not a problem).
    ``total`` in cents."""

    receipts: int
    receipt_numbers: NumberRange
    total: int


@dataclass(frozen=True)
class TillStatus:
    """How complete one till's archive is.

    ``records``: archived records; ``last_till_seq``: the highest archived ``till_seq``
    (0: none); ``till_seq_gaps``: ``till_seq`` ranges below it that are not archived;
    ``zreports``: archived Z-reports, ``last_z_nr`` the highest ``Z_NR``;
    ``missing_z_numbers``: ``Z_NR`` below it not archived; ``repeated_z_numbers``:
    ``Z_NR`` archived in more than one record; ``receipts_in_no_zreport`` /
    ``receipts_in_several_zreports``: receipt numbers up to the last Z-report's that no
    Z-report covers / more than one covers.
    """

    account_id: UUID
    account_name: str
    till_id: UUID
    serial_number: str
    till_name: str
    records: int
    last_till_seq: int
    till_seq_gaps: tuple[NumberRange, ...]
    zreports: int
    last_z_nr: int
    incomplete_zreports: tuple[ZReportProblem, ...]
    missing_z_numbers: tuple[NumberRange, ...]
    repeated_z_numbers: tuple[int, ...]
    duplicate_receipt_numbers: tuple[DuplicateReceiptNumber, ...]
    receipts_in_no_zreport: tuple[NumberRange, ...]
    receipts_in_several_zreports: tuple[NumberRange, ...]
    open_business_day: OpenBusinessDay | None
    # one sentence each: archived Z-reports that are no valid Z-report (left out of the checks),
    # uploads the archive refused (kept in archive_conflicts), a receipt closed twice with
    # other content or by two tills
    record_problems: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """True if none of the checks found anything."""
        return not (
            self.till_seq_gaps or self.incomplete_zreports or self.missing_z_numbers or self.repeated_z_numbers
            or self.duplicate_receipt_numbers or self.receipts_in_no_zreport or self.receipts_in_several_zreports
            or self.record_problems
        )

    @property
    def name(self) -> str:
        """``Kasse 1 (serial K1, till <till_id>)``: what names the till for people."""
        return f"{self.till_name} (serial {self.serial_number}, till {self.till_id})"

    def problems(self) -> list[str]:
        """One sentence per problem found (empty if ``complete``)."""
        lines = list(self.record_problems) + [str(z) for z in self.incomplete_zreports]
        if self.missing_z_numbers:
            lines.append(f"Z {ranges_text(self.missing_z_numbers)} missing: Z-reports not uploaded yet or lost")
        lines.extend(f"Z {z_nr} archived more than once" for z_nr in self.repeated_z_numbers)
        lines.extend(
            f"receipt number {d.receipt_number} carried by {len(d.receipt_ids)} receipts: "
            + ", ".join(str(i) for i in d.receipt_ids)
            for d in self.duplicate_receipt_numbers[:_LISTED]
        )
        if len(self.duplicate_receipt_numbers) > _LISTED:
            lines.append(
                f"… and {len(self.duplicate_receipt_numbers) - _LISTED} more receipt numbers carried by more than one receipt"
            )
        if self.receipts_in_no_zreport:
            lines.append(f"{_numbers(self.receipts_in_no_zreport)} in no Z-report")
        if self.receipts_in_several_zreports:
            lines.append(f"{_numbers(self.receipts_in_several_zreports)} in more than one Z-report")
        if self.till_seq_gaps:
            count = sum(g.count for g in self.till_seq_gaps)
            lines.append(
                f"till_seq {ranges_text(self.till_seq_gaps)} missing ({count} {'record' if count == 1 else 'records'}): "
                "not uploaded yet (the till is offline or signed out, or in custom mode with an upload switch off) "
                "or lost"
            )
        return lines

    def facts(self) -> str:
        """What was checked, e.g. ``120 records (till_seq up to 120), 3 Z-reports (up to Z 3)``."""
        text = f"{self.records} {'record' if self.records == 1 else 'records'}"
        text += f" (till_seq up to {self.last_till_seq})" if self.last_till_seq else ""
        text += f", {self.zreports} {'Z-report' if self.zreports == 1 else 'Z-reports'}"
        text += f" (up to Z {self.last_z_nr})" if self.last_z_nr else ""
        if self.open_business_day:
            o = self.open_business_day
            text += (
                f"; open business day: {o.receipts} {'receipt' if o.receipts == 1 else 'receipts'} "
                f"({o.receipt_numbers}), {euros(o.total)}"
            )
        return text


_LISTED = 20  # receipt numbers used twice listed one by one; the rest are counted


def euros(cents: int) -> str:
    """``1234567`` cents → ``12.345,67 €`` (German notation, exact)."""
    sign = "-" if cents < 0 else ""
    whole, rest = divmod(abs(cents), 100)
    return f"{sign}{whole:,}".replace(",", ".") + f",{rest:02d} €"


def ranges_text(ranges: Iterable[NumberRange], limit: int = 20) -> str:
    """``17, 19–20``; after ``limit`` ranges ``… (N more numbers)``."""
    ranges = list(ranges)
    text = ", ".join(str(r) for r in ranges[:limit])
    if len(ranges) > limit:
        text += f", … ({sum(r.count for r in ranges[limit:])} more numbers)"
    return text


# ---------------------------------------------------------------------------
# Queries ($1: the till ids, uuid[])

# Each closed receipt once (a receipt id can be archived in more than one record). The
# record's fields are read in one pass (jsonb_to_record), ids compared as uuid.
_RECEIPT = """
receipt as (
    select distinct on (a.till_id, r.receipt_id)
           a.till_id, r.receipt_id, r.receipt_number as nr, r.total, r.vat,
           coalesce(r.payments, '[]'::jsonb) as payments, coalesce(r.business_case, 'Umsatz') as business_case
    from archive_records a
    cross join lateral jsonb_to_record(a.payload->'record') as r (
        receipt_id uuid, receipt_number bigint, status text, total bigint, vat jsonb, payments jsonb, business_case text
    )
    where a.till_id = any($1::uuid[]) and a.kind = 'receipt' and r.status = 'closed'
    order by a.till_id, r.receipt_id, a.till_seq
)"""

_ZREPORT = """
zreport as (
    select a.record_id, a.till_id,
           (a.payload->'record'->>'first_receipt_number')::bigint as first_nr,
           (a.payload->'record'->>'last_receipt_number')::bigint as last_nr
    from archive_records a
    where a.till_id = any($1::uuid[]) and a.kind = 'zreport'
)"""

# uploads refused by the archive writer (kept, not archived): how many, and the first
_REFUSED = """
select distinct on (till_id) till_id, count(*) over (partition by till_id) as refused, till_seq, record_id, reason
from archive_conflicts where till_id = any($1::uuid[])
order by till_id, till_seq, received_at
"""

# closed receipts of the accounts archived in more than one version, or by more than one till
_RECEIPTS_CLOSED_TWICE = """
select payload->'record'->>'receipt_id' as receipt_id, array_agg(distinct till_id) as till_ids,
       count(distinct payload->'record') as versions,
       array_agg(distinct (payload->'record'->>'receipt_number')::bigint) as numbers
from archive_records
where account_id = any($1::uuid[]) and kind = 'receipt' and payload->'record'->>'status' = 'closed'
group by 1
having count(distinct payload->'record') > 1 or count(distinct till_id) > 1
"""

# from the keys taken on arrival (archive_record_keys): they stay when a month past the
# retention period is purged, so purged records are no gap (a record deleted otherwise is
# for `tillsync archive verify`); ``purged``: records of months dropped past the period
_RECORDS = """
select k.till_id, count(*) as records, max(k.till_seq) as last_till_seq,
       count(*) filter (where archive_deletable_from(date_trunc('month', k.archived_at at time zone archive_time_zone())::date)
                              <= now()
                          and not exists (select 1 from archive_records r
                                          where r.record_id = k.record_id and r.archived_at = k.archived_at)) as purged
from archive_record_keys k where k.till_id = any($1::uuid[]) group by k.till_id
"""

# Missing till_seq below the highest archived one (the unique (till_id, till_seq) index
# gives them in order).
_TILL_SEQ_GAPS = """
select till_id, prev + 1 as first, till_seq - 1 as last
from (
    select till_id, till_seq, lag(till_seq, 1, 0::bigint) over (partition by till_id order by till_seq) as prev
    from archive_record_keys where till_id = any($1::uuid[])
) s
where till_seq > prev + 1
order by till_id, first
"""

_ZREPORTS = """
select a.record_id, a.till_id, a.till_seq, (a.payload->'record')::text as body
from archive_records a
where a.till_id = any($1::uuid[]) and a.kind = 'zreport'
order by a.till_id, (a.payload->'record'->>'z_nr')::bigint, a.till_seq
"""

# The receipts against the Z-reports, in one statement (one pass over the receipts).
#
# The Z-reports' ranges cut a till's receipt numbers into segments: the boundaries are
# every first_receipt_number and every last_receipt_number + 1; ``width_bucket`` (a
# binary search) puts each receipt into its segment (0: below every Z-report; the last:
# above every Z-report, the open business day). A Z-report covers whole segments, so
# the receipts' figures are summed per segment (hash aggregation, no sort of the
# receipts) and then per Z-report over the segments it covers. Ranges that overlap are
# summed exactly too. Only segments that lack numbers are sorted, to name the missing
# numbers. Rows out, by ``row_kind``:
# - ``sum``: record_id (a Z-report), measure, key1, key2, value — one figure of the
#   receipts it covers: receipt_count, total, vat (key1 = UST_SCHLUESSEL: gross),
#   business_case (GV_TYP, UST_SCHLUESSEL: gross), payment (ZAHLART_TYP, ZAHLART_NAME);
# - ``missing``: till_id, a..b — receipt numbers a Z-report covers without an archived
#   closed receipt;
# - ``duplicate``: till_id, a (receipt number), ids (JSON list of the receipt ids);
# - ``open``: till_id, a..b (lowest and highest receipt number), c (receipts), d
#   (their total in cents) of the receipts above every Z-report.
_RECEIPTS_BY_ZREPORT = f"""
with {_RECEIPT}, {_ZREPORT},
bound as (
    select till_id, array_agg(b order by b) as b
    from (
        select till_id, first_nr as b from zreport where first_nr is not null
        union
        select till_id, last_nr + 1 from zreport where last_nr is not null
    ) x
    group by till_id
),
placed as (
    select r.*, coalesce(width_bucket(r.nr, b.b), 0) as seg, coalesce(cardinality(b.b), 0) as last_seg
    from receipt r left join bound b using (till_id)
),
number as (
    select till_id, seg, last_seg, nr, count(*) as receipts, sum(total)::bigint as total
    from placed group by till_id, seg, last_seg, nr
),
segment as (
    select till_id, seg, last_seg, count(*) as numbers, sum(receipts)::bigint as receipts,
           min(nr) as lo, max(nr) as hi, sum(total)::bigint as total
    from number group by till_id, seg, last_seg
),
cover as (
    select z.record_id, z.till_id,
           generate_series(width_bucket(z.first_nr, b.b), width_bucket(z.last_nr + 1, b.b) - 1) as seg
    from zreport z join bound b using (till_id)
    where z.first_nr is not null and z.last_nr is not null and z.first_nr <= z.last_nr
),
covered as (
    select distinct c.till_id, c.seg, b.b[c.seg] as first, b.b[c.seg + 1] - 1 as last
    from cover c join bound b using (till_id)
),
short as (
    select c.*, s.hi
    from covered c left join segment s using (till_id, seg)
    where coalesce(s.numbers, 0) < c.last - c.first + 1
),
per_segment as (
    select till_id, seg, count(*)::bigint as receipts, sum(total)::bigint as total from placed group by till_id, seg
),
per_case as (
    select p.till_id, p.seg, p.business_case, v->>'vat_key' as vat_key, sum((v->>'gross')::bigint)::bigint as gross,
           sum((v->>'net')::bigint)::bigint as net, sum((v->>'vat')::bigint)::bigint as tax
    from placed p cross join jsonb_array_elements(p.vat) v
    group by 1, 2, 3, 4
),
figure as (
    select till_id, seg, 'receipt_count' as measure, '' as key1, '' as key2, receipts as value from per_segment
    union all
    select till_id, seg, 'total', '', '', total from per_segment
    union all
    select till_id, seg, 'vat', vat_key, '', sum(gross)::bigint from per_case group by 1, 2, 3, 4, 5
    union all
    select till_id, seg, 'vat_net', vat_key, '', sum(net)::bigint from per_case group by 1, 2, 3, 4, 5
    union all
    select till_id, seg, 'vat_tax', vat_key, '', sum(tax)::bigint from per_case group by 1, 2, 3, 4, 5
    union all
    select till_id, seg, 'business_case', business_case, vat_key, gross from per_case
    union all
    select p.till_id, p.seg, 'payment', x->>'payment_type', x->>'payment_name', sum((x->>'amount')::bigint)::bigint
    from placed p cross join jsonb_array_elements(p.payments) x
    group by 1, 2, 3, 4, 5
)
select 'sum' as row_kind, c.record_id, null::uuid as till_id, f.measure, f.key1, f.key2,
       sum(f.value)::bigint as a, null::bigint as b, null::bigint as c, null::bigint as d, null::text as ids
from cover c join figure f using (till_id, seg)
group by c.record_id, f.measure, f.key1, f.key2
union all
select 'missing', null, till_id, null, null, null, prev + 1, nr - 1, null, null, null
from (
    select n.till_id, n.nr, lag(n.nr, 1, s.first - 1) over (partition by n.till_id, n.seg order by n.nr) as prev
    from short s join number n using (till_id, seg)
) g
where nr > prev + 1
union all
select 'missing', null, till_id, null, null, null, coalesce(hi + 1, first), last, null, null, null
from short
where coalesce(hi, first - 1) < last
union all
select 'duplicate', null, n.till_id, null, null, null, n.nr, null, null, null,
       jsonb_agg(p.receipt_id order by p.receipt_id::text)::text
from number n join placed p using (till_id, seg, nr)
where n.receipts > 1
group by n.till_id, n.nr
union all
select 'open', null, till_id, null, null, null, lo, hi, receipts, total, null
from segment
where seg = last_seg
"""


# ---------------------------------------------------------------------------
# The check


async def archive_status(
    conn: asyncpg.Connection, account_name: str | None = None, till: str | None = None
) -> list[TillStatus]:
    """The completeness of the archive of every till (of ``account_name``; only ``till``).

    ``till``: a till's id, serial number or name (name case-insensitive; several tills
    can match). Returns one ``TillStatus`` per till, ordered by account name, till name
    and serial number. Reads ``tills``, ``accounts`` and ``archive_records`` in one
    read-only repeatable-read transaction (unless ``conn`` is in a transaction already).
    Raises ``TillSelectionError`` for an unknown account name or a ``till`` that matches
    no till.
    """
    async with _snapshot(conn):
        tills = await select_tills(conn, till, account_name)
        if not tills:
            return []
        ids = [t["till_id"] for t in tills]
        records = {r["till_id"]: r for r in await conn.fetch(_RECORDS, ids)}
        seq_gaps: dict[UUID, list[NumberRange]] = defaultdict(list)
        for r in await conn.fetch(_TILL_SEQ_GAPS, ids):
            seq_gaps[r["till_id"]].append(NumberRange(r["first"], r["last"]))
        zreports: dict[UUID, list[tuple[UUID, ZReport]]] = defaultdict(list)
        invalid: dict[UUID, list[str]] = defaultdict(list)
        for r in await conn.fetch(_ZREPORTS, ids):
            try:
                zreports[r["till_id"]].append((r["record_id"], ZReport.model_validate_json(r["body"])))
            except ValidationError as exc:  # changed after archiving? (tillsync archive verify)
                invalid[r["till_id"]].append(
                    f"record {r['record_id']} (till_seq {r['till_seq']}) is no valid Z-report: {validation_summary(exc)}; "
                    "left out of these checks (see `tillsync archive verify`)"
                )
        for r in await conn.fetch(_REFUSED, ids):
            invalid[r["till_id"]].append(
                f"{r['refused']} {'upload' if r['refused'] == 1 else 'uploads'} refused by the archive and kept in "
                f"archive_conflicts, first till_seq {r['till_seq']} (record {r['record_id']}): {r['reason']}; its content "
                "is not in the archive (`tillsync ops dead-letters`)"
            )
        for r in await conn.fetch(_RECEIPTS_CLOSED_TWICE, list({t["account_id"] for t in tills})):
            for till_id in r["till_ids"]:
                if r["versions"] > 1:
                    invalid[till_id].append(
                        f"receipt {r['receipt_id']} is archived closed in {r['versions']} different versions (BON_NR "
                        f"{', '.join(map(str, r['numbers']))}): which one is the till's is not for the archive to decide"
                    )
                if len(r["till_ids"]) > 1:
                    invalid[till_id].append(
                        f"receipt {r['receipt_id']} is archived closed by {len(r['till_ids'])} tills "
                        f"({', '.join(str(t) for t in r['till_ids'])}): a receipt belongs to one closing"
                    )
        sums: dict[UUID, dict[tuple[str, tuple[str, ...]], int]] = defaultdict(dict)
        missing: dict[UUID, list[NumberRange]] = defaultdict(list)
        duplicates: dict[UUID, list[DuplicateReceiptNumber]] = defaultdict(list)
        open_days: dict[UUID, OpenBusinessDay] = {}
        for r in await conn.fetch(_RECEIPTS_BY_ZREPORT, ids):
            if r["row_kind"] == "sum":
                sums[r["record_id"]][_figure(r["measure"], r["key1"], r["key2"])] = r["a"]
            elif r["row_kind"] == "missing":
                missing[r["till_id"]].append(NumberRange(r["a"], r["b"]))
            elif r["row_kind"] == "duplicate":
                duplicates[r["till_id"]].append(DuplicateReceiptNumber(r["a"], tuple(UUID(i) for i in json.loads(r["ids"]))))
            else:
                open_days[r["till_id"]] = OpenBusinessDay(r["c"], NumberRange(r["a"], r["b"]), r["d"])
    return [
        dataclasses.replace(
            _till_status(
                t, records.get(t["till_id"]), seq_gaps[t["till_id"]], zreports[t["till_id"]], sums,
                sorted(missing[t["till_id"]], key=lambda r: r.first),
                sorted(duplicates[t["till_id"]], key=lambda d: d.receipt_number), open_days.get(t["till_id"]),
            ),
            record_problems=tuple(invalid[t["till_id"]]),
        )
        for t in tills
    ]


@contextlib.asynccontextmanager
async def _snapshot(conn: asyncpg.Connection) -> Any:
    """All queries see one state of the archive (tills keep uploading meanwhile)."""
    if conn.is_in_transaction():
        yield
        return
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        # a report over a whole archive: sort and hash in memory rather than on disk
        await conn.execute("set local work_mem = '64MB'")
        yield


def _figure(measure: str, key1: str, key2: str) -> tuple[str, tuple[str, ...]]:
    if measure in ("receipt_count", "total"):
        return measure, ()
    if measure in ("vat", "vat_net", "vat_tax"):
        return measure, (key1,)
    return measure, (key1, key2)


def _zreport_figures(z: ZReport) -> dict[tuple[str, tuple[str, ...]], int]:
    """The Z-report's figures keyed like the receipts' sums (``_ZREPORT_SUMS``)."""
    figures: dict[tuple[str, tuple[str, ...]], int] = defaultdict(int)
    figures["receipt_count", ()] += z.receipt_count
    figures["total", ()] += z.total
    for v in z.totals_by_vat:
        figures["vat", (str(int(v.vat_key)),)] += v.gross
        figures["vat_net", (str(int(v.vat_key)),)] += v.net
        figures["vat_tax", (str(int(v.vat_key)),)] += v.vat
    for b in z.totals_by_business_case:
        figures["business_case", (b.business_case.value, str(int(b.vat_key)))] += b.gross
    for p in z.totals_by_payment_type:
        figures["payment", (p.payment_type.value, p.payment_name)] += p.amount
    return figures


def _receipt_figures(receipts: Iterable[Receipt]) -> dict[tuple[str, tuple[str, ...]], int]:
    """The receipts' sums keyed like ``_zreport_figures`` (as ``_RECEIPTS_BY_ZREPORT`` sums them)."""
    figures: dict[tuple[str, tuple[str, ...]], int] = defaultdict(int)
    for r in receipts:
        figures["receipt_count", ()] += 1
        figures["total", ()] += r.total
        for v in r.vat:
            key = str(int(v.vat_key))
            figures["vat", (key,)] += v.gross
            figures["vat_net", (key,)] += v.net
            figures["vat_tax", (key,)] += v.vat
            figures["business_case", (r.business_case.value, key)] += v.gross
        for p in r.payments:
            figures["payment", (p.payment_type.value, p.payment_name)] += p.amount
    return figures


def _numbers(ranges: tuple[NumberRange, ...]) -> str:
    """``receipt number 3 is`` / ``receipt numbers 3, 5–7 are``."""
    one = sum(r.count for r in ranges) == 1
    return f"receipt number{'' if one else 's'} {ranges_text(ranges)} {'is' if one else 'are'}"


def closing_differences(z: ZReport, receipts: list[Receipt]) -> tuple[TotalDifference, ...]:
    """Where ``receipts`` (the closed receipts of ``z``'s number range) do not add up to
    the Z-report ``z``: receipt count, total, gross/net/VAT per VAT key, gross per business
    case and VAT key, amount per payment type and name (cents). The same rule as
    ``archive_status``; empty when the closing equals its receipts."""
    return _differences(z, _receipt_figures(receipts))


def _differences(z: ZReport, receipts: dict[tuple[str, tuple[str, ...]], int]) -> tuple[TotalDifference, ...]:
    expected = _zreport_figures(z)

    def order(figure: tuple[str, tuple[str, ...]]) -> tuple[Any, ...]:
        measure, key = figure
        return (_MEASURE_ORDER[measure], *(int(k) if k.isdigit() else 0 for k in key), key)

    return tuple(
        TotalDifference(measure, key, expected.get((measure, key), 0), receipts.get((measure, key), 0))  # type: ignore[arg-type]
        for measure, key in sorted(set(expected) | set(receipts), key=order)
        if expected.get((measure, key), 0) != receipts.get((measure, key), 0)
    )


def _missing(covered: NumberRange, gap_firsts: list[int], gaps: list[NumberRange]) -> tuple[NumberRange, ...]:
    """The receipt numbers of ``covered`` among ``gaps`` (sorted, disjoint: the numbers
    that the till's Z-reports cover without an archived receipt)."""
    missing = []
    for gap in gaps[max(bisect.bisect_right(gap_firsts, covered.first) - 1, 0):]:
        if gap.first > covered.last:
            break
        if gap.last >= covered.first:
            missing.append(NumberRange(max(gap.first, covered.first), min(gap.last, covered.last)))
    return tuple(_merged(missing))


def _missing_numbers(numbers: Iterable[int], from_lowest: bool = False) -> tuple[NumberRange, ...]:
    """The numbers 1 (``from_lowest``: the lowest of ``numbers``) … max(numbers) not in
    ``numbers``, as ranges."""
    ordered = sorted(set(numbers))
    missing, previous = [], (ordered[0] - 1 if from_lowest and ordered else 0)
    for n in ordered:
        if n > previous + 1:
            missing.append(NumberRange(previous + 1, n - 1))
        previous = n
    return tuple(missing)


def _coverage(ranges: Iterable[NumberRange]) -> tuple[tuple[NumberRange, ...], tuple[NumberRange, ...]]:
    """``(in no range, in several ranges)`` of the numbers 1 … the highest ``last``."""
    uncovered, overlapping, covered_to = [], [], 0
    for r in sorted(ranges, key=lambda r: (r.first, r.last)):
        if r.first > covered_to + 1:
            uncovered.append(NumberRange(covered_to + 1, r.first - 1))
        elif r.first <= covered_to:
            overlapping.append(NumberRange(r.first, min(r.last, covered_to)))
        covered_to = max(covered_to, r.last)
    return tuple(uncovered), tuple(_merged(overlapping))


def _merged(ranges: list[NumberRange]) -> Iterator[NumberRange]:
    current: NumberRange | None = None
    for r in sorted(ranges, key=lambda r: r.first):
        if current and r.first <= current.last + 1:
            current = NumberRange(current.first, max(current.last, r.last))
            continue
        if current:
            yield current
        current = r
    if current:
        yield current


def _till_status(
    till: asyncpg.Record,
    records: asyncpg.Record | None,
    seq_gaps: list[NumberRange],
    zreports: list[tuple[UUID, ZReport]],
    sums: dict[UUID, dict[tuple[str, tuple[str, ...]], int]],
    gaps: list[NumberRange],
    duplicates: list[DuplicateReceiptNumber],
    open_day: OpenBusinessDay | None,
) -> TillStatus:
    gap_firsts = [g.first for g in gaps]
    problems, ranges = [], []
    for record_id, z in zreports:
        covered = None
        missing: tuple[NumberRange, ...] = ()
        if z.first_receipt_number is not None and z.last_receipt_number is not None:
            covered = NumberRange(z.first_receipt_number, z.last_receipt_number)
            ranges.append(covered)
            missing = _missing(covered, gap_firsts, gaps)
        differences = _differences(z, sums.get(record_id, {}))
        if missing or differences:
            problems.append(ZReportProblem(z.z_nr, z.business_day, record_id, covered, missing, differences))
    z_nrs = [z.z_nr for _, z in zreports]
    uncovered, overlapping = _coverage(ranges)
    return TillStatus(
        account_id=till["account_id"],
        account_name=till["account_name"],
        till_id=till["till_id"],
        serial_number=till["serial_number"],
        till_name=till["till_name"],
        records=records["records"] if records else 0,
        last_till_seq=records["last_till_seq"] if records else 0,
        till_seq_gaps=tuple(seq_gaps),
        zreports=len(zreports),
        last_z_nr=max(z_nrs, default=0),
        incomplete_zreports=tuple(problems),
        # Z-reports of months purged past the retention period are no gap
        missing_z_numbers=_missing_numbers(z_nrs, from_lowest=bool(records and records["purged"])),
        repeated_z_numbers=tuple(sorted(n for n, times in Counter(z_nrs).items() if times > 1)),
        duplicate_receipt_numbers=tuple(duplicates),
        receipts_in_no_zreport=uncovered,
        receipts_in_several_zreports=overlapping,
        open_business_day=open_day,
    )


# ---------------------------------------------------------------------------
# Command line: ``tillsync archive status``


def archive_status_command(
    till: Optional[str] = typer.Option(None, "--till", help="only this till: its id, serial number or name"),
    account: Optional[str] = typer.Option(None, "--account", help="only the tills of this account (account name)"),
    all_: bool = typer.Option(False, "--all", help="also list the tills whose archive is complete"),
) -> None:
    """Check that each till's archive is complete (exit code 1 if not).

    Every Z-report's receipts archived and adding up to its totals, Z numbers and
    till_seq without gaps, no receipt number twice. Lists the tills with problems (with --all every till) and ends with a summary line.
    Exit code 1 if any till's archive is incomplete (or on an error), 0 otherwise.
    Reads TILLSYNC_DATABASE_URL."""
    friendly(_status)(till, account, all_)


def _status(till: str | None, account: str | None, all_: bool) -> None:
    settings = ServiceSettings()

    async def body() -> tuple[list[TillStatus], list[str]]:
        conn = await connect_archive(settings.database_url, decode_json=False)
        try:
            problems = await archive_integrity_problems(conn)
            try:
                return await archive_status(conn, account_name=account, till=till), problems
            except asyncpg.DataError as exc:  # a figure of an archived record is no number: changed after archiving?
                raise ValueError(
                    f"an archived receipt or Z-report holds a value of the wrong type ({exc}): it was changed after "
                    "archiving; `tillsync archive verify` names it"
                ) from None
        finally:
            await conn.close()

    statuses, problems = asyncio.run(body())
    for problem in problems:
        out.print(f"INCOMPLETE the archive itself: {problem}")
    incomplete = [s for s in statuses if not s.complete]
    for status in statuses if all_ else incomplete:
        verdict = Text("complete", style="green") if status.complete else Text("INCOMPLETE", style="bold red")
        out.print(Text(f"{status.name} of {status.account_name}: ") + verdict + Text(f"; {status.facts()}"))
        for problem in status.problems():
            out.print(f"  - {problem}")
    out.print(_summary(statuses, incomplete) + (f"; {len(problems)} problem(s) of the archive itself" if problems else ""))
    if incomplete or problems:
        raise typer.Exit(1)


def _summary(statuses: list[TillStatus], incomplete: list[TillStatus]) -> str:
    if not statuses:
        return "no tills to check"
    checked = f"{len(statuses)} {'till' if len(statuses) == 1 else 'tills'} checked"
    if not incomplete:
        return f"{checked}: every till's archive is complete"
    found = [
        (sum(len(s.incomplete_zreports) for s in incomplete), "incomplete Z-report"),
        (sum(r.count for s in incomplete for r in s.missing_z_numbers), "missing Z number"),
        (sum(r.count for s in incomplete for r in s.till_seq_gaps), "missing till_seq number"),
        (sum(len(s.duplicate_receipt_numbers) for s in incomplete), "receipt number used twice"),
        (sum(len(s.repeated_z_numbers) for s in incomplete), "Z number archived twice"),
        (sum(r.count for s in incomplete for r in s.receipts_in_no_zreport), "receipt number in no Z-report"),
        (sum(r.count for s in incomplete for r in s.receipts_in_several_zreports), "receipt number in several Z-reports"),
        (sum(len(s.record_problems) for s in incomplete), "other problem"),
    ]
    details = ", ".join(f"{n} {what}" if n == 1 else f"{n} {_plural(what)}" for n, what in found if n)
    return f"{checked}: {len(incomplete)} incomplete ({details}), {len(statuses) - len(incomplete)} complete"


def _plural(what: str) -> str:
    noun, _, rest = what.partition(" number")
    return f"{noun} numbers{rest}" if rest or what.endswith(" number") else what + "s"
