-- 0004 security: row-level security, table privileges, pgcrypto functions, audit trail, GDPR.
--
-- Creates (owned by dbx_admin)
--   * RLS enabled on every org-owned table (organizations, aircraft_registry, flight_sessions,
--     flight_telemetry, ml_analysis_results, api_requests, dbx_audit.audit_log) with policy
--     tenant_isolation: org_id = current_setting('app.current_org_id', true)::uuid (NULLIF'd so an
--     emptied setting means "no rows", not a cast error). Not FORCEd: the owner (dbx_admin, used by
--     the definer functions) and dbx_ingest (BYPASSRLS, see 0001) are not subject to it;
--   * dbx_aviation.set_org_context(uuid): session-level set_config of app.current_org_id;
--   * dbx_aviation.generate_api_key_hash(text) = hex(sha256(key));
--   * dbx_aviation.encrypt_api_key / decrypt_api_key / encrypt_sensitive_data (pgcrypto
--     pgp_sym_*, key from the session setting app.encryption_key; a clear error when it is unset);
--   * dbx_audit.log_sensitive_access(key_column) trigger function and triggers on organizations,
--     aircraft_registry and flight_sessions; on flight_sessions the UPDATE trigger has a WHEN
--     clause so the daemon's statistics updates (departure/arrival, duration, count, distance,
--     last_*, updated_at) neither fire it nor cost anything;
--   * dbx_aviation.gdpr_delete_user_data(text) -> integer (sessions anonymized);
--   * the privileges of SCHEMA.md "Roles and users", least privilege.
--
-- Seed bugs corrected
--   * the audit trigger stored COALESCE(NEW.org_id, OLD.org_id) as record_id: it is now the row's
--     own key (org_id, aircraft_id, session_id), passed as the trigger argument;
--   * the audit trigger ran as the caller, so every writer needed INSERT on the audit log; it is
--     now SECURITY DEFINER and nobody else can write the trail;
--   * the audit trigger opened two exception blocks (subtransactions) per row to parse settings;
--     it now validates the text instead; org_id is the audited row's organization (falling back
--     to app.current_org_id), UPDATE rows keep the old values too, api_key_encrypted is left out;
--   * the audit trigger on flight_sessions fired for every statistics update of every batch;
--   * SECURITY DEFINER functions had no search_path (a caller could shadow digest() or
--     pgp_sym_encrypt() with their own); all now SET search_path = pg_catalog, dbx_aviation, public;
--   * current_setting('app.encryption_key') without the key set failed with "unrecognized
--     configuration parameter"; now: "app.encryption_key is not set ..." (SQLSTATE 55000);
--   * gdpr_delete_user_data logged the identifier it was asked to erase in clear and left it in
--     earlier audit rows; it now logs its sha256 and scrubs pilot_id from earlier audit rows of
--     flight_sessions; it is granted to dbx_admin only because it spans all organizations.

SET LOCAL ROLE dbx_admin;

-- Row-level security --------------------------------------------------------------------------------
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY[
        'dbx_aviation.organizations', 'dbx_aviation.aircraft_registry', 'dbx_aviation.flight_sessions',
        'dbx_aviation.flight_telemetry', 'dbx_aviation.ml_analysis_results', 'dbx_aviation.api_requests',
        'dbx_audit.audit_log']
    LOOP
        EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format($p$CREATE POLICY tenant_isolation ON %s
                           USING (org_id = NULLIF(current_setting('app.current_org_id', true), '')::uuid)$p$, t);
    END LOOP;
END
$$;

