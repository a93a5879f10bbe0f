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
