//! The MQTT input's internal events: messages refused and dropped, dead letters
//! published, the broker connection lost, its session lost, the subscription granted or
//! refused. Each is a small type whose [`InternalEvent::emit`] writes its log line and
//! moves its metrics together (see `dbx_core::metrics`), under the names and labels of
//! [`crate::metrics`]. Drops a publisher can cause at will log through a [`Throttle`].

use ::metrics::{counter, gauge};
use dbx_core::{InternalEvent, Rejection, Throttle};

use crate::metrics as m;

/// A message refused by the decoder, the admission checks or the batcher; a notice
/// goes to the dead-letter topic when one applies.
#[derive(Debug, Clone, Copy)]
pub struct MessageRefused<'a> {
    /// The message's topic.
    pub topic: &'a str,
    /// Why (its code is the `reason` label).
    pub rejection: &'a Rejection,
}

impl InternalEvent for MessageRefused<'_> {
    fn emit(self) {
        let r = self.rejection;
        counter!(m::MQTT_MESSAGES_REJECTED_TOTAL, "reason" => r.code.as_str()).increment(1);
        tracing::info!(topic = %self.topic, code = %r.code, index = ?r.index, "mqtt message refused: {}", r.msg);
    }
}

/// A message (or a notice) dropped without a verdict: QoS 0 is best effort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageDropped {
    /// The batcher's queue was full.
    Saturated,
    /// The byte budget (`limits.max_buffered_bytes`) was spent.
    Budget,
    /// Over its organization's rate limit (its points count in
    /// `dbx_rate_limit_drops_total`).
    RateLimited {
        /// Points it carried.
        points: usize,
    },
    /// The rejection notice of a QoS 0 message found the outbox full.
    DeadLetterOverflow,
}

impl MessageDropped {
    /// The `reason` label.
    fn reason(self) -> &'static str {
        match self {
            MessageDropped::Saturated => "saturated",
            MessageDropped::Budget => "budget",
            MessageDropped::RateLimited { .. } => "rate_limited",
            MessageDropped::DeadLetterOverflow => "dead_letter_overflow",
        }
    }
}

impl InternalEvent for MessageDropped {
    fn emit(self) {
        static LOG: Throttle = Throttle::new();
        let reason = self.reason();
        if let MessageDropped::RateLimited { points } = self {
            counter!(m::RATE_LIMIT_DROPS_TOTAL).increment(points as u64);
        }
        counter!(m::MQTT_DROPPED_TOTAL, "reason" => reason).increment(1);
        if let Some(n) = LOG.allow() {
            tracing::debug!(reason, suppressed = n, "mqtt QoS 0 message dropped");
        }
    }
}

/// A QoS 1 message had to wait for the byte budget (the input takes nothing meanwhile).
#[derive(Debug, Clone, Copy)]
pub struct BudgetExhausted;

impl InternalEvent for BudgetExhausted {
    fn emit(self) {
        // No `transport` label here, as this series has always been exported.
        counter!(m::BUFFERED_BYTES_WAITS_TOTAL).increment(1);
        tracing::trace!("byte budget spent; the mqtt input waits for room");
    }
}

/// A rejection notice handed to the client for the dead-letter topic.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetterPublished<'a> {
    /// The dead-letter topic.
    pub topic: &'a str,
}

impl InternalEvent for DeadLetterPublished<'_> {
    fn emit(self) {
        counter!(m::MQTT_DEAD_LETTERS_TOTAL).increment(1);
        tracing::trace!(topic = self.topic, "rejection notice published");
    }
}

/// Reconnected, and the broker no longer had this client's session: the QoS 1
/// messages it held for it are lost.
#[derive(Debug, Clone, Copy)]
pub struct BrokerSessionLost;

impl InternalEvent for BrokerSessionLost {
    fn emit(self) {
        counter!(m::MQTT_SESSIONS_LOST_TOTAL).increment(1);
        tracing::warn!("the broker had no session for this client any more; QoS 1 messages it held for it are lost (raise mqtt.session_expiry_secs or the broker's persistence)");
    }
}

