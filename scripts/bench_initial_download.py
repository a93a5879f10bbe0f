"""Benchmark: initial master-data download of N articles to a new till (target: under 20 s).

Measured: the wall time in seconds from ``Till.start_sync()`` of a new till, signed in
and set to mode ``archive_masterdata``, until it has caught up on the category
``articles`` (its feed position is the account's head and no catch-up is in progress)
and holds N live articles; the seconds until the first catch-up page was applied
(before it: the till connecting and asking, the broadcaster reading and building the
catch-up); the check that the new till's master-data state hash equals the seeding
till's; the peak resident memory (MiB) of each service process over the whole run and
of this process (the new till only) during the download.

Everything is real: the account service, archive writer and master-data broadcaster
run as processes (``python -m services.<name>``, as in production) with their default
settings, in a fresh vhost and database on the servers named by TILLSYNC_AMQP_URL (any
vhost; it is replaced), TILLSYNC_MANAGEMENT_URL, TILLSYNC_DATABASE_URL and
TILLSYNC_DATABASE_ADMIN_URL (the server); vhost, database and till users are removed
at the end. Tills are real till agents with SQLite stores in a temporary directory.
The N articles are seeded through the real path first (not measured, but timed): a
first till in mode ``archive_masterdata`` takes them as a bulk import
(``Till.import_entities``, one store transaction per chunk, as an article list is
imported) while it syncs; it uploads them, the broadcaster accepts them, the seeding
till applies the verdicts and the archive writer archives them. The seeding till then
goes offline so the cloud is quiet during the download.

    .venv/bin/python scripts/bench_initial_download.py [--articles 100000] [--target-seconds 20]
        [--log-dir DIR] [--profile FILE]   (cProfile of this process in the download phase, for pstats)

Prints the figures as lines and, last, as one JSON object (exit status 1 if the state
hashes differ).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

import asyncpg

from shared.fiscal import VatKey
from shared.logging import configure_logging
from shared.models import Article, SyncMode
from shared.settings import DatabaseAdminSettings, amqp_url_with_credentials
from shared.topology import SIGNUP_USER
from services.masterdata_broadcaster.main import BroadcasterSettings
from benchenv import ServicePeaks, peak_rss_mib, running_services, throwaway_environment
from till_agent.store import TillStore
from till_agent.till import Till, TillSettings

CATEGORY = "articles"
PASSWORD = "Backstube-2021!"  # strong enough for the account service's password rules
SERVICES_USED = ("account-service", "archive-writer", "masterdata-broadcaster")
IMPORT_CHUNK = 5000  # articles imported on a seeding till per store transaction
SEEDING_TILLS = 2  # tills importing the articles, chunks in turn (more relays in flight)


def _article(i: int) -> Article:
    return Article(
        article_nr=f"A{i:07d}",
        text=f"Artikel {i} Vollkornbrot geschnitten 500 g",
        unit_price=50 + (i * 37) % 5000,
        vat_key=VatKey.REDUCED if i % 3 else VatKey.REGULAR,
        article_group_nr=f"G{i % 40:02d}",
    )


def _reset_peak_rss() -> bool:
    """Reset the peak RSS (VmHWM) of this process; False where the system does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _Cloud:
    """The service processes and a connection to their database (made again if the
    server dropped it: the servers are shared)."""

    def __init__(self, peaks: ServicePeaks, database_url: str) -> None:
        self.peaks = peaks
        self.database_url = database_url
        self.db: asyncpg.Connection | None = None

    async def _fetchval(self, query: str, *args: Any) -> Any:
        for attempt in range(5):
            try:
                if self.db is None or self.db.is_closed():
                    self.db = await asyncpg.connect(self.database_url)
                return await self.db.fetchval(query, *args)
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,  # the server was restarted
                    asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError, asyncpg.InternalClientError):
                if attempt == 4:
                    raise
                if self.db is not None:
                    self.db.terminate()
                self.db = None
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self.db is not None:
            await self.db.close()

    def check(self) -> None:
        """Record the services' peak RSS; raise if a service process exited."""
        self.peaks.check()

    async def head(self, account_id: uuid.UUID) -> int:
        """The account's last feed_seq of ``articles`` (0: none)."""
        return await self._fetchval(
            "select last_feed_seq from feed_category_heads where account_id = $1 and category = $2", account_id, CATEGORY
        ) or 0

    async def archived_masterdata(self, till_ids: list[uuid.UUID]) -> int:
        return await self._fetchval(
            "select count(*) from archive_records where till_id = any($1::uuid[]) and kind = 'masterdata'", till_ids
        )


async def _wait(cloud: _Cloud, predicate: Callable[[], Awaitable[bool] | bool], timeout_seconds: float, what: str,
                interval: float = 0.05, progress: Callable[[], str] | None = None) -> None:
    """Poll ``predicate`` until true (sampling the services' memory about every second);
    raise ``TimeoutError`` after ``timeout_seconds``; report ``progress()`` every 10 s."""
    started = time.monotonic()
    next_report, next_sample = started + 10, started
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        now = time.monotonic()
        if now >= next_sample:
            cloud.check()
            next_sample = now + 1.0
        if now - started > timeout_seconds:
            raise TimeoutError(f"timed out after {timeout_seconds:.0f} s waiting for {what}")
        if progress is not None and now >= next_report:
            _say(f"  ... {now - started:5.0f} s: {progress()}")
            next_report = now + 10
        await asyncio.sleep(interval)


