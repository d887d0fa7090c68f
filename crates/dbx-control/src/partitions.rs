//! Partition lifecycle of `flight_telemetry`: what pg_partman does, built in, without its
//! known failure modes, and the expiry of the request log. One [`PartitionManager`] per
//! daemon runs six tasks ([`Task`]):
//!
//! - **premake**: partitions for the next `premake` intervals and the past `lookback` ones
//!   (UTC days `flight_telemetry_pYYYYMMDD` or hours `_pYYYYMMDDHH`), made at start-up before
//!   the listener opens and then on a timer, by `dbx_aviation.ensure_telemetry_partition`, which
//!   builds the table, its CHECK bound, the dedupe key and the indexes on the empty standalone
//!   table and only then attaches it (SHARE UPDATE EXCLUSIVE on the parent: ingest goes on);
//! - **sweep**: rows that landed in the default partition (a clock-skewed gateway, a backfill)
//!   are moved to their proper partition — made for them if needed, standalone, rows moved and
//!   attached in one transaction — so that a later creation never fails with "updated partition
//!   constraint for default partition would be violated"; rows of an archived range go to the
//!   archive parent instead;
//! - **archive**: live partitions entirely older than `archive_after_days` are detached and
//!   moved under `dbx_archive.flight_telemetry_archive` (`SET SCHEMA` + `ATTACH`: no row copied).
//!   `DETACH … CONCURRENTLY` is used when the server allows it, which on PostgreSQL 14–17 means
//!   never for the live table: it refuses CONCURRENTLY while the parent has a DEFAULT partition
//!   (and inside a transaction block). With the default partition, the plain DETACH runs in a
//!   transaction that first locks the old partition itself (nobody writes there, so that wait
//!   never holds up ingest) and only then the parent, under `lock_timeout`. With
//!   `archive_access_method = "columnar"` each archived heap partition is then rewritten
//!   columnar (citus_columnar), one step per partition that locks only that partition
//!   ([`plan_columnar`] says why and how, on a single node and on Citus);
//! - **retention**: per organization `data_retention_days`; a partition (live or archived) is
//!   dropped only when it ended before every organization's retention; otherwise only the
//!   expired organizations' rows are deleted, in transactions of at most `retention_chunk_rows`
//!   rows; then the seed's `enforce_retention_policy()` (sessions, analysis results). A
//!   columnar partition refuses DELETE: it is dropped when every row in it is expired, else
//!   turned heap, deleted from and turned columnar again in one transaction
//!   ([`plan_columnar_retention`]). A
//!   partition wholly past an organization's cutoff that was once found without its rows is
//!   not scanned again until its write counter (`pg_stat`, migration 0045) changes, so
//!   hourly runs do not read months of history for nothing;
//! - **refresh**: the daily telemetry aggregate `dbx_analytics.telemetry_daily_aircraft` is
//!   brought up to date by `maintain_telemetry_daily_aircraft` (migration 0045): only the open
//!   days (from yesterday, UTC, by the injected clock) and the days whose partitions were
//!   written, archived or dropped since they were last computed are recomputed, so a run costs
//!   the new data, never the history; the report's `rows` are the days recomputed;
//! - **api_requests**: rows of `dbx_aviation.api_requests` (one per gateway handshake, refused
//!   ones aggregated) older than `api_requests_retention_days` are deleted, oldest first,
//!   `retention_chunk_rows` per transaction through the `created_at` index
//!   (`api_requests_created`), so no run holds a long lock or scans the whole table; the rows
//!   deleted are counted in `dbx_api_requests_expired_total`.
//!
//! Every task is first a [`Plan`] (the SQL it would run, computed read-only from the catalog and
//! the injected clock, which `--dry-run` prints) and then executed step by step. Every statement
//! runs under `lock_timeout`; a step that cannot get its locks is retried `lock_attempts` times
//! with a growing pause and then skipped until the next run, so maintenance never stalls ingest
//! for longer than one `lock_timeout` and never fails for a busy table.
//!
//! Runs are guarded by a session-level advisory lock (`pg_try_advisory_lock`) on the manager's
//! own connection, which also runs the DDL: with several daemons on one database only one runs
//! maintenance at a time, and a lost connection drops the lock together with the work.
//!
//! The connection's user should be `dbx_maintenance_service` (`[database] admin_url`): the
//! manager then `SET ROLE dbx_admin`, the owner of every object. With the ingest user only
//! premake, the live part of the sweep and the refresh are possible (SECURITY DEFINER
//! functions); archival and retention are skipped with a warning.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use dbx_pg::Connector;
use serde::Deserialize;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::events::{MaintenanceFailed, MaintenanceRan};
pub use dbx_core::partition::PartitionInterval;
use dbx_core::partition::{range_of_child, CHILD_NAME_PATTERN};
use dbx_core::{ConfigError, InternalEvent, SharedClock, Shutdown};

/// Key of the session-level advisory lock that guards maintenance (ASCII "dbx_mnt").
/// Advisory locks are per database: daemons on different databases never wait on each other.
pub const MAINTENANCE_LOCK_KEY: i64 = 0x0064_6278_5f6d_6e74;

const LIVE_PARENT: &str = "dbx_aviation.flight_telemetry";
const ARCHIVE_PARENT: &str = "dbx_archive.flight_telemetry_archive";
const DEFAULT_PARTITION: &str = "dbx_aviation.flight_telemetry_default";

/// `[partitions]` of the configuration: partition upkeep. Every interval is in seconds;
/// 0 turns that task off (premake cannot be turned off).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PartitionsConfig {
    /// Partitions kept ready ahead of now, in intervals (days, or hours when hourly).
    pub premake: u32,
    /// Partitions kept for the past, in intervals (for late and backfilled points).
    pub lookback: u32,
    /// How often premake runs, seconds.
    pub interval_secs: u64,
    /// `lock_timeout` for each DDL statement, milliseconds (maintenance never stalls ingest).
    pub lock_timeout_ms: u64,
    /// Attempts of a step whose locks cannot be had before it is skipped until the next run.
    pub lock_attempts: u32,
    /// How often the default partition is swept, seconds (0 = never).
    pub sweep_interval_secs: u64,
    /// Live partitions entirely older than this many days are archived (0 = never).
    pub archive_after_days: u32,
    /// How often archival runs, seconds (0 = never).
    pub archive_interval_secs: u64,
    /// How often retention runs, seconds (0 = never).
    pub retention_interval_secs: u64,
    /// Rows deleted per retention transaction (bounded transactions, bounded bloat).
    pub retention_chunk_rows: u32,
    /// How often the open and changed days of the daily telemetry aggregate are recomputed,
    /// seconds (0 = never).
    pub refresh_interval_secs: u64,
    /// Rows of `dbx_aviation.api_requests` older than this many days are deleted (0 = kept
    /// forever); runs every `retention_interval_secs`, `retention_chunk_rows` per transaction.
    pub api_requests_retention_days: u32,
    /// The table access method archived partitions are given: `heap` (as written) or
    /// `columnar` (citus_columnar, rewritten once when archived; see [`ArchiveAccessMethod`]).
    pub archive_access_method: ArchiveAccessMethod,
}

/// `partitions.archive_access_method`: how archived telemetry partitions are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveAccessMethod {
    /// Left as written (PostgreSQL's heap): no rewrite.
    #[default]
    Heap,
    /// Rewritten by citus_columnar's `columnar` access method once archived: compressed,
    /// read column by column, but append-only (no DELETE or UPDATE: retention rewrites).
    Columnar,
}

impl ArchiveAccessMethod {
    /// The access method's name in `pg_am`.
    pub fn name(self) -> &'static str {
        match self {
            ArchiveAccessMethod::Heap => "heap",
            ArchiveAccessMethod::Columnar => "columnar",
        }
    }
}

impl Default for PartitionsConfig {
    fn default() -> Self {
        PartitionsConfig {
            premake: 4,
            lookback: 2,
            interval_secs: 600,
            lock_timeout_ms: 2_000,
            lock_attempts: 5,
            sweep_interval_secs: 300,
            archive_after_days: 90,
            archive_interval_secs: 3_600,
            retention_interval_secs: 3_600,
            retention_chunk_rows: 10_000,
            refresh_interval_secs: 900,
            api_requests_retention_days: 30,
            archive_access_method: ArchiveAccessMethod::Heap,
        }
    }
}

