"""Account service handlers: create account, sign a till in or out, store its sync mode,
take a password-reset request.

Each handler takes a validated request, the transaction's connection and the
service's dependencies, and returns the reply model. Refusals (bad name, weak
password, wrong credentials) are replies, not exceptions: the caller is told why.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import json
import secrets
import uuid
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

import asyncpg
import structlog
from email_validator import EmailNotValidError, validate_email

from shared.consumer import Delivery
from shared.models import (
    AccountCreated,
    AccountReply,
    AccountRequest,
    CreateAccount,
    AccountNotice,
    ErrorCode,
    ErrorReply,
    PasswordResetRequest,
    PasswordResetRequested,
    PasswordResetStatusQuery,
    PasswordResetStatusReply,
    RequestPasswordReset,
    SetSyncMode,
    SignedIn,
    SignedOut,
    SignIn,
    SignOut,
    SyncModeSet,
    TillAuth,
)
from shared.passwords import hash_password, needs_rehash, password_problems, verify_password
from shared.topology import (
    UPLOAD_EXCHANGE,
    download_binding_keys,
    stored_mode,
    till_broker_user,
    till_queue_name,
)

log = structlog.get_logger()

WRONG_CREDENTIALS_MESSAGE = "account name or password is wrong"
MAX_RESET_REQUESTS_PER_HOUR = 5  # per account: a newer request supersedes the older, so a flood would hide the owner's


class ApprovalQueue(Protocol):
    """Where reset requests go (real: published to ``password.approval`` for the
    password-approval worker, confirmed by the broker; raises if it cannot be delivered)."""

    async def submit(self, request: PasswordResetRequest) -> None: ...


class TillBroker(Protocol):
    """What the handlers need of RabbitMQ for a till (real: ``services.account_service.broker``)."""

    async def create_till_user(self, account_id: UUID, till_id: UUID, secret: str) -> None: ...

    async def delete_till_user(self, till_id: UUID) -> int: ...

    async def bind_till_queue(self, account_id: UUID, till_id: UUID, keys: tuple[str, ...]) -> None: ...


@dataclass(frozen=True)
class ThrottlePolicy:
    """Slows down repeated wrong passwords for one account name.

    From the ``free_attempts``-th consecutive failure on, each failure locks the name
    for ``base_delay_seconds * 2**(failures - free_attempts)`` seconds, at most
    ``max_delay_seconds`` (defaults: the 3rd wrong password locks for 1 s, the 4th for
    2 s, ...). A success clears the count.
    """

    free_attempts: int = 3
    base_delay_seconds: float = 1.0
    max_delay_seconds: float = 300.0

    def lock_seconds(self, failures: int) -> float:
        if failures < self.free_attempts:
            return 0.0
        return min(self.base_delay_seconds * 2 ** (failures - self.free_attempts), self.max_delay_seconds)


@dataclass(frozen=True)
class AccountDeps:
    """Dependencies of the account handlers, built once in ``main()``."""

    broker: TillBroker
    vhost: str
    throttle: ThrottlePolicy
    approvals: ApprovalQueue | None = None


def normalise_account_name(account_name: str) -> str:
    """Return the account name in normalised lower-case email form.

    Raises ``ValueError`` naming the problem if it is not an email address by syntax
    (email-validator; no deliverability check).
    """
    try:
        valid = validate_email(account_name.strip(), check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from exc
    return valid.normalized.lower()


def _secret_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


async def create_account(cmd: CreateAccount, conn: asyncpg.Connection, deps: AccountDeps) -> AccountReply:
    """Create an account; refuses a non-email name, a taken name or a weak password."""
    try:
        name = normalise_account_name(cmd.account_name)
    except ValueError as exc:
        return _error(ErrorCode.INVALID_ACCOUNT_NAME, f"account name is not an email address: {exc}")
    problems = password_problems(cmd.password.get_secret_value())
    if problems:
        return _error(ErrorCode.WEAK_PASSWORD, "the password breaks these rules: " + "; ".join(problems), details=problems)
    password_hash = await hash_password(cmd.password.get_secret_value())
    account_id = uuid.uuid4()
    inserted = await conn.fetchval(
        """
        insert into accounts (account_id, account_name, password_hash) values ($1, $2, $3)
        on conflict (account_name) do nothing returning account_id
        """,
        account_id,
        name,
        password_hash,
    )
    if inserted is None:
        return _error(ErrorCode.ACCOUNT_EXISTS, f"an account named {name} already exists")
    log.info("account_created", account_id=str(account_id), account_name=name)
    return AccountReply(reply=AccountCreated(account_id=account_id, account_name=name))


async def sign_in(cmd: SignIn, conn: asyncpg.Connection, deps: AccountDeps) -> AccountReply:
    """Sign a till in: check the password, create its broker user, bind its queue.

    An unknown account name gets exactly the wrong-password answer. The same serial
    number gets the same ``till_id`` again, with the archive's last ``till_seq``; while
    another installation (local store) of that serial is signed in, only with
    ``replace`` (two live stores under one ``till_id`` would reuse ``till_seq``).
    """
    try:
        name = normalise_account_name(cmd.account_name)
    except ValueError:
        name = cmd.account_name.strip().lower()  # counted like any other wrong name
    now = dt.datetime.now(dt.UTC)
    locked_until = await conn.fetchval(
        "select locked_until from sign_in_failures where account_name = $1 for update", name
    )
    if locked_until is not None and locked_until > now:
        retry = round((locked_until - now).total_seconds(), 1)
        return _error(
            ErrorCode.TOO_MANY_ATTEMPTS,
            f"too many wrong passwords for this account name; try again in {max(math.ceil(retry), 1)} s",
            retry_after_seconds=retry,
        )
    account = await conn.fetchrow("select account_id, account_name, password_hash from accounts where account_name = $1", name)
    ok = await verify_password(account["password_hash"] if account else None, cmd.password.get_secret_value())
    if not ok or account is None:
        failures = await conn.fetchval(
            """
            insert into sign_in_failures as f (account_name, failures, last_failure_at) values ($1, 1, $2)
            on conflict (account_name) do update set failures = f.failures + 1, last_failure_at = $2
            returning failures
            """,
            name,
            now,
        )
        lock = deps.throttle.lock_seconds(failures)
        if lock:
            await conn.execute(
                "update sign_in_failures set locked_until = $2 where account_name = $1",
                name,
                now + dt.timedelta(seconds=lock),
            )
        log.info("sign_in_refused", failures=failures, locked_seconds=lock)
        return _error(ErrorCode.WRONG_CREDENTIALS, WRONG_CREDENTIALS_MESSAGE, retry_after_seconds=lock or None)
    await conn.execute("delete from sign_in_failures where account_name = $1", name)
    account_id: UUID = account["account_id"]
    if needs_rehash(account["password_hash"]):
        await conn.execute(
            "update accounts set password_hash = $2 where account_id = $1",
            account_id,
            await hash_password(cmd.password.get_secret_value()),
        )
    existing = await conn.fetchrow(
        "select till_name, signed_in, signed_in_at, signed_out_at, installation_id from tills "
        "where account_id = $1 and serial_number = $2 for update",
        account_id,
        cmd.serial_number,
    )
    if (
        existing is not None
        and existing["signed_in"]
        and not cmd.replace
        and existing["installation_id"] is not None
        and existing["installation_id"] != cmd.installation_id
    ):
        since = existing["signed_in_at"].strftime("%Y-%m-%d %H:%M UTC") if existing["signed_in_at"] else "earlier"
        return _error(
            ErrorCode.TILL_IN_USE,
            f"another installation of till {cmd.serial_number} ({existing['till_name']}) is signed in to this account "
            f"since {since}; sign it out first, or sign in with --replace if this installation replaces it "
            "(the other one then loses its access and must not record anything more)",
        )
    till = await conn.fetchrow(
        """
        insert into tills (till_id, account_id, serial_number, till_name, installation_id) values ($1, $2, $3, $4, $5)
        on conflict (account_id, serial_number) do update set till_name = excluded.till_name,
            installation_id = excluded.installation_id
        returning till_id, sync_enabled, sync_mode, custom_flags
        """,
        uuid.uuid4(),
        account_id,
        cmd.serial_number,
        cmd.till_name,
        cmd.installation_id,
    )
    till_id: UUID = till["till_id"]
    secret = secrets.token_urlsafe(32)
    mode, custom = stored_mode(till["sync_mode"], till["custom_flags"])
    await deps.broker.create_till_user(account_id, till_id, secret)
    await deps.broker.bind_till_queue(
        account_id, till_id, download_binding_keys(account_id, till_id, till["sync_enabled"], mode, custom)
    )
    await conn.execute(
        """
        update tills set signed_in = true, broker_user = $2, secret_sha256 = $3, signed_in_at = now()
        where till_id = $1
        """,
        till_id,
        till_broker_user(till_id),
        _secret_digest(secret),
    )
    last = await conn.fetchrow(
        """
        select coalesce(max(till_seq), 0) as till_seq,
               coalesce(max((payload->'record'->>'receipt_number')::bigint) filter (where kind = 'receipt'), 0)
                   as receipt_number,
               coalesce(max((payload->'record'->>'z_nr')::bigint) filter (where kind = 'zreport'), 0) as z_nr
        from archive_records where till_id = $1
        """,
        till_id,
    )
    last_hash = await conn.fetchval(
        "select chain_hash from archive_records where till_id = $1 and till_seq = $2", till_id, last["till_seq"]
    )
    # news since this till last signed in (a new till: of the last 14 days)
    since = existing["signed_in_at"] if existing is not None and existing["signed_in_at"] else now - dt.timedelta(days=14)
    notices = tuple(
        AccountNotice(at=r["created_at"], message=r["message"])
        for r in await conn.fetch(
            "select created_at, message from account_notices where account_id = $1 and created_at > $2 "
            "order by created_at limit 20",
            account_id, since,
        )
    )
    log.info("till_signed_in", account_id=str(account_id), till_id=str(till_id), serial_number=cmd.serial_number)
    return AccountReply(
        reply=SignedIn(
            account_id=account_id,
            account_name=account["account_name"],
            till_id=till_id,
            broker_username=till_broker_user(till_id),
            broker_password=secret,
            vhost=deps.vhost,
            upload_exchange=UPLOAD_EXCHANGE,
            queue=till_queue_name(till_id),
            last_till_seq=last["till_seq"],
            last_receipt_number=last["receipt_number"],
            last_z_nr=last["z_nr"],
            last_chain_hash=bytes(last_hash).hex() if last_hash is not None else None,
            sync_enabled=till["sync_enabled"],
            sync_mode=mode,
            custom=custom,
            notices=notices,
        )
    )


async def _authenticate_till(auth: TillAuth, conn: asyncpg.Connection) -> asyncpg.Record | None:
    till = await conn.fetchrow(
        "select till_id, account_id, secret_sha256 from tills where till_id = $1 and signed_in for update", auth.till_id
    )
    if till is None or not hmac.compare_digest(bytes(till["secret_sha256"]), _secret_digest(auth.till_secret.get_secret_value())):
        return None
    return till


_UNKNOWN_TILL = "this till is not signed in, or its credentials are not valid any more"


async def sign_out(cmd: SignOut, conn: asyncpg.Connection, deps: AccountDeps) -> AccountReply:
    """Sign a till out: delete its broker user, close its connections; its archive stays."""
    till = await _authenticate_till(cmd, conn)
    if till is None:
        return _error(ErrorCode.UNKNOWN_TILL, _UNKNOWN_TILL)
    closed = await deps.broker.delete_till_user(cmd.till_id)
    await conn.execute(
        "update tills set signed_in = false, secret_sha256 = null, signed_out_at = now() where till_id = $1", cmd.till_id
    )
    log.info("till_signed_out", account_id=str(till["account_id"]), till_id=str(cmd.till_id), connections_closed=closed)
    return AccountReply(reply=SignedOut(till_id=cmd.till_id, connections_closed=closed))


async def set_sync_mode(cmd: SetSyncMode, conn: asyncpg.Connection, deps: AccountDeps) -> AccountReply:
    """Store a till's sync switch and mode and rebind its queue at once."""
    till = await _authenticate_till(cmd, conn)
    if till is None:
        return _error(ErrorCode.UNKNOWN_TILL, _UNKNOWN_TILL)
    custom_json: Any = cmd.custom.model_dump(mode="json") if cmd.custom else None
    await conn.execute(
        "update tills set sync_enabled = $2, sync_mode = $3, custom_flags = $4 where till_id = $1",
        cmd.till_id,
        cmd.sync_enabled,
        cmd.sync_mode.value,
        custom_json,
    )
    keys = download_binding_keys(till["account_id"], cmd.till_id, cmd.sync_enabled, cmd.sync_mode, cmd.custom)
    await deps.broker.bind_till_queue(till["account_id"], cmd.till_id, keys)
    log.info("sync_mode_set", till_id=str(cmd.till_id), sync_mode=cmd.sync_mode.value, sync_enabled=cmd.sync_enabled)
    return AccountReply(
        reply=SyncModeSet(
            till_id=cmd.till_id,
            sync_enabled=cmd.sync_enabled,
            sync_mode=cmd.sync_mode,
            custom=cmd.custom,
            routing_keys=keys,
        )
    )


