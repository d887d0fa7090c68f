//! The batcher task: receives batches from the listener's bounded channel, groups
//! their points by target partition, decides when a group is flushed, and hands
//! flushes to at most `writers` concurrent writer tasks.
//!
//! Channel choice: tokio `mpsc`. The batcher must wait on the channel, the age timer
//! and writer completion at once; tokio's receiver does that in a `select!` without a
//! thread parked in a blocking `recv`, and the listener's `send().await` is what
//! pauses socket reads when it is full. crossbeam-channel would need a blocking
//! consumer thread and a producer that polls `try_send` (an async task must not block).
//! `benches/channel.rs`, 100 000 messages through a 1024-slot channel, async producer,
//! one consumer, on the shared 2-core machine: tokio mpsc 8.4 M msg/s (11.9 ms);
//! crossbeam with a `spawn_blocking` consumer and a yield-on-full producer 0.37 M msg/s
//! (269 ms). At the batcher's ≤ 10⁴ batches/s either is far from the cost of a COPY;
//! tokio wins on both counts.
//!
//! Backpressure: the dispatcher waits for a free writer before it reads on. When
//! PostgreSQL is slow or down, writers sit in their retry loops, the dispatcher stops
//! receiving, the channel fills, and the listener stops reading sockets. Memory is
//! bounded by the channel, one open group per partition and one flush per writer.
//!
//! Shutdown: when every sender is dropped, the open groups are flushed (trigger
//! `shutdown`) and the task waits for the writers, up to `shutdown_deadline_ms`.
//!
//! A session's `end` has no points and no partition. It rides with the flush of its
//! session's last batch when it can: when every piece of its session not yet written
//! sits in one open group, it joins that group and the flush completes the session in
//! the same transaction ([`ends`](crate::ends)). When none is waiting, it goes with the
//! ends received together as one small job on a lane of its own, one job at a time
//! beside the writers (the pool holds a connection for it), so that ending flights
//! never takes a writer from COPY. When its session's pieces are already on their way
//! (closed groups, flushes in flight), it waits for those flushes to finish: an end is
//! never written before a piece of its session that came before it. The dispatcher
//! counts each session's unwritten pieces for that.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::metrics as m;
use dbx_core::{InternalEvent, TelemetryBatch};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tracing::{info, warn};
use uuid::Uuid;

use crate::config::BatcherConfig;
use crate::dedupe::SessionCache;
use crate::ends::run_ends;
use crate::error::BatcherError;
use crate::events::FlushQueued;
use crate::partition::{PartitionCache, PartitionKey};
use crate::stats::{BatcherStats, Counters};
use crate::ticket::{Arrival, Part, Ticket};
use crate::writer::{run_flush, FlushJob, Shared, Trigger};

/// Starts the batcher.
#[derive(Debug)]
pub struct Batcher;

/// The running batcher.
#[derive(Debug)]
pub struct BatcherHandle {
    task: tokio::task::JoinHandle<Result<BatcherStats, BatcherError>>,
    counters: Arc<Counters>,
}

impl Batcher {
    /// Spawns the batcher on the current tokio runtime. It runs until every sender of
    /// `rx` is dropped, then writes out what it holds and exits. A configuration that
    /// fails [`BatcherConfig::validate`] makes it exit at once with that error (and
    /// drop `rx`, which the listener sees as a closed channel).
    pub fn spawn(
        config: BatcherConfig,
        pool: deadpool_postgres::Pool,
        rx: mpsc::Receiver<TelemetryBatch>,
    ) -> BatcherHandle {
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(run(config, pool, rx, counters.clone()));
        BatcherHandle { task, counters }
    }
}

impl BatcherHandle {
    /// Totals so far, while it runs.
    pub fn stats(&self) -> BatcherStats {
        self.counters.snapshot()
    }

    /// Waits for the batcher to finish (after the channel closed) and returns its totals.
    pub async fn join(self) -> Result<BatcherStats, BatcherError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(BatcherError::Task(e.to_string())),
        }
    }
}

/// An open partition group.
#[derive(Debug)]
struct Group {
    parts: Vec<Part>,
    /// Pieces in `parts`, by session.
    sessions: HashMap<Uuid, usize>,
    /// Ends riding with this group's flush.
    ends: Vec<Part>,
    rows: usize,
    bytes: usize,
    opened: Instant,
}

impl Group {
    fn new() -> Self {
        Group {
            parts: Vec::new(),
            sessions: HashMap::new(),
            ends: Vec::new(),
            rows: 0,
            bytes: 0,
            opened: Instant::now(),
        }
    }

