//! Real daemons writing into the Citus cluster: through the coordinator, and (the scale-out
//! path) through a worker with synced metadata, with the control plane on the coordinator.

use std::collections::HashSet;
use std::time::Duration;

use dbx_core::Point;
use dbx_testkit::gateway::{now_micros, points, resend_until_acked};
use dbx_testkit::Daemon;
use tokio::sync::watch;
use uuid::Uuid;

use crate::{dbx_bin, rows_per_worker, undistributed_partitions, Distributed};

/// `n` batches of 100 points over `sessions`, interleaved, in the accepted past window.
fn batches(sessions: &[Uuid], n: usize) -> Vec<(Uuid, Vec<Point>)> {
    let base = now_micros() - 6 * 3600 * 1_000_000;
    (0..n)
        .map(|i| {
            let s = sessions[i % sessions.len()];
            let k = (i / sessions.len()) as i64;
            (s, points(100, k * 100, base + k * 10_000_000))
        })
        .collect()
}

/// The environment of a daemon writing through node `node`: ingest on that node, the control
/// plane (partitions, health, idle sessions) on the coordinator, where DDL and the maintenance
/// lock live.
fn daemon_env(d: &Distributed, node: usize) -> (String, Vec<(String, String)>) {
    (
        d.url(node, "dbx_ingest_service"),
        vec![
            (
                "DBX_DATABASE__ADMIN_URL".into(),
                d.url(0, "dbx_maintenance_service"),
            ),
            ("DBX_BATCHER__MAX_BATCH_AGE_MS".into(), "20".into()),
        ],
    )
}

async fn start(d: &Distributed, node: usize, extra: &[(&str, &str)]) -> Daemon {
    let (url, env) = daemon_env(d, node);
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.extend_from_slice(extra);
    Daemon::start(dbx_bin(), &url, &env).await
}

/// Sends every batch through `daemon` and waits for all acks.
async fn send_all(daemon: &Daemon, key: &str, aircraft: Uuid, b: Vec<(Uuid, Vec<Point>)>) {
    let (tx, _rx) = watch::channel(HashSet::new());
    tokio::time::timeout(
        Duration::from_secs(120),
        resend_until_acked(daemon.tcp, key.to_string(), aircraft, b, Duration::ZERO, tx),
    )
    .await
    .expect("every batch acked within 120 s");
}

