//! Errors: what [`BatcherHandle::join`](crate::BatcherHandle::join) can return, and
//! how a failed flush attempt is classified, which decides what happens next:
//! retry as is (transient), retry through the staging path (unique violation on the
//! fast path), refresh the partition cache and retry (a child vanished), bisect
//! the flush by batch and nack the culprit (data), or settle the batches of completed
//! sessions and write the rest (not an error, but the same start-over).

use std::collections::HashMap;
use std::error::Error as _;

use tokio_postgres::error::SqlState;

use crate::writer::Settled;
use dbx_core::ConfigError;

/// Why the batcher stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum BatcherError {
    /// The configuration was refused at spawn.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The shutdown deadline passed with batches still unwritten; they were left
    /// unacked (their gateways will resend them).
    #[error("shutdown deadline passed with {unwritten_batches} batch(es) unwritten and unacked")]
    ShutdownDeadline {
        /// Batches given up.
        unwritten_batches: u64,
    },
    /// A batcher task panicked.
    #[error("batcher task failed: {0}")]
    Task(String),
}

/// The class of a failed flush attempt.
#[derive(Debug)]
pub(crate) enum AttemptError {
    /// Worth retrying unchanged after a delay; the label is the metric's `kind`.
    Transient(String),
    /// The fast path collided with stored rows: retry everything through staging.
    UniqueViolation,
    /// The target child does not exist (any more): refresh partitions and retry.
    MissingRelation,
    /// The data was refused: bisect, nack the culprit.
    Data(String),
    /// Not a failure: batches (by index in the flush) of completed sessions were found
    /// and settled; start over without them.
    Settled(HashMap<usize, Settled>),
}

impl From<tokio_postgres::Error> for AttemptError {
    fn from(e: tokio_postgres::Error) -> Self {
        classify(&e)
    }
}

impl From<deadpool_postgres::PoolError> for AttemptError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::PoolError;
        match e {
            PoolError::Backend(e) => classify(&e),
            // A closed pool will not come back, but retrying until the shutdown
            // deadline is the safe choice: the rows are kept and never half-acked.
            other => AttemptError::Transient(format!("pool: {other}")),
        }
    }
}

/// Classifies a tokio-postgres error by SQLSTATE, or as a connection failure.
pub(crate) fn classify(e: &tokio_postgres::Error) -> AttemptError {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        let s = code.code();
        let msg = || {
            let mut m = format!("{} (SQLSTATE {s})", db.message());
            if let Some(d) = db.detail() {
                m.push_str(": ");
                m.push_str(d);
            }
            m
        };
        if *code == SqlState::UNIQUE_VIOLATION {
            return AttemptError::UniqueViolation;
        }
        if *code == SqlState::UNDEFINED_TABLE {
            return AttemptError::MissingRelation;
        }
        // A missing privilege or an RLS refusal is the deployment's fault, not the
        // data's: nacking would make gateways drop data that a fixed GRANT (or the
        // role's BYPASSRLS) would store. Keep the rows and retry, loudly.
        if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            tracing::error!(error = %msg(), "the ingest role lacks a privilege; rows are kept and retried");
            return AttemptError::Transient(format!("privilege: {}", msg()));
        }
        if s.starts_with("08")
            || s.starts_with("53")
            || s.starts_with("57P0")
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::QUERY_CANCELED
        {
            return AttemptError::Transient(format!("db: {}", msg()));
        }
        return AttemptError::Data(msg());
    }
    // No SQLSTATE: a closed connection, an I/O error or a protocol desync are all the
    // connection's fault, not the data's.
    if e.is_closed()
        || e.source()
            .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some())
    {
        return AttemptError::Transient(format!("connection: {e}"));
    }
    AttemptError::Data(e.to_string())
}

impl AttemptError {
    /// The metric label of a retry for this error.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            AttemptError::Transient(_) => "transient",
            AttemptError::UniqueViolation => "unique_violation",
            AttemptError::MissingRelation => "missing_partition",
            AttemptError::Data(_) => "data",
            AttemptError::Settled(_) => "settled",
        }
    }
}