    /// Adds `part`, counting it as an unwritten piece of its session in `unwritten` too.
    fn push(&mut self, part: Part, unwritten: &mut HashMap<Uuid, usize>) {
        let session = part.ticket.session;
        *self.sessions.entry(session).or_default() += 1;
        *unwritten.entry(session).or_default() += 1;
        self.rows += part.points.len();
        self.bytes += approx_bytes(&part);
        self.parts.push(part);
    }
}

/// What a finished job hands back to the dispatcher: the session of each part it
/// wrote (one entry per piece; empty for an ends job).
type Written = Vec<Uuid>;

struct Dispatcher {
    config: BatcherConfig,
    shared: Arc<Shared>,
    groups: BTreeMap<PartitionKey, Group>,
    ready: Vec<(FlushJob, Trigger)>,
    /// Session ends ready for the ends lane (nothing of their session is unwritten).
    ends: Vec<Part>,
    /// Session ends waiting for the flushes of their session's pieces to finish.
    waiting_ends: Vec<Part>,
    /// Pieces of each session in open groups, ready flushes and flushes in flight: an
    /// entry per session with at least one, so bounded by the pieces the batcher holds.
    unwritten: HashMap<Uuid, usize>,
    /// Writers: one permit per flush in flight (`writers`).
    permits: Arc<Semaphore>,
    /// The ends lane: one permit, held by the ends job in flight.
    ends_lane: Arc<Semaphore>,
    tasks: JoinSet<Written>,
}

async fn run(
    config: BatcherConfig,
    pool: deadpool_postgres::Pool,
    mut rx: mpsc::Receiver<TelemetryBatch>,
    counters: Arc<Counters>,
) -> Result<BatcherStats, BatcherError> {
    config.validate().map_err(|e| e.in_section("batcher"))?;
    m::queue_capacity(rx.max_capacity());
    let age = config.max_batch_age();
    let mut d = Dispatcher::new(config, pool, counters.clone());
    loop {
        let next_age = d.groups.values().map(|g| g.opened + age).min();
        tokio::select! {
            // Timer first: under a constant stream of batches the age flush must not starve.
            biased;
            _ = sleep_until(next_age), if next_age.is_some() => d.close_expired(age),
            msg = rx.recv() => match msg {
                Some(batch) => d.add_burst(batch, &mut rx),
                None => break,
            },
            Some(res) = d.tasks.join_next(), if !d.tasks.is_empty() => {
                d.finished(res)?;
            }
        }
        m::queue_depth(rx.len());
        if d.config.flush_when_idle {
            d.flush_idle();
        }
        d.dispatch_ready().await?;
    }
    d.shut_down(&counters).await
}

/// Batches taken from the queue at once after a receive, before flush decisions.
const DRAIN_BURST: usize = 256;

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

impl Dispatcher {
    fn new(config: BatcherConfig, pool: deadpool_postgres::Pool, counters: Arc<Counters>) -> Self {
        Dispatcher {
            shared: Arc::new(Shared {
                config: config.clone(),
                pool,
                sessions: Mutex::new(SessionCache::new(config.session_cache_capacity)),
                partitions: Mutex::new(PartitionCache::default()),
                encoders: Mutex::new(Vec::new()),
                counters,
                citus: tokio::sync::OnceCell::new(),
                stages: m::StageHistograms::new(),
            }),
            permits: Arc::new(Semaphore::new(config.writers)),
            ends_lane: Arc::new(Semaphore::new(1)),
            groups: BTreeMap::new(),
            ready: Vec::new(),
            ends: Vec::new(),
            waiting_ends: Vec::new(),
            unwritten: HashMap::new(),
            tasks: JoinSet::new(),
            config,
        }
    }

    /// Closes every group whose oldest row has waited `age`.
    fn close_expired(&mut self, age: std::time::Duration) {
        let now = Instant::now();
        let expired: Vec<PartitionKey> = self
            .groups
            .iter()
            .filter(|(_, g)| g.opened + age <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            self.close_group(k, Trigger::Age);
        }
    }

    /// Adds `first` and what is already queued behind it (up to [`DRAIN_BURST`]), so
    /// one flush carries all of it.
    fn add_burst(&mut self, first: TelemetryBatch, rx: &mut mpsc::Receiver<TelemetryBatch>) {
        self.add_batch(first);
        let mut more = 0;
        while more < DRAIN_BURST {
            match rx.try_recv() {
                Ok(b) => self.add_batch(b),
                Err(_) => break,
            }
            more += 1;
        }
    }

