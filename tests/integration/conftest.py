"""Integration fixtures: the services running in this test process against real servers."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import pytest
import pytest_asyncio

from services.account_service.main import AccountServiceSettings
from services.account_service.main import main as account_service_main
from services.archive_writer.main import ArchiveWriterSettings
from services.archive_writer.main import main as archive_writer_main
from services.masterdata_broadcaster.main import BroadcasterSettings
from services.masterdata_broadcaster.main import main as broadcaster_main
from services.password_approval.main import ApprovalSettings
from services.password_approval.main import main as approval_main
from services.receipt_router.main import RouterSettings
from services.receipt_router.main import main as router_main
from tests.support import Environment

pytestmark = pytest.mark.integration


class RunningServices:
    """The account service, archive writer, master-data broadcaster, receipt handover router and password-approval worker as tasks of this event loop."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        self.stop = asyncio.Event()
        common = dict(
            amqp_url=env.settings.amqp_url,
            management_url=env.settings.management_url,
            database_url=env.settings.database_url,
        )
        self.account_settings = AccountServiceSettings(
            **common, signin_free_attempts=3, signin_base_delay_seconds=2.0, signin_max_delay_seconds=4.0
        )
        self.writer_settings = ArchiveWriterSettings(**common, batch_size=100, batch_window_seconds=0.02)
        self.broadcaster_settings = BroadcasterSettings(**common, catchup_page_size=100)
        self.router_settings = RouterSettings(**common)
        self.approval_settings = ApprovalSettings(**common)
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.tasks = [
            asyncio.create_task(account_service_main(self.account_settings, self.stop)),
            asyncio.create_task(archive_writer_main(self.writer_settings, self.stop)),
            asyncio.create_task(broadcaster_main(self.broadcaster_settings, self.stop)),
            asyncio.create_task(router_main(self.router_settings, self.stop)),
            asyncio.create_task(approval_main(self.approval_settings, self.stop)),
        ]
        await asyncio.sleep(0.5)
        for task in self.tasks:
            if task.done():
                task.result()  # raise the start-up error

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest_asyncio.fixture(scope="module")
async def services(env: Environment) -> AsyncIterator[RunningServices]:
    running = RunningServices(env)
    await running.start()
    yield running
    await running.close()

