//! The batcher against a real PostgreSQL with the project's migrations: rows and
//! columns, flush policy, exactly-once, partitions, data errors, foreign sessions and
//! session statistics.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::*;
use dbx_batcher::sessions::haversine_km;
use dbx_batcher::BatcherConfig;
use dbx_core::{BatchOutcome, Point, RejectCode};
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const DAY: i64 = 86_400_000_000;

fn json_eq(a: &Option<String>, b: &Option<String>) -> bool {
    let parse = |s: &Option<String>| {
        s.as_deref()
            .map(|t| serde_json::from_str::<serde_json::Value>(t).expect("valid json"))
    };
    parse(a) == parse(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_land_in_partitions_with_every_column_intact() {
    let fx = fixture().await;
    let (tx, handle) = start(config(), fx.pool(3));
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    // Today and tomorrow (UTC) both have a child partition after the migrations. Each batch
    // straddles midnight, so its pieces go to two groups and it is acked once both commit.
    let midnight = (now_micros() / DAY + 1) * DAY;
    let sessions: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let mut sent: HashMap<Uuid, Vec<Point>> = HashMap::new();
    let mut acks = Vec::new();
    for (i, s) in sessions.iter().enumerate() {
        let tenant = if i == 2 { fx.b } else { fx.a };
        for b in 0..10 {
            let points: Vec<Point> = (0..100)
                .map(|k| {
                    let seq = b * 100 + k;
                    random_point(&mut rng, midnight - 50 * 1_000_000 + seq * 100_000 + 7, seq)
                })
                .collect();
            sent.entry(*s).or_default().extend(points.iter().cloned());
            let (batch, rx) = batch(tenant, *s, points);
            tx.send(batch).await.expect("batcher alive");
            acks.push(rx);
        }
    }
    for rx in acks {
        assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    }
    drop(tx);
    let stats = handle.join().await.expect("clean exit");
    assert_eq!(stats.points_written, 3000);
    assert_eq!(stats.batches_acked, 30);
    assert_eq!(stats.points_deduplicated, 0);
    assert_eq!(stats.rows_default_partition, 0);

    let c = fx.client().await;
    for (i, s) in sessions.iter().enumerate() {
        let tenant = if i == 2 { fx.b } else { fx.a };
        let got = read_points(&c, *s).await;
        let want = &sent[s];
        assert_eq!(got.len(), want.len());
        for ((rel, org, air, g), w) in got.iter().zip(want.iter()) {
            assert_eq!(rel, &day_partition(w.ts_micros), "seq {}", w.seq);
            assert_eq!((*org, *air), (tenant.org, tenant.aircraft));
            let mut g2 = g.clone();
            g2.extra = w.extra.clone();
            assert_eq!(&g2, w, "seq {}", w.seq);
            assert!(json_eq(&g.extra, &w.extra), "extra of seq {}", w.seq);
        }
        let n_before = want.iter().filter(|p| p.ts_micros < midnight).count();
        assert!(n_before > 0 && n_before < want.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_by_rows_is_exactly_max_rows() {
    let fx = fixture().await;
    let cfg = BatcherConfig {
        max_batch_rows: 100,
        max_batch_age_ms: 600_000, // only the row count can flush before shutdown
        flush_when_idle: false,    // these test the thresholds themselves
        ..config()
    };
    let (tx, handle) = start(cfg, fx.pool(3));
    let s = Uuid::new_v4();
    let t0 = now_micros();
    let mut acks = Vec::new();
    for b in 0..8 {
        let points = (0..30)
            .map(|k| Point::new(t0 + b * 30 + k, b * 30 + k))
            .collect();
        let (batch, rx) = batch(fx.a, s, points);
        tx.send(batch).await.expect("batcher alive");
        acks.push(rx);
    }
    // 240 rows: two full groups (rows 0..200) flush now; batches 0..=5 (rows 0..180) are
    // entirely in them, so they are acked while the channel is still open.
    for rx in acks.drain(..6) {
        assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    }
    let mid = handle.stats();
    assert_eq!(mid.flushes_rows, 2);
    assert_eq!(mid.largest_flush_rows, 100);
    assert_eq!(mid.flushes_age, 0);
    drop(tx);
    for rx in acks {
        assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    }
    let stats = handle.join().await.expect("clean exit");
    assert_eq!(stats.flushes_shutdown, 1);
    assert_eq!(stats.points_written, 240);
    let c = fx.client().await;
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = $1",
            s
        )
        .await,
        240
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_by_age_and_by_bytes() {
    let fx = fixture().await;
    // Age: one small batch, the channel stays open, nothing else can flush it.
    let cfg = BatcherConfig {
        max_batch_rows: 10_000,
        max_batch_age_ms: 30,
        flush_when_idle: false, // these test the thresholds themselves
        ..config()
    };
    let (tx, handle) = start(cfg, fx.pool(2));
    let s = Uuid::new_v4();
    let t0 = now_micros();
    let (b1, rx) = batch(fx.a, s, vec![Point::new(t0, 1)]);
    tx.send(b1).await.expect("batcher alive");
    assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    assert_eq!(handle.stats().flushes_age, 1);
    drop(tx);
    handle.join().await.expect("clean exit");

    // Bytes: ~260 bytes a point, 10 000 bytes a group: the second batch of 30 overflows it.
    let cfg = BatcherConfig {
        max_batch_rows: 10_000,
        max_batch_bytes: 10_000,
        max_batch_age_ms: 600_000,
        flush_when_idle: false,
        ..config()
    };
    let (tx, handle) = start(cfg, fx.pool(2));
    let s = Uuid::new_v4();
    let mut acks = Vec::new();
    for b in 0..2 {
        let points = (0..30)
            .map(|k| Point::new(t0 + b * 30 + k, b * 30 + k))
            .collect();
        let (batch, rx) = batch(fx.a, s, points);
        tx.send(batch).await.expect("batcher alive");
        acks.push(rx);
    }
    // The first batch is flushed by size while the channel is still open.
    assert_eq!(outcome(acks.remove(0)).await, BatchOutcome::Durable);
    assert_eq!(handle.stats().flushes_bytes, 1);
    drop(tx);
    assert_eq!(outcome(acks.remove(0)).await, BatchOutcome::Durable);
    handle.join().await.expect("clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_and_repeated_points_are_stored_once_and_acked() {
    let fx = fixture().await;
    let (tx, handle) = start(config(), fx.pool(3));
    let s = Uuid::new_v4();
    let t0 = now_micros();
    let mk = |seqs: std::ops::Range<i64>| -> Vec<Point> {
        seqs.map(|q| Point {
            lat: Some(10.0 + q as f64 * 0.001),
            lon: Some(20.0),
            ..Point::new(t0 + q * 1000, q)
        })
        .collect()
    };
    let (b, rx) = batch(fx.a, s, mk(0..100));
    tx.send(b).await.unwrap();
    assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    // Exactly the same batch again (a gateway that missed the ack).
    let (b, rx) = batch(fx.a, s, mk(0..100));
    tx.send(b).await.unwrap();
    assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    // Overlapping, with a seq repeated inside the batch (the first copy wins).
    let mut pts = mk(50..150);
    let mut dup = pts[60].clone();
    dup.alt = Some(999.0);
    pts.push(dup);
    let (b, rx) = batch(fx.a, s, pts);
    tx.send(b).await.unwrap();
    assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    drop(tx);
    let stats = handle.join().await.unwrap();
    assert_eq!(stats.points_written, 150);
    assert_eq!(stats.points_deduplicated, 100 + 50 + 1);

    let c = fx.client().await;
    let got = read_points(&c, s).await;
    assert_eq!(got.len(), 150);
    let seqs: Vec<i64> = got.iter().map(|g| g.3.seq).collect();
    assert_eq!(seqs, (0..150).collect::<Vec<_>>());
    assert_eq!(got[110].3.alt, None, "the first copy of seq 110 was kept");
    let n: i64 = c
        .query_one(
            "SELECT point_count FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&s],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_seqs_are_all_stored_once() {
    let fx = fixture().await;
    let (tx, handle) = start(config(), fx.pool(3));
    let s = Uuid::new_v4();
    let t0 = now_micros();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // 0..500 shuffled, cut into batches, with 100 random resends mixed in; acked one by
    // one so that later batches meet a mark above many of their seqs.
    let mut seqs: Vec<i64> = (0..500).collect();
    for i in (1..seqs.len()).rev() {
        seqs.swap(i, rng.gen_range(0..=i));
    }
    for _ in 0..100 {
        seqs.push(rng.gen_range(0..500));
    }
    let mut offered = 0u64;
    for chunk in seqs.chunks(37) {
        let pts: Vec<Point> = chunk
            .iter()
            .map(|q| Point::new(t0 + q * 1000, *q))
            .collect();
        offered += pts.len() as u64;
        let (b, rx) = batch(fx.a, s, pts);
        tx.send(b).await.unwrap();
        assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    }
    drop(tx);
    let stats = handle.join().await.unwrap();
    assert_eq!(stats.points_written, 500);
    assert_eq!(stats.points_deduplicated, offered - 500);
    let c = fx.client().await;
    let got: BTreeSet<i64> = read_points(&c, s).await.iter().map(|g| g.3.seq).collect();
    assert_eq!(got, (0..500).collect::<BTreeSet<_>>());
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = $1",
            s
        )
        .await,
        500
    );
    let (n, last): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT point_count, last_seq FROM dbx_aviation.flight_sessions WHERE session_id = $1",
                &[&s],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((n, last), (500, 499));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_without_partition_goes_to_the_default_partition() {
    let fx = fixture().await;
    let (tx, handle) = start(config(), fx.pool(2));
    let s = Uuid::new_v4();
    let now = now_micros();
    let old = now - 40 * DAY; // no child partition that far back
    let (b, rx) = batch(
        fx.a,
        s,
        vec![
            Point::new(old, 1),
            Point::new(old + 1, 2),
            Point::new(now, 3),
        ],
    );
    tx.send(b).await.unwrap();
    assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    drop(tx);
    let stats = handle.join().await.unwrap();
    assert_eq!(stats.rows_default_partition, 2);
    let c = fx.client().await;
    let got = read_points(&c, s).await;
    let rels: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
    let today = day_partition(now);
    assert_eq!(
        rels,
        vec![
            "dbx_aviation.flight_telemetry_default",
            "dbx_aviation.flight_telemetry_default",
            today.as_str()
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_error_nacks_only_its_batch() {
    let fx = fixture().await;
    let cfg = BatcherConfig {
        max_batch_age_ms: 600_000, // all batches end up in one shutdown flush
        flush_when_idle: false,    // these test the thresholds themselves
        ..config()
    };
    let (tx, handle) = start(cfg, fx.pool(2));
    let t0 = now_micros();
    let mut acks = Vec::new();
    let sessions: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for (i, s) in sessions.iter().enumerate() {
        let mut pts: Vec<Point> = (0..10).map(|q| Point::new(t0 + q, q)).collect();
        if i == 3 {
            pts[4].extra = Some("{\"unterminated\": ".into());
        }
        let (b, rx) = batch(fx.a, *s, pts);
        tx.send(b).await.unwrap();
        acks.push(rx);
    }
    drop(tx);
    let mut outcomes = Vec::new();
    for rx in acks {
        outcomes.push(outcome(rx).await);
    }
    let stats = handle.join().await.unwrap();
    assert_eq!(stats.flushes_shutdown, 1);
    for (i, o) in outcomes.iter().enumerate() {
        if i == 3 {
            match o {
                BatchOutcome::Rejected(r) => {
                    assert_eq!(r.code, RejectCode::Rejected);
                    assert!(r.msg.contains("json"), "{}", r.msg);
                }
                other => panic!("batch 3: {other:?}"),
            }
        } else {
            assert_eq!(o, &BatchOutcome::Durable, "batch {i}");
        }
    }
    assert_eq!(stats.batches_rejected, 1);
    let c = fx.client().await;
    for (i, s) in sessions.iter().enumerate() {
        let n = count(
            &c,
            "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = $1",
            *s,
        )
        .await;
        assert_eq!(n, if i == 3 { 0 } else { 10 }, "session {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_session_is_nacked_and_not_written() {
    let fx = fixture().await;
    let (tx, handle) = start(config(), fx.pool(2));
    let s = Uuid::new_v4();
    let t0 = now_micros();
    let (b, rx) = batch(fx.a, s, vec![Point::new(t0, 1)]);
    tx.send(b).await.unwrap();
    assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    // Same session claimed by another organization's aircraft, together with a good batch.
    let other = Uuid::new_v4();
    let (b1, rx1) = batch(fx.b, s, vec![Point::new(t0 + 1, 2), Point::new(t0 + 2, 3)]);
    let (b2, rx2) = batch(fx.b, other, vec![Point::new(t0 + 1, 1)]);
    tx.send(b1).await.unwrap();
    tx.send(b2).await.unwrap();
    assert_eq!(rejection(rx1).await, RejectCode::ForeignSession);
    assert_eq!(outcome(rx2).await, BatchOutcome::Durable);
    drop(tx);
    handle.join().await.unwrap();
    let c = fx.client().await;
    let got = read_points(&c, s).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, fx.a.org);
    let r = c
        .query_one(
            "SELECT org_id, point_count FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&s],
        )
        .await
        .unwrap();
    assert_eq!((r.get::<_, Uuid>(0), r.get::<_, i64>(1)), (fx.a.org, 1));
}

/// The writer checks ownership itself, in the commit transaction, for every batch: a claim
/// naming another organization's aircraft, a retired aircraft, or an aircraft of an
/// inactive organization is nacked `unknown_aircraft` and nothing of it is written (no
/// row, no session), while a good batch in the same flush is stored; a session of another
/// organization stays `foreign_session`. An intruder first in a flush does not take the
/// owner down with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_on_aircraft_the_organization_does_not_have_are_nacked_unknown_aircraft() {
    let fx = fixture().await;
    let cfg = BatcherConfig {
        // Every batch of a round waits in one group, so each case shares a flush.
        flush_when_idle: false,
        max_batch_age_ms: 300,
        ..config()
    };
    let (tx, handle) = start(cfg, fx.pool(2));
    let c = fx.client().await;
    let t0 = now_micros();
    // Organization A claiming B's aircraft, next to A's good batch.
    let stolen = Tenant {
        org: fx.a.org,
        aircraft: fx.b.aircraft,
    };
    let (s_bad, s_good) = (Uuid::new_v4(), Uuid::new_v4());
    let (bad, bad_rx) = batch(stolen, s_bad, vec![Point::new(t0, 1)]);
    let (good, good_rx) = batch(fx.a, s_good, vec![Point::new(t0, 1)]);
    tx.send(bad).await.unwrap();
    tx.send(good).await.unwrap();
    assert_eq!(rejection(bad_rx).await, RejectCode::UnknownAircraft);
    assert_eq!(outcome(good_rx).await, BatchOutcome::Durable);
    // The intruder first, the owner second, on the owner's session.
    let (intruder, intruder_rx) = batch(stolen, s_good, vec![Point::new(t0 + 1, 2)]);
    let (owner, owner_rx) = batch(fx.a, s_good, vec![Point::new(t0 + 2, 3)]);
    tx.send(intruder).await.unwrap();
    tx.send(owner).await.unwrap();
    assert_eq!(rejection(intruder_rx).await, RejectCode::UnknownAircraft);
    assert_eq!(outcome(owner_rx).await, BatchOutcome::Durable);
    // B's own session, claimed by A with A's aircraft: foreign_session as before.
    let s_b = Uuid::new_v4();
    let (b_own, b_rx) = batch(fx.b, s_b, vec![Point::new(t0, 1)]);
    tx.send(b_own).await.unwrap();
    assert_eq!(outcome(b_rx).await, BatchOutcome::Durable);
    let (taken, taken_rx) = batch(fx.a, s_b, vec![Point::new(t0 + 1, 2)]);
    tx.send(taken).await.unwrap();
    assert_eq!(rejection(taken_rx).await, RejectCode::ForeignSession);
    // A retired aircraft, then an inactive organization: even on an existing session.
    c.execute(
        "UPDATE dbx_aviation.aircraft_registry SET is_active = false WHERE aircraft_id = $1",
        &[&fx.a.aircraft],
    )
    .await
    .unwrap();
    let (retired, retired_rx) = batch(fx.a, s_good, vec![Point::new(t0 + 3, 4)]);
    tx.send(retired).await.unwrap();
    assert_eq!(rejection(retired_rx).await, RejectCode::UnknownAircraft);
    c.execute(
        "UPDATE dbx_aviation.organizations SET is_active = false WHERE org_id = $1",
        &[&fx.b.org],
    )
    .await
    .unwrap();
    let (inactive, inactive_rx) = batch(fx.b, s_b, vec![Point::new(t0 + 3, 4)]);
    tx.send(inactive).await.unwrap();
    assert_eq!(rejection(inactive_rx).await, RejectCode::UnknownAircraft);
    drop(tx);
    handle.join().await.unwrap();

    assert!(read_points(&c, s_bad).await.is_empty());
    let sessions: i64 = c
        .query_one(
            "SELECT count(*) FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&s_bad],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sessions, 0);
    let good: Vec<i64> = read_points(&c, s_good)
        .await
        .iter()
        .map(|p| p.3.seq)
        .collect();
    assert_eq!(good, vec![1, 3]);
    let b_rows = read_points(&c, s_b).await;
    assert_eq!(b_rows.len(), 1);
    assert!(b_rows
        .iter()
        .all(|p| p.1 == fx.b.org && p.2 == fx.b.aircraft));
}

/// Two claimants of one session in the same flush, the owner second: the flush goes
/// to the database under the first claim, which is refused, and the owner's batch is
/// written again on its own instead of being refused with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_one_flush_the_sessions_owner_is_stored_whoever_came_first() {
    let fx = fixture().await;
    let cfg = BatcherConfig {
        // Both batches wait in one group for the age threshold.
        flush_when_idle: false,
        max_batch_age_ms: 500,
        ..config()
    };
    let (tx, handle) = start(cfg, fx.pool(2));
    let s = Uuid::new_v4();
    let t0 = now_micros();
    let (b, rx) = batch(fx.a, s, vec![Point::new(t0, 1)]);
    tx.send(b).await.unwrap();
    assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    let (intruder, intruder_rx) = batch(fx.b, s, vec![Point::new(t0 + 1, 2)]);
    let (owner, owner_rx) = batch(fx.a, s, vec![Point::new(t0 + 2, 3)]);
    tx.send(intruder).await.unwrap();
    tx.send(owner).await.unwrap();
    assert_eq!(rejection(intruder_rx).await, RejectCode::ForeignSession);
    assert_eq!(outcome(owner_rx).await, BatchOutcome::Durable);
    drop(tx);
    handle.join().await.unwrap();
    let c = fx.client().await;
    let got = read_points(&c, s).await;
    assert_eq!(got.iter().map(|p| p.3.seq).collect::<Vec<_>>(), vec![1, 3]);
    assert!(got.iter().all(|p| p.1 == fx.a.org));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_statistics_follow_the_path_including_a_late_point() {
    let fx = fixture().await;
    let (tx, handle) = start(config(), fx.pool(2));
    let s = Uuid::new_v4();
    let t0 = now_micros() - 3_600_000_000;
    let sec = 1_000_000;
    let p = |seq: i64, ts: i64, pos: Option<(f64, f64)>| Point {
        lat: pos.map(|x| x.0),
        lon: pos.map(|x| x.1),
        ..Point::new(ts, seq)
    };
    let c = fx.client().await;
    let send = |pts: Vec<Point>| {
        let (b, rx) = batch(fx.a, s, pts);
        let tx = tx.clone();
        async move {
            tx.send(b).await.unwrap();
            assert_eq!(outcome(rx).await, BatchOutcome::Durable);
        }
    };
    // Seq order: 1 (0,0) → 2 (0,1) → 4 (1,1.5) and an unpositioned 5 (the latest ts).
    send(vec![
        p(1, t0 + 10 * sec, Some((0.0, 0.0))),
        p(2, t0 + 20 * sec, Some((0.0, 1.0))),
    ])
    .await;
    send(vec![
        p(4, t0 + 40 * sec, Some((1.0, 1.5))),
        p(5, t0 + 50 * sec, None),
    ])
    .await;
    let d = haversine_km;
    let r = session_row(&c, s).await;
    let want = d((0.0, 0.0), (0.0, 1.0)) + d((0.0, 1.0), (1.0, 1.5));
    assert!(
        (r.get::<_, f64>(8) - want).abs() < 1e-9,
        "{} vs {want}",
        r.get::<_, f64>(8)
    );
    assert_eq!(r.get::<_, i64>(7), 4);
    assert_eq!(r.get::<_, Option<i32>>(6), Some(40));

    // Late points: seq 3 between 2 and 4, and seq 0 with the earliest ts (new departure).
    send(vec![
        p(3, t0 + 30 * sec, Some((0.5, 2.0))),
        p(0, t0, Some((-1.0, 0.0))),
    ])
    .await;
    drop(tx);
    handle.join().await.unwrap();
    let r = session_row(&c, s).await;
    let ts = |i: usize| {
        r.get::<_, chrono::DateTime<chrono::Utc>>(i)
            .timestamp_micros()
    };
    assert_eq!(ts(0), t0);
    assert_eq!(
        (r.get::<_, Option<f64>>(1), r.get::<_, Option<f64>>(2)),
        (Some(-1.0), Some(0.0))
    );
    assert_eq!(ts(3), t0 + 50 * sec);
    assert_eq!(
        (r.get::<_, Option<f64>>(4), r.get::<_, Option<f64>>(5)),
        (None, None)
    );
    assert_eq!(r.get::<_, Option<i32>>(6), Some(50));
    assert_eq!(r.get::<_, i64>(7), 6);
    let want = d((-1.0, 0.0), (0.0, 0.0))
        + d((0.0, 0.0), (0.0, 1.0))
        + d((0.0, 1.0), (0.5, 2.0))
        + d((0.5, 2.0), (1.0, 1.5));
    let got = r.get::<_, f64>(8);
    assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    assert_eq!(r.get::<_, Option<i64>>(9), Some(5));
    assert_eq!(
        (r.get::<_, Option<f64>>(10), r.get::<_, Option<f64>>(11)),
        (Some(1.0), Some(1.5))
    );
    // Statistics updates did not write the audit log: only the session's creation did.
    let audits: i64 = c
        .query_one(
            "SELECT count(*) FROM dbx_audit.audit_log WHERE table_name LIKE '%flight_sessions' AND record_id = $1",
            &[&s],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(audits, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_violation_on_the_fast_path_retries_through_staging() {
    let fx = fixture().await;
    let s = Uuid::new_v4();
    let t0 = now_micros();
    // Another writer stored seq 5 without moving the session's mark (last_seq NULL).
    let c = fx.client().await;
    c.execute(
        "INSERT INTO dbx_aviation.flight_sessions (session_id, org_id, aircraft_id) VALUES ($1, $2, $3)",
        &[&s, &fx.a.org, &fx.a.aircraft],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO dbx_aviation.flight_telemetry (org_id, aircraft_id, session_id, ts, seq) \
         VALUES ($1, $2, $3, to_timestamp($4::float8 / 1e6), 5)",
        &[&fx.a.org, &fx.a.aircraft, &s, &((t0 + 5000) as f64)],
    )
    .await
    .unwrap();
    let (tx, handle) = start(config(), fx.pool(2));
    let (b, rx) = batch(
        fx.a,
        s,
        (0..10).map(|q| Point::new(t0 + q * 1000, q)).collect(),
    );
    tx.send(b).await.unwrap();
    assert_eq!(outcome(rx).await, BatchOutcome::Durable);
    drop(tx);
    let stats = handle.join().await.unwrap();
    assert!(stats.retries >= 1);
    assert_eq!(stats.points_written, 9);
    assert_eq!(stats.points_deduplicated, 1);
    assert_eq!(
        count(
            &c,
            "SELECT count(DISTINCT seq) FROM dbx_aviation.flight_telemetry WHERE session_id = $1",
            s
        )
        .await,
        10
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = $1",
            s
        )
        .await,
        10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_batcher_loads_marks_from_the_table() {
    let fx = fixture().await;
    let s = Uuid::new_v4();
    let t0 = now_micros();
    let pts = || (0..50).map(|q| Point::new(t0 + q, q)).collect::<Vec<_>>();
    for round in 0..2 {
        // A fresh batcher each round: an empty cache, as after a restart.
        let (tx, handle) = start(config(), fx.pool(2));
        let (b, rx) = batch(fx.a, s, pts());
        tx.send(b).await.unwrap();
        assert_eq!(outcome(rx).await, BatchOutcome::Durable);
        drop(tx);
        let st = handle.join().await.unwrap();
        assert_eq!(st.points_written, if round == 0 { 50 } else { 0 });
    }
    let c = fx.client().await;
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = $1",
            s
        )
        .await,
        50
    );
}

#[tokio::test]
async fn an_invalid_config_is_refused_naming_the_key() {
    let fx = fixture().await;
    let cfg = BatcherConfig {
        max_batch_rows: 0,
        ..config()
    };
    let (_tx, handle) = start(cfg, fx.pool(1));
    let err = tokio::time::timeout(Duration::from_secs(10), handle.join())
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("max_batch_rows"), "{err}");
}

async fn session_row(c: &tokio_postgres::Client, s: Uuid) -> tokio_postgres::Row {
    c.query_one(
        "SELECT actual_departure, departure_latitude, departure_longitude, actual_arrival, \
         arrival_latitude, arrival_longitude, flight_duration_seconds, point_count, \
         total_distance_km, last_seq, last_latitude, last_longitude \
         FROM dbx_aviation.flight_sessions WHERE session_id = $1",
        &[&s],
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_privilege_error_keeps_the_rows_and_never_nacks() {
    let fx = fixture().await;
    // A member of dbx_ingest without BYPASSRLS (membership does not pass the attribute
    // on): row-level security refuses its writes with 42501, a deployment problem.
    fx.client()
        .await
        .batch_execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'batcher_test_norls') THEN \
             CREATE ROLE batcher_test_norls LOGIN NOBYPASSRLS PASSWORD 'x' IN ROLE dbx_ingest; \
             END IF; END $$",
        )
        .await
        .unwrap();
    let pool = pool_for(&fx.db.url_for("batcher_test_norls", "x"), 2);
    let cfg = BatcherConfig {
        shutdown_deadline_ms: 300,
        ..config()
    };
    let (tx, handle) = start(cfg, pool);
    let (b, mut rx) = batch(fx.a, Uuid::new_v4(), vec![Point::new(now_micros(), 1)]);
    tx.send(b).await.unwrap();
    for _ in 0..1000 {
        if handle.stats().retries > 0 {
            break;
        }
        assert!(rx.try_recv().is_err(), "resolved: {:?}", handle.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(handle.stats().retries > 0, "{:?}", handle.stats());
    drop(tx);
    match handle.join().await {
        Err(dbx_batcher::BatcherError::ShutdownDeadline { unwritten_batches }) => {
            assert_eq!(unwritten_batches, 1)
        }
        other => panic!("{other:?}"),
    }
    // Unanswered: the connection will not ack, the gateway resends later.
    assert!(rx.await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_writer_flushes_at_once_instead_of_waiting_for_age() {
    let fx = fixture().await;
    // Thresholds that would hold a batch for ten minutes: only the idle trigger can flush.
    let cfg = BatcherConfig {
        max_batch_rows: 100_000,
        max_batch_age_ms: 600_000,
        flush_when_idle: true,
        ..config()
    };
    let (tx, handle) = start(cfg, fx.pool(3));
    let s = Uuid::new_v4();
    let t0 = now_micros();
    for b in 0..5i64 {
        let (batch, rx) = batch(
            fx.a,
            s,
            (0..10)
                .map(|k| Point::new(t0 + b * 10 + k, b * 10 + k))
                .collect(),
        );
        tx.send(batch).await.expect("batcher alive");
        // Acked while the channel is open and long before any threshold.
        let verdict = tokio::time::timeout(std::time::Duration::from_secs(30), outcome(rx)).await;
        assert_eq!(
            verdict.expect("acked without a threshold"),
            BatchOutcome::Durable
        );
    }
    let stats = handle.stats();
    assert!(stats.flushes_idle >= 1, "{stats:?}");
    assert_eq!((stats.flushes_age, stats.flushes_rows), (0, 0));
    drop(tx);
    handle.join().await.expect("clean exit");
}
