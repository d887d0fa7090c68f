//! Ending flight sessions (protocol 1.1) in the batcher, against a real PostgreSQL: an
//! `end` completes the session and freezes its statistics, sending it again changes
//! nothing, and afterwards a live batch is refused `session_closed` unless every point of
//! it is already stored (a resend), while a spooled one is still written; ends of
//! unknown and foreign sessions.

mod common;

use common::*;
use std::time::Instant;

use chrono::{DateTime, Utc};
use dbx_core::{
    AckHandle, AckReceiver, BatchOrigin, BatchOutcome, Point, RejectCode, TelemetryBatch,
};
use uuid::Uuid;

/// The `end` of `session` as the listener hands it on.
fn end(t: Tenant, session: Uuid) -> (TelemetryBatch, AckReceiver) {
    let (ack, rx) = AckHandle::channel();
    let b = TelemetryBatch::session_end(t.org, session, ack, BatchOrigin::Tcp, Instant::now());
    (b, rx)
}

/// A batch of `points` from `origin`.
fn batch_from(
    t: Tenant,
    session: Uuid,
    points: Vec<Point>,
    origin: BatchOrigin,
) -> (TelemetryBatch, AckReceiver) {
    let (mut b, rx) = batch(t, session, points);
    b.origin = origin;
    (b, rx)
}

