//! Debian's HAProxy with deploy/haproxy/haproxy.cfg in front of two real daemons on one
//! database. The copy differs from the shipped file only where a test must: its frontends,
//! stats page and stats socket on loopback ports and a temporary directory, the backends'
//! servers the two daemons (each with its own admin port for the /readyz check, as daemons on
//! one host need), the check interval 2 s → 200 ms (fall and rise counts as shipped), and the
//! global maxconn 60000 → 4000 (60000 needs 120000 file descriptors, more than a test machine
//! may allow).
//!
//! Daemon `b` reaches PostgreSQL through a TCP link this test can cut (a forwarder closing
//! every connection and refusing new ones): a real network partition between one daemon and
//! the database, while `a` and the database itself stay up.
//!
//! 1. Both servers come up in both backends (/readyz 200).
//! 2. With `b`'s link cut, its /readyz answers 503, HAProxy takes it out of rotation and new
//!    gateways all land on `a`; with the link mended it is put back and gateways reach it
//!    (and are acked) again.
//! 3. Gateways stream through HAProxy to both; `a` is SIGKILLed mid-stream; its gateways
//!    reconnect through HAProxy (which redispatches to `b`), resend what was not acked, and
//!    every batch is acked, every acked point stored exactly once.
//! 4. TLS passes through untouched: a gateway verifying the daemon's certificate completes
//!    its handshake through HAProxy's TLS frontend.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dbx_core::Point;
use dbx_proto::{AircraftRef, PointForm, ServerMessage};
use dbx_testkit::env::metric_value;
use dbx_testkit::gateway::{now_micros, points, resend_until_acked};
use dbx_testkit::prereq::tool;
use dbx_testkit::{Daemon, Fixture, TestDb, TestGateway, INGEST_TEST_PASSWORD};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use uuid::Uuid;

use crate::{dbx_bin, free_port, poll, read, replace_checked, Server};

/// A TCP forwarder to `upstream` that can be cut: every connection is closed and new ones
/// are closed as soon as accepted, until it is mended.
struct Link {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
}

impl Link {
    async fn start(upstream: SocketAddr) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind link");
        let addr = listener.local_addr().expect("link address");
        let (cut, is_cut) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if *is_cut.borrow() {
                    continue; // dropped: closed at once
                }
                let mut cut = is_cut.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Link { addr, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

/// The addresses HAProxy listens on.
struct Frontends {
    tcp: SocketAddr,
    tls: SocketAddr,
    stats: SocketAddr,
}

fn loopback() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().expect("addr")
}

/// deploy/haproxy/haproxy.cfg for this test (see the module's doc).
fn haproxy_cfg(dir: &Path, f: &Frontends, daemons: [&Daemon; 2]) -> String {
    let mut t = read("deploy/haproxy/haproxy.cfg");
    t = replace_checked(
        &t,
        "stats socket /run/haproxy/admin.sock ",
        &format!("stats socket {}/admin.sock ", dir.display()),
        1,
    );
    // 60000 connections need 120000 file descriptors, over this machine's hard limit.
    t = replace_checked(&t, "    maxconn 60000\n", "    maxconn 4000\n", 1);
    t = replace_checked(&t, "bind :7070\n", &format!("bind {}\n", f.tcp), 1);
    t = replace_checked(&t, "bind :7443\n", &format!("bind {}\n", f.tls), 1);
    t = replace_checked(
        &t,
        "bind 127.0.0.1:8404\n",
        &format!("bind {}\n", f.stats),
        1,
    );
    t = replace_checked(
        &t,
        "default-server check port 9898 inter 2s fall 2 rise 3 ",
        "default-server check inter 200ms fall 2 rise 3 ",
        2,
    );
    for port in [7070, 7443] {
        let shipped: String = (1..=3)
            .map(|i| format!("    server dbx{i} 10.0.0.1{i}:{port}\n"))
            .collect();
        let ours: String = daemons
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let addr = if port == 7070 {
                    d.tcp
                } else {
                    d.tls.expect("TLS bound")
                };
                format!(
                    "    server dbx{} {addr} check port {}\n",
                    i + 1,
                    d.http.port()
                )
            })
            .collect();
        t = replace_checked(&t, &shipped, &ours, 1);
    }
    t
}

/// A running HAProxy.
struct HaProxy {
    front: Frontends,
    server: Server,
}

