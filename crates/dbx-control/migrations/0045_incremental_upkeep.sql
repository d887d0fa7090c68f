-- 0045 incremental_upkeep: dbx_analytics.telemetry_daily_aircraft kept per day instead of a
-- materialized view refreshed from all of flight_telemetry, so that its upkeep grows with the
-- data that changed, not with history (issue 20, "maintenance is O(new data)").
--
-- Changes (owned by dbx_admin)
--   * dbx_analytics.telemetry_daily_aircraft is now a TABLE with the same name, the same columns
--     in the same order and types (aircraft_id, org_id, day, points, flight_time_seconds,
--     max_altitude_m, max_ground_speed_mps, min_battery_pct), PRIMARY KEY (aircraft_id, day)
--     (constraint telemetry_daily_aircraft_key, the old unique index's name) and the index
--     telemetry_daily_aircraft_org_day (org_id, day). As before: no grant to readers, who read
--     dbx_analytics.org_telemetry_daily (dropped with the materialized view and recreated as it
--     was, with its grant);
--   * dbx_analytics.telemetry_daily_state (relid, relname, days, changes, computed_at): per live
--     partition of flight_telemetry (and its default partition), the UTC days its rows were
--     aggregated into and its write counter (pg_stat n_tup_ins + n_tup_upd + n_tup_del) when they
--     were. Bookkeeping of the function below; nobody else reads or writes it;
--   * dbx_analytics.maintain_telemetry_daily_aircraft(p_now timestamptz, p_full boolean = false)
--     -> SETOF date (the days recomputed). SECURITY DEFINER, executable by dbx_ingest and
--     dbx_admin. A day is recomputed (its rows deleted and aggregated again from the live table,
--     with the old view's query restricted to that day, which prunes to that day's partitions)
--     when
--       - it is open: on or after the UTC day before p_now (today, yesterday, premade days);
--       - a live partition covering it is new, or was written since its day was last computed
--         (its write counter differs: late points, a backfill, the sweep moving rows in,
--         retention deleting rows);
--       - a live partition covering it left the live table (archived or dropped: as the old
--         view read the live table only, its rows then leave the aggregate);
--       - the default partition was written since it was last looked at, for the days it holds
--         now and held then;
--       - p_full (every day of the live table and of the aggregate: a repair, O(history)).
--     Days closed and untouched are never read again, so a run costs the open days plus what
--     changed. Runs are serialized by a transaction-level advisory lock;
--   * dbx_analytics.refresh_telemetry_daily_aircraft(p_concurrently boolean = true) keeps its
--     signature and grants: true = the incremental upkeep above at now(), false = the full
--     recompute (readers are never blocked either way: rows change inside one transaction).
--   * dbx_aviation.retention_state (relid, org_id, changes, checked_at): per telemetry partition
--     (live or archived) wholly past an organization's retention cutoff, the partition's write
--     counter when the control plane's retention last found none of that organization's rows
--     in it. Retention skips such a pair until the counter changes, instead of scanning every
--     partition between the shortest and the longest retention every hour. Written and read by
--     the partition manager (dbx_admin) only.
--
-- Why the pg_stat write counters mark dirty days (and retention's clean partitions): they cost the ingest path nothing (no trigger,
-- no extra statement in the batcher's transaction) and count every writer (the daemon, the
-- sweep, retention, a backfill by hand). They are not transactional, so the function reads them
-- BEFORE it aggregates: a write committed after the aggregation is counted later and makes its
-- day dirty at a later run; one committed before is in the aggregate (and may cost one extra
-- recompute). A backend reports its counts within about a second of going idle (at most 60 s
-- under continuous load, and at its exit); a crash of PostgreSQL or pg_stat_reset() resets the
-- counters, which makes every day dirty once (a full recompute, logged by the caller's report).
-- With track_counts off nothing would be counted: the function then warns and keeps closed days
-- as they are (refresh_telemetry_daily_aircraft(false) recomputes everything on demand).
--
-- Migration cost: the table is filled once here from the live table (one scan, as the old
-- view's creation did); later runs never scan it whole.

SET LOCAL ROLE dbx_admin;

-- org_telemetry_daily depends on the materialized view: dropped with it, recreated below.
DROP MATERIALIZED VIEW dbx_analytics.telemetry_daily_aircraft CASCADE;

CREATE TABLE dbx_analytics.telemetry_daily_aircraft (
    aircraft_id uuid NOT NULL,
    org_id uuid NOT NULL,
    day date NOT NULL,
    points bigint NOT NULL,
    flight_time_seconds double precision,
    max_altitude_m real,
    max_ground_speed_mps real,
    min_battery_pct real,
    CONSTRAINT telemetry_daily_aircraft_key PRIMARY KEY (aircraft_id, day)
);
COMMENT ON TABLE dbx_analytics.telemetry_daily_aircraft IS
    'Per aircraft per UTC day of the live telemetry: points, flight time (per-session span within the day, summed), max altitude, max ground speed, min battery. Kept by maintain_telemetry_daily_aircraft (open and changed days only). All tenants: readers use org_telemetry_daily';
CREATE INDEX telemetry_daily_aircraft_org_day ON dbx_analytics.telemetry_daily_aircraft (org_id, day);

CREATE VIEW dbx_analytics.org_telemetry_daily WITH (security_barrier = true) AS
SELECT d.aircraft_id, d.org_id, d.day, d.points, d.flight_time_seconds,
       d.max_altitude_m, d.max_ground_speed_mps, d.min_battery_pct
FROM dbx_analytics.telemetry_daily_aircraft d
WHERE d.org_id = NULLIF(current_setting('app.current_org_id', true), '')::uuid;
COMMENT ON VIEW dbx_analytics.org_telemetry_daily IS 'telemetry_daily_aircraft rows of the organization set by set_org_context';
GRANT SELECT ON dbx_analytics.org_telemetry_daily TO dbx_app_read, dbx_app_write, dbx_admin;

CREATE TABLE dbx_analytics.telemetry_daily_state (
    relid oid PRIMARY KEY,
    relname text NOT NULL,
    days date[] NOT NULL,
    changes bigint NOT NULL,
    computed_at timestamptz NOT NULL
);
COMMENT ON TABLE dbx_analytics.telemetry_daily_state IS
    'Bookkeeping of maintain_telemetry_daily_aircraft: per live telemetry partition, the UTC days aggregated from it and its pg_stat write counter (n_tup_ins + n_tup_upd + n_tup_del) at that time';

-- One live partition as maintain_telemetry_daily_aircraft sees it.
CREATE TYPE dbx_analytics.telemetry_daily_part AS (
    relid oid,
    relname text,
    is_default boolean,
    days date[],
    changes bigint
);
COMMENT ON TYPE dbx_analytics.telemetry_daily_part IS
    'A live telemetry partition: its UTC days (NULL for the default partition) and its pg_stat write counter';

CREATE FUNCTION dbx_analytics.maintain_telemetry_daily_aircraft(
    p_now timestamptz,
    p_full boolean DEFAULT false
)
RETURNS SETOF date
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
DECLARE
    v_open    date;
    v_parts   dbx_analytics.telemetry_daily_part[];
    v_default record;
    v_dirty   date[];
    v_day     date;
BEGIN
    IF p_now IS NULL THEN
        RAISE EXCEPTION 'maintain_telemetry_daily_aircraft: p_now must be set'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Counters are read before the aggregation; that order is sound only if the aggregation
    -- sees what committed after the read, i.e. under READ COMMITTED.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'maintain_telemetry_daily_aircraft must run under READ COMMITTED, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('dbx_analytics.telemetry_daily_aircraft'), 0);
    IF NOT current_setting('track_counts')::boolean AND NOT p_full THEN
        RAISE WARNING 'track_counts is off: telemetry_daily_aircraft recomputes only its open days; days changed later need refresh_telemetry_daily_aircraft(false)';
    END IF;
    v_open := (p_now AT TIME ZONE 'UTC')::date - 1;
    -- Fresh counters, not a snapshot cached earlier in this transaction.
    PERFORM pg_stat_clear_snapshot();
    v_parts := ARRAY(
        SELECT ROW(c.oid, tp.partition_name, tp.is_default,
                   CASE WHEN tp.is_default THEN NULL ELSE ARRAY(
                       SELECT d::date FROM generate_series(
                           (tp.range_start AT TIME ZONE 'UTC')::date,
                           ((tp.range_end AT TIME ZONE 'UTC') - interval '1 microsecond')::date,
                           interval '1 day') d) END,
                   pg_stat_get_tuples_inserted(c.oid) + pg_stat_get_tuples_updated(c.oid)
                     + pg_stat_get_tuples_deleted(c.oid))::dbx_analytics.telemetry_daily_part
          FROM dbx_aviation.telemetry_partitions() tp
          JOIN pg_namespace n ON n.nspname = tp.partition_schema
          JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = tp.partition_name
         WHERE tp.partition_schema = 'dbx_aviation');

    -- Days of live partitions: open, new, written since, or everything (p_full).
    v_dirty := ARRAY(
        SELECT d
          FROM unnest(v_parts) p
          LEFT JOIN dbx_analytics.telemetry_daily_state s ON s.relid = p.relid
         CROSS JOIN LATERAL unnest(p.days) d
         WHERE NOT p.is_default
           AND (p_full OR d >= v_open OR s.relid IS NULL OR s.changes <> p.changes));
    -- Days of partitions that left the live table (archived, dropped).
    v_dirty := v_dirty || ARRAY(
        SELECT d
          FROM dbx_analytics.telemetry_daily_state s
         CROSS JOIN LATERAL unnest(s.days) d
         WHERE s.relid NOT IN (SELECT p.relid FROM unnest(v_parts) p));
    -- The default partition: when written since last looked at, the days it holds now and
    -- those it held then (rows moved out or deleted). Read whole: it is small, the sweep
    -- empties it every few minutes.
    SELECT p.relid, p.changes, s.days AS old_days, s.changes AS old_changes
      INTO v_default
      FROM unnest(v_parts) p
      LEFT JOIN dbx_analytics.telemetry_daily_state s ON s.relid = p.relid
     WHERE p.is_default;
    IF FOUND THEN
        IF p_full OR v_default.old_changes IS DISTINCT FROM v_default.changes THEN
            v_default.old_days := coalesce(v_default.old_days, '{}');
            v_dirty := v_dirty || v_default.old_days;
            v_default.old_days := ARRAY(SELECT DISTINCT (t.ts AT TIME ZONE 'UTC')::date
                                          FROM dbx_aviation.flight_telemetry_default t);
            v_dirty := v_dirty || v_default.old_days;
        END IF;
        v_parts := ARRAY(
            SELECT ROW(p.relid, p.relname, p.is_default,
                       CASE WHEN p.is_default THEN coalesce(v_default.old_days, '{}') ELSE p.days END,
                       p.changes)::dbx_analytics.telemetry_daily_part
              FROM unnest(v_parts) p);
    END IF;
    IF p_full THEN
        v_dirty := v_dirty || ARRAY(SELECT DISTINCT a.day FROM dbx_analytics.telemetry_daily_aircraft a);
    END IF;

    FOR v_day IN SELECT DISTINCT u FROM unnest(v_dirty) u ORDER BY u LOOP
        DELETE FROM dbx_analytics.telemetry_daily_aircraft a WHERE a.day = v_day;
        -- The old view's query, for this day's rows only: the range prunes to its partitions.
        INSERT INTO dbx_analytics.telemetry_daily_aircraft
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
            WHERE t.ts >= (v_day::timestamp AT TIME ZONE 'UTC')
              AND t.ts < ((v_day + 1)::timestamp AT TIME ZONE 'UTC')
            GROUP BY t.aircraft_id, t.org_id, (t.ts AT TIME ZONE 'UTC')::date, t.session_id
        )
        SELECT
            ps.aircraft_id,
            ps.org_id,
            ps.day,
            sum(ps.points)::bigint,
            sum(ps.span_seconds)::double precision,
            max(ps.max_altitude_m),
            max(ps.max_ground_speed_mps),
            min(ps.min_battery_pct)
        FROM per_session ps
        GROUP BY ps.aircraft_id, ps.org_id, ps.day;
        RETURN NEXT v_day;
    END LOOP;

    DELETE FROM dbx_analytics.telemetry_daily_state s
     WHERE s.relid NOT IN (SELECT p.relid FROM unnest(v_parts) p);
    INSERT INTO dbx_analytics.telemetry_daily_state AS s (relid, relname, days, changes, computed_at)
    SELECT p.relid, p.relname, p.days, p.changes, p_now
      FROM unnest(v_parts) p
    ON CONFLICT (relid) DO UPDATE
       SET relname = excluded.relname, days = excluded.days, changes = excluded.changes,
           computed_at = CASE WHEN s.changes = excluded.changes AND s.days = excluded.days
                              THEN s.computed_at ELSE excluded.computed_at END;
    RETURN;
END
$$;
COMMENT ON FUNCTION dbx_analytics.maintain_telemetry_daily_aircraft(timestamptz, boolean) IS
    'Recomputes the telemetry_daily_aircraft days that are open (from the UTC day before p_now) or changed since last computed (pg_stat write counters of the live partitions); all of them with p_full. Returns the days recomputed';
REVOKE ALL ON FUNCTION dbx_analytics.maintain_telemetry_daily_aircraft(timestamptz, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dbx_analytics.maintain_telemetry_daily_aircraft(timestamptz, boolean)
    TO dbx_admin, dbx_ingest;

CREATE OR REPLACE FUNCTION dbx_analytics.refresh_telemetry_daily_aircraft(p_concurrently boolean DEFAULT true)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
BEGIN
    PERFORM dbx_analytics.maintain_telemetry_daily_aircraft(now(), NOT coalesce(p_concurrently, true));
END
$$;
COMMENT ON FUNCTION dbx_analytics.refresh_telemetry_daily_aircraft(boolean) IS
    'Brings telemetry_daily_aircraft up to date: true = open and changed days only, false = every day (readers are never blocked)';

CREATE TABLE dbx_aviation.retention_state (
    relid bigint NOT NULL,
    org_id uuid NOT NULL,
    changes bigint NOT NULL,
    checked_at timestamptz NOT NULL,
    PRIMARY KEY (relid, org_id)
);
COMMENT ON TABLE dbx_aviation.retention_state IS
    'Bookkeeping of the control plane''s retention: telemetry partitions (pg_class oid) wholly past an organization''s cutoff found without its rows, with their pg_stat write counter then';

SELECT count(*) FROM dbx_analytics.maintain_telemetry_daily_aircraft(now(), true);
