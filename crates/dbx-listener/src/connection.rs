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
//! batch is waiting for room in the batcher's queue, and one whose organization is
//! over its rate limit. That is the TCP backpressure of PROTOCOL.md.
//!
//! An `end` (protocol 1.1) takes its place in that FIFO like a batch, but goes to the
//! batcher only once every batch before it has its verdict, and nothing after it goes
//! before its own verdict: so the session's earlier batches are written before it, and
//! a later batch for the session finds it completed (`session_closed`).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout};
use tokio_util::codec::Decoder;
use uuid::Uuid;

use dbx_core::metrics as m;
use dbx_core::{
    AckHandle, AckReceiver, BatchOrigin, BatchOutcome, RejectCode, Rejection, Shutdown,
    TelemetryBatch,
};
use dbx_proto::{ClientMessage, DecodeError, FrameCodec, FrameError, ServerMessage};

use crate::audit::{HandshakeLog, HandshakeRecord};
use crate::auth::{AuthCache, KeyGrant};
use crate::ratelimit::RateLimiter;
use crate::ListenerConfig;

/// A framed connection: reads frames, writes server messages.
#[derive(Debug)]
pub struct Connection<S> {
    stream: S,
    codec: FrameCodec,
    read_buf: BytesMut,
    write_buf: BytesMut,
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

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps a stream.
    pub fn new(stream: S, max_frame_bytes: usize) -> Self {
        Connection {
            stream,
            codec: FrameCodec::new(max_frame_bytes),
            read_buf: BytesMut::with_capacity(16 * 1024),
            write_buf: BytesMut::with_capacity(1024),
        }
    }

    /// The next frame body, or `None` when the peer closed cleanly between frames.
    /// Cancel-safe: bytes read stay in the buffer for the next call.
    pub async fn read_frame(&mut self) -> Result<Option<BytesMut>, ReadError> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.read_buf)? {
                return Ok(Some(frame));
            }
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return if self.read_buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Truncated(self.read_buf.len()))
                };
            }
        }
    }

    /// Writes one message and flushes it.
    pub async fn write_message(&mut self, msg: &ServerMessage) -> io::Result<()> {
        self.write_buf.clear();
        dbx_proto::encode_server(msg, &mut self.write_buf);
        self.stream.write_all(&self.write_buf).await?;
        self.stream.flush().await
    }

    /// Sends a connection-level `error` and closes politely: shut the write side,
    /// then discard input for up to a second so the peer reads the error rather
    /// than a reset (PROTOCOL.md, "Precise rules").
    pub async fn close_with_error(mut self, code: RejectCode, msg: impl Into<String>) {
        let msg = ServerMessage::Error {
            code,
            msg: msg.into(),
        };
        if self.write_message(&msg).await.is_ok() {
            self.linger().await;
        }
    }

    /// Shuts the write side and drains input briefly before the socket is dropped.
    pub async fn linger(&mut self) {
        let _ = self.stream.shutdown().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        let mut sink = [0u8; 4096];
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, self.stream.read(&mut sink)).await {
            if n == 0 {
                break;
            }
        }
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

