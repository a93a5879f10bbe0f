"""Fixtures shared by the integration and end-to-end tests.

Isolation as in nameko and procrastinate: a fresh vhost per test module (or per test)
on the shared broker, and a database cloned from a migrated template.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import AsyncIterator, Iterator
from urllib.parse import urlsplit

import asyncpg
import pytest
import pytest_asyncio

from shared.broker_admin import BrokerAdmin
from shared.db import migrate
from tests.support import Environment, Infra, docker_available, drop_database


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    """The broker and database the tests use (see module docstring)."""
    amqp = os.environ.get("TEST_AMQP_URL")
    database = os.environ.get("TEST_DATABASE_URL")
    if amqp is None and database is None and docker_available():
        from testcontainers.postgres import PostgresContainer
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13-management") as rabbit, PostgresContainer("postgres:15") as pg:
            host = rabbit.get_container_host_ip()
            yield Infra(
                amqp_url=f"amqp://guest:guest@{host}:{rabbit.get_exposed_port(5672)}/",
                management_url=f"http://{host}:{rabbit.get_exposed_port(15672)}",
                database_url=pg.get_connection_url(driver=None),
            )
        return
    amqp = amqp or "amqp://guest:guest@127.0.0.1:5672/"
    host = urlsplit(amqp).hostname or "127.0.0.1"
    yield Infra(
        amqp_url=amqp,
        management_url=os.environ.get("TEST_MANAGEMENT_URL", f"http://{host}:15672"),
        database_url=database or "postgresql://postgres@127.0.0.1:5432/postgres",
    )


@pytest_asyncio.fixture(scope="session")
async def admin(infra: Infra) -> AsyncIterator[BrokerAdmin]:
    user, password = infra.management_credentials
    async with BrokerAdmin(infra.management_url, user, password) as client:
        yield client


@pytest_asyncio.fixture(scope="session")
async def template_database(infra: Infra) -> AsyncIterator[str]:
    """A database with every migration applied; each ``Environment`` clones it."""
    name = f"tillsync_test_template_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(infra.database_url)
    try:
        await conn.execute(f'create database "{name}"')
    finally:
        await conn.close()
    migrated = await asyncpg.connect(infra.database_url_for(name))
    try:
        await migrate(migrated)
    finally:
        await migrated.close()
    yield name
    await drop_database(infra, name)


@pytest_asyncio.fixture(scope="module")
async def env(infra: Infra, admin: BrokerAdmin, template_database: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Environment]:
    """One fresh environment per test module."""
    environment = Environment(infra, admin, template_database, tmp_path_factory.mktemp("env"))
    await environment.create()
    yield environment
    await environment.destroy()


@pytest_asyncio.fixture
async def fresh_env(infra: Infra, admin: BrokerAdmin, template_database: str, tmp_path: Path) -> AsyncIterator[Environment]:
    """One fresh environment for this test alone."""
    environment = Environment(infra, admin, template_database, tmp_path)
    await environment.create()
    yield environment
    await environment.destroy()


