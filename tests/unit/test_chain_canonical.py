"""The archive writer's one-pass canonical forms equal RFC 8785 of the whole upload and of
the upload without its chain fields (content_sha256 and chain_hash unchanged)."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from decimal import Decimal

import pytest
import rfc8785

from services.archive_writer.handlers import content_sha256
from shared.chain import CHAIN_FIELDS, canonical_with_and_without_chain, chain_hash, chain_hash_of_canonical
from shared.fiscal import PaymentType, VatKey
from shared.models import Cashier, Upload
from till_agent.booking import SaleLine, closed_receipt

pytestmark = pytest.mark.unit

PAYLOADS = [
    {"b": 1, "a": [1, 2.5, None, True], "prev_hash": "00" * 32, "chain_hash": "11" * 32},
    # names ordered by UTF-16 code units, not code points: U+1F600 (surrogates D83D DE00) before U+FB01
    {"\ufb01": "ligature", "\U0001f600": "smiley", "é": {"z": "ä", "a": "€"}, "chain_hash": "ab" * 32},
    {"text": "Brötchen \u2028 \"quoted\" \\ tab\t", "n": -0.0, "big": 1e21, "small": 1e-7},
    {},
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_one_pass_forms_equal_rfc8785_of_both_dicts(payload: dict) -> None:  # type: ignore[type-arg]
    whole, body = canonical_with_and_without_chain(payload)
    assert whole == rfc8785.dumps(payload)
    assert body == rfc8785.dumps({k: v for k, v in payload.items() if k not in CHAIN_FIELDS})


def test_a_real_uploads_hashes_are_unchanged() -> None:
    now = dt.datetime(2021, 1, 2, 8, 30, tzinfo=dt.UTC)
    receipt = closed_receipt(
        receipt_number=7,
        lines=[SaleLine("A1", "Croissant au beurre", Decimal("3"), 110, VatKey.REDUCED)],
        payment_type=PaymentType.CASH, payment_name="Bar", cashier=Cashier(cashier_id="1", name="Zoë"),
        opened_at=now, closed_at=now, business_day=now.date(),
    )
    upload = Upload.sealed("ab" * 32, record_id=uuid.uuid4(), account_id=uuid.uuid4(), till_id=uuid.uuid4(),
                           till_seq=8, recorded_at=now, record=receipt)
    payload = upload.model_dump(mode="json")
    whole, body = canonical_with_and_without_chain(payload)
    assert hashlib.sha256(whole).digest() == content_sha256(upload)
    assert chain_hash_of_canonical(upload.prev_hash, body) == chain_hash(upload.prev_hash, payload) == upload.chain_hash


def test_a_malformed_prev_hash_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        chain_hash_of_canonical("abcd", b"{}")
