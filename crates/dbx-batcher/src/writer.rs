//! One flush: the rows of one partition group written in one transaction.
//!
//! ```text
//! BEGIN
//!   upsert every session of the flush (sorted)  -> refused claims (foreign sessions,
//!                                                  unknown aircraft), locked rows, marks
//!   COPY fast rows (seq > mark) straight into the child, or the parent if none
//!   COPY rows at or below the mark into the TEMP staging table,
//!     INSERT … SELECT … WHERE NOT EXISTS … ON CONFLICT DO NOTHING RETURNING …
//!   UPDATE the sessions' statistics (recomputing distance when a late point landed)
//!   complete the sessions whose `end` rides with the flush (see `ends`)
//! COMMIT  -> resolve the ack handles of every batch whose pieces are all committed,
//!            then the ends'
//! ```
//!
//! `BEGIN` leaves with the upsert and the parse of the fast COPY ([`crate::txn`]). A
//! flush on the fast path alone (no staging rows, no end riding) then sends the COPY's
//! data, the statistics `UPDATE` and `COMMIT` together: it waits for PostgreSQL three
//! times (that round trip, the COPY's start, the rest). Any other flush goes step by
//! step, with the `UPDATE` sent with `COMMIT` when no end rides.
//!
//! Failures: transient errors retry the same flush forever with capped, jittered
//! exponential backoff (the batcher stops reading its channel meanwhile: that is the
//! backpressure); a unique violation on the fast path retries everything through the
//! staging path; a vanished child refreshes the partition cache; a data error bisects
//! the flush by batch until the offending batch is alone, and nacks only it.
//!
//! A session claimed by two aircraft (or organizations) within one flush goes to the
//! database under its first claim; the other claims are nacked `foreign_session` when
//! that claim is the owner's, and written again in a flush of their own when the
//! database refused the first claim (the session belongs to someone else, or the
//! claim's aircraft is not the organization's: the owner may be among the others).
//!
//! Ownership is decided here for every batch, live or replayed from the spool: a claim
//! whose aircraft is not an active aircraft of its active organization is nacked
//! `unknown_aircraft`, one whose session belongs to another organization or aircraft
//! `foreign_session` (see [`crate::sessions`]).
//!
//! A completed session (protocol 1.1: ended by the gateway or the idle timeout) takes
//! no new point. The upsert reports it under the row's lock; a TCP or UDP batch for it
//! is then settled without writing anything ([`Settled`]): acknowledged when every
//! point of it is already stored (a resend after a reconnect), refused with
//! `session_closed` otherwise; the attempt starts over without those batches. A
//! spooled batch is written as usual: the spool acknowledged it before the end could
//! reach the database, and an acknowledged point is never dropped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics as m;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use dbx_core::sync::lock;
use dbx_core::{BatchOrigin, InternalEvent, Point, RejectCode, Rejection};
use deadpool_postgres::ClientWrapper;
use futures::SinkExt;
use rand::Rng;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Statement, ToStatement};
use tracing::debug;
use uuid::Uuid;

use crate::config::BatcherConfig;
use crate::copy::{send_chunks, CopyEncoder, COLUMNS};
use crate::dedupe::{
    copy_staging_sql, insert_from_staging_citus_sql, insert_from_staging_sql, InFlushDedupe,
    SessionCache, CITUS_SQL, CREATE_STAGING_SQL,
};
use crate::error::AttemptError;
use crate::events::{BatchRejected, FlushCompleted, WriteRetried};
use crate::partition::{PartitionCache, PartitionKey, LIST_CHILDREN_SQL, PARENT};
use crate::sessions::{
    InsertedRow, SessionState, SessionUpdate, ACTIVE_AIRCRAFT_SQL, RECOMPUTE_SQL,
    RLS_HIDES_OWNERS_SQL, STORED_CITUS_SQL, STORED_SQL, UPDATE_SQL, UPSERT_SQL,
};
use crate::stats::Counters;
use crate::ticket::{Arrival, Part, Resolved, Ticket};
use crate::txn::FlushTx;

/// Why a flush was started (the `trigger` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// The group reached `max_batch_rows`.
    Rows,
    /// The group reached `max_batch_bytes`.
    Bytes,
    /// The group's oldest row reached `max_batch_age`.
    Age,
    /// A writer was idle: under light load a group is flushed at once instead of
    /// waiting for its age, so the batcher adds one COPY, not `max_batch_age`, to an ack.
    Idle,
    /// The channel closed.
    Shutdown,
}

impl Trigger {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Trigger::Rows => "rows",
            Trigger::Bytes => "bytes",
            Trigger::Age => "age",
            Trigger::Idle => "idle",
            Trigger::Shutdown => "shutdown",
        }
    }
}

/// A partition group handed to a writer.
#[derive(Debug)]
pub(crate) struct FlushJob {
    pub key: PartitionKey,
    pub parts: Vec<Part>,
    /// Session ends that ride with the flush: every unwritten piece of their sessions is
    /// among `parts` (see [`crate::ends`]).
    pub ends: Vec<Part>,
    /// When its group was closed (the end of the `grouped` stage).
    pub closed_at: Instant,
}

/// State every writer shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: BatcherConfig,
    pub pool: deadpool_postgres::Pool,
    pub sessions: Mutex<SessionCache>,
    pub partitions: Mutex<PartitionCache>,
    pub encoders: Mutex<Vec<CopyEncoder>>,
    pub counters: Arc<Counters>,
    /// Whether the database is a Citus cluster, learnt on the first staging path (see
    /// [`crate::dedupe::insert_from_staging_citus_sql`]).
    pub citus: tokio::sync::OnceCell<bool>,
    /// The per-stage histograms of acknowledged batches, resolved once.
    pub stages: m::StageHistograms,
}

impl Shared {
    fn take_encoder(&self) -> CopyEncoder {
        lock(&self.encoders).pop().unwrap_or_else(|| {
            // The approximate size is an upper bound, so a full flush fits without growth.
            CopyEncoder::new(self.config.max_batch_bytes.min(64 << 20) + (64 << 10))
        })
    }

    fn return_encoder(&self, e: CopyEncoder) {
        lock(&self.encoders).push(e);
    }

