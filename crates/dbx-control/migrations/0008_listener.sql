-- 0008 listener: what the gateway listener needs from the schema.
--
-- Creates
--   * dbx_aviation.notify_auth_change(): a statement-level trigger function that sends
--     NOTIFY dbx_auth_changed whenever organizations or aircraft_registry change (and any
--     later key table that attaches it), so the listener's key/aircraft cache reloads within
--     a second: a deactivated organization is refused at once, a new aircraft accepted at once.
--     Statement-level, so a bulk change sends one notification, and NOTIFY payloads are
--     de-duplicated per transaction by PostgreSQL anyway;
--   * dbx_aviation.register_aircraft(org, registration): auto-registration of an unknown
--     registration for the key's organization (listener.auto_register_aircraft, off by
--     default). SECURITY DEFINER so the ingest role needs no INSERT on aircraft_registry:
--     it can only add an aircraft, with a validated registration, to the organization the
--     daemon authenticated;
--   * SELECT on dbx_aviation.schema_migrations for the application roles, so `dbx check`
--     run as an application user can report the schema version.

SET LOCAL ROLE dbx_admin;

CREATE FUNCTION dbx_aviation.notify_auth_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dbx_auth_changed', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER notify_auth_change
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON dbx_aviation.organizations
    FOR EACH STATEMENT EXECUTE FUNCTION dbx_aviation.notify_auth_change();

CREATE TRIGGER notify_auth_change
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON dbx_aviation.aircraft_registry
    FOR EACH STATEMENT EXECUTE FUNCTION dbx_aviation.notify_auth_change();

CREATE FUNCTION dbx_aviation.register_aircraft(p_org_id uuid, p_registration text)
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
DECLARE
    v_id uuid;
BEGIN
    IF p_registration IS NULL OR p_registration !~ '^[A-Za-z0-9][A-Za-z0-9-]{0,19}$' THEN
        RAISE EXCEPTION 'register_aircraft: registration % must be 1 to 20 letters, digits or dashes', p_registration
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM dbx_aviation.organizations WHERE org_id = p_org_id AND is_active) THEN
        RAISE EXCEPTION 'register_aircraft: organization % is unknown or inactive', p_org_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO dbx_aviation.aircraft_registry (org_id, registration_number, aircraft_type, operational_status)
    VALUES (p_org_id, p_registration, 'unknown', 'active')
    ON CONFLICT DO NOTHING
    RETURNING aircraft_id INTO v_id;
    IF v_id IS NULL THEN
        SELECT aircraft_id INTO v_id FROM dbx_aviation.aircraft_registry
        WHERE org_id = p_org_id AND registration_number = p_registration;
    END IF;
    RETURN v_id;
END;
$$;

REVOKE ALL ON FUNCTION dbx_aviation.register_aircraft(uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dbx_aviation.register_aircraft(uuid, text) TO dbx_ingest, dbx_admin;

RESET ROLE;
GRANT SELECT ON dbx_aviation.schema_migrations TO dbx_app_read, dbx_app_write, dbx_ingest;
