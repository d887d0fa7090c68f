//! The migrations against a real PostgreSQL (dbx-testkit): every object of docs/schema.md is
//! created, and each one is exercised with known data and checked number by number. These
//! cases run once per branch of the schema, each time in its own test binary: `schema` on the
//! PostGIS branch, `schema_plain` on the plain one ([`crate::POSTGIS`]).
//!
//! Roles are cluster-wide and the tests of this file run in parallel, each migrating its own
//! database of the same cluster: that alone exercises the idempotent, race-tolerant role
//! creation of migration 0001.

use std::io::Cursor;

use dbx_control::migrate::{self, Applied, MigrateError, MigrationState, MIGRATIONS};
use dbx_control::postgis::PostgisMode;
use dbx_testkit::TestDb;
use futures::SinkExt;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::common::{count, new_org};
use crate::POSTGIS;

/// Password every test gives the login users (the same everywhere: roles are cluster-wide).
const TEST_PASSWORD: &str = "dbx-schema-test-pw";

/// Applies the migrations on this binary's branch of the schema.
async fn apply(client: &mut Client) -> Result<Vec<Applied>, MigrateError> {
    migrate::apply_with(client, POSTGIS).await
}

/// A fresh database with every migration applied, and a superuser client to it.
pub(crate) async fn migrated() -> (TestDb, Client) {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let applied = apply(&mut client)
        .await
        .unwrap_or_else(|e| panic!("migrating a fresh database: {e}"));
    assert_eq!(applied.len(), MIGRATIONS.len());
    (db, client)
}

/// Connects as one of the login users. Passwords are set once per process (concurrent
/// ALTER ROLE of one role fails with "tuple concurrently updated").
pub(crate) async fn connect_as(db: &TestDb, superuser: &Client, user: &str) -> Client {
    static PASSWORDS: OnceCell<()> = OnceCell::const_new();
    PASSWORDS
        .get_or_init(|| async {
            for u in [
                "dbx_api_service",
                "dbx_analytics_service",
                "dbx_ingest_service",
            ] {
                superuser
                    .batch_execute(&format!("ALTER ROLE {u} PASSWORD '{TEST_PASSWORD}'"))
                    .await
                    .unwrap_or_else(|e| panic!("setting the password of {u}: {e}"));
            }
        })
        .await;
    dbx_testkit::connect(&db.url_for(user, TEST_PASSWORD)).await
}

/// `next_maintenance` is an SQL expression (e.g. `current_date - 5`, `NULL`).
pub(crate) async fn new_aircraft(
    c: &Client,
    org: Uuid,
    registration: &str,
    aircraft_type: &str,
    next_maintenance: &str,
) -> Uuid {
    c.query_one(
        &format!(
            "INSERT INTO dbx_aviation.aircraft_registry (org_id, registration_number, aircraft_type, next_maintenance_date)
             VALUES ($1, $2, $3, {next_maintenance}) RETURNING aircraft_id"
        ),
        &[&org, &registration, &aircraft_type],
    )
    .await
    .unwrap()
    .get(0)
}

/// `departure` is an SQL expression.
pub(crate) async fn new_session(c: &Client, org: Uuid, aircraft: Uuid, departure: &str) -> Uuid {
    c.query_one(
        &format!(
            "INSERT INTO dbx_aviation.flight_sessions (org_id, aircraft_id, actual_departure)
             VALUES ($1, $2, {departure}) RETURNING session_id"
        ),
        &[&org, &aircraft],
    )
    .await
    .unwrap()
    .get(0)
}

/// One analysis result; `risk` and `anomalies` are SQL expressions.
async fn new_result(
    c: &Client,
    org: Uuid,
    session: Uuid,
    risk: &str,
    level: &str,
    anomaly: bool,
    anomalies: &str,
) {
    c.execute(
        &format!(
            "INSERT INTO dbx_aviation.ml_analysis_results
               (session_id, org_id, model_version, risk_score, risk_level, anomaly_detected, anomalies)
             VALUES ($1, $2, 'v1', {risk}, $3, $4, {anomalies})"
        ),
        &[&session, &org, &level, &anomaly],
    )
    .await
    .unwrap();
}

/// Inserts one telemetry point; `ts` is an SQL expression.
async fn point(c: &Client, org: Uuid, aircraft: Uuid, session: Uuid, seq: i64, ts: &str) {
    c.execute(
        &format!(
            "INSERT INTO dbx_aviation.flight_telemetry (org_id, aircraft_id, session_id, ts, seq)
             VALUES ($1, $2, $3, {ts}, $4)"
        ),
        &[&org, &aircraft, &session, &seq],
    )
    .await
    .unwrap();
}

/// Creates the daily partition starting `days_from_today` UTC days from today; returns its name.
async fn day_partition(c: &Client, days_from_today: i32) -> String {
    c.query_one(
        "SELECT dbx_aviation.ensure_telemetry_partition(d, d + interval '24 hours')
           FROM (SELECT (date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
                        + make_interval(hours => 24 * $1) AS d) x",
        &[&days_from_today],
    )
    .await
    .unwrap()
    .get(0)
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<&SqlState> {
    e.code()
}

// ----------------------------------------------------------------------------------------------
// Runner
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_flight_session_endpoints_are_on_this_binarys_branch() {
    let (_db, c) = migrated().await;
    let extension = count(
        &c,
        "SELECT count(*) FROM pg_extension WHERE extname = 'postgis'",
    )
    .await;
    let columns: Vec<(String, String, String)> = c
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod), attgenerated::text
               FROM pg_attribute
              WHERE attrelid = 'dbx_aviation.flight_sessions'::regclass AND attnum > 0
                AND NOT attisdropped AND attname LIKE '%location'
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let gist: Vec<String> = c
        .query(
            "SELECT indexname::text FROM pg_indexes
              WHERE schemaname = 'dbx_aviation' AND tablename = 'flight_sessions'
                AND indexdef LIKE '%USING gist%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    match POSTGIS {
        PostgisMode::Require => {
            assert_eq!(extension, 1);
            let generated = |name: &str| {
                (
                    name.to_string(),
                    "geography(Point,4326)".to_string(),
                    "s".to_string(),
                )
            };
            assert_eq!(
                columns,
                vec![
                    generated("arrival_location"),
                    generated("departure_location")
                ]
            );
            assert_eq!(
                gist,
                vec![
                    "flight_sessions_arrival_location",
                    "flight_sessions_departure_location"
                ]
            );
        }
        PostgisMode::Off => {
            assert_eq!(extension, 0, "postgis = off leaves no extension behind");
            assert!(columns.is_empty(), "{columns:?}");
            assert!(gist.is_empty(), "{gist:?}");
        }
        PostgisMode::Auto => panic!("each schema binary names its branch"),
    }
}

#[tokio::test]
async fn migrations_apply_once_and_a_second_apply_is_a_noop() {
    let db = TestDb::new().await;
    let mut c = db.client().await;

    let before = migrate::status(&c).await.unwrap();
    assert_eq!(before.len(), MIGRATIONS.len());
    assert!(before.iter().all(|s| s.state == MigrationState::Pending));

    let applied = apply(&mut c).await.unwrap();
    let versions: Vec<i32> = applied.iter().map(|a| a.version).collect();
    let expected: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(versions, expected);
    assert_eq!(applied[2].name, "telemetry");

    let again = apply(&mut c).await.unwrap();
    assert!(again.is_empty(), "second apply applied {again:?}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM dbx_aviation.schema_migrations").await,
        MIGRATIONS.len() as i64
    );

    let rows = c
        .query(
            "SELECT version, name, checksum FROM dbx_aviation.schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    for (row, m) in rows.iter().zip(MIGRATIONS) {
        assert_eq!(row.get::<_, i32>(0), m.version);
        assert_eq!(row.get::<_, String>(1), m.name);
        let expected = hex::encode(Sha256::digest(m.sql.as_bytes()));
        assert_eq!(row.get::<_, String>(2), expected);
    }

    let after = migrate::status(&c).await.unwrap();
    assert!(after.iter().all(|s| matches!(
        s.state,
        MigrationState::Applied {
            checksum_matches: true,
            ..
        }
    )));
}

