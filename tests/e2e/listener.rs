//! The wire protocol and listener (docs/protocol.md) against a real daemon.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dbx_core::{Point, RejectCode};
use dbx_proto::{AircraftRef, EncodeOptions, PointForm, ServerMessage, TimestampForm};
use dbx_testkit::gateway::{now_micros, points};
use dbx_testkit::{wait_until, Fixture, TestGateway};
use uuid::Uuid;

use crate::Env;

fn error_code(m: &Option<ServerMessage>) -> Option<RejectCode> {
    match m {
        Some(ServerMessage::Error { code, .. }) => Some(*code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_session_hello_batches_acks_bye_with_rows_and_session_stats() {
    let env = Env::start(&[]).await;
    let (mut g, welcome) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    match welcome {
        ServerMessage::Welcome {
            v,
            org,
            max_frame,
            max_points,
        } => {
            assert_eq!(
                (v, org, max_frame, max_points),
                (1, env.org.id, 1 << 20, 10_000)
            );
        }
        other => panic!("{other:?}"),
    }
    let session = Uuid::new_v4();
    let aircraft = AircraftRef::Registration(env.registration.clone());
    let t0 = now_micros() - 60_000_000;
    for seq in 1..=5u64 {
        let pts = points(
            100,
            (seq as i64 - 1) * 100,
            t0 + (seq as i64 - 1) * 10_000_000,
        );
        g.send_batch(seq, &aircraft, session, &pts, PointForm::Map)
            .await;
    }
    let (acked, nacks) = g.await_verdicts(5).await;
    assert_eq!((acked, nacks.len()), (5, 0));
    // Everything acked is committed: count it now, without waiting.
    assert_eq!(env.rows(session).await, 500);
    let row = env
        .client
        .query_one(
            "SELECT org_id, aircraft_id, point_count, actual_departure IS NOT NULL, total_distance_km > 0 \
             FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&session],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Uuid>(0), env.org.id);
    assert_eq!(row.get::<_, Uuid>(1), env.aircraft);
    assert_eq!(row.get::<_, i64>(2), 500);
    assert!(row.get::<_, bool>(3) && row.get::<_, bool>(4));
    g.send_ping().await;
    assert_eq!(g.recv().await, Some(ServerMessage::Pong));
    g.send_bye().await;
    assert_eq!(g.recv().await, Some(ServerMessage::Bye));
    assert!(g.closed_within(Duration::from_secs(5)).await);
    // The handshake was recorded (within the recorder's flush second), and no key reached the log.
    let n = dbx_testkit::wait_count(
        &env.client,
        "SELECT count(*) FROM dbx_aviation.api_requests WHERE org_id = $1 AND status_code = 200 \
         AND client_ip = '127.0.0.1'::inet AND user_agent LIKE 'dbx-testkit%'",
        &[&env.org.id],
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(n, 1);
    assert!(!env.daemon.log().contains(&env.org.key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_is_unauthorized_and_recorded() {
    let env = Env::start(&[]).await;
    let mut g = TestGateway::connect(env.daemon.tcp).await;
    g.send_hello("dbx_not_a_real_key").await;
    let m = g.recv().await;
    assert_eq!(error_code(&m), Some(RejectCode::Unauthorized), "{m:?}");
    assert!(g.closed_within(Duration::from_secs(5)).await);
    let n = dbx_testkit::wait_count(
        &env.client,
        "SELECT count(*) FROM dbx_aviation.api_requests WHERE status_code = 401 AND org_id IS NULL",
        &[],
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(n, 1);
    assert!(
        env.metric("dbx_auth_failures_total", "reason=\"unauthorized\"")
            .await
            >= 1.0
    );
    assert!(!env.daemon.log().contains("dbx_not_a_real_key"));
}

/// A peer retrying a wrong key costs one api_requests row per flush window, not one per try:
/// 60 refused handshakes from 127.0.0.1 within about a second are at most a few rows whose
/// `request_count`s add up to 60; accepted handshakes keep a row each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_handshakes_from_one_address_are_aggregated_accepted_ones_are_not() {
    let env = Env::start(&[]).await;
    let tries = (0..60).map(|_| async {
        let mut g = TestGateway::connect(env.daemon.tcp).await;
        g.send_hello("dbx_not_a_real_key").await;
        error_code(&g.recv().await)
    });
    let answers = futures::future::join_all(tries).await;
    assert!(answers.iter().all(|a| *a == Some(RejectCode::Unauthorized)));
    for _ in 0..3 {
        let (mut g, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
        g.send_bye().await;
    }
    let refused = "SELECT coalesce(sum(request_count), 0)::bigint FROM dbx_aviation.api_requests \
                   WHERE status_code = 401 AND client_ip = '127.0.0.1'::inet AND org_id IS NULL";
    let n = dbx_testkit::wait_count(&env.client, refused, &[], 60, Duration::from_secs(10)).await;
    assert_eq!(n, 60);
    let rows: i64 = env
        .client
        .query_one(
            "SELECT count(*) FROM dbx_aviation.api_requests WHERE status_code = 401",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!((1..=3).contains(&rows), "{rows} rows for 60 refusals");
    let accepted = "SELECT count(*) FROM dbx_aviation.api_requests \
                    WHERE status_code = 200 AND request_count = 1 AND org_id = $1";
    let n = dbx_testkit::wait_count(
        &env.client,
        accepted,
        &[&env.org.id],
        3,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(n, 3);
    assert!(env.metric("dbx_api_requests_collapsed_total", "").await >= 57.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_hello_within_the_timeout_is_an_error() {
    let env = Env::start(&[("DBX_LISTENER__HANDSHAKE_TIMEOUT_MS", "300")]).await;
    let mut g = TestGateway::connect(env.daemon.tcp).await;
    let m = g.recv().await;
    assert_eq!(error_code(&m), Some(RejectCode::HandshakeTimeout), "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_is_refused_before_its_body() {
    let env = Env::start(&[("DBX_LISTENER__MAX_FRAME_BYTES", "4096")]).await;
    let mut g = TestGateway::connect(env.daemon.tcp).await;
    // Announce 1 MB and send none of it: the answer must come anyway.
    g.send_raw(&(1_000_000u32).to_be_bytes()).await;
    let m = g.recv().await;
    assert_eq!(error_code(&m), Some(RejectCode::FrameTooLarge), "{m:?}");
    assert!(g.closed_within(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncated_frames_do_not_hurt_other_connections() {
    let env = Env::start(&[]).await;
    let (mut good, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;

    // Garbage body: a valid length around bytes that are not one MessagePack map.
    let mut bad = TestGateway::connect(env.daemon.tcp).await;
    let mut frame = 5u32.to_be_bytes().to_vec();
    frame.extend_from_slice(&[0xc1, 0xff, 0x00, 0x13, 0x37]);
    bad.send_raw(&frame).await;
    let m = bad.recv().await;
    assert_eq!(error_code(&m), Some(RejectCode::BadFrame), "{m:?}");

    // Zero length.
    let mut zero = TestGateway::connect(env.daemon.tcp).await;
    zero.send_raw(&0u32.to_be_bytes()).await;
    assert_eq!(error_code(&zero.recv().await), Some(RejectCode::BadFrame));

    // Truncated frame, then close.
    {
        let mut t = TestGateway::connect(env.daemon.tcp).await;
        let mut b = BytesMut::new();
        dbx_proto::encode_hello(&mut b, &env.org.key, None);
        t.send_raw(&b[..b.len() - 3]).await;
    }

    // The healthy connection still works.
    let session = Uuid::new_v4();
    good.send_batch(
        1,
        &AircraftRef::Id(env.aircraft),
        session,
        &points(10, 0, now_micros()),
        PointForm::Map,
    )
    .await;
    assert_eq!(good.recv().await, Some(ServerMessage::Ack { seq: 1 }));
    assert_eq!(env.rows(session).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_invalid_point_nacks_its_batch_only() {
    let env = Env::start(&[]).await;
    let (mut g, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    let session = Uuid::new_v4();
    let aircraft = AircraftRef::Registration(env.registration.clone());
    let mut bad = points(5, 0, now_micros());
    bad[3].lat = Some(91.5);
    g.send_batch(1, &aircraft, session, &bad, PointForm::Map)
        .await;
    match g.recv().await {
        Some(ServerMessage::Nack {
            seq,
            code,
            msg,
            index,
        }) => {
            assert_eq!((seq, code, index), (1, RejectCode::InvalidPoint, Some(3)));
            assert!(msg.contains("lat") && msg.contains("91.5"), "{msg}");
        }
        other => panic!("expected nack, got {other:?}"),
    }
    g.send_batch(
        2,
        &aircraft,
        session,
        &points(5, 100, now_micros()),
        PointForm::Map,
    )
    .await;
    assert_eq!(g.recv().await, Some(ServerMessage::Ack { seq: 2 }));
    let seqs: Vec<i64> = env
        .client
        .query(
            "SELECT seq FROM dbx_aviation.flight_telemetry WHERE session_id = $1 ORDER BY seq",
            &[&session],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(seqs, vec![100, 101, 102, 103, 104]);
    // Out-of-range timestamps are nacked with their own code.
    let mut late = points(2, 200, now_micros());
    late[1].ts_micros = now_micros() - 30 * 24 * 3600 * 1_000_000;
    g.send_batch(3, &aircraft, session, &late, PointForm::Map)
        .await;
    match g.recv().await {
        Some(ServerMessage::Nack { code, index, .. }) => {
            assert_eq!((code, index), (RejectCode::OutOfRange, Some(1)))
        }
        other => panic!("{other:?}"),
    }
    // A non-increasing seq is a protocol error that closes the connection.
    g.send_batch(
        3,
        &aircraft,
        session,
        &points(1, 300, now_micros()),
        PointForm::Map,
    )
    .await;
    assert_eq!(error_code(&g.recv().await), Some(RejectCode::Protocol));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_aircraft_and_foreign_session_are_nacked() {
    let env = Env::start(&[]).await;
    let other = Fixture::org(&env.client, "OTHER", None).await;
    let other_aircraft = Fixture::aircraft(&env.client, other.id, "N900OT").await;

    // The other organization opens a session.
    let (mut og, _) =
        TestGateway::hello_within(env.daemon.tcp, &other.key, Duration::from_secs(5)).await;
    let their_session = Uuid::new_v4();
    og.send_batch(
        1,
        &AircraftRef::Id(other_aircraft),
        their_session,
        &points(3, 0, now_micros()),
        PointForm::Map,
    )
    .await;
    assert_eq!(og.recv().await, Some(ServerMessage::Ack { seq: 1 }));

    let (mut g, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    // Their aircraft, by id and by registration: unknown to us.
    g.send_batch(
        1,
        &AircraftRef::Id(other_aircraft),
        Uuid::new_v4(),
        &points(1, 0, now_micros()),
        PointForm::Map,
    )
    .await;
    assert!(matches!(
        g.recv().await,
        Some(ServerMessage::Nack {
            seq: 1,
            code: RejectCode::UnknownAircraft,
            ..
        })
    ));
    g.send_batch(
        2,
        &AircraftRef::Registration("N900OT".into()),
        Uuid::new_v4(),
        &points(1, 0, now_micros()),
        PointForm::Map,
    )
    .await;
    assert!(matches!(
        g.recv().await,
        Some(ServerMessage::Nack {
            seq: 2,
            code: RejectCode::UnknownAircraft,
            ..
        })
    ));
    // Our aircraft, their session.
    g.send_batch(
        3,
        &AircraftRef::Id(env.aircraft),
        their_session,
        &points(1, 50, now_micros()),
        PointForm::Map,
    )
    .await;
    assert!(matches!(
        g.recv().await,
        Some(ServerMessage::Nack {
            seq: 3,
            code: RejectCode::ForeignSession,
            ..
        })
    ));
    assert_eq!(env.rows(their_session).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn array_form_every_timestamp_encoding_and_extra_keys_are_stored_exactly() {
    let env = Env::start(&[]).await;
    let (mut g, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    let session = Uuid::new_v4();
    let aircraft = AircraftRef::Id(env.aircraft);
    let base = (now_micros() / 1_000_000 - 600) * 1_000_000; // whole seconds, 10 minutes ago

    // Array form, integer-microsecond timestamps, uuids as binary.
    let mut pts = points(3, 0, base);
    pts[0].extra = Some(r#"{"mode":"survey"}"#.into());
    pts[1].rpm = None;
    pts[2].temp = None;
    let opts = EncodeOptions {
        form: PointForm::Array,
        timestamps: TimestampForm::Micros,
        uuid_as_bin: true,
    };
    g.send_batch_with(1, &aircraft, session, &pts, opts).await;
    assert_eq!(g.recv().await, Some(ServerMessage::Ack { seq: 1 }));

    // Hand-written map points: ts as timestamp 32, 64 and 96, plus unknown keys and `x`.
    let mut body = Vec::new();
    let w = &mut body;
    rmp::encode::write_map_len(w, 5).unwrap();
    rmp::encode::write_str(w, "t").unwrap();
    rmp::encode::write_str(w, "batch").unwrap();
    rmp::encode::write_str(w, "seq").unwrap();
    rmp::encode::write_uint(w, 2).unwrap();
    rmp::encode::write_str(w, "aircraft").unwrap();
    rmp::encode::write_str(w, &env.registration).unwrap();
    rmp::encode::write_str(w, "session").unwrap();
    rmp::encode::write_str(w, &session.to_string()).unwrap();
    rmp::encode::write_str(w, "points").unwrap();
    rmp::encode::write_array_len(w, 3).unwrap();
    let secs = base / 1_000_000;
    // ts32: whole seconds.
    rmp::encode::write_map_len(w, 3).unwrap();
    rmp::encode::write_str(w, "ts").unwrap();
    rmp::encode::write_ext_meta(w, 4, -1).unwrap();
    w.extend_from_slice(&(secs as u32).to_be_bytes());
    rmp::encode::write_str(w, "seq").unwrap();
    rmp::encode::write_uint(w, 10).unwrap();
    rmp::encode::write_str(w, "wind").unwrap(); // unknown key → extra
    rmp::encode::write_f64(w, 3.5).unwrap();
    // ts64: 30-bit nanoseconds + 34-bit seconds; 123456789 ns → 123456 µs (truncated).
    rmp::encode::write_map_len(w, 3).unwrap();
    rmp::encode::write_str(w, "ts").unwrap();
    rmp::encode::write_ext_meta(w, 8, -1).unwrap();
    let v64: u64 = (123_456_789u64 << 34) | (secs as u64 + 1);
    w.extend_from_slice(&v64.to_be_bytes());
    rmp::encode::write_str(w, "seq").unwrap();
    rmp::encode::write_uint(w, 11).unwrap();
    rmp::encode::write_str(w, "x").unwrap();
    rmp::encode::write_map_len(w, 1).unwrap();
    rmp::encode::write_str(w, "blob").unwrap();
    rmp::encode::write_bin(w, &[1, 2, 3]).unwrap();
    // ts96: 32-bit nanoseconds + 64-bit signed seconds.
    rmp::encode::write_map_len(w, 3).unwrap();
    rmp::encode::write_str(w, "ts").unwrap();
    rmp::encode::write_ext_meta(w, 12, -1).unwrap();
    w.extend_from_slice(&999_999_999u32.to_be_bytes());
    w.extend_from_slice(&(secs + 2).to_be_bytes());
    rmp::encode::write_str(w, "seq").unwrap();
    rmp::encode::write_uint(w, 12).unwrap();
    rmp::encode::write_str(w, "lat").unwrap();
    rmp::encode::write_sint(w, 45).unwrap(); // integer where a float is expected
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    g.send_raw(&frame).await;
    assert_eq!(g.recv().await, Some(ServerMessage::Ack { seq: 2 }));

    let rows = env
        .client
        .query(
            "SELECT seq, (extract(epoch FROM ts) * 1000000)::bigint, extra::text, latitude, motor_rpm, temperature_c \
             FROM dbx_aviation.flight_telemetry WHERE session_id = $1 ORDER BY seq",
            &[&session],
        )
        .await
        .unwrap();
    let get = |i: usize| {
        (
            rows[i].get::<_, i64>(0),
            rows[i].get::<_, i64>(1),
            rows[i].get::<_, Option<String>>(2),
        )
    };
    assert_eq!(rows.len(), 6);
    assert_eq!(get(0), (0, base, Some(r#"{"mode": "survey"}"#.into())));
    assert_eq!(rows[1].get::<_, Option<Vec<f32>>>(4), None);
    assert_eq!(rows[2].get::<_, Option<f32>>(5), None);
    assert_eq!(
        get(3),
        (10, secs * 1_000_000, Some(r#"{"wind": 3.5}"#.into()))
    );
    assert_eq!(
        get(4),
        (
            11,
            (secs + 1) * 1_000_000 + 123_456,
            Some(r#"{"blob": "AQID"}"#.into())
        )
    );
    assert_eq!(get(5), (12, (secs + 2) * 1_000_000 + 999_999, None));
    assert_eq!(rows[5].get::<_, Option<f64>>(3), Some(45.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_valid_datagrams_land_and_invalid_ones_are_dropped_by_reason() {
    let env = Env::start(&[]).await;
    let udp = env.daemon.udp.expect("udp enabled");
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let session = Uuid::new_v4();
    let aircraft = AircraftRef::Registration(env.registration.clone());
    for i in 0..3 {
        let mut b = BytesMut::new();
        dbx_proto::encode_datagram(
            &mut b,
            &env.org.key,
            None,
            &aircraft,
            session,
            &points(10, i * 10, now_micros()),
            EncodeOptions::default(),
        )
        .unwrap();
        sock.send_to(&b, udp).await.unwrap();
    }
    let mut b = BytesMut::new();
    dbx_proto::encode_datagram(
        &mut b,
        "dbx_wrong",
        None,
        &aircraft,
        session,
        &points(10, 100, now_micros()),
        EncodeOptions::default(),
    )
    .unwrap();
    sock.send_to(&b, udp).await.unwrap();
    sock.send_to(b"\x93\x01\x02", udp).await.unwrap();
    assert_eq!(env.wait_rows(session, 30).await, 30);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.rows(session).await, 30);
    assert!(
        env.metric("dbx_udp_dropped_total", "reason=\"unauthorized\"")
            .await
            >= 1.0
    );
    assert!(
        env.metric("dbx_udp_dropped_total", "reason=\"bad_frame\"")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_refuses_with_an_error_not_a_hang() {
    let env = Env::start(&[("DBX_LISTENER__MAX_CONNECTIONS", "2")]).await;
    let (_a, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    let (_b, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    let mut c = TestGateway::connect(env.daemon.tcp).await;
    assert_eq!(
        error_code(&c.recv().await),
        Some(RejectCode::TooManyConnections)
    );
    assert!(env.metric("dbx_connections_refused_total", "").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_organization_is_slowed_but_complete() {
    let env = Env::start_with_rate(&[], Some(2000)).await;
    let (mut g, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    let session = Uuid::new_v4();
    let aircraft = AircraftRef::Id(env.aircraft);
    for seq in 1..=6u64 {
        g.send_batch(
            seq,
            &aircraft,
            session,
            &points(1000, (seq as i64) * 1000, now_micros()),
            PointForm::Map,
        )
        .await;
    }
    let (acked, nacks) = g.await_verdicts(6).await;
    assert_eq!((acked, nacks.len()), (6, 0));
    assert_eq!(env.rows(session).await, 6000);
    // Reads were paused (6000 points at 2000/s with 1 s of burst), never dropped.
    assert!(env.metric("dbx_rate_limit_wait_seconds_count", "").await >= 1.0);
    assert!(env.metric("dbx_rate_limit_wait_seconds_sum", "").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_all_acked() {
    // All 200 come from 127.0.0.1 at once: allow that many pending handshakes from it.
    let env = Env::start(&[("DBX_LISTENER__MAX_PENDING_PER_IP", "200")]).await;
    let addr = env.daemon.tcp;
    let key = Arc::new(env.org.key.clone());
    let aircraft = env.aircraft;
    let mut tasks = Vec::new();
    let sessions: Vec<Uuid> = (0..200).map(|_| Uuid::new_v4()).collect();
    for &session in &sessions {
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let (mut g, _) = TestGateway::hello(addr, &key).await;
            for seq in 1..=3u64 {
                g.send_batch(
                    seq,
                    &AircraftRef::Id(aircraft),
                    session,
                    &points(20, seq as i64 * 20, now_micros()),
                    PointForm::Map,
                )
                .await;
            }
            let (acked, nacks) = g.await_verdicts(3).await;
            g.send_bye().await;
            (acked, nacks.len())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), (3, 0));
    }
    let n: i64 = env
        .client
        .query_one(
            "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = ANY($1)",
            &[&sessions],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200 * 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_the_same_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let env = Env::start(&[
        ("DBX_LISTENER__TLS_CERT", cert_path.to_str().unwrap()),
        ("DBX_LISTENER__TLS_KEY", key_path.to_str().unwrap()),
    ])
    .await;
    let tls_addr = env.daemon.tls.expect("TLS port bound");
    let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let stream = dbx_client::tls_connector(&cert_path)
        .unwrap()
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let mut g = TestGateway::over(Box::new(stream));
    g.send_hello(&env.org.key).await;
    assert!(matches!(
        g.recv().await,
        Some(ServerMessage::Welcome { .. })
    ));
    let session = Uuid::new_v4();
    g.send_batch(
        1,
        &AircraftRef::Id(env.aircraft),
        session,
        &points(50, 0, now_micros()),
        PointForm::Array,
    )
    .await;
    assert_eq!(g.recv().await, Some(ServerMessage::Ack { seq: 1 }));
    assert_eq!(env.rows(session).await, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_streaming_acks_what_it_accepted() {
    shutdown_while_streaming(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_the_spool_on_drains_in_order_too() {
    let spool = tempfile::tempdir().unwrap();
    let dir = spool.path().display().to_string();
    shutdown_while_streaming(&[("DBX_SPOOL__DIR", dir.as_str())]).await;
}

/// SIGTERM while five gateways stream: every gateway ends with `server_shutdown`,
/// the daemon exits 0, and every batch a gateway saw acked is in the table.
async fn shutdown_while_streaming(daemon_env: &[(&str, &str)]) {
    let mut env = Env::start(daemon_env).await;
    let addr = env.daemon.tcp;
    let mut clients = Vec::new();
    for c in 0..5 {
        let key = env.org.key.clone();
        let aircraft = env.aircraft;
        clients.push(tokio::spawn(async move {
            let (mut g, _) = TestGateway::hello(addr, &key).await;
            let session = Uuid::new_v4();
            let mut acked = 0u64;
            let mut seq = 0u64;
            let mut ended_with = None;
            // Stream until the server says goodbye; read verdicts as they come.
            'outer: for _ in 0..400 {
                seq += 1;
                g.send_batch(
                    seq,
                    &AircraftRef::Id(aircraft),
                    session,
                    &points(50, seq as i64 * 50, now_micros()),
                    PointForm::Map,
                )
                .await;
                while let Some(m) = g
                    .recv_within(Duration::from_millis(if seq.is_multiple_of(8) {
                        200
                    } else {
                        1
                    }))
                    .await
                {
                    match m {
                        ServerMessage::Ack { seq } => acked = seq,
                        ServerMessage::Error { code, .. } => {
                            ended_with = Some(code);
                            break 'outer;
                        }
                        other => panic!("client {c}: {other:?}"),
                    }
                }
            }
            while ended_with.is_none() {
                match g.recv().await {
                    Some(ServerMessage::Ack { seq }) => acked = seq,
                    Some(ServerMessage::Error { code, .. }) => ended_with = Some(code),
                    Some(other) => panic!("{other:?}"),
                    None => break,
                }
            }
            (session, acked, ended_with)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    env.daemon.signal(libc::SIGTERM);
    let status = env
        .daemon
        .wait(Duration::from_secs(30))
        .await
        .expect("daemon exits");
    assert!(status.success(), "{status:?}\n{}", env.daemon.log());
    for c in clients {
        let (session, acked, ended_with) = c.await.unwrap();
        assert_eq!(ended_with, Some(RejectCode::ServerShutdown));
        assert!(acked > 0);
        // Every acked batch is in the table: batches are 50 points, seqs 1..=acked.
        let n: i64 = env
            .client
            .query_one("SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = $1 AND seq < $2", &[&session, &((acked as i64 + 1) * 50)])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, acked as i64 * 50);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deactivated_organization_is_disconnected_within_seconds() {
    let env = Env::start(&[]).await;
    let (mut g, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    // The cache the daemon authenticates from: one key, one aircraft, loaded just now.
    assert_eq!(env.metric("dbx_auth_keys", "").await, 1.0);
    assert_eq!(env.metric("dbx_auth_aircraft", "").await, 1.0);
    let loaded_at = env
        .metric("dbx_auth_last_reload_timestamp_seconds", "")
        .await;
    assert!(
        (now_micros() as f64 / 1e6 - loaded_at).abs() < 60.0,
        "{loaded_at}"
    );
    let reloads = env.metric("dbx_auth_reloads_total", "").await;
    assert!(reloads >= 1.0);
    env.client
        .execute(
            "UPDATE dbx_aviation.organizations SET is_active = false WHERE org_id = $1",
            &[&env.org.id],
        )
        .await
        .unwrap();
    let m = g.recv_within(Duration::from_secs(5)).await;
    assert_eq!(error_code(&m), Some(RejectCode::Unauthorized), "{m:?}");
    let mut again = TestGateway::connect(env.daemon.tcp).await;
    again.send_hello(&env.org.key).await;
    assert_eq!(
        error_code(&again.recv().await),
        Some(RejectCode::Unauthorized)
    );

    // And a new aircraft is usable within seconds, without a restart.
    let other = Fixture::org(&env.client, "NEWCO", None).await;
    let (mut n, _) =
        TestGateway::hello_within(env.daemon.tcp, &other.key, Duration::from_secs(5)).await;
    Fixture::aircraft(&env.client, other.id, "N555NW").await;
    n.send_batch(
        1,
        &AircraftRef::Registration("N555NW".into()),
        Uuid::new_v4(),
        &points(1, 0, now_micros()),
        PointForm::Map,
    )
    .await;
    assert_eq!(n.recv().await, Some(ServerMessage::Ack { seq: 1 }));
    // The NOTIFY reloads brought the cache up to date: ACME's key gone, NEWCO's in, and
    // both aircraft (an aircraft of an inactive organization stays registered).
    let sizes = || async {
        (
            env.metric("dbx_auth_keys", "").await,
            env.metric("dbx_auth_aircraft", "").await,
        )
    };
    assert!(
        wait_until(Duration::from_secs(10), || async {
            sizes().await == (1.0, 2.0)
        })
        .await,
        "cache sizes {:?}",
        sizes().await
    );
    assert!(env.metric("dbx_auth_reloads_total", "").await >= reloads + 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_registration_registers_unknown_aircraft_for_the_key_org() {
    let env = Env::start(&[("DBX_LISTENER__AUTO_REGISTER_AIRCRAFT", "true")]).await;
    let (mut g, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    g.send_batch(
        1,
        &AircraftRef::Registration("N777AR".into()),
        Uuid::new_v4(),
        &points(2, 0, now_micros()),
        PointForm::Map,
    )
    .await;
    assert_eq!(g.recv().await, Some(ServerMessage::Ack { seq: 1 }));
    let org: Uuid = env
        .client
        .query_one("SELECT org_id FROM dbx_aviation.aircraft_registry WHERE registration_number = 'N777AR'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(org, env.org.id);
}

#[allow(dead_code)]
fn _point_is_used(_: Point) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_gateway_works_against_the_daemon() {
    let env = Env::start(&[]).await;
    let report = crate::python_gateway(&env, &["--points", "1000", "--batch", "250"]).await;
    assert_eq!(report["acked"], 1000);
    assert_eq!(
        report["ended"], true,
        "the example ends its session (protocol 1.1)"
    );
    let session: Uuid = report["session"].as_str().unwrap().parse().unwrap();
    assert_eq!(env.rows(session).await, 1000);
    let (status, reason): (String, Option<String>) = {
        let r = env
            .client
            .query_one(
                "SELECT flight_status::text, completion_reason::text FROM dbx_aviation.flight_sessions WHERE session_id = $1",
                &[&session],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("completed", Some("end"))
    );
    let extra: String = env
        .client
        .query_one("SELECT extra->>'gateway' FROM dbx_aviation.flight_telemetry WHERE session_id = $1 AND seq = 0", &[&session])
        .await
        .unwrap()
        .get(0);
    assert_eq!(extra, "python-example");
}
