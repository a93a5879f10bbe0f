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


def chain_hash(prev_hash: str | None, upload_json: dict[str, Any]) -> str:
    """The chain hash (hex) of an upload given as its JSON dict (``Upload.model_dump(mode="json")``
    or the archived payload); the dict's own chain fields are left out of the hash.

    ``prev_hash``: hex chain hash of the till's previous record, None for the start of a chain.
    Raises ``rfc8785.CanonicalizationError`` for values without a canonical form and
    ``ValueError`` for a malformed ``prev_hash``.
    """
    body = {k: v for k, v in upload_json.items() if k not in CHAIN_FIELDS}
    prev = bytes.fromhex(prev_hash) if prev_hash is not None else _GENESIS
    if len(prev) != 32:
        raise ValueError(f"prev_hash must be 32 bytes (64 hex digits), got {len(prev)} bytes")
    return hashlib.sha256(prev + rfc8785.dumps(body)).hexdigest()