    /// Whether the database is a Citus cluster (the `citus` extension), asked once through
    /// `tx` and remembered: the few statements Citus plans differently pick their form by it.
    pub(crate) async fn is_citus(&self, tx: &ClientWrapper) -> Result<bool, tokio_postgres::Error> {
        self.citus
            .get_or_try_init(|| async {
                let row = tx.query_one(CITUS_SQL, &[]).await?;
                Ok::<bool, tokio_postgres::Error>(row.get(0))
            })
            .await
            .copied()
    }

    pub(crate) fn update_pool_gauges(&self) {
        let s = self.pool.status();
        m::pool(s.size.saturating_sub(s.available), s.available);
    }
}

/// Writes one job, bisecting on data errors, and resolves its tickets.
///
/// The job's ends are completed in the transaction that writes all of its parts, when
/// that is how the job commits; when the job must be split (a data error, two aircraft
/// claiming a session) they are written on their own once every part has its verdict.
pub(crate) async fn run_flush(shared: &Shared, job: FlushJob) {
    let mut enc = shared.take_encoder();
    let (mut riding, mut after) = split_ends(&job.parts, job.ends);
    let mut stack = vec![job.parts];
    while let Some(mut parts) = stack.pop() {
        let ends = std::mem::take(&mut riding);
        match write_with_retries(shared, &mut enc, job.key, &parts, &ends).await {
            Ok(mut done) => {
                // A session two aircraft claimed within this flush went to the database
                // under its first claimant. When the database said it belongs to someone
                // else, the other claimants' batches may be the owner's: they are written
                // again in a flush of their own instead of being refused with the loser.
                let again: HashSet<usize> = done
                    .mismatched
                    .iter()
                    .copied()
                    .filter(|&i| done.refused(&parts[i].ticket.session))
                    .collect();
                done.mismatched.retain(|i| !again.contains(i));
                let ended = done.ended.take();
                resolve(shared, &parts, done, &again, job.closed_at);
                match ended {
                    Some((owners, completed)) => {
                        crate::ends::resolve(shared, &ends, &owners, completed, true)
                    }
                    None => after.extend(ends),
                }
                if !again.is_empty() {
                    debug!(
                        batches = again.len(),
                        "a session claimed by two aircraft in one flush; writing the other claims again"
                    );
                    stack.push(
                        parts
                            .into_iter()
                            .enumerate()
                            .filter(|(i, _)| again.contains(i))
                            .map(|(_, p)| p)
                            .collect(),
                    );
                }
            }
            Err(msg) if parts.len() > 1 => {
                debug!(parts = parts.len(), error = %msg, "data error, bisecting flush");
                after.extend(ends);
                let right = parts.split_off(parts.len() / 2);
                stack.push(right);
                stack.push(parts);
            }
            Err(msg) => {
                after.extend(ends);
                let t = &parts[0].ticket;
                let r = Rejection::new(
                    RejectCode::Rejected,
                    format!("the database rejected the batch: {msg}"),
                );
                refuse(shared, t, r);
            }
        }
        shared.update_pool_gauges();
    }
    shared.return_encoder(enc);
    // Every part has its verdict: the ends that could not ride go now, after them.
    crate::ends::run_ends(shared, after).await;
}

/// Splits a job's ends into those that may ride with its first transaction and those
/// written after it: an end whose session two aircraft (or organizations) claim within
/// the flush waits, as some of those claims may be written again after the first commit
/// and must not find the session completed.
fn split_ends(parts: &[Part], ends: Vec<Part>) -> (Vec<Part>, Vec<Part>) {
    if ends.is_empty() {
        return (ends, Vec::new());
    }
    let mut claims: HashMap<Uuid, (Uuid, Uuid)> = HashMap::new();
    let mut contested: HashSet<Uuid> = HashSet::new();
    for p in parts {
        let t = &p.ticket;
        let claim = *claims.entry(t.session).or_insert((t.org, t.aircraft));
        if claim != (t.org, t.aircraft) {
            contested.insert(t.session);
        }
    }
    ends.into_iter()
        .partition(|e| !contested.contains(&e.ticket.session))
}

/// Refuses a batch (once), and reports it ([`BatchRejected`]) the one time it does.
pub(crate) fn refuse(shared: &Shared, t: &Ticket, r: Rejection) {
    let (code, msg) = (r.code, r.msg.clone());
    if t.reject(r) == Resolved::Now {
        shared.counters.add(&shared.counters.batches_rejected, 1);
        BatchRejected {
            org: t.org,
            session: t.session,
            origin: t.origin,
            waited: t.arrival.received.elapsed(),
            code,
            msg: &msg,
        }
        .emit();
    }
}

/// What became of a batch whose session was already completed when a flush came to
/// write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Every point is stored already: acknowledged, nothing written.
    Duplicate,
    /// It carries a point the session does not have: refused with `session_closed`.
    Closed,
}

/// What a committed attempt did.
#[derive(Debug, Default)]
struct Committed {
    /// Sessions refused as belonging to another organization or aircraft.
    foreign: HashSet<Uuid>,
    /// Sessions refused because the claim's aircraft is not an active aircraft of its
    /// (active) organization.
    unknown_aircraft: HashSet<Uuid>,
    /// Parts refused because their session was claimed by another aircraft within this flush.
    mismatched: HashSet<usize>,
    /// Rows inserted.
    inserted: u64,
    /// Points offered for the sessions that were written (refused ones excluded).
    offered: u64,
    /// Rows sent through the parent because no child was known.
    via_parent: u64,
    /// New high-water marks.
    marks: Vec<(Uuid, Option<i64>)>,
    committed_at: Option<Instant>,
    /// When the phases of the attempt that committed ended (none when nothing was written).
    phases: Option<Phases>,
    /// Bytes of COPY data sent.
    bytes: u64,
    /// COPY plus commit of the attempt that committed.
    duration: Duration,
    /// Parts of completed sessions, settled without being written.
    settled: HashMap<usize, Settled>,
    /// What completing the riding ends found, when they were completed in this commit.
    ended: Option<crate::ends::Ended>,
}

