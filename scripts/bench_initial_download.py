"""Benchmark: initial master-data download of N articles to a new till (target: under 20 s).

Measured: the wall time in seconds from ``Till.start_sync()`` of a new till, signed in
and set to mode ``archive_masterdata``, until it has caught up on the category
``articles`` (its feed position is the account's head and no catch-up is in progress)
and holds N live articles. Printed: articles, seconds, articles per second, seconds
until the first catch-up page was applied (before it: the till connecting and asking,
the broadcaster reading and building the catch-up), whether the target was met, the
resident memory of this process before and at its peak during the download (MiB;
services and tills share the process), and the check that the new till's master-data
state hash equals the seeding till's (exit status 1 if it differs).

Everything is real: the account service, archive writer and master-data broadcaster
run as tasks of this event loop (as in tests/integration/conftest.py) with their
default settings, against the broker and database named by TILLSYNC_AMQP_URL (any
vhost; it is replaced), TILLSYNC_MANAGEMENT_URL, TILLSYNC_DATABASE_URL and
TILLSYNC_DATABASE_ADMIN_URL (the server); tills are real till agents with SQLite stores in a temporary directory. The
N articles are seeded through the real path first (not measured, but timed): a first
till in mode ``archive_masterdata`` saves them and uploads them, the broadcaster
accepts them, the seeding till applies the verdicts and the archive writer archives
them (300-450 articles/s here, so 4-6 minutes for 100,000 on a 2-core machine); the
seeding till then goes offline so the cloud is quiet during the download.
A fresh vhost and database are created and, with the till users, removed at the end.

    .venv/bin/python scripts/bench_initial_download.py [--articles 100000] [--target-seconds 20]
        [--profile FILE]   (cProfile of the download phase, for pstats)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import resource
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import asyncpg

from services.account_service.main import AccountServiceSettings
from services.account_service.main import main as account_service_main
from services.archive_writer.main import ArchiveWriterSettings
from services.archive_writer.main import main as archive_writer_main
from services.masterdata_broadcaster.main import BroadcasterSettings
from services.masterdata_broadcaster.main import main as broadcaster_main
from shared.fiscal import VatKey
from shared.logging import configure_logging
from shared.models import Article, SyncMode
from shared.settings import DatabaseAdminSettings, amqp_url_with_credentials
from shared.topology import SIGNUP_USER
from benchenv import throwaway_environment
from till_agent.store import TillStore
from till_agent.till import Till, TillSettings

CATEGORY = "articles"
PASSWORD = "Backstube-2021!"  # strong enough for the account service's password rules
SAVE_CHUNK = 1000  # articles saved on the seeding till between yields to the event loop


def _article(i: int) -> Article:
    return Article(
        article_nr=f"A{i:07d}",
        text=f"Artikel {i} Vollkornbrot geschnitten 500 g",
        unit_price=50 + (i * 37) % 5000,
        vat_key=VatKey.REDUCED if i % 3 else VatKey.REGULAR,
        article_group_nr=f"G{i % 40:02d}",
    )


def _rss_mib() -> tuple[float | None, float]:
    """``(current, peak)`` resident memory of this process in MiB; the peak since the last
    ``_reset_peak_rss()`` (Linux), else since the start (``getrusage``) and no current value."""
    values = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    values[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    if "VmRSS" in values and "VmHWM" in values:
        return values["VmRSS"], values["VmHWM"]
    return None, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _reset_peak_rss() -> bool:
    """Reset the peak RSS (VmHWM) of this process; False where the system does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class _Figures:
    """The measured download: ``seconds`` from ``start_sync()`` until caught up,
    ``first_entry_seconds`` until the first catch-up page was applied, and the memory of this
    process in MiB (``peak_mib`` during the download, or over the whole run if ``peak_whole_run``)."""

    seconds: float
    first_entry_seconds: float
    rss_before_mib: float | None
    peak_mib: float
    peak_whole_run: bool


async def _wait(predicate: Callable[[], Awaitable[bool] | bool], timeout_seconds: float, what: str,
                interval: float = 0.05, progress: Callable[[], str] | None = None,
                tasks: list[asyncio.Task[None]] | None = None) -> None:
    """Poll ``predicate`` until true; raise after ``timeout_seconds``; print ``progress()`` every 10 s."""
    started = time.monotonic()
    next_report = started + 10
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        for task in tasks or ():
            if task.done():
                task.result()  # a service stopped: raise its error
                raise RuntimeError(f"service task {task.get_name()} stopped")
        now = time.monotonic()
        if now - started > timeout_seconds:
            raise TimeoutError(f"timed out after {timeout_seconds:.0f} s waiting for {what}")
        if progress is not None and now >= next_report:
            print(f"  ... {now - started:5.0f} s: {progress()}", flush=True)
            next_report = now + 10
        await asyncio.sleep(interval)


