//! Every handshake, accepted or refused, recorded in `dbx_aviation.api_requests`
//! (SCHEMA.md) — in batches, by a background task, never on the hot path. The
//! queue is bounded: when the database cannot keep up, records are dropped and
//! counted rather than holding up gateways. The API key is never recorded; the
//! label of the key used goes to `api_requests.key_label` (migration 0020; against an
//! older schema it is folded into `user_agent` as before).

use std::net::IpAddr;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use uuid::Uuid;

use dbx_core::Shutdown;

/// Records dropped because the queue was full (counter).
pub const API_REQUESTS_DROPPED_TOTAL: &str = "dbx_api_requests_dropped_total";

/// One handshake.
#[derive(Debug, Clone)]
pub struct HandshakeRecord {
    /// The organization, when the key was recognised.
    pub org_id: Option<Uuid>,
    /// `tcp`, `tls` or `udp`.
    pub transport: &'static str,
    /// 200 accepted, 401 unauthorized, 400 protocol/version, 408 handshake timeout.
    pub status_code: i32,
    /// Connect → verdict, milliseconds.
    pub response_time_ms: i32,
    /// The gateway's address.
    pub client_ip: IpAddr,
    /// The `gateway` string of the hello (at most 64 characters).
    pub gateway: Option<String>,
    /// The label of the key used, when recognised.
    pub key_label: Option<String>,
}

/// The sending side, cheap to clone.
#[derive(Debug, Clone)]
pub struct HandshakeLog {
    tx: Option<mpsc::Sender<HandshakeRecord>>,
}

impl HandshakeLog {
    /// A log that records nothing (tests of the protocol alone).
    pub fn disabled() -> Self {
        HandshakeLog { tx: None }
    }

    /// Starts the writer task; it flushes every second (or every 500 records) and
    /// once more when `shutdown` fires.
    pub fn spawn(pool: Pool, mut shutdown: Shutdown) -> Self {
        let (tx, mut rx) = mpsc::channel::<HandshakeRecord>(10_000);
        tokio::spawn(async move {
            let mut buf: Vec<HandshakeRecord> = Vec::with_capacity(500);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                let stop = tokio::select! {
                    _ = shutdown.recv() => true,
                    r = rx.recv() => match r {
                        Some(rec) => { buf.push(rec); if buf.len() < 500 { continue } false }
                        None => true,
                    },
                    _ = tick.tick() => false,
                };
                while let Ok(rec) = rx.try_recv() {
                    buf.push(rec);
                }
                if !buf.is_empty() {
                    if let Err(e) = write(&pool, &buf).await {
                        tracing::warn!(error = %e, rows = buf.len(), "could not record handshakes in api_requests");
                        metrics::counter!(API_REQUESTS_DROPPED_TOTAL).increment(buf.len() as u64);
                    }
                    buf.clear();
                }
                if stop {
                    return;
                }
            }
        });
        HandshakeLog { tx: Some(tx) }
    }

    /// Queues a record; drops (and counts) it when the queue is full.
    pub fn record(&self, rec: HandshakeRecord) {
        if let Some(tx) = &self.tx {
            if tx.try_send(rec).is_err() {
                metrics::counter!(API_REQUESTS_DROPPED_TOTAL).increment(1);
            }
        }
    }
}

/// A database error with the server's message, which `Display` ("db error") hides.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

async fn write(
    pool: &Pool,
    recs: &[HandshakeRecord],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let client = pool.get().await?;
    let org: Vec<Option<Uuid>> = recs.iter().map(|r| r.org_id).collect();
    let endpoint: Vec<String> = recs
        .iter()
        .map(|r| format!("{}:hello", r.transport))
        .collect();
    let status: Vec<i32> = recs.iter().map(|r| r.status_code).collect();
    let rt: Vec<i32> = recs.iter().map(|r| r.response_time_ms).collect();
    let ip: Vec<String> = recs.iter().map(|r| r.client_ip.to_string()).collect();
    let gateway: Vec<Option<String>> = recs.iter().map(|r| r.gateway.clone()).collect();
    let label: Vec<Option<String>> = recs.iter().map(|r| r.key_label.clone()).collect();
    let res = client
        .execute(
            "INSERT INTO dbx_aviation.api_requests \
               (org_id, endpoint, method, status_code, response_time_ms, client_ip, user_agent, key_label) \
             SELECT o, e, 'HELLO', s, t, i::inet, u, l \
             FROM unnest($1::uuid[], $2::text[], $3::int[], $4::int[], $5::text[], $6::text[], $7::text[]) \
               AS x(o, e, s, t, i, u, l)",
            &[&org, &endpoint, &status, &rt, &ip, &gateway, &label],
        )
        .await;
    match res {
        Ok(_) => {}
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) => {
            // A schema before key_label: the label goes into user_agent.
            let ua: Vec<Option<String>> = recs
                .iter()
                .map(|r| match (&r.gateway, &r.key_label) {
                    (Some(g), Some(l)) => Some(format!("{g} (key {l})")),
                    (Some(g), None) => Some(g.clone()),
                    (None, Some(l)) => Some(format!("(key {l})")),
                    (None, None) => None,
                })
                .collect();
            client
                .execute(
                    "INSERT INTO dbx_aviation.api_requests \
                       (org_id, endpoint, method, status_code, response_time_ms, client_ip, user_agent) \
                     SELECT o, e, 'HELLO', s, t, i::inet, u \
                     FROM unnest($1::uuid[], $2::text[], $3::int[], $4::int[], $5::text[], $6::text[]) \
                       AS x(o, e, s, t, i, u)",
                    &[&org, &endpoint, &status, &rt, &ip, &ua],
                )
                .await
                .map_err(|e| describe(&e))?;
        }
        Err(e) => return Err(describe(&e).into()),
    }
    Ok(())
}