impl Committed {
    /// The database refused the flush's claim on `session`.
    fn refused(&self, session: &Uuid) -> bool {
        self.foreign.contains(session) || self.unknown_aircraft.contains(session)
    }
}

/// When the phases of a flush ended, for the stage histograms.
#[derive(Debug, Clone, Copy)]
struct Phases {
    /// The first attempt started.
    started: Instant,
    /// The attempt that committed has its connection and its COPY target; `BEGIN` is
    /// about to go with the session upsert.
    begun: Instant,
    /// `BEGIN` and the sessions' upsert answered (and the flush re-planned if the marks
    /// were stale).
    claimed: Instant,
    /// Both COPY paths done (on the pipelined fast path: the COPY answered).
    copied: Instant,
    /// Session statistics computed (and written, with the ends, when ends ride; on
    /// the pipelined fast path: the statistics `UPDATE` answered); what remains is
    /// `COMMIT`, with the statistics `UPDATE` when it was not sent yet.
    stats: Instant,
}

/// The nack of a part the commit refused: its aircraft, or its session.
fn refusal(done: &Committed, part: usize, t: &Ticket) -> Option<Rejection> {
    if done.unknown_aircraft.contains(&t.session) {
        Some(Rejection::new(
            RejectCode::UnknownAircraft,
            format!(
                "aircraft {} is not an active aircraft of organization {} (unknown, retired, \
                 another organization's, or the organization is inactive)",
                t.aircraft, t.org
            ),
        ))
    } else if done.foreign.contains(&t.session) || done.mismatched.contains(&part) {
        Some(Rejection::new(
            RejectCode::ForeignSession,
            format!(
                "session {} belongs to another organization or aircraft",
                t.session
            ),
        ))
    } else if done.settled.get(&part) == Some(&Settled::Closed) {
        Some(Rejection::new(
            RejectCode::SessionClosed,
            format!(
                "session {} is completed; it takes no new points (start a new session)",
                t.session
            ),
        ))
    } else {
        None
    }
}

/// Resolves the tickets of `parts` after a commit, except those in `skip` (written
/// again in another flush).
fn resolve(
    shared: &Shared,
    parts: &[Part],
    done: Committed,
    skip: &HashSet<usize>,
    closed: Instant,
) {
    let c = &shared.counters;
    {
        let mut cache = lock(&shared.sessions);
        for (s, mark) in &done.marks {
            cache.put(*s, *mark);
        }
    }
    for (i, p) in parts.iter().enumerate() {
        let t = &p.ticket;
        if skip.contains(&i) {
            continue;
        }
        if let Some(r) = refusal(&done, i, t) {
            refuse(shared, t, r);
        } else if t.piece_committed() == Resolved::Now {
            c.add(&c.batches_acked, 1);
            if let Some(at) = done.committed_at {
                m::commit_to_ack(at.elapsed());
                if let Some(ph) = done.phases {
                    shared.stages.record(&timeline(&t.arrival, closed, &ph, at));
                }
            }
        }
    }
    // Points of batches settled as duplicates were dropped as already stored, too.
    let resent: u64 = done
        .settled
        .iter()
        .filter(|(_, v)| **v == Settled::Duplicate)
        .map(|(i, _)| parts[*i].points.len() as u64)
        .sum();
    let dedup = done.offered.saturating_sub(done.inserted) + resent;
    c.add(&c.points_written, done.inserted);
    c.add(&c.points_deduplicated, dedup);
    c.add(&c.rows_default_partition, done.via_parent);
    FlushCompleted {
        rows: done.inserted,
        bytes: done.bytes,
        duration: done.duration,
        inserted: done.inserted,
        deduplicated: dedup,
        via_parent: done.via_parent,
    }
    .emit();
}

/// The stage boundaries of a batch acknowledged now.
fn timeline(a: &Arrival, closed: Instant, ph: &Phases, committed: Instant) -> m::Timeline {
    m::Timeline {
        received: a.received,
        admitted: a.admitted,
        queued: a.queued,
        taken: a.taken,
        closed,
        started: ph.started,
        begun: ph.begun,
        claimed: ph.claimed,
        copied: ph.copied,
        stats: ph.stats,
        committed,
        resolved: Instant::now(),
    }
}

/// Retries one set of parts until it commits or fails for a data reason (the message).
async fn write_with_retries(
    shared: &Shared,
    enc: &mut CopyEncoder,
    key: PartitionKey,
    parts: &[Part],
    ends: &[Part],
) -> Result<Committed, String> {
    let mut settled: HashMap<usize, Settled> = HashMap::new();
    let mut prepared = Prepared::new(parts, &settled);
    let mut plan: Option<Plan> = None;
    let mut all_staging = false;
    let mut missing_streak = 0u32;
    let mut backoff = Backoff::new(&shared.config);
    let first_started = Instant::now();
    loop {
        let started = Instant::now();
        let err = match attempt(shared, enc, key, &prepared, ends, all_staging, &mut plan).await {
            Ok(mut done) => {
                done.duration = started.elapsed();
                done.committed_at = Some(Instant::now());
                if let Some(ph) = &mut done.phases {
                    ph.started = first_started;
                }
                done.settled = settled;
                return Ok(done);
            }
            Err(e) => e,
        };
        match err {
            AttemptError::Settled(found) => {
                // Sessions are never reopened, so this converges: write the rest now.
                settled.extend(found);
                prepared = Prepared::new(parts, &settled);
                plan = None;
                continue;
            }
            AttemptError::Data(msg) => return Err(msg),
            AttemptError::UniqueViolation if all_staging => {
                return Err("duplicate key on the staging path".into())
            }
            AttemptError::UniqueViolation => {
                all_staging = true;
                plan = None;
                retried(shared, WriteRetried::UniqueViolation);
                continue;
            }
            AttemptError::MissingRelation if missing_streak == 0 => {
                lock(&shared.partitions).invalidate();
                missing_streak += 1;
                retried(shared, WriteRetried::PartitionMissing);
                continue;
            }
            AttemptError::MissingRelation => {
                lock(&shared.partitions).invalidate();
                retried(shared, WriteRetried::TableMissing);
            }
            AttemptError::Transient(msg) => {
                let retry_in = backoff.delay();
                retried(
                    shared,
                    WriteRetried::Transient {
                        error: &msg,
                        retry_in,
                    },
                );
            }
        }
        shared.update_pool_gauges();
        backoff.wait().await;
    }
}