impl PartitionsConfig {
    /// Checks what serde cannot: `Err((key, message))` names the bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let must = |ok: bool, key: &'static str, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::new(key, what))
            }
        };
        must(self.premake >= 1, "premake", "must be at least 1")?;
        must(
            self.interval_secs >= 1,
            "interval_secs",
            "must be at least 1",
        )?;
        must(
            self.lock_timeout_ms >= 1,
            "lock_timeout_ms",
            "must be at least 1",
        )?;
        must(
            self.lock_attempts >= 1,
            "lock_attempts",
            "must be at least 1",
        )?;
        must(
            self.retention_chunk_rows >= 1,
            "retention_chunk_rows",
            "must be at least 1",
        )?;
        Ok(())
    }

    fn every(&self, task: Task) -> Option<Duration> {
        let secs = match task {
            Task::Premake => self.interval_secs.max(1),
            Task::Sweep => self.sweep_interval_secs,
            Task::Archive if self.archive_after_days == 0 => 0,
            Task::Archive => self.archive_interval_secs,
            Task::Retention => self.retention_interval_secs,
            Task::Refresh => self.refresh_interval_secs,
            Task::RequestLog if self.api_requests_retention_days == 0 => 0,
            Task::RequestLog => self.retention_interval_secs,
        };
        (secs > 0).then(|| Duration::from_secs(secs))
    }
}

/// One maintenance task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Create the partitions ahead and behind.
    Premake,
    /// Move rows out of the default partition.
    Sweep,
    /// Move old partitions under the archive parent.
    Archive,
    /// Drop or delete what is past retention.
    Retention,
    /// Recompute the open and changed days of the daily telemetry aggregate.
    Refresh,
    /// Delete `api_requests` rows past `api_requests_retention_days`.
    RequestLog,
}

impl Task {
    /// Every task, in the order a run does them.
    pub const ALL: [Task; 6] = [
        Task::Premake,
        Task::Sweep,
        Task::Archive,
        Task::Retention,
        Task::Refresh,
        Task::RequestLog,
    ];

    /// The `kind` label of the maintenance metrics.
    pub fn name(self) -> &'static str {
        match self {
            Task::Premake => "premake",
            Task::Sweep => "sweep",
            Task::Archive => "archive",
            Task::Retention => "retention",
            Task::Refresh => "refresh",
            Task::RequestLog => "api_requests",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a step's statements run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepMode {
    /// All statements in one transaction (all or nothing).
    Transaction,
    /// Each statement on its own (`DETACH … CONCURRENTLY` refuses a transaction block).
    Autocommit,
}

/// One unit of work of a plan: retried as a whole when a lock cannot be had.
#[derive(Debug, Clone)]
pub struct Step {
    /// What it does, for logs and reports.
    pub what: String,
    /// The SQL, verbatim (what `--dry-run` prints).
    pub sql: Vec<String>,
    /// Transaction or not.
    pub mode: StepMode,
    /// Run again while the last statement affected at least this many rows (chunked deletes).
    pub repeat_while_at_least: Option<u64>,
    /// Needs the privileges of dbx_admin (the owner), not only the SECURITY DEFINER functions.
    pub needs_admin: bool,
    /// The last statement's row count is rows moved or deleted (added to the report's `rows`).
    pub counts_rows: bool,
    /// Which statement's row count [`Step::counts_rows`] and [`Step::repeat_while_at_least`]
    /// read, when not the last (a DELETE between two access-method rewrites).
    pub rows_of: Option<usize>,
}

impl Step {
    /// A step that needs dbx_admin's privileges, runs once and counts no rows (most
    /// DDL steps).
    fn admin(mode: StepMode, what: String, sql: Vec<String>) -> Step {
        Step {
            what,
            sql,
            mode,
            repeat_while_at_least: None,
            needs_admin: true,
            counts_rows: false,
            rows_of: None,
        }
    }

    /// A delete of at most `chunk` rows per transaction, run again while a run deletes
    /// `chunk`: a bounded transaction each, its rows counted.
    fn chunked_delete(what: String, sql: String, chunk: u32) -> Step {
        Step {
            what,
            sql: vec![sql],
            mode: StepMode::Autocommit,
            repeat_while_at_least: Some(chunk as u64),
            needs_admin: true,
            counts_rows: true,
            rows_of: None,
        }
    }
}

/// What a task would do now: computed read-only; [`fmt::Display`] prints it as SQL.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The task.
    pub task: Task,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Observations that are not SQL (skipped ranges, rows found, disabled tasks).
    pub notes: Vec<String>,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "-- {}: {} step(s)", self.task, self.steps.len())?;
        for n in &self.notes {
            writeln!(f, "-- note: {n}")?;
        }
        for s in &self.steps {
            writeln!(f, "-- {}", s.what)?;
            if let Some(n) = s.repeat_while_at_least {
                writeln!(f, "-- (repeated while a run deletes {n} rows)")?;
            }
            if s.mode == StepMode::Transaction {
                writeln!(f, "BEGIN;")?;
            }
            for sql in &s.sql {
                writeln!(f, "{sql};")?;
            }
            if s.mode == StepMode::Transaction {
                writeln!(f, "COMMIT;")?;
            }
        }
        Ok(())
    }
}

/// What one task did.
#[derive(Debug, Clone, Default)]
pub struct TaskReport {
    /// The steps completed.
    pub done: Vec<String>,
    /// Steps skipped until the next run because their tables stayed locked, with why.
    pub skipped: Vec<String>,
    /// Steps that failed for another reason, with the server's message.
    pub failed: Vec<String>,
    /// Rows affected (moved or deleted).
    pub rows: u64,
    /// The plan's notes.
    pub notes: Vec<String>,
}

/// A partition as `dbx partitions list` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionInfo {
    /// `dbx_aviation` (live) or `dbx_archive`.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// True for the DEFAULT partition.
    pub is_default: bool,
    /// Lower bound (inclusive), `None` for the default partition.
    pub from: Option<DateTime<Utc>>,
    /// Upper bound (exclusive).
    pub to: Option<DateTime<Utc>>,
    /// The planner's row estimate (`None` before the first ANALYZE).
    pub rows_estimate: Option<i64>,
    /// Table + indexes + TOAST, bytes.
    pub total_bytes: i64,
    /// A `DETACH … CONCURRENTLY` was interrupted (finalized by the next archival).
    pub detach_pending: bool,
    /// Its table access method (`pg_am.amname`): `heap`, or `columnar` once archived with
    /// `partitions.archive_access_method = "columnar"`.
    pub access_method: String,
}

impl PartitionInfo {
    /// True in the live table (not archived).
    pub fn is_live(&self) -> bool {
        self.schema == "dbx_aviation"
    }

    /// True when stored by citus_columnar (append-only: no DELETE, no UPDATE).
    pub fn is_columnar(&self) -> bool {
        self.access_method == "columnar"
    }

    fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    fn overlaps(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> bool {
        match (self.from, self.to) {
            (Some(a), Some(b)) => a < to && b > from,
            _ => false,
        }
    }
}

/// Failures of partition upkeep (a busy lock is not one: the step is skipped).
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    /// No connection.
    #[error("partition upkeep: {0}")]
    Connect(String),
    /// A query failed.
    #[error("partition upkeep: {what}: {reason}")]
    Db {
        /// What we were doing.
        what: String,
        /// The server's message.
        reason: String,
    },
    /// `partitions.archive_access_method = "columnar"` on a database without the `columnar`
    /// access method.
    #[error(
        "partitions.archive_access_method = \"columnar\" needs the citus_columnar extension in \
         this database: install Citus 13 (its citus_columnar library) into the server and run \
         CREATE EXTENSION citus_columnar as a superuser (`dbx setup` does it when the server has \
         it; on a Citus cluster on the coordinator, which creates it on the workers), or set \
         partitions.archive_access_method = \"heap\""
    )]
    NoColumnar,
}

