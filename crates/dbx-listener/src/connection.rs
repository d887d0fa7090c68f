//! One gateway connection, plain TCP or TLS: framing, the handshake, batches, and
//! acks delivered in order.
//!
//! [`Connection`] owns the socket and the framing (read a frame, write a message);
//! [`Handler`] runs the protocol over it. Each accepted batch goes to the batcher
//! with an [`AckHandle`]; the matching receiver joins a FIFO in `seq` order. The
//! handler awaits the front of that FIFO, and when it resolves, takes every entry
//! behind it that has resolved too and answers them with one cumulative `ack`
//! (and a `nack` for each rejected one, in order). A connection with
//! `max_inflight_batches` unanswered batches stops reading; so does one whose
//! batch is waiting for room in the batcher's queue, one whose organization is
//! over its rate limit, and one that finds the byte budget spent. That is the TCP
//! backpressure of docs/protocol.md.
//!
//! An `end` (protocol 1.1) takes its place in that FIFO like a batch and goes to the
//! batcher at once, behind its session's earlier batches; the batcher writes it with or
//! after them (see dbx-batcher's `ends`), so its ack usually comes with the last
//! batch's. No later batch of that session goes before the end's own verdict, so such a
//! batch finds the session completed (`session_closed`). Only its own session waits:
//! reading and the other sessions' batches go on, so a gateway ending one flight does
//! not stall its others (a whole-connection barrier here cost the daemon about 17 % of
//! its throughput).
//!
//! Hostile peers (docs/protocol.md, 1.1): before `welcome` a frame may be at most
//! `max_hello_bytes` and only its hello keys are decoded ([`dbx_proto::decode_hello`]);
//! the TLS handshake and the hello share one `handshake_timeout`. After it every frame
//! is charged against the byte budget before its body is buffered
//! ([`crate::budget`]). Reads never take more than the frame in hand plus
//! [`LOOKAHEAD`] bytes, and a connection waiting for data holds no room for it. Every write gives up
//! after `write_timeout`, and once shutdown has begun at the drain deadline, so a peer
//! that does not read can hold neither its connection nor the daemon's shutdown.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Poll};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout_at};
use uuid::Uuid;

use crate::metrics as m;
use ::metrics::{Counter, Histogram};
use dbx_core::{
    now_micros, AckHandle, AckReceiver, BatchOrigin, BatchOutcome, InternalEvent, RejectCode,
    Rejection, Shutdown, TelemetryBatch,
};
use dbx_proto::codec::PREFIX_LEN;
use dbx_proto::{ClientMessage, DecodeError, FrameCodec, FrameError, Limits, ServerMessage};

use crate::audit::{HandshakeLog, HandshakeRecord};
use crate::auth::{AuthCache, KeyGrant};
use crate::budget::{ByteBudget, Charge};
use crate::events::{
    BatchRefused, BudgetExhausted, ConnectionFailed, HandshakeRefused, KeyRevoked, WriteTimedOut,
};
use crate::orgmetrics::{OrgCounters, OrgMetrics};
use crate::ratelimit::RateLimiter;
use crate::slots::Admitted;
use crate::ListenerConfig;

/// Bytes a read may take beyond the frame in hand (the start of the next ones): a few
/// small frames per read. They are not charged to the byte budget until their turn, and
/// a connection that stops reading (for budget, for room in the batcher's queue, for
/// acks) holds them meanwhile, so this is per connection what the budget does not
/// bound: at 8 KiB it was 78 MiB of 10 000 gateways' peak under overload (heaptrack,
/// benches/RESULTS.md "Width").
pub const LOOKAHEAD: usize = 2 * 1024;

/// How long a closing connection drains its peer's input so the peer reads the final
/// `error` rather than a reset (docs/protocol.md, "Framing").
const LINGER: Duration = Duration::from_secs(1);

/// One frame body, with the budget charge that covers it (after `welcome`).
#[derive(Debug)]
pub struct Frame {
    /// The body, without its length prefix.
    pub body: BytesMut,
    /// What the frame and its decoded batch may hold of the byte budget.
    pub charge: Option<Charge>,
}

/// The byte budget a connection charges its frames against, once in session.
#[derive(Debug)]
struct Session {
    budget: ByteBudget,
    limits: Limits,
}

/// A framed connection: reads frames, writes server messages, each write bounded.
#[derive(Debug)]
pub struct Connection<S> {
    stream: S,
    codec: FrameCodec,
    read_buf: BytesMut,
    /// `read_buf` is the allocation a read filled, no frame taken from it yet.
    fresh_read: bool,
    write_buf: BytesMut,
    /// The charge of the frame being read, kept across cancelled reads.
    charge: Option<Charge>,
    /// A frame's prefix is in and its charge is being waited for (the peer is not idle).
    waiting_for_budget: bool,
    session: Option<Session>,
    /// Bytes a read may take beyond the frame in hand: none before `welcome` (a
    /// pending connection buffers at most its hello), [`LOOKAHEAD`] after.
    lookahead: usize,
    write_timeout: Duration,
    /// Shutdown, observed during writes too (a blocked write must not outlive the drain).
    shutdown: Shutdown,
    drain_for: Duration,
    /// Set when shutdown began: no write or linger goes past it.
    drain_at: Option<tokio::time::Instant>,
    transport: &'static str,
}

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The length prefix or body broke the framing rules.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer closed in the middle of a frame.
    #[error("connection closed in the middle of a frame ({0} bytes buffered)")]
    Truncated(usize),
    /// A socket error.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// How a connection's writes are bounded.
