-- 0040 sessions: flight sessions end (protocol 1.1: the gateway's `end`, and the idle timeout).
--
-- Changes (owned by dbx_admin)
--   * dbx_aviation.flight_sessions, three bookkeeping columns:
--       last_point_at timestamptz NOT NULL DEFAULT now(): when the daemon last stored a point of
--         the session (the daemon's clock at commit, not the point's ts); its creation time until
--         then. Existing rows take their updated_at (the touch trigger is held off meanwhile, so
--         updated_at itself is kept);
--       completed_at timestamptz: when the session was completed; NULL while it is not;
--       completion_reason varchar(16), 'end' (the gateway said so) or 'idle_timeout' (the control
--         plane did, after sessions.idle_timeout_secs without a point); NULL while not completed.
--     flight_status keeps its type and default; the daemon writes 'active' (new sessions) and
--     'completed'. A completed session takes no new point (docs/protocol.md, "Ending a session").
--     The audit trigger already records every flight_status change; these columns change with it
--     and are not added to its WHEN list;
--   * index flight_sessions_active_last_point (last_point_at) WHERE flight_status = 'active': the
--     idle completer reads the active sessions oldest activity first and never scans the table
--     (nor telemetry); completed sessions leave the index;
--   * dbx_aviation.complete_idle_sessions(p_idle_before timestamptz, p_limit integer = 1000)
--     -> integer: completes at most p_limit active sessions whose last_point_at is before
--     p_idle_before, oldest first, skipping rows a writer holds locked (its batch is activity);
--     returns how many. SECURITY DEFINER, executable by dbx_ingest and dbx_admin (the control
--     plane runs it as either);
--   * dbx_analytics.executive_summary: the same columns with the same values, plus
--     completed_flights at the end: the month's flights whose session is completed.

SET LOCAL ROLE dbx_admin;

ALTER TABLE dbx_aviation.flight_sessions
    ADD COLUMN last_point_at timestamptz,
    ADD COLUMN completed_at timestamptz,
    ADD COLUMN completion_reason varchar(16)
        CONSTRAINT flight_sessions_completion_reason_check
        CHECK (completion_reason IN ('end', 'idle_timeout'));

ALTER TABLE dbx_aviation.flight_sessions DISABLE TRIGGER flight_sessions_touch_updated_at;
UPDATE dbx_aviation.flight_sessions SET last_point_at = updated_at;
ALTER TABLE dbx_aviation.flight_sessions ENABLE TRIGGER flight_sessions_touch_updated_at;

ALTER TABLE dbx_aviation.flight_sessions
    ALTER COLUMN last_point_at SET DEFAULT now(),
    ALTER COLUMN last_point_at SET NOT NULL;

COMMENT ON COLUMN dbx_aviation.flight_sessions.flight_status IS
    'active while points are expected; completed after the gateway''s end or sessions.idle_timeout_secs without a point (then no new point is accepted)';
COMMENT ON COLUMN dbx_aviation.flight_sessions.last_point_at IS
    'When the daemon last stored a point of this session (its clock, not the point ts); creation time until the first point';
COMMENT ON COLUMN dbx_aviation.flight_sessions.completed_at IS 'When the session was completed; NULL while it is not';
COMMENT ON COLUMN dbx_aviation.flight_sessions.completion_reason IS
    'end: the gateway ended the session; idle_timeout: no point for sessions.idle_timeout_secs';

CREATE INDEX flight_sessions_active_last_point ON dbx_aviation.flight_sessions (last_point_at)
    WHERE flight_status = 'active';

CREATE FUNCTION dbx_aviation.complete_idle_sessions(p_idle_before timestamptz, p_limit integer DEFAULT 1000)
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
    UPDATE dbx_aviation.flight_sessions s
       SET flight_status = 'completed', completed_at = now(), completion_reason = 'idle_timeout'
      FROM (SELECT i.session_id
              FROM dbx_aviation.flight_sessions i
             WHERE i.flight_status = 'active' AND i.last_point_at < p_idle_before
             ORDER BY i.last_point_at
             LIMIT p_limit
               FOR UPDATE SKIP LOCKED) idle
     WHERE s.session_id = idle.session_id;
    GET DIAGNOSTICS v_done = ROW_COUNT;
    RETURN v_done;
END
$$;
COMMENT ON FUNCTION dbx_aviation.complete_idle_sessions(timestamptz, integer) IS
    'Completes up to p_limit active flight sessions without a point since p_idle_before (oldest first, locked rows skipped); returns how many';
REVOKE ALL ON FUNCTION dbx_aviation.complete_idle_sessions(timestamptz, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dbx_aviation.complete_idle_sessions(timestamptz, integer) TO dbx_ingest, dbx_admin;

-- executive_summary: 0005's view with completed_flights appended (CREATE OR REPLACE keeps the
-- existing columns, their order and their grants).
CREATE OR REPLACE VIEW dbx_analytics.executive_summary WITH (security_invoker = true) AS
WITH monthly_stats AS (
    SELECT
        fs.org_id,
        DATE_TRUNC('month', fs.actual_departure) AS month,
        COUNT(*) AS flights,
        COUNT(DISTINCT fs.aircraft_id) AS active_aircraft,
        AVG(fs.flight_duration_seconds) / 3600.0 AS avg_hours,
        SUM(fs.total_distance_km) AS total_km,
        COUNT(*) FILTER (WHERE fs.flight_status = 'completed') AS completed
    FROM dbx_aviation.flight_sessions fs
    WHERE fs.actual_departure >= CURRENT_DATE - INTERVAL '12 months'
    GROUP BY fs.org_id, DATE_TRUNC('month', fs.actual_departure)
),
risk_stats AS (
    SELECT
        mar.org_id,
        DATE_TRUNC('month', mar.analysis_timestamp) AS month,
        AVG(mar.risk_score) AS avg_risk,
        COUNT(*) FILTER (WHERE mar.anomaly_detected) AS anomalies,
        COUNT(*) FILTER (WHERE mar.risk_level IN ('high', 'critical')) AS high_risk
    FROM dbx_aviation.ml_analysis_results mar
    WHERE mar.analysis_timestamp >= CURRENT_DATE - INTERVAL '12 months'
    GROUP BY mar.org_id, DATE_TRUNC('month', mar.analysis_timestamp)
)
SELECT
    o.org_name,
    o.org_type,
    ms.month,
    ms.flights,
    ms.active_aircraft,
    ROUND(ms.avg_hours::numeric, 2) AS avg_flight_hours,
    ROUND(ms.total_km::numeric, 0) AS total_distance_km,
    ROUND(rs.avg_risk::numeric, 4) AS avg_risk_score,
    rs.anomalies AS anomaly_count,
    rs.high_risk AS high_risk_flights,
    ROUND(100.0 * rs.high_risk / NULLIF(ms.flights, 0), 2) AS high_risk_percentage,
    ms.completed AS completed_flights
FROM dbx_aviation.organizations o
JOIN monthly_stats ms ON o.org_id = ms.org_id
LEFT JOIN risk_stats rs ON ms.org_id = rs.org_id AND ms.month = rs.month
WHERE o.is_active = true
ORDER BY o.org_name, ms.month DESC;
COMMENT ON VIEW dbx_analytics.executive_summary IS
    'Per active organization and month (last 12 months): flights, aircraft, hours, distance, risk, anomalies, completed flights';
