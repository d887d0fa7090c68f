//! The control plane in a real `dbx serve`: the admin endpoint's `/metrics` carries every
//! `dbx_db_*` gauge with plausible values and passes `promtool check metrics`, the status
//! endpoint answers, `dbx partitions` runs once and dry-runs, and `/readyz` turns unready
//! when PostgreSQL stops and ready again when it is back.
//!
//! A test binary of its own: the outage test stops the process's test cluster. The tests
//! of this binary share a lock: the outage test runs alone.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use dbx_testkit::{Daemon, TestDb};
use tokio::sync::{OnceCell, RwLock};

const MAINT_PASSWORD: &str = "dbx-maintenance-test-password";

/// Held for writing by the test that stops the cluster, for reading by the others.
static CLUSTER: RwLock<()> = RwLock::const_new(());

fn dbx_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dbx"))
}

/// A migrated database, and the ingest and maintenance users' URLs.
async fn database() -> (TestDb, String, String) {
    let (db, ingest) = TestDb::migrated().await;
    static PW: OnceCell<()> = OnceCell::const_new();
    PW.get_or_init(|| async {
        db.client()
            .await
            .batch_execute(&format!(
                "ALTER ROLE dbx_maintenance_service WITH LOGIN PASSWORD '{MAINT_PASSWORD}'"
            ))
            .await
            .expect("maintenance password");
    })
    .await;
    let maint = db.url_for("dbx_maintenance_service", MAINT_PASSWORD);
    (db, ingest, maint)
}

async fn daemon(ingest: &str, maint: &str) -> Daemon {
    Daemon::start(
        dbx_bin(),
        ingest,
        &[
            ("DBX_DATABASE__ADMIN_URL", maint),
            ("DBX_DATABASE__CONNECT_TIMEOUT_SECS", "2"),
            ("DBX_HEALTH__INTERVAL_SECS", "1"),
        ],
    )
    .await
}

/// Samples of a text exposition: series (name with labels) → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("malformed sample line {l:?}"));
            let v: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("malformed value in {l:?}")),
            };
            (series.to_string(), v)
        })
        .collect()
}

/// Our own check of the text format, besides promtool's (which says less about why): every sample
/// belongs to a family with HELP and TYPE, names and labels are well formed, no family twice.
fn check_exposition(text: &str) {
    let mut help = std::collections::HashSet::new();
    let mut types = BTreeMap::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(help.insert(name.to_string()), "HELP twice for {name}");
        } else if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap(), it.next().unwrap_or(""));
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{l}"
            );
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "TYPE twice for {name}"
            );
        }
    }
    for series in samples(text).keys() {
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name {name}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s).filter(|f| {
                    types
                        .get(*f)
                        .is_some_and(|k| k == "histogram" || k == "summary")
                })
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "no TYPE for {series}");
        assert!(help.contains(family), "no HELP for {series}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{series}");
            }
        }
    }
}

