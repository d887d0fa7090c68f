//! The control plane against a real PostgreSQL, with the clock under the test's control:
//! premake across a month boundary and DST changes in a non-UTC server zone, the default-
//! partition sweep, archival, retention with two organizations, maintenance under a conflicting
//! lock while ingest goes on, the advisory lock between two managers, and the health collector.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use tokio::sync::OnceCell;
use tokio_postgres::Client;
use uuid::Uuid;

use dbx_control::health::HealthCollector;
use dbx_control::partitions::{
    PartitionInterval, PartitionManager, PartitionsConfig, Task, TaskReport,
};
use dbx_core::{ManualClock, SharedClock, SystemClock};
use dbx_testkit::TestDb;

mod common;
use common::{count, new_org};

const MAINT_PASSWORD: &str = "dbx-maintenance-test-password";

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
}

/// A migrated database, a superuser client, and the maintenance user's URL.
async fn setup() -> (TestDb, Client, String) {
    let (db, _ingest) = TestDb::migrated().await;
    let c = db.client().await;
    // Roles are cluster-wide; concurrent ALTER ROLE of one role fails: once per process.
    static PW: OnceCell<()> = OnceCell::const_new();
    PW.get_or_init(|| async {
        c.batch_execute(&format!(
            "ALTER ROLE dbx_maintenance_service WITH LOGIN PASSWORD '{MAINT_PASSWORD}'"
        ))
        .await
        .expect("maintenance password");
    })
    .await;
    let url = db.url_for("dbx_maintenance_service", MAINT_PASSWORD);
    (db, c, url)
}

fn manager(
    url: &str,
    clock: &Arc<ManualClock>,
    interval: PartitionInterval,
    cfg: PartitionsConfig,
) -> PartitionManager {
    let clock: SharedClock = clock.clone();
    PartitionManager::new(dbx_testkit::connector(url), interval, cfg, clock)
}

async fn run(m: &PartitionManager, task: Task) -> TaskReport {
    let r = m
        .run_task(task)
        .await
        .unwrap_or_else(|e| panic!("{task}: {e}"))
        .unwrap_or_else(|| panic!("{task}: the advisory lock was held elsewhere"));
    assert!(r.failed.is_empty(), "{task} failed: {:?}", r.failed);
    r
}

async fn ensure(c: &Client, from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    c.query_one(
        "SELECT dbx_aviation.ensure_telemetry_partition($1, $2)",
        &[&from, &to],
    )
    .await
    .unwrap()
    .get(0)
}

async fn ensure_day(c: &Client, day: DateTime<Utc>) -> String {
    ensure(c, day, day + chrono::TimeDelta::days(1)).await
}

async fn point(c: &Client, org: Uuid, seq: i64, ts: &str) {
    c.execute(
        &format!(
            "INSERT INTO dbx_aviation.flight_telemetry (org_id, aircraft_id, session_id, ts, seq)
             VALUES ($1, $2, $3, {ts}::timestamptz, $4)"
        ),
        &[&org, &Uuid::new_v4(), &Uuid::new_v4(), &seq],
    )
    .await
    .unwrap_or_else(|e| panic!("inserting a point at {ts}: {e}"));
}

