"""How a till merges its own master-data change with a newer one from the cloud.

The rule (issue "master-data sync", point 2): a change the cloud did not apply because
another till changed the entity first is rebased automatically when the fields the
till changed do not overlap with the fields the cloud's newer version changed
(both compared with the version the till's change was based on). Otherwise the till
keeps the cloud's value and lists the difference for the owner. A deletion on either
side overlaps with everything.
"""

from __future__ import annotations

from typing import Any

from shared.models import ENTITY_ADAPTER


def changed_fields(base: dict[str, Any], new: dict[str, Any]) -> set[str]:
    """The field names whose value differs between ``base`` and ``new`` (added or removed too)."""
    return {k for k in set(base) | set(new) if base.get(k) != new.get(k)}


def rebase(base: dict[str, Any] | None, mine: dict[str, Any] | None, theirs: dict[str, Any] | None) -> dict[str, Any] | None:
    """The till's change re-applied on top of the cloud's, or None if they overlap.

    ``base``: the entity as the till last knew it from the cloud (None if it never
    knew it); ``mine``: the till's version; ``theirs``: the cloud's newer version
    (None: deleted, like ``mine`` None). Returns the merged entity (validated, as a
    JSON dict) when the till's changed fields are disjoint from the cloud's.
    Raises nothing; a merge that is not a valid entity counts as an overlap.
    """
    if base is None or mine is None or theirs is None:
        return None
    mine_changed = changed_fields(base, mine)
    if mine_changed & changed_fields(base, theirs):
        return None
    merged = {**theirs, **{k: mine[k] for k in mine_changed if k in mine}}
    for k in mine_changed - set(mine):
        merged.pop(k, None)
    try:
        return ENTITY_ADAPTER.validate_python(merged).model_dump(mode="json")
    except ValueError:
        return None
