"""Master-data broadcaster wiring: settings, connections, two consume adapters."""

from __future__ import annotations

import asyncio
import functools

import structlog
from pydantic import Field

from services.masterdata_broadcaster.handlers import (
    CATCHUP_PAGE_SIZE,
    broadcast_masterdata,
    catchup_log_context,
    serve_catchups,
)
from shared.amqp import Publisher, connect
from shared.consumer import ConsumeAdapter
from shared.db import create_pool
from shared.logging import configure_logging
from shared.models import CATCHUP_ADAPTER, UPLOAD_ADAPTER
from shared.service import run_until_signal
from shared.settings import ServiceSettings
from shared.topology import MASTERDATA_BROADCASTER_QUEUE, MASTERDATA_CATCHUP_QUEUE
from shared.uploads import upload_log_context

SERVICE_NAME = "masterdata-broadcaster"


class BroadcasterSettings(ServiceSettings):
    """Settings of the master-data broadcaster (environment ``TILLSYNC_*``)."""

    batch_size: int = Field(default=500, ge=1, description="master-data changes judged per transaction at most")
    batch_window_seconds: float = Field(default=0.02, ge=0, description="wait for a fuller batch at most this long")
    catchup_concurrency: int = Field(default=2, ge=1, description="catch-up requests served at once")
    catchup_page_size: int = Field(default=CATCHUP_PAGE_SIZE, ge=1, le=10_000, description="entities per catch-up page")


async def main(settings: BroadcasterSettings, stop: asyncio.Event) -> None:
    """Run the broadcaster until ``stop`` is set. The topology must already exist."""
    log = structlog.get_logger().bind(service=SERVICE_NAME)
    pool = await create_pool(settings.database_url, settings.database_pool_size)
    connection = await connect(settings.amqp_url, SERVICE_NAME)
    try:
        publish_channel = await connection.channel(publisher_confirms=True)
        changes_channel = await connection.channel()
        catchup_channel = await connection.channel()
        changes = ConsumeAdapter(
            channel=changes_channel,
            publish_channel=publish_channel,
            queue=await changes_channel.get_queue(MASTERDATA_BROADCASTER_QUEUE, ensure=True),
            adapter=UPLOAD_ADAPTER,
            handler=broadcast_masterdata,
            pool=pool,
            max_body_bytes=settings.max_message_bytes,
            log_context=upload_log_context,
            batch_size=settings.batch_size,
            batch_window_seconds=settings.batch_window_seconds,
        )
        catchups = ConsumeAdapter(
            channel=catchup_channel,
            publish_channel=publish_channel,
            queue=await catchup_channel.get_queue(MASTERDATA_CATCHUP_QUEUE, ensure=True),
            adapter=CATCHUP_ADAPTER,
            handler=functools.partial(
                serve_catchups, publish=Publisher(publish_channel).publish, page_size=settings.catchup_page_size
            ),
            pool=pool,
            max_body_bytes=settings.max_message_bytes,
            log_context=catchup_log_context,
            concurrency=settings.catchup_concurrency,
        )
        await changes.start()
        await catchups.start()
        log.info("service_ready", queues=[MASTERDATA_BROADCASTER_QUEUE, MASTERDATA_CATCHUP_QUEUE])
        await stop.wait()
        await changes.stop()
        await catchups.stop()
    finally:
        await connection.close()
        await pool.close()
        log.info("service_stopped")


def run() -> None:
    """Entry point: build settings, configure logging, run until SIGINT/SIGTERM."""
    settings = BroadcasterSettings()
    configure_logging(settings.log_level, settings.log_format)
    run_until_signal(lambda stop: main(settings, stop))
