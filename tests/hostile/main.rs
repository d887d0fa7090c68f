//! Hostile peers (issue 13, item 7): while one legitimate gateway streams at a fixed
//! rate, attackers take turns against a real daemon: the 80 000-key hello on several
//! sockets, 1 MiB pre-authentication frames and hellos dribbled byte by byte, 2 000
//! silent sockets, UDP floods of maximum-size datagrams with bad keys and bad MACs, a
//! peer that never reads, and authenticated peers sending maximum-size
//! control-character frames while PostgreSQL is paused.
//!
//! For every attack: the gateway's acks never stop for more than a second, the
//! daemon's resident memory stays within its byte budget plus a stated allowance, and
//! the gateway's ack p99 during the attack is printed. While PostgreSQL is paused no
//! ack is possible for anyone, so there the assertion is that acks resume within a few
//! seconds of PostgreSQL coming back. At the end every point the gateway saw acked is
//! stored exactly once and the daemon shuts down cleanly.
//!
//! One test in its own binary: it pauses (SIGSTOP) the test process's private
//! PostgreSQL cluster, which no other test may share. Attackers connect from other
//! loopback addresses (127.0.1.x, 127.0.2.x) than the gateway (127.0.0.1), as they
//! would from other hosts. Bounded to about a minute.

mod legit;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dbx_testkit::attack::{self, connect_from};
use dbx_testkit::{Env, TestDb};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use legit::Legit;

/// The daemon's byte budget here, and what its memory may exceed it by: code,
/// runtime, pools, 512 pending and up to 2 000 refused sockets, the writers' COPY
/// data (config/dbx.toml has the formula).
const BUDGET: u64 = 64 << 20;
const OUTSIDE_BUDGET: u64 = 48 << 20;

/// Longest the gateway may go without an ack while PostgreSQL is up.
const MAX_ACK_GAP: Duration = Duration::from_secs(1);

/// How long each attack runs.
const ATTACK: Duration = Duration::from_secs(5);

fn dbx_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dbx"))
}

fn addr_in(net: [u8; 3], host: u8) -> IpAddr {
    IpAddr::from([net[0], net[1], net[2], host])
}

