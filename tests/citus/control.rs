//! The control plane on Citus: sweep, archival and retention of the distributed table, the
//! maintenance lock seen by daemons on different nodes, the cluster gauges and `/readyz` with a
//! worker down.

use std::time::Duration;

use dbx_control::partitions::MAINTENANCE_LOCK_KEY;
use dbx_localpg::citus::CitusCluster;
use dbx_localpg::cluster::ClusterOptions;
use dbx_testkit::citus::CitusDb;
use dbx_testkit::env::metric_value;
use dbx_testkit::{run_cli, wait_until, Daemon};
use tokio_postgres::Client;
use uuid::Uuid;

use crate::{dbx_bin, partitions, Distributed};

/// Plants `n` rows of `org`'s aircraft `days_ago` days back (a day no partition covers: they go
/// to the default partition); returns their session.
async fn plant(c: &Client, org: Uuid, aircraft: Uuid, days_ago: i32, n: i32) -> Uuid {
    let session = Uuid::new_v4();
    c.execute(
        "INSERT INTO dbx_aviation.flight_telemetry (org_id, aircraft_id, session_id, ts, seq, altitude_m) \
         SELECT $1, $2, $3, date_trunc('day', now()) - make_interval(days => $4) + g * interval '1 second', g, g \
           FROM generate_series(1, $5) g",
        &[&org, &aircraft, &session, &days_ago, &n],
    )
    .await
    .unwrap();
    session
}

async fn count(c: &Client, sql: &str, session: Uuid) -> i64 {
    c.query_one(sql, &[&session]).await.unwrap().get(0)
}

