//! The batcher end to end into a real PostgreSQL (a private cluster from dbx-testkit):
//! rows/s for several flush sizes, every row committed and acked.
//!
//! `cargo bench -p dbx-batcher --bench batcher_e2e`. Each iteration sends
//! `ROWS` points in batches of 500 through a fresh batcher and waits for every ack;
//! the table is truncated between iterations. Idle flushing is off so that the flush
//! size under test is the one used.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dbx_batcher::{Batcher, BatcherConfig};
use dbx_core::{AckHandle, BatchOrigin, BatchOutcome, Point, TelemetryBatch};
use dbx_testkit::{Fixture, TestDb};
use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use uuid::Uuid;

const ROWS: usize = 50_000;
const PER_BATCH: usize = 500;

struct Setup {
    pool: Pool,
    admin: tokio_postgres::Client,
    org: Uuid,
    aircraft: Uuid,
}

async fn setup() -> Setup {
    let (db, url) = TestDb::migrated().await;
    let admin = db.client().await;
    let org = Fixture::org(&admin, "BENCH", None).await;
    let aircraft = Fixture::aircraft(&admin, org.id, "N1BENCH").await;
    let pool = dbx_testkit::connector(&url).pool(8).expect("pool");
    Setup {
        pool,
        admin,
        org: org.id,
        aircraft,
    }
}

async fn run_once(s: &Setup, flush_rows: usize) -> Duration {
    s.admin
        .batch_execute(
            "TRUNCATE dbx_aviation.flight_telemetry, dbx_aviation.flight_sessions CASCADE",
        )
        .await
        .expect("truncate");
    let cfg = BatcherConfig {
        max_batch_rows: flush_rows,
        max_batch_bytes: 64 << 20,
        flush_when_idle: false,
        max_batch_age_ms: 5,
        ..BatcherConfig::default()
    };
    let (tx, rx) = mpsc::channel(cfg.queue_capacity);
    let handle = Batcher::spawn(cfg, s.pool.clone(), rx);
    let session = Uuid::new_v4();
    let t0 = chrono::Utc::now().timestamp_micros() - 3_600_000_000;
    let started = Instant::now();
    let mut acks = Vec::with_capacity(ROWS / PER_BATCH);
    for b in 0..ROWS / PER_BATCH {
        let points: Vec<Point> = (0..PER_BATCH)
            .map(|k| {
                let i = (b * PER_BATCH + k) as i64;
                Point {
                    lat: Some(47.0),
                    lon: Some(8.0 + i as f64 * 1e-6),
                    alt: Some(100.0),
                    gs: Some(12.0),
                    bp: Some(80.0),
                    rpm: Some(vec![5000.0; 4]),
                    ..Point::new(t0 + i * 1000, i)
                }
            })
            .collect();
        let (ack, rx) = AckHandle::channel();
        tx.send(TelemetryBatch {
            org_id: s.org,
            aircraft_id: s.aircraft,
            session_id: session,
            points,
            ack,
            origin: BatchOrigin::Tcp,
            received_at: Instant::now(),
            admitted_at: Instant::now(),
            queued_at: Instant::now(),
            ends_session: false,
        })
        .await
        .expect("batcher alive");
        acks.push(rx);
    }
    for rx in acks {
        assert_eq!(rx.await.expect("verdict"), BatchOutcome::Durable);
    }
    let elapsed = started.elapsed();
    drop(tx);
    handle.join().await.expect("clean exit");
    elapsed
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let s = rt.block_on(setup());
    let mut group = c.benchmark_group("batcher_into_postgres");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    for flush_rows in [500usize, 2_000, 5_000, 20_000] {
        group.bench_with_input(
            BenchmarkId::new("flush_rows", flush_rows),
            &flush_rows,
            |b, &n| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += rt.block_on(run_once(&s, n));
                    }
                    total
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
