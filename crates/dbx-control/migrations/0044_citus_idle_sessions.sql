-- 0044 citus_idle_sessions: dbx_aviation.complete_idle_sessions works on a Citus cluster too.
--
-- Redefines (owner, grants and comment kept: CREATE OR REPLACE)
--   * dbx_aviation.complete_idle_sessions(timestamptz, integer): on a single node the statement
--     of 0040, unchanged (the oldest idle sessions, rows a writer holds skipped with FOR UPDATE
--     SKIP LOCKED). With the citus extension (`dbx setup --distributed`), where a row lock must
--     stay on one shard ("could not run distributed query with FOR UPDATE/SHARE commands"), the
--     oldest idle sessions are chosen by a plain subquery and the UPDATE re-checks them: a row
--     a writer holds is waited for, and once the writer commits its new last_point_at no longer
--     matches, so a session with fresh points is still never completed.

SET LOCAL ROLE dbx_admin;

CREATE OR REPLACE FUNCTION dbx_aviation.complete_idle_sessions(p_idle_before timestamptz, p_limit integer DEFAULT 1000)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
DECLARE
    v_done integer;
BEGIN
    IF p_idle_before IS NULL OR p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'complete_idle_sessions: p_idle_before must be set and p_limit at least 1'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        UPDATE dbx_aviation.flight_sessions s
           SET flight_status = 'completed', completed_at = now(), completion_reason = 'idle_timeout'
         WHERE s.session_id IN (SELECT i.session_id
                                  FROM dbx_aviation.flight_sessions i
                                 WHERE i.flight_status = 'active' AND i.last_point_at < p_idle_before
                                 ORDER BY i.last_point_at
                                 LIMIT p_limit)
           AND s.flight_status = 'active' AND s.last_point_at < p_idle_before;
    ELSE
        UPDATE dbx_aviation.flight_sessions s
           SET flight_status = 'completed', completed_at = now(), completion_reason = 'idle_timeout'
          FROM (SELECT i.session_id
                  FROM dbx_aviation.flight_sessions i
                 WHERE i.flight_status = 'active' AND i.last_point_at < p_idle_before
                 ORDER BY i.last_point_at
                 LIMIT p_limit
                   FOR UPDATE SKIP LOCKED) idle
         WHERE s.session_id = idle.session_id;
    END IF;
    GET DIAGNOSTICS v_done = ROW_COUNT;
    RETURN v_done;
END
$$;