async def request_password_reset(cmd: RequestPasswordReset, conn: asyncpg.Connection, deps: AccountDeps) -> AccountReply:
    """Take a "forgot password" request for the password-approval worker.

    Refused, with the reason: an unknown account; a till of the account still signed in
    (each is named: the seed's flow signs out all tills first); a new password that
    breaks the rules. Otherwise the new password is hashed at once (argon2id) and only
    the hash goes on, to ``password.approval``; the old password stays valid until a
    service technician approves. The worker records the request and supersedes an
    older pending one.
    """
    try:
        name = normalise_account_name(cmd.account_name)
    except ValueError as exc:
        return _error(ErrorCode.INVALID_ACCOUNT_NAME, f"account name is not an email address: {exc}")
    account = await conn.fetchrow("select account_id, account_name from accounts where account_name = $1", name)
    if account is None:
        return _error(ErrorCode.UNKNOWN_ACCOUNT, f"there is no account named {name}")
    signed_in = await conn.fetch(
        "select till_name, serial_number from tills where account_id = $1 and signed_in order by till_name, serial_number",
        account["account_id"],
    )
    if signed_in:
        tills = [f"{r['till_name']} ({r['serial_number']})" for r in signed_in]
        return _error(
            ErrorCode.TILLS_SIGNED_IN,
            f"sign out every till of the account first; still signed in: {', '.join(tills)}",
            details=tills,
        )
    own = await conn.fetchval(
        "select 1 from tills where account_id = $1 and serial_number = $2 and installation_id = $3",
        account["account_id"], cmd.serial_number, cmd.installation_id,
    )
    if own is None:
        return _error(
            ErrorCode.UNKNOWN_TILL,
            "a password reset is asked on a till of the account: this till (its serial number and local store) has "
            "never been signed in to it",
        )
    problems = password_problems(cmd.new_password.get_secret_value())
    if problems:
        return _error(ErrorCode.WEAK_PASSWORD, "the new password breaks these rules: " + "; ".join(problems), details=problems)
    if deps.approvals is None:
        return _error(ErrorCode.INTERNAL, "password resets are not set up on this account service")
    recent = await conn.fetchval(
        "select count(*) from password_reset_requests where account_id = $1 and received_at > now() - interval '1 hour'",
        account["account_id"],
    )
    if recent >= MAX_RESET_REQUESTS_PER_HOUR:
        return _error(
            ErrorCode.TOO_MANY_REQUESTS,
            f"{recent} password resets were requested for this account in the last hour; try again later "
            "or call the service technician about the one already made",
        )
    request = PasswordResetRequest(
        request_id=uuid.uuid4(),
        account_id=account["account_id"],
        account_name=account["account_name"],
        password_hash=await hash_password(cmd.new_password.get_secret_value()),
        requested_at=dt.datetime.now(dt.UTC),
        requested_on=f"{cmd.till_name} ({cmd.serial_number})",
        verification_code=verification_code(),
    )
    await deps.approvals.submit(request)
    log.info("password_reset_requested", account_id=str(request.account_id), request_id=str(request.request_id))
    return AccountReply(
        reply=PasswordResetRequested(
            request_id=request.request_id, requested_at=request.requested_at, verification_code=request.verification_code
        )
    )


