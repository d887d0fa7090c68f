//! The load generator: a simulated gateway fleet built on this crate's client ([`Client`]
//! and [`Resend`] over TCP/TLS, [`UdpSender`] over UDP; MQTT through rumqttc).
//!
//! Each gateway is one task with one connection, flying `aircraft_per_gateway`
//! aircraft (one [`FlightSim`] each) and sending their points in batches, round
//! robin. Up to `window` batches are in flight; acks release them and give the ack
//! latency (batch written → ack covering it received). With a target rate, sends
//! are paced; without one, the window alone limits the pace ("as fast as acks
//! allow"); a paced fleet's gateways start spread evenly over one batch interval. One task
//! per gateway: ten thousand gateways are ten thousand tasks and sockets (the process's
//! open-files limit must allow them). When a connection breaks or the server says `error`, the gateway
//! reconnects with backoff and resends every unacked batch first, on new batch
//! seqs — the daemon drops what it already stored, so the table ends up with each
//! point exactly once. A `nack` is final: the batch is counted and never resent.
//!
//! A TCP/TLS gateway ends each flight's session with `end` (protocol 1.1) when the
//! flight lands, and every flight still in the air when the run is over; an unacked
//! `end` is resent like a batch. A run stopped early (Ctrl-C), and UDP, which has no
//! `end`, leave their sessions to the daemon's idle timeout.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dbx_core::sync::lock;
use dbx_core::{now_micros, Point, Shutdown};
use dbx_proto::{AircraftRef, EncodeOptions, PointForm};
use hdrhistogram::Histogram;
use serde::Serialize;
use uuid::Uuid;

use crate::sim::FlightSim;
use crate::{Answer, Client, ClientError, ConnectOptions, Outgoing, Resend, Tls, UdpSender};

mod mqtt;
pub use crate::udp::UdpAuth;
pub use mqtt::MqttTarget;

/// How the fleet talks to the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Plain TCP, acknowledged.
    Tcp,
    /// TCP with TLS, acknowledged.
    Tls,
    /// UDP datagrams, fire-and-forget.
    Udp,
    /// MQTT 5 QoS 1 messages through a broker ("acked" = taken by the broker).
    Mqtt,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct LoadgenConfig {
    /// The daemon's address (TCP, TLS or UDP port per `transport`).
    pub addr: SocketAddr,
    /// Transport.
    pub transport: Transport,
    /// TLS: the server name to verify and the CA certificate (PEM) to trust.
    pub tls: Option<(String, std::path::PathBuf)>,
    /// The API key.
    pub key: String,
    /// Registration numbers the fleet flies (cycled when there are more aircraft than names).
    pub aircraft: Vec<String>,
    /// Gateways (connections).
    pub gateways: usize,
    /// Aircraft per gateway.
    pub aircraft_per_gateway: usize,
    /// Points per batch.
    pub batch_points: usize,
    /// Unacked batches allowed per gateway.
    pub window: usize,
    /// Target rate over the whole fleet, points/s; `None` = as fast as acks allow.
    pub rate: Option<f64>,
    /// How long to generate.
    pub duration: Duration,
    /// Acks of batches sent in the first `warmup` of the run are counted but left out of
    /// the latency percentiles: a fleet starting at once spends its first seconds
    /// connecting and having every session looked up, which is not its steady state.
    pub warmup: Duration,
    /// Stop after this many points in total (exact, across the fleet), if set.
    pub total_points: Option<u64>,
    /// Map or array points.
    pub form: PointForm,
    /// Seed for the flights.
    pub seed: u64,
    /// The broker, for [`Transport::Mqtt`].
    pub mqtt: Option<MqttTarget>,
    /// UDP only: the MAC form or the key in clear.
    pub udp_auth: UdpAuth,
}

