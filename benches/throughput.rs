//! The throughput harness: the figure that matters, measured in one run on one
//! machine into the same fresh table.
//!
//! 1. the ceiling: `psql \copy … FROM file (FORMAT binary)` of the points, pre-encoded;
//! 2. dbx end to end: the loadgen over TCP through a real `dbx serve` process into
//!    committed rows (every point acked, then counted in the table);
//! 3. the naive ways: row-by-row prepared INSERT, and 1000-row multi-row INSERT;
//!
//! 4. dbx over MQTT: the loadgen publishing QoS 1 through a private Mosquitto (the
//!    deploy/mosquitto/ configuration) that the same daemon subscribes to, until every
//!    point is committed;
//!
//! then the ratios dbx/ceiling and dbx/naive, the daemon's peak RSS, ack latency
//! p50/p99 at 50 % of the measured maximum rate, and dbx's PUBACK latency (message
//! received → PUBACK, from its `dbx_mqtt_ack_latency_seconds` histogram) at 50 % of the
//! MQTT maximum. Each throughput is the median of
//! `DBX_BENCH_RUNS` runs (default 3). Results are printed and written to
//! `benches/RESULTS.md` with the machine described.
//!
//! Run: `cargo bench -p dbx --bench throughput` (env: `DBX_BENCH_POINTS`, default
//! 1 000 000; `DBX_BENCH_NAIVE_POINTS`, default 20 000; `DBX_BENCH_RUNS`, default 3).
//! PostgreSQL runs with production durability (fsync and synchronous_commit on).
//!
//! TLS mode, `DBX_BENCH_TLS=1`: the cluster runs with `ssl = on` (a certificate from a CA
//! made for the run) and two daemons serve the same database, one connecting with
//! `sslmode=disable`, one with `sslmode=verify-full`; after a warm-up run each, their
//! end-to-end runs come in pairs of alternating order so that both see the same machine.
//! Points/s and CPU per point (daemon plus its PostgreSQL backends, from /proc), their
//! medians and ratios go to the "TLS to PostgreSQL" section of `benches/RESULTS.md` (the
//! other sections are kept).
//!
//! Fleet mode, `DBX_BENCH_FLEET=1` (`benches/fleet.rs`): 2 000 and 10 000 gateways of one
//! aircraft at a few points/s each, beside today's shape, into an empty table and into one
//! holding 20 M rows of history; points/s, ack p50/p90/p99/max, daemon RSS and CPU per point,
//! and every maintenance task timed on both tables, in the "Fleet-shaped load" section of
//! `benches/RESULTS.md` (the other sections are kept).
//!
//! Citus mode, `DBX_BENCH_CITUS=1` (`benches/citus.rs`): a private coordinator and two workers
//! (Citus installed into the machine's PostgreSQL), `dbx setup --distributed`; per round one
//! `psql \copy (FORMAT binary)` stream into the coordinator (the Citus ceiling), dbx end to end
//! through the coordinator, two daemons at once through the coordinator and through a worker,
//! and the single-node ceiling and dbx beside them (`DBX_BENCH_CITUS_SINGLE=0` skips those);
//! points/s, ratios to the Citus ceiling, ack p50/p99, rows per worker, every acked point
//! checked stored once; the "Citus: three nodes on one machine" section of `benches/RESULTS.md`.

mod citus;
mod fleet;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dbx_batcher::copy::{CopyEncoder, COLUMNS};
use dbx_client::loadgen::{self, LoadgenConfig, Stats, Transport};
use dbx_client::sim::FlightSim;
use dbx_control::setup::{self, SetupOptions};
use dbx_core::{Point, ShutdownTrigger};
use dbx_localpg::broker::{BrokerOptions, LocalBroker};
use dbx_localpg::cluster::{ClusterOptions, ClusterTls, LocalCluster};
use tokio_postgres::Client;
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

fn connector(url: &str) -> dbx_pg::Connector {
    dbx_pg::Connector::new(url, &dbx_pg::TlsOptions::default(), "bench").expect("url")
}

async fn connect(url: &str) -> Client {
    connector(url).connect().await.expect("connect")
}