CREATE FUNCTION dbx_aviation.set_org_context(p_org_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- Session-level (is_local = false): pooled connections must set it on every checkout.
    PERFORM set_config('app.current_org_id', COALESCE(p_org_id::text, ''), false);
END
$$;
COMMENT ON FUNCTION dbx_aviation.set_org_context(uuid) IS 'Sets app.current_org_id for this session; RLS then shows only that organization''s rows (NULL: none)';

-- Table privileges ----------------------------------------------------------------------------------
-- Readers: everything an analyst needs, but not the key material of organizations.
GRANT SELECT (org_id, org_code, org_name, org_type, subscription_tier, api_rate_limit, ingest_points_per_sec,
              storage_quota_gb, compliance_level, data_retention_days, encryption_enabled, is_active,
              created_at, updated_at)
    ON dbx_aviation.organizations TO dbx_app_read;
GRANT SELECT ON dbx_aviation.aircraft_registry, dbx_aviation.flight_sessions, dbx_aviation.flight_telemetry,
                dbx_aviation.ml_analysis_results, dbx_aviation.api_requests
    TO dbx_app_read;

-- Writers (also members of dbx_app_read): the application tables; telemetry is the daemon's.
GRANT SELECT, INSERT, UPDATE, DELETE
    ON dbx_aviation.organizations, dbx_aviation.aircraft_registry, dbx_aviation.flight_sessions,
       dbx_aviation.ml_analysis_results
    TO dbx_app_write;
GRANT SELECT, INSERT ON dbx_aviation.api_requests TO dbx_app_write;

-- Ingest (DDL contract); its telemetry privileges are granted in 0003 and by ensure_telemetry_partition.
GRANT SELECT ON dbx_aviation.organizations, dbx_aviation.aircraft_registry TO dbx_ingest;
GRANT SELECT, INSERT, UPDATE ON dbx_aviation.flight_sessions TO dbx_ingest;
GRANT INSERT ON dbx_aviation.api_requests TO dbx_ingest;

GRANT EXECUTE ON FUNCTION dbx_aviation.set_org_context(uuid) TO dbx_app_read, dbx_app_write, dbx_admin;

-- API keys and encryption -----------------------------------------------------------------------------
CREATE FUNCTION dbx_aviation.generate_api_key_hash(api_key text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(api_key, 'UTF8')), 'hex') $$;
COMMENT ON FUNCTION dbx_aviation.generate_api_key_hash(text) IS 'hex(sha256(utf8(key))): the value stored in organizations.api_key_hash';
GRANT EXECUTE ON FUNCTION dbx_aviation.generate_api_key_hash(text) TO dbx_app_read, dbx_app_write, dbx_ingest, dbx_admin;

-- Private helper: the session's encryption key, or a clear error.
CREATE FUNCTION dbx_aviation.encryption_key() RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog
AS $$
DECLARE
    v_key text := current_setting('app.encryption_key', true);
BEGIN
    IF v_key IS NULL OR v_key = '' THEN
        RAISE EXCEPTION 'app.encryption_key is not set'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'SET app.encryption_key = ''...'' in this session (or ALTER ROLE ... SET app.encryption_key) before encrypting or decrypting';
    END IF;
    RETURN v_key;
END
$$;

CREATE FUNCTION dbx_aviation.encrypt_api_key(p_api_key text) RETURNS bytea
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
BEGIN
    RETURN pgp_sym_encrypt(p_api_key, dbx_aviation.encryption_key());
END
$$;

CREATE FUNCTION dbx_aviation.decrypt_api_key(p_encrypted bytea) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
BEGIN
    RETURN pgp_sym_decrypt(p_encrypted, dbx_aviation.encryption_key());
END
$$;

CREATE FUNCTION dbx_aviation.encrypt_sensitive_data(p_data jsonb) RETURNS bytea
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
BEGIN
    RETURN pgp_sym_encrypt(p_data::text, dbx_aviation.encryption_key());
END
$$;
GRANT EXECUTE ON FUNCTION dbx_aviation.encrypt_api_key(text), dbx_aviation.decrypt_api_key(bytea),
                          dbx_aviation.encrypt_sensitive_data(jsonb)
    TO dbx_app_write, dbx_admin;

-- Audit trail -----------------------------------------------------------------------------------------
CREATE FUNCTION dbx_audit.log_sensitive_access() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
DECLARE
    -- The audited table's own key column, given as the trigger's argument.
    v_key_column text := TG_ARGV[0];
    v_uuid_re    constant text := '^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$';
    v_ctx_org    text := current_setting('app.current_org_id', true);
    v_ctx_user   text := current_setting('app.current_user_id', true);
    v_old        jsonb;
    v_new        jsonb;
    v_row        jsonb;
BEGIN
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
        TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
        (v_row ->> v_key_column)::uuid,
        v_old,
        v_new,
        true,
        inet_client_addr(),
        NULLIF(current_setting('app.user_agent', true), ''));
    RETURN NULL; -- AFTER trigger: the result is ignored
END
$$;
COMMENT ON FUNCTION dbx_audit.log_sensitive_access() IS 'AFTER ROW audit trigger; TG_ARGV[0] names the table''s key column, stored as record_id';

