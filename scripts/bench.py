"""The benchmark: tillsync's figures beside the raw limits of its broker and database, in one run.

Measured on this machine, each phase in a fresh vhost and database (removed after):

1. raw limits: aio-pika publishing upload-sized messages with publisher confirms, and
   consuming them with acks, on a quorum queue with the archive writer's queue arguments;
   asyncpg ``copy_records_to_table`` into a table like ``archive_records``;
2. archive ingest: uploads waiting in the archive writer's queue until their rows are
   committed, the archive writer running as its own process (uploads/s; target >= 0.7 of
   raw consume-with-ack);
3. offline catch-up: a till agent process whose till recorded N receipts with the sync
   switch off connects and uploads them (records/s confirmed by the broker; target >= 0.6
   of raw publish-with-confirm), and until all are archived, all five services running;
4. memory: the peak RSS (VmHWM) of every service process over all phases (target: none
   above 300 MB) and of the till agent uploading ``--records`` records against one
   uploading a tenth of them (target: flat in the outbox size);
5. master-data fan-out latency (``scripts/bench_fanout.py``) and the initial master-data
   download (``scripts/bench_initial_download.py``), where those modules are present.

Prints progress, each figure with its ratio to the raw limit and whether its target is
met, a Markdown table for the README, and writes everything (with the machine and the
date) to ``var/bench/bench-<UTC timestamp>.json`` or ``--json PATH``. The servers are
those of ``TILLSYNC_AMQP_URL``, ``TILLSYNC_MANAGEMENT_URL``, ``TILLSYNC_DATABASE_URL``
and ``TILLSYNC_DATABASE_ADMIN_URL`` (defaults: the local ones).

    .venv/bin/python scripts/bench.py [--quick] [--uploads 20000] [--records 100000]
        [--articles 100000] [--fanout-seconds 30] [--json PATH] [--log-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg

from bench_archive_writer import queue_uploads, upload_bodies
from benchenv import ServicePeaks, peak_rss_mib, running_services, throwaway_environment
from shared.broker_admin import BrokerAdmin, BrokerAdminError
from shared.fiscal import PaymentType, VatKey
from shared.logging import configure_logging
from shared.models import Cashier, SyncMode
from shared.settings import DatabaseAdminSettings, amqp_url_with_credentials
from shared.topology import ARCHIVE_WRITER_QUEUE, SIGNUP_USER, TOPOLOGY, QueueSpec, declare_queue
from till_agent.booking import SaleLine
from till_agent.store import TillStore
from till_agent.till import Till, TillSettings
from tillsync.setup import SetupSettings

ROOT = Path(__file__).resolve().parent.parent
TILL_AGENT_SCRIPT = Path(__file__).resolve().with_name("bench_till_agent.py")
RESTART_MARKER = Path("/tmp/tillsync-servers-restarting")  # the team's sign that the shared servers restart
PASSWORD = "Backstube-2021!"  # meets the account service's password rules
RAW_QUEUE = "bench.raw"
RAW_EXCHANGE = "bench.raw"
PUBLISH_WINDOW = 1000  # messages in flight (unconfirmed) in the raw publish, as in queue_uploads
SERVICE_READY_SECONDS = 120.0  # a service's start-up on a busy 2-core machine
RECORD_CHUNK = 1000  # receipts recorded on a till per SQLite transaction while preparing it

# Targets (the project's issue)
INGEST_TARGET_RATIO = 0.7  # archive ingest / raw consume-with-ack
CATCHUP_TARGET_RATIO = 0.6  # offline catch-up / raw publish-with-confirm
SERVICE_RSS_LIMIT_MIB = 300e6 / 2**20  # 300 MB
# the measurements of the other modules, by their key in the result
OTHER_MEASUREMENTS = {"fanout": "master-data fan-out (cloud)", "fanout_till_agents": "master-data fan-out (till agents)",
                      "initial_download": "initial download"}
TILL_RSS_FLAT_FACTOR = 1.10  # the till agent's peak with 10x the records: at most 10 % more
FANOUT_P99_TARGET_MS = 250.0
INITIAL_DOWNLOAD_TARGET_SECONDS = 20.0

_started = time.monotonic()


def progress(text: str) -> None:
    """One progress line with the seconds since the start of the run."""
    print(f"[{time.monotonic() - _started:6.1f} s] {text}", flush=True)


class ServersUnreachable(RuntimeError):
    """RabbitMQ, its management API or PostgreSQL cannot be reached."""


# -- machine and servers ---------------------------------------------------------


def _with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


async def check_servers(base: DatabaseAdminSettings) -> dict[str, str]:
    """Connect to PostgreSQL, RabbitMQ (AMQP) and its management API; return their versions
    (``postgresql``, ``rabbitmq``, ``erlang``). Raises ``ServersUnreachable`` naming the one
    that failed and how to start them."""
    hint = "start the servers: `make infra` (or TILLSYNC_LOCAL_INFRA=1 bash scripts/infra.sh)"
    versions = {}
    pg_url = _with_path(base.admin_database_url, "/postgres")
    try:
        conn = await asyncpg.connect(pg_url, timeout=5)
        try:
            versions["postgresql"] = await conn.fetchval("show server_version")
        finally:
            await conn.close()
    except Exception as exc:
        raise ServersUnreachable(f"cannot reach PostgreSQL at {_safe(pg_url)}: {type(exc).__name__}: {exc}; {hint}") from exc
    amqp_url = _with_path(base.amqp_url, "/")
    try:
        connection = await aio_pika.connect(amqp_url, timeout=5)
        await connection.close()
    except Exception as exc:
        raise ServersUnreachable(f"cannot reach RabbitMQ at {_safe(amqp_url)}: {type(exc).__name__}: {exc}; {hint}") from exc
    user, password = base.management_credentials
    admin = BrokerAdmin(base.management_url, user, password, timeout_seconds=5)
    try:
        overview = await admin.overview()
    except Exception as exc:
        raise ServersUnreachable(
            f"cannot reach the RabbitMQ management API at {base.management_url}: {type(exc).__name__}: {exc}; {hint} "
            "(with `rabbitmq-plugins enable rabbitmq_management`)"
        ) from exc
    finally:
        await admin.close()
    versions["rabbitmq"] = str(overview.get("rabbitmq_version", "?"))
    versions["erlang"] = str(overview.get("erlang_version", "?"))
    return versions


def _safe(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))


def machine(versions: dict[str, str]) -> dict[str, Any]:
    """CPU model, logical cores, RAM (GiB), kernel, Python and the servers' versions."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 2**20, 1)  # kB
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": ram_gib,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        **versions,
    }


