//! # dbx-spool
//!
//! The crash-safe disk spool: what keeps acks flowing while PostgreSQL is down or
//! slower than the gateways, without ever acking a point that is not durable.
//!
//! With `spool.dir` set, the binary puts a gate between the listener's queue (A) and
//! the batcher's (B): listener → A → [`gate`] → B → batcher.
//! - **Direct** (normal): the gate forwards each batch to B at once, keeping a
//!   compact encoding of it (and its ack handle) until the batcher resolves it.
//! - **Spooling**: when a batch handed to the batcher has waited longer than
//!   `after_ms` for its commit (PostgreSQL unreachable or slower than the input), the
//!   gate appends every still-unresolved batch it holds and every new batch from A to
//!   the current segment file, fsyncs once per burst (group commit), and only then
//!   resolves their ack handles as durable. Forwarded copies still in the batcher are
//!   written when the database returns; the spooled copy is then a duplicate the
//!   batcher's `(session, seq)` dedupe drops. Re-spooling what is already in flight is
//!   what lets acks resume on every connection: acks are cumulative in `seq` order, so
//!   one batch stuck in the batcher would otherwise hold back its connection's acks
//!   for the whole outage.
//! - The gate returns to Direct once commits are happening again and nothing it
//!   forwarded has waited longer than `after_ms`; the open segment is then sealed.
//!
//! The [`replay`] task reads segments oldest first and feeds their records to B as
//! [`BatchOrigin::Spool`](dbx_core::BatchOrigin) batches with ack handles it keeps,
//! a bounded number at a time so live traffic keeps its share of B; a sealed segment
//! whose records are all resolved is deleted. Segments left by a previous run
//! (crash or not) are replayed at start. A torn or corrupt record is logged, counted
//! in `dbx_spool_corrupt_records_total` and skipped ([`segment`]); it never stops the
//! replayer.
//!
//! Bounded by `max_bytes`. At the limit, and on a write error such as ENOSPC (the
//! segment is then cut back and sealed), `when_full` applies to TCP batches:
//! - `block` (default): the gate keeps the batch and stops reading A, so the
//!   listener's queue fills and TCP reads pause, as without a spool;
//! - `drop_newest`: the batch is nacked with code `rejected` and a message naming
//!   the full spool — the gateway learns at once that it was not stored, instead of
//!   being disconnected and resending into the same full spool. Counted in
//!   `dbx_spool_full_total`.
//!
//! UDP batches (no ack) are forwarded and, while spooling, spooled like TCP ones
//! (they were accepted; the disk is the cheapest place to keep them), but never wait
//! for room: at the limit they are dropped and counted
//! (`dbx_udp_dropped_total{reason="spool_full"}`), as docs/protocol.md asks of UDP under
//! saturation.
//!
//! A spooled batch the batcher refuses on replay (e.g. `foreign_session`, decided in
//! the commit transaction) after the spool acked it is kept as a dead letter
//! ([`rejected`]) before its segment is deleted: the batcher stays the authority on
//! data errors, and an acked batch is still never thrown away.
//!
//! The crate knows [`dbx_core`]'s batches and ack handles, and nothing of the
//! listener, the batcher or PostgreSQL; the binary wires it between the two queues.
//!
//! - this file: [`SpoolConfig`] (`[spool]`), [`Spool::start`], [`inspect`] and
//!   [`requeue_rejected`] for `dbx spool`, the directory's lock.
//! - [`gate`]: Direct or Spooling; appends, group-commit fsync, acks, `when_full`.
//! - [`replay`]: reads segments oldest first into the batcher's queue; deletes a
//!   segment once every record of it is resolved.
//! - [`segment`]: segment files: header, framing with CRC, writer, walker that skips
//!   torn or corrupt records.
//! - [`record`]: a batch (or a session end) as a record payload, and back.
//! - [`rejected`]: dead letters, acked batches the database refused on replay.
//! - `state`: what the gate and the replayer share (segments, figures, gauges).
//! - `secure`: a private directory, files never opened through a symbolic link.
//! - [`metrics`]: the spool's metric names and HELP texts.

pub mod events;
pub mod gate;
pub mod metrics;
pub mod record;
pub mod rejected;
pub mod replay;
mod secure;
pub mod segment;
mod state;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dbx_core::{ConfigError, TelemetryBatch};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use state::SpoolStats;

/// What the gate does with a TCP batch when the spool is at `max_bytes` (or the
/// disk refuses a write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Keep the batch and stop reading the listener's queue: TCP backpressure.
    #[default]
    Block,
    /// Nack the batch with code `rejected`; never ack it.
    DropNewest,
}

