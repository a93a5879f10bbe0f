"""Till agent rules that hold before any network request."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from shared.models import SignedIn, SyncMode
from till_agent.store import TillStore
from till_agent.till import Till, TillSettings

pytestmark = pytest.mark.unit


async def test_a_till_stays_with_its_account(tmp_path: Path) -> None:
    store = TillStore.create(tmp_path / "k", "SN-1", "Kasse 1")
    till_id = uuid.uuid4()
    store.save_sign_in(
        SignedIn(
            account_id=uuid.uuid4(),
            account_name="baeckerei@example.com",
            till_id=till_id,
            broker_username=f"till-{till_id}",
            broker_password="x",
            vhost="tillsync",
            upload_exchange="till.upload",
            queue=f"till.{till_id}",
            last_till_seq=0,
            sync_enabled=True,
            sync_mode=SyncMode.ARCHIVE,
        )
    )
    store.save_sign_out()
    # nothing listens on port 1: the refusal must come before any request
    till = Till(store, TillSettings(cloud_amqp_url="amqp://u:p@127.0.0.1:1/tillsync"))
    with pytest.raises(RuntimeError, match="belongs to account baeckerei@example.com"):
        await till.sign_in("other-shop@example.com", "Geheim-123!")


def test_deleting_an_entity_queues_a_tombstone_offline(tmp_path: Path) -> None:
    import datetime as dt

    from shared.models import Article

    store = TillStore.create(tmp_path / "k", "SN-1", "Kasse 1")
    till = Till(store, TillSettings(cloud_amqp_url="amqp://u:p@127.0.0.1:1/tillsync"))
    now = dt.datetime.now(dt.UTC)
    till.save_entity(Article(article_nr="7", text="Brezel", unit_price=95, vat_key=2), now)
    tombstone = till.delete_entity("article", "7", now)
    assert tombstone.deleted and tombstone.data is None
    assert store.masterdata("article") == []  # gone locally
    assert [kind for _, _, kind in store.recorded()] == ["masterdata", "masterdata"]
    assert store.outbox_counts() == (2, 0)