/// Delays between retries after transient errors: exponential from `retry_initial_ms`,
/// capped at `retry_max_ms`.
pub(crate) struct Backoff {
    delay: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(config: &BatcherConfig) -> Self {
        Backoff {
            delay: Duration::from_millis(config.retry_initial_ms),
            max: Duration::from_millis(config.retry_max_ms),
        }
    }

    /// The delay the next [`wait`](Self::wait) is drawn from.
    pub(crate) fn delay(&self) -> Duration {
        self.delay
    }

    /// Sleeps for the current delay, with full jitter in [delay/2, delay] (spreads the
    /// reconnect storms of several writers), and doubles it.
    pub(crate) async fn wait(&mut self) {
        let lo = self.delay.as_micros() as u64 / 2;
        let hi = (self.delay.as_micros() as u64).max(lo + 1);
        let jittered = Duration::from_micros(rand::thread_rng().gen_range(lo..=hi));
        tokio::time::sleep(jittered).await;
        self.delay = (self.delay * 2).min(self.max);
    }
}

/// Counts a retry in the batcher's statistics and reports it.
pub(crate) fn retried(shared: &Shared, event: WriteRetried<'_>) {
    shared.counters.add(&shared.counters.retries, 1);
    event.emit();
}

/// The rows of one session in a flush, deduplicated within the flush.
#[derive(Debug)]
struct SessionRows<'a> {
    session: Uuid,
    org: Uuid,
    aircraft: Uuid,
    /// Points, first occurrence of each seq, in arrival order.
    rows: Vec<&'a Point>,
    /// Points offered, duplicates included.
    offered: usize,
    /// The parts (indexes into the flush) the rows come from.
    parts: Vec<usize>,
}

/// The parts of a flush regrouped by session (sorted by id: the lock order).
#[derive(Debug)]
struct Prepared<'a> {
    parts: &'a [Part],
    sessions: Vec<SessionRows<'a>>,
    /// Parts whose (org, aircraft) differ from their session's first part in this flush.
    mismatched: HashSet<usize>,
}

impl<'a> Prepared<'a> {
    /// Regroups `parts`, leaving out those already `settled`.
    fn new(parts: &'a [Part], settled: &HashMap<usize, Settled>) -> Self {
        let mut by_session: BTreeMap<Uuid, (SessionRows<'a>, InFlushDedupe)> = BTreeMap::new();
        let mut mismatched = HashSet::new();
        for (i, p) in parts.iter().enumerate() {
            if settled.contains_key(&i) {
                continue;
            }
            let t = &p.ticket;
            let (s, dedupe) = by_session.entry(t.session).or_insert_with(|| {
                (
                    SessionRows {
                        session: t.session,
                        org: t.org,
                        aircraft: t.aircraft,
                        rows: Vec::new(),
                        offered: 0,
                        parts: Vec::new(),
                    },
                    InFlushDedupe::default(),
                )
            });
            if s.org != t.org || s.aircraft != t.aircraft {
                mismatched.insert(i);
                continue;
            }
            s.offered += p.points.len();
            s.parts.push(i);
            s.rows
                .extend(p.points.iter().filter(|pt| dedupe.admit(pt.seq)));
        }
        Prepared {
            parts,
            sessions: by_session.into_values().map(|(s, _)| s).collect(),
            mismatched,
        }
    }

    /// The live (TCP, UDP) parts of sessions that `states` shows completed, settled:
    /// a seq above the session's mark cannot be stored yet, so such a part is `Closed`
    /// at once; the others are looked up point by point.
    async fn settle_completed(
        &self,
        shared: &Shared,
        tx: &FlushTx,
        states: &HashMap<Uuid, SessionState>,
    ) -> Result<HashMap<usize, Settled>, AttemptError> {
        let mut settled = HashMap::new();
        let mut lookup = Vec::new();
        for s in &self.sessions {
            let Some(st) = states.get(&s.session).filter(|st| st.completed) else {
                continue;
            };
            for &i in &s.parts {
                let p = &self.parts[i];
                if p.ticket.origin == BatchOrigin::Spool {
                    continue;
                }
                if p.points
                    .iter()
                    .any(|pt| st.last_seq.is_none_or(|m| pt.seq > m))
                {
                    settled.insert(i, Settled::Closed);
                } else {
                    lookup.push(i);
                }
            }
        }
        if lookup.is_empty() {
            return Ok(settled);
        }
        let (ids, seqs): (Vec<Uuid>, Vec<i64>) = lookup
            .iter()
            .flat_map(|&i| {
                let p = &self.parts[i];
                p.points.iter().map(move |pt| (p.ticket.session, pt.seq))
            })
            .unzip();
        let sql = if shared.is_citus(tx).await? {
            STORED_CITUS_SQL
        } else {
            STORED_SQL
        };
        let stmt = tx.prepare_cached(sql).await?;
        let mut stored = HashSet::with_capacity(ids.len());
        for r in tx.query(&stmt, &[&ids, &seqs]).await? {
            stored.insert((r.try_get::<_, Uuid>(0)?, r.try_get::<_, i64>(1)?));
        }
        for i in lookup {
            let p = &self.parts[i];
            let all = p
                .points
                .iter()
                .all(|pt| stored.contains(&(p.ticket.session, pt.seq)));
            settled.insert(
                i,
                if all {
                    Settled::Duplicate
                } else {
                    Settled::Closed
                },
            );
        }
        Ok(settled)
    }
}

/// Which rows go which way, encoded. Valid for the marks and exclusions it was built with.
#[derive(Debug)]
struct Plan {
    marks: HashMap<Uuid, Option<i64>>,
    excluded: HashSet<Uuid>,
    all_staging: bool,
    fast: Option<Bytes>,
    fast_rows: u64,
    staging: Option<Bytes>,
}

impl Plan {
    fn build(
        enc: &mut CopyEncoder,
        prepared: &Prepared<'_>,
        marks: HashMap<Uuid, Option<i64>>,
        excluded: HashSet<Uuid>,
        all_staging: bool,
    ) -> Plan {
        let is_fast = |mark: Option<i64>, seq: i64| !all_staging && mark.is_none_or(|m| seq > m);
        // One pass per path: rows above their session's mark go the fast path, the rest
        // (possible duplicates, late points) through staging.
        let mut encode = |fast_path: bool| {
            enc.begin();
            for s in prepared
                .sessions
                .iter()
                .filter(|s| !excluded.contains(&s.session))
            {
                let mark = marks.get(&s.session).copied().flatten();
                for p in s.rows.iter().filter(|p| is_fast(mark, p.seq) == fast_path) {
                    enc.push(&s.org, &s.aircraft, &s.session, p);
                }
            }
            let rows = enc.rows() as u64;
            ((rows > 0).then(|| enc.finish()), rows)
        };
        let (fast, fast_rows) = encode(true);
        let (staging, _) = encode(false);
        Plan {
            marks,
            excluded,
            all_staging,
            fast,
            fast_rows,
            staging,
        }
    }

