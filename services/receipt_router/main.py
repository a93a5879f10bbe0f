"""Receipt handover router wiring: settings, connections, two consume adapters."""

from __future__ import annotations

import asyncio

import structlog
from pydantic import Field

from services.receipt_router.handlers import receipt_catchup_log_context, route_receipts, serve_receipt_catchups
from shared.amqp import connect
from shared.consumer import ConsumeAdapter
from shared.db import create_pool
from shared.logging import configure_logging
from shared.models import RECEIPT_CATCHUP_ADAPTER, UPLOAD_ADAPTER
from shared.service import run_until_signal
from shared.settings import ServiceSettings
from shared.topology import RECEIPT_CATCHUP_QUEUE, RECEIPT_ROUTER_QUEUE
from shared.uploads import upload_log_context

SERVICE_NAME = "receipt-handover-router"


class RouterSettings(ServiceSettings):
    """Settings of the receipt handover router (environment ``TILLSYNC_*``)."""

    batch_size: int = Field(default=200, ge=1, description="receipt events routed per transaction at most")
    batch_window_seconds: float = Field(default=0.01, ge=0, description="wait for a fuller batch at most this long")
    catchup_concurrency: int = Field(default=2, ge=1, description="receipt catch-up requests served at once")


async def main(settings: RouterSettings, stop: asyncio.Event) -> None:
    """Run the router until ``stop`` is set. The topology must already exist."""
    log = structlog.get_logger().bind(service=SERVICE_NAME)
    pool = await create_pool(settings.database_url, settings.database_pool_size)
    connection = await connect(settings.amqp_url, SERVICE_NAME)
    try:
        publish_channel = await connection.channel(publisher_confirms=True)
        events_channel = await connection.channel()
        catchup_channel = await connection.channel()
        events = ConsumeAdapter(
            channel=events_channel,
            publish_channel=publish_channel,
            queue=await events_channel.get_queue(RECEIPT_ROUTER_QUEUE, ensure=True),
            adapter=UPLOAD_ADAPTER,
            handler=route_receipts,
            pool=pool,
            max_body_bytes=settings.max_message_bytes,
            log_context=upload_log_context,
            batch_size=settings.batch_size,
            batch_window_seconds=settings.batch_window_seconds,
        )
        catchups = ConsumeAdapter(
            channel=catchup_channel,
            publish_channel=publish_channel,
            queue=await catchup_channel.get_queue(RECEIPT_CATCHUP_QUEUE, ensure=True),
            adapter=RECEIPT_CATCHUP_ADAPTER,
            handler=serve_receipt_catchups,
            pool=pool,
            max_body_bytes=settings.max_message_bytes,
            log_context=receipt_catchup_log_context,
            concurrency=settings.catchup_concurrency,
        )
        await events.start()
        await catchups.start()
        log.info("service_ready", queues=[RECEIPT_ROUTER_QUEUE, RECEIPT_CATCHUP_QUEUE])
        await stop.wait()
        await events.stop()
        await catchups.stop()
    finally:
        await connection.close()
        await pool.close()
        log.info("service_stopped")


def run() -> None:
    """Entry point: build settings, configure logging, run until SIGINT/SIGTERM."""
    settings = RouterSettings()
    configure_logging(settings.log_level, settings.log_format)
    run_until_signal(lambda stop: main(settings, stop))