impl HaProxy {
    async fn start(dir: &Path, daemons: [&Daemon; 2]) -> HaProxy {
        let front = Frontends {
            tcp: loopback(),
            tls: loopback(),
            stats: loopback(),
        };
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_cfg(dir, &front, daemons)).expect("haproxy.cfg");
        let check = Command::new(tool("haproxy"))
            .args(["-c", "-f"])
            .arg(&cfg)
            .output()
            .expect("haproxy -c");
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let mut cmd = Command::new(tool("haproxy"));
        cmd.arg("-db").arg("-f").arg(&cfg);
        let mut h = HaProxy {
            front,
            server: Server::spawn("haproxy", cmd, dir),
        };
        let up = poll(Duration::from_secs(10), || async {
            TcpStream::connect(h.front.stats).await.ok().map(|_| ())
        })
        .await;
        h.server.assert_running();
        assert!(up.is_some(), "haproxy did not start\n{}", h.server.log());
        h
    }

    /// Server name → status (UP, DOWN, "DOWN 1/3", …) of a backend, from the stats page.
    async fn statuses(&self, backend: &str) -> BTreeMap<String, String> {
        let (code, csv) = dbx_testkit::daemon::http_get(self.front.stats, "/stats;csv").await;
        assert_eq!(code, 200, "{csv}");
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .expect("csv header")
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |name: &str| header.iter().position(|h| *h == name).expect(name);
        let (px, sv, status) = (col("pxname"), col("svname"), col("status"));
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > status && f[px] == backend && f[sv].starts_with("dbx"))
            .map(|f| (f[sv].to_string(), f[status].to_string()))
            .collect()
    }

    /// Waits until server `name` is exactly `want` (UP or DOWN) in both backends.
    async fn wait_status(&self, name: &str, want: &str) {
        let ok = poll(Duration::from_secs(20), || async {
            let mut all = true;
            for b in ["dbx_tcp", "dbx_tls"] {
                all &= self.statuses(b).await.get(name).map(String::as_str) == Some(want);
            }
            all.then_some(())
        })
        .await;
        assert!(
            ok.is_some(),
            "{name} not {want}: {:?} {:?}\n{}",
            self.statuses("dbx_tcp").await,
            self.statuses("dbx_tls").await,
            self.server.log()
        );
    }
}

/// TCP connections a daemon accepted so far.
async fn accepted(d: &Daemon) -> f64 {
    let (_, body) = d.http_get("/metrics").await;
    metric_value(&body, "dbx_connections_total", "transport=\"tcp\"")
}

/// Opens `n` gateways through `addr`, each acked for one small batch; returns them open.
async fn gateways_through(
    addr: SocketAddr,
    key: &str,
    aircraft: Uuid,
    n: usize,
) -> Vec<TestGateway> {
    let mut out = Vec::new();
    for _ in 0..n {
        let (mut g, _) = TestGateway::hello(addr, key).await;
        let pts = points(10, 1, now_micros() - 60_000_000);
        g.send_batch(
            1,
            &AircraftRef::Id(aircraft),
            Uuid::new_v4(),
            &pts,
            PointForm::Map,
        )
        .await;
        assert_eq!(g.recv().await, Some(ServerMessage::Ack { seq: 1 }));
        out.push(g);
    }
    out
}

