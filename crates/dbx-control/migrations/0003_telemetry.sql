-- 0003 telemetry: the partitioned dbx_aviation.flight_telemetry exactly per the DDL contract.
--
-- Creates (owned by dbx_admin)
--   * dbx_aviation.flight_telemetry PARTITION BY RANGE (ts); the column order is the COPY order;
--   * partitioned indexes flight_telemetry_dedupe UNIQUE (session_id, seq, ts) and
--     flight_telemetry_aircraft_ts (aircraft_id, ts);
--   * dbx_aviation.flight_telemetry_default, the DEFAULT partition: nothing is ever refused for
--     lack of a partition (a far-future or far-past point lands there);
--   * dbx_aviation.ensure_telemetry_partition(p_from, p_to) -> text (SECURITY DEFINER, dbx_admin):
--     creates the daily (flight_telemetry_pYYYYMMDD) or hourly (flight_telemetry_pYYYYMMDDHH)
--     partition for [p_from, p_to) if missing and returns its schema-qualified name. The child is
--     built standalone (indexes, a CHECK matching the bound so ATTACH needs no validation scan,
--     GRANT SELECT, INSERT to dbx_ingest) and then ATTACHed, which takes only SHARE UPDATE
--     EXCLUSIVE on the parent, so ingest keeps writing meanwhile. Rows of the new range that
--     already sit in the default partition are moved into the new child first (otherwise ATTACH
--     would fail). Idempotent; concurrent calls serialize on an advisory lock and tolerate a
--     concurrent creator;
--   * the partitions for today (UTC) and the next 3 days.
--
-- Seed bugs corrected
--   * the seed's telemetry is a plain table, and its archival reads a column named "timestamp"
--     that does not exist; here the column is ts and the table is range-partitioned by it.

SET LOCAL ROLE dbx_admin;

CREATE TABLE dbx_aviation.flight_telemetry (
    org_id uuid NOT NULL,
    aircraft_id uuid NOT NULL,
    session_id uuid NOT NULL,
    ts timestamptz NOT NULL,
    seq bigint NOT NULL,
    latitude double precision,
    longitude double precision,
    altitude_m real,
    ground_speed_mps real,
    vertical_speed_mps real,
    heading_deg real,
    roll_deg real,
    pitch_deg real,
    yaw_deg real,
    airspeed_mps real,
    battery_voltage real,
    battery_current real,
    battery_remaining_pct real,
    motor_rpm real[],
    control_surfaces real[],
    gps_fix smallint,
    satellites smallint,
    temperature_c real,
    extra jsonb
) PARTITION BY RANGE (ts);
COMMENT ON TABLE dbx_aviation.flight_telemetry IS 'Telemetry points, range-partitioned by ts (UTC days flight_telemetry_pYYYYMMDD or hours _pYYYYMMDDHH); column order = COPY order';

CREATE UNIQUE INDEX flight_telemetry_dedupe ON dbx_aviation.flight_telemetry (session_id, seq, ts);
CREATE INDEX flight_telemetry_aircraft_ts ON dbx_aviation.flight_telemetry (aircraft_id, ts);

CREATE TABLE dbx_aviation.flight_telemetry_default PARTITION OF dbx_aviation.flight_telemetry DEFAULT;
GRANT SELECT, INSERT ON dbx_aviation.flight_telemetry TO dbx_ingest;
GRANT SELECT, INSERT ON dbx_aviation.flight_telemetry_default TO dbx_ingest;

CREATE FUNCTION dbx_aviation.ensure_telemetry_partition(p_from timestamptz, p_to timestamptz)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, dbx_aviation, public
AS $$
DECLARE
    v_from_utc timestamp := p_from AT TIME ZONE 'UTC';
    v_name     text;
    v_qual     text;
    v_from_lit text;
    v_to_lit   text;