async def _joined_till(signup_url: str, data_dir: Path, account: str, name: str) -> Till:
    """A new till signed in to ``account`` in mode archive_masterdata, not syncing yet."""
    serial = f"SN-{uuid.uuid4().hex[:8]}"
    till = Till(TillStore.create(data_dir / serial, serial, name), TillSettings(cloud_amqp_url=signup_url, request_timeout_seconds=30))
    await till.sign_in(account, PASSWORD)
    await till.set_sync_mode(True, SyncMode.ARCHIVE_MASTERDATA)
    return till


async def _seed(cloud: _Cloud, seeders: list[Till], articles: int) -> tuple[list[str], dict[str, float]]:
    """Import ``articles`` on ``seeders`` (chunks in turn) while they sync and wait until the
    broadcaster accepted them, every seeding till applied them (its own verdicts and the
    others' feed entries) and the archive writer archived them; return the seeding tills'
    state hashes and the seconds of each step since the import started."""
    identities = [s.store.identity() for s in seeders]
    account_id = identities[0].account_id
    assert account_id is not None
    for seeder in seeders:
        seeder.start_sync()
    await _wait(cloud, lambda: all(s.store.caught_up(CATEGORY) for s in seeders), 30, "the seeding tills' (empty) first catch-up")
    at = dt.datetime.now(dt.UTC)
    started = time.monotonic()
    for n, start in enumerate(range(0, articles, IMPORT_CHUNK)):
        chunk = range(start, min(start + IMPORT_CHUNK, articles))
        counts = seeders[n % len(seeders)].import_entities((_article(i) for i in chunk), at)
        if counts.get("created") != len(chunk):
            raise RuntimeError(f"a seeding till did not create every article of a chunk: {counts}")
        await asyncio.sleep(0)  # let the relays upload meanwhile
    saved = time.monotonic() - started
    _say(f"seeding: {articles} articles imported on {len(seeders)} seeding till(s) in {saved:.1f} s")
    timeout = max(120.0, articles / 50)  # s
    head = 0

    async def accepted() -> bool:
        nonlocal head
        head = await cloud.head(account_id)
        return head >= articles

    await _wait(cloud, accepted, timeout, "the broadcaster to accept every article", interval=0.25,
                progress=lambda: f"{head} accepted, {sum(s.store.outbox_counts()[0] for s in seeders)} not uploaded yet")
    accepted_after = time.monotonic() - started
    await _wait(cloud, lambda: all(s.store.feed_position(CATEGORY) == head and s.status().pending == 0 for s in seeders),
                timeout, "the seeding tills to apply every article", interval=0.25,
                progress=lambda: f"seeding tills at feed positions {[s.store.feed_position(CATEGORY) for s in seeders]} of {head}")
    applied_after = time.monotonic() - started
    archived = 0

    async def all_archived() -> bool:
        nonlocal archived
        archived = await cloud.archived_masterdata([i.till_id for i in identities])  # type: ignore[misc]
        return archived >= articles

    await _wait(cloud, all_archived, timeout, "the archive writer to archive every article", interval=0.5,
                progress=lambda: f"{archived} archived")
    archived_after = time.monotonic() - started
    _say(f"seeding: accepted after {accepted_after:.1f} s, applied on the seeding tills after {applied_after:.1f} s, "
         f"archived after {archived_after:.1f} s ({articles / archived_after:.0f} articles/s)")
    for seeder in seeders:
        await seeder.stop_sync()  # a quiet cloud for the measurement
    return [s.store.masterdata_state_hash() for s in seeders], {
        "imported": round(saved, 2), "accepted": round(accepted_after, 2),
        "applied_on_seeding_tills": round(applied_after, 2), "archived": round(archived_after, 2),
    }


async def _download(cloud: _Cloud, newcomer: Till, articles: int, profile: str | None) -> dict[str, Any]:
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
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    started = time.monotonic()
    newcomer.start_sync()
    await _wait(cloud, caught_up, timeout, "the new till to catch up", interval=0.01, progress=progress)
    seconds = time.monotonic() - started
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    assert first_entry is not None
    till_peak = peak_rss_mib()
    return {
        "seconds": round(seconds, 3),
        "first_entry_seconds": round(first_entry - started, 3),
        "till_peak_rss_mib": round(till_peak, 1) if till_peak is not None else None,
        "till_peak_rss_scope": "during the download" if peak_reset else "whole run of the measuring process",
    }


