-- The legal archive, enforced by PostgreSQL (GoBD; §146 (4), §147 AO):
--
-- 1. The services connect as the login role tillsync_service. It may read and write the
--    ordinary tables but only read and insert the archive tables (archive_records and its
--    partitions, archive_record_keys, archive_conflicts, password_reset_audit; it only
--    reads archive_settings); it owns nothing and may not create anything in the schema.
--    Migrations, `tillsync setup` and `tillsync archive purge-expired` connect as the owner
--    (TILLSYNC_DATABASE_ADMIN_URL). An archive table is a table whose name begins with
--    "archive_", or password_reset_audit; a later migration's archive table is insert-only
--    for the services by itself (archive_enforce()).
-- 2. archive_records is partitioned by month, on archived_at: the server's time when the
--    row was written (now(); only the owner may write another, when moving rows, so the
--    services cannot date a record back into an expired month). Why archived_at: rows
--    always arrive in the current month, so only the current and the next month's
--    partitions must exist in advance; archived_at is never earlier than the moment the
--    record arose, so a retention period counted from it is never too short; and a till's
--    clock (recorded_at: wrong, or an upload months late) cannot scatter rows into old or
--    future partitions. The months are calendar months in Europe/Berlin (the law's
--    calendar: the retention period starts at the end of the calendar year), so the month
--    and year of a partition are exact. Partitions are named archive_records_YYYY_MM;
--    archive_records_default takes rows of any month without a partition (a safety net;
--    archive_ensure_partitions() moves them into their month's partition).
-- 3. PostgreSQL cannot enforce a unique key without the partition key, so the exactly-once
--    keys live in archive_record_keys (not partitioned, append-only): record_id primary
--    key, (till_id, till_seq) unique, with the content hash and the archive time. A
--    trigger on archive_records takes the key of every row inserted (or checks that the
--    key taken before in the same transaction is this row's); (record_id, archived_at) is
--    the partitioned table's primary key, so every record is archived at most once.
--    Keys stay after their records are purged: a record once archived is never archived
--    again, and repeats are judged against the keys alone.
-- 4. Retention: archive_settings.retention_years (default 10, at least 10: §147 (3) AO
--    asks 10 years of books and records, and the archive cannot tell which records would
--    need less; longer, e.g. while a tax audit runs, is allowed). A record archived in
--    calendar year Y may be deleted from 1 January Y + retention_years + 1 (§147 (4) AO).
--    Shortening the period is refused while any archived row is still inside it.
--    Nothing inside the period can be deleted: row updates and deletes are refused always
--    (row and statement triggers, on every partition too), truncate is refused on every
--    table and partition, and event triggers refuse dropping, detaching, renaming or
--    moving archive tables and partitions, dropping their columns or triggers and
--    disabling their triggers. Only whole monthly partitions past the period can be
--    dropped: archive_purge_expired() (`tillsync archive purge-expired`).
-- A superuser can still deliberately switch the protection off (drop the event triggers,
-- replace the trigger functions, session_replication_role); that is outside what a
-- database can enforce against its own superuser.

-- The services' role (roles are cluster-wide: it may exist already, or be created by a
-- migration of another database at the same moment).
do $$
begin
    create role tillsync_service login;
exception when duplicate_object or unique_violation then
    null;
end
$$;

-- The calendar of the archive's months and years.
create function archive_time_zone() returns text language sql immutable as $$ select 'Europe/Berlin' $$;

-- The first instant of a calendar month (a date on its first day) in the archive's calendar.
create function archive_month_start(month date) returns timestamptz language sql stable
    set search_path = public, pg_temp as $$
    select date_trunc('month', month::timestamp) at time zone archive_time_zone()
$$;

create function archive_partition_name(month date) returns text language sql immutable as $$
    select 'archive_records_' || to_char(month, 'YYYY_MM')
$$;

-- The month of a partition named archive_records_YYYY_MM; null for any other name.
create function archive_partition_month(name text) returns date language sql immutable as $$
    select case when name ~ '^archive_records_[0-9]{4}_(0[1-9]|1[0-2])$' then to_date(substr(name, 17), 'YYYY_MM') end
$$;

-- Tables of the archive: their rows are kept unchanged for the retention period.
create function archive_is_archive_table(name text) returns boolean language sql immutable as $$
    select name like 'archive\_%' or name = 'password_reset_audit'
$$;

-- The settings of the archive: one row.
create table archive_settings (
    only_row        boolean primary key default true check (only_row),
    retention_years integer not null default 10 check (retention_years between 10 and 100),
    changed_at      timestamptz not null default now()
);
insert into archive_settings default values;

-- The first instant at which the records archived in `month` may be deleted: the period
-- starts at the end of the calendar year and lasts retention_years (§147 (3), (4) AO).
create function archive_deletable_from(month date) returns timestamptz language sql stable
    set search_path = public, pg_temp as $$
    select make_date(extract(year from month)::int + s.retention_years + 1, 1, 1)::timestamp at time zone archive_time_zone()
    from archive_settings s
$$;

create function archive_settings_guard() returns trigger language plpgsql set search_path = public, pg_temp as $$
declare
    protected_since timestamptz;
begin
    if tg_op <> 'UPDATE' then
        raise exception 'archive_settings keeps its one row: % is not allowed', tg_op using errcode = 'insufficient_privilege';
    end if;
    if new.retention_years < old.retention_years then
        protected_since := make_date(extract(year from now() at time zone archive_time_zone())::int - old.retention_years, 1, 1)
                           ::timestamp at time zone archive_time_zone();
        if exists (select 1 from archive_records where archived_at >= protected_since) then
            raise exception 'the retention period cannot be shortened from % to % years: the records archived since % are protected for % years',
                old.retention_years, new.retention_years, to_char(protected_since at time zone archive_time_zone(), 'YYYY-MM-DD'),
                old.retention_years using errcode = 'insufficient_privilege';
        end if;
    end if;
    new.changed_at := now();
    return new;
end
$$;

-- The exactly-once keys of the archive (see 3. above).
create table archive_record_keys (
    record_id      uuid primary key,
    till_id        uuid not null,
    till_seq       bigint not null check (till_seq > 0),
    content_sha256 bytea not null,
    archived_at    timestamptz not null default now(),
    unique (till_id, till_seq)
);

-- The archive, partitioned by month (same columns as before).
alter table archive_records rename to archive_records_unpartitioned;
alter table archive_records_unpartitioned rename constraint archive_records_pkey to archive_records_unpartitioned_pkey;
alter table archive_records_unpartitioned rename constraint archive_records_till_id_till_seq_key to archive_records_unpartitioned_till_key;
alter index archive_records_account_kind rename to archive_records_unpartitioned_account_kind;

create table archive_records (
    record_id      uuid not null,
    account_id     uuid not null,
    till_id        uuid not null,
    till_seq       bigint not null constraint archive_records_till_seq_check check (till_seq > 0),
    kind           text not null constraint archive_records_kind_check
                   check (kind in ('masterdata', 'receipt', 'zreport', 'receipt_event')),
    schema_version integer not null,
    content_sha256 bytea not null,
    payload        jsonb not null,
    recorded_at    timestamptz not null,
    archived_at    timestamptz not null default now(),
    primary key (record_id, archived_at)
) partition by range (archived_at);
create index archive_records_account_kind on archive_records (account_id, kind);
create index archive_records_till on archive_records (till_id, till_seq);
create table archive_records_default partition of archive_records default;

-- Every inserted row takes its key: a record_id or (till_id, till_seq) archived before is a
-- unique violation; a key taken earlier in this transaction must be this row's. Only the
-- owner may archive a row at another time than now (moving rows): the services could
-- otherwise date a record back into a month past the retention period.
create function archive_record_take_key() returns trigger language plpgsql set search_path = public, pg_temp as $$
declare
    k archive_record_keys;
begin
    if new.archived_at is distinct from now()
       and not pg_has_role(current_user, (select relowner from pg_class where oid = tg_relid), 'usage') then
        raise exception 'archived_at of a new archive row is the time of archiving (now())' using errcode = 'insufficient_privilege';
    end if;
    select * into k from archive_record_keys where record_id = new.record_id;
    if not found then
        insert into archive_record_keys (record_id, till_id, till_seq, content_sha256, archived_at)
        values (new.record_id, new.till_id, new.till_seq, new.content_sha256, new.archived_at);
    elsif (k.till_id, k.till_seq, k.content_sha256, k.archived_at)
          is distinct from (new.till_id, new.till_seq, new.content_sha256, new.archived_at) then
        raise exception 'record % is archived already (archive_record_keys)', new.record_id using errcode = 'unique_violation';
    end if;
    return new;
end
$$;

-- Row updates and deletes are refused on every partition, also when aimed at a partition
-- directly. One exception keeps the default partition a safety net: a row that
-- archive_create_partition() copied unchanged into its month's table (not yet attached)
-- may leave the default partition in the same transaction.
create function archive_row_is_append_only() returns trigger language plpgsql set search_path = public, pg_temp as $$
declare
    month_table text;
    copied boolean := false;
begin
    if tg_op = 'DELETE' and tg_table_name = 'archive_records_default' then
        month_table := archive_partition_name((old.archived_at at time zone archive_time_zone())::date);
        if exists (select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace
                   where n.nspname = 'public' and c.relname = month_table and c.relkind = 'r' and not c.relispartition) then
            execute format('select exists (select 1 from public.%I c where c.record_id = $1 and c.archived_at = $2 and to_jsonb(c) = $3)',
                           month_table)
                into copied using old.record_id, old.archived_at, to_jsonb(old);
        end if;
        if copied then
            return old;
        end if;
    end if;
    raise exception '% is append-only: % is not allowed', tg_table_name, tg_op using errcode = 'insufficient_privilege';
end
$$;

create trigger archive_records_key before insert on archive_records
    for each row execute function archive_record_take_key();
create trigger archive_records_row_append_only before update or delete on archive_records
    for each row execute function archive_row_is_append_only();
create trigger archive_records_append_only before update or delete on archive_records
    for each statement execute function archive_is_append_only();
create trigger archive_records_no_truncate before truncate on archive_records
    for each statement execute function archive_is_append_only();

create trigger archive_record_keys_append_only before update or delete on archive_record_keys
    for each statement execute function archive_is_append_only();
create trigger archive_record_keys_no_truncate before truncate on archive_record_keys
    for each statement execute function archive_is_append_only();
create trigger archive_settings_guard before update or delete on archive_settings
    for each row execute function archive_settings_guard();
create trigger archive_settings_no_truncate before truncate on archive_settings
    for each statement execute function archive_is_append_only();
create trigger password_reset_audit_no_truncate before truncate on password_reset_audit
    for each statement execute function password_reset_audit_is_append_only();

-- Whether public.<name> is a partition of archive_records.
create function archive_is_partition(table_name text) returns boolean language sql stable set search_path = public, pg_temp as $$
    select exists (select 1 from pg_inherits i join pg_class c on c.oid = i.inhrelid join pg_namespace n on n.oid = c.relnamespace
                   where i.inhparent = 'public.archive_records'::regclass and n.nspname = 'public' and c.relname = table_name)
$$;

-- Create the partition of one month. Rows of that month already in the default partition
-- are copied into the new month's table, leave the default partition (see
-- archive_row_is_append_only), and the table becomes the month's partition. Inserts wait
-- meanwhile.
create function archive_create_partition(month date) returns void language plpgsql set search_path = public, pg_temp as $$
declare
    name text := archive_partition_name(month);
    low timestamptz := archive_month_start(month);
    high timestamptz := archive_month_start((date_trunc('month', month::timestamp) + interval '1 month')::date);
