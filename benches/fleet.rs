//! Fleet mode of the throughput harness (`DBX_BENCH_FLEET=1`): the shape real fleets have —
//! thousands of gateways, one aircraft each, a few points per second each — beside today's
//! shape (4 gateways × 4 aircraft, batches of 1000, as fast as acks allow), each into an empty
//! table and into a table that already holds a history of at least 20 M rows over eight
//! daily partitions, written here with binary COPY (and the sessions they belong to).
//!
//! Per shape and table: points/s acked, ack latency p50/p90/p99/max (batch written → its ack,
//! from the loadgen), the daemon's peak RSS (a fresh daemon per run: its VmHWM), and CPU per
//! point of the daemon and of the PostgreSQL backends serving it. Then every maintenance task
//! and one health collection, timed on the empty and on the filled table. Results go to the
//! "Fleet-shaped load" section of benches/RESULTS.md; the other sections are kept.
//!
//! Env: `DBX_BENCH_FLEET_RATE` points/s per gateway (default 10, one batch per second),
//! `DBX_BENCH_FLEET_SECS` seconds per run (default 30), `DBX_BENCH_FLEET_GATEWAYS` the fleet
//! sizes (default `2000,10000`), `DBX_BENCH_FLEET_HISTORY` rows of history (default
//! 20 000 000), `DBX_BENCH_FLEET_EMPTY=0` skips the runs into the empty table (the 10 000
//! gateway shape is heavy on a shared machine). The gateways all connect from 127.0.0.1, so the daemon's per-address limit of
//! pending handshakes is raised for these runs (a real fleet comes from many addresses).

use std::path::Path;
use std::time::{Duration, Instant};

use dbx_batcher::copy::{CopyEncoder, COLUMNS};
use dbx_client::loadgen::{self, LoadgenConfig, Stats, Transport};
use dbx_control::health::HealthCollector;
use dbx_control::partitions::{PartitionInterval, PartitionManager, PartitionsConfig, Task};
use dbx_control::setup::SetupReport;
use dbx_core::{Point, SharedClock, ShutdownTrigger, SystemClock};
use futures::SinkExt;
use tokio_postgres::Client;
use uuid::Uuid;

use super::{connect, connector, cpu_secs, env_usize, loadavg, machine, rss_kib};

/// A task, its duration in milliseconds and the rows (days, for the refresh) its report counted.
type Timing = (String, f64, u64);

/// Days of history before today.
const HISTORY_DAYS: i64 = 8;
/// Rows per COPY chunk of the history.
const CHUNK_ROWS: usize = 20_000;

/// One load shape.
struct Shape {
    name: String,
    gateways: usize,
    aircraft_per_gateway: usize,
    batch: usize,
    /// Points/s over the whole fleet; `None` = as fast as acks allow.
    rate: Option<f64>,
}

/// What one run of a shape measured.
struct Run {
    table: &'static str,
    shape: String,
    offered: Option<f64>,
    rate: f64,
    acked: u64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    rss_mib: f64,
    daemon_us: f64,
    pg_us: f64,
    reconnects: u64,
}

/// Everything a run needs.
struct Ctx<'a> {
    dir: &'a Path,
    ingest_url: String,
    admin_url: String,
    key: String,
    su: Client,
    registrations: Vec<String>,
    secs: f64,
}

fn shapes(gateways: &[usize], per_gateway: f64) -> Vec<Shape> {
    let mut out = vec![Shape {
        name: "today: 4 gw × 4 aircraft, batch 1000, unpaced".into(),
        gateways: 4,
        aircraft_per_gateway: 4,
        batch: 1000,
        rate: None,
    }];
    let batch = (per_gateway.round() as usize).max(1);
    for &g in gateways {
        out.push(Shape {
            name: format!("{g} gw × 1 aircraft, {per_gateway} points/s each, batch {batch}"),
            gateways: g,
            aircraft_per_gateway: 1,
            batch,
            rate: Some(g as f64 * per_gateway),
        });
    }
    out
}

/// Today's partition: only the runs write there (the history is in the days before).
async fn today_rows(su: &Client) -> i64 {
    su.query_one(&format!("SELECT count(*) FROM {}", super::partition()), &[])
        .await
        .expect("count today's rows")
        .get(0)
}

/// CPU seconds of every backend serving the ingest user, by pid.
async fn backend_cpu(su: &Client) -> std::collections::HashMap<i32, f64> {
    su.query(
        "SELECT pid FROM pg_stat_activity WHERE usename = 'dbx_ingest_service'",
        &[],
    )
    .await
    .expect("backends")
    .iter()
    .map(|r| {
        let pid: i32 = r.get(0);
        (pid, cpu_secs(pid as u32))
    })
    .collect()
}

