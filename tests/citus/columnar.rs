//! Columnar archives (`partitions.archive_access_method = "columnar"`, issue 17 item 5), on a
//! single node with the `citus_columnar` extension (the test kit's ordinary cluster: the
//! extension needs no `shared_preload_libraries`) and on the Citus cluster.
//!
//! They live in the Citus suite because a machine has `citus_columnar` only once Citus is
//! installed (`scripts/test-citus` checks that first): the ordinary suite never skips them.
//!
//! - archival turns archived partitions columnar (in the run that archives them, and the heap
//!   ones archived before), keeps both indexes, and the same queries give the same rows as on
//!   the heap partitions they were;
//! - retention rewrites a columnar partition without the expired rows (heap, delete, columnar),
//!   drops one whose rows are all expired, leaves one with nothing expired untouched, and a
//!   second run does nothing; GDPR delete works with columnar archives;
//! - the SQL lifecycle function `enforce_telemetry_retention()` does the same (0046);
//! - columnar asked for without the extension fails naming the key and the fix; `dbx setup`
//!   creates the extension when the configuration asks for it;
//! - on Citus, the same through `dbx partitions` on the distributed table, every shard columnar.

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use dbx_control::partitions::{
    ArchiveAccessMethod, MaintenanceError, PartitionInterval, PartitionManager, PartitionsConfig,
    Task, TaskReport,
};
use dbx_core::{ManualClock, SharedClock};
use dbx_testkit::{run_cli, Fixture, TestDb};
use tokio_postgres::Client;
use uuid::Uuid;

use crate::{dbx_bin, partitions, Distributed};

fn utc(y: i32, mo: u32, d: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, 0, 0, 0).unwrap()
}

/// A migrated database of the ordinary test cluster, its superuser client, with
/// `citus_columnar` created when `columnar`.
async fn single_node(columnar: bool) -> (TestDb, Client) {
    let (db, _ingest) = TestDb::migrated().await;
    let c = db.client().await;
    if columnar {
        c.batch_execute("CREATE EXTENSION citus_columnar")
            .await
            .expect("CREATE EXTENSION citus_columnar (is Citus installed? scripts/test-citus)");
    }
    (db, c)
}

/// A manager as the superuser (a member of dbx_admin: it works as dbx_admin, like
/// dbx_maintenance_service) at 2026-06-15 12:00 UTC, archiving after 90 days.
fn manager(db: &TestDb, am: ArchiveAccessMethod) -> PartitionManager {
    let clock: SharedClock = ManualClock::new(Utc.with_ymd_and_hms(2026, 6, 15, 12, 0, 0).unwrap());
    let cfg = PartitionsConfig {
        archive_access_method: am,
        retention_chunk_rows: 7,
        ..PartitionsConfig::default()
    };
    PartitionManager::new(
        dbx_testkit::connector(&db.url()),
        PartitionInterval::Daily,
        cfg,
        clock,
    )
}

async fn run(m: &PartitionManager, task: Task) -> TaskReport {
    let r = m
        .run_task(task)
        .await
        .unwrap_or_else(|e| panic!("{task}: {e}"))
        .unwrap_or_else(|| panic!("{task}: the advisory lock was held elsewhere"));
    assert!(r.failed.is_empty(), "{task} failed: {:?}", r.failed);
    assert!(r.skipped.is_empty(), "{task} skipped: {:?}", r.skipped);
    r
}

async fn ensure_day(c: &Client, day: DateTime<Utc>) {
    c.execute(
        "SELECT dbx_aviation.ensure_telemetry_partition($1, $2)",
        &[&day, &(day + TimeDelta::days(1))],
    )
    .await
    .unwrap();
}