class _Cloud:
    """The three services as tasks of this event loop, and a connection to their database."""

    def __init__(self, amqp_url: str, management_url: str, database_url: str) -> None:
        common = dict(amqp_url=amqp_url, management_url=management_url, database_url=database_url)
        self.broadcaster_settings = BroadcasterSettings(**common)
        self.stop = asyncio.Event()
        self.tasks = [
            asyncio.create_task(account_service_main(AccountServiceSettings(**common), self.stop), name="account-service"),
            asyncio.create_task(archive_writer_main(ArchiveWriterSettings(**common), self.stop), name="archive-writer"),
            asyncio.create_task(broadcaster_main(self.broadcaster_settings, self.stop), name="masterdata-broadcaster"),
        ]
        self.database_url = database_url
        self.db: asyncpg.Connection | None = None

    async def start(self) -> None:
        await asyncio.sleep(0.5)
        for task in self.tasks:
            if task.done():
                task.result()  # raise the start-up error
        self.db = await asyncpg.connect(self.database_url)

    async def close(self) -> None:
        if self.db is not None:
            await self.db.close()
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def head(self, account_id: uuid.UUID) -> int:
        """The account's last feed_seq of ``articles`` (0: none)."""
        assert self.db is not None
        return await self.db.fetchval(
            "select last_feed_seq from feed_category_heads where account_id = $1 and category = $2", account_id, CATEGORY
        ) or 0

    async def archived_masterdata(self, till_id: uuid.UUID) -> int:
        assert self.db is not None
        return await self.db.fetchval(
            "select count(*) from archive_records where till_id = $1 and kind = 'masterdata'", till_id
        )


async def _joined_till(signup_url: str, data_dir: Path, account: str, name: str) -> Till:
    """A new till signed in to ``account`` in mode archive_masterdata, not syncing yet."""
    serial = f"SN-{uuid.uuid4().hex[:8]}"
    till = Till(TillStore.create(data_dir / serial, serial, name), TillSettings(cloud_amqp_url=signup_url, request_timeout_seconds=30))
    await till.sign_in(account, PASSWORD)
    await till.set_sync_mode(True, SyncMode.ARCHIVE_MASTERDATA)
    return till


async def _seed(cloud: _Cloud, seeder: Till, articles: int) -> str:
    """Save ``articles`` on ``seeder`` and wait until they are accepted, applied and archived;
    print the times (s) and rates (articles/s); return the seeding till's state hash."""
    identity = seeder.store.identity()
    assert identity.account_id and identity.till_id
    seeder.start_sync()
    await _wait(lambda: seeder.store.caught_up(CATEGORY), 30, "the seeding till's (empty) first catch-up", tasks=cloud.tasks)
    at = dt.datetime.now(dt.UTC)
    started = time.monotonic()
    for start in range(0, articles, SAVE_CHUNK):
        for i in range(start, min(start + SAVE_CHUNK, articles)):
            seeder.save_entity(_article(i), at)
        await asyncio.sleep(0)  # let the relay upload and the services work meanwhile
    saved = time.monotonic() - started
    print(f"seeding: {articles} articles saved on the seeding till in {saved:.1f} s ({articles / saved:.0f} articles/s)", flush=True)
    timeout = max(120.0, articles / 50)  # s; seeding runs at 300-450 articles/s on 2 cores
    head = 0

    async def accepted() -> bool:
        nonlocal head
        head = await cloud.head(identity.account_id)  # type: ignore[arg-type]
        return head >= articles

    await _wait(accepted, timeout, "the broadcaster to accept every article", interval=0.25, tasks=cloud.tasks,
                progress=lambda: f"{head} accepted, {seeder.store.outbox_counts()[0]} not uploaded yet")
    accepted_after = time.monotonic() - started
    print(f"seeding: broadcaster accepted all {articles} after {accepted_after:.1f} s "
          f"({articles / accepted_after:.0f} articles/s)", flush=True)
    await _wait(lambda: seeder.store.feed_position(CATEGORY) == head and seeder.status().pending == 0, timeout,
                "the seeding till to apply its verdicts", interval=0.25, tasks=cloud.tasks,
                progress=lambda: f"seeding till at feed position {seeder.store.feed_position(CATEGORY)} of {head}")
    applied_after = time.monotonic() - started
    archived = 0

    async def all_archived() -> bool:
        nonlocal archived
        archived = await cloud.archived_masterdata(identity.till_id)  # type: ignore[arg-type]
        return archived >= articles

    await _wait(all_archived, timeout, "the archive writer to archive every article", interval=0.5, tasks=cloud.tasks,
                progress=lambda: f"{archived} archived")
    archived_after = time.monotonic() - started
    print(f"seeding: seeding till had every verdict after {applied_after:.1f} s, archive writer done after "
          f"{archived_after:.1f} s; seeding total {archived_after:.1f} s ({articles / archived_after:.0f} articles/s)", flush=True)
    await seeder.stop_sync()  # a quiet cloud for the measurement
    return seeder.store.masterdata_state_hash()


