//! The replayer: reads segments oldest first and hands their records to the batcher
//! as `BatchOrigin::Spool` batches, at most a window at a time so that live traffic
//! keeps its share of the batcher's queue; deletes a segment once it is sealed, read
//! to its end, and every record of it has a verdict. Corrupt and torn records are
//! counted and skipped; the open segment is read up to what the gate has fsynced.
//! A record the database refuses is copied to the [dead letters](super::rejected)
//! first.
//!
//! A record whose verdict never comes (the batcher stopped), or that could not be
//! kept as a dead letter, keeps its segment on disk: the next start replays it, and
//! the batcher's dedupe drops what was stored.
//!
//! A session end (protocol 1.1) is handed on only once every record before it has its
//! verdict, and nothing follows it before its own: the order the gateway sent them in,
//! as the listener keeps it for live traffic.
//!
//! It also publishes when the oldest batch still waiting for PostgreSQL was accepted
//! (`dbx_spool_oldest_record_age_seconds`): the oldest of the records it has read
//! and not yet seen resolved, since every record not read yet is younger.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::events::{CorruptRecordSkipped, RecordReplayed, ReplayRefused};
use dbx_core::{AckHandle, BatchOrigin, BatchOutcome, InternalEvent, Rejection, TelemetryBatch};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info};

use super::record::{decode_batch, SpooledBatch};
use super::rejected::{DeadLetters, Kept};
use super::segment::{self, Next, Step, Walker};
use super::state::Shared;

/// Records read per blocking read.
const READ_RECORDS: usize = 64;
/// Payload bytes read per blocking read (one record may exceed it).
const READ_BYTES: usize = 4 * 1024 * 1024;
/// Poll interval while caught up with the open segment (a wake-up also comes from the gate).
const IDLE_POLL: Duration = Duration::from_millis(250);

type Verdict =
    Pin<Box<dyn Future<Output = (Sent, Result<BatchOutcome, oneshot::error::RecvError>)> + Send>>;

/// Where a record handed to the batcher came from.
#[derive(Debug, Clone, Copy)]
struct Sent {
    seg: u64,
    /// Its offset in the segment, to read it again should the database refuse it.
    offset: u64,
    /// When the daemon accepted it (unix µs).
    accepted: i64,
    /// A session end (see the module docs for its order).
    end: bool,
}

/// A record read and decoded, not yet handed to the batcher.
struct Pending {
    sent: Sent,
    batch: SpooledBatch,
}

/// Where the replayer is in one segment.
#[derive(Debug, Default)]
struct Progress {
    /// Records read from it without a verdict yet: waiting in `ready` or in the
    /// batcher. Counted from the read, not the send: a segment read to its end is
    /// otherwise deleted while its last records are only in memory.
    outstanding: u64,
    /// Read to its sealed end.
    read_done: bool,
    /// A record got no verdict, or the file could not be read or deleted: keep it.
    keep: bool,
}

/// The segment being read.
struct Reading {
    id: u64,
    file: Arc<File>,
    walker: Walker,
}

/// What one blocking read found.
struct Chunk {
    records: Vec<(u64, Vec<u8>)>,
    walker: Walker,
    /// Damage skipped: (offset, what).
    corrupt: Vec<(u64, String)>,
    /// Reached `limit` (or a torn tail, which ends the readable part).
    at_end: bool,
    torn: bool,
}

fn read_chunk(file: &File, mut walker: Walker, limit: u64) -> std::io::Result<Chunk> {
    let mut c = Chunk {
        records: Vec::new(),
        walker,
        corrupt: Vec::new(),
        at_end: false,
        torn: false,
    };
    let mut bytes = 0;
    while c.records.len() < READ_RECORDS && bytes < READ_BYTES {
        match walker.next(file, limit)? {
            Step::Record { offset, payload } => {
                bytes += payload.len();
                c.records.push((offset, payload));
            }
            Step::Corrupt { offset } => c.corrupt.push((offset, "bad CRC".into())),
            Step::Resynced { offset, to, reason } => c.corrupt.push((
                offset,
                format!("{reason}; resumed at the next intact record, offset {to}"),
            )),
            Step::Torn { offset, reason } => {
                c.corrupt
                    .push((offset, format!("{reason}; nothing intact follows")));
                c.torn = true;
                c.at_end = true;
                break;
            }
            Step::End => {
                c.at_end = true;
                break;
            }
        }
    }
    c.walker = walker;
    Ok(c)
}