/// One shape through a fresh daemon: every point acked and stored once.
async fn run_shape(ctx: &Ctx<'_>, shape: &Shape, table: &'static str, seed: u64) -> Run {
    let env = [
        ("DBX_LISTENER__MAX_CONNECTIONS", "12000".to_string()),
        ("DBX_LISTENER__MAX_PENDING_HANDSHAKES", "4096".to_string()),
        ("DBX_LISTENER__MAX_PENDING_PER_IP", "4096".to_string()),
    ];
    // A ready file of its own: the previous daemon's would give its (closed) address.
    let name = format!("fleet-{seed}");
    let (daemon, addr, _) =
        super::start_daemon(ctx.dir, &name, &ctx.ingest_url, &ctx.admin_url, &env).await;
    let rows_before = today_rows(&ctx.su).await;
    let (d0, b0) = (cpu_secs(daemon.id()), backend_cpu(&ctx.su).await);
    let config = LoadgenConfig {
        addr,
        transport: Transport::Tcp,
        tls: None,
        key: ctx.key.clone(),
        aircraft: ctx.registrations.clone(),
        gateways: shape.gateways,
        aircraft_per_gateway: shape.aircraft_per_gateway,
        batch_points: shape.batch,
        window: 8,
        rate: shape.rate,
        duration: Duration::from_secs_f64(ctx.secs),
        warmup: Duration::ZERO,
        total_points: None,
        form: dbx_proto::PointForm::Map,
        udp_auth: dbx_client::loadgen::UdpAuth::Mac,
        seed,
        mqtt: None,
    };
    let (_stop, rx) = ShutdownTrigger::new();
    let s = loadgen::run(config, std::sync::Arc::new(Stats::default()), rx).await;
    let (d1, b1) = (cpu_secs(daemon.id()), backend_cpu(&ctx.su).await);
    let rss = rss_kib(daemon.id(), "VmHWM:");
    assert!(s.error.is_none(), "{}: {s}", shape.name);
    assert_eq!(s.points_nacked, 0, "{}: nothing refused ({s})", shape.name);
    assert_eq!(
        s.points_acked, s.points_sent,
        "{}: every point acked ({s})",
        shape.name
    );
    let stored = today_rows(&ctx.su).await - rows_before;
    assert_eq!(
        stored, s.points_acked as i64,
        "{}: every acked point stored once",
        shape.name
    );
    super::stop_daemon(daemon);
    let pg: f64 = b1
        .iter()
        .map(|(pid, c)| c - b0.get(pid).copied().unwrap_or(0.0))
        .sum();
    let n = s.points_acked.max(1) as f64;
    let run = Run {
        table,
        shape: shape.name.clone(),
        offered: shape.rate,
        rate: s.throughput_per_sec,
        acked: s.points_acked,
        p50: s.latency_ms.p50,
        p90: s.latency_ms.p90,
        p99: s.latency_ms.p99,
        max: s.latency_ms.max,
        rss_mib: rss as f64 / 1024.0,
        daemon_us: (d1 - d0) / n * 1e6,
        pg_us: pg / n * 1e6,
        reconnects: s.reconnects,
    };
    println!(
        "  {table:<7} {:<52} {:>8.0} points/s  ack p50 {:>7.1} p90 {:>7.1} p99 {:>7.1} max {:>7.1} ms  RSS {:>5.0} MiB  CPU µs/point daemon {:>5.2} PG {:>5.2}  ({} reconnects)",
        run.shape, run.rate, run.p50, run.p90, run.p99, run.max, run.rss_mib, run.daemon_us, run.pg_us, run.reconnects
    );
    run
}

/// A deterministic session id per aircraft and day.
fn session_of(aircraft: &Uuid, day: i64) -> Uuid {
    Uuid::from_u128(aircraft.as_u128() ^ (0x5e55_0000_0000_0000_0000_0000_0000_0000 | day as u128))
}

