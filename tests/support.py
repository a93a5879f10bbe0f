"""Helpers shared by the integration and end-to-end tests (no fixtures here).

Real components only: RabbitMQ and PostgreSQL from ``TEST_AMQP_URL`` /
``TEST_DATABASE_URL`` (and ``TEST_MANAGEMENT_URL``), else from testcontainers when a
Docker engine is present, else the local servers (127.0.0.1, guest/guest, trust auth).
"""

from __future__ import annotations

import asyncio
import os
import datetime as dt
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from decimal import Decimal
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg

from shared.broker_admin import BrokerAdmin
from shared.db import init_connection
from shared.fiscal import PaymentType, VatKey
from shared.models import Cashier
from shared.settings import SERVICE_DATABASE_ROLE, amqp_url_with_credentials, database_url_with_user
from shared.topology import OPS_USER_PREFIX, TILL_USER_PREFIX
from tillsync.demo import DemoSettings
from tillsync.setup import setup
from till_agent.booking import SaleLine
from till_agent.store import TillStore
from till_agent.till import Till, TillSettings

REPO = Path(__file__).resolve().parent.parent
# The real data of other authors, read where it lies: beside the repository, or where
# TILLSYNC_SHARED_DATA_DIR points (never copied into the repository).
SHARED_DATA_DIR = Path(os.environ.get("TILLSYNC_SHARED_DATA_DIR") or REPO.parent / "shared" / "data")
BAKERY_CSV = SHARED_DATA_DIR / "bakery_sales_2021-01.csv"
STRONG_PASSWORD = "Backstube-2021!"


@dataclass(frozen=True)
class Infra:
    """Where the real broker and database are."""

    amqp_url: str  # with credentials, any vhost
    management_url: str
    database_url: str  # of an existing database on the server (admin connection: a superuser)

    @property
    def management_credentials(self) -> tuple[str, str]:
        parts = urlsplit(self.amqp_url)
        return parts.username or "guest", parts.password or "guest"

    def amqp_url_for(self, vhost: str) -> str:
        parts = urlsplit(self.amqp_url)
        return urlunsplit(parts._replace(path="/" + vhost))

    def database_url_for(self, name: str) -> str:
        """The admin URL of database ``name`` (migrations, setup, what only the owner may do)."""
        return urlunsplit(urlsplit(self.database_url)._replace(path="/" + name))

    def service_database_url_for(self, name: str) -> str:
        """The URL of database ``name`` as the services' role (with the admin's password,
        if any: ``tillsync setup`` gives the role the password of this URL)."""
        admin = urlsplit(self.database_url_for(name))
        password = unquote(admin.password) if admin.password is not None else None
        return database_url_with_user(urlunsplit(admin), SERVICE_DATABASE_ROLE, password)


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


async def drop_database(infra: Infra, name: str) -> None:
    conn = await asyncpg.connect(infra.database_url)
    try:
        await conn.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await conn.close()


class Environment:
    """A fresh vhost and database, set up like production (``tillsync setup``)."""

    def __init__(self, infra: Infra, admin: BrokerAdmin, template: str, tmp_path: Path) -> None:
        self.infra = infra
        self.admin = admin
        self.template = template
        suffix = uuid.uuid4().hex[:10]
        self.vhost = f"tillsync-test-{suffix}"
        self.database = f"tillsync_test_{suffix}"
        self.settings = DemoSettings(
            amqp_url=infra.amqp_url_for(self.vhost),
            management_url=infra.management_url,
            database_url=infra.service_database_url_for(self.database),
            database_admin_url=infra.database_url_for(self.database),
            demo_dir=tmp_path / "demo",
        )

    async def create(self) -> None:
        conn = await asyncpg.connect(self.infra.database_url)
        try:
            await conn.execute(f'create database "{self.database}" template "{self.template}"')
        finally:
            await conn.close()
        await setup(self.settings)

    async def destroy(self) -> None:
        """Delete the vhost, the till and ops users made in it, and the database."""
        for permission in await self.admin.vhost_permissions(self.vhost):
            if permission["user"].startswith((TILL_USER_PREFIX, OPS_USER_PREFIX)):
                await self.admin.delete_user(permission["user"])
        await self.admin.delete_vhost(self.vhost)
        await drop_database(self.infra, self.database)

    @property
    def signup_url(self) -> str:
        return self.settings.cloud_amqp_url_for_tills()

    def till_url(self, user: str, password: str) -> str:
        return amqp_url_with_credentials(self.settings.amqp_url, user, password)

    async def db(self) -> asyncpg.Connection:
        """A connection to this environment's database as the services' role (jsonb decoded
        like the services do)."""
        conn = await asyncpg.connect(self.settings.database_url)
        await init_connection(conn)
        return conn

    async def admin_db(self) -> asyncpg.Connection:
        """A connection to this environment's database as the owner (a superuser)."""
        conn = await asyncpg.connect(self.settings.admin_database_url)
        await init_connection(conn)
        return conn


