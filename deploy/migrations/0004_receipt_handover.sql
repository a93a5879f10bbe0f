-- Receipt handover: shared open receipts as router-ordered events, and receipt numbers.

-- Events of shared receipts are records too (archived like every record).
alter table archive_records drop constraint archive_records_kind_check;
alter table archive_records add constraint archive_records_kind_check
    check (kind in ('masterdata', 'receipt', 'zreport', 'receipt_event'));

-- One row per shared receipt: its state after the last accepted event.
create table handover_receipts (
    receipt_id      uuid primary key,
    account_id      uuid not null references accounts (account_id),
    status          text not null check (status in ('open', 'closed')),
    position        bigint not null check (position > 0),
    total           bigint not null,              -- cents: sum of the standing lines
    table_nr        text,
    customer_nr     text,
    opened_by       uuid not null,
    opened_at       timestamptz not null,
    closed_by       uuid,
    closed_at       timestamptz,
    paid_record_id  uuid,
    receipt_number  bigint,                       -- BON_NR, from the closing till's receipt record
    updated_at      timestamptz not null default now(),
    check ((status = 'closed') = (closed_by is not null and paid_record_id is not null))
);
-- at most one open receipt per table: the table race is decided here
create unique index handover_receipts_open_table on handover_receipts (account_id, table_nr)
    where status = 'open' and table_nr is not null;
create index handover_receipts_open on handover_receipts (account_id) where status = 'open';

-- Every accepted event at its position (gapless per receipt from 1).
create table handover_events (
    receipt_id  uuid not null references handover_receipts (receipt_id),
    position    bigint not null check (position > 0),
    record_id   uuid not null,
    till_id     uuid not null,
    event_type  text not null,
    event       jsonb not null,
    recorded_at timestamptz not null,
    accepted_at timestamptz not null default now(),
    primary key (receipt_id, position),
    unique (record_id, receipt_id)       -- a split appends one event to each receipt
);
create index handover_events_record on handover_events (record_id);

-- The lines of shared receipts with the till that entered them.
create table handover_lines (
    line_id     uuid primary key,
    receipt_id  uuid not null references handover_receipts (receipt_id),
    till_id     uuid not null,
    amount      bigint not null,             -- cents
    voided      boolean not null default false,
    line        jsonb not null
);
create index handover_lines_receipt on handover_lines (receipt_id) where not voided;

-- Events the router did not apply, with the reason told to the till (the records
-- themselves are in the archive).
create table handover_refusals (
    record_id           uuid primary key,
    account_id          uuid not null references accounts (account_id),
    receipt_id          uuid not null,
    till_id             uuid not null,
    event_type          text not null,
    code                text not null,
    reason              text not null,
    existing_receipt_id uuid,
    seen_position       bigint,              -- of a refused payment
    refused_at          timestamptz not null default now()
);
create index handover_refusals_account on handover_refusals (account_id, refused_at);

-- Receipt numbers (BON_NR) are per till: a closed receipt takes (till, number) once.
create table receipt_numbers (
    till_id        uuid not null,
    receipt_number bigint not null check (receipt_number > 0),
    account_id     uuid not null references accounts (account_id),
    receipt_id     uuid not null,
    record_id      uuid not null,
    primary key (till_id, receipt_number)
);

-- A closed receipt whose (till, number) another receipt already has: kept for the operator.
create table receipt_number_collisions (
    record_id          uuid primary key,
    account_id         uuid not null,
    till_id            uuid not null,
    receipt_number     bigint not null,
    receipt_id         uuid not null,
    other_receipt_id   uuid not null,
    detected_at        timestamptz not null default now()
);

-- A closed receipt of a shared receipt that does not fit it (another till, another total,
-- a second closing): kept for the operator; the record stays in the archive.
create table shared_receipt_mismatches (
    record_id    uuid primary key,
    account_id   uuid not null,
    till_id      uuid not null,
    receipt_id   uuid not null,
    reason       text not null,
    detected_at  timestamptz not null default now()
);