# -- 1. raw limits ----------------------------------------------------------------


def raw_queue_spec() -> QueueSpec:
    """A queue with the archive writer's queue arguments (quorum, delivery limit, dead-letter
    exchange, overflow), under the name ``RAW_QUEUE``."""
    spec = next(q for q in TOPOLOGY.queues if q.name == ARCHIVE_WRITER_QUEUE)
    arguments = {**spec.arguments, "x-dead-letter-routing-key": RAW_QUEUE}
    return QueueSpec(name=RAW_QUEUE, durable=spec.durable, arguments=arguments)


async def measure_raw(base: DatabaseAdminSettings, messages: int) -> dict[str, Any]:
    """Raw limits with ``messages`` real upload bodies: publish with confirms and consume
    with acks (aio-pika, one connection each) on a queue like the archive writer's, and
    ``COPY`` into a table like ``archive_records``. Rates in messages (rows) per second."""
    async with throwaway_environment(base) as (settings, _admin):
        account_id, till_id = uuid.uuid4(), uuid.uuid4()
        bodies = upload_bodies(account_id, till_id, messages)
        size = round(sum(map(len, bodies)) / len(bodies))
        spec = raw_queue_spec()
        user = settings.amqp_user
        connection = await aio_pika.connect(settings.amqp_url, client_properties={"connection_name": "bench raw publish"})
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.declare_exchange(RAW_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
            queue = await declare_queue(channel, spec)
            await queue.bind(exchange, "#")

            def message(body: bytes) -> aio_pika.Message:
                return aio_pika.Message(body, content_type="application/json", message_id=str(uuid.uuid4()), user_id=user,
                                        type="receipt", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)

            progress(f"raw: publishing {messages} messages of {size} bytes with confirms to a quorum queue")
            started = time.monotonic()
            for start in range(0, messages, PUBLISH_WINDOW):
                await asyncio.gather(*(exchange.publish(message(b), routing_key="a.b.receipt")
                                       for b in bodies[start : start + PUBLISH_WINDOW]))
            publish_seconds = time.monotonic() - started
        prefetch = 1000  # the archive writer's: 2 x batch size 500
        ack_every = 500  # one ack with ``multiple`` per batch, as the archive writer
        connection = await aio_pika.connect(settings.amqp_url, client_properties={"connection_name": "bench raw consume"})
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            queue = await channel.get_queue(RAW_QUEUE, ensure=False)
            done = asyncio.Event()
            received = 0

            async def on_message(incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
                nonlocal received
                received += 1
                if received % ack_every == 0 or received == messages:
                    await incoming.ack(multiple=True)
                if received == messages:
                    done.set()

            progress("raw: consuming them with acks")
            started = time.monotonic()
            tag = await queue.consume(on_message)
            await asyncio.wait_for(done.wait(), max(60.0, messages / 500))
            consume_seconds = time.monotonic() - started
            await queue.cancel(tag)
        progress("raw: COPY into a table like archive_records")
        copy_seconds, copy_rows = await _copy(settings, bodies)
    return {
        "messages": messages,
        "upload_body_bytes": size,
        "queue_arguments": spec.arguments,
        "publish_window": PUBLISH_WINDOW,
        "prefetch": prefetch,
        "publish_confirm_per_second": messages / publish_seconds,
        "consume_ack_per_second": messages / consume_seconds,
        "copy_rows": copy_rows,
        "copy_rows_per_second": copy_rows / copy_seconds,
    }


async def _copy(settings: SetupSettings, bodies: list[bytes]) -> tuple[float, int]:
    """``COPY`` the uploads as rows into ``bench_copy`` (``like archive_records`` with its
    defaults, constraints and indexes) in one transaction; returns ``(seconds, rows)``."""
    now = dt.datetime.now(dt.UTC)
    rows = []
    for body in bodies:
        u = json.loads(body)
        rows.append((
            uuid.UUID(u["record_id"]), uuid.UUID(u["account_id"]), uuid.UUID(u["till_id"]), u["till_seq"],
            u["record"]["kind"], u["schema_version"], hashlib.sha256(body).digest(), body.decode(),
            dt.datetime.fromisoformat(u["recorded_at"]), now,
            bytes.fromhex(u["prev_hash"]) if u.get("prev_hash") else None, bytes.fromhex(u["chain_hash"]),
        ))
    columns = ["record_id", "account_id", "till_id", "till_seq", "kind", "schema_version", "content_sha256", "payload",
               "recorded_at", "archived_at", "prev_hash", "chain_hash"]
    conn = await asyncpg.connect(settings.database_admin_url)
    try:
        await conn.execute("create table bench_copy (like archive_records including defaults including constraints including indexes)")
        started = time.monotonic()
        async with conn.transaction():
            await conn.copy_records_to_table("bench_copy", records=rows, columns=columns)
        seconds = time.monotonic() - started
        count = await conn.fetchval("select count(*) from bench_copy")
    finally:
        await conn.close()
    return seconds, count


# -- 2. archive ingest --------------------------------------------------------------


async def _wait(predicate: Callable[[], Awaitable[bool]], timeout_seconds: float, what: str,
                peaks: ServicePeaks | None = None, interval: float = 0.1,
                report: Callable[[], str] | None = None) -> None:
    """Poll ``predicate`` (sampling the services' peak RSS meanwhile) until true; raise
    ``TimeoutError`` naming ``what`` after ``timeout_seconds``, ``RuntimeError`` if a service exits."""
    deadline = time.monotonic() + timeout_seconds
    next_report = time.monotonic() + 10
    while not await predicate():
        if peaks is not None:
            peaks.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_seconds:.0f} s waiting for {what}")
        if report is not None and time.monotonic() >= next_report:
            progress(f"  ... {report()}")
            next_report = time.monotonic() + 10
        await asyncio.sleep(interval)


async def measure_ingest(base: DatabaseAdminSettings, uploads: int, log_dir: Path, peaks: dict[str, float]) -> dict[str, Any]:
    """``uploads`` waiting in the archive writer's queue, then the archive writer process
    started: uploads/s from the first committed row seen to the last (polled every 0.1 s).
    Adds the writer's peak RSS to ``peaks`` (MiB by service)."""
    async with throwaway_environment(base) as (settings, admin):
        progress(f"ingest: queueing {uploads} uploads of one till in the archive writer's queue")
        await queue_uploads(settings, admin, uploads)
        db = await asyncpg.connect(settings.database_url)
        try:
            progress("ingest: starting the archive writer process")
            async with running_services(settings, log_dir / "ingest", ["archive-writer"], SERVICE_READY_SECONDS) as services:
                first: tuple[float, int] | None = None
                archived = 0

                async def all_archived() -> bool:
                    nonlocal first, archived
                    archived = await db.fetchval("select count(*) from archive_records")
                    if archived and first is None:
                        first = (time.monotonic(), archived)
                    return archived >= uploads

                await _wait(all_archived, max(120.0, uploads / 100), "the archive writer to archive every upload",
                            services, report=lambda: f"{archived} of {uploads} archived")
                ended = time.monotonic()
            _merge(peaks, services.peaks_mib)
        finally:
            await db.close()
    assert first is not None
    seconds = ended - first[0]
    rate = (uploads - first[1]) / seconds if seconds > 0 else float("nan")
    return {"uploads": uploads, "seconds": seconds, "uploads_per_second": rate,
            "archive_writer_peak_rss_mib": services.peaks_mib.get("archive-writer")}


# -- 3. offline catch-up and the till agent's memory --------------------------------


async def _offline_till(signup_url: str, data_dir: Path, account: str, records: int) -> tuple[uuid.UUID, float]:
    """A till signed in to ``account`` in mode ``archive`` that records ``records`` receipts
    with its sync switch off, then turns the switch on (nothing uploads: no relay runs in
    this process). Returns ``(till_id, recording seconds)``."""
    till = Till(TillStore.create(data_dir, f"SN-{data_dir.name}", data_dir.name),
                TillSettings(cloud_amqp_url=signup_url, request_timeout_seconds=60))
    try:
        signed_in = await till.sign_in(account, PASSWORD)
        await till.set_sync_mode(False, SyncMode.ARCHIVE)
        lines = [SaleLine("A1", "Baguette", Decimal("2"), 90, VatKey.REDUCED),
                 SaleLine("A2", "Café", Decimal("1"), 150, VatKey.REGULAR)]
        cashier = Cashier(cashier_id="1", name="Anna")
        started = time.monotonic()
        for start in range(0, records, RECORD_CHUNK):
            with till.store.batch():
                for _ in range(min(RECORD_CHUNK, records - start)):
                    till.sell(lines, payment_type=PaymentType.CASH, payment_name="Bar", cashier=cashier,
                              at=dt.datetime.now(dt.UTC))
            await asyncio.sleep(0)
        recording = time.monotonic() - started
        pending, _ = till.store.outbox_counts()
        if pending != records:
            raise RuntimeError(f"the till holds {pending} unsent records, expected {records}")
        await till.set_sync_mode(True, SyncMode.ARCHIVE)
        return signed_in.till_id, recording
    finally:
        till.close()


async def _upload_run(settings: SetupSettings, services: ServicePeaks, signup_url: str, account: str,
                      tmp: Path, records: int, log_dir: Path) -> dict[str, Any]:
    """Prepare a till holding ``records`` unsent records, run the till agent process until
    the broker confirmed them all, and wait until all are archived; return the figures."""
    progress(f"catch-up: recording {records} receipts on a till with the sync switch off")
    till_id, recording = await _offline_till(signup_url, tmp / f"till-{records}", account, records)
    progress(f"catch-up: recorded in {recording:.1f} s ({records / recording:.0f}/s); starting the till agent process")
    db = await asyncpg.connect(settings.database_url)
    output = log_dir / f"till-agent-{records}.json"
    errors = log_dir / f"till-agent-{records}.log"
    try:
        with output.open("wb") as out, errors.open("wb") as err:
            child = subprocess.Popen(
                [sys.executable, str(TILL_AGENT_SCRIPT), "--data-dir", str(tmp / f"till-{records}"),
                 "--timeout-seconds", str(max(300.0, records / 50)), "--log-level", "INFO"],
                env={**os.environ, "TILLSYNC_CLOUD_AMQP_URL": signup_url}, stdout=out, stderr=err,
            )
        till_peak = 0.0
        archived = 0
        archived_at: float | None = None

        async def all_archived() -> bool:
            nonlocal till_peak, archived, archived_at
            if child.poll() not in (None, 0):
                raise RuntimeError(f"the till agent process failed ({child.returncode}): {errors.read_text()[-2000:]}")
            till_peak = max(till_peak, peak_rss_mib(child.pid) or 0.0)
            archived = await db.fetchval("select count(*) from archive_records where till_id = $1", till_id)
            if archived >= records and archived_at is None:
                archived_at = time.monotonic()
            return archived_at is not None and child.poll() is not None

        await _wait(all_archived, max(300.0, records / 50), f"{records} records to be uploaded and archived", services,
                    interval=0.25, report=lambda: f"{archived} of {records} archived"
                    + ("" if child.poll() is None else " (the till agent is done)"))
    finally:
        await db.close()
        if child.poll() is None:
            child.kill()
    if child.returncode != 0:
        raise RuntimeError(f"the till agent process failed ({child.returncode}): {errors.read_text()[-2000:]}")
    figures = json.loads(output.read_text())
    seconds = figures["last_confirmed"] - figures["started"]
    reconnects = errors.read_text(errors="replace").count("relay_offline")
    if reconnects:
        progress(f"catch-up: WARNING: the till agent lost its connection {reconnects} times (broker restarted or "
                 f"overloaded?); these figures are disturbed, see {errors}")
    assert archived_at is not None
    return {
        "records": records,
        "recording_seconds": recording,
        "confirmed_seconds": seconds,
        "confirmed_per_second": records / seconds,
        "first_confirm_after_seconds": figures["first_confirmed"] - figures["started"],
        "archived_seconds": archived_at - figures["started"],
        "archived_per_second": records / (archived_at - figures["started"]),
        "till_agent_peak_rss_mib": max(till_peak, figures["peak_rss_mib"] or 0.0),
        "till_agent_start_rss_mib": figures["rss_start_mib"],
        "till_agent_reconnects": reconnects,
    }


async def measure_catchup(base: DatabaseAdminSettings, records: int, log_dir: Path,
                          peaks: dict[str, float]) -> dict[str, Any]:
    """Two offline catch-ups with all five services running: a till holding ``records // 10``
    unsent records, then one holding ``records``; returns both runs' figures. Adds the
    services' peak RSS to ``peaks``."""
    small = max(records // 10, 1)
    runs = []
    async with throwaway_environment(base) as (settings, _admin):
        progress("catch-up: starting the five services")
        phase_logs = log_dir / "catchup"
        phase_logs.mkdir(parents=True, exist_ok=True)
        async with running_services(settings, phase_logs, ready_timeout_seconds=SERVICE_READY_SECONDS) as services:
            signup_url = amqp_url_with_credentials(settings.amqp_url, SIGNUP_USER, settings.signup_password)
            with tempfile.TemporaryDirectory(prefix="tillsync-bench-") as tmp_name:
                tmp = Path(tmp_name)
                founder = Till(TillStore.create(tmp / "founder", "SN-founder", "founder"),
                               TillSettings(cloud_amqp_url=signup_url, request_timeout_seconds=60))
                account = f"bench-{settings.vhost.rsplit('-', 1)[-1]}@example.com"
                try:
                    await founder.create_account(account, PASSWORD)
                finally:
                    founder.close()
                for count in (small, records):
                    run = await _upload_run(settings, services, signup_url, account, tmp, count, phase_logs)
                    progress(f"catch-up: {count} records confirmed at {run['confirmed_per_second']:.0f}/s, "
                             f"archived at {run['archived_per_second']:.0f}/s, till agent peak "
                             f"{run['till_agent_peak_rss_mib']:.0f} MiB")
                    runs.append(run)
        _merge(peaks, services.peaks_mib)
    return {"runs": runs, "service_peak_rss_mib": dict(services.peaks_mib)}


# -- 5. the other measurements --------------------------------------------------------


async def measure_other(name: str, call: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Run one of the measurements of other modules; ``{"not_measured": why}`` if the module
    or its function is missing (ImportError) or it failed."""
    try:
        return await call()
    except ImportError as exc:
        return {"not_measured": f"{name} is not available ({exc})"}
    except Exception as exc:
        return {"not_measured": f"{name} failed: {type(exc).__name__}: {exc}"}


async def _fanout(base: DatabaseAdminSettings, quick: bool, seconds: float, log_dir: Path) -> dict[str, Any]:
    """The cloud's fan-out at the target size: 200 protocol-level tills in 20 accounts,
    100 changes/s (``measure_cloud_fanout``); quick: 2 accounts of 5 tills, 10 changes/s."""
    from bench_fanout import measure_cloud_fanout  # written beside this driver

    sizes = dict(accounts=2, tills_per_account=5, changes_per_second=10.0) if quick else \
        dict(accounts=20, tills_per_account=10, changes_per_second=100.0)
    await _enough_broker_sockets(base, sizes["accounts"] * sizes["tills_per_account"])
    progress(f"fan-out (cloud, protocol-level tills): {sizes['accounts']} accounts x {sizes['tills_per_account']} tills, "
             f"{sizes['changes_per_second']:g} changes/s for {seconds:g} s")
    result = await measure_cloud_fanout(base, seconds=seconds, log_dir=log_dir / "fanout", **sizes)  # type: ignore[arg-type]
    return {**sizes, "seconds": seconds, **result}


async def _enough_broker_sockets(base: DatabaseAdminSettings, tills: int) -> None:
    """Raise ``RuntimeError`` if the broker cannot take a connection per till besides the
    services' and the account requests' (RabbitMQ's ``sockets_total``, set by its open-files
    limit: about 830 with the usual 1024; beyond it new connections hang in the handshake)."""
    user, password = base.management_credentials
    async with BrokerAdmin(base.management_url, user, password) as admin:
        nodes = await admin.nodes()
    available = min((n.get("sockets_total") or 0) - (n.get("sockets_used") or 0) for n in nodes)
    needed = 2 * tills + 100
    if available < needed:
        raise RuntimeError(
            f"the broker has {available} free sockets, {tills} tills need about {needed}: raise RabbitMQ's open-files "
            "limit (`rabbitmqctl shutdown && scripts/start-rabbitmq.sh`; compose sets it)")


async def _fanout_till_agents(base: DatabaseAdminSettings, quick: bool, seconds: float, log_dir: Path) -> dict[str, Any]:
    """End to end with real till agents (their local apply included): 4 accounts of 10
    tills at 20 changes/s, the target's load per account (5 changes/s), since 200 till
    agents with their SQLite stores saturate this machine's 2 cores themselves
    (``measure_fanout``); quick: 2 accounts of 3 tills, 10 changes/s."""
    from bench_fanout import measure_fanout

    sizes = dict(accounts=2, tills_per_account=3, changes_per_second=10.0) if quick else \
        dict(accounts=4, tills_per_account=10, changes_per_second=20.0)
    progress(f"fan-out (real till agents): {sizes['accounts']} accounts x {sizes['tills_per_account']} tills, "
             f"{sizes['changes_per_second']:g} changes/s for {seconds:g} s")
    result = await measure_fanout(base, seconds=seconds, log_dir=log_dir / "fanout-till-agents", **sizes)  # type: ignore[arg-type]
    return {**sizes, "seconds": seconds, **result}


async def _initial_download(base: DatabaseAdminSettings, articles: int, log_dir: Path) -> dict[str, Any]:
    from bench_initial_download import measure_initial_download  # type: ignore[attr-defined]

    progress(f"initial download: {articles} articles to a new till")
    return await measure_initial_download(base, articles=articles, log_dir=log_dir / "initial-download")


# -- report ---------------------------------------------------------------------------


def _merge(peaks: dict[str, float], more: dict[str, float] | None) -> None:
    for name, value in (more or {}).items():
        if value is not None:
            peaks[name] = max(float(value), peaks.get(name, 0.0))


@dataclass
class Figure:
    """One line of the summary: ``value`` in ``unit``, its ``limit`` (raw limit, same unit)
    and ``ratio``, the ``target`` in words and whether it is ``met`` (None: no target)."""

    name: str
    value: float | None
    unit: str
    limit: float | None = None
    limit_name: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.value / self.limit if self.value is not None and self.limit else None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "unit": self.unit, "raw_limit": self.limit,
                "raw_limit_name": self.limit_name, "ratio": self.ratio, "target": self.target, "met": self.met,
                "note": self.note}


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.2f}"
    return f"{text} {unit}".strip()


def figures(result: dict[str, Any]) -> list[Figure]:
    """The summary lines of a run's ``result`` (as written to the JSON file)."""
    raw, out = result["raw"], []
    publish, consume, copy = raw["publish_confirm_per_second"], raw["consume_ack_per_second"], raw["copy_rows_per_second"]
    out.append(Figure("raw publish with confirms (aio-pika, quorum queue)", publish, "msg/s",
                      note=f"{raw['upload_body_bytes']} B bodies, {raw['publish_window']} in flight"))
    out.append(Figure("raw consume with acks (aio-pika, quorum queue)", consume, "msg/s", note=f"prefetch {raw['prefetch']}"))
    out.append(Figure("raw COPY into a table like archive_records", copy, "rows/s"))
    ingest = result.get("ingest")
    if ingest:
        rate = ingest["uploads_per_second"]
        out.append(Figure("archive ingest (queue → committed row)", rate, "uploads/s", consume, "raw consume with acks",
                          f"≥ {INGEST_TARGET_RATIO} × raw", rate / consume >= INGEST_TARGET_RATIO,
                          f"{rate / copy:.2f} × raw COPY"))
    catchup = result.get("catchup")
    if catchup:
        run = catchup["runs"][-1]
        rate = run["confirmed_per_second"]
        out.append(Figure(f"offline catch-up, {run['records']:,} records (confirmed by the broker)", rate, "records/s",
                          publish, "raw publish with confirms", f"≥ {CATCHUP_TARGET_RATIO} × raw",
                          rate / publish >= CATCHUP_TARGET_RATIO,
                          f"disturbed: {run['till_agent_reconnects']} reconnects" if run.get("till_agent_reconnects") else ""))
        out.append(Figure(f"offline catch-up, {run['records']:,} records (until all archived)", run["archived_per_second"],
                          "records/s", publish, "raw publish with confirms", note="all five services running"))
        small, large = catchup["runs"][0], catchup["runs"][-1]
        flat = large["till_agent_peak_rss_mib"] <= TILL_RSS_FLAT_FACTOR * small["till_agent_peak_rss_mib"]
        out.append(Figure(f"till agent peak RSS, {small['records']:,} unsent records", small["till_agent_peak_rss_mib"], "MiB"))
        judged = large["records"] >= 10_000  # with fewer, the process's start-up dominates its peak
        out.append(Figure(f"till agent peak RSS, {large['records']:,} unsent records", large["till_agent_peak_rss_mib"],
                          "MiB", small["till_agent_peak_rss_mib"], f"peak with {small['records']:,}",
                          f"flat (≤ {TILL_RSS_FLAT_FACTOR:g} × the smaller)" if judged else "flat (judged from 10,000 records)",
                          flat if judged else None))
    for key, what, judged in (("fanout", "cloud, protocol-level tills", True), ("fanout_till_agents", "real till agents, end to end", False)):
        fanout = result.get(key) or {}
        if "latency_ms" in fanout:
            p99 = fanout["latency_ms"]["p99"]
            out.append(Figure(f"master-data fan-out p99 latency, {what} ({fanout['accounts'] * fanout['tills_per_account']} tills "
                              f"in {fanout['accounts']} accounts, {fanout['changes_per_second']:g} changes/s)", p99, "ms",
                              target=f"< {FANOUT_P99_TARGET_MS:g} ms" if judged else "",
                              met=(p99 < FANOUT_P99_TARGET_MS and not fanout.get("lost")) if judged else None,
                              note=f"p50 {_num(fanout['latency_ms']['p50'])} ms, max {_num(fanout['latency_ms']['max'])} ms, "
                                   f"{fanout.get('deliveries')} deliveries, lost {fanout.get('lost')}"))
    download = result.get("initial_download") or {}
    if "articles_per_second" in download:
        out.append(Figure(f"initial download, {download['articles']:,} articles", download["articles_per_second"],
                          "articles/s", consume, "raw consume with acks",
                          f"< {INITIAL_DOWNLOAD_TARGET_SECONDS:g} s", download["seconds"] < INITIAL_DOWNLOAD_TARGET_SECONDS
                          and bool(download.get("state_hash_equal")),
                          f"{download['seconds']:.1f} s, state hash {'equal' if download.get('state_hash_equal') else 'DIFFERENT'}"))
    for name, mib in sorted(result["service_peak_rss_mib"].items()):
        out.append(Figure(f"peak RSS {name}", mib, "MiB", target="≤ 300 MB", met=mib <= SERVICE_RSS_LIMIT_MIB))
    return out


def markdown_table(result: dict[str, Any]) -> str:
    """The README's table of the run's figures, with date and machine."""
    m = result["machine"]
    lines = [
        f"Measured {result['date'][:16].replace('T', ' ')} UTC on {m['cpu']} ({m['cores']} cores, {m['ram_gib']} GiB RAM), "
        f"{m['kernel']}, RabbitMQ {m['rabbitmq']} (Erlang {m['erlang']}), PostgreSQL {m['postgresql']}, Python {m['python']}; "
        f"`{result['command']}`.",
        "",
        "| figure | value | raw limit | ratio | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for f in figures(result):
        met = "" if f.met is None else "yes" if f.met else "**no**"
        value = _num(f.value, f.unit) + (f" ({f.note})" if f.note else "")
        ratio = f"{f.ratio:.2f}" if f.ratio is not None else ""
        lines.append(f"| {f.name} | {value} | {_num(f.limit) if f.limit else ''} | {ratio} | {f.target} | {met} |")
    for key, name in OTHER_MEASUREMENTS.items():
        why = (result.get(key) or {}).get("not_measured")
        if why:
            lines.append(f"| {name} | not measured: {why} | | | | |")
    return "\n".join(lines)


def print_summary(result: dict[str, Any]) -> None:
    print("\nFigures (ratio to the raw limit on this machine; target met?):")
    for f in figures(result):
        ratio = f" = {f.ratio:.2f} × {f.limit_name} ({_num(f.limit, '')})" if f.ratio is not None else ""
        target = f"; target {f.target}: {'met' if f.met else 'NOT met'}" if f.met is not None else ""
        note = f" [{f.note}]" if f.note else ""
        print(f"  {f.name}: {_num(f.value, f.unit)}{ratio}{target}{note}")
    for key, name in OTHER_MEASUREMENTS.items():
        why = (result.get(key) or {}).get("not_measured")
        if why:
            print(f"  {name}: not measured: {why}")
    print("\nMarkdown table for the README:\n")
    print(markdown_table(result))


class RestartWatch:
    """Notices the team's restart marker (``RESTART_MARKER``: someone restarts the shared
    servers) and repeats a phase that ran while it was there (its figures are disturbed,
    or it failed), at most ``attempts`` times in all; ``repeated`` counts repeats by phase."""

    def __init__(self, attempts: int = 3) -> None:
        self.attempts = attempts
        self.seen = False
        self.repeated: dict[str, int] = {}

    async def run(self) -> None:
        while True:
            self.seen = self.seen or RESTART_MARKER.exists()
            await asyncio.sleep(0.5)

    async def _quiet(self) -> None:
        if RESTART_MARKER.exists():
            progress(f"waiting: {RESTART_MARKER} says the shared servers are being restarted")
        while RESTART_MARKER.exists():
            await asyncio.sleep(1)
        self.seen = False

    async def phase(self, name: str, measure: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """``await measure()``, repeated while the servers were restarted during it."""
        for attempt in range(1, self.attempts + 1):
            await self._quiet()
            try:
                figures = await measure()
            except Exception as exc:
                if not (self.seen or RESTART_MARKER.exists()) or attempt == self.attempts:
                    raise
                progress(f"{name}: failed while the servers were restarted ({type(exc).__name__}: {exc}); repeating it")
            else:
                if not (self.seen or RESTART_MARKER.exists()) or attempt == self.attempts:
                    return figures
                progress(f"{name}: the servers were restarted meanwhile, the figures are disturbed; repeating it")
            self.repeated[name] = self.repeated.get(name, 0) + 1
        raise AssertionError("unreachable")


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (about a minute)")
    parser.add_argument("--uploads", type=int, help="messages of the raw limits and uploads of the ingest (default 20000; quick 1000)")
    parser.add_argument("--records", type=int, help="unsent records of the catch-up till; a tenth for the memory comparison "
                        "(default 100000; quick 1000)")
    parser.add_argument("--articles", type=int, help="articles of the initial download (default 100000; quick 500)")
    parser.add_argument("--fanout-seconds", type=float, help="seconds of master-data changes in the fan-out (default 30; quick 5)")
    parser.add_argument("--json", type=Path, help="write the figures here (default var/bench/bench-<UTC timestamp>.json)")
    parser.add_argument("--log-dir", type=Path, help="service and till agent logs (default var/bench/<UTC timestamp>/)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"uploads": (1000, 20_000), "records": (1000, 100_000), "articles": (500, 100_000), "fanout_seconds": (5.0, 30.0)}
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    for name in ("uploads", "records", "articles"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.records < 10:
        parser.error("--records must be at least 10 (a tenth of them is the memory comparison)")
    if not (math.isfinite(args.fanout_seconds) and args.fanout_seconds > 0):
        parser.error(f"--fanout-seconds must be a number of seconds above 0, not {args.fanout_seconds}")
    for option, path in (("--json", args.json and args.json.parent), ("--log-dir", args.log_dir)):
        if path is None:
            continue
        try:  # found out now, not after a run of many minutes
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"{option}: cannot make the directory {path}: {exc.strerror or exc}")
        if not os.access(path, os.W_OK):
            parser.error(f"{option}: the directory {path} is not writable")
    return args


async def run(args: argparse.Namespace, command: str, result: dict[str, Any]) -> None:
    """Every phase in turn, filling ``result`` (written to the JSON file) as they finish."""
    base = DatabaseAdminSettings()
    versions = await check_servers(base)
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    log_dir = args.log_dir or ROOT / "var" / "bench" / stamp
    log_dir.mkdir(parents=True, exist_ok=True)
    result |= {
        "date": now.isoformat(timespec="seconds"),
        "command": command,
        "machine": machine(versions),
        "options": {"quick": args.quick, "uploads": args.uploads, "records": args.records, "articles": args.articles,
                    "fanout_seconds": args.fanout_seconds},
        "log_dir": str(log_dir),
    }
    m = result["machine"]
    progress(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB, {m['kernel']}, RabbitMQ {m['rabbitmq']}, "
             f"PostgreSQL {m['postgresql']}, Python {m['python']}")
    result["service_peak_rss_mib"] = {}
    watch = RestartWatch()
    watcher = asyncio.create_task(watch.run())
    try:
        await _phases(args, base, log_dir, result, watch)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    result["repeated_phases"] = watch.repeated
    result["figures"] = [f.as_dict() for f in figures(result)]
    result["seconds"] = time.monotonic() - _started


async def _phases(args: argparse.Namespace, base: DatabaseAdminSettings, log_dir: Path, result: dict[str, Any],
                  watch: RestartWatch) -> None:
    peaks: dict[str, float] = result["service_peak_rss_mib"]
    raw = result["raw"] = await watch.phase("raw", lambda: measure_raw(base, args.uploads))
    progress(f"raw: publish with confirms {raw['publish_confirm_per_second']:.0f} msg/s, consume with acks "
             f"{raw['consume_ack_per_second']:.0f} msg/s, COPY {raw['copy_rows_per_second']:.0f} rows/s")
    ingest = result["ingest"] = await watch.phase("ingest", lambda: measure_ingest(base, args.uploads, log_dir, peaks))
    progress(f"ingest: {ingest['uploads_per_second']:.0f} uploads/s "
             f"({ingest['uploads_per_second'] / raw['consume_ack_per_second']:.2f} × raw consume with acks)")
    result["catchup"] = await watch.phase("catch-up", lambda: measure_catchup(base, args.records, log_dir, peaks))
    fanout = result["fanout"] = await watch.phase("fan-out", lambda: measure_other(
        "scripts/bench_fanout.py measure_fanout", lambda: _fanout(base, args.quick, args.fanout_seconds, log_dir)))
    _merge(peaks, fanout.get("service_peak_rss_mib"))
    progress("fan-out: " + (fanout["not_measured"] if "not_measured" in fanout else f"p99 {fanout['latency_ms']['p99']:.0f} ms"))
    agents = result["fanout_till_agents"] = await watch.phase("fan-out (till agents)", lambda: measure_other(
        "scripts/bench_fanout.py measure_fanout", lambda: _fanout_till_agents(base, args.quick, args.fanout_seconds, log_dir)))
    _merge(peaks, agents.get("service_peak_rss_mib"))
    progress("fan-out (till agents): " + (agents["not_measured"] if "not_measured" in agents
                                           else f"p99 {agents['latency_ms']['p99']:.0f} ms"))
    download = result["initial_download"] = await watch.phase("initial download", lambda: measure_other(
        "scripts/bench_initial_download.py measure_initial_download", lambda: _initial_download(base, args.articles, log_dir)))
    _merge(peaks, download.get("service_peak_rss_mib"))
    progress("initial download: " + (download["not_measured"] if "not_measured" in download
                                      else f"{download['articles_per_second']:.0f} articles/s"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("WARNING")
    given = " ".join(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TILLSYNC_BENCH_VIA_MAKE"):
        command = f"make bench BENCH_ARGS='{given}'" if given else "make bench"
    else:
        command = f"python scripts/bench.py {given}"
    result: dict[str, Any] = {}
    try:
        asyncio.run(run(args, command.strip(), result))
    except ServersUnreachable as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a phase failed: keep what was measured before it
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"bench: stopped: {result['error']}", file=sys.stderr)
        if RESTART_MARKER.exists():
            print(f"bench: {RESTART_MARKER} exists: the shared servers are being restarted; run it again after", file=sys.stderr)
        if isinstance(exc, BrokerAdminError):
            print("bench: (the management API is slow while the broker is overloaded or restarting: run it again)", file=sys.stderr)
        if "date" not in result:
            return 1
    path = args.json or ROOT / "var" / "bench" / f"bench-{result['date'].replace('-', '').replace(':', '')[:15]}Z.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    if "error" in result:
        print(f"partial figures written to {path} (logs in {result['log_dir']})", file=sys.stderr)
        return 1
    print_summary(result)
    print(f"\nwritten to {path} (logs in {result['log_dir']}); run took {result['seconds']:.0f} s")
    if result.get("repeated_phases"):
        print("repeated because the shared servers were restarted meanwhile: "
              + ", ".join(f"{phase} ({times}x)" for phase, times in result["repeated_phases"].items()))
    unmeasured = [key for key in OTHER_MEASUREMENTS if "not_measured" in (result.get(key) or {})]
    if unmeasured:
        print(f"bench: not measured: {', '.join(OTHER_MEASUREMENTS[k] for k in unmeasured)} (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
