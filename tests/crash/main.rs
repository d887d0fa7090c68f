//! Crash safety: a real daemon killed with SIGKILL at random moments, several times,
//! under a gateway that resends whatever it has not seen acked. Every point the
//! gateway saw acked is in the table exactly once at each crash, and the full set is
//! there exactly once at the end.
//!
//! `DBX_SOAK=1` runs a longer version (more batches, more kills).

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use dbx_core::Point;
use dbx_testkit::gateway::{now_micros, points};
use dbx_testkit::{Daemon, Env};
use rand::Rng;
use tokio::sync::watch;
use uuid::Uuid;

fn dbx_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dbx"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_acked_point_and_stores_each_once() {
    let soak = std::env::var("DBX_SOAK").is_ok();
    let (n_batches, kills) = if soak { (3000, 12) } else { (300, 3) };
    let bind = dbx_testkit::daemon::fixed_loopback_bind();
    let daemon_env = [
        ("DBX_LISTENER__TCP_BIND", bind.as_str()),
        ("DBX_BATCHER__MAX_BATCH_AGE_MS", "20"),
    ];
    let mut env = Env::start(dbx_bin(), &daemon_env).await;

    // Two sessions, interleaved, 100 points a batch.
    let sessions = [Uuid::new_v4(), Uuid::new_v4()];
    // Ten seconds of flight per batch pair, all in the accepted past window.
    let base = now_micros() - 6 * 3600 * 1_000_000;
    let batches: Vec<(Uuid, Vec<Point>)> = (0..n_batches)
        .map(|i| {
            let s = sessions[i % 2];
            let k = (i / 2) as i64;
            (s, points(100, k * 100, base + k * 10_000_000))
        })
        .collect();
    let total_points = (n_batches * 100) as i64;

    let (acked_tx, mut acked_rx) = watch::channel(HashSet::new());
    let gw = tokio::spawn(dbx_testkit::gateway::resend_until_acked(
        env.daemon.tcp,
        env.org.key.clone(),
        env.aircraft,
        batches.clone(),
        Duration::from_millis(2),
        acked_tx,
    ));

    let mut rng = rand::thread_rng();
    let mut effective_kills = 0u32;
    for k in 0..kills {
        // Wait for some progress, then kill at a random moment.
        let target = (k + 1) * n_batches / (kills + 2);
        let _ = tokio::time::timeout(
            Duration::from_secs(60),
            acked_rx.wait_for(|a| a.len() >= target),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..150))).await;
        if acked_rx.borrow().len() < n_batches {
            effective_kills += 1;
        }
        env.daemon.signal(libc::SIGKILL);
        env.daemon.wait(Duration::from_secs(10)).await;
        // Everything the gateway saw acked before the kill is in the table, once.
        let acked: HashSet<usize> = acked_rx.borrow().clone();
        for &i in &acked {
            let (session, pts) = &batches[i];
            let n: i64 = env
                .client
                .query_one(
                    "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = $1 AND seq BETWEEN $2 AND $3",
                    &[session, &pts[0].seq, &pts[pts.len() - 1].seq],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, pts.len() as i64, "acked batch {i} after kill {k}");
        }
        env.daemon = Daemon::start(dbx_bin(), &env.ingest_url, &daemon_env).await;
    }

    let reconnects = tokio::time::timeout(Duration::from_secs(300), gw)
        .await
        .expect("gateway finishes")
        .unwrap();
    assert!(
        effective_kills >= 2,
        "kills landed mid-stream ({effective_kills} of {kills})"
    );
    assert!(
        reconnects >= effective_kills,
        "the gateway reconnected after each kill that found it working ({reconnects})"
    );
    let row = env
        .client
        .query_one(
            "SELECT count(*), count(DISTINCT (session_id, seq)) FROM dbx_aviation.flight_telemetry WHERE session_id = ANY($1)",
            &[&sessions.to_vec()],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (total_points, total_points)
    );
    // Session statistics agree with the rows, whatever was replayed.
    let counted: i64 = env
        .client
        .query_one("SELECT sum(point_count)::bigint FROM dbx_aviation.flight_sessions WHERE session_id = ANY($1)", &[&sessions.to_vec()])
        .await
        .unwrap()
        .get(0);
    assert_eq!(counted, total_points);
}