begin
    lock table archive_records in share row exclusive mode;
    if archive_is_partition(name) then
        return;
    end if;
    if to_regclass(format('public.%I', name)) is null then  -- else: a month's table detached while empty
        if not exists (select 1 from archive_records_default where archived_at >= low and archived_at < high) then
            execute format('create table public.%I partition of public.archive_records for values from (%L) to (%L)', name, low, high);
            return;
        end if;
        execute format('create table public.%I (like public.archive_records including all)', name);
    end if;
    execute format('insert into public.%I select * from public.archive_records_default where archived_at >= $1 and archived_at < $2', name)
        using low, high;
    delete from archive_records_default where archived_at >= low and archived_at < high;
    execute format('alter table public.archive_records attach partition public.%I for values from (%L) to (%L)', name, low, high);
end
$$;

-- The partitions of the current and the next month, and of every month that has rows in
-- the default partition; returns the names of those created now. Idempotent; executable
-- by the services (the archive writer calls it at start and every hour).
create function archive_ensure_partitions() returns setof text language plpgsql security definer
    set search_path = public, pg_temp set lock_timeout = '10s' as $$
declare
    this_month date := date_trunc('month', now() at time zone archive_time_zone())::date;
    month date;
begin
    perform pg_advisory_xact_lock(118577165);  -- one partition maker at a time
    for month in
        select m from (
            select date_trunc('month', archived_at at time zone archive_time_zone())::date as m from archive_records_default
            union select this_month
            union select (this_month + interval '1 month')::date
        ) months
        where not archive_is_partition(archive_partition_name(m))
        order by m
    loop
        perform archive_create_partition(month);
        return next archive_partition_name(month);
    end loop;