/// Runs the protocol on one connection until it ends.
pub struct Handler<S> {
    conn: Connection<S>,
    shared: Shared,
    peer: SocketAddr,
    transport: &'static str,
    shutdown: Shutdown,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Handler<S> {
    /// A handler for a freshly accepted stream.
    pub fn new(
        stream: S,
        shared: Shared,
        peer: SocketAddr,
        transport: &'static str,
        shutdown: Shutdown,
    ) -> Self {
        let max = shared.config.max_frame_bytes;
        Handler {
            conn: Connection::new(stream, max),
            shared,
            peer,
            transport,
            shutdown,
        }
    }

    /// Handshake, then the batch loop.
    pub async fn run(mut self) {
        let started = Instant::now();
        let (key_hash, grant) = match self.handshake(started).await {
            Ok(ok) => ok,
            Err((code, msg)) => {
                metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => code.as_str()).increment(1);
                tracing::info!(peer = %self.peer, transport = self.transport, code = %code, "handshake refused: {msg}");
                self.conn.close_with_error(code, msg).await;
                return;
            }
        };
        tracing::debug!(peer = %self.peer, org = %grant.org_id, key = %grant.label, "gateway connected");
        // Keeps api_keys.last_used_at current while the connection lives.
        let _in_use = self.shared.auth.track_use(&key_hash);
        let end = self.serve(&key_hash, &grant).await;
        match &end {
            End::Error(code, msg) => {
                metrics::counter!(m::REJECTIONS_TOTAL, "reason" => code.as_str()).increment(1);
                tracing::info!(peer = %self.peer, org = %grant.org_id, code = %code, "closing connection: {msg}");
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
        let result = self.handshake_inner(&cfg, &mut record).await;
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

    async fn handshake_inner(
        &mut self,
        cfg: &ListenerConfig,
        record: &mut HandshakeRecord,
    ) -> Result<(String, KeyGrant), (RejectCode, String)> {
        let frame = match timeout(cfg.handshake_timeout(), self.conn.read_frame()).await {
            Err(_) => {
                return Err((
                    RejectCode::HandshakeTimeout,
                    format!("no hello within {} ms", cfg.handshake_timeout_ms),
                ))
            }
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => {
                return Err((
                    RejectCode::Protocol,
                    "connection closed before hello".into(),
                ))
            }
            Ok(Err(e)) => return Err(read_error_code(e)),
        };
        metrics::counter!(m::FRAMES_RECEIVED_TOTAL, "transport" => self.transport).increment(1);
        let hello = match dbx_proto::decode_client(&frame, &cfg.limits(), now_micros()) {
            Ok(ClientMessage::Hello(h)) => h,
            Ok(other) => {
                return Err((
                    RejectCode::Protocol,
                    format!(
                        "expected hello as the first frame, got {}",
                        message_name(&other)
                    ),
                ))
            }
            Err(DecodeError::Connection(r)) => return Err((r.code, r.msg)),
            Err(DecodeError::Batch { rejection, .. }) => {
                return Err((
                    RejectCode::Protocol,
                    format!("expected hello as the first frame: {}", rejection.msg),
                ))
            }
        };
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
            // Deliberately vague (PROTOCOL.md): unknown, revoked and inactive look alike.
            return Err((
                RejectCode::Unauthorized,
                "the API key was not accepted".into(),
            ));
        };
        record.org_id = Some(grant.org_id);
        record.key_label = Some(grant.label.clone());
        let welcome = ServerMessage::Welcome {
            v: 1,
            org: grant.org_id,
            max_frame: cfg.max_frame_bytes as u32,
            max_points: cfg.max_points_per_batch as u32,
        };
        if let Err(e) = self.conn.write_message(&welcome).await {
            return Err((RejectCode::Protocol, format!("could not send welcome: {e}")));
        }
        Ok((hash, grant))
    }

    async fn serve(&mut self, key_hash: &str, grant: &KeyGrant) -> End {
        let cfg = self.shared.config.clone();
        let limits = cfg.limits();
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut to_send: Option<TelemetryBatch> = None;
        let mut last_seq: Option<u64> = None;
        // The seq of the last `end` handed on (see `may_send`).
        let mut end_seq: Option<u64> = None;
        let mut auth_changes = self.shared.auth.changes();
        let mut idle_deadline = tokio::time::Instant::now() + cfg.idle_timeout();
        let mut resume_reads_at: Option<tokio::time::Instant> = None;
        // Set when the connection stops reading for good: (why, give up at).
        let mut draining: Option<(End, tokio::time::Instant)> = None;
        let drain_for = Duration::from_millis(cfg.drain_timeout_ms);
        // A local handle: a permit borrowed from it must not borrow `self`.
        let batches = self.shared.batches.clone();

        loop {
            if let Some((_, _)) = &draining {
                if pending.is_empty() && to_send.is_none() {
                    return draining.take().map(|(e, _)| e).unwrap_or(End::Shutdown);
                }
            }
            let paused = resume_reads_at.is_some_and(|t| t > tokio::time::Instant::now());
            let can_read = draining.is_none()
                && to_send.is_none()
                && !paused
                && pending.len() < cfg.max_inflight_batches;
            let drain_deadline = draining
                .as_ref()
                .map(|(_, t)| *t)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));

            tokio::select! {
                // Delivering verdicts first keeps ack latency low under load.
                biased;

                outcome = front_outcome(&mut pending), if !pending.is_empty() => {
                    match outcome {
                        Some(o) => {
                            if let Err(e) = self.deliver(&mut pending, o).await {
                                return End::Io(e);
                            }
                        }
                        None => return End::BatcherGone,
                    }
                }

                permit = batches.reserve(), if to_send.as_ref().is_some_and(|b| may_send(b, end_seq, &pending)) => {
                    match permit {
                        Ok(permit) => {
                            if let Some(batch) = to_send.take() {
                                permit.send(batch);
                            }
                            // The batcher only sees the depth when it receives; when it is
                            // stalled behind a slow database, this is the live figure.
                            metrics::gauge!(m::QUEUE_DEPTH)
                                .set((batches.max_capacity() - batches.capacity()) as f64);
                        }
                        Err(_) => return End::BatcherGone,
                    }
                }

                _ = self.shutdown.recv(), if draining.is_none() => {
                    draining = Some((End::Shutdown, tokio::time::Instant::now() + drain_for));
                }

                changed = auth_changes.changed() => {
                    if changed.is_ok() {
                        let still = self.shared.auth.snapshot().key(key_hash).map(|g| g.org_id);
                        if still != Some(grant.org_id) {
                            metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => "revoked").increment(1);
                            return End::Error(RejectCode::Unauthorized, "the API key was revoked or its organization deactivated".into());
                        }
                    }
                }

                _ = sleep_until(resume_reads_at.unwrap_or(idle_deadline)), if paused => {
                    resume_reads_at = None;
                }

                _ = sleep_until(drain_deadline), if draining.is_some() => {
                    tracing::warn!(peer = %self.peer, unanswered = pending.len(), "drain deadline passed; closing with batches unacked (the gateway will resend them)");
                    return draining.take().map(|(e, _)| e).unwrap_or(End::Shutdown);
                }

                _ = sleep_until(idle_deadline), if can_read && pending.is_empty() => {
                    return End::Error(RejectCode::IdleTimeout, format!("nothing received for {} ms", cfg.idle_timeout_ms));
                }

                frame = self.conn.read_frame(), if can_read => {
                    let frame = match frame {
                        Ok(Some(f)) => f,
                        Ok(None) => {
                            // The client closed its write side; answer what it sent, then end.
                            draining = Some((End::ClientClosed, tokio::time::Instant::now() + drain_for));
                            continue;
                        }
                        Err(ReadError::Io(e)) => return End::Io(e),
                        Err(e) => {
                            let (code, msg) = read_error_code(e);
                            return End::Error(code, msg);
                        }
                    };
                    idle_deadline = tokio::time::Instant::now() + cfg.idle_timeout();
                    metrics::counter!(m::FRAMES_RECEIVED_TOTAL, "transport" => self.transport).increment(1);
                    let received_at = Instant::now();
                    match dbx_proto::decode_client(&frame, &limits, now_micros()) {
                        Ok(ClientMessage::Batch(batch)) => {
                            if let Err(end) = in_order(&mut last_seq, batch.seq) {
                                return end;
                            }
                            let seq = batch.seq;
                            let session = batch.session;
                            match self.accept(grant, batch, received_at).await {
                                Ok((tb, rx, wait)) => {
                                    pending.push_back(Pending { seq, verdict: Verdict::Waiting(rx), received_at, session });
                                    to_send = Some(tb);
                                    if !wait.is_zero() {
                                        metrics::histogram!(m::RATE_LIMIT_WAIT_SECONDS).record(wait.as_secs_f64());
                                        resume_reads_at = Some(tokio::time::Instant::now() + wait);
                                    }
                                }
                                Err(rejection) => {
                                    metrics::counter!(m::REJECTIONS_TOTAL, "reason" => rejection.code.as_str()).increment(1);
                                    pending.push_back(Pending { seq, verdict: Verdict::Known(BatchOutcome::Rejected(rejection)), received_at, session });
                                }
                            }
                        }
                        Ok(ClientMessage::End(e)) => {
                            if let Err(end) = in_order(&mut last_seq, e.seq) {
                                return end;
                            }
                            let (ack, rx) = AckHandle::channel();
                            pending.push_back(Pending { seq: e.seq, verdict: Verdict::Waiting(rx), received_at, session: e.session });
                            to_send = Some(TelemetryBatch::session_end(grant.org_id, e.session, ack, BatchOrigin::Tcp, received_at));
                            end_seq = Some(e.seq);
                        }
                        Ok(ClientMessage::Ping) => {
                            if let Err(e) = self.conn.write_message(&ServerMessage::Pong).await {
                                return End::Io(e);
                            }
                        }
                        Ok(ClientMessage::Bye) => {
                            draining = Some((End::Bye, tokio::time::Instant::now() + drain_for));
                        }
                        Ok(ClientMessage::Hello(_)) => {
                            return End::Error(RejectCode::Protocol, "a second hello on the same connection".into());
                        }
                        Err(DecodeError::Batch { seq, rejection }) => {
                            if let Err(end) = in_order(&mut last_seq, seq) {
                                return end;
                            }
                            metrics::counter!(m::REJECTIONS_TOTAL, "reason" => rejection.code.as_str()).increment(1);
                            tracing::debug!(peer = %self.peer, seq, code = %rejection.code, "batch refused: {}", rejection.msg);
                            pending.push_back(Pending { seq, verdict: Verdict::Known(BatchOutcome::Rejected(rejection)), received_at, session: Uuid::nil() });
                        }
                        Err(DecodeError::Connection(r)) => return End::Error(r.code, r.msg),
                    }
                }
            }
        }
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
        let aircraft_id = crate::admit::resolve_target(
            &self.shared.auth,
            org,
            &batch.aircraft,
            batch.session,
            self.shared.config.auto_register_aircraft,
        )
        .await?;
        let points = batch.points.len();
        let wait = self
            .shared
            .limiter
            .acquire(org, grant.points_per_sec, points);
        metrics::counter!(m::POINTS_RECEIVED_TOTAL, "transport" => self.transport)
            .increment(points as u64);
        let (ack, rx) = AckHandle::channel();
        Ok((
            TelemetryBatch {
                org_id: org,
                aircraft_id,
                session_id: batch.session,
                points: batch.points,
                ack,
                origin: BatchOrigin::Tcp,
                received_at,
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
    ) -> io::Result<()> {
        let mut outcome = Some(first);
        let mut ack_upto: Option<(u64, Instant)> = None;
        while let Some(o) = outcome.take() {
            let p = pending.pop_front().expect("front exists");
            match o {
                BatchOutcome::Durable => {
                    metrics::histogram!(m::ACK_LATENCY_SECONDS)
                        .record(p.received_at.elapsed().as_secs_f64());
                    ack_upto = Some((p.seq, p.received_at));
                }
                BatchOutcome::Rejected(r) => {
                    if let Some((seq, _)) = ack_upto.take() {
                        self.conn.write_message(&ServerMessage::Ack { seq }).await?;
                    }
                    if r.code == RejectCode::ForeignSession {
                        self.shared.auth.forget_session(p.session);
                    }
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
        if let Some((seq, _)) = ack_upto {
            self.conn.write_message(&ServerMessage::Ack { seq }).await?;
        }
        Ok(())
    }
}

/// Batch and end `seq`s strictly increase on a connection (nacked ones count).
fn in_order(last: &mut Option<u64>, seq: u64) -> Result<(), End> {
    if let Some(prev) = *last {
        if seq <= prev {
            return Err(End::Error(
                RejectCode::Protocol,
                format!("seq {seq} is not greater than the previous seq {prev} on this connection"),
            ));
        }
    }
    *last = Some(seq);
    Ok(())
}

/// Whether `next` may go to the batcher now. The `end` with seq `end_seq` waits until
/// every entry before it has been answered (it is then the front of `pending`), and
/// a batch behind it waits until the end itself has been answered. Sending is in
/// `seq` order, so `next` is that end or comes after it.
fn may_send(next: &TelemetryBatch, end_seq: Option<u64>, pending: &VecDeque<Pending>) -> bool {
    let Some(end) = end_seq else {
        return true;
    };
    let front = pending.front().map(|p| p.seq);
    if next.ends_session {
        front == Some(end)
    } else {
        front.is_none_or(|f| f > end)
    }
}

fn read_error_code(e: ReadError) -> (RejectCode, String) {
    match e {
        ReadError::Frame(FrameError::TooLarge { len, max }) => (
            RejectCode::FrameTooLarge,
            format!("frame length {len} is above the limit of {max} bytes"),
        ),
        ReadError::Frame(FrameError::ZeroLength) => (RejectCode::BadFrame, "frame length 0".into()),
        ReadError::Frame(FrameError::Io(e)) | ReadError::Io(e) => {
            (RejectCode::BadFrame, format!("socket error: {e}"))
        }
        ReadError::Truncated(n) => (
            RejectCode::BadFrame,
            format!("connection closed inside a frame ({n} bytes)"),
        ),
    }
}

fn message_name(m: &ClientMessage) -> &'static str {
    match m {
        ClientMessage::Hello(_) => "hello",
        ClientMessage::Batch(_) => "batch",
        ClientMessage::Ping => "ping",
        ClientMessage::Bye => "bye",
        ClientMessage::End(_) => "end",
    }
}

/// Now in microseconds since the Unix epoch.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}