    fn valid_for(
        &self,
        marks: &HashMap<Uuid, Option<i64>>,
        excluded: &HashSet<Uuid>,
        all_staging: bool,
    ) -> bool {
        self.all_staging == all_staging && &self.excluded == excluded && &self.marks == marks
    }

    fn encoded_bytes(&self) -> usize {
        self.fast.as_ref().map_or(0, Bytes::len) + self.staging.as_ref().map_or(0, Bytes::len)
    }
}

/// One try: the whole transaction, phase by phase (see the module doc).
async fn attempt(
    shared: &Shared,
    enc: &mut CopyEncoder,
    key: PartitionKey,
    prepared: &Prepared<'_>,
    ends: &[Part],
    all_staging: bool,
    plan: &mut Option<Plan>,
) -> Result<Committed, AttemptError> {
    if prepared.sessions.is_empty() {
        // Every batch was settled (completed sessions): nothing to write; the ends, if
        // any, are written on their own.
        return Ok(Committed::default());
    }
    // Plan and encode before taking a connection, with the cached marks as hints.
    if plan.is_none() {
        *plan = Some(plan_from_cached_marks(shared, enc, prepared, all_staging));
    }
    let client = shared.pool.get().await?;
    // A catalog read, outside the transaction (and only when the cache is stale).
    let (target, via_parent) = resolve_target(shared, &client, key).await?;
    let begun = Instant::now();
    let tx = FlushTx::new(client);
    let written = async {
        let claims = claim_sessions(shared, &tx, prepared, &target, plan).await?;
        let plan = replan_if_stale(
            enc,
            prepared,
            plan,
            claims.marks,
            &claims.refused,
            all_staging,
        );
        let claimed = Instant::now();
        let mut inserted = rows_above_marks(prepared, &claims.refused, plan);
        let fast = (claims.copy.as_ref(), target.as_str());
        let written = match pipelined_updates(plan, ends, prepared, &claims.states, &mut inserted) {
            Some(updates) => copy_update_commit(&tx, fast, plan, updates).await?,
            None => {
                let copy = (fast, prepared, plan);
                write_step_by_step(shared, &tx, copy, &claims.states, inserted, ends).await?
            }
        };
        let mut done = committed(
            prepared,
            plan,
            claims.refused,
            claims.foreign,
            &written.updates,
            written.total,
            via_parent,
        );
        done.ended = written.ended;
        done.phases = Some(Phases {
            // Set to the first attempt's start by the caller.
            started: begun,
            begun,
            claimed,
            copied: written.copied,
            stats: written.stats,
        });
        Ok(done)
    }
    .await;
    tx.finish(written).await
}

/// What an attempt wrote after the session upsert, and when its phases ended.
struct Written {
    /// The sessions' statistics updates.
    updates: Vec<SessionUpdate>,
    /// Rows inserted, both paths.
    total: u64,
    /// The ends that rode with the flush, completed.
    ended: Option<crate::ends::Ended>,
    /// Both COPY paths answered.
    copied: Instant,
    /// The statistics written (with the ends when they ride), or sent with `COMMIT`.
    stats: Instant,
}

/// The statistics of a flush that can go in two round trips after the upsert, the
/// COPY's start and then its data with the statistics `UPDATE` and `COMMIT`: rows on
/// the fast path only (nothing to read back from a staging insert or to recompute
/// from stored rows), no end riding (ends complete their sessions after the
/// `UPDATE`). `None` for any other flush, which goes step by step.
fn pipelined_updates(
    plan: &Plan,
    ends: &[Part],
    prepared: &Prepared<'_>,
    states: &HashMap<Uuid, SessionState>,
    inserted: &mut HashMap<Uuid, Vec<InsertedRow>>,
) -> Option<Vec<SessionUpdate>> {
    if plan.fast.is_none() || plan.staging.is_some() || !ends.is_empty() {
        return None;
    }
    let updates = statistics_of(prepared, states, inserted);
    // Rows above the marks never make a late point; checked all the same, as a
    // recompute must read the rows this COPY writes.
    (!updates.is_empty() && !updates.iter().any(|u| u.recompute)).then_some(updates)
}

/// The common flush after the upsert: the fast path's COPY, then its data with the
/// statistics `UPDATE` and `COMMIT` in one round trip ([`FlushTx::copy_execute_commit`]).
async fn copy_update_commit(
    tx: &FlushTx,
    fast: (Option<&Statement>, &str),
    plan: &Plan,
    updates: Vec<SessionUpdate>,
) -> Result<Written, AttemptError> {
    let bytes = plan.fast.clone().expect("pipelined flushes have fast rows");
    let copy = match fast {
        (Some(stmt), _) => stmt.clone(),
        // The plan was rebuilt with the stored marks and has fast rows the first had not.
        (None, target) => tx.prepare(&fast_copy_sql(target)).await?,
    };
    let columns = StatisticsColumns::of(&updates);
    let update = tx.prepare_cached(UPDATE_SQL).await?;
    let answered = tx
        .copy_execute_commit(&copy, send_chunks(&bytes), &update, &columns.params())
        .await?;
    Ok(Written {
        updates,
        total: plan.fast_rows,
        ended: None,
        copied: answered.copy,
        stats: answered.execute,
    })
}

/// Any other flush after the upsert: each COPY path, the statistics (recomputed from
/// stored rows where a late point landed), the ends that ride, then `COMMIT` with the
/// statistics `UPDATE` (or alone after the ends).
async fn write_step_by_step(
    shared: &Shared,
    tx: &FlushTx,
    (fast, prepared, plan): ((Option<&Statement>, &str), &Prepared<'_>, &Plan),
    states: &HashMap<Uuid, SessionState>,
    mut inserted: HashMap<Uuid, Vec<InsertedRow>>,
    ends: &[Part],
) -> Result<Written, AttemptError> {
    copy_fast_path(tx, fast, plan).await?;
    let total = plan.fast_rows
        + copy_staging_path(shared, tx, fast.1, prepared, plan, &mut inserted).await?;
    let copied = Instant::now();
    let mut updates = statistics_of(prepared, states, &mut inserted);
    recompute_late(tx, &mut updates).await?;
    // The statistics UPDATE travels with COMMIT, unless ends ride: they complete
    // their sessions after it, then COMMIT goes alone.
    let ended = if ends.is_empty() {
        None
    } else {
        write_updates(tx, &updates, Commit::Later).await?;
        Some(crate::ends::complete(shared, tx, ends).await?)
    };
    let stats = Instant::now();
    if ended.is_none() {
        write_updates(tx, &updates, Commit::Now).await?;
    } else {
        tx.commit().await?;
    }
    Ok(Written {
        updates,
        total,
        ended,
        copied,
        stats,
    })
}

/// What the session upsert (phase 1) decided about the flush's sessions.
struct Claims {
    /// The sessions the upsert created or accepted, locked, with their statistics.
    states: HashMap<Uuid, SessionState>,
    /// Sessions whose claim the database refused.
    refused: HashSet<Uuid>,
    /// Of those, the ones that belong to someone else (the rest: unknown aircraft).
    foreign: HashSet<Uuid>,
    /// Each accepted session's stored high-water mark.
    marks: HashMap<Uuid, Option<i64>>,
    /// The fast path's COPY statement, prepared in the same round trip when the plan
    /// made with the cached marks had fast rows.
    copy: Option<Statement>,
}

/// The plan made before the transaction, with the session cache's marks as hints.
fn plan_from_cached_marks(
    shared: &Shared,
    enc: &mut CopyEncoder,
    prepared: &Prepared<'_>,
    all_staging: bool,
) -> Plan {
    let hints: HashMap<Uuid, Option<i64>> = {
        let mut cache = lock(&shared.sessions);
        prepared
            .sessions
            .iter()
            .map(|s| (s.session, cache.get(&s.session).flatten()))
            .collect()
    };
    Plan::build(enc, prepared, hints, HashSet::new(), all_staging)
}

/// Phase 1, with `BEGIN`. Sessions: create, check ownership, lock, read marks and
/// statistics; the fast path's COPY into `target` is parsed in the same round trip when
/// `plan` has fast rows. Live batches of completed sessions end the attempt here
/// ([`AttemptError::Settled`]).
async fn claim_sessions(
    shared: &Shared,
    tx: &FlushTx,
    prepared: &Prepared<'_>,
    target: &str,
    plan: &Option<Plan>,
) -> Result<Claims, AttemptError> {
    let (ids, orgs, airs) = claim_columns(&prepared.sessions);
    let upsert = tx.prepare_cached(UPSERT_SQL).await?;
    let copy_sql = plan
        .as_ref()
        .and_then(|p| p.fast.as_ref())
        .map(|_| fast_copy_sql(target));
    let (rows, copy) = tx
        .begin_query(&upsert, &[&ids, &orgs, &airs], copy_sql.as_deref())
        .await?;
    let mut states: HashMap<Uuid, SessionState> = HashMap::with_capacity(rows.len());
    for r in &rows {
        let st = SessionState::from_row(r)?;
        states.insert(st.session_id, st);
    }
    let refused: HashSet<Uuid> = ids
        .iter()
        .filter(|id| !states.contains_key(id))
        .copied()
        .collect();
    let foreign = foreign_among(tx, prepared, &refused).await?;
    let closed = prepared.settle_completed(shared, tx, &states).await?;
    if !closed.is_empty() {
        return Err(AttemptError::Settled(closed));
    }
    let marks: HashMap<Uuid, Option<i64>> = prepared
        .sessions
        .iter()
        .filter_map(|s| states.get(&s.session).map(|st| (s.session, st.last_seq)))
        .collect();
    Ok(Claims {
        states,
        refused,
        foreign,
        marks,
        copy,
    })
}

/// Phase 2. The plan for the stored marks: the one made with the hints when they were
/// right, else a new one (restart, another daemon, a foreign session).
fn replan_if_stale<'p>(
    enc: &mut CopyEncoder,
    prepared: &Prepared<'_>,
    plan: &'p mut Option<Plan>,
    marks: HashMap<Uuid, Option<i64>>,
    refused: &HashSet<Uuid>,
    all_staging: bool,
) -> &'p Plan {
    if let Some(valid) = plan.take_if(|p| p.valid_for(&marks, refused, all_staging)) {
        return plan.insert(valid);
    }
    debug!("session marks differ from the cache, re-planning the flush");
    plan.insert(Plan::build(
        enc,
        prepared,
        marks,
        refused.clone(),
        all_staging,
    ))
}

