//! Several daemons on one database must not fight: two real `dbx serve` processes on one
//! database, gateways on both (one failing over from the first to the second and resending
//! what the first acked), every point stored exactly once; partition maintenance waits for
//! the advisory lock (held here by the test: both daemons skip it, ingest goes on) and the
//! planted work is then done by exactly one of them.

use std::time::{Duration, Instant};

use dbx_control::partitions::MAINTENANCE_LOCK_KEY;
use dbx_proto::{AircraftRef, PointForm};
use dbx_testkit::env::metric_value;
use dbx_testkit::gateway::{now_micros, points};
use dbx_testkit::{wait_until, Daemon, Fixture, TestDb, TestGateway};
use uuid::Uuid;

use crate::dbx_bin;

const BATCHES: u64 = 20;
const PER_BATCH: usize = 250;

/// Sends `batches` batches of `session` (seqs from 1) on a fresh connection; all must be acked.
async fn fly(
    daemon: &Daemon,
    key: &str,
    aircraft: &AircraftRef,
    session: Uuid,
    t0: i64,
    batches: std::ops::RangeInclusive<u64>,
) {
    let (mut g, _) = TestGateway::hello(daemon.tcp, key).await;
    let (first, last) = (*batches.start(), *batches.end());
    for b in batches {
        let first_seq = (b - 1) as i64 * PER_BATCH as i64 + 1;
        let pts = points(PER_BATCH, first_seq, t0 + first_seq * 100_000);
        // Per-connection batch seqs start at 1 on every connection.
        g.send_batch(b - first + 1, aircraft, session, &pts, PointForm::Array)
            .await;
    }
    let (acked, nacks) = g.await_verdicts(last - first + 1).await;
    assert!(nacks.is_empty(), "nacks: {nacks:?}");
    assert_eq!(acked, last - first + 1);
    g.send_bye().await;
}