async fn in_default(c: &Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM dbx_aviation.flight_telemetry_default",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Tables of the live or archive telemetry that Citus does not know (must stay 0).
async fn undistributed_partitions(c: &Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_inherits i \
          WHERE i.inhparent IN ('dbx_aviation.flight_telemetry'::regclass, \
                                'dbx_archive.flight_telemetry_archive'::regclass) \
            AND NOT EXISTS (SELECT 1 FROM citus_tables t WHERE t.table_name = i.inhrelid::regclass)",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_archival_and_retention_work_on_the_distributed_table() {
    let d = Distributed::new().await;
    let (short, air_s) = d.org("SHORT").await;
    let (long, air_l) = d.org("LONG").await;
    d.client
        .execute(
            "UPDATE dbx_aviation.organizations SET data_retention_days = 15 WHERE org_id = $1",
            &[&short.id],
        )
        .await
        .unwrap();
    let old_short = plant(&d.client, short.id, air_s, 20, 300).await;
    let old_long = plant(&d.client, long.id, air_l, 20, 300).await;
    assert_eq!(in_default(&d.client).await, 600);

    // Sweep: the rows leave the default partition for a new partition, itself distributed.
    partitions(&d, &["sweep"], &[]);
    assert_eq!(in_default(&d.client).await, 0);
    assert_eq!(undistributed_partitions(&d.client).await, 0);
    let live = "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = $1";
    assert_eq!(count(&d.client, live, old_short).await, 300);

    // Archival: partitions older than 10 days move under the archive parent, still
    // distributed, still readable.
    partitions(
        &d,
        &["archive"],
        &[("DBX_PARTITIONS__ARCHIVE_AFTER_DAYS", "10")],
    );
    let archived =
        "SELECT count(*) FROM dbx_archive.flight_telemetry_archive WHERE session_id = $1";
    assert_eq!(count(&d.client, archived, old_long).await, 300);
    assert_eq!(count(&d.client, live, old_long).await, 0);
    assert_eq!(undistributed_partitions(&d.client).await, 0);

    // Retention: the 15-day organization's rows go (chunked deletes by key: a ctid means
    // nothing across shards), the 365-day one's stay.
    partitions(
        &d,
        &["retention"],
        &[("DBX_PARTITIONS__RETENTION_CHUNK_ROWS", "100")],
    );
    assert_eq!(count(&d.client, archived, old_short).await, 0);
    assert_eq!(count(&d.client, archived, old_long).await, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_runs_once_across_daemons_on_two_nodes() {
    let d = Distributed::new().await;
    let (org, aircraft) = d.org("LOCK").await;
    let env = |node: usize| -> (String, Vec<(String, String)>) {
        (
            d.url(node, "dbx_ingest_service"),
            [
                (
                    "DBX_DATABASE__ADMIN_URL",
                    d.url(0, "dbx_maintenance_service"),
                ),
                ("DBX_PARTITIONS__INTERVAL_SECS", "1".into()),
                ("DBX_PARTITIONS__SWEEP_INTERVAL_SECS", "1".into()),
                ("DBX_PARTITIONS__ARCHIVE_INTERVAL_SECS", "0".into()),
                ("DBX_PARTITIONS__RETENTION_INTERVAL_SECS", "0".into()),
                ("DBX_PARTITIONS__REFRESH_INTERVAL_SECS", "0".into()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        )
    };
    let start = |node: usize| {
        let (url, env) = env(node);
        async move {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            Daemon::start(dbx_bin(), &url, &env).await
        }
    };
    let a = start(0).await;
    let b = start(1).await;

    // The lock is taken on the coordinator, where both daemons' control planes connect.
    let locker = d.db.client(0).await;
    locker
        .execute("SELECT pg_advisory_lock($1)", &[&MAINTENANCE_LOCK_KEY])
        .await
        .unwrap();
    let planted = plant(&d.client, org.id, aircraft, 30, 500).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        in_default(&d.client).await,
        500,
        "a daemon swept while the coordinator's maintenance lock was held"
    );
    locker
        .execute("SELECT pg_advisory_unlock($1)", &[&MAINTENANCE_LOCK_KEY])
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            in_default(&d.client).await == 0
        })
        .await,
        "no sweep within 30 s:\n{}\n{}",
        a.log(),
        b.log()
    );
    let moved = count(
        &d.client,
        "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = $1",
        planted,
    )
    .await;
    assert_eq!(moved, 500);
    let movers = || -> usize {
        [&a, &b]
            .iter()
            .map(|x| {
                x.log()
                    .lines()
                    .filter(|l| {
                        l.contains("maintenance done")
                            && l.contains("move 500 default-partition row")
                    })
                    .count()
            })
            .sum()
    };
    wait_until(Duration::from_secs(20), || async { movers() > 0 }).await;
    assert_eq!(movers(), 1, "moved by one daemon, once");
    assert_eq!(undistributed_partitions(&d.client).await, 0);
}

#[test]
fn a_daemon_whose_control_plane_points_at_a_worker_is_refused_naming_the_key() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let d = Distributed::new().await;
        let (ok, out) = run_cli(
            dbx_bin(),
            &["serve"],
            &[
                ("DATABASE_URL", &d.url(1, "dbx_ingest_service")),
                ("DBX_LISTENER__TCP_BIND", "127.0.0.1:0"),
                ("DBX_LISTENER__UDP_BIND", "127.0.0.1:0"),
                ("DBX_HTTP__BIND", "127.0.0.1:0"),
            ],
        );
        assert!(!ok, "{out}");
        assert!(
            out.contains("config key `database.url`: this node is a Citus worker"),
            "{out}"
        );
        assert!(out.contains("database.admin_url"), "{out}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_a_worker_holding_shards_is_down_and_the_gauges_say_so() {
    // A cluster of this test's own: it stops a worker.
    let dir = tempfile::tempdir().unwrap();
    let cluster = {
        let dir = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let base = ClusterOptions::for_tests(dir.join("base"));
            let c = CitusCluster::start(&dir, 2, &base).expect("own Citus cluster");
            c.create_database("readyz").expect("database");
            c
        })
        .await
        .unwrap()
    };
    let own = crate::Distributed::on(CitusDb::on(&cluster, "readyz")).await;
    let (url, env) = (
        own.url(0, "dbx_ingest_service"),
        [("DBX_HEALTH__INTERVAL_SECS", "1")],
    );
    let daemon = Daemon::start(dbx_bin(), &url, &env).await;
    let gauge = |name: &'static str| {
        let daemon = &daemon;
        async move {
            let (_, text) = daemon.http_get("/metrics").await;
            metric_value(&text, name, "")
        }
    };
    assert!(
        wait_until(Duration::from_secs(15), || async {
            gauge("dbx_db_citus_active_workers").await == 2.0
        })
        .await
    );
    assert_eq!(gauge("dbx_db_citus_unreachable_workers").await, 0.0);
    assert_eq!(daemon.http_get("/readyz").await.0, 200);

    cluster.workers()[1].stop().unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || async {
            daemon.http_get("/readyz").await.0 == 503
        })
        .await,
        "/readyz stayed ready with a worker down"
    );
    let (_, body) = daemon.http_get("/readyz").await;
    assert!(body.contains("Citus worker unreachable"), "{body}");
    assert!(
        wait_until(Duration::from_secs(15), || async {
            gauge("dbx_db_citus_unreachable_workers").await == 1.0
        })
        .await
    );

    cluster.workers()[1].start().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            daemon.http_get("/readyz").await.0 == 200
        })
        .await,
        "/readyz did not recover after the worker came back"
    );
    drop(daemon);
    drop(own);
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}
