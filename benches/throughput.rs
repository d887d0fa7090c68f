//! The throughput harness: the figure that matters, measured in one run on one
//! machine into the same fresh table.
//!
//! 1. the ceiling: `psql \copy … FROM file (FORMAT binary)` of the points, pre-encoded;
//! 2. dbx end to end: the loadgen over TCP through a real `dbx serve` process into
//!    committed rows (every point acked, then counted in the table);
//! 3. the naive ways: row-by-row prepared INSERT, and 1000-row multi-row INSERT;
//!
//! then the ratios dbx/ceiling and dbx/naive, the daemon's peak RSS, and ack latency
//! p50/p99 at 50 % of the measured maximum rate. Each throughput is the median of
//! `DBX_BENCH_RUNS` runs (default 3). Results are printed and written to
//! `benches/RESULTS.md` with the machine described.
//!
//! Run: `cargo bench -p dbx --bench throughput` (env: `DBX_BENCH_POINTS`, default
//! 1 000 000; `DBX_BENCH_NAIVE_POINTS`, default 20 000; `DBX_BENCH_RUNS`, default 3).
//! PostgreSQL runs with production durability (fsync and synchronous_commit on).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dbx::loadgen::{self, LoadgenConfig, Stats, Transport};
use dbx::sim::FlightSim;
use dbx_batcher::copy::{CopyEncoder, COLUMNS};
use dbx_control::cluster::{ClusterOptions, LocalCluster};
use dbx_control::setup::{self, SetupOptions};
use dbx_core::{Point, ShutdownTrigger};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

const AIRCRAFT: usize = 16;
const GATEWAYS: usize = 4;
const BATCH: usize = 1000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Fleet {
    org: Uuid,
    aircraft: Vec<(String, Uuid)>,
}

async fn connect(url: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    c
}

/// Today's partition, which every generated point falls into.
fn partition() -> String {
    format!(
        "dbx_aviation.flight_telemetry_p{}",
        chrono::Utc::now().format("%Y%m%d")
    )
}

async fn fresh(client: &Client) {
    client
        .batch_execute("TRUNCATE dbx_aviation.flight_telemetry, dbx_aviation.flight_sessions CASCADE; CHECKPOINT;")
        .await
        .expect("truncate");
}

async fn count(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM dbx_aviation.flight_telemetry", &[])
        .await
        .expect("count")
        .get(0)
}

/// The points of the fleet's flights: `n` in batches of `BATCH`, round robin.
fn generate(fleet: &Fleet, n: usize) -> Vec<(Uuid, Uuid, Vec<Point>)> {
    let mut sims: Vec<FlightSim> = fleet
        .aircraft
        .iter()
        .enumerate()
        .map(|(i, (reg, _))| FlightSim::new(reg.clone(), 42 + i as u64))
        .collect();
    let now = chrono::Utc::now().timestamp_micros();
    let mut out = Vec::new();
    let mut left = n;
    let mut i = 0;
    while left > 0 {
        let a = i % sims.len();
        let (session, pts) = sims[a].next_batch(BATCH.min(left), now);
        left -= pts.len();
        out.push((fleet.aircraft[a].1, session, pts));
        i += 1;
    }
    out
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0);
    format!(
        "{} cores ({cpu}), {:.0} GiB RAM, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        mem as f64 / 1024.0 / 1024.0,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| format!("Linux {}", s.trim()))
            .unwrap_or_default()
    )
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// 1. The ceiling: one psql \copy of the pre-encoded points into the partition.
async fn ceiling(cluster: &LocalCluster, client: &Client, file: &Path, n: usize, db: &str) -> f64 {
    fresh(client).await;
    let psql = cluster.bindir().join("psql");
    let copy = format!(
        "\\copy {} ({COLUMNS}) FROM '{}' WITH (FORMAT binary)",
        partition(),
        file.display()
    );
    let started = Instant::now();
    let out = Command::new(&psql)
        .arg(cluster.superuser_url(db))
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", &copy])
        .output()
        .expect("run psql");
    let secs = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count(client).await, n as i64);
    n as f64 / secs
}

struct DbxRun {
    rate: f64,
    p50: f64,
    p99: f64,
}

