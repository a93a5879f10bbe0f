-- Tamper evidence: each till chains its records (shared/chain.py); the archive writer checks
-- the links on arrival and keeps both hashes, so `tillsync archive verify` can re-check every
-- chain later. Rows archived before the chain existed keep NULL here (reported as unchained).
alter table archive_records
    add column prev_hash  bytea check (length(prev_hash) = 32),
    add column chain_hash bytea check (length(chain_hash) = 32);