/// Samples the daemon's resident memory until `stop`; the peak.
fn watch_rss(pid: u32, stop: Arc<AtomicBool>, peak: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            peak.fetch_max(attack::rss_bytes(pid), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// The attacks' common frame: the daemon, the gateway that must not notice, and the
/// memory peak sampled meanwhile.
struct Phase<'a> {
    env: &'a Env,
    legit: &'a Legit,
    peak: Arc<AtomicU64>,
}

impl Phase<'_> {
    /// Runs `attack` for [`ATTACK`], then checks the gateway's acks and the daemon's
    /// memory over that window, and that `counter` (metric, labels) moved.
    async fn run<F, Fut>(&self, name: &str, counter: (&str, &str), attack: F)
    where
        F: FnOnce(Arc<AtomicBool>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let before = self.env.metric(counter.0, counter.1).await;
        self.peak.store(0, Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let task = tokio::spawn(attack(stop.clone()));
        tokio::time::sleep(ATTACK).await;
        stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        let ended = Instant::now();
        let stats = self.legit.window(started, ended);
        let peak = self.peak.load(Ordering::Relaxed);
        let hits = self.env.metric(counter.0, counter.1).await - before;
        println!(
            "{name:<44} gateway acks {:>4}, ack p99 {:>6.1} ms, longest gap {:>6.1} ms; daemon RSS peak {:>5.1} MiB; {} {} +{hits}",
            stats.acks,
            stats.p99.as_secs_f64() * 1e3,
            stats.max_gap.as_secs_f64() * 1e3,
            peak as f64 / 1048576.0,
            counter.0,
            counter.1
        );
        assert!(hits > 0.0, "{name}: the attack never reached the daemon");
        assert!(stats.acks > 0, "{name}: no ack during the attack");
        assert!(
            stats.max_gap <= MAX_ACK_GAP,
            "{name}: the gateway went {:?} without an ack",
            stats.max_gap
        );
        assert!(
            peak <= BUDGET + OUTSIDE_BUDGET,
            "{name}: RSS {peak} above the budget and allowance"
        );
    }
}

/// The 80 000-key hello, whole, on 8 sockets at a time, again and again.
async fn big_hellos(target: SocketAddr, key: String, stop: Arc<AtomicBool>) {
    let hello = Arc::new(attack::many_key_hello(80_000, &key));
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let (hello, stop) = (hello.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut s = connect_from(addr_in([127, 0, 1], 1 + i), target, None).await;
                let _ = s.write_all(&hello).await;
                let _ = attack::read_server_frame(&mut s).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Dribbles `frame` one byte every `every` on `n` sockets from `net`, reconnecting
/// when the daemon closes one.
async fn dribble(
    target: SocketAddr,
    net: [u8; 3],
    n: usize,
    frame: Arc<Vec<u8>>,
    every: Duration,
    stop: Arc<AtomicBool>,
) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let (frame, stop) = (frame.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut s = connect_from(addr_in(net, 1 + (i % 200) as u8), target, None).await;
                for b in frame.iter() {
                    if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(every).await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// 2 000 sockets from 40 addresses that connect at once and say nothing, held until
/// `stop` (the daemon closes those it admitted after its handshake timeout).
async fn silent_sockets(target: SocketAddr, stop: Arc<AtomicBool>) {
    let connects: Vec<_> = (0..2000usize)
        .map(|i| {
            tokio::spawn(tokio::time::timeout(
                Duration::from_secs(5),
                attack::try_connect_from(addr_in([127, 0, 2], 1 + (i / 50) as u8), target, None),
            ))
        })
        .collect();
    let mut held = Vec::with_capacity(2000);
    for c in connects {
        if let Ok(Ok(Ok(s))) = c.await {
            held.push(s);
        }
    }
    until(&stop).await;
    assert!(held.len() >= 1500, "only {} sockets connected", held.len());
}

/// Maximum-size datagrams with bad keys and with bad MACs (under the real key's
/// `kid`, so that each costs the daemon an HMAC of 64 KiB), from two sockets.
async fn udp_flood(target: SocketAddr, key: String, stop: Arc<AtomicBool>) {
    let hash = dbx_proto::mac::key_hash(&key);
    let mut bad_mac = Vec::new();
    {
        let w = &mut bad_mac;
        rmp::encode::write_map_len(w, 3).unwrap();
        rmp::encode::write_str(w, "kid").unwrap();
        rmp::encode::write_str(w, &dbx_proto::mac::key_id_hex(&hash)).unwrap();
        rmp::encode::write_str(w, "mac").unwrap();
        rmp::encode::write_bin(w, &[0x5a; 16]).unwrap();
        rmp::encode::write_str(w, "body").unwrap();
        let room = dbx_proto::MAX_DATAGRAM_BYTES - w.len() - 3; // bin16 header
        rmp::encode::write_bin(w, &vec![0x90; room]).unwrap();
    }
    let mut bad_key = Vec::new();
    {
        let w = &mut bad_key;
        rmp::encode::write_map_len(w, 2).unwrap();
        rmp::encode::write_str(w, "key").unwrap();
        rmp::encode::write_str(w, "dbx_guessed_key").unwrap();
        rmp::encode::write_str(w, "points").unwrap();
        let room = dbx_proto::MAX_DATAGRAM_BYTES - w.len() - 3; // bin16 header
        rmp::encode::write_bin(w, &vec![0x90; room]).unwrap();
    }
    assert_eq!(bad_mac.len(), dbx_proto::MAX_DATAGRAM_BYTES);
    assert_eq!(bad_key.len(), dbx_proto::MAX_DATAGRAM_BYTES);
    let mut tasks = Vec::new();
    for (i, dg) in [bad_mac, bad_key].into_iter().enumerate() {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let sock =
                tokio::net::UdpSocket::bind(SocketAddr::new(addr_in([127, 0, 3], 1 + i as u8), 0))
                    .await
                    .unwrap();
            // About 3 000 datagrams (200 MB) a second from each socket: more than the
            // daemon can check, so the kernel drops the rest, as under a real flood.
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..64 {
                    let _ = sock.send_to(&dg, target).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Authenticated peers sending maximum-size control-character frames (batch seqs
/// 1..=3 on each connection, all of them acked or not: PostgreSQL is paused).
async fn expanding_frames(target: SocketAddr, key: String, aircraft: Uuid, stop: Arc<AtomicBool>) {
    let session = Uuid::new_v4();
    let frames: Arc<Vec<Vec<u8>>> = Arc::new(
        (1..=3)
            .map(|seq| attack::control_char_batch(seq, aircraft, session, 1 << 20))
            .collect(),
    );
    let mut tasks = Vec::new();
    for i in 0..10u8 {
        let (frames, key, stop) = (frames.clone(), key.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = connect_from(addr_in([127, 0, 4], 1 + i), target, None).await;
            let mut hello = bytes::BytesMut::new();
            dbx_proto::encode_hello(&mut hello, &key, Some("expanding"));
            let _ = s.write_all(&hello).await;
            let _ = attack::read_server_frame(&mut s).await;
            for f in frames.iter() {
                // The daemon stops reading when its budget is spent: the write blocks.
                tokio::select! {
                    r = s.write_all(f) => if r.is_err() { return },
                    _ = until(&stop) => return,
                }
            }
            until(&stop).await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Resolves once `stop` is set.
async fn until(stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_peers_do_not_stop_a_legitimate_gateway() {
    let started = Instant::now();
    let files = attack::raise_open_files_limit();
    assert!(
        files >= 6000,
        "open files limit {files}: raise the hard limit to 6000 or more"
    );
    let budget = BUDGET.to_string();
    let mut env = Env::start(
        dbx_bin(),
        &[
            ("DBX_LIMITS__MAX_BUFFERED_BYTES", budget.as_str()),
            ("DBX_LISTENER__HANDSHAKE_TIMEOUT_MS", "2000"),
            ("DBX_LISTENER__WRITE_TIMEOUT_MS", "2000"),
            ("DBX_LISTENER__DRAIN_TIMEOUT_MS", "5000"),
            ("DBX_LISTENER__MAX_PENDING_HANDSHAKES", "512"),
        ],
    )
    .await;
    let pid = env.daemon.pid();
    let (tcp, udp) = (env.daemon.tcp, env.daemon.udp.expect("udp"));
    let key = env.org.key.clone();
    let aircraft = env.aircraft;
    let legit = Legit::start(tcp, key.clone(), aircraft, Duration::from_millis(50));
    let stop_watching = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let watcher = watch_rss(pid, stop_watching.clone(), peak.clone());
    let phase = Phase {
        env: &env,
        legit: &legit,
        peak: peak.clone(),
    };
    legit.wait_for_acks(10, Duration::from_secs(20)).await;
    let quiet = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let base = legit.window(quiet, Instant::now());
    println!(
        "{:<44} gateway acks {:>4}, ack p99 {:>6.1} ms, longest gap {:>6.1} ms; daemon RSS {:>5.1} MiB",
        "no attack (baseline)",
        base.acks,
        base.p99.as_secs_f64() * 1e3,
        base.max_gap.as_secs_f64() * 1e3,
        attack::rss_bytes(pid) as f64 / 1048576.0
    );

    let k = key.clone();
    phase
        .run(
            "80 000-key hello on 8 sockets",
            ("dbx_auth_failures_total", "reason=\"frame_too_large\""),
            move |stop| big_hellos(tcp, k, stop),
        )
        .await;
    // A prefix announcing 1 MiB, then (as long as the socket lasts) the body.
    let mut mib = (1u32 << 20).to_be_bytes().to_vec();
    mib.extend_from_slice(&attack::many_key_hello(110_000, &key)[4..(1 << 20) + 4]);
    let mib = Arc::new(mib);
    phase
        .run(
            "1 MiB pre-auth frames dribbled (200 sockets)",
            ("dbx_auth_failures_total", "reason=\"frame_too_large\""),
            move |stop| dribble(tcp, [127, 0, 1], 200, mib, Duration::from_millis(100), stop),
        )
        .await;
    let mut small = bytes::BytesMut::new();
    dbx_proto::encode_hello(&mut small, &"x".repeat(3900), None);
    let small = Arc::new(small.to_vec());
    phase
        .run(
            "4 KB hellos dribbled (300 sockets)",
            ("dbx_auth_failures_total", "reason=\"handshake_timeout\""),
            move |stop| {
                dribble(
                    tcp,
                    [127, 0, 5],
                    300,
                    small,
                    Duration::from_millis(100),
                    stop,
                )
            },
        )
        .await;
    phase
        .run(
            "2 000 silent sockets",
            (
                "dbx_connections_refused_total",
                "reason=\"max_pending_handshakes\"",
            ),
            move |stop| silent_sockets(tcp, stop),
        )
        .await;
    let k = key.clone();
    phase
        .run(
            "UDP flood, 64 KiB datagrams, bad keys and MACs",
            ("dbx_udp_dropped_total", "reason=\"unauthorized\""),
            move |stop| udp_flood(udp, k, stop),
        )
        .await;
    let k = key.clone();
    phase
        .run(
            "a peer that never reads",
            ("dbx_write_timeouts_total", ""),
            move |stop| async move {
                while !stop.load(Ordering::Relaxed) {
                    attack::non_reading_peer(tcp, &k, aircraft, Duration::from_secs(4)).await;
                }
            },
        )
        .await;

    // PostgreSQL paused, authenticated peers sending frames that expand sixfold.
    let cluster = TestDb::cluster().dir().to_path_buf();
    let pause_at = Instant::now();
    attack::pause_cluster(&cluster, true);
    let stop = Arc::new(AtomicBool::new(false));
    let flood = tokio::spawn(expanding_frames(tcp, key.clone(), aircraft, stop.clone()));
    peak.store(0, Ordering::Relaxed);
    tokio::time::sleep(ATTACK).await;
    let waits = env.metric("dbx_buffered_bytes_waits_total", "").await;
    let paused_peak = peak.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let resumed_at = Instant::now();
    attack::pause_cluster(&cluster, false);
    let _ = tokio::time::timeout(Duration::from_secs(10), flood).await;
    let first_ack = legit
        .first_ack_after(resumed_at, Duration::from_secs(20))
        .await;
    let stats = legit.window(pause_at, Instant::now());
    println!(
        "{:<44} gateway acks {:>4}, ack p99 {:>6.1} ms; first ack {:.2} s after PostgreSQL resumed; daemon RSS peak {:>5.1} MiB; reads paused for budget {waits}",
        "PostgreSQL paused + 1 MiB control-char frames",
        stats.acks,
        stats.p99.as_secs_f64() * 1e3,
        first_ack.map_or(f64::NAN, |d| d.as_secs_f64()),
        paused_peak as f64 / 1048576.0
    );
    assert!(
        first_ack.is_some_and(|d| d < Duration::from_secs(10)),
        "acks did not resume within 10 s of PostgreSQL: {first_ack:?}"
    );
    assert!(waits >= 1.0, "the expanding frames never met the budget");
    assert!(paused_peak <= BUDGET + OUTSIDE_BUDGET, "RSS {paused_peak}");

    // The gateway finishes: everything it saw acked is stored exactly once.
    let acked = legit.finish(Duration::from_secs(30)).await;
    let (rows, distinct): (i64, i64) = {
        let r = env
            .client
            .query_one(
                "SELECT count(*), count(DISTINCT seq) FROM dbx_aviation.flight_telemetry WHERE session_id = $1",
                &[&legit.session()],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    println!("gateway: {acked} points acked, {rows} rows stored ({distinct} distinct seqs)");
    assert_eq!(rows, distinct, "a point was stored twice");
    assert_eq!(rows, acked as i64, "acked points missing or extra rows");
    stop_watching.store(true, Ordering::Relaxed);
    let _ = watcher.await;
    env.daemon.signal(libc::SIGTERM);
    let status = env.daemon.wait(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        env.daemon.log()
    );
    println!(
        "hostile peers: {:.0} s in all",
        started.elapsed().as_secs_f64()
    );
}