#[derive(Debug, Clone)]
pub struct WriteLimits {
    /// Each write must complete within this.
    pub write_timeout: Duration,
    /// Signals shutdown; from then on writes end at the drain deadline.
    pub shutdown: Shutdown,
    /// Shutdown → drain deadline.
    pub drain_for: Duration,
    /// `tcp` or `tls`, for metrics.
    pub transport: &'static str,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps a stream; before [`Connection::enter_session`] it accepts frames up to
    /// `max_hello_bytes` and charges nothing.
    pub fn new(stream: S, max_hello_bytes: usize, writes: WriteLimits) -> Self {
        Connection {
            stream,
            codec: FrameCodec::for_hello(max_hello_bytes),
            read_buf: BytesMut::new(),
            fresh_read: false,
            write_buf: BytesMut::new(),
            charge: None,
            waiting_for_budget: false,
            session: None,
            lookahead: 0,
            write_timeout: writes.write_timeout,
            shutdown: writes.shutdown,
            drain_for: writes.drain_for,
            drain_at: None,
            transport: writes.transport,
        }
    }

    /// After `welcome`: frames up to `limits.max_frame_bytes`, each charged against
    /// `budget` before its body is buffered.
    pub fn enter_session(&mut self, budget: ByteBudget, limits: Limits) {
        self.codec = FrameCodec::new(limits.max_frame_bytes);
        self.session = Some(Session { budget, limits });
        self.lookahead = LOOKAHEAD;
    }

    /// The drain deadline: set now if shutdown had not been seen yet.
    pub fn begin_drain(&mut self) -> tokio::time::Instant {
        *self
            .drain_at
            .get_or_insert_with(|| tokio::time::Instant::now() + self.drain_for)
    }

