"""Benchmark: archive writer throughput, one commit per upload vs. batched commits.

Prints uploads archived per second for each batch size and the ratio to batch size 1,
measured in one run on the same machine (figures, not a pass/fail test). Each round gets
a fresh vhost and database on the servers named by TILLSYNC_AMQP_URL (any vhost; it is
replaced), TILLSYNC_MANAGEMENT_URL, TILLSYNC_DATABASE_URL and TILLSYNC_DATABASE_ADMIN_URL
(the server; a database per round is created and dropped).

    .venv/bin/python scripts/bench_archive_writer.py [--uploads 5000] [--batch-sizes 1,100,500]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import secrets
import time
import uuid
from decimal import Decimal

import aio_pika
import asyncpg

from services.archive_writer.main import ArchiveWriterSettings
from services.archive_writer.main import main as archive_writer_main
from shared.fiscal import PaymentType, VatKey
from shared.broker_admin import BrokerAdmin
from shared.logging import configure_logging
from shared.models import Cashier, Upload
from shared.settings import DatabaseAdminSettings, amqp_url_with_credentials
from shared.topology import UPLOAD_EXCHANGE, till_broker_user, till_permissions, upload_routing_key
from benchenv import throwaway_environment
from till_agent.booking import SaleLine, closed_receipt
from tillsync.setup import SetupSettings


def upload_bodies(account_id: uuid.UUID, till_id: uuid.UUID, count: int) -> list[bytes]:
    """``count`` chained ``Upload`` bodies (JSON bytes, as a till's relay sends them) of a
    closed two-line receipt each, ``till_seq`` 1..count of ``till_id``."""
    now = dt.datetime.now(dt.UTC)
    bodies = []
    prev = None
    for seq in range(1, count + 1):
        receipt = closed_receipt(
            receipt_number=seq,
            lines=[
                SaleLine("A1", "Baguette", Decimal("2"), 90, VatKey.REDUCED),
                SaleLine("A2", "Café", Decimal("1"), 150, VatKey.REGULAR),
            ],
            payment_type=PaymentType.CASH,
            payment_name="Bar",
            cashier=Cashier(cashier_id="1", name="Anna"),
            opened_at=now,
            closed_at=now,
            business_day=now.date(),
        )
        upload = Upload.sealed(
            prev, record_id=uuid.uuid4(), account_id=account_id, till_id=till_id, till_seq=seq, recorded_at=now, record=receipt
        )
        prev = upload.chain_hash
        bodies.append(upload.model_dump_json().encode())
    return bodies


def _message(body: bytes, till_id: uuid.UUID) -> aio_pika.Message:
    """An upload message with the properties the till's relay gives it (till_agent/relay.py)."""
    return aio_pika.Message(
        body,
        content_type="application/json",
        message_id=json.loads(body)["record_id"],
        user_id=till_broker_user(till_id),
        type="receipt",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def queue_uploads(settings: SetupSettings, admin: BrokerAdmin, count: int) -> tuple[uuid.UUID, uuid.UUID]:
    """Publish ``count`` uploads of a new till (its own broker user, publisher confirms,
    1,000 in flight) to the upload exchange, where they wait in the services' queues;
    returns ``(account_id, till_id)``."""
    account_id, till_id = uuid.uuid4(), uuid.uuid4()
    secret = secrets.token_urlsafe(16)
    await admin.put_user(till_broker_user(till_id), secret)
    await admin.grant_permissions(settings.vhost, till_broker_user(till_id), till_permissions(account_id, till_id))
    connection = await aio_pika.connect(amqp_url_with_credentials(settings.amqp_url, till_broker_user(till_id), secret))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(UPLOAD_EXCHANGE, ensure=False)
        key = upload_routing_key(account_id, till_id, "receipt")
        bodies = upload_bodies(account_id, till_id, count)
        for start in range(0, len(bodies), 1000):
            await asyncio.gather(
                *(
                    exchange.publish(_message(b, till_id), routing_key=key)
                    for b in bodies[start : start + 1000]
                )
            )
    return account_id, till_id


async def _round(base: DatabaseAdminSettings, uploads: int, batch_size: int) -> float:
    """Archive ``uploads`` waiting in the queue with ``batch_size``; return uploads per second."""
    async with throwaway_environment(base) as (settings, admin):
        amqp_url, database_url = settings.amqp_url, settings.database_url
        await queue_uploads(settings, admin, uploads)
        stop = asyncio.Event()
        writer_settings = ArchiveWriterSettings(
            amqp_url=amqp_url, management_url=base.management_url, database_url=database_url, batch_size=batch_size
        )
        started = time.monotonic()
        task = asyncio.create_task(archive_writer_main(writer_settings, stop))
        conn = await asyncpg.connect(database_url)
        try:
            while await conn.fetchval("select count(*) from archive_records") < uploads:
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
        finally:
            await conn.close()
        elapsed = time.monotonic() - started
        stop.set()
        await task
        return uploads / elapsed


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=5000)
    parser.add_argument("--batch-sizes", default="1,100,500")
    args = parser.parse_args()
    configure_logging("WARNING")
    base = DatabaseAdminSettings()
    results = {}
    for size in (int(s) for s in args.batch_sizes.split(",")):
        results[size] = await _round(base, args.uploads, size)
        print(f"batch size {size:>4}: {results[size]:8.0f} uploads/s", flush=True)
    reference = results.get(1) or next(iter(results.values()))
    print("ratio to batch size 1: " + ", ".join(f"{s}: {r / reference:.1f}x" for s, r in results.items()))


if __name__ == "__main__":
    asyncio.run(_main())
