"""End-to-end fixtures: services as real processes, the real bakery file."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

import pytest

from tests.support import BAKERY_CSV, Environment
from tillsync.processes import SERVICES, ServiceProcess, service_env

pytestmark = pytest.mark.e2e


def one_business_day(target: Path, day: str = "2021-01-02") -> Path:
    """Write the lines of one business day of the real file to ``target`` (a temp file)."""
    with BAKERY_CSV.open(newline="") as source, target.open("w", newline="") as sink:
        reader = csv.reader(source)
        writer = csv.writer(sink)
        writer.writerow(next(reader))
        writer.writerows(row for row in reader if row[1] == day)
    return target


@pytest.fixture
def service_processes(fresh_env: Environment, tmp_path: Path) -> Iterator[dict[str, ServiceProcess]]:
    """Both services as subprocesses of ``fresh_env`` (not started yet), stopped at the end."""
    env = service_env(fresh_env.settings.amqp_url, fresh_env.settings.database_url, fresh_env.settings.management_url)
    processes = {name: ServiceProcess(name, env, tmp_path / "logs") for name in SERVICES}
    yield processes
    for process in processes.values():
        process.stop()