    /// The next frame, or `None` when the peer closed cleanly between frames.
    /// Cancel-safe: bytes read stay in the buffer, a charge taken stays with the
    /// connection for the next call.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            let want = match self.codec.announced(&self.read_buf)? {
                Some(len) => {
                    self.charge_for(len).await;
                    let total = PREFIX_LEN + len;
                    if self.read_buf.len() >= total {
                        return Ok(Some(self.take_frame(total)));
                    }
                    total - self.read_buf.len()
                }
                None => PREFIX_LEN - self.read_buf.len(),
            };
            let n = if want > LOOKAHEAD {
                // The rest of a large frame (charged above) goes straight into its own
                // room, without lookahead: what is buffered is what was charged.
                self.read_buf.reserve(want);
                let mut limited = (&mut self.read_buf).limit(want);
                self.stream.read_buf(&mut limited).await?
            } else {
                self.read_some(want + self.lookahead).await?
            };
            self.fresh_read = true;
            if n == 0 {
                return if self.read_buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Truncated(self.read_buf.len()))
                };
            }
        }
    }

    /// Reads up to `take` bytes (at most 2 × [`LOOKAHEAD`]) and appends what came.
    ///
    /// The read goes into a buffer on the stack of the poll that completes it, and only
    /// what arrived is appended: a connection waiting for data holds none of the room a
    /// read may fill. Reserved in `read_buf` before the wait, that room was held by
    /// every quiet gateway (a 512-byte read) and by every one whose frame had arrived
    /// in part (the frame's rest plus LOOKAHEAD). Cancel-safe: a poll either appends
    /// what it read or reads nothing.
    async fn read_some(&mut self, take: usize) -> io::Result<usize> {
        let Connection {
            stream, read_buf, ..
        } = self;
        std::future::poll_fn(|cx| {
            let mut room = [MaybeUninit::<u8>::uninit(); 2 * LOOKAHEAD];
            let mut buf = ReadBuf::uninit(&mut room[..take.min(2 * LOOKAHEAD)]);
            ready!(Pin::new(&mut *stream).poll_read(cx, &mut buf))?;
            read_buf.extend_from_slice(buf.filled());
            Poll::Ready(Ok(buf.filled().len()))
        })
        .await
    }

    /// Charges a frame of `len` body bytes (once per frame), waiting for budget.
    async fn charge_for(&mut self, len: usize) {
        let Some(session) = &self.session else {
            return;
        };
        if self.charge.is_some() {
            return;
        }
        let bytes = PREFIX_LEN + len + dbx_proto::decoded_bytes_bound(len, &session.limits);
        let charge = match session.budget.try_acquire(bytes) {
            Some(c) => c,
            None => {
                BudgetExhausted {
                    transport: self.transport,
                }
                .emit();
                self.waiting_for_budget = true;
                session.budget.acquire(bytes).await
            }
        };
        self.waiting_for_budget = false;
        self.charge = Some(charge);
    }

    /// Whether the connection is waiting for byte budget for a frame it has begun to
    /// receive: such a peer is held back, not idle.
    pub fn waiting_for_budget(&self) -> bool {
        self.waiting_for_budget
    }

    /// Splits the next frame off the buffer, and moves what follows it out of the
    /// allocation the read filled: after the first frame of a read, and again once no
    /// whole frame is left (at most twice per read, never once per frame).
    ///
    /// Left in place, the rest of a read would keep the whole read's allocation alive
    /// while the connection waits between frames (for room in the batcher's queue, for
    /// budget or for acks), and the next read, finding the buffer shared, would
    /// allocate anew at its original size: before 92212c4, when the rest stayed with
    /// the frame, each connection under load held about 21 KiB outside the byte budget
    /// (207 MiB of 10 000 gateways' peak; heaptrack, benches/RESULTS.md "Width").
    /// Moved, it holds what is left of the read and no more. Not after every frame: a
    /// peer packing thousands of tiny frames into one read would have the rest copied
    /// once per frame; the frames after the first are split off the copy instead.
    fn take_frame(&mut self, total: usize) -> Frame {
        let mut body = self.read_buf.split_to(total);
        let _ = body.split_to(PREFIX_LEN);
        if std::mem::take(&mut self.fresh_read) || !self.holds_whole_frame() {
            self.read_buf = if self.read_buf.is_empty() {
                BytesMut::new()
            } else {
                BytesMut::from(&self.read_buf[..])
            };
        }
        Frame {
            body,
            charge: self.charge.take(),
        }
    }

    /// Whether the buffer holds a whole frame: the next [`Connection::read_frame`] takes
    /// it without reading.
    fn holds_whole_frame(&self) -> bool {
        matches!(
            self.codec.announced(&self.read_buf),
            Ok(Some(len)) if self.read_buf.len() >= PREFIX_LEN + len
        )
    }

    /// Writes one message and flushes it, within `write_timeout` (and the drain
    /// deadline once shutdown began).
    pub async fn write_message(&mut self, msg: &ServerMessage) -> io::Result<()> {
        self.write_buf.clear();
        dbx_proto::encode_server(msg, &mut self.write_buf);
        let Connection {
            stream,
            write_buf,
            shutdown,
            drain_at,
            drain_for,
            write_timeout,
            transport,
            ..
        } = self;
        let timeout_at = tokio::time::Instant::now() + *write_timeout;
        let write = async {
            stream.write_all(write_buf).await?;
            stream.flush().await
        };
        tokio::pin!(write);
        loop {
            let until = drain_at.map_or(timeout_at, |d| d.min(timeout_at));
            tokio::select! {
                biased;
                r = &mut write => return r,
                _ = sleep_until(until) => {
                    if until == timeout_at {
                        WriteTimedOut { transport, after: *write_timeout }.emit();
                    }
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "the peer does not read what the server writes"));
                }
                _ = shutdown.recv(), if drain_at.is_none() => {
                    *drain_at = Some(tokio::time::Instant::now() + *drain_for);
                }
            }
        }
    }

    /// Sends a connection-level `error` and closes politely: shut the write side,
    /// then discard input for up to a second so the peer reads the error rather
    /// than a reset (docs/protocol.md, "Framing").
    pub async fn close_with_error(mut self, code: RejectCode, msg: impl Into<String>) {
        let msg = ServerMessage::Error {
            code,
            msg: msg.into(),
        };
        if self.write_message(&msg).await.is_ok() {
            self.linger().await;
        }
    }

    /// Shuts the write side and drains input briefly before the socket is dropped;
    /// never past the drain deadline.
    pub async fn linger(&mut self) {
        let mut deadline = tokio::time::Instant::now() + LINGER;
        if let Some(d) = self.drain_at {
            deadline = deadline.min(d);
        }
        let stream = &mut self.stream;
        let _ = timeout_at(deadline, async {
            let _ = stream.shutdown().await;
            // On the heap, for the moment it is needed: an array here would be part of
            // every connection task's future, lingering or not (4 KiB of each of
            // 10 000 idle gateways).
            let mut sink = vec![0u8; 4096];
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}

/// Everything a connection handler shares with the server.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Listener settings.
    pub config: Arc<ListenerConfig>,
    /// Keys, aircraft, sessions.
    pub auth: Arc<AuthCache>,
    /// Per-organization buckets.
    pub limiter: Arc<RateLimiter>,
    /// The batcher's queue.
    pub batches: mpsc::Sender<TelemetryBatch>,
    /// api_requests recorder.
    pub handshakes: HandshakeLog,
    /// Per-organization metrics.
    pub org_metrics: Arc<OrgMetrics>,
    /// The byte budget (`limits.max_buffered_bytes`) frames and batches are charged against.
    pub budget: ByteBudget,
}

#[cfg(test)]
impl Shared {
    /// Shared state for unit tests: `config`, no key, a pool that never connects
    /// (nothing in the handshake asks the database), a batcher queue nobody reads.
    pub(crate) fn for_test(config: ListenerConfig) -> Shared {
        let pg: tokio_postgres::Config = "host=127.0.0.1 user=dbx".parse().expect("config");
        let manager = deadpool_postgres::Manager::new(pg, tokio_postgres::NoTls);
        let pool = deadpool_postgres::Pool::builder(manager)
            .build()
            .expect("pool");
        let (batches, _) = mpsc::channel(1);
        Shared {
            config: Arc::new(config),
            auth: AuthCache::new(pool, 16),
            limiter: Arc::new(RateLimiter::new()),
            batches,
            handshakes: HandshakeLog::disabled(),
            org_metrics: OrgMetrics::new(16),
            budget: ByteBudget::new(1 << 20),
        }
    }
}

/// One batch waiting for its verdict.
#[derive(Debug)]
enum Verdict {
    Waiting(AckReceiver),
    Known(BatchOutcome),
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    verdict: Verdict,
    received_at: Instant,
    session: Uuid,
    /// A session's `end` rather than a batch.
    is_end: bool,
    /// The budget the batch holds until its verdict has been written.
    _charge: Option<Charge>,
}

impl Pending {
    /// When the batcher gave the verdict (none for one the connection gave itself).
    fn resolved_at(&self) -> Option<Instant> {
        match &self.verdict {
            Verdict::Waiting(rx) => rx.resolved_at(),
            Verdict::Known(_) => None,
        }
    }
}

/// Resolves when the front entry's verdict is known. Cancel-safe: nothing is
/// removed until the caller pops it.
async fn front_outcome(pending: &mut VecDeque<Pending>) -> Option<BatchOutcome> {
    let front = pending.front_mut()?;
    match &mut front.verdict {
        Verdict::Known(o) => Some(o.clone()),
        // A dropped handle means the batcher went away without a verdict: the batch
        // must not be acked; the caller closes and the gateway resends.
        Verdict::Waiting(rx) => rx.await.ok(),
    }
}

/// How a connection ended, for logs.
#[derive(Debug)]
enum End {
    ClientClosed,
    Bye,
    Error(RejectCode, String),
    Shutdown,
    BatcherGone,
    Io(io::Error),
}

/// The state of the batch loop of one connection.
struct Flow {
    pending: VecDeque<Pending>,
    /// A batch (or `end`) accepted but not yet in the batcher's queue (waiting for
    /// room, or, for a batch, for an `end` of its session to be answered).
    to_send: Option<TelemetryBatch>,
    last_seq: Option<u64>,
    idle_deadline: tokio::time::Instant,
    /// Reads pause until then (rate limit).
    resume_reads_at: Option<tokio::time::Instant>,
    /// Set when the connection stops reading for good: (why, give up at).
    draining: Option<(End, tokio::time::Instant)>,
}

impl Flow {
    fn new(idle_timeout: Duration) -> Flow {
        Flow {
            pending: VecDeque::new(),
            to_send: None,
            last_seq: None,
            idle_deadline: tokio::time::Instant::now() + idle_timeout,
            resume_reads_at: None,
            draining: None,
        }
    }

    /// How the connection ends once it drains and everything read is answered.
    fn drained(&mut self) -> Option<End> {
        if self.draining.is_some() && self.pending.is_empty() && self.to_send.is_none() {
            return self.draining.take().map(|(e, _)| e);
        }
        None
    }

    /// Reads pause for the rate limit.
    fn paused(&self) -> bool {
        self.resume_reads_at
            .is_some_and(|t| t > tokio::time::Instant::now())
    }

    /// Whether the next frame may be read: not draining, nothing waiting for the
    /// batcher's queue, not paused, and fewer than `max_inflight` awaiting a verdict.
    fn can_read(&self, max_inflight: usize) -> bool {
        self.draining.is_none()
            && self.to_send.is_none()
            && !self.paused()
            && self.pending.len() < max_inflight
    }

    /// When draining gives up (far away while not draining).
    fn drain_deadline(&self) -> tokio::time::Instant {
        self.draining
            .as_ref()
            .map(|(_, t)| *t)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600))
    }

    /// Whether the batch waiting for the queue may go now: an `end` always (its own
    /// entry is in `pending`), a batch not while an `end` of its session is unanswered
    /// (every unanswered entry is in `pending`, and sending is in `seq` order, so such
    /// an end came before it).
    fn ready_to_send(&self) -> bool {
        self.to_send.as_ref().is_some_and(|b| {
            b.ends_session
                || !self
                    .pending
                    .iter()
                    .any(|p| p.is_end && p.session == b.session_id)
        })
    }

    /// The rate limiter asked for a pause of `wait` before the next read.
    fn pause_for(&mut self, wait: Duration) {
        if !wait.is_zero() {
            m::rate_limit_wait(wait);
            self.resume_reads_at = Some(tokio::time::Instant::now() + wait);
        }
    }
}

