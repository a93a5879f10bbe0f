-- Which installation (local store) of a till signed in last: another installation with
-- the same serial number may take over a signed-in till only when it says it replaces it.
alter table tills add column installation_id uuid;
