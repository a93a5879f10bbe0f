"""docker-compose.yml runs every service the code knows (tillsync.processes.SERVICES)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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