async fn loadgen_run(
    addr: std::net::SocketAddr,
    key: &str,
    fleet: &Fleet,
    total: Option<u64>,
    rate: Option<f64>,
    secs: f64,
    seed: u64,
) -> loadgen::Summary {
    let config = LoadgenConfig {
        addr,
        transport: Transport::Tcp,
        tls: None,
        key: key.to_string(),
        aircraft: fleet.aircraft.iter().map(|(r, _)| r.clone()).collect(),
        gateways: GATEWAYS,
        aircraft_per_gateway: AIRCRAFT / GATEWAYS,
        batch_points: BATCH,
        window: 8,
        rate,
        duration: Duration::from_secs_f64(secs),
        total_points: total,
        form: dbx_proto::PointForm::Map,
        udp_auth: dbx::loadgen::UdpAuth::Mac,
        seed,
    };
    let (_stop, rx) = ShutdownTrigger::new();
    loadgen::run(config, Arc::new(Stats::default()), rx).await
}

/// 2. dbx end to end: acked and committed.
async fn dbx_end_to_end(
    addr: std::net::SocketAddr,
    key: &str,
    fleet: &Fleet,
    client: &Client,
    n: usize,
    seed: u64,
) -> DbxRun {
    fresh(client).await;
    let s = loadgen_run(addr, key, fleet, Some(n as u64), None, 3600.0, seed).await;
    assert_eq!(s.points_acked, n as u64, "every point acked ({s:?})");
    assert_eq!(
        count(client).await,
        n as i64,
        "every acked point committed, once"
    );
    DbxRun {
        rate: n as f64 / s.duration_secs,
        p50: s.latency_ms.p50,
        p99: s.latency_ms.p99,
    }
}

