-- 0047 hot_session_updates: the writer's per-flush update of a flight session becomes a HOT
-- update (heap-only tuple: the new row version on the same page, no index touched).
--
-- Why: every flush updates each of its sessions twice (the claim of the upsert, then the
-- statistics: point count, mark, arrival, distance, last_point_at). PostgreSQL can make such an
-- update HOT only when no indexed column changes and the page has room. Before this migration
-- two indexed columns changed on every flush: last_point_at (0040's idle-completer index) and,
-- on the PostGIS branch, arrival_location (generated from the arrival coordinates, with a GiST
-- index). So each statistics update inserted into all eight indexes of flight_sessions, two of
-- them GiST. Measured on the fleet shape (2 000 gateways, 10-point batches, benches/RESULTS.md
-- "Where an ack's time goes"): the statistics statement took 27 ms of a flush on average, 9 ms
-- once HOT; 92 % of the updates were HOT afterwards, 39 % before.
--
-- Changes (owned by dbx_admin)
--   * index flight_sessions_active_last_point is replaced by flight_sessions_active
--     (session_id) WHERE flight_status = 'active': the idle completer still reads only the active
--     sessions (their number, never the history), then filters and orders them by last_point_at
--     (a sort of the active sessions, once per sessions.check_interval_secs);
--   * fillfactor 70 on flight_sessions: room on each page for the new versions of its rows, so
--     updates stay on the page (only new pages are affected; old ones fill in as rows churn);
--   * PostGIS branch: arrival_location is generated only for a completed flight (the arrival of
--     a flight still in the air is not known; its latest position is last_latitude and
--     last_longitude). The column is dropped and added again (PostgreSQL 15 cannot change a
--     generation expression in place), with its GiST index; completing a session fills it in.
--     No view or function reads it.

SET LOCAL ROLE dbx_admin;

DROP INDEX dbx_aviation.flight_sessions_active_last_point;
CREATE INDEX flight_sessions_active ON dbx_aviation.flight_sessions (session_id)
    WHERE flight_status = 'active';

ALTER TABLE dbx_aviation.flight_sessions SET (fillfactor = 70);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                WHERE attrelid = 'dbx_aviation.flight_sessions'::regclass
                  AND attname = 'arrival_location' AND NOT attisdropped) THEN
        EXECUTE $ddl$
            ALTER TABLE dbx_aviation.flight_sessions DROP COLUMN arrival_location
        $ddl$;
        EXECUTE $ddl$
            ALTER TABLE dbx_aviation.flight_sessions
              ADD COLUMN arrival_location geography(Point, 4326) GENERATED ALWAYS AS (
                  CASE WHEN flight_status = 'completed'
                        AND arrival_latitude IS NOT NULL AND arrival_longitude IS NOT NULL
                       THEN geography(ST_SetSRID(ST_MakePoint(arrival_longitude, arrival_latitude), 4326))
                  END) STORED
        $ddl$;
        EXECUTE 'CREATE INDEX flight_sessions_arrival_location ON dbx_aviation.flight_sessions USING gist (arrival_location)';
        EXECUTE $ddl$
            COMMENT ON COLUMN dbx_aviation.flight_sessions.arrival_location IS
                'Where a completed flight arrived (from arrival_latitude/longitude); NULL while the flight is active'
        $ddl$;
    END IF;
END
$$;
