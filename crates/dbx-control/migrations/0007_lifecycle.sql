-- 0007 lifecycle: archival and retention without copying rows.
--
-- Creates (owned by dbx_admin)
--   * dbx_archive.flight_telemetry_archive: partitioned like flight_telemetry (same columns, same
--     partitioned indexes, RLS policy tenant_isolation, SELECT for dbx_app_read); archived
--     partitions are attached under it and stay queryable through it;
--   * dbx_aviation.telemetry_partitions(): every partition of the live and the archive parent with
--     its parsed range (range_start/range_end NULL for the default partition);
--   * dbx_aviation.archive_old_telemetry(p_days int default 90) -> (archived_partition,
--     archived_from, archived_to): each live partition whose upper bound is at least p_days old
--     is DETACHed, moved to dbx_archive (ALTER TABLE ... SET SCHEMA) and ATTACHed under
--     flight_telemetry_archive. O(1) per partition, no row copied;
--   * dbx_aviation.enforce_retention_policy() -> (deleted_analysis_results, deleted_flight_sessions):
--     per organization data_retention_days (results also go with their sessions, ON DELETE CASCADE);
--   * dbx_aviation.enforce_telemetry_retention(p_max_rows int default 100000) -> (dropped_partitions,
--     deleted_rows, more_pending): a partition, live or archived, whose upper bound is past every
--     organization's retention is dropped whole; in the others only the rows of organizations
--     whose retention has expired are deleted, at most p_max_rows per call (one bounded
--     transaction; call again while more_pending).
--   Partition DDL runs with lock_timeout 5s: a partition whose lock cannot be had (a long ingest
--   transaction) is skipped with a WARNING, rather than stalling every writer queued behind us.
--   All three are SECURITY DEFINER and executable by dbx_admin only (and superusers).
--
-- Seed bugs corrected
--   * archive_old_telemetry filtered on a column "timestamp" that does not exist (it is ts);
--   * "RAISE NOTICE '...', ROW_COUNT" does not compile (ROW_COUNT is only readable through
--     GET DIAGNOSTICS);
--   * CREATE TABLE ... (LIKE flight_telemetry INCLUDING ALL) inside the function made an
--     unpartitioned copy, and INSERT ... SELECT + DELETE rewrote every archived row twice and left
--     the live table bloated; whole partitions are now moved instead;
--   * enforce_retention_policy skipped inactive organizations (their data was kept forever),
--     failed on the foreign key from ml_analysis_results to flight_sessions, and returned nothing;
--   * the seed had no retention for telemetry at all.

SET LOCAL ROLE dbx_admin;

CREATE TABLE dbx_archive.flight_telemetry_archive (LIKE dbx_aviation.flight_telemetry)
    PARTITION BY RANGE (ts);
COMMENT ON TABLE dbx_archive.flight_telemetry_archive IS 'Archived telemetry partitions (moved, not copied, by archive_old_telemetry)';
CREATE UNIQUE INDEX flight_telemetry_archive_dedupe ON dbx_archive.flight_telemetry_archive (session_id, seq, ts);
CREATE INDEX flight_telemetry_archive_aircraft_ts ON dbx_archive.flight_telemetry_archive (aircraft_id, ts);
ALTER TABLE dbx_archive.flight_telemetry_archive ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON dbx_archive.flight_telemetry_archive
    USING (org_id = NULLIF(current_setting('app.current_org_id', true), '')::uuid);
GRANT SELECT ON dbx_archive.flight_telemetry_archive TO dbx_app_read;

CREATE FUNCTION dbx_aviation.telemetry_partitions()
RETURNS TABLE (
    partition_schema text,
    partition_name text,
    parent text,
    is_default boolean,
    range_start timestamptz,
    range_end timestamptz
)
LANGUAGE sql STABLE
SET search_path = pg_catalog
SET datestyle = 'ISO, YMD'
AS $$
    SELECT n.nspname::text,
           c.relname::text,
           format('%I.%I', pn.nspname, p.relname),
           b.expr = 'DEFAULT',
           substring(b.expr FROM $re$FROM \('([^']+)'\)$re$)::timestamptz,
           substring(b.expr FROM $re$TO \('([^']+)'\)$re$)::timestamptz
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_class p ON p.oid = i.inhparent
    JOIN pg_namespace pn ON pn.oid = p.relnamespace
    CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS expr) b
    WHERE (pn.nspname, p.relname) IN (('dbx_aviation', 'flight_telemetry'),
                                      ('dbx_archive', 'flight_telemetry_archive'))
    ORDER BY 5 NULLS LAST, 1, 2