/// `[spool]`: the on-disk spool. Off unless `dir` is set.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory of the segment files; empty = no spool (the default). One daemon
    /// per directory.
    pub dir: String,
    /// Bound on the bytes of all segment files together.
    pub max_bytes: u64,
    /// What happens at `max_bytes`.
    pub when_full: WhenFull,
    /// How long a batch may wait for its commit before the gate starts spooling (ms).
    pub after_ms: u64,
    /// A segment is sealed and a new one started past this many bytes.
    pub segment_bytes: u64,
    /// Bound on the dead letters under `dir/rejected/`: acked batches the database
    /// refused on replay.
    pub rejected_max_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: String::new(),
            max_bytes: 1024 * 1024 * 1024,
            when_full: WhenFull::Block,
            after_ms: 2000,
            segment_bytes: 64 * 1024 * 1024,
            rejected_max_bytes: 256 * 1024 * 1024,
        }
    }
}

impl SpoolConfig {
    /// Whether the spool is on.
    pub fn enabled(&self) -> bool {
        !self.dir.is_empty()
    }

    /// Checks every value; the error names the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, reason: &str| Err(ConfigError::new(key, reason));
        if self.max_bytes < 64 * 1024 {
            return err("max_bytes", "must be at least 65536");
        }
        if self.after_ms == 0 {
            return err("after_ms", "must be greater than 0");
        }
        if self.segment_bytes < 4096 {
            return err("segment_bytes", "must be at least 4096");
        }
        if self.segment_bytes > 1024 * 1024 * 1024 {
            return err("segment_bytes", "must be at most 1 GiB");
        }
        if self.rejected_max_bytes < 64 * 1024 {
            return err("rejected_max_bytes", "must be at least 65536");
        }
        Ok(())
    }

    /// `after_ms` as a duration.
    pub fn after(&self) -> Duration {
        Duration::from_millis(self.after_ms)
    }
}

/// Why the spool could not start.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A bad setting.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The directory could not be created or read.
    #[error("spool directory {dir}: {source}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process (another dbx) holds the directory's lock.
    #[error(
        "spool.dir {0} is in use by another dbx process (its LOCK file is held); \
         give every daemon its own spool directory"
    )]
    Locked(PathBuf),
}

/// The file in `spool.dir` a running daemon holds locked.
const LOCK_FILE: &str = "LOCK";

impl SpoolError {
    /// Wraps an I/O error on `dir` (for `map_err`).
    fn dir(dir: &std::path::Path) -> impl Fn(std::io::Error) -> SpoolError + Copy + '_ {
        move |source| SpoolError::Dir {
            dir: dir.to_path_buf(),
            source,
        }
    }
}

/// Takes the spool directory's exclusive lock (`LOCK`, an advisory `flock`): two
/// daemons appending to and deleting each other's segments would lose data. The
/// kernel releases it when the process ends, however it ends. The directory is made
/// private first, and `LOCK` is never followed if it is a symbolic link ([`secure`]).
fn lock_dir(dir: &std::path::Path) -> Result<std::fs::File, SpoolError> {
    let io = SpoolError::dir(dir);
    secure::private_dir(dir).map_err(io)?;
    let file = secure::open_nofollow(
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true),
        &dir.join(LOCK_FILE),
    )
    .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(SpoolError::Locked(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// One segment file, as [`inspect`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentReport {
    /// Its id (the file name's number).
    pub id: u64,
    /// Bytes in the file.
    pub bytes: u64,
    /// Records in it, counted from their length words.
    pub records: u64,
    /// When it was created (unix µs); `None` for a header that is not ours.
    pub created_micros: Option<i64>,
}

/// What a spool directory holds, for `dbx spool status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolReport {
    /// Segments waiting for replay, oldest first.
    pub segments: Vec<SegmentReport>,
    /// Dead letters: records and bytes under `rejected/`.
    pub rejected_records: u64,
    /// Bytes of the dead-letter segment files.
    pub rejected_bytes: u64,
    /// A running daemon holds the directory's lock.
    pub in_use: bool,
}

