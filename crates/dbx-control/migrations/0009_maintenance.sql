-- 0009 maintenance: the control plane's own login user.
--
-- Creates
--   * login user dbx_maintenance_service, member of dbx_admin, WITHOUT a password (`dbx setup`
--     sets one and writes dbx_maintenance_service_url to credentials.txt). It is the user of
--     `[database] admin_url`: the control plane connects as it and `SET ROLE dbx_admin`, so the
--     partitions it creates, detaches, archives and drops are owned by dbx_admin like every other
--     object, and the retention deletes run as the tables' owner (RLS is not FORCEd, so the owner
--     sees every organization's rows). The ingest user cannot do that: it only has the SECURITY
--     DEFINER premake function. NOBYPASSRLS and no other attribute: it needs none.
--
-- Roles are cluster-wide and several databases may run this migration at the same moment, so,
-- as in 0001, CREATE ROLE and GRANT each run in their own block that tolerates duplicate_object
-- and unique_violation (a concurrent transaction did it between our check and our insert), and an
-- attribute is corrected only when it is actually wrong ("tuple concurrently updated" otherwise).
--
-- Runs as a superuser (CREATE ROLE).

DO $$
BEGIN
    BEGIN
        CREATE ROLE dbx_maintenance_service LOGIN NOBYPASSRLS;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN
        NULL;
    END;
    IF NOT (SELECT rolcanlogin FROM pg_roles WHERE rolname = 'dbx_maintenance_service') THEN
        ALTER ROLE dbx_maintenance_service LOGIN;
    END IF;
    IF (SELECT rolbypassrls FROM pg_roles WHERE rolname = 'dbx_maintenance_service') THEN
        ALTER ROLE dbx_maintenance_service NOBYPASSRLS;
    END IF;
    IF NOT pg_has_role('dbx_maintenance_service', 'dbx_admin', 'MEMBER') THEN
        BEGIN
            GRANT dbx_admin TO dbx_maintenance_service;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$$;

-- No COMMENT ON ROLE: role comments are cluster-wide (pg_shdescription), and two databases
-- migrating at once would collide on the same row.