/// The 1-, 5- and 15-minute load averages: how busy the shared machine was.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// A `dbx serve` process (bench profile) against `url`; its TCP address.
async fn start_daemon(
    dir: &Path,
    name: &str,
    url: &str,
    admin_url: &str,
    extra_env: &[(&str, String)],
) -> (
    std::process::Child,
    std::net::SocketAddr,
    std::net::SocketAddr,
) {
    let ready = dir.join(format!("{name}.ready.json"));
    let daemon = Command::new(env!("CARGO_BIN_EXE_dbx"))
        .args(["serve", "--ready-file"])
        .arg(&ready)
        .env("DATABASE_URL", url)
        .env("DBX_DATABASE__ADMIN_URL", admin_url)
        .env("DBX_LISTENER__TCP_BIND", "127.0.0.1:0")
        .env("DBX_LISTENER__UDP_BIND", "")
        .env("DBX_HTTP__BIND", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())))
        .spawn()
        .expect("start dbx serve");
    let (tcp, http) = loop {
        if let Ok(t) = std::fs::read_to_string(&ready) {
            let v: serde_json::Value = serde_json::from_str(&t).expect("ready json");
            let a = |k: &str| v[k].as_str().unwrap().parse().unwrap();
            break (a("tcp"), a("http"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    (daemon, tcp, http)
}

fn stop_daemon(mut daemon: std::process::Child) {
    let _ = Command::new("kill").arg(daemon.id().to_string()).status();
    let _ = daemon.wait();
}

/// Replaces the part of RESULTS.md before its first `## ` section (`head`) and/or the
/// section titled `title`, keeping every other section as written.
fn write_results(head: Option<String>, section: Option<(&str, String)>) -> PathBuf {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../benches/RESULTS.md");
    let old = std::fs::read_to_string(&out).unwrap_or_default();
    let (old_head, rest) = match old.find("\n## ") {
        Some(i) => (old[..=i].to_string(), old[i + 1..].to_string()),
        None => (old.clone(), String::new()),
    };
    let mut sections: Vec<String> = rest
        .split("\n## ")
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let s = s.strip_prefix("## ").unwrap_or(s);
            format!("## {}\n", s.trim_end())
        })
        .collect();
    if let Some((title, text)) = section {
        let text = format!("## {title}\n\n{}\n", text.trim_end());
        match sections
            .iter()
            .position(|s| s.starts_with(&format!("## {title}\n")))
        {
            Some(i) => sections[i] = text,
            None => sections.insert(0, text),
        }
    }
    let mut doc = head.unwrap_or(old_head).trim_end().to_string();
    doc.push('\n');
    for s in sections {
        doc.push('\n');
        doc.push_str(&s);
    }
    std::fs::write(&out, doc).expect("write RESULTS.md");
    out
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

/// The sample organization's fleet: `AIRCRAFT` aircraft registered (or re-activated) in the
/// database `su` is connected to.
async fn register_fleet(su: &Client) -> Fleet {
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
    Fleet { org, aircraft }
}

/// Writes `batches` as one binary COPY file at `file`, readable by the `postgres` user; its
/// size in MB.
fn encode(fleet: &Fleet, batches: &[(Uuid, Uuid, Vec<Point>)], file: &Path) -> f64 {
    let mut enc = CopyEncoder::new(64 << 20);
    enc.begin();
    for (a, s, pts) in batches {
        for p in pts {
            enc.push(&fleet.org, a, s, p);
        }
    }
    std::fs::write(file, enc.finish()).expect("write copy file");
    // psql runs as the postgres user when we are root: let it read the file and enter its
    // directory (a temporary directory right under the world-readable temp dir).
    let _ = Command::new("chmod").arg("a+r").arg(file).status();
    let _ = Command::new("chmod")
        .arg("a+rx")
        .arg(file.parent().expect("the file's directory"))
        .status();
    std::fs::metadata(file).map(|m| m.len()).unwrap_or(0) as f64 / 1e6
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

#[allow(clippy::too_many_arguments)]
async fn loadgen_run(
    mqtt: Option<loadgen::MqttTarget>,
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
        transport: if mqtt.is_some() {
            Transport::Mqtt
        } else {
            Transport::Tcp
        },
        tls: None,
        key: key.to_string(),
        aircraft: fleet.aircraft.iter().map(|(r, _)| r.clone()).collect(),
        // The whole fleet is GATEWAYS gateways; a part of it (Citus mode's two daemons) as
        // many gateways as its aircraft fill.
        gateways: (fleet.aircraft.len() / (AIRCRAFT / GATEWAYS)).max(1),
        aircraft_per_gateway: AIRCRAFT / GATEWAYS,
        batch_points: BATCH,
        window: 8,
        rate,
        duration: Duration::from_secs_f64(secs),
        warmup: Duration::ZERO,
        total_points: total,
        form: dbx_proto::PointForm::Map,
        udp_auth: dbx_client::loadgen::UdpAuth::Mac,
        seed,
        mqtt,
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
    let s = loadgen_run(None, addr, key, fleet, Some(n as u64), None, 3600.0, seed).await;
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

/// The sample organization's gateway at the bench broker.
fn mqtt_target(broker: &LocalBroker, password: &str) -> loadgen::MqttTarget {
    let addr = dbx_mqtt::BrokerAddr::parse(&broker.url()).expect("the bench broker's URL");
    loadgen::MqttTarget {
        host: addr.host,
        port: addr.port,
        tls: addr.tls,
        username: setup::SAMPLE_ORG_CODE.into(),
        password: password.into(),
        org_code: setup::SAMPLE_ORG_CODE.into(),
        topic: "dbx/{org_code}/{aircraft}/telemetry".into(),
    }
}

/// 4. dbx over MQTT: published through the broker, until every point is committed.
async fn mqtt_end_to_end(
    target: loadgen::MqttTarget,
    fleet: &Fleet,
    client: &Client,
    n: usize,
    seed: u64,
) -> f64 {
    fresh(client).await;
    let started = Instant::now();
    let addr = "127.0.0.1:9".parse().expect("unused address");
    let s = loadgen_run(
        Some(target),
        addr,
        "",
        fleet,
        Some(n as u64),
        None,
        3600.0,
        seed,
    )
    .await;
    assert_eq!(
        s.points_acked, n as u64,
        "the broker took every point ({s:?})"
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    while count(client).await < n as i64 {
        assert!(
            Instant::now() < deadline,
            "not every published point was committed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(client).await, n as i64, "every point once");
    n as f64 / secs
}

/// The cumulative buckets (upper bound, count) of a Prometheus histogram.
fn buckets(exposition: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, value) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, value.trim().parse().ok()?))
        })
        .collect()
}

/// The `q` quantile of the observations between two scrapes, interpolated linearly
/// within its bucket as Prometheus' histogram_quantile does; in milliseconds.
fn quantile_ms(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            let old = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, c - old)
        })
        .collect();
    let total = delta.last().map_or(0.0, |(_, c)| *c);
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (le, c) in delta {
        if c >= rank {
            if le.is_infinite() {
                return lower.0 * 1000.0;
            }
            let share = if c > lower.1 {
                (rank - lower.1) / (c - lower.1)
            } else {
                0.0
            };
            return (lower.0 + (le - lower.0) * share) * 1000.0;
        }
        lower = (le, c);
    }
    f64::NAN
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
    let tls = env_usize("DBX_BENCH_TLS", 0) == 1;
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
    if env_usize("DBX_BENCH_FLEET", 0) == 1 {
        // Fleet mode writes 20 M rows of history on a shared disk: keep the WAL small.
        for (k, v) in opts.settings.iter_mut() {
            if k == "max_wal_size" {
                *v = "1GB".into();
            }
        }
    }
    if tls {
        // Both plaintext and TLS connections are accepted: the two daemons compare them.
        opts.tls = Some(ClusterTls::generate(false).expect("certificates").0);
    }
    let cluster = LocalCluster::init(opts).expect("cluster");
    cluster.start().expect("start cluster");
    let report = setup::setup(&SetupOptions {
        superuser: connector(&cluster.superuser_url("postgres")),
        database: "dbx_aviation".into(),
        out_dir: work.path().join("credentials"),
        rotate: false,
        sample_data: true,
        postgis: Default::default(),
        distributed: false,
        columnar: false,
    })
    .await
    .expect("setup");
    let key = report.api_key.clone().expect("api key");
    let su = connect(&cluster.superuser_url("dbx_aviation")).await;
    let fleet = register_fleet(&su).await;
    let server_version: String = su
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);

    if env_usize("DBX_BENCH_FLEET", 0) == 1 {
        fleet::fleet_mode(
            &cluster.superuser_url("dbx_aviation"),
            &report,
            &key,
            fleet.org,
            work.path(),
            &server_version,
        )
        .await;
        cluster.stop().ok();
        return;
    }
    if env_usize("DBX_BENCH_CITUS", 0) == 1 {
        let single = citus::Single {
            cluster: &cluster,
            report: &report,
            fleet: &fleet,
            key: &key,
            su: &su,
        };
        citus::citus_mode(single, n, runs, work.path(), &server_version).await;
        cluster.stop().ok();
        return;
    }
    if tls {
        tls_comparison(&cluster, &report, (&fleet, &key, &su), n, runs, work.path()).await;
        cluster.stop().ok();
        return;
    }

    // Pre-encode the ceiling's file.
    let batches = generate(&fleet, n);
    let file: PathBuf = work.path().join("points.pgcopy");
    let file_mb = encode(&fleet, &batches, &file);

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
    // The broker the MQTT runs publish through; the daemon subscribes from the start.
    let broker_password = dbx_core::apikey::random_token(24);
    let broker = LocalBroker::start(BrokerOptions {
        dir: work.path().join("mosquitto"),
        users: ["dbx", setup::SAMPLE_ORG_CODE]
            .iter()
            .map(|u| (u.to_string(), broker_password.clone()))
            .collect(),
        tls: None,
    })
    .expect("mosquitto (apt-get install mosquitto mosquitto-clients)");
    let admin_url = report.url_of("dbx_maintenance_service").unwrap_or(&ingest);
    let mqtt_env = [
        ("DBX_MQTT__URL", broker.url()),
        ("DBX_MQTT__USERNAME", "dbx".to_string()),
        ("DBX_MQTT__PASSWORD", broker_password.clone()),
        ("DBX_MQTT__CLIENT_ID", "dbx-bench".to_string()),
    ];
    let (daemon, addr, http) =
        start_daemon(work.path(), "dbx", &ingest, admin_url, &mqtt_env).await;
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
    let half = loadgen_run(
        None,
        addr,
        &key,
        &fleet,
        None,
        Some(dbx_rate * 0.5),
        15.0,
        7,
    )
    .await;
    println!(
        "  latency  at {:.0} points/s (50 %): ack p50 {:.1} ms, p99 {:.1} ms",
        dbx_rate * 0.5,
        half.latency_ms.p50,
        half.latency_ms.p99
    );

    // MQTT: the same fleet through Mosquitto into the same daemon.
    let target = mqtt_target(&broker, &broker_password);
    let mut mq = Vec::new();
    for r in 0..runs {
        mq.push(mqtt_end_to_end(target.clone(), &fleet, &su, n, 2000 + r as u64).await);
    }
    let mqtt_rate = median(mq.clone());
    println!(
        "  mqtt     loadgen → Mosquitto → daemon → COPY {mqtt_rate:>11.0} points/s   runs {mq:.0?}"
    );
    fresh(&su).await;
    let scrape = || async { dbx_testkit::daemon::http_get(http, "/metrics").await.1 };
    let before = buckets(&scrape().await, "dbx_mqtt_ack_latency_seconds");
    loadgen_run(
        Some(target),
        addr,
        "",
        &fleet,
        None,
        Some(mqtt_rate * 0.5),
        15.0,
        8,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = buckets(&scrape().await, "dbx_mqtt_ack_latency_seconds");
    let (puback_p50, puback_p99) = (
        quantile_ms(&before, &after, 0.5),
        quantile_ms(&before, &after, 0.99),
    );
    println!(
        "  latency  at {:.0} points/s over MQTT (50 %): dbx PUBACK p50 {puback_p50:.1} ms, p99 {puback_p99:.1} ms",
        mqtt_rate * 0.5
    );
    let peak_rss = peak_rss.max(rss_kib(daemon.id(), "VmHWM:"));
    stop_daemon(daemon);
    broker.stop();

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
         | **dbx over MQTT**: loadgen ({GATEWAYS} MQTT 5 clients, QoS 1, batches of {BATCH}) → Mosquitto 2 (deploy/mosquitto/) → daemon → binary COPY, PUBACK after commit; timed until the last point is committed | **{mqtt_rate:.0}** | **{:.2}×** |\n\
         | naive: row-by-row prepared INSERT (autocommit) | {rows_rate:.0} | {:.3}× |\n\
         | naive: 1000-row multi-row INSERT | {multi_rate:.0} | {:.2}× |\n\n\
         - dbx / row-by-row INSERT: {:.0}×; dbx / multi-row INSERT: {:.1}×.\n\
         - Ack latency at 50 % of the maximum rate ({:.0} points/s): p50 {:.1} ms, p99 {:.1} ms.\n\
         - MQTT / TCP in the same run: {:.2}×. dbx's PUBACK latency (message received → PUBACK handed to the client, \
           from `dbx_mqtt_ack_latency_seconds`, interpolated within its buckets) at 50 % of the MQTT maximum \
           ({:.0} points/s): p50 {puback_p50:.1} ms, p99 {puback_p99:.1} ms.\n\
         - Daemon peak RSS (VmHWM) over the whole run with default settings: {:.0} MiB.\n",
        dbx_rate / ceiling_rate,
        mqtt_rate / ceiling_rate,
        rows_rate / ceiling_rate,
        multi_rate / ceiling_rate,
        dbx_rate / rows_rate,
        dbx_rate / multi_rate,
        dbx_rate * 0.5,
        half.latency_ms.p50,
        half.latency_ms.p99,
        mqtt_rate / dbx_rate,
        mqtt_rate * 0.5,
        peak_rss as f64 / 1024.0,
        date = chrono::Utc::now().format("%Y-%m-%d"),
        machine = machine(),
    );
    let out = write_results(Some(results), None);
    println!("  written to {}", out.display());
    cluster.stop().ok();
}

