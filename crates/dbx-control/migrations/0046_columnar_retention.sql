-- 0046 columnar_retention: the SQL lifecycle function enforce_telemetry_retention works on
-- columnar partitions (partitions.archive_access_method = "columnar", issue 17 item 5).
--
-- Redefines (owner and grants kept: CREATE OR REPLACE)
--   * dbx_aviation.enforce_telemetry_retention(p_max_rows integer = 100000): same signature,
--     same results on heap partitions (ctid batches of at most the remaining budget). A
--     columnar partition (citus_columnar refuses DELETE: "UPDATE and CTID scans not supported
--     for ColumnarScan") that holds expired rows of an organization is turned heap, those rows
--     deleted, and turned columnar again, in the function's transaction: ALTER TABLE … SET
--     ACCESS METHOD on a single node, alter_table_set_access_method on a Citus coordinator.
--     All of the organization's expired rows in that partition go at once (a rewrite cannot
--     be chunked); they count against p_max_rows, so more_pending may say true once more than
--     needed. The daemon does not call this function: its retention task plans the same
--     rewrite itself (crates/dbx-control/src/partitions.rs, plan_columnar_retention).
--
-- Why the heap/delete/columnar round trip rather than copying the kept rows into a new table:
-- it keeps the partition's oid, name, indexes and grants on a single node, is the same three
-- statements on Citus, and rolls back whole with the transaction.

SET LOCAL ROLE dbx_admin;

CREATE OR REPLACE FUNCTION dbx_aviation.enforce_telemetry_retention(p_max_rows integer DEFAULT 100000)
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
    v_citus boolean := EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus');
    v_rel text;
    v_expired boolean;
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

    -- 1. Whole partitions past every organization's retention (heap or columnar alike).
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
            SELECT tp.partition_schema, tp.partition_name, coalesce(am.amname = 'columnar', false) AS columnar
              FROM dbx_aviation.telemetry_partitions() tp
              JOIN pg_namespace n ON n.nspname = tp.partition_schema
              JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = tp.partition_name
              LEFT JOIN pg_am am ON am.oid = c.relam
             WHERE tp.is_default OR tp.range_start < v_org.cutoff
             ORDER BY tp.range_start NULLS LAST
        LOOP
            EXIT orgs WHEN v_budget <= 0;
            v_rel := format('%I.%I', v_part.partition_schema, v_part.partition_name);
            IF v_part.columnar THEN
                EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE org_id = $1 AND ts < $2)', v_rel)
                   INTO v_expired USING v_org.org_id, v_org.cutoff;
                IF NOT v_expired THEN
                    CONTINUE;
                END IF;
                IF v_citus THEN
                    EXECUTE 'SELECT alter_table_set_access_method($1::regclass, ''heap'')' USING v_rel;
                ELSE
                    EXECUTE format('ALTER TABLE %s SET ACCESS METHOD heap', v_rel);
                END IF;
                EXECUTE format('DELETE FROM %s WHERE org_id = $1 AND ts < $2', v_rel)
                  USING v_org.org_id, v_org.cutoff;
                GET DIAGNOSTICS v_n = ROW_COUNT;
                IF v_citus THEN
                    EXECUTE 'SELECT alter_table_set_access_method($1::regclass, ''columnar'')' USING v_rel;
                ELSE
                    EXECUTE format('ALTER TABLE %s SET ACCESS METHOD columnar', v_rel);
                END IF;
            ELSE
                -- ctid batch: bounded, and a TID scan for the delete itself.
                EXECUTE format(
                    'DELETE FROM %1$s WHERE ctid = ANY (ARRAY(
                         SELECT ctid FROM %1$s WHERE org_id = $1 AND ts < $2 LIMIT $3))', v_rel)
                  USING v_org.org_id, v_org.cutoff, v_budget;
                GET DIAGNOSTICS v_n = ROW_COUNT;
            END IF;
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
