//! The connection to the broker: rumqttc's MQTT 5 client set up for a persistent
//! session with manual acknowledgements, and the pump task that drives its event loop.
//!
//! The pump owns the [`EventLoop`] and never stops polling it except in one place: when
//! the connection is lost, it tells the input and waits for the input's answer before
//! reconnecting. The input uses that pause to stop acknowledging the messages of the
//! lost connection, and the pump then drops any acknowledgement still queued
//! ([`EventLoop::clean`]): the broker redelivers those messages on the new connection
//! under the same packet ids, so an acknowledgement from before must never reach the
//! broker after the reconnect, where it could free a packet id the broker has already
//! given to another message. Everything else the input does goes through the client's
//! bounded request channel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use tokio::sync::{mpsc, oneshot};

use crate::config::{ConfigError, MqttConfig};

/// What the pump tells the input, in the order it happened on the wire.
#[derive(Debug)]
pub(crate) enum PumpEvent {
    /// CONNACK: connected; `session_present` says whether the broker kept our session.
    Connected {
        /// The broker resumed the session (subscription and unacknowledged messages).
        session_present: bool,
    },
    /// SUBACK for our subscription.
    Subscribed(Result<(), String>),
    /// A message.
    Message(Publish),
    /// The connection failed or was lost; reply once the messages received so far will
    /// no longer be acknowledged (the pump reconnects after the reply).
    Lost {
        /// Why, for the log.
        error: String,
        /// A hint for errors an operator must fix (credentials, ACL, client id clash).
        hint: Option<&'static str>,
        /// Answer to let the pump reconnect.
        reply: oneshot::Sender<()>,
    },
}

/// Reconnect pacing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
}

/// Builds the client and its event loop from the config: persistent session, manual
/// acks, receive maximum, maximum packet size, credentials and TLS.
pub(crate) fn connect_options(
    cfg: &MqttConfig,
    max_payload_bytes: usize,
) -> Result<(AsyncClient, EventLoop), ConfigError> {
    let broker = cfg.broker()?;
    let mut o = MqttOptions::new(cfg.client_id(), broker.host.clone(), broker.port);
    o.set_keep_alive(cfg.keep_alive())
        .set_clean_start(false)
        .set_session_expiry_interval(Some(cfg.session_expiry_secs))
        .set_receive_maximum(Some(cfg.max_in_flight))
        // Room for the topic and properties beside the largest payload we decode (and one
        // twice as large, so that an oversized payload still arrives and is dead-lettered
        // with `frame_too_large` rather than silently dropped by the broker).
        .set_max_packet_size(Some(packet_limit(max_payload_bytes)))
        .set_manual_acks(true)
        .set_connection_timeout(cfg.connect_timeout_secs)
        // Only rejection notices are published: a small window is plenty.
        .set_outgoing_inflight_upper_limit(32);
    if !cfg.username.is_empty() {
        o.set_credentials(cfg.username.clone(), cfg.password()?);
    }
    if broker.tls {
        let tls = crate::tls::client_config(cfg)?;
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    }
    // Every request the input makes is bounded by the messages in flight (one ack and at
    // most one notice each) plus a few subscribes; the input keeps its own queue beyond.
    let cap = 2 * usize::from(cfg.max_in_flight) + 64;
    Ok(AsyncClient::new(o, cap))
}

/// The MQTT Maximum Packet Size announced for payloads up to `max_payload` bytes.
pub(crate) fn packet_limit(max_payload: usize) -> u32 {
    u32::try_from(max_payload.saturating_mul(2).saturating_add(64 * 1024)).unwrap_or(u32::MAX)
}

/// Drives the event loop until the client is gone or the DISCONNECT the input asked for
/// (`leaving`) went out, forwarding what the input needs. Never returns while the input
/// still listens and the client lives.
pub(crate) async fn pump(
    mut el: EventLoop,
    tx: mpsc::Sender<PumpEvent>,
    backoff: Backoff,
    leaving: Arc<AtomicBool>,
) {
    let mut delay = backoff.initial;
    loop {
        let event = match el.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => PumpEvent::Message(p),
            Ok(Event::Incoming(Packet::ConnAck(c))) => {
                delay = backoff.initial;
                PumpEvent::Connected {
                    session_present: c.session_present,
                }
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                PumpEvent::Subscribed(suback(&s.return_codes))
            }
            // Sent and flushed: the session stays with the broker for its expiry. (A
            // DISCONNECT rumqttc sends on its own, for a protocol error, ends the
            // connection; the next poll reports it and reconnects.)
            Ok(Event::Outgoing(Outgoing::Disconnect)) if leaving.load(Ordering::Acquire) => return,
            Ok(_) => continue,
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                let (reply, answered) = oneshot::channel();
                let lost = PumpEvent::Lost {
                    hint: hint(&e),
                    error: e.to_string(),
                    reply,
                };
                if tx.send(lost).await.is_err() || answered.await.is_err() {
                    return;
                }
                // Acks queued while the input learnt of the loss must not reach the new
                // connection (see the module doc).
                el.clean();
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(backoff.max);
                continue;
            }
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

fn suback(codes: &[SubscribeReasonCode]) -> Result<(), String> {
    match codes
        .iter()
        .find(|c| !matches!(c, SubscribeReasonCode::Success(_)))
    {
        None => Ok(()),
        Some(c) => Err(format!("{c:?}")),
    }
}

/// What an operator should look at for errors that retrying will not fix.
fn hint(e: &ConnectionError) -> Option<&'static str> {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as C, DisconnectReasonCode as D};
    use rumqttc::v5::StateError;
    match e {
        ConnectionError::ConnectionRefused(C::BadUserNamePassword | C::NotAuthorized) => {
            Some("the broker refused the credentials: check mqtt.username and the password")
        }
        ConnectionError::ConnectionRefused(C::ClientIdentifierNotValid) => {
            Some("the broker refused the client id: check mqtt.client_id")
        }
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: D::SessionTakenOver,
            ..
        }) => Some(
            "another client connected with the same client id; every daemon needs its own mqtt.client_id",
        ),
        ConnectionError::Tls(_) => {
            Some("TLS to the broker failed: check mqtt.url's host name and mqtt.ca_file")
        }
        _ => None,
    }
}