BEGIN
    IF p_from IS NULL OR p_to IS NULL OR p_to <= p_from THEN
        RAISE EXCEPTION 'ensure_telemetry_partition: invalid range [%, %)', p_from, p_to
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    IF p_to - p_from = interval '1 day' THEN
        IF v_from_utc <> date_trunc('day', v_from_utc) THEN
            RAISE EXCEPTION 'ensure_telemetry_partition: a daily partition must start at a UTC midnight, got %', p_from
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_name := 'flight_telemetry_p' || to_char(v_from_utc, 'YYYYMMDD');
    ELSIF p_to - p_from = interval '1 hour' THEN
        IF v_from_utc <> date_trunc('hour', v_from_utc) THEN
            RAISE EXCEPTION 'ensure_telemetry_partition: an hourly partition must start on a UTC hour, got %', p_from
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_name := 'flight_telemetry_p' || to_char(v_from_utc, 'YYYYMMDDHH24');
    ELSE
        RAISE EXCEPTION 'ensure_telemetry_partition: range [%, %) is neither one day nor one hour', p_from, p_to
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_qual := format('dbx_aviation.%I', v_name);

    -- Fast path: nothing to do, no lock taken.
    IF to_regclass(v_qual) IS NOT NULL THEN
        RETURN v_qual;
    END IF;

    -- Serialize creators (per database); then look again, the holder may have just created it.
    PERFORM pg_advisory_xact_lock(hashtext('dbx_aviation.flight_telemetry'), 0);
    IF to_regclass(v_qual) IS NOT NULL THEN
        RETURN v_qual;
    END IF;

    -- Bound literals independent of the session's TimeZone and DateStyle.
    v_from_lit := to_char(p_from AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00';
    v_to_lit   := to_char(p_to AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00';

    BEGIN
        EXECUTE format('CREATE TABLE %s (LIKE dbx_aviation.flight_telemetry INCLUDING DEFAULTS INCLUDING STORAGE INCLUDING COMPRESSION)', v_qual);
        EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I CHECK (ts >= %L::timestamptz AND ts < %L::timestamptz)',
                       v_qual, v_name || '_bound', v_from_lit, v_to_lit);
        -- Indexes built on the empty standalone table; ATTACH adopts them as the partitions of
        -- the parent's partitioned indexes instead of building new ones.
        EXECUTE format('CREATE UNIQUE INDEX %I ON %s (session_id, seq, ts)', v_name || '_dedupe', v_qual);
        EXECUTE format('CREATE INDEX %I ON %s (aircraft_id, ts)', v_name || '_aircraft_ts', v_qual);
        EXECUTE format('GRANT SELECT, INSERT ON %s TO dbx_ingest', v_qual);

        -- Points of this range that were written before the partition existed sit in the
        -- default partition; ATTACH refuses to proceed while they are there.
        EXECUTE format(
            'WITH moved AS (DELETE FROM dbx_aviation.flight_telemetry_default
                             WHERE ts >= %1$L::timestamptz AND ts < %2$L::timestamptz RETURNING *)
             INSERT INTO %3$s SELECT * FROM moved',
            v_from_lit, v_to_lit, v_qual);

        EXECUTE format('ALTER TABLE dbx_aviation.flight_telemetry ATTACH PARTITION %s FOR VALUES FROM (%L) TO (%L)',
                       v_qual, v_from_lit, v_to_lit);
    EXCEPTION WHEN duplicate_table OR unique_violation THEN
        -- Created by a caller whose commit our (stale) catalog view did not show yet.
        IF to_regclass(v_qual) IS NULL THEN
            RAISE;
        END IF;
    END;
    RETURN v_qual;
END
$$;
COMMENT ON FUNCTION dbx_aviation.ensure_telemetry_partition(timestamptz, timestamptz) IS
    'Creates (if missing) the daily/hourly telemetry partition for [p_from, p_to), named from p_from in UTC; returns its schema-qualified name. Idempotent, safe concurrently.';
REVOKE ALL ON FUNCTION dbx_aviation.ensure_telemetry_partition(timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dbx_aviation.ensure_telemetry_partition(timestamptz, timestamptz) TO dbx_ingest, dbx_admin;

-- Today (UTC) and the next three days.
DO $$
DECLARE
    v_day timestamptz := date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    i int;
BEGIN
    FOR i IN 0..3 LOOP
        -- Hours, not days: timestamptz + '1 day' follows the session's time zone (DST).
        PERFORM dbx_aviation.ensure_telemetry_partition(v_day + make_interval(hours => 24 * i),
                                                        v_day + make_interval(hours => 24 * (i + 1)));
    END LOOP;
END
$$;
