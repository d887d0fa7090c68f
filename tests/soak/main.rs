//! Soak: N gateways at a fixed rate for M minutes through a real daemon, sampling
//! the daemon's RSS over time, then checking that every acked point is stored
//! exactly once and that nothing was lost or nacked.
//!
//! In CI it runs for 15 seconds. For the real thing:
//! `DBX_SOAK_MINUTES=10 DBX_SOAK_RATE=20000 scripts/soak` (see that script), which
//! prints RSS samples, ack latency percentiles and the loss count. With
//! `DBX_SOAK_SPOOL=1` the daemon runs with a disk spool, and with
//! `DBX_SOAK_OUTAGE_SECS=S DBX_SOAK_OUTAGE_EVERY_SECS=E` PostgreSQL is stopped for S
//! seconds every E seconds (a test binary of its own, so stopping the cluster is safe):
//! acks keep coming from the spool, and at the end every acked point is stored once.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dbx_client::loadgen::{self, LoadgenConfig, Stats, Transport};
use dbx_core::ShutdownTrigger;
use dbx_testkit::{Env, Fixture, TestDb};

fn dbx_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dbx"))
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// Runs `f` on the test cluster off the async threads; a start that finds it
/// running is fine.
async fn cluster(f: fn(&dbx_testkit::Cluster) -> Result<(), dbx_localpg::cluster::ClusterError>) {
    tokio::task::spawn_blocking(move || {
        if let Err(e) = f(TestDb::cluster()) {
            eprintln!("soak: cluster: {e}");
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_at_a_fixed_rate_keeps_memory_flat_and_loses_nothing() {
    let minutes: f64 = env_or("DBX_SOAK_MINUTES", 0.25);
    let rate: f64 = env_or("DBX_SOAK_RATE", 5_000.0);
    let gateways: usize = env_or("DBX_SOAK_GATEWAYS", 8);
    let outage_secs: u64 = env_or("DBX_SOAK_OUTAGE_SECS", 0);
    let outage_every: u64 = env_or("DBX_SOAK_OUTAGE_EVERY_SECS", 60).max(outage_secs + 5);
    let spool = (env_or("DBX_SOAK_SPOOL", 0u8) == 1).then(|| tempfile::tempdir().unwrap());
    let spool_dir = spool.as_ref().map(|d| d.path().display().to_string());
    let mut daemon_env = vec![("RUST_LOG", "warn")];
    if let Some(dir) = &spool_dir {
        daemon_env.extend([
            ("DBX_SPOOL__DIR", dir.as_str()),
            ("DBX_SPOOL__AFTER_MS", "1000"),
        ]);
    }
    let env = Env::start(dbx_bin(), &daemon_env).await;
    let mut aircraft = Vec::new();
    for i in 0..gateways * 2 {
        let reg = format!("N{:03}SK", i);
        Fixture::aircraft(&env.client, env.org.id, &reg).await;
        aircraft.push(reg);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await; // the NOTIFY reload picks the fleet up

    let stats = Arc::new(Stats::default());
    let (_stop, stop_rx) = ShutdownTrigger::new();
    let config = LoadgenConfig {
        addr: env.daemon.tcp,
        transport: Transport::Tcp,
        tls: None,
        key: env.org.key.clone(),
        aircraft,
        gateways,
        aircraft_per_gateway: 2,
        batch_points: 250,
        window: 8,
        rate: Some(rate),
        duration: Duration::from_secs_f64(minutes * 60.0),
        warmup: Duration::ZERO,
        total_points: None,
        form: dbx_proto::PointForm::Map,
        udp_auth: dbx_client::loadgen::UdpAuth::Mac,
        seed: 99,
        mqtt: None,
    };
    let run = tokio::spawn(loadgen::run(config, stats.clone(), stop_rx));
    let (end_outages, mut ended) = tokio::sync::watch::channel(false);
    let outages = (outage_secs > 0).then(|| {
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(outage_every - outage_secs)) => {}
                    _ = ended.changed() => break,
                }
                // An outage, once begun, always ends with the cluster started.
                n += 1;
                eprintln!("soak: PostgreSQL stopped for {outage_secs} s (outage {n})");
                cluster(|c| c.stop()).await;
                tokio::time::sleep(Duration::from_secs(outage_secs)).await;
                cluster(|c| c.start()).await;
            }
        })
    });
    let pid = env.daemon.pid();
    let started = Instant::now();
    let mut samples = Vec::new();
    let every = Duration::from_secs_f64((minutes * 60.0 / 20.0).clamp(1.0, 30.0));
    while !run.is_finished() {
        tokio::time::sleep(every).await;
        let s = (
            started.elapsed().as_secs_f64(),
            rss_mib(pid),
            stats.acked.load(Ordering::Relaxed),
            stats.latency_ms(0.99),
        );
        let spooled = if spool.is_some() {
            format!(
                "  spool {:>9.0} B, oldest waiting {:>5.1} s",
                env.metric("dbx_spool_bytes", "").await,
                env.metric("dbx_spool_oldest_record_age_seconds", "").await
            )
        } else {
            String::new()
        };
        eprintln!(
            "soak t={:>6.0}s  rss {:>6.1} MiB  acked {:>10}  ack p99 {:>6.1} ms{spooled}",
            s.0, s.1, s.2, s.3
        );
        samples.push(s);
    }
    let summary = run.await.unwrap();
    if let Some(outages) = outages {
        let _ = end_outages.send(true);
        outages.await.unwrap();
    }
    if spool.is_some() {
        // Acked from the spool is stored once the replay is done.
        let deadline = Instant::now() + Duration::from_secs(300);
        while env.metric("dbx_spool_records", "").await > 0.0 {
            assert!(Instant::now() < deadline, "the spool did not drain");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!(
            "spool: {} batches written, {} replayed, {} corrupt, {} dead letters",
            env.metric("dbx_spool_written_records_total", "").await as u64,
            env.metric("dbx_spool_replayed_records_total", "").await as u64,
            env.metric("dbx_spool_corrupt_records_total", "").await as u64,
            env.metric("dbx_spool_rejected_records_total", "").await as u64
        );
    }
    eprintln!("{summary}");
    assert!(summary.error.is_none(), "{summary}");
    assert_eq!(summary.points_nacked, 0);
    assert_eq!(
        summary.points_acked, summary.points_sent,
        "every point sent was acked"
    );
    // A fresh connection: the test's own does not survive an outage.
    let client = dbx_testkit::connect(&env.db.url()).await;
    let stored: i64 = client
        .query_one("SELECT count(*) FROM dbx_aviation.flight_telemetry", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        stored as u64, summary.points_acked,
        "every acked point stored, exactly once"
    );
    // Memory stays flat: the second half of the run never exceeds the first half's peak by much.
    let half = samples.len() / 2;
    if half >= 2 {
        let first = samples[..half].iter().map(|s| s.1).fold(0.0, f64::max);
        let second = samples[half..].iter().map(|s| s.1).fold(0.0, f64::max);
        assert!(
            second <= first * 1.5 + 16.0,
            "RSS grew from {first:.1} to {second:.1} MiB"
        );
    }
}
