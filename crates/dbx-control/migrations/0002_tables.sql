-- 0002 tables: the application tables except telemetry (0003), and their indexes.
--
-- Creates (owned by dbx_admin)
--   * dbx_aviation.organizations      tenants; api_key_hash = hex(sha256(key)), UNIQUE (the daemon
--                                     authenticates by it); api_key_encrypted (pgcrypto, 0004);
--                                     ingest_points_per_sec (NULL = unlimited); data_retention_days;
--   * dbx_aviation.aircraft_registry  registration_number UNIQUE per organization;
--   * dbx_aviation.flight_sessions    exactly the DDL contract (ingest bookkeeping columns included),
--                                     plus departure_location / arrival_location geography(Point,4326)
--                                     generated from the coordinates, with GiST indexes, only when
--                                     PostGIS is installed;
--   * dbx_aviation.ml_analysis_results risk_level CHECK in (low, medium, high, critical);
--   * dbx_aviation.api_requests       one row per gateway handshake / admin HTTP request;
--   * dbx_audit.audit_log             the audit trail (filled by 0004's triggers);
--   * dbx_aviation.touch_updated_at() and BEFORE UPDATE triggers keeping updated_at current.
--
-- Column types chosen where the seed gives none: api_requests.status_code integer,
-- api_requests.response_time_ms double precision, api_requests.client_ip inet,
-- api_requests.request_id / audit_log.audit_id bigint identity.
--
-- Seed bugs corrected
--   * uuid_generate_v4() (uuid-ossp, never installed) -> gen_random_uuid();
--   * organizations.api_key_hash was not UNIQUE: two tenants could share a key hash;
--   * aircraft registration numbers were not unique per organization (the wire protocol
--     addresses aircraft by registration number);
--   * ml_analysis_results.session_id had no ON DELETE action, so the seed's retention function
--     failed with a foreign-key error whenever a result outlived its session's retention;
--     results now go with their session (ON DELETE CASCADE);
--   * risk_level was unconstrained although the analytics compare it to the four levels.

SET LOCAL ROLE dbx_admin;

CREATE FUNCTION dbx_aviation.touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION dbx_aviation.touch_updated_at() IS 'BEFORE UPDATE trigger: updated_at := now()';

-- organizations -----------------------------------------------------------------------------------
CREATE TABLE dbx_aviation.organizations (
    org_id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_code              varchar(50)  NOT NULL,
    org_name              varchar(255) NOT NULL,
    org_type              varchar(50)  NOT NULL,
    subscription_tier     varchar(50)  NOT NULL DEFAULT 'basic',
    api_key_hash          varchar(64)  NOT NULL,
    api_key_encrypted     bytea,
    api_rate_limit        integer      NOT NULL DEFAULT 1000 CHECK (api_rate_limit >= 0),
    ingest_points_per_sec integer               CHECK (ingest_points_per_sec > 0),
    storage_quota_gb      integer      NOT NULL DEFAULT 100 CHECK (storage_quota_gb >= 0),
    compliance_level      varchar(50)  NOT NULL DEFAULT 'standard',
    data_retention_days   integer      NOT NULL DEFAULT 365 CHECK (data_retention_days > 0),
    encryption_enabled    boolean      NOT NULL DEFAULT true,
    is_active             boolean      NOT NULL DEFAULT true,
    created_at            timestamptz  NOT NULL DEFAULT now(),
    updated_at            timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT organizations_org_code_key UNIQUE (org_code),
    CONSTRAINT organizations_api_key_hash_key UNIQUE (api_key_hash)
);
COMMENT ON TABLE dbx_aviation.organizations IS 'Tenants. API keys are never stored in clear: api_key_hash = hex(sha256(key)), api_key_encrypted = pgp_sym_encrypt(key, app.encryption_key)';
COMMENT ON COLUMN dbx_aviation.organizations.ingest_points_per_sec IS 'Ingest rate limit in points per second; NULL = unlimited';
COMMENT ON COLUMN dbx_aviation.organizations.data_retention_days IS 'Telemetry, sessions and analysis results older than this are deleted by the retention functions';

CREATE TRIGGER organizations_touch_updated_at
    BEFORE UPDATE ON dbx_aviation.organizations
    FOR EACH ROW EXECUTE FUNCTION dbx_aviation.touch_updated_at();

-- aircraft_registry -------------------------------------------------------------------------------
CREATE TABLE dbx_aviation.aircraft_registry (
    aircraft_id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id                uuid NOT NULL REFERENCES dbx_aviation.organizations (org_id),
    registration_number   varchar(50)  NOT NULL,
    aircraft_type         varchar(50)  NOT NULL,
    manufacturer          varchar(100),
    model                 varchar(100),
    specifications        jsonb        NOT NULL DEFAULT '{}'::jsonb,
    operational_status    varchar(50)  NOT NULL DEFAULT 'active',
    total_flight_hours    numeric(10,2) NOT NULL DEFAULT 0 CHECK (total_flight_hours >= 0),
    next_maintenance_date date,
    is_active             boolean      NOT NULL DEFAULT true,
    created_at            timestamptz  NOT NULL DEFAULT now(),
    updated_at            timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT aircraft_registry_org_registration_key UNIQUE (org_id, registration_number)
);
COMMENT ON TABLE dbx_aviation.aircraft_registry IS 'Fleet: aircraft per organization; registration_number is unique within an organization';
-- (org_id, registration_number) serves lookups by org; this one serves the analytics grouping.
CREATE INDEX aircraft_registry_org_type ON dbx_aviation.aircraft_registry (org_id, aircraft_type);

CREATE TRIGGER aircraft_registry_touch_updated_at
    BEFORE UPDATE ON dbx_aviation.aircraft_registry
    FOR EACH ROW EXECUTE FUNCTION dbx_aviation.touch_updated_at();

-- flight_sessions (DDL contract) ------------------------------------------------------------------
CREATE TABLE dbx_aviation.flight_sessions (
    session_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id uuid NOT NULL REFERENCES dbx_aviation.organizations (org_id),
    aircraft_id uuid NOT NULL REFERENCES dbx_aviation.aircraft_registry (aircraft_id),
    flight_number varchar(50),
    pilot_id varchar(100),
    actual_departure timestamptz,
    actual_arrival timestamptz,
    flight_duration_seconds integer,
    departure_latitude double precision,
    departure_longitude double precision,
    arrival_latitude double precision,
    arrival_longitude double precision,
    total_distance_km double precision NOT NULL DEFAULT 0,
    point_count bigint NOT NULL DEFAULT 0,
    last_seq bigint,
    last_latitude double precision,
    last_longitude double precision,
    flight_status varchar(20) NOT NULL DEFAULT 'active',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE dbx_aviation.flight_sessions IS 'Flights; departure/arrival/duration/point_count/total_distance_km and last_* are kept current by the ingest daemon in the telemetry transaction';
COMMENT ON COLUMN dbx_aviation.flight_sessions.last_seq IS 'Ingest high-water mark: largest point seq stored';
COMMENT ON COLUMN dbx_aviation.flight_sessions.last_latitude IS 'Latitude of the positioned point with the largest seq (distance is extended from it)';
COMMENT ON COLUMN dbx_aviation.flight_sessions.last_longitude IS 'Longitude of the positioned point with the largest seq';

CREATE INDEX flight_sessions_org_departure ON dbx_aviation.flight_sessions (org_id, actual_departure);
CREATE INDEX flight_sessions_aircraft_departure ON dbx_aviation.flight_sessions (aircraft_id, actual_departure);
CREATE INDEX flight_sessions_org_created ON dbx_aviation.flight_sessions (org_id, created_at);
CREATE INDEX flight_sessions_pilot ON dbx_aviation.flight_sessions (pilot_id) WHERE pilot_id IS NOT NULL;

CREATE TRIGGER flight_sessions_touch_updated_at
    BEFORE UPDATE ON dbx_aviation.flight_sessions
    FOR EACH ROW EXECUTE FUNCTION dbx_aviation.touch_updated_at();

-- PostGIS endpoints: generated from the coordinates the daemon keeps, so they are never stale and
-- the daemon need not know whether PostGIS is there. Only when the extension is installed.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'postgis') THEN
        EXECUTE $ddl$
            ALTER TABLE dbx_aviation.flight_sessions
              ADD COLUMN departure_location geography(Point, 4326) GENERATED ALWAYS AS (
                  CASE WHEN departure_latitude IS NOT NULL AND departure_longitude IS NOT NULL
                       THEN geography(ST_SetSRID(ST_MakePoint(departure_longitude, departure_latitude), 4326))
                  END) STORED,
              ADD COLUMN arrival_location geography(Point, 4326) GENERATED ALWAYS AS (
                  CASE WHEN arrival_latitude IS NOT NULL AND arrival_longitude IS NOT NULL
                       THEN geography(ST_SetSRID(ST_MakePoint(arrival_longitude, arrival_latitude), 4326))
                  END) STORED
        $ddl$;
        EXECUTE 'CREATE INDEX flight_sessions_departure_location ON dbx_aviation.flight_sessions USING gist (departure_location)';
        EXECUTE 'CREATE INDEX flight_sessions_arrival_location ON dbx_aviation.flight_sessions USING gist (arrival_location)';
    END IF;
END
$$;

-- ml_analysis_results -----------------------------------------------------------------------------
CREATE TABLE dbx_aviation.ml_analysis_results (
    analysis_id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    session_id             uuid REFERENCES dbx_aviation.flight_sessions (session_id) ON DELETE CASCADE,
    org_id                 uuid NOT NULL REFERENCES dbx_aviation.organizations (org_id),
    model_version          varchar(50) NOT NULL,
    detected_aircraft_type varchar(50),
    aircraft_confidence    numeric(5,4) CHECK (aircraft_confidence BETWEEN 0 AND 1),
    anomaly_detected       boolean NOT NULL DEFAULT false,
    anomaly_score          numeric(5,4),
    anomalies              jsonb,
    risk_score             numeric(5,4) CHECK (risk_score BETWEEN 0 AND 1),
    risk_level             varchar(20) CHECK (risk_level IN ('low', 'medium', 'high', 'critical')),
    shap_values            jsonb,
    ai_report_content      text,
    analysis_timestamp     timestamptz NOT NULL DEFAULT now(),
    created_at             timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE dbx_aviation.ml_analysis_results IS 'Per-flight analysis results written by the analysis side; read by dbx_analytics';
CREATE INDEX ml_analysis_results_session ON dbx_aviation.ml_analysis_results (session_id);
CREATE INDEX ml_analysis_results_org_analysis_ts ON dbx_aviation.ml_analysis_results (org_id, analysis_timestamp);
CREATE INDEX ml_analysis_results_org_created ON dbx_aviation.ml_analysis_results (org_id, created_at);

-- api_requests ------------------------------------------------------------------------------------
CREATE TABLE dbx_aviation.api_requests (
    request_id       bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    org_id           uuid REFERENCES dbx_aviation.organizations (org_id), -- NULL: refused before auth
    endpoint         varchar(255) NOT NULL,
    method           varchar(16)  NOT NULL,
    status_code      integer,
    response_time_ms double precision,
    client_ip        inet,
    user_agent       text,
    created_at       timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE dbx_aviation.api_requests IS 'Every gateway handshake (accepted or refused) and admin HTTP request, written in batches off the hot path';
CREATE INDEX api_requests_org_created ON dbx_aviation.api_requests (org_id, created_at);
CREATE INDEX api_requests_created ON dbx_aviation.api_requests (created_at);

-- audit_log ---------------------------------------------------------------------------------------
CREATE TABLE dbx_audit.audit_log (
    audit_id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id              uuid,            -- no FK: the trail outlives the organization
    user_id             uuid,
    action_type         varchar(50)  NOT NULL,
    table_name          varchar(128) NOT NULL,
    record_id           uuid,
    old_values          jsonb,
    new_values          jsonb,
    compliance_relevant boolean NOT NULL DEFAULT false,
    ip_address          inet,
    user_agent          text,
    created_at          timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE dbx_audit.audit_log IS 'Audit trail: one row per audited INSERT/UPDATE/DELETE; record_id is the audited row''s own key';
CREATE INDEX audit_log_org_created ON dbx_audit.audit_log (org_id, created_at);
CREATE INDEX audit_log_table_record ON dbx_audit.audit_log (table_name, record_id);
CREATE INDEX audit_log_created ON dbx_audit.audit_log (created_at);