/// Counters shared by the fleet and the progress display.
#[derive(Debug, Default)]
pub struct Stats {
    /// Points written to sockets (first sends only).
    pub sent: AtomicU64,
    /// Points acknowledged.
    pub acked: AtomicU64,
    /// Points in nacked batches.
    pub nacked: AtomicU64,
    /// Points sent again after a reconnect.
    pub resent: AtomicU64,
    /// Batches sent.
    pub batches: AtomicU64,
    /// Reconnects.
    pub reconnects: AtomicU64,
    /// Flight sessions ended with an acknowledged `end`.
    pub sessions_ended: AtomicU64,
    latency: Mutex<Option<Histogram<u64>>>,
    /// Batches sent before this instant are left out of `latency` (the warm-up).
    latency_from: std::sync::OnceLock<Instant>,
    /// First fatal error (e.g. the key was refused).
    pub fatal: Mutex<Option<String>>,
}

impl Stats {
    fn record_latency(&self, d: Duration) {
        let mut h = lock(&self.latency);
        let h =
            h.get_or_insert_with(|| Histogram::new_with_bounds(1, 600_000_000, 3).expect("bounds"));
        let _ = h.record((d.as_micros() as u64).max(1));
    }

    /// Counts one answer of the daemon: acked points and their latency, ended sessions,
    /// nacked points (a nack is final: the batch is never resent).
    fn count(&self, answer: Answer<()>) {
        match answer {
            Answer::Acked(sent) => {
                for s in sent {
                    if let Outgoing::End { .. } = s.msg {
                        self.sessions_ended.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let n = s.msg.points().len() as u64;
                    self.acked.fetch_add(n, Ordering::Relaxed);
                    if self
                        .latency_from
                        .get()
                        .is_none_or(|from| s.sent_at >= *from)
                    {
                        self.record_latency(s.sent_at.elapsed());
                    }
                }
            }
            Answer::Nacked {
                sent, code, msg, ..
            } => {
                let n = sent.msg.points().len() as u64;
                self.nacked.fetch_add(n, Ordering::Relaxed);
                let what = match sent.msg {
                    Outgoing::End { .. } => "end",
                    Outgoing::Batch { .. } => "batch",
                };
                tracing::warn!(seq = sent.seq, %code, "{what} nacked: {msg}");
            }
            Answer::Pong => {}
        }
    }

    /// Ack latency percentile in milliseconds (0 when nothing was acked yet).
    pub fn latency_ms(&self, q: f64) -> f64 {
        let h = lock(&self.latency);
        h.as_ref()
            .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0)
    }
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Transport used.
    pub transport: Transport,
    /// Gateways.
    pub gateways: usize,
    /// Aircraft flown.
    pub aircraft: usize,
    /// Points per batch.
    pub batch_points: usize,
    /// Window per gateway.
    pub window: usize,
    /// Target rate (points/s), if any.
    pub target_rate: Option<f64>,
    /// Wall time from the first send to the last verdict, seconds.
    pub duration_secs: f64,
    /// The first seconds of the run left out of `latency_ms` (see [`LoadgenConfig::warmup`]).
    pub warmup_secs: f64,
    /// Points generated and sent.
    pub points_sent: u64,
    /// Points acknowledged (TCP/TLS).
    pub points_acked: u64,
    /// Points in nacked batches.
    pub points_nacked: u64,
    /// Points sent again after reconnects.
    pub points_resent: u64,
    /// Batches sent.
    pub batches_sent: u64,
    /// Reconnects.
    pub reconnects: u64,
    /// Flight sessions ended with an acknowledged `end`.
    pub sessions_ended: u64,
    /// Acked points per second (sent per second for UDP).
    pub throughput_per_sec: f64,
    /// Ack latency percentiles, milliseconds.
    pub latency_ms: Latency,
    /// A fatal error, if the run stopped on one.
    pub error: Option<String>,
}

