-- 0043 citus_analytics: the seed's analytics functions run on a Citus cluster too.
--
-- Redefines (owner, grants and comments kept: CREATE OR REPLACE)
--   * dbx_analytics.calculate_fleet_risk_profile(uuid, timestamptz, timestamptz) and
--     dbx_analytics.calculate_maintenance_score(uuid): the same query, the same result table, now
--     LANGUAGE plpgsql (RETURN QUERY) instead of LANGUAGE sql. Citus cannot plan a SQL function's
--     parameterized query over distributed tables ("parameterized queries for SQL functions
--     referencing distributed tables are not supported; consider using PL/pgSQL functions");
--     PL/pgSQL hands it each query with the parameters bound. #variable_conflict use_column keeps
--     the RETURNS TABLE names from shadowing the tables' columns (the seed's original bug, see
--     0005); the query qualifies every column anyway.

SET LOCAL ROLE dbx_admin;

CREATE OR REPLACE FUNCTION dbx_analytics.calculate_fleet_risk_profile(
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
LANGUAGE plpgsql STABLE
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
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
        ORDER BY rd.r_avg_risk DESC NULLS LAST, rd.r_aircraft_type;
END
$$;

CREATE OR REPLACE FUNCTION dbx_analytics.calculate_maintenance_score(p_aircraft_id uuid)
RETURNS TABLE (
    aircraft_id uuid,
    registration_number varchar,
    maintenance_score numeric,
    priority_level varchar,
    recommended_action text,
    next_maintenance_due date
)
LANGUAGE plpgsql STABLE
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
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
        FROM maintenance_calc mc;
END
$$;