/// The fast path's COPY into `target`.
fn fast_copy_sql(target: &str) -> String {
    format!("COPY {target} ({COLUMNS}) FROM STDIN (FORMAT binary)")
}

/// Phase 3. Fast path: rows above the mark, straight into the partition: `fast` is the
/// COPY statement prepared with `BEGIN` (none when the first plan had no fast rows) and
/// the target.
async fn copy_fast_path(
    tx: &FlushTx,
    fast: (Option<&Statement>, &str),
    plan: &Plan,
) -> Result<(), AttemptError> {
    let Some(bytes) = plan.fast.clone() else {
        return Ok(());
    };
    match fast {
        (Some(stmt), _) => copy_in(tx, stmt, bytes).await?,
        // The plan was rebuilt with the stored marks and has fast rows the first had not.
        (None, target) => copy_in(tx, fast_copy_sql(target).as_str(), bytes).await?,
    };
    Ok(())
}

/// The rows the fast path writes (those above their session's mark), by session, for
/// the statistics.
fn rows_above_marks(
    prepared: &Prepared<'_>,
    refused: &HashSet<Uuid>,
    plan: &Plan,
) -> HashMap<Uuid, Vec<InsertedRow>> {
    let mut inserted: HashMap<Uuid, Vec<InsertedRow>> = HashMap::new();
    if plan.fast.is_none() {
        return inserted;
    }
    for s in prepared
        .sessions
        .iter()
        .filter(|s| !refused.contains(&s.session))
    {
        let mark = plan.marks.get(&s.session).copied().flatten();
        let rows = inserted.entry(s.session).or_default();
        for p in s.rows.iter().filter(|p| mark.is_none_or(|m| p.seq > m)) {
            rows.push(InsertedRow {
                seq: p.seq,
                ts: p.ts_micros,
                lat: p.lat,
                lon: p.lon,
            });
        }
    }
    inserted
}

