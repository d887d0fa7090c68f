-- 0020 tenants: several API keys per organization (rotation, revocation, expiry), the key label
-- in api_requests, audit rows for keys and for the administration CLI's reads, and full-text
-- search over the analysis reports.
--
-- Creates (owned by dbx_admin)
--   * dbx_aviation.api_keys: one row per API key of an organization, key_hash = hex(sha256(key))
--     (UNIQUE across all organizations), label UNIQUE per organization, expires_at / revoked_at.
--     organizations.api_key_hash stays as the seed has it (the organization's first key); it is
--     mirrored into api_keys under the label 'primary' by the trigger sync_primary_api_key
--     (whoever writes organizations: `dbx org create`, `dbx setup`, plain SQL), so that every key
--     is listed, tracked (last_used_at), expirable and revocable in one place. Rule for readers
--     (the listener's auth cache): a hash present in api_keys is valid only as api_keys says
--     (not revoked, not expired); organizations.api_key_hash alone grants only when api_keys does
--     not know it (a hash that is not 64 hex digits is never mirrored);
--   * RLS tenant_isolation on api_keys, like every org-owned table;
--   * triggers on api_keys: NOTIFY dbx_auth_changed (0008's notify_auth_change) on insert, delete,
--     truncate and on updates of anything but last_used_at — the daemon's batched last_used_at
--     stamps must not make every daemon reload its cache; audit rows via
--     dbx_audit.log_api_key_change(), which never copies key_hash or key_encrypted into the trail
--     and ignores last_used_at-only updates;
--   * dbx_audit.log_admin_read(org, table, details): an audit row for the administration CLI's
--     read commands (org list/show, key list, aircraft list, analyses search), SECURITY DEFINER;
--   * api_requests.key_label: the label of the key a gateway authenticated with;
--   * ml_analysis_results_report_fts: GIN index over
--     to_tsvector('english', coalesce(ai_report_content, '')) — an expression index rather than a
--     stored generated column, so nothing is rewritten and SELECT * readers see no new column;
--     queries must use exactly that expression (`dbx analyses search` does).
--
-- Privileges: dbx_ingest reads the key table (not key_encrypted) and may update last_used_at only;
-- dbx_app_read sees key metadata, never hashes; dbx_app_write manages keys like organizations.

SET LOCAL ROLE dbx_admin;

-- api_keys ------------------------------------------------------------------------------------------
CREATE TABLE dbx_aviation.api_keys (
    key_id        uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id        uuid NOT NULL REFERENCES dbx_aviation.organizations (org_id) ON DELETE CASCADE,
    label         varchar(64) NOT NULL CHECK (label ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    key_hash      varchar(64) NOT NULL CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    key_encrypted bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    expires_at    timestamptz,
    revoked_at    timestamptz,
    CONSTRAINT api_keys_org_label_key UNIQUE (org_id, label),
    CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash)
);
COMMENT ON TABLE dbx_aviation.api_keys IS 'API keys of organizations (several per organization for rotation); key_hash = hex(sha256(key)), never the key; label ''primary'' mirrors organizations.api_key_hash';
COMMENT ON COLUMN dbx_aviation.api_keys.last_used_at IS 'Last handshake with this key (stamped by the daemon in batches, about every few seconds; every minute while connections stay open)';
COMMENT ON COLUMN dbx_aviation.api_keys.key_encrypted IS 'pgp_sym_encrypt(key, app.encryption_key) when the key was made with app.encryption_key set';

-- Backfill the existing organizations' keys before the audit trigger exists: they are not new.
INSERT INTO dbx_aviation.api_keys (org_id, label, key_hash, key_encrypted, created_at)
SELECT org_id, 'primary', lower(api_key_hash), api_key_encrypted, created_at
  FROM dbx_aviation.organizations
 WHERE api_key_hash ~* '^[0-9a-f]{64}$'
ON CONFLICT DO NOTHING;

CREATE FUNCTION dbx_aviation.sync_primary_api_key() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
BEGIN
    IF NEW.api_key_hash IS NULL OR NEW.api_key_hash !~* '^[0-9a-f]{64}$' THEN
        RETURN NULL; -- not a sha256: nothing to mirror (the listener reads organizations directly)
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF lower(NEW.api_key_hash) IS NOT DISTINCT FROM lower(OLD.api_key_hash) THEN
            RETURN NULL;
        END IF;
        -- A new primary key (e.g. `dbx setup --rotate`): the row starts over.
        UPDATE dbx_aviation.api_keys
           SET key_hash = lower(NEW.api_key_hash), key_encrypted = NEW.api_key_encrypted,
               created_at = now(), last_used_at = NULL, expires_at = NULL, revoked_at = NULL
         WHERE org_id = NEW.org_id AND label = 'primary';
        IF FOUND THEN
            RETURN NULL;
        END IF;
    END IF;
    INSERT INTO dbx_aviation.api_keys (org_id, label, key_hash, key_encrypted, created_at)
    VALUES (NEW.org_id, 'primary', lower(NEW.api_key_hash), NEW.api_key_encrypted, now());
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION dbx_aviation.sync_primary_api_key() IS 'AFTER INSERT / UPDATE OF api_key_hash on organizations: mirrors the organization''s own key into api_keys as label primary';
REVOKE ALL ON FUNCTION dbx_aviation.sync_primary_api_key() FROM PUBLIC;

CREATE TRIGGER sync_primary_api_key
    AFTER INSERT OR UPDATE OF api_key_hash ON dbx_aviation.organizations
    FOR EACH ROW EXECUTE FUNCTION dbx_aviation.sync_primary_api_key();

-- Row-level security, as on every org-owned table (0004).
ALTER TABLE dbx_aviation.api_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON dbx_aviation.api_keys
    USING (org_id = NULLIF(current_setting('app.current_org_id', true), '')::uuid);

-- The listener's cache reloads on any change that can grant or withdraw a key.
CREATE TRIGGER notify_auth_change
    AFTER INSERT OR DELETE OR TRUNCATE ON dbx_aviation.api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION dbx_aviation.notify_auth_change();
CREATE TRIGGER notify_auth_change_update
    AFTER UPDATE OF org_id, label, key_hash, expires_at, revoked_at ON dbx_aviation.api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION dbx_aviation.notify_auth_change();

-- Audit ---------------------------------------------------------------------------------------------
-- Like dbx_audit.log_sensitive_access, but the trail never holds key material (neither the hash
-- nor the encrypted key): label, dates and ids say everything an auditor needs.
CREATE FUNCTION dbx_audit.log_api_key_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
DECLARE
    v_uuid_re constant text := '^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$';
    v_ctx_user text := current_setting('app.current_user_id', true);
    v_old jsonb;
    v_new jsonb;
    v_row jsonb;
BEGIN
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
        TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
        (v_row ->> 'key_id')::uuid,
        v_old,
        v_new,
        true,
        inet_client_addr(),
        NULLIF(current_setting('app.user_agent', true), ''));
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION dbx_audit.log_api_key_change() IS 'AFTER ROW audit trigger of api_keys; record_id = key_id; key_hash and key_encrypted are left out';

CREATE TRIGGER audit_api_keys
    AFTER INSERT OR DELETE ON dbx_aviation.api_keys
    FOR EACH ROW EXECUTE FUNCTION dbx_audit.log_api_key_change();
-- last_used_at (stamped by the daemon) and nothing else changed: not audited, costs nothing.
CREATE TRIGGER audit_api_keys_update
    AFTER UPDATE ON dbx_aviation.api_keys
    FOR EACH ROW
    WHEN ((OLD.key_id, OLD.org_id, OLD.label, OLD.key_hash, OLD.key_encrypted, OLD.created_at,
           OLD.expires_at, OLD.revoked_at)
          IS DISTINCT FROM
          (NEW.key_id, NEW.org_id, NEW.label, NEW.key_hash, NEW.key_encrypted, NEW.created_at,
           NEW.expires_at, NEW.revoked_at))
    EXECUTE FUNCTION dbx_audit.log_api_key_change();

CREATE FUNCTION dbx_audit.log_admin_read(p_org_id uuid, p_table text, p_details jsonb) RETURNS void
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
    INSERT INTO dbx_audit.audit_log (org_id, action_type, table_name, new_values, compliance_relevant,
                                     ip_address, user_agent)
    VALUES (p_org_id, 'READ', p_table, p_details, false, inet_client_addr(),
            NULLIF(current_setting('app.user_agent', true), ''));
$$;
COMMENT ON FUNCTION dbx_audit.log_admin_read(uuid, text, jsonb) IS 'Audit row (action_type READ) for an administrative read: org list/show, key list, aircraft list, analyses search';
REVOKE ALL ON FUNCTION dbx_audit.log_admin_read(uuid, text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dbx_audit.log_admin_read(uuid, text, jsonb) TO dbx_app_write, dbx_admin;

-- Privileges ----------------------------------------------------------------------------------------
GRANT SELECT (key_id, org_id, label, created_at, last_used_at, expires_at, revoked_at)
    ON dbx_aviation.api_keys TO dbx_app_read;
GRANT SELECT, INSERT, UPDATE, DELETE ON dbx_aviation.api_keys TO dbx_app_write;
GRANT SELECT (key_id, org_id, label, key_hash, created_at, last_used_at, expires_at, revoked_at)
    ON dbx_aviation.api_keys TO dbx_ingest;
GRANT UPDATE (last_used_at) ON dbx_aviation.api_keys TO dbx_ingest;

-- api_requests: which key -----------------------------------------------------------------------------
ALTER TABLE dbx_aviation.api_requests ADD COLUMN key_label varchar(64);
COMMENT ON COLUMN dbx_aviation.api_requests.key_label IS 'Label of the API key the gateway authenticated with (api_keys.label); NULL when refused before authentication';

-- Full-text search over analysis reports --------------------------------------------------------------
CREATE INDEX ml_analysis_results_report_fts ON dbx_aviation.ml_analysis_results
    USING gin (to_tsvector('english'::regconfig, COALESCE(ai_report_content, '')));
