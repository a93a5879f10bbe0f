-- Password resets with a service technician's approval (password-approval worker).

-- Every reset request; only the argon2id hash of the new password is kept.
create table password_reset_requests (
    request_id     uuid primary key,
    account_id     uuid not null references accounts (account_id),
    password_hash  text not null check (password_hash like '$argon2id$%'),
    requested_at   timestamptz not null,
    requested_on   text not null,              -- the till the owner asked on
    verification_code text not null,           -- shown on that till; the caller reads it to the technician
    status         text not null default 'pending'
                   check (status in ('pending', 'approved', 'rejected', 'expired', 'superseded')),
    decided_by     text,                       -- the ops user (broker-validated user_id), or 'system'
    decided_at     timestamptz,
    reason         text,
    received_at    timestamptz not null default now(),
    check ((status = 'pending') = (decided_at is null))
);
-- at most one pending request per account: a newer one supersedes it
create unique index password_reset_requests_pending on password_reset_requests (account_id) where status = 'pending';
create index password_reset_requests_status on password_reset_requests (status, requested_at);

-- The audit trail: every request and decision, with who made it. Append-only.
create table password_reset_audit (
    audit_id    bigserial primary key,
    request_id  uuid not null references password_reset_requests (request_id),
    account_id  uuid not null references accounts (account_id),
    action      text not null check (action in ('requested', 'approved', 'rejected', 'expired', 'superseded')),
    actor       text not null,                 -- ops user, 'account-service' or 'system'
    reason      text,
    command_id  uuid unique,                   -- the ops command that made it (idempotency)
    at          timestamptz not null default now()
);
create index password_reset_audit_request on password_reset_audit (request_id, at);

create function password_reset_audit_is_append_only() returns trigger language plpgsql as $$
begin
    raise exception 'password_reset_audit is append-only: % is not allowed', tg_op;
end
$$;
create trigger password_reset_audit_append_only before update or delete on password_reset_audit
    for each statement execute function password_reset_audit_is_append_only();

-- Messages for an account's owner, shown on a till at its next sign-in.
create table account_notices (
    notice_id   bigserial primary key,
    account_id  uuid not null references accounts (account_id),
    created_at  timestamptz not null default now(),
    message     text not null
);
create index account_notices_account on account_notices (account_id, created_at);
