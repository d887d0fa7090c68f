//! The gate between the listener's queue and the batcher's: forwards batches while
//! the database keeps up, and appends them to the spool (fsync, then ack) while it
//! does not. See the [module overview](super) for the rules; this file is the task.
//!
//! The gate keeps, for every batch it forwarded and the batcher has not resolved
//! yet, the client's ack handle and the batch's spool encoding. The batcher gets a
//! fresh handle; its verdict is passed on to the client. When the gate starts
//! spooling, those still in flight are written too and acked from the spool, so no
//! connection waits for the database.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::events::{SpoolAppended, SpoolFull, SpoolingStarted, SpoolingStopped};
use crate::metrics as m;
use dbx_core::{AckHandle, BatchOutcome, InternalEvent, RejectCode, Rejection, TelemetryBatch};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use super::record::{encode_batch, encode_end};
use super::segment::{self, SegmentWriter};
use super::state::{SegInfo, Shared};
use super::{SpoolConfig, WhenFull};
use dbx_core::now_micros;

/// Most batches written in one group commit.
const BURST_BATCHES: usize = 512;
/// Most payload bytes written in one group commit.
const BURST_BYTES: usize = 16 * 1024 * 1024;
/// After a refused write the next group commit is this many times smaller (down to
/// one record), so that what still fits on the disk is written instead of the same
/// large burst failing again and again; it grows back by doubling after each success.
const BURST_SHRINK_ON_ERROR: usize = 4;
/// How often the gate re-evaluates its mode and publishes gauges.
const TICK: Duration = Duration::from_millis(50);
/// Pause before writing again after a write error.
const WRITE_ERROR_BACKOFF: Duration = Duration::from_secs(1);

type Verdict =
    Pin<Box<dyn Future<Output = (u64, Result<BatchOutcome, oneshot::error::RecvError>)> + Send>>;

/// A batch handed to the batcher and not resolved yet.
struct Forwarded {
    /// The client's handle; `None` once the spool acked it (or for UDP).
    client: Option<AckHandle>,
    /// The spool encoding, kept while `client` is unanswered.
    payload: Option<Vec<u8>>,
    /// Written to the spool (and acked from it) while in the batcher.
    spooled: bool,
    sent: Instant,
}

/// A batch taken from the listener's queue and not placed yet.
struct Held {
    batch: TelemetryBatch,
    payload: Option<Vec<u8>>,
    taken: Instant,
    counted_full: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Spooling { since: Instant },
}

struct Gate {
    cfg: SpoolConfig,
    shared: Arc<Shared>,
    mode: Mode,
    writer: Option<SegmentWriter>,
    forwarded: BTreeMap<u64, Forwarded>,
    next_id: u64,
    verdicts: FuturesUnordered<Verdict>,
    held: VecDeque<Held>,
    /// Set while the spool is full or unwritable: no write is tried before then
    /// (or before the replayer frees room).
    retry_at: Option<Instant>,
    /// The current bound on a group commit's bytes (see `BURST_SHRINK_ON_ERROR`).
    burst_bytes: usize,
}

/// One group commit being assembled: records framed back to back, bounded by the
/// spool's room, the current burst size, and what is left of the segment the burst
/// will land in.
struct Burst {
    framed: Vec<u8>,
    /// Bytes the spool may still grow by.
    room: u64,
    /// The current bound on a burst's bytes (shrunk after a write error).
    burst_bytes: usize,
    /// Bytes the burst may take in its segment, known once the first record is seen.
    segment_room: Option<u64>,
}

/// Where a record goes.
#[derive(Debug, PartialEq, Eq)]
enum Fit {
    /// Framed into this burst.
    Taken,
    /// The burst is complete (its bytes, or its segment's end): in the next one.
    NextBurst,
    /// Past `spool.max_bytes`: the spool is full.
    NoRoom,
}

impl Burst {
    fn new(room: u64, burst_bytes: usize) -> Self {
        Burst {
            framed: Vec::new(),
            room,
            burst_bytes,
            segment_room: None,
        }
    }