#[tokio::test]
async fn the_seven_tables_exist_owned_by_dbx_admin() {
    let (_db, c) = migrated().await;
    let rows = c
        .query(
            "SELECT n.nspname || '.' || c.relname, pg_get_userbyid(c.relowner)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p') AND n.nspname IN ('dbx_aviation', 'dbx_audit')
                AND c.relname IN ('organizations', 'aircraft_registry', 'flight_sessions', 'flight_telemetry',
                                  'ml_analysis_results', 'api_requests', 'audit_log')
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        names,
        vec![
            "dbx_audit.audit_log",
            "dbx_aviation.aircraft_registry",
            "dbx_aviation.api_requests",
            "dbx_aviation.flight_sessions",
            "dbx_aviation.flight_telemetry",
            "dbx_aviation.ml_analysis_results",
            "dbx_aviation.organizations",
        ]
    );
    for r in &rows {
        assert_eq!(
            r.get::<_, String>(1),
            "dbx_admin",
            "{}",
            r.get::<_, String>(0)
        );
    }
    // Schemas, the four of docs/schema.md, owned by dbx_admin too.
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_namespace WHERE pg_get_userbyid(nspowner) = 'dbx_admin'
               AND nspname IN ('dbx_aviation', 'dbx_analytics', 'dbx_audit', 'dbx_archive')"
        )
        .await,
        4
    );
    // Roles: ingest bypasses RLS, readers and writers do not; users are in their groups.
    let row = c
        .query_one(
            "SELECT (SELECT rolbypassrls FROM pg_roles WHERE rolname = 'dbx_ingest')
                    AND (SELECT rolbypassrls FROM pg_roles WHERE rolname = 'dbx_ingest_service'),
                    (SELECT rolbypassrls FROM pg_roles WHERE rolname = 'dbx_app_read'),
                    pg_has_role('dbx_api_service', 'dbx_app_write', 'MEMBER'),
                    pg_has_role('dbx_api_service', 'dbx_app_read', 'MEMBER'),
                    pg_has_role('dbx_analytics_service', 'dbx_app_read', 'MEMBER'),
                    pg_has_role('dbx_analytics_service', 'dbx_app_write', 'MEMBER'),
                    pg_has_role('dbx_ingest_service', 'dbx_ingest', 'MEMBER')",
            &[],
        )
        .await
        .unwrap();
    let flags: Vec<bool> = (0..7).map(|i| row.get(i)).collect();
    assert_eq!(flags, vec![true, false, true, true, true, false, true]);
    // Every column docs/schema.md names for organizations.
    let cols: Vec<String> = c
        .query(
            "SELECT column_name::text FROM information_schema.columns
              WHERE table_schema = 'dbx_aviation' AND table_name = 'organizations' ORDER BY ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for wanted in [
        "org_id",
        "org_code",
        "org_name",
        "org_type",
        "subscription_tier",
        "api_key_hash",
        "api_key_encrypted",
        "api_rate_limit",
        "ingest_points_per_sec",
        "storage_quota_gb",
        "compliance_level",
        "data_retention_days",
        "encryption_enabled",
        "is_active",
        "created_at",
        "updated_at",
    ] {
        assert!(
            cols.iter().any(|c| c == wanted),
            "organizations.{wanted} missing"
        );
    }
}

#[tokio::test]
async fn a_tampered_checksum_is_refused_naming_the_migration() {
    let (_db, mut c) = migrated().await;
    c.execute(
        "UPDATE dbx_aviation.schema_migrations SET checksum = 'x' WHERE version = 3",
        &[],
    )
    .await
    .unwrap();
    let err = apply(&mut c).await.unwrap_err();
    match &err {
        MigrateError::ChecksumMismatch { version, name } => {
            assert_eq!(*version, 3);
            assert_eq!(name, "telemetry");
        }
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
    assert!(
        err.to_string()
            .starts_with("migration 0003 (telemetry) was changed after it was applied: "),
        "{err}"
    );
    let st = migrate::status(&c).await.unwrap();
    assert!(matches!(
        st[2].state,
        MigrationState::Applied {
            checksum_matches: false,
            ..
        }
    ));
    assert!(matches!(
        st[1].state,
        MigrationState::Applied {
            checksum_matches: true,
            ..
        }
    ));
}

#[tokio::test]
async fn a_database_newer_than_the_binary_is_refused() {
    let (_db, mut c) = migrated().await;
    c.execute(
        "INSERT INTO dbx_aviation.schema_migrations (version, name, checksum) VALUES (9042, 'from_the_future', 'abc')",
        &[],
    )
    .await
    .unwrap();
    let err = apply(&mut c).await.unwrap_err();
    match &err {
        MigrateError::DatabaseNewer {
            version,
            name,
            latest_known,
        } => {
            let latest = MIGRATIONS.last().map_or(0, |m| m.version);
            assert_eq!(
                (*version, name.as_str(), *latest_known),
                (9042, "from_the_future", latest)
            );
        }
        other => panic!("expected DatabaseNewer, got {other:?}"),
    }
    assert!(err.to_string().contains("9042 (from_the_future)"), "{err}");
    let st = migrate::status(&c).await.unwrap();
    assert_eq!(st.len(), MIGRATIONS.len() + 1);
    assert!(matches!(
        st[MIGRATIONS.len()].state,
        MigrationState::UnknownToBinary { .. }
    ));
}

#[tokio::test]
async fn two_runners_on_one_database_serialize() {
    let db = TestDb::new().await;
    let mut a = db.client().await;
    let mut b = db.client().await;
    let (ra, rb) = tokio::join!(apply(&mut a), apply(&mut b));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(
        ra.len() + rb.len(),
        MIGRATIONS.len(),
        "each migration applied exactly once"
    );
    assert_eq!(
        count(&a, "SELECT count(*) FROM dbx_aviation.schema_migrations").await,
        MIGRATIONS.len() as i64
    );
}

#[tokio::test]
async fn database_errors_keep_their_sqlstate() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let e = c
        .query("SELECT * FROM no_such_table", &[])
        .await
        .unwrap_err();
    let err = MigrateError::from(e);
    let text = err.to_string();
    assert!(text.contains("[SQLSTATE 42P01]"), "{text}");
    assert!(text.contains("no_such_table"), "{text}");
}

