"""Pure parts of the account service handlers (services/account_service/handlers.py)."""

from __future__ import annotations

import json
import uuid

import pytest

from services.account_service.handlers import ThrottlePolicy, normalise_account_name, redact_request, request_log_context
from shared.models import AccountRequest, CreateAccount, CustomSyncFlags, SetSyncMode, SignIn, SignOut, SyncMode

pytestmark = pytest.mark.unit

PASSWORD = "Geheim-Pw-4711!"
SECRET = "till-secret-0815-xyz"


# ---------------------------------------------------------------------------
# account names


@pytest.mark.parametrize(
    "name",
    ["owner@example.com", "Owner@Example.COM", "OWNER@EXAMPLE.COM", "  owner@example.com  ", "Bäckerei.Müller@Example.de"],
)
def test_account_names_are_normalised_to_lower_case(name: str) -> None:
    normalised = normalise_account_name(name)
    assert normalised == name.strip().lower()
    assert normalised == normalised.lower()


def test_names_differing_only_in_case_are_the_same_account() -> None:
    assert normalise_account_name("Shop@Example.com") == normalise_account_name("shop@EXAMPLE.com")


def test_normalising_twice_changes_nothing() -> None:
    once = normalise_account_name(" Kasse@Example.org ")
    assert normalise_account_name(once) == once


@pytest.mark.parametrize(
    "name",
    ["", "   ", "owner", "owner@", "@example.com", "owner@@example.com", "own er@example.com", "owner@exa mple.com", "owner.example.com"],
)
def test_a_name_that_is_not_an_email_address_is_refused(name: str) -> None:
    with pytest.raises(ValueError) as exc:
        normalise_account_name(name)
    assert str(exc.value)  # names the problem


# ---------------------------------------------------------------------------
# throttling of wrong passwords


@pytest.mark.parametrize(
    "policy",
    [ThrottlePolicy(), ThrottlePolicy(free_attempts=5, base_delay_seconds=0.5, max_delay_seconds=60.0), ThrottlePolicy(free_attempts=1)],
)
def test_no_lock_below_the_free_attempts(policy: ThrottlePolicy) -> None:
    for failures in range(policy.free_attempts):
        assert policy.lock_seconds(failures) == 0


@pytest.mark.parametrize(
    "policy",
    [ThrottlePolicy(), ThrottlePolicy(free_attempts=5, base_delay_seconds=0.5, max_delay_seconds=60.0)],
)
def test_the_lock_doubles_with_each_further_failure_up_to_the_cap(policy: ThrottlePolicy) -> None:
    for k in range(0, 40):
        failures = policy.free_attempts + k
        expected = min(policy.base_delay_seconds * 2**k, policy.max_delay_seconds)
        assert policy.lock_seconds(failures) == pytest.approx(expected), failures


def test_the_lock_is_capped_and_never_decreases() -> None:
    policy = ThrottlePolicy(free_attempts=3, base_delay_seconds=1.0, max_delay_seconds=300.0)
    locks = [policy.lock_seconds(n) for n in range(0, 200)]
    assert max(locks) == policy.max_delay_seconds
    assert all(a <= b for a, b in zip(locks, locks[1:]))
    assert locks[-1] == policy.max_delay_seconds


def test_after_the_free_attempts_a_failure_does_lock() -> None:
    policy = ThrottlePolicy()
    assert policy.lock_seconds(policy.free_attempts + 1) > 0


# ---------------------------------------------------------------------------
# redacting requests before they are dead-lettered


def sign_in_body() -> bytes:
    request = AccountRequest(
        request=SignIn(account_name="owner@example.com", password=PASSWORD, serial_number="SN-1", till_name="Kasse 1")
    )
    return request.model_dump_json().encode()


def test_redact_removes_the_password_of_a_sign_in_and_keeps_the_rest() -> None:
    original = json.loads(sign_in_body())
    redacted_bytes = redact_request(sign_in_body())
    assert PASSWORD.encode() not in redacted_bytes
    redacted = json.loads(redacted_bytes)
    assert redacted["schema_version"] == original["schema_version"]
    inner, before = redacted["request"], original["request"]
    assert set(inner) == set(before)
    assert inner["password"] != PASSWORD
    for key in before.keys() - {"password"}:
        assert inner[key] == before[key], key