async fn exists(c: &Client, rel: &str) -> bool {
    c.query_one(&format!("SELECT to_regclass('{rel}') IS NOT NULL"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Partition of the live table holding `ts` (a literal in the session's zone).
async fn routed_to(c: &Client, ts: &str) -> String {
    c.query_one(
        &format!(
            "SELECT tableoid::regclass::text FROM dbx_aviation.flight_telemetry WHERE ts = '{ts}'::timestamptz"
        ),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("finding {ts}: {e}"))
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn premake_across_a_month_boundary_and_dst_in_a_non_utc_server_zone() {
    let (db, c, url) = setup().await;
    c.batch_execute(&format!(
        "ALTER DATABASE \"{}\" SET timezone = 'Europe/Berlin'",
        db.name()
    ))
    .await
    .unwrap();
    // A new session sees the zone (the manager's connection too).
    let berlin = db.client().await;
    let tz: String = berlin.query_one("SHOW timezone", &[]).await.unwrap().get(0);
    assert_eq!(tz, "Europe/Berlin");

    // 2026-03-29 00:30 UTC = 01:30 CET; at 01:00 UTC Berlin springs to CEST (a 23-hour local day).
    let clock = ManualClock::new(utc(2026, 3, 29, 0, 30));
    let m = manager(
        &url,
        &clock,
        PartitionInterval::Daily,
        PartitionsConfig::default(),
    );
    let r = run(&m, Task::Premake).await;
    assert_eq!(r.done.len(), 7, "{r:?}");
    let live: Vec<_> = m
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|p| {
            p.is_live()
                && p.from
                    .is_some_and(|f| f >= utc(2026, 3, 1, 0, 0) && f < utc(2026, 5, 1, 0, 0))
        })
        .collect();
    let names: Vec<&str> = live.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "flight_telemetry_p20260327",
            "flight_telemetry_p20260328",
            "flight_telemetry_p20260329",
            "flight_telemetry_p20260330",
            "flight_telemetry_p20260331",
            "flight_telemetry_p20260401",
            "flight_telemetry_p20260402",
        ]
    );
    for (i, p) in live.iter().enumerate() {
        let from = utc(2026, 3, 27, 0, 0) + chrono::TimeDelta::days(i as i64);
        assert_eq!(p.from, Some(from), "{}", p.name);
        // Exactly 24 hours, the DST day included: partitions are UTC days.
        assert_eq!(
            p.to,
            Some(from + chrono::TimeDelta::hours(24)),
            "{}",
            p.name
        );
    }
    // Points written by a Berlin session land by their UTC instant.
    let o = Uuid::new_v4();
    point(&berlin, o, 1, "'2026-03-29 00:30:00+01'").await; // 23:30 UTC on the 28th
    point(&berlin, o, 2, "'2026-03-29 01:59:59'").await; // local CET = 00:59:59 UTC
    point(&berlin, o, 3, "'2026-03-29 03:00:00'").await; // local CEST = 01:00 UTC
    point(&berlin, o, 4, "'2026-04-01 00:30:00'").await; // CEST = 31 March 22:30 UTC
    assert_eq!(
        routed_to(&berlin, "2026-03-29 00:30:00+01").await,
        "dbx_aviation.flight_telemetry_p20260328"
    );
    assert_eq!(
        routed_to(&berlin, "2026-03-29 01:59:59").await,
        "dbx_aviation.flight_telemetry_p20260329"
    );
    assert_eq!(
        routed_to(&berlin, "2026-03-29 03:00:00").await,
        "dbx_aviation.flight_telemetry_p20260329"
    );
    assert_eq!(
        routed_to(&berlin, "2026-04-01 00:30:00").await,
        "dbx_aviation.flight_telemetry_p20260331"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_aviation.flight_telemetry_default"
        )
        .await,
        0
    );
    // A second run has nothing to do.
    assert!(m.plan(Task::Premake).await.unwrap().steps.is_empty());
    // Indexes were built on the standalone table and adopted by the parent's partitioned
    // indexes at ATTACH (named after the partition, children of the parent's indexes).
    let adopted: Vec<String> = c
        .query(
            "SELECT parent.relname::text || '<-' || child.relname::text
               FROM pg_inherits i
               JOIN pg_class child ON child.oid = i.inhrelid
               JOIN pg_class parent ON parent.oid = i.inhparent
              WHERE child.relname LIKE 'flight_telemetry_p20260329%' AND child.relkind = 'i'
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        adopted,
        [
            "flight_telemetry_aircraft_ts<-flight_telemetry_p20260329_aircraft_ts",
            "flight_telemetry_dedupe<-flight_telemetry_p20260329_dedupe",
        ]
    );

    // Hourly, across the autumn change: 02:00–03:00 local happens twice on 2026-10-25.
    let clock = ManualClock::new(utc(2026, 10, 25, 0, 10));
    let h = manager(
        &url,
        &clock,
        PartitionInterval::Hourly,
        PartitionsConfig {
            premake: 3,
            lookback: 1,
            ..PartitionsConfig::default()
        },
    );
    let r = run(&h, Task::Premake).await;
    assert_eq!(r.done.len(), 5, "{r:?}");
    for (i, name) in [
        "2026102423",
        "2026102500",
        "2026102501",
        "2026102502",
        "2026102503",
    ]
    .iter()
    .enumerate()
    {
        let p = h
            .list()
            .await
            .unwrap()
            .into_iter()
            .find(|p| p.name == format!("flight_telemetry_p{name}"))
            .unwrap_or_else(|| panic!("flight_telemetry_p{name} missing"));
        let from = utc(2026, 10, 24, 23, 0) + chrono::TimeDelta::hours(i as i64);
        assert_eq!(
            (p.from, p.to),
            (Some(from), Some(from + chrono::TimeDelta::hours(1)))
        );
    }
    // The two 02:30s of that night are an hour apart and go to different partitions.
    point(&berlin, o, 5, "'2026-10-25 02:30:00+02'").await;
    point(&berlin, o, 6, "'2026-10-25 02:30:00+01'").await;
    assert_eq!(
        routed_to(&berlin, "2026-10-25 02:30:00+02").await,
        "dbx_aviation.flight_telemetry_p2026102500"
    );
    assert_eq!(
        routed_to(&berlin, "2026-10-25 02:30:00+01").await,
        "dbx_aviation.flight_telemetry_p2026102501"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_empties_the_default_partition_and_the_next_creation_succeeds() {
    let (_db, c, url) = setup().await;
    let clock = ManualClock::new(utc(2026, 5, 10, 12, 0));
    let m = manager(
        &url,
        &clock,
        PartitionInterval::Daily,
        PartitionsConfig::default(),
    );
    run(&m, Task::Premake).await;
    // A clock-skewed gateway and a backfill: no partition for these yet.
    let o = Uuid::new_v4();
    point(&c, o, 1, "'2026-05-20 10:00:00+00'").await;
    point(&c, o, 2, "'2026-05-20 23:59:59+00'").await;
    point(&c, o, 3, "'2026-05-21 00:00:00+00'").await;
    point(&c, o, 4, "'2025-12-31 23:00:00+00'").await;
    let default_rows = "SELECT count(*) FROM dbx_aviation.flight_telemetry_default";
    assert_eq!(count(&c, default_rows).await, 4);

    // What the sweep prevents: a plain partition creation over those rows fails.
    let e = c
        .batch_execute(
            "CREATE TABLE dbx_aviation.naive PARTITION OF dbx_aviation.flight_telemetry
             FOR VALUES FROM ('2026-05-20 00:00+00') TO ('2026-05-21 00:00+00')",
        )
        .await
        .unwrap_err();
    assert!(
        e.as_db_error().unwrap().message().contains(
            "updated partition constraint for default partition \"flight_telemetry_default\" would be violated"
        ),
        "{e:?}"
    );

    let plan = m.plan(Task::Sweep).await.unwrap();
    assert_eq!(plan.steps.len(), 3, "{plan}");
    assert!(plan.to_string().contains("ensure_telemetry_partition('2026-05-20 00:00:00+00'::timestamptz, '2026-05-21 00:00:00+00'::timestamptz)"), "{plan}");
    let r = run(&m, Task::Sweep).await;
    assert_eq!(r.done.len(), 3, "{r:?}");
    assert_eq!(count(&c, default_rows).await, 0);
    assert_eq!(
        routed_to(&c, "2026-05-20 23:59:59+00").await,
        "dbx_aviation.flight_telemetry_p20260520"
    );
    assert_eq!(
        routed_to(&c, "2026-05-21 00:00:00+00").await,
        "dbx_aviation.flight_telemetry_p20260521"
    );
    assert_eq!(
        routed_to(&c, "2025-12-31 23:00:00+00").await,
        "dbx_aviation.flight_telemetry_p20251231"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM dbx_aviation.flight_telemetry").await,
        4
    );
    // Nothing left to sweep; and time moving on, premake over those days succeeds.
    assert!(m.plan(Task::Sweep).await.unwrap().steps.is_empty());
    clock.set(utc(2026, 5, 19, 1, 0));
    let r = run(&m, Task::Premake).await;
    assert!(r.skipped.is_empty(), "{r:?}");
    assert!(exists(&c, "dbx_aviation.flight_telemetry_p20260523").await);
    // And a plain creation of a fresh range works again.
    c.batch_execute(
        "CREATE TABLE dbx_aviation.naive PARTITION OF dbx_aviation.flight_telemetry
         FOR VALUES FROM ('2026-07-01 00:00+00') TO ('2026-07-02 00:00+00')",
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archival_moves_exactly_the_old_partitions_and_the_archive_parent_sees_them() {
    let (_db, c, url) = setup().await;
    // archive_after_days 90 at 2026-06-15 12:00: partitions that ended by 2026-03-17 12:00.
    let clock = ManualClock::new(utc(2026, 6, 15, 12, 0));
    let m = manager(
        &url,
        &clock,
        PartitionInterval::Daily,
        PartitionsConfig::default(),
    );
    let days = [
        utc(2026, 1, 1, 0, 0),
        utc(2026, 3, 16, 0, 0), // ends 03-17 00:00: old enough
        utc(2026, 3, 17, 0, 0), // ends 03-18 00:00: not entirely older than 90 days
        utc(2026, 6, 15, 0, 0),
    ];
    let o = Uuid::new_v4();
    for (i, d) in days.iter().enumerate() {
        ensure_day(&c, *d).await;
        for k in 0..=i as i64 {
            point(
                &c,
                o,
                10 * i as i64 + k,
                &format!("'{}'", (*d + chrono::TimeDelta::hours(k + 1)).to_rfc3339()),
            )
            .await;
        }
    }
    let oid = |name: &'static str| {
        let c = &c;
        async move {
            c.query_one(&format!("SELECT '{name}'::regclass::oid"), &[])
                .await
                .unwrap()
                .get::<_, u32>(0)
        }
    };
    let oid_jan = oid("dbx_aviation.flight_telemetry_p20260101").await;

    let plan = m.plan(Task::Archive).await.unwrap();
    let sql = plan.to_string();
    assert_eq!(plan.steps.len(), 2, "{sql}");
    assert!(sql.contains("LOCK TABLE \"dbx_aviation\".\"flight_telemetry_p20260101\" IN ACCESS EXCLUSIVE MODE;\nALTER TABLE dbx_aviation.flight_telemetry DETACH PARTITION \"dbx_aviation\".\"flight_telemetry_p20260101\";"), "{sql}");
    assert!(!sql.contains("CONCURRENTLY;"), "{sql}");
    let r = run(&m, Task::Archive).await;
    assert_eq!(r.done.len(), 2, "{r:?}");

    for name in ["flight_telemetry_p20260101", "flight_telemetry_p20260316"] {
        assert!(!exists(&c, &format!("dbx_aviation.{name}")).await);
        let parent: String = c
            .query_one(
                "SELECT parent FROM dbx_aviation.telemetry_partitions() WHERE partition_schema = 'dbx_archive' AND partition_name = $1",
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(parent, "dbx_archive.flight_telemetry_archive");
        let (owner, ingest_insert): (String, bool) = {
            let r = c
                .query_one(
                    &format!("SELECT pg_get_userbyid(relowner)::text, has_table_privilege('dbx_ingest', oid, 'INSERT') FROM pg_class WHERE oid = 'dbx_archive.{name}'::regclass"),
                    &[],
                )
                .await
                .unwrap();
            (r.get(0), r.get(1))
        };
        assert_eq!(owner, "dbx_admin");
        assert!(!ingest_insert);
    }
    // Moved, not copied: the same relation.
    assert_eq!(oid("dbx_archive.flight_telemetry_p20260101").await, oid_jan);
    assert!(exists(&c, "dbx_aviation.flight_telemetry_p20260317").await);
    assert!(exists(&c, "dbx_aviation.flight_telemetry_p20260615").await);
    // 1 + 2 rows archived, 3 + 4 live; the archive parent sees the archived ones.
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
        7
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_archive.flight_telemetry_archive WHERE ts < '2026-01-02'"
        )
        .await,
        1
    );
    // Nothing more to do until time moves on; then the 17th goes too.
    assert!(m.plan(Task::Archive).await.unwrap().steps.is_empty());
    clock.set(utc(2026, 6, 16, 0, 0));
    let r = run(&m, Task::Archive).await;
    assert_eq!(r.done.len(), 1, "{r:?}");
    assert!(exists(&c, "dbx_archive.flight_telemetry_p20260317").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archival_detaches_concurrently_when_there_is_no_default_partition() {
    let (_db, c, url) = setup().await;
    // Made while the default partition still exists (the function moves its rows).
    ensure_day(&c, utc(2026, 2, 1, 0, 0)).await;
    point(&c, Uuid::new_v4(), 1, "'2026-02-01 10:00+00'").await;
    c.batch_execute("DROP TABLE dbx_aviation.flight_telemetry_default")
        .await
        .unwrap();
    let clock = ManualClock::new(utc(2026, 6, 15, 12, 0));
    let m = manager(
        &url,
        &clock,
        PartitionInterval::Daily,
        PartitionsConfig::default(),
    );
    let plan = m.plan(Task::Archive).await.unwrap();
    assert!(plan.to_string().contains(
        "ALTER TABLE dbx_aviation.flight_telemetry DETACH PARTITION \"dbx_aviation\".\"flight_telemetry_p20260201\" CONCURRENTLY;"
    ), "{plan}");
    let r = run(&m, Task::Archive).await;
    assert_eq!(r.done.len(), 2, "{r:?}");
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_archive.flight_telemetry_archive"
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_with_two_organizations_drops_or_deletes_exactly_what_it_should() {
    let (_db, c, url) = setup().await;
    let short = new_org(&c, "RET-SHORT", 30).await; // cutoff 2026-05-16 12:00
    let long = new_org(&c, "RET-LONG", 120).await; // cutoff 2026-02-15 12:00 (= every org's)
    let clock = ManualClock::new(utc(2026, 6, 15, 12, 0));
    let cfg = PartitionsConfig {
        retention_chunk_rows: 2,
        ..PartitionsConfig::default()
    };
    let m = manager(&url, &clock, PartitionInterval::Daily, cfg);

    // Archived: 02-01 (past every retention) and 03-01 (past SHORT's only).
    ensure_day(&c, utc(2026, 2, 1, 0, 0)).await;
    ensure_day(&c, utc(2026, 3, 1, 0, 0)).await;
    for (org, seq) in [(short, 1), (long, 2)] {
        point(&c, org, seq, "'2026-02-01 08:00+00'").await;
    }
    for seq in 10..15 {
        point(&c, short, seq, &format!("'2026-03-01 {seq}:00+00'")).await;
    }
    for seq in 20..23 {
        point(&c, long, seq, &format!("'2026-03-01 {}:00+00'", seq - 10)).await;
    }
    run(&m, Task::Archive).await;
    assert!(exists(&c, "dbx_archive.flight_telemetry_p20260301").await);
    // Live: 02-10 (past every retention), 02-15 (straddles LONG's cutoff),
    // 05-16 (straddles SHORT's cutoff), 06-15 (nothing expired); 04-01 sits in the default partition.
    for d in [(2, 10), (2, 15), (5, 16), (6, 15)] {
        ensure_day(&c, utc(2026, d.0, d.1, 0, 0)).await;
    }
    point(&c, long, 30, "'2026-02-10 09:00+00'").await;
    point(&c, short, 40, "'2026-02-15 06:00+00'").await;
    point(&c, long, 41, "'2026-02-15 06:00+00'").await; // expired for LONG too
    point(&c, long, 42, "'2026-02-15 18:00+00'").await; // kept
    point(&c, short, 50, "'2026-05-16 06:00+00'").await; // expired
    point(&c, short, 51, "'2026-05-16 18:00+00'").await; // kept
    point(&c, long, 52, "'2026-05-16 06:00+00'").await; // kept
    point(&c, short, 60, "'2026-06-15 06:00+00'").await;
    point(&c, long, 61, "'2026-06-15 06:00+00'").await;
    point(&c, short, 70, "'2026-04-01 06:00+00'").await; // default partition, expired
    point(&c, long, 71, "'2026-04-01 06:00+00'").await; // default partition, kept
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_aviation.flight_telemetry_default"
        )
        .await,
        2
    );

    let r = run(&m, Task::Retention).await;
    assert!(r.skipped.is_empty(), "{r:?}");
    assert!(
        r.done
            .iter()
            .any(|d| d.contains("enforce_retention_policy")),
        "{r:?}"
    );
    // Dropped whole: the archived 02-01 and the live 02-10.
    assert!(!exists(&c, "dbx_archive.flight_telemetry_p20260201").await);
    assert!(!exists(&c, "dbx_aviation.flight_telemetry_p20260210").await);
    // Deleted row by row: SHORT's 5 archived rows (in chunks of 2), 02-15 06:00 of both,
    // SHORT's 05-16 06:00 and its default-partition row.
    assert_eq!(r.rows, 5 + 2 + 1 + 1, "{r:?}");
    let seqs: Vec<i64> = c
        .query(
            "SELECT seq FROM (SELECT seq FROM dbx_aviation.flight_telemetry
                              UNION ALL SELECT seq FROM dbx_archive.flight_telemetry_archive) s ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(seqs, [20, 21, 22, 42, 51, 52, 60, 61, 71]);
    // Idempotent: a second run deletes nothing more.
    let r = run(&m, Task::Retention).await;
    assert_eq!(r.rows, 0, "{r:?}");
}

/// The request log's retention: rows of api_requests older than
/// `api_requests_retention_days` (by the injected clock) are deleted, oldest first, in
/// transactions of `retention_chunk_rows` that walk the created_at index, never the table;
/// younger rows stay, a second run deletes nothing, and the rows are counted in
/// `dbx_api_requests_expired_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requests_past_their_retention_are_deleted_in_chunks_through_the_index() {
    let prom = recorder();
    let (_db, c, url) = setup().await;
    let clock = ManualClock::new(utc(2026, 6, 15, 12, 0)); // cutoff 2026-05-16 12:00
    let cfg = PartitionsConfig {
        retention_chunk_rows: 5,
        ..PartitionsConfig::default()
    };
    assert_eq!(cfg.api_requests_retention_days, 30);
    let m = manager(&url, &clock, PartitionInterval::Daily, cfg);
    c.batch_execute(
        "INSERT INTO dbx_aviation.api_requests (endpoint, method, status_code, created_at)
         SELECT 'tcp:hello', 'HELLO', 200, '2026-06-01 00:00+00'::timestamptz + i * interval '1 second'
           FROM generate_series(1, 20000) i;
         INSERT INTO dbx_aviation.api_requests (endpoint, method, status_code, request_count, created_at)
         SELECT 'tcp:hello', 'HELLO', 401, 3, '2026-04-01 00:00+00'::timestamptz + i * interval '1 day'
           FROM generate_series(0, 11) i;               -- 04-01 .. 04-12: expired
         INSERT INTO dbx_aviation.api_requests (endpoint, method, status_code, created_at)
         VALUES ('tcp:hello', 'HELLO', 200, '2026-05-16 11:59+00'),  -- expired
                ('tcp:hello', 'HELLO', 200, '2026-05-16 12:01+00');  -- kept
         ANALYZE dbx_aviation.api_requests;",
    )
    .await
    .unwrap();

    // Each chunk reads only what it deletes: an index scan in created_at order.
    let plan = m.plan(Task::RequestLog).await.unwrap();
    let sql = plan.steps[0].sql[0].clone();
    assert!(
        sql.contains("ORDER BY created_at LIMIT 5") && sql.contains("2026-05-16 12:00:00"),
        "{sql}"
    );
    let inner = sql
        .split_once("ARRAY(")
        .and_then(|(_, r)| r.strip_suffix("))"))
        .expect("the chunk's SELECT");
    let explained: Vec<String> = c
        .query(&format!("EXPLAIN {inner}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let explained = explained.join("\n");
    assert!(
        explained.contains("api_requests_created") && !explained.contains("Seq Scan"),
        "{explained}"
    );

    let before = prom.render();
    let expired_total = |text: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix("dbx_api_requests_expired_total ")?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0)
    };
    let r = run(&m, Task::RequestLog).await;
    assert_eq!(r.rows, 13, "{r:?}");
    assert!(r.skipped.is_empty(), "{r:?}");
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_aviation.api_requests WHERE created_at < '2026-05-16 12:00+00'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM dbx_aviation.api_requests").await,
        20_001
    );
    assert_eq!(expired_total(&prom.render()) - expired_total(&before), 13.0);
    let again = run(&m, Task::RequestLog).await;
    assert_eq!(again.rows, 0, "{again:?}");

    // 0 keeps them forever: no step, and the timer never schedules it.
    let keep = PartitionsConfig {
        api_requests_retention_days: 0,
        ..PartitionsConfig::default()
    };
    let m = manager(&url, &clock, PartitionInterval::Daily, keep);
    let plan = m.plan(Task::RequestLog).await.unwrap();
    assert!(plan.steps.is_empty() && !plan.notes.is_empty(), "{plan}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_conflicting_lock_maintenance_skips_and_ingest_goes_on() {
    let (db, c, url) = setup().await;
    let clock = ManualClock::new(utc(2026, 6, 15, 12, 0));
    let cfg = PartitionsConfig {
        lock_timeout_ms: 300,
        lock_attempts: 2,
        premake: 3,
        lookback: 0,
        ..PartitionsConfig::default()
    };
    let m = manager(&url, &clock, PartitionInterval::Daily, cfg);
    ensure_day(&c, utc(2026, 1, 10, 0, 0)).await;
    ensure_day(&c, utc(2026, 6, 15, 0, 0)).await;

    // A long reader holds the old partition (archival needs it exclusively) and the default
    // partition (attaching a new partition must lock it).
    let locker = db.client().await;
    locker
        .batch_execute(
            "BEGIN;
             LOCK TABLE dbx_aviation.flight_telemetry_p20260110 IN ACCESS SHARE MODE;
             LOCK TABLE dbx_aviation.flight_telemetry_default IN ACCESS SHARE MODE;",
        )
        .await
        .unwrap();

    // Ingest, as the ingest user, refusing to wait for any lock longer than 100 ms.
    let ingest =
        dbx_testkit::connect(&db.url_for("dbx_ingest_service", dbx_testkit::INGEST_TEST_PASSWORD))
            .await;
    ingest
        .batch_execute("SET lock_timeout = '100ms'")
        .await
        .unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let done = done.clone();
        tokio::spawn(async move {
            use futures::SinkExt;
            let mut copies = 0u32;
            let mut seq = 0i64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) || copies < 3 {
                let sink = ingest
                    .copy_in::<_, bytes::Bytes>(
                        "COPY dbx_aviation.flight_telemetry (org_id, aircraft_id, session_id, ts, seq) FROM STDIN",
                    )
                    .await
                    .unwrap_or_else(|e| panic!("COPY start during maintenance: {e}"));
                let mut rows = String::new();
                for _ in 0..50 {
                    seq += 1;
                    rows.push_str(&format!(
                        "{}\t{}\t{}\t2026-06-15 12:{:02}:{:02}+00\t{seq}\n",
                        Uuid::nil(),
                        Uuid::nil(),
                        Uuid::nil(),
                        (seq / 60) % 60,
                        seq % 60
                    ));
                }
                futures::pin_mut!(sink);
                sink.send(bytes::Bytes::from(rows)).await.unwrap();
                sink.as_mut()
                    .finish()
                    .await
                    .unwrap_or_else(|e| panic!("COPY during maintenance waited for a lock: {e}"));
                copies += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            copies
        })
    };

    let reports = m
        .run_tasks(&[Task::Premake, Task::Archive])
        .await
        .expect("maintenance must not fail on a busy table")
        .expect("lock");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let copies = writer.await.expect("the ingest writer");
    assert!(copies >= 3);
    let (premake, archive) = (&reports[0].1, &reports[1].1);
    // The new partitions could not be attached (default partition busy), the old one not
    // detached: skipped after their attempts, nothing failed.
    assert_eq!(premake.skipped.len(), 3, "{premake:?}");
    assert!(premake.failed.is_empty() && archive.failed.is_empty());
    assert_eq!(archive.skipped.len(), 1, "{archive:?}");
    assert!(archive.skipped[0].contains("55P03"), "{archive:?}");
    assert!(!exists(&c, "dbx_aviation.flight_telemetry_p20260616").await);
    assert!(exists(&c, "dbx_aviation.flight_telemetry_p20260110").await);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_aviation.flight_telemetry_p20260615"
        )
        .await,
        50 * copies as i64
    );

    // The reader goes away: the next run does it all.
    locker.batch_execute("COMMIT").await.unwrap();
    let reports = m
        .run_tasks(&[Task::Premake, Task::Archive])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reports[0].1.done.len(), 3, "{reports:?}");
    assert_eq!(reports[1].1.done.len(), 1, "{reports:?}");
    assert!(exists(&c, "dbx_archive.flight_telemetry_p20260110").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_ingest_user_premake_runs_and_archival_is_left_alone() {
    let (db, c, _url) = setup().await;
    let ingest = db.url_for("dbx_ingest_service", dbx_testkit::INGEST_TEST_PASSWORD);
    let clock = ManualClock::new(utc(2026, 6, 15, 12, 0));
    let m = manager(
        &ingest,
        &clock,
        PartitionInterval::Daily,
        PartitionsConfig::default(),
    );
    assert!(!m.is_admin().await.unwrap());
    ensure_day(&c, utc(2026, 1, 1, 0, 0)).await;
    let r = run(&m, Task::Premake).await;
    assert_eq!(r.done.len(), 7, "{r:?}");
    let r = run(&m, Task::Archive).await;
    assert!(r.done.is_empty() && r.skipped.is_empty(), "{r:?}");
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("not a member of dbx_admin")),
        "{r:?}"
    );
    assert!(exists(&c, "dbx_aviation.flight_telemetry_p20260101").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_managers_on_one_database_only_one_holds_the_advisory_lock() {
    let (_db, c, url) = setup().await;
    let clock = ManualClock::new(utc(2026, 8, 1, 0, 0));
    let a = manager(
        &url,
        &clock,
        PartitionInterval::Daily,
        PartitionsConfig::default(),
    );
    let b = manager(
        &url,
        &clock,
        PartitionInterval::Daily,
        PartitionsConfig::default(),
    );
    assert!(a.try_acquire().await.unwrap());
    assert!(!b.try_acquire().await.unwrap());
    // b's run is skipped, nothing done; a's runs (it holds the lock already).
    assert!(b.run_task(Task::Premake).await.unwrap().is_none());
    assert!(!exists(&c, "dbx_aviation.flight_telemetry_p20260801").await);
    let holders = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                    WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = 'dbx-maintenance'
                      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    assert_eq!(count(&c, holders).await, 1);
    assert!(a.run_task(Task::Premake).await.unwrap().is_some());
    assert!(exists(&c, "dbx_aviation.flight_telemetry_p20260801").await);
    // Still a's after its run (it took the lock itself, it keeps it).
    assert!(!b.try_acquire().await.unwrap());
    a.release().await.unwrap();
    assert!(b.try_acquire().await.unwrap());
    assert!(!a.try_acquire().await.unwrap());
    assert_eq!(count(&c, holders).await, 1);
    // A manager that dies takes its lock with it. The server frees the lock when b's backend
    // exits, which happens after b's socket closes, not before `close` returns: wait for it.
    b.close().await;
    let a = &a;
    assert!(
        dbx_testkit::wait_until(Duration::from_secs(10), || async move {
            a.try_acquire().await.unwrap()
        })
        .await,
        "b's lock outlived its connection by 10 s"
    );
    assert!(!b.try_acquire().await.unwrap());
}

fn recorder() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static H: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    H.get_or_init(|| {
        let h = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("recorder");
        dbx_control::metrics::describe();
        h
    })
}

