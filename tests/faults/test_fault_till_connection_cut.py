"""A till's broker connection cut again and again during a replay of real sales (closed
through the management API, as an operator or a flaky network would): the till
reconnects by itself and the archive equals what the tills recorded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.faults.chaos import FaultRng, Replay, assert_recovered, replay_with_fault

pytestmark = pytest.mark.fault

CUTS = 3  # connections of till 2 closed during the replay ...
CUTTING_SECONDS = 20.0  # ... within at most this time (the management API lists new connections late)


async def test_till_connection_cut_repeatedly_during_replay_loses_and_duplicates_nothing(  # type: ignore[no-untyped-def]
    env, services, replay_csv: Path, tmp_path: Path
) -> None:
    rng = FaultRng()
    cuts: list[int] = []

    async def cut_repeatedly(replay: Replay) -> None:
        """Close every connection of till 2's broker user at random moments until ``CUTS``
        were closed (or ``CUTTING_SECONDS`` passed)."""
        user = replay.tills[1].store.identity().broker_username
        assert user is not None
        loop = asyncio.get_running_loop()
        until = loop.time() + CUTTING_SECONDS
        while sum(cuts) < CUTS and loop.time() < until:
            await asyncio.sleep(rng.uniform(0.1, 0.8))
            cuts.append(await env.admin.close_connections_of(user, "fault suite: connection cut"))

    replay = await replay_with_fault(env, tmp_path / "tills", replay_csv, cut_repeatedly, seconds_per_ticket=0.03)
    context = (
        f"till 2's connection cut {len(cuts)} times ({sum(cuts)} connections closed, {replay.sold_during_fault} "
        f"tickets sold meanwhile), {rng.replay_hint}"
    )
    assert sum(cuts) >= CUTS, f"{context}: the till's connection was not cut {CUTS} times"
    comparison = await assert_recovered(env, replay, context)
    print(f"{context}: {comparison.summary()}")
