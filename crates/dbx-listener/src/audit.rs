//! Every handshake, accepted or refused, recorded in `dbx_aviation.api_requests`
//! (docs/schema.md) — in batches, by a background task, never on the hot path. The API key
//! is never recorded; the label of the key used goes to `api_requests.key_label`
//! (migration 0020).
//!
//! A peer that retries a bad key in a loop, or a flood of refused handshakes, must not
//! cost a row each: refused handshakes (status ≠ 200) from one client IP with the same
//! status, transport and organization within one flush window (a second) collapse
//! into one row whose `request_count` (migration 0031) says how many they were.
//! Accepted handshakes keep one row each. What waits for the next flush ([`Pending`])
//! is bounded in rows and bytes, and so is the queue in front of it: past either bound
//! a record is dropped and counted (`dbx_api_requests_dropped_total{reason}`) rather
//! than holding up gateways or growing memory — a flood from many addresses costs at
//! most those bounds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use uuid::Uuid;

use dbx_core::{InternalEvent, Shutdown};

use crate::events::{HandshakeRecordCollapsed, HandshakeRecordsDropped};

/// Records the queue in front of the writer holds.
const QUEUE_CAPACITY: usize = 10_000;
/// Rows a flush window may hold before the next record is dropped.
pub const MAX_PENDING_ROWS: usize = 10_000;
/// Estimated bytes those rows may hold (see [`Row::bytes`]).
pub const MAX_PENDING_BYTES: usize = 4 << 20;
/// A window is flushed early once it holds this many rows.
const FLUSH_ROWS: usize = 500;
/// The flush window.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

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

/// What makes refused handshakes one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct RefusalKey {
    client_ip: IpAddr,
    status_code: i32,
    transport: &'static str,
    org_id: Option<Uuid>,
}

/// One row of `api_requests` to be: the first record and how many it stands for.
#[derive(Debug, Clone)]
pub struct Row {
    /// The first handshake of the row (its gateway string and key label are kept).
    pub first: HandshakeRecord,
    /// Handshakes this row stands for.
    pub count: i32,
    /// Sum of their response times, ms (the row stores the mean).
    pub response_time_sum_ms: i64,
}

impl Row {
    /// What the row costs in memory, roughly: the struct and its strings.
    fn bytes(rec: &HandshakeRecord) -> usize {
        std::mem::size_of::<Row>()
            + std::mem::size_of::<RefusalKey>()
            + rec.gateway.as_ref().map_or(0, String::len)
            + rec.key_label.as_ref().map_or(0, String::len)
    }

    /// The mean response time, ms.
    pub fn response_time_ms(&self) -> i32 {
        (self.response_time_sum_ms / i64::from(self.count.max(1))) as i32
    }
}

/// Why [`Pending::add`] did not keep a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// [`MAX_PENDING_ROWS`] or [`MAX_PENDING_BYTES`] is reached.
    Full,
}

/// What [`Pending::add`] did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// A row of its own.
    NewRow,
    /// Counted in the row of an earlier refusal like it.
    Collapsed,
}

/// The rows of the current flush window, bounded in rows and bytes.
#[derive(Debug)]
pub struct Pending {
    rows: Vec<Row>,
    refusals: HashMap<RefusalKey, usize>,
    bytes: usize,
    max_rows: usize,
    max_bytes: usize,
}

impl Pending {
    /// An empty window holding at most `max_rows` rows and about `max_bytes` bytes.
    pub fn new(max_rows: usize, max_bytes: usize) -> Self {
        Pending {
            rows: Vec::new(),
            refusals: HashMap::new(),
            bytes: 0,
            max_rows,
            max_bytes,
        }
    }

