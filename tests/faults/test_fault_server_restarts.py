"""Full restarts of the shared RabbitMQ and PostgreSQL servers during a replay of real
sales: services and tills reconnect by themselves, and the archive equals what the
tills recorded (0 lost, 0 duplicated).

These restart the machine's own servers (other test runs on the machine see it:
``/tmp/tillsync-servers-restarting`` exists meanwhile), and always bring them back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from tests.faults.chaos import (
    Replay,
    assert_recovered,
    replay_with_fault,
    restart_postgresql,
    restart_rabbitmq,
    servers_restartable,
)
from tillsync.processes import ServiceProcess

pytestmark = pytest.mark.fault


@pytest.fixture(autouse=True)
def _local_servers(infra) -> None:  # type: ignore[no-untyped-def]
    reason = servers_restartable()
    if reason is not None:
        pytest.fail(f"the fault suite restarts the local RabbitMQ and PostgreSQL servers: {reason}")
    if "127.0.0.1" not in infra.amqp_url or "127.0.0.1" not in infra.database_url:
        pytest.fail("the fault suite restarts the local servers: TEST_AMQP_URL / TEST_DATABASE_URL must point at 127.0.0.1")


async def test_rabbitmq_restart_during_replay_loses_and_duplicates_nothing(  # type: ignore[no-untyped-def]
    env, services, replay_csv: Path, tmp_path: Path
) -> None:
    context, comparison = await _replay_with_restart(
        env, services, replay_csv, tmp_path, "RabbitMQ", lambda: restart_rabbitmq(env.settings.management_url)
    )
    print(f"{context}: {comparison.summary()}")


async def test_postgresql_restart_during_replay_loses_and_duplicates_nothing(  # type: ignore[no-untyped-def]
    env, services, replay_csv: Path, tmp_path: Path
) -> None:
    felt_before = _database_outages_logged(services)
    context, comparison = await _replay_with_restart(env, services, replay_csv, tmp_path, "PostgreSQL", restart_postgresql)
    assert _database_outages_logged(services) > felt_before, f"{context}: no service noticed the restart"
    print(f"{context}: {comparison.summary()}")


async def _replay_with_restart(  # type: ignore[no-untyped-def]
    env, services: dict[str, ServiceProcess], replay_csv: Path, tmp_path: Path, server: str,
    restart_server: Callable[[], Awaitable[float]],
) -> tuple[str, Any]:
    """Replay ``replay_csv`` while ``restart_server()`` restarts ``server`` (it returns the
    seconds it was down); assert tickets were sold meanwhile, every service still runs and
    the archive equals what the tills recorded. Returns the context line and the comparison."""
    downtime: list[float] = []

    async def restart(_replay: Replay) -> None:
        downtime.append(await restart_server())

    replay = await replay_with_fault(env, tmp_path / "tills", replay_csv, restart, seconds_per_ticket=0.02)
    context = f"{server} restarted during the replay ({downtime[0]:.1f} s, {replay.sold_during_fault} tickets sold meanwhile)"
    assert replay.sold_during_fault > 0, f"{context}: no ticket was sold while {server} restarted"
    for name, process in services.items():
        assert process.process is not None and process.process.poll() is None, f"{context}: {name} exited:\n{process.log_tail()}"
    return context, await assert_recovered(env, replay, context)


def _database_outages_logged(services: dict[str, ServiceProcess]) -> int:
    """How often the services logged that the database was unavailable (``database_unavailable``)."""
    return sum(
        p.log_path.read_text(errors="replace").count('"database_unavailable"') for p in services.values() if p.log_path.exists()
    )
