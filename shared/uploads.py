"""What every consumer of till uploads checks: that a message comes from the till it names."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from shared.consumer import Delivery
from shared.models import Upload
from shared.topology import till_broker_user, upload_routing_key


def till_sender_problem(delivery: Delivery[Any], till_id: UUID, expected_routing_key: str) -> str | None:
    """Why a message whose body names ``till_id`` cannot be from that till, or None.

    The AMQP ``user_id`` (validated by RabbitMQ) must be ``till-<till_id>`` and the
    routing key ``expected_routing_key`` (the till's topic permission allows only its
    own ``<account_id>.<till_id>.`` prefix, so the body cannot name another account).
    """
    expected_user = till_broker_user(till_id)
    if delivery.user_id != expected_user:
        return f"user_id {delivery.user_id!r} is not the till's broker user {expected_user!r}"
    if delivery.routing_key != expected_routing_key:
        return f"routing key {delivery.routing_key!r} does not match the message ({expected_routing_key!r})"
    return None


def sender_problem(delivery: Delivery[Upload]) -> str | None:
    """Why an upload cannot be from the till it names (routing key ``<account_id>.<till_id>.<kind>``), or None."""
    upload = delivery.body
    return till_sender_problem(
        delivery, upload.till_id, upload_routing_key(upload.account_id, upload.till_id, upload.record.kind)
    )


def upload_log_context(upload: Upload) -> dict[str, Any]:
    """Fields bound to each upload's log line."""
    return {
        "account_id": str(upload.account_id),
        "till_id": str(upload.till_id),
        "record_id": str(upload.record_id),
        "till_seq": upload.till_seq,
        "kind": upload.record.kind,
    }