/// `n` points of one flight of `aircraft` (org `org`) from `start`, every 2 s, with every kind
/// of column filled (arrays, jsonb); returns the session.
async fn flight(c: &Client, org: Uuid, aircraft: Uuid, start: DateTime<Utc>, n: i32) -> Uuid {
    let session = Uuid::new_v4();
    c.execute(
        "INSERT INTO dbx_aviation.flight_telemetry
           (org_id, aircraft_id, session_id, ts, seq, latitude, longitude, altitude_m,
            ground_speed_mps, heading_deg, battery_remaining_pct, motor_rpm, control_surfaces,
            gps_fix, satellites, extra)
         SELECT $1, $2, $3, $4::timestamptz + g * interval '2 seconds', g,
                47.0 + g * 1e-5, 8.5 + g * 2e-5, 100 + (g % 50), 12 + (g % 7), (g * 3) % 360,
                100 - g * 0.01, ARRAY[3000 + g % 100, 3100, 3050, 2990]::real[],
                ARRAY[(g % 10) / 10.0, 0.0]::real[], 3, 12 + g % 4,
                CASE WHEN g % 100 = 0 THEN jsonb_build_object('event', 'waypoint', 'n', g) END
           FROM generate_series(1, $5) g",
        &[&org, &aircraft, &session, &start, &n],
    )
    .await
    .unwrap();
    session
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// (access method, number of indexes, number of unique indexes) of `rel`.
async fn storage(c: &Client, rel: &str) -> (String, i64, i64) {
    let r = c
        .query_one(
            "SELECT am.amname::text,
                    (SELECT count(*) FROM pg_index i WHERE i.indrelid = c.oid),
                    (SELECT count(*) FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique)
               FROM pg_class c JOIN pg_am am ON am.oid = c.relam
              WHERE c.oid = $1::text::regclass",
            &[&rel],
        )
        .await
        .unwrap_or_else(|e| panic!("{rel}: {e}"));
    (r.get(0), r.get(1), r.get(2))
}

async fn relfilenode(c: &Client, rel: &str) -> i64 {
    c.query_one(
        "SELECT pg_relation_filenode($1::text::regclass)::bigint",
        &[&rel],
    )
    .await
    .unwrap()
    .get(0)
}

async fn exists(c: &Client, rel: &str) -> bool {
    c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&rel])
        .await
        .unwrap()
        .get(0)
}

/// The queries whose answers must not change when the archive turns columnar: the seed's
/// daily aggregate (the `telemetry_daily_aircraft` query) over the archive, a time range of
/// one aircraft (its index), a session's points by key (the dedupe index), every column of
/// every row, and live + archive together. Each answer is its rows as text, sorted.
fn queries(aircraft: Uuid, session: Uuid) -> Vec<String> {
    vec![
        "WITH per_session AS (
             SELECT t.aircraft_id, t.org_id, (t.ts AT TIME ZONE 'UTC')::date AS day, t.session_id,
                    count(*) AS points, extract(epoch FROM max(t.ts) - min(t.ts)) AS span_seconds,
                    max(t.altitude_m) AS max_altitude_m, max(t.ground_speed_mps) AS max_ground_speed_mps,
                    min(t.battery_remaining_pct) AS min_battery_pct
               FROM dbx_archive.flight_telemetry_archive t
              GROUP BY t.aircraft_id, t.org_id, (t.ts AT TIME ZONE 'UTC')::date, t.session_id)
         SELECT ps.aircraft_id, ps.org_id, ps.day, sum(ps.points)::bigint,
                sum(ps.span_seconds)::double precision, max(ps.max_altitude_m),
                max(ps.max_ground_speed_mps), min(ps.min_battery_pct)
           FROM per_session ps GROUP BY ps.aircraft_id, ps.org_id, ps.day"
            .to_string(),
        format!(
            "SELECT seq, ts, altitude_m, motor_rpm, extra FROM dbx_archive.flight_telemetry_archive
              WHERE aircraft_id = '{aircraft}' AND ts >= '2026-03-01 00:10+00' AND ts < '2026-03-01 00:20+00'"
        ),
        format!(
            "SELECT ts, latitude, longitude FROM dbx_archive.flight_telemetry_archive
              WHERE session_id = '{session}' AND seq BETWEEN 100 AND 120"
        ),
        "SELECT md5(string_agg(t::text, ',' ORDER BY session_id, seq)) FROM dbx_archive.flight_telemetry_archive t"
            .to_string(),
        "SELECT org_id, count(*), sum(altitude_m) FROM (
             SELECT org_id, altitude_m FROM dbx_aviation.flight_telemetry
             UNION ALL SELECT org_id, altitude_m FROM dbx_archive.flight_telemetry_archive) u
          GROUP BY org_id"
            .to_string(),
    ]
}

async fn answers(c: &Client, qs: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for q in qs {
        let rows = c
            .query(&format!("SELECT q::text FROM ({q}) q ORDER BY 1"), &[])
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"));
        let rows: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        assert!(!rows.is_empty(), "{q}: no rows");
        out.push(rows);
    }
    out
}

