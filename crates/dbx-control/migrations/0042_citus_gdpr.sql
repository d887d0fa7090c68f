-- 0042 citus_gdpr: dbx_aviation.gdpr_delete_user_data works on a Citus cluster too.
--
-- Redefines (owner and grants kept: CREATE OR REPLACE)
--   * dbx_aviation.gdpr_delete_user_data(text): the audit rows of the anonymized sessions are
--     scrubbed by plain UPDATEs of IMMUTABLE expressions instead of one UPDATE with CASE …
--     to_jsonb(…): Citus refuses a non-IMMUTABLE function inside CASE in a modification, and a
--     STABLE one (to_jsonb) called on columns ("STABLE functions used in UPDATE queries cannot be
--     called with column references"), and on Citus the audit trail is a Citus table
--     (`dbx setup --distributed`). Same rows changed, same values, same counts (an audit row
--     whose old and new values both held the identifier counts once, as before).

SET LOCAL ROLE dbx_admin;

CREATE OR REPLACE FUNCTION dbx_aviation.gdpr_delete_user_data(p_user_identifier text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
DECLARE
    v_sessions integer;
    v_scrubbed integer;
    v_n        integer;
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
    -- Plain UPDATEs of IMMUTABLE expressions rather than one with CASE … to_jsonb: Citus refuses
    -- STABLE functions (to_jsonb) on columns in a modification, and the audit trail is a Citus
    -- table there. The JSON string is built by hand: session ids are UUIDs, nothing to escape.
    -- Rows holding it on both sides first, then either side: each row is counted once.
    UPDATE dbx_audit.audit_log
       SET old_values = jsonb_set(old_values, '{pilot_id}', ('"ANONYMIZED_' || (old_values ->> 'session_id') || '"')::jsonb),
           new_values = jsonb_set(new_values, '{pilot_id}', ('"ANONYMIZED_' || (new_values ->> 'session_id') || '"')::jsonb)
     WHERE table_name = 'dbx_aviation.flight_sessions'
       AND old_values ->> 'pilot_id' = p_user_identifier
       AND new_values ->> 'pilot_id' = p_user_identifier;
    GET DIAGNOSTICS v_scrubbed = ROW_COUNT;
    UPDATE dbx_audit.audit_log
       SET old_values = jsonb_set(old_values, '{pilot_id}', ('"ANONYMIZED_' || (old_values ->> 'session_id') || '"')::jsonb)
     WHERE table_name = 'dbx_aviation.flight_sessions'
       AND old_values ->> 'pilot_id' = p_user_identifier;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    v_scrubbed := v_scrubbed + v_n;
    UPDATE dbx_audit.audit_log
       SET new_values = jsonb_set(new_values, '{pilot_id}', ('"ANONYMIZED_' || (new_values ->> 'session_id') || '"')::jsonb)
     WHERE table_name = 'dbx_aviation.flight_sessions'
       AND new_values ->> 'pilot_id' = p_user_identifier;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    v_scrubbed := v_scrubbed + v_n;

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
