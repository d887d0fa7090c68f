//! The input task: messages in, batches to the batcher, PUBACKs back once durable.
//!
//! Each QoS 1 message is decoded, its organization found from the topic's org code, its
//! aircraft and session admitted like any TCP batch ([`dbx_listener::admit`]), and the
//! batch handed to the batcher with an [`AckHandle`]. The message then waits in a FIFO in
//! arrival order; the front is acknowledged when the batcher says it is durable (MQTT
//! requires PUBACKs in the order the PUBLISHes arrived). A message refused by the decoder
//! or the batcher is acknowledged too, after its rejection notice was queued on the same
//! connection (see [`crate::notice`]). QoS 0 messages are best effort: nobody waits for
//! them, and they are dropped and counted when the batcher's queue is full.
//!
//! Bounds: the broker sends at most `max_in_flight` unacknowledged QoS 1 messages (the
//! Receive Maximum); when the batcher is behind, verdicts stop, acknowledgements stop, and
//! so does the broker. As a guard against a broker that ignores the limit, the input stops
//! taking messages from the pump at twice that many, and the pump stops reading. Memory
//! is bounded in bytes too: each message is charged against the listener's byte budget
//! (`limits.max_buffered_bytes`) before it is decoded, until the batcher resolves it; a
//! QoS 1 message waits for room (and with it every later message), a QoS 0 message
//! that finds none is dropped (`dbx_mqtt_dropped_total{reason="budget"}`).
//!
//! When the connection is lost, the messages still in the FIFO are no longer
//! acknowledged: the broker redelivers them on the new connection, they are processed
//! again, and the table's `(session, seq)` dedupe stores each point once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Filter, Publish, PublishProperties, RetainForwardRule};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::metrics as m;
use dbx_core::{
    AckHandle, AckReceiver, BatchOrigin, BatchOutcome, InternalEvent, RejectCode, Rejection,
    Shutdown, TelemetryBatch,
};
use dbx_listener::budget::Charge;
use dbx_listener::{AuthCache, ByteBudget, OrgCounters, OrgMetrics, RateLimiter};
use dbx_proto::Limits;

use crate::client::PumpEvent;
use crate::events::{
    BrokerSessionLost, BudgetExhausted, ConnectionLost, DeadLetterPublished, MessageDropped,
    MessageRefused, Subscribed, SubscriptionRefused,
};
use crate::notice::{self, About};
use crate::topic::{DeadLetterTopic, TopicParts, TopicPattern};

/// What the input needs besides its channels.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) pattern: TopicPattern,
    pub(crate) dead_letter: Option<DeadLetterTopic>,
    pub(crate) subscription: String,
    pub(crate) qos: QoS,
    pub(crate) limits: Limits,
    pub(crate) auto_register: bool,
    pub(crate) client_id: String,
    pub(crate) max_in_flight: usize,
    pub(crate) drain: Duration,
}

/// A QoS 1 message waiting for its verdict.
#[derive(Debug)]
struct InFlight {
    pkid: u16,
    /// The connection it arrived on; only the current one's messages are acknowledged.
    generation: u64,
    verdict: Verdict,
    received_at: Instant,
    about: About,
}

#[derive(Debug)]
enum Verdict {
    Waiting(AckReceiver),
    Known(BatchOutcome),
}

/// A request for the broker, queued in order until the client's channel takes it.
#[derive(Debug, Clone)]
enum Outgoing {
    Subscribe,
    Ack(u16),
    Notice { topic: String, payload: Vec<u8> },
}

/// Why a message was not admitted.
#[derive(Debug)]
enum Refusal {
    /// Refused: counted, logged, noticed, acknowledged.
    Rejected(Box<(About, Rejection)>),
    /// A QoS 0 message dropped for load (already counted).
    Dropped,
}

/// Why the input stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    Drained,
    DrainTimeout,
    BatcherGone,
    PumpGone,
}

/// The input's state, owned by its one task.
pub(crate) struct Processor {
    pub(crate) settings: Arc<Settings>,
    pub(crate) auth: Arc<AuthCache>,
    pub(crate) limiter: Arc<RateLimiter>,
    pub(crate) batches: mpsc::Sender<TelemetryBatch>,
    pub(crate) org_metrics: Arc<OrgMetrics>,
    pub(crate) budget: ByteBudget,
    pub(crate) client: AsyncClient,
    pub(crate) events: mpsc::Receiver<PumpEvent>,
    /// Set before the DISCONNECT at the end, so that the pump knows it was ours.
    pub(crate) leaving: Arc<std::sync::atomic::AtomicBool>,
    fifo: VecDeque<InFlight>,
    parked: VecDeque<TelemetryBatch>,
    outbox: VecDeque<Outgoing>,
    generation: u64,
    connected_once: bool,
    paused_until: Option<tokio::time::Instant>,
}