fn db_err(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> MaintenanceError {
    let what = what.into();
    move |e| MaintenanceError::Db {
        what,
        reason: dbx_pg::describe(&e),
    }
}

/// The `[from, to)` ranges wanted at `now`: `lookback` intervals back to `premake` ahead.
pub fn wanted_ranges(
    interval: PartitionInterval,
    premake: u32,
    lookback: u32,
    now: DateTime<Utc>,
) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    let step = interval.step();
    let current = interval.floor(now);
    (-(lookback as i64)..=premake as i64)
        .map(|i| {
            let from = current + step * i as i32;
            (from, from + step)
        })
        .collect()
}

/// A timestamptz literal independent of the session's TimeZone and DateStyle.
fn ts_lit(t: DateTime<Utc>) -> String {
    format!("'{}'::timestamptz", t.format("%Y-%m-%d %H:%M:%S%.f+00"))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The inverse of [`quote_ident`].
fn unquote_ident(s: &str) -> String {
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
        .replace("\"\"", "\"")
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE
        || *c == SqlState::T_R_DEADLOCK_DETECTED
        || *c == SqlState::T_R_SERIALIZATION_FAILURE
        || *c == SqlState::OBJECT_IN_USE
        || *c == SqlState::UNIQUE_VIOLATION
        || *c == SqlState::DUPLICATE_TABLE)
}

/// The manager's connection: its own, holding the advisory lock while it works.
struct Conn {
    client: Client,
    /// Member of dbx_admin (and switched to it with SET ROLE).
    admin: bool,
    /// The login user.
    user: String,
    /// This session holds [`MAINTENANCE_LOCK_KEY`].
    locked: bool,
}

/// Partition premake, sweep, archival, retention and the daily aggregate; see the module docs.
pub struct PartitionManager {
    pg: Connector,
    interval: PartitionInterval,
    cfg: PartitionsConfig,
    clock: SharedClock,
    conn: tokio::sync::Mutex<Option<Conn>>,
    warned_not_admin: AtomicBool,
}