async fn metric_sum(daemons: &[&Daemon], name: &str, labels: &str) -> f64 {
    let mut sum = 0.0;
    for d in daemons {
        let (_, body) = d.http_get("/metrics").await;
        sum += metric_value(&body, name, labels);
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_one_database_lose_nothing_double_nothing_and_maintain_once() {
    let (db, ingest_url) = TestDb::migrated().await;
    let client = db.client().await;
    let org = Fixture::org(&client, "SCALE", None).await;
    let registration = "N2SCALE";
    Fixture::aircraft(&client, org.id, registration).await;
    let aircraft = AircraftRef::Registration(registration.into());

    // Maintenance every second so that both daemons keep trying; archival, retention and
    // the view refresh off (not what this test is about).
    let env = [
        ("DBX_PARTITIONS__INTERVAL_SECS", "1"),
        ("DBX_PARTITIONS__SWEEP_INTERVAL_SECS", "1"),
        ("DBX_PARTITIONS__ARCHIVE_INTERVAL_SECS", "0"),
        ("DBX_PARTITIONS__RETENTION_INTERVAL_SECS", "0"),
        ("DBX_PARTITIONS__REFRESH_INTERVAL_SECS", "0"),
        ("DBX_HEALTH__INTERVAL_SECS", "1"),
    ];
    let (a, b) = tokio::join!(
        Daemon::start(dbx_bin(), &ingest_url, &env),
        Daemon::start(dbx_bin(), &ingest_url, &env)
    );
    for d in [&a, &b] {
        assert_eq!(d.http_get("/readyz").await.0, 200, "{}", d.log());
    }

    // The test takes the maintenance lock: from now on neither daemon may maintain.
    let locker = db.client().await;
    locker
        .execute("SELECT pg_advisory_lock($1)", &[&MAINTENANCE_LOCK_KEY])
        .await
        .expect("advisory lock");
    let sweeps_before = metric_sum(&[&a, &b], "dbx_maintenance_runs_total", "kind=\"sweep\"").await;
    let premakes_before =
        metric_sum(&[&a, &b], "dbx_maintenance_runs_total", "kind=\"premake\"").await;

    // Work for the sweep: rows 20 days back, where no partition exists (lookback is 2),
    // all within one day whatever the time of the run (one sweep step, one log line).
    const PLANTED: i64 = 500;
    let planted = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO dbx_aviation.flight_telemetry (org_id, aircraft_id, session_id, ts, seq)
             SELECT $1, (SELECT aircraft_id FROM dbx_aviation.aircraft_registry WHERE org_id = $1),
                    $2, date_trunc('day', now() - interval '20 days') + interval '1 hour'
                        + g * interval '1 s', g
               FROM generate_series(1, $3::bigint) g",
            &[&org.id, &planted, &PLANTED],
        )
        .await
        .expect("plant rows in the default partition");
    assert_eq!(in_default(&client).await, PLANTED);

    // Ingest on both daemons while maintenance is blocked: 2 gateways each, plus one that
    // sends half its flight to `a`, then "loses" the acks and resends everything to `b`.
    let t0 = now_micros() - 600_000_000;
    let sessions: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let failover = Uuid::new_v4();
    let key = org.key.as_str();
    let started = Instant::now();
    tokio::join!(
        fly(&a, key, &aircraft, sessions[0], t0, 1..=BATCHES),
        fly(&a, key, &aircraft, sessions[1], t0, 1..=BATCHES),
        fly(&b, key, &aircraft, sessions[2], t0, 1..=BATCHES),
        fly(&b, key, &aircraft, sessions[3], t0, 1..=BATCHES),
        async {
            fly(&a, key, &aircraft, failover, t0, 1..=BATCHES / 2).await;
            fly(&b, key, &aircraft, failover, t0, 1..=BATCHES).await;
        },
    );
    // Give the maintenance timers (1 s) a few rounds to try.
    let waited = started.elapsed();
    if waited < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_secs(3) - waited).await;
    }
    assert_eq!(
        in_default(&client).await,
        PLANTED,
        "a daemon swept while another session held the maintenance lock"
    );
    assert_eq!(
        metric_sum(&[&a, &b], "dbx_maintenance_runs_total", "kind=\"sweep\"").await,
        sweeps_before,
        "a sweep ran while the lock was held"
    );
    assert_eq!(
        metric_sum(&[&a, &b], "dbx_maintenance_runs_total", "kind=\"premake\"").await,
        premakes_before,
        "a premake ran while the lock was held"
    );

    // Nothing lost, nothing doubled, across both daemons.
    let per_session = PER_BATCH as i64 * BATCHES as i64;
    let all: Vec<Uuid> = sessions.iter().copied().chain([failover]).collect();
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT (session_id, seq)), count(DISTINCT session_id)
               FROM dbx_aviation.flight_telemetry WHERE session_id = ANY($1)",
            &[&all],
        )
        .await
        .expect("counts");
    let (total, distinct, nsessions): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(nsessions, 5);
    assert_eq!(total, 5 * per_session, "points lost or doubled");
    assert_eq!(distinct, total, "a point stored twice");
    for s in &all {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = $1",
                &[s],
            )
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, per_session, "session {s}");
    }
    // The resent half was recognised as stored by the other daemon.
    let dedup = metric_sum(&[&b], "dbx_points_deduplicated_total", "").await;
    assert_eq!(dedup, (BATCHES / 2) as f64 * PER_BATCH as f64);
    // Each daemon's share is its own: both took part.
    let written_a = metric_sum(&[&a], "dbx_points_written_total", "").await;
    let written_b = metric_sum(&[&b], "dbx_points_written_total", "").await;
    assert_eq!(written_a, 2.5 * per_session as f64);
    assert_eq!(written_b, 2.5 * per_session as f64);
    // The dashboard's latency panels have their series (buckets configured).
    let (_, exposition) = a.http_get("/metrics").await;
    for m in [
        "dbx_ack_latency_seconds_bucket",
        "dbx_copy_duration_seconds_bucket",
    ] {
        assert!(exposition.contains(m), "{m} missing from /metrics");
    }

    // Release: exactly one daemon moves the planted rows, once.
    locker
        .execute("SELECT pg_advisory_unlock($1)", &[&MAINTENANCE_LOCK_KEY])
        .await
        .expect("unlock");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            in_default(&client).await == 0
        })
        .await,
        "the sweep did not run within 20 s:\n{}\n{}",
        a.log(),
        b.log()
    );
    let moved: i64 = client
        .query_one(
            "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = $1",
            &[&planted],
        )
        .await
        .expect("moved")
        .get(0);
    assert_eq!(moved, PLANTED, "planted rows lost or doubled by the sweep");
    // The run is logged when all its tasks are done, a moment after the commit.
    let movers = || -> Vec<String> {
        [&a, &b]
            .iter()
            .flat_map(|d| {
                d.log()
                    .lines()
                    .filter(|l| {
                        l.contains("maintenance done")
                            && l.contains("sweep")
                            && l.contains(&format!("move {PLANTED} default-partition row"))
                    })
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    wait_until(Duration::from_secs(20), || async { !movers().is_empty() }).await;
    let movers = movers();
    assert_eq!(
        movers.len(),
        1,
        "the planted rows must be moved by one daemon, once: {movers:#?}"
    );
    assert!(
        metric_sum(&[&a, &b], "dbx_maintenance_runs_total", "kind=\"sweep\"").await > sweeps_before
    );
    assert_eq!(
        metric_sum(&[&a, &b], "dbx_maintenance_failures_total", "").await,
        0.0,
        "maintenance failed:\n{}\n{}",
        a.log(),
        b.log()
    );
}

/// Rows in the default partition.
async fn in_default(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM dbx_aviation.flight_telemetry_default",
        &[],
    )
    .await
    .expect("default rows")
    .get(0)
}
