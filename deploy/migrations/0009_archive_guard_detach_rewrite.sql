-- Closing three ways around the archive's protection (migration 0007):
-- 1. No partition of archive_records can be detached, not even an empty one or the default
--    partition: a detached table loses the triggers of archive_records (its rows could be
--    deleted there), and a detach left pending (DETACH ... CONCURRENTLY) hides a month's
--    records and stops archiving. Refused before the command starts; expired months are
--    dropped whole by archive_purge_expired(), which needs no detach.
-- 2. No archive table or partition can be rewritten (ALTER TABLE ... ALTER COLUMN ... TYPE
--    ... USING, and other rewrites): a rewrite changes rows without any row trigger firing.
-- 3. The services may not delete tills or accounts: the archive's tills are known through
--    them (tillsync archive verify / status / export-dsfinvk).

create function archive_guard_detach() returns event_trigger language plpgsql set search_path = public, pg_temp as $$
begin
    if current_query() ~* 'detach\s+partition' and current_query() ~* 'archive' then
        raise exception 'detaching a partition of the archive is refused (its records would leave the archive''s protection); '
                        'months past the retention period are dropped whole by `tillsync archive purge-expired`'
            using errcode = 'insufficient_privilege';
    end if;
end
$$;
create event trigger archive_guard_detach on ddl_command_start when tag in ('ALTER TABLE')
    execute function archive_guard_detach();

create function archive_guard_rewrite() returns event_trigger language plpgsql set search_path = public, pg_temp as $$
declare
    rel text := (select c.relname::text from pg_class c join pg_namespace n on n.oid = c.relnamespace
                 where c.oid = pg_event_trigger_table_rewrite_oid() and n.nspname = 'public');
begin
    if rel is not null and archive_is_archive_table(rel) then
        raise exception 'rewriting the archive table % is refused: its rows are kept unchanged', rel
            using errcode = 'insufficient_privilege';
    end if;
end
$$;
create event trigger archive_guard_rewrite on table_rewrite execute function archive_guard_rewrite();

revoke delete, truncate on tills, accounts from tillsync_service;

-- The services may change only what they change of a till; never its id, account or
-- serial number (the archive's records are found through them).
revoke update on tills from tillsync_service;
grant update (till_name, installation_id, signed_in, broker_user, secret_sha256, sync_enabled, sync_mode, custom_flags,
              signed_in_at, signed_out_at) on tills to tillsync_service;

-- The services' role finds the archive in the schema public only (a schema named like the
-- role, first on the default search path, could shadow it).
alter role tillsync_service set search_path = public;

-- 4. What the archive's checks rely on stays as it is: no row security on archive tables
--    (a policy would hide rows from the services' role and so from verify, status and the
--    export), the default partition attached, no partition left half-detached, and the
--    exactly-once constraints in place. tillsync archive verify, status and export-dsfinvk
--    check the same before they read (archive_integrity_problems()).
create function archive_integrity_problems() returns setof text language sql stable set search_path = public, pg_temp as $$
    select format('row security is on for the archive table %s: policies could hide its rows', c.relname)
    from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where n.nspname = 'public' and archive_is_archive_table(c.relname::text) and (c.relrowsecurity or c.relforcerowsecurity)
    union all
    select format('partition %s of archive_records is being detached: its records are hidden', i.inhrelid::regclass)
    from pg_inherits i where i.inhparent = 'public.archive_records'::regclass and i.inhdetachpending
    union all
    select 'archive_records_default is not the default partition of archive_records'
    where not exists (select 1 from pg_inherits i join pg_class c on c.oid = i.inhrelid
                      where i.inhparent = 'public.archive_records'::regclass and c.relname = 'archive_records_default')
    union all
    select format('the constraint %s of %s is missing: the archive relies on it', want.conname, want.tab)
    from (values ('archive_record_keys', 'archive_record_keys_pkey'),
                 ('archive_record_keys', 'archive_record_keys_till_id_till_seq_key'),
                 ('archive_records', 'archive_records_pkey')) want (tab, conname)
    where not exists (select 1 from pg_constraint k where k.conrelid = ('public.' || want.tab)::regclass
                      and k.conname = want.conname)
$$;
grant execute on function archive_integrity_problems() to tillsync_service;

create function archive_guard_integrity() returns event_trigger language plpgsql set search_path = public, pg_temp as $$
declare
    problem text;
begin
    for problem in select * from archive_integrity_problems() loop
        raise exception 'refused: %', problem using errcode = 'insufficient_privilege';
    end loop;
end
$$;
create event trigger archive_guard_integrity on ddl_command_end
    when tag in ('ALTER TABLE', 'CREATE POLICY', 'ALTER POLICY', 'DROP INDEX', 'ALTER INDEX')
    execute function archive_guard_integrity();