/// (status, completion_reason, completed_at set, point_count, arrival µs, duration s).
async fn session_row(
    c: &tokio_postgres::Client,
    s: Uuid,
) -> Option<(String, Option<String>, bool, i64, i64, i32)> {
    c.query_opt(
        "SELECT flight_status::text, completion_reason::text, completed_at IS NOT NULL, point_count, \
                (extract(epoch FROM actual_arrival) * 1e6)::int8, flight_duration_seconds \
           FROM dbx_aviation.flight_sessions WHERE session_id = $1",
        &[&s],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
}

/// Backends of this database waiting for a lock.
async fn lock_waiters(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE wait_event_type = 'Lock' AND datname = current_database()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// When the session was completed, and how many audit rows it has.
async fn completion_and_audits(c: &tokio_postgres::Client, s: Uuid) -> (DateTime<Utc>, i64) {
    let r = c
        .query_one(
            "SELECT completed_at, (SELECT count(*) FROM dbx_audit.audit_log WHERE record_id = $1) \
               FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&s],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_completes_the_session_and_later_batches_are_settled() {
    let fx = fixture().await;
    let (tx, handle) = start(config(), fx.pool(3));
    let c = fx.client().await;
    let s = Uuid::new_v4();
    let t0 = now_micros() - 600_000_000;
    // Seqs 0..=9 without 5: a gap, so that a later seq-5 point is "new but below the mark".
    for chunk in [pts(t0, 0..5), pts(t0, 6..10)] {
        let (b, rx) = batch(fx.a, s, chunk);
        tx.send(b).await.unwrap();
        assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    }
    let before = session_row(&c, s).await.unwrap();
    assert_eq!(&before.0, "active");
    assert_eq!((before.3, before.4, before.5), (9, t0 + 9_000_000, 9));

    let (e, rx) = end(fx.a, s);
    tx.send(e).await.unwrap();
    assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    let after = session_row(&c, s).await.unwrap();
    assert_eq!(
        after,
        (
            "completed".into(),
            Some("end".into()),
            true,
            9,
            t0 + 9_000_000,
            9
        )
    );
    let first = completion_and_audits(&c, s).await;

    // The same end again: acknowledged, nothing changes (not even the audit trail).
    let (e, rx) = end(fx.a, s);
    tx.send(e).await.unwrap();
    assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    assert_eq!(completion_and_audits(&c, s).await, first);

    // A batch with a seq above the mark: refused at once.
    let (b, rx) = batch(fx.a, s, pts(t0, 10..12));
    tx.send(b).await.unwrap();
    assert_eq!(rejection(rx).await, RejectCode::SessionClosed);
    // Below the mark but not stored (the gap): refused after looking it up.
    let (b, rx) = batch(fx.a, s, pts(t0, 4..7));
    tx.send(b).await.unwrap();
    assert_eq!(rejection(rx).await, RejectCode::SessionClosed);
    // A resend of acked points only: acknowledged, nothing written.
    let (b, rx) = batch(fx.a, s, pts(t0, 6..10));
    tx.send(b).await.unwrap();
    assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    // UDP for the completed session: refused (a datagram is dropped and counted).
    let (b, rx) = batch_from(fx.a, s, pts(t0, 20..21), BatchOrigin::Udp);
    tx.send(b).await.unwrap();
    assert_eq!(rejection(rx).await, RejectCode::SessionClosed);
    assert_eq!(session_row(&c, s).await.unwrap(), after);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = $1",
            s
        )
        .await,
        9
    );

    // A spooled batch was acked before the end reached the database: it is written.
    let (b, rx) = batch_from(fx.a, s, pts(t0, [5, 10]), BatchOrigin::Spool);
    tx.send(b).await.unwrap();
    assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    let spooled = session_row(&c, s).await.unwrap();
    assert_eq!(
        (spooled.0.as_str(), spooled.3, spooled.4, spooled.5),
        ("completed", 11, t0 + 10_000_000, 10)
    );

    drop(tx);
    let stats = handle.join().await.unwrap();
    assert_eq!(stats.sessions_ended, 1, "{stats:?}");
    assert_eq!(stats.batches_rejected, 3, "{stats:?}");
    assert_eq!(stats.points_written, 11, "{stats:?}");
    assert_eq!(stats.points_deduplicated, 4, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ends_of_unknown_and_foreign_sessions_and_several_at_once() {
    let fx = fixture().await;
    let (tx, handle) = start(config(), fx.pool(3));
    let c = fx.client().await;
    let t0 = now_micros() - 60_000_000;
    let (mine, theirs, other) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    for (t, s) in [(fx.a, mine), (fx.b, theirs), (fx.a, other)] {
        let (b, rx) = batch(t, s, pts(t0, 0..3));
        tx.send(b).await.unwrap();
        assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    }
    // Sent together: one transaction for all of them.
    let unknown = Uuid::new_v4();
    let ends: Vec<(TelemetryBatch, AckReceiver)> = vec![
        end(fx.a, mine),
        end(fx.a, theirs),
        end(fx.a, unknown),
        end(fx.a, other),
    ];
    let mut rxs = Vec::new();
    for (e, rx) in ends {
        tx.send(e).await.unwrap();
        rxs.push(rx);
    }
    let mut got = Vec::new();
    for rx in rxs {
        got.push(match outcome(rx).await {
            BatchOutcome::Durable => None,
            BatchOutcome::Rejected(r) => Some(r.code),
        });
    }
    assert_eq!(
        got,
        vec![None, Some(RejectCode::ForeignSession), None, None]
    );
    let status = |r: Option<(String, Option<String>, bool, i64, i64, i32)>| r.map(|r| r.0);
    assert_eq!(
        status(session_row(&c, mine).await).as_deref(),
        Some("completed")
    );
    assert_eq!(
        status(session_row(&c, other).await).as_deref(),
        Some("completed")
    );
    assert_eq!(
        status(session_row(&c, theirs).await).as_deref(),
        Some("active")
    );
    assert_eq!(
        session_row(&c, unknown).await,
        None,
        "an end creates no session"
    );
    // The unknown session can still be flown afterwards (there was nothing to end).
    let (b, rx) = batch(fx.a, unknown, pts(t0, 0..1));
    tx.send(b).await.unwrap();
    assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    drop(tx);
    let stats = handle.join().await.unwrap();
    assert_eq!(stats.sessions_ended, 2, "{stats:?}");
}

/// Ends run on a lane of their own, not on a writer: with the only writer held up by a
/// flush (its session's row locked by the test), the end of another session is written
/// and answered all the same; then the flush finishes as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_does_not_wait_for_a_writer() {
    let fx = fixture().await;
    let config = dbx_batcher::BatcherConfig {
        writers: 1,
        ..config()
    };
    // As the daemon sizes it: a connection per writer, and one more.
    let (tx, _handle) = start(config, fx.pool(2));
    let c = fx.client().await;
    let t0 = now_micros() - 600_000_000;
    let (busy, ending) = (Uuid::new_v4(), Uuid::new_v4());
    for s in [busy, ending] {
        let (b, rx) = batch(fx.a, s, pts(t0, 0..5));
        tx.send(b).await.unwrap();
        assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    }

    let locker = fx.client().await;
    locker
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM dbx_aviation.flight_sessions WHERE session_id = '{busy}' FOR UPDATE"
        ))
        .await
        .unwrap();
    let (b, held) = batch(fx.a, busy, pts(t0, 5..10));
    tx.send(b).await.unwrap();
    // The writer has taken the flush and waits for the lock.
    assert!(
        dbx_testkit::wait_until(std::time::Duration::from_secs(10), || async {
            lock_waiters(&c).await >= 1
        })
        .await,
        "the flush of the locked session never waited for its lock"
    );

    let (e, rx) = end(fx.a, ending);
    tx.send(e).await.unwrap();
    let answered = tokio::time::timeout(std::time::Duration::from_secs(10), outcome(rx)).await;
    assert_eq!(
        answered.ok(),
        Some(BatchOutcome::Durable),
        "the end waited for the held-up writer"
    );
    assert_eq!(
        session_row(&c, ending).await.unwrap().0,
        "completed".to_string()
    );
    assert_eq!(&session_row(&c, busy).await.unwrap().0, "active");

    locker.batch_execute("COMMIT").await.unwrap();
    assert_eq!(outcome(held).await, BatchOutcome::Durable);
    assert_eq!(session_row(&c, busy).await.unwrap().3, 10);
}

