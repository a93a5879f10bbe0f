"""Password-approval worker wiring: settings, the consume adapter, the expiry sweep."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools

import structlog
from pydantic import Field

from services.password_approval.handlers import (
    ApprovalPolicy,
    approval_log_context,
    expire_requests,
    handle_approval_messages,
    internal_error_reply,
    invalid_message_reply,
)
from shared.amqp import connect
from shared.consumer import ConsumeAdapter
from shared.db import create_pool
from shared.logging import configure_logging
from shared.models import APPROVAL_ADAPTER
from shared.service import run_until_signal
from shared.settings import ServiceSettings
from shared.topology import PASSWORD_APPROVAL_QUEUE

SERVICE_NAME = "password-approval-worker"


class ApprovalSettings(ServiceSettings):
    """Settings of the password-approval worker (environment ``TILLSYNC_*``)."""

    approval_target_hours: float = Field(default=48.0, gt=0, description="pending longer: flagged as overdue")
    approval_expiry_days: float = Field(default=14.0, gt=0, description="pending longer: expired")
    expiry_check_seconds: float = Field(default=60.0, gt=0, description="how often pending requests are checked for expiry")


async def main(settings: ApprovalSettings, stop: asyncio.Event) -> None:
    """Run the worker until ``stop`` is set. The topology must already exist."""
    log = structlog.get_logger().bind(service=SERVICE_NAME)
    policy = ApprovalPolicy(settings.approval_target_hours, settings.approval_expiry_days)
    pool = await create_pool(settings.database_url, settings.database_pool_size)
    connection = await connect(settings.amqp_url, SERVICE_NAME)
    sweeper: asyncio.Task[None] | None = None
    try:
        channel = await connection.channel()
        publish_channel = await connection.channel(publisher_confirms=True)
        adapter = ConsumeAdapter(
            channel=channel,
            publish_channel=publish_channel,
            queue=await channel.get_queue(PASSWORD_APPROVAL_QUEUE, ensure=True),
            adapter=APPROVAL_ADAPTER,
            handler=functools.partial(handle_approval_messages, policy=policy),
            pool=pool,
            max_body_bytes=settings.max_message_bytes,
            log_context=approval_log_context,
            error_reply=internal_error_reply,
            invalid_reply=invalid_message_reply,
        )
        await adapter.start()
        sweeper = asyncio.create_task(_sweep(pool, policy, settings.expiry_check_seconds, stop))
        log.info("service_ready", queue=PASSWORD_APPROVAL_QUEUE)
        await stop.wait()
        await adapter.stop()
    finally:
        if sweeper is not None:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
        await connection.close()
        await pool.close()
        log.info("service_stopped")


async def _sweep(pool, policy: ApprovalPolicy, every_seconds: float, stop: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
    """Expire overdue requests every ``every_seconds`` (also right at start)."""
    log = structlog.get_logger().bind(service=SERVICE_NAME)
    while not stop.is_set():
        try:
            async with pool.acquire() as conn:
                async with conn.transaction():
                    await expire_requests(conn, policy, dt.datetime.now(dt.UTC))
        except Exception as exc:  # the database may be down for a while: try again next round
            log.warning("expiry_sweep_failed", error=repr(exc))
        try:
            await asyncio.wait_for(stop.wait(), every_seconds)
        except asyncio.TimeoutError:
            pass


def run() -> None:
    """Entry point: build settings, configure logging, run until SIGINT/SIGTERM."""
    settings = ApprovalSettings()
    configure_logging(settings.log_level, settings.log_format)
    run_until_signal(lambda stop: main(settings, stop))
