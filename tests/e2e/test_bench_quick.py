"""The benchmark driver runs end to end in ``--quick`` mode and writes every figure.

No timing is asserted (benchmarks print figures, they are no tests): this only proves
that one command measures every phase on the real servers and writes the JSON file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support import Infra

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def test_quick_benchmark_writes_every_figure(infra: Infra, tmp_path: Path) -> None:
    server_db = urlsplit(infra.database_url).path.lstrip("/") or "postgres"
    env = {
        **os.environ,
        "TILLSYNC_AMQP_URL": urlunsplit(urlsplit(infra.amqp_url)._replace(path="/tillsync")),
        "TILLSYNC_MANAGEMENT_URL": infra.management_url,
        "TILLSYNC_DATABASE_URL": infra.service_database_url_for(server_db),
        "TILLSYNC_DATABASE_ADMIN_URL": infra.database_url,
    }
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "scripts/bench.py", "--quick", "--json", str(out), "--log-dir", str(tmp_path / "logs")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())

    assert {"cpu", "cores", "ram_gib", "kernel", "python", "rabbitmq", "postgresql"} <= result["machine"].keys()
    raw = result["raw"]
    assert raw["upload_body_bytes"] > 500  # a real upload, not a toy message
    assert raw["queue_arguments"]["x-queue-type"] == "quorum"
    assert raw["copy_rows"] == raw["messages"] == 1000
    for rate in (raw["publish_confirm_per_second"], raw["consume_ack_per_second"], raw["copy_rows_per_second"],
                 result["ingest"]["uploads_per_second"]):
        assert rate > 0
    small, large = result["catchup"]["runs"]
    assert (small["records"], large["records"]) == (100, 1000)
    assert large["confirmed_per_second"] > 0 and large["archived_per_second"] > 0
    assert small["till_agent_peak_rss_mib"] > 0 and large["till_agent_peak_rss_mib"] > 0
    assert set(result["service_peak_rss_mib"]) == {
        "account-service", "archive-writer", "masterdata-broadcaster", "receipt-handover-router", "password-approval-worker"
    }
    for key in ("fanout", "initial_download"):  # measured by their modules, or named as not measured
        assert result[key].get("not_measured") or "service_peak_rss_mib" in result[key]
    names = [figure["name"] for figure in result["figures"]]
    assert any(name.startswith("archive ingest") for name in names)
    assert any(name.startswith("offline catch-up") for name in names)
    assert "| figure | value | raw limit | ratio | target | met |" in run.stdout