    /// Every sender is gone: writes out the rest, within `shutdown_deadline_ms`; past
    /// it, the writers are stopped and what they held is left unacked.
    async fn shut_down(mut self, counters: &Counters) -> Result<BatcherStats, BatcherError> {
        let deadline = tokio::time::Instant::now() + self.config.shutdown_deadline();
        let keys: Vec<PartitionKey> = self.groups.keys().copied().collect();
        for k in keys {
            self.close_group(k, Trigger::Shutdown);
        }
        let finished = tokio::time::timeout_at(deadline, async {
            self.dispatch_ready().await?;
            while let Some(res) = self.tasks.join_next().await {
                self.finished(res)?;
                // Ends that waited for their lane or their session's flushes go now.
                self.dispatch_ready().await?;
            }
            Ok::<(), BatcherError>(())
        })
        .await;
        let stats = counters.snapshot();
        match finished {
            Ok(r) => {
                r?;
                info!(?stats, "batcher finished");
                Ok(stats)
            }
            Err(_) => {
                self.tasks.abort_all();
                while self.tasks.join_next().await.is_some() {}
                self.ready.clear();
                self.ends.clear();
                self.waiting_ends.clear();
                let stats = counters.snapshot();
                let unwritten = stats
                    .batches_received
                    .saturating_sub(stats.batches_acked + stats.batches_rejected);
                warn!(
                    unwritten,
                    "shutdown deadline passed; unwritten batches are left unacked"
                );
                Err(BatcherError::ShutdownDeadline {
                    unwritten_batches: unwritten,
                })
            }
        }
    }

    /// Cuts a batch by partition and appends the pieces to their groups.
    fn add_batch(&mut self, batch: TelemetryBatch) {
        let c = &self.shared.counters;
        c.add(&c.batches_received, 1);
        c.add(&c.points_received, batch.points.len() as u64);
        let TelemetryBatch {
            org_id,
            aircraft_id,
            session_id,
            points,
            ack,
            received_at,
            admitted_at,
            queued_at,
            origin,
            ends_session,
        } = batch;
        let arrival = Arrival {
            received: received_at,
            admitted: admitted_at,
            queued: queued_at,
            taken: Instant::now(),
        };
        let ticket = |ack| {
            Arc::new(Ticket::new(
                org_id,
                aircraft_id,
                session_id,
                ack,
                arrival,
                origin,
            ))
        };
        if ends_session {
            let ticket = ticket(ack);
            ticket.add_piece();
            self.add_end(Part { ticket, points });
            return;
        }
        if points.is_empty() {
            // Nothing to write is trivially durable.
            ack.durable();
            c.add(&c.batches_acked, 1);
            return;
        }
        let ticket = ticket(ack);
        let interval = self.config.partition_interval;
        let first = interval.key(points[0].ts_micros);
        let pieces: Vec<(PartitionKey, Vec<crate::Point>)> =
            if points.iter().all(|p| interval.key(p.ts_micros) == first) {
                vec![(first, points)]
            } else {
                let mut by_key: BTreeMap<PartitionKey, Vec<crate::Point>> = BTreeMap::new();
                for p in points {
                    by_key.entry(interval.key(p.ts_micros)).or_default().push(p);
                }
                by_key.into_iter().collect()
            };
        // Count every piece before any can be written.
        for _ in &pieces {
            ticket.add_piece();
        }
        for (key, points) in pieces {
            self.push_part(
                key,
                Part {
                    ticket: ticket.clone(),
                    points,
                },
            );
        }
    }

    fn push_part(&mut self, key: PartitionKey, mut part: Part) {
        let max_rows = self.config.max_batch_rows;
        let max_bytes = self.config.max_batch_bytes;
        loop {
            let g = self.groups.entry(key).or_insert_with(Group::new);
            let room = max_rows - g.rows;
            if part.points.len() > room {
                // Fill the group to exactly max_batch_rows; the rest opens the next one.
                let rest = part.points.split_off(room);
                part.ticket.add_piece();
                let next = Part {
                    ticket: part.ticket.clone(),
                    points: rest,
                };
                g.push(part, &mut self.unwritten);
                self.close_group(key, Trigger::Rows);
                part = next;
                continue;
            }
            if g.rows > 0 && g.bytes + approx_bytes(&part) > max_bytes {
                self.close_group(key, Trigger::Bytes);
                continue;
            }
            g.push(part, &mut self.unwritten);
            if g.rows >= max_rows {
                self.close_group(key, Trigger::Rows);
            } else if g.bytes >= max_bytes {
                self.close_group(key, Trigger::Bytes);
            }
            return;
        }
    }

    /// Places a session's `end`: with the open group holding every unwritten piece of its
    /// session, on the ends lane when none is unwritten, else among the ends waiting for
    /// their session's flushes.
    fn add_end(&mut self, end: Part) {
        let session = end.ticket.session;
        let Some(&unwritten) = self.unwritten.get(&session) else {
            self.ends.push(end);
            return;
        };
        match self
            .groups
            .values_mut()
            .find(|g| g.sessions.get(&session) == Some(&unwritten))
        {
            Some(g) => g.ends.push(end),
            None => self.waiting_ends.push(end),
        }
    }