/// An end sent right behind its session's last batch rides with that batch's flush: one
/// transaction writes the points and completes the session, and both are answered by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_behind_its_last_batch_is_written_in_the_same_flush() {
    let fx = fixture().await;
    let config = dbx_batcher::BatcherConfig {
        // The group waits for its age, so the end finds the batch still in it.
        flush_when_idle: false,
        max_batch_age_ms: 300,
        ..config()
    };
    let (tx, handle) = start(config, fx.pool(3));
    let c = fx.client().await;
    let s = Uuid::new_v4();
    let t0 = now_micros() - 600_000_000;
    let (b, batch_rx) = batch(fx.a, s, pts(t0, 0..5));
    let (e, end_rx) = end(fx.a, s);
    tx.send(b).await.unwrap();
    tx.send(e).await.unwrap();
    assert_eq!(outcome(batch_rx).await, BatchOutcome::Durable);
    assert_eq!(outcome(end_rx).await, BatchOutcome::Durable);
    let row = session_row(&c, s).await.unwrap();
    assert_eq!(
        (row.0.as_str(), row.1.as_deref(), row.3),
        ("completed", Some("end"), 5)
    );
    drop(tx);
    let stats = handle.join().await.unwrap();
    assert_eq!(
        (stats.sessions_ended, stats.ends_with_flush),
        (1, 1),
        "{stats:?}"
    );
}

/// An end whose session's batch is already being written waits for that flush: it
/// takes no connection and no lock meanwhile, and is written after it, so the batch is
/// stored (not refused `session_closed`) and counted in the completed session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_waits_for_the_flush_of_its_session_in_flight() {
    let fx = fixture().await;
    let (tx, handle) = start(config(), fx.pool(3));
    let c = fx.client().await;
    let t0 = now_micros() - 600_000_000;
    let s = Uuid::new_v4();
    let (b, rx) = batch(fx.a, s, pts(t0, 0..5));
    tx.send(b).await.unwrap();
    assert_eq!(outcome(rx).await, BatchOutcome::Durable);

    let locker = fx.client().await;
    locker
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM dbx_aviation.flight_sessions WHERE session_id = '{s}' FOR UPDATE"
        ))
        .await
        .unwrap();
    let (b, held) = batch(fx.a, s, pts(t0, 5..10));
    tx.send(b).await.unwrap();
    assert!(
        dbx_testkit::wait_until(std::time::Duration::from_secs(10), || async {
            lock_waiters(&c).await >= 1
        })
        .await,
        "the flush of the locked session never waited for its lock"
    );
    let (e, mut end_rx) = end(fx.a, s);
    tx.send(e).await.unwrap();
    // Given time to run, the end stays unanswered and out of the database: only the
    // flush waits for the row.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        end_rx.try_recv().is_err(),
        "the end overtook its session's flush"
    );
    assert_eq!(lock_waiters(&c).await, 1);

    locker.batch_execute("COMMIT").await.unwrap();
    assert_eq!(outcome(held).await, BatchOutcome::Durable);
    assert_eq!(outcome(end_rx).await, BatchOutcome::Durable);
    let row = session_row(&c, s).await.unwrap();
    assert_eq!((row.0.as_str(), row.3), ("completed", 10));
    drop(tx);
    let stats = handle.join().await.unwrap();
    assert_eq!(stats.ends_with_flush, 0, "{stats:?}");
}

/// Many flights, each sent as a few batches and its end back to back, never waiting for
/// an ack (as a gateway with a window does): whatever path each end takes (with its
/// last batch's flush, after flushes in flight, or alone), no batch finds its session
/// completed, and every session is completed with all its points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ends_sent_behind_their_batches_never_overtake_them() {
    use rand::Rng;
    let fx = fixture().await;
    let config = dbx_batcher::BatcherConfig {
        // Small groups: batches are cut across flushes and several are in flight.
        max_batch_rows: 7,
        ..config()
    };
    let (tx, handle) = start(config, fx.pool(3));
    let c = fx.client().await;
    let t0 = now_micros() - 600_000_000;
    let mut rng = rand::thread_rng();
    let mut flights = Vec::new();
    let mut answers = Vec::new();
    for _ in 0..150 {
        let s = Uuid::new_v4();
        let mut next = 0i64;
        for _ in 0..rng.gen_range(1..=3) {
            let n = rng.gen_range(1..=10);
            let (b, rx) = batch(fx.a, s, pts(t0, next..next + n));
            next += n;
            tx.send(b).await.unwrap();
            answers.push(rx);
        }
        let (e, rx) = end(fx.a, s);
        tx.send(e).await.unwrap();
        answers.push(rx);
        flights.push((s, next));
    }
    for rx in answers {
        assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    }
    for (s, points) in flights {
        let row = session_row(&c, s).await.unwrap();
        assert_eq!((row.0.as_str(), row.3), ("completed", points), "{s}");
    }
    drop(tx);
    let stats = handle.join().await.unwrap();
    assert_eq!(stats.sessions_ended, 150, "{stats:?}");
    assert_eq!(stats.batches_rejected, 0, "{stats:?}");
}
