"""Password rules and hashing (DESIGN.md §2, shared/passwords.py).

Rules: at least 8 characters, an upper-case and a lower-case letter, a digit, one of
``!§$%&=+*#-.:,;<>``, no whitespace of any kind; an error names every failed rule.
Hashing: argon2id.
"""

from __future__ import annotations

import asyncio

import pytest

from shared.passwords import hash_password, needs_rehash, password_problems, verify_password

pytestmark = pytest.mark.unit

# The special characters exactly as DESIGN.md §2 lists them.
SPECIALS_FROM_DESIGN = "!§$%&=+*#-.:,;<>"

VALID = "Abcdef1!"  # 8 characters: upper, lower, digit, special, no whitespace

# One password per rule that breaks that rule and no other.
BREAKS_ONLY = {
    "length": "Abcd1!x",  # 7 characters
    "upper": "abcdef1!",
    "lower": "ABCDEF1!",
    "digit": "Abcdefg!",
    "special": "Abcdefg1",
    "whitespace": "Abc def1!",
}

# Characters with the Unicode White_Space property (tab, newlines, NBSP, the
# typographic spaces, ideographic space, line/paragraph separators, ...).
UNICODE_WHITESPACE = [
    "\t", "\n", "\x0b", "\x0c", "\r", " ", "\x85", "\xa0", "\u1680",
    *(chr(c) for c in range(0x2000, 0x200B)),
    "\u2028", "\u2029", "\u202f", "\u205f", "\u3000",
]


def only_problem(rule: str) -> str:
    problems = password_problems(BREAKS_ONLY[rule])
    assert len(problems) == 1, (rule, problems)
    return problems[0]


def test_a_valid_password_has_no_problems() -> None:
    assert password_problems(VALID) == []


@pytest.mark.parametrize("rule", sorted(BREAKS_ONLY))
def test_breaking_exactly_one_rule_gives_exactly_one_problem(rule: str) -> None:
    assert len(password_problems(BREAKS_ONLY[rule])) == 1


def test_each_rule_has_its_own_message() -> None:
    messages = {rule: only_problem(rule) for rule in BREAKS_ONLY}
    assert len(set(messages.values())) == len(BREAKS_ONLY), messages


def test_exactly_eight_characters_is_long_enough_and_seven_is_not() -> None:
    assert password_problems("Abcde1!x") == []
    assert password_problems("Abcd1!x") == [only_problem("length")]


def test_length_counts_characters_not_bytes() -> None:
    # 8 characters, but more than 8 bytes in UTF-8: valid.
    assert password_problems("Ääääää1!") == []
    # 7 characters, but more than 8 bytes in UTF-8: too short.
    assert password_problems("Ääääá1!") == [only_problem("length")]


def test_a_password_breaking_several_rules_names_every_one() -> None:
    # "abc": too short, no upper-case letter, no digit, no special character.
    expected = {only_problem(r) for r in ("length", "upper", "digit", "special")}
    problems = password_problems("abc")
    assert len(problems) == len(expected)
    assert set(problems) == expected


def test_a_single_space_breaks_every_rule() -> None:
    problems = password_problems(" ")
    assert set(problems) == {only_problem(r) for r in BREAKS_ONLY}
    assert len(problems) == len(BREAKS_ONLY)


def test_the_empty_password_breaks_every_rule_except_whitespace() -> None:
    expected = {only_problem(r) for r in BREAKS_ONLY if r != "whitespace"}
    problems = password_problems("")
    assert set(problems) == expected
    assert len(problems) == len(expected)


@pytest.mark.parametrize("special", list(SPECIALS_FROM_DESIGN))
def test_every_listed_special_character_counts(special: str) -> None:
    assert password_problems("Abcdefg1" + special) == []


@pytest.mark.parametrize("other", list("?_@/()[]'\"~^|\\€"))
def test_characters_not_in_the_list_are_not_special(other: str) -> None:
    assert password_problems("Abcdefg1" + other) == [only_problem("special")]


@pytest.mark.parametrize("space", UNICODE_WHITESPACE, ids=lambda c: f"U+{ord(c):04X}")
def test_whitespace_of_any_kind_is_refused(space: str) -> None:
    for password in (VALID + space, space + VALID, "Abc" + space + "def1!"):
        assert password_problems(password) == [only_problem("whitespace")], repr(password)


@pytest.mark.asyncio
async def test_hash_is_argon2id() -> None:
    assert (await hash_password(VALID)).startswith("$argon2id$")


@pytest.mark.asyncio
async def test_hash_does_not_contain_the_clear_password() -> None:
    password = "Sehr-Geheim-Passwort-42"
    assert password not in await hash_password(password)


@pytest.mark.asyncio
async def test_the_same_password_hashes_differently_each_time() -> None:
    # A random salt per hash: equal passwords must not give equal hashes.
    assert await hash_password(VALID) != await hash_password(VALID)


@pytest.mark.asyncio
async def test_verify_accepts_the_right_password() -> None:
    stored = await hash_password(VALID)
    assert await verify_password(stored, VALID) is True


@pytest.mark.asyncio
@pytest.mark.parametrize("wrong", ["Abcdef1?", "abcdef1!", VALID + " ", "", VALID[:-1]])
async def test_verify_refuses_a_wrong_password(wrong: str) -> None:
    stored = await hash_password(VALID)
    assert await verify_password(stored, wrong) is False


@pytest.mark.asyncio
@pytest.mark.parametrize("password", [VALID, "", "unknown"])
async def test_verify_against_no_hash_is_false(password: str) -> None:
    assert await verify_password(None, password) is False


@pytest.mark.asyncio
async def test_verify_against_a_malformed_hash_is_false_not_an_error() -> None:
    assert await verify_password("not-a-hash", VALID) is False


@pytest.mark.asyncio
async def test_a_fresh_hash_needs_no_rehash() -> None:
    assert needs_rehash(await hash_password(VALID)) is False


async def test_at_most_two_argon2_computations_run_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each argon2 computation holds 64 MiB: a burst of sign-ins must not hold more than
    ``MAX_CONCURRENT_HASHES`` of them (the account service stays under 300 MB RSS)."""
    import threading
    import time

    from shared import passwords

    running, peak, lock = 0, 0, threading.Lock()

    def slow(*args: object) -> str:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return "hash"

    class CountingHasher:
        hash = staticmethod(slow)
        verify = staticmethod(slow)

    monkeypatch.setattr(passwords, "_hasher", CountingHasher())
    await asyncio.gather(*(passwords.hash_password("Pw-1xxxxx") for _ in range(4)),
                         *(passwords.verify_password(None, "Pw-1xxxxx") for _ in range(4)))
    assert peak == passwords.MAX_CONCURRENT_HASHES == 2
