"""docker-compose.yml runs every service the code knows (tillsync.processes.SERVICES), the services as the database role for services."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.settings import SERVICE_DATABASE_ROLE
from tillsync.processes import SERVICES

pytestmark = pytest.mark.unit

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def test_compose_runs_every_service() -> None:
    text = COMPOSE.read_text()
    services_block = text[text.index("\nservices:\n"):]
    defined = set(re.findall(r"^  ([a-z][a-z0-9-]*):\s*$", services_block, flags=re.MULTILINE))
    commands = set(re.findall(r'command: \["service", "([a-z-]+)"\]', text))
    assert set(SERVICES) <= defined
    assert commands == set(SERVICES)


def test_only_setup_connects_to_postgres_as_the_owner() -> None:
    text = COMPOSE.read_text()
    service_urls = re.findall(r"^\s+TILLSYNC_DATABASE_URL: (\S+)$", text, flags=re.MULTILINE)
    admin_urls = re.findall(r"^\s+TILLSYNC_DATABASE_ADMIN_URL: (\S+)$", text, flags=re.MULTILINE)
    assert service_urls and all(url.startswith(f"postgresql://{SERVICE_DATABASE_ROLE}@") for url in service_urls)
    setup_block = text[text.index("\n  setup:\n"):text.index("\n  account-service:\n")]
    assert len(admin_urls) == 1 and f"TILLSYNC_DATABASE_ADMIN_URL: {admin_urls[0]}" in setup_block
