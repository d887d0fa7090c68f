-- 0001 roles_schemas: extensions, group roles, login users, schemas, database-level grants.
--
-- Creates
--   * extension pgcrypto (required); pg_stat_statements and postgis only when the server offers
--     them (pg_available_extensions), never failing when they are absent;
--   * group roles dbx_app_read, dbx_app_write, dbx_ingest (BYPASSRLS: PostgreSQL refuses COPY FROM
--     into an RLS table for roles subject to RLS), dbx_admin (owns every object below);
--   * login users dbx_api_service (in dbx_app_write), dbx_analytics_service (in dbx_app_read),
--     dbx_ingest_service (in dbx_ingest), all WITHOUT a password: `dbx setup` sets passwords later
--     with ALTER ROLE, so no secret is ever part of a migration. Role ATTRIBUTES are never
--     inherited through membership, so dbx_ingest_service carries BYPASSRLS itself as well (the
--     group's attribute documents the intent and covers any other member given the attribute);
--   * schemas dbx_aviation, dbx_analytics, dbx_audit, dbx_archive, owned by dbx_admin;
--   * CONNECT/TEMP/CREATE on the current database, granted by name through current_database()
--     so the migration works in any database (tests run many side by side).
--
-- Roles are cluster-wide and several databases of one cluster may run this migration at the same
-- moment, so every CREATE ROLE / GRANT role is idempotent: it runs in its own DO block that
-- catches duplicate_object (the role already exists) and unique_violation (a concurrent
-- transaction created it between our check and our insert into pg_authid).
--
-- Seed bugs corrected
--   * the seed's tables default to uuid_generate_v4(), which needs uuid-ossp and is never
--     installed; we use core gen_random_uuid() (PostgreSQL 13+) and need no extension for it;
--   * the seed's "Create Application Users" step puts clear-text passwords in SQL; here the
--     users are created without one;
--   * the seed never creates dbx_app_read / dbx_app_write / dbx_admin that it GRANTs.
--   * the seed reads pg_stat_statements unconditionally; here it is optional.
--
-- Runs as a superuser (CREATE ROLE ... BYPASSRLS and untrusted extensions need it).

-- Extensions ------------------------------------------------------------------------------------
CREATE EXTENSION IF NOT EXISTS pgcrypto WITH SCHEMA public;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_stat_statements') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS pg_stat_statements WITH SCHEMA public;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL; -- created concurrently in this database: fine
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'postgis') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS postgis WITH SCHEMA public;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$$;

-- Group roles -------------------------------------------------------------------------------------
-- Attributes are given at creation; a pre-existing role with the wrong attributes is corrected
-- below, but only when it is actually wrong (ALTER ROLE on a row another session is updating
-- would fail with "tuple concurrently updated").
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT * FROM (VALUES
            (1, 'dbx_admin',      'NOLOGIN NOBYPASSRLS'),
            (2, 'dbx_app_read',   'NOLOGIN NOBYPASSRLS'),
            (3, 'dbx_app_write',  'NOLOGIN NOBYPASSRLS'),
            (4, 'dbx_ingest',     'NOLOGIN BYPASSRLS'),
            (5, 'dbx_api_service',       'LOGIN NOBYPASSRLS'),
            (6, 'dbx_analytics_service', 'LOGIN NOBYPASSRLS'),
            (7, 'dbx_ingest_service',    'LOGIN BYPASSRLS')
        ) AS v(ord, rolname, attrs)
        ORDER BY ord  -- a fixed order: concurrent migrations queue on the same role first
    LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I %s', r.rolname, r.attrs);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END LOOP;

    IF NOT (SELECT rolbypassrls FROM pg_roles WHERE rolname = 'dbx_ingest') THEN
        ALTER ROLE dbx_ingest BYPASSRLS;
    END IF;
    IF NOT (SELECT rolbypassrls FROM pg_roles WHERE rolname = 'dbx_ingest_service') THEN
        ALTER ROLE dbx_ingest_service BYPASSRLS;
    END IF;
    -- The read and write roles must stay under RLS, whatever someone did to them before.
    IF (SELECT rolbypassrls FROM pg_roles WHERE rolname = 'dbx_app_read') THEN
        ALTER ROLE dbx_app_read NOBYPASSRLS;
    END IF;
    IF (SELECT rolbypassrls FROM pg_roles WHERE rolname = 'dbx_app_write') THEN
        ALTER ROLE dbx_app_write NOBYPASSRLS;
    END IF;
END
$$;

-- Memberships: write includes read; each login user gets exactly one group.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT * FROM (VALUES
            (1, 'dbx_app_read',  'dbx_app_write'),
            (2, 'dbx_app_write', 'dbx_api_service'),
            (3, 'dbx_app_read',  'dbx_analytics_service'),
            (4, 'dbx_ingest',    'dbx_ingest_service')
        ) AS v(ord, grp, member)
        ORDER BY ord
    LOOP
        IF NOT pg_has_role(r.member, r.grp, 'MEMBER') THEN
            BEGIN
                EXECUTE format('GRANT %I TO %I', r.grp, r.member);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END
$$;

-- Database-level privileges (per database, so no cross-database race) -----------------------------
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO dbx_app_read, dbx_app_write, dbx_ingest, dbx_admin',
                   current_database());
    -- TEMP: the batcher stages COPY data in temporary tables.
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO dbx_ingest', current_database());
    -- CREATE: dbx_admin creates the schemas' objects (later migrations SET LOCAL ROLE dbx_admin).
    EXECUTE format('GRANT CREATE ON DATABASE %I TO dbx_admin', current_database());
END
$$;

-- Functions are not executable by PUBLIC unless a migration grants them explicitly
-- (SECURITY DEFINER functions especially). pg_default_acl is per database.
ALTER DEFAULT PRIVILEGES FOR ROLE dbx_admin REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- Schemas --------------------------------------------------------------------------------------
-- dbx_aviation may already exist: the migration runner creates it to hold schema_migrations.
CREATE SCHEMA IF NOT EXISTS dbx_aviation AUTHORIZATION dbx_admin;
CREATE SCHEMA IF NOT EXISTS dbx_analytics AUTHORIZATION dbx_admin;
CREATE SCHEMA IF NOT EXISTS dbx_audit AUTHORIZATION dbx_admin;
CREATE SCHEMA IF NOT EXISTS dbx_archive AUTHORIZATION dbx_admin;
ALTER SCHEMA dbx_aviation OWNER TO dbx_admin;
ALTER SCHEMA dbx_analytics OWNER TO dbx_admin;
ALTER SCHEMA dbx_audit OWNER TO dbx_admin;
ALTER SCHEMA dbx_archive OWNER TO dbx_admin;

COMMENT ON SCHEMA dbx_aviation IS 'dbx: operational tables (organizations, fleet, sessions, telemetry, analysis results, API requests)';
COMMENT ON SCHEMA dbx_analytics IS 'dbx: analytics functions, reporting views, materialized views';
COMMENT ON SCHEMA dbx_audit IS 'dbx: audit trail (written only by SECURITY DEFINER triggers and functions)';
COMMENT ON SCHEMA dbx_archive IS 'dbx: telemetry partitions detached from the live table, still queryable';

GRANT USAGE ON SCHEMA dbx_aviation TO dbx_app_read, dbx_app_write, dbx_ingest;
GRANT USAGE ON SCHEMA dbx_analytics TO dbx_app_read, dbx_app_write, dbx_ingest;
GRANT USAGE ON SCHEMA dbx_archive TO dbx_app_read, dbx_app_write;
-- dbx_audit: no USAGE for application roles; the audit trail is written by definer functions only.