/// `org`'s archived rows as a reader sees them through RLS (`dbx_app_read` with the org context).
async fn tenant_rows(c: &Client, org: Uuid) -> i64 {
    c.batch_execute("BEGIN; SET LOCAL ROLE dbx_app_read")
        .await
        .unwrap();
    c.execute("SELECT dbx_aviation.set_org_context($1)", &[&org])
        .await
        .unwrap();
    let n = count(
        c,
        "SELECT count(*) FROM dbx_archive.flight_telemetry_archive",
    )
    .await;
    c.batch_execute("COMMIT").await.unwrap();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_archival_turns_partitions_columnar_and_queries_read_them_unchanged() {
    let (db, c) = single_node(true).await;
    let a = Fixture::org(&c, "COL-A", None).await;
    let b = Fixture::org(&c, "COL-B", None).await;
    let air_a = Fixture::aircraft(&c, a.id, "NCOLA").await;
    let air_b = Fixture::aircraft(&c, b.id, "NCOLB").await;
    for d in [1, 2, 3] {
        ensure_day(&c, utc(2026, 3, d)).await;
    }
    let s1 = flight(&c, a.id, air_a, utc(2026, 3, 1), 3000).await;
    flight(&c, b.id, air_b, utc(2026, 3, 1) + TimeDelta::hours(5), 2000).await;
    flight(&c, a.id, air_a, utc(2026, 3, 2) + TimeDelta::hours(1), 1500).await;
    flight(&c, b.id, air_b, utc(2026, 3, 3), 1000).await;
    // A live day, to be read together with the archive.
    ensure_day(&c, utc(2026, 6, 15)).await;
    flight(&c, a.id, air_a, utc(2026, 6, 15), 100).await;

    // First archived as heap (the default); the answers on heap are the reference.
    run(&manager(&db, ArchiveAccessMethod::Heap), Task::Archive).await;
    let qs = queries(air_a, s1);
    let heap = answers(&c, &qs).await;
    assert_eq!(
        storage(&c, "dbx_archive.flight_telemetry_p20260301")
            .await
            .0,
        "heap"
    );
    // The 3rd goes back to the live table, to be archived by the columnar run itself (the
    // same run as its conversion).
    c.batch_execute(
        "ALTER TABLE dbx_archive.flight_telemetry_archive DETACH PARTITION dbx_archive.flight_telemetry_p20260303;
         ALTER TABLE dbx_archive.flight_telemetry_p20260303 SET SCHEMA dbx_aviation;
         ALTER TABLE dbx_aviation.flight_telemetry ATTACH PARTITION dbx_aviation.flight_telemetry_p20260303
           FOR VALUES FROM ('2026-03-03 00:00+00') TO ('2026-03-04 00:00+00')",
    )
    .await
    .unwrap();

    let m = manager(&db, ArchiveAccessMethod::Columnar);
    let plan = m.plan(Task::Archive).await.unwrap().to_string();
    assert!(
        plan.contains(
            "ALTER TABLE IF EXISTS dbx_archive.\"flight_telemetry_p20260301\" SET ACCESS METHOD columnar;"
        ),
        "{plan}"
    );
    assert!(
        plan.contains("dbx_archive.\"flight_telemetry_p20260303\" SET ACCESS METHOD columnar"),
        "{plan}"
    );
    let r = run(&m, Task::Archive).await;
    assert_eq!(
        r.done.iter().filter(|d| d.contains("columnar")).count(),
        3,
        "{r:?}"
    );
    for d in ["01", "02", "03"] {
        let rel = format!("dbx_archive.flight_telemetry_p202603{d}");
        // Columnar, with the dedupe key (unique) and the (aircraft_id, ts) index kept.
        assert_eq!(storage(&c, &rel).await, ("columnar".into(), 2, 1), "{rel}");
    }
    // The same answers as on heap.
    assert_eq!(answers(&c, &qs).await, heap);
    // RLS still isolates tenants on columnar partitions.
    assert_eq!(tenant_rows(&c, a.id).await, 3000 + 1500);
    assert_eq!(tenant_rows(&c, b.id).await, 2000 + 1000);

    // Idempotent: nothing left to convert.
    let plan = m.plan(Task::Archive).await.unwrap().to_string();
    assert!(!plan.contains("ACCESS METHOD"), "{plan}");

    // A late point of an archived day goes from the default partition into the columnar
    // partition (columnar takes INSERTs).
    c.execute(
        "INSERT INTO dbx_aviation.flight_telemetry (org_id, aircraft_id, session_id, ts, seq)
         VALUES ($1, $2, $3, '2026-03-01 23:00+00', 1)",
        &[&a.id, &air_a, &Uuid::new_v4()],
    )
    .await
    .unwrap();
    let r = run(&m, Task::Sweep).await;
    assert_eq!(r.rows, 1, "{r:?}");
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_archive.flight_telemetry_p20260301"
        )
        .await,
        3000 + 2000 + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_retention_rewrites_or_drops_columnar_partitions_and_gdpr_delete_works() {
    let (db, c) = single_node(true).await;
    // At 2026-06-15 12:00: SHORT's cutoff 2026-05-16 12:00, LONG's 2026-02-15 12:00.
    let short = Fixture::org(&c, "COL-SHORT", None).await;
    let long = Fixture::org(&c, "COL-LONG", None).await;
    for (org, days) in [(short.id, 30), (long.id, 120)] {
        c.execute(
            "UPDATE dbx_aviation.organizations SET data_retention_days = $2 WHERE org_id = $1",
            &[&org, &days],
        )
        .await
        .unwrap();
    }
    let air_s = Fixture::aircraft(&c, short.id, "NSHORT").await;
    let air_l = Fixture::aircraft(&c, long.id, "NLONG").await;
    for d in [(2, 1), (3, 1), (3, 2), (3, 5)] {
        ensure_day(&c, utc(2026, d.0, d.1)).await;
    }
    flight(&c, long.id, air_l, utc(2026, 2, 1), 50).await; // past every retention: dropped
    let s_short = flight(&c, short.id, air_s, utc(2026, 3, 1), 400).await; // expired
    let s_long = flight(&c, long.id, air_l, utc(2026, 3, 1), 300).await; // kept
    flight(&c, short.id, air_s, utc(2026, 3, 2), 200).await; // all expired: dropped
    flight(&c, long.id, air_l, utc(2026, 3, 5), 100).await; // nothing expired
                                                            // A pilot on the short organization's session, for the GDPR delete.
    c.execute(
        "INSERT INTO dbx_aviation.flight_sessions (session_id, org_id, aircraft_id, pilot_id)
         VALUES ($1, $2, $3, 'PILOT-GDPR')",
        &[&s_long, &long.id, &air_l],
    )
    .await
    .unwrap();

    let m = manager(&db, ArchiveAccessMethod::Columnar);
    run(&m, Task::Archive).await;
    for d in ["20260201", "20260301", "20260302", "20260305"] {
        let rel = format!("dbx_archive.flight_telemetry_p{d}");
        assert_eq!(storage(&c, &rel).await.0, "columnar", "{rel}");
    }
    // Columnar refuses the heap path's DELETE: what retention must work around.
    let refused = c
        .execute(
            "DELETE FROM dbx_archive.flight_telemetry_p20260301 WHERE session_id = $1",
            &[&s_short],
        )
        .await
        .unwrap_err();
    assert!(
        dbx_pg::describe(&refused).contains("not supported"),
        "{refused}"
    );
    let untouched = relfilenode(&c, "dbx_archive.flight_telemetry_p20260305").await;

    let plan = m.plan(Task::Retention).await.unwrap().to_string();
    assert!(
        plan.contains(
            "ALTER TABLE \"dbx_archive\".\"flight_telemetry_p20260301\" SET ACCESS METHOD heap;"
        ),
        "{plan}"
    );
    let r = run(&m, Task::Retention).await;
    // SHORT's 400 rows of the 1st, deleted between the two rewrites.
    assert_eq!(r.rows, 400, "{r:?}");
    assert!(!exists(&c, "dbx_archive.flight_telemetry_p20260201").await);
    assert!(!exists(&c, "dbx_archive.flight_telemetry_p20260302").await);
    assert_eq!(
        storage(&c, "dbx_archive.flight_telemetry_p20260301").await,
        ("columnar".into(), 2, 1)
    );
    let left: Vec<(String, i64)> = c
        .query(
            "SELECT session_id::text, count(*) FROM dbx_archive.flight_telemetry_archive
              WHERE ts < '2026-03-02' GROUP BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(left, [(s_long.to_string(), 300)]);
    assert_eq!(
        relfilenode(&c, "dbx_archive.flight_telemetry_p20260305").await,
        untouched,
        "a partition with nothing expired is not rewritten"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_archive.flight_telemetry_p20260305"
        )
        .await,
        100
    );
    // A second run finds nothing expired and rewrites nothing.
    let rewritten = relfilenode(&c, "dbx_archive.flight_telemetry_p20260301").await;
    let r = run(&m, Task::Retention).await;
    assert_eq!(r.rows, 0, "{r:?}");
    assert_eq!(
        relfilenode(&c, "dbx_archive.flight_telemetry_p20260301").await,
        rewritten
    );

    // GDPR delete anonymizes the pilot of a flight whose points are columnar; telemetry holds
    // no personal identifier and is left as it is.
    let n: i32 = c
        .query_one(
            "SELECT dbx_aviation.gdpr_delete_user_data('PILOT-GDPR')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let pilot: String = c
        .query_one(
            "SELECT pilot_id FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&s_long],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pilot, format!("ANONYMIZED_{s_long}"));
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_archive.flight_telemetry_p20260301"
        )
        .await,
        300
    );
}

/// The SQL lifecycle function `enforce_telemetry_retention()` (migration 0046) rewrites a
/// columnar partition without the expired rows too (server clock: days relative to now).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_retention_function_rewrites_columnar_partitions_too() {
    let (_db, c) = single_node(true).await;
    let short = Fixture::org(&c, "SQL-SHORT", None).await;
    let long = Fixture::org(&c, "SQL-LONG", None).await;
    for (org, days) in [(short.id, 30), (long.id, 120)] {
        c.execute(
            "UPDATE dbx_aviation.organizations SET data_retention_days = $2 WHERE org_id = $1",
            &[&org, &days],
        )
        .await
        .unwrap();
    }
    let air_s = Fixture::aircraft(&c, short.id, "NSQLS").await;
    let air_l = Fixture::aircraft(&c, long.id, "NSQLL").await;
    let day = Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        - TimeDelta::days(40);
    ensure_day(&c, day).await;
    flight(&c, short.id, air_s, day, 300).await;
    flight(&c, long.id, air_l, day, 200).await;
    let rel = format!("dbx_aviation.flight_telemetry_p{}", day.format("%Y%m%d"));
    c.batch_execute(&format!("ALTER TABLE {rel} SET ACCESS METHOD columnar"))
        .await
        .unwrap();
    let run = |max: i32| {
        let c = &c;
        async move {
            let r = c
                .query_one(
                    "SELECT deleted_rows, more_pending FROM dbx_aviation.enforce_telemetry_retention($1)",
                    &[&max],
                )
                .await
                .unwrap();
            (r.get::<_, i64>(0), r.get::<_, bool>(1))
        }
    };
    // All 300 expired rows at once (a rewrite is not chunked), past the budget of 100.
    assert_eq!(run(100).await, (300, true));
    assert_eq!(run(100).await, (0, false));
    assert_eq!(storage(&c, &rel).await, ("columnar".into(), 2, 1));
    assert_eq!(count(&c, &format!("SELECT count(*) FROM {rel}")).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columnar_without_the_extension_fails_naming_the_key_and_setup_creates_it() {
    let (db, ingest) = TestDb::migrated().await;
    let c = db.client().await;
    // The daemon refuses to start, naming the key and the fix.
    let (ok, out) = tokio::task::spawn_blocking(move || {
        run_cli(
            dbx_bin(),
            &["serve"],
            &[
                ("DATABASE_URL", ingest.as_str()),
                ("DBX_PARTITIONS__ARCHIVE_ACCESS_METHOD", "columnar"),
                ("DBX_LISTENER__TCP_BIND", "127.0.0.1:0"),
                ("DBX_LISTENER__UDP_BIND", "127.0.0.1:0"),
                ("DBX_HTTP__BIND", "127.0.0.1:0"),
            ],
        )
    })
    .await
    .unwrap();
    assert!(!ok, "{out}");
    assert!(out.contains("partitions.archive_access_method"), "{out}");
    assert!(out.contains("CREATE EXTENSION citus_columnar"), "{out}");
    // So does the archive task (`dbx partitions archive`, or a daemon whose database lost it).
    ensure_day(&c, utc(2026, 3, 1)).await;
    let m = manager(&db, ArchiveAccessMethod::Columnar);
    let e = m.run_task(Task::Archive).await.unwrap_err();
    assert!(matches!(e, MaintenanceError::NoColumnar), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("partitions.archive_access_method"), "{msg}");
    assert!(msg.contains("CREATE EXTENSION citus_columnar"), "{msg}");
    // Nothing was archived by the failed run.
    assert!(exists(&c, "dbx_aviation.flight_telemetry_p20260301").await);

    // `dbx setup` with columnar asked for creates the extension (the server has it).
    let dir = tempfile::tempdir().unwrap();
    let name = format!("{}_setup", db.name());
    let (ok, out) = run_cli(
        dbx_bin(),
        &[
            "setup",
            "--no-sample-data",
            "--superuser-url",
            &db.url(),
            "--database",
            &name,
            "--out-dir",
            &dir.path().display().to_string(),
        ],
        &[("DBX_PARTITIONS__ARCHIVE_ACCESS_METHOD", "columnar")],
    );
    assert!(ok, "dbx setup failed:\n{out}");
    assert!(out.contains("created extension citus_columnar"), "{out}");
    let other = dbx_testkit::connect(&db.server_url(&name)).await;
    assert_eq!(
        count(
            &other,
            "SELECT count(*) FROM pg_extension WHERE extname = 'citus_columnar'"
        )
        .await,
        1
    );
    drop(other);
    c.batch_execute(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
        .await
        .unwrap();
}

/// The access methods of `rel`'s shards, as the workers report them.
async fn shard_access_methods(c: &Client, rel: &str) -> Vec<String> {
    let mut v: Vec<String> = c
        .query(
            "SELECT result FROM run_command_on_shards($1::text::regclass,
               $$SELECT am.amname FROM pg_class c JOIN pg_am am ON am.oid = c.relam WHERE c.oid = '%s'::regclass$$)",
            &[&rel],
        )
        .await
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Partitions of the live or the archive telemetry that Citus does not know (must stay 0).
async fn undistributed(c: &Client) -> i64 {
    count(
        c,
        "SELECT count(*) FROM pg_inherits i \
          WHERE i.inhparent IN ('dbx_aviation.flight_telemetry'::regclass, \
                                'dbx_archive.flight_telemetry_archive'::regclass) \
            AND NOT EXISTS (SELECT 1 FROM citus_tables t WHERE t.table_name = i.inhrelid::regclass)",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_citus_archival_turns_every_shard_columnar_and_retention_rewrites_it() {
    // `dbx setup --distributed` creates citus_columnar (on every node) when asked for.
    let d = Distributed::with_env(&[("DBX_PARTITIONS__ARCHIVE_ACCESS_METHOD", "columnar")]).await;
    assert!(
        d.output.contains("created extension citus_columnar"),
        "{}",
        d.output
    );
    let on_workers: Vec<String> = d
        .client
        .query(
            "SELECT result FROM run_command_on_workers(\
               $$SELECT count(*) FROM pg_am WHERE amname = 'columnar'$$)",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(on_workers, ["1", "1"]);
    let (short, air_s) = d.org("CSHORT").await;
    let (long, air_l) = d.org("CLONG").await;
    d.client
        .execute(
            "UPDATE dbx_aviation.organizations SET data_retention_days = 15 WHERE org_id = $1",
            &[&short.id],
        )
        .await
        .unwrap();
    let day = Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        - TimeDelta::days(20);
    ensure_day(&d.client, day).await;
    let mut sessions = Vec::new();
    for i in 0..4 {
        sessions.push(flight(&d.client, short.id, air_s, day + TimeDelta::hours(i), 200).await);
        sessions.push(flight(&d.client, long.id, air_l, day + TimeDelta::hours(i), 150).await);
    }
    let rel = format!("dbx_archive.flight_telemetry_p{}", day.format("%Y%m%d"));
    let columnar = [("DBX_PARTITIONS__ARCHIVE_ACCESS_METHOD", "columnar")];
    let env = [columnar[0], ("DBX_PARTITIONS__ARCHIVE_AFTER_DAYS", "10")];
    assert_eq!(
        count(
            &d.client,
            "SELECT count(*) FROM pg_am WHERE amname = 'columnar'"
        )
        .await,
        1
    );

    let plan = partitions(&d, &["--dry-run", "archive"], &env);
    assert!(plan.contains("alter_table_set_access_method"), "{plan}");
    let qs = [
        "SELECT org_id, count(*), sum(altitude_m), max(ts) \
         FROM dbx_archive.flight_telemetry_archive GROUP BY 1"
            .to_string(),
        format!(
            "SELECT seq, ts, altitude_m, motor_rpm FROM dbx_archive.flight_telemetry_archive \
             WHERE session_id = '{}' AND seq < 20",
            sessions[1]
        ),
    ];
    // The reference: archived as heap.
    partitions(
        &d,
        &["archive"],
        &[("DBX_PARTITIONS__ARCHIVE_AFTER_DAYS", "10")],
    );
    let heap = answers(&d.client, &qs).await;
    assert_eq!(shard_access_methods(&d.client, &rel).await, ["heap"]);

    let out = partitions(&d, &["archive"], &env);
    assert!(out.contains("columnar"), "{out}");
    assert_eq!(storage(&d.client, &rel).await.0, "columnar");
    assert_eq!(shard_access_methods(&d.client, &rel).await, ["columnar"]);
    assert_eq!(answers(&d.client, &qs).await, heap);
    let list = partitions(&d, &["list"], &[]);
    let line = list
        .lines()
        .find(|l| l.starts_with(rel.trim_start_matches("dbx_archive.")))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(line.ends_with("(columnar)"), "{list}");
    assert_eq!(undistributed(&d.client).await, 0);

    // Retention: the 15-day organization's rows go, by a rewrite (heap, delete, columnar) on
    // every shard; the other's stay, columnar.
    partitions(&d, &["retention"], &columnar);
    let archived = |s: Uuid| {
        format!(
            "SELECT count(*) FROM dbx_archive.flight_telemetry_archive WHERE session_id = '{s}'"
        )
    };
    for (i, s) in sessions.iter().enumerate() {
        let want = if i % 2 == 0 { 0 } else { 150 };
        assert_eq!(count(&d.client, &archived(*s)).await, want, "session {i}");
    }
    assert_eq!(storage(&d.client, &rel).await.0, "columnar");
    assert_eq!(shard_access_methods(&d.client, &rel).await, ["columnar"]);
    assert_eq!(undistributed(&d.client).await, 0);
    // Nothing more to do.
    let plan = partitions(&d, &["--dry-run", "retention"], &columnar);
    assert!(!plan.contains("alter_table_set_access_method"), "{plan}");
}

/// The measurement of docs/scaling.md and benches/RESULTS.md ("Columnar archives"), not a test:
/// `benches/columnar.sh` runs it (ignored otherwise; it asserts nothing about speed).
///
/// 1,000,000 points of 16 simulated aircraft (`dbx_client::sim::FlightSim`, the load
/// generator's flights: 6,000-point flights, every column filled) in one UTC day, written with
/// the daemon's binary COPY encoder into that day's partition; archived as heap, measured,
/// then turned columnar by the archival task, measured again. Bytes are
/// `pg_total_relation_size` (table + indexes + TOAST) and its parts; the query is the seed's
/// daily aggregate (`telemetry_daily_aircraft`'s query) over that day, through the archive
/// parent, median of 5 after one warm-up run, on the test kit's cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: benches/columnar.sh"]
async fn bench_columnar_archive_bytes_and_query_time() {
    use dbx_batcher::copy::{send_chunks, CopyEncoder, COLUMNS};
    use dbx_client::sim::FlightSim;
    use futures::SinkExt;

    const POINTS: usize = 1_000_000;
    const AIRCRAFT: usize = 16;
    let (db, c) = single_node(true).await;
    let org = Fixture::org(&c, "BENCH", None).await;
    let mut fleet = Vec::new();
    for i in 0..AIRCRAFT {
        let reg = format!("NB{i:03}");
        let id = Fixture::aircraft(&c, org.id, &reg).await;
        fleet.push((id, FlightSim::new(reg, 1000 + i as u64)));
    }
    let day = utc(2026, 3, 1);
    ensure_day(&c, day).await;
    // Each aircraft's points evenly over the day (1.38 s apart), the 16 interleaved.
    let per = POINTS / AIRCRAFT;
    let step_us = 86_400_000_000 / per as i64;
    let t0 = std::time::Instant::now();
    let mut enc = CopyEncoder::new(8 << 20);
    let sql = format!(
        "COPY dbx_aviation.flight_telemetry_p20260301 ({COLUMNS}) FROM STDIN (FORMAT binary)"
    );
    let mut written = 0;
    while written < POINTS {
        enc.begin();
        for k in 0..50_000 / AIRCRAFT {
            let i = written / AIRCRAFT + k;
            if i >= per {
                break;
            }
            let ts = day.timestamp_micros() + i as i64 * step_us;
            for (aircraft, sim) in fleet.iter_mut() {
                let (session, points) = sim.next_batch(1, ts);
                enc.push(&org.id, aircraft, &session, &points[0]);
            }
        }
        written += enc.rows();
        let data = enc.finish();
        let sink = c.copy_in::<_, bytes::Bytes>(sql.as_str()).await.unwrap();
        futures::pin_mut!(sink);
        for piece in send_chunks(&data) {
            sink.feed(piece).await.unwrap();
        }
        sink.finish().await.unwrap();
    }
    let copy_secs = t0.elapsed().as_secs_f64();
    c.batch_execute("VACUUM ANALYZE dbx_aviation.flight_telemetry_p20260301")
        .await
        .unwrap();
    let rel = "dbx_archive.flight_telemetry_p20260301";
    run(&manager(&db, ArchiveAccessMethod::Heap), Task::Archive).await;

    let heap = measure(&c, rel, POINTS).await;
    let t1 = std::time::Instant::now();
    run(&manager(&db, ArchiveAccessMethod::Columnar), Task::Archive).await;
    let convert_secs = t1.elapsed().as_secs_f64();
    c.batch_execute(&format!("ANALYZE {rel}")).await.unwrap();
    assert_eq!(storage(&c, rel).await.0, "columnar");
    let col = measure(&c, rel, POINTS).await;
    println!("columnar bench: {POINTS} points, {AIRCRAFT} aircraft, one day; COPY {copy_secs:.1} s, conversion to columnar {convert_secs:.1} s");
    println!("| storage | total bytes/point | table | indexes | TOAST | daily aggregate, median of 5 (ms) | one aircraft's hour, median of 5 (ms) |");
    println!("|---|---|---|---|---|---|---|");
    for (name, m) in [("heap", &heap), ("columnar", &col)] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
            m.total, m.table, m.indexes, m.toast, m.aggregate_ms, m.lookup_ms
        );
    }
    println!(
        "ratios heap/columnar: total {:.2}x, table {:.2}x; daily aggregate {:.2}x, aircraft hour {:.2}x",
        heap.total / col.total,
        heap.table / col.table,
        heap.aggregate_ms / col.aggregate_ms,
        heap.lookup_ms / col.lookup_ms
    );
}

/// Bytes per point and query times of one archived partition.
struct Measured {
    total: f64,
    table: f64,
    indexes: f64,
    toast: f64,
    aggregate_ms: f64,
    lookup_ms: f64,
}

async fn measure(c: &Client, rel: &str, points: usize) -> Measured {
    assert_eq!(
        count(c, &format!("SELECT count(*) FROM {rel}")).await,
        points as i64
    );
    let r = c
        .query_one(
            "SELECT pg_total_relation_size($1::text::regclass)::float8,
                    pg_relation_size($1::text::regclass)::float8,
                    pg_indexes_size($1::text::regclass)::float8,
                    coalesce((SELECT pg_total_relation_size(reltoastrelid) FROM pg_class
                               WHERE oid = $1::text::regclass AND reltoastrelid <> 0), 0)::float8",
            &[&rel],
        )
        .await
        .unwrap();
    let per = |i: usize| r.get::<_, f64>(i) / points as f64;
    let aggregate = "WITH per_session AS (
             SELECT t.aircraft_id, t.org_id, (t.ts AT TIME ZONE 'UTC')::date AS day, t.session_id,
                    count(*) AS points, extract(epoch FROM max(t.ts) - min(t.ts)) AS span_seconds,
                    max(t.altitude_m) AS max_altitude_m, max(t.ground_speed_mps) AS max_ground_speed_mps,
                    min(t.battery_remaining_pct) AS min_battery_pct
               FROM dbx_archive.flight_telemetry_archive t
              WHERE t.ts >= '2026-03-01 00:00+00' AND t.ts < '2026-03-02 00:00+00'
              GROUP BY t.aircraft_id, t.org_id, (t.ts AT TIME ZONE 'UTC')::date, t.session_id)
         SELECT ps.aircraft_id, ps.org_id, ps.day, sum(ps.points)::bigint,
                sum(ps.span_seconds)::double precision, max(ps.max_altitude_m),
                max(ps.max_ground_speed_mps), min(ps.min_battery_pct)
           FROM per_session ps GROUP BY ps.aircraft_id, ps.org_id, ps.day";
    let aircraft: Uuid = c
        .query_one(&format!("SELECT aircraft_id FROM {rel} LIMIT 1"), &[])
        .await
        .unwrap()
        .get(0);
    let lookup = format!(
        "SELECT ts, latitude, longitude, altitude_m FROM dbx_archive.flight_telemetry_archive
          WHERE aircraft_id = '{aircraft}' AND ts >= '2026-03-01 12:00+00' AND ts < '2026-03-01 13:00+00'"
    );
    Measured {
        total: per(0),
        table: per(1),
        indexes: per(2),
        toast: per(3),
        aggregate_ms: median_ms(c, aggregate, 16).await,
        lookup_ms: median_ms(c, &lookup, 2_604).await,
    }
}

/// Median wall time of 5 runs of `sql` (after one warm-up), checking its row count.
async fn median_ms(c: &Client, sql: &str, rows: usize) -> f64 {
    let mut v = Vec::new();
    for i in 0..6 {
        let t = std::time::Instant::now();
        let n = c.query(sql, &[]).await.unwrap().len();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        assert!(
            n.abs_diff(rows) <= 1,
            "{sql}: {n} rows, expected about {rows}"
        );
        if i > 0 {
            v.push(ms);
        }
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[2]
}