/// Reads what `dir` holds without changing anything (safe while a daemon runs; the
/// open segment may grow meanwhile).
pub fn inspect(dir: &std::path::Path) -> std::io::Result<SpoolReport> {
    let in_use =
        match secure::open_nofollow(std::fs::OpenOptions::new().read(true), &dir.join(LOCK_FILE)) {
            Ok(f) => matches!(f.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
    let mut segments = Vec::new();
    for s in segment::list(dir)? {
        let file = std::fs::File::open(&s.path)?;
        segments.push(SegmentReport {
            id: s.id,
            bytes: s.len,
            records: segment::count_records(&file, s.len),
            created_micros: segment::read_header(&file, s.len),
        });
    }
    let mut rejected_records = 0;
    let mut rejected_bytes = 0;
    for s in segment::list(&dir.join(rejected::DIR))? {
        rejected_records += segment::count_records(&std::fs::File::open(&s.path)?, s.len);
        rejected_bytes += s.len;
    }
    Ok(SpoolReport {
        segments,
        rejected_records,
        rejected_bytes,
        in_use,
    })
}

/// Moves the dead letters of `dir` back into the spool for the next daemon start to
/// replay (once their cause is fixed); refused while a daemon runs on `dir`. Returns
/// the records and segment files moved.
pub fn requeue_rejected(dir: &std::path::Path) -> Result<(u64, u64), SpoolError> {
    let _lock = lock_dir(dir)?;
    rejected::requeue(dir).map_err(SpoolError::dir(dir))
}

/// Starts the spool.
#[derive(Debug)]
pub struct Spool;

/// The running spool: the gate and the replayer.
#[derive(Debug)]
pub struct SpoolHandle {
    gate: JoinHandle<()>,
    replayer: JoinHandle<()>,
    state: Arc<state::Shared>,
    /// Held for as long as the spool runs (see `lock_dir`).
    _lock: std::fs::File,
}

impl Spool {
    /// Opens `config.dir` (creating it), takes stock of the segments a previous run
    /// left, and spawns the gate (reading `from_listener`, writing `to_batcher`) and
    /// the replayer. Both end after `from_listener` closes and what they handed to
    /// the batcher is resolved; the binary drops the listener's senders, awaits the
    /// batcher, then [`SpoolHandle::join`].
    pub async fn start(
        config: SpoolConfig,
        from_listener: mpsc::Receiver<TelemetryBatch>,
        to_batcher: mpsc::Sender<TelemetryBatch>,
    ) -> Result<SpoolHandle, SpoolError> {
        config.validate().map_err(|e| e.in_section("spool"))?;
        let dir = PathBuf::from(&config.dir);
        let lock = lock_dir(&dir)?;
        let d = dir.clone();
        let (rejected_max, segment_bytes) = (config.rejected_max_bytes, config.segment_bytes);
        let recovered = tokio::task::spawn_blocking(move || {
            let st = state::recover(&d)?;
            let dead = rejected::DeadLetters::open(&d, rejected_max, segment_bytes)?;
            Ok::<_, std::io::Error>((st, dead))
        })
        .await
        .map_err(|e| SpoolError::dir(&dir)(std::io::Error::other(e.to_string())))?
        .map_err(SpoolError::dir(&dir))?;
        let (recovered, dead) = recovered;
        let shared = Arc::new(state::Shared::new(dir, recovered));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let replayer = tokio::spawn(replay::run(
            shared.clone(),
            dead,
            to_batcher.clone(),
            stop_rx,
        ));
        let gate = tokio::spawn(gate::run(
            config,
            shared.clone(),
            from_listener,
            to_batcher,
            stop_tx,
        ));
        Ok(SpoolHandle {
            gate,
            replayer,
            state: shared,
            _lock: lock,
        })
    }
}

impl SpoolHandle {
    /// Figures so far.
    pub fn stats(&self) -> SpoolStats {
        self.state.stats()
    }

    /// Waits for the gate and the replayer to finish; returns the final figures.
    pub async fn join(self) -> SpoolStats {
        if let Err(e) = self.gate.await {
            tracing::error!(error = %e, "spool gate task failed");
        }
        if let Err(e) = self.replayer.await {
            tracing::error!(error = %e, "spool replayer task failed");
        }
        self.state.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_off() {
        let c = SpoolConfig::default();
        assert!(!c.enabled());
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.after(), Duration::from_secs(2));
    }

    #[test]
    fn errors_name_the_key() {
        let c = SpoolConfig {
            after_ms: 0,
            ..SpoolConfig::default()
        };
        assert_eq!(
            c.validate().unwrap_err().in_section("spool").to_string(),
            "config key `spool.after_ms`: must be greater than 0"
        );
        let c = SpoolConfig {
            max_bytes: 10,
            ..SpoolConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "max_bytes");
    }
}