async def password_reset_status(cmd: PasswordResetStatusQuery, conn: asyncpg.Connection, deps: AccountDeps) -> AccountReply:
    """The status of a reset request, for whoever knows its id and verification code (the
    till that asked); anything else gets the same "unknown" answer."""
    row = await conn.fetchrow("select * from password_reset_requests where request_id = $1", cmd.request_id)
    given = cmd.verification_code.strip().upper().replace("-", "")
    if row is None or not hmac.compare_digest(row["verification_code"].replace("-", ""), given):
        return _error(
            ErrorCode.UNKNOWN_REQUEST,
            f"no password reset request {cmd.request_id} with this verification code (a request made moments ago "
            "may not be recorded yet)",
        )
    return AccountReply(
        reply=PasswordResetStatusReply(
            request_id=row["request_id"], status=row["status"], requested_at=row["requested_at"],
            decided_by=row["decided_by"], decided_at=row["decided_at"], reason=row["reason"],
        )
    )


_CODE_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # no 0/O, 1/I: read out on the phone


def verification_code() -> str:
    """``XXXX-XXXX`` from 32 unambiguous characters (40 bits), made with ``secrets``."""
    code = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(8))
    return f"{code[:4]}-{code[4:]}"


_HANDLERS = {
    "create_account": create_account,
    "sign_in": sign_in,
    "sign_out": sign_out,
    "set_sync_mode": set_sync_mode,
    "request_password_reset": request_password_reset,
    "password_reset_status": password_reset_status,
}