/// Resolves when the front entry's verdict is known (`None`: the batcher dropped it).
/// Cancel-safe: nothing is removed until the caller pops it.
async fn front_outcome(fifo: &mut VecDeque<InFlight>) -> Option<BatchOutcome> {
    let front = fifo.front_mut()?;
    match &mut front.verdict {
        Verdict::Known(o) => Some(o.clone()),
        Verdict::Waiting(rx) => rx.await.ok(),
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Processor {
    pub(crate) fn new(
        settings: Arc<Settings>,
        shared: crate::Shared,
        client: AsyncClient,
        events: mpsc::Receiver<PumpEvent>,
        leaving: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        Processor {
            settings,
            auth: shared.auth,
            limiter: shared.limiter,
            batches: shared.batches,
            org_metrics: shared.org_metrics,
            budget: shared.budget,
            client,
            events,
            leaving,
            fifo: VecDeque::new(),
            parked: VecDeque::new(),
            outbox: VecDeque::new(),
            generation: 0,
            connected_once: false,
            paused_until: None,
        }
    }

    /// Runs until shutdown, then drains: takes no new message, waits (bounded) for the
    /// verdicts on those in flight and acknowledges them, and disconnects, leaving the
    /// session (and whatever is still unacknowledged) with the broker.
    pub(crate) async fn run(mut self, mut shutdown: Shutdown) {
        let mut drain_until: Option<tokio::time::Instant> = None;
        let batches = self.batches.clone();
        let stop = loop {
            self.flush_outbox();
            m::in_flight(self.fifo.len());
            if drain_until.is_some() && self.fifo.is_empty() && self.parked.is_empty() {
                break Stop::Drained;
            }
            let now = tokio::time::Instant::now();
            let paused = self.paused_until.is_some_and(|t| t > now);
            let can_take = drain_until.is_some()
                || (!paused && self.fifo.len() < 2 * self.settings.max_in_flight);
            let retry_outbox = (!self.outbox.is_empty()).then(|| now + Duration::from_millis(10));
            tokio::select! {
                biased;
                outcome = front_outcome(&mut self.fifo), if !self.fifo.is_empty() => {
                    if !self.settle(outcome) {
                        break Stop::BatcherGone;
                    }
                }
                permit = batches.reserve(), if !self.parked.is_empty() => match permit {
                    Ok(p) => p.send(self.parked.pop_front().expect("parked batch")),
                    Err(_) => break Stop::BatcherGone,
                },
                _ = shutdown.recv(), if drain_until.is_none() => {
                    tracing::info!(in_flight = self.fifo.len(), "mqtt input draining");
                    drain_until = Some(now + self.settings.drain);
                }
                ev = self.events.recv(), if can_take => match ev {
                    Some(ev) => self.on_event(ev, drain_until.is_some()).await,
                    None => break Stop::PumpGone,
                },
                _ = sleep_until(drain_until), if drain_until.is_some() => break Stop::DrainTimeout,
                _ = sleep_until(retry_outbox), if retry_outbox.is_some() => {}
                _ = sleep_until(self.paused_until), if paused => self.paused_until = None,
            }
        };
        self.finish(stop).await;
    }

    /// Leaves the broker: queued acknowledgements out, then DISCONNECT (the session and
    /// anything unacknowledged stay with the broker for `session_expiry_secs`).
    async fn finish(mut self, stop: Stop) {
        match stop {
            Stop::Drained => {}
            Stop::DrainTimeout => tracing::warn!(
                unanswered = self.fifo.len(),
                "mqtt drain deadline passed; the broker redelivers the unacknowledged messages on the next start"
            ),
            Stop::BatcherGone => tracing::error!("the batcher stopped; mqtt input leaving without acknowledging what is in flight"),
            Stop::PumpGone => tracing::error!("the mqtt client stopped"),
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        self.outbox.retain(|o| !matches!(o, Outgoing::Subscribe));
        while !self.outbox.is_empty() && tokio::time::Instant::now() < deadline {
            self.flush_outbox();
            // Keep the pump moving (it may be waiting to hand over an event).
            let _ = tokio::time::timeout(Duration::from_millis(10), self.events.recv()).await;
        }
        self.leaving
            .store(true, std::sync::atomic::Ordering::Release);
        let _ = self.client.try_disconnect();
        // Until the pump has sent the DISCONNECT (it then drops its sender).
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            if let PumpEvent::Lost { reply, .. } = ev {
                drop(reply);
                break;
            }
        }
        m::disconnected();
        m::in_flight(0);
        tracing::info!("mqtt input stopped");
    }

    /// Hands queued requests to the client while its channel has room, in order.
    fn flush_outbox(&mut self) {
        while let Some(o) = self.outbox.front() {
            let sent = match o {
                Outgoing::Subscribe => {
                    let mut f = Filter::new(self.settings.subscription.clone(), self.settings.qos);
                    f.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
                    self.client.try_subscribe_many([f])
                }
                Outgoing::Ack(pkid) => {
                    let mut p = Publish::new("", QoS::AtLeastOnce, Vec::new(), None);
                    p.pkid = *pkid;
                    self.client.try_ack(&p)
                }
                Outgoing::Notice { topic, payload } => {
                    let props = PublishProperties {
                        content_type: Some("application/json".into()),
                        payload_format_indicator: Some(1),
                        ..PublishProperties::default()
                    };
                    self.client.try_publish_with_properties(
                        topic.clone(),
                        QoS::AtLeastOnce,
                        false,
                        payload.clone(),
                        props,
                    )
                }
            };
            if sent.is_err() {
                return;
            }
            if let Some(Outgoing::Notice { topic, .. }) = self.outbox.pop_front() {
                DeadLetterPublished { topic: &topic }.emit();
            }
        }
    }

    async fn on_event(&mut self, ev: PumpEvent, draining: bool) {
        match ev {
            PumpEvent::Message(p) if draining => {
                // Not acknowledged: the broker redelivers it after the restart.
                tracing::trace!(pkid = p.pkid, "message left to the broker while draining");
            }
            PumpEvent::Message(p) => self.on_message(p).await,
            PumpEvent::Connected { session_present } => {
                if !session_present && self.connected_once {
                    BrokerSessionLost.emit();
                }
                tracing::info!(session_present, "connected to the mqtt broker");
                self.connected_once = true;
                // Always (re)subscribe: a resumed session keeps it, a new one needs it, and
                // a changed topic in the config takes effect.
                self.outbox.push_front(Outgoing::Subscribe);
            }
            PumpEvent::Subscribed(Ok(())) => {
                Subscribed {
                    filter: &self.settings.subscription,
                }
                .emit();
            }
            PumpEvent::Subscribed(Err(reason)) => {
                SubscriptionRefused {
                    filter: &self.settings.subscription,
                    reason: &reason,
                }
                .emit();
            }
            PumpEvent::Lost { error, hint, reply } => {
                self.generation += 1;
                self.outbox.retain(|o| !matches!(o, Outgoing::Ack(_)));
                ConnectionLost {
                    error: &error,
                    hint,
                    in_flight: self.fifo.len(),
                }
                .emit();
                let _ = reply.send(());
            }
        }
    }

    /// Takes the verdict of the front entry, and of every resolved entry behind it.
    /// False when the batcher went away without a verdict.
    fn settle(&mut self, first: Option<BatchOutcome>) -> bool {
        let mut outcome = first;
        loop {
            let Some(o) = outcome.take() else {
                return false;
            };
            let e = self.fifo.pop_front().expect("front exists");
            if e.generation == self.generation {
                self.answer(e, o);
            }
            outcome = match self.fifo.front_mut().map(|f| &mut f.verdict) {
                Some(Verdict::Known(o)) => Some(o.clone()),
                Some(Verdict::Waiting(rx)) => match rx.try_recv() {
                    Ok(o) => Some(o),
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => return true,
                    Err(_) => None,
                },
                None => return true,
            };
        }
    }

    /// PUBACK for a settled message, after its notice when it was refused.
    fn answer(&mut self, e: InFlight, outcome: BatchOutcome) {
        if let BatchOutcome::Rejected(r) = &outcome {
            if r.code == RejectCode::ForeignSession {
                if let Some(s) = e.about.session {
                    self.auth.forget_session(s);
                }
            }
            self.reject(&e.about, r, false);
        }
        m::message_acked(e.received_at.elapsed());
        self.outbox.push_back(Outgoing::Ack(e.pkid));
    }

    /// Counts, logs and queues the notice of a refused message. Notices of QoS 0 messages
    /// are dropped when the outbox is full (nothing bounds how many of them arrive).
    fn reject(&mut self, about: &About, r: &Rejection, best_effort: bool) {
        MessageRefused {
            topic: &about.topic,
            rejection: r,
        }
        .emit();
        if let Some(org) = &about.org {
            org.rejected();
        }
        let Some(topic) = &about.dead_letter else {
            return;
        };
        if best_effort && self.outbox.len() >= 2 * self.settings.max_in_flight {
            MessageDropped::DeadLetterOverflow.emit();
            return;
        }
        let payload = notice::render(about, r, &self.settings.client_id);
        self.outbox.push_back(Outgoing::Notice {
            topic: topic.clone(),
            payload,
        });
    }

    async fn on_message(&mut self, p: Publish) {
        let qos1 = p.qos != QoS::AtMostOnce;
        m::message_received(qos1, p.dup);
        let received_at = Instant::now();
        let admitted = self.admit(&p, qos1, received_at).await;
        if !qos1 {
            match admitted {
                Ok((batch, _)) => self.offer_best_effort(batch),
                Err(Refusal::Rejected(refused)) => self.reject(&refused.0, &refused.1, true),
                Err(Refusal::Dropped) => {}
            }
            return;
        }
        let (verdict, about) = match admitted {
            Ok((mut batch, about)) => {
                // The handle keeps its memory charge; the FIFO waits on its outcome.
                let rx = batch.ack.subscribe();
                self.offer(batch);
                (Verdict::Waiting(rx), about)
            }
            Err(Refusal::Rejected(refused)) => {
                let (about, r) = *refused;
                (Verdict::Known(BatchOutcome::Rejected(r)), about)
            }
            Err(Refusal::Dropped) => unreachable!("QoS 1 messages are never dropped"),
        };
        self.fifo.push_back(InFlight {
            pkid: p.pkid,
            generation: self.generation,
            verdict,
            received_at,
            about,
        });
    }

    /// A QoS 1 batch goes to the batcher, or waits its turn behind earlier ones.
    fn offer(&mut self, batch: TelemetryBatch) {
        if !self.parked.is_empty() {
            self.parked.push_back(batch);
            return;
        }
        match self.batches.try_send(batch) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(b)) | Err(mpsc::error::TrySendError::Closed(b)) => {
                self.parked.push_back(b)
            }
        }
    }

    /// A QoS 0 batch goes to the batcher if there is room now, else it is dropped.
    fn offer_best_effort(&mut self, batch: TelemetryBatch) {
        if self.batches.try_send(batch).is_err() {
            MessageDropped::Saturated.emit();
        }
    }

    /// Decodes and admits a message: the batch for the batcher (with a detached ack
    /// handle) and what a later notice would say, or the rejection.
    async fn admit(
        &mut self,
        p: &Publish,
        qos1: bool,
        received_at: Instant,
    ) -> Result<(TelemetryBatch, About), Refusal> {
        let s = self.settings.clone();
        let topic = String::from_utf8_lossy(&p.topic);
        let parts = s.pattern.parts(&topic);
        let dead_letter = s.dead_letter.as_ref().and_then(|d| d.render(parts));
        let mut about = About::new(&topic, dead_letter, u8::from(qos1), &p.payload);
        let fail = |about: About, r: Rejection| {
            Err(Refusal::Rejected(Box::new((
                about.with_hash(&p.payload),
                r,
            ))))
        };
        let Some(parts) = parts else {
            return fail(about, bad_topic(&topic, &s.pattern));
        };
        let (org, rate) = match self.auth.snapshot().org_by_code(parts.org_code) {
            Some(g) => (g.org_id, g.points_per_sec),
            None => return fail(about, unknown_org(parts)),
        };
        let counters = self.org_metrics.for_org(org, &self.auth);
        counters.received_bytes(p.payload.len());
        about.org = Some(counters.clone());
        // Charged before decoding, like a TCP frame: the most the payload can decode to.
        let Some(mut charge) = self.charge_bytes(p.payload.len(), qos1).await else {
            MessageDropped::Budget.emit();
            return Err(Refusal::Dropped);
        };
        let (aircraft, map) = match decode(p, parts, &s.limits) {
            Ok(ok) => ok,
            Err(r) => return fail(about, r),
        };
        charge.shrink_to(dbx_proto::points_heap_bytes(&map.points));
        about.seq = map.seq;
        about.session = Some(map.session);
        let aircraft_id = match dbx_listener::admit::resolve_target(
            &self.auth,
            org,
            &aircraft,
            map.session,
            s.auto_register,
        )
        .await
        {
            Ok(id) => id,
            Err(r) => return fail(about, r),
        };
        let n = map.points.len();
        if !self.charge((org, &counters), rate, n, qos1) {
            MessageDropped::RateLimited { points: n }.emit();
            counters.rejected();
            return Err(Refusal::Dropped);
        }
        m::points_received(n);
        counters.accepted(n);
        let batch = TelemetryBatch {
            org_id: org,
            aircraft_id,
            session_id: map.session,
            points: map.points,
            ack: AckHandle::detached().holding(charge),
            origin: if qos1 {
                BatchOrigin::Mqtt
            } else {
                BatchOrigin::MqttBestEffort
            },
            received_at,
            admitted_at: Instant::now(),
            queued_at: Instant::now(),
            ends_session: false,
        };
        Ok((batch, about))
    }

    /// Charges a payload of `len` bytes against the byte budget. QoS 0 takes what is
    /// free now or nothing (`None`: dropped). QoS 1 waits for it: the input then takes
    /// no message, acknowledges nothing new, and so the broker holds the rest. Batches
    /// parked for the batcher's queue are handed on meanwhile, since they hold charges
    /// that only the batcher gives back.
    async fn charge_bytes(&mut self, len: usize, qos1: bool) -> Option<Charge> {
        let bound = dbx_proto::decoded_bytes_bound(len, &self.settings.limits);
        if let Some(c) = self.budget.try_acquire(bound) {
            return Some(c);
        }
        if !qos1 {
            return None;
        }
        BudgetExhausted.emit();
        loop {
            let Some(batch) = self.parked.pop_front() else {
                return Some(self.budget.acquire(bound).await);
            };
            match self.batches.reserve().await {
                Ok(permit) => permit.send(batch),
                // The batcher is gone (shutdown): the batch is not acknowledged, so the
                // broker redelivers it; dropping it gives its bytes back.
                Err(_) => drop(batch),
            }
            if let Some(c) = self.budget.try_acquire(bound) {
                return Some(c);
            }
        }
    }

    /// Applies the organization's rate limit: QoS 1 always passes and pauses the input
    /// for the debt (the broker then holds the rest); QoS 0 passes only if it fits.
    fn charge(
        &mut self,
        (org, counters): (Uuid, &OrgCounters),
        rate: Option<u32>,
        points: usize,
        qos1: bool,
    ) -> bool {
        if !qos1 {
            return self.limiter.try_acquire(org, rate, points);
        }
        let wait = self.limiter.acquire(org, rate, points);
        if !wait.is_zero() {
            m::rate_limit_wait(wait);
            counters.rate_limited(wait);
            self.paused_until = Some(tokio::time::Instant::now() + wait);
        }
        true
    }
}

