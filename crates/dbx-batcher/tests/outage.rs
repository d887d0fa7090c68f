//! The database goes away mid-stream and comes back: the batcher keeps the rows,
//! retries, and the channel fills meanwhile (backpressure). Afterwards every acked
//! point is stored exactly once. In its own test binary because it stops the
//! process-wide test cluster.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use dbx_batcher::BatcherConfig;
use dbx_core::{BatchOutcome, Point};
use dbx_testkit::TestDb;
use tokio::sync::mpsc::error::TrySendError;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_backpressure_then_exactly_once() {
    let fx = fixture().await;
    let cfg = BatcherConfig {
        max_batch_rows: 200,
        max_batch_age_ms: 10,
        queue_capacity: 8,
        writers: 2,
        retry_initial_ms: 50,
        retry_max_ms: 300,
        shutdown_deadline_ms: 120_000,
        ..BatcherConfig::default()
    };
    let (tx, handle) = start(cfg, fx.pool(3));
    let sessions: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let t0 = now_micros();

    // The producer: 400 batches of 20 points round-robin over the sessions. It records
    // whether it ever met a full channel, then waits for room like the listener does.
    let producer = {
        let tx = tx.clone();
        let sessions = sessions.clone();
        let a = fx.a;
        tokio::spawn(async move {
            let mut acks = Vec::new();
            let mut full_seen = 0u32;
            for b in 0..400i64 {
                let s = sessions[(b % 4) as usize];
                let base = (b / 4) * 20;
                let pts: Vec<Point> = (0..20)
                    .map(|k| Point {
                        lat: Some(45.0 + (base + k) as f64 * 1e-4),
                        lon: Some(7.0),
                        ..Point::new(t0 + (base + k) * 1000, base + k)
                    })
                    .collect();
                let (batch, rx) = batch(a, s, pts);
                let batch = match tx.try_send(batch) {
                    Ok(()) => None,
                    Err(TrySendError::Full(batch)) => {
                        full_seen += 1;
                        Some(batch)
                    }
                    Err(TrySendError::Closed(_)) => panic!("batcher gone"),
                };
                if let Some(batch) = batch {
                    tx.send(batch).await.expect("batcher alive");
                }
                acks.push((s, base, rx));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (acks, full_seen)
        })
    };
    drop(tx);

    // Let some batches commit, then pull the plug for a while.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let written_before = handle.stats().points_written;
    tokio::task::spawn_blocking(|| TestDb::cluster().stop())
        .await
        .unwrap()
        .expect("stopping the cluster");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = handle.stats();
    tokio::task::spawn_blocking(|| TestDb::cluster().start())
        .await
        .unwrap()
        .expect("starting the cluster");

    let (acks, full_seen) = producer.await.unwrap();
    let stats = handle
        .join()
        .await
        .expect("batcher finished within its deadline");
    assert!(written_before > 0, "nothing was written before the outage");
    assert!(during.retries > 0, "no retry during the outage: {during:?}");
    assert!(full_seen > 0, "the producer never met a full channel");

    let mut acked: HashSet<(Uuid, i64)> = HashSet::new();
    for (s, base, rx) in acks {
        assert_eq!(outcome(rx).await, BatchOutcome::Durable);
        for k in 0..20 {
            acked.insert((s, base + k));
        }
    }
    assert_eq!(acked.len(), 8000);
    assert_eq!(stats.batches_acked, 400);

    let c = fx.client().await;
    let rows = c
        .query(
            "SELECT session_id, seq, count(*) FROM dbx_aviation.flight_telemetry GROUP BY 1, 2",
            &[],
        )
        .await
        .unwrap();
    let mut stored = HashSet::new();
    for r in &rows {
        assert_eq!(r.get::<_, i64>(2), 1, "a point stored twice");
        stored.insert((r.get::<_, Uuid>(0), r.get::<_, i64>(1)));
    }
    assert_eq!(stored, acked);
    for s in &sessions {
        let r = c
            .query_one(
                "SELECT point_count, last_seq FROM dbx_aviation.flight_sessions WHERE session_id = $1",
                &[s],
            )
            .await
            .unwrap();
        assert_eq!(
            (r.get::<_, i64>(0), r.get::<_, Option<i64>>(1)),
            (2000, Some(1999))
        );
    }
}