impl fmt::Debug for PartitionManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartitionManager")
            .field("interval", &self.interval)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl PartitionManager {
    /// A manager connecting with `pg` (it connects lazily, and again after a lost connection).
    pub fn new(
        pg: Connector,
        interval: PartitionInterval,
        cfg: PartitionsConfig,
        clock: SharedClock,
    ) -> Self {
        PartitionManager {
            pg,
            interval,
            cfg,
            clock,
            conn: tokio::sync::Mutex::new(None),
            warned_not_admin: AtomicBool::new(false),
        }
    }

    /// The settings.
    pub fn config(&self) -> &PartitionsConfig {
        &self.cfg
    }

    async fn connect(&self) -> Result<Conn, MaintenanceError> {
        let mut pg = self.pg.clone();
        pg.pg_config_mut().application_name("dbx-maintenance");
        if pg.pg_config().get_connect_timeout().is_none() {
            pg.pg_config_mut().connect_timeout(Duration::from_secs(10));
        }
        let client = pg
            .connect()
            .await
            .map_err(|e| MaintenanceError::Connect(e.to_string()))?;
        let row = client
            .query_one(
                "SELECT current_user::text, pg_has_role(current_user, 'dbx_admin', 'MEMBER')",
                &[],
            )
            .await
            .map_err(db_err("reading the maintenance user"))?;
        let user: String = row.get(0);
        let admin: bool = row.get(1);
        let mut setup = format!(
            "SET lock_timeout = {}; SET statement_timeout = 0;",
            self.cfg.lock_timeout_ms.max(1)
        );
        if admin {
            // Objects made or moved are then owned by dbx_admin, like all the others.
            setup.push_str(" SET ROLE dbx_admin;");
        }
        client
            .batch_execute(&setup)
            .await
            .map_err(db_err("preparing the maintenance session"))?;
        Ok(Conn {
            client,
            admin,
            user,
            locked: false,
        })
    }

    async fn ensure_conn<'a>(
        &self,
        slot: &'a mut Option<Conn>,
    ) -> Result<&'a mut Conn, MaintenanceError> {
        if slot.as_ref().is_some_and(|c| c.client.is_closed()) {
            *slot = None;
        }
        if slot.is_none() {
            *slot = Some(self.connect().await?);
        }
        slot.as_mut()
            .ok_or_else(|| MaintenanceError::Connect("no connection".into()))
    }

    /// Takes the maintenance advisory lock if no other session holds it; `Ok(true)` when this
    /// manager holds it now (also when it already did).
    pub async fn try_acquire(&self) -> Result<bool, MaintenanceError> {
        let mut slot = self.conn.lock().await;
        let conn = self.ensure_conn(&mut slot).await?;
        acquire(conn).await
    }

    /// Releases the advisory lock (a no-op when not held).
    pub async fn release(&self) -> Result<(), MaintenanceError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_mut() {
            release(conn).await?;
        }
        Ok(())
    }

    /// True when the connection's user can do everything (member of dbx_admin).
    pub async fn is_admin(&self) -> Result<bool, MaintenanceError> {
        let mut slot = self.conn.lock().await;
        Ok(self.ensure_conn(&mut slot).await?.admin)
    }

    /// Closes the connection (releasing the advisory lock with it).
    pub async fn close(&self) {
        *self.conn.lock().await = None;
    }

    /// What `task` would do now, without doing it.
    pub async fn plan(&self, task: Task) -> Result<Plan, MaintenanceError> {
        let mut slot = self.conn.lock().await;
        let conn = self.ensure_conn(&mut slot).await?;
        self.plan_on(&conn.client, task).await
    }

    /// Every partition of the live and the archive table.
    pub async fn list(&self) -> Result<Vec<PartitionInfo>, MaintenanceError> {
        let mut slot = self.conn.lock().await;
        let conn = self.ensure_conn(&mut slot).await?;
        list_partitions(&conn.client).await
    }

    /// Runs one task under the advisory lock; `Ok(None)` when another session holds it.
    pub async fn run_task(&self, task: Task) -> Result<Option<TaskReport>, MaintenanceError> {
        Ok(self
            .run_tasks(&[task])
            .await?
            .and_then(|mut v| v.pop().map(|(_, r)| r)))
    }

    /// Runs `tasks` in order under one acquisition of the advisory lock; `Ok(None)` when
    /// another session holds it (nothing was done).
    pub async fn run_tasks(
        &self,
        tasks: &[Task],
    ) -> Result<Option<Vec<(Task, TaskReport)>>, MaintenanceError> {
        let mut slot = self.conn.lock().await;
        // A run that cannot even connect or ask for the lock (the database is down) is a
        // failure of each of its tasks, as much as a step failing inside it.
        let count_failed = |e: MaintenanceError| {
            for &task in tasks {
                MaintenanceFailed {
                    kind: task.name(),
                    error: &e,
                }
                .emit();
            }
            e
        };
        let conn = self.ensure_conn(&mut slot).await.map_err(count_failed)?;
        let held_before = conn.locked;
        if !acquire(conn).await.map_err(count_failed)? {
            return Ok(None);
        }
        let mut out = Vec::new();
        let mut result = Ok(());
        for &task in tasks {
            match self.run_locked(conn, task).await {
                Ok(report) => {
                    MaintenanceRan {
                        task,
                        report: &report,
                    }
                    .emit();
                    out.push((task, report));
                }
                Err(e) => {
                    MaintenanceFailed {
                        kind: task.name(),
                        error: &e,
                    }
                    .emit();
                    result = Err(e);
                    break;
                }
            }
        }
        if conn.client.is_closed() {
            *slot = None;
        } else if !held_before {
            // A caller that took the lock itself (try_acquire) releases it itself.
            release(conn).await?;
        }
        result.map(|()| Some(out))
    }

    /// Start-up premake, before the listener opens. Waits up to 30 s for another daemon's
    /// maintenance run to finish; past that, creates what is missing anyway (the creation
    /// function serializes concurrent creators itself, so this is safe, only not exclusive).
    pub async fn startup(&self) -> Result<TaskReport, MaintenanceError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(report) = self.run_task(Task::Premake).await? {
                return Ok(report);
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tracing::warn!(
            "another daemon keeps the maintenance lock; creating missing partitions without it"
        );
        let mut slot = self.conn.lock().await;
        let conn = self.ensure_conn(&mut slot).await?;
        let report = self.run_locked(conn, Task::Premake).await?;
        MaintenanceRan {
            task: Task::Premake,
            report: &report,
        }
        .emit();
        Ok(report)
    }

    async fn run_locked(
        &self,
        conn: &mut Conn,
        task: Task,
    ) -> Result<TaskReport, MaintenanceError> {
        let plan = self.plan_on(&conn.client, task).await?;
        let mut report = TaskReport {
            notes: plan.notes.clone(),
            ..TaskReport::default()
        };
        let mut not_admin = 0;
        for step in &plan.steps {
            if step.needs_admin && !conn.admin {
                // A configuration matter, not a busy table: one note, no skip counted.
                not_admin += 1;
                continue;
            }
            self.run_step(conn, step, &mut report).await?;
        }
        if not_admin > 0 {
            if !self.warned_not_admin.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    user = %conn.user,
                    "archival and retention need a member of dbx_admin: set database.admin_url \
                     to dbx_maintenance_service's URL (credentials.txt); they are off until then"
                );
            }
            report.notes.push(format!(
                "{not_admin} step(s) not run: user {} is not a member of dbx_admin \
                 (use dbx_maintenance_service)",
                conn.user
            ));
        }
        Ok(report)
    }

    async fn run_step(
        &self,
        conn: &mut Conn,
        step: &Step,
        report: &mut TaskReport,
    ) -> Result<(), MaintenanceError> {
        let attempts = self.cfg.lock_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match exec_step(&conn.client, step).await {
                Ok(rows) => {
                    if step.counts_rows {
                        report.rows += rows;
                    }
                    if let Some(n) = step.repeat_while_at_least {
                        if rows >= n {
                            attempt = 0;
                            continue;
                        }
                    }
                    report.done.push(step.what.clone());
                    return Ok(());
                }
                Err(e) if conn.client.is_closed() => {
                    return Err(MaintenanceError::Db {
                        what: step.what.clone(),
                        reason: dbx_pg::describe(&e),
                    })
                }
                Err(e) if retryable(&e) && attempt < attempts => {
                    tracing::debug!(step = %step.what, attempt, error = %dbx_pg::describe(&e),
                        "maintenance step waited too long for a lock; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
                }
                Err(e) if retryable(&e) => {
                    tracing::warn!(step = %step.what, attempts, error = %dbx_pg::describe(&e),
                        "maintenance step skipped: its tables stayed busy; the next run retries");
                    report
                        .skipped
                        .push(format!("{} ({})", step.what, dbx_pg::describe(&e)));
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(step = %step.what, error = %dbx_pg::describe(&e), "maintenance step failed");
                    report
                        .failed
                        .push(format!("{}: {}", step.what, dbx_pg::describe(&e)));
                    return Ok(());
                }
            }
        }
    }

    async fn plan_on(&self, client: &Client, task: Task) -> Result<Plan, MaintenanceError> {
        let now = self.clock.now();
        let parts = list_partitions(client).await?;
        let mut plan = Plan {
            task,
            steps: Vec::new(),
            notes: Vec::new(),
        };
        match task {
            Task::Premake => self.plan_premake(&parts, now, &mut plan),
            Task::Sweep => self.plan_sweep(client, &parts, &mut plan).await?,
            Task::Archive => self.plan_archive(client, &parts, now, &mut plan).await?,
            Task::Retention => self.plan_retention(client, &parts, now, &mut plan).await?,
            Task::Refresh => plan.steps.push(Step {
                what:
                    "recompute the open and changed days of dbx_analytics.telemetry_daily_aircraft"
                        .into(),
                // The first statement makes this connection's own writes (the sweep's moves,
                // retention's deletes) count before the function reads the write counters;
                // the second returns one row per day recomputed: the report's `rows` are days.
                sql: vec![
                    "SELECT pg_stat_force_next_flush()".into(),
                    format!(
                        "SELECT * FROM dbx_analytics.maintain_telemetry_daily_aircraft({})",
                        ts_lit(now)
                    ),
                ],
                mode: StepMode::Autocommit,
                repeat_while_at_least: None,
                needs_admin: false,
                counts_rows: true,
                rows_of: None,
            }),
            Task::RequestLog => self.plan_request_log(now, &mut plan),
        }
        Ok(plan)
    }

    /// Deletes expired `api_requests` rows, oldest first, in chunks: `ORDER BY created_at
    /// LIMIT n` walks the `api_requests_created` index, so each transaction reads only the
    /// rows it deletes (a TID scan) however large the table, and holds its row locks briefly.
    fn plan_request_log(&self, now: DateTime<Utc>, plan: &mut Plan) {
        let days = self.cfg.api_requests_retention_days;
        if days == 0 {
            plan.notes.push(
                "api_requests are kept forever (partitions.api_requests_retention_days = 0)".into(),
            );
            return;
        }
        let cutoff = now - TimeDelta::days(days as i64);
        let chunk = self.cfg.retention_chunk_rows.max(1);
        plan.steps.push(Step::chunked_delete(
            format!("delete api_requests rows before {cutoff} ({days} days)"),
            format!(
                "DELETE FROM dbx_aviation.api_requests WHERE ctid = ANY (ARRAY(\
                 SELECT ctid FROM dbx_aviation.api_requests WHERE created_at < {} \
                 ORDER BY created_at LIMIT {chunk}))",
                ts_lit(cutoff)
            ),
            chunk,
        ));
    }

    fn ensure_step(from: DateTime<Utc>, to: DateTime<Utc>, what: String) -> Step {
        Step {
            what,
            sql: vec![format!(
                "SELECT dbx_aviation.ensure_telemetry_partition({}, {})",
                ts_lit(from),
                ts_lit(to)
            )],
            mode: StepMode::Autocommit,
            repeat_while_at_least: None,
            needs_admin: false,
            counts_rows: false,
            rows_of: None,
        }
    }

    fn plan_premake(&self, parts: &[PartitionInfo], now: DateTime<Utc>, plan: &mut Plan) {
        for (from, to) in wanted_ranges(self.interval, self.cfg.premake, self.cfg.lookback, now) {
            let exact = parts
                .iter()
                .find(|p| !p.is_default && p.from == Some(from) && p.to == Some(to));
            if let Some(p) = exact {
                if !p.is_live() {
                    plan.notes.push(format!(
                        "[{from}, {to}) is archived ({}); not recreated",
                        p.qualified()
                    ));
                }
                continue;
            }
            if let Some(p) = parts
                .iter()
                .find(|p| p.is_live() && !p.is_default && p.overlaps(from, to))
            {
                plan.notes.push(format!(
                    "[{from}, {to}) overlaps {} (partition interval changed?); not created",
                    p.qualified()
                ));
                continue;
            }
            plan.steps.push(Self::ensure_step(
                from,
                to,
                format!("create the partition for [{from}, {to})"),
            ));
        }
    }

    async fn default_buckets(
        client: &Client,
        interval: PartitionInterval,
        within: Option<(DateTime<Utc>, DateTime<Utc>)>,
    ) -> Result<Vec<(DateTime<Utc>, i64)>, MaintenanceError> {
        let (lo, hi) = (within.map(|w| w.0), within.map(|w| w.1));
        let sql = format!(
            "SELECT date_trunc('{}', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', count(*)
               FROM {DEFAULT_PARTITION}
              WHERE ($1::timestamptz IS NULL OR (ts >= $1 AND ts < $2))
              GROUP BY 1 ORDER BY 1",
            interval.unit()
        );
        let rows = client
            .query(&sql, &[&lo, &hi])
            .await
            .map_err(db_err("reading the default partition"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn plan_sweep(
        &self,
        client: &Client,
        parts: &[PartitionInfo],
        plan: &mut Plan,
    ) -> Result<(), MaintenanceError> {
        let buckets = Self::default_buckets(client, self.interval, None).await?;
        let total: i64 = buckets.iter().map(|(_, n)| n).sum();
        if total > 0 {
            plan.notes.push(format!(
                "{total} row(s) in the default partition, in {} range(s)",
                buckets.len()
            ));
        }
        for (from, n) in buckets {
            let to = from + self.interval.step();
            if let Some(a) = parts.iter().find(|p| {
                !p.is_live()
                    && !p.is_default
                    && p.from.is_some_and(|f| f <= from)
                    && p.to.is_some_and(|t| t >= to)
            }) {
                plan.steps.push(Step {
                    what: format!(
                        "move {n} default-partition row(s) of [{from}, {to}) to the archived {}",
                        a.qualified()
                    ),
                    sql: vec![format!(
                        "WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE ts >= {} AND ts < {} RETURNING *) \
                         INSERT INTO {ARCHIVE_PARENT} SELECT * FROM moved",
                        ts_lit(from),
                        ts_lit(to)
                    )],
                    mode: StepMode::Transaction,
                    repeat_while_at_least: None,
                    needs_admin: true,
                    counts_rows: true,
                    rows_of: None,
                });
                continue;
            }
            let clash = parts
                .iter()
                .any(|p| p.is_live() && !p.is_default && p.overlaps(from, to));
            if clash && self.interval == PartitionInterval::Daily {
                // Hourly partitions exist in this day (the interval was changed): go by hour.
                for (h, hn) in
                    Self::default_buckets(client, PartitionInterval::Hourly, Some((from, to)))
                        .await?
                {
                    let ht = h + PartitionInterval::Hourly.step();
                    plan.steps.push(Self::ensure_step(
                        h,
                        ht,
                        format!(
                            "move {hn} default-partition row(s) into the partition for [{h}, {ht})"
                        ),
                    ));
                }
                continue;
            }
            plan.steps.push(Self::ensure_step(
                from,
                to,
                format!("move {n} default-partition row(s) into the partition for [{from}, {to})"),
            ));
        }
        Ok(())
    }

    /// Archival: every live partition whose range ended `archive_after_days` ago is detached
    /// and moved under `dbx_archive`, and so is any table an interrupted archival left
    /// detached.
    async fn plan_archive(
        &self,
        client: &Client,
        parts: &[PartitionInfo],
        now: DateTime<Utc>,
        plan: &mut Plan,
    ) -> Result<(), MaintenanceError> {
        if self.cfg.archive_after_days == 0 {
            plan.notes
                .push("archival is off (partitions.archive_after_days = 0)".into());
            return Ok(());
        }
        let cutoff = now - TimeDelta::days(self.cfg.archive_after_days as i64);
        let has_default = parts.iter().any(|p| p.is_live() && p.is_default);
        if has_default {
            plan.notes.push(
                "DETACH without CONCURRENTLY: PostgreSQL refuses CONCURRENTLY while the table has a \
                 DEFAULT partition; the old partition is locked first, the parent last, under lock_timeout"
                    .into(),
            );
        }
        let archived: Vec<&str> = parts
            .iter()
            .filter(|p| !p.is_live())
            .map(|p| p.name.as_str())
            .collect();
        let before = plan.steps.len();
        for p in parts.iter().filter(|p| p.is_live() && !p.is_default) {
            plan_archive_partition(p, cutoff, has_default, &archived, plan);
        }
        plan_archive_detached(client, cutoff, &archived, plan).await?;
        if self.cfg.archive_access_method == ArchiveAccessMethod::Columnar {
            // The tables this run moves under dbx_archive (read back from the first statement
            // of archive_move_sql, the one place that moves a table there), then the heap
            // tables already there.
            let mut moving: Vec<String> = plan.steps[before..]
                .iter()
                .flat_map(|s| s.sql.iter())
                .filter_map(|sql| {
                    sql.strip_prefix("ALTER TABLE dbx_aviation.")
                        .and_then(|r| r.strip_suffix(" SET SCHEMA dbx_archive"))
                        .map(unquote_ident)
                })
                .collect();
            moving.extend(
                parts
                    .iter()
                    .filter(|p| !p.is_live() && !p.is_default && !p.is_columnar())
                    .map(|p| p.name.clone()),
            );
            plan_columnar(client, &moving, plan).await?;
        }
        Ok(())
    }

    async fn plan_retention(
        &self,
        client: &Client,
        parts: &[PartitionInfo],
        now: DateTime<Utc>,
        plan: &mut Plan,
    ) -> Result<(), MaintenanceError> {
        let orgs: Vec<(Uuid, i32)> = client
            .query(
                "SELECT org_id, data_retention_days FROM dbx_aviation.organizations
                  ORDER BY data_retention_days, org_id",
                &[],
            )
            .await
            .map_err(db_err("reading the organizations' retention"))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // The seed's retention of sessions and analysis results, last.
        let seed_step = Step::admin(
            StepMode::Autocommit,
            "the seed's enforce_retention_policy() (flight sessions, analysis results; server clock)".into(),
            vec!["SELECT * FROM dbx_aviation.enforce_retention_policy()".into()],
        );
        let Some(max_days) = orgs.iter().map(|(_, d)| *d).max() else {
            plan.notes
                .push("no organization: no telemetry retention to apply".into());
            plan.steps.push(seed_step);
            return Ok(());
        };
        let dropped = plan_expired_drops(parts, now, max_days, plan);
        // On Citus a ctid names a row only within one shard: chunks are chosen by the unique
        // key there (`dbx setup --distributed`); a single node keeps the TID scan.
        let citus = has_citus(client).await?;
        let chunk = self.cfg.retention_chunk_rows.max(1);
        let deletes = ExpiredDeletes {
            orgs: &orgs,
            dropped: &dropped,
            citus,
            chunk,
            now,
        };
        deletes.plan(client, parts, plan).await?;
        for p in parts.iter().filter(|p| p.is_columnar()) {
            if dropped.contains(&p.qualified()) {
                continue;
            }
            let expired: Vec<(Uuid, DateTime<Utc>)> = orgs
                .iter()
                .map(|(org, days)| (*org, now - TimeDelta::days(*days as i64)))
                .filter(|(_, cutoff)| p.from.is_some_and(|f| f < *cutoff))
                .collect();
            if !expired.is_empty() {
                plan_columnar_retention(client, p, &expired, citus, plan).await?;
            }
        }
        plan.steps.push(Step::admin(
            StepMode::Autocommit,
            "forget the retention bookkeeping of partitions that no longer exist".into(),
            vec!["DELETE FROM dbx_aviation.retention_state s \
                  WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = s.relid::oid)"
                .into()],
        ));
        plan.steps.push(seed_step);
        Ok(())
    }

    /// Runs maintenance on its timers until `shutdown`: premake every `interval_secs` (it ran
    /// at start-up), and sweep, archival, retention and refresh on theirs, starting now. A run
    /// that finds the advisory lock taken (another daemon) is skipped until the next interval.
    pub async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        let start = Instant::now();
        let mut schedule: Vec<(Task, Duration, Instant)> = Task::ALL
            .iter()
            .filter_map(|&t| {
                let every = self.cfg.every(t)?;
                let first = if t == Task::Premake {
                    start + every
                } else {
                    start + Duration::from_secs(1)
                };
                Some((t, every, first))
            })
            .collect();
        loop {
            let Some(next) = schedule.iter().map(|(_, _, at)| *at).min() else {
                shutdown.recv().await;
                return;
            };
            tokio::select! {
                _ = shutdown.recv() => break,
                _ = tokio::time::sleep_until(next) => {}
            }
            let now = Instant::now();
            let due: Vec<Task> = schedule
                .iter()
                .filter(|(_, _, at)| *at <= now)
                .map(|(t, _, _)| *t)
                .collect();
            let outcome = tokio::select! {
                _ = shutdown.recv() => break,
                r = self.run_tasks(&due) => r,
            };
            let retry_soon = match outcome {
                // Each task's outcome was reported (logged and counted) as it ran.
                Ok(Some(_)) => false,
                Ok(None) => {
                    tracing::debug!(tasks = ?due, "another daemon holds the maintenance lock; skipped");
                    false
                }
                Err(e) => {
                    tracing::info!(error = %e, "partition maintenance will retry within 30 s");
                    self.close().await;
                    true
                }
            };
            let after = Instant::now();
            for (t, every, at) in schedule.iter_mut() {
                if due.contains(t) {
                    let wait = if retry_soon {
                        (*every).min(Duration::from_secs(30))
                    } else {
                        *every
                    };
                    *at = after + wait;
                }
            }
        }
        // Closing the connection rolls back whatever was cut short and frees the lock.
        self.close().await;
    }
}

async fn acquire(conn: &mut Conn) -> Result<bool, MaintenanceError> {
    if conn.locked {
        return Ok(true);
    }
    let got: bool = conn
        .client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&MAINTENANCE_LOCK_KEY])
        .await
        .map_err(db_err("taking the maintenance lock"))?
        .get(0);
    conn.locked = got;
    Ok(got)
}

