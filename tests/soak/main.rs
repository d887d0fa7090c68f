//! Soak: N gateways at a fixed rate for M minutes through a real daemon, sampling
//! the daemon's RSS over time, then checking that every acked point is stored
//! exactly once and that nothing was lost or nacked.
//!
//! In CI it runs for 15 seconds. For the real thing:
//! `DBX_SOAK_MINUTES=10 DBX_SOAK_RATE=20000 scripts/soak` (see that script), which
//! prints RSS samples, ack latency percentiles and the loss count.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dbx::loadgen::{self, LoadgenConfig, Stats, Transport};
use dbx_core::ShutdownTrigger;
use dbx_testkit::{Env, Fixture};

fn dbx_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dbx"))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_at_a_fixed_rate_keeps_memory_flat_and_loses_nothing() {
    let minutes: f64 = std::env::var("DBX_SOAK_MINUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.25);
    let rate: f64 = std::env::var("DBX_SOAK_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000.0);
    let gateways: usize = std::env::var("DBX_SOAK_GATEWAYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let env = Env::start(dbx_bin(), &[("RUST_LOG", "warn")]).await;
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
        total_points: None,
        form: dbx_proto::PointForm::Map,
        seed: 99,
    };
    let run = tokio::spawn(loadgen::run(config, stats.clone(), stop_rx));
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
        eprintln!(
            "soak t={:>6.0}s  rss {:>6.1} MiB  acked {:>10}  ack p99 {:>6.1} ms",
            s.0, s.1, s.2, s.3
        );
        samples.push(s);
    }
    let summary = run.await.unwrap();
    eprintln!("{summary}");
    assert!(summary.error.is_none(), "{summary}");
    assert_eq!(summary.points_nacked, 0);
    assert_eq!(
        summary.points_acked, summary.points_sent,
        "every point sent was acked"
    );
    let stored: i64 = env
        .client
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
