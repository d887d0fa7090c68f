//! # dbx-mqtt
//!
//! The MQTT input: dbx as a subscriber of the fleet's existing broker. Messages on
//! `dbx/{org_code}/{aircraft}/telemetry` (configurable) carrying the docs/protocol.md `batch`
//! map, in MessagePack or JSON, become the same [`dbx_core::TelemetryBatch`]es the TCP
//! listener produces, on the same bounded channel; the batcher learns nothing about MQTT.
//!
//! Delivery: a QoS 1 message is acknowledged (PUBACK) only once the batcher says its
//! points are durable; the session is persistent (clean start off, a session expiry), so
//! what was not acknowledged when dbx stopped or crashed is redelivered, and the
//! `(session, seq)` dedupe of points stores it once. A refused message is acknowledged and
//! its reason published to a dead-letter topic. QoS 0 is best effort.
//!
//! Tenancy: the organization is the topic's org code, never the payload's. Who may publish
//! under which org code is the broker's ACL: dbx trusts the broker for that
//! (deploy/mosquitto/ ships a configuration that enforces it).
//!
//! Dependencies: the organization/aircraft/session checks and the rate limiter are the
//! TCP listener's ([`dbx_listener::AuthCache`], [`dbx_listener::admit`],
//! [`dbx_listener::RateLimiter`]), shared rather than copied; the listener knows nothing
//! of this crate.
//!
//! - [`config`]: the `[mqtt]` section.
//! - [`topic`]: topic patterns and dead-letter topics.
//! - [`metrics`] / [`events`]: metric names and HELP; the events that log and count together.
//! - `client`: the rumqttc client and the task driving its event loop.
//! - `input`: messages → batches, verdicts → PUBACKs, in order, bounded.
//! - `notice`: rejection notices.

pub mod config;
pub mod events;
pub mod metrics;
pub mod topic;

mod client;
mod input;
mod notice;
mod tls;

use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::mpsc;

use dbx_core::{Shutdown, TelemetryBatch};
use dbx_listener::{AuthCache, ByteBudget, RateLimiter};
use dbx_proto::Limits;

pub use config::{BrokerAddr, ConfigError, MqttConfig};

/// The MQTT input, connected (or connecting) and ready to run.
pub struct MqttInput {
    processor: input::Processor,
    pump: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for MqttInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttInput")
            .field("subscription", &self.processor.settings.subscription)
            .finish()
    }
}

/// What the input shares with the rest of the daemon.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Organizations (by code), aircraft and session owners.
    pub auth: Arc<AuthCache>,
    /// The per-organization rate limiter the listener uses too.
    pub limiter: Arc<RateLimiter>,
    /// The batcher's queue.
    pub batches: mpsc::Sender<TelemetryBatch>,
    /// The protocol limits (the listener's: payloads obey the same).
    pub limits: Limits,
    /// Register unknown registrations for the topic's organization.
    pub auto_register_aircraft: bool,
    /// Per-organization metrics (the listener's: one label policy for every input).
    pub org_metrics: Arc<dbx_listener::OrgMetrics>,
    /// The listener's byte budget (`limits.max_buffered_bytes`): a message is charged
    /// from before it is decoded until the batcher has resolved it.
    pub budget: ByteBudget,
}

impl MqttInput {
    /// Validates the config and starts connecting in the background (a broker that is
    /// down is retried with backoff; the daemon does not wait for it).
    pub fn start(cfg: &MqttConfig, shared: Shared) -> Result<MqttInput, ConfigError> {
        cfg.validate()?;
        let (client, eventloop) = client::connect_options(cfg, shared.limits.max_frame_bytes)?;
        let settings = Arc::new(input::Settings {
            pattern: cfg.topic_pattern()?,
            dead_letter: cfg.dead_letter()?,
            subscription: cfg.subscription()?,
            qos: if cfg.qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            limits: shared.limits,
            auto_register: shared.auto_register_aircraft,
            client_id: cfg.client_id(),
            max_in_flight: usize::from(cfg.max_in_flight),
            drain: Duration::from_millis(cfg.drain_timeout_ms),
        });
        let (tx, rx) = mpsc::channel(64);
        let backoff = client::Backoff {
            initial: Duration::from_millis(cfg.reconnect_initial_ms),
            max: Duration::from_millis(cfg.reconnect_max_ms.max(cfg.reconnect_initial_ms)),
        };
        let leaving = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pump = tokio::spawn(client::pump(eventloop, tx, backoff, leaving.clone()));
        tracing::info!(broker = %cfg.url, client_id = %settings.client_id, filter = %settings.subscription, "mqtt input starting");
        Ok(MqttInput {
            processor: input::Processor::new(settings, shared, client, rx, leaving),
            pump,
        })
    }

    /// Runs until `shutdown`, then drains (see the crate doc) and disconnects. Its
    /// clone of the batch sender is dropped on return.
    pub async fn run(self, shutdown: Shutdown) {
        self.processor.run(shutdown).await;
        // The pump ends once the DISCONNECT is out or the client is gone.
        if tokio::time::timeout(Duration::from_secs(5), self.pump)
            .await
            .is_err()
        {
            tracing::warn!("the mqtt client did not finish disconnecting in 5 s");
        }
    }
}