async fn release(conn: &mut Conn) -> Result<(), MaintenanceError> {
    if conn.locked {
        conn.client
            .query_one("SELECT pg_advisory_unlock($1)", &[&MAINTENANCE_LOCK_KEY])
            .await
            .map_err(db_err("releasing the maintenance lock"))?;
        conn.locked = false;
    }
    Ok(())
}

/// Runs a step once; returns the rows affected by its last statement (or by statement
/// [`Step::rows_of`]).
async fn exec_step(client: &Client, step: &Step) -> Result<u64, tokio_postgres::Error> {
    let tx = step.mode == StepMode::Transaction;
    if tx {
        client.batch_execute("BEGIN").await?;
    }
    let mut last = 0;
    for (i, sql) in step.sql.iter().enumerate() {
        match client.execute(sql.as_str(), &[]).await {
            Ok(n) if step.rows_of.is_none_or(|k| k == i) => last = n,
            Ok(_) => {}
            Err(e) => {
                if tx && !client.is_closed() {
                    let _ = client.batch_execute("ROLLBACK").await;
                }
                return Err(e);
            }
        }
    }
    if tx {
        client.batch_execute("COMMIT").await?;
    }
    Ok(last)
}

/// The write counter (`n_tup_ins + n_tup_upd + n_tup_del`) of every telemetry partition, live
/// and archived, by (schema, name), with its oid. This connection's own pending counts are
/// flushed first, so that what the sweep just moved counts.
async fn write_counters(
    client: &Client,
) -> Result<std::collections::HashMap<(String, String), (i64, i64)>, MaintenanceError> {
    client
        .batch_execute("SELECT pg_stat_force_next_flush()")
        .await
        .map_err(db_err("flushing the write counters"))?;
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.oid::bigint,
                    pg_stat_get_tuples_inserted(c.oid) + pg_stat_get_tuples_updated(c.oid)
                      + pg_stat_get_tuples_deleted(c.oid)
               FROM dbx_aviation.telemetry_partitions() tp
               JOIN pg_namespace n ON n.nspname = tp.partition_schema
               JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = tp.partition_name",
            &[],
        )
        .await
        .map_err(db_err("reading the partitions' write counters"))?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect())
}