/// Ack latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "loadgen: {} gateways × {} aircraft over {:?}, batches of {}, window {}",
            self.gateways,
            self.aircraft / self.gateways.max(1),
            self.transport,
            self.batch_points,
            self.window
        )?;
        writeln!(f, "  duration       {:.1} s", self.duration_secs)?;
        writeln!(f, "  points sent    {}", self.points_sent)?;
        writeln!(f, "  points acked   {}", self.points_acked)?;
        writeln!(f, "  points nacked  {}", self.points_nacked)?;
        writeln!(
            f,
            "  resent         {} points over {} reconnects",
            self.points_resent, self.reconnects
        )?;
        writeln!(f, "  sessions ended {}", self.sessions_ended)?;
        writeln!(
            f,
            "  throughput     {:.0} points/s",
            self.throughput_per_sec
        )?;
        write!(
            f,
            "  ack latency    p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            self.latency_ms.p50, self.latency_ms.p90, self.latency_ms.p99, self.latency_ms.max
        )?;
        if self.warmup_secs > 0.0 {
            write!(
                f,
                " (batches sent after the first {:.0} s)",
                self.warmup_secs
            )?;
        }
        if let Some(e) = &self.error {
            write!(f, "\n  stopped on     {e}")?;
        }
        Ok(())
    }
}

/// A batch, or the `end` of a session, kept until acked.
#[derive(Debug)]
struct Pending {
    aircraft: String,
    session: Uuid,
    /// Empty for an `end`.
    points: Vec<Point>,
    /// The `end` of `session` rather than a batch.
    end: bool,
}

impl From<Pending> for Outgoing {
    fn from(p: Pending) -> Outgoing {
        if p.end {
            Outgoing::End { session: p.session }
        } else {
            Outgoing::Batch {
                aircraft: AircraftRef::Registration(p.aircraft),
                session: p.session,
                points: p.points,
            }
        }
    }
}

/// A fleet's share of a total.
fn share(total: u64, parts: usize, i: usize) -> u64 {
    let parts = parts as u64;
    total / parts + u64::from((i as u64) < total % parts)
}