/// Runs the protocol on one connection until it ends.
pub struct Handler<S> {
    conn: Connection<S>,
    shared: Shared,
    peer: SocketAddr,
    transport: &'static str,
    shutdown: Shutdown,
    /// `dbx_frames_received_total{transport}` and `dbx_points_received_total{transport}`,
    /// resolved once per connection (they move on every frame).
    frames: Counter,
    points: Counter,
    /// `dbx_ack_latency_seconds` and the `ack_written` stage of
    /// `dbx_batch_stage_seconds`, resolved once per connection (they move on every ack).
    ack_latency: Histogram,
    ack_written: Histogram,
    /// The batches of the ack being written: (received, verdict given), reused.
    acking: Vec<(Instant, Option<Instant>)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Handler<S> {
    /// A handler for a freshly accepted stream (after its TLS handshake, for TLS).
    pub fn new(
        stream: S,
        shared: Shared,
        peer: SocketAddr,
        transport: &'static str,
        shutdown: Shutdown,
    ) -> Self {
        let cfg = &shared.config;
        let writes = WriteLimits {
            write_timeout: cfg.write_timeout(),
            shutdown: shutdown.clone(),
            drain_for: cfg.drain_timeout(),
            transport,
        };
        Handler {
            conn: Connection::new(stream, cfg.max_hello_bytes, writes),
            shared,
            peer,
            transport,
            shutdown,
            frames: m::frames_received(transport),
            points: m::points_received(transport),
            ack_latency: m::ack_latency(),
            ack_written: m::ack_written_stage(),
            acking: Vec::new(),
        }
    }

    /// Handshake (to be done by `deadline`), then the batch loop. The connection's
    /// pending-handshake slots are given back once its key is accepted, before its
    /// `welcome` is written, or once a refused handshake has been answered.
    pub async fn run(mut self, deadline: tokio::time::Instant, mut slots: Admitted) {
        let started = Instant::now();
        let (key_hash, grant) = match self.handshake(started, deadline, &mut slots).await {
            Ok(ok) => ok,
            Err((code, msg)) => {
                HandshakeRefused {
                    peer: self.peer,
                    transport: self.transport,
                    code,
                    msg: &msg,
                }
                .emit();
                self.conn.close_with_error(code, msg).await;
                return;
            }
        };
        tracing::debug!(peer = %self.peer, org = %grant.org_id, key = %grant.label, "gateway connected");
        // Keeps api_keys.last_used_at current while the connection lives.
        let _in_use = self.shared.auth.track_use(&key_hash);
        let org = self
            .shared
            .org_metrics
            .for_org(grant.org_id, &self.shared.auth);
        let end = self.serve(&key_hash, &grant, &org).await;
        match &end {
            End::Error(code, msg) => {
                ConnectionFailed {
                    peer: self.peer,
                    org: grant.org_id,
                    code: *code,
                    msg,
                }
                .emit();
                let (code, msg) = (*code, msg.clone());
                self.conn.close_with_error(code, msg).await;
            }
            End::Shutdown => {
                self.conn
                    .close_with_error(
                        RejectCode::ServerShutdown,
                        "the server is shutting down; reconnect and resend anything not acked",
                    )
                    .await;
            }
            End::Bye => {
                let _ = self.conn.write_message(&ServerMessage::Bye).await;
                self.conn.linger().await;
            }
            End::BatcherGone => {
                self.conn
                    .close_with_error(
                        RejectCode::ServerShutdown,
                        "the writer stopped; reconnect and resend anything not acked",
                    )
                    .await;
            }
            End::ClientClosed => {}
            End::Io(e) => tracing::debug!(peer = %self.peer, error = %e, "connection lost"),
        }
    }

    async fn handshake(
        &mut self,
        started: Instant,
        deadline: tokio::time::Instant,
        slots: &mut Admitted,
    ) -> Result<(String, KeyGrant), (RejectCode, String)> {
        let cfg = self.shared.config.clone();
        let mut record = HandshakeRecord {
            org_id: None,
            transport: self.transport,
            status_code: 401,
            response_time_ms: 0,
            client_ip: self.peer.ip(),
            gateway: None,
            key_label: None,
        };
        let result = self
            .handshake_inner(&cfg, &mut record, deadline, slots)
            .await;
        record.response_time_ms = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
        record.status_code = match &result {
            Ok(_) => 200,
            Err((RejectCode::Unauthorized, _)) => 401,
            Err((RejectCode::HandshakeTimeout, _)) => 408,
            Err((RejectCode::FrameTooLarge, _)) => 413,
            Err(_) => 400,
        };
        self.shared.handshakes.record(record);
        result
    }

    /// Reads the first frame by `deadline` (or gives up at shutdown).
    async fn read_hello_frame(
        &mut self,
        cfg: &ListenerConfig,
        deadline: tokio::time::Instant,
    ) -> Result<Frame, (RejectCode, String)> {
        let read = tokio::select! {
            r = timeout_at(deadline, self.conn.read_frame()) => r,
            _ = self.shutdown.recv() => {
                return Err((RejectCode::ServerShutdown, "the server is shutting down".into()))
            }
        };
        match read {
            Err(_) => Err((
                RejectCode::HandshakeTimeout,
                format!("no hello within {} ms", cfg.handshake_timeout_ms),
            )),
            Ok(Ok(Some(f))) => Ok(f),
            Ok(Ok(None)) => Err((
                RejectCode::Protocol,
                "connection closed before hello".into(),
            )),
            Ok(Err(e)) => Err(read_error_code(e)),
        }
    }

    async fn handshake_inner(
        &mut self,
        cfg: &ListenerConfig,
        record: &mut HandshakeRecord,
        deadline: tokio::time::Instant,
        slots: &mut Admitted,
    ) -> Result<(String, KeyGrant), (RejectCode, String)> {
        let frame = self.read_hello_frame(cfg, deadline).await?;
        self.frames.increment(1);
        // Only the hello's own keys are decoded before welcome (docs/protocol.md, 1.1).
        let hello = dbx_proto::decode_hello(&frame.body).map_err(|r| (r.code, r.msg))?;
        record.gateway = hello.gateway.clone();
        if hello.v != 1 {
            return Err((
                RejectCode::UnsupportedVersion,
                format!(
                    "protocol version {} is not supported; this server speaks version 1",
                    hello.v
                ),
            ));
        }
        let Some((hash, grant)) = self.shared.auth.authenticate(&hello.key) else {
            // Deliberately vague (docs/protocol.md): unknown, revoked and inactive look alike.
            return Err((
                RejectCode::Unauthorized,
                "the API key was not accepted".into(),
            ));
        };
        record.org_id = Some(grant.org_id);
        record.key_label = Some(grant.label.clone());
        // Given back before the welcome is written: a gateway that reads its welcome
        // and at once opens its next connection must not find this one still counted
        // against its address (the welcome's write is bounded by the write timeout).
        slots.established();
        let welcome = ServerMessage::Welcome {
            v: 1,
            org: grant.org_id,
            max_frame: cfg.max_frame_bytes as u32,
            max_points: cfg.max_points_per_batch as u32,
        };
        if let Err(e) = self.conn.write_message(&welcome).await {
            return Err((RejectCode::Protocol, format!("could not send welcome: {e}")));
        }
        self.conn
            .enter_session(self.shared.budget.clone(), cfg.limits());
        Ok((hash, grant))
    }

    /// The batch loop: reads frames, hands batches to the batcher, answers verdicts in
    /// order, until the connection ends (see the module doc for the rules).
    async fn serve(&mut self, key_hash: &str, grant: &KeyGrant, org: &OrgCounters) -> End {
        let cfg = self.shared.config.clone();
        let limits = cfg.limits();
        let mut flow = Flow::new(cfg.idle_timeout());
        let mut auth_changes = self.shared.auth.changes();
        // A local handle: a permit borrowed from it must not borrow `self`.
        let batches = self.shared.batches.clone();

        loop {
            if let Some(end) = flow.drained() {
                return end;
            }
            let paused = flow.paused();
            let can_read = flow.can_read(cfg.max_inflight_batches);
            let drain_deadline = flow.drain_deadline();

            tokio::select! {
                // Delivering verdicts first keeps ack latency low under load.
                biased;

                outcome = front_outcome(&mut flow.pending), if !flow.pending.is_empty() => {
                    let Some(o) = outcome else { return End::BatcherGone };
                    if let Err(e) = self.deliver(&mut flow.pending, o, org).await {
                        return End::Io(e);
                    }
                }

                permit = batches.reserve(), if flow.ready_to_send() => {
                    let Ok(permit) = permit else { return End::BatcherGone };
                    if let Some(mut batch) = flow.to_send.take() {
                        batch.queued_at = Instant::now();
                        permit.send(batch);
                    }
                    // The batcher only sees the depth when it receives; when it is
                    // stalled behind a slow database, this is the live figure.
                    m::queue_depth(batches.max_capacity() - batches.capacity());
                }

                _ = self.shutdown.recv(), if flow.draining.is_none() => {
                    flow.draining = Some((End::Shutdown, self.conn.begin_drain()));
                }

                changed = auth_changes.changed() => {
                    if changed.is_ok() && !self.key_still_valid(key_hash, grant) {
                        KeyRevoked { peer: self.peer, org: grant.org_id }.emit();
                        return End::Error(RejectCode::Unauthorized, "the API key was revoked or its organization deactivated".into());
                    }
                }

                _ = sleep_until(flow.resume_reads_at.unwrap_or(flow.idle_deadline)), if paused => {
                    flow.resume_reads_at = None;
                }

                _ = sleep_until(drain_deadline), if flow.draining.is_some() => {
                    tracing::warn!(peer = %self.peer, unanswered = flow.pending.len(), "drain deadline passed; closing with batches unacked (the gateway will resend them)");
                    return flow.draining.take().map(|(e, _)| e).unwrap_or(End::Shutdown);
                }

                _ = sleep_until(flow.idle_deadline), if can_read && flow.pending.is_empty() => {
                    if self.conn.waiting_for_budget() {
                        // Held back by the byte budget, not idle.
                        flow.idle_deadline = tokio::time::Instant::now() + cfg.idle_timeout();
                        continue;
                    }
                    return End::Error(RejectCode::IdleTimeout, format!("nothing received for {} ms", cfg.idle_timeout_ms));
                }

                frame = self.conn.read_frame(), if can_read => {
                    let frame = match frame {
                        Ok(Some(f)) => f,
                        Ok(None) => {
                            // The client closed its write side; answer what it sent, then end.
                            let until = tokio::time::Instant::now() + cfg.drain_timeout();
                            flow.draining = Some((End::ClientClosed, until));
                            continue;
                        }
                        Err(ReadError::Io(e)) => return End::Io(e),
                        Err(e) => {
                            let (code, msg) = read_error_code(e);
                            return End::Error(code, msg);
                        }
                    };
                    flow.idle_deadline = tokio::time::Instant::now() + cfg.idle_timeout();
                    if let Some(end) = self.on_frame(&mut flow, frame, grant, org, &limits).await {
                        return end;
                    }
                }
            }
        }
    }

    /// After a reload of the keys: whether this connection's key still belongs to its
    /// organization (a revoked or expired key, or a deactivated organization, ends it).
    fn key_still_valid(&self, key_hash: &str, grant: &KeyGrant) -> bool {
        self.shared.auth.snapshot().key(key_hash).map(|g| g.org_id) == Some(grant.org_id)
    }

    /// Handles one frame of the batch loop; `Some` ends the connection.
    async fn on_frame(
        &mut self,
        flow: &mut Flow,
        frame: Frame,
        grant: &KeyGrant,
        org: &OrgCounters,
        limits: &Limits,
    ) -> Option<End> {
        self.frames.increment(1);
        let received_at = Instant::now();
        let Frame { body, mut charge } = frame;
        org.received_bytes(dbx_proto::codec::PREFIX_LEN + body.len());
        let decoded = dbx_proto::decode_client(&body, limits, now_micros());
        drop(body);
        let mut is_end = false;
        let (seq, session, verdict) = match decoded {
            Ok(ClientMessage::Batch(batch)) => {
                if let Some(end) = check_seq(&mut flow.last_seq, batch.seq) {
                    return Some(end);
                }
                // The frame is gone: from now on the batch holds what it decoded to.
                if let Some(c) = &mut charge {
                    c.shrink_to(dbx_proto::points_heap_bytes(&batch.points));
                }
                let (seq, session) = (batch.seq, batch.session);
                let verdict = self.on_batch(flow, batch, grant, org, received_at).await;
                if matches!(verdict, Verdict::Known(_)) {
                    charge = None;
                }
                (seq, session, verdict)
            }
            Ok(ClientMessage::End(e)) => {
                if let Some(end) = check_seq(&mut flow.last_seq, e.seq) {
                    return Some(end);
                }
                // An end holds no points: its frame's charge goes with the frame.
                charge = None;
                let (ack, rx) = AckHandle::channel();
                let end = TelemetryBatch::session_end(
                    grant.org_id,
                    e.session,
                    ack,
                    BatchOrigin::Tcp,
                    received_at,
                );
                flow.to_send = Some(end);
                is_end = true;
                (e.seq, e.session, Verdict::Waiting(rx))
            }
            Ok(ClientMessage::Ping) => {
                return match self.conn.write_message(&ServerMessage::Pong).await {
                    Ok(()) => None,
                    Err(e) => Some(End::Io(e)),
                };
            }
            Ok(ClientMessage::Bye) => {
                let until = tokio::time::Instant::now() + self.shared.config.drain_timeout();
                flow.draining = Some((End::Bye, until));
                return None;
            }
            Ok(ClientMessage::Hello(_)) => {
                return Some(End::Error(
                    RejectCode::Protocol,
                    "a second hello on the same connection".into(),
                ));
            }
            Err(DecodeError::Batch { seq, rejection }) => {
                if let Some(end) = check_seq(&mut flow.last_seq, seq) {
                    return Some(end);
                }
                charge = None;
                (seq, Uuid::nil(), self.refuse(seq, rejection))
            }
            Err(DecodeError::Connection(r)) => return Some(End::Error(r.code, r.msg)),
        };
        flow.pending.push_back(Pending {
            seq,
            verdict,
            received_at,
            session,
            is_end,
            _charge: charge,
        });
        None
    }

    /// A decoded batch: admitted and queued for the batcher (its verdict to come), or
    /// refused now.
    async fn on_batch(
        &self,
        flow: &mut Flow,
        batch: dbx_proto::Batch,
        grant: &KeyGrant,
        org: &OrgCounters,
        received_at: Instant,
    ) -> Verdict {
        let seq = batch.seq;
        match self.accept(grant, batch, received_at).await {
            Ok((tb, rx, wait)) => {
                org.accepted(tb.points.len());
                flow.to_send = Some(tb);
                if !wait.is_zero() {
                    org.rate_limited(wait);
                }
                flow.pause_for(wait);
                Verdict::Waiting(rx)
            }
            Err(rejection) => self.refuse(seq, rejection),
        }
    }

    /// A batch refused by the listener itself: counted and logged, its nack known now.
    fn refuse(&self, seq: u64, rejection: Rejection) -> Verdict {
        BatchRefused {
            peer: self.peer,
            seq,
            code: rejection.code,
            msg: &rejection.msg,
        }
        .emit();
        Verdict::Known(BatchOutcome::Rejected(rejection))
    }

    /// Resolves the batch's aircraft and session within the key's organization,
    /// applies the rate limit, and builds what goes to the batcher.
    async fn accept(
        &self,
        grant: &KeyGrant,
        batch: dbx_proto::Batch,
        received_at: Instant,
    ) -> Result<(TelemetryBatch, AckReceiver, Duration), Rejection> {
        let org = grant.org_id;
        // Boxed: the lookups it may make (a cache miss asks the database) would make
        // its future about 1.9 KiB of every connection task's, held for the
        // connection's life; boxed it is held only while it runs.
        let aircraft_id = Box::pin(crate::admit::resolve_target(
            &self.shared.auth,
            org,
            &batch.aircraft,
            batch.session,
            self.shared.config.auto_register_aircraft,
        ))
        .await?;
        let points = batch.points.len();
        let wait = self
            .shared
            .limiter
            .acquire(org, grant.points_per_sec, points);
        self.points.increment(points as u64);
        let (ack, rx) = AckHandle::channel();
        let admitted_at = Instant::now();
        Ok((
            TelemetryBatch {
                org_id: org,
                aircraft_id,
                session_id: batch.session,
                points: batch.points,
                ack,
                origin: BatchOrigin::Tcp,
                received_at,
                admitted_at,
                queued_at: admitted_at,
                ends_session: false,
            },
            rx,
            wait,
        ))
    }

    /// Answers the front entry (whose outcome is `first`) and every resolved entry
    /// behind it: one cumulative ack for a run of durable batches, a nack for each
    /// rejected one.
    async fn deliver(
        &mut self,
        pending: &mut VecDeque<Pending>,
        first: BatchOutcome,
        org: &OrgCounters,
    ) -> io::Result<()> {
        let mut outcome = Some(first);
        let mut ack_upto: Option<u64> = None;
        self.acking.clear();
        while let Some(o) = outcome.take() {
            let p = pending.pop_front().expect("front exists");
            match o {
                BatchOutcome::Durable => {
                    // An end's verdict has no stages of the batcher's: it only counts
                    // in the ack latency.
                    let resolved = if p.is_end { None } else { p.resolved_at() };
                    self.acking.push((p.received_at, resolved));
                    ack_upto = Some(p.seq);
                }
                BatchOutcome::Rejected(r) => {
                    if let Some(seq) = ack_upto.take() {
                        self.write_ack(seq).await?;
                    }
                    if r.code == RejectCode::ForeignSession {
                        self.shared.auth.forget_session(p.session);
                    }
                    org.rejected();
                    self.conn
                        .write_message(&ServerMessage::Nack {
                            seq: p.seq,
                            code: r.code,
                            msg: r.msg,
                            index: r.index,
                        })
                        .await?;
                }
            }
            // Coalesce: take the next entry only if its verdict is already known.
            if let Some(next) = pending.front_mut() {
                outcome = match &mut next.verdict {
                    Verdict::Known(o) => Some(o.clone()),
                    Verdict::Waiting(rx) => rx.try_recv().ok(),
                };
            }
        }
        if let Some(seq) = ack_upto {
            self.write_ack(seq).await?;
        }
        Ok(())
    }

    /// Writes a cumulative ack, then records the ack latency and the `ack_written`
    /// stage of every batch it answers, with the instant it was written.
    async fn write_ack(&mut self, seq: u64) -> io::Result<()> {
        self.conn.write_message(&ServerMessage::Ack { seq }).await?;
        let written = Instant::now();
        for (received, resolved) in self.acking.drain(..) {
            self.ack_latency
                .record(written.saturating_duration_since(received).as_secs_f64());
            if let Some(resolved) = resolved {
                self.ack_written
                    .record(written.saturating_duration_since(resolved).as_secs_f64());
            }
        }
        Ok(())
    }
}

/// `error protocol` unless `seq` is above the connection's previous batch or end `seq`
/// (nacked ones count).
fn check_seq(last_seq: &mut Option<u64>, seq: u64) -> Option<End> {
    if let Some(prev) = *last_seq {
        if seq <= prev {
            return Some(End::Error(
                RejectCode::Protocol,
                format!("seq {seq} is not greater than the previous seq {prev} on this connection"),
            ));
        }
    }
    *last_seq = Some(seq);
    None
}

fn read_error_code(e: ReadError) -> (RejectCode, String) {
    match e {
        ReadError::Frame(e @ (FrameError::TooLarge { .. } | FrameError::ZeroLength)) => {
            let r = e.rejection().expect("framing errors have an answer");
            (r.code, r.msg)
        }
        ReadError::Frame(FrameError::Io(e)) | ReadError::Io(e) => {
            (RejectCode::BadFrame, format!("socket error: {e}"))
        }
        ReadError::Truncated(n) => (
            RejectCode::BadFrame,
            format!("connection closed inside a frame ({n} bytes)"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection past `welcome` over an in-memory pipe of `pipe` bytes, with a byte
    /// budget of `budget`; the peer's end, and the trigger its shutdown signal hangs on.
    fn in_session(
        pipe: usize,
        budget: usize,
    ) -> (
        Connection<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
        dbx_core::ShutdownTrigger,
    ) {
        let (server, peer) = tokio::io::duplex(pipe);
        let (trigger, shutdown) = dbx_core::ShutdownTrigger::new();
        let mut conn = Connection::new(
            server,
            4096,
            WriteLimits {
                write_timeout: Duration::from_secs(5),
                shutdown,
                drain_for: Duration::from_secs(1),
                transport: "tcp",
            },
        );
        conn.enter_session(crate::budget::ByteBudget::new(budget), Limits::default());
        (conn, peer, trigger)
    }

    /// A gateway that reads its welcome and at once opens its next connection from the
    /// same address must find the first one no longer pending: the slots go back
    /// before the welcome is written, not after (CI once refused such a connection
    /// for `max_pending_per_ip` in the window between the two).
    #[tokio::test]
    async fn an_accepted_key_gives_its_pending_slots_back_before_the_welcome_is_written() {
        let shared = Shared::for_test(ListenerConfig::default());
        let grant = KeyGrant {
            org_id: Uuid::nil(),
            label: "primary".into(),
            points_per_sec: None,
        };
        shared.auth.insert_key_for_test("dbx_test_key", grant);
        // A pipe too small for the welcome: its write waits until the peer reads.
        let (server, mut peer) = tokio::io::duplex(8);
        let from: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let slots = crate::slots::Slots::new(4, 4, 1);
        let admitted = slots.admit(from.ip()).unwrap();
        let (_trigger, shutdown) = dbx_core::ShutdownTrigger::new();
        let handler = Handler::new(server, shared, from, "tcp", shutdown);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let task = tokio::spawn(handler.run(deadline, admitted));
        let mut hello = BytesMut::new();
        dbx_proto::encode_hello(&mut hello, "dbx_test_key", None);
        peer.write_all(&hello).await.unwrap();
        let given_back = tokio::time::timeout(Duration::from_secs(5), async {
            while slots.pending() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(
            given_back.is_ok(),
            "the slot is held while the welcome waits"
        );
        assert!(
            slots.admit(from.ip()).is_ok(),
            "the address has its slot back"
        );
        // The welcome itself, once read.
        let mut prefix = [0u8; PREFIX_LEN];
        peer.read_exact(&mut prefix).await.unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
        peer.read_exact(&mut body).await.unwrap();
        let welcome = dbx_proto::decode_server(&body).unwrap();
        assert!(
            matches!(welcome, ServerMessage::Welcome { .. }),
            "{welcome:?}"
        );
        task.abort();
    }

    #[tokio::test]
    async fn frames_read_back_to_back_leave_only_what_follows_them_held() {
        let (mut conn, mut peer, _trigger) = in_session(256 * 1024, 1 << 30);
        // A busy gateway: small frames back to back, so every read ends inside the next
        // frame and the buffer is never empty between frames.
        let body = vec![3u8; 700];
        let mut wire = Vec::new();
        for _ in 0..200 {
            wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
            wire.extend_from_slice(&body);
        }
        peer.write_all(&wire).await.unwrap();
        let mut frames = Vec::new();
        for _ in 0..199 {
            let f = conn.read_frame().await.unwrap().unwrap();
            assert_eq!(f.body.len(), 700);
            // Between frames the connection holds what it read beyond this one, at most
            // LOOKAHEAD bytes: never the read's allocation (a frame's room, pinned while
            // the batch waits for its verdict). Once no whole frame is left, that rest is
            // in an allocation of its own, not one frames were split from.
            assert!(
                conn.read_buf.capacity() <= LOOKAHEAD,
                "{} bytes held between frames",
                conn.read_buf.capacity()
            );
            if !conn.holds_whole_frame() && !conn.read_buf.is_empty() {
                let after_frame = f.body.as_ptr().wrapping_add(f.body.len());
                assert_ne!(
                    conn.read_buf.as_ptr(),
                    after_frame,
                    "the rest of the read still shares the frame's allocation"
                );
            }
            frames.push(f); // frames kept (as in the batcher) do not grow the buffer
        }
    }

    #[tokio::test]
    async fn the_frames_of_one_read_cost_no_copy_each() {
        let (mut conn, mut peer, _trigger) = in_session(256 * 1024, 1 << 30);
        // A hostile peer: thousands of tiny frames packed into each read. Moving the
        // rest of the read after every frame would copy up to LOOKAHEAD bytes per
        // 5-byte frame; the rest moves at most twice per read.
        let frames = 4000;
        let mut wire = Vec::new();
        for i in 0..frames {
            wire.extend_from_slice(&1u32.to_be_bytes());
            wire.push(i as u8);
        }
        peer.write_all(&wire).await.unwrap();
        let mut moved = 0;
        let mut prev_end: Option<*const u8> = None;
        for i in 0..frames {
            let f = conn.read_frame().await.unwrap().unwrap();
            assert_eq!(&f.body[..], &[i as u8]);
            // A frame taken from the same buffer as the one before starts right after
            // that one's end and this frame's prefix.
            if prev_end.map(|end| end.wrapping_add(PREFIX_LEN)) != Some(f.body.as_ptr()) {
                moved += 1;
            }
            prev_end = Some(f.body.as_ptr().wrapping_add(f.body.len()));
        }
        // 20 000 bytes in reads of up to LOOKAHEAD + a frame; the rest of each moves at
        // most twice.
        assert!(
            moved <= 2 * (2 + wire.len() / LOOKAHEAD),
            "{moved} of {frames} frames found the buffer moved"
        );
    }

    #[tokio::test]
    async fn a_quiet_connection_holds_a_small_read_buffer() {
        let (mut conn, mut peer, _trigger) = in_session(64 * 1024, 1 << 26);
        // A frame larger than a read's lookahead, then a small one, in one write: both
        // read whole, in order.
        let big = vec![7u8; 3 * LOOKAHEAD];
        let mut wire = Vec::new();
        for body in [&big[..], &b"second"[..]] {
            wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
            wire.extend_from_slice(body);
        }
        peer.write_all(&wire).await.unwrap();
        let first = conn.read_frame().await.unwrap().unwrap();
        assert_eq!(&first.body[..], &big[..]);
        let second = conn.read_frame().await.unwrap().unwrap();
        assert_eq!(&second.body[..], b"second");
        assert_eq!(conn.read_buf.capacity(), 0, "nothing held between frames");
        assert!(
            first.body.len() == big.len() && second.body.len() == 6,
            "the frames are their own"
        );
        // Waiting for the next frame holds no room for it.
        let waiting = tokio::time::timeout(Duration::from_millis(20), conn.read_frame()).await;
        assert!(waiting.is_err(), "no frame was sent");
        assert_eq!(
            conn.read_buf.capacity(),
            0,
            "room held by a quiet connection"
        );
        // Nor does waiting for the rest of a small frame: what arrived, and no more.
        peer.write_all(&[0, 0, 2, 188, 1, 2, 3]).await.unwrap(); // a 700-byte frame, begun
        let waiting = tokio::time::timeout(Duration::from_millis(20), conn.read_frame()).await;
        assert!(waiting.is_err(), "the frame is not whole");
        assert_eq!(conn.read_buf.len(), 7);
        assert!(
            conn.read_buf.capacity() < 64,
            "{} bytes held waiting for the rest of a frame",
            conn.read_buf.capacity()
        );
    }
}
