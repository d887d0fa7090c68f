//! The UDP server: one datagram, one batch with its own `key`. No answer is ever
//! sent; a datagram that fails authentication, validation or the rate limit, or
//! that finds the batcher's queue full, is dropped and counted by reason. UDP never
//! waits for room, so it can never hold up TCP.

use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;

use dbx_core::metrics as m;
use dbx_core::{AckHandle, BatchOrigin, RejectCode, Shutdown, TelemetryBatch};

use crate::connection::{now_micros, Shared};

/// Largest UDP payload (PROTOCOL.md).
pub const MAX_DATAGRAM: usize = 65_507;

fn drop_datagram(reason: &'static str) {
    metrics::counter!(m::UDP_DROPPED_TOTAL, "reason" => reason).increment(1);
}

/// Receives datagrams until `shutdown`.
pub async fn serve(socket: Arc<UdpSocket>, shared: Shared, mut shutdown: Shutdown) {
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let limits = shared.config.limits();
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
        metrics::counter!(m::FRAMES_RECEIVED_TOTAL, "transport" => "udp").increment(1);
        if len > MAX_DATAGRAM {
            drop_datagram("too_large");
            continue;
        }
        let dg = match dbx_proto::decode_datagram(&buf[..len], &limits, now_micros()) {
            Ok(d) => d,
            Err(r) => {
                drop_datagram(r.code.as_str());
                tracing::trace!(%peer, "udp datagram dropped: {}", r.msg);
                continue;
            }
        };
        let Some((key_hash, grant)) = shared.auth.authenticate(&dg.key) else {
            drop_datagram(RejectCode::Unauthorized.as_str());
            continue;
        };
        shared.auth.note_used(&key_hash);
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
                drop_datagram(r.code.as_str());
                continue;
            }
        };
        let n = dg.points.len();
        if !shared
            .limiter
            .try_acquire(grant.org_id, grant.points_per_sec, n)
        {
            metrics::counter!(m::RATE_LIMIT_DROPS_TOTAL).increment(n as u64);
            drop_datagram("rate_limited");
            continue;
        }
        let batch = TelemetryBatch {
            org_id: grant.org_id,
            aircraft_id,
            session_id: dg.session,
            points: dg.points,
            ack: AckHandle::detached(),
            origin: BatchOrigin::Udp,
            received_at,
            ends_session: false,
        };
        match shared.batches.try_send(batch) {
            Ok(()) => {
                metrics::counter!(m::POINTS_RECEIVED_TOTAL, "transport" => "udp")
                    .increment(n as u64);
            }
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => drop_datagram("saturated"),
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}
