//! What the gate and the replayer share: the list of segments with their sizes and
//! how far each is durable, the wake-ups between the two tasks, the time of the last
//! commit, and the counters behind the `dbx_spool_*` metrics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::events::SegmentHeaderCorrupt;
use crate::metrics as m;
use dbx_core::{now_micros, InternalEvent};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::segment;

/// One segment file.
#[derive(Debug, Clone)]
pub(crate) struct SegInfo {
    /// Bytes in the file (header included) that are fsynced.
    pub durable_len: u64,
    /// Records in it (written, or counted at start-up).
    pub records: u64,
    /// No more appends: the replayer may treat its end as final and delete it.
    pub sealed: bool,
    /// When it was created (unix micros): when its version 1 records (which carry
    /// no acceptance time) count as accepted.
    pub created_micros: i64,
}

/// The segment list.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub segments: BTreeMap<u64, SegInfo>,
    pub next_id: u64,
    /// Replayer → gate: the open segment with this id is damaged; seal it so that
    /// new records go to a fresh one.
    pub seal_requested: Option<u64>,
}

impl State {
    pub fn bytes(&self) -> u64 {
        self.segments.values().map(|s| s.durable_len).sum()
    }
}

/// Totals, for tests and the shutdown log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Segment files now.
    pub segments: u64,
    /// Bytes in them.
    pub bytes: u64,
    /// Records in them.
    pub records: u64,
    /// Records written since start.
    pub spooled_records: u64,
    /// Replayed records committed (or rejected) since start.
    pub replayed_records: u64,
    /// Corrupt or torn records skipped since start.
    pub corrupt_records: u64,
    /// Batches that found the spool full since start.
    pub full: u64,
    /// Segments deleted since start.
    pub deleted_segments: u64,
    /// Records the database refused on replay, kept as dead letters, since start.
    pub rejected_records: u64,
}

/// State shared by the gate and the replayer.
#[derive(Debug)]
pub(crate) struct Shared {
    pub dir: PathBuf,
    pub state: Mutex<State>,
    /// Gate → replayer: more records are durable, or a segment was sealed.
    pub written: Notify,
    /// Replayer → gate: a segment was deleted (room again).
    pub freed: Notify,
    base: Instant,
    /// Micros since `base` of the last commit seen by either task, plus one (0 = none).
    last_commit: AtomicU64,
    /// Replayer → gate: every durable record has been read and has its verdict.
    pub caught_up: AtomicBool,
    pub spooled: AtomicU64,
    pub replayed: AtomicU64,
    pub corrupt: AtomicU64,
    pub full: AtomicU64,
    pub deleted: AtomicU64,
    pub rejected: AtomicU64,
    /// Bytes in the dead-letter store.
    pub rejected_bytes: AtomicU64,
    /// Replayer → gauges: when the oldest batch still waiting for PostgreSQL was
    /// accepted (unix µs); `i64::MAX` when none waits.
    oldest_waiting: AtomicI64,
}

impl Shared {
    pub fn new(dir: PathBuf, state: State) -> Shared {
        Shared {
            dir,
            state: Mutex::new(state),
            written: Notify::new(),
            freed: Notify::new(),
            base: Instant::now(),
            last_commit: AtomicU64::new(0),
            caught_up: AtomicBool::new(false),
            spooled: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            full: AtomicU64::new(0),
            deleted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            rejected_bytes: AtomicU64::new(0),
            oldest_waiting: AtomicI64::new(i64::MAX),
        }
    }

    /// The segment list, locked under the one lock policy ([`dbx_core::sync`]: every
    /// update is a single assignment, so a panic elsewhere leaves it consistent).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        dbx_core::sync::lock(&self.state)
    }

    /// Notes that a batch was committed just now.
    pub fn committed(&self) {
        let us = self.base.elapsed().as_micros() as u64 + 1;
        self.last_commit.fetch_max(us, Ordering::Relaxed);
    }

    /// How long ago the last commit was, `None` when there was none.
    pub fn since_commit(&self) -> Option<Duration> {
        match self.last_commit.load(Ordering::Relaxed) {
            0 => None,
            us => Some(
                self.base
                    .elapsed()
                    .saturating_sub(Duration::from_micros(us - 1)),
            ),
        }
    }

    /// Notes when the oldest batch still waiting for PostgreSQL was accepted.
    pub fn set_oldest_waiting(&self, accepted_micros: Option<i64>) {
        self.oldest_waiting
            .store(accepted_micros.unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// How long the oldest batch still waiting for PostgreSQL has waited.
    pub fn oldest_waiting_age(&self) -> Duration {
        match self.oldest_waiting.load(Ordering::Relaxed) {
            i64::MAX => Duration::ZERO,
            at => Duration::from_micros((now_micros() - at).max(0) as u64),
        }
    }

    /// Counts corrupt records in the stats (each one is reported by its event).
    pub fn count_corrupt(&self, n: u64) {
        self.corrupt.fetch_add(n, Ordering::Relaxed);
    }

    pub fn stats(&self) -> SpoolStats {
        let st = self.lock();
        SpoolStats {
            segments: st.segments.len() as u64,
            bytes: st.bytes(),
            records: st.segments.values().map(|s| s.records).sum(),
            spooled_records: self.spooled.load(Ordering::Relaxed),
            replayed_records: self.replayed.load(Ordering::Relaxed),
            corrupt_records: self.corrupt.load(Ordering::Relaxed),
            full: self.full.load(Ordering::Relaxed),
            deleted_segments: self.deleted.load(Ordering::Relaxed),
            rejected_records: self.rejected.load(Ordering::Relaxed),
        }
    }

    /// Sets the `dbx_spool_*` gauges.
    pub fn publish_gauges(&self) {
        let (segments, bytes, records) = {
            let st = self.lock();
            (
                st.segments.len(),
                st.bytes(),
                st.segments.values().map(|s| s.records).sum::<u64>(),
            )
        };
        m::on_disk(m::OnDisk {
            segments,
            bytes,
            records,
            oldest_waiting: self.oldest_waiting_age(),
            rejected_bytes: self.rejected_bytes.load(Ordering::Relaxed),
        });
    }
}

/// Creates `dir` if needed and lists the segments a previous run left, all sealed.
/// A file too short to hold a header was cut by a crash before anything in it was
/// acked and is removed; one whose header is not ours is renamed `*.bad` and left
/// for an operator.
pub(crate) fn recover(dir: &Path) -> std::io::Result<State> {
    super::secure::private_dir(dir)?;
    let mut st = State::default();
    for segment::SegmentFile { id, path, len } in segment::list(dir)? {
        let file = std::fs::File::open(&path)?;
        st.next_id = st.next_id.max(id + 1);
        if len < segment::HEADER_BYTES {
            info!(path = %path.display(), len, "removing a segment cut short at creation");
            std::fs::remove_file(&path)?;
            continue;
        }
        let Some(created_micros) = segment::read_header(&file, len) else {
            std::fs::rename(&path, path.with_extension("seg.bad"))?;
            SegmentHeaderCorrupt { path: &path }.emit();
            continue;
        };
        let records = segment::count_records(&file, len);
        st.segments.insert(
            id,
            SegInfo {
                durable_len: len,
                records,
                sealed: true,
                created_micros,
            },
        );
    }
    if !st.segments.is_empty() {
        warn!(
            segments = st.segments.len(),
            records = st.segments.values().map(|s| s.records).sum::<u64>(),
            bytes = st.bytes(),
            "spool holds batches from a previous run; replaying them"
        );
    }
    Ok(st)
}
