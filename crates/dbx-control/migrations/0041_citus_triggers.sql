-- 0041 citus_triggers: the trigger functions behave on a Citus cluster (`dbx setup --distributed`)
-- exactly as before on a single node.
--
-- On Citus a row of a reference table (organizations, aircraft_registry, api_keys) is written to
-- a placement on every node, and a row of a distributed table (flight_sessions) to a shard on a
-- worker; row triggers fire there, not on the coordinator's empty shell table. So:
--
-- Redefines (owner and grants kept: CREATE OR REPLACE)
--   * dbx_audit.log_sensitive_access(), dbx_audit.log_api_key_change(): write the trail only on
--     the coordinator (Citus group 0; a node without Citus's catalog is a single node and always
--     writes). The coordinator holds a placement of every reference table, so each change of an
--     organization, aircraft or key is audited once, into the coordinator's audit_log (a worker's
--     placements skip). Session rows live on workers only: on Citus they are not audited by
--     trigger (docs/scaling.md);
--   * dbx_aviation.notify_auth_change(): no NOTIFY inside a Citus-internal connection (a placement
--     written on behalf of another node, application_name citus_internal…): such a transaction
--     is committed with PREPARE TRANSACTION, which PostgreSQL refuses after a NOTIFY. The node
--     the statement ran on notifies its own listeners; daemons on other nodes reload on their
--     timer (listener.auth_refresh_secs). On a single node nothing changes.
--
-- Creates
--   * dbx_aviation.sync_primary_api_keys() -> integer: the set-based form of the
--     sync_primary_api_key trigger (0020): every organization whose key hash is a sha256 gets its
--     'primary' row in api_keys inserted or renewed. A no-op while that trigger exists (every single
--     node); on Citus, where a trigger on one placement cannot write another reference
--     table (Citus refuses nested distributed execution), `dbx setup --distributed` drops the
--     trigger and dbx calls this after every write of organizations.api_key_hash. SECURITY
--     DEFINER, for dbx_app_write and dbx_admin (who may write organizations).

SET LOCAL ROLE dbx_admin;

CREATE OR REPLACE FUNCTION dbx_audit.log_sensitive_access() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
DECLARE
    v_table      text := TG_TABLE_NAME;
    -- The audited table's own key column, given as the trigger's argument.
    v_key_column text := TG_ARGV[0];
    v_uuid_re    constant text := '^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$';
    v_ctx_org    text := current_setting('app.current_org_id', true);
    v_ctx_user   text := current_setting('app.current_user_id', true);
    v_old        jsonb;
    v_new        jsonb;
    v_row        jsonb;
BEGIN
    -- On Citus the trail is written by the coordinator's placement only (group 0); a worker's
    -- placement of the same row skips (0041). No Citus catalog: a single node, always written.
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_local_group') IS NOT NULL THEN
        IF (SELECT groupid FROM pg_catalog.pg_dist_local_group) <> 0 THEN
            RETURN NULL;
        END IF;
        -- The placement's name is the table's with its shard id appended.
        v_table := pg_catalog.regexp_replace(TG_TABLE_NAME, '_[0-9]+$', '');
    END IF;
    IF v_key_column IS NULL THEN
        RAISE EXCEPTION 'dbx_audit.log_sensitive_access on %.% needs the key column as trigger argument',
            TG_TABLE_SCHEMA, TG_TABLE_NAME;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        v_old := to_jsonb(OLD) - 'api_key_encrypted';
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        v_new := to_jsonb(NEW) - 'api_key_encrypted';
    END IF;
    v_row := COALESCE(v_new, v_old);

    INSERT INTO dbx_audit.audit_log (
        org_id, user_id, action_type, table_name, record_id,
        old_values, new_values, compliance_relevant, ip_address, user_agent)
    VALUES (
        COALESCE((v_row ->> 'org_id')::uuid,
                 CASE WHEN v_ctx_org ~* v_uuid_re THEN v_ctx_org::uuid END),
        CASE WHEN v_ctx_user ~* v_uuid_re THEN v_ctx_user::uuid END,
        TG_OP,
        TG_TABLE_SCHEMA || '.' || v_table,
        (v_row ->> v_key_column)::uuid,
        v_old,
        v_new,
        true,
        inet_client_addr(),
        NULLIF(current_setting('app.user_agent', true), ''));
    RETURN NULL; -- AFTER trigger: the result is ignored
