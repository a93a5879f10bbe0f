"""Archive writer wiring: settings, connections, the batching consume adapter, the
archive's monthly partitions."""

from __future__ import annotations

import asyncio

import asyncpg
import structlog
from pydantic import Field

from services.archive_writer.handlers import archive_uploads
from shared.amqp import connect
from shared.consumer import ConsumeAdapter
from shared.db import create_pool, ensure_archive_partitions
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
    partition_check_seconds: float = Field(
        default=3600.0, gt=0, description="how often the archive's monthly partitions are ensured (also at start)"
    )


async def main(settings: ArchiveWriterSettings, stop: asyncio.Event) -> None:
    """Run the archive writer until ``stop`` is set. The topology must already exist.

    Before consuming, the partitions of the current and the next month are ensured
    (raises if the database refuses, e.g. migrations not applied); then every
    ``partition_check_seconds``."""
    log = structlog.get_logger().bind(service=SERVICE_NAME)
    pool = await create_pool(settings.database_url, settings.database_pool_size)
    keeper: asyncio.Task[None] | None = None
    try:
        await _ensure_partitions(pool)
        connection = await connect(settings.amqp_url, SERVICE_NAME)
    except BaseException:
        await pool.close()
        raise
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
            max_body_bytes=settings.max_message_bytes,
            log_context=upload_log_context,
            batch_size=settings.batch_size,
            batch_window_seconds=settings.batch_window_seconds,
            concurrency=settings.concurrency,
        )
        await adapter.start()
        keeper = asyncio.create_task(_keep_partitions(pool, settings.partition_check_seconds, stop))
        log.info("service_ready", queue=queue.name, batch_size=settings.batch_size)
        await stop.wait()
        await adapter.stop()
    finally:
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        await connection.close()
        await pool.close()
        log.info("service_stopped")


async def _ensure_partitions(pool: asyncpg.Pool) -> None:
    """Create the archive's partitions due now (``shared.db.ensure_archive_partitions``).

    The archive locked for longer than 10 s is logged, not raised: rows of a month
    without its partition wait in the default partition and move at the next check."""
    log = structlog.get_logger().bind(service=SERVICE_NAME)
    try:
        created = await ensure_archive_partitions(pool)
    except asyncpg.LockNotAvailableError as exc:
        log.warning("archive_partitions_locked", error=str(exc))
        return
    if created:
        log.info("archive_partitions_created", partitions=created)


async def _keep_partitions(pool: asyncpg.Pool, every_seconds: float, stop: asyncio.Event) -> None:
    """Ensure the archive's partitions every ``every_seconds`` until ``stop``."""
    log = structlog.get_logger().bind(service=SERVICE_NAME)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every_seconds)
        except asyncio.TimeoutError:
            pass
        else:
            return
        try:
            await _ensure_partitions(pool)
        except Exception as exc:  # the database may be down for a while: try again next round
            log.error("archive_partitions_failed", error=repr(exc))


def run() -> None:
    """Entry point: build settings, configure logging, run until SIGINT/SIGTERM."""
    settings = ArchiveWriterSettings()
    configure_logging(settings.log_level, settings.log_format)
    run_until_signal(lambda stop: main(settings, stop))