// ----------------------------------------------------------------------------------------------
// Telemetry partitions
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn partitions_for_today_and_three_days_and_a_default_partition() {
    let (_db, c) = migrated().await;
    // Expected names from the migration's own clock (applied_at is its transaction's now()).
    let expected: Vec<String> = c
        .query(
            "SELECT 'flight_telemetry_p' || to_char((applied_at AT TIME ZONE 'UTC')::date + i, 'YYYYMMDD')
               FROM dbx_aviation.schema_migrations, generate_series(0, 3) i
              WHERE version = 3 ORDER BY i",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let rows = c
        .query(
            "SELECT partition_name, is_default, extract(epoch FROM range_end - range_start)::bigint
               FROM dbx_aviation.telemetry_partitions() WHERE parent = 'dbx_aviation.flight_telemetry'",
            &[],
        )
        .await
        .unwrap();
    let daily: Vec<String> = rows
        .iter()
        .filter(|r| !r.get::<_, bool>(1))
        .map(|r| r.get(0))
        .collect();
    assert_eq!(daily, expected);
    assert!(rows
        .iter()
        .filter(|r| !r.get::<_, bool>(1))
        .all(|r| r.get::<_, i64>(2) == 86_400));
    let defaults: Vec<String> = rows
        .iter()
        .filter(|r| r.get::<_, bool>(1))
        .map(|r| r.get(0))
        .collect();
    assert_eq!(defaults, vec!["flight_telemetry_default"]);

    // Every child carries the dedupe index (attached to the parent's) and ingest's grants.
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_inherits i JOIN pg_class ci ON ci.oid = i.inhrelid
              WHERE i.inhparent = 'dbx_aviation.flight_telemetry_dedupe'::regclass"
        )
        .await,
        5
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_aviation.telemetry_partitions() p
              WHERE has_table_privilege('dbx_ingest', format('%I.%I', p.partition_schema, p.partition_name), 'INSERT')
                AND has_table_privilege('dbx_ingest', format('%I.%I', p.partition_schema, p.partition_name), 'SELECT')"
        )
        .await,
        5
    );

    let (o, a, s) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    point(&c, o, a, s, 1, "now() + interval '1000 days'").await;
    point(&c, o, a, s, 2, "now()").await;
    let placed: Vec<(i64, String)> = c
        .query(
            "SELECT seq, tableoid::regclass::text FROM dbx_aviation.flight_telemetry ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(placed[0].1, "dbx_aviation.flight_telemetry_default");
    let today: String = c
        .query_one(
            "SELECT 'dbx_aviation.flight_telemetry_p' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(placed[1].1, today);

    // The dedupe key makes a resent point a no-op, through the parent.
    let n = c
        .execute(
            "INSERT INTO dbx_aviation.flight_telemetry (org_id, aircraft_id, session_id, ts, seq)
             SELECT org_id, aircraft_id, session_id, ts, seq FROM dbx_aviation.flight_telemetry
             ON CONFLICT (session_id, seq, ts) DO NOTHING",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn ensure_telemetry_partition_is_idempotent_concurrent_and_moves_default_rows() {
    let (db, c) = migrated().await;
    let (o, a, s) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    // Written before its partition exists: lands in the default partition.
    point(
        &c,
        o,
        a,
        s,
        7,
        "(date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') + interval '10 days 5 hours'",
    )
    .await;
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_aviation.flight_telemetry_default"
        )
        .await,
        1
    );

    let mut tasks = Vec::new();
    for _ in 0..6 {
        let url = db.url();
        tasks.push(tokio::spawn(async move {
            let client = dbx_testkit::connect(&url).await;
            let row = client
                .query_one(
                    "SELECT dbx_aviation.ensure_telemetry_partition(d, d + interval '24 hours')
                       FROM (SELECT (date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
                                    + interval '10 days' AS d) x",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok::<String, String>(row.get(0))
        }));
    }
    let mut names = Vec::new();
    for t in tasks {
        names.push(
            t.await
                .unwrap()
                .unwrap_or_else(|e| panic!("concurrent ensure: {e}")),
        );
    }
    names.dedup();
    assert_eq!(names.len(), 1, "{names:?}");
    let again = day_partition(&c, 10).await;
    assert_eq!(again, names[0]);
    assert!(again.starts_with("dbx_aviation.flight_telemetry_p"));
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_aviation.telemetry_partitions() WHERE partition_name LIKE 'flight_telemetry_p%'"
        )
        .await,
        5
    );
    // The early point moved out of the default partition into its new home.
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_aviation.flight_telemetry_default"
        )
        .await,
        0
    );
    let home: String = c
        .query_one(
            "SELECT tableoid::regclass::text FROM dbx_aviation.flight_telemetry WHERE seq = 7",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(home, again);

    // Hourly partitions are named to the hour.
    let hourly: String = c
        .query_one(
            "SELECT dbx_aviation.ensure_telemetry_partition(h, h + interval '1 hour')
               FROM (SELECT (date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
                            + interval '20 days 13 hours' AS h) x",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        hourly.ends_with("13") && hourly.len() == "dbx_aviation.flight_telemetry_p2026010113".len()
    );

    // A range that is neither a day nor an hour is refused, clearly.
    let e = c
        .query_one(
            "SELECT dbx_aviation.ensure_telemetry_partition(now(), now() + interval '2 days')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), Some(&SqlState::INVALID_PARAMETER_VALUE));
}

// ----------------------------------------------------------------------------------------------
// Analytics
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn fleet_risk_profile_averages_counts_and_trends() {
    let (_db, c) = migrated().await;
    let org = new_org(&c, "RISK-A", 365).await;
    let other = new_org(&c, "RISK-B", 365).await;
    let quad = new_aircraft(&c, org, "Q1", "quadcopter", "NULL").await;
    let wing = new_aircraft(&c, org, "W1", "fixed_wing", "NULL").await;
    let vtol = new_aircraft(&c, org, "V1", "vtol", "NULL").await;
    let foreign = new_aircraft(&c, other, "Q9", "quadcopter", "NULL").await;

    // quadcopter: a recent flight (0.8 high + critical motor anomaly, 0.6 medium), an old one (0.2)
    let s1 = new_session(&c, org, quad, "now() - interval '2 days'").await;
    let s2 = new_session(&c, org, quad, "now() - interval '20 days'").await;
    new_result(
        &c,
        org,
        s1,
        "0.8",
        "high",
        true,
        r#"'[{"type":"motor","severity":"critical"}]'"#,
    )
    .await;
    new_result(&c, org, s1, "0.6", "medium", false, "NULL").await;
    new_result(&c, org, s2, "0.2", "low", false, "NULL").await;
    // fixed_wing: recent 0.1, old 0.5 critical with a critical anomaly -> decreasing
    let s3 = new_session(&c, org, wing, "now() - interval '1 day'").await;
    let s4 = new_session(&c, org, wing, "now() - interval '15 days'").await;
    new_result(&c, org, s3, "0.1", "low", false, "NULL").await;
    new_result(
        &c,
        org,
        s4,
        "0.5",
        "critical",
        true,
        r#"'{"critical": ["battery"]}'"#,
    )
    .await;
    // vtol: only recent -> no delta -> stable
    let s5 = new_session(&c, org, vtol, "now() - interval '3 days'").await;
    new_result(&c, org, s5, "0.4", "medium", true, r#"'["minor drift"]'"#).await;
    // outside the window, and another organization: both ignored
    let s6 = new_session(&c, org, quad, "now() - interval '60 days'").await;
    new_result(&c, org, s6, "1.0", "critical", true, r#"'["critical"]'"#).await;
    let s7 = new_session(&c, other, foreign, "now() - interval '2 days'").await;
    new_result(&c, other, s7, "0.99", "critical", true, r#"'["critical"]'"#).await;

    let rows = c
        .query(
            "SELECT aircraft_type::text, total_flights, avg_risk_score::text, high_risk_flights,
                    critical_anomalies, risk_trend::text
               FROM dbx_analytics.calculate_fleet_risk_profile($1, now() - interval '30 days', now())",
            &[&org],
        )
        .await
        .unwrap();
    let got: Vec<(String, i64, String, i64, i64, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "quadcopter".into(),
                2,
                "0.5333".into(),
                1,
                1,
                "increasing".into()
            ),
            ("vtol".into(), 1, "0.4000".into(), 0, 0, "stable".into()),
            (
                "fixed_wing".into(),
                2,
                "0.3000".into(),
                1,
                1,
                "decreasing".into()
            ),
        ]
    );
}

#[tokio::test]
async fn maintenance_score_follows_the_seed_formula() {
    let (_db, c) = migrated().await;
    let org = new_org(&c, "MAINT", 365).await;
    // 3 motor anomalies at risk 0.9, maintenance overdue: 3*0.4 + 0.9*100*0.1 + 30 = 40.20 HIGH
    let high = new_aircraft(&c, org, "H1", "quadcopter", "current_date - 5").await;
    let s = new_session(&c, org, high, "now() - interval '1 day'").await;
    for _ in 0..3 {
        new_result(&c, org, s, "0.9", "high", true, r#"'["motor vibration"]'"#).await;
    }
    // 25 motor anomalies at risk 1.0, overdue: 25*0.4 + 10 + 30 = 50.00 URGENT
    let urgent = new_aircraft(&c, org, "U1", "quadcopter", "current_date - 1").await;
    let s = new_session(&c, org, urgent, "now() - interval '1 day'").await;
    for _ in 0..25 {
        new_result(
            &c,
            org,
            s,
            "1.0",
            "critical",
            true,
            r#"'["motor overheat"]'"#,
        )
        .await;
    }
    // never flown, maintenance in 3 days: 20.00 MEDIUM (the seed's inner join returned nothing)
    let idle = new_aircraft(&c, org, "I1", "vtol", "current_date + 3").await;

    let score = |id: Uuid| {
        let c = &c;
        async move {
            let r = c
                .query_one(
                    "SELECT registration_number::text, maintenance_score::text, priority_level::text,
                            recommended_action, next_maintenance_due = current_date - 5
                       FROM dbx_analytics.calculate_maintenance_score($1)",
                    &[&id],
                )
                .await
                .unwrap();
            (
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, String>(3),
            )
        }
    };
    assert_eq!(
        score(high).await,
        (
            "H1".into(),
            "40.20".into(),
            "HIGH".into(),
            "Scheduled maintenance overdue".into()
        )
    );
    assert_eq!(
        score(urgent).await,
        (
            "U1".into(),
            "50.00".into(),
            "URGENT".into(),
            "Inspect motor systems immediately".into()
        )
    );
    assert_eq!(
        score(idle).await,
        (
            "I1".into(),
            "20.00".into(),
            "MEDIUM".into(),
            "Continue normal operations".into()
        )
    );
    let due: bool = c
        .query_one(
            "SELECT next_maintenance_due = current_date - 5 FROM dbx_analytics.calculate_maintenance_score($1)",
            &[&high],
        )
        .await
        .unwrap()
        .get(0);
    assert!(due);
}

#[tokio::test]
async fn executive_summary_and_maintenance_predictions_on_sample_data() {
    let (_db, c) = migrated().await;
    let org = new_org(&c, "EXEC-A", 365).await;
    let gone = new_org(&c, "EXEC-GONE", 365).await;
    c.execute(
        "UPDATE dbx_aviation.organizations SET is_active = false WHERE org_id = $1",
        &[&gone],
    )
    .await
    .unwrap();
    let a1 = new_aircraft(&c, org, "E1", "quadcopter", "current_date + 3").await;
    let a2 = new_aircraft(&c, org, "E2", "fixed_wing", "NULL").await;
    let g1 = new_aircraft(&c, gone, "G1", "quadcopter", "NULL").await;

    let s1 = new_session(&c, org, a1, "now()").await;
    let s2 = new_session(&c, org, a2, "now()").await;
    let sg = new_session(&c, gone, g1, "now()").await;
    c.execute(
        "UPDATE dbx_aviation.flight_sessions SET flight_duration_seconds = 3600, total_distance_km = 100.4 WHERE session_id = $1",
        &[&s1],
    )
    .await
    .unwrap();
    c.execute(
        "UPDATE dbx_aviation.flight_sessions SET flight_duration_seconds = 7200, total_distance_km = 50.3 WHERE session_id = $1",
        &[&s2],
    )
    .await
    .unwrap();
    new_result(&c, org, s1, "0.8", "high", true, r#"'["motor"]'"#).await;
    new_result(&c, org, s2, "0.2", "low", false, "NULL").await;
    new_result(&c, gone, sg, "0.9", "critical", true, "NULL").await;
    // One of the two flights ended (migration 0040: completed_flights).
    c.execute(
        "UPDATE dbx_aviation.flight_sessions SET flight_status = 'completed', completed_at = now(), \
         completion_reason = 'end' WHERE session_id = $1",
        &[&s1],
    )
    .await
    .unwrap();

    let rows = c
        .query(
            "SELECT org_name::text, month = date_trunc('month', now()), flights, active_aircraft,
                    avg_flight_hours::text, total_distance_km::text, avg_risk_score::text,
                    anomaly_count, high_risk_flights, high_risk_percentage::text, completed_flights
               FROM dbx_analytics.executive_summary",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "the inactive organization is left out");
    let r = &rows[0];
    assert_eq!(r.get::<_, String>(0), "EXEC-A Inc");
    assert!(r.get::<_, bool>(1));
    assert_eq!(r.get::<_, i64>(2), 2);
    assert_eq!(r.get::<_, i64>(3), 2);
    assert_eq!(r.get::<_, String>(4), "1.50");
    assert_eq!(r.get::<_, String>(5), "151");
    assert_eq!(r.get::<_, String>(6), "0.5000");
    assert_eq!(r.get::<_, i64>(7), 1);
    assert_eq!(r.get::<_, i64>(8), 1);
    assert_eq!(r.get::<_, String>(9), "50.00");
    assert_eq!(r.get::<_, i64>(10), 1);

    // maintenance_predictions: E1 = 1 motor*0.4 + 0.8*100*0.3 + 20 (due in 3 days) = 44.40 HIGH;
    // E2 = 0.2*100*0.3 = 6.00 LOW; ordered by urgency.
    let rows = c
        .query(
            "SELECT registration_number::text, motor_issues, control_issues, recent_risk_score::text,
                    maintenance_urgency::text, priority_level
               FROM dbx_analytics.maintenance_predictions WHERE registration_number LIKE 'E%'",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i64, i64, String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "E1".into(),
                1,
                0,
                "0.8000".into(),
                "44.40".into(),
                "HIGH".into()
            ),
            (
                "E2".into(),
                0,
                0,
                "0.2000".into(),
                "6.00".into(),
                "LOW".into()
            ),
        ]
    );
}

#[tokio::test]
async fn daily_aggregate_refreshes_with_the_right_aggregates() {
    let (_db, c) = migrated().await;
    let org = new_org(&c, "MV", 365).await;
    let a = new_aircraft(&c, org, "M1", "quadcopter", "NULL").await;
    let b = new_aircraft(&c, org, "M2", "quadcopter", "NULL").await;
    let s1 = new_session(&c, org, a, "now()").await;
    let s2 = new_session(&c, org, a, "now()").await;
    let s3 = new_session(&c, org, b, "now()").await;
    // Tomorrow (UTC), whose partition the migration made.
    let day = "(date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') + interval '1 day'";
    c.execute(
        &format!(
            "INSERT INTO dbx_aviation.flight_telemetry
               (org_id, aircraft_id, session_id, ts, seq, altitude_m, ground_speed_mps, battery_remaining_pct)
             VALUES ($1, $2, $3, {day} + interval '10 minutes', 1, 100, 10, 90),
                    ($1, $2, $3, {day} + interval '20 minutes', 2, 250, 15, 80),
                    ($1, $2, $3, {day} + interval '40 minutes', 3, 120, 12, 70),
                    ($1, $2, $4, {day} + interval '60 minutes', 1, 50, 30, 65.5),
                    ($1, $2, $4, {day} + interval '65 minutes', 2, 60, 5, 60),
                    ($1, $5, $6, {day} + interval '2 hours', 1, 999, 1, 20)"
        ),
        &[&org, &a, &s1, &s2, &b, &s3],
    )
    .await
    .unwrap();

    c.execute(
        "SELECT dbx_analytics.refresh_telemetry_daily_aircraft(true)",
        &[],
    )
    .await
    .unwrap();
    let read = |aircraft: Uuid| {
        let c = &c;
        async move {
            let r = c
                .query_one(
                    &format!(
                        "SELECT points, flight_time_seconds, max_altitude_m, max_ground_speed_mps,
                                min_battery_pct, day = (({day}) AT TIME ZONE 'UTC')::date, org_id
                           FROM dbx_analytics.telemetry_daily_aircraft WHERE aircraft_id = $1"
                    ),
                    &[&aircraft],
                )
                .await
                .unwrap();
            (
                r.get::<_, i64>(0),
                r.get::<_, f64>(1),
                r.get::<_, f32>(2),
                r.get::<_, f32>(3),
                r.get::<_, f32>(4),
                r.get::<_, bool>(5),
                r.get::<_, Uuid>(6),
            )
        }
    };
    // Aircraft a: sessions of 30 min and 5 min -> 2100 s; 5 points.
    assert_eq!(read(a).await, (5, 2100.0, 250.0, 30.0, 60.0, true, org));
    assert_eq!(read(b).await, (1, 0.0, 999.0, 1.0, 20.0, true, org));

    // More data, and the full recompute (the old non-concurrent refresh) works as well.
    c.execute(
        &format!(
            "INSERT INTO dbx_aviation.flight_telemetry (org_id, aircraft_id, session_id, ts, seq, altitude_m)
             VALUES ($1, $2, $3, {day} + interval '50 minutes', 4, 300)"
        ),
        &[&org, &a, &s1],
    )
    .await
    .unwrap();
    c.execute(
        "SELECT dbx_analytics.refresh_telemetry_daily_aircraft(false)",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(read(a).await, (6, 2700.0, 300.0, 30.0, 60.0, true, org));
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_analytics.telemetry_daily_aircraft"
        )
        .await,
        2
    );
}

// ----------------------------------------------------------------------------------------------
// Security
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn audit_log_records_one_row_per_change_with_the_rows_own_key() {
    let (_db, c) = migrated().await;
    let org = new_org(&c, "AUDIT", 365).await;
    c.execute(
        "UPDATE dbx_aviation.organizations SET org_name = 'Renamed' WHERE org_id = $1",
        &[&org],
    )
    .await
    .unwrap();
    let spare = new_org(&c, "AUDIT-SPARE", 365).await;
    c.execute(
        "DELETE FROM dbx_aviation.organizations WHERE org_id = $1",
        &[&spare],
    )
    .await
    .unwrap();

    let actions = |id: Uuid| {
        let c = &c;
        async move {
            c.query(
                "SELECT action_type::text, table_name::text, org_id, old_values IS NOT NULL, new_values IS NOT NULL
                   FROM dbx_audit.audit_log WHERE record_id = $1 ORDER BY audit_id",
                &[&id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    r.get::<_, String>(1),
                    r.get::<_, Option<Uuid>>(2),
                    r.get::<_, bool>(3),
                    r.get::<_, bool>(4),
                )
            })
            .collect::<Vec<_>>()
        }
    };
    let t = "dbx_aviation.organizations".to_string();
    assert_eq!(
        actions(org).await,
        vec![
            ("INSERT".into(), t.clone(), Some(org), false, true),
            ("UPDATE".into(), t.clone(), Some(org), true, true),
        ]
    );
    assert_eq!(
        actions(spare).await,
        vec![
            ("INSERT".into(), t.clone(), Some(spare), false, true),
            ("DELETE".into(), t.clone(), Some(spare), true, false),
        ]
    );

    // aircraft_registry: record_id is the aircraft's id.
    let ac = new_aircraft(&c, org, "AUD1", "quadcopter", "NULL").await;
    assert_eq!(actions(ac).await.len(), 1);

    // flight_sessions: statistics updates are not audited, a flight_number change is.
    let s = new_session(&c, org, ac, "now()").await;
    assert_eq!(actions(s).await.len(), 1);
    let before = count(&c, "SELECT count(*) FROM dbx_audit.audit_log").await;
    c.execute(
        "UPDATE dbx_aviation.flight_sessions
            SET actual_arrival = now(), flight_duration_seconds = 60, point_count = point_count + 10,
                total_distance_km = 1.5, last_seq = 10, last_latitude = 1, last_longitude = 2,
                departure_latitude = 1, departure_longitude = 2, arrival_latitude = 3, arrival_longitude = 4,
                updated_at = now()
          WHERE session_id = $1",
        &[&s],
    )
    .await
    .unwrap();
    assert_eq!(
        count(&c, "SELECT count(*) FROM dbx_audit.audit_log").await,
        before,
        "a statistics-only update must not be audited"
    );
    c.execute(
        "UPDATE dbx_aviation.flight_sessions SET flight_number = 'DBX123' WHERE session_id = $1",
        &[&s],
    )
    .await
    .unwrap();
    assert_eq!(
        count(&c, "SELECT count(*) FROM dbx_audit.audit_log").await,
        before + 1
    );
    let last = actions(s).await;
    assert_eq!(last.len(), 2);
    assert_eq!(last[1].0, "UPDATE");
    assert_eq!(last[1].1, "dbx_aviation.flight_sessions");
    // Key material is not copied into the trail.
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_audit.audit_log WHERE new_values ? 'api_key_encrypted'"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn rls_shows_the_analytics_service_only_its_organization() {
    let (db, c) = migrated().await;
    let a = new_org(&c, "RLS-A", 365).await;
    let b = new_org(&c, "RLS-B", 365).await;
    for (org, reg) in [(a, "RA1"), (b, "RB1")] {
        let ac = new_aircraft(&c, org, reg, "quadcopter", "NULL").await;
        let s = new_session(&c, org, ac, "now()").await;
        new_result(&c, org, s, "0.5", "medium", false, "NULL").await;
        point(&c, org, ac, s, 1, "now()").await;
        point(&c, org, ac, s, 2, "now()").await;
    }
    c.execute(
        "SELECT dbx_analytics.refresh_telemetry_daily_aircraft()",
        &[],
    )
    .await
    .unwrap();

    let analyst = connect_as(&db, &c, "dbx_analytics_service").await;
    // No context: nothing at all.
    assert_eq!(
        count(&analyst, "SELECT count(*) FROM dbx_aviation.organizations").await,
        0
    );
    // The context is transaction-scoped (0032): set inside the reader's transaction.
    analyst.batch_execute("BEGIN").await.unwrap();
    analyst
        .execute("SELECT dbx_aviation.set_org_context($1)", &[&a])
        .await
        .unwrap();
    for (sql, n) in [
        ("SELECT count(*) FROM dbx_aviation.organizations", 1),
        ("SELECT count(*) FROM dbx_aviation.aircraft_registry", 1),
        ("SELECT count(*) FROM dbx_aviation.flight_sessions", 1),
        ("SELECT count(*) FROM dbx_aviation.ml_analysis_results", 1),
        ("SELECT count(*) FROM dbx_aviation.flight_telemetry", 2),
        ("SELECT count(*) FROM dbx_analytics.executive_summary", 1),
        (
            "SELECT count(*) FROM dbx_analytics.maintenance_predictions",
            1,
        ),
        ("SELECT count(*) FROM dbx_analytics.org_telemetry_daily", 1),
    ] {
        assert_eq!(count(&analyst, sql).await, n, "{sql}");
    }
    for sql in [
        "SELECT count(*) FROM dbx_aviation.organizations WHERE org_id <> (SELECT org_id FROM dbx_aviation.organizations WHERE org_code = 'RLS-A')",
        "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE org_id <> (SELECT org_id FROM dbx_aviation.organizations WHERE org_code = 'RLS-A')",
    ] {
        assert_eq!(count(&analyst, sql).await, 0, "{sql}");
    }
    let org_ids: Vec<Uuid> = analyst
        .query("SELECT org_id FROM dbx_aviation.flight_sessions", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(org_ids, vec![a]);
    analyst.batch_execute("COMMIT").await.unwrap();
    // The connection, as a pool would hand it to the next user, carries no tenant any more.
    assert_eq!(
        count(&analyst, "SELECT count(*) FROM dbx_aviation.organizations").await,
        0
    );
    assert_eq!(
        count(
            &analyst,
            "SELECT count(*) FROM dbx_aviation.flight_telemetry"
        )
        .await,
        0
    );
    // Nor after a rollback, nor when set outside a transaction block (it then lasts for its
    // own statement only: fail closed).
    analyst.batch_execute("BEGIN").await.unwrap();
    analyst
        .execute("SELECT dbx_aviation.set_org_context($1)", &[&a])
        .await
        .unwrap();
    analyst.batch_execute("ROLLBACK").await.unwrap();
    analyst
        .execute("SELECT dbx_aviation.set_org_context($1)", &[&a])
        .await
        .unwrap();
    assert_eq!(
        count(&analyst, "SELECT count(*) FROM dbx_aviation.organizations").await,
        0
    );

    // Switching the context switches the view.
    analyst.batch_execute("BEGIN").await.unwrap();
    analyst
        .execute("SELECT dbx_aviation.set_org_context($1)", &[&b])
        .await
        .unwrap();
    let code: String = analyst
        .query_one("SELECT org_code::text FROM dbx_aviation.organizations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(code, "RLS-B");
    analyst.batch_execute("COMMIT").await.unwrap();

    // Readers cannot see key material, write, read the raw daily aggregate or the audit log.
    for sql in [
        "SELECT api_key_hash FROM dbx_aviation.organizations",
        "SELECT count(*) FROM dbx_analytics.telemetry_daily_aircraft",
        "SELECT count(*) FROM dbx_audit.audit_log",
        "DELETE FROM dbx_aviation.flight_sessions",
        "SELECT dbx_aviation.gdpr_delete_user_data('x')",
    ] {
        let e = analyst.query(sql, &[]).await.unwrap_err();
        assert_eq!(
            sqlstate(&e),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {e}"
        );
    }

    // A writer under org A cannot write a row for org B (the policy's WITH CHECK).
    let api = connect_as(&db, &c, "dbx_api_service").await;
    api.batch_execute("BEGIN").await.unwrap();
    api.execute("SELECT dbx_aviation.set_org_context($1)", &[&a])
        .await
        .unwrap();
    let e = api
        .execute(
            "INSERT INTO dbx_aviation.aircraft_registry (org_id, registration_number, aircraft_type) VALUES ($1, 'X', 'y')",
            &[&b],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");
    api.batch_execute("ROLLBACK; BEGIN").await.unwrap();
    api.execute("SELECT dbx_aviation.set_org_context($1)", &[&a])
        .await
        .unwrap();
    let n = api
        .execute(
            "INSERT INTO dbx_aviation.aircraft_registry (org_id, registration_number, aircraft_type) VALUES ($1, 'RA2', 'y')",
            &[&a],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    api.batch_execute("COMMIT").await.unwrap();
    // ... and its write is audited by the definer trigger although it cannot read the trail.
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_audit.audit_log a JOIN dbx_aviation.aircraft_registry r
               ON r.aircraft_id = a.record_id WHERE r.registration_number = 'RA2'"
        )
        .await,
        1
    );
}

/// Only the owner mints API keys (0033). The application user (dbx_api_service, in
/// dbx_app_write), in its own organization's context, can neither insert a key nor turn a row
/// into a new key (key_hash, or revoked_at back to NULL), nor create an organization or change
/// one's key (both mirrored into api_keys by a definer trigger); it may still delete a key
/// (withdrawing access) and edit an organization's other columns.
#[tokio::test]
async fn the_application_user_cannot_mint_an_api_key() {
    let (db, c) = migrated().await;
    let a = new_org(&c, "MINT-A", 365).await;
    c.execute(
        "UPDATE dbx_aviation.api_keys SET revoked_at = now() WHERE org_id = $1",
        &[&a],
    )
    .await
    .unwrap();
    let keys_before = count(&c, "SELECT count(*) FROM dbx_aviation.api_keys").await;
    let api = connect_as(&db, &c, "dbx_api_service").await;
    api.batch_execute("BEGIN").await.unwrap();
    api.execute("SELECT dbx_aviation.set_org_context($1)", &[&a])
        .await
        .unwrap();
    for sql in [
        "INSERT INTO dbx_aviation.api_keys (org_id, label, key_hash) VALUES ($1, 'minted', repeat('a', 64))",
        "UPDATE dbx_aviation.api_keys SET key_hash = repeat('b', 64) WHERE org_id = $1",
        "UPDATE dbx_aviation.api_keys SET revoked_at = NULL WHERE org_id = $1",
        "UPDATE dbx_aviation.organizations SET api_key_hash = repeat('c', 64) WHERE org_id = $1",
        "INSERT INTO dbx_aviation.organizations (org_id, org_code, org_name, org_type, api_key_hash)
         VALUES ($1, 'MINT-B', 'x', 'y', repeat('d', 64))",
    ] {
        api.batch_execute("SAVEPOINT attempt").await.unwrap();
        let e = api.execute(sql, &[&a]).await.unwrap_err();
        assert_eq!(
            sqlstate(&e),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {e}"
        );
        api.batch_execute("ROLLBACK TO SAVEPOINT attempt")
            .await
            .unwrap();
    }
    let renamed = api
        .execute(
            "UPDATE dbx_aviation.organizations SET org_name = 'Renamed', api_rate_limit = 5 WHERE org_id = $1",
            &[&a],
        )
        .await
        .unwrap();
    assert_eq!(renamed, 1);
    let deleted = api
        .execute("DELETE FROM dbx_aviation.api_keys WHERE org_id = $1", &[&a])
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    api.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        count(&c, "SELECT count(*) FROM dbx_aviation.api_keys").await,
        keys_before - 1
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_aviation.organizations WHERE org_code = 'MINT-B' OR api_key_hash ~ '^(.)\\1+$'"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn gdpr_deletion_anonymizes_and_logs() {
    let (_db, c) = migrated().await;
    let org = new_org(&c, "GDPR", 365).await;
    let ac = new_aircraft(&c, org, "GD1", "quadcopter", "NULL").await;
    let mut pilot_sessions = Vec::new();
    for _ in 0..2 {
        let s = new_session(&c, org, ac, "now()").await;
        c.execute(
            "UPDATE dbx_aviation.flight_sessions SET pilot_id = 'pilot-42' WHERE session_id = $1",
            &[&s],
        )
        .await
        .unwrap();
        pilot_sessions.push(s);
    }
    let other = new_session(&c, org, ac, "now()").await;
    c.execute(
        "UPDATE dbx_aviation.flight_sessions SET pilot_id = 'pilot-7' WHERE session_id = $1",
        &[&other],
    )
    .await
    .unwrap();

    let n: i32 = c
        .query_one("SELECT dbx_aviation.gdpr_delete_user_data('pilot-42')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    for s in &pilot_sessions {
        let p: String = c
            .query_one(
                "SELECT pilot_id FROM dbx_aviation.flight_sessions WHERE session_id = $1",
                &[s],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(p, format!("ANONYMIZED_{s}"));
    }
    let p: String = c
        .query_one(
            "SELECT pilot_id FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&other],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(p, "pilot-7");

    let rows = c
        .query(
            "SELECT table_name::text, compliance_relevant, old_values->>'user_identifier_sha256',
                    (old_values->>'sessions_anonymized')::int
               FROM dbx_audit.audit_log WHERE action_type = 'gdpr_deletion'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), "user_data");
    assert!(rows[0].get::<_, bool>(1));
    assert_eq!(
        rows[0].get::<_, String>(2),
        hex::encode(Sha256::digest(b"pilot-42"))
    );
    assert_eq!(rows[0].get::<_, i32>(3), 2);
    // The identifier is gone from the whole trail, the other pilot's is not.
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_audit.audit_log
              WHERE coalesce(old_values::text, '') || coalesce(new_values::text, '') LIKE '%pilot-42%'"
        )
        .await,
        0
    );
    assert!(
        count(
            &c,
            "SELECT count(*) FROM dbx_audit.audit_log WHERE new_values->>'pilot_id' = 'pilot-7'"
        )
        .await
            >= 1
    );
}

#[tokio::test]
async fn encryption_round_trip_and_api_key_hash() {
    let (_db, c) = migrated().await;
    let e = c
        .query_one("SELECT dbx_aviation.encrypt_api_key('secret')", &[])
        .await
        .unwrap_err();
    assert_eq!(
        sqlstate(&e),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE)
    );
    assert!(
        e.as_db_error()
            .is_some_and(|d| d.message().contains("app.encryption_key is not set")),
        "{e:?}"
    );

    c.batch_execute("SET app.encryption_key = 'correct horse battery staple'")
        .await
        .unwrap();
    let clear: String = c
        .query_one(
            "SELECT dbx_aviation.decrypt_api_key(dbx_aviation.encrypt_api_key('dbx_live_0123456789'))",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(clear, "dbx_live_0123456789");
    let r = c
        .query_one(
            "SELECT pgp_sym_decrypt(dbx_aviation.encrypt_sensitive_data('{\"pilot\": \"p1\", \"n\": 3}'),
                                    current_setting('app.encryption_key'))::jsonb,
                    dbx_aviation.encrypt_api_key('k') <> dbx_aviation.encrypt_api_key('k')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        r.get::<_, serde_json::Value>(0),
        serde_json::json!({"pilot": "p1", "n": 3})
    );
    assert!(r.get::<_, bool>(1), "pgp_sym_encrypt is salted");

    // A different key cannot decrypt.
    let enc: Vec<u8> = c
        .query_one("SELECT dbx_aviation.encrypt_api_key('x')", &[])
        .await
        .unwrap()
        .get(0);
    c.batch_execute("SET app.encryption_key = 'another key'")
        .await
        .unwrap();
    assert!(c
        .query_one("SELECT dbx_aviation.decrypt_api_key($1)", &[&enc])
        .await
        .is_err());

    for key in ["abc", "dbx_ünïcode_key", ""] {
        let h: String = c
            .query_one("SELECT dbx_aviation.generate_api_key_hash($1)", &[&key])
            .await
            .unwrap()
            .get(0);
        assert_eq!(h, hex::encode(Sha256::digest(key.as_bytes())), "{key:?}");
    }
    // The hash column is unique: two organizations cannot share a key.
    new_org(&c, "SAME", 365).await;
    let e = c
        .execute(
            "INSERT INTO dbx_aviation.organizations (org_code, org_name, org_type, api_key_hash)
             VALUES ('OTHER', 'o', 't', dbx_aviation.generate_api_key_hash('SAME'))",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), Some(&SqlState::UNIQUE_VIOLATION));
}

// ----------------------------------------------------------------------------------------------
// Monitoring
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn system_health_has_four_metrics_without_pg_stat_statements() {
    let (_db, c) = migrated().await;
    // Installed but (in the test cluster) not preloaded, then not installed at all: both NULL.
    for setup in ["SELECT 1", "DROP EXTENSION IF EXISTS pg_stat_statements"] {
        c.batch_execute(setup).await.unwrap();
        let rows = c
            .query(
                "SELECT metric, value, unit FROM dbx_aviation.system_health ORDER BY metric",
                &[],
            )
            .await
            .unwrap();
        let got: Vec<(String, Option<f64>, String)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let names: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "active_connections",
                "cache_hit_ratio",
                "database_size",
                "slow_queries_count"
            ]
        );
        assert!(got[0].1.is_some_and(|v| v >= 1.0), "{got:?}");
        assert_eq!(got[0].2, "connections");
        assert!(
            got[1].1.is_none_or(|v| (0.0..=100.0).contains(&v)),
            "{got:?}"
        );
        assert_eq!(got[1].2, "percent");
        assert!(got[2].1.is_some_and(|v| v > 1_000_000.0), "{got:?}");
        assert_eq!(got[2].2, "bytes");
        assert_eq!(got[3].1, None, "{got:?}");
        assert_eq!(got[3].2, "queries");
    }
    let size_ok: bool = c
        .query_one(
            "SELECT value = pg_database_size(current_database()) FROM dbx_aviation.system_health WHERE metric = 'database_size'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(size_ok);
}

#[tokio::test]
async fn table_bloat_runs_and_sees_dead_space() {
    let (_db, c) = migrated().await;
    c.batch_execute(
        "INSERT INTO dbx_aviation.api_requests (endpoint, method, status_code, response_time_ms, user_agent)
         SELECT '/api/v2/system/status', 'GET', 200, g * 0.5, repeat('x', 200) FROM generate_series(1, 5000) g;
         DELETE FROM dbx_aviation.api_requests WHERE request_id % 10 <> 0;
         ANALYZE dbx_aviation.api_requests;",
    )
    .await
    .unwrap();
    let rows = c
        .query(
            "SELECT tablename, bloat_pct, bloat_bytes, bloat_size FROM dbx_aviation.table_bloat",
            &[],
        )
        .await
        .unwrap();
    let api = rows
        .iter()
        .find(|r| r.get::<_, String>(0) == "api_requests")
        .expect("api_requests is analyzed, so it has an estimate");
    let pct: f64 = api.get(1);
    let bytes: i64 = api.get(2);
    // 90 % of the rows are dead: most of the table is bloat.
    assert!(pct > 50.0 && pct <= 100.0, "bloat_pct {pct}");
    assert!(bytes > 500_000, "bloat_bytes {bytes}");
    assert!(!api.get::<_, String>(3).is_empty());
}

// ----------------------------------------------------------------------------------------------
// Lifecycle
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn archive_moves_old_partitions_whole_and_keeps_them_queryable() {
    let (_db, c) = migrated().await;
    let old = day_partition(&c, -100).await;
    let recent = day_partition(&c, -10).await;
    let (o, a, s) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    for seq in 1..=3 {
        point(&c, o, a, s, seq, &format!("(date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') - interval '100 days' + interval '{seq} hours'")).await;
    }
    for seq in 4..=5 {
        point(&c, o, a, s, seq, "now() - interval '10 days'").await;
    }
    let oid_before: u32 = c
        .query_one(&format!("SELECT '{old}'::regclass::oid"), &[])
        .await
        .unwrap()
        .get(0);

    let rows = c
        .query(
            "SELECT archived_partition, archived_to <= now() - interval '90 days' FROM dbx_aviation.archive_old_telemetry(90)",
            &[],
        )
        .await
        .unwrap();
    let name = old.replace("dbx_aviation.", "dbx_archive.");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), name);
    assert!(rows[0].get::<_, bool>(1));

    // Moved, not copied: the same relation, now in dbx_archive under the archive parent.
    let oid_after: u32 = c
        .query_one(&format!("SELECT '{name}'::regclass::oid"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(oid_before, oid_after);
    let gone: bool = c
        .query_one(&format!("SELECT to_regclass('{old}') IS NULL"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(gone);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_archive.flight_telemetry_archive"
        )
        .await,
        3
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM dbx_aviation.flight_telemetry").await,
        2
    );
    let still_live: bool = c
        .query_one(&format!("SELECT to_regclass('{recent}') IS NOT NULL"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(still_live);
    // The daemon no longer writes there.
    let ingest_can_insert: bool = c
        .query_one(
            &format!("SELECT has_table_privilege('dbx_ingest', '{name}', 'INSERT')"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!ingest_can_insert);
    // Nothing left to archive.
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_aviation.archive_old_telemetry(90)"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn retention_with_two_organizations_deletes_exactly_what_it_should() {
    let (_db, c) = migrated().await;
    let short = new_org(&c, "RET-30", 30).await;
    let long = new_org(&c, "RET-400", 400).await;
    let (a, s) = (Uuid::new_v4(), Uuid::new_v4());
    let at = |days_ago: i32| format!("now() - interval '{days_ago} days'");

    // 500 days ago: past both retentions -> the partition is dropped whole.
    let p500 = day_partition(&c, -500).await;
    // 200 days ago, archived: past the short retention only.
    day_partition(&c, -200).await;
    // 60 days ago: past the short retention only.
    day_partition(&c, -60).await;
    let mut seq = 0;
    let mut put = |org: Uuid, ts: String| {
        seq += 1;
        let c = &c;
        let n = seq;
        async move { point(c, org, a, s, n, &ts).await }
    };
    for org in [short, short, long, long] {
        put(org, at(500)).await;
    }
    put(short, at(200)).await;
    put(long, at(200)).await;
    for _ in 0..3 {
        put(short, at(60)).await;
    }
    for _ in 0..4 {
        put(long, at(60)).await;
    }
    put(short, at(45)).await; // no partition there: the default partition
    put(short, "now()".into()).await;
    put(short, "now()".into()).await;
    put(short, at(-1000)).await; // the future, default partition
    put(long, "now()".into()).await;
    let archived = c
        .query("SELECT * FROM dbx_aviation.archive_old_telemetry(150)", &[])
        .await
        .unwrap();
    assert_eq!(
        archived.len(),
        2,
        "the 500- and 200-day partitions are archived"
    );

    let run = |max: i32| {
        let c = &c;
        async move {
            let r = c
                .query_one(
                    "SELECT dropped_partitions, deleted_rows, more_pending FROM dbx_aviation.enforce_telemetry_retention($1)",
                    &[&max],
                )
                .await
                .unwrap();
            (r.get::<_, i32>(0), r.get::<_, i64>(1), r.get::<_, bool>(2))
        }
    };
    // Bounded: 2 rows this call, more pending.
    assert_eq!(run(2).await, (1, 2, true));
    let p500_archived = p500.replace("dbx_aviation.", "dbx_archive.");
    let dropped: bool = c
        .query_one(
            &format!(
                "SELECT to_regclass('{p500_archived}') IS NULL AND to_regclass('{p500}') IS NULL"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(dropped);
    // The rest: 1 (archive) + 3 (60 days) + 1 (default) expired rows of the short org, minus 2.
    assert_eq!(run(1000).await, (0, 3, false));
    assert_eq!(run(1000).await, (0, 0, false));

    let remaining = |org: Uuid| {
        let c = &c;
        async move {
            let live: i64 = c
                .query_one(
                    "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE org_id = $1",
                    &[&org],
                )
                .await
                .unwrap()
                .get(0);
            let arch: i64 = c
                .query_one(
                    "SELECT count(*) FROM dbx_archive.flight_telemetry_archive WHERE org_id = $1",
                    &[&org],
                )
                .await
                .unwrap()
                .get(0);
            (live, arch)
        }
    };
    assert_eq!(
        remaining(short).await,
        (3, 0),
        "today's two and the future one"
    );
    assert_eq!(
        remaining(long).await,
        (5, 1),
        "60 days + today live, 200 days archived"
    );
}

#[tokio::test]
async fn retention_policy_deletes_old_sessions_and_results_per_organization() {
    let (_db, c) = migrated().await;
    let short = new_org(&c, "POL-30", 30).await;
    let long = new_org(&c, "POL-400", 400).await;
    c.execute(
        "UPDATE dbx_aviation.organizations SET is_active = false WHERE org_id = $1",
        &[&short],
    )
    .await
    .unwrap();
    let ac_s = new_aircraft(&c, short, "P1", "quadcopter", "NULL").await;
    let ac_l = new_aircraft(&c, long, "P2", "quadcopter", "NULL").await;
    let old_s = new_session(&c, short, ac_s, "now()").await;
    let new_s = new_session(&c, short, ac_s, "now()").await;
    let old_l = new_session(&c, long, ac_l, "now()").await;
    c.execute(
        "UPDATE dbx_aviation.flight_sessions SET created_at = now() - interval '40 days' WHERE session_id IN ($1, $2)",
        &[&old_s, &old_l],
    )
    .await
    .unwrap();
    let result = |org: Uuid, session: Uuid, age_days: i32| {
        let c = &c;
        async move {
            c.execute(
                "INSERT INTO dbx_aviation.ml_analysis_results (session_id, org_id, model_version, created_at)
                 VALUES ($1, $2, 'v1', now() - make_interval(days => $3))",
                &[&session, &org, &age_days],
            )
            .await
            .unwrap();
        }
    };
    result(short, old_s, 40).await; // expired itself
    result(short, old_s, 0).await; // goes with its expired session (cascade)
    result(short, new_s, 40).await; // expired itself, session kept
    result(short, new_s, 0).await; // kept
    result(long, old_l, 40).await; // kept: 400-day retention

    let r = c
        .query_one(
            "SELECT deleted_analysis_results, deleted_flight_sessions FROM dbx_aviation.enforce_retention_policy()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (2, 1));
    assert_eq!(
        count(&c, "SELECT count(*) FROM dbx_aviation.flight_sessions").await,
        2
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM dbx_aviation.ml_analysis_results").await,
        2
    );
    let kept: Vec<Uuid> = c
        .query(
            "SELECT session_id FROM dbx_aviation.ml_analysis_results ORDER BY org_id = $1",
            &[&long],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kept, vec![new_s, old_l]);
}

// ----------------------------------------------------------------------------------------------
// Ingest role
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn ingest_service_copies_and_inserts_into_a_child_partition_directly() {
    let (db, c) = migrated().await;
    let org = new_org(&c, "INGEST", 365).await;
    let ac = new_aircraft(&c, org, "IN1", "quadcopter", "NULL").await;
    let ingest = connect_as(&db, &c, "dbx_ingest_service").await;

    // What the daemon does: authenticate by hash, create the session, ensure the partition,
    // COPY into the child, update the session's statistics, record the handshake.
    let found: Uuid = ingest
        .query_one(
            "SELECT org_id FROM dbx_aviation.organizations WHERE api_key_hash = $1 AND is_active",
            &[&hex::encode(Sha256::digest(b"INGEST"))],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(found, org);
    let session: Uuid = ingest
        .query_one(
            "INSERT INTO dbx_aviation.flight_sessions (org_id, aircraft_id) VALUES ($1, $2) RETURNING session_id",
            &[&org, &ac],
        )
        .await
        .unwrap()
        .get(0);
    let child: String = ingest
        .query_one(
            "SELECT dbx_aviation.ensure_telemetry_partition(d, d + interval '24 hours')
               FROM (SELECT date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS d) x",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let day: String = ingest
        .query_one(
            "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    let sink = ingest
        .copy_in::<_, Cursor<Vec<u8>>>(&format!(
            "COPY {child} (org_id, aircraft_id, session_id, ts, seq, latitude, longitude, motor_rpm, extra) FROM STDIN"
        ))
        .await
        .unwrap();
    let mut data = String::new();
    for seq in 1..=3 {
        data.push_str(&format!(
            "{org}\t{ac}\t{session}\t{day} 00:00:0{seq}+00\t{seq}\t47.{seq}\t8.5\t{{1000,1001}}\t{{\"k\": {seq}}}\n"
        ));
    }
    let mut sink = Box::pin(sink);
    sink.send(Cursor::new(data.into_bytes())).await.unwrap();
    let copied = sink.as_mut().finish().await.unwrap();
    assert_eq!(copied, 3);

    let n = ingest
        .execute(
            &format!(
                "INSERT INTO {child} (org_id, aircraft_id, session_id, ts, seq)
                 VALUES ($1, $2, $3, '{day} 00:00:05+00', 5)
                 ON CONFLICT (session_id, seq, ts) DO NOTHING"
            ),
            &[&org, &ac, &session],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    let n = ingest
        .execute(
            &format!(
                "INSERT INTO dbx_aviation.flight_telemetry (org_id, aircraft_id, session_id, ts, seq)
                 VALUES ($1, $2, $3, '{day} 00:00:01+00', 1), ($1, $2, $3, now() + interval '1000 days', 6)
                 ON CONFLICT (session_id, seq, ts) DO NOTHING"
            ),
            &[&org, &ac, &session],
        )
        .await
        .unwrap();
    assert_eq!(
        n, 1,
        "seq 1 is a duplicate, seq 6 goes to the default partition"
    );
    let rpm: Vec<f32> = ingest
        .query_one(&format!("SELECT motor_rpm FROM {child} WHERE seq = 2"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rpm, vec![1000.0, 1001.0]);
    let seen = count(
        &c,
        &format!(
            "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = '{session}'"
        ),
    )
    .await;
    assert_eq!(seen, 5, "3 copied + seq 5 + seq 6");

    ingest
        .execute(
            "UPDATE dbx_aviation.flight_sessions SET point_count = 5, last_seq = 6 WHERE session_id = $1",
            &[&session],
        )
        .await
        .unwrap();
    ingest
        .execute(
            "INSERT INTO dbx_aviation.api_requests (org_id, endpoint, method, status_code, response_time_ms, client_ip)
             VALUES ($1, 'tcp:hello', 'TCP', 200, 0.7, '10.0.0.1')",
            &[&org],
        )
        .await
        .unwrap();
    ingest
        .batch_execute("CREATE TEMP TABLE staging (LIKE dbx_aviation.flight_telemetry)")
        .await
        .unwrap();

    // And nothing beyond that.
    for sql in [
        "DELETE FROM dbx_aviation.flight_telemetry",
        "SELECT count(*) FROM dbx_audit.audit_log",
        "SELECT count(*) FROM dbx_aviation.api_requests",
        "UPDATE dbx_aviation.organizations SET is_active = false",
        "SELECT count(*) FROM dbx_aviation.archive_old_telemetry(1)",
    ] {
        let e = ingest.query(sql, &[]).await.unwrap_err();
        assert_eq!(
            sqlstate(&e),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {e}"
        );
    }
}

/// Migration 0040 on a database that already has flight sessions: they keep their
/// `updated_at` and take it as `last_point_at`; then the idle completer's function completes
/// what has been idle long enough, oldest first, and the audit trail records it.
#[tokio::test]
async fn sessions_migration_upgrades_existing_sessions_and_completes_idle_ones() {
    let db = TestDb::new().await;
    let mut c = db.client().await;
    // A database as the release before 0040 left it.
    dbx_testkit::migrate_before(&mut c, 40).await;
    let org = new_org(&c, "IDLE-A", 365).await;
    let air = new_aircraft(&c, org, "I1", "quadcopter", "NULL").await;
    let (old, recent) = (
        new_session(&c, org, air, "now()").await,
        new_session(&c, org, air, "now()").await,
    );
    for (s, at) in [
        (old, "2020-01-01 00:00:00+00"),
        (recent, "2020-01-02 00:00:00+00"),
    ] {
        c.execute(
            "ALTER TABLE dbx_aviation.flight_sessions DISABLE TRIGGER flight_sessions_touch_updated_at",
            &[],
        )
        .await
        .unwrap();
        c.execute(
            &format!(
                "UPDATE dbx_aviation.flight_sessions SET updated_at = '{at}' WHERE session_id = $1"
            ),
            &[&s],
        )
        .await
        .unwrap();
        c.execute(
            "ALTER TABLE dbx_aviation.flight_sessions ENABLE TRIGGER flight_sessions_touch_updated_at",
            &[],
        )
        .await
        .unwrap();
    }

    let applied = migrate::apply(&mut c).await.unwrap();
    // 0040 and every migration after it.
    assert_eq!(
        applied.iter().map(|a| a.version).collect::<Vec<_>>(),
        MIGRATIONS
            .iter()
            .map(|m| m.version)
            .filter(|v| *v >= 40)
            .collect::<Vec<_>>(),
        "0040 and every migration after it"
    );
    let state = |s: Uuid| {
        let c = &c;
        async move {
            let r = c
                .query_one(
                    "SELECT last_point_at = updated_at, updated_at::text, flight_status::text, \
                            completion_reason::text, completed_at IS NOT NULL \
                       FROM dbx_aviation.flight_sessions WHERE session_id = $1",
                    &[&s],
                )
                .await
                .unwrap();
            (
                r.get::<_, bool>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, Option<String>>(3),
                r.get::<_, bool>(4),
            )
        }
    };
    assert_eq!(
        state(old).await,
        (
            true,
            "2020-01-01 00:00:00+00".into(),
            "active".into(),
            None,
            false
        )
    );

    // Idle since before 2020-01-01 12:00: only `old`.
    let done: i32 = c
        .query_one(
            "SELECT dbx_aviation.complete_idle_sessions('2020-01-01 12:00:00+00', 10)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(done, 1);
    let (_, _, status, reason, completed) = state(old).await;
    assert_eq!(
        (status.as_str(), reason.as_deref(), completed),
        ("completed", Some("idle_timeout"), true)
    );
    assert_eq!(state(recent).await.2, "active");
    let audited = count(
        &c,
        &format!(
            "SELECT count(*) FROM dbx_audit.audit_log WHERE record_id = '{old}' \
             AND new_values->>'flight_status' = 'completed'"
        ),
    )
    .await;
    assert_eq!(audited, 1);
    // A bad limit is refused by name.
    let e = c
        .query_one("SELECT dbx_aviation.complete_idle_sessions(now(), 0)", &[])
        .await
        .unwrap_err();
    let msg = e.as_db_error().map(|d| d.message().to_string());
    assert!(
        msg.as_deref().is_some_and(|m| m.contains("p_limit")),
        "{msg:?}"
    );
    // completion_reason takes only the two reasons.
    let e = c
        .execute(
            "UPDATE dbx_aviation.flight_sessions SET completion_reason = 'crashed' WHERE session_id = $1",
            &[&recent],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::CHECK_VIOLATION));
}