/// The payload as a batch map (MessagePack, or JSON when it starts with `{`), and the
/// aircraft: the topic's, which a payload's own `aircraft` must agree with.
fn decode(
    p: &Publish,
    parts: TopicParts<'_>,
    limits: &Limits,
) -> Result<(dbx_proto::AircraftRef, dbx_proto::BatchMap), Rejection> {
    let aircraft = dbx_proto::parse_aircraft(parts.aircraft, "topic")?;
    let now = chrono::Utc::now().timestamp_micros();
    let json = p.payload.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let map = if json {
        dbx_proto::decode_json_batch_map(&p.payload, limits, now)?
    } else {
        dbx_proto::decode_batch_map(&p.payload, limits, now)?
    };
    if let Some(named) = &map.aircraft {
        if *named != aircraft {
            return Err(Rejection::new(
                RejectCode::InvalidBatch,
                format!(
                    "payload: aircraft {named:?} differs from the topic's {:?}; leave it out or name the same aircraft the same way",
                    parts.aircraft
                ),
            ));
        }
    }
    Ok((aircraft, map))
}

fn bad_topic(topic: &str, pattern: &TopicPattern) -> Rejection {
    let shown: String = topic.chars().take(64).collect();
    Rejection::new(
        RejectCode::InvalidBatch,
        format!(
            "topic {shown:?} does not match the pattern (filter {}); nothing was stored",
            pattern.filter()
        ),
    )
}

fn unknown_org(parts: TopicParts<'_>) -> Rejection {
    let shown: String = parts.org_code.chars().take(64).collect();
    Rejection::new(
        RejectCode::Unauthorized,
        format!("no active organization has the code {shown:?}"),
    )
}
