-- 0006 monitoring: the seed's health views, made to run everywhere.
--
-- Creates (owned by dbx_admin)
--   * dbx_aviation.slow_queries_count(threshold_ms default 100) -> bigint: statements of this
--     database whose mean execution time exceeds the threshold, read from pg_stat_statements
--     through dynamic SQL; NULL when the extension is not installed, not preloaded
--     (shared_preload_libraries) or not readable;
--   * view dbx_aviation.system_health (metric text, value double precision, unit text) with
--     database_size (bytes), active_connections (connections to this database),
--     slow_queries_count (queries; NULL without pg_stat_statements), cache_hit_ratio (percent of
--     heap block reads served from shared buffers, 2 decimals; NULL before any read);
--   * view dbx_aviation.table_bloat (schemaname, tablename, bloat_pct double precision,
--     bloat_size text, bloat_bytes bigint): the seed's estimate from pg_stats, for the dbx schemas.
--
-- Seed bugs corrected
--   * system_health read pg_stat_statements directly, so the view could not even be created
--     without the extension (and errors when it is not preloaded); now a function returns NULL;
--   * system_health named the database 'dbx_aviation' literally; now current_database();
--   * value was bigint, which rounded the cache hit ratio; now double precision;
--   * table_bloat referenced hdr and ma, which no CTE defined (the view did not compile): the
--     constants CTE now defines them (24-byte tuple header incl. item pointer, MAXALIGN 8);
--   * table_bloat divided by relpages, zero for never-vacuumed tables (division by zero);
--   * it summed pg_stats rows of inherited and non-inherited statistics together (partitioned
--     tables have both) and matched pg_class by name alone across relkinds; now plain tables
--     only, inherited = false;
--   * a negative estimate (table smaller than its estimate) printed a negative size; clamped at 0.

SET LOCAL ROLE dbx_admin;

CREATE FUNCTION dbx_aviation.slow_queries_count(p_threshold_ms double precision DEFAULT 100)
RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog
AS $$
DECLARE
    v_schema text;
    v_count  bigint;
BEGIN
    SELECT n.nspname INTO v_schema
      FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'pg_stat_statements';
    IF v_schema IS NULL THEN
        RETURN NULL;
    END IF;
    -- Dynamic SQL: nothing here depends on the extension at creation time.
    EXECUTE format(
        'SELECT count(*) FROM %I.pg_stat_statements s
          WHERE s.mean_exec_time > $1
            AND s.dbid = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database())',
        v_schema)
       INTO v_count
      USING p_threshold_ms;
    RETURN v_count;
EXCEPTION
    -- not in shared_preload_libraries (55000), dropped meanwhile, an old version, no privilege
    WHEN object_not_in_prerequisite_state OR undefined_table OR undefined_column
         OR undefined_function OR insufficient_privilege THEN
        RETURN NULL;
END
$$;
COMMENT ON FUNCTION dbx_aviation.slow_queries_count(double precision) IS
    'Statements of this database averaging over the threshold (ms) per pg_stat_statements; NULL when unavailable';

CREATE VIEW dbx_aviation.system_health AS
SELECT 'database_size'::text AS metric,
       pg_database_size(current_database())::double precision AS value,
       'bytes'::text AS unit
UNION ALL
SELECT 'active_connections',
       count(*)::double precision,
       'connections'
FROM pg_stat_activity
WHERE datname = current_database()
UNION ALL
SELECT 'slow_queries_count',
       dbx_aviation.slow_queries_count(100)::double precision,
       'queries'
UNION ALL
SELECT 'cache_hit_ratio',
       round(100.0 * sum(heap_blks_hit) / NULLIF(sum(heap_blks_hit) + sum(heap_blks_read), 0), 2)::double precision,
       'percent'
FROM pg_statio_user_tables;
COMMENT ON VIEW dbx_aviation.system_health IS 'Health indicators (metric, value, unit); exported by the daemon as dbx_db_* gauges';

CREATE VIEW dbx_aviation.table_bloat AS
WITH constants AS (
    SELECT current_setting('block_size')::numeric AS bs, 24 AS hdr, 8 AS ma
),
stats AS (
    SELECT s.schemaname, s.tablename, c.hdr, c.ma, c.bs,
           SUM((1 - s.null_frac) * s.avg_width) AS datawidth,
           MAX(s.null_frac) AS maxfracsum,
           c.hdr + (
               SELECT 1 + count(*) / 8
               FROM pg_stats s2
               WHERE s2.null_frac <> 0
                 AND s2.schemaname = s.schemaname
                 AND s2.tablename = s.tablename
                 AND NOT s2.inherited
           ) AS nullhdr
    FROM pg_stats s CROSS JOIN constants c
    WHERE NOT s.inherited
      AND s.schemaname IN ('dbx_aviation', 'dbx_audit', 'dbx_archive')
    GROUP BY s.schemaname, s.tablename, c.hdr, c.ma, c.bs
),
rs AS (
    SELECT st.schemaname, st.tablename, st.ma, st.bs,
           (st.datawidth + (st.hdr + st.ma - CASE WHEN st.hdr % st.ma = 0 THEN st.ma ELSE st.hdr % st.ma END))::numeric AS datahdr,
           (st.maxfracsum * (st.nullhdr + st.ma - CASE WHEN st.nullhdr % st.ma = 0 THEN st.ma ELSE st.nullhdr % st.ma END)) AS nullhdr2
    FROM stats st
),
bloat_info AS (
    SELECT rs.schemaname, rs.tablename, cc.relpages, rs.bs,
           CEIL((GREATEST(cc.reltuples, 0) *
                 (rs.datahdr + rs.ma - CASE WHEN rs.datahdr % rs.ma = 0 THEN rs.ma ELSE rs.datahdr % rs.ma END
                  + rs.nullhdr2 + 4)) / (rs.bs - 20::float)) AS otta
    FROM rs
    JOIN pg_namespace nn ON nn.nspname = rs.schemaname
    JOIN pg_class cc ON cc.relnamespace = nn.oid AND cc.relname = rs.tablename AND cc.relkind = 'r'
)
SELECT
    bi.schemaname::text AS schemaname,
    bi.tablename::text AS tablename,
    ROUND(CASE WHEN bi.relpages = 0 OR bi.otta = 0 OR bi.relpages <= bi.otta THEN 0.0
               ELSE ((bi.relpages - bi.otta)::numeric / bi.relpages) * 100 END, 1)::double precision AS bloat_pct,
    pg_size_pretty(GREATEST(bi.bs * (bi.relpages - bi.otta), 0)::bigint) AS bloat_size,
    GREATEST(bi.bs * (bi.relpages - bi.otta), 0)::bigint AS bloat_bytes
FROM bloat_info bi
ORDER BY (bi.relpages - bi.otta) DESC, bi.schemaname, bi.tablename;
COMMENT ON VIEW dbx_aviation.table_bloat IS 'Estimated bloat of the dbx tables (from pg_stats; analyzed tables only)';

GRANT EXECUTE ON FUNCTION dbx_aviation.slow_queries_count(double precision) TO dbx_app_read, dbx_ingest, dbx_admin;
GRANT SELECT ON dbx_aviation.system_health, dbx_aviation.table_bloat TO dbx_app_read, dbx_ingest, dbx_admin;