async def _measure(base: DatabaseAdminSettings, articles: int, log_dir: Path, profile: str | None,
                   seeding_tills: int = SEEDING_TILLS) -> dict[str, Any]:
    if articles < 1 or seeding_tills < 1:
        raise ValueError(f"articles and seeding tills must be at least 1, not {articles} and {seeding_tills}")
    tills: list[Till] = []
    async with throwaway_environment(base) as (settings, _admin):
        suffix = settings.vhost.rsplit("-", 1)[-1]
        with tempfile.TemporaryDirectory(prefix="tillsync-bench-") as tmp:
            async with running_services(settings, log_dir, SERVICES_USED) as peaks:
                cloud = _Cloud(peaks, settings.database_url)
                try:
                    signup_url = amqp_url_with_credentials(settings.amqp_url, SIGNUP_USER, settings.signup_password)
                    account = f"bench-{suffix}@example.com"
                    founder = Till(TillStore.create(Path(tmp) / "founder", "SN-founder", "founder"),
                                   TillSettings(cloud_amqp_url=signup_url, request_timeout_seconds=30))
                    tills.append(founder)
                    await founder.create_account(account, PASSWORD)
                    seeders = [await _joined_till(signup_url, Path(tmp), account, f"Kasse {n + 1}") for n in range(seeding_tills)]
                    tills.extend(seeders)
                    seed_hashes, seeding = await _seed(cloud, seeders, articles)
                    newcomer = await _joined_till(signup_url, Path(tmp), account, f"Kasse {seeding_tills + 1}")
                    tills.append(newcomer)
                    figures = await _download(cloud, newcomer, articles, profile)
                    same = {newcomer.store.masterdata_state_hash()} == set(seed_hashes)
                    cloud.check()
                finally:
                    for till in tills:
                        await till.stop_sync()
                        till.close()
                    await cloud.close()
            return {
                "articles": articles,
                "seconds": figures["seconds"],
                "articles_per_second": round(articles / figures["seconds"], 1),
                "first_entry_seconds": figures["first_entry_seconds"],
                "state_hash_equal": same,
                "service_peak_rss_mib": {name: round(v, 1) for name, v in peaks.peaks_mib.items()},
                "till_peak_rss_mib": figures["till_peak_rss_mib"],
                "till_peak_rss_scope": figures["till_peak_rss_scope"],
                "catchup_page_size": BroadcasterSettings(database_url=settings.database_url).catchup_page_size,
                "seeding_tills": seeding_tills,
                "machine_load_average": [round(v, 2) for v in os.getloadavg()],  # 1, 5, 15 min at the end: the machine is shared
                "seeding_seconds": seeding,
            }


async def measure_initial_download(base: DatabaseAdminSettings, *, articles: int, log_dir: Path) -> dict:
    """Seed ``articles`` articles through a till, then measure a new till's initial download.

    ``base``: where the broker and database servers are (a throwaway vhost and database
    are made there and removed after); ``log_dir``: where the service processes' logs go.
    Returns ``{"articles", "seconds" (start of sync until caught up), "articles_per_second",
    "first_entry_seconds" (until the first catch-up page was applied), "state_hash_equal"
    (new till's master data equals the seeding till's), "service_peak_rss_mib" ({service:
    MiB} over the whole run), "till_peak_rss_mib" (this process, the new till only, during
    the download), "till_peak_rss_scope", "catchup_page_size", "seeding_seconds"
    ({step: seconds since the import started})}``. Raises ``ValueError`` for fewer than 1
    article, ``TimeoutError`` if a step does not finish (seeding: ``articles / 50`` s at
    least 120 s; download: ``articles / 200`` s, at least 120 s) and ``RuntimeError`` if a
    service process exits.
    """
    return await _measure(base, articles, log_dir, None)


async def _main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=100_000)
    parser.add_argument("--target-seconds", type=float, default=20.0)
    parser.add_argument("--log-dir", type=Path, help="service logs (default: a temporary directory)")
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the download phase to FILE")
    parser.add_argument("--seeding-tills", type=int, default=SEEDING_TILLS, help="tills importing the articles")
    args = parser.parse_args()
    if args.articles < 1 or args.seeding_tills < 1:
        parser.error("--articles and --seeding-tills must be at least 1")
    configure_logging("WARNING")
    with tempfile.TemporaryDirectory(prefix="tillsync-bench-logs-") as tmp_logs:
        result = await _measure(DatabaseAdminSettings(), args.articles, args.log_dir or Path(tmp_logs), args.profile,
                                args.seeding_tills)
    seconds = result["seconds"]
    print(f"initial download: {result['articles']} articles in {seconds:.2f} s ({result['articles_per_second']:.0f} "
          f"articles/s; catch-up pages of {result['catchup_page_size']})")
    print(f"  first catch-up page applied after {result['first_entry_seconds']:.2f} s, "
          f"the rest applied in {seconds - result['first_entry_seconds']:.2f} s")
    print(f"  target under {args.target_seconds:g} s: {'met' if seconds < args.target_seconds else 'NOT met'}")
    print(f"  peak memory (MiB): services {result['service_peak_rss_mib']}, new till {result['till_peak_rss_mib']} "
          f"({result['till_peak_rss_scope']})")
    print(f"  state hash of the new till equals the seeding till's: {result['state_hash_equal']}")
    if args.profile:
        print(f"  profile of the download phase written to {args.profile}")
    print(json.dumps(result))
    return 0 if result["state_hash_equal"] else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(_main()))
