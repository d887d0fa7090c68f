//! Issue 13, "safe on a hostile network", against a real daemon: the first frame's
//! limit, string and key limits, the byte budget under stalled writes, write timeouts,
//! pending-handshake limits, TLS only, and the UDP MAC form (daemon, loadgen, Python).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dbx_core::RejectCode;
use dbx_proto::{AircraftRef, EncodeOptions, PointForm, ServerMessage};
use dbx_testkit::attack::{self, WriteStall};
use dbx_testkit::gateway::{now_micros, points};
use dbx_testkit::{wait_until, TestGateway};
use uuid::Uuid;

use crate::{dbx_bin, Env};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn error_of(m: Option<ServerMessage>) -> (RejectCode, String) {
    match m {
        Some(ServerMessage::Error { code, msg }) => (code, msg),
        other => panic!("expected an error frame, got {other:?}"),
    }
}

/// A batch of `n` points on a fresh session that must be acked with `seq`.
async fn assert_acked(g: &mut TestGateway, seq: u64, aircraft: Uuid) {
    let pts = points(5, seq as i64 * 10, now_micros());
    g.send_batch(
        seq,
        &AircraftRef::Id(aircraft),
        Uuid::new_v4(),
        &pts,
        PointForm::Map,
    )
    .await;
    assert_eq!(g.recv().await, Some(ServerMessage::Ack { seq }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_frame_over_max_hello_bytes_is_refused_at_its_prefix() {
    let env = Env::start(&[]).await;
    // The 80 000-key hello of the issue (about 800 KB): only its prefix and a few bytes
    // are sent; the answer must come anyway.
    let hello = attack::many_key_hello(80_000, &env.org.key);
    assert!(hello.len() > 700_000);
    let mut g = TestGateway::connect(env.daemon.tcp).await;
    g.send_raw(&hello[..64]).await;
    let (code, msg) = error_of(g.recv().await);
    assert_eq!(code, RejectCode::FrameTooLarge);
    assert!(msg.contains("max_hello_bytes is 4096"), "{msg}");
    assert!(g.closed_within(Duration::from_secs(5)).await);
    // Whole, on several sockets at once: each is refused, nobody waits.
    let mut whole = Vec::new();
    for _ in 0..4 {
        let hello = hello.clone();
        let addr = env.daemon.tcp;
        whole.push(tokio::spawn(async move {
            let mut g = TestGateway::connect(addr).await;
            let _ = g.send_raw_checked(&hello).await;
            error_of(g.recv().await).0
        }));
    }
    for t in whole {
        assert_eq!(t.await.unwrap(), RejectCode::FrameTooLarge);
    }
    // A batch as the first frame is protocol, whatever its points.
    let mut g = TestGateway::connect(env.daemon.tcp).await;
    g.send_raw(&attack::nacked_batch(1, env.aircraft)).await;
    assert_eq!(
        error_of(g.recv().await),
        (
            RejectCode::Protocol,
            "expected hello as the first frame, got batch".into()
        )
    );
    assert!(
        env.metric("dbx_auth_failures_total", "reason=\"frame_too_large\"")
            .await
            >= 5.0
    );
    // Meanwhile a gateway is welcomed and acked as usual.
    let (mut ok, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    assert_acked(&mut ok, 1, env.aircraft).await;

    // The pre-authentication cost of one refusal: the daemon's CPU time per refused
    // connection (accept, prefix, error frame, close), and the wall time per round
    // trip over loopback (reported, not asserted).
    let n = 1000u32;
    let (cpu, started) = (attack::cpu_ns(env.daemon.pid()), Instant::now());
    for _ in 0..n {
        let mut g = TestGateway::connect(env.daemon.tcp).await;
        g.send_raw(&hello[..4]).await;
        assert_eq!(error_of(g.recv().await).0, RejectCode::FrameTooLarge);
    }
    let (wall, cpu) = (started.elapsed(), attack::cpu_ns(env.daemon.pid()) - cpu);
    println!(
        "refusing an oversized hello: {:.0} µs of daemon CPU and {:.0} µs wall per connection ({n} in a row over loopback)",
        cpu as f64 / 1e3 / f64::from(n),
        wall.as_secs_f64() * 1e6 / f64::from(n)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_registrations_and_too_many_extra_keys_are_nacked() {
    let env = Env::start(&[("DBX_LISTENER__MAX_EXTRA_KEYS", "8")]).await;
    let (mut g, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    let session = Uuid::new_v4();
    g.send_batch(
        1,
        &AircraftRef::Registration("N".repeat(5000)),
        session,
        &points(1, 0, now_micros()),
        PointForm::Map,
    )
    .await;
    match g.recv().await {
        Some(ServerMessage::Nack {
            seq: 1, code, msg, ..
        }) => {
            assert_eq!(code, RejectCode::InvalidBatch);
            assert!(msg.contains("5000 characters") && msg.len() < 200, "{msg}");
        }
        other => panic!("{other:?}"),
    }
    let mut pts = points(3, 0, now_micros());
    let extra: serde_json::Map<String, serde_json::Value> =
        (0..9).map(|i| (format!("k{i}"), 1.into())).collect();
    pts[2].extra = Some(serde_json::Value::Object(extra).to_string());
    g.send_batch(
        2,
        &AircraftRef::Id(env.aircraft),
        session,
        &pts,
        PointForm::Map,
    )
    .await;
    match g.recv().await {
        Some(ServerMessage::Nack {
            seq: 2,
            code,
            index,
            msg,
        }) => {
            assert_eq!((code, index), (RejectCode::InvalidPoint, Some(2)));
            assert!(msg.contains("max_extra_keys is 8"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    assert_acked(&mut g, 3, env.aircraft).await;
    assert_eq!(env.rows(session).await, 0);
}

/// The byte budget of the memory test, and the allowance above it for everything the
/// budget does not cover (code, runtime, pools, 200 connections' buffers, the COPY
/// copies of blocked writers, glibc arenas): see config/dbx.toml.
const TEST_BUDGET: u64 = 32 << 20;
const OUTSIDE_BUDGET: u64 = 32 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_within_the_byte_budget_while_writes_are_stalled() {
    attack::raise_open_files_limit();
    let budget = TEST_BUDGET.to_string();
    let mut env = Env::start(&[
        ("DBX_LIMITS__MAX_BUFFERED_BYTES", budget.as_str()),
        ("DBX_LISTENER__MAX_PENDING_PER_IP", "256"),
    ])
    .await;
    let pid = env.daemon.pid();
    let idle = attack::rss_bytes(pid);
    // The writers cannot commit: a transaction holds the telemetry tables.
    let stall = WriteStall::begin(env.db.client().await).await;
    let frame = Arc::new(attack::control_char_batch(
        1,
        env.aircraft,
        Uuid::new_v4(),
        1 << 20,
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut peers = Vec::new();
    for _ in 0..200 {
        let (addr, key, frame) = (env.daemon.tcp, env.org.key.clone(), frame.clone());
        let mut stop = stop_rx.clone();
        peers.push(tokio::spawn(async move {
            let (mut g, _) = TestGateway::hello(addr, &key).await;
            // The write blocks once the daemon stops reading; that is the point.
            tokio::select! {
                _ = g.send_raw_checked(&frame) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            let _ = stop.wait_for(|s| *s).await;
        }));
    }
    // Sample while the daemon takes what the budget allows and refuses the rest.
    let mut peak = 0;
    let sampled = Instant::now();
    while sampled.elapsed() < Duration::from_secs(12) {
        peak = peak.max(attack::rss_bytes(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hwm = attack::peak_rss_bytes(pid);
    let held = env.metric("dbx_buffered_bytes", "").await;
    let waits = env.metric("dbx_buffered_bytes_waits_total", "").await;
    println!(
        "byte budget {} MiB: daemon RSS idle {:.1} MiB, peak sampled {:.1} MiB, VmHWM {:.1} MiB; {:.1} MiB charged at the end, {waits} reads paused for budget",
        TEST_BUDGET >> 20,
        idle as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        hwm as f64 / 1048576.0,
        held / 1048576.0
    );
    assert!(held <= TEST_BUDGET as f64, "{held}");
    assert!(waits >= 1.0, "the budget never stopped a connection");
    assert!(
        hwm <= TEST_BUDGET + OUTSIDE_BUDGET,
        "peak RSS {hwm} above {} MiB + {} MiB",
        TEST_BUDGET >> 20,
        OUTSIDE_BUDGET >> 20
    );
    // Writes go through again; the peers leave; the daemon shuts down cleanly.
    stall.release().await;
    stop_tx.send_replace(true);
    for p in peers {
        p.await.unwrap();
    }
    env.daemon.signal(libc::SIGTERM);
    let status = env.daemon.wait(Duration::from_secs(60)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        env.daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_read_is_closed_after_write_timeout() {
    let env = Env::start(&[("DBX_LISTENER__WRITE_TIMEOUT_MS", "1000")]).await;
    let (dropped_after, dropped) = attack::non_reading_peer(
        env.daemon.tcp,
        &env.org.key,
        env.aircraft,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        dropped,
        "the daemon kept a peer that does not read for 30 s"
    );
    println!("a peer that does not read was dropped after {dropped_after:?} of writing");
    assert!(
        env.metric("dbx_write_timeouts_total", "transport=\"tcp\"")
            .await
            >= 1.0
    );
    let (mut g, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    assert_acked(&mut g, 1, env.aircraft).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_completes_within_the_drain_deadline_while_a_peer_does_not_read() {
    // The write timeout is far longer than the drain: only the drain deadline can end
    // the stalled write.
    let mut env = Env::start(&[
        ("DBX_LISTENER__WRITE_TIMEOUT_MS", "120000"),
        ("DBX_LISTENER__DRAIN_TIMEOUT_MS", "2000"),
    ])
    .await;
    let (addr, key, aircraft) = (env.daemon.tcp, env.org.key.clone(), env.aircraft);
    let peer = tokio::spawn(async move {
        attack::non_reading_peer(addr, &key, aircraft, Duration::from_secs(60)).await
    });
    // The daemon's writes to the peer are stalled once it stops reading the peer's
    // batches: its count of nacked batches stops moving.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut prev = -1.0;
    loop {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let now = env
            .metric("dbx_rejections_total", "reason=\"invalid_point\"")
            .await;
        if now > 0.0 && now == prev {
            break;
        }
        prev = now;
        assert!(
            Instant::now() < deadline,
            "the daemon's writes never stalled"
        );
    }
    let started = Instant::now();
    env.daemon.signal(libc::SIGTERM);
    let status = env.daemon.wait(Duration::from_secs(30)).await;
    let took = started.elapsed();
    println!("SIGTERM with a non-reading peer: the daemon exited in {took:?} (drain deadline 2 s)");
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        env.daemon.log()
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    let (_, dropped) = peer.await.unwrap();
    assert!(dropped);
}

/// A connection from `from` that sends nothing.
async fn silent(from: &str, addr: SocketAddr) -> tokio::net::TcpStream {
    attack::connect_from(ip(from), addr, None).await
}

/// Waits until the daemon counts `n` pending handshakes.
async fn pending_reaches(env: &dbx_testkit::Env, n: f64) {
    assert!(
        wait_until(Duration::from_secs(10), || async {
            env.metric("dbx_pending_handshakes", "").await == n
        })
        .await,
        "pending handshakes never reached {n}: {}",
        env.metric("dbx_pending_handshakes", "").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_handshakes_are_limited_per_address_and_in_total() {
    let env = Env::start(&[
        ("DBX_LISTENER__MAX_PENDING_PER_IP", "3"),
        ("DBX_LISTENER__MAX_PENDING_HANDSHAKES", "5"),
        ("DBX_LISTENER__HANDSHAKE_TIMEOUT_MS", "20000"),
    ])
    .await;
    let addr = env.daemon.tcp;
    // An established connection is not a pending one, and keeps working throughout.
    let (mut ok, _) = TestGateway::hello(addr, &env.org.key).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(silent("127.0.0.1", addr).await);
    }
    pending_reaches(&env, 3.0).await;
    let mut s = silent("127.0.0.1", addr).await;
    let (code, msg) = error_of(attack::read_server_frame(&mut s).await);
    assert_eq!(code, RejectCode::TooManyConnections);
    assert!(msg.contains("your address"), "{msg}");
    // Another address still gets in, up to the total.
    for _ in 0..2 {
        held.push(silent("127.0.0.2", addr).await);
    }
    pending_reaches(&env, 5.0).await;
    let mut s = silent("127.0.0.3", addr).await;
    let (code, msg) = error_of(attack::read_server_frame(&mut s).await);
    assert_eq!(code, RejectCode::TooManyConnections);
    assert!(msg.contains("too many handshakes"), "{msg}");
    assert_acked(&mut ok, 1, env.aircraft).await;
    for reason in ["max_pending_per_ip", "max_pending_handshakes"] {
        let n = env
            .metric(
                "dbx_connections_refused_total",
                &format!("reason=\"{reason}\""),
            )
            .await;
        assert!(n >= 1.0, "{reason}: {n}");
    }
    // A pending socket that goes away gives its slot back.
    drop(held.remove(0));
    pending_reaches(&env, 4.0).await;
    let (mut again, _) = TestGateway::hello(addr, &env.org.key).await;
    assert_acked(&mut again, 1, env.aircraft).await;
}

/// A self-signed certificate for localhost, written to `dir`: (cert path, key path,
/// a connector trusting it).
fn tls_setup(dir: &std::path::Path) -> (String, String, tokio_rustls::TlsConnector) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (
        cert_path.display().to_string(),
        key_path.display().to_string(),
        tokio_rustls::TlsConnector::from(Arc::new(config)),
    )
}

async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_only_opens_no_plain_port_and_refuses_without_a_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, connector) = tls_setup(dir.path());
    // plaintext = false without a certificate is a configuration error naming the key.
    let out = tokio::process::Command::new(dbx_bin())
        .arg("serve")
        .env_clear()
        .env("DBX_LISTENER__PLAINTEXT", "false")
        .env("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("listener.plaintext"), "{err}");

    let env = Env::start(&[
        ("DBX_LISTENER__PLAINTEXT", "false"),
        ("DBX_LISTENER__TLS_CERT", cert.as_str()),
        ("DBX_LISTENER__TLS_KEY", key.as_str()),
        ("DBX_LISTENER__MAX_PENDING_PER_IP", "1"),
        ("DBX_LISTENER__HANDSHAKE_TIMEOUT_MS", "20000"),
    ])
    .await;
    assert_eq!(env.daemon.tcp.port(), 0, "a plain port was opened");
    let tls = env.daemon.tls.expect("TLS port");
    let stream = tls_connect(&connector, tls).await.unwrap();
    let mut g = TestGateway::over(Box::new(stream));
    g.send_hello(&env.org.key).await;
    assert!(matches!(
        g.recv().await,
        Some(ServerMessage::Welcome { .. })
    ));
    assert_acked(&mut g, 1, env.aircraft).await;
    // One silent socket holds this address's only pending slot: the next TLS client is
    // closed without a TLS handshake (no server hello ever comes).
    let _silent = silent("127.0.0.1", tls).await;
    pending_reaches(&env, 1.0).await;
    let refused = tls_connect(&connector, tls).await;
    assert!(
        refused.is_err(),
        "a refused TLS client completed a handshake"
    );
    assert!(
        env.metric(
            "dbx_connections_refused_total",
            "reason=\"max_pending_per_ip\""
        )
        .await
            >= 1.0
    );
    assert_eq!(
        env.metric("dbx_auth_failures_total", "reason=\"tls\"")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_mac_datagrams_land_and_forgeries_and_plain_keys_are_dropped() {
    let env = Env::start(&[("DBX_LISTENER__UDP_PLAIN_KEY", "false")]).await;
    let udp = env.daemon.udp.expect("udp");
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let session = Uuid::new_v4();
    let aircraft = AircraftRef::Registration(env.registration.clone());
    let datagram = |seq: i64, mac_form: bool| {
        let mut b = BytesMut::new();
        let encode = if mac_form {
            dbx_proto::encode_datagram_mac
        } else {
            dbx_proto::encode_datagram
        };
        let pts = points(10, seq * 10, now_micros());
        encode(
            &mut b,
            &env.org.key,
            None,
            &aircraft,
            session,
            &pts,
            EncodeOptions::default(),
        )
        .unwrap();
        b.to_vec()
    };
    let first = datagram(0, true);
    assert!(!first
        .windows(env.org.key.len())
        .any(|w| w == env.org.key.as_bytes()));
    for seq in 0..3 {
        sock.send_to(&datagram(seq, true), udp).await.unwrap();
    }
    // A replay, a forged MAC, a body changed after signing, the key in clear.
    sock.send_to(&first, udp).await.unwrap();
    let mut forged = datagram(5, true);
    let mac_at = forged.windows(4).position(|w| w == b"\xa3mac").unwrap() + 6;
    forged[mac_at] ^= 1;
    sock.send_to(&forged, udp).await.unwrap();
    let mut changed = datagram(6, true);
    let last = changed.len() - 1;
    changed[last] ^= 1;
    sock.send_to(&changed, udp).await.unwrap();
    sock.send_to(&datagram(7, false), udp).await.unwrap();
    assert_eq!(env.wait_rows(session, 30).await, 30);
    let dropped = |reason: &'static str| {
        let env = &env;
        async move {
            env.metric("dbx_udp_dropped_total", &format!("reason=\"{reason}\""))
                .await
        }
    };
    assert!(
        wait_until(Duration::from_secs(5), || async {
            dropped("unauthorized").await >= 2.0 && dropped("plain_key_refused").await >= 1.0
        })
        .await
    );
    assert_eq!(env.rows(session).await, 30);
}

/// Rows of the test organization, whatever the session.
async fn all_rows(env: &dbx_testkit::Env) -> i64 {
    env.client
        .query_one("SELECT count(*) FROM dbx_aviation.flight_telemetry", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loadgen_sends_udp_with_a_mac_or_the_key() {
    let env = Env::start(&[]).await;
    let udp = env.daemon.udp.expect("udp").to_string();
    let mut expected = 0;
    for (auth, seed) in [("mac", "1"), ("key", "2")] {
        let out = tokio::process::Command::new(dbx_bin())
            .args(["loadgen", "--transport", "udp", "--udp-auth", auth])
            .args(["--addr", &udp, "--key", &env.org.key])
            .args(["--aircraft", &env.registration, "--gateways", "1"])
            .args(["--aircraft-per-gateway", "1", "--points", "300"])
            .args(["--batch", "50", "--rate", "3000", "--seed", seed, "--json"])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        expected += 300;
        assert!(
            wait_until(Duration::from_secs(10), || async {
                all_rows(&env).await == expected
            })
            .await,
            "--udp-auth {auth}: {} rows, expected {expected}",
            all_rows(&env).await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_gateway_sends_mac_datagrams() {
    let env = Env::start(&[("DBX_LISTENER__UDP_PLAIN_KEY", "false")]).await;
    let udp_port = env.daemon.udp.expect("udp").port().to_string();
    let report = crate::python_gateway(
        &env,
        &[
            "--points",
            "300",
            "--batch",
            "100",
            "--udp-port",
            &udp_port,
            "--udp-auth",
            "mac",
        ],
    )
    .await;
    assert_eq!(report["datagrams"], 3);
    let session: Uuid = report["session"].as_str().unwrap().parse().unwrap();
    assert_eq!(env.wait_rows(session, 300).await, 300);
    // The key never reached the daemon in clear, and was not needed: nothing refused.
    assert_eq!(
        env.metric("dbx_udp_dropped_total", "reason=\"plain_key_refused\"")
            .await,
        0.0
    );
}