def test_redact_removes_the_till_secret_and_keeps_the_rest() -> None:
    till_id = uuid.uuid4()
    body = AccountRequest(
        request=SetSyncMode(
            till_id=till_id,
            till_secret=SECRET,
            sync_enabled=True,
            sync_mode=SyncMode.CUSTOM,
            custom=CustomSyncFlags(download_receipts=True),
        )
    ).model_dump_json().encode()
    redacted_bytes = redact_request(body)
    assert SECRET.encode() not in redacted_bytes
    redacted = json.loads(redacted_bytes)
    original = json.loads(body)
    assert redacted["request"]["till_id"] == str(till_id)
    assert redacted["request"]["custom"] == original["request"]["custom"]
    assert redacted["request"]["sync_mode"] == "custom"


def test_redact_removes_secrets_at_any_depth() -> None:
    body = {
        "outer": {
            "list": [
                {"password": "pw-in-a-list-1"},
                [{"deeper": {"till_secret": "secret-deep-2"}}],
                {"keep": "visible-3"},
            ],
            "Password": "pw-capital-4",
            "broker_password": "pw-broker-5",
        },
        "keep": 42,
    }
    out = redact_request(json.dumps(body).encode())
    for value in ("pw-in-a-list-1", "secret-deep-2", "pw-capital-4", "pw-broker-5"):
        assert value.encode() not in out, value
    parsed = json.loads(out)
    assert parsed["keep"] == 42
    assert parsed["outer"]["list"][2] == {"keep": "visible-3"}
    assert set(parsed["outer"]["list"][1][0]["deeper"]) == {"till_secret"}


def test_redact_removes_a_secret_that_is_itself_an_object() -> None:
    out = redact_request(json.dumps({"password": {"value": "nested-pw-6", "note": "x"}}).encode())
    assert b"nested-pw-6" not in out


def test_redact_keeps_a_body_without_secrets() -> None:
    body = {"request": {"command": "sign_out", "till_id": "abc"}, "n": [1, 2, {"x": None}]}
    assert json.loads(redact_request(json.dumps(body).encode())) == body


@pytest.mark.parametrize(
    "body",
    [
        f"password={PASSWORD}".encode(),
        f'{{"password": "{PASSWORD}"'.encode(),  # truncated JSON
        f'"{PASSWORD}"'.encode(),  # JSON, but a bare string
        PASSWORD.encode() + b"\xff\xfe",  # not UTF-8
        b"",
    ],
    ids=["form", "truncated", "json-string", "not-utf8", "empty"],
)
def test_redact_replaces_a_body_that_is_not_a_json_object(body: bytes) -> None:
    out = redact_request(body)
    assert PASSWORD.encode() not in out
    json.loads(out)  # what is kept is still JSON


@pytest.mark.parametrize("depth", [400, 600, 1000, 100_000])
def test_redact_never_raises_even_for_a_deeply_nested_body(depth: int) -> None:
    # a body anyone with the shared sign-up user can send; it must still be dead-lettered
    body = f'{{"password": "{PASSWORD}", "x": '.encode() + b"[" * depth + b"]" * depth + b"}"
    out = redact_request(body)
    assert PASSWORD.encode() not in out
    json.loads(out)


# ---------------------------------------------------------------------------
# log context


@pytest.mark.parametrize(
    "inner",
    [
        CreateAccount(account_name="owner@example.com", password=PASSWORD),
        SignIn(account_name="owner@example.com", password=PASSWORD, serial_number="SN-1", till_name="Kasse 1"),
        SignOut(till_id=uuid.uuid4(), till_secret=PASSWORD),
        SetSyncMode(till_id=uuid.uuid4(), till_secret=PASSWORD, sync_enabled=False, sync_mode=SyncMode.ARCHIVE),
    ],
    ids=lambda m: m.command,
)
def test_log_context_never_contains_the_password_or_secret(inner: object) -> None:
    context = request_log_context(AccountRequest(request=inner))  # type: ignore[arg-type]
    assert PASSWORD not in json.dumps(context, default=str)
    assert PASSWORD not in repr(context)
    assert context["command"] == inner.command  # type: ignore[attr-defined]


def test_log_context_of_a_sign_in_names_account_and_serial_number() -> None:
    request = AccountRequest(
        request=SignIn(account_name="owner@example.com", password=PASSWORD, serial_number="SN-1", till_name="Kasse 1")
    )
    context = request_log_context(request)
    assert context["account_name"] == "owner@example.com"
    assert context["serial_number"] == "SN-1"


def test_log_context_of_a_till_request_names_the_till() -> None:
    till_id = uuid.uuid4()
    context = request_log_context(AccountRequest(request=SignOut(till_id=till_id, till_secret=SECRET)))
    assert context["till_id"] == str(till_id)
    assert SECRET not in json.dumps(context, default=str)