async def _download(cloud: _Cloud, newcomer: Till, articles: int, profile: str | None) -> _Figures:
    """Start syncing ``newcomer`` and wait until it holds the account's articles; return the figures."""
    identity = newcomer.store.identity()
    assert identity.account_id
    head = await cloud.head(identity.account_id)
    timeout = max(120.0, articles / 200)  # s
    first_entry: float | None = None
    feed = newcomer.relay.feed

    def caught_up() -> bool:
        nonlocal first_entry
        progress = feed.status().catching_up.get(CATEGORY)
        if progress is not None and progress[0] > 0 and first_entry is None:
            first_entry = time.monotonic()
        if progress is not None or newcomer.store.feed_position(CATEGORY) != head:
            return False
        if newcomer.store.masterdata_counts().get("article", 0) != articles:
            return False
        if first_entry is None:  # every page applied between two polls
            first_entry = time.monotonic()
        return True

    def progress() -> str:
        catching_up = feed.status().catching_up.get(CATEGORY)
        return f"catch-up {catching_up[0]} of {catching_up[1]} entries" if catching_up else "waiting for the catch-up"

    peak_reset = _reset_peak_rss()
    rss_before, _ = _rss_mib()
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    started = time.monotonic()
    newcomer.start_sync()
    await _wait(caught_up, timeout, "the new till to catch up", interval=0.01, progress=progress, tasks=cloud.tasks)
    seconds = time.monotonic() - started
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    _, peak = _rss_mib()
    assert first_entry is not None
    return _Figures(seconds, first_entry - started, rss_before, peak, peak_whole_run=not peak_reset)


async def _run(base: DatabaseAdminSettings, articles: int, target: float, profile: str | None) -> bool:
    """Seed, measure and print; return whether the state hashes matched."""
    tills: list[Till] = []
    cloud: _Cloud | None = None
    async with throwaway_environment(base) as (settings, _admin):
        amqp_url, database_url = settings.amqp_url, settings.database_url
        suffix = settings.vhost.rsplit("-", 1)[-1]
        tmp_dir = tempfile.TemporaryDirectory(prefix="tillsync-bench-")
        tmp = tmp_dir.name
        try:
            cloud = _Cloud(amqp_url, base.management_url, database_url)
            await cloud.start()
            signup_url = amqp_url_with_credentials(amqp_url, SIGNUP_USER, settings.signup_password)
            account = f"bench-{suffix}@example.com"
            founder = Till(TillStore.create(Path(tmp) / "founder", "SN-founder", "founder"),
                           TillSettings(cloud_amqp_url=signup_url, request_timeout_seconds=30))
            tills.append(founder)
            await founder.create_account(account, PASSWORD)
            seeder = await _joined_till(signup_url, Path(tmp), account, "Kasse 1")
            tills.append(seeder)
            seed_hash = await _seed(cloud, seeder, articles)

            newcomer = await _joined_till(signup_url, Path(tmp), account, "Kasse 2")
            tills.append(newcomer)
            figures = await _download(cloud, newcomer, articles, profile)
            seconds = figures.seconds
            new_hash = newcomer.store.masterdata_state_hash()
            page_size = cloud.broadcaster_settings.catchup_page_size
            print(f"initial download: {articles} articles in {seconds:.2f} s ({articles / seconds:.0f} articles/s; "
                  f"catch-up pages of {page_size})")
            print(f"  first catch-up page applied after {figures.first_entry_seconds:.2f} s, "
                  f"the rest applied in {seconds - figures.first_entry_seconds:.2f} s")
            print(f"  target under {target:g} s: {'met' if seconds < target else 'NOT met'}")
            scope = "whole run, seeding included" if figures.peak_whole_run else "during the download"
            before = f"{figures.rss_before_mib:.0f} MiB before, " if figures.rss_before_mib is not None else ""
            print(f"  memory of this process (services and tills): {before}peak {figures.peak_mib:.0f} MiB ({scope})")
            same = new_hash == seed_hash
            print(f"  state hash: new till {new_hash[:16]}, seeding till {seed_hash[:16]}: {'equal' if same else 'DIFFERENT'}")
            if profile:
                print(f"  profile of the download phase written to {profile}")
            return same
        finally:
            for till in tills:
                await till.stop_sync()
                till.close()
            if cloud is not None:
                await cloud.close()
            tmp_dir.cleanup()


async def _main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=100_000)
    parser.add_argument("--target-seconds", type=float, default=20.0)
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the download phase to FILE")
    args = parser.parse_args()
    if args.articles < 1:
        parser.error("--articles must be at least 1")
    configure_logging("WARNING")
    same = await _run(DatabaseAdminSettings(), args.articles, args.target_seconds, args.profile)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(_main()))