end
$$;

-- The partitions of archive_records: month (null for the default partition), from when
-- its records may be deleted, and whether that time has come.
create function archive_partitions()
    returns table (partition_name text, month date, deletable_from timestamptz, expired boolean)
    language sql stable set search_path = public, pg_temp as $$
    select c.relname::text, m.month, archive_deletable_from(m.month), coalesce(archive_deletable_from(m.month) <= now(), false)
    from pg_inherits i
    join pg_class c on c.oid = i.inhrelid
    cross join lateral (select archive_partition_month(c.relname::text) as month) m
    where i.inhparent = 'public.archive_records'::regclass
    order by m.month nulls last
$$;

-- Drop the monthly partitions wholly past the retention period (none with dry_run);
-- returns what was (or would be) dropped with its number of records. Only the owner may
-- run it (`tillsync archive purge-expired`).
create function archive_purge_expired(dry_run boolean default false)
    returns table (partition_name text, month date, deletable_from timestamptz, records bigint)
    language plpgsql security definer set search_path = public, pg_temp set lock_timeout = '10s' as $$
declare
    p record;
begin
    perform pg_advisory_xact_lock(118577165);
    for p in select * from archive_partitions() a where a.expired order by a.month loop
        partition_name := p.partition_name;
        month := p.month;
        deletable_from := p.deletable_from;
        execute format('select count(*) from public.%I', p.partition_name) into records;
        if not dry_run then
            execute format('drop table public.%I', p.partition_name);
        end if;
        return next;
    end loop;
