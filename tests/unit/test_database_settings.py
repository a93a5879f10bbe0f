"""Which PostgreSQL role each process connects as: the services' role, or the owner."""

from __future__ import annotations

import pytest

from shared.settings import DatabaseAdminSettings, ServiceSettings, database_url_with_user, without_password

pytestmark = pytest.mark.unit


def test_the_services_connect_as_their_role_and_setup_as_postgres_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TILLSYNC_DATABASE_URL", "TILLSYNC_DATABASE_ADMIN_URL"):
        monkeypatch.delenv(name, raising=False)
    assert ServiceSettings().database_url == "postgresql://tillsync_service@127.0.0.1:5432/tillsync"
    assert DatabaseAdminSettings().admin_database_url == "postgresql://postgres@127.0.0.1:5432/tillsync"


def test_the_owner_defaults_to_postgres_on_the_services_server_and_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILLSYNC_DATABASE_URL", "postgresql://tillsync_service:s3cret@db.example:6543/shop?sslmode=require")
    monkeypatch.delenv("TILLSYNC_DATABASE_ADMIN_URL", raising=False)
    assert DatabaseAdminSettings().admin_database_url == "postgresql://postgres@db.example:6543/shop?sslmode=require"
    monkeypatch.setenv("TILLSYNC_DATABASE_ADMIN_URL", "postgresql://owner:pw@db.example:6543/shop")
    assert DatabaseAdminSettings().admin_database_url == "postgresql://owner:pw@db.example:6543/shop"


def test_urls_with_another_user_and_without_their_password() -> None:
    assert database_url_with_user("postgresql://a:b@[::1]/x", "tillsync_service", "p@ss:") == (
        "postgresql://tillsync_service:p%40ss%3A@[::1]/x"
    )
    assert without_password("postgresql://a:secret@h:5432/x") == "postgresql://a:***@h:5432/x"
    assert without_password("postgresql://a@h/x") == "postgresql://a@h/x"
