-- 0005 analytics: the seed's analytics functions and reporting views, working, plus the daily
-- per-aircraft telemetry materialized view.
--
-- Creates (owned by dbx_admin)
--   * dbx_analytics.calculate_fleet_risk_profile(org, start, end) -> the seed's result table
--     (aircraft_type, total_flights, avg_risk_score, high_risk_flights, critical_anomalies,
--     risk_trend) with the seed's formulas;
--   * dbx_analytics.calculate_maintenance_score(aircraft) -> the seed's result table
--     (aircraft_id, registration_number, maintenance_score, priority_level, recommended_action,
--     next_maintenance_due) with the seed's formula;
--   * views dbx_analytics.executive_summary and dbx_analytics.maintenance_predictions (seed logic);
--   * materialized view dbx_analytics.telemetry_daily_aircraft (aircraft_id, org_id, day = UTC
--     date, points, flight_time_seconds, max_altitude_m, max_ground_speed_mps, min_battery_pct)
--     with UNIQUE (aircraft_id, day) so it can be REFRESHed CONCURRENTLY.
--     flight_time_seconds = for each flight session, max(ts) - min(ts) of its points within that
--     UTC day, summed over the aircraft's sessions of the day (a flight crossing midnight
--     contributes to both days; idle time between flights does not count);
--   * dbx_analytics.org_telemetry_daily: the calling organization's rows of that materialized
--     view (a materialized view cannot carry RLS, so readers get this filtered, security_barrier
--     view instead of the raw one, which would show every tenant);
--   * dbx_analytics.refresh_telemetry_daily_aircraft(concurrently boolean default true).
--
-- Seed bugs corrected
--   * both functions failed when called: in PL/pgSQL the RETURNS TABLE columns (aircraft_type,
--     aircraft_id, registration_number, ...) are variables that clash with the table columns
--     ("column reference is ambiguous"); they are now LANGUAGE sql with qualified columns;
--   * calculate_maintenance_score used inner joins, so an aircraft with no analysed flight got no
--     score at all, even when its maintenance was overdue; maintenance_predictions likewise
--     ignored such aircraft. Both now LEFT JOIN (same formula, same result where the seed had one);
--   * the views ran with their owner's rights and so bypassed RLS (every tenant saw every
--     tenant); they are now security_invoker (PostgreSQL 15+);
--   * results are ordered NULLS LAST with a deterministic tie-breaker.

SET LOCAL ROLE dbx_admin;

CREATE FUNCTION dbx_analytics.calculate_fleet_risk_profile(
    p_org_id uuid,
    p_start_date timestamptz,
    p_end_date timestamptz
)
RETURNS TABLE (
    aircraft_type varchar,
    total_flights bigint,
    avg_risk_score numeric,
    high_risk_flights bigint,
    critical_anomalies bigint,
    risk_trend varchar
)
LANGUAGE sql STABLE
AS $$
    WITH risk_data AS (
        SELECT
            ar.aircraft_type AS r_aircraft_type,
            COUNT(DISTINCT fs.session_id) AS r_flight_count,
            AVG(mar.risk_score) AS r_avg_risk,
            COUNT(*) FILTER (WHERE mar.risk_level IN ('high', 'critical')) AS r_high_risk,
            COUNT(*) FILTER (WHERE mar.anomaly_detected
                               AND mar.anomalies::text LIKE '%critical%') AS r_critical_anom,
            -- trend: last 7 days before p_end_date against the rest of the window
            AVG(mar.risk_score) FILTER (WHERE fs.actual_departure >= p_end_date - INTERVAL '7 days')
              - AVG(mar.risk_score) FILTER (WHERE fs.actual_departure < p_end_date - INTERVAL '7 days')
                AS r_risk_delta
        FROM dbx_aviation.aircraft_registry ar
        JOIN dbx_aviation.flight_sessions fs ON ar.aircraft_id = fs.aircraft_id
        JOIN dbx_aviation.ml_analysis_results mar ON fs.session_id = mar.session_id
        WHERE ar.org_id = p_org_id
          AND fs.actual_departure BETWEEN p_start_date AND p_end_date
        GROUP BY ar.aircraft_type
    )
    SELECT
        rd.r_aircraft_type::varchar,
        rd.r_flight_count,
        ROUND(rd.r_avg_risk, 4),
        rd.r_high_risk,
        rd.r_critical_anom,
        (CASE
            WHEN rd.r_risk_delta > 0.05 THEN 'increasing'
            WHEN rd.r_risk_delta < -0.05 THEN 'decreasing'
            ELSE 'stable'
        END)::varchar
    FROM risk_data rd
    ORDER BY rd.r_avg_risk DESC NULLS LAST, rd.r_aircraft_type
