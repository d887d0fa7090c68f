//! Flight sessions end (protocol 1.1) against a real daemon: by the gateway's `end`,
//! and by the control plane's idle timeout with the clock under the test's control.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use chrono::{DateTime, TimeDelta, Utc};
use dbx_control::sessions::{Pass, SessionCompleter, SessionsConfig};
use dbx_core::{Clock, ManualClock, RejectCode, SharedClock};
use dbx_proto::{AircraftRef, EncodeOptions, PointForm, ServerMessage};
use dbx_testkit::gateway::{now_micros, points};
use dbx_testkit::{wait_until, TestGateway};
use uuid::Uuid;

use crate::Env;

/// What the daemon keeps of a session: status, how it was completed, points, arrival
/// (µs), duration (s).
#[derive(Debug, Clone, PartialEq)]
struct Row {
    status: String,
    reason: Option<String>,
    points: i64,
    arrival: Option<i64>,
    duration: Option<i32>,
    completed_at: Option<DateTime<Utc>>,
}

async fn row(env: &dbx_testkit::Env, s: Uuid) -> Row {
    let r = env
        .client
        .query_one(
            "SELECT flight_status::text, completion_reason::text, point_count, \
                    (extract(epoch FROM actual_arrival) * 1e6)::int8, flight_duration_seconds, completed_at \
               FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&s],
        )
        .await
        .unwrap();
    Row {
        status: r.get(0),
        reason: r.get(1),
        points: r.get(2),
        arrival: r.get(3),
        duration: r.get(4),
        completed_at: r.get(5),
    }
}