struct Replayer {
    shared: Arc<Shared>,
    progress: BTreeMap<u64, Progress>,
    reading: Option<Reading>,
    /// Segments below this id are read to their end.
    next_segment: u64,
    ready: VecDeque<Pending>,
    verdicts: FuturesUnordered<Verdict>,
    /// When the records in `verdicts` were accepted (a multiset: time → count).
    in_flight_accepted: BTreeMap<i64, u32>,
    /// A session end is among `verdicts`.
    end_in_flight: bool,
    /// Caught up with everything durable: wait for the gate.
    idle: bool,
    /// `None` only after a dead-letter write task panicked.
    dead: Option<DeadLetters>,
}

/// The replayer task.
pub(crate) async fn run(
    shared: Arc<Shared>,
    dead: DeadLetters,
    tx: mpsc::Sender<TelemetryBatch>,
    mut stop: watch::Receiver<bool>,
) {
    let window = (tx.max_capacity() / 2).clamp(1, 256);
    shared.rejected_bytes.store(dead.bytes(), Ordering::Relaxed);
    let mut r = Replayer {
        shared,
        progress: BTreeMap::new(),
        reading: None,
        next_segment: 0,
        ready: VecDeque::new(),
        verdicts: FuturesUnordered::new(),
        in_flight_accepted: BTreeMap::new(),
        end_in_flight: false,
        idle: false,
        dead: Some(dead),
    };
    let mut tx = Some(tx);
    loop {
        // Read until there is something to send or nothing durable is left: a read
        // that only finishes a segment leaves no wake-up behind (no verdict pending,
        // and `written` is only awaited while idle), so waiting after it would stall
        // the replay until the next start.
        while tx.is_some() && r.ready.is_empty() && !r.idle {
            r.read_more().await;
        }
        if tx.is_none() && r.verdicts.is_empty() {
            break;
        }
        r.shared.caught_up.store(
            r.idle && r.ready.is_empty() && r.verdicts.is_empty(),
            Ordering::Relaxed,
        );
        r.publish_oldest_waiting();
        let can_send = r.verdicts.len() < window && r.next_may_go();
        let sender = tx.clone();
        tokio::select! {
            biased;
            Some((sent, res)) = r.verdicts.next(), if !r.verdicts.is_empty() => r.on_verdict(sent, res).await,
            changed = stop.changed(), if tx.is_some() => {
                if changed.is_err() || *stop.borrow() {
                    // Stop feeding the batcher; what is not resolved stays on disk.
                    tx = None;
                    r.ready.clear();
                }
            }
            permit = reserve(&sender), if can_send && sender.is_some() => match permit {
                Some(p) => r.send(p),
                None => {
                    tx = None;
                    r.ready.clear();
                }
            },
            _ = r.shared.written.notified(), if r.idle => r.idle = false,
            _ = tokio::time::sleep(IDLE_POLL), if r.idle => r.idle = false,
        }
    }
    r.ready.clear();
    r.publish_oldest_waiting();
    info!(stats = ?r.shared.stats(), "spool replayer finished");
}

async fn reserve(
    tx: &Option<mpsc::Sender<TelemetryBatch>>,
) -> Option<mpsc::Permit<'_, TelemetryBatch>> {
    match tx {
        Some(tx) => tx.reserve().await.ok(),
        None => std::future::pending().await,
    }
}

impl Replayer {
    /// Publishes when the oldest record read and not yet resolved was accepted.
    fn publish_oldest_waiting(&self) {
        let oldest = self
            .ready
            .iter()
            .map(|p| p.sent.accepted)
            .chain(self.in_flight_accepted.keys().next().copied())
            .min();
        self.shared.set_oldest_waiting(oldest);
    }