/// Phase 4. Staging path: rows that may already be stored, inserted where they are
/// not. Adds the rows written to `inserted`; returns how many.
async fn copy_staging_path(
    shared: &Shared,
    tx: &FlushTx,
    target: &str,
    prepared: &Prepared<'_>,
    plan: &Plan,
    inserted: &mut HashMap<Uuid, Vec<InsertedRow>>,
) -> Result<u64, AttemptError> {
    let Some(bytes) = plan.staging.clone() else {
        return Ok(0);
    };
    tx.batch_execute(CREATE_STAGING_SQL).await?;
    copy_in(tx, copy_staging_sql().as_str(), bytes).await?;
    let rows = if shared.is_citus(tx).await? {
        let ids: Vec<Uuid> = prepared.sessions.iter().map(|s| s.session).collect();
        tx.query(&insert_from_staging_citus_sql(target), &[&ids])
            .await?
    } else {
        tx.query(&insert_from_staging_sql(target), &[]).await?
    };
    for r in &rows {
        let ts: DateTime<Utc> = r.try_get(2)?;
        let session: Uuid = r.try_get(0)?;
        inserted.entry(session).or_default().push(InsertedRow {
            seq: r.try_get(1)?,
            ts: ts.timestamp_micros(),
            lat: r.try_get(3)?,
            lon: r.try_get(4)?,
        });
    }
    Ok(rows.len() as u64)
}

/// Phase 5. Statistics: each session's update from the rows written (distances of
/// sessions where a late point landed are left to [`recompute_late`]).
fn statistics_of(
    prepared: &Prepared<'_>,
    states: &HashMap<Uuid, SessionState>,
    inserted: &mut HashMap<Uuid, Vec<InsertedRow>>,
) -> Vec<SessionUpdate> {
    let mut updates: Vec<SessionUpdate> = Vec::with_capacity(inserted.len());
    for s in &prepared.sessions {
        let (Some(st), Some(rows)) = (states.get(&s.session), inserted.get_mut(&s.session)) else {
            continue;
        };
        if let Some(u) = SessionUpdate::compute(st, rows) {
            updates.push(u);
        }
    }
    updates
}

/// The distance and last position of the sessions where a point landed before the
/// last one, recomputed from the stored rows.
async fn recompute_late(tx: &FlushTx, updates: &mut [SessionUpdate]) -> Result<(), AttemptError> {
    let late: Vec<Uuid> = updates
        .iter()
        .filter(|u| u.recompute)
        .map(|u| u.session_id)
        .collect();
    if late.is_empty() {
        return Ok(());
    }
    let rec = tx.prepare_cached(RECOMPUTE_SQL).await?;
    let mut found: HashMap<Uuid, (f64, Option<f64>, Option<f64>)> = HashMap::new();
    for r in tx.query(&rec, &[&late]).await? {
        found.insert(r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?));
    }
    for u in updates.iter_mut().filter(|u| u.recompute) {
        let (d, lat, lon) = found
            .get(&u.session_id)
            .copied()
            .unwrap_or((0.0, None, None));
        u.distance_km = d;
        u.last_pos = lat.zip(lon);
    }
    Ok(())
}

/// What a committed attempt wrote and refused.
fn committed(
    prepared: &Prepared<'_>,
    plan: &Plan,
    refused: HashSet<Uuid>,
    foreign: HashSet<Uuid>,
    updates: &[SessionUpdate],
    total: u64,
    via_parent: bool,
) -> Committed {
    let offered = prepared
        .sessions
        .iter()
        .filter(|s| !refused.contains(&s.session))
        .map(|s| s.offered as u64)
        .sum();
    let mut marks: Vec<(Uuid, Option<i64>)> = plan.marks.iter().map(|(s, m)| (*s, *m)).collect();
    marks.extend(updates.iter().map(|u| (u.session_id, Some(u.last_seq))));
    Committed {
        unknown_aircraft: refused.difference(&foreign).copied().collect(),
        foreign,
        mismatched: prepared.mismatched.clone(),
        inserted: total,
        offered,
        via_parent: if via_parent { total } else { 0 },
        marks,
        committed_at: None,
        phases: None,
        bytes: plan.encoded_bytes() as u64,
        duration: Duration::ZERO,
        settled: HashMap::new(),
        ended: None,
    }
}

/// The claims of `sessions` as the three arrays (session, organization, aircraft)
/// the upsert and the ownership check take.
fn claim_columns<'r, 'p: 'r>(
    sessions: impl IntoIterator<Item = &'r SessionRows<'p>>,
) -> (Vec<Uuid>, Vec<Uuid>, Vec<Uuid>) {
    let mut columns = (Vec::new(), Vec::new(), Vec::new());
    for s in sessions {
        columns.0.push(s.session);
        columns.1.push(s.org);
        columns.2.push(s.aircraft);
    }
    columns
}

