//! A flight session's row is updated twice per flush (the claim, then the statistics). Both
//! updates must be HOT (the new version on the same page, no index touched; migration 0047):
//! at fleet width a non-HOT statistics update inserted into every index of
//! `flight_sessions`, GiST included, and cost more than the flush's COPY.

mod common;

use common::*;
use std::time::{Duration, Instant};

use dbx_core::BatchOutcome;
use uuid::Uuid;

/// (updates, HOT updates) of flight_sessions once the counters include `at_least` updates.
async fn update_counters(c: &tokio_postgres::Client, at_least: i64) -> (i64, i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        c.batch_execute("SELECT pg_stat_clear_snapshot()")
            .await
            .unwrap();
        let r = c
            .query_one(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables \
                 WHERE relid = 'dbx_aviation.flight_sessions'::regclass",
                &[],
            )
            .await
            .unwrap();
        let got: (i64, i64) = (r.get(0), r.get(1));
        if got.0 >= at_least || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_flush_session_updates_are_hot_and_arrival_location_waits_for_completion() {
    let fx = fixture().await;
    let c = fx.client().await;
    let postgis: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attname = 'arrival_location' \
             AND attrelid = 'dbx_aviation.flight_sessions'::regclass AND NOT attisdropped)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let (tx, handle) = start(config(), fx.pool(2));
    let s = Uuid::new_v4();
    let t0 = now_micros() - 600_000_000;
    // One batch per flush: each is acknowledged before the next is sent.
    let flushes = 30;
    for i in 0..flushes {
        let (b, rx) = batch(fx.a, s, pts(t0, i * 5..i * 5 + 5));
        tx.send(b).await.unwrap();
        assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    }
    if postgis {
        let active: bool = c
            .query_one(
                "SELECT arrival_location IS NULL AND arrival_latitude IS NOT NULL \
                 FROM dbx_aviation.flight_sessions WHERE session_id = $1",
                &[&s],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            active,
            "an active flight has arrival coordinates, no arrival_location"
        );
    }
    // The writers' backends report their counters when they exit: stop the batcher.
    drop(tx);
    handle.join().await.unwrap();
    // The first flush inserts the row; every later one claims it (an update) and every
    // flush writes its statistics (an update).
    let expected = 2 * flushes - 1;
    let (updates, hot) = update_counters(&c, expected).await;
    assert_eq!(updates, expected, "flight_sessions updates");
    assert!(
        hot * 10 >= updates * 9,
        "{hot} of {updates} session updates were HOT: an indexed column changes per flush"
    );

    if postgis {
        // Completing the flight fills in its arrival location.
        c.execute(
            "UPDATE dbx_aviation.flight_sessions SET flight_status = 'completed' WHERE session_id = $1",
            &[&s],
        )
        .await
        .unwrap();
        let row = c
            .query_one(
                "SELECT ST_Y(arrival_location::geometry), arrival_latitude \
                 FROM dbx_aviation.flight_sessions WHERE session_id = $1",
                &[&s],
            )
            .await
            .unwrap();
        let (located, latitude): (f64, f64) = (row.get(0), row.get(1));
        assert_eq!(located, latitude);
    }
}