    /// Whether the next ready record may go to the batcher (window aside): not while
    /// a session end is in flight, and an end only once nothing else is.
    fn next_may_go(&self) -> bool {
        match self.ready.front() {
            None => false,
            Some(_) if self.end_in_flight => false,
            Some(p) => !p.sent.end || self.verdicts.is_empty(),
        }
    }

    fn send(&mut self, permit: mpsc::Permit<'_, TelemetryBatch>) {
        let Some(Pending { sent, batch: b }) = self.ready.pop_front() else {
            return;
        };
        let (ack, verdict) = AckHandle::channel();
        self.end_in_flight |= sent.end;
        let now = Instant::now();
        permit.send(TelemetryBatch {
            org_id: b.org_id,
            aircraft_id: b.aircraft_id,
            session_id: b.session_id,
            points: b.points,
            ack,
            origin: BatchOrigin::Spool,
            received_at: now,
            admitted_at: now,
            queued_at: now,
            ends_session: b.ends_session,
        });
        *self.in_flight_accepted.entry(sent.accepted).or_default() += 1;
        self.verdicts
            .push(Box::pin(async move { (sent, verdict.await) }));
    }

    async fn on_verdict(
        &mut self,
        sent: Sent,
        res: Result<BatchOutcome, oneshot::error::RecvError>,
    ) {
        if sent.end {
            self.end_in_flight = false;
        }
        if let Some(n) = self.in_flight_accepted.get_mut(&sent.accepted) {
            *n -= 1;
            if *n == 0 {
                self.in_flight_accepted.remove(&sent.accepted);
            }
        }
        let seg = sent.seg;
        let p = self.progress.entry(seg).or_default();
        p.outstanding = p.outstanding.saturating_sub(1);
        let keep = match res {
            Ok(BatchOutcome::Durable) => {
                self.shared.committed();
                self.shared.replayed.fetch_add(1, Ordering::Relaxed);
                RecordReplayed {
                    segment: seg,
                    refused: false,
                }
                .emit();
                false
            }
            Ok(BatchOutcome::Rejected(r)) => {
                self.shared.committed();
                self.shared.replayed.fetch_add(1, Ordering::Relaxed);
                RecordReplayed {
                    segment: seg,
                    refused: true,
                }
                .emit();
                !self.keep_rejected(sent, &r).await
            }
            Err(_) => true,
        };
        if keep {
            self.progress.entry(seg).or_default().keep = true;
        }
        self.maybe_delete(seg).await;
    }

