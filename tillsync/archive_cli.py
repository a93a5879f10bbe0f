"""``tillsync archive …``: the tax auditor's and the operator's view of the archive."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shared.settings import ServiceSettings
from tillsync.archive import purge_expired_command, retention_command
from tillsync.archive_status import archive_status_command, ranges_text
from tillsync.archive_tills import (
    archive_integrity_problems,
    connect_archive,
    select_tills,
    till_label,
    tills_without_row,
)
from tillsync.archive_verify import ChainReport, verify_archive
from tillsync.console import err, friendly, out
from tillsync.dsfinvk_export import export_dsfinvk_command

archive_app = typer.Typer(help="The archive: verify its hash chains, check completeness, export for a tax audit, "
                          "retention and monthly partitions.",
                          no_args_is_help=True)
archive_app.command("status")(archive_status_command)
archive_app.command("export-dsfinvk")(export_dsfinvk_command)
archive_app.command("retention")(retention_command)
archive_app.command("purge-expired")(purge_expired_command)

TillOption = typer.Option(None, "--till", help="one till: its id, serial number or name (default: every till)")
AccountOption = typer.Option(None, "--account", help="only the tills of this account (account name)")


def _chain_lines(report: ChainReport, label: str) -> list[str]:
    if report.intact:
        lines = [f"OK      {label}: {report.records} records, chain intact"]
    elif report.first_broken is None:
        lines = [f"BROKEN  {label}: {report.records} records link, but uploads were refused for breaking the chain"]
    else:
        b = report.first_broken
        lines = [
            f"BROKEN  {label}: first broken link at till_seq {b.till_seq}, record {b.record_id} ({b.label}): "
            + "; ".join(b.problems),
            f"        {report.broken} of {report.records} records fail the check",
        ]
    if report.chain_refusals:
        lines.append(
            f"        {report.chain_refusals} uploads of this till were refused for breaking its chain "
            "(kept in archive_conflicts: `tillsync ops dead-letters`)"
        )
    if report.other_refusals:
        lines.append(f"        {report.other_refusals} other uploads were refused (archive_conflicts)")
    if report.missing:
        lines.append(
            f"        till_seq {ranges_text(report.missing)} never archived: links across them not checked "
            "(see `tillsync archive status`)"
        )
    if report.unchained:
        lines.append(f"        {report.unchained} records archived before chaining (checked against their own hash only)")
    if report.purged:
        lines.append(f"        {report.purged} records purged after the retention period (their keys remain)")
    return lines


def _tills(n: int) -> str:
    return f"{n} till" if n == 1 else f"{n} tills"


@archive_app.command("verify")
@friendly
def archive_verify_command(till: Optional[str] = TillOption, account: Optional[str] = AccountOption) -> None:
    """Re-check every till's hash chain and name the first broken link of each.

    Exit code 0: every chain intact; 1: a record was changed or a link is broken."""
    settings = ServiceSettings()

    async def body() -> tuple[list[tuple[ChainReport, str]], list[str]]:
        conn = await connect_archive(settings.database_url)
        try:
            problems = await archive_integrity_problems(conn)
            tills: list[Any] = list(await select_tills(conn, till, account))
            if till is None and account is None:  # archived records of a till that `tills` no longer lists
                tills += [
                    {"till_id": t, "till_name": "(not in tills)", "serial_number": "?", "account_name": "?"}
                    for t in await tills_without_row(conn)
                ]
            total = await conn.fetchval(
                "select count(*) from archive_record_keys where till_id = any($1::uuid[])", [t["till_id"] for t in tills]
            )
            with Progress(
                TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=err, transient=True, disable=total < 5_000,
            ) as progress:
                task = progress.add_task("records", total=total)
                reports = await verify_archive(conn, tills, lambda n: progress.advance(task, n))
            return [(r, till_label(t)) for r, t in zip(reports, tills)], problems
        finally:
            await conn.close()

    results, problems = asyncio.run(body())
    for problem in problems:
        out.print(f"BROKEN  the archive: {problem}")
    for report, label in results:
        for line in _chain_lines(report, label):
            out.print(line)
    broken = [r for r, _ in results if not r.intact]
    records = sum(r.records for r, _ in results)
    if broken or problems:
        out.print(f"{len(broken)} of {_tills(len(results))} {'has' if len(broken) == 1 else 'have'} a broken chain "
                  f"({records} records checked)" + (f"; {len(problems)} problems of the archive itself" if problems else ""))
        raise typer.Exit(1)
    out.print(f"{_tills(len(results))}, {records} records: every chain intact")
