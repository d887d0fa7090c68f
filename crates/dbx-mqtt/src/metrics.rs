//! The MQTT input's metrics (`dbx_mqtt_*`). Its points, frames and rate-limit waits are
//! counted under the listener's names, re-exported here so this input uses one module.
//!
//! Each crate owns its metrics in a `metrics.rs` like this one: the names, with what they
//! count, and their HELP text, registered by [`describe`] (the binary calls each crate's
//! once, after installing the exporter). Conventions: `dbx_` prefix, base units, `_total`
//! for counters, label sets bounded (`reason`, `transport`, `trigger`, `kind`, `schema`,
//! `table`, and `org` capped by `metrics.max_org_labels`). Names never change: the
//! dashboard and the alerts in deploy/ depend on them (tests/ops checks every name they
//! use against these files).
//!
//! Below the names: the per-message series (received, acknowledged, points), which log
//! nothing, and the setters of the gauges describing state. Everything logged as well as
//! counted (refusals, drops, dead letters, connection losses) is an event of
//! [`crate::events`].

use std::time::Duration;

use ::metrics::{
    counter, describe_counter as c, describe_gauge as g, describe_histogram as h, gauge, histogram,
    Unit,
};

pub use dbx_core::metrics::MQTT_DROPPED_TOTAL;
pub use dbx_listener::metrics::{
    rate_limit_wait, BUFFERED_BYTES_WAITS_TOTAL, FRAMES_RECEIVED_TOTAL, POINTS_RECEIVED_TOTAL,
    RATE_LIMIT_DROPS_TOTAL, RATE_LIMIT_WAIT_SECONDS,
};

/// Messages received from the broker (counter, label `kind` = qos0 | qos1).
pub const MQTT_MESSAGES_RECEIVED_TOTAL: &str = "dbx_mqtt_messages_received_total";

/// QoS 1 messages acknowledged (PUBACK sent after the batcher's verdict) (counter).
pub const MQTT_MESSAGES_ACKED_TOTAL: &str = "dbx_mqtt_messages_acked_total";

/// Messages rejected, by the decoder or the batcher (counter, label `reason` =
/// protocol code).
pub const MQTT_MESSAGES_REJECTED_TOTAL: &str = "dbx_mqtt_messages_rejected_total";

/// Rejection notices published to the dead-letter topic (counter).
pub const MQTT_DEAD_LETTERS_TOTAL: &str = "dbx_mqtt_dead_letters_published_total";

/// QoS 1 messages received and not yet acknowledged (gauge).
pub const MQTT_IN_FLIGHT: &str = "dbx_mqtt_in_flight_messages";

/// 1 while connected to the broker and subscribed, else 0 (gauge).
pub const MQTT_CONNECTED: &str = "dbx_mqtt_connected";

/// Lost or failed broker connections (counter; each is followed by a reconnect).
pub const MQTT_RECONNECTS_TOTAL: &str = "dbx_mqtt_reconnects_total";

/// Reconnects on which the broker had no session for us any more (counter; QoS 1
/// messages it held for us were lost at the broker).
pub const MQTT_SESSIONS_LOST_TOTAL: &str = "dbx_mqtt_sessions_lost_total";

/// Messages the broker delivered again (DUP flag) (counter).
pub const MQTT_REDELIVERED_TOTAL: &str = "dbx_mqtt_redelivered_total";

/// Message received → PUBACK handed to the client (histogram, seconds).
pub const MQTT_ACK_LATENCY_SECONDS: &str = "dbx_mqtt_ack_latency_seconds";

/// Registers the HELP text of every metric above; call once, after installing the
/// recorder.
pub fn describe() {
    c!(
        MQTT_MESSAGES_RECEIVED_TOTAL,
        "MQTT messages received from the broker, by kind (qos0, qos1)."
    );
    c!(MQTT_MESSAGES_ACKED_TOTAL, "MQTT QoS 1 messages acknowledged (PUBACK after the points were durable, or after a rejection notice).");
    c!(
        MQTT_MESSAGES_REJECTED_TOTAL,
        "MQTT messages refused by the decoder or the batcher, by protocol code."
    );
    c!(
        MQTT_DEAD_LETTERS_TOTAL,
        "Rejection notices published to the MQTT dead-letter topic."
    );
    c!(
        MQTT_DROPPED_TOTAL,
        "MQTT QoS 0 messages (and notices) dropped without a verdict, by reason."
    );
    g!(
        MQTT_IN_FLIGHT,
        "MQTT QoS 1 messages received and not yet acknowledged."
    );
    g!(
        MQTT_CONNECTED,
        "1 while connected to the MQTT broker and subscribed, else 0."
    );
    c!(
        MQTT_RECONNECTS_TOTAL,
        "Lost or failed MQTT broker connections (each followed by a reconnect)."
    );
    c!(
        MQTT_SESSIONS_LOST_TOTAL,
        "Reconnects on which the broker no longer had dbx's session (messages it held were lost)."
    );
    c!(
        MQTT_REDELIVERED_TOTAL,
        "MQTT messages the broker delivered again (DUP flag)."
    );
    h!(
        MQTT_ACK_LATENCY_SECONDS,
        Unit::Seconds,
        "MQTT message received to PUBACK handed to the client."
    );
}

/// A message from the broker: `dbx_mqtt_messages_received_total{kind}`,
/// `dbx_frames_received_total{transport="mqtt"}`, and `dbx_mqtt_redelivered_total` when
/// the broker sent it again.
pub fn message_received(qos1: bool, redelivered: bool) {
    counter!(MQTT_MESSAGES_RECEIVED_TOTAL, "kind" => if qos1 { "qos1" } else { "qos0" })
        .increment(1);
    counter!(FRAMES_RECEIVED_TOTAL, "transport" => "mqtt").increment(1);
    if redelivered {
        counter!(MQTT_REDELIVERED_TOTAL).increment(1);
    }
}

/// `dbx_points_received_total{transport="mqtt"}`.
pub fn points_received(points: usize) {
    counter!(POINTS_RECEIVED_TOTAL, "transport" => "mqtt").increment(points as u64);
}

/// A QoS 1 message acknowledged `latency` after it arrived.
pub fn message_acked(latency: Duration) {
    histogram!(MQTT_ACK_LATENCY_SECONDS).record(latency.as_secs_f64());
    counter!(MQTT_MESSAGES_ACKED_TOTAL).increment(1);
}

/// `dbx_mqtt_in_flight_messages`.
pub fn in_flight(messages: usize) {
    gauge!(MQTT_IN_FLIGHT).set(messages as f64);
}

/// `dbx_mqtt_connected` 0 (the input stopped).
pub fn disconnected() {
    gauge!(MQTT_CONNECTED).set(0.0);
}