/// `rows` points of `aircraft`, spread over [from, from + 1 day), round robin, as a
/// binary COPY into `partition` on `c`.
async fn copy_day(
    c: &Client,
    partition: &str,
    org: Uuid,
    aircraft: &[Uuid],
    from: chrono::DateTime<chrono::Utc>,
    day: i64,
    rows: usize,
) {
    let sink = c
        .copy_in(&format!(
            "COPY {partition} ({COLUMNS}) FROM STDIN WITH (FORMAT binary)"
        ))
        .await
        .expect("COPY");
    futures::pin_mut!(sink);
    let start = from.timestamp_micros();
    let step = 86_400_000_000 / rows.max(1) as i64;
    let mut enc = CopyEncoder::new(16 << 20);
    let mut done = 0;
    let mut first = true;
    while done < rows {
        enc.begin();
        let n = CHUNK_ROWS.min(rows - done);
        for i in done..done + n {
            let a = i % aircraft.len();
            let k = (i / aircraft.len()) as i64;
            let mut p = Point::new(start + i as i64 * step, k + 1);
            let f = (i % 1000) as f64 / 1000.0;
            p.lat = Some(47.0 + f * 0.5);
            p.lon = Some(8.0 + f * 0.5);
            p.alt = Some(100.0 + (k % 300) as f32);
            p.gs = Some(12.0 + (k % 7) as f32);
            p.hdg = Some((k % 360) as f32);
            p.bv = Some(22.2);
            p.bp = Some(100.0 - (k % 100) as f32);
            p.fix = Some(3);
            p.sats = Some(14);
            p.temp = Some(21.5);
            enc.push(&org, &aircraft[a], &session_of(&aircraft[a], day), &p);
        }
        let bytes = enc.finish();
        // One stream: the header once (19 bytes), the trailer (2 bytes) once at the end.
        let body = bytes.slice(if first { 0 } else { 19 }..bytes.len() - 2);
        first = false;
        sink.send(body).await.expect("COPY data");
        done += n;
    }
    sink.send(bytes::Bytes::from_static(&[0xff, 0xff]))
        .await
        .expect("COPY trailer");
    sink.finish().await.expect("COPY done");
}

/// Bytes the history takes on disk per row, table and indexes, with room to spare.
const HISTORY_BYTES_PER_ROW: u64 = 350;

/// Free bytes on the file system holding `dir`.
fn free_bytes(dir: &Path) -> u64 {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return 0;
    };
    // SAFETY: a NUL-terminated path and a zeroed struct statvfs fills.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut st) != 0 {
            return 0;
        }
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

/// `rows` points over the `HISTORY_DAYS` days before today (two COPY streams at once), and
/// one completed flight session per aircraft and day for them. Refuses to start when the
/// disk could not hold them and 4 GiB more (WAL, the runs): the disk is shared.
async fn prefill(su_url: &str, org: Uuid, aircraft: &[Uuid], rows: usize, dir: &Path) -> f64 {
    let needed = rows as u64 * HISTORY_BYTES_PER_ROW + (4 << 30);
    let free = free_bytes(dir);
    assert!(
        free >= needed,
        "the history of {rows} rows needs about {} GiB free under {}, there are {} GiB: set DBX_BENCH_FLEET_HISTORY lower",
        needed >> 30,
        dir.display(),
        free >> 30
    );
    let started = Instant::now();
    let d0 = PartitionInterval::Daily.floor(chrono::Utc::now());
    let per_day = rows / HISTORY_DAYS as usize;
    let mut tasks = Vec::new();
    for lane in 0..2i64 {
        let url = su_url.to_string();
        let aircraft = aircraft.to_vec();
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await;
            for day in (1..=HISTORY_DAYS).filter(|d| d % 2 == lane) {
                let from = d0 - chrono::TimeDelta::days(day);
                let partition: String = c
                    .query_one(
                        "SELECT dbx_aviation.ensure_telemetry_partition($1, $2)",
                        &[&from, &(from + chrono::TimeDelta::days(1))],
                    )
                    .await
                    .expect("history partition")
                    .get(0);
                let t = Instant::now();
                copy_day(&c, &partition, org, &aircraft, from, day, per_day).await;
                c.execute(
                    &format!(
                        "INSERT INTO dbx_aviation.flight_sessions
                           (session_id, org_id, aircraft_id, actual_departure, actual_arrival,
                            flight_duration_seconds, point_count, last_seq, flight_status,
                            last_point_at, completed_at, completion_reason)
                         SELECT session_id, org_id, aircraft_id, min(ts), max(ts),
                                extract(epoch FROM max(ts) - min(ts))::int, count(*), max(seq),
                                'completed', max(ts), max(ts), 'end'
                           FROM {partition} GROUP BY session_id, org_id, aircraft_id"
                    ),
                    &[],
                )
                .await
                .expect("history sessions");
                println!(
                    "  history  {partition}: {per_day} rows in {:.1} s (load average {})",
                    t.elapsed().as_secs_f64(),
                    loadavg()
                );
            }
        }));
    }
    for t in tasks {
        t.await.expect("history lane");
    }
    let c = connect(su_url).await;
    c.batch_execute("ANALYZE; CHECKPOINT")
        .await
        .expect("analyze");
    started.elapsed().as_secs_f64()
}

