"""Password-approval worker handlers: keep reset requests, apply ops decisions, expire.

Rules (issue "password reset with service approval"; DESIGN.md §1.6):
- a reset request comes from the account service only (routing key ``request``, not
  from an ops or till user); it supersedes the account's older pending request;
- approve / reject come from ops users only: the approver is the broker-validated AMQP
  ``user_id`` (``ops-<name>``), never a field of the message;
- only a pending request can be decided; a request older than ``expiry_days`` (14) is
  expired and cannot be approved; pending requests older than ``target_hours`` (48)
  are flagged as overdue in the list;
- approving makes the request's password hash the account's (the old password stops
  working); rejecting keeps the old one;
- every request and decision is written to ``password_reset_audit`` with its actor;
  a command repeated with the same ``command_id`` changes nothing and gets the same
  answer (a ``command_id`` reused for another command is refused and dead-lettered);
  the account gets a notice its tills show at the next sign-in.
The clear password never reaches this service: requests carry its argon2id hash.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from shared.consumer import Delivery
from shared.models import (
    ApprovalError,
    ApprovalMessage,
    ApprovalReply,
    ApprovePasswordReset,
    ListPasswordResets,
    PasswordResetDecided,
    PasswordResetInfo,
    PasswordResetList,
    PasswordResetRequest,
    RejectPasswordReset,
)
from shared.topology import (
    APPROVAL_DECISION_KEY,
    APPROVAL_QUERY_KEY,
    APPROVAL_REQUEST_KEY,
    OPS_USER_PREFIX,
    TILL_USER_PREFIX,
)

log = structlog.get_logger()

SYSTEM = "system"  # the actor of expiries and supersessions
ACCOUNT_SERVICE = "account-service"  # the actor of requests (made on a till, checked by the account service)


@dataclass(frozen=True)
class ApprovalPolicy:
    """``target_hours``: the approval target (older pending requests are flagged);
    ``expiry_days``: a pending request older than this expires."""

    target_hours: float = 48.0
    expiry_days: float = 14.0


def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def info(row: asyncpg.Record | dict[str, Any], policy: ApprovalPolicy, now: dt.datetime) -> PasswordResetInfo:
    """A request as ops see it, from a row of ``password_reset_requests`` joined with its account name."""
    age = now - row["requested_at"]
    return PasswordResetInfo(
        request_id=row["request_id"],
        account_name=row["account_name"],
        requested_on=row["requested_on"],
        requested_at=row["requested_at"],
        age_hours=round(age.total_seconds() / 3600, 1),
        overdue=row["status"] == "pending" and age > dt.timedelta(hours=policy.target_hours),
        expires_at=row["requested_at"] + dt.timedelta(days=policy.expiry_days),
        status=row["status"],
        decided_by=row["decided_by"],
        decided_at=row["decided_at"],
        reason=row["reason"],
        superseded_recently=row["superseded_recently"],
        signed_in_since=tuple(row["signed_in_since"] or ()),
    )


# a request with its account name and the technician's warnings (see PasswordResetInfo)
_INFO = """
select r.*, a.account_name,
       (select count(*) from password_reset_requests o
        where o.account_id = r.account_id and o.status = 'superseded' and o.decided_at > now() - interval '14 days')
           as superseded_recently,
       (select array_agg(t.till_name || ' (' || t.serial_number || ')' order by t.signed_in_at)
        from tills t where t.account_id = r.account_id and t.signed_in_at > r.requested_at) as signed_in_since
