//! A batch of points for one aircraft in one flight session, with everything the
//! listener resolved from the authenticated key: the unit that travels from the
//! listener to the batcher over a bounded channel.
//!
//! A gateway's `end` of a flight session (protocol 1.1) travels the same way, as a
//! batch without points that [ends the session](TelemetryBatch::ends_session): it
//! shares the channel, the spool and the ack path of the batches, so that it is
//! acknowledged in the connection's `seq` order like them.

use std::time::Instant;

use uuid::Uuid;

use crate::ack::AckHandle;
use crate::point::Point;

/// Where a batch came from, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOrigin {
    /// A TCP (or TLS) connection; acked.
    Tcp,
    /// A UDP datagram; never acked.
    Udp,
    /// Replayed from the on-disk spool.
    Spool,
    /// An MQTT QoS 1 message; acknowledged (PUBACK) once durable.
    Mqtt,
    /// An MQTT QoS 0 message; never acknowledged, best effort like UDP.
    MqttBestEffort,
}

impl BatchOrigin {
    /// Label value for metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            BatchOrigin::Tcp => "tcp",
            BatchOrigin::Udp => "udp",
            BatchOrigin::Spool => "spool",
            BatchOrigin::Mqtt => "mqtt",
            BatchOrigin::MqttBestEffort => "mqtt_qos0",
        }
    }

    /// True for batches nobody waits for (UDP, MQTT QoS 0): they are dropped and counted
    /// rather than spooled or waited for when the daemon is saturated.
    pub const fn is_best_effort(self) -> bool {
        matches!(self, BatchOrigin::Udp | BatchOrigin::MqttBestEffort)
    }
}

/// Points of one aircraft in one flight session, already validated, with the
/// organization taken from the key (never from the frame).
#[derive(Debug)]
pub struct TelemetryBatch {
    /// The organization the authenticated key belongs to.
    pub org_id: Uuid,
    /// The aircraft, resolved within that organization.
    pub aircraft_id: Uuid,
    /// The flight session the points belong to.
    pub session_id: Uuid,
    /// The points, in the order the gateway sent them.
    pub points: Vec<Point>,
    /// Resolved when the batch is durable or rejected.
    pub ack: AckHandle,
    /// Where it came from.
    pub origin: BatchOrigin,
    /// When the listener received the frame (for ack latency).
    pub received_at: Instant,
    /// When the input had decoded and admitted it (key, aircraft, session, rate limit
    /// charged): the end of the `read` stage of `dbx_batch_stage_seconds`.
    pub admitted_at: Instant,
    /// When the input handed it to the batcher's channel (the end of the `send_wait`
    /// stage, the start of `queued`). Inputs that never wait for room set it with
    /// `admitted_at`; a TCP connection sets it again as it sends.
    pub queued_at: Instant,
    /// True for a gateway's `end`: no points; the batcher completes the session
    /// (`flight_status = 'completed'`) if it belongs to `org_id`. The batcher writes an
    /// end with or after every piece of its session it received before the end; a
    /// producer sends no later batch of that session before the end's own verdict, so
    /// that the end is written after the session's batches sent before it and before
    /// those sent after (other sessions need no such order).
    pub ends_session: bool,
}

impl TelemetryBatch {
    /// The `end` of `session` for the organization `org_id`. Its aircraft is the
    /// session's own (an `end` does not name one), so `aircraft_id` is nil.
    pub fn session_end(
        org_id: Uuid,
        session_id: Uuid,
        ack: AckHandle,
        origin: BatchOrigin,
        received_at: Instant,
    ) -> Self {
        TelemetryBatch {
            org_id,
            aircraft_id: Uuid::nil(),
            session_id,
            points: Vec::new(),
            ack,
            origin,
            received_at,
            admitted_at: received_at,
            queued_at: received_at,
            ends_session: true,
        }
    }

    /// Approximate encoded size, for byte-based flush thresholds and queue accounting.
    pub fn approx_copy_bytes(&self) -> usize {
        self.points.iter().map(Point::approx_copy_bytes).sum()
    }
}
