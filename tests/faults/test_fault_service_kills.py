"""SIGKILL each service at random moments during a replay of real sales, restart it:
the archive equals what the tills recorded (0 lost, 0 duplicated) and the demo's own
checks (receipts, Z-reports, master data, handover, password reset) hold."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from rich.console import Console

from tests.faults.chaos import FaultRng, assert_archive_equals_recorded, kill_repeatedly
from tillsync.demo import run_demo
from tillsync.processes import SERVICES

pytestmark = pytest.mark.fault

KILLS_PER_REPLAY = 4


@pytest.mark.parametrize("service", list(SERVICES))
async def test_service_killed_at_random_moments_loses_and_duplicates_nothing(  # type: ignore[no-untyped-def]
    env, services, replay_csv: Path, service: str
) -> None:
    rng = FaultRng()
    context = f"{service} SIGKILLed during the replay, {rng.replay_hint}"
    done = asyncio.Event()
    chaos = asyncio.create_task(kill_repeatedly(env, services[service], rng, done, max_kills=KILLS_PER_REPLAY))
    try:
        report = await run_demo(env.settings, replay_csv, console=Console(file=io.StringIO()), start_services=False)
    except Exception as exc:
        raise AssertionError(f"{context}: the replay failed: {exc!r}") from exc
    finally:
        done.set()
        kills = await chaos
    assert kills.kills >= 1, f"{context}: the replay ended before the first kill"
    assert services[service].process is not None and services[service].process.poll() is None, (
        f"{context}: the restarted {service} does not run"
    )
    assert report.ok, f"{context}: the demo's checks failed: {report.as_json()}"
    assert report.missing == 0 and report.duplicates == 0, context
    run_dir = Path(report.run_dir)
    comparison = await assert_archive_equals_recorded(env, [run_dir / "till-1", run_dir / "till-2"], context)
    print(f"{context}: {kills.kills} kills at archive sizes {kills.archived_at_kill}; {comparison.summary()}")
