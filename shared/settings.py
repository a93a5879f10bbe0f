"""Settings shared by every tillsync process (pydantic-settings).

Every setting is read from an environment variable named ``TILLSYNC_<FIELD>``
(upper case), e.g. ``TILLSYNC_AMQP_URL``. Each service defines one subclass with
its own extra fields; ``main()`` builds it and passes it down. Nothing reads
``os.environ`` elsewhere.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/tillsync"
# The PostgreSQL role of the services (made by migration 0007): it reads and writes the
# ordinary tables and only reads and inserts the archive tables.
SERVICE_DATABASE_ROLE = "tillsync_service"
DEFAULT_DATABASE_URL = f"postgresql://{SERVICE_DATABASE_ROLE}@127.0.0.1:5432/tillsync"
# The owner of the schema (migrations, `tillsync setup`, the archive purge), when
# TILLSYNC_DATABASE_ADMIN_URL is not set: this user on the server and database of
# TILLSYNC_DATABASE_URL.
DEFAULT_DATABASE_ADMIN_USER = "postgres"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:15672"


class BaseTillsyncSettings(BaseSettings):
    """Fields every process has: logging."""

    model_config = SettingsConfigDict(env_prefix="TILLSYNC_", extra="ignore")

    log_level: str = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"


class BrokerSettings(BaseTillsyncSettings):
    """Connection to RabbitMQ as a service (AMQP and the management HTTP API).

    ``amqp_url`` carries user, password and vhost (``amqp://user:pw@host:5672/vhost``).
    The management API uses ``management_user``/``management_password`` when set,
    else the user and password of ``amqp_url``.
    """

    amqp_url: str = DEFAULT_AMQP_URL
    management_url: str = DEFAULT_MANAGEMENT_URL
    management_user: str | None = None
    management_password: str | None = None

    @property
    def vhost(self) -> str:
        """The vhost named by ``amqp_url`` (``/`` when the path is empty)."""
        return vhost_of(self.amqp_url)

    @property
    def amqp_user(self) -> str:
        """The broker user of ``amqp_url`` (the ``user_id`` this process publishes as)."""
        return unquote(urlsplit(self.amqp_url).username or "guest")

    @property
    def management_credentials(self) -> tuple[str, str]:
        """``(user, password)`` for the management HTTP API."""
        parts = urlsplit(self.amqp_url)
        user = self.management_user or unquote(parts.username or "guest")
        password = self.management_password or unquote(parts.password or "guest")
        return user, password


# A message body longer than this is refused unread (shared.consumer); a till's record or
# request is a few kB, a receipt with a thousand lines about 200 kB.
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024


class ServiceSettings(BrokerSettings):
    """A service that uses both RabbitMQ and PostgreSQL.

    ``database_url`` connects as the services' role (``tillsync_service``), which may
    only read and insert the archive tables. ``max_message_bytes``: a message body
    longer than this (bytes) is dead-lettered unread."""

    database_url: str = DEFAULT_DATABASE_URL
    database_pool_size: int = Field(default=5, ge=1)
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1024, description="longest message body read, bytes")


class DatabaseAdminSettings(ServiceSettings):
    """A process that changes the schema or the archive's partitions (``tillsync setup``,
    ``tillsync archive purge-expired``): ``database_admin_url`` connects as the owner.

    Unset, it is ``database_url`` with the user ``postgres`` (no password): the
    superuser of a development server with trust authentication."""

    database_admin_url: str | None = None

    @property
    def admin_database_url(self) -> str:
        """The owner's URL: ``database_admin_url`` or the default described above."""
        if self.database_admin_url:
            return self.database_admin_url
        return database_url_with_user(self.database_url, DEFAULT_DATABASE_ADMIN_USER)


def vhost_of(amqp_url: str) -> str:
    """Return the vhost of an AMQP URL; ``amqp://h/`` and ``amqp://h`` mean ``/``."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def amqp_url_with_credentials(amqp_url: str, user: str, password: str) -> str:
    """Return ``amqp_url`` with its user and password replaced (both URL-quoted)."""
    parts = urlsplit(amqp_url)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}{port}"
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}"


def database_url_with_user(database_url: str, user: str, password: str | None = None) -> str:
    """Return the PostgreSQL URL ``database_url`` with its user (and password) replaced;
    without ``password`` the URL carries none."""
    parts = urlsplit(database_url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    credentials = quote(user, safe="") + (f":{quote(password, safe='')}" if password is not None else "")
    return urlunsplit(parts._replace(netloc=f"{credentials}@{host}{port}"))


def without_password(url: str) -> str:
    """``url`` with its password shown as ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))