/// Runs the fleet until the duration (or point total) is reached and every batch
/// has a verdict, or `stop` fires. Progress goes to `stats` as it happens.
pub async fn run(config: LoadgenConfig, stats: Arc<Stats>, stop: Shutdown) -> Summary {
    let config = Arc::new(config);
    let started = Instant::now();
    if !config.warmup.is_zero() {
        let _ = stats.latency_from.set(started + config.warmup);
    }
    let tls = match (&config.transport, &config.tls) {
        (Transport::Tls, Some((name, ca))) => match Tls::from_ca_file(ca, name) {
            Ok(tls) => Some(tls),
            Err(e) => {
                *lock(&stats.fatal) = Some(format!("--tls-ca {e}"));
                None
            }
        },
        _ => None,
    };
    let failed = lock(&stats.fatal).is_some();
    let mut tasks = Vec::new();
    if !failed {
        for g in 0..config.gateways {
            let config = config.clone();
            let stats = stats.clone();
            let stop = stop.clone();
            let tls = tls.clone();
            let quota = config.total_points.map(|t| share(t, config.gateways, g));
            let aircraft: Vec<FlightSim> = (0..config.aircraft_per_gateway)
                .map(|a| {
                    let i = g * config.aircraft_per_gateway + a;
                    let reg = config.aircraft[i % config.aircraft.len()].clone();
                    FlightSim::new(
                        reg,
                        config.seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
                    )
                })
                .collect();
            tasks.push(tokio::spawn(async move {
                match config.transport {
                    Transport::Udp => udp_gateway(config, aircraft, quota, stats, stop).await,
                    Transport::Mqtt => mqtt::gateway(config, g, aircraft, quota, stats, stop).await,
                    _ => tcp_gateway(config, g, aircraft, quota, tls, stats, stop).await,
                }
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let acked = stats.acked.load(Ordering::Relaxed);
    let sent = stats.sent.load(Ordering::Relaxed);
    let lat = |q| stats.latency_ms(q);
    Summary {
        transport: config.transport,
        gateways: config.gateways,
        aircraft: config.gateways * config.aircraft_per_gateway,
        batch_points: config.batch_points,
        window: config.window,
        target_rate: config.rate,
        duration_secs: secs,
        warmup_secs: config.warmup.as_secs_f64(),
        points_sent: sent,
        points_acked: acked,
        points_nacked: stats.nacked.load(Ordering::Relaxed),
        points_resent: stats.resent.load(Ordering::Relaxed),
        batches_sent: stats.batches.load(Ordering::Relaxed),
        reconnects: stats.reconnects.load(Ordering::Relaxed),
        sessions_ended: stats.sessions_ended.load(Ordering::Relaxed),
        throughput_per_sec: if config.transport == Transport::Udp {
            sent as f64 / secs
        } else {
            acked as f64 / secs
        },
        latency_ms: Latency {
            p50: lat(0.5),
            p90: lat(0.9),
            p99: lat(0.99),
            max: lat(1.0),
        },
        error: lock(&stats.fatal).clone(),
    }
}

/// Paces one gateway to its share of the target rate.
struct Pacer {
    per_point: Option<Duration>,
    next: Instant,
}

impl Pacer {
    fn new(rate: Option<f64>, gateways: usize) -> Self {
        Pacer {
            per_point: rate
                .filter(|r| *r > 0.0)
                .map(|r| Duration::from_secs_f64(gateways as f64 / r)),
            next: Instant::now(),
        }
    }

    /// Gateway `index` of `gateways`, sending `batch` points at a time, starts its first
    /// batch `index / gateways` of a batch interval late: a paced fleet's batches are spread
    /// evenly over the interval, as a real fleet's are, instead of arriving all at once every
    /// interval. The instant to start at; `None` unpaced (no wait).
    fn stagger(&mut self, index: usize, gateways: usize, batch: usize) -> Option<Instant> {
        let interval = self.per_point? * batch.max(1) as u32;
        self.next = Instant::now() + interval.mul_f64(index as f64 / gateways.max(1) as f64);
        Some(self.next)
    }

    fn ready(&self) -> bool {
        self.per_point.is_none() || Instant::now() >= self.next
    }

    fn sent(&mut self, points: usize) {
        if let Some(p) = self.per_point {
            // Bank at most 50 ms of credit after a stall: a gateway at a fixed rate does
            // not answer a hiccup with a burst of a whole second's points.
            self.next =
                self.next.max(Instant::now() - Duration::from_millis(50)) + p * points as u32;
        }
    }
}

/// Generates the next batch of a gateway, round robin over its aircraft, and the
/// `end`s of their sessions (when a flight lands, and for every flight still flying
/// once the points are all generated) when `ends` is set.
struct Generator {
    aircraft: Vec<FlightSim>,
    next: usize,
    left: Option<u64>,
    deadline: Instant,
    batch: usize,
    ends: bool,
    /// Ends due, sent before any further batch.
    due_ends: VecDeque<Pending>,
    /// The ends of the flights still flying were queued (after the last point).
    closed: bool,
}

impl Generator {
    fn new(
        aircraft: Vec<FlightSim>,
        config: &LoadgenConfig,
        quota: Option<u64>,
        batch: usize,
    ) -> Self {
        Generator {
            aircraft,
            next: 0,
            left: quota,
            deadline: Instant::now() + config.duration,
            batch,
            // Only the TCP protocol has `end`; UDP and MQTT sessions end by the idle timeout.
            ends: matches!(config.transport, Transport::Tcp | Transport::Tls),
            due_ends: VecDeque::new(),
            closed: false,
        }
    }

    /// Every point generated.
    fn points_done(&self) -> bool {
        self.left == Some(0) || Instant::now() >= self.deadline
    }

    /// Every point generated and every end handed out.
    fn done(&self) -> bool {
        self.points_done() && self.due_ends.is_empty() && (self.closed || !self.ends)
    }

    /// Stops at once: no more points, and the flights flying are left to the idle timeout.
    fn abandon(&mut self) {
        self.left = Some(0);
        self.due_ends.clear();
        self.closed = true;
    }

    fn end_of(sim: &FlightSim) -> Pending {
        Pending {
            aircraft: sim.registration.clone(),
            session: sim.session,
            points: Vec::new(),
            end: true,
        }
    }

    fn next_batch(&mut self) -> Option<Pending> {
        if let Some(end) = self.due_ends.pop_front() {
            return Some(end);
        }
        if self.points_done() {
            if self.ends && !self.closed {
                self.closed = true;
                let flying = self.aircraft.iter().filter(|a| a.flying());
                self.due_ends.extend(flying.map(Self::end_of));
                return self.due_ends.pop_front();
            }
            return None;
        }
        let n = self
            .left
            .map_or(self.batch, |l| (l as usize).min(self.batch));
        let i = self.next % self.aircraft.len();
        self.next += 1;
        let sim = &mut self.aircraft[i];
        let (session, points) = sim.next_batch(n, now_micros());
        if let Some(l) = &mut self.left {
            *l -= points.len() as u64;
        }
        if self.ends && sim.landed() {
            self.due_ends.push_back(Self::end_of(sim));
        }
        Some(Pending {
            aircraft: sim.registration.clone(),
            session,
            points,
            end: false,
        })
    }
}

/// One TCP/TLS gateway: connects (with backoff), sends first what the last connection
/// left unanswered, keeps up to `window` messages in flight, and says `bye` once every
/// point is generated and answered.
#[allow(clippy::too_many_arguments)]
async fn tcp_gateway(
    config: Arc<LoadgenConfig>,
    index: usize,
    aircraft: Vec<FlightSim>,
    quota: Option<u64>,
    tls: Option<Tls>,
    stats: Arc<Stats>,
    mut stop: Shutdown,
) {
    let options = ConnectOptions {
        tls,
        gateway: Some(format!("dbx-loadgen/{index}")),
        encode: EncodeOptions::from(config.form),
        ..ConnectOptions::default()
    };
    let mut gw = TcpGateway {
        generator: Generator::new(aircraft, &config, quota, config.batch_points.max(1)),
        pacer: Pacer::new(config.rate, config.gateways),
        resend: Resend::default(),
        window: config.window,
        stopped: false,
        backoff: Duration::from_millis(100),
        stats,
    };
    // A paced fleet also connects spread over one batch interval: thousands of gateways
    // would otherwise all handshake in the same millisecond.
    if let Some(start) = gw
        .pacer
        .stagger(index, config.gateways, config.batch_points)
    {
        tokio::select! {
            _ = stop.recv() => return,
            _ = tokio::time::sleep_until(start.into()) => {}
        }
    }
    while !gw.stopped && !gw.all_sent() {
        let client = match Client::connect(config.addr, &config.key, &options).await {
            Ok(client) => client,
            Err(e) if e.is_fatal() => return gw.fatal(e.to_string()),
            Err(e) => {
                tracing::debug!(error = %e, "loadgen connect failed; retrying");
                gw.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = stop.recv() => return,
                    _ = tokio::time::sleep(gw.backoff) => {}
                }
                gw.backoff = (gw.backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        gw.backoff = Duration::from_millis(100);
        match gw.connection(client, &mut stop).await {
            Ok(()) => return,
            Err(Some(fatal)) => return gw.fatal(fatal),
            Err(None) => tokio::time::sleep(gw.backoff).await,
        }
    }
}

/// What a TCP/TLS gateway keeps across its connections.
struct TcpGateway {
    generator: Generator,
    pacer: Pacer,
    /// What lost connections left unanswered, sent first on the next.
    resend: Resend<()>,
    window: usize,
    /// `stop` fired: no new points; what is in flight may still be answered.
    stopped: bool,
    backoff: Duration,
    stats: Arc<Stats>,
}

impl TcpGateway {
    /// Every point generated and nothing left to resend.
    fn all_sent(&self) -> bool {
        self.generator.done() && self.resend.is_empty()
    }

    fn fatal(&self, msg: String) {
        *lock(&self.stats.fatal) = Some(msg);
    }

    /// Drives one connection: `Ok` when the gateway is done (bye sent, or stopped and
    /// drained for 30 s), `Err(None)` when the connection was lost (its unanswered
    /// messages are queued for the next), `Err(Some(_))` on a fatal error.
    async fn connection(
        &mut self,
        mut client: Client,
        stop: &mut Shutdown,
    ) -> Result<(), Option<String>> {
        let mut draining_since: Option<Instant> = None;
        loop {
            self.fill_window(&mut client).await.map_err(Some)?;
            if client.in_flight() == 0 && self.all_sent() {
                let _ = tokio::time::timeout(Duration::from_secs(5), client.bye()).await;
                return Ok(());
            }
            let wake = (client.in_flight() < self.window).then_some(self.pacer.next);
            if self.stopped && draining_since.is_none() {
                draining_since = Some(Instant::now());
            }
            if draining_since.is_some_and(|t| t.elapsed() > Duration::from_secs(30)) {
                return Ok(());
            }
            tokio::select! {
                answer = client.recv() => match answer {
                    Ok(answer) => self.stats.count(answer),
                    Err(e) => {
                        match e.server_code() {
                            Some(code) => tracing::info!(%code, "server closed the connection: {e}; reconnecting"),
                            None => tracing::debug!(error = %e, "connection lost; reconnecting"),
                        }
                        self.resend.lost(client);
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        return Err(None);
                    }
                },
                _ = sleep_until(wake) => {}
                _ = stop.recv(), if !self.stopped => {
                    self.stopped = true;
                    self.generator.abandon();
                }
            }
        }
    }

    /// Sends while the window has room and something is due: resends first, then new
    /// batches as the pacer allows. A failed write stops sending; the next read reports
    /// the lost connection (after the answers already received).
    async fn fill_window(&mut self, client: &mut Client) -> Result<(), String> {
        while client.in_flight() < self.window && !self.stopped {
            let (msg, first) = if let Some((msg, ())) = self.resend.pop() {
                (msg, false)
            } else if self.pacer.ready() {
                match self.generator.next_batch() {
                    Some(batch) => (Outgoing::from(batch), true),
                    None => break,
                }
            } else {
                break;
            };
            let n = msg.points().len();
            if first {
                self.stats.sent.fetch_add(n as u64, Ordering::Relaxed);
                self.pacer.sent(n);
            } else {
                self.stats.resent.fetch_add(n as u64, Ordering::Relaxed);
            }
            if matches!(msg, Outgoing::Batch { .. }) {
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
            }
            match client.send(msg, ()).await {
                Ok(_) => {}
                Err(ClientError::Encode(e)) => return Err(format!("cannot encode a batch: {e}")),
                Err(_) => break,
            }
        }
        Ok(())
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn udp_gateway(
    config: Arc<LoadgenConfig>,
    aircraft: Vec<FlightSim>,
    quota: Option<u64>,
    stats: Arc<Stats>,
    mut stop: Shutdown,
) {
    let opts = EncodeOptions::from(config.form);
    let mut udp = match UdpSender::bind(config.addr, &config.key, config.udp_auth, opts).await {
        Ok(s) => s,
        Err(e) => {
            *lock(&stats.fatal) = Some(format!("udp bind: {e}"));
            return;
        }
    };
    // A datagram holds at most 65 507 bytes: keep batches small.
    let mut generator = Generator::new(aircraft, &config, quota, config.batch_points.clamp(1, 200));
    let mut pacer = Pacer::new(config.rate, config.gateways);
    let mut seq = 0u64;
    while let Some(batch) = next_paced(&mut pacer, &mut generator, &mut stop).await {
        seq += 1;
        let aircraft = AircraftRef::Registration(batch.aircraft);
        let sent = udp.send(Some(seq), &aircraft, batch.session, &batch.points);
        if sent.await.is_ok() {
            stats
                .sent
                .fetch_add(batch.points.len() as u64, Ordering::Relaxed);
            stats.batches.fetch_add(1, Ordering::Relaxed);
        }
        pacer.sent(batch.points.len());
        if stop.is_shutdown() {
            return;
        }
        if config.rate.is_none() {
            // Unpaced UDP would only measure the kernel's drop rate; yield between sends.
            tokio::task::yield_now().await;
        }
    }
}

/// The next batch once the pacer allows it; `None` when the generator is done or
/// `stop` fired while waiting.
async fn next_paced(
    pacer: &mut Pacer,
    generator: &mut Generator,
    stop: &mut Shutdown,
) -> Option<Pending> {
    if !pacer.ready() {
        tokio::select! {
            _ = stop.recv() => return None,
            _ = tokio::time::sleep_until(pacer.next.into()) => {}
        }
    }
    generator.next_batch()
}

/// Prints progress every `every` until `stop`: a live line on a terminal
/// (indicatif), plain lines otherwise.
pub async fn progress(stats: Arc<Stats>, every: Duration, mut stop: Shutdown) {
    use std::io::IsTerminal;
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(Duration::from_millis(120));
        Some(b)
    } else {
        None
    };
    let every = if bar.is_some() {
        Duration::from_millis(250)
    } else {
        every
    };
    let started = Instant::now();
    let mut last = (Instant::now(), 0u64);
    loop {
        tokio::select! {
            _ = stop.recv() => break,
            _ = tokio::time::sleep(every) => {}
        }
        let acked = stats.acked.load(Ordering::Relaxed);
        let sent = stats.sent.load(Ordering::Relaxed);
        // UDP has no acks: its progress is what was sent.
        let done = if acked > 0 { acked } else { sent };
        let rate = done.saturating_sub(last.1) as f64 / last.0.elapsed().as_secs_f64();
        last = (Instant::now(), done);
        let line = format!(
            "{:>5.1}s  sent {:>10}  acked {:>10}  nacked {:>6}  {:>9.0} points/s  ack p50 {:>6.1} ms  p99 {:>6.1} ms",
            started.elapsed().as_secs_f64(),
            sent,
            acked,
            stats.nacked.load(Ordering::Relaxed),
            rate,
            stats.latency_ms(0.5),
            stats.latency_ms(0.99)
        );
        match &bar {
            Some(b) => b.set_message(line),
            None => eprintln!("{line}"),
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Sent;

    #[test]
    fn a_paced_fleet_is_spread_over_one_batch_interval() {
        // 4 gateways at 40 points/s in all: 10 points/s each, a batch of 10 every second.
        let mut p = Pacer::new(Some(40.0), 4);
        let before = Instant::now();
        let start = p.stagger(1, 4, 10).expect("paced");
        let late = start.duration_since(before);
        assert!(
            late >= Duration::from_millis(249) && late <= Duration::from_millis(300),
            "{late:?}"
        );
        assert!(!p.ready());
        let mut first = Pacer::new(Some(40.0), 4);
        assert!(first.stagger(0, 4, 10).is_some());
        assert!(first.ready(), "gateway 0 starts at once");
        // Unpaced: no wait at all.
        assert!(Pacer::new(None, 4).stagger(3, 4, 10).is_none());
    }

    #[test]
    fn acks_of_the_warm_up_count_but_stay_out_of_the_percentiles() {
        let stats = Stats::default();
        let start = Instant::now();
        stats.latency_from.set(start).expect("set once");
        let batch = |sent_at: Instant| Sent {
            seq: 1,
            sent_at,
            msg: Outgoing::Batch {
                aircraft: AircraftRef::Registration("N1".into()),
                session: uuid::Uuid::nil(),
                points: (0..10).map(|i| Point::new(now_micros(), i)).collect(),
            },
            tag: (),
        };
        // Sent 5 s before the warm-up ended, acked now: counted, not timed.
        let early = start - Duration::from_secs(5);
        stats.count(Answer::Acked(vec![batch(early)]));
        assert_eq!(stats.acked.load(Ordering::Relaxed), 10);
        assert_eq!(stats.latency_ms(1.0), 0.0, "a warm-up batch was timed");
        // Sent after it: counted and timed (well under the 5 s of the early one).
        stats.count(Answer::Acked(vec![batch(Instant::now())]));
        assert_eq!(stats.acked.load(Ordering::Relaxed), 20);
        let max = stats.latency_ms(1.0);
        assert!(max > 0.0 && max < 1000.0, "{max}");
    }
}
