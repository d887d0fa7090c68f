//! PostgreSQL stopped under a streaming gateway, then started again: the daemon
//! pauses its socket reads (bounded memory, TCP backpressure), keeps what it
//! accepted, resumes by itself, and ends with every point stored exactly once.
//!
//! A test binary of its own: it stops the process's test cluster.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dbx_proto::{AircraftRef, EncodeOptions, PointForm, ServerMessage};
use dbx_testkit::gateway::{now_micros, points};
use dbx_testkit::{Env, TestDb, TestGateway};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

fn expected_points(batches: u64, per_batch: usize) -> f64 {
    (batches * per_batch as u64) as f64
}

fn dbx_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dbx"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_pauses_reads_and_loses_nothing() {
    let env = Env::start(
        dbx_bin(),
        &[
            ("DBX_BATCHER__RETRY_MAX_MS", "300"),
            ("DBX_BATCHER__QUEUE_CAPACITY", "16"),
            ("DBX_LISTENER__MAX_INFLIGHT_BATCHES", "16"),
        ],
    )
    .await;
    let session = Uuid::new_v4();
    let aircraft = AircraftRef::Id(env.aircraft);
    let total_batches = 400u64;
    let per_batch = 200usize;

    // The gateway writes every batch as fast as the socket takes them, on its own task,
    // and records how long each write took; a reader task collects verdicts.
    let tcp = tokio::net::TcpStream::connect(env.daemon.tcp)
        .await
        .unwrap();
    let (rd, mut wr) = tcp.into_split();
    let mut hello = BytesMut::new();
    dbx_proto::encode_hello(&mut hello, &env.org.key, Some("outage-test"));
    wr.write_all(&hello).await.unwrap();
    let reader = tokio::spawn(async move {
        let mut g = TestGateway::over(Box::new(tokio::io::join(rd, tokio::io::sink())));
        let mut acked = 0;
        let mut nacks = 0;
        while acked < total_batches {
            match g.recv_within(Duration::from_secs(120)).await {
                Some(ServerMessage::Welcome { .. }) => {}
                Some(ServerMessage::Ack { seq }) => acked = seq,
                Some(ServerMessage::Nack { .. }) => nacks += 1,
                other => panic!("unexpected {other:?} after ack {acked}"),
            }
        }
        (acked, nacks)
    });
    let writer = tokio::spawn(async move {
        let mut longest_write = Duration::ZERO;
        for seq in 1..=total_batches {
            let mut b = BytesMut::new();
            let pts = points(per_batch, (seq as i64 - 1) * per_batch as i64, now_micros());
            dbx_proto::encode_batch_with(
                &mut b,
                seq,
                &aircraft,
                session,
                &pts,
                EncodeOptions::from(PointForm::Array),
            )
            .unwrap();
            let started = Instant::now();
            wr.write_all(&b).await.unwrap();
            longest_write = longest_write.max(started.elapsed());
            if seq.is_multiple_of(20) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        (wr, longest_write)
    });

    // Let some batches land, then take the database away for a few seconds.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reloads_before = env.metric("dbx_auth_reloads_total", "").await;
    assert!(reloads_before >= 1.0, "the key cache was loaded at start");
    tokio::task::spawn_blocking(|| TestDb::cluster().stop().unwrap())
        .await
        .unwrap();
    // While it is down the daemon stops reading: what it has received stops growing
    // (bounded by the in-flight limit and the queue), and the gateway's writes block.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received_early = env.metric("dbx_points_received_total", "").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received_late = env.metric("dbx_points_received_total", "").await;
    tokio::task::spawn_blocking(|| TestDb::cluster().start().unwrap())
        .await
        .unwrap();

    let (acked, nacks) = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .expect("recovers")
        .unwrap();
    let (_wr, longest_write) = writer.await.unwrap();
    assert_eq!((acked, nacks), (total_batches, 0));
    assert_eq!(
        received_early, received_late,
        "reads stayed paused during the outage"
    );
    assert!(
        received_late < expected_points(total_batches, per_batch),
        "the daemon did not read everything while down"
    );
    assert!(
        longest_write >= Duration::from_secs(1),
        "socket writes blocked while PostgreSQL was down (longest {longest_write:?})"
    );
    // Reconnect the test's own client (its connection died with the server).
    let client = dbx_testkit::connect(&env.db.url()).await;
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT seq) FROM dbx_aviation.flight_telemetry WHERE session_id = $1",
            &[&session],
        )
        .await
        .unwrap();
    let expected = (total_batches as i64) * per_batch as i64;
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (expected, expected)
    );
    assert!(
        env.daemon.log().contains("retry") || env.daemon.log().contains("transient"),
        "retries were logged"
    );
    // The key cache's refresher lost its connection, counted it, and reloaded once back.
    assert!(env.metric("dbx_auth_refresh_failures_total", "").await >= 1.0);
    assert!(
        dbx_testkit::wait_until(Duration::from_secs(30), || async {
            env.metric("dbx_auth_reloads_total", "").await > reloads_before
        })
        .await,
        "the key cache was not reloaded after the outage:\n{}",
        env.daemon.log()
    );
}
