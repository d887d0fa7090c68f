//! The legitimate gateway of the hostile-peers test: one batch of 20 points every
//! `pace`, up to 8 unacked, on its own OS thread and runtime (so the attackers' tasks in
//! the test process cannot delay it). It keeps every batch until acked and resends the
//! unacked ones on a new connection if it loses one (on new batch seqs), and records
//! when each batch was first sent and when its ack arrived.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dbx_core::Point;
use dbx_proto::{AircraftRef, EncodeOptions, PointForm, ServerMessage};
use dbx_testkit::gateway::{now_micros, points, Polled};
use dbx_testkit::TestGateway;
use uuid::Uuid;

const POINTS_PER_BATCH: usize = 20;
const WINDOW: usize = 8;

#[derive(Default)]
struct Log {
    /// Per batch: its points, when first sent, when acked.
    batches: Vec<(Vec<Point>, Instant, Option<Instant>)>,
    /// Every ack's arrival, in order.
    acks: Vec<Instant>,
}

/// The gateway's ack figures over a window of time.
#[derive(Debug)]
pub struct Stats {
    /// Acks that arrived in the window.
    pub acks: usize,
    /// p99 of send → ack of the batches acked in the window.
    pub p99: Duration,
    /// The longest time without an ack in the window (its edges count).
    pub max_gap: Duration,
}

/// A running legitimate gateway.
pub struct Legit {
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    session: Uuid,
}

impl Legit {
    /// Starts streaming to `addr`.
    pub fn start(addr: SocketAddr, key: String, aircraft: Uuid, pace: Duration) -> Legit {
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let session = Uuid::new_v4();
        let (l, s) = (log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(run(addr, key, aircraft, session, pace, l, s))
        });
        Legit {
            log,
            stop,
            thread: Mutex::new(Some(thread)),
            session,
        }
    }

    /// The flight session it streams into.
    pub fn session(&self) -> Uuid {
        self.session
    }

    fn acks(&self) -> usize {
        self.log.lock().unwrap().acks.len()
    }

    /// Waits until `n` acks have arrived.
    pub async fn wait_for_acks(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.acks() < n {
            assert!(
                Instant::now() < deadline,
                "the gateway got {} acks",
                self.acks()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ack figures between `from` and `to`.
    pub fn window(&self, from: Instant, to: Instant) -> Stats {
        let log = self.log.lock().unwrap();
        let acks: Vec<Instant> = log
            .acks
            .iter()
            .copied()
            .filter(|t| *t >= from && *t <= to)
            .collect();
        let mut edges = vec![from];
        edges.extend(&acks);
        edges.push(to);
        let max_gap = edges
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        let mut latencies: Vec<Duration> = log
            .batches
            .iter()
            .filter_map(|(_, sent, acked)| {
                acked.filter(|a| *a >= from && *a <= to).map(|a| a - *sent)
            })
            .collect();
        latencies.sort();
        let p99 = latencies
            .get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default();
        Stats {
            acks: acks.len(),
            p99,
            max_gap,
        }
    }

    /// How long after `t` the first ack arrived, waiting up to `within`.
    pub async fn first_ack_after(&self, t: Instant, within: Duration) -> Option<Duration> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(a) = self.log.lock().unwrap().acks.iter().find(|a| **a > t) {
                return Some(*a - t);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops sending, waits until everything sent is acked; the points acked.
    pub async fn finish(&self, within: Duration) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.lock().unwrap().take();
        if let Some(t) = thread {
            let done = tokio::task::spawn_blocking(move || t.join());
            tokio::time::timeout(within, done)
                .await
                .expect("the gateway finished in time")
                .unwrap()
                .expect("the gateway thread did not panic");
        }
        let log = self.log.lock().unwrap();
        assert!(
            log.batches.iter().all(|b| b.2.is_some()),
            "unacked batches left"
        );
        log.batches.iter().map(|b| b.0.len() as u64).sum()
    }
}

/// The next batch to (re)send: the first one not acked and not in flight.
fn next_batch(log: &Log, inflight: &BTreeMap<u64, usize>) -> Option<usize> {
    (0..log.batches.len())
        .find(|i| log.batches[*i].2.is_none() && !inflight.values().any(|v| v == i))
}

async fn run(
    addr: SocketAddr,
    key: String,
    aircraft: Uuid,
    session: Uuid,
    pace: Duration,
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let done = {
            let l = log.lock().unwrap();
            stop.load(Ordering::Relaxed) && l.batches.iter().all(|b| b.2.is_some())
        };
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "the gateway gave up");
        let Ok(Ok(tcp)) =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tcp.set_nodelay(true).ok();
        let mut g = TestGateway::over(Box::new(tcp));
        g.send_hello(&key).await;
        if !matches!(
            g.recv_within(Duration::from_secs(5)).await,
            Some(ServerMessage::Welcome { .. })
        ) {
            continue;
        }
        connection(&mut g, aircraft, session, pace, &log, &stop).await;
    }
}