END
$$;

CREATE OR REPLACE FUNCTION dbx_audit.log_api_key_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
DECLARE
    v_table      text := TG_TABLE_NAME;
    v_uuid_re constant text := '^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$';
    v_ctx_user text := current_setting('app.current_user_id', true);
    v_old jsonb;
    v_new jsonb;
    v_row jsonb;
BEGIN
    -- On Citus the trail is written by the coordinator's placement only (group 0); a worker's
    -- placement of the same row skips (0041). No Citus catalog: a single node, always written.
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_local_group') IS NOT NULL THEN
        IF (SELECT groupid FROM pg_catalog.pg_dist_local_group) <> 0 THEN
            RETURN NULL;
        END IF;
        -- The placement's name is the table's with its shard id appended.
        v_table := pg_catalog.regexp_replace(TG_TABLE_NAME, '_[0-9]+$', '');
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        v_old := to_jsonb(OLD) - 'key_hash' - 'key_encrypted';
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        v_new := to_jsonb(NEW) - 'key_hash' - 'key_encrypted';
    END IF;
    v_row := COALESCE(v_new, v_old);
    INSERT INTO dbx_audit.audit_log (
        org_id, user_id, action_type, table_name, record_id,
        old_values, new_values, compliance_relevant, ip_address, user_agent)
    VALUES (
        (v_row ->> 'org_id')::uuid,
        CASE WHEN v_ctx_user ~* v_uuid_re THEN v_ctx_user::uuid END,
        TG_OP,
        TG_TABLE_SCHEMA || '.' || v_table,
        (v_row ->> 'key_id')::uuid,
        v_old,
        v_new,
        true,
        inet_client_addr(),
        NULLIF(current_setting('app.user_agent', true), ''));
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION dbx_aviation.notify_auth_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- A Citus-internal connection commits with PREPARE TRANSACTION, refused after NOTIFY (0041).
    IF current_setting('application_name', true) LIKE 'citus\_internal%' THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify('dbx_auth_changed', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE FUNCTION dbx_aviation.sync_primary_api_keys() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
DECLARE
    v_renewed  integer;
    v_inserted integer;
BEGIN
    -- Where the trigger mirrors already (every single node), there is nothing to do.
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_trigger
                WHERE tgrelid = 'dbx_aviation.organizations'::regclass
                  AND tgname = 'sync_primary_api_key') THEN
        RETURN 0;
    END IF;
    -- A new primary key (e.g. `dbx setup --rotate`): the row starts over, as in the trigger.
    UPDATE dbx_aviation.api_keys k
       SET key_hash = lower(o.api_key_hash), key_encrypted = o.api_key_encrypted,
           created_at = now(), last_used_at = NULL, expires_at = NULL, revoked_at = NULL
      FROM dbx_aviation.organizations o
     WHERE k.org_id = o.org_id AND k.label = 'primary'
       AND o.api_key_hash ~* '^[0-9a-f]{64}$'
       AND k.key_hash <> lower(o.api_key_hash);
    GET DIAGNOSTICS v_renewed = ROW_COUNT;
    INSERT INTO dbx_aviation.api_keys (org_id, label, key_hash, key_encrypted, created_at)
    SELECT o.org_id, 'primary', lower(o.api_key_hash), o.api_key_encrypted, now()
      FROM dbx_aviation.organizations o
     WHERE o.api_key_hash ~* '^[0-9a-f]{64}$'
       AND NOT EXISTS (SELECT 1 FROM dbx_aviation.api_keys k
                        WHERE k.org_id = o.org_id AND k.label = 'primary');
    GET DIAGNOSTICS v_inserted = ROW_COUNT;
    RETURN v_renewed + v_inserted;
END
$$;
COMMENT ON FUNCTION dbx_aviation.sync_primary_api_keys() IS 'Mirrors every organization''s own key into api_keys as label primary (set-based sync_primary_api_key); returns rows written';
REVOKE ALL ON FUNCTION dbx_aviation.sync_primary_api_keys() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dbx_aviation.sync_primary_api_keys() TO dbx_app_write, dbx_admin;
