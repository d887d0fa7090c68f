//! The fleet over MQTT: each gateway is one MQTT 5 client publishing its aircraft's
//! batches as QoS 1 messages on their own topics (`dbx/<org_code>/<registration>/telemetry`
//! by default), the payload the same `batch` map dbx reads over TCP (without `aircraft`:
//! the topic names it). Up to `window` messages are unacknowledged by the broker at a
//! time; "acked" here means the broker took the message (its PUBACK), which says nothing
//! about dbx: dbx's own PUBACKs go to the broker, and its `dbx_mqtt_ack_latency_seconds`
//! histogram measures them. The session is persistent, so messages the broker did not
//! acknowledge are resent after a reconnect.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dbx_core::sync::lock;
use dbx_core::Shutdown;
use dbx_proto::EncodeOptions;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};

use super::{Generator, LoadgenConfig, Pacer, Stats};

use crate::sim::FlightSim;

/// Where and as whom the MQTT fleet publishes.
#[derive(Debug, Clone)]
pub struct MqttTarget {
    /// The broker's host name or IP address (parsed from `mqtt://host:port` by the
    /// caller: the daemon's MQTT input owns that syntax).
    pub host: String,
    /// The broker's port.
    pub port: u16,
    /// `mqtts://`: TLS to the broker, trusting `LoadgenConfig::tls`'s CA file.
    pub tls: bool,
    /// User name at the broker (empty = none).
    pub username: String,
    /// Password at the broker.
    pub password: String,
    /// The organization's code, for the topic.
    pub org_code: String,
    /// Topic pattern with `{org_code}` and `{aircraft}`.
    pub topic: String,
}

/// Publishes that went out and wait for the broker's PUBACK, by packet id, and those
/// queued but not yet written (in order).
#[derive(Default)]
struct Outstanding {
    queued: VecDeque<(Instant, u64)>,
    sent: HashMap<u16, (Instant, u64)>,
}

fn fatal(stats: &Stats, msg: String) {
    let mut f = lock(&stats.fatal);
    if f.is_none() {
        *f = Some(msg);
    }
}

fn options(
    config: &LoadgenConfig,
    target: &MqttTarget,
    index: usize,
) -> Result<MqttOptions, String> {
    let id = format!("dbx-loadgen-{index}-{:08x}", rand::random::<u32>());
    let mut o = MqttOptions::new(id, target.host.clone(), target.port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_start(false)
        .set_session_expiry_interval(Some(600))
        .set_outgoing_inflight_upper_limit(config.window.clamp(1, 65_535) as u16)
        .set_max_packet_size(Some(64 << 20));
    if !target.username.is_empty() {
        o.set_credentials(target.username.clone(), target.password.clone());
    }
    if target.tls {
        let ca = config
            .tls
            .as_ref()
            .map(|(_, ca)| ca.clone())
            .ok_or("an mqtts:// broker needs --tls-ca")?;
        let tls = crate::tls::client_config(&ca).map_err(|e| format!("--tls-ca {e}"))?;
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    }
    Ok(o)
}

/// Drives the client: matches PUBACKs to publishes for the stats; reconnects on errors.
async fn events(
    mut el: EventLoop,
    out: Arc<Mutex<Outstanding>>,
    stats: Arc<Stats>,
    acked: Arc<AtomicU64>,
) {
    loop {
        match el.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let mut o = lock(&out);
                // A resend after a reconnect keeps its first send time.
                if !o.sent.contains_key(&pkid) {
                    if let Some(q) = o.queued.pop_front() {
                        o.sent.insert(pkid, q);
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(a))) => {
                if let Some((at, n)) = lock(&out).sent.remove(&a.pkid) {
                    stats.record_latency(at.elapsed());
                    stats.acked.fetch_add(n, Ordering::Relaxed);
                    acked.fetch_add(n, Ordering::Relaxed);
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(rumqttc::v5::ConnectionError::RequestsDone) => return,
            Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                fatal(
                    &stats,
                    format!("the broker refused the connection: {code:?}"),
                );
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "loadgen mqtt connection lost; reconnecting");
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// One MQTT gateway until its share is published and acknowledged by the broker.
pub(super) async fn gateway(
    config: Arc<LoadgenConfig>,
    index: usize,
    aircraft: Vec<FlightSim>,
    quota: Option<u64>,
    stats: Arc<Stats>,
    mut stop: Shutdown,
) {
    let Some(target) = config.mqtt.clone() else {
        return fatal(&stats, "--transport mqtt needs --broker".into());
    };
    let opts = match options(&config, &target, index) {
        Ok(o) => o,
        Err(e) => return fatal(&stats, e),
    };
    let (client, el) = AsyncClient::new(opts, config.window.max(1));
    let out = Arc::new(Mutex::new(Outstanding::default()));
    let acked = Arc::new(AtomicU64::new(0));
    let driver = tokio::spawn(events(el, out.clone(), stats.clone(), acked.clone()));
    let mut generator = Generator::new(aircraft, &config, quota, config.batch_points.max(1));
    let mut pacer = Pacer::new(config.rate, config.gateways);
    let opts = EncodeOptions::from(config.form);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut sent = 0u64;
    let mut seq = 0u64;
    while lock(&stats.fatal).is_none() && !stop.is_shutdown() {
        let Some(batch) = super::next_paced(&mut pacer, &mut generator, &mut stop).await else {
            break;
        };
        seq += 1;
        buf.clear();
        if let Err(e) =
            dbx_proto::encode_batch_payload(&mut buf, Some(seq), batch.session, &batch.points, opts)
        {
            return fatal(&stats, format!("cannot encode a batch: {e}"));
        }
        let n = batch.points.len() as u64;
        let topic = target
            .topic
            .replace("{org_code}", &target.org_code)
            .replace("{aircraft}", &batch.aircraft);
        lock(&out).queued.push_back((Instant::now(), n));
        if client
            .publish(topic, QoS::AtLeastOnce, false, buf.to_vec())
            .await
            .is_err()
        {
            break;
        }
        sent += n;
        stats.sent.fetch_add(n, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        pacer.sent(batch.points.len());
    }
    // Wait (bounded) for the broker to take everything, then leave.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Relaxed) < sent && Instant::now() < deadline && !driver.is_finished()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
}
