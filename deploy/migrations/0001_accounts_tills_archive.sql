-- Server accounts, tills and the append-only archive (tillsync foundation).

create table accounts (
    account_id    uuid primary key,
    account_name  text not null unique check (account_name = lower(account_name)),
    password_hash text not null check (password_hash like '$argon2id$%'),
    created_at    timestamptz not null default now()
);

-- Consecutive failed sign-ins per (normalised) account name, known or not.
create table sign_in_failures (
    account_name    text primary key,
    failures        integer not null check (failures > 0),
    last_failure_at timestamptz not null,
    locked_until    timestamptz
);

create table tills (
    till_id        uuid primary key,
    account_id     uuid not null references accounts (account_id),
    serial_number  text not null,
    till_name      text not null,
    signed_in      boolean not null default false,
    broker_user    text,
    secret_sha256  bytea,
    sync_enabled   boolean not null default true,
    sync_mode      text not null default 'archive'
                   check (sync_mode in ('archive', 'archive_masterdata', 'archive_masterdata_receipts', 'custom')),
    custom_flags   jsonb,
    created_at     timestamptz not null default now(),
    signed_in_at   timestamptz,
    signed_out_at  timestamptz,
    unique (account_id, serial_number),
    check ((sync_mode = 'custom') = (custom_flags is not null)),
    check (not signed_in or (broker_user is not null and secret_sha256 is not null))
);

-- Every record a till uploaded, exactly once, never changed.
create table archive_records (
    record_id      uuid primary key,
    account_id     uuid not null,
    till_id        uuid not null,
    till_seq       bigint not null check (till_seq > 0),
    kind           text not null check (kind in ('masterdata', 'receipt', 'zreport')),
    schema_version integer not null,
    content_sha256 bytea not null,
    payload        jsonb not null,
    recorded_at    timestamptz not null,
    archived_at    timestamptz not null default now(),
    unique (till_id, till_seq)
);
create index archive_records_account_kind on archive_records (account_id, kind);

-- Uploads refused because their record_id or (till_id, till_seq) was already archived
-- with different content. Kept for the operator; the archive row is never changed.
create table archive_conflicts (
    conflict_id    bigserial primary key,
    record_id      uuid not null,
    account_id     uuid not null,
    till_id        uuid not null,
    till_seq       bigint not null,
    content_sha256 bytea not null,
    payload        jsonb not null,
    reason         text not null,
    received_at    timestamptz not null default now(),
    unique (record_id, till_seq, content_sha256)
);
