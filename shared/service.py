"""Running a service process: until SIGINT or SIGTERM, then a clean stop."""

from __future__ import annotations

import asyncio
import signal
from typing import Awaitable, Callable


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` in a new event loop; SIGINT/SIGTERM set ``stop``."""

    async def _body() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(_body())