/// (partition oid, organization, write counter) of every partition found without the
/// organization's rows once it was wholly past its cutoff (`dbx_aviation.retention_state`).
async fn retention_clean(
    client: &Client,
) -> Result<std::collections::HashSet<(i64, Uuid, i64)>, MaintenanceError> {
    let rows = client
        .query(
            "SELECT relid, org_id, changes FROM dbx_aviation.retention_state",
            &[],
        )
        .await
        .map_err(db_err("reading the retention bookkeeping"))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Records that partition `q` (oid `oid`), wholly past `org`'s cutoff, holds none of its rows,
/// with the write counter `changes` read before the delete ran: a write after that read
/// changes the counter, so the next run looks again. Nothing is recorded while a row is left
/// (the delete was skipped for a lock, or a row arrived meanwhile).
fn mark_clean_step(q: &str, oid: i64, org: Uuid, changes: i64) -> Step {
    Step::admin(
        StepMode::Autocommit,
        format!("remember that {q} holds no row of organization {org}"),
        vec![format!(
            "INSERT INTO dbx_aviation.retention_state (relid, org_id, changes, checked_at) \
             SELECT {oid}, '{org}'::uuid, {changes}, now() \
             WHERE NOT EXISTS (SELECT 1 FROM {q} WHERE org_id = '{org}'::uuid) \
             ON CONFLICT (relid, org_id) DO UPDATE \
             SET changes = excluded.changes, checked_at = excluded.checked_at"
        )],
    )
}

/// Every partition of the live and the archive table, oldest first, the default last.
pub async fn list_partitions(client: &Client) -> Result<Vec<PartitionInfo>, MaintenanceError> {
    let rows = client
        .query(
            "SELECT tp.partition_schema, tp.partition_name, tp.is_default, tp.range_start, tp.range_end,
                    CASE WHEN c.reltuples < 0 THEN NULL ELSE c.reltuples::bigint END,
                    pg_total_relation_size(c.oid),
                    coalesce(i.inhdetachpending, false),
                    coalesce(am.amname::text, 'heap')
               FROM dbx_aviation.telemetry_partitions() tp
               JOIN pg_namespace n ON n.nspname = tp.partition_schema
               JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = tp.partition_name
               LEFT JOIN pg_am am ON am.oid = c.relam
               LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
              ORDER BY tp.range_start NULLS LAST, tp.partition_schema, tp.partition_name",
            &[],
        )
        .await
        .map_err(db_err("listing partitions"))?;
    Ok(rows
        .iter()
        .map(|r| PartitionInfo {
            schema: r.get(0),
            name: r.get(1),
            is_default: r.get(2),
            from: r.get(3),
            to: r.get(4),
            rows_estimate: r.get(5),
            total_bytes: r.get(6),
            detach_pending: r.get(7),
            access_method: r.get(8),
        })
        .collect())
}

/// The steps archiving one live partition `p`, if its range ended before `cutoff`: finish an
/// interrupted `DETACH … CONCURRENTLY`, detach (concurrently unless a DEFAULT partition
/// forbids it), move under `dbx_archive`. `archived` names the tables already there.
fn plan_archive_partition(
    p: &PartitionInfo,
    cutoff: DateTime<Utc>,
    has_default: bool,
    archived: &[&str],
    plan: &mut Plan,
) {
    let (Some(from), Some(to)) = (p.from, p.to) else {
        return;
    };
    if p.detach_pending {
        // An interrupted DETACH CONCURRENTLY: finish it, then move the table.
        plan.steps.push(Step::admin(
            StepMode::Autocommit,
            format!("finish the interrupted detach of {}", p.qualified()),
            vec![format!(
                "ALTER TABLE {LIVE_PARENT} DETACH PARTITION {} FINALIZE",
                p.qualified()
            )],
        ));
    }
    if to > cutoff {
        return;
    }
    if archived.contains(&p.name.as_str()) {
        plan.notes.push(format!(
            "{} is old enough but dbx_archive.{} already exists; left in place",
            p.qualified(),
            quote_ident(&p.name)
        ));
        return;
    }
    let what = format!("archive {} [{from}, {to})", p.qualified());
    if has_default || p.detach_pending {
        let mut sql = Vec::new();
        if !p.detach_pending {
            sql.push(format!(
                "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
                p.qualified()
            ));
            sql.push(format!(
                "ALTER TABLE {LIVE_PARENT} DETACH PARTITION {}",
                p.qualified()
            ));
        }
        sql.extend(archive_move_sql(&p.name, from, to));
        plan.steps
            .push(Step::admin(StepMode::Transaction, what, sql));
    } else {
        plan.steps.push(Step::admin(
            StepMode::Autocommit,
            format!("detach {} concurrently", p.qualified()),
            vec![format!(
                "ALTER TABLE {LIVE_PARENT} DETACH PARTITION {} CONCURRENTLY",
                p.qualified()
            )],
        ));
        plan.steps.push(Step::admin(
            StepMode::Transaction,
            what,
            archive_move_sql(&p.name, from, to),
        ));
    }
}

/// Tables left standalone in `dbx_aviation` by an archival interrupted between its two
/// steps: moved under `dbx_archive` when old enough and not there already.
async fn plan_archive_detached(
    client: &Client,
    cutoff: DateTime<Utc>,
    archived: &[&str],
    plan: &mut Plan,
) -> Result<(), MaintenanceError> {
    let orphans = client
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'dbx_aviation' AND c.relkind = 'r' AND NOT c.relispartition
                AND c.relname ~ $1
              ORDER BY 1",
            &[&CHILD_NAME_PATTERN],
        )
        .await
        .map_err(db_err("looking for detached partitions"))?;
    for r in orphans {
        let name: String = r.get(0);
        let Some((from, to)) = range_of_child(&name) else {
            continue;
        };
        if to > cutoff || archived.contains(&name.as_str()) {
            plan.notes.push(format!(
                "dbx_aviation.{} is a detached partition; left in place",
                quote_ident(&name)
            ));
            continue;
        }
        plan.steps.push(Step::admin(
            StepMode::Transaction,
            format!("archive the detached dbx_aviation.{}", quote_ident(&name)),
            archive_move_sql(&name, from, to),
        ));
    }
    Ok(())
}