$$;
COMMENT ON FUNCTION dbx_analytics.calculate_fleet_risk_profile(uuid, timestamptz, timestamptz) IS
    'Per aircraft type of an organization, flights departed in [start, end]: flights, average risk, high-risk and critical-anomaly analyses, trend (last 7 days vs before, +-0.05)';

CREATE FUNCTION dbx_analytics.calculate_maintenance_score(p_aircraft_id uuid)
RETURNS TABLE (
    aircraft_id uuid,
    registration_number varchar,
    maintenance_score numeric,
    priority_level varchar,
    recommended_action text,
    next_maintenance_due date
)
LANGUAGE sql STABLE
AS $$
    WITH component_health AS (
        SELECT
            ar.aircraft_id AS c_aircraft_id,
            ar.registration_number AS c_registration_number,
            ar.next_maintenance_date AS c_next_maintenance_date,
            COUNT(*) FILTER (WHERE mar.anomalies::text LIKE '%motor%'
                AND mar.analysis_timestamp >= CURRENT_DATE - INTERVAL '30 days') AS c_motor_issues,
            COUNT(*) FILTER (WHERE mar.anomalies::text LIKE '%control_surface%'
                AND mar.analysis_timestamp >= CURRENT_DATE - INTERVAL '30 days') AS c_control_issues,
            COUNT(*) FILTER (WHERE mar.anomalies::text LIKE '%battery%'
                AND mar.analysis_timestamp >= CURRENT_DATE - INTERVAL '30 days') AS c_battery_issues,
            AVG(mar.risk_score) FILTER (WHERE mar.analysis_timestamp >= CURRENT_DATE - INTERVAL '7 days')
                AS c_recent_risk
        FROM dbx_aviation.aircraft_registry ar
        LEFT JOIN dbx_aviation.flight_sessions fs ON ar.aircraft_id = fs.aircraft_id
        LEFT JOIN dbx_aviation.ml_analysis_results mar ON fs.session_id = mar.session_id
        WHERE ar.aircraft_id = p_aircraft_id
        GROUP BY ar.aircraft_id, ar.registration_number, ar.next_maintenance_date
    ),
    maintenance_calc AS (
        SELECT ch.*,
            (COALESCE(ch.c_motor_issues * 0.4, 0) +
             COALESCE(ch.c_control_issues * 0.3, 0) +
             COALESCE(ch.c_battery_issues * 0.2, 0) +
             COALESCE(ch.c_recent_risk * 100 * 0.1, 0) +
             CASE
                WHEN ch.c_next_maintenance_date <= CURRENT_DATE THEN 30
                WHEN ch.c_next_maintenance_date <= CURRENT_DATE + INTERVAL '7 days' THEN 20
                WHEN ch.c_next_maintenance_date <= CURRENT_DATE + INTERVAL '30 days' THEN 10
                ELSE 0
             END) AS c_score
        FROM component_health ch
    )
    SELECT
        mc.c_aircraft_id,
        mc.c_registration_number::varchar,
        ROUND(mc.c_score, 2),
        (CASE
            WHEN mc.c_score >= 50 THEN 'URGENT'
            WHEN mc.c_score >= 30 THEN 'HIGH'
            WHEN mc.c_score >= 15 THEN 'MEDIUM'
            ELSE 'LOW'
        END)::varchar,
        CASE
            WHEN mc.c_motor_issues > 5 THEN 'Inspect motor systems immediately'
            WHEN mc.c_control_issues > 3 THEN 'Check control surface calibration'
            WHEN mc.c_battery_issues > 2 THEN 'Battery health assessment required'
            WHEN mc.c_next_maintenance_date <= CURRENT_DATE THEN 'Scheduled maintenance overdue'
            ELSE 'Continue normal operations'
        END,
        mc.c_next_maintenance_date
    FROM maintenance_calc mc