end
$$;

-- What every DDL command must leave intact (run by the event trigger archive_guard_ddl):
-- the archive tables exist; each partition of archive_records is one month named by it
-- (or the default partition) and refuses truncate; no table of a month inside the
-- retention period that holds rows is outside archive_records (detached or renamed); no
-- trigger of an archive table is disabled; tillsync_service may not update, delete,
-- truncate, reference or put triggers on an archive table (such grants are revoked again).
create function archive_enforce() returns void language plpgsql set search_path = public, pg_temp as $$
declare
    t record;
    month date;
    has_rows boolean;
begin
    for t in select required from unnest(array['archive_records', 'archive_record_keys', 'archive_conflicts',
                                               'archive_settings', 'password_reset_audit']) required
    loop
        if to_regclass(format('public.%I', t.required)) is null then
            raise exception 'the archive table public.% cannot be dropped, renamed or moved', t.required
                using errcode = 'insufficient_privilege';
        end if;
    end loop;
    for t in select c.oid, c.relname::text as name, n.nspname::text as schema, pg_get_expr(c.relpartbound, c.oid) as bound
             from pg_inherits i join pg_class c on c.oid = i.inhrelid join pg_namespace n on n.oid = c.relnamespace
             where i.inhparent = 'public.archive_records'::regclass
    loop
        month := archive_partition_month(t.name);
        if t.schema <> 'public' then
            raise exception 'partition %.% of archive_records cannot leave the schema public', t.schema, t.name
                using errcode = 'insufficient_privilege';
        end if;
        if not ((t.name = 'archive_records_default' and t.bound = 'DEFAULT')
                or (month is not null and t.bound = format('FOR VALUES FROM (%L) TO (%L)', archive_month_start(month),
                                                           archive_month_start((month + interval '1 month')::date)))) then
            raise exception 'partition % of archive_records (%) is not archive_records_default nor one calendar month '
                            '(Europe/Berlin) named archive_records_YYYY_MM; create partitions with archive_ensure_partitions()',
                            t.name, t.bound using errcode = 'insufficient_privilege';
        end if;
        if not exists (select 1 from pg_trigger where tgrelid = t.oid and tgname = 'archive_partition_no_truncate') then
            execute format('create trigger archive_partition_no_truncate before truncate on public.%I '
                           'for each statement execute function archive_is_append_only()', t.name);
        end if;
    end loop;
    for t in select c.relname::text as name from pg_class c join pg_namespace n on n.oid = c.relnamespace
             where n.nspname = 'public' and c.relkind in ('r', 'p') and not c.relispartition
               and c.relname like 'archive\_records\_%'
    loop
        month := archive_partition_month(t.name);
        if month is null or archive_deletable_from(month) > now() then
            execute format('select exists (select 1 from public.%I)', t.name) into has_rows;
            if has_rows then
                raise exception '% holds archive records inside the retention period: it must stay a partition of archive_records',
                                t.name using errcode = 'insufficient_privilege';
            end if;
        end if;
    end loop;
    for t in select tr.tgname::text as trigger_name, c.relname::text as name
             from pg_trigger tr join pg_class c on c.oid = tr.tgrelid join pg_namespace n on n.oid = c.relnamespace
             where n.nspname = 'public' and archive_is_archive_table(c.relname::text) and tr.tgenabled in ('D', 'R')
    loop
        raise exception 'trigger % of the archive table % cannot be disabled', t.trigger_name, t.name
            using errcode = 'insufficient_privilege';
    end loop;
    if exists (select 1 from pg_roles where rolname = 'tillsync_service') then
        for t in select c.oid, c.relname::text as name from pg_class c join pg_namespace n on n.oid = c.relnamespace
                 where n.nspname = 'public' and c.relkind in ('r', 'p') and archive_is_archive_table(c.relname::text)
        loop
            if archive_role_may_change('tillsync_service', t.oid) then
                execute format('revoke update, delete, truncate, references, trigger on public.%I from tillsync_service, public', t.name);
                if archive_role_may_change('tillsync_service', t.oid) then
                    raise exception 'tillsync_service may change the archive table % (through another role): revoke it',
                                    t.name using errcode = 'insufficient_privilege';
                end if;
            end if;
        end loop;
    end if;