/// (rows, distinct (session, seq), sum of point_count) of `sessions`.
async fn stored(d: &Distributed, sessions: &[Uuid]) -> (i64, i64, i64) {
    let r = d
        .client
        .query_one(
            "SELECT (SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = ANY($1)), \
                    (SELECT count(DISTINCT (session_id, seq)) FROM dbx_aviation.flight_telemetry \
                      WHERE session_id = ANY($1)), \
                    (SELECT COALESCE(sum(point_count), 0)::bigint FROM dbx_aviation.flight_sessions \
                      WHERE session_id = ANY($1))",
            &[&sessions.to_vec()],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_through_the_coordinator_and_through_a_worker_store_every_point_once() {
    let d = Distributed::new().await;
    let (org, aircraft) = d.org("INGEST").await;
    let via_coordinator = start(&d, 0, &[]).await;
    let via_worker = start(&d, 1, &[]).await;

    // Eight sessions spread over the shards of both workers; half through each daemon, and
    // the first daemon's batches resent through the second (a gateway failing over).
    let sessions: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();
    let (first, second) = sessions.split_at(4);
    let b1 = batches(first, 40);
    let b2 = batches(second, 40);
    let (r1, r2) = tokio::join!(
        send_all(&via_coordinator, &org.key, aircraft, b1.clone()),
        send_all(&via_worker, &org.key, aircraft, b2),
    );
    let _ = (r1, r2);
    send_all(&via_worker, &org.key, aircraft, b1).await;

    let total = 80 * 100;
    assert_eq!(stored(&d, &sessions).await, (total, total, total));
    let per_worker = rows_per_worker(&d.client).await;
    eprintln!("rows per worker: {per_worker:?}");
    assert_eq!(per_worker.len(), 2, "rows on both workers: {per_worker:?}");
    assert!(per_worker.iter().all(|(_, n)| *n > 0), "{per_worker:?}");
    assert_eq!(per_worker.iter().map(|(_, n)| n).sum::<i64>(), total);
    // The partitions the daemons' start-up premake made are distributed too.
    let local = undistributed_partitions(&d.client).await;
    assert_eq!(local, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_daemon_on_a_worker_loses_no_acked_point_and_stores_each_once() {
    let d = Distributed::new().await;
    let (org, aircraft) = d.org("CRASH").await;
    let bind = dbx_testkit::daemon::fixed_loopback_bind();
    let extra = [("DBX_LISTENER__TCP_BIND", bind.as_str())];
    let mut daemon = start(&d, 2, &extra).await;

    let sessions: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let n_batches = 200;
    let all = batches(&sessions, n_batches);
    let (acked_tx, mut acked_rx) = watch::channel(HashSet::new());
    let gw = tokio::spawn(resend_until_acked(
        daemon.tcp,
        org.key.clone(),
        aircraft,
        all.clone(),
        Duration::from_millis(2),
        acked_tx,
    ));
    let mut effective = 0;
    for k in 0..2usize {
        let target = (k + 1) * n_batches / 4;
        let _ = tokio::time::timeout(
            Duration::from_secs(60),
            acked_rx.wait_for(|a| a.len() >= target),
        )
        .await;
        if acked_rx.borrow().len() < n_batches {
            effective += 1;
        }
        daemon.signal(libc::SIGKILL);
        daemon.wait(Duration::from_secs(10)).await;
        // Everything acked before the kill is stored, once.
        let acked: HashSet<usize> = acked_rx.borrow().clone();
        for &i in &acked {
            let (session, pts) = &all[i];
            let n: i64 = d
                .client
                .query_one(
                    "SELECT count(*) FROM dbx_aviation.flight_telemetry \
                      WHERE session_id = $1 AND seq BETWEEN $2 AND $3",
                    &[session, &pts[0].seq, &pts[pts.len() - 1].seq],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, pts.len() as i64, "acked batch {i} after kill {k}");
        }
        daemon = start(&d, 2, &extra).await;
    }
    let reconnects = tokio::time::timeout(Duration::from_secs(300), gw)
        .await
        .expect("the gateway finishes")
        .unwrap();
    assert!(effective >= 1, "a kill landed mid-stream");
    assert!(
        reconnects >= effective,
        "reconnected after each kill ({reconnects})"
    );
    let total = (n_batches * 100) as i64;
    assert_eq!(stored(&d, &sessions).await, (total, total, total));
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_and_idle_timeout_complete_sessions_through_a_worker() {
    use dbx_core::RejectCode;
    use dbx_proto::{AircraftRef, PointForm, ServerMessage};
    use dbx_testkit::TestGateway;

    let d = Distributed::new().await;
    let (org, aircraft) = d.org("ENDS").await;
    let daemon = start(
        &d,
        1,
        &[
            ("DBX_SESSIONS__IDLE_TIMEOUT_SECS", "2"),
            ("DBX_SESSIONS__CHECK_INTERVAL_SECS", "1"),
        ],
    )
    .await;
    let (mut g, _) = TestGateway::hello(daemon.tcp, &org.key).await;
    let t0 = now_micros() - 120_000_000;
    // Several sessions ended together (their ends share one transaction), and one left idle.
    let ended: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let idle = Uuid::new_v4();
    let mut seq = 0u64;
    for s in ended.iter().chain([&idle]) {
        seq += 1;
        g.send_batch(
            seq,
            &AircraftRef::Id(aircraft),
            *s,
            &points(50, 0, t0),
            PointForm::Map,
        )
        .await;
    }
    for s in &ended {
        seq += 1;
        g.send_end(seq, *s).await;
    }
    // A batch after its end is refused.
    seq += 1;
    g.send_batch(
        seq,
        &AircraftRef::Id(aircraft),
        ended[0],
        &points(5, 100, t0 + 10_000_000),
        PointForm::Map,
    )
    .await;
    let (acked, nacks) = g.await_verdicts(seq).await;
    assert_eq!(acked, seq - 1, "{nacks:?}");
    assert!(
        matches!(
            nacks.as_slice(),
            [ServerMessage::Nack {
                code: RejectCode::SessionClosed,
                ..
            }]
        ),
        "{nacks:?}"
    );
    let reasons = |ids: Vec<Uuid>| {
        let c = &d.client;
        async move {
            c.query(
                "SELECT completion_reason FROM dbx_aviation.flight_sessions \
                  WHERE session_id = ANY($1) AND flight_status = 'completed'",
                &[&ids],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
        }
    };
    assert_eq!(reasons(ended.clone()).await, vec!["end"; 4]);
    // The idle one is completed by the control plane (on the coordinator) after its timeout.
    assert!(
        dbx_testkit::wait_until(Duration::from_secs(30), || async {
            reasons(vec![idle]).await == vec!["idle_timeout"]
        })
        .await,
        "the idle session was not completed:\n{}",
        daemon.log()
    );
    assert_eq!(stored(&d, &ended).await.0, 200);
}

#[test]
fn dbx_demo_citus_runs_on_three_nodes_and_shows_rows_per_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = dbx_testkit::run_cli(
        dbx_bin(),
        &[
            "demo",
            "--citus",
            "--exit",
            "--duration",
            "3",
            "--dir",
            &dir.path().display().to_string(),
        ],
        &[],
    );
    assert!(ok, "{out}");
    assert!(out.contains("▶ Citus: coordinator on 127.0.0.1:"), "{out}");
    assert!(
        out.contains("▶ dbx setup --distributed: 10 tables placed"),
        "{out}"
    );
    let table = out
        .split("per Citus worker")
        .nth(1)
        .expect("the rows-per-worker table");
    let workers: Vec<i64> = table
        .lines()
        .skip(2)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
        .collect();
    assert_eq!(workers.len(), 2, "{out}");
    assert!(workers.iter().all(|n| *n > 0), "{out}");
    assert!(out.contains("▶ dbx stopped cleanly"), "{out}");
    assert!(out.contains("▶ PostgreSQL stopped"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_points_resends_after_end_and_foreign_sessions_behave_as_on_one_node() {
    use dbx_core::RejectCode;
    use dbx_proto::{AircraftRef, PointForm, ServerMessage};
    use dbx_testkit::TestGateway;

    let d = Distributed::new().await;
    let (a, air_a) = d.org("LATEA").await;
    let (b, air_b) = d.org("LATEB").await;
    let daemon = start(&d, 2, &[]).await;
    let t0 = now_micros() - 600_000_000;
    let s = Uuid::new_v4();
    let batch = |first: i64| points(50, first, t0 + first * 100_000);
    let (mut g, _) = TestGateway::hello(daemon.tcp, &a.key).await;
    let air = AircraftRef::Id(air_a);
    // Points 100..149, then the late 0..49 (the staging path, distances recomputed), then end.
    g.send_batch(1, &air, s, &batch(100), PointForm::Map).await;
    assert_eq!(g.await_verdicts(1).await, (1, vec![]));
    g.send_batch(2, &air, s, &batch(0), PointForm::Map).await;
    g.send_end(3, s).await;
    assert_eq!(g.await_verdicts(3).await, (3, vec![]));
    let row = d
        .client
        .query_one(
            "SELECT point_count, last_seq, total_distance_km FROM dbx_aviation.flight_sessions \
              WHERE session_id = $1",
            &[&s],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (100, 149));
    // In seq order the positions are those of batch(0) then those of batch(100): each batch
    // walks 50 points 1e-5° apart in latitude and longitude, from the same start.
    let p = |k: f64| (47.0 + k * 1e-5, 8.0 + k * 1e-5);
    let walk: Vec<(f64, f64)> = (0..50).chain(0..50).map(|k| p(k as f64)).collect();
    let expected: f64 = walk
        .windows(2)
        .map(|w| dbx_batcher::sessions::haversine_km(w[0], w[1]))
        .sum();
    let dist: f64 = row.get(2);
    assert!((dist - expected).abs() < 1e-6, "{dist} vs {expected}");

    // After the end: a resend of stored points is acked, new points are session_closed.
    let (mut again, _) = TestGateway::hello(daemon.tcp, &a.key).await;
    again
        .send_batch(1, &air, s, &batch(0), PointForm::Map)
        .await;
    again
        .send_batch(2, &air, s, &batch(200), PointForm::Map)
        .await;
    let (acked, nacks) = again.await_verdicts(2).await;
    assert_eq!(acked, 1, "{nacks:?}");
    assert!(
        matches!(
            nacks.as_slice(),
            [ServerMessage::Nack {
                seq: 2,
                code: RejectCode::SessionClosed,
                ..
            }]
        ),
        "{nacks:?}"
    );

    // Another organization claiming the session: foreign_session.
    let (mut other, _) = TestGateway::hello(daemon.tcp, &b.key).await;
    other
        .send_batch(1, &AircraftRef::Id(air_b), s, &batch(300), PointForm::Map)
        .await;
    let (_, nacks) = other.await_verdicts(1).await;
    assert!(
        matches!(
            nacks.as_slice(),
            [ServerMessage::Nack {
                seq: 1,
                code: RejectCode::ForeignSession,
                ..
            }]
        ),
        "{nacks:?}"
    );
    assert_eq!(stored(&d, &[s]).await, (100, 100, 100));
}