$$;
COMMENT ON FUNCTION dbx_analytics.calculate_maintenance_score(uuid) IS
    'Maintenance urgency of one aircraft: 0.4/motor + 0.3/control-surface + 0.2/battery anomaly (30 days) + 10 x recent risk (7 days) + 30/20/10 for maintenance overdue/within 7/within 30 days';

GRANT EXECUTE ON FUNCTION dbx_analytics.calculate_fleet_risk_profile(uuid, timestamptz, timestamptz),
                          dbx_analytics.calculate_maintenance_score(uuid)
    TO dbx_app_read, dbx_app_write, dbx_admin;

-- Reporting views ---------------------------------------------------------------------------------
CREATE VIEW dbx_analytics.executive_summary WITH (security_invoker = true) AS
WITH monthly_stats AS (
    SELECT
        fs.org_id,
        DATE_TRUNC('month', fs.actual_departure) AS month,
        COUNT(*) AS flights,
        COUNT(DISTINCT fs.aircraft_id) AS active_aircraft,
        AVG(fs.flight_duration_seconds) / 3600.0 AS avg_hours,
        SUM(fs.total_distance_km) AS total_km
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
    ROUND(100.0 * rs.high_risk / NULLIF(ms.flights, 0), 2) AS high_risk_percentage
FROM dbx_aviation.organizations o
JOIN monthly_stats ms ON o.org_id = ms.org_id
LEFT JOIN risk_stats rs ON ms.org_id = rs.org_id AND ms.month = rs.month
WHERE o.is_active = true
ORDER BY o.org_name, ms.month DESC;
COMMENT ON VIEW dbx_analytics.executive_summary IS 'Per active organization and month (last 12 months): flights, aircraft, hours, distance, risk, anomalies';

CREATE VIEW dbx_analytics.maintenance_predictions WITH (security_invoker = true) AS
WITH component_health AS (
    SELECT
        ar.aircraft_id,
        ar.registration_number,
        ar.aircraft_type,
        COUNT(*) FILTER (WHERE mar.anomalies::text LIKE '%motor%'
            AND mar.analysis_timestamp >= CURRENT_DATE - INTERVAL '30 days') AS motor_issues,
        COUNT(*) FILTER (WHERE mar.anomalies::text LIKE '%control_surface%'
            AND mar.analysis_timestamp >= CURRENT_DATE - INTERVAL '30 days') AS control_issues,
        AVG(mar.risk_score) FILTER (WHERE mar.analysis_timestamp >= CURRENT_DATE - INTERVAL '7 days') AS recent_risk,
        MAX(fs.actual_departure) AS last_flight,
        ar.total_flight_hours,
        ar.next_maintenance_date
    FROM dbx_aviation.aircraft_registry ar
    LEFT JOIN dbx_aviation.flight_sessions fs ON ar.aircraft_id = fs.aircraft_id
    LEFT JOIN dbx_aviation.ml_analysis_results mar ON fs.session_id = mar.session_id
    WHERE ar.is_active = true
    GROUP BY ar.aircraft_id, ar.registration_number, ar.aircraft_type,
             ar.total_flight_hours, ar.next_maintenance_date
),
maintenance_score AS (
    SELECT ch.*,
        (COALESCE(ch.motor_issues * 0.4, 0) +
         COALESCE(ch.control_issues * 0.3, 0) +
         COALESCE(ch.recent_risk * 100 * 0.3, 0) +
         CASE
            WHEN ch.next_maintenance_date <= CURRENT_DATE + INTERVAL '7 days' THEN 20
            WHEN ch.next_maintenance_date <= CURRENT_DATE + INTERVAL '30 days' THEN 10
            ELSE 0
         END) AS urgency_score
    FROM component_health ch
)
SELECT
    ms.aircraft_id,
    ms.registration_number,
    ms.aircraft_type,
    ms.motor_issues,
    ms.control_issues,
    ROUND(ms.recent_risk::numeric, 4) AS recent_risk_score,
    ms.last_flight,
    ms.total_flight_hours,
    ms.next_maintenance_date,
    ROUND(ms.urgency_score::numeric, 2) AS maintenance_urgency,
    CASE
        WHEN ms.urgency_score >= 50 THEN 'URGENT'
        WHEN ms.urgency_score >= 30 THEN 'HIGH'
        WHEN ms.urgency_score >= 15 THEN 'MEDIUM'
        ELSE 'LOW'
    END AS priority_level
FROM maintenance_score ms
ORDER BY ms.urgency_score DESC, ms.registration_number;
COMMENT ON VIEW dbx_analytics.maintenance_predictions IS 'Active aircraft by maintenance urgency (seed formula: 0.4/motor + 0.3/control anomaly in 30 days + 30 x 7-day risk + 20/10 when due within 7/30 days)';

GRANT SELECT ON dbx_analytics.executive_summary, dbx_analytics.maintenance_predictions
    TO dbx_app_read, dbx_app_write, dbx_admin;

-- Daily telemetry per aircraft ------------------------------------------------------------------------
CREATE MATERIALIZED VIEW dbx_analytics.telemetry_daily_aircraft AS
WITH per_session AS (
    SELECT
        t.aircraft_id,
        t.org_id,
        (t.ts AT TIME ZONE 'UTC')::date AS day,
        t.session_id,
        count(*) AS points,
        extract(epoch FROM max(t.ts) - min(t.ts)) AS span_seconds,
        max(t.altitude_m) AS max_altitude_m,
        max(t.ground_speed_mps) AS max_ground_speed_mps,
        min(t.battery_remaining_pct) AS min_battery_pct
    FROM dbx_aviation.flight_telemetry t
    GROUP BY t.aircraft_id, t.org_id, (t.ts AT TIME ZONE 'UTC')::date, t.session_id
)
SELECT
    ps.aircraft_id,
    ps.org_id,
    ps.day,
    sum(ps.points)::bigint AS points,
    sum(ps.span_seconds)::double precision AS flight_time_seconds,
    max(ps.max_altitude_m) AS max_altitude_m,
    max(ps.max_ground_speed_mps) AS max_ground_speed_mps,
    min(ps.min_battery_pct) AS min_battery_pct
FROM per_session ps
GROUP BY ps.aircraft_id, ps.org_id, ps.day
WITH DATA;
COMMENT ON MATERIALIZED VIEW dbx_analytics.telemetry_daily_aircraft IS
    'Per aircraft per UTC day: points, flight time (per-session span within the day, summed), max altitude, max ground speed, min battery. Refresh CONCURRENTLY. All tenants: readers use org_telemetry_daily';
CREATE UNIQUE INDEX telemetry_daily_aircraft_key ON dbx_analytics.telemetry_daily_aircraft (aircraft_id, day);
CREATE INDEX telemetry_daily_aircraft_org_day ON dbx_analytics.telemetry_daily_aircraft (org_id, day);

CREATE VIEW dbx_analytics.org_telemetry_daily WITH (security_barrier = true) AS
SELECT d.aircraft_id, d.org_id, d.day, d.points, d.flight_time_seconds,
       d.max_altitude_m, d.max_ground_speed_mps, d.min_battery_pct
FROM dbx_analytics.telemetry_daily_aircraft d
WHERE d.org_id = NULLIF(current_setting('app.current_org_id', true), '')::uuid;
COMMENT ON VIEW dbx_analytics.org_telemetry_daily IS 'telemetry_daily_aircraft rows of the organization set by set_org_context';
GRANT SELECT ON dbx_analytics.org_telemetry_daily TO dbx_app_read, dbx_app_write, dbx_admin;

CREATE FUNCTION dbx_analytics.refresh_telemetry_daily_aircraft(p_concurrently boolean DEFAULT true)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
BEGIN
    IF p_concurrently THEN
        REFRESH MATERIALIZED VIEW CONCURRENTLY dbx_analytics.telemetry_daily_aircraft;
    ELSE
        REFRESH MATERIALIZED VIEW dbx_analytics.telemetry_daily_aircraft;
    END IF;
END
$$;
COMMENT ON FUNCTION dbx_analytics.refresh_telemetry_daily_aircraft(boolean) IS 'Refreshes telemetry_daily_aircraft (CONCURRENTLY by default: readers are never blocked)';
GRANT EXECUTE ON FUNCTION dbx_analytics.refresh_telemetry_daily_aircraft(boolean) TO dbx_admin, dbx_ingest;