/// The subscription was granted: messages flow.
#[derive(Debug, Clone, Copy)]
pub struct Subscribed<'a> {
    /// The topic filter.
    pub filter: &'a str,
}

impl InternalEvent for Subscribed<'_> {
    fn emit(self) {
        gauge!(m::MQTT_CONNECTED).set(1.0);
        tracing::info!(filter = %self.filter, "subscribed");
    }
}

/// The broker refused the subscription (its ACL).
#[derive(Debug, Clone, Copy)]
pub struct SubscriptionRefused<'a> {
    /// The topic filter.
    pub filter: &'a str,
    /// The broker's reason.
    pub reason: &'a str,
}

impl InternalEvent for SubscriptionRefused<'_> {
    fn emit(self) {
        gauge!(m::MQTT_CONNECTED).set(0.0);
        tracing::error!(filter = %self.filter, reason = %self.reason, "the broker refused the subscription (check its ACL for dbx's user)");
    }
}

/// The broker connection was lost or could not be made; the client reconnects.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLost<'a> {
    /// What happened.
    pub error: &'a str,
    /// What to fix, when the failure is a configuration matter (refused credentials,
    /// TLS): then it is an error, not a blip.
    pub hint: Option<&'a str>,
    /// QoS 1 messages not yet acknowledged (the broker redelivers them).
    pub in_flight: usize,
}

impl InternalEvent for ConnectionLost<'_> {
    fn emit(self) {
        gauge!(m::MQTT_CONNECTED).set(0.0);
        counter!(m::MQTT_RECONNECTS_TOTAL).increment(1);
        match self.hint {
            Some(h) => tracing::error!(error = %self.error, "mqtt connection failed: {h}"),
            None => {
                tracing::warn!(error = %self.error, in_flight = self.in_flight, "mqtt connection lost; reconnecting (unacknowledged messages will be redelivered)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbx_core::RejectCode;
    use dbx_testkit::capture_events;

    #[test]
    fn a_rate_limited_message_counts_its_points_and_the_drop_and_says_so() {
        let ((), got) = capture_events(|| MessageDropped::RateLimited { points: 30 }.emit());
        assert_eq!(got.counter(m::RATE_LIMIT_DROPS_TOTAL, &[]), 30);
        assert_eq!(
            got.counter(m::MQTT_DROPPED_TOTAL, &[("reason", "rate_limited")]),
            1
        );
        let lines = got.lines_with("mqtt QoS 0 message dropped");
        assert_eq!(lines.len(), 1, "{}", got.log());
        assert!(lines[0].contains("reason=\"rate_limited\""), "{}", lines[0]);
    }

    #[test]
    fn a_refused_message_counts_its_code_and_logs_the_topic_and_why() {
        let r = Rejection::at(RejectCode::InvalidPoint, 3, "lat out of range");
        let ((), got) = capture_events(|| {
            MessageRefused {
                topic: "dbx/acme/N123/telemetry",
                rejection: &r,
            }
            .emit()
        });
        assert_eq!(
            got.counter(
                m::MQTT_MESSAGES_REJECTED_TOTAL,
                &[("reason", RejectCode::InvalidPoint.as_str())]
            ),
            1
        );
        let lines = got.lines_with("mqtt message refused: lat out of range");
        assert_eq!(lines.len(), 1, "{}", got.log());
        assert!(lines[0].contains("dbx/acme/N123/telemetry") && lines[0].contains("INFO"));
    }

    #[test]
    fn a_lost_connection_clears_the_gauge_counts_a_reconnect_and_warns() {
        let ((), got) = capture_events(|| {
            ConnectionLost {
                error: "connection reset",
                hint: None,
                in_flight: 4,
            }
            .emit()
        });
        assert_eq!(got.gauge(m::MQTT_CONNECTED, &[]), Some(0.0));
        assert_eq!(got.counter(m::MQTT_RECONNECTS_TOTAL, &[]), 1);
        let lines = got.lines_with("mqtt connection lost; reconnecting");
        assert_eq!(lines.len(), 1, "{}", got.log());
        assert!(lines[0].contains("WARN") && lines[0].contains("in_flight=4"));
    }
}
