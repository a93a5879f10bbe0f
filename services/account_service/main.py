"""Account service wiring: settings, connections, the consume adapter, run until stopped."""

from __future__ import annotations

import asyncio
import functools

import structlog
from pydantic import Field, TypeAdapter

from services.account_service.broker import RabbitApprovalQueue, RabbitTillBroker
from services.account_service.handlers import (
    AccountDeps,
    ThrottlePolicy,
    handle_account_requests,
    internal_error_reply,
    invalid_request_reply,
    redact_request,
    request_log_context,
)
from shared.amqp import connect
from shared.broker_admin import BrokerAdmin
from shared.consumer import ConsumeAdapter
from shared.db import create_pool
from shared.logging import configure_logging
from shared.models import AccountRequest
from shared.service import run_until_signal
from shared.settings import ServiceSettings
from shared.topology import ACCOUNT_SERVICE_QUEUE_SPEC, bindings_to, declare_queue

SERVICE_NAME = "account-service"


class AccountServiceSettings(ServiceSettings):
    """Settings of the account service (environment ``TILLSYNC_*``)."""

    concurrency: int = Field(default=4, ge=1, description="requests handled at once")
    signin_free_attempts: int = Field(default=3, ge=1)
    signin_base_delay_seconds: float = Field(default=1.0, ge=0)
    signin_max_delay_seconds: float = Field(default=300.0, ge=0)


async def main(settings: AccountServiceSettings, stop: asyncio.Event) -> None:
    """Run the account service until ``stop`` is set."""
    log = structlog.get_logger().bind(service=SERVICE_NAME)
    pool = await create_pool(settings.database_url, settings.database_pool_size)
    user, password = settings.management_credentials
    admin = BrokerAdmin(settings.management_url, user, password)
    connection = await connect(settings.amqp_url, SERVICE_NAME)
    try:
        channel = await connection.channel()
        publish_channel = await connection.channel(publisher_confirms=True)
        admin_channel = await connection.channel()
        # The request queue is transient (see shared.topology), so the service declares
        # and binds it itself; the robust channel restores both after a broker restart.
        queue = await declare_queue(channel, ACCOUNT_SERVICE_QUEUE_SPEC)
        for binding in bindings_to(queue.name):
            await queue.bind(binding.source, routing_key=binding.routing_key)
        deps = AccountDeps(
            broker=RabbitTillBroker(admin, admin_channel, settings.vhost),
            vhost=settings.vhost,
            throttle=ThrottlePolicy(
                settings.signin_free_attempts, settings.signin_base_delay_seconds, settings.signin_max_delay_seconds
            ),
            approvals=RabbitApprovalQueue(publish_channel, settings.amqp_user),
        )
        adapter = ConsumeAdapter(
            channel=channel,
            publish_channel=publish_channel,
            queue=queue,
            adapter=TypeAdapter(AccountRequest),
            handler=functools.partial(handle_account_requests, deps=deps),
            pool=pool,
            max_body_bytes=settings.max_message_bytes,
            log_context=request_log_context,
            concurrency=settings.concurrency,
            redact=redact_request,
            error_reply=internal_error_reply,
            invalid_reply=invalid_request_reply,
        )
        await adapter.start()
        log.info("service_ready", queue=queue.name, vhost=settings.vhost)
        await stop.wait()
        await adapter.stop()
    finally:
        await connection.close()
        await admin.close()
        await pool.close()
        log.info("service_stopped")


def run() -> None:
    """Entry point: build settings, configure logging, run until SIGINT/SIGTERM."""
    settings = AccountServiceSettings()
    configure_logging(settings.log_level, settings.log_format)
    run_until_signal(lambda stop: main(settings, stop))
