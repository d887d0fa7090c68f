//! The disk spool in a real daemon against a real PostgreSQL that the tests stop and
//! start (a test binary of its own: it stops the process's test cluster; the tests
//! in it take turns).
//!
//! - `outage_keeps_acks_flowing_and_full_spools_block_or_nack`: one outage, three
//!   daemons on the same database. 50 gateways stream into a daemon with a roomy
//!   spool: acks keep coming while PostgreSQL is down, and afterwards every acked
//!   point is stored exactly once. A daemon with a 64 KiB spool and `block` stalls
//!   its gateway's writes and loses nothing; one with `drop_newest` nacks with
//!   `rejected`, and exactly the acked points are stored.
//! - `sigkill_while_spooling_loses_no_acked_point`: the daemon is killed while it acks
//!   from the spool, restarted on the same spool once PostgreSQL is back, and every
//!   batch the gateway saw acked is in the table exactly once.
//! - `refused_replays_are_kept_as_dead_letters_and_can_be_requeued`: a batch acked
//!   from the spool and refused on replay (`foreign_session`) is kept under
//!   `rejected/`, listed by `dbx spool rejected`, and `dbx spool requeue` replays it.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dbx_core::Point;
use dbx_proto::{AircraftRef, EncodeOptions, PointForm, ServerMessage};
use dbx_testkit::gateway::{now_micros, points};
use dbx_testkit::{wait_until, Daemon, Env, TestDb, TestGateway};
use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Semaphore};
use uuid::Uuid;

fn dbx_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dbx"))
}

/// The tests stop the shared cluster: one at a time.
static CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn stop_db() {
    tokio::task::spawn_blocking(|| TestDb::cluster().stop().unwrap())
        .await
        .unwrap();
}

async fn start_db() {
    tokio::task::spawn_blocking(|| TestDb::cluster().start().unwrap())
        .await
        .unwrap();
}

/// Test phases, for ack latencies.
const BEFORE: u8 = 0;
const DURING: u8 = 1;
const AFTER: u8 = 2;

/// What the fleet observed.
#[derive(Default)]
struct Observed {
    phase: AtomicU8,
    acked_batches: AtomicU64,
    /// (phase at ack time, latency in µs)
    latencies: Mutex<Vec<(u8, u64)>>,
    stop: AtomicBool,
}

impl Observed {
    fn percentiles(&self, phase: u8) -> (usize, f64, f64) {
        let mut v: Vec<u64> = self
            .latencies
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| *p == phase)
            .map(|(_, l)| *l)
            .collect();
        v.sort_unstable();
        let q = |q: f64| {
            v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
                .map_or(0.0, |us| *us as f64 / 1000.0)
        };
        (v.len(), q(0.5), q(0.99))
    }
}

/// What one gateway ended with.
#[derive(Debug, Default)]
struct GatewayEnd {
    session: Uuid,
    acked_points: i64,
    nacked: Vec<(u64, String, String)>,
    longest_write: Duration,
    unanswered: usize,
}