fn nack_code(m: &Option<ServerMessage>) -> Option<(u64, RejectCode)> {
    match m {
        Some(ServerMessage::Nack { seq, code, .. }) => Some((*seq, *code)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_completes_the_session_in_seq_order_and_is_idempotent() {
    let env = Env::start(&[]).await;
    let (mut g, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    let s = Uuid::new_v4();
    let aircraft = AircraftRef::Registration(env.registration.clone());
    let t0 = now_micros() - 120_000_000;
    // 20 batches, the end and a batch after it, all pipelined: the end must be written
    // after the 20 and before the last one, whatever the writers' timing.
    for seq in 1..=20u64 {
        let first = (seq as i64 - 1) * 50;
        g.send_batch(
            seq,
            &aircraft,
            s,
            &points(50, first, t0 + first * 100_000),
            PointForm::Map,
        )
        .await;
    }
    g.send_end(21, s).await;
    g.send_batch(
        22,
        &aircraft,
        s,
        &points(5, 1000, t0 + 100_000_000),
        PointForm::Map,
    )
    .await;
    let (acked, nacks) = g.await_verdicts(22).await;
    assert_eq!(acked, 21, "{nacks:?}");
    assert_eq!(nacks.len(), 1);
    assert_eq!(
        nack_code(&nacks.first().cloned()),
        Some((22, RejectCode::SessionClosed))
    );
    let ended = row(&env, s).await;
    // The last point of the 20 batches: seq 999, 0.1 s apart from t0.
    let arrival = t0 + 999 * 100_000;
    assert_eq!(
        (
            ended.status.as_str(),
            ended.reason.as_deref(),
            ended.points,
            ended.arrival,
            ended.duration
        ),
        ("completed", Some("end"), 1000, Some(arrival), Some(100))
    );
    assert!(ended.completed_at.is_some());
    assert_eq!(env.rows(s).await, 1000);

    // The end again: acked, nothing changes.
    g.send_end(23, s).await;
    assert_eq!(g.recv().await, Some(ServerMessage::Ack { seq: 23 }));
    assert_eq!(row(&env, s).await, ended);

    // A gateway that lost its connection resends batches acked before the end: they are
    // duplicates, so they are acknowledged again, and nothing is written.
    let (mut again, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    again
        .send_batch(
            1,
            &aircraft,
            s,
            &points(50, 950, t0 + 950 * 100_000),
            PointForm::Map,
        )
        .await;
    again.send_end(2, s).await;
    assert_eq!(again.await_verdicts(2).await, (2, vec![]));
    assert_eq!(row(&env, s).await, ended);

    // A `seq` must still increase across batches and ends.
    again.send_end(2, s).await;
    match again.recv().await {
        Some(ServerMessage::Error { code, msg }) => {
            assert_eq!(code, RejectCode::Protocol);
            assert_eq!(
                msg,
                "seq 2 is not greater than the previous seq 2 on this connection"
            );
        }
        other => panic!("{other:?}"),
    }

    // UDP for the completed session is dropped and counted.
    let udp = env.daemon.udp.expect("udp enabled");
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut b = BytesMut::new();
    dbx_proto::encode_datagram(
        &mut b,
        &env.org.key,
        None,
        &aircraft,
        s,
        &points(3, 2000, now_micros()),
        EncodeOptions::default(),
    )
    .unwrap();
    sock.send_to(&b, udp).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            env.metric("dbx_udp_dropped_total", "reason=\"session_closed\"")
                .await
                >= 1.0
        })
        .await
    );
    assert_eq!(env.rows(s).await, 1000);
    assert_eq!(
        env.metric("dbx_sessions_completed_total", "reason=\"end\"")
            .await,
        1.0
    );
    assert_eq!(
        env.metric("dbx_batches_rejected_total", "reason=\"session_closed\"")
            .await,
        2.0
    );
}

/// An `end` waits for its own session's earlier batches only: while a flush of that
/// session is held up (its `flight_sessions` row locked by the test), the end stays
/// parked, and the batches of another session sent after it on the same connection
/// are written all the same. A whole-connection barrier would hold them back too (it
/// did, and cost about 17 % of the throughput of gateways that end flights).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_holds_back_only_its_own_session() {
    let env = Env::start(&[]).await;
    let (mut g, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    let aircraft = AircraftRef::Registration(env.registration.clone());
    let (ending, other) = (Uuid::new_v4(), Uuid::new_v4());
    let now = now_micros();
    g.send_batch(1, &aircraft, ending, &points(10, 0, now), PointForm::Map)
        .await;
    assert_eq!(g.await_verdicts(1).await, (1, vec![]));

    // Hold up every write of the ending session: its row stays locked until COMMIT.
    let locker = env.db.client().await;
    locker
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM dbx_aviation.flight_sessions WHERE session_id = '{ending}' FOR UPDATE"
        ))
        .await
        .unwrap();
    g.send_batch(
        2,
        &aircraft,
        ending,
        &points(10, 10, now + 1_000_000),
        PointForm::Map,
    )
    .await;
    g.send_end(3, ending).await;
    // The other session's points a day earlier: another partition, so another flush
    // (on the second writer) than the held-up one.
    let day_before = now - 86_400_000_000;
    for seq in 4..=6u64 {
        let first = (seq as i64 - 4) * 20;
        g.send_batch(
            seq,
            &aircraft,
            other,
            &points(20, first, day_before + first * 100_000),
            PointForm::Map,
        )
        .await;
    }
    assert!(
        wait_until(Duration::from_secs(20), || async {
            env.rows(other).await == 60
        })
        .await,
        "the other session's batches waited for the end: {} rows",
        env.rows(other).await
    );
    // Nothing is answered past seq 1 yet: answers come in seq order, and seq 2 is held up.
    assert!(matches!(
        g.poll(Duration::from_millis(200)).await,
        dbx_testkit::gateway::Polled::Nothing
    ));
    assert_eq!(row(&env, ending).await.status, "active");

    locker.batch_execute("COMMIT").await.unwrap();
    assert_eq!(g.await_verdicts(6).await, (6, vec![]));
    let ended = row(&env, ending).await;
    assert_eq!((ended.status.as_str(), ended.points), ("completed", 20));
    assert_eq!(row(&env, other).await.status, "active");
    assert_eq!(env.rows(other).await, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_of_an_unknown_or_another_organizations_session() {
    let env = Env::start(&[]).await;
    let other = dbx_testkit::Fixture::org(&env.client, "OTHERCO", None).await;
    dbx_testkit::Fixture::aircraft(&env.client, other.id, "N900OT").await;
    let (mut theirs, _) =
        TestGateway::hello_within(env.daemon.tcp, &other.key, Duration::from_secs(5)).await;
    let s = Uuid::new_v4();
    theirs
        .send_batch(
            1,
            &AircraftRef::Registration("N900OT".into()),
            s,
            &points(3, 0, now_micros()),
            PointForm::Map,
        )
        .await;
    assert_eq!(theirs.recv().await, Some(ServerMessage::Ack { seq: 1 }));

    let (mut g, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    g.send_end(1, s).await;
    assert_eq!(
        nack_code(&g.recv().await),
        Some((1, RejectCode::ForeignSession))
    );
    assert_eq!(row(&env, s).await.status, "active");
    // A session nobody flew: nothing to end, nothing created.
    let unknown = Uuid::new_v4();
    g.send_end(2, unknown).await;
    assert_eq!(g.recv().await, Some(ServerMessage::Ack { seq: 2 }));
    let n: i64 = env
        .client
        .query_one(
            "SELECT count(*) FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&unknown],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    // An end without a valid session is nacked; the connection stays usable.
    let mut b = BytesMut::new();
    dbx_proto::write_frame(&mut b, b"\x83\xa1t\xa3end\xa3seq\x03\xa7session\xa4nope");
    g.send_raw(&b).await;
    assert_eq!(
        nack_code(&g.recv().await),
        Some((3, RejectCode::InvalidBatch))
    );
    g.send_ping().await;
    assert_eq!(g.recv().await, Some(ServerMessage::Pong));
}

/// A login role of its own (roles are cluster-wide, tests run in parallel), with the ingest
/// role's rights, whose logins the test can switch off to play a database outage.
async fn completer_role(env: &dbx_testkit::Env) -> String {
    let name = format!("completer_{}", &Uuid::new_v4().simple().to_string()[..12]);
    env.client
        .batch_execute(&format!(
            "CREATE ROLE {name} LOGIN PASSWORD 'completer-pw' IN ROLE dbx_ingest"
        ))
        .await
        .unwrap();
    name
}

async fn set_login(env: &dbx_testkit::Env, role: &str, on: bool) {
    let login = if on { "LOGIN" } else { "NOLOGIN" };
    env.client
        .batch_execute(&format!("ALTER ROLE {role} {login}"))
        .await
        .unwrap();
    if !on {
        env.client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                &[&role],
            )
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_completed_after_the_timeout_with_the_clock_under_control() {
    let env = Env::start(&[]).await;
    let (mut g, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    let aircraft = AircraftRef::Registration(env.registration.clone());
    let (quiet, busy) = (Uuid::new_v4(), Uuid::new_v4());
    let t0 = now_micros() - 60_000_000;
    g.send_batch(1, &aircraft, quiet, &points(10, 0, t0), PointForm::Map)
        .await;
    g.send_batch(2, &aircraft, busy, &points(10, 0, t0), PointForm::Map)
        .await;
    assert_eq!(g.await_verdicts(2).await, (2, vec![]));
    let quiet_before = row(&env, quiet).await;
    // `busy` had a point stored 20 minutes after `quiet`'s last one.
    env.client
        .execute(
            "UPDATE dbx_aviation.flight_sessions SET last_point_at = last_point_at + interval '20 minutes' \
             WHERE session_id = $1",
            &[&busy],
        )
        .await
        .unwrap();

    let role = completer_role(&env).await;
    let url = env.db.url_for(&role, "completer-pw");
    let clock = ManualClock::new(Utc::now());
    let shared: SharedClock = clock.clone();
    let cfg = SessionsConfig::default();
    let completer = SessionCompleter::new(dbx_testkit::pool(&url, 1), cfg, shared);
    let thirty = TimeDelta::seconds(1800);
    let start = clock.now();

    // Just started: a whole idle timeout of reachable database must pass first.
    assert_eq!(
        completer.run_once().await.unwrap(),
        Pass::Waiting {
            until: start + thirty
        }
    );
    clock.advance(thirty - TimeDelta::seconds(1));
    assert!(matches!(
        completer.run_once().await.unwrap(),
        Pass::Waiting { .. }
    ));

    // 30 min + 1 s later: `quiet` has had no point for the timeout, `busy` has.
    clock.advance(TimeDelta::seconds(2));
    assert_eq!(
        completer.run_once().await.unwrap(),
        Pass::Completed {
            sessions: 1,
            idle_before: start + TimeDelta::seconds(1)
        }
    );
    let quiet_after = row(&env, quiet).await;
    assert_eq!(
        (quiet_after.status.as_str(), quiet_after.reason.as_deref()),
        ("completed", Some("idle_timeout"))
    );
    assert_eq!(
        (
            quiet_after.points,
            quiet_after.arrival,
            quiet_after.duration
        ),
        (
            quiet_before.points,
            quiet_before.arrival,
            quiet_before.duration
        ),
        "arrival and duration are those of the stored points, and final"
    );
    assert_eq!(row(&env, busy).await.status, "active");

    // The gateway comes back to the completed session: refused; its end changes nothing.
    g.send_batch(
        3,
        &aircraft,
        quiet,
        &points(5, 10, t0 + 1_000_000),
        PointForm::Map,
    )
    .await;
    assert_eq!(
        nack_code(&g.recv().await),
        Some((3, RejectCode::SessionClosed))
    );
    g.send_end(4, quiet).await;
    assert_eq!(g.recv().await, Some(ServerMessage::Ack { seq: 4 }));
    assert_eq!(row(&env, quiet).await, quiet_after);

    // The database becomes unreachable for the completer: a failed pass, and once it is back,
    // a new whole timeout before anything is completed, so that buffered points can land.
    set_login(&env, &role, false).await;
    clock.advance(TimeDelta::seconds(1200));
    assert!(completer.run_once().await.is_err());
    set_login(&env, &role, true).await;
    let back = clock.now();
    // The pool may still hold the connection the outage killed: a pass on it fails too.
    let mut pass = completer.run_once().await;
    for _ in 0..50 {
        if pass.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        pass = completer.run_once().await;
    }
    assert_eq!(
        pass.unwrap(),
        Pass::Waiting {
            until: back + thirty
        }
    );
    assert_eq!(row(&env, busy).await.status, "active");
    clock.advance(thirty);
    assert!(matches!(
        completer.run_once().await.unwrap(),
        Pass::Completed { sessions: 1, .. }
    ));
    assert_eq!(
        row(&env, busy).await.reason.as_deref(),
        Some("idle_timeout")
    );

    // The function's query can walk the partial index of active sessions (the planner
    // prefers a scan of a table this small, so it is told not to).
    env.client
        .batch_execute("BEGIN; SET LOCAL enable_seqscan = off")
        .await
        .unwrap();
    let plan: Vec<String> = env
        .client
        .query(
            "EXPLAIN SELECT session_id FROM dbx_aviation.flight_sessions \
             WHERE flight_status = 'active' AND last_point_at < now() ORDER BY last_point_at LIMIT 1000",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    env.client.batch_execute("COMMIT").await.unwrap();
    assert!(
        plan.iter().any(|l| l.contains("flight_sessions_active")),
        "{plan:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loadgen_ends_every_flight_it_flies() {
    let env = Env::start(&[]).await;
    let stats = Arc::new(dbx_client::loadgen::Stats::default());
    let (_stop, stop_rx) = dbx_core::ShutdownTrigger::new();
    let config = dbx_client::loadgen::LoadgenConfig {
        addr: env.daemon.tcp,
        transport: dbx_client::loadgen::Transport::Tcp,
        tls: None,
        key: env.org.key.clone(),
        aircraft: vec![env.registration.clone()],
        gateways: 1,
        aircraft_per_gateway: 2,
        batch_points: 500,
        window: 8,
        rate: None,
        duration: Duration::from_secs(120),
        warmup: Duration::ZERO,
        // Round robin over two aircraft, 7 500 points each: one landed flight of 6 000
        // (ended when it lands) and one in the air when the run is over (ended then).
        total_points: Some(15_000),
        form: PointForm::Map,
        seed: 7,
        mqtt: None,
        udp_auth: dbx_client::loadgen::UdpAuth::Mac,
    };
    let summary = dbx_client::loadgen::run(config, stats, stop_rx).await;
    assert!(summary.error.is_none(), "{summary}");
    assert_eq!(summary.points_acked, 15_000, "{summary}");
    assert_eq!(summary.sessions_ended, 4, "{summary}");
    let rows = env
        .client
        .query(
            "SELECT flight_status::text, completion_reason::text, point_count \
               FROM dbx_aviation.flight_sessions ORDER BY point_count",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, Option<String>, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let done = |n| ("completed".to_string(), Some("end".to_string()), n);
    assert_eq!(got, vec![done(1500), done(1500), done(6000), done(6000)]);
}
