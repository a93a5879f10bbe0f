"""A till agent process for the benchmark: upload the waiting outbox of one till store, then exit.

Run by ``scripts/bench.py`` as its own process, so its memory is the till agent's alone:

    python scripts/bench_till_agent.py --data-dir DIR [--timeout-seconds 900]

The store in DIR must be signed in with the sync switch on (records wait in its outbox);
the cloud is ``TILLSYNC_CLOUD_AMQP_URL`` (the sign-up user's URL, as for any till). The
till's outbox relay (till_agent/relay.py) uploads with publisher confirms; this process
counts the records the broker confirmed. On stdout, one JSON object:
``records`` (unsent at the start), ``confirmed``, ``pending`` (unsent at the end),
``started``/``first_confirmed``/``last_confirmed`` (``time.monotonic()`` seconds, the
system-wide clock, so the parent can compare them with its own), ``rss_start_mib`` and
``peak_rss_mib`` (``VmHWM``: the peak resident memory of this process over its run, MiB).
Exit status 1 if not every record was confirmed within the timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from shared.logging import configure_logging
from till_agent.relay import OutboxRelay
from till_agent.store import TillStore
from till_agent.till import Till, TillSettings


def _status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB; None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


async def upload_outbox(data_dir: Path, timeout_seconds: float) -> dict[str, object]:
    """Start the till's sync and wait until the broker confirmed every unsent record;
    return the figures described in the module docstring."""
    rss_start = _status_mib("VmRSS")
    settings = TillSettings()
    till = Till(TillStore(data_dir), settings)
    records, _ = till.store.outbox_counts()
    confirmed = 0
    first: float | None = None
    last: float | None = None
    done = asyncio.Event()

    def on_sent(count: int) -> None:
        nonlocal confirmed, first, last
        last = time.monotonic()
        first = first if first is not None else last
        confirmed += count
        if confirmed >= records:
            done.set()

    # the till's own relay, with a callback that counts confirmed records (no polling of the store)
    till.relay = OutboxRelay(till.store, settings.cloud_amqp_url, on_sent=on_sent)
    started = time.monotonic()
    till.start_sync()
    try:
        await asyncio.wait_for(done.wait(), timeout_seconds)
    except asyncio.TimeoutError:
        pass
    detail = till.status()
    await till.stop_sync()
    pending, _ = till.store.outbox_counts()
    till.close()
    return {
        "records": records,
        "confirmed": confirmed,
        "pending": pending,
        "relay_state": f"{detail.state} {detail.detail}".strip(),
        "started": started,
        "first_confirmed": first,
        "last_confirmed": last,
        "rss_start_mib": rss_start,
        "peak_rss_mib": _status_mib("VmHWM"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the till's store")
    parser.add_argument("--timeout-seconds", type=float, default=900.0)
    parser.add_argument("--log-level", default="WARNING", help="of the till agent's log on stderr (INFO: the relay's reconnects)")
    args = parser.parse_args()
    configure_logging(args.log_level)
    figures = asyncio.run(upload_outbox(args.data_dir, args.timeout_seconds))
    print(json.dumps(figures), flush=True)
    return 0 if figures["pending"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