/// One gateway on one connection: a writer task sending `per_batch`-point batches
/// every `every` (or as fast as the socket takes them), at most `window` unanswered,
/// and a reader collecting verdicts. Runs until `obs.stop`, then waits for the
/// verdicts on everything sent.
async fn gateway(
    addr: SocketAddr,
    key: String,
    aircraft: Uuid,
    per_batch: usize,
    every: Option<Duration>,
    window: usize,
    obs: Arc<Observed>,
) -> GatewayEnd {
    let session = Uuid::new_v4();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (rd, mut wr) = tcp.into_split();
    let mut hello = BytesMut::new();
    dbx_proto::encode_hello(&mut hello, &key, Some("spool-test"));
    wr.write_all(&hello).await.unwrap();
    let sent: Arc<Mutex<BTreeMap<u64, Instant>>> = Arc::default();
    let permits = Arc::new(Semaphore::new(window));
    let done_sending = Arc::new(AtomicU64::new(0));

    let writer = {
        let (sent, permits, obs, done) = (
            sent.clone(),
            permits.clone(),
            obs.clone(),
            done_sending.clone(),
        );
        tokio::spawn(async move {
            let base = now_micros() - 24 * 3_600_000_000;
            let mut longest = Duration::ZERO;
            let mut seq = 0u64;
            let mut next = Instant::now();
            while !obs.stop.load(Ordering::Relaxed) {
                let Ok(p) =
                    tokio::time::timeout(Duration::from_millis(200), permits.acquire()).await
                else {
                    continue;
                };
                p.expect("semaphore").forget();
                seq += 1;
                let first = (seq as i64 - 1) * per_batch as i64;
                let pts = points(per_batch, first, base + first * 100_000);
                let mut b = BytesMut::new();
                dbx_proto::encode_batch_with(
                    &mut b,
                    seq,
                    &AircraftRef::Id(aircraft),
                    session,
                    &pts,
                    EncodeOptions::from(PointForm::Array),
                )
                .unwrap();
                sent.lock().unwrap().insert(seq, Instant::now());
                let t = Instant::now();
                if wr.write_all(&b).await.is_err() {
                    break;
                }
                longest = longest.max(t.elapsed());
                if let Some(every) = every {
                    next += every;
                    tokio::time::sleep_until(next.into()).await;
                }
            }
            done.store(seq + 1, Ordering::Relaxed);
            (wr, longest)
        })
    };

    let mut g = TestGateway::over(Box::new(tokio::io::join(rd, tokio::io::sink())));
    let mut end = GatewayEnd {
        session,
        ..GatewayEnd::default()
    };
    let mut idle_since = Instant::now();
    loop {
        let last = done_sending.load(Ordering::Relaxed);
        if last > 0 && sent.lock().unwrap().is_empty() {
            break;
        }
        if last > 0 && idle_since.elapsed() > Duration::from_secs(60) {
            end.unanswered = sent.lock().unwrap().len();
            break;
        }
        match g.recv_within(Duration::from_millis(200)).await {
            Some(ServerMessage::Welcome { .. }) => {}
            Some(ServerMessage::Ack { seq }) => {
                idle_since = Instant::now();
                let now = Instant::now();
                let phase = obs.phase.load(Ordering::Relaxed);
                let mut s = sent.lock().unwrap();
                let done: Vec<u64> = s.range(..=seq).map(|(k, _)| *k).collect();
                let mut lat = obs.latencies.lock().unwrap();
                for k in done {
                    let t = s.remove(&k).expect("sent");
                    lat.push((phase, now.duration_since(t).as_micros() as u64));
                    end.acked_points += per_batch as i64;
                    obs.acked_batches.fetch_add(1, Ordering::Relaxed);
                    permits.add_permits(1);
                }
            }
            Some(ServerMessage::Nack { seq, code, msg, .. }) => {
                idle_since = Instant::now();
                sent.lock().unwrap().remove(&seq);
                end.nacked.push((seq, format!("{code:?}"), msg));
                permits.add_permits(1);
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => {}
        }
    }
    let (_wr, longest) = writer.await.unwrap();
    end.longest_write = longest;
    end
}

fn segment_files(dir: &Path) -> usize {
    dbx_spool::segment::list(dir).map_or(0, |s| s.len())
}

fn refs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// The daemon kept a dead letter and its spool holds no segment any more.
async fn kept_and_drained(env: &Env, spool: &Path) -> bool {
    env.metric("dbx_spool_rejected_records_total", "").await >= 1.0 && segment_files(spool) == 0
}

async fn rows(client: &tokio_postgres::Client, sessions: &[Uuid]) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT (session_id, seq)) FROM dbx_aviation.flight_telemetry WHERE session_id = ANY($1)",
            &[&sessions.to_vec()],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_keeps_acks_flowing_and_full_spools_block_or_nack() {
    let _turn = CLUSTER.lock().await;
    let spool = tempfile::tempdir().unwrap();
    let roomy = spool.path().join("roomy");
    let small_block = spool.path().join("block");
    let small_drop = spool.path().join("drop");
    let common = [
        ("DBX_SPOOL__AFTER_MS", "500"),
        ("DBX_BATCHER__RETRY_MAX_MS", "300"),
        ("DBX_BATCHER__MAX_BATCH_AGE_MS", "20"),
    ];
    let with = |extra: &[(&'static str, String)]| -> Vec<(String, String)> {
        common
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain(extra.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .collect()
    };
    let env_roomy = with(&[("DBX_SPOOL__DIR", roomy.display().to_string())]);
    let env_block = with(&[
        ("DBX_SPOOL__DIR", small_block.display().to_string()),
        ("DBX_SPOOL__MAX_BYTES", "65536".into()),
        ("DBX_SPOOL__SEGMENT_BYTES", "16384".into()),
        ("DBX_BATCHER__QUEUE_CAPACITY", "8".into()),
        ("DBX_LISTENER__MAX_INFLIGHT_BATCHES", "8".into()),
    ]);
    let env_drop = with(&[
        ("DBX_SPOOL__DIR", small_drop.display().to_string()),
        ("DBX_SPOOL__MAX_BYTES", "65536".into()),
        ("DBX_SPOOL__SEGMENT_BYTES", "16384".into()),
        ("DBX_SPOOL__WHEN_FULL", "drop_newest".into()),
    ]);
    let env = Env::start(dbx_bin(), &refs(&env_roomy)).await;
    let block = Daemon::start(dbx_bin(), &env.ingest_url, &refs(&env_block)).await;
    let drop_d = Daemon::start(dbx_bin(), &env.ingest_url, &refs(&env_drop)).await;

    let obs = Arc::new(Observed::default());
    let side = Arc::new(Observed::default());
    let mut fleet = Vec::new();
    for _ in 0..50 {
        fleet.push(tokio::spawn(gateway(
            env.daemon.tcp,
            env.org.key.clone(),
            env.aircraft,
            10,
            Some(Duration::from_millis(100)),
            16,
            obs.clone(),
        )));
    }
    // As fast as the socket takes them, bounded only by the daemon's in-flight limit.
    let blocker = tokio::spawn(gateway(
        block.tcp,
        env.org.key.clone(),
        env.aircraft,
        50,
        None,
        1000,
        side.clone(),
    ));
    let dropper = tokio::spawn(gateway(
        drop_d.tcp,
        env.org.key.clone(),
        env.aircraft,
        50,
        Some(Duration::from_millis(20)),
        32,
        side.clone(),
    ));

    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_db().await;
    obs.phase.store(DURING, Ordering::Relaxed);
    let down = Instant::now();
    // Past after_ms the spool takes over; from then on acks must keep coming.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let acked_early = obs.acked_batches.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let acked_late = obs.acked_batches.load(Ordering::Relaxed);
    let block_metrics = block.http_get("/metrics").await.1;
    let drop_metrics = drop_d.http_get("/metrics").await.1;
    let roomy_metrics = env.daemon.http_get("/metrics").await.1;
    let outage = down.elapsed();
    start_db().await;
    obs.phase.store(AFTER, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    obs.stop.store(true, Ordering::Relaxed);
    side.stop.store(true, Ordering::Relaxed);

    let mut ends = Vec::new();
    for g in fleet {
        ends.push(
            tokio::time::timeout(Duration::from_secs(90), g)
                .await
                .expect("fleet finishes")
                .unwrap(),
        );
    }
    let blocked = tokio::time::timeout(Duration::from_secs(90), blocker)
        .await
        .expect("blocker finishes")
        .unwrap();
    let dropped = tokio::time::timeout(Duration::from_secs(90), dropper)
        .await
        .expect("dropper finishes")
        .unwrap();

    eprintln!(
        "blocker: {} acked, {} nacked, longest write {:?}; dropper: {} acked, {} nacked",
        blocked.acked_points,
        blocked.nacked.len(),
        blocked.longest_write,
        dropped.acked_points,
        dropped.nacked.len()
    );
    let (b, d, a) = (
        obs.percentiles(BEFORE),
        obs.percentiles(DURING),
        obs.percentiles(AFTER),
    );
    eprintln!(
        "outage {outage:?}; acks before {} (p50 {:.1} ms, p99 {:.1} ms), during {} (p50 {:.1} ms, p99 {:.1} ms), after {} (p50 {:.1} ms, p99 {:.1} ms); acked {acked_early} → {acked_late} while down",
        b.0, b.1, b.2, d.0, d.1, d.2, a.0, a.1, a.2
    );
    let metric =
        |body: &str, name: &str, labels: &str| dbx_testkit::env::metric_value(body, name, labels);

    // The roomy daemon: acks kept coming while PostgreSQL was down, from the spool.
    assert!(
        acked_late > acked_early,
        "acks continued during the outage ({acked_early} → {acked_late})"
    );
    assert!(d.0 > 0 && a.0 > 0 && b.0 > 0);
    assert!(metric(&roomy_metrics, "dbx_spool_written_records_total", "") > 0.0);
    assert_eq!(
        metric(&roomy_metrics, "dbx_spool_active", ""),
        1.0,
        "spooling while down"
    );
    // Acked from the spool is not committed yet: wait for the replayers to empty
    // every spool, then every acked point is stored exactly once.
    for dir in [&roomy, &small_block, &small_drop] {
        assert!(
            wait_until(Duration::from_secs(60), || async {
                segment_files(dir) == 0
            })
            .await,
            "spool {} not drained",
            dir.display()
        );
    }
    let client = dbx_testkit::connect(&env.db.url()).await;
    let sessions: Vec<Uuid> = ends.iter().map(|e| e.session).collect();
    let acked: i64 = ends.iter().map(|e| e.acked_points).sum();
    assert!(
        ends.iter()
            .all(|e| e.nacked.is_empty() && e.unanswered == 0),
        "all answered with acks"
    );
    assert_eq!(rows(&client, &sessions).await, (acked, acked));

    // block: the gateway's writes stalled, the spool never passed its bound, no loss.
    assert!(
        metric(&block_metrics, "dbx_spool_full_total", "kind=\"block\"") >= 1.0,
        "{}",
        block.log()
    );
    assert!(metric(&block_metrics, "dbx_spool_bytes", "") <= 65536.0);
    assert!(
        blocked.longest_write >= Duration::from_secs(1),
        "writes stalled ({:?})",
        blocked.longest_write
    );
    assert!(blocked.nacked.is_empty() && blocked.unanswered == 0);
    assert_eq!(
        rows(&client, &[blocked.session]).await,
        (blocked.acked_points, blocked.acked_points)
    );

    // drop_newest: nacked with `rejected`, counted; exactly the acked points are stored.
    assert!(
        !dropped.nacked.is_empty(),
        "the full spool refused some batches"
    );
    assert!(
        dropped
            .nacked
            .iter()
            .all(|(_, code, msg)| code.contains("Rejected") && msg.contains("spool is full")),
        "{:?}",
        dropped.nacked[0]
    );
    let drop_metrics_end = drop_d.http_get("/metrics").await.1;
    assert!(metric(&drop_metrics, "dbx_spool_full_total", "kind=\"drop\"") >= 1.0);
    assert_eq!(
        metric(&drop_metrics_end, "dbx_spool_full_total", "kind=\"drop\""),
        dropped.nacked.len() as f64
    );
    assert_eq!(dropped.unanswered, 0);
    assert_eq!(
        rows(&client, &[dropped.session]).await,
        (dropped.acked_points, dropped.acked_points)
    );
    eprintln!(
        "block: {} points acked, longest write {:?}; drop_newest: {} acked, {} batches nacked",
        blocked.acked_points,
        blocked.longest_write,
        dropped.acked_points,
        dropped.nacked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_spooling_loses_no_acked_point() {
    let _turn = CLUSTER.lock().await;
    let spool = tempfile::tempdir().unwrap();
    let bind = dbx_testkit::daemon::fixed_loopback_bind();
    let dir = spool.path().display().to_string();
    let daemon_env = [
        ("DBX_LISTENER__TCP_BIND", bind.as_str()),
        ("DBX_SPOOL__DIR", dir.as_str()),
        ("DBX_SPOOL__AFTER_MS", "300"),
        ("DBX_SPOOL__SEGMENT_BYTES", "65536"),
        ("DBX_BATCHER__MAX_BATCH_AGE_MS", "20"),
        ("DBX_BATCHER__RETRY_MAX_MS", "300"),
    ];
    let mut env = Env::start(dbx_bin(), &daemon_env).await;
    let sessions = [Uuid::new_v4(), Uuid::new_v4()];
    let base = now_micros() - 6 * 3600 * 1_000_000;
    let n_batches = 600;
    let batches: Vec<(Uuid, Vec<Point>)> = (0..n_batches)
        .map(|i| {
            let k = (i / 2) as i64;
            (sessions[i % 2], points(50, k * 50, base + k * 5_000_000))
        })
        .collect();
    let (acked_tx, mut acked_rx) = watch::channel(HashSet::new());
    let gw = tokio::spawn(dbx_testkit::gateway::resend_until_acked(
        env.daemon.tcp,
        env.org.key.clone(),
        env.aircraft,
        batches.clone(),
        Duration::from_millis(5),
        acked_tx,
    ));

    let _ = tokio::time::timeout(
        Duration::from_secs(30),
        acked_rx.wait_for(|a| a.len() >= 50),
    )
    .await;
    stop_db().await;
    let at_stop = acked_rx.borrow().len();
    // Acks resume from the spool; kill the daemon while it is acking from disk.
    let grown = tokio::time::timeout(
        Duration::from_secs(20),
        acked_rx.wait_for(|a| a.len() >= at_stop + 100),
    )
    .await
    .is_ok();
    assert!(
        grown,
        "acks resumed from the spool while PostgreSQL was down"
    );
    env.daemon.signal(libc::SIGKILL);
    env.daemon.wait(Duration::from_secs(10)).await;
    let acked_at_kill: HashSet<usize> = acked_rx.borrow().clone();
    let on_disk = segment_files(spool.path());
    assert!(on_disk >= 1, "segments left by the killed daemon");
    start_db().await;
    env.daemon = Daemon::start(dbx_bin(), &env.ingest_url, &daemon_env).await;

    tokio::time::timeout(Duration::from_secs(120), gw)
        .await
        .expect("gateway finishes")
        .unwrap();
    // The restarted daemon replays what the killed one acked from its spool.
    assert!(
        wait_until(Duration::from_secs(30), || async {
            segment_files(spool.path()) == 0
        })
        .await,
        "spool not drained"
    );
    let replayed = env.metric("dbx_spool_replayed_records_total", "").await;
    assert!(replayed > 0.0, "the restart replayed the spool");
    let client = dbx_testkit::connect(&env.db.url()).await;
    for &i in &acked_at_kill {
        let (session, pts) = &batches[i];
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = $1 AND seq BETWEEN $2 AND $3",
                &[session, &pts[0].seq, &pts[pts.len() - 1].seq],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, pts.len() as i64, "batch {i}, acked before the kill");
    }
    let total = (n_batches * 50) as i64;
    assert_eq!(rows(&client, &sessions).await, (total, total));
    eprintln!(
        "acked {at_stop} before the outage, {} at the kill; {replayed} records replayed after restart",
        acked_at_kill.len()
    );
}

/// Runs `dbx spool --dir <dir> <args>`; (exit success, stdout, stderr).
fn spool_cli(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(dbx_bin())
        .arg("spool")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// While PostgreSQL is down, two aircraft of one organization send batches of the
/// same new session; the listener cannot check ownership, so both are acked from the
/// spool. When it is back, the first commit makes its aircraft the session's owner
/// (which one depends on the writers' race) and the other batch is refused
/// (`foreign_session`, decided at commit): it is kept as a dead letter, listed by
/// `dbx spool rejected`, and `dbx spool requeue` (refused while the daemon runs)
/// hands it to the next start, which refuses and keeps it again. Nothing acked is
/// silently gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_replays_are_kept_as_dead_letters_and_can_be_requeued() {
    let _turn = CLUSTER.lock().await;
    let spool = tempfile::tempdir().unwrap();
    let dir = spool.path().display().to_string();
    let daemon_env = [
        ("DBX_SPOOL__DIR", dir.as_str()),
        ("DBX_SPOOL__AFTER_MS", "300"),
        ("DBX_BATCHER__MAX_BATCH_AGE_MS", "20"),
        ("DBX_BATCHER__RETRY_MAX_MS", "300"),
    ];
    let mut env = Env::start(dbx_bin(), &daemon_env).await;
    let first = env.aircraft;
    let second = dbx_testkit::Fixture::aircraft(&env.client, env.org.id, "N200AC").await;
    let base = now_micros() - 3600 * 1_000_000;
    let mut gw = TestGateway::hello(env.daemon.tcp, &env.org.key).await.0;
    // Both aircraft known to the daemon while the database is up.
    for (seq, aircraft) in [(1, first), (2, second)] {
        let pts = points(5, seq as i64 * 1000, base);
        gw.send_batch(
            seq,
            &AircraftRef::Id(aircraft),
            Uuid::new_v4(),
            &pts,
            PointForm::Map,
        )
        .await;
    }
    assert_eq!(gw.await_verdicts(2).await, (2, vec![]));

    stop_db().await;
    let shared = Uuid::new_v4();
    let mine = points(10, 0, base + 1_000_000);
    let theirs = points(10, 100, base + 2_000_000);
    gw.send_batch(3, &AircraftRef::Id(first), shared, &mine, PointForm::Map)
        .await;
    gw.send_batch(4, &AircraftRef::Id(second), shared, &theirs, PointForm::Map)
        .await;
    let verdicts = tokio::time::timeout(Duration::from_secs(20), gw.await_verdicts(4))
        .await
        .expect("acked from the spool while PostgreSQL is down");
    assert_eq!(verdicts, (4, vec![]));
    start_db().await;

    assert!(
        wait_until(Duration::from_secs(60), || kept_and_drained(
            &env,
            spool.path()
        ))
        .await,
        "the refused batch was not kept"
    );
    // The test's own connection did not survive the restart.
    let client = dbx_testkit::connect(&env.db.url()).await;
    assert_eq!(
        rows(&client, &[shared]).await,
        (10, 10),
        "one batch is stored"
    );
    let owner: Uuid = client
        .query_one(
            "SELECT aircraft_id FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&shared],
        )
        .await
        .unwrap()
        .get(0);
    let (loser, loser_seqs) = if owner == first {
        (second, [100, 109])
    } else {
        (first, [0, 9])
    };
    assert!(env.metric("dbx_spool_rejected_bytes", "").await > 0.0);

    let (ok, out, err) = spool_cli(spool.path(), &["rejected", "--json"]);
    assert!(ok, "{err}");
    let entries: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 1, "{out}");
    let e = &entries[0];
    assert_eq!(e["code"], "foreign_session");
    assert_eq!(e["session_id"], shared.to_string());
    assert_eq!(e["aircraft_id"], loser.to_string());
    assert_eq!(e["points"], 10);
    assert_eq!(e["seq_range"], serde_json::json!(loser_seqs));
    let (ok, out, _) = spool_cli(spool.path(), &["status"]);
    assert!(ok);
    assert!(out.contains("in use by a running daemon: yes"), "{out}");
    assert!(out.contains("dead letters (rejected/): 1 batches"), "{out}");
    let (ok, _, err) = spool_cli(spool.path(), &["requeue"]);
    assert!(
        !ok && err.contains("in use by another dbx process"),
        "{err}"
    );

    // Stopped, requeued, restarted: replayed, refused again, kept again.
    env.daemon.signal(libc::SIGTERM);
    env.daemon.wait(Duration::from_secs(20)).await;
    let (ok, out, err) = spool_cli(spool.path(), &["requeue"]);
    assert!(ok, "{err}");
    assert!(out.contains("requeued 1 batches"), "{out}");
    assert_eq!(segment_files(spool.path()), 1);
    env.daemon = Daemon::start(dbx_bin(), &env.ingest_url, &daemon_env).await;
    assert!(
        wait_until(Duration::from_secs(30), || kept_and_drained(
            &env,
            spool.path()
        ))
        .await,
        "the requeued batch was not replayed"
    );
    let (_, out, _) = spool_cli(spool.path(), &["rejected", "--json"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert_eq!(rows(&client, &[shared]).await, (10, 10));
}

/// A spool segment is trusted no more than a gateway: records replayed after a restart go
/// through the ownership check of the commit transaction like live batches. A segment left
/// in the spool (planted, tampered, or older than a retired aircraft) with records of one
/// organization claiming another organization's aircraft, or its session, is refused into
/// `rejected/` (`unknown_aircraft`, `foreign_session`) and nothing of it is written; the
/// good record beside them is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_records_are_held_to_the_tenants_aircraft_and_sessions() {
    use dbx_spool::record::encode_batch;
    use dbx_spool::segment::{self, frame_record, SegmentWriter};
    let _turn = CLUSTER.lock().await;
    let spool = tempfile::tempdir().unwrap();
    let dir = spool.path().display().to_string();
    let daemon_env = [
        ("DBX_SPOOL__DIR", dir.as_str()),
        ("DBX_BATCHER__MAX_BATCH_AGE_MS", "20"),
    ];
    let mut env = Env::start(dbx_bin(), &daemon_env).await;
    // Another tenant, with an aircraft and a session of its own.
    let other = dbx_testkit::Fixture::org(&env.client, "OTHER", None).await;
    let other_aircraft = dbx_testkit::Fixture::aircraft(&env.client, other.id, "N900OT").await;
    let base = now_micros() - 3600 * 1_000_000;
    let theirs = Uuid::new_v4();
    let mut gw = TestGateway::hello_within(env.daemon.tcp, &other.key, Duration::from_secs(5))
        .await
        .0;
    gw.send_batch(
        1,
        &AircraftRef::Id(other_aircraft),
        theirs,
        &points(5, 0, base),
        PointForm::Map,
    )
    .await;
    assert_eq!(gw.await_verdicts(1).await, (1, vec![]));
    drop(gw);
    env.daemon.signal(libc::SIGTERM);
    env.daemon.wait(Duration::from_secs(20)).await;

    // The planted segment: all three records say they were accepted for env.org.
    let (stolen, good) = (Uuid::new_v4(), Uuid::new_v4());
    let claims = [
        (other_aircraft, stolen, 100), // another organization's aircraft
        (env.aircraft, theirs, 200),   // another organization's session
        (env.aircraft, good, 300),     // its own: written
    ];
    let id = segment::list(spool.path())
        .unwrap()
        .last()
        .map_or(0, |s| s.id + 1);
    let mut w = SegmentWriter::create(spool.path(), id, now_micros()).unwrap();
    let mut framed = Vec::new();
    for (aircraft, session, seq) in claims {
        let mut payload = Vec::new();
        let pts = points(5, seq, base + 1_000_000);
        encode_batch(
            env.org.id,
            aircraft,
            session,
            &pts,
            now_micros(),
            &mut payload,
        );
        frame_record(&payload, &mut framed);
    }
    w.append(&framed).unwrap();
    drop(w);

    env.daemon = Daemon::start(dbx_bin(), &env.ingest_url, &daemon_env).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            env.metric("dbx_spool_rejected_records_total", "").await >= 2.0
                && segment_files(spool.path()) == 0
        })
        .await,
        "the planted records were not refused into rejected/:\n{}",
        env.daemon.log()
    );
    let reasons =
        dbx_spool::rejected::read_reasons(&spool.path().join(dbx_spool::rejected::DIR)).unwrap();
    let mut codes: Vec<(String, Uuid)> = reasons
        .iter()
        .map(|r| (r.code.clone(), r.session_id))
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        vec![
            ("foreign_session".to_string(), theirs),
            ("unknown_aircraft".to_string(), stolen)
        ]
    );
    assert!(reasons.iter().all(|r| r.org_id == env.org.id));
    // Never written: no row under the stolen aircraft, the other tenant's session untouched.
    let client = &env.client;
    assert_eq!(rows(client, &[stolen]).await, (0, 0));
    assert_eq!(rows(client, &[theirs]).await, (5, 5));
    assert_eq!(rows(client, &[good]).await, (5, 5));
    let sessions: i64 = client
        .query_one(
            "SELECT count(*) FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&stolen],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sessions, 0);
    let owner: Uuid = client
        .query_one(
            "SELECT org_id FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&theirs],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, other.id);
}