fn gauge(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{series} not in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_collector_exports_plausible_gauges() {
    let prom = recorder();
    let (db, c, url) = setup().await;
    // Two points nobody has a partition for, and one ingest connection.
    point(&c, Uuid::new_v4(), 1, "'2099-01-01 00:00+00'").await;
    point(&c, Uuid::new_v4(), 2, "'2099-01-02 00:00+00'").await;
    let _ingest =
        dbx_testkit::connect(&db.url_for("dbx_ingest_service", dbx_testkit::INGEST_TEST_PASSWORD))
            .await;
    let clock: SharedClock = Arc::new(SystemClock);
    let h = HealthCollector::new(dbx_testkit::connector(&url), clock, Duration::from_secs(1));
    // A backend reports its reads to the statistics when it goes idle, at most once a second:
    // on a seconds-old database the hit ratio is still unknown (None) until that happens.
    c.batch_execute("SELECT pg_stat_force_next_flush()")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let s = loop {
        let s = h.collect_once().await.expect("collect");
        if s.cache_hit_ratio.is_some() || std::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(s.up);
    assert!(s.database_size_bytes.unwrap() > 1_000_000.0, "{s:?}");
    assert!(s.active_connections.unwrap() >= 2.0, "{s:?}");
    assert!(
        s.cache_hit_ratio.is_some_and(|r| (0.0..=1.0).contains(&r)),
        "{s:?}"
    );
    assert_eq!(s.default_partition_rows, 2);
    assert_eq!(s.ingest_connections, 1);
    // The test cluster is plaintext (the TLS cluster's gauge is checked in tests/tls).
    assert!(!s.tls && s.tls_version.is_none(), "{s:?}");
    // The migration made today and the next three days.
    let ahead = s.partition_ahead_seconds.unwrap();
    assert!((3.0 * 86400.0..=4.0 * 86400.0).contains(&ahead), "{ahead}");
    assert_eq!(s.partitions[0].schema, "live");
    assert_eq!(s.partitions[0].count, 4);
    assert_eq!(s.partitions[1].count, 0);
    assert!(s
        .table_bloat_bytes
        .contains_key("dbx_aviation.flight_telemetry"));
    assert_eq!(h.handle().read().unwrap().default_partition_rows, 2);

    let text = prom.render();
    assert_eq!(gauge(&text, "dbx_db_up"), 1.0);
    assert_eq!(gauge(&text, "dbx_db_default_partition_rows"), 2.0);
    assert_eq!(gauge(&text, "dbx_db_ingest_connections"), 1.0);
    assert_eq!(gauge(&text, "dbx_db_tls"), 0.0);
    assert_eq!(gauge(&text, "dbx_db_partitions{schema=\"live\"}"), 4.0);
    assert_eq!(gauge(&text, "dbx_db_partitions{schema=\"archive\"}"), 0.0);
    assert!(gauge(&text, "dbx_db_size_bytes") > 1_000_000.0);
    assert!(gauge(&text, "dbx_db_partition_ahead_seconds") > 3.0 * 86400.0);
    assert!(
        gauge(
            &text,
            "dbx_db_partition_newest_end_timestamp_seconds{schema=\"live\"}"
        ) > Utc::now().timestamp() as f64
    );
    assert!(
        gauge(
            &text,
            "dbx_db_table_bloat_bytes{table=\"dbx_audit.audit_log\"}"
        ) >= 0.0
    );
    assert!(text.contains("# HELP dbx_db_cache_hit_ratio "), "{text}");

    // The database going away is a 0, not an error that kills anything.
    c.batch_execute(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'dbx-health' AND datname = '{}'",
        db.name()
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The next collection reconnects.
    let again = h.collect_once().await;
    if again.is_err() {
        assert_eq!(gauge(&prom.render(), "dbx_db_up"), 0.0);
        h.collect_once().await.expect("reconnected");
    }
    assert_eq!(gauge(&prom.render(), "dbx_db_up"), 1.0);
}
