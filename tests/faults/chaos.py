"""Helpers of the fault suite (no fixtures here): faults to inject and the one check after each.

- ``FaultRng``: a seeded random generator; its ``replay_hint`` goes into every failure
  message, so ``TILLSYNC_FAULT_SEED=<seed>`` replays the same fault moments.
- ``kill_repeatedly``: SIGKILL a service process at random moments, restart it, until stopped.
- ``restart_rabbitmq`` / ``restart_postgresql``: a full restart of the shared local
  server, announced by ``SERVERS_RESTARTING_FLAG`` and always brought back (``finally``).
- ``assert_archive_equals_recorded``: every record each till recorded is in
  ``archive_records`` exactly once, by ``(till_id, till_seq)`` and ``record_id``.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Iterable
from uuid import UUID

import asyncpg
import httpx

from shared.models import SyncMode
from shared.topology import (
    ACCOUNT_SERVICE_QUEUE,
    ARCHIVE_WRITER_QUEUE,
    MASTERDATA_BROADCASTER_QUEUE,
    MASTERDATA_CATCHUP_QUEUE,
    PASSWORD_APPROVAL_QUEUE,
    RECEIPT_CATCHUP_QUEUE,
    RECEIPT_ROUTER_QUEUE,
)
from tests.support import BAKERY_CSV, Environment, new_account_name, signed_in_till, wait_until
from till_agent.store import TillStore
from till_agent.till import Till
from tillsync.bakery import BakeryExport, read_export
from tillsync.demo import sell_ticket
from tillsync.processes import ServiceProcess

# Other developers' test runs share the servers: while this file exists, a failure of
# theirs may come from a restart of ours (they re-run it).
REPOSITORY = Path(__file__).resolve().parents[2]
SERVERS_RESTARTING_FLAG = Path("/tmp/tillsync-servers-restarting")


def bakery_slice(target: Path, days: Iterable[str]) -> Path:
    """Write the sale lines of the given business days (``YYYY-MM-DD``) of the real
    bakery file to ``target`` (same format, header included); returns ``target``."""
    wanted = set(days)
    with BAKERY_CSV.open(newline="") as source, target.open("w", newline="") as sink:
        reader = csv.reader(source)
        writer = csv.writer(sink)
        writer.writerow(next(reader))
        writer.writerows(row for row in reader if row[1] in wanted)
    return target


class FaultRng(random.Random):
    """A random generator seeded from ``TILLSYNC_FAULT_SEED`` (else a fresh seed)."""

    def __init__(self) -> None:
        self.seed_value = int(os.environ.get("TILLSYNC_FAULT_SEED") or random.SystemRandom().randrange(2**32))
        super().__init__(self.seed_value)

    @property
    def replay_hint(self) -> str:
        return f"fault seed {self.seed_value} (replay: TILLSYNC_FAULT_SEED={self.seed_value})"


@dataclass
class KillLog:
    """What ``kill_repeatedly`` did: the rows archived since it began, at each kill."""

    archived_at_kill: list[int] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return len(self.archived_at_kill)


async def archived_count(env: Environment) -> int:
    """Rows in ``env``'s archive now."""
    conn = await asyncpg.connect(env.settings.database_url)
    try:
        return await conn.fetchval("select count(*) from archive_records")
    finally:
        await conn.close()


async def kill_repeatedly(
    env: Environment,
    process: ServiceProcess,
    rng: random.Random,
    stop: asyncio.Event,
    *,
    max_kills: int,
    alive_seconds: tuple[float, float] = (0.3, 3.0),
    dead_seconds: tuple[float, float] = (0.0, 1.5),
) -> KillLog:
    """Until ``stop`` is set or ``max_kills`` kills: let ``process`` run for a random
    time in ``alive_seconds``, SIGKILL it, leave it dead for a random time in
    ``dead_seconds``, start it and wait until it is ready again. The process runs when
    this returns. Raises ``ServiceStartError`` if a restart does not become ready."""
    log = KillLog()
    before = await archived_count(env)  # other tests' records of the same environment
    while log.kills < max_kills and not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(*alive_seconds))
            break
        except asyncio.TimeoutError:
            pass
        process.kill()
        log.archived_at_kill.append(await archived_count(env) - before)
        await asyncio.sleep(rng.uniform(*dead_seconds))
        process.start()
        await process.wait_ready(60)
    return log