    /// Frames `payload` if it belongs in this burst; `segment_room` is asked once,
    /// with the first record's framed size (see `Gate::segment_room`).
    fn add(&mut self, payload: &[u8], segment_room: impl FnOnce(u64) -> u64) -> Fit {
        let grown = self.framed.len() as u64 + segment::RECORD_HEADER_BYTES + payload.len() as u64;
        let in_segment = *self.segment_room.get_or_insert_with(|| segment_room(grown));
        if self.framed.len() >= self.burst_bytes || (!self.framed.is_empty() && grown > in_segment)
        {
            return Fit::NextBurst;
        }
        if grown > self.room {
            return Fit::NoRoom;
        }
        segment::frame_record(payload, &mut self.framed);
        Fit::Taken
    }
}

fn encode(b: &TelemetryBatch) -> Vec<u8> {
    let mut out = Vec::new();
    let accepted = now_micros() - b.received_at.elapsed().as_micros() as i64;
    if b.ends_session {
        encode_end(b.org_id, b.session_id, accepted, &mut out);
    } else {
        encode_batch(
            b.org_id,
            b.aircraft_id,
            b.session_id,
            &b.points,
            accepted,
            &mut out,
        );
    }
    out
}

fn is_best_effort(b: &TelemetryBatch) -> bool {
    b.origin.is_best_effort()
}