    /// Adds a record: a refusal like an earlier one of this window is counted in its row
    /// (which costs nothing, even when the window is full); anything else takes a row
    /// while there is room.
    pub fn add(&mut self, rec: HandshakeRecord) -> Result<Added, Dropped> {
        let key = (rec.status_code != 200).then_some(RefusalKey {
            client_ip: rec.client_ip,
            status_code: rec.status_code,
            transport: rec.transport,
            org_id: rec.org_id,
        });
        if let Some(&i) = key.as_ref().and_then(|k| self.refusals.get(k)) {
            let row = &mut self.rows[i];
            row.count = row.count.saturating_add(1);
            row.response_time_sum_ms += i64::from(rec.response_time_ms);
            return Ok(Added::Collapsed);
        }
        let bytes = Row::bytes(&rec);
        if self.rows.len() >= self.max_rows || self.bytes + bytes > self.max_bytes {
            return Err(Dropped::Full);
        }
        if let Some(k) = key {
            self.refusals.insert(k, self.rows.len());
        }
        self.bytes += bytes;
        self.rows.push(Row {
            count: 1,
            response_time_sum_ms: i64::from(rec.response_time_ms),
            first: rec,
        });
        Ok(Added::NewRow)
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when no row is held.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Estimated bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Empties the window, returning its rows (the next window starts afresh).
    pub fn take(&mut self) -> Vec<Row> {
        self.refusals.clear();
        self.bytes = 0;
        std::mem::take(&mut self.rows)
    }
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

    /// Starts the writer task; it flushes every second (earlier once a window holds 500
    /// rows) and once more when `shutdown` fires.
    pub fn spawn(pool: Pool, mut shutdown: Shutdown) -> Self {
        let (tx, mut rx) = mpsc::channel::<HandshakeRecord>(QUEUE_CAPACITY);
        tokio::spawn(async move {
            let mut pending = Pending::new(MAX_PENDING_ROWS, MAX_PENDING_BYTES);
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            loop {
                let stop = tokio::select! {
                    _ = shutdown.recv() => true,
                    r = rx.recv() => match r {
                        Some(rec) => {
                            keep(&mut pending, rec);
                            if pending.len() < FLUSH_ROWS { continue }
                            false
                        }
                        None => true,
                    },
                    _ = tick.tick() => false,
                };
                while let Ok(rec) = rx.try_recv() {
                    keep(&mut pending, rec);
                }
                if !pending.is_empty() {
                    let rows = pending.take();
                    if let Err(e) = write(&pool, &rows).await {
                        let handshakes: i64 = rows.iter().map(|r| i64::from(r.count)).sum();
                        HandshakeRecordsDropped::WriteFailed {
                            error: &e,
                            rows: rows.len(),
                            handshakes: handshakes as u64,
                        }
                        .emit();
                    }
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
                HandshakeRecordsDropped::QueueFull.emit();
            }
        }
    }
}

/// Adds `rec` to the window, counting a collapse or a drop.
fn keep(pending: &mut Pending, rec: HandshakeRecord) {
    match pending.add(rec) {
        Ok(Added::NewRow) => {}
        Ok(Added::Collapsed) => HandshakeRecordCollapsed.emit(),
        Err(Dropped::Full) => HandshakeRecordsDropped::PendingFull {
            rows: pending.len(),
            bytes: pending.bytes(),
        }
        .emit(),
    }
}

/// A database error with the server's message, which `Display` ("db error") hides.
async fn write(pool: &Pool, rows: &[Row]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let client = pool.get().await?;
    let org: Vec<Option<Uuid>> = rows.iter().map(|r| r.first.org_id).collect();
    let endpoint: Vec<String> = rows
        .iter()
        .map(|r| format!("{}:hello", r.first.transport))
        .collect();
    let status: Vec<i32> = rows.iter().map(|r| r.first.status_code).collect();
    let rt: Vec<i32> = rows.iter().map(Row::response_time_ms).collect();
    let ip: Vec<String> = rows.iter().map(|r| r.first.client_ip.to_string()).collect();
    let gateway: Vec<Option<String>> = rows.iter().map(|r| r.first.gateway.clone()).collect();
    let label: Vec<Option<String>> = rows.iter().map(|r| r.first.key_label.clone()).collect();
    let count: Vec<i32> = rows.iter().map(|r| r.count).collect();
    let res = client
        .execute(
            "INSERT INTO dbx_aviation.api_requests \
               (org_id, endpoint, method, status_code, response_time_ms, client_ip, user_agent, key_label, request_count) \
             SELECT o, e, 'HELLO', s, t, i::inet, u, l, n \
             FROM unnest($1::uuid[], $2::text[], $3::int[], $4::int[], $5::text[], $6::text[], $7::text[], $8::int[]) \
               AS x(o, e, s, t, i, u, l, n)",
            &[&org, &endpoint, &status, &rt, &ip, &gateway, &label, &count],
        )
        .await;
    res.map(drop).map_err(|e| dbx_pg::describe(&e).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ip: &str, status: i32, transport: &'static str, rt: i32) -> HandshakeRecord {
        HandshakeRecord {
            org_id: None,
            transport,
            status_code: status,
            response_time_ms: rt,
            client_ip: ip.parse().unwrap(),
            gateway: Some(format!("gw-{rt}")),
            key_label: None,
        }
    }

    #[test]
    fn refusals_from_one_source_collapse_and_acceptances_do_not() {
        let mut p = Pending::new(100, 1 << 20);
        for rt in [10, 20, 30] {
            p.add(rec("192.0.2.1", 401, "tcp", rt)).unwrap();
        }
        // Another status, transport, address or organization is another row.
        p.add(rec("192.0.2.1", 408, "tcp", 5000)).unwrap();
        p.add(rec("192.0.2.1", 401, "tls", 7)).unwrap();
        p.add(rec("192.0.2.2", 401, "tcp", 7)).unwrap();
        let mut with_org = rec("192.0.2.1", 401, "tcp", 7);
        with_org.org_id = Some(Uuid::from_u128(9));
        p.add(with_org).unwrap();
        // Accepted handshakes: one row each, even from one address.
        assert_eq!(p.add(rec("192.0.2.1", 200, "tcp", 1)), Ok(Added::NewRow));
        assert_eq!(p.add(rec("192.0.2.1", 200, "tcp", 1)), Ok(Added::NewRow));
        let rows = p.take();
        assert_eq!(rows.len(), 7);
        assert_eq!(rows[0].count, 3);
        assert_eq!(rows[0].response_time_ms(), 20);
        assert_eq!(rows[0].first.gateway.as_deref(), Some("gw-10"));
        assert!(rows[1..].iter().all(|r| r.count == 1));
        // The next window starts afresh.
        assert!(p.is_empty() && p.bytes() == 0);
        assert_eq!(p.add(rec("192.0.2.1", 401, "tcp", 1)), Ok(Added::NewRow));
    }

    #[test]
    fn a_flood_from_many_sources_is_bounded_in_rows_and_bytes() {
        let mut p = Pending::new(1000, 1 << 30);
        let mut dropped = 0;
        for i in 0..5000u32 {
            let ip = IpAddr::from(std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | i as u128));
            let r = HandshakeRecord {
                client_ip: ip,
                ..rec("::1", 401, "tcp", 1)
            };
            if p.add(r).is_err() {
                dropped += 1;
            }
        }
        assert_eq!((p.len(), dropped), (1000, 4000));
        // A full window still counts refusals it already has a row for.
        assert_eq!(
            p.add(HandshakeRecord {
                client_ip: IpAddr::from(std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96)),
                ..rec("::1", 401, "tcp", 1)
            }),
            Ok(Added::Collapsed)
        );
        assert_eq!(p.add(rec("192.0.2.1", 200, "tcp", 1)), Err(Dropped::Full));

        // The byte bound: long gateway strings fill it before the row bound.
        let mut p = Pending::new(1000, 10 * Row::bytes(&rec("::1", 200, "tcp", 1)) + 640);
        let long = |i: u32| HandshakeRecord {
            gateway: Some("g".repeat(64)),
            client_ip: IpAddr::from(std::net::Ipv4Addr::from(i)),
            ..rec("::1", 401, "tcp", 1)
        };
        let kept = (0..100).filter(|&i| p.add(long(i)).is_ok()).count();
        assert_eq!(kept, 10);
        assert!(p.bytes() <= p.max_bytes);
    }
}