end
$$;

-- Whether `role` may update, delete, truncate, reference or put triggers on `tab` (also
-- through PUBLIC, a role it belongs to, or a column).
create function archive_role_may_change(role name, tab oid) returns boolean language sql stable as $$
    select has_any_column_privilege(role, tab, 'UPDATE') or has_table_privilege(role, tab, 'DELETE')
        or has_table_privilege(role, tab, 'TRUNCATE') or has_any_column_privilege(role, tab, 'REFERENCES')
        or has_table_privilege(role, tab, 'TRIGGER')
$$;

create function archive_guard_ddl() returns event_trigger language plpgsql set search_path = public, pg_temp as $$
begin
    perform archive_enforce();
end
$$;

-- Dropping an archive table, a partition inside the retention period, the default
-- partition, or a column or trigger of an archive table is refused. Only a monthly
-- partition whose records may be deleted (archive_deletable_from) can be dropped.
create function archive_guard_drop() returns event_trigger language plpgsql set search_path = public, pg_temp as $$
declare
    o record;
    month date;
    dropped_tables text[];
begin
    select coalesce(array_agg(d.object_name), '{}') into dropped_tables
    from pg_event_trigger_dropped_objects() d where d.object_type = 'table' and d.schema_name = 'public';
    for o in select * from pg_event_trigger_dropped_objects() d where d.schema_name = 'public' loop
        if o.object_type = 'table' and archive_is_archive_table(o.object_name) then
            month := archive_partition_month(o.object_name);
            if month is null then
                raise exception 'dropping % is refused: it is part of the archive', o.object_name
                    using errcode = 'insufficient_privilege';
            elsif archive_deletable_from(month) > now() then
                raise exception 'dropping % is refused: its records are inside the retention period until %', o.object_name,
                    to_char((archive_deletable_from(month) at time zone archive_time_zone())::date - 1, 'YYYY-MM-DD') using errcode = 'insufficient_privilege';
            end if;
        elsif o.object_type in ('table column', 'trigger') and archive_is_archive_table(o.address_names[2])
              and not o.address_names[2] = any(dropped_tables) then
            raise exception 'dropping the % % of the archive table % is refused', o.object_type, o.address_names[3], o.address_names[2]
                using errcode = 'insufficient_privilege';
        end if;
    end loop;