/// Of the sessions the upsert `refused`, those whose claim names an active aircraft of an
/// active organization: refused because the session is someone else's. The rest name an
/// aircraft the organization does not (or no longer) have. A role that row-level security
/// confines cannot tell: that is a transient error (retried, never nacked).
async fn foreign_among(
    tx: &FlushTx,
    prepared: &Prepared<'_>,
    refused: &HashSet<Uuid>,
) -> Result<HashSet<Uuid>, AttemptError> {
    if refused.is_empty() {
        return Ok(HashSet::new());
    }
    let hidden: bool = tx.query_one(RLS_HIDES_OWNERS_SQL, &[]).await?.try_get(0)?;
    if hidden {
        // Like the 42501 the INSERT itself would raise: keep the rows, retry, never nack.
        return Err(AttemptError::Transient(
            "row-level security hides aircraft_registry from this role: the ingest role needs \
             BYPASSRLS (migration 0001 gives it to dbx_ingest_service)"
                .into(),
        ));
    }
    let (ids, orgs, airs) = claim_columns(
        prepared
            .sessions
            .iter()
            .filter(|s| refused.contains(&s.session)),
    );
    let stmt = tx.prepare_cached(ACTIVE_AIRCRAFT_SQL).await?;
    let mut foreign = HashSet::with_capacity(ids.len());
    for r in tx.query(&stmt, &[&ids, &orgs, &airs]).await? {
        foreign.insert(r.try_get(0)?);
    }
    Ok(foreign)
}

/// The COPY target for `key`: the child when it is known to exist, else the parent.
async fn resolve_target(
    shared: &Shared,
    tx: &ClientWrapper,
    key: PartitionKey,
) -> Result<(String, bool), AttemptError> {
    let parent = || (PARENT.to_string(), true);
    let Some(child) = shared.config.partition_interval.child_name(key) else {
        return Ok(parent());
    };
    {
        let cache = lock(&shared.partitions);
        if cache.contains(&child) {
            return Ok((format!("dbx_aviation.{child}"), false));
        }
        if !cache.stale(Instant::now()) {
            return Ok(parent());
        }
    }
    let rows = tx.query(LIST_CHILDREN_SQL, &[]).await?;
    let mut names = Vec::with_capacity(rows.len());
    for r in &rows {
        names.push(r.try_get::<_, String>(0)?);
    }
    let mut cache = lock(&shared.partitions);
    cache.replace(names, Instant::now());
    if cache.contains(&child) {
        Ok((format!("dbx_aviation.{child}"), false))
    } else {
        Ok(parent())
    }
}

async fn copy_in<S: ?Sized + ToStatement>(
    tx: &FlushTx,
    stmt: &S,
    data: Bytes,
) -> Result<u64, AttemptError> {
    let sink = tx.copy_in::<_, Bytes>(stmt).await?;
    futures::pin_mut!(sink);
    for piece in send_chunks(&data) {
        sink.feed(piece).await?;
    }
    Ok(sink.finish().await?)
}

/// Whether [`write_updates`] ends the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// The statistics `UPDATE` and `COMMIT` in one round trip (`COMMIT` alone when there
    /// is nothing to update).
    Now,
    /// Only the `UPDATE`: more statements follow.
    Later,
}

/// The statistics `UPDATE`'s parameters: one array per column, a row per session.
struct StatisticsColumns {
    ids: Vec<Uuid>,
    dep_ts: Vec<Option<DateTime<Utc>>>,
    dep_lat: Vec<Option<f64>>,
    dep_lon: Vec<Option<f64>>,
    arr_ts: Vec<Option<DateTime<Utc>>>,
    arr_lat: Vec<Option<f64>>,
    arr_lon: Vec<Option<f64>>,
    dur: Vec<i32>,
    cnt: Vec<i64>,
    last_seq: Vec<i64>,
    last_lat: Vec<Option<f64>>,
    last_lon: Vec<Option<f64>>,
    dist: Vec<f64>,
}

impl StatisticsColumns {
    fn of(updates: &[SessionUpdate]) -> Self {
        let ts = |t: i64| DateTime::<Utc>::from_timestamp_micros(t);
        StatisticsColumns {
            ids: updates.iter().map(|u| u.session_id).collect(),
            dep_ts: updates.iter().map(|u| ts(u.departure.0)).collect(),
            dep_lat: updates.iter().map(|u| u.departure.1).collect(),
            dep_lon: updates.iter().map(|u| u.departure.2).collect(),
            arr_ts: updates.iter().map(|u| ts(u.arrival.0)).collect(),
            arr_lat: updates.iter().map(|u| u.arrival.1).collect(),
            arr_lon: updates.iter().map(|u| u.arrival.2).collect(),
            dur: updates.iter().map(|u| u.duration_s).collect(),
            cnt: updates.iter().map(|u| u.point_count).collect(),
            last_seq: updates.iter().map(|u| u.last_seq).collect(),
            last_lat: updates.iter().map(|u| u.last_pos.map(|p| p.0)).collect(),
            last_lon: updates.iter().map(|u| u.last_pos.map(|p| p.1)).collect(),
            dist: updates.iter().map(|u| u.distance_km).collect(),
        }
    }

    /// In `UPDATE_SQL`'s parameter order.
    fn params(&self) -> [&(dyn ToSql + Sync); 13] {
        [
            &self.ids,
            &self.dep_ts,
            &self.dep_lat,
            &self.dep_lon,
            &self.arr_ts,
            &self.arr_lat,
            &self.arr_lon,
            &self.dur,
            &self.cnt,
            &self.last_seq,
            &self.last_lat,
            &self.last_lon,
            &self.dist,
        ]
    }
}

/// Writes the statistics of `updates` (phase 5), and commits when asked.
async fn write_updates(
    tx: &FlushTx,
    updates: &[SessionUpdate],
    commit: Commit,
) -> Result<(), AttemptError> {
    if updates.is_empty() {
        if commit == Commit::Now {
            tx.commit().await?;
        }
        return Ok(());
    }
    let columns = StatisticsColumns::of(updates);
    let params = columns.params();
    let stmt = tx.prepare_cached(UPDATE_SQL).await?;
    match commit {
        Commit::Now => tx.execute_and_commit(&stmt, &params).await?,
        Commit::Later => tx.execute(&stmt, &params).await?,
    };
    Ok(())
}