@dataclass(frozen=True)
class ArchiveComparison:
    """The archive of some tills against their stores (counts of records)."""

    recorded: int  # records in the tills' outboxes
    archived: int  # rows of these tills in archive_records
    lost: list[tuple[UUID, int, UUID]]  # recorded (till_id, till_seq, record_id) not archived
    duplicated: int  # archive rows beyond one per (till_id, till_seq) or per record_id
    unexpected: list[tuple[UUID, int, UUID]]  # archived rows no till recorded so
    conflicts: int  # archive_conflicts rows of these tills

    @property
    def equal(self) -> bool:
        return not self.lost and not self.duplicated and not self.unexpected and not self.conflicts

    def summary(self) -> str:
        return (
            f"recorded {self.recorded}, archived {self.archived}, lost {len(self.lost)}, duplicated {self.duplicated}, "
            f"unexpected {len(self.unexpected)}, conflicts {self.conflicts}; first lost {self.lost[:3]}, "
            f"first unexpected {self.unexpected[:3]}"
        )


def recorded_keys(store_dirs: Iterable[Path]) -> set[tuple[UUID, int, UUID]]:
    """``(till_id, till_seq, record_id)`` of every record in the stores of ``store_dirs``
    (each a till's data directory; the till must have signed in once)."""
    keys = set()
    for directory in store_dirs:
        store = TillStore(directory)
        try:
            till_id = store.identity().till_id
            assert till_id is not None, f"the till in {directory} never signed in"
            keys.update((till_id, till_seq, record_id) for record_id, till_seq, _ in store.recorded())
        finally:
            store.close()
    return keys


async def compare_archive(env: Environment, store_dirs: Iterable[Path]) -> ArchiveComparison:
    """Compare ``env``'s archive with the tills' stores (see ``ArchiveComparison``)."""
    recorded = recorded_keys(store_dirs)
    till_ids = sorted({k[0] for k in recorded})
    conn = await asyncpg.connect(env.settings.database_url)
    try:
        rows = await conn.fetch(
            "select till_id, till_seq, record_id from archive_records where till_id = any($1::uuid[])", till_ids
        )
        conflicts = await conn.fetchval("select count(*) from archive_conflicts where till_id = any($1::uuid[])", till_ids)
    finally:
        await conn.close()
    archived = [(r["till_id"], r["till_seq"], r["record_id"]) for r in rows]
    duplicated = (len(archived) - len({(t, s) for t, s, _ in archived})) + (len(archived) - len({r for _, _, r in archived}))
    return ArchiveComparison(
        recorded=len(recorded),
        archived=len(archived),
        lost=sorted(recorded - set(archived)),
        duplicated=duplicated,
        unexpected=sorted(set(archived) - recorded),
        conflicts=conflicts,
    )


async def assert_archive_equals_recorded(
    env: Environment, store_dirs: Iterable[Path], context: str, timeout_seconds: float = 120.0
) -> ArchiveComparison:
    """Wait (at most ``timeout_seconds``) until the archive equals what the tills in
    ``store_dirs`` recorded; fail naming ``context`` (the fault and its seed) and the
    figures. Returns the final comparison."""
    dirs = list(store_dirs)
    deadline = time.monotonic() + timeout_seconds
    while True:
        comparison = await compare_archive(env, dirs)
        if comparison.equal or comparison.duplicated or comparison.conflicts or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.25)
    assert comparison.recorded > 0, f"{context}: the tills recorded nothing"
    assert comparison.equal, f"{context}: the archive differs from what the tills recorded: {comparison.summary()}"
    return comparison


# -- the shared servers ----------------------------------------------------------


