"""Fault-suite fixtures: the five services as real subprocesses of a fresh environment.

The fault tests (marker ``fault``) kill services, restart the shared RabbitMQ and
PostgreSQL servers, cut till connections and run two till agents over one store, each
during a replay of real bakery sales; afterwards the archive must equal what the tills
recorded (``tests.faults.chaos.assert_archive_equals_recorded``).
"""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import pytest
import pytest_asyncio

from tests.faults.chaos import bakery_slice
from tests.support import Environment
from tillsync.processes import SERVICES, ServiceProcess, service_env


@pytest_asyncio.fixture(scope="module")
async def services(env: Environment, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, ServiceProcess]]:
    """The five services of the module's ``env`` as running subprocesses (ready), stopped
    at the end. The tests of a module share them (each with its own account and tills):
    a service a test killed runs again when the test ends."""
    settings = env.settings
    variables = service_env(settings.amqp_url, settings.database_url, settings.management_url)
    logs = tmp_path_factory.mktemp("service-logs")
    processes = {name: ServiceProcess(name, variables, logs) for name in SERVICES}
    try:
        for process in processes.values():
            process.start()
        for process in processes.values():
            await process.wait_ready()
        yield processes
    finally:
        for process in processes.values():
            process.stop()


@pytest.fixture
def replay_csv(tmp_path: Path) -> Path:
    """One business day (2021-01-02: 365 sale lines) of the real bakery file."""
    return bakery_slice(tmp_path / "bakery-slice.csv", ["2021-01-02"])