/// `promtool check metrics` on the exposition: whether it passed, and what promtool said.
fn promtool(text: &str) -> (bool, String) {
    dbx_testkit::env::promtool_check_metrics(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_every_db_gauge_pass_promtool_and_the_status_and_cli_answer() {
    let _shared = CLUSTER.read().await;
    let (db, ingest, maint) = database().await;
    let client = db.client().await;
    // One point with no partition of its own: the default-partition gauge must see it
    // (and the daemon's sweep then moves it).
    client
        .batch_execute(
            "INSERT INTO dbx_aviation.flight_telemetry (org_id, aircraft_id, session_id, ts, seq)
             VALUES (gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), '2099-06-01 00:00+00', 1)",
        )
        .await
        .unwrap();
    let d = daemon(&ingest, &maint).await;

    // The collector polls every second; the sweep runs a second after start.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (text, s) = loop {
        let (code, text) = d.http_get("/metrics").await;
        assert_eq!(code, 200);
        let s = samples(&text);
        let swept = client
            .query_one(
                "SELECT to_regclass('dbx_aviation.flight_telemetry_p20990601') IS NOT NULL",
                &[],
            )
            .await
            .unwrap()
            .get::<_, bool>(0);
        // The sweep moves the rows, then attaches the partition: wait for a collection
        // taken after both (the newest live partition then ends in 2099).
        let far_future = chrono::Utc::now().timestamp() as f64 + 70.0 * 365.0 * 86400.0;
        let attached = s
            .get("dbx_db_partition_newest_end_timestamp_seconds{schema=\"live\"}")
            .is_some_and(|v| *v > far_future);
        if s.get("dbx_db_up") == Some(&1.0)
            && swept
            && attached
            && s.get("dbx_db_default_partition_rows") == Some(&0.0)
        {
            break (text, s);
        }
        assert!(
            Instant::now() < deadline,
            "no healthy collection with the default partition swept in 30 s:\n{text}\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let g = |series: &str| {
        *s.get(series)
            .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{text}"))
    };
    assert!(g("dbx_db_size_bytes") > 1_000_000.0);
    assert!(g("dbx_db_active_connections") >= 3.0); // writers, control, collector, us
    let ratio = g("dbx_db_cache_hit_ratio");
    assert!((0.0..=1.0).contains(&ratio), "{ratio}");
    // The daemon connects as the ingest user (writer pool, auth cache, LISTEN).
    assert!(g("dbx_db_ingest_connections") >= 1.0);
    // today + 4 premade days, the swept 2099 partition; the newest ends in 2099.
    assert!(g("dbx_db_partitions{schema=\"live\"}") >= 7.0);
    assert_eq!(g("dbx_db_partitions{schema=\"archive\"}"), 0.0);
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        g("dbx_db_partition_newest_end_timestamp_seconds{schema=\"live\"}")
            > now + 70.0 * 365.0 * 86400.0
    );
    assert!(g("dbx_db_partition_oldest_start_timestamp_seconds{schema=\"live\"}") < now);
    assert!(g("dbx_db_partition_ahead_seconds") > 4.0 * 86400.0);
    assert_eq!(g("dbx_db_default_partition_rows"), 0.0);
    // The kit's default cluster is plaintext (tests/tls sees 1 on its TLS cluster).
    assert_eq!(g("dbx_db_tls"), 0.0);
    for t in dbx_control::setup::EXPECTED_TABLES {
        assert!(g(&format!("dbx_db_table_bloat_bytes{{table=\"{t}\"}}")) >= 0.0);
    }
    // slow_queries_count exists only where pg_stat_statements is preloaded.
    let slow_available: bool = client
        .query_one("SELECT dbx_aviation.slow_queries_count() IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(s.contains_key("dbx_db_slow_queries"), slow_available);
    assert!(g("dbx_maintenance_runs_total{kind=\"premake\"}") >= 1.0);
    assert!(g("dbx_maintenance_runs_total{kind=\"sweep\"}") >= 1.0);
    assert!(
        text.contains("# HELP dbx_db_partition_ahead_seconds "),
        "{text}"
    );

    check_exposition(&text);
    let (ok, out) = promtool(&text);
    assert!(ok, "promtool check metrics failed:\n{out}\n{text}");

    // The status endpoint.
    let (code, body) = d.http_get("/api/v2/system/status").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["uptime_seconds"].as_u64().is_some(), "{v}");
    assert_eq!(v["database"]["status"], "connected", "{v}");
    let indicators: Vec<&str> = v["database"]["health"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["metric"].as_str().unwrap())
        .collect();
    assert_eq!(
        indicators,
        [
            "database_size",
            "active_connections",
            "slow_queries_count",
            "cache_hit_ratio"
        ]
    );
    assert_eq!(v["health"]["up"], true, "{v}");
    assert!(
        v["health"]["partitions"][0]["count"].as_i64().unwrap() >= 7,
        "{v}"
    );
    assert!(
        v["ingest"]["rates"]["points_received_per_sec"]
            .as_f64()
            .is_some(),
        "{v}"
    );
    assert!(v["ingest"]["queue_depth"].as_u64().is_some(), "{v}");
    assert!(v["ingest"]["queue_capacity"].as_u64().unwrap() > 0, "{v}");
    let (code, body) = d.http_get("/readyz").await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));

    // The CLI, against the same database, as the maintenance user.
    let cli = |args: &[&str]| dbx_testkit::run_cli(dbx_bin(), args, &[]);
    let (ok, out) = cli(&["partitions", "list", "--database-url", &maint]);
    assert!(ok, "{out}");
    assert!(out.contains("flight_telemetry_p20990601"), "{out}");
    assert!(
        out.contains("flight_telemetry_default") && out.contains("DEFAULT"),
        "{out}"
    );
    assert!(out.lines().next().unwrap().contains("rows (est.)"), "{out}");
    // An old partition to archive: dry-run prints the SQL and changes nothing.
    client
        .query_one(
            "SELECT dbx_aviation.ensure_telemetry_partition('2020-01-01 00:00+00', '2020-01-02 00:00+00')",
            &[],
        )
        .await
        .unwrap();
    let (ok, out) = cli(&[
        "partitions",
        "archive",
        "--dry-run",
        "--database-url",
        &maint,
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("ALTER TABLE dbx_aviation.flight_telemetry DETACH PARTITION \"dbx_aviation\".\"flight_telemetry_p20200101\";"),
        "{out}"
    );
    let still: bool = client
        .query_one(
            "SELECT to_regclass('dbx_aviation.flight_telemetry_p20200101') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(still, "a dry run changed the database");
    let (ok, out) = cli(&[
        "partitions",
        "create",
        "--dry-run",
        "--database-url",
        &maint,
    ]);
    assert!(ok && out.contains("-- premake: 0 step(s)"), "{out}");
    let (ok, out) = cli(&[
        "partitions",
        "retention",
        "--dry-run",
        "--database-url",
        &maint,
    ]);
    assert!(ok && out.contains("enforce_retention_policy"), "{out}");
    let (ok, out) = cli(&["partitions", "sweep", "--database-url", &maint]);
    assert!(ok && out.contains("sweep: 0 step(s) done"), "{out}");
    // Run for real (the daemon's own archival timer may have got there first).
    let (ok, out) = cli(&["partitions", "archive", "--database-url", &maint]);
    assert!(ok, "{out}");
    let archived: bool = client
        .query_one(
            "SELECT to_regclass('dbx_archive.flight_telemetry_p20200101') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(archived, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_unready_when_the_database_stops_and_ready_when_it_is_back() {
    let _alone = CLUSTER.write().await;
    let (_db, ingest, maint) = database().await;
    let d = daemon(&ingest, &maint).await;
    let wait_for = |want: u16, limit: Duration| {
        let d = &d;
        async move {
            let deadline = Instant::now() + limit;
            loop {
                let (code, body) = d.http_get("/readyz").await;
                if code == want {
                    return body;
                }
                assert!(
                    Instant::now() < deadline,
                    "/readyz stayed {code} ({body}), wanted {want}:\n{}",
                    d.log()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    wait_for(200, Duration::from_secs(10)).await;
    assert_eq!(d.http_get("/healthz").await.0, 200);

    let cluster = TestDb::cluster();
    tokio::task::spawn_blocking(move || cluster.stop())
        .await
        .unwrap()
        .expect("stopping the test cluster");
    let body = wait_for(503, Duration::from_secs(15)).await;
    // Restart the cluster before asserting more, so a failure cannot leave it down.
    let up = tokio::task::spawn_blocking(move || cluster.start())
        .await
        .unwrap();
    up.expect("starting the test cluster again");
    assert!(body.contains("database unreachable"), "{body}");
    // Alive all along, and ready again once the database is back.
    assert_eq!(d.http_get("/healthz").await.0, 200);
    wait_for(200, Duration::from_secs(30)).await;
    let (_, metrics) = d.http_get("/metrics").await;
    assert!(metrics.contains("dbx_db_up "), "{metrics}");
}