async def wait_until(predicate, timeout_seconds: float = 20.0, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` (sync or async) until it returns a truthy value; fail after the timeout."""
    deadline = asyncio.get_running_loop().time() + timeout_seconds
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_seconds} s waiting for {what}")
        await asyncio.sleep(interval)


def new_till(env: Environment, tmp_path: Path, serial: str | None = None, name: str = "Kasse") -> Till:
    """A new till with its own store under ``tmp_path`` talking to ``env``'s broker."""
    serial = serial or f"SN-{uuid.uuid4().hex[:8]}"
    store = TillStore.create(tmp_path / serial, serial, name)
    return Till(store, TillSettings(cloud_amqp_url=env.signup_url, request_timeout_seconds=20))


async def signed_in_till(env: Environment, tmp_path: Path, account: str, name: str = "Kasse", create: bool = False) -> Till:
    """A new till signed in to ``account``; with ``create`` it creates the account first."""
    till = new_till(env, tmp_path, name=name)
    if create:
        await till.create_account(account, STRONG_PASSWORD)
    await till.sign_in(account, STRONG_PASSWORD)
    return till


def new_account_name() -> str:
    return f"shop-{uuid.uuid4().hex[:10]}@example.com"


def sell(till: Till, count: int = 1, unit_price: int = 250) -> None:
    """Book ``count`` cash receipts of one bread each on ``till`` (local, works offline)."""
    now = dt.datetime.now(dt.UTC)
    for _ in range(count):
        till.sell(
            [SaleLine("1", "Brot", Decimal("1"), unit_price, VatKey.REDUCED)],
            payment_type=PaymentType.CASH,
            payment_name="Bar",
            cashier=Cashier(cashier_id="1", name="Anna"),
            at=now,
        )


async def take_dead_letters(env: Environment, queue: str) -> list:  # type: ignore[type-arg]
    """Take (ack) every message now in the dead-letter queue of service queue ``queue``."""
    import aio_pika

    from shared.topology import dead_letter_queue_name

    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        channel = await connection.channel()
        dlq = await channel.get_queue(dead_letter_queue_name(queue))
        taken = []
        while (message := await dlq.get(fail=False, no_ack=True)) is not None:
            taken.append(message)
        return taken
    finally:
        await connection.close()


async def fetchval(env: Environment, query: str, *args: object) -> object:
    """One value from this environment's database."""
    conn = await env.db()
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def dead_letters_matching(env: Environment, queue: str, text: str) -> list:  # type: ignore[type-arg]
    """Take the dead letters of service queue ``queue``; return those whose body contains ``text``."""
    return [m for m in await take_dead_letters(env, queue) if text.encode() in m.body]


async def publish_as_till(env: Environment, till: Till, body: bytes, routing_key: str, user_id: str | None = None) -> None:
    """Publish ``body`` to ``till.upload`` with the till's own broker user (a hand-made message)."""
    import aio_pika

    from shared.topology import UPLOAD_EXCHANGE

    identity = till.store.identity()
    connection = await aio_pika.connect(env.till_url(identity.broker_username, identity.broker_password))
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(UPLOAD_EXCHANGE, ensure=False)
        await exchange.publish(
            aio_pika.Message(body, user_id=user_id or identity.broker_username, content_type="application/json"),
            routing_key=routing_key,
        )
    finally:
        await connection.close()