/// Every maintenance task once, as the daemon runs them, and one health collection: ms each.
async fn maintenance(admin_url: &str) -> Vec<Timing> {
    let clock: SharedClock = std::sync::Arc::new(SystemClock);
    let m = PartitionManager::new(
        connector(admin_url),
        PartitionInterval::Daily,
        PartitionsConfig::default(),
        clock.clone(),
    );
    let h = HealthCollector::new(connector(admin_url), clock, Duration::from_secs(60));
    let mut out = Vec::new();
    for task in Task::ALL {
        let t = Instant::now();
        let r = m
            .run_task(task)
            .await
            .unwrap_or_else(|e| panic!("{task}: {e}"))
            .unwrap_or_else(|| panic!("{task}: maintenance lock held"));
        assert!(r.failed.is_empty(), "{task}: {:?}", r.failed);
        out.push((task.to_string(), t.elapsed().as_secs_f64() * 1000.0, r.rows));
    }
    let t = Instant::now();
    h.collect_once().await.expect("health collection");
    out.push((
        "health collection".into(),
        t.elapsed().as_secs_f64() * 1000.0,
        0,
    ));
    m.close().await;
    out
}

/// The loadgen runs in this process: one socket per gateway. Raises the soft open-files limit
/// to the hard one, as `dbx loadgen` does, and says when that is not enough.
fn raise_open_files(wanted: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    if lim.rlim_cur < wanted {
        println!("  warning: open-files limit {} is below the {wanted} the largest fleet needs (ulimit -Hn)", lim.rlim_cur);
    }
}