CREATE TRIGGER audit_organizations
    AFTER INSERT OR UPDATE OR DELETE ON dbx_aviation.organizations
    FOR EACH ROW EXECUTE FUNCTION dbx_audit.log_sensitive_access('org_id');

CREATE TRIGGER audit_aircraft_registry
    AFTER INSERT OR UPDATE OR DELETE ON dbx_aviation.aircraft_registry
    FOR EACH ROW EXECUTE FUNCTION dbx_audit.log_sensitive_access('aircraft_id');

CREATE TRIGGER audit_flight_sessions
    AFTER INSERT OR DELETE ON dbx_aviation.flight_sessions
    FOR EACH ROW EXECUTE FUNCTION dbx_audit.log_sensitive_access('session_id');

-- Every column that is NOT statistics/bookkeeping (DDL contract). A column added to
-- flight_sessions later must be added here to be audited.
CREATE TRIGGER audit_flight_sessions_update
    AFTER UPDATE ON dbx_aviation.flight_sessions
    FOR EACH ROW
    WHEN ((OLD.session_id, OLD.org_id, OLD.aircraft_id, OLD.flight_number, OLD.pilot_id,
           OLD.flight_status, OLD.created_at)
          IS DISTINCT FROM
          (NEW.session_id, NEW.org_id, NEW.aircraft_id, NEW.flight_number, NEW.pilot_id,
           NEW.flight_status, NEW.created_at))
    EXECUTE FUNCTION dbx_audit.log_sensitive_access('session_id');

-- GDPR ------------------------------------------------------------------------------------------------
CREATE FUNCTION dbx_aviation.gdpr_delete_user_data(p_user_identifier text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
DECLARE
    v_sessions integer;
    v_scrubbed integer;
BEGIN
    IF p_user_identifier IS NULL OR p_user_identifier = '' THEN
        RAISE EXCEPTION 'gdpr_delete_user_data: empty user identifier' USING ERRCODE = 'invalid_parameter_value';
    END IF;

    UPDATE dbx_aviation.flight_sessions
       SET pilot_id = 'ANONYMIZED_' || session_id::text
     WHERE pilot_id = p_user_identifier;
    GET DIAGNOSTICS v_sessions = ROW_COUNT;

    -- The audit rows of those sessions (including the ones the UPDATE above just produced)
    -- still carry the identifier in old_values / new_values.
    UPDATE dbx_audit.audit_log
       SET old_values = CASE WHEN old_values ->> 'pilot_id' = p_user_identifier
                             THEN jsonb_set(old_values, '{pilot_id}', to_jsonb('ANONYMIZED_' || (old_values ->> 'session_id')))
                             ELSE old_values END,
           new_values = CASE WHEN new_values ->> 'pilot_id' = p_user_identifier
                             THEN jsonb_set(new_values, '{pilot_id}', to_jsonb('ANONYMIZED_' || (new_values ->> 'session_id')))
                             ELSE new_values END
     WHERE table_name = 'dbx_aviation.flight_sessions'
       AND (old_values ->> 'pilot_id' = p_user_identifier OR new_values ->> 'pilot_id' = p_user_identifier);
    GET DIAGNOSTICS v_scrubbed = ROW_COUNT;

    INSERT INTO dbx_audit.audit_log (action_type, table_name, compliance_relevant, old_values, ip_address, user_agent)
    VALUES ('gdpr_deletion', 'user_data', true,
            jsonb_build_object(
                'user_identifier_sha256', encode(sha256(convert_to(p_user_identifier, 'UTF8')), 'hex'),
                'sessions_anonymized', v_sessions,
                'audit_rows_scrubbed', v_scrubbed),
            inet_client_addr(),
            NULLIF(current_setting('app.user_agent', true), ''));

    RAISE NOTICE 'GDPR deletion completed: % flight session(s) anonymized', v_sessions;
    RETURN v_sessions;
END
$$;
COMMENT ON FUNCTION dbx_aviation.gdpr_delete_user_data(text) IS 'Anonymizes pilot_id everywhere (sessions and their audit rows), logs a gdpr_deletion audit row; returns the sessions anonymized';
GRANT EXECUTE ON FUNCTION dbx_aviation.gdpr_delete_user_data(text) TO dbx_admin;
