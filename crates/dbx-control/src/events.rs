//! The control plane's internal events: partition maintenance runs and failures, idle
//! sessions completed, admin requests refused. Each is a small type whose
//! [`InternalEvent::emit`] writes its log line and moves its metrics together (see
//! `dbx_core::metrics`), under the names and labels of [`crate::metrics`]. The database
//! health gauges are state, not events: [`crate::metrics::health`] sets them.

use std::fmt::Display;

use ::metrics::counter;
use chrono::{DateTime, Utc};
use dbx_core::{InternalEvent, Throttle};

use crate::metrics as m;
use crate::partitions::{Task, TaskReport};

/// A maintenance task ran under the maintenance lock (some of its steps may have been
/// skipped or failed; the next run retries them).
#[derive(Debug, Clone, Copy)]
pub struct MaintenanceRan<'a> {
    /// Which task (the `kind` label).
    pub task: Task,
    /// What it did.
    pub report: &'a TaskReport,
}

impl InternalEvent for MaintenanceRan<'_> {
    fn emit(self) {
        let (task, r) = (self.task, self.report);
        let kind = task.name();
        counter!(m::MAINTENANCE_RUNS_TOTAL, "kind" => kind).increment(1);
        if task == Task::RequestLog {
            counter!(m::API_REQUESTS_EXPIRED_TOTAL).increment(r.rows);
        }
        if !r.skipped.is_empty() {
            counter!(m::MAINTENANCE_SKIPPED_TOTAL, "kind" => kind)
                .increment(r.skipped.len() as u64);
            tracing::warn!(task = %task, skipped = ?r.skipped, "maintenance steps skipped; the next run retries");
        }
        if !r.failed.is_empty() {
            counter!(m::MAINTENANCE_FAILURES_TOTAL, "kind" => kind)
                .increment(r.failed.len() as u64);
            tracing::warn!(task = %task, failed = ?r.failed, "maintenance steps failed");
        }
        if !r.done.is_empty() {
            tracing::info!(task = %task, steps = r.done.len(), rows = r.rows, done = ?r.done, "maintenance done");
        }
    }
}

/// A maintenance task that could not run: no connection, no answer to the lock
/// request, or a step's statement failed outright.
#[derive(Clone, Copy)]
pub struct MaintenanceFailed<'a> {
    /// The `kind` label: a task's name, or `sessions` (idle session completion).
    pub kind: &'static str,
    /// Why.
    pub error: &'a dyn Display,
}

impl InternalEvent for MaintenanceFailed<'_> {
    fn emit(self) {
        counter!(m::MAINTENANCE_FAILURES_TOTAL, "kind" => self.kind).increment(1);
        tracing::warn!(kind = self.kind, error = %self.error, "maintenance failed; the next run retries");
    }
}

/// Flight sessions completed by the idle sweep (one chunk of them).
#[derive(Debug, Clone, Copy)]
pub struct IdleSessionsCompleted {
    /// How many.
    pub sessions: u64,
}

impl InternalEvent for IdleSessionsCompleted {
    fn emit(self) {
        counter!(m::SESSIONS_COMPLETED_TOTAL, "reason" => "idle").increment(self.sessions);
        tracing::trace!(sessions = self.sessions, "idle sessions completed");
    }
}

/// A pass of the idle sweep finished.
#[derive(Debug, Clone, Copy)]
pub struct IdleSweepRan {
    /// Sessions it completed.
    pub sessions: u64,
    /// The point in time before which a session without a point counts as idle.
    pub idle_before: DateTime<Utc>,
}

impl InternalEvent for IdleSweepRan {
    fn emit(self) {
        counter!(m::MAINTENANCE_RUNS_TOTAL, "kind" => "sessions").increment(1);
        if self.sessions > 0 {
            tracing::info!(sessions = self.sessions, idle_before = %self.idle_before, "completed flight sessions without a point since");
        }
    }
}

/// An admin HTTP request refused for a missing or wrong bearer token.
#[derive(Debug, Clone, Copy)]
pub struct AdminUnauthorized<'a> {
    /// The path asked for.
    pub path: &'a str,
}

impl InternalEvent for AdminUnauthorized<'_> {
    fn emit(self) {
        // Anyone who reaches the port can cause these.
        static LOG: Throttle = Throttle::new();
        counter!(m::ADMIN_UNAUTHORIZED_TOTAL).increment(1);
        if let Some(n) = LOG.allow() {
            tracing::debug!(
                path = self.path,
                suppressed = n,
                "admin request without a valid bearer token refused"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbx_testkit::capture_events;

    #[test]
    fn a_run_with_skipped_and_failed_steps_counts_each_and_warns() {
        let report = TaskReport {
            done: vec!["archive flight_telemetry_p2024_01".into()],
            skipped: vec!["detach flight_telemetry_p2024_02: lock timeout".into()],
            failed: vec!["drop a: permission denied".into(), "drop b: gone".into()],
            rows: 10,
            notes: vec![],
        };
        let ((), got) = capture_events(|| {
            MaintenanceRan {
                task: Task::Archive,
                report: &report,
            }
            .emit()
        });
        let kind = [("kind", Task::Archive.name())];
        assert_eq!(got.counter(m::MAINTENANCE_RUNS_TOTAL, &kind), 1);
        assert_eq!(got.counter(m::MAINTENANCE_SKIPPED_TOTAL, &kind), 1);
        assert_eq!(got.counter(m::MAINTENANCE_FAILURES_TOTAL, &kind), 2);
        assert_eq!(got.counter(m::API_REQUESTS_EXPIRED_TOTAL, &[]), 0);
        assert_eq!(got.lines_with("maintenance steps skipped").len(), 1);
        assert_eq!(got.lines_with("maintenance steps failed").len(), 1);
        assert_eq!(got.lines_with("maintenance done").len(), 1, "{}", got.log());
    }

    #[test]
    fn a_failed_sweep_counts_under_sessions_and_warns_with_the_error() {
        let error = "connection refused";
        let ((), got) = capture_events(|| {
            MaintenanceFailed {
                kind: "sessions",
                error: &error,
            }
            .emit()
        });
        assert_eq!(
            got.counter(m::MAINTENANCE_FAILURES_TOTAL, &[("kind", "sessions")]),
            1
        );
        let lines = got.lines_with("maintenance failed");
        assert_eq!(lines.len(), 1, "{}", got.log());
        assert!(lines[0].contains("WARN") && lines[0].contains("connection refused"));
    }
}