    /// Copies a record the database refused to the dead letters. `false` when it
    /// could not be: its segment must then stay in the spool.
    async fn keep_rejected(&mut self, sent: Sent, r: &Rejection) -> bool {
        let Some(mut dead) = self.dead.take() else {
            error!(segment = sent.seg, "the dead-letter store is unavailable; keeping the refused batch's segment in the spool");
            return false;
        };
        let path = self.shared.dir.join(segment::file_name(sent.seg));
        let (code, msg) = (r.code.as_str(), r.msg.clone());
        let copied = tokio::task::spawn_blocking(move || {
            let kept = (|| {
                let file = File::open(&path)?;
                let len = file.metadata()?.len();
                match segment::read_next(&file, sent.offset, len)? {
                    Next::Record { payload, .. } => dead.keep(&payload, code, &msg),
                    _ => Err(std::io::Error::other(
                        "the record no longer reads back intact",
                    )),
                }
            })();
            (dead, kept)
        })
        .await;
        let kept = match copied {
            Ok((dead, kept)) => {
                self.shared
                    .rejected_bytes
                    .store(dead.bytes(), Ordering::Relaxed);
                self.dead = Some(dead);
                kept
            }
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        match kept {
            Ok(Kept::Stored) => {
                self.shared.rejected.fetch_add(1, Ordering::Relaxed);
                ReplayRefused::Kept {
                    segment: sent.seg,
                    code: r.code,
                    msg: &r.msg,
                }
                .emit();
                true
            }
            Ok(Kept::Full) => {
                ReplayRefused::StoreFull {
                    segment: sent.seg,
                    code: r.code,
                    msg: &r.msg,
                }
                .emit();
                false
            }
            Err(e) => {
                error!(
                    segment = sent.seg, code, msg = %r.msg, error = %e,
                    "the database refused a batch the spool had acked and it cannot be kept under rejected/; \
                     its segment stays in the spool (replayed at the next start)"
                );
                false
            }
        }
    }

    /// Deletes `seg` when it is sealed, read, and fully resolved.
    async fn maybe_delete(&mut self, seg: u64) {
        let Some(p) = self.progress.get(&seg) else {
            return;
        };
        if !p.read_done || p.outstanding > 0 || p.keep {
            return;
        }
        let sealed = self
            .shared
            .lock()
            .segments
            .get(&seg)
            .is_some_and(|s| s.sealed);
        if !sealed {
            return;
        }
        let path = self.shared.dir.join(segment::file_name(seg));
        match tokio::task::spawn_blocking(move || std::fs::remove_file(&path)).await {
            Ok(Ok(())) => {
                self.progress.remove(&seg);
                self.shared.lock().segments.remove(&seg);
                self.shared.deleted.fetch_add(1, Ordering::Relaxed);
                self.shared.freed.notify_one();
                self.shared.publish_gauges();
            }
            Ok(Err(e)) => {
                error!(segment = seg, error = %e, "cannot delete a replayed spool segment; it will be replayed again at the next start");
                if let Some(p) = self.progress.get_mut(&seg) {
                    p.keep = true;
                }
            }
            Err(e) => error!(segment = seg, error = %e, "segment delete task failed"),
        }
    }

    /// Makes one step of progress: reads the next records into `ready`, finishes
    /// (and moves past) a segment read to its sealed end, skips undecodable records,
    /// or sets `idle` when there is nothing durable left to read.
    async fn read_more(&mut self) {
        if self.reading.is_none() && !self.open_next_segment().await {
            return;
        }
        let Some(reading) = &self.reading else {
            return;
        };
        let id = reading.id;
        let (limit, sealed, created) = match self.shared.lock().segments.get(&id) {
            Some(s) => (s.durable_len, s.sealed, s.created_micros),
            None => (0, true, 0),
        };
        let file = reading.file.clone();
        let walker = reading.walker;
        let mut chunk = match tokio::task::spawn_blocking(move || read_chunk(&file, walker, limit))
            .await
        {
            Ok(Ok(c)) => c,
            other => {
                error!(segment = id, result = ?other.map(|r| r.map(|_| ())), "cannot read a spool segment; skipping it (kept on disk)");
                self.progress.entry(id).or_default().keep = true;
                self.finish_segment(id).await;
                return;
            }
        };
        self.count_damage(id, &chunk, sealed);
        self.queue_records(id, created, std::mem::take(&mut chunk.records));
        if let Some(r) = &mut self.reading {
            r.walker = chunk.walker;
        }
        if chunk.torn && !sealed {
            // Damage inside what the gate fsynced: have it start a new segment, then
            // finish this one as sealed (the rest of it is unreadable either way).
            error!(
                segment = id,
                "the open spool segment is damaged; asking the gate to seal it"
            );
            self.shared.lock().seal_requested = Some(id);
            self.idle = true;
            return;
        }
        if chunk.at_end {
            if sealed {
                self.finish_segment(id).await;
            } else if self.ready.is_empty() {
                self.idle = true;
            }
        }
    }

    /// Opens the oldest segment from `next_segment` on for reading. `false` when there
    /// is none (then `idle`) or it cannot be opened (then it is kept and skipped).
    async fn open_next_segment(&mut self) -> bool {
        let next = self
            .shared
            .lock()
            .segments
            .range(self.next_segment..)
            .next()
            .map(|(id, _)| *id);
        let Some(id) = next else {
            self.idle = true;
            return false;
        };
        let path = self.shared.dir.join(segment::file_name(id));
        match tokio::task::spawn_blocking(move || File::open(path)).await {
            Ok(Ok(f)) => {
                self.reading = Some(Reading {
                    id,
                    file: Arc::new(f),
                    walker: Walker::new(segment::HEADER_BYTES),
                });
                true
            }
            other => {
                error!(segment = id, result = ?other.map(|r| r.map(|_| ())), "cannot open a spool segment; skipping it (kept on disk)");
                self.progress.entry(id).or_default().keep = true;
                self.next_segment = id + 1;
                false
            }
        }
    }

    /// Logs and counts the damage `chunk` skipped in segment `id`. A tear in the open
    /// (not `sealed`) segment is counted once, after the gate sealed it.
    fn count_damage(&self, id: u64, chunk: &Chunk, sealed: bool) {
        let counted = if chunk.torn && !sealed {
            chunk.corrupt.len() - 1
        } else {
            chunk.corrupt.len()
        };
        for (at, reason) in &chunk.corrupt[..counted] {
            CorruptRecordSkipped {
                segment: id,
                offset: *at,
                reason,
            }
            .emit();
        }
        self.shared.count_corrupt(counted as u64);
    }

    /// Decodes the records read from segment `id` into `ready`; an undecodable one is
    /// logged, counted and skipped. `created` (the segment's creation) stands for the
    /// acceptance time of version 1 records, which lack it.
    fn queue_records(&mut self, id: u64, created: i64, records: Vec<(u64, Vec<u8>)>) {
        for (at, payload) in records {
            match decode_batch(&payload) {
                Ok(batch) => {
                    self.progress.entry(id).or_default().outstanding += 1;
                    self.ready.push_back(Pending {
                        sent: Sent {
                            seg: id,
                            offset: at,
                            // Version 1 records: the segment's creation bounds it.
                            accepted: batch.accepted_micros.unwrap_or(created),
                            end: batch.ends_session,
                        },
                        batch,
                    });
                }
                Err(e) => {
                    CorruptRecordSkipped {
                        segment: id,
                        offset: at,
                        reason: &e,
                    }
                    .emit();
                    self.shared.count_corrupt(1);
                }
            }
        }
    }

    async fn finish_segment(&mut self, id: u64) {
        self.reading = None;
        self.next_segment = id + 1;
        self.progress.entry(id).or_default().read_done = true;
        self.maybe_delete(id).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::encode_batch;
    use crate::segment::{frame_record, SegmentWriter};
    use crate::state::{SegInfo, State};
    use dbx_core::Point;
    use uuid::Uuid;

    /// Stands in for the batcher: resolves every batch it receives as durable.
    fn accept_all(mut rx: mpsc::Receiver<TelemetryBatch>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                b.ack.durable();
            }
        })
    }

    /// Appends one record to `w` and publishes it, as the gate's `write` does.
    fn append(shared: &Shared, w: &mut SegmentWriter) {
        let mut payload = Vec::new();
        let point = Point {
            seq: 1,
            ..Point::default()
        };
        encode_batch(
            Uuid::nil(),
            Uuid::nil(),
            Uuid::nil(),
            &[point],
            0,
            &mut payload,
        );
        let mut framed = Vec::new();
        frame_record(&payload, &mut framed);
        w.append(&framed).unwrap();
        let mut st = shared.lock();
        let s = st.segments.entry(w.id).or_insert(SegInfo {
            durable_len: 0,
            records: 0,
            sealed: false,
            created_micros: 0,
        });
        s.durable_len = w.len;
        s.records += 1;
        drop(st);
        shared.written.notify_one();
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let held = dbx_testkit::wait_until(Duration::from_secs(5), || std::future::ready(done()));
        assert!(held.await, "timed out waiting for {what}");
    }

    /// A sealed segment read to its end in one go must stay on disk while its
    /// records wait in memory for room in the batcher's queue: they are acked, and a
    /// crash then would lose them.
    #[tokio::test]
    async fn a_segment_is_not_deleted_while_its_records_are_only_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Arc::new(Shared::new(dir.path().to_path_buf(), State::default()));
        let mut w = SegmentWriter::create(dir.path(), 0, 0).unwrap();
        for _ in 0..3 {
            append(&shared, &mut w);
        }
        shared.lock().segments.get_mut(&0).unwrap().sealed = true;
        // A batcher that takes one batch and then nothing: the rest waits in `ready`.
        let (tx, mut rx) = mpsc::channel(1);
        let dead = DeadLetters::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(shared.clone(), dead, tx, stop_rx));
        let first = rx.recv().await.unwrap();
        first.ack.durable();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            w.path.exists(),
            "the segment was deleted with two of its records unresolved"
        );
        assert_eq!(shared.replayed.load(Ordering::Relaxed), 1);
        // The batcher resumes: both arrive, and only then the file goes.
        let batcher = accept_all(rx);
        wait_for("the segment to be deleted", || !w.path.exists()).await;
        assert_eq!(shared.replayed.load(Ordering::Relaxed), 3);
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        batcher.abort();
    }

    /// `dbx_spool_oldest_record_age_seconds` follows the oldest batch read and not
    /// yet resolved, from when it was accepted, and drops to 0 once all are.
    #[tokio::test]
    async fn the_oldest_waiting_batch_is_measured_from_its_acceptance() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Arc::new(Shared::new(dir.path().to_path_buf(), State::default()));
        let mut w = SegmentWriter::create(dir.path(), 0, 0).unwrap();
        let accepted = dbx_core::now_micros() - 30_000_000;
        let mut payload = Vec::new();
        let point = Point::new(accepted, 1);
        encode_batch(
            Uuid::nil(),
            Uuid::nil(),
            Uuid::nil(),
            &[point],
            accepted,
            &mut payload,
        );
        let mut framed = Vec::new();
        frame_record(&payload, &mut framed);
        w.append(&framed).unwrap();
        shared.lock().segments.insert(
            0,
            SegInfo {
                durable_len: w.len,
                records: 1,
                sealed: true,
                created_micros: 0,
            },
        );
        assert_eq!(shared.oldest_waiting_age(), Duration::ZERO);
        let (tx, mut rx) = mpsc::channel(1);
        let dead = DeadLetters::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(shared.clone(), dead, tx, stop_rx));
        let batch = rx.recv().await.unwrap();
        wait_for("the age to be published", || {
            shared.oldest_waiting_age() >= Duration::from_secs(30)
        })
        .await;
        assert!(shared.oldest_waiting_age() < Duration::from_secs(60));
        batch.ack.durable();
        wait_for("the age to drop to 0", || {
            shared.oldest_waiting_age() == Duration::ZERO
        })
        .await;
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }

    /// The open segment is replayed and resolved completely, then sealed (as the
    /// gate does when the spool is full): with nothing outstanding, the replayer
    /// must still go on to the next segment the gate opens.
    #[tokio::test]
    async fn sealing_a_fully_replayed_segment_does_not_stall_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Arc::new(Shared::new(dir.path().to_path_buf(), State::default()));
        let (tx, rx) = mpsc::channel(8);
        let batcher = accept_all(rx);
        let (stop_tx, stop_rx) = watch::channel(false);
        let dead = DeadLetters::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        let task = tokio::spawn(run(shared.clone(), dead, tx, stop_rx));

        let mut w0 = SegmentWriter::create(dir.path(), 0, 0).unwrap();
        append(&shared, &mut w0);
        let replayed = || shared.replayed.load(Ordering::Relaxed);
        wait_for("the first record", || replayed() == 1).await;

        // Seal it with every record resolved; it must be deleted.
        shared.lock().segments.get_mut(&0).unwrap().sealed = true;
        shared.written.notify_one();
        wait_for("segment 0 to be deleted", || {
            shared.deleted.load(Ordering::Relaxed) == 1
        })
        .await;

        let mut w1 = SegmentWriter::create(dir.path(), 1, 0).unwrap();
        append(&shared, &mut w1);
        wait_for("the record in segment 1", || replayed() == 2).await;

        stop_tx.send(true).unwrap();
        task.await.unwrap();
        batcher.abort();
    }
}
