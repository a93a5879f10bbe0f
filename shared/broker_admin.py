"""RabbitMQ management HTTP API client: vhosts, users, permissions, connections.

Used by the account service (per-till broker users), ``tillsync setup`` and the tests.
Every call raises ``BrokerAdminError`` naming the call and RabbitMQ's answer when the
API refuses it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from shared.topology import UserPermissions


class BrokerAdminError(RuntimeError):
    """The management API refused a call or could not be reached."""


def _q(value: str) -> str:
    return quote(value, safe="")


class BrokerAdmin:
    """Async client of the management API at ``base_url`` (e.g. ``http://127.0.0.1:15672``)."""

    def __init__(self, base_url: str, user: str, password: str, timeout_seconds: float = 10.0) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/api", auth=(user, password), timeout=timeout_seconds
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> BrokerAdmin:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: str, path: str, json: Any = None, ok: tuple[int, ...] = (200, 201, 204), **kw: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, path, json=json, **kw)
        except httpx.HTTPError as exc:
            raise BrokerAdminError(f"{method} {path}: management API unreachable: {exc}") from exc
        if response.status_code not in ok:
            raise BrokerAdminError(f"{method} {path}: HTTP {response.status_code}: {response.text[:300]}")
        return response

    async def overview(self) -> dict[str, Any]:
        """GET /api/overview (RabbitMQ version, cluster name, ...)."""
        return (await self._call("GET", "/overview")).json()

    async def nodes(self) -> list[dict[str, Any]]:
        """``GET /api/nodes``: each node's figures (``sockets_total``, ``sockets_used``, ``mem_used`` …)."""
        return (await self._call("GET", "/nodes")).json()  # type: ignore[no-any-return]

    async def vhosts(self) -> list[dict[str, Any]]:
        """GET /api/vhosts: every vhost (``name`` ...)."""
        return (await self._call("GET", "/vhosts")).json()

    async def create_vhost(self, vhost: str) -> None:
        """Create ``vhost`` (no-op if it exists)."""
        await self._call("PUT", f"/vhosts/{_q(vhost)}")

    async def delete_vhost(self, vhost: str) -> None:
        """Delete ``vhost`` with everything in it (no-op if missing)."""
        await self._call("DELETE", f"/vhosts/{_q(vhost)}", ok=(200, 204, 404))

    async def put_user(self, user: str, password: str, tags: str = "") -> None:
        """Create ``user`` or reset its password and tags."""
        await self._call("PUT", f"/users/{_q(user)}", json={"password": password, "tags": tags})

    async def delete_user(self, user: str) -> bool:
        """Delete ``user``; False if it did not exist."""
        response = await self._call("DELETE", f"/users/{_q(user)}", ok=(200, 204, 404))
        return response.status_code != 404

    async def user_exists(self, user: str) -> bool:
        response = await self._call("GET", f"/users/{_q(user)}", ok=(200, 404))
        return response.status_code == 200

    async def vhost_permissions(self, vhost: str) -> list[dict[str, Any]]:
        """The users with permissions in ``vhost`` (each with ``user``, ``configure``, ...)."""
        response = await self._call("GET", f"/vhosts/{_q(vhost)}/permissions", ok=(200, 404))
        return response.json() if response.status_code == 200 else []

    async def set_permissions(self, vhost: str, user: str, configure: str, write: str, read: str) -> None:
        """Set ``user``'s configure/write/read regular expressions in ``vhost``."""
        await self._call(
            "PUT",
            f"/permissions/{_q(vhost)}/{_q(user)}",
            json={"configure": configure, "write": write, "read": read},
        )

    async def set_topic_permissions(self, vhost: str, user: str, exchange: str, write: str, read: str) -> None:
        """Set ``user``'s topic permission (routing-key regexes) on topic ``exchange``."""
        await self._call(
            "PUT",
            f"/topic-permissions/{_q(vhost)}/{_q(user)}",
            json={"exchange": exchange, "write": write, "read": read},
        )

    async def grant_permissions(self, vhost: str, user: str, permissions: UserPermissions) -> None:
        """Apply a user's vhost permissions and its topic permission on one exchange."""
        await self.set_permissions(vhost, user, permissions.configure, permissions.write, permissions.read)
        await self.set_topic_permissions(
            vhost, user, permissions.topic_exchange, permissions.topic_write, permissions.topic_read
        )

    async def connections_of(self, user: str) -> list[str]:
        """Names of the open connections authenticated as ``user``."""
        response = await self._call("GET", "/connections", params={"columns": "name,user"})
        return [c["name"] for c in response.json() if c.get("user") == user]

    async def close_connections_of(self, user: str, reason: str) -> int:
        """Close every connection of ``user``; return how many were closed."""
        closed = 0
        for name in await self.connections_of(user):
            response = await self._call(
                "DELETE", f"/connections/{_q(name)}", headers={"X-Reason": reason}, ok=(200, 204, 404)
            )
            closed += response.status_code != 404
        return closed

    async def queues(self, vhost: str) -> list[dict[str, Any]]:
        """Every queue of ``vhost`` with its facts (name, durable, messages, consumers ...)."""
        return (await self._call("GET", f"/queues/{_q(vhost)}")).json()

    async def queue(self, vhost: str, queue: str) -> dict[str, Any] | None:
        """GET the queue's facts (messages, consumers, arguments); None if it does not exist."""
        response = await self._call("GET", f"/queues/{_q(vhost)}/{_q(queue)}", ok=(200, 404))
        return response.json() if response.status_code == 200 else None

    async def queue_bindings(self, vhost: str, queue: str) -> list[dict[str, Any]]:
        """The bindings of ``queue`` (each with ``source`` and ``routing_key``)."""
        return (await self._call("GET", f"/queues/{_q(vhost)}/{_q(queue)}/bindings")).json()

    async def get_messages(self, vhost: str, queue: str, count: int = 10) -> list[dict[str, Any]]:
        """Peek at up to ``count`` messages of ``queue`` (requeued, order kept)."""
        response = await self._call(
            "POST",
            f"/queues/{_q(vhost)}/{_q(queue)}/get",
            json={"count": count, "ackmode": "ack_requeue_true", "encoding": "auto", "truncate": 50_000},
        )
        return response.json()
