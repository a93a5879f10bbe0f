"""A throwaway vhost and database for the benchmarks, set up like production and removed after."""

from __future__ import annotations

import asyncio
import secrets
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterable
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from shared.broker_admin import BrokerAdmin, BrokerAdminError
from shared.settings import DatabaseAdminSettings
from shared.topology import TILL_USER_PREFIX
from tillsync.processes import SERVICES, ServiceProcess, service_env
from tillsync.setup import SetupSettings, setup


@asynccontextmanager
async def throwaway_environment(base: DatabaseAdminSettings) -> AsyncIterator[tuple[SetupSettings, BrokerAdmin]]:
    """Yield settings of a new vhost and database on ``base``'s servers (``tillsync setup``
    done) and a management client; afterwards delete the till users made in the vhost,
    the vhost and the database (as the owner, through the server's ``postgres`` database,
    as ``shared.db.ensure_database`` does: the configured one may not exist)."""
    suffix = secrets.token_hex(4)
    vhost, database = f"tillsync-bench-{suffix}", f"tillsync_bench_{suffix}"
    settings = SetupSettings(
        amqp_url=urlunsplit(urlsplit(base.amqp_url)._replace(path="/" + vhost)),
        management_url=base.management_url,
        database_url=urlunsplit(urlsplit(base.database_url)._replace(path="/" + database)),
        database_admin_url=urlunsplit(urlsplit(base.admin_database_url)._replace(path="/" + database)),
    )
    user, password = settings.management_credentials
    # deleting a vhost whose quorum queues hold many messages takes the management API a while
    admin = BrokerAdmin(settings.management_url, user, password, timeout_seconds=120)
    try:
        await setup(settings)
        yield settings, admin
    finally:
        try:
            await _remove_vhost(admin, vhost)
        finally:
            await admin.close()
            server = await asyncpg.connect(urlunsplit(urlsplit(base.admin_database_url)._replace(path="/postgres")))
            try:
                await server.execute(f'drop database if exists "{database}" with (force)')
            finally:
                await server.close()


async def _remove_vhost(admin: BrokerAdmin, vhost: str, attempts: int = 4) -> None:
    """Delete the till users of ``vhost`` and the vhost; the management API refusing
    (a broker restarting or overloaded on a shared machine) is tried again after 5 s, and
    after ``attempts`` only named on stderr, so the figures measured before are kept."""
    for attempt in range(1, attempts + 1):
        try:
            for permission in await admin.vhost_permissions(vhost):
                if permission["user"].startswith(TILL_USER_PREFIX):
                    await admin.delete_user(permission["user"])
            await admin.delete_vhost(vhost)
            return
        except BrokerAdminError as exc:
            if attempt == attempts:
                print(f"benchmark: could not remove vhost {vhost} and its till users ({exc}); remove them by hand",
                      file=sys.stderr)
                return
            await asyncio.sleep(5)


def peak_rss_mib(pid: int | str = "self") -> float | None:
    """The peak resident memory (``VmHWM``) of process ``pid`` in MiB, None where
    ``/proc/<pid>/status`` cannot be read (not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


@asynccontextmanager
async def running_services(
    settings: SetupSettings, log_dir: Path, names: Iterable[str] = SERVICES, ready_timeout_seconds: float = 30.0
) -> AsyncIterator[ServicePeaks]:
    """Run the services ``names`` as real processes (``python -m services.<name>``, as in
    production and the end-to-end tests) against ``settings``; wait until each is ready
    (``ServiceStartError`` after ``ready_timeout_seconds`` each).

    Yields a ``ServicePeaks``: ``processes`` by service name, and ``sample()`` that records
    each running service's peak RSS so far; the peaks are sampled once more before the
    processes are stopped (SIGTERM), so ``peaks_mib`` holds each service's peak over the run."""
    env = service_env(settings.amqp_url, settings.database_url, settings.management_url)
    peaks = ServicePeaks({name: ServiceProcess(name, env, log_dir) for name in names})
    try:
        for process in peaks.processes.values():
            process.start()
        for process in peaks.processes.values():
            await process.wait_ready(ready_timeout_seconds)
        yield peaks
        peaks.sample()
    finally:
        for process in peaks.processes.values():
            process.stop()


@dataclass
class ServicePeaks:
    """Service processes and the highest peak RSS seen of each (MiB)."""

    processes: dict[str, ServiceProcess]
    peaks_mib: dict[str, float] = field(default_factory=dict)

    def sample(self) -> dict[str, float]:
        """Read each running service's ``VmHWM`` and keep the highest per service; returns ``peaks_mib``.
        A restarted process keeps its earlier peak (the maximum over all its runs)."""
        for name, process in self.processes.items():
            if process.process is not None and process.process.poll() is None:
                value = peak_rss_mib(process.process.pid)
                if value is not None:
                    self.peaks_mib[name] = max(value, self.peaks_mib.get(name, 0.0))
        return self.peaks_mib

    def check(self) -> None:
        """``sample()``, then raise ``RuntimeError`` (with its last log lines) if a service
        process is not running: a benchmark of a cloud with a service missing means nothing."""
        self.sample()
        for name, process in self.processes.items():
            if process.process is None or process.process.poll() is not None:
                raise RuntimeError(f"service {name} exited during the benchmark:\n{process.log_tail()}")

    @property
    def pids(self) -> dict[str, int]:
        """The process id of each started service, by name."""
        return {name: p.process.pid for name, p in self.processes.items() if p.process is not None}