$$;
COMMENT ON FUNCTION dbx_aviation.telemetry_partitions() IS 'Partitions of flight_telemetry and flight_telemetry_archive with their ranges (NULL for DEFAULT)';
GRANT EXECUTE ON FUNCTION dbx_aviation.telemetry_partitions() TO dbx_admin, dbx_ingest;

CREATE FUNCTION dbx_aviation.archive_old_telemetry(p_days integer DEFAULT 90)
RETURNS TABLE (archived_partition text, archived_from timestamptz, archived_to timestamptz)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
SET lock_timeout = '5s'
AS $$
DECLARE
    v_cutoff timestamptz;
    v_part   record;
    v_from   text;
    v_to     text;
BEGIN
    IF p_days IS NULL OR p_days < 1 THEN
        RAISE EXCEPTION 'archive_old_telemetry: p_days must be at least 1, got %', p_days
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_cutoff := now() - make_interval(days => p_days);

    FOR v_part IN
        SELECT tp.partition_schema, tp.partition_name, tp.range_start, tp.range_end
          FROM dbx_aviation.telemetry_partitions() tp
         WHERE tp.parent = 'dbx_aviation.flight_telemetry'
           AND NOT tp.is_default
           AND tp.range_end <= v_cutoff
         ORDER BY tp.range_start
    LOOP
        v_from := to_char(v_part.range_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00';
        v_to   := to_char(v_part.range_end AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00';
        BEGIN
            IF to_regclass(format('dbx_archive.%I', v_part.partition_name)) IS NOT NULL THEN
                RAISE EXCEPTION 'archive_old_telemetry: dbx_archive.% already exists', v_part.partition_name
                    USING ERRCODE = 'duplicate_table';
            END IF;
            EXECUTE format('ALTER TABLE dbx_aviation.flight_telemetry DETACH PARTITION %I.%I',
                           v_part.partition_schema, v_part.partition_name);
            EXECUTE format('ALTER TABLE %I.%I SET SCHEMA dbx_archive',
                           v_part.partition_schema, v_part.partition_name);
            -- Archived data is read-only for the daemon.
            EXECUTE format('REVOKE ALL ON dbx_archive.%I FROM dbx_ingest', v_part.partition_name);
            EXECUTE format('ALTER TABLE dbx_archive.flight_telemetry_archive ATTACH PARTITION dbx_archive.%I FOR VALUES FROM (%L) TO (%L)',
                           v_part.partition_name, v_from, v_to);
        EXCEPTION WHEN lock_not_available THEN
            RAISE WARNING 'archive_old_telemetry: %.% is busy (lock_timeout); skipped, the next run retries',
                v_part.partition_schema, v_part.partition_name;
            CONTINUE;
        END;
        archived_partition := format('dbx_archive.%I', v_part.partition_name);
        archived_from := v_part.range_start;
        archived_to := v_part.range_end;
        RETURN NEXT;
    END LOOP;
END
$$;
COMMENT ON FUNCTION dbx_aviation.archive_old_telemetry(integer) IS
    'Moves live telemetry partitions whose range ended at least p_days ago under dbx_archive.flight_telemetry_archive (detach, set schema, attach); returns them';

CREATE FUNCTION dbx_aviation.enforce_retention_policy()
RETURNS TABLE (deleted_analysis_results bigint, deleted_flight_sessions bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
DECLARE
    v_org      record;
    v_n        bigint;
    v_results  bigint := 0;
    v_sessions bigint := 0;
BEGIN
    FOR v_org IN
        SELECT o.org_id, now() - make_interval(days => o.data_retention_days) AS cutoff
          FROM dbx_aviation.organizations o
         ORDER BY o.org_id
    LOOP
        DELETE FROM dbx_aviation.ml_analysis_results mar
         WHERE mar.org_id = v_org.org_id AND mar.created_at < v_org.cutoff;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_results := v_results + v_n;

        DELETE FROM dbx_aviation.flight_sessions fs
         WHERE fs.org_id = v_org.org_id AND fs.created_at < v_org.cutoff;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_sessions := v_sessions + v_n;
    END LOOP;
    deleted_analysis_results := v_results;
    deleted_flight_sessions := v_sessions;
    RETURN NEXT;
END
$$;
COMMENT ON FUNCTION dbx_aviation.enforce_retention_policy() IS
    'Deletes analysis results and flight sessions older than their organization''s data_retention_days; returns the counts';

CREATE FUNCTION dbx_aviation.enforce_telemetry_retention(p_max_rows integer DEFAULT 100000)
RETURNS TABLE (dropped_partitions integer, deleted_rows bigint, more_pending boolean)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
SET lock_timeout = '5s'
AS $$
DECLARE
    v_max_days integer;
    v_drop_before timestamptz;
    v_part record;
    v_org record;
    v_n bigint;
    v_dropped integer := 0;
    v_deleted bigint := 0;
    v_budget bigint;
BEGIN
    IF p_max_rows IS NULL OR p_max_rows < 1 THEN
        RAISE EXCEPTION 'enforce_telemetry_retention: p_max_rows must be at least 1, got %', p_max_rows
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_budget := p_max_rows;

    SELECT max(o.data_retention_days) INTO v_max_days FROM dbx_aviation.organizations o;
    IF v_max_days IS NULL THEN
        -- No organization, no retention to apply (and nothing to decide "past every retention").
        dropped_partitions := 0; deleted_rows := 0; more_pending := false;
        RETURN NEXT;
        RETURN;
    END IF;
    v_drop_before := now() - make_interval(days => v_max_days);

    -- 1. Whole partitions past every organization's retention.
    FOR v_part IN
        SELECT tp.partition_schema, tp.partition_name
          FROM dbx_aviation.telemetry_partitions() tp
         WHERE NOT tp.is_default AND tp.range_end <= v_drop_before
         ORDER BY tp.range_start
    LOOP
        BEGIN
            EXECUTE format('DROP TABLE %I.%I', v_part.partition_schema, v_part.partition_name);
            v_dropped := v_dropped + 1;
            RAISE NOTICE 'enforce_telemetry_retention: dropped %.%', v_part.partition_schema, v_part.partition_name;
        EXCEPTION WHEN lock_not_available THEN
            RAISE WARNING 'enforce_telemetry_retention: %.% is busy (lock_timeout); skipped, the next run retries',
                v_part.partition_schema, v_part.partition_name;
        END;
    END LOOP;

    -- 2. Rows of organizations whose own retention has expired, in the partitions that remain.
    <<orgs>>
    FOR v_org IN
        SELECT o.org_id, now() - make_interval(days => o.data_retention_days) AS cutoff
          FROM dbx_aviation.organizations o
         WHERE o.data_retention_days < v_max_days
         ORDER BY o.data_retention_days, o.org_id
    LOOP
        FOR v_part IN
            SELECT tp.partition_schema, tp.partition_name
              FROM dbx_aviation.telemetry_partitions() tp
             WHERE tp.is_default OR tp.range_start < v_org.cutoff
             ORDER BY tp.range_start NULLS LAST
        LOOP
            EXIT orgs WHEN v_budget <= 0;
            -- ctid batch: bounded, and a TID scan for the delete itself.
            EXECUTE format(
                'DELETE FROM %1$I.%2$I WHERE ctid = ANY (ARRAY(
                     SELECT ctid FROM %1$I.%2$I WHERE org_id = $1 AND ts < $2 LIMIT $3))',
                v_part.partition_schema, v_part.partition_name)
              USING v_org.org_id, v_org.cutoff, v_budget;
            GET DIAGNOSTICS v_n = ROW_COUNT;
            v_deleted := v_deleted + v_n;
            v_budget := v_budget - v_n;
        END LOOP;
    END LOOP;

    dropped_partitions := v_dropped;
    deleted_rows := v_deleted;
    more_pending := v_budget <= 0;
    RETURN NEXT;
END
$$;
COMMENT ON FUNCTION dbx_aviation.enforce_telemetry_retention(integer) IS
    'Drops telemetry partitions (live or archived) past every organization''s retention, then deletes at most p_max_rows expired rows of shorter-retention organizations; call again while more_pending';

GRANT EXECUTE ON FUNCTION dbx_aviation.archive_old_telemetry(integer),
                          dbx_aviation.enforce_retention_policy(),
                          dbx_aviation.enforce_telemetry_retention(integer)
    TO dbx_admin;
