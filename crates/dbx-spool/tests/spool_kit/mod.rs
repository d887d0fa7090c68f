//! What the spool's integration tests share: batches with an ack receiver, a
//! small-segment config, a stand-in batcher that commits everything, and waits on
//! the spool directory.
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use dbx_core::{AckHandle, AckReceiver, BatchOrigin, BatchOutcome, Point, TelemetryBatch};
use dbx_spool::segment;
use dbx_spool::{SpoolConfig, SpoolHandle, WhenFull};
use tokio::sync::mpsc;
use uuid::Uuid;

pub const SESSION: Uuid = Uuid::from_u128(0x5e55_1011);

pub fn batch(seq: i64, points: usize) -> (TelemetryBatch, AckReceiver) {
    let (ack, rx) = AckHandle::channel();
    let pts = (0..points as i64)
        .map(|i| {
            let mut p = Point::new(1_700_000_000_000_000 + seq * 1000 + i, seq * 1000 + i);
            p.lat = Some(47.0);
            p.extra = Some("{\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}".into());
            p
        })
        .collect();
    (
        TelemetryBatch {
            org_id: Uuid::from_u128(1),
            aircraft_id: Uuid::from_u128(2),
            session_id: SESSION,
            points: pts,
            ack,
            origin: BatchOrigin::Tcp,
            received_at: Instant::now(),
            admitted_at: Instant::now(),
            queued_at: Instant::now(),
            ends_session: false,
        },
        rx,
    )
}

pub fn config(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        dir: dir.to_string_lossy().into_owned(),
        max_bytes: 64 * 1024 * 1024,
        when_full: WhenFull::Block,
        after_ms: 200,
        segment_bytes: 8192,
        ..SpoolConfig::default()
    }
}

pub fn segments(dir: &Path) -> usize {
    segment::list(dir).unwrap().len()
}

/// Waits until no segment file is left in `dir`, failing with the spool's figures.
pub async fn wait_drained(dir: &Path, spool: &SpoolHandle, within: Duration) {
    assert!(
        dbx_testkit::wait_until(within, || async { segments(dir) == 0 }).await,
        "segments left: {:?}",
        spool.stats()
    );
}

/// Commits everything that reaches it, recording the points' seqs and origins.
pub fn commit_all(
    mut rx: mpsc::Receiver<TelemetryBatch>,
) -> tokio::task::JoinHandle<(HashSet<i64>, usize)> {
    tokio::spawn(async move {
        let mut seen = HashSet::new();
        let mut replayed = 0;
        while let Some(b) = rx.recv().await {
            if b.origin == BatchOrigin::Spool {
                replayed += 1;
            }
            seen.extend(b.points.iter().map(|p| p.seq));
            b.ack.durable();
        }
        (seen, replayed)
    })
}

/// Sends a batch of `points` points for each seq in `seqs` into `tx`; their ack receivers.
pub async fn send_batches(
    tx: &mpsc::Sender<TelemetryBatch>,
    seqs: std::ops::Range<i64>,
    points: usize,
) -> Vec<AckReceiver> {
    let mut acks = Vec::new();
    for seq in seqs {
        let (b, rx) = batch(seq, points);
        tx.send(b).await.unwrap();
        acks.push(rx);
    }
    acks
}

pub async fn outcome(rx: AckReceiver) -> Option<BatchOutcome> {
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("a verdict within 10 s")
        .ok()
}