end
$$;

-- The months: of the rows archived so far, the current and the next one; then the rows.
select archive_create_partition(m)
from (
    select distinct date_trunc('month', archived_at at time zone archive_time_zone())::date as m from archive_records_unpartitioned
    union select date_trunc('month', now() at time zone archive_time_zone())::date
    union select (date_trunc('month', now() at time zone archive_time_zone()) + interval '1 month')::date
) months
order by m;
insert into archive_records
    (record_id, account_id, till_id, till_seq, kind, schema_version, content_sha256, payload, recorded_at, archived_at)
select record_id, account_id, till_id, till_seq, kind, schema_version, content_sha256, payload, recorded_at, archived_at
from archive_records_unpartitioned order by archived_at, till_id, till_seq;
drop table archive_records_unpartitioned;

-- Grants: the services' role reads and writes the ordinary tables, reads and inserts the
-- archive tables, reads the archive settings, and creates nothing.
revoke create on schema public from public;
grant usage on schema public to tillsync_service;
grant select, insert, update, delete on all tables in schema public to tillsync_service;
grant usage, select on all sequences in schema public to tillsync_service;
revoke all on schema_migrations from tillsync_service;
revoke update, delete, truncate, references, trigger on archive_records, archive_record_keys, archive_conflicts,
    archive_settings, password_reset_audit from tillsync_service, public;
revoke insert on archive_settings from tillsync_service;
-- tables and sequences of later migrations (made by the same owner) are usable by the services;
-- archive_enforce() takes update and delete of new archive tables back
alter default privileges in schema public grant select, insert, update, delete on tables to tillsync_service;
alter default privileges in schema public grant usage, select on sequences to tillsync_service;
revoke execute on function archive_ensure_partitions(), archive_purge_expired(boolean), archive_create_partition(date) from public;
grant execute on function archive_ensure_partitions() to tillsync_service;

select archive_enforce();
create event trigger archive_guard_ddl on ddl_command_end
    when tag in ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE', 'GRANT')
    execute function archive_guard_ddl();
create event trigger archive_guard_drop on sql_drop execute function archive_guard_drop();