/// Checks that the database has the access method `am` archived partitions are to get:
/// [`MaintenanceError::NoColumnar`] for `columnar` without citus_columnar. `dbx serve` calls
/// it at start; the archive task's plan calls it too (`dbx partitions archive`).
pub async fn check_access_method(
    client: &Client,
    am: ArchiveAccessMethod,
) -> Result<(), MaintenanceError> {
    if am == ArchiveAccessMethod::Heap {
        return Ok(());
    }
    let has: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_am WHERE amname = $1)",
            &[&am.name()],
        )
        .await
        .map_err(db_err("looking for the columnar access method"))?
        .get(0);
    if has {
        Ok(())
    } else {
        Err(MaintenanceError::NoColumnar)
    }
}

/// True when this database has the `citus` extension (a Citus coordinator after `dbx setup
/// --distributed`).
async fn has_citus(client: &Client) -> Result<bool, MaintenanceError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus')",
            &[],
        )
        .await
        .map_err(db_err("looking for the citus extension"))?
        .get(0))
}

/// The steps turning the archived heap tables `names` (in `dbx_archive`) columnar, one step
/// each. Fails with [`MaintenanceError::NoColumnar`] when the access method is missing.
///
/// Why a rewrite of its own, after the move, not inside the archival transaction: that one
/// holds the live parent's ACCESS EXCLUSIVE lock (a DETACH without CONCURRENTLY, forced by
/// the DEFAULT partition), and a rewrite there would stall ingest for as long as it copies a
/// day of rows. Converted on its own, the partition is already attached to the archive
/// parent (its rows never disappear from queries); the rewrite locks that one partition and
/// nothing else, so only readers of that archived day wait for it, and it runs under
/// `lock_timeout` like every step (a busy partition is retried, then left for the next run,
/// which finds it still heap and converts it then: the step is idempotent by construction).
///
/// - Single node: PostgreSQL 15's `ALTER TABLE … SET ACCESS METHOD columnar` (one rewrite,
///   same oid, indexes rebuilt). `IF EXISTS`: a table whose move was skipped this run is not
///   under dbx_archive yet and is converted by the run that moves it.
/// - Citus: `alter_table_set_access_method(partition, 'columnar')`, Citus's own conversion of
///   a distributed table's partition on every shard (plain `ALTER TABLE … SET ACCESS
///   METHOD` is not propagated to the shards). It is what `alter_old_partitions_set_access_method`
///   runs per partition; that procedure commits between partitions (no transaction block, no
///   per-partition retry), so dbx calls the function itself, one step per partition, guarded
///   by a catalog lookup so that a missing or already columnar table is a no-op.
///
/// Indexes: both are kept. citus_columnar (Citus 10.2+) supports btree indexes: the dedupe key
/// `(session_id, seq, ts)` must stay because the archive parent's partitioned unique index
/// requires it on every partition (and it keeps the sweep's moves into archived days
/// unique), and `(aircraft_id, ts)` serves the per-aircraft queries of the API and analytics.
async fn plan_columnar(
    client: &Client,
    names: &[String],
    plan: &mut Plan,
) -> Result<(), MaintenanceError> {
    check_access_method(client, ArchiveAccessMethod::Columnar).await?;
    if names.is_empty() {
        return Ok(());
    }
    let citus = has_citus(client).await?;
    plan.notes.push(format!(
        "archive_access_method = columnar: {} archived heap partition(s) rewritten columnar, one \
         at a time, each locking only itself ({})",
        names.len(),
        if citus {
            "Citus: alter_table_set_access_method"
        } else {
            "ALTER TABLE … SET ACCESS METHOD columnar"
        }
    ));
    for name in names {
        let q = format!("dbx_archive.{}", quote_ident(name));
        let sql = if citus {
            format!(
                "SELECT alter_table_set_access_method(c.oid::regclass, 'columnar') \
                   FROM pg_catalog.pg_class c JOIN pg_catalog.pg_am am ON am.oid = c.relam \
                  WHERE c.oid = to_regclass('{}') AND am.amname = 'heap'",
                q.replace('\'', "''")
            )
        } else {
            format!("ALTER TABLE IF EXISTS {q} SET ACCESS METHOD columnar")
        };
        plan.steps.push(Step::admin(
            StepMode::Autocommit,
            format!("turn {q} columnar"),
            vec![sql],
        ));
    }
    Ok(())
}

/// Retention of one columnar partition `p`, where `expired` holds every organization whose
/// cutoff falls after the partition's start, with that cutoff.
///
/// citus_columnar refuses DELETE and UPDATE ("UPDATE and CTID scans not supported for
/// ColumnarScan"), so the heap path's chunked deletes cannot run. One read-only look at the
/// partition (two `EXISTS`, which read only the `org_id` and `ts` columns; columnar skips the
/// rest) decides between:
///
/// - nothing expired: nothing to do (no step);
/// - every row expired: the partition is dropped whole (LOCK, then DROP, as above);
/// - some rows expired: **turn it heap, delete, turn it columnar again**, in one transaction
///   under the partition's ACCESS EXCLUSIVE lock. Chosen over copying the kept rows into a new
///   columnar table and swapping it in because it is the same three statements on a single node
///   (`ALTER TABLE … SET ACCESS METHOD`, which keeps the table's oid, grants and index names)
///   and on Citus (`alter_table_set_access_method` on every shard, where a swapped-in table
///   would have to be distributed and colocated by hand), and because a failure anywhere rolls
///   the whole of it back: the partition is never left heap or half-deleted. The price is two
///   rewrites of that one partition, once per retention change of an organization with rows in
///   it (a day's partition is past an organization's cutoff only once); readers of that day wait
///   for them, ingest never does (archived partitions take no writes).
///
/// Columnar partitions are not in the write-counter bookkeeping of the heap path
/// (`retention_state`): citus_columnar does not report its inserts to PostgreSQL's statistics
/// (its `n_tup_ins` stays 0 whatever the sweep moves in), so a counter could not tell that a
/// row arrived. They are looked at every run instead, at the cost of reading two columns.
async fn plan_columnar_retention(
    client: &Client,
    p: &PartitionInfo,
    expired: &[(Uuid, DateTime<Utc>)],
    citus: bool,
    plan: &mut Plan,
) -> Result<(), MaintenanceError> {
    let q = p.qualified();
    let cond = expired
        .iter()
        .map(|(org, cutoff)| format!("(org_id = '{org}'::uuid AND ts < {})", ts_lit(*cutoff)))
        .collect::<Vec<_>>()
        .join(" OR ");
    let row = client
        .query_one(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM {q} WHERE {cond}), \
                        EXISTS (SELECT 1 FROM {q} WHERE NOT ({cond}))"
            ),
            &[],
        )
        .await
        .map_err(db_err(format!("reading the expired rows of {q}")))?;
    let (some_expired, some_kept): (bool, bool) = (row.get(0), row.get(1));
    if !some_expired {
        return Ok(());
    }
    let orgs = expired
        .iter()
        .map(|(org, cutoff)| format!("{org} before {cutoff}"))
        .collect::<Vec<_>>()
        .join(", ");
    if !some_kept {
        plan.steps.push(Step::admin(
            StepMode::Transaction,
            format!("drop the columnar {q}: every row in it is expired ({orgs})"),
            vec![
                format!("LOCK TABLE {q} IN ACCESS EXCLUSIVE MODE"),
                format!("DROP TABLE {q}"),
            ],
        ));
        return Ok(());
    }
    let lit = q.replace('\'', "''");
    let sql = if citus {
        vec![
            format!("SELECT alter_table_set_access_method('{lit}', 'heap')"),
            format!("DELETE FROM {q} WHERE {cond}"),
            format!("SELECT alter_table_set_access_method('{lit}', 'columnar')"),
        ]
    } else {
        vec![
            format!("LOCK TABLE {q} IN ACCESS EXCLUSIVE MODE"),
            format!("ALTER TABLE {q} SET ACCESS METHOD heap"),
            format!("DELETE FROM {q} WHERE {cond}"),
            format!("ALTER TABLE {q} SET ACCESS METHOD columnar"),
        ]
    };
    let delete_at = sql.len() - 2;
    plan.steps.push(Step {
        what: format!(
            "rewrite the columnar {q} without its expired rows ({orgs}): heap, delete, columnar"
        ),
        sql,
        mode: StepMode::Transaction,
        repeat_while_at_least: None,
        needs_admin: true,
        counts_rows: true,
        rows_of: Some(delete_at),
    });
    Ok(())
}

