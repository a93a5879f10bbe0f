"""Archive writer wiring: settings, connections, the batching consume adapter."""

from __future__ import annotations

import asyncio

import structlog
from pydantic import Field

from services.archive_writer.handlers import archive_uploads
from shared.amqp import connect
from shared.consumer import ConsumeAdapter
from shared.db import create_pool
from shared.logging import configure_logging
from shared.models import UPLOAD_ADAPTER
from shared.service import run_until_signal
from shared.settings import ServiceSettings
from shared.uploads import upload_log_context
from shared.topology import ARCHIVE_WRITER_QUEUE

SERVICE_NAME = "archive-writer"


class ArchiveWriterSettings(ServiceSettings):
    """Settings of the archive writer (environment ``TILLSYNC_*``)."""

    batch_size: int = Field(default=500, ge=1, description="uploads written per transaction at most")
    batch_window_seconds: float = Field(default=0.05, ge=0, description="wait for a fuller batch at most this long")
    concurrency: int = Field(default=1, ge=1, description="batches written at once")


async def main(settings: ArchiveWriterSettings, stop: asyncio.Event) -> None:
    """Run the archive writer until ``stop`` is set. The topology must already exist."""
    log = structlog.get_logger().bind(service=SERVICE_NAME)
    pool = await create_pool(settings.database_url, settings.database_pool_size)
    connection = await connect(settings.amqp_url, SERVICE_NAME)
    try:
        channel = await connection.channel()
        publish_channel = await connection.channel(publisher_confirms=True)
        queue = await channel.get_queue(ARCHIVE_WRITER_QUEUE, ensure=True)
        adapter = ConsumeAdapter(
            channel=channel,
            publish_channel=publish_channel,
            queue=queue,
            adapter=UPLOAD_ADAPTER,
            handler=archive_uploads,
            pool=pool,
            log_context=upload_log_context,
            batch_size=settings.batch_size,
            batch_window_seconds=settings.batch_window_seconds,
            concurrency=settings.concurrency,
        )
        await adapter.start()
        log.info("service_ready", queue=queue.name, batch_size=settings.batch_size)
        await stop.wait()
        await adapter.stop()
    finally:
        await connection.close()
        await pool.close()
        log.info("service_stopped")


def run() -> None:
    """Entry point: build settings, configure logging, run until SIGINT/SIGTERM."""
    settings = ArchiveWriterSettings()
    configure_logging(settings.log_level, settings.log_format)
    run_until_signal(lambda stop: main(settings, stop))