    /// A job finished: its pieces are written (or refused), and the ends that waited for
    /// them are placed again.
    fn finished(
        &mut self,
        res: Result<Written, tokio::task::JoinError>,
    ) -> Result<(), BatcherError> {
        let written = res.map_err(|e| BatcherError::Task(e.to_string()))?;
        for session in written {
            if let Some(n) = self.unwritten.get_mut(&session) {
                *n -= 1;
                if *n == 0 {
                    self.unwritten.remove(&session);
                }
            }
        }
        if !self.waiting_ends.is_empty() {
            for end in std::mem::take(&mut self.waiting_ends) {
                self.add_end(end);
            }
        }
        Ok(())
    }

    /// Gives every idle writer the oldest open group: with writers free, waiting
    /// for a size or age threshold only adds latency. Under load the writers are
    /// busy, this does nothing, and groups grow to their thresholds.
    fn flush_idle(&mut self) {
        let idle = self
            .permits
            .available_permits()
            .saturating_sub(self.ready.len());
        if idle == 0 {
            return;
        }
        let mut open: Vec<(Instant, PartitionKey)> = self
            .groups
            .iter()
            .filter(|(_, g)| g.rows > 0)
            .map(|(k, g)| (g.opened, *k))
            .collect();
        open.sort();
        for (_, key) in open.into_iter().take(idle) {
            self.close_group(key, Trigger::Idle);
        }
    }

    fn close_group(&mut self, key: PartitionKey, trigger: Trigger) {
        let Some(g) = self.groups.remove(&key) else {
            return;
        };
        if g.parts.is_empty() {
            return;
        }
        let c = &self.shared.counters;
        let counter = match trigger {
            Trigger::Rows => &c.flushes_rows,
            Trigger::Bytes => &c.flushes_bytes,
            Trigger::Age => &c.flushes_age,
            Trigger::Idle => &c.flushes_idle,
            Trigger::Shutdown => &c.flushes_shutdown,
        };
        c.add(counter, 1);
        c.largest_flush_rows
            .fetch_max(g.rows as u64, Ordering::Relaxed);
        FlushQueued {
            trigger: trigger.as_str(),
            rows: g.rows,
        }
        .emit();
        self.ready.push((
            FlushJob {
                key,
                parts: g.parts,
                ends: g.ends,
                closed_at: Instant::now(),
            },
            trigger,
        ));
    }

    /// Hands every ready flush to a writer, waiting for free writers (this wait is
    /// what stops the channel from being read while the database is behind).
    async fn dispatch_ready(&mut self) -> Result<(), BatcherError> {
        for (job, _trigger) in std::mem::take(&mut self.ready) {
            let written: Written = job.parts.iter().map(|p| p.ticket.session).collect();
            self.spawn_writer(move |shared| async move {
                run_flush(&shared, job).await;
                written
            })
            .await?;
        }
        if !self.ends.is_empty() {
            // When the lane is busy, the ends wait for its job to finish (a writer
            // completion, which wakes the loop and brings us back here).
            if let Ok(lane) = self.ends_lane.clone().try_acquire_owned() {
                let ends = std::mem::take(&mut self.ends);
                let shared = self.shared.clone();
                self.spawn_holding(lane, async move {
                    run_ends(&shared, ends).await;
                    Written::new()
                })?;
            }
        }
        Ok(())
    }

    /// Runs `work` on a writer once one is free.
    async fn spawn_writer<F, Fut>(&mut self, work: F) -> Result<(), BatcherError>
    where
        F: FnOnce(Arc<Shared>) -> Fut,
        Fut: std::future::Future<Output = Written> + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| BatcherError::Task(e.to_string()))?;
        let job = work(self.shared.clone());
        self.spawn_holding(permit, job)
    }

    /// Runs `job`, holding `permit` until it is done.
    fn spawn_holding<Fut>(
        &mut self,
        permit: tokio::sync::OwnedSemaphorePermit,
        job: Fut,
    ) -> Result<(), BatcherError>
    where
        Fut: std::future::Future<Output = Written> + Send + 'static,
    {
        self.tasks.spawn(async move {
            let written = job.await;
            drop(permit);
            written
        });
        // Reap finished writers so the set stays small.
        while let Some(res) = self.tasks.try_join_next() {
            self.finished(res)?;
        }
        Ok(())
    }
}

fn approx_bytes(part: &Part) -> usize {
    part.points
        .iter()
        .map(crate::Point::approx_copy_bytes)
        .sum()
}
