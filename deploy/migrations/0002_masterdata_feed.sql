-- Shared master data (server-authoritative, one version per entity) and the account's feed.

-- The account's feed position: every accepted master-data change takes the next one.
create table account_feeds (
    account_id    uuid primary key references accounts (account_id),
    last_feed_seq bigint not null check (last_feed_seq >= 0)
);

-- The last feed position per download category; a feed entry names the previous one of
-- its category, so a till that receives only some categories can still see a gap.
create table feed_category_heads (
    account_id    uuid not null references accounts (account_id),
    category      text not null check (category in ('articles', 'customers', 'cashiers', 'masterdata_other')),
    last_feed_seq bigint not null check (last_feed_seq > 0),
    primary key (account_id, category)
);

-- The current version of every entity (tombstones included: a deleted key stays known).
create table masterdata_entities (
    account_id  uuid not null references accounts (account_id),
    entity_kind text not null,
    entity_key  text not null,
    category    text not null,
    version     bigint not null check (version > 0),
    deleted     boolean not null,
    data        jsonb,
    feed_seq    bigint not null check (feed_seq > 0),
    record_id   uuid not null,
    till_id     uuid not null,
    changed_at  timestamptz not null default now(),
    primary key (account_id, entity_kind, entity_key),
    check (deleted = (data is null))
);
-- catch-up: the entities of a category changed after a feed position, in feed order
create index masterdata_entities_catchup on masterdata_entities (account_id, category, feed_seq);

-- Every accepted change, in feed order (the feed itself; gapless per account).
create table masterdata_feed (
    account_id    uuid not null references accounts (account_id),
    feed_seq      bigint not null check (feed_seq > 0),
    prev_feed_seq bigint not null check (prev_feed_seq >= 0 and prev_feed_seq < feed_seq),
    category      text not null,
    entity_kind   text not null,
    entity_key    text not null,
    version       bigint not null check (version > 0),
    deleted       boolean not null,
    data          jsonb,
    record_id     uuid not null unique,
    till_id       uuid not null,
    accepted_at   timestamptz not null default now(),
    primary key (account_id, feed_seq)
);

-- Changes that were not applied because their base was not the current version (or a
-- "new" entity's key existed). The record itself is in the archive.
create table masterdata_conflicts (
    record_id       uuid primary key,
    account_id      uuid not null references accounts (account_id),
    till_id         uuid not null,
    entity_kind     text not null,
    entity_key      text not null,
    base_version    bigint,
    base_record_id  uuid,
    current_version bigint,
    reason          text not null,
    detected_at     timestamptz not null default now()
);
create index masterdata_conflicts_account on masterdata_conflicts (account_id, detected_at);