from password_reset_requests r join accounts a using (account_id)
"""
_REQUEST = _INFO + " where r.request_id = $1"


async def handle_approval_messages(
    deliveries: list[Delivery[ApprovalMessage]], conn: asyncpg.Connection, policy: ApprovalPolicy
) -> None:
    """Consume-adapter handler: one message at a time, in arrival order."""
    for d in deliveries:
        message = d.body.message
        if isinstance(message, PasswordResetRequest):
            user = d.user_id or ""
            if d.routing_key != APPROVAL_REQUEST_KEY or not user or user.startswith((OPS_USER_PREFIX, TILL_USER_PREFIX)):
                d.reply = ApprovalReply(reply=ApprovalError(code="invalid", message="reset requests come from the account service only"))
                d.refuse(
                    f"a reset request must come from the account service with routing key {APPROVAL_REQUEST_KEY!r} "
                    f"(user_id {user!r}, routing key {d.routing_key!r})",
                    outcome="wrong_sender",
                )
                continue
            await record_request(d, message, conn, user)
            continue
        user = d.user_id or ""
        expected_key = APPROVAL_QUERY_KEY if isinstance(message, ListPasswordResets) else APPROVAL_DECISION_KEY
        problem = None
        if not user.startswith(OPS_USER_PREFIX):
            problem = ApprovalError(code="not_ops", message=f"only ops users ({OPS_USER_PREFIX}…) may do this, not {user or 'an anonymous sender'!r}")
        elif d.routing_key != expected_key:
            problem = ApprovalError(code="invalid", message=f"a {message.type} command uses routing key {expected_key!r}")
        if problem is not None:
            d.reply = ApprovalReply(reply=problem)
            d.refuse(problem.message, outcome=problem.code)
            continue
        now = dt.datetime.now(dt.UTC)
        if isinstance(message, ListPasswordResets):
            await expire_requests(conn, policy, now)
            d.reply = ApprovalReply(reply=await list_requests(conn, message, policy, now))
            d.outcome = "listed"
        else:
            reply = await decide(conn, message, user, policy, now)
            d.reply = ApprovalReply(reply=reply)
            d.outcome = reply.code if isinstance(reply, ApprovalError) else ("repeat" if reply.repeat else reply.request.status)
            if isinstance(reply, ApprovalError) and reply.code == "invalid":
                d.refuse(reply.message, outcome=reply.code)  # bad input (a reused command id): dead-lettered too
            elif isinstance(reply, ApprovalError):
                d.log["reason"] = reply.message


async def record_request(d: Delivery[ApprovalMessage], request: PasswordResetRequest, conn: asyncpg.Connection, actor: str) -> None:
    """Keep a new request (once: a redelivery changes nothing); supersede the account's
    older pending one."""
    if await conn.fetchval("select 1 from password_reset_requests where request_id = $1", request.request_id):
        d.outcome = "repeat"
        return
    superseded = await conn.fetch(
        """
        update password_reset_requests set status = 'superseded', decided_by = $3, decided_at = now(),
            reason = 'replaced by the newer request ' || $2::text
        where account_id = $1 and status = 'pending' returning request_id
        """,
        request.account_id, str(request.request_id), SYSTEM,
    )
    await conn.execute(
        """
        insert into password_reset_requests
            (request_id, account_id, password_hash, requested_at, requested_on, verification_code)
        values ($1, $2, $3, $4, $5, $6)
        """,
        request.request_id, request.account_id, request.password_hash, request.requested_at, request.requested_on,
        request.verification_code,
    )
    await conn.executemany(
        "insert into password_reset_audit (request_id, account_id, action, actor, reason) values ($1, $2, $3, $4, $5)",
        [(r["request_id"], request.account_id, "superseded", SYSTEM, f"replaced by the newer request {request.request_id}")
         for r in superseded]
        + [(request.request_id, request.account_id, "requested", ACCOUNT_SERVICE, f"asked on {request.requested_on} (broker user {actor})")],
    )
    d.outcome = "recorded"
    d.log.update(request_id=str(request.request_id), superseded=len(superseded))


async def expire_requests(conn: asyncpg.Connection, policy: ApprovalPolicy, now: dt.datetime) -> int:
    """Expire the pending requests older than ``policy.expiry_days``; returns how many."""
    rows = await conn.fetch(
        """
        update password_reset_requests set status = 'expired', decided_by = $2, decided_at = $1,
            reason = 'not approved within ' || $3::text || ' days'
        where status = 'pending' and requested_at < $1::timestamptz - make_interval(secs => $4::float8)
        returning request_id, account_id, requested_at, requested_on
        """,
        now, SYSTEM, f"{policy.expiry_days:g}", policy.expiry_days * 86400,
    )
    for r in rows:
        await conn.execute(
            "insert into password_reset_audit (request_id, account_id, action, actor, reason) values ($1, $2, 'expired', $3, $4)",
            r["request_id"], r["account_id"], SYSTEM, f"not approved within {policy.expiry_days:g} days",
        )
        await _notice(
            conn, r["account_id"],
            f"The password reset requested on {r['requested_on']} at {_when(r['requested_at'])} expired without "
            f"approval; the old password stays valid. Ask again if needed.",
        )
    if rows:
        log.info("password_resets_expired", count=len(rows))
    return len(rows)


async def _notice(conn: asyncpg.Connection, account_id: Any, message: str) -> None:
    await conn.execute("insert into account_notices (account_id, message) values ($1, $2)", account_id, message)


async def list_requests(
    conn: asyncpg.Connection, query: ListPasswordResets, policy: ApprovalPolicy, now: dt.datetime
) -> PasswordResetList:
    """The pending requests, oldest first (and with ``include_decided`` the decided ones of the last days)."""
    rows = await conn.fetch(
        _INFO + """
        where r.status = 'pending' or ($1 and r.decided_at > $2::timestamptz - make_interval(days => $3::int))
        order by r.status <> 'pending', r.requested_at
        """,
        query.include_decided, now, query.days,
    )
    return PasswordResetList(requests=tuple(info(r, policy, now) for r in rows))


async def decide(
    conn: asyncpg.Connection,
    command: ApprovePasswordReset | RejectPasswordReset,
    user: str,
    policy: ApprovalPolicy,
    now: dt.datetime,
) -> PasswordResetDecided | ApprovalError:
    """Apply an approval or rejection by ops user ``user`` (see the module docstring)."""
    done = await conn.fetchrow(
        "select request_id, action, actor from password_reset_audit where command_id = $1", command.command_id
    )
    if done is not None:
        action = "approved" if isinstance(command, ApprovePasswordReset) else "rejected"
        if (done["request_id"], done["action"], done["actor"]) != (command.request_id, action, user):
            return ApprovalError(
                code="invalid",
                message=f"command id {command.command_id} was used for another command "
                f"({done['action']} {done['request_id']} by {done['actor']}); give a new one",
            )
        row = await conn.fetchrow(_REQUEST, done["request_id"])
        return PasswordResetDecided(request=info(row, policy, now), repeat=True)
    row = await conn.fetchrow(_REQUEST + " for update of r", command.request_id)
    if row is None:
        return ApprovalError(code="unknown_request", message=f"there is no password reset request {command.request_id}")
    if row["status"] == "pending" and now - row["requested_at"] > dt.timedelta(days=policy.expiry_days):
        await expire_requests(conn, policy, now)
        row = await conn.fetchrow(_REQUEST, command.request_id)
    if row["status"] != "pending":
        by = f" by {row['decided_by']}" if row["decided_by"] and row["decided_by"] != SYSTEM else ""
        return ApprovalError(
            code="expired" if row["status"] == "expired" else "not_pending",
            message=f"request {command.request_id} is {row['status']}{by} since {_when(row['decided_at'])}"
            + (f" ({row['reason']})" if row["reason"] else "")
            + "; only a pending request can be decided",
        )
    approve = isinstance(command, ApprovePasswordReset)
    if approve and command.verification_code.replace("-", "") != row["verification_code"].replace("-", ""):  # type: ignore[union-attr]
        return ApprovalError(
            code="wrong_code",
            message=f"the verification code does not match request {command.request_id}: approve only a request "
            "whose code the caller reads from the till that asked",
        )
    if approve:
        signed_in = await conn.fetch(
            "select till_name, serial_number from tills where account_id = $1 and signed_in order by till_name",
            row["account_id"],
        )
        if signed_in:
            tills = ", ".join(f"{t['till_name']} ({t['serial_number']})" for t in signed_in)
            return ApprovalError(
                code="not_pending",
                message=f"tills of the account signed in again (with the old password) since the request: {tills}; "
                "ask the owner, then reject, or sign them out (`tillsync ops sign-out-till`) and approve",
            )
    reason = None if approve else command.reason  # type: ignore[union-attr]
    status = "approved" if approve else "rejected"
    await conn.execute(
        "update password_reset_requests set status = $2, decided_by = $3, decided_at = $4, reason = $5 where request_id = $1",
        command.request_id, status, user, now, reason,
    )
    await conn.execute(
        """
        insert into password_reset_audit (request_id, account_id, action, actor, reason, command_id, at)
        values ($1, $2, $3, $4, $5, $6, $7)
        """,
        command.request_id, row["account_id"], status, user, reason, command.command_id, now,
    )
    asked = f"The password reset requested on {row['requested_on']} at {_when(row['requested_at'])}"
    if approve:
        await conn.execute(
            "update accounts set password_hash = $2 where account_id = $1", row["account_id"], row["password_hash"]
        )
        await conn.execute("delete from sign_in_failures where account_name = $1", row["account_name"])
        await _notice(conn, row["account_id"], f"{asked} was approved by {user} at {_when(now)}; the new password is in use.")
    else:
        await _notice(
            conn, row["account_id"], f"{asked} was rejected by {user} at {_when(now)}: {reason}. The old password stays valid."
        )
    log.info("password_reset_decided", request_id=str(command.request_id), status=status, ops_user=user)
    row = await conn.fetchrow(_REQUEST, command.request_id)
    return PasswordResetDecided(request=info(row, policy, now))


def approval_log_context(message: ApprovalMessage) -> dict[str, Any]:
    """Fields bound to each message's log line (never a password hash)."""
    inner = message.message
    context: dict[str, Any] = {"type": inner.type}
    if hasattr(inner, "request_id"):
        context["request_id"] = str(inner.request_id)
    return context


def invalid_message_reply(reason: str) -> ApprovalReply:
    """The answer to a message the worker cannot read (it is dead-lettered with ``reason``)."""
    return ApprovalReply(reply=ApprovalError(code="invalid", message=reason))


def internal_error_reply(exc: Exception) -> ApprovalReply:
    """The answer when a handler failed unexpectedly (details stay in the worker's log)."""
    return ApprovalReply(reply=ApprovalError(code="internal", message="the password-approval worker failed; it was logged"))