async def handle_account_requests(
    deliveries: list[Delivery[AccountRequest]], conn: asyncpg.Connection, deps: AccountDeps
) -> None:
    """Consume-adapter handler: answer each request (batch size is 1 for this queue)."""
    for delivery in deliveries:
        request = delivery.body.request
        reply = await _HANDLERS[request.command](request, conn, deps)  # type: ignore[operator]
        delivery.reply = reply
        delivery.outcome = reply.reply.reply if not isinstance(reply.reply, ErrorReply) else reply.reply.code.value


def _error(
    code: ErrorCode, message: str, details: list[str] | tuple[str, ...] = (), retry_after_seconds: float | None = None
) -> AccountReply:
    return AccountReply(
        reply=ErrorReply(code=code, message=message, details=tuple(details), retry_after_seconds=retry_after_seconds)
    )


def invalid_request_reply(reason: str) -> AccountReply:
    """The reply to a request the service cannot read (not JSON, wrong shape, too long):
    ``invalid_request`` with ``reason`` (it names fields and limits, never a value). The
    request is dead-lettered, redacted."""
    return _error(ErrorCode.INVALID_REQUEST, "the account service could not read the request", details=(reason,))


def internal_error_reply(exc: Exception) -> AccountReply:
    """The reply when a handler failed unexpectedly (details stay in the service log)."""
    return _error(ErrorCode.INTERNAL, "the account service failed on this request; it was logged, please try again")