/// The next batch to send on this connection (a resend, or a new one when it is due),
/// encoded with batch seq `seq`; `None` when there is nothing to send now.
fn next_frame(
    log: &Mutex<Log>,
    inflight: &BTreeMap<u64, usize>,
    stop: &AtomicBool,
    next_new: &mut Instant,
    pace: Duration,
    (seq, aircraft, session): (u64, Uuid, Uuid),
) -> Option<(usize, BytesMut)> {
    let mut l = log.lock().unwrap();
    let idx = match next_batch(&l, inflight) {
        Some(i) => i,
        None if !stop.load(Ordering::Relaxed) && Instant::now() >= *next_new => {
            let i = l.batches.len();
            let pts = points(
                POINTS_PER_BATCH,
                (i * POINTS_PER_BATCH) as i64,
                now_micros(),
            );
            l.batches.push((pts, Instant::now(), None));
            *next_new += pace;
            i
        }
        None => return None,
    };
    let mut b = BytesMut::new();
    dbx_proto::encode_batch_with(
        &mut b,
        seq,
        &AircraftRef::Id(aircraft),
        session,
        &l.batches[idx].0,
        EncodeOptions::from(PointForm::Map),
    )
    .unwrap();
    Some((idx, b))
}

/// One connection's life: send on schedule, collect acks, until it breaks or all is done.
async fn connection(
    g: &mut TestGateway,
    aircraft: Uuid,
    session: Uuid,
    pace: Duration,
    log: &Mutex<Log>,
    stop: &AtomicBool,
) {
    let mut inflight: BTreeMap<u64, usize> = BTreeMap::new();
    let mut seq = 0u64;
    let mut next_new = Instant::now();
    loop {
        while inflight.len() < WINDOW {
            let ids = (seq + 1, aircraft, session);
            let Some((idx, frame)) = next_frame(log, &inflight, stop, &mut next_new, pace, ids)
            else {
                break;
            };
            seq += 1;
            if g.send_raw_checked(&frame).await.is_err() {
                return;
            }
            inflight.insert(seq, idx);
        }
        let done = stop.load(Ordering::Relaxed) && inflight.is_empty();
        if done && next_batch(&log.lock().unwrap(), &inflight).is_none() {
            return;
        }
        let wait = next_new
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let wait = if inflight.is_empty() {
            wait
        } else {
            wait.min(Duration::from_millis(50))
        };
        match g.poll(wait).await {
            Polled::Message(ServerMessage::Ack { seq: upto }) => {
                let now = Instant::now();
                let mut l = log.lock().unwrap();
                l.acks.push(now);
                let done: Vec<u64> = inflight.range(..=upto).map(|(s, _)| *s).collect();
                for s in done {
                    let i = inflight.remove(&s).expect("in flight");
                    l.batches[i].2 = Some(now);
                }
            }
            Polled::Message(ServerMessage::Nack { seq, msg, .. }) => {
                panic!("batch {seq} nacked: {msg}")
            }
            Polled::Message(other) => panic!("unexpected {other:?}"),
            Polled::Closed => return,
            Polled::Nothing => {}
        }
    }
}
