"""What every consumer of till uploads checks: that a message comes from the till it names."""

from __future__ import annotations

from typing import Any

from shared.consumer import Delivery
from shared.models import Upload
from shared.topology import till_broker_user, upload_routing_key


def sender_problem(delivery: Delivery[Upload]) -> str | None:
    """Why the message cannot be from the till its body names, or None if it is.

    The AMQP ``user_id`` (validated by RabbitMQ) must be ``till-<till_id>`` and the
    routing key ``<account_id>.<till_id>.<kind>`` (the till's topic permission allows
    only its own account and till).
    """
    upload = delivery.body
    expected_user = till_broker_user(upload.till_id)
    if delivery.user_id != expected_user:
        return f"user_id {delivery.user_id!r} is not the till's broker user {expected_user!r}"
    expected_key = upload_routing_key(upload.account_id, upload.till_id, upload.record.kind)
    if delivery.routing_key != expected_key:
        return f"routing key {delivery.routing_key!r} does not match the record ({expected_key!r})"
    return None


def upload_log_context(upload: Upload) -> dict[str, Any]:
    """Fields bound to each upload's log line."""
    return {
        "account_id": str(upload.account_id),
        "till_id": str(upload.till_id),
        "record_id": str(upload.record_id),
        "till_seq": upload.till_seq,
        "kind": upload.record.kind,
    }
