-- The archive is append-only (GoBD: records kept unchanged): no row of archive_records or
-- archive_conflicts can be updated or deleted, nor the tables truncated, whoever connects.
-- (Retention and monthly partitions come with their own migration.)
create function archive_is_append_only() returns trigger language plpgsql as $$
begin
    raise exception '% is append-only: % is not allowed', tg_table_name, tg_op using errcode = 'insufficient_privilege';
end
$$;
create trigger archive_records_append_only before update or delete on archive_records
    for each statement execute function archive_is_append_only();
create trigger archive_records_no_truncate before truncate on archive_records
    for each statement execute function archive_is_append_only();
create trigger archive_conflicts_append_only before update or delete on archive_conflicts
    for each statement execute function archive_is_append_only();
create trigger archive_conflicts_no_truncate before truncate on archive_conflicts
    for each statement execute function archive_is_append_only();