/// The gate task.
pub(crate) async fn run(
    cfg: SpoolConfig,
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<TelemetryBatch>,
    tx: mpsc::Sender<TelemetryBatch>,
    stop_replayer: watch::Sender<bool>,
) {
    let mut g = Gate {
        cfg,
        shared,
        mode: Mode::Direct,
        writer: None,
        forwarded: BTreeMap::new(),
        next_id: 0,
        verdicts: FuturesUnordered::new(),
        held: VecDeque::new(),
        retry_at: None,
        burst_bytes: BURST_BYTES,
    };
    m::active(false);
    g.shared.publish_gauges();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;
    loop {
        if matches!(g.mode, Mode::Spooling { .. }) && !g.held.is_empty() && g.may_write() {
            // Blocked batches stay where they are: reading A again would move the
            // listener's backlog into the gate instead of pushing back on sockets.
            let blocked = g.held.front().is_some_and(|h| h.counted_full);
            while open && !blocked && g.held.len() < BURST_BATCHES {
                match rx.try_recv() {
                    Ok(b) => g.held.push_back(Held::new(b)),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            g.spool_held(&tx).await;
        }
        if !open && !g.held.is_empty() && !g.may_write() {
            // Shutting down with a full or failing spool: what is left cannot be made
            // durable; its connections are gone, and the gateways resend it.
            warn!(
                batches = g.held.len(),
                "spool full at shutdown; leaving the last batches unacked"
            );
            g.held.clear();
        }
        if !open && g.held.is_empty() {
            break;
        }
        let want_batcher = g.mode == Mode::Direct && !g.held.is_empty();
        tokio::select! {
            biased;
            Some((id, res)) = g.verdicts.next(), if !g.verdicts.is_empty() => g.on_verdict(id, res),
            _ = tick.tick() => g.on_tick().await,
            _ = g.shared.freed.notified(), if g.retry_at.is_some() => g.retry_at = None,
            permit = tx.reserve(), if want_batcher => match permit {
                Ok(p) => g.forward(p),
                Err(_) => {
                    error!("the batcher stopped; the spool gate stops forwarding");
                    g.held.clear();
                    break;
                }
            },
            msg = rx.recv(), if open && g.held.is_empty() => match msg {
                Some(b) => g.held.push_back(Held::new(b)),
                None => open = false,
            },
        }
    }

    // The listener is gone: let the batcher finish, and the replayer stop feeding it.
    g.seal();
    drop(tx);
    let _ = stop_replayer.send(true);
    while let Some((id, res)) = g.verdicts.next().await {
        g.on_verdict(id, res);
    }
    m::active(false);
    g.shared.publish_gauges();
    info!(stats = ?g.shared.stats(), "spool gate finished");
}

impl Held {
    fn new(batch: TelemetryBatch) -> Held {
        Held {
            batch,
            payload: None,
            taken: Instant::now(),
            counted_full: false,
        }
    }
}

impl Gate {
    fn after(&self) -> Duration {
        self.cfg.after()
    }

    fn may_write(&self) -> bool {
        self.retry_at.is_none_or(|t| Instant::now() >= t)
    }

    /// Direct mode: hands the front batch to the batcher, keeping what is needed to
    /// spool it later.
    fn forward(&mut self, permit: mpsc::Permit<'_, TelemetryBatch>) {
        let Some(Held {
            mut batch, payload, ..
        }) = self.held.pop_front()
        else {
            return;
        };
        let payload = if is_best_effort(&batch) {
            None
        } else {
            Some(payload.unwrap_or_else(|| encode(&batch)))
        };
        let (ack, verdict) = AckHandle::channel();
        let client = std::mem::replace(&mut batch.ack, ack);
        permit.send(batch);
        let id = self.next_id;
        self.next_id += 1;
        self.forwarded.insert(
            id,
            Forwarded {
                client: payload.as_ref().map(|_| client),
                payload,
                spooled: false,
                sent: Instant::now(),
            },
        );
        self.verdicts
            .push(Box::pin(async move { (id, verdict.await) }));
    }

    fn on_verdict(&mut self, id: u64, res: Result<BatchOutcome, oneshot::error::RecvError>) {
        let Some(f) = self.forwarded.remove(&id) else {
            return;
        };
        match res {
            Ok(BatchOutcome::Durable) => {
                self.shared.committed();
                if let Some(c) = f.client {
                    c.durable();
                }
            }
            Ok(BatchOutcome::Rejected(r)) => {
                self.shared.committed();
                match f.client {
                    Some(c) => c.reject(r),
                    // Its spooled copy is replayed, refused again, and kept as a
                    // dead letter; the replayer logs it then.
                    None if f.spooled => info!(
                        code = r.code.as_str(), msg = %r.msg,
                        "the database refused a batch the spool had already acked; its spooled copy will be kept as a dead letter"
                    ),
                    None => {}
                }
            }
            // The batcher went away without a verdict: no ack (the gateway resends),
            // unless the spool already made it durable.
            Err(_) => {}
        }
    }

    async fn on_tick(&mut self) {
        let now = Instant::now();
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
        }
        let oldest = self
            .forwarded
            .values()
            .next()
            .map(|f| now.duration_since(f.sent));
        let after = self.after();
        match self.mode {
            Mode::Direct => {
                let waiting = self
                    .held
                    .front()
                    .map(|h| now.duration_since(h.taken))
                    .unwrap_or_default();
                if oldest.is_some_and(|o| o >= after) || waiting >= after {
                    self.mode = Mode::Spooling { since: now };
                    SpoolingStarted {
                        after_ms: self.cfg.after_ms,
                        in_flight: self.forwarded.len(),
                    }
                    .emit();
                }
            }
            Mode::Spooling { since } => {
                let young = oldest.is_none_or(|o| o < after);
                let commits = self.shared.since_commit().is_some_and(|d| d < after);
                // Nothing written is waiting for the database: a quiet spell after the
                // replay (no commits because nothing is left), not an outage.
                let caught_up = self.shared.caught_up.load(Ordering::Relaxed);
                if now.duration_since(since) >= after && young && (commits || caught_up) {
                    self.seal();
                    self.mode = Mode::Direct;
                    SpoolingStopped.emit();
                }
            }
        }
        if matches!(self.mode, Mode::Spooling { .. }) {
            if self.may_write() {
                self.spool_in_flight().await;
            }
            let requested = self.shared.lock().seal_requested.take();
            if requested.is_some() && requested == self.writer.as_ref().map(|w| w.id) {
                warn!("the replayer found damage in the open segment; sealing it");
                self.seal();
            }
        }
        self.shared.publish_gauges();
    }

    /// Spools every forwarded batch whose client still waits, and acks it: one
    /// group commit per segment's worth, until all are written or the spool is full.
    async fn spool_in_flight(&mut self) {
        loop {
            let mut burst = Burst::new(self.room(), self.burst_bytes);
            let mut ids = Vec::new();
            for (id, f) in &self.forwarded {
                let (Some(_), Some(p)) = (&f.client, &f.payload) else {
                    continue;
                };
                if p.len() > segment::MAX_RECORD_BYTES as usize {
                    continue;
                }
                if burst.add(p, |first| self.segment_room(first)) != Fit::Taken {
                    break;
                }
                ids.push(*id);
            }
            if ids.is_empty() || self.write(burst.framed, ids.len() as u64).await.is_err() {
                return;
            }
            for id in ids {
                if let Some(f) = self.forwarded.get_mut(&id) {
                    f.payload = None;
                    f.spooled = true;
                    if let Some(c) = f.client.take() {
                        c.durable();
                    }
                }
            }
        }
    }

    /// Bytes a group commit that starts with a framed record of `first` bytes may
    /// take: what is left in the open segment when the record fits there, else a
    /// fresh segment's room (`write` then opens one). Only a single record larger
    /// than `segment_bytes` makes a segment exceed it.
    fn segment_room(&self, first: u64) -> u64 {
        match &self.writer {
            Some(w) if w.len + first <= self.cfg.segment_bytes => self.cfg.segment_bytes - w.len,
            _ => self.cfg.segment_bytes.saturating_sub(segment::HEADER_BYTES),
        }
    }

    /// Bytes the spool may still grow by (a new segment's header included).
    fn room(&self) -> u64 {
        let used = self.shared.lock().bytes() + segment::HEADER_BYTES;
        self.cfg.max_bytes.saturating_sub(used)
    }

    /// Spooling mode: writes the held batches that fit, acks them after the fsync,
    /// and applies `when_full` to the rest. One group commit per burst and per
    /// segment, back to back until every held batch is placed.
    async fn spool_held(&mut self, tx: &mpsc::Sender<TelemetryBatch>) {
        while self.spool_burst(tx).await && !self.held.is_empty() {}
    }

    /// One group commit of the held batches; `false` when nothing more can be
    /// written now (the spool is full or the write failed).
    async fn spool_burst(&mut self, tx: &mpsc::Sender<TelemetryBatch>) -> bool {
        let mut burst = Burst::new(self.room(), self.burst_bytes);
        let mut taken: Vec<Held> = Vec::new();
        let mut oversize = Vec::new();
        let mut no_room = false;
        while let Some(mut h) = self.held.pop_front() {
            let p = h.payload.get_or_insert_with(|| encode(&h.batch));
            if p.len() > segment::MAX_RECORD_BYTES as usize {
                oversize.push(h);
                continue;
            }
            match burst.add(p, |first| self.segment_room(first)) {
                Fit::Taken => taken.push(h),
                // The rest goes in the next group commit (in the next segment).
                Fit::NextBurst => {
                    self.held.push_front(h);
                    break;
                }
                Fit::NoRoom => {
                    self.held.push_front(h);
                    no_room = true;
                    break;
                }
            }
        }
        for h in oversize {
            // Larger than any record may be: it can only wait for the database.
            warn!(
                points = h.batch.points.len(),
                "a batch too large for one spool record goes to the batcher directly"
            );
            if tx.send(h.batch).await.is_err() {
                break;
            }
        }
        if !taken.is_empty() {
            match self.write(burst.framed, taken.len() as u64).await {
                Ok(()) => {
                    for h in taken {
                        h.batch.ack.durable();
                    }
                }
                Err(_) => {
                    for h in taken.into_iter().rev() {
                        self.held.push_front(h);
                    }
                    no_room = true;
                }
            }
        }
        if no_room && !self.held.is_empty() {
            self.full();
        }
        !no_room
    }

    /// The spool cannot take the held batches now.
    fn full(&mut self) {
        // Let the replayer finish and delete what is open, or nothing ever frees room.
        if self
            .writer
            .as_ref()
            .is_some_and(|w| w.len > segment::HEADER_BYTES)
        {
            self.seal();
        }
        let mut keep = VecDeque::new();
        let when_full = self.cfg.when_full;
        for mut h in self.held.drain(..) {
            if is_best_effort(&h.batch) {
                SpoolFull::BestEffortDropped {
                    origin: h.batch.origin,
                }
                .emit();
                self.shared.full.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match when_full {
                WhenFull::Block => {
                    if !h.counted_full {
                        h.counted_full = true;
                        SpoolFull::Blocked.emit();
                        self.shared.full.fetch_add(1, Ordering::Relaxed);
                    }
                    keep.push_back(h);
                }
                WhenFull::DropNewest => {
                    SpoolFull::Refused {
                        max_bytes: self.cfg.max_bytes,
                    }
                    .emit();
                    self.shared.full.fetch_add(1, Ordering::Relaxed);
                    h.batch.ack.reject(Rejection::new(
                        RejectCode::Rejected,
                        format!(
                            "the database is unavailable and the disk spool is full (spool.max_bytes = {}); \
                             this batch was not stored",
                            self.cfg.max_bytes
                        ),
                    ));
                }
            }
        }
        self.held = keep;
        if !self.held.is_empty() && self.retry_at.is_none() {
            self.retry_at = Some(Instant::now() + TICK);
        }
    }

    /// Appends `framed` (`n` records) to the open segment, opening one if needed,
    /// and fsyncs. On error nothing of it may be acked: the segment is sealed at
    /// its last good length, writes pause for a while, and the next burst is smaller.
    async fn write(&mut self, framed: Vec<u8>, n: u64) -> std::io::Result<()> {
        let res = self.write_inner(framed, n).await;
        match &res {
            Ok(()) => self.burst_bytes = (self.burst_bytes * 2).min(BURST_BYTES),
            Err(e) => {
                error!(error = %e, dir = %self.shared.dir.display(), "spool write failed; treating the spool as full");
                self.seal();
                self.retry_at = Some(Instant::now() + WRITE_ERROR_BACKOFF);
                self.burst_bytes = (self.burst_bytes / BURST_SHRINK_ON_ERROR).max(1);
            }
        }
        res
    }

    async fn write_inner(&mut self, framed: Vec<u8>, n: u64) -> std::io::Result<()> {
        // The same rule as `segment_room`: a burst that does not fit in what is left
        // of a segment holding records goes to a fresh one.
        if self.writer.as_ref().is_some_and(|w| {
            w.len > segment::HEADER_BYTES && w.len + framed.len() as u64 > self.cfg.segment_bytes
        }) {
            self.seal();
        }
        let mut w = match self.writer.take() {
            Some(w) => w,
            None => {
                let id = {
                    let mut st = self.shared.lock();
                    let id = st.next_id;
                    st.next_id += 1;
                    id
                };
                let dir = self.shared.dir.clone();
                let created = now_micros();
                let w = blocking(move || SegmentWriter::create(&dir, id, created)).await?;
                self.shared.lock().segments.insert(
                    id,
                    SegInfo {
                        durable_len: w.len,
                        records: 0,
                        sealed: false,
                        created_micros: created,
                    },
                );
                w
            }
        };
        let (w, res) = match tokio::task::spawn_blocking(move || {
            let r = w.append(&framed);
            (w, r)
        })
        .await
        {
            Ok(x) => x,
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        };
        let id = w.id;
        self.writer = Some(w);
        res?;
        if let Some(w) = &self.writer {
            let mut st = self.shared.lock();
            if let Some(s) = st.segments.get_mut(&id) {
                s.durable_len = w.len;
                s.records += n;
            }
        }
        self.shared.spooled.fetch_add(n, Ordering::Relaxed);
        SpoolAppended { records: n }.emit();
        self.shared.written.notify_one();
        Ok(())
    }

    /// Closes the open segment: no more appends, the replayer may delete it once
    /// every record in it is resolved.
    fn seal(&mut self) {
        if let Some(w) = self.writer.take() {
            if let Some(s) = self.shared.lock().segments.get_mut(&w.id) {
                s.sealed = true;
            }
            self.shared.written.notify_one();
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
}