/// Fleet mode: see the module docs.
pub async fn fleet_mode(
    cluster_su_url: &str,
    report: &SetupReport,
    key: &str,
    org: Uuid,
    dir: &Path,
    server_version: &str,
) {
    let per_gateway = std::env::var("DBX_BENCH_FLEET_RATE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(10.0);
    let secs = env_usize("DBX_BENCH_FLEET_SECS", 30) as f64;
    let history = env_usize("DBX_BENCH_FLEET_HISTORY", 20_000_000);
    let gateways: Vec<usize> = std::env::var("DBX_BENCH_FLEET_GATEWAYS")
        .unwrap_or_else(|_| "2000,10000".into())
        .split(',')
        .filter_map(|g| g.trim().parse().ok())
        .collect();
    let most = gateways.iter().copied().max().unwrap_or(0).max(16);
    raise_open_files(most as u64 + 256);
    let su = connect(cluster_su_url).await;
    // The fleet: one registered aircraft per gateway.
    let registrations: Vec<String> = (1..=most).map(|i| format!("F{i:05}")).collect();
    su.execute(
        "INSERT INTO dbx_aviation.aircraft_registry (org_id, registration_number, aircraft_type)
         SELECT $1, r, 'quadcopter' FROM unnest($2::text[]) r
         ON CONFLICT (org_id, registration_number) DO NOTHING",
        &[&org, &registrations],
    )
    .await
    .expect("register the fleet");
    let aircraft: Vec<Uuid> = su
        .query(
            "SELECT aircraft_id FROM dbx_aviation.aircraft_registry
              WHERE org_id = $1 AND registration_number = ANY($2) ORDER BY registration_number",
            &[&org, &registrations],
        )
        .await
        .expect("fleet ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let ingest_url = report
        .url_of("dbx_ingest_service")
        .expect("ingest url")
        .to_string();
    let admin_url = report
        .url_of("dbx_maintenance_service")
        .unwrap_or(&ingest_url)
        .to_string();
    let ctx = Ctx {
        dir,
        ingest_url,
        admin_url: admin_url.clone(),
        key: key.to_string(),
        su,
        registrations,
        secs,
    };
    let load_before = loadavg();
    println!(
        "dbx throughput harness, fleet mode: {secs} s per run, {per_gateway} points/s per fleet gateway, \
         {history} rows of history; PostgreSQL {server_version}, {}; load average {load_before}",
        machine()
    );
    let shapes = shapes(&gateways, per_gateway);
    let mut runs = Vec::new();
    let empty_maint = maintenance(&admin_url).await;
    let empty_runs = env_usize("DBX_BENCH_FLEET_EMPTY", 1) == 1;
    for (i, shape) in shapes.iter().enumerate().filter(|_| empty_runs) {
        ctx.su
            .batch_execute(
                "TRUNCATE dbx_aviation.flight_telemetry, dbx_aviation.flight_sessions CASCADE; CHECKPOINT",
            )
            .await
            .expect("truncate");
        runs.push(run_shape(&ctx, shape, "empty", 100 + i as u64).await);
    }
    ctx.su
        .batch_execute(
            "TRUNCATE dbx_aviation.flight_telemetry, dbx_aviation.flight_sessions CASCADE; CHECKPOINT",
        )
        .await
        .expect("truncate");
    let fill_secs = prefill(cluster_su_url, org, &aircraft, history, dir).await;
    let total: i64 = ctx
        .su
        .query_one("SELECT count(*) FROM dbx_aviation.flight_telemetry", &[])
        .await
        .expect("count")
        .get(0);
    println!("  history  {total} rows written in {fill_secs:.0} s");
    let filled_maint = maintenance(&admin_url).await;
    for (i, shape) in shapes.iter().enumerate() {
        runs.push(run_shape(&ctx, shape, "history", 200 + i as u64).await);
    }
    let filled_again = maintenance(&admin_url).await;
    let load_after = loadavg();
    let section = results(
        &runs,
        (&empty_maint, &filled_maint, &filled_again),
        (total, fill_secs),
        (secs, per_gateway),
        server_version,
        (&load_before, &load_after),
    );
    let out = super::write_results(None, Some(("Fleet-shaped load", section)));
    println!("  written to {}", out.display());
}

/// The RESULTS.md section.
fn results(
    runs: &[Run],
    (empty, filled, again): (&[Timing], &[Timing], &[Timing]),
    (total, fill_secs): (i64, f64),
    (secs, per_gateway): (f64, f64),
    server_version: &str,
    (load_before, load_after): (&str, &str),
) -> String {
    let rows: String = runs
        .iter()
        .map(|r| {
            format!(
                "| {} | {} | {} | {:.0} | {} | {:.1} / {:.1} / {:.1} / {:.1} | {:.0} | {:.2} | {:.2} |\n",
                r.shape,
                r.table,
                r.offered.map_or("unpaced".into(), |o| format!("{o:.0}")),
                r.rate,
                r.acked,
                r.p50,
                r.p90,
                r.p99,
                r.max,
                r.rss_mib,
                r.daemon_us,
                r.pg_us
            )
        })
        .collect();
    let maint: String = empty
        .iter()
        .zip(filled)
        .zip(again)
        .map(|(((name, e, er), (_, f, fr)), (_, a, ar))| {
            format!("| {name} | {e:.1} ({er}) | {f:.1} ({fr}) | {a:.1} ({ar}) |\n")
        })
        .collect();
    format!(
        "Produced by `DBX_BENCH_FLEET=1 cargo bench -p dbx --bench throughput` on {date}: each \
         shape through a fresh `dbx serve` (bench profile, default settings but \
         `listener.max_pending_per_ip` raised to 4096 since every gateway connects from \
         127.0.0.1) for {secs} s, the loadgen in the harness process on the same machine; \
         fleet gateways at {per_gateway} points/s each, one batch per second, started spread \
         over that second. \"empty\": a truncated table; \"history\": {total} rows over \
         {HISTORY_DAYS} daily partitions (position, altitude, speed, heading, battery, GPS fix \
         per point; no arrays) and one completed session per aircraft and day, written by the \
         harness with binary COPY in {fill_secs:.0} s. Every point acked and \
         counted in the table once. Ack latency is batch written → its ack, at the gateway. RSS \
         is the daemon's peak (VmHWM); CPU per point is user + system time per point acked, of \
         the daemon and of the PostgreSQL backends of the ingest user.\n\n\
         - Machine: {machine}, PostgreSQL {server_version} (fsync and synchronous_commit on), \
           shared with other work: load average {load_before} before, {load_after} after.\n\n\
         | shape | table | offered points/s | acked points/s | points | ack p50 / p90 / p99 / max, ms | daemon RSS MiB | daemon CPU µs/point | PostgreSQL CPU µs/point |\n\
         |---|---|---:|---:|---:|---|---:|---:|---:|\n{rows}\n\
         Maintenance, each task once as the daemon runs it (`PartitionManager::run_task`, \
         maintenance user) and one health collection, on the empty table, on the filled one \
         right after the history was written (the refresh's first run computes the eight new \
         days once), and again after the runs (open days only, today's now holding the runs' \
         points). In brackets the rows the task's report counted (for the refresh: days \
         recomputed):\n\n\
         | task | empty, ms | history, first run, ms | history, again, ms |\n\
         |---|---:|---:|---:|\n{maint}",
        date = chrono::Utc::now().format("%Y-%m-%d"),
        machine = machine(),
    )
}
