//! The UDP server: one datagram, one batch, authenticated by its own `key` (v1) or by
//! `kid`/`mac`/`body` (docs/protocol.md, 1.1). No answer is ever sent; a datagram that fails
//! authentication, validation or the rate limit, that finds the byte budget spent or
//! the batcher's queue full, is dropped and counted by reason. UDP never waits for
//! room, so it can never hold up TCP.
//!
//! Order of work, cheapest refusal first: the size; one walk over the top-level map to
//! find how the datagram authenticates (no point is decoded); the key (a hash lookup,
//! or an HMAC per key with that `kid`, compared in constant time); the byte budget
//! (the bound of what the batch can decode to); only then the points. A datagram's
//! charge lives in its [`AckHandle`] until the batcher resolves it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;

use crate::events::{DatagramDropped, DatagramRateLimited};
use crate::metrics as m;
use dbx_core::{AckHandle, BatchOrigin, InternalEvent, RejectCode, Shutdown, TelemetryBatch};
use dbx_proto::{DatagramAuth, DatagramEnvelope};

use crate::auth::KeyGrant;
use crate::connection::Shared;
use dbx_core::now_micros;

/// Largest UDP payload (docs/protocol.md).
pub const MAX_DATAGRAM: usize = 65_507;

fn drop_datagram(peer: SocketAddr, reason: &'static str, detail: Option<&str>) {
    DatagramDropped {
        peer,
        reason,
        detail,
    }
    .emit();
}

/// The sender of a datagram, or the reason to drop it.
fn authenticate(
    shared: &Shared,
    env: &DatagramEnvelope<'_>,
) -> Result<(String, KeyGrant), &'static str> {
    let found = match env.auth {
        DatagramAuth::Key(_) if !shared.config.udp_plain_key => return Err("plain_key_refused"),
        DatagramAuth::Key(key) => shared.auth.authenticate(key),
        DatagramAuth::Mac { kid, mac, body } => shared.auth.authenticate_mac(kid, &mac, body),
    };
    found.ok_or(RejectCode::Unauthorized.as_str())
}

/// Receives datagrams until `shutdown`.
pub async fn serve(socket: Arc<UdpSocket>, shared: Shared, mut shutdown: Shutdown) {
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let limits = shared.config.limits();
    let frames = m::frames_received("udp");
    let points = m::points_received("udp");
    loop {
        let (len, peer) = tokio::select! {
            _ = shutdown.recv() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(ok) => ok,
                Err(e) => {
                    tracing::debug!(error = %e, "udp receive error");
                    continue;
                }
            },
        };
        let received_at = Instant::now();
        frames.increment(1);
        if len > MAX_DATAGRAM {
            drop_datagram(peer, "too_large", None);
            continue;
        }
        let env = match dbx_proto::open_datagram(&buf[..len]) {
            Ok(env) => env,
            Err(r) => {
                drop_datagram(peer, r.code.as_str(), Some(&r.msg));
                continue;
            }
        };
        let (key_hash, grant) = match authenticate(&shared, &env) {
            Ok(ok) => ok,
            Err(reason) => {
                drop_datagram(peer, reason, None);
                continue;
            }
        };
        let bound = dbx_proto::decoded_bytes_bound(env.batch_len(), &limits);
        let Some(mut charge) = shared.budget.try_acquire(bound) else {
            drop_datagram(peer, "budget", None);
            continue;
        };
        let dg = match env.decode(&limits, now_micros()) {
            Ok(d) => d,
            Err(r) => {
                drop_datagram(peer, r.code.as_str(), Some(&r.msg));
                continue;
            }
        };
        charge.shrink_to(dbx_proto::points_heap_bytes(&dg.points));
        shared.auth.note_used(&key_hash);
        let org = shared.org_metrics.for_org(grant.org_id, &shared.auth);
        org.received_bytes(len);
        let aircraft_id = match crate::admit::resolve_target(
            &shared.auth,
            grant.org_id,
            &dg.aircraft,
            dg.session,
            false,
        )
        .await
        {
            Ok(id) => id,
            Err(r) => {
                drop_datagram(peer, r.code.as_str(), Some(&r.msg));
                org.rejected();
                continue;
            }
        };
        let n = dg.points.len();
        if !shared
            .limiter
            .try_acquire(grant.org_id, grant.points_per_sec, n)
        {
            DatagramRateLimited { peer, points: n }.emit();
            org.rejected();
            continue;
        }
        let batch = TelemetryBatch {
            org_id: grant.org_id,
            aircraft_id,
            session_id: dg.session,
            points: dg.points,
            ack: AckHandle::detached_holding(charge),
            origin: BatchOrigin::Udp,
            received_at,
            admitted_at: Instant::now(),
            queued_at: Instant::now(),
            ends_session: false,
        };
        match shared.batches.try_send(batch) {
            Ok(()) => {
                points.increment(n as u64);
                org.accepted(n);
            }
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                drop_datagram(peer, "saturated", None)
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}