/// The PostgreSQL server's address in a URL.
fn server_addr(url: &str) -> SocketAddr {
    let c: tokio_postgres::Config = url.parse().expect("url");
    let host = match &c.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        other => panic!("not a TCP host: {other:?}"),
    };
    format!("{host}:{}", c.get_ports()[0])
        .parse()
        .expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_fails_gateways_over_and_readyz_takes_a_daemon_out_of_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (db, ingest_url) = TestDb::migrated().await;
    let client = db.client().await;
    let org = Fixture::org(&client, "BALANCED", None).await;
    let aircraft = Fixture::aircraft(&client, org.id, "N7HAP").await;

    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("cert");
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).expect("key");
    let (cert_env, key_env) = (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    );
    let env = [
        ("DBX_LISTENER__TLS_CERT", cert_env.as_str()),
        ("DBX_LISTENER__TLS_KEY", key_env.as_str()),
        ("DBX_HEALTH__INTERVAL_SECS", "1"),
        ("DBX_BATCHER__RETRY_MAX_MS", "500"),
    ];
    let link = Link::start(server_addr(&ingest_url)).await;
    let b_url = format!(
        "postgresql://dbx_ingest_service:{INGEST_TEST_PASSWORD}@{}/{}",
        link.addr,
        db.name()
    );
    let (mut a, b) = tokio::join!(
        Daemon::start(dbx_bin(), &ingest_url, &env),
        Daemon::start(dbx_bin(), &b_url, &env)
    );
    let h = HaProxy::start(dir.path(), [&a, &b]).await;
    let front = h.front.tcp;

    // 1. Both in rotation.
    h.wait_status("dbx1", "UP").await;
    h.wait_status("dbx2", "UP").await;

    // 2. b's database unreachable: /readyz 503, out of rotation, new gateways all go to a.
    link.set_cut(true);
    let not_ready = poll(Duration::from_secs(10), || async {
        (b.http_get("/readyz").await.0 == 503).then_some(())
    })
    .await;
    assert!(not_ready.is_some(), "b's /readyz stayed 200\n{}", b.log());
    h.wait_status("dbx2", "DOWN").await;
    let (a0, b0) = (accepted(&a).await, accepted(&b).await);
    let held = gateways_through(front, &org.key, aircraft, 4).await;
    assert_eq!(
        (accepted(&a).await - a0, accepted(&b).await - b0),
        (4.0, 0.0),
        "new gateways while b's database is unreachable"
    );
    drop(held);
    // Mended: b is put back, and new gateways reach it (and are acked by it).
    link.set_cut(false);
    h.wait_status("dbx2", "UP").await;
    let b1 = accepted(&b).await;
    let held = gateways_through(front, &org.key, aircraft, 4).await;
    assert!(accepted(&b).await - b1 >= 1.0, "b back in rotation");
    drop(held);

    // 3. Gateways through HAProxy; a is SIGKILLed mid-stream.
    const GATEWAYS: usize = 6;
    const BATCHES: usize = 60;
    const PER_BATCH: usize = 50;
    // Within the accepted window: each gateway's flight 10 minutes after the previous one's.
    let t0 = now_micros() - 2 * 3_600_000_000;
    let mut flights = Vec::new();
    let mut runs = Vec::new();
    for g in 0..GATEWAYS {
        let session = Uuid::new_v4();
        let batches: Vec<(Uuid, Vec<Point>)> = (0..BATCHES)
            .map(|i| {
                let first = (i * PER_BATCH) as i64 + 1;
                (
                    session,
                    points(
                        PER_BATCH,
                        first,
                        t0 + g as i64 * 600_000_000 + first * 100_000,
                    ),
                )
            })
            .collect();
        let (tx, rx) = watch::channel(HashSet::new());
        runs.push((
            rx,
            tokio::spawn(resend_until_acked(
                front,
                org.key.clone(),
                aircraft,
                batches.clone(),
                Duration::from_millis(20),
                tx,
            )),
        ));
        flights.push((session, batches));
    }
    let acked = |runs: &[(watch::Receiver<HashSet<usize>>, _)]| -> usize {
        runs.iter().map(|(rx, _)| rx.borrow().len()).sum()
    };
    let some = poll(Duration::from_secs(60), || async {
        (acked(&runs) >= GATEWAYS * BATCHES / 3).then_some(())
    })
    .await;
    assert!(some.is_some(), "the gateways did not get going");
    let (_, exposition) = a.http_get("/metrics").await;
    let on_a = metric_value(&exposition, "dbx_connections_open", "transport=\"tcp\"");
    assert!(on_a >= 1.0, "no gateway on a: {on_a}");
    a.signal(libc::SIGKILL);
    a.wait(Duration::from_secs(10)).await;
    let acked_at_kill: Vec<HashSet<usize>> =
        runs.iter().map(|(rx, _)| rx.borrow().clone()).collect();
    assert!(acked_at_kill.iter().map(HashSet::len).sum::<usize>() < GATEWAYS * BATCHES);
    // Everything acked before the kill is there, once.
    for ((session, batches), acked) in flights.iter().zip(&acked_at_kill) {
        for &i in acked {
            let pts = &batches[i].1;
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM dbx_aviation.flight_telemetry
                      WHERE session_id = $1 AND seq BETWEEN $2 AND $3",
                    &[session, &pts[0].seq, &pts[pts.len() - 1].seq],
                )
                .await
                .expect("count")
                .get(0);
            assert_eq!(
                n,
                pts.len() as i64,
                "acked batch {i} of {session} after the kill"
            );
        }
    }
    let mut reconnects = 0;
    for (_, run) in runs {
        reconnects += tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .expect("the gateways finish through haproxy")
            .expect("gateway task");
    }
    assert!(
        reconnects as f64 >= on_a,
        "a's {on_a} gateways reconnected ({reconnects} reconnects)"
    );
    h.wait_status("dbx1", "DOWN").await;
    let sessions: Vec<Uuid> = flights.iter().map(|(s, _)| *s).collect();
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT (session_id, seq)) FROM dbx_aviation.flight_telemetry
              WHERE session_id = ANY($1)",
            &[&sessions],
        )
        .await
        .expect("counts");
    let total = (GATEWAYS * BATCHES * PER_BATCH) as i64;
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (total, total),
        "every point stored exactly once"
    );

    // 4. TLS through HAProxy, verified end to end (to b: a is down).
    let tcp = TcpStream::connect(h.front.tls)
        .await
        .expect("connect TLS frontend");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let stream = dbx_client::tls_connector(&cert_path)
        .expect("trust the daemon's certificate")
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the daemon through haproxy");
    let mut g = TestGateway::over(Box::new(stream));
    g.send_hello(&org.key).await;
    assert!(matches!(
        g.recv().await,
        Some(ServerMessage::Welcome { .. })
    ));
    let session = Uuid::new_v4();
    g.send_batch(
        1,
        &AircraftRef::Id(aircraft),
        session,
        &points(20, 1, now_micros()),
        PointForm::Array,
    )
    .await;
    assert_eq!(g.recv().await, Some(ServerMessage::Ack { seq: 1 }));
}
