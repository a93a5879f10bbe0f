"""Service processes started by the demo and the end-to-end tests.

Each service runs as ``python -m services.<name>`` with the given ``TILLSYNC_*``
environment, JSON logs appended to ``<log_dir>/<service>.log``. A service is ready
when it logged ``service_ready``.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SERVICES = {
    "account-service": "services.account_service",
    "archive-writer": "services.archive_writer",
    "masterdata-broadcaster": "services.masterdata_broadcaster",
    "receipt-handover-router": "services.receipt_router",
    "password-approval-worker": "services.password_approval",
}


def _terminate_with_parent() -> None:
    """In the child: ask Linux for SIGTERM when the parent dies, so no service is left behind."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServiceStartError(RuntimeError):
    """A service exited or did not become ready; the message holds its last log lines."""


class ServiceProcess:
    """One service subprocess."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        if name not in SERVICES:
            raise ValueError(f"unknown service {name!r}; known: {', '.join(SERVICES)}")
        self.name = name
        self.env = {**os.environ, **env, "TILLSYNC_LOG_FORMAT": "json"}
        self.log_path = Path(log_dir) / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self) -> None:
        """Start the process (its log is appended to ``log_path``)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", SERVICES[self.name]],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_terminate_with_parent,
            )

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def wait_ready(self, timeout_seconds: float = 30.0) -> None:
        """Wait for ``service_ready`` in this start's log; raises ``ServiceStartError``."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise ServiceStartError(f"{self.name} exited while starting:\n{self.log_tail()}")
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                if b'"service_ready"' in log.read():
                    return
            await asyncio.sleep(0.1)
        raise ServiceStartError(f"{self.name} not ready after {timeout_seconds:.0f} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to finish anything."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout_seconds: float = 15.0) -> None:
        """SIGTERM and wait; SIGKILL if it does not stop in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_seconds)
        except subprocess.TimeoutExpired:
            self.kill()


def service_env(amqp_url: str, database_url: str, management_url: str) -> dict[str, str]:
    """The ``TILLSYNC_*`` variables that point a service at a broker and a database
    (``database_url``: as the services' role, ``tillsync_service``)."""
    return {
        "TILLSYNC_AMQP_URL": amqp_url,
        "TILLSYNC_DATABASE_URL": database_url,
        "TILLSYNC_MANAGEMENT_URL": management_url,
    }