/// CPU seconds (user + system) process `pid` has used so far; 0 when it is gone.
fn cpu_secs(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // After "pid (comm) ": state is field 3, utime 14, stime 15.
            let rest = s.rsplit_once(") ")?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .unwrap_or(0.0)
}

/// One of the two daemons of TLS mode, and what its runs measured.
struct Mode {
    name: &'static str,
    tls: bool,
    daemon: std::process::Child,
    addr: std::net::SocketAddr,
    rates: Vec<f64>,
    /// CPU microseconds per point of the daemon and its PostgreSQL backends.
    cpu_us: Vec<f64>,
}

impl Mode {
    /// CPU seconds of the daemon and of each PostgreSQL backend serving it (its ingest
    /// connections: TLS or not tells the two daemons apart).
    async fn cpu(&self, su: &Client) -> (f64, std::collections::HashMap<i32, f64>) {
        let pids: Vec<i32> = su
            .query(
                "SELECT a.pid FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.usename = 'dbx_ingest_service' AND s.ssl = $1",
                &[&self.tls],
            )
            .await
            .expect("backends")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let backends = pids.iter().map(|p| (*p, cpu_secs(*p as u32))).collect();
        (cpu_secs(self.daemon.id()), backends)
    }

    /// One end-to-end run through this daemon: its rate and CPU per point.
    async fn run(&mut self, key: &str, fleet: &Fleet, su: &Client, n: usize, seed: u64) {
        let (d0, b0) = self.cpu(su).await;
        let rate = dbx_end_to_end(self.addr, key, fleet, su, n, seed)
            .await
            .rate;
        let (d1, b1) = self.cpu(su).await;
        // A backend the pool opened during the run counts from 0.
        let backends: f64 = b1
            .iter()
            .map(|(pid, c)| c - b0.get(pid).copied().unwrap_or(0.0))
            .sum();
        self.rates.push(rate);
        self.cpu_us.push((d1 - d0 + backends) / n as f64 * 1e6);
    }

