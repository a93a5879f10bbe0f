"""Account password rules and hashing.

Rules (DESIGN.md §2; all must hold, and an error names every rule that failed):
at least 8 characters, an upper-case and a lower-case letter, a digit, one of the
special characters ``!§$%&=+*#-.:,;<>``, no whitespace of any kind.
Hashing: argon2id through argon2-cffi with its RFC 9106 low-memory profile.
"""

from __future__ import annotations

import asyncio
import threading

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

SPECIAL_CHARACTERS = "!§$%&=+*#-.:,;<>"
MIN_LENGTH = 8

_hasher = PasswordHasher()  # argon2id, RFC 9106 low-memory parameters
# Each hash or verification takes memory_cost (64 MiB) for its duration; at most this
# many run at once per process, so a burst of sign-ins keeps a service under 300 MB
# RSS (issue "Evidence": no service above 300 MB). More wait in their worker threads.
MAX_CONCURRENT_HASHES = 2
_hash_slots = threading.BoundedSemaphore(MAX_CONCURRENT_HASHES)
# A hash of a password nobody knows: verified against when the account name is
# unknown, so that an unknown name costs the same time as a wrong password.
_DUMMY_HASH = _hasher.hash("unknown-account-dummy-Pw1!")


MAX_LENGTH = 256  # beyond the rules of DESIGN.md §2: hashing a huge password costs the service, not the caller


def password_problems(password: str) -> list[str]:
    """Return one sentence per password rule that ``password`` breaks (empty if valid)."""
    problems = []
    if len(password) < MIN_LENGTH:
        problems.append(f"must be at least {MIN_LENGTH} characters long")
    if not any(c.isupper() for c in password):
        problems.append("must contain an upper-case letter")
    if not any(c.islower() for c in password):
        problems.append("must contain a lower-case letter")
    if not any(c.isdigit() for c in password):
        problems.append("must contain a digit")
    if not any(c in SPECIAL_CHARACTERS for c in password):
        problems.append(f"must contain one of the special characters {SPECIAL_CHARACTERS}")
    if any(c.isspace() for c in password):
        problems.append("must not contain whitespace")
    if len(password) > MAX_LENGTH:
        problems.append(f"must be at most {MAX_LENGTH} characters long")
    return problems


async def hash_password(password: str) -> str:
    """Return the argon2id hash (PHC string) of ``password``; runs in a worker thread,
    at most ``MAX_CONCURRENT_HASHES`` at once."""

    def _hash() -> str:
        with _hash_slots:
            return _hasher.hash(password)

    return await asyncio.to_thread(_hash)


async def verify_password(password_hash: str | None, password: str) -> bool:
    """True if ``password`` matches ``password_hash``.

    With ``password_hash=None`` (unknown account) a dummy hash is verified so the
    answer takes as long as for a wrong password; the result is then always False.
    At most ``MAX_CONCURRENT_HASHES`` verifications and hashes run at once.
    """

    def _verify() -> bool:
        try:
            with _hash_slots:
                ok = _hasher.verify(_DUMMY_HASH if password_hash is None else password_hash, password)
        except (VerificationError, InvalidHashError):
            return False
        return ok and password_hash is not None

    return await asyncio.to_thread(_verify)


def needs_rehash(password_hash: str) -> bool:
    """True if the hash was made with parameters older than the current ones."""
    return _hasher.check_needs_rehash(password_hash)