def _run(*command: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


async def _wait_for(what: str, timeout_seconds: float, check) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_seconds
    while True:
        if await asyncio.to_thread(check):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not back after {timeout_seconds:.0f} s")
        await asyncio.sleep(0.5)


def _management_up(management_url: str) -> bool:
    try:
        return httpx.get(f"{management_url}/api/overview", auth=("guest", "guest"), timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def servers_restartable() -> str | None:
    """Why the local servers cannot be restarted here (None if they can): the fault
    suite restarts the machine's own RabbitMQ and PostgreSQL, which needs their
    command-line tools and root."""
    missing = [tool for tool in ("rabbitmqctl", "rabbitmq-server", "pg_ctlcluster", "pg_isready") if shutil.which(tool) is None]
    if missing:
        return f"missing server tools: {', '.join(missing)}"
    if os.geteuid() != 0:
        return "restarting the local servers needs root"
    return None


async def restart_rabbitmq(management_url: str, down_seconds: float = 0.0) -> float:
    """Fully restart the local RabbitMQ node (``rabbitmqctl shutdown``, ``rabbitmq-server
    -detached``) and wait until it and its management API answer again; returns the
    seconds it was unavailable. The node is started again whatever happens."""
    SERVERS_RESTARTING_FLAG.touch()
    started = time.monotonic()
    try:
        stopped = await asyncio.to_thread(_run, "rabbitmqctl", "shutdown")
        assert stopped.returncode == 0, f"rabbitmqctl shutdown failed: {stopped.stderr or stopped.stdout}"
        await asyncio.sleep(down_seconds)
    finally:
        # as scripts/infra.sh starts it: with room for many connections (open files)
        await asyncio.to_thread(_run, str(REPOSITORY / "scripts" / "start-rabbitmq.sh"))
        try:
            await asyncio.to_thread(_run, "rabbitmqctl", "await_startup", "--timeout", "120", timeout=150)
            await _wait_for("the RabbitMQ management API", 120, lambda: _management_up(management_url))
        finally:
            SERVERS_RESTARTING_FLAG.unlink(missing_ok=True)
    return time.monotonic() - started


async def restart_postgresql() -> float:
    """Restart the local PostgreSQL cluster (``pg_ctlcluster ... restart``) and wait
    for ``pg_isready``; returns the seconds it took."""
    SERVERS_RESTARTING_FLAG.touch()
    started = time.monotonic()
    version = sorted(os.listdir("/etc/postgresql"))[0]
    try:
        restarted = await asyncio.to_thread(_run, "pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart")
        assert restarted.returncode == 0, f"pg_ctlcluster restart failed: {restarted.stderr or restarted.stdout}"
    finally:
        try:
            if _run("pg_isready", "-h", "127.0.0.1", "-p", "5432").returncode != 0:
                await asyncio.to_thread(_run, "pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start")
            await _wait_for("PostgreSQL", 60, lambda: _run("pg_isready", "-h", "127.0.0.1", "-p", "5432").returncode == 0)
        finally:
            SERVERS_RESTARTING_FLAG.unlink(missing_ok=True)
    return time.monotonic() - started


# -- a replay with a fault in the middle ----------------------------------------------


@dataclass
class Replay:
    """Two tills of one account replaying real tickets (see ``replay_with_fault``)."""

    tills: list[Till]
    store_dirs: list[Path]
    export: BakeryExport
    sold_during_fault: int = 0


async def signed_in_tills(env: Environment, tmp_path: Path, count: int = 2) -> list[Till]:
    """``count`` tills of a new account in mode ``archive_masterdata_receipts``, syncing."""
    account = new_account_name()
    tills = []
    for i in range(count):
        till = await signed_in_till(env, tmp_path, account, name=f"Kasse {i + 1}", create=i == 0)
        await till.set_sync_mode(True, SyncMode.ARCHIVE_MASTERDATA_RECEIPTS)
        till.start_sync()
        tills.append(till)
    return tills


async def replay_with_fault(
    env: Environment,
    tmp_path: Path,
    csv_path: Path,
    fault: Callable[[Replay], Awaitable[object]],
    *,
    fault_at: float = 0.3,
    seconds_per_ticket: float = 0.01,
) -> Replay:
    """Replay the tickets of ``csv_path`` on two syncing tills of a new account (till 1
    also records the articles as master data, till 2 receives them); when ``fault_at``
    (a fraction) of the tickets are sold, start ``fault(replay)`` and go on selling while it
    runs (a till records offline when it must); close each business day on both tills;
    then wait for the fault to finish. Returns the tills, still syncing.

    ``seconds_per_ticket``: pause between tickets (the replay's pace)."""
    export = read_export(csv_path)
    tills = await signed_in_tills(env, tmp_path)
    first_at = min(t.at for t in export.tickets).astimezone(dt.UTC) - dt.timedelta(hours=1)
    for article in export.articles.values():
        tills[0].save_entity(article, first_at)
    replay = Replay(tills, [t.store.data_dir for t in tills], export)
    fault_task: asyncio.Task[object] | None = None
    start_fault_at = int(len(export.tickets) * fault_at)
    sold = 0
    try:
        for day in export.business_days:
            tickets = [t for t in export.tickets if t.business_day == day]
            for ticket in tickets:
                if fault_task is None and sold >= start_fault_at:
                    fault_task = asyncio.create_task(fault(replay))
                    await asyncio.sleep(0)  # the fault begins before the next sale
                sell_ticket(tills[ticket.till_index], export, ticket, day)
                sold += 1
                if fault_task is not None and not fault_task.done():
                    replay.sold_during_fault += 1
                await asyncio.sleep(seconds_per_ticket)
            closing_at = (max(t.at for t in tickets) + dt.timedelta(minutes=5)).astimezone(dt.UTC)
            for till in tills:
                till.close_day(day, closing_at)
        if fault_task is None:
            fault_task = asyncio.create_task(fault(replay))
        await fault_task
    except BaseException:
        if fault_task is not None and not fault_task.done():
            await asyncio.gather(fault_task, return_exceptions=True)  # never leave a server down
        await stop_tills(tills)
        raise
    return replay


async def stop_tills(tills: Iterable[Till]) -> None:
    """Stop syncing and close the stores."""
    for till in tills:
        await till.stop_sync()
        till.close()


async def assert_recovered(env: Environment, replay: Replay, context: str, timeout_seconds: float = 180.0) -> ArchiveComparison:
    """After a fault: the tills uploaded everything, every service consumes its queue
    again, the account service answers, a master-data change made now reaches the
    other till, and the archive equals what the tills recorded."""
    tills = replay.tills
    try:
        await wait_until(
            lambda: all(t.status().pending == 0 for t in tills), timeout_seconds, interval=0.2,
            what=f"{context}: the tills uploading their outboxes "
                 f"({'; '.join(f'{t.status().pending} pending, {t.status().state} {t.status().detail}' for t in tills)})",
        )
        for queue in SERVICE_QUEUES:
            await wait_until(
                lambda: _consumed(env, queue), 60, interval=0.5, what=f"{context}: a consumer on queue {queue}"
            )
        await tills[0].set_sync_mode(True, SyncMode.ARCHIVE_MASTERDATA_RECEIPTS)  # the account service answers
        article = sorted(replay.export.articles.values(), key=lambda a: a.article_nr)[0]
        tills[0].save_entity(article.model_copy(update={"unit_price": article.unit_price + 5}), dt.datetime.now(dt.UTC))
        await wait_until(
            lambda: tills[0].status().pending == 0 and not tills[0].store.pending_masterdata()
            and tills[1].store.masterdata_state_hash() == tills[0].store.masterdata_state_hash(),
            timeout_seconds, interval=0.2, what=f"{context}: till 2 receiving till 1's master-data change made after the fault",
        )
        return await assert_archive_equals_recorded(env, replay.store_dirs, context, timeout_seconds)
    finally:
        await stop_tills(tills)


SERVICE_QUEUES = (
    ACCOUNT_SERVICE_QUEUE, ARCHIVE_WRITER_QUEUE, MASTERDATA_BROADCASTER_QUEUE, MASTERDATA_CATCHUP_QUEUE,
    RECEIPT_ROUTER_QUEUE, RECEIPT_CATCHUP_QUEUE, PASSWORD_APPROVAL_QUEUE,
)


async def _consumed(env: Environment, queue: str) -> bool:
    facts = await env.admin.queue(env.vhost, queue) or {}
    return (facts.get("consumers") or 0) > 0
