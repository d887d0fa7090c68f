//! Ending flight sessions (protocol 1.1 `end`).
//!
//! An end rides with its session's last batch when it can: the batcher attaches it to
//! the open group that holds every unwritten piece of its session, and the flush that
//! writes them completes the session in the same transaction ([`complete`] before its
//! `COMMIT`), so ending a flight costs no commit of its own and its ack comes with the
//! batch's. The others (no piece of the session is waiting, or its pieces are spread
//! over several flushes, or the flush had to be split) are written by [`run_ends`], in
//! one small transaction of their own, after those pieces:
//!
//! ```text
//! BEGIN
//!   SELECT … FROM flight_sessions WHERE session_id = ANY(ends) ORDER BY session_id FOR UPDATE
//!   UPDATE flight_sessions SET flight_status = 'completed', completed_at = now(),
//!          completion_reason = 'end' WHERE session_id = ANY(owned) AND flight_status = 'active'
//! COMMIT  -> resolve every end
//! ```
//!
//! The rows are locked in session-id order, the order flushes lock them in, so an end
//! and a flush never deadlock; whichever takes a session's row first commits first
//! (inside a flush the rows are the flush's own, locked by its session upsert already).
//! On Citus (`dbx setup --distributed`) `FOR UPDATE` must stay on one shard, so the rows
//! are locked one statement each, in the same order.
//! Departure, arrival, duration and distance are those of the stored points, kept
//! current by every flush; completing the session freezes them, as it takes no new
//! point afterwards (see `writer`).
//!
//! Verdicts, each end on its own:
//! - a session of the end's organization is completed, or left as it is when it is
//!   not `active` (already completed: sending `end` again changes nothing): ack;
//! - a session of another organization: `foreign_session`, nothing changes;
//! - a session the database does not know (its batches were all refused, or none was
//!   sent): ack, and nothing is created: an `end` names no aircraft to create it for,
//!   and there is nothing to complete.
//!
//! Transient errors retry forever with the writers' backoff (the end stays unacked,
//! like a batch); a data error nacks the ends with `rejected`.

use std::collections::HashMap;

use dbx_core::{InternalEvent, RejectCode, Rejection};
use tracing::debug;
use uuid::Uuid;

use crate::error::AttemptError;
use crate::events::{SessionsEnded, WriteRetried};
use crate::ticket::{Part, Resolved};
use crate::txn::FlushTx;
use crate::writer::{refuse, retried, Backoff, Shared};

/// Locks the ended sessions in id order and reads their owner.
const LOCK_SQL: &str = "SELECT session_id, org_id FROM dbx_aviation.flight_sessions \
WHERE session_id = ANY($1) ORDER BY session_id FOR UPDATE";

/// [`LOCK_SQL`] for one session: on Citus, where `FOR UPDATE` must stay on one shard, the
/// sessions are locked one by one, in the same id order.
const LOCK_ONE_SQL: &str = "SELECT session_id, org_id FROM dbx_aviation.flight_sessions \
WHERE session_id = $1 FOR UPDATE";

/// Completes the active ones among them (the rest keep their status).
const COMPLETE_SQL: &str = "UPDATE dbx_aviation.flight_sessions \
SET flight_status = 'completed', completed_at = now(), completion_reason = 'end' \
WHERE session_id = ANY($1) AND flight_status = 'active'";

/// Writes the ends of `parts` (one per end, no points) and resolves them.
pub(crate) async fn run_ends(shared: &Shared, parts: Vec<Part>) {
    if parts.is_empty() {
        return;
    }
    let mut backoff = Backoff::new(&shared.config);
    loop {
        let err = match attempt(shared, &parts).await {
            Ok((owners, completed)) => {
                resolve(shared, &parts, &owners, completed, false);
                return;
            }
            Err(e) => e,
        };
        match err {
            AttemptError::Data(msg) => {
                for p in &parts {
                    let r = Rejection::new(
                        RejectCode::Rejected,
                        format!("the database rejected the end of the session: {msg}"),
                    );
                    refuse(shared, &p.ticket, r);
                }
                return;
            }
            other => {
                let event = WriteRetried::Ends {
                    kind: other.kind(),
                    error: &other,
                    retry_in: backoff.delay(),
                };
                retried(shared, event);
            }
        }
        shared.update_pool_gauges();
        backoff.wait().await;
    }
}

/// One try: returns the owner of every session the database knows, and how many
/// sessions it completed.
async fn attempt(shared: &Shared, parts: &[Part]) -> Result<Ended, AttemptError> {
    let tx = FlushTx::new(shared.pool.get().await?);
    let ended = async {
        tx.begin().await?;
        let ended = complete(shared, &tx, parts).await?;
        tx.commit().await?;
        Ok(ended)
    }
    .await;
    tx.finish(ended).await
}

/// What [`complete`] found: the owner of every session the database knows, and how many
/// sessions it completed.
pub(crate) type Ended = (HashMap<Uuid, Uuid>, u64);

/// Completes, within `tx`, the sessions the ends of `parts` name that belong to the
/// end's organization (the rest of the verdicts come from the owners, in [`resolve`]).
pub(crate) async fn complete(
    shared: &Shared,
    tx: &FlushTx,
    parts: &[Part],
) -> Result<Ended, AttemptError> {
    let mut ids: Vec<Uuid> = parts.iter().map(|p| p.ticket.session).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut owners = HashMap::with_capacity(ids.len());
    let rows = if shared.is_citus(tx).await? {
        let lock = tx.prepare_cached(LOCK_ONE_SQL).await?;
        let mut rows = Vec::with_capacity(ids.len());
        for id in &ids {
            rows.extend(tx.query(&lock, &[id]).await?);
        }
        rows
    } else {
        let lock = tx.prepare_cached(LOCK_SQL).await?;
        tx.query(&lock, &[&ids]).await?
    };
    for r in rows {
        owners.insert(r.try_get::<_, Uuid>(0)?, r.try_get::<_, Uuid>(1)?);
    }
    let mut owned: Vec<Uuid> = parts
        .iter()
        .filter(|p| owners.get(&p.ticket.session) == Some(&p.ticket.org))
        .map(|p| p.ticket.session)
        .collect();
    owned.sort_unstable();
    owned.dedup();
    let completed = if owned.is_empty() {
        0
    } else {
        let complete = tx.prepare_cached(COMPLETE_SQL).await?;
        tx.execute(&complete, &[&owned]).await?
    };
    Ok((owners, completed))
}

/// Gives every end of `parts` its verdict, after the transaction that ran [`complete`]
/// for them committed.
pub(crate) fn resolve(
    shared: &Shared,
    parts: &[Part],
    owners: &HashMap<Uuid, Uuid>,
    completed: u64,
    with_flush: bool,
) {
    let c = &shared.counters;
    c.add(&c.sessions_ended, completed);
    if with_flush {
        c.add(&c.ends_with_flush, parts.len() as u64);
    }
    SessionsEnded {
        completed,
        ends: parts.len(),
        with_flush,
    }
    .emit();
    for p in parts {
        let t = &p.ticket;
        match owners.get(&t.session) {
            Some(org) if *org != t.org => {
                let r = Rejection::new(
                    RejectCode::ForeignSession,
                    format!("session {} belongs to another organization", t.session),
                );
                refuse(shared, t, r);
                continue;
            }
            Some(_) => debug!(org = %t.org, session = %t.session, "session ended"),
            None => debug!(org = %t.org, session = %t.session,
                "end of a session the database does not know; nothing to complete"),
        }
        if t.piece_committed() == Resolved::Now {
            c.add(&c.batches_acked, 1);
        }
    }
}