/// Moves the detached table `name` under `dbx_archive`, read-only for the daemon, and attaches
/// it to the archive's parent for `[from, to)`.
fn archive_move_sql(name: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<String> {
    let q = quote_ident(name);
    vec![
        format!("ALTER TABLE dbx_aviation.{q} SET SCHEMA dbx_archive"),
        // Archived data is read-only for the daemon.
        format!("REVOKE ALL ON dbx_archive.{q} FROM dbx_ingest"),
        format!(
            "ALTER TABLE {ARCHIVE_PARENT} ATTACH PARTITION dbx_archive.{q} FOR VALUES FROM ({}) TO ({})",
            ts_lit(from),
            ts_lit(to)
        ),
    ]
}

/// Retention's drops: a partition that ended before every organization's retention
/// (`max_days`, the longest) is dropped whole. Returns the partitions dropped.
fn plan_expired_drops(
    parts: &[PartitionInfo],
    now: DateTime<Utc>,
    max_days: i32,
    plan: &mut Plan,
) -> Vec<String> {
    let drop_before = now - TimeDelta::days(max_days as i64);
    let mut dropped = Vec::new();
    for p in parts.iter().filter(|p| !p.is_default) {
        if p.to.is_some_and(|t| t <= drop_before) {
            dropped.push(p.qualified());
            plan.steps.push(Step::admin(
                StepMode::Transaction,
                format!(
                    "drop {} (ended before every organization's retention, {max_days} days)",
                    p.qualified()
                ),
                // The partition first, the parent (taken by DROP) last: see archival.
                vec![
                    format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", p.qualified()),
                    format!("DROP TABLE {}", p.qualified()),
                ],
            ));
        }
    }
    dropped
}

/// Retention's deletes: each organization's expired rows, in chunks, from the heap
/// partitions not dropped (columnar ones are planned apart).
struct ExpiredDeletes<'a> {
    orgs: &'a [(Uuid, i32)],
    dropped: &'a [String],
    citus: bool,
    chunk: u32,
    now: DateTime<Utc>,
}

impl ExpiredDeletes<'_> {
    /// Pushes the deletes (and the bookkeeping of partitions found clean) onto `plan`;
    /// a pair already known clean and not written since is skipped, with a note.
    async fn plan(
        &self,
        client: &Client,
        parts: &[PartitionInfo],
        plan: &mut Plan,
    ) -> Result<(), MaintenanceError> {
        let (citus, chunk, now) = (self.citus, self.chunk, self.now);
        // On Citus the coordinator's partitions are shells whose write counters never move
        // (the rows are written on the workers' shards): there, every expired partition is
        // looked at every time, as before the bookkeeping existed.
        let counters = if citus {
            Default::default()
        } else {
            write_counters(client).await?
        };
        let clean = retention_clean(client).await?;
        let mut known_clean = 0;
        for (org, days) in self.orgs {
            let cutoff = now - TimeDelta::days(*days as i64);
            for p in parts.iter() {
                // Columnar partitions refuse DELETE: plan_retention plans them apart.
                if self.dropped.contains(&p.qualified()) || p.is_columnar() {
                    continue;
                }
                let expired = p.is_default || p.from.is_some_and(|f| f < cutoff);
                if !expired {
                    continue;
                }
                let q = p.qualified();
                // A partition wholly past this organization's cutoff that was found without
                // its rows, and not written since: nothing to look for (no scan).
                let whole = !p.is_default && p.to.is_some_and(|t| t <= cutoff);
                let counter = counters
                    .get(&(p.schema.clone(), p.name.clone()))
                    .filter(|_| whole);
                if counter.is_some_and(|(oid, n)| clean.contains(&(*oid, *org, *n))) {
                    known_clean += 1;
                    continue;
                }
                // ctid batches: a bounded transaction each, and a TID scan for the delete.
                let sql = if citus {
                    format!(
                        "DELETE FROM {q} WHERE (session_id, seq, ts) IN (SELECT session_id, seq, ts \
                         FROM {q} WHERE org_id = '{org}'::uuid AND ts < {} LIMIT {chunk})",
                        ts_lit(cutoff)
                    )
                } else {
                    format!(
                        "DELETE FROM {q} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {q} \
                         WHERE org_id = '{org}'::uuid AND ts < {} LIMIT {chunk}))",
                        ts_lit(cutoff)
                    )
                };
                plan.steps.push(Step::chunked_delete(
                    format!(
                        "delete organization {org}'s rows before {cutoff} ({days} days) from {q}"
                    ),
                    sql,
                    chunk,
                ));
                if let Some((oid, n)) = counter {
                    plan.steps.push(mark_clean_step(&q, *oid, *org, *n));
                }
            }
        }
        if known_clean > 0 {
            plan.notes.push(format!(
                "{known_clean} (partition, organization) pair(s) wholly expired, already without \
                 rows and not written since: not scanned"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn wanted_ranges_span_lookback_to_premake_in_utc() {
        let now = Utc.with_ymd_and_hms(2026, 1, 30, 23, 59, 0).unwrap();
        let r = wanted_ranges(PartitionInterval::Daily, 4, 1, now);
        assert_eq!(r.len(), 6);
        assert_eq!(r[0].0, Utc.with_ymd_and_hms(2026, 1, 29, 0, 0, 0).unwrap());
        // Across the month boundary.
        assert_eq!(r[5].0, Utc.with_ymd_and_hms(2026, 2, 3, 0, 0, 0).unwrap());
        assert_eq!(r[5].1, Utc.with_ymd_and_hms(2026, 2, 4, 0, 0, 0).unwrap());
        let h = wanted_ranges(PartitionInterval::Hourly, 2, 0, now);
        assert_eq!(h.len(), 3);
        assert_eq!(h[2].1, Utc.with_ymd_and_hms(2026, 1, 31, 2, 0, 0).unwrap());
    }

    #[test]
    fn literals_are_utc_and_identifiers_quoted() {
        let t = Utc.with_ymd_and_hms(2026, 3, 29, 1, 0, 0).unwrap();
        assert_eq!(ts_lit(t), "'2026-03-29 01:00:00+00'::timestamptz");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn config_validation_names_the_key() {
        let mut c = PartitionsConfig::default();
        assert!(c.validate().is_ok());
        c.retention_chunk_rows = 0;
        assert_eq!(c.validate().unwrap_err().key, "retention_chunk_rows");
        let c = PartitionsConfig {
            archive_after_days: 0,
            ..PartitionsConfig::default()
        };
        assert_eq!(c.every(Task::Archive), None);
        assert_eq!(c.every(Task::Premake), Some(Duration::from_secs(600)));
    }

    #[test]
    fn a_plan_prints_as_sql_with_transactions() {
        let plan = Plan {
            task: Task::Archive,
            steps: vec![Step {
                what: "x".into(),
                sql: vec!["LOCK TABLE a".into(), "DROP TABLE a".into()],
                mode: StepMode::Transaction,
                repeat_while_at_least: None,
                needs_admin: true,
                counts_rows: false,
                rows_of: None,
            }],
            notes: vec!["n".into()],
        };
        let s = plan.to_string();
        assert!(
            s.contains("BEGIN;\nLOCK TABLE a;\nDROP TABLE a;\nCOMMIT;\n"),
            "{s}"
        );
        assert!(s.contains("-- note: n"), "{s}");
    }
}