_SECRET_KEYS = ("password", "secret")


def redact_request(body: bytes) -> bytes:
    """A request body fit to be dead-lettered: every secret-looking field replaced.

    A body that is not a JSON object is replaced by a note, since it may carry a clear
    password that cannot be located.
    """
    not_kept = b'{"redacted": "the body was not JSON and may have held a password, so it was not kept"}'
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return not_kept

    def scrub(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: ("[redacted]" if any(s in str(k).lower() for s in _SECRET_KEYS) else scrub(v)) for k, v in value.items()
            }
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    if not isinstance(data, (dict, list)):
        return b'{"redacted": "the body was not a JSON object and may have held a password, so it was not kept"}'
    try:
        return json.dumps(scrub(data)).encode()
    except RecursionError:
        return not_kept


def request_log_context(request: AccountRequest) -> dict[str, Any]:
    """Fields bound to each request's log line (never the password)."""
    inner = request.request
    context: dict[str, Any] = {"command": inner.command}
    if isinstance(inner, (CreateAccount, SignIn, RequestPasswordReset)):
        context["account_name"] = inner.account_name
    if isinstance(inner, (SignIn, RequestPasswordReset)):
        context["serial_number"] = inner.serial_number
    if isinstance(inner, TillAuth):
        context["till_id"] = str(inner.till_id)
    return context
