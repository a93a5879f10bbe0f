"""The hash chain of a till's records (tamper evidence, GoBD: records kept unchanged).

Each till chains its own records in ``till_seq`` order:

    chain_hash(n) = SHA-256( prev_hash(n) || RFC 8785 canonical JSON of upload n without
                             its two chain fields )
    prev_hash(n)  = chain_hash(n - 1); for the first record of a chain 32 zero bytes stand in

Changing any archived record, or a record's place in the chain, changes its hash and
breaks the link to the next record. The till agent computes the hashes (``seal``), the
archive writer checks them on arrival and keeps them, ``tillsync archive verify``
re-checks every chain. Hashes travel as 64 lower-case hex digits.
"""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785

CHAIN_FIELDS = frozenset({"prev_hash", "chain_hash"})
_GENESIS = bytes(32)


def canonical_with_and_without_chain(upload_json: dict[str, Any]) -> tuple[bytes, bytes]:
    """``(RFC 8785 canonical JSON of upload_json, the same without its chain fields)``,
    each top-level member made canonical once (the costly part) for both forms.

    Equal byte for byte to ``rfc8785.dumps`` of the two dicts: a canonical object is
    ``{`` + its canonical members, sorted by the UTF-16 code units of their names and
    joined by ``,`` + ``}`` (RFC 8785 §3.2.3). Raises ``rfc8785.CanonicalizationError``
    for values without a canonical form."""
    members = {key: rfc8785.dumps(key) + b":" + rfc8785.dumps(value) for key, value in upload_json.items()}
    names = sorted(members, key=lambda name: name.encode("utf-16-be"))
    whole = b"{" + b",".join(members[name] for name in names) + b"}"
    body = b"{" + b",".join(members[name] for name in names if name not in CHAIN_FIELDS) + b"}"
    return whole, body


def chain_hash_of_canonical(prev_hash: str | None, canonical_body: bytes) -> str:
    """``chain_hash`` from the canonical JSON of the upload without its chain fields
    (``canonical_with_and_without_chain(...)[1]``); ``ValueError`` for a malformed ``prev_hash``."""
    prev = bytes.fromhex(prev_hash) if prev_hash is not None else _GENESIS
    if len(prev) != 32:
        raise ValueError(f"prev_hash must be 32 bytes (64 hex digits), got {len(prev)} bytes")
    return hashlib.sha256(prev + canonical_body).hexdigest()


def chain_hash(prev_hash: str | None, upload_json: dict[str, Any]) -> str:
    """The chain hash (hex) of an upload given as its JSON dict (``Upload.model_dump(mode="json")``
    or the archived payload); the dict's own chain fields are left out of the hash.

    ``prev_hash``: hex chain hash of the till's previous record, None for the start of a chain.
    Raises ``rfc8785.CanonicalizationError`` for values without a canonical form and
    ``ValueError`` for a malformed ``prev_hash``.
    """
    body = {k: v for k, v in upload_json.items() if k not in CHAIN_FIELDS}
    return chain_hash_of_canonical(prev_hash, rfc8785.dumps(body))