/// 3a. Row-by-row prepared INSERT, autocommit, one connection.
async fn naive_rows(
    client: &Client,
    batches: &[(Uuid, Uuid, Vec<Point>)],
    org: Uuid,
    n: usize,
) -> f64 {
    fresh(client).await;
    let stmt = client
        .prepare(&format!(
            "INSERT INTO dbx_aviation.flight_telemetry ({COLUMNS}) VALUES \
             ($1,$2,$3,to_timestamp($4::float8 / 1e6),$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21,$22,$23,$24::text::jsonb)"
        ))
        .await
        .expect("prepare");
    let started = Instant::now();
    let mut done = 0;
    'outer: for (aircraft, session, pts) in batches {
        for p in pts {
            let ts = p.ts_micros as f64;
            client
                .execute(
                    &stmt,
                    &[
                        &org, aircraft, session, &ts, &p.seq, &p.lat, &p.lon, &p.alt, &p.gs, &p.vs,
                        &p.hdg, &p.roll, &p.pitch, &p.yaw, &p.ias, &p.bv, &p.bi, &p.bp, &p.rpm,
                        &p.cs, &p.fix, &p.sats, &p.temp, &p.extra,
                    ],
                )
                .await
                .expect("insert");
            done += 1;
            if done == n {
                break 'outer;
            }
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// 3b. 1000-row multi-row INSERT statements, autocommit, one connection.
async fn naive_multirow(
    client: &Client,
    batches: &[(Uuid, Uuid, Vec<Point>)],
    org: Uuid,
    n: usize,
) -> f64 {
    fresh(client).await;
    let rows: Vec<(Uuid, Uuid, &Point)> = batches
        .iter()
        .flat_map(|(a, s, pts)| pts.iter().map(move |p| (*a, *s, p)))
        .take(n)
        .collect();
    let started = Instant::now();
    for chunk in rows.chunks(1000) {
        let mut sql = format!("INSERT INTO dbx_aviation.flight_telemetry ({COLUMNS}) VALUES ");
        let mut params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> =
            Vec::with_capacity(chunk.len() * 24);
        for (i, (a, s, p)) in chunk.iter().enumerate() {
            let b = i * 24;
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "(${},${},${},to_timestamp(${}::float8/1e6),{}",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                (5..=24)
                    .map(|k| if k == 24 {
                        format!("${}::text::jsonb)", b + k)
                    } else {
                        format!("${}", b + k)
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            ));
            params.push(Box::new(org));
            params.push(Box::new(*a));
            params.push(Box::new(*s));
            params.push(Box::new(p.ts_micros as f64));
            params.push(Box::new(p.seq));
            params.push(Box::new(p.lat));
            params.push(Box::new(p.lon));
            for v in [
                p.alt, p.gs, p.vs, p.hdg, p.roll, p.pitch, p.yaw, p.ias, p.bv, p.bi, p.bp,
            ] {
                params.push(Box::new(v));
            }
            params.push(Box::new(p.rpm.clone()));
            params.push(Box::new(p.cs.clone()));
            params.push(Box::new(p.fix));
            params.push(Box::new(p.sats));
            params.push(Box::new(p.temp));
            params.push(Box::new(p.extra.clone()));
        }
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|b| b.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        client
            .execute(sql.as_str(), &refs)
            .await
            .expect("multi-row insert");
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    assert_eq!(count(client).await, n as i64);
    rate
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing useful: run only under cargo bench.
    if !std::env::args().any(|a| a == "--bench") {
        println!("throughput harness: run with `cargo bench -p dbx --bench throughput`");
        return;
    }
    let n = env_usize("DBX_BENCH_POINTS", 1_000_000);
    let naive_n = env_usize("DBX_BENCH_NAIVE_POINTS", 20_000);
    let runs = env_usize("DBX_BENCH_RUNS", 3).max(1);
    let work = tempfile::tempdir().expect("temp dir");

    // A private cluster with production durability.
    let mut opts = ClusterOptions::for_tests(work.path().join("cluster"));
    opts.settings = [
        ("shared_buffers", "512MB"),
        ("max_wal_size", "8GB"),
        ("wal_compression", "on"),
        ("checkpoint_timeout", "30min"),
        ("max_connections", "100"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let cluster = LocalCluster::init(opts).expect("cluster");
    cluster.start().expect("start cluster");
    let report = setup::setup(&SetupOptions {
        superuser: cluster.superuser_url("postgres").parse().expect("url"),
        database: "dbx_aviation".into(),
        out_dir: work.path().join("credentials"),
        rotate: false,
        sample_data: true,
    })
    .await
    .expect("setup");
    let key = report.api_key.clone().expect("api key");
    let su = connect(&cluster.superuser_url("dbx_aviation")).await;
    let org: Uuid = su
        .query_one(
            "SELECT org_id FROM dbx_aviation.organizations WHERE org_code = $1",
            &[&setup::SAMPLE_ORG_CODE],
        )
        .await
        .unwrap()
        .get(0);
    let mut aircraft = Vec::new();
    for i in 0..AIRCRAFT {
        let reg = format!("N{:03}BX", i + 1);
        let id: Uuid = su
            .query_one(
                "INSERT INTO dbx_aviation.aircraft_registry (org_id, registration_number, aircraft_type) VALUES ($1, $2, 'quadcopter') \
                 ON CONFLICT (org_id, registration_number) DO UPDATE SET is_active = true RETURNING aircraft_id",
                &[&org, &reg],
            )
            .await
            .unwrap()
            .get(0);
        aircraft.push((reg, id));
    }
    let fleet = Fleet { org, aircraft };
    let server_version: String = su
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);

    // Pre-encode the ceiling's file.
    let batches = generate(&fleet, n);
    let file: PathBuf = work.path().join("points.pgcopy");
    let mut enc = CopyEncoder::new(64 << 20);
    enc.begin();
    for (a, s, pts) in &batches {
        for p in pts {
            enc.push(&fleet.org, a, s, p);
        }
    }
    std::fs::write(&file, enc.finish()).expect("write copy file");
    // psql runs as the postgres user when we are root: let it read the file.
    let _ = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(work.path())
        .status();
    let file_mb = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) as f64 / 1e6;

    println!(
        "dbx throughput harness: {n} points, {runs} run(s) each, PostgreSQL {server_version}, {}",
        machine()
    );
    let mut ceil = Vec::new();
    for _ in 0..runs {
        ceil.push(ceiling(&cluster, &su, &file, n, "dbx_aviation").await);
    }
    let ceiling_rate = median(ceil.clone());
    println!("  ceiling  psql \\copy binary ({file_mb:.0} MB)   {ceiling_rate:>12.0} points/s   runs {ceil:.0?}");

    // dbx end to end, through a real daemon process built with the bench profile.
    let ingest = report
        .url_of("dbx_ingest_service")
        .expect("ingest url")
        .to_string();
    let ready = work.path().join("ready.json");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_dbx"))
        .args(["serve", "--ready-file"])
        .arg(&ready)
        .env("DATABASE_URL", &ingest)
        .env(
            "DBX_DATABASE__ADMIN_URL",
            report.url_of("dbx_maintenance_service").unwrap_or(&ingest),
        )
        .env("DBX_LISTENER__TCP_BIND", "127.0.0.1:0")
        .env("DBX_LISTENER__UDP_BIND", "")
        .env("DBX_HTTP__BIND", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start dbx serve");
    let addr: std::net::SocketAddr = loop {
        if let Ok(t) = std::fs::read_to_string(&ready) {
            let v: serde_json::Value = serde_json::from_str(&t).expect("ready json");
            break v["tcp"].as_str().unwrap().parse().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut e2e = Vec::new();
    for r in 0..runs {
        e2e.push(dbx_end_to_end(addr, &key, &fleet, &su, n, 1000 + r as u64).await);
    }
    let dbx_rate = median(e2e.iter().map(|r| r.rate).collect());
    let peak_rss = rss_kib(daemon.id(), "VmHWM:");
    println!(
        "  dbx      loadgen → TCP → daemon → COPY      {dbx_rate:>12.0} points/s   runs {:.0?}  (ack p50 {:.1} ms p99 {:.1} ms at full load)",
        e2e.iter().map(|r| r.rate).collect::<Vec<_>>(),
        e2e[0].p50,
        e2e[0].p99
    );

    // Latency at half the measured maximum.
    fresh(&su).await;
    let half = loadgen_run(addr, &key, &fleet, None, Some(dbx_rate * 0.5), 15.0, 7).await;
    println!(
        "  latency  at {:.0} points/s (50 %): ack p50 {:.1} ms, p99 {:.1} ms",
        dbx_rate * 0.5,
        half.latency_ms.p50,
        half.latency_ms.p99
    );
    let _ = Command::new("kill").arg(daemon.id().to_string()).status();
    let _ = daemon.wait();

    let rows_rate = naive_rows(&su, &batches, fleet.org, naive_n).await;
    println!("  naive    row-by-row prepared INSERT       {rows_rate:>12.0} points/s   ({naive_n} points)");
    let multi_n = (naive_n * 10).min(n);
    let multi_rate = naive_multirow(&su, &batches, fleet.org, multi_n).await;
    println!("  naive    1000-row multi-row INSERT        {multi_rate:>12.0} points/s   ({multi_n} points)");
    println!(
        "  ratios   dbx/ceiling {:.2}×   dbx/row-by-row {:.0}×   dbx/multi-row {:.1}×   daemon peak RSS {:.0} MiB",
        dbx_rate / ceiling_rate,
        dbx_rate / rows_rate,
        dbx_rate / multi_rate,
        peak_rss as f64 / 1024.0
    );

    let results = format!(
        "# Throughput results\n\n\
         Produced by `cargo bench -p dbx --bench throughput` (benches/throughput.rs) on {date}.\n\n\
         - Machine: {machine}; PostgreSQL {server_version} and dbx share the cores.\n\
         - Data: {n} points of {AIRCRAFT} simulated aircraft (24 columns incl. two real[] arrays), \
           {file_mb:.0} MB as binary COPY; daily partition with the dedupe unique index and the (aircraft_id, ts) index.\n\
         - PostgreSQL with fsync and synchronous_commit on; each figure is the median of {runs} runs into a truncated table.\n\n\
         | path | points/s | vs ceiling |\n|---|---:|---:|\n\
         | ceiling: `psql \\copy … (FORMAT binary)`, one stream, pre-encoded | {ceiling_rate:.0} | 1.00× |\n\
         | **dbx end to end**: loadgen ({GATEWAYS} TCP gateways, batches of {BATCH}) → daemon → binary COPY, acked after commit | **{dbx_rate:.0}** | **{:.2}×** |\n\
         | naive: row-by-row prepared INSERT (autocommit) | {rows_rate:.0} | {:.3}× |\n\
         | naive: 1000-row multi-row INSERT | {multi_rate:.0} | {:.2}× |\n\n\
         - dbx / row-by-row INSERT: {:.0}×; dbx / multi-row INSERT: {:.1}×.\n\
         - Ack latency at 50 % of the maximum rate ({:.0} points/s): p50 {:.1} ms, p99 {:.1} ms.\n\
         - Daemon peak RSS (VmHWM) over the whole run with default settings: {:.0} MiB.\n",
        dbx_rate / ceiling_rate,
        rows_rate / ceiling_rate,
        multi_rate / ceiling_rate,
        dbx_rate / rows_rate,
        dbx_rate / multi_rate,
        dbx_rate * 0.5,
        half.latency_ms.p50,
        half.latency_ms.p99,
        peak_rss as f64 / 1024.0,
        date = chrono::Utc::now().format("%Y-%m-%d"),
        machine = machine(),
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../benches/RESULTS.md");
    std::fs::write(&out, results).expect("write RESULTS.md");
    println!("  written to {}", out.display());
    cluster.stop().ok();
}