    fn runs(v: &[f64], digits: usize) -> String {
        v.iter()
            .map(|x| format!("{x:.digits$}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// TLS mode: the same end-to-end run through a daemon connecting without TLS and one with
/// `sslmode=verify-full`, alternating, into the same database: points/s, and CPU per point
/// of each daemon and its PostgreSQL backends (less sensitive to a shared machine).
async fn tls_comparison(
    cluster: &LocalCluster,
    report: &setup::SetupReport,
    (fleet, key, su): (&Fleet, &str, &Client),
    n: usize,
    runs: usize,
    dir: &Path,
) {
    let mut modes = Vec::new();
    for (name, tls) in [("disable", false), ("verify-full", true)] {
        let url = |user: &str| {
            let pw = report
                .passwords
                .iter()
                .find(|(u, _)| u == user)
                .map(|(_, p)| p.clone())
                .expect("password");
            match tls {
                true => cluster.url_for(user, &pw, "dbx_aviation"),
                false => cluster.plaintext_url_for(user, &pw, "dbx_aviation"),
            }
        };
        let (daemon, addr, _) = start_daemon(
            dir,
            name,
            &url("dbx_ingest_service"),
            &url("dbx_maintenance_service"),
            &[],
        )
        .await;
        let (rates, cpu_us) = (Vec::new(), Vec::new());
        modes.push(Mode {
            name,
            tls,
            daemon,
            addr,
            rates,
            cpu_us,
        });
    }
    let load_before = loadavg();
    println!(
        "dbx throughput harness, TLS mode: {n} points, {runs} run(s) each, {}; load average {load_before}",
        machine()
    );
    // One unmeasured run each first (pools filled, caches warm), then pairs in alternating
    // order (plain first, then TLS first, …) so that neither side always follows the other.
    for m in modes.iter_mut() {
        dbx_end_to_end(m.addr, key, fleet, su, (n / 10).max(BATCH), 1999).await;
    }
    for r in 0..runs {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let m = &mut modes[i];
            m.run(key, fleet, su, n, 2000 + r as u64).await;
            println!(
                "  run {} sslmode={:<12} {:>9.0} points/s  {:>6.2} CPU µs/point",
                r + 1,
                m.name,
                m.rates[r],
                m.cpu_us[r]
            );
        }
    }
    // What the TLS daemon's connections negotiated, as the server saw it.
    let negotiated: Vec<String> = su
        .query(
            "SELECT DISTINCT s.version || ' ' || s.cipher FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) WHERE s.ssl AND a.usename = 'dbx_ingest_service'",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let load_after = loadavg();
    let rate: Vec<f64> = modes.iter().map(|m| median(m.rates.clone())).collect();
    let cpu: Vec<f64> = modes.iter().map(|m| median(m.cpu_us.clone())).collect();
    println!(
        "  median   points/s: TLS/plain {:.3}; CPU per point: TLS/plain {:.3}",
        rate[1] / rate[0],
        cpu[1] / cpu[0]
    );
    let rows: String = modes
        .iter()
        .enumerate()
        .map(|(i, m)| {
            format!(
                "| `sslmode={}` | {:.0} | {} | {:.2} | {} |\n",
                m.name,
                rate[i],
                Mode::runs(&m.rates, 0),
                cpu[i],
                Mode::runs(&m.cpu_us, 2)
            )
        })
        .collect();
    let section = format!(
        "Produced by `DBX_BENCH_TLS=1 cargo bench -p dbx --bench throughput` on {date}: the same \
         end-to-end run ({n} points, {GATEWAYS} TCP gateways, batches of {BATCH}, acked after commit) \
         through two daemons on one database, one connecting to PostgreSQL with `sslmode=disable`, \
         one with `sslmode=verify-full` ({}, ECDSA P-256 certificate; rustls with ring), after \
         one unmeasured warm-up run each, in pairs of alternating order. CPU per point is the user + system time of the daemon and of the \
         PostgreSQL backends serving it, per point stored.\n\n\
         - Machine: {machine}, shared with other work: load average {load_before} before, \
           {load_after} after (1, 5, 15 min). Points/s swing with the other work; CPU per point \
           much less.\n\n\
         | connection to PostgreSQL | points/s (median of {runs}) | runs | CPU µs/point (median) | runs |\n\
         |---|---:|---|---:|---|\n{rows}\n\
         - **TLS / plaintext: throughput {:.3}, CPU per point {:.3}.**\n",
        negotiated.join(", "),
        rate[1] / rate[0],
        cpu[1] / cpu[0],
        date = chrono::Utc::now().format("%Y-%m-%d"),
        machine = machine(),
    );
    for m in modes {
        stop_daemon(m.daemon);
    }
    let out = write_results(None, Some(("TLS to PostgreSQL", section)));
    println!("  written to {}", out.display());
}
