//! A test gateway: a strict client of the wire protocol for end-to-end tests, built on
//! dbx-client's [`Connection`] (its frame reader and handshake). It sends exactly what it
//! is told, including what a well-behaved client never would (raw bytes, malformed
//! frames, seqs out of order), and reads server messages one frame at a time.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
pub use dbx_client::Stream;
use dbx_client::{Answer, Client, ClientError, ConnectOptions, Connection, Outgoing, Resend};
pub use dbx_core::now_micros;
use dbx_core::Point;
use dbx_proto::{AircraftRef, EncodeOptions, PointForm, ServerMessage};
use tokio::sync::watch;
use uuid::Uuid;

/// The `gateway` a test gateway names in `hello`.
const GATEWAY: &str = "dbx-testkit";

/// What [`TestGateway::poll`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    /// A server message.
    Message(ServerMessage),
    /// Nothing within the time given (the connection is still open).
    Nothing,
    /// The server closed the connection (or it broke).
    Closed,
}

/// A connected test gateway.
#[derive(Debug)]
pub struct TestGateway {
    conn: Connection,
}

impl TestGateway {
    /// Connects over plain TCP.
    pub async fn connect(addr: SocketAddr) -> TestGateway {
        let conn = Connection::open(addr, None).await.expect("connect to dbx");
        TestGateway { conn }
    }

    /// Wraps an already connected stream (TLS).
    pub fn over(stream: Box<dyn Stream>) -> TestGateway {
        TestGateway {
            conn: Connection::over(stream),
        }
    }

    /// Connects and completes the handshake; panics unless welcomed.
    pub async fn hello(addr: SocketAddr, key: &str) -> (TestGateway, ServerMessage) {
        let mut g = TestGateway::connect(addr).await;
        match g.handshake(key).await {
            Ok(welcome) => (g, welcome),
            Err(e) => panic!("expected welcome, got {e}"),
        }
    }

    /// Like [`TestGateway::hello`], retrying for up to `within` while the key is refused
    /// (a key created while the daemon runs is picked up within seconds, not at once).
    pub async fn hello_within(
        addr: SocketAddr,
        key: &str,
        within: Duration,
    ) -> (TestGateway, ServerMessage) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut g = TestGateway::connect(addr).await;
            match g.handshake(key).await {
                Ok(welcome) => return (g, welcome),
                Err(e) if tokio::time::Instant::now() > deadline => {
                    panic!("key not accepted within {within:?}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// `hello`, then the server's `welcome` within 20 s.
    async fn handshake(&mut self, key: &str) -> Result<ServerMessage, String> {
        let limit = Duration::from_secs(20);
        match tokio::time::timeout(limit, self.conn.handshake(key, Some(GATEWAY))).await {
            Ok(Ok(welcome)) => Ok(welcome.into()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {limit:?}")),
        }
    }

    /// Sends raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.conn.write_all(bytes).await.expect("write");
    }

    /// Sends raw bytes, reporting a broken connection instead of panicking.
    pub async fn send_raw_checked(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.conn.write_all(bytes).await
    }

    /// Sends `hello` (and reads nothing: the test reads the answer).
    pub async fn send_hello(&mut self, key: &str) {
        let mut b = BytesMut::new();
        dbx_proto::encode_hello(&mut b, key, Some(GATEWAY));
        self.send_raw(&b).await;
    }

    /// Sends one batch with the `seq` given (tests send repeated or decreasing ones).
    pub async fn send_batch(
        &mut self,
        seq: u64,
        aircraft: &AircraftRef,
        session: Uuid,
        points: &[Point],
        form: PointForm,
    ) {
        self.send_batch_with(seq, aircraft, session, points, EncodeOptions::from(form))
            .await
    }

    /// Sends one batch with explicit encoding options.
    pub async fn send_batch_with(
        &mut self,
        seq: u64,
        aircraft: &AircraftRef,
        session: Uuid,
        points: &[Point],
        opts: EncodeOptions,
    ) {
        let mut b = BytesMut::new();
        dbx_proto::encode_batch_with(&mut b, seq, aircraft, session, points, opts)
            .expect("encodable batch");
        self.send_raw(&b).await;
    }

    /// Sends `end` (protocol 1.1): the flight session is over.
    pub async fn send_end(&mut self, seq: u64, session: Uuid) {
        let mut b = BytesMut::new();
        dbx_proto::encode_end(&mut b, seq, session);
        self.send_raw(&b).await;
    }

    /// Sends `bye`.
    pub async fn send_bye(&mut self) {
        let mut b = BytesMut::new();
        dbx_proto::encode_bye(&mut b);
        self.send_raw(&b).await;
    }

    /// Sends `ping`.
    pub async fn send_ping(&mut self) {
        let mut b = BytesMut::new();
        dbx_proto::encode_ping(&mut b);
        self.send_raw(&b).await;
    }

    /// The next server message, or `None` when the server closed (or after 20 s).
    pub async fn recv(&mut self) -> Option<ServerMessage> {
        self.recv_within(Duration::from_secs(20)).await
    }

    /// The next server message within `limit`, telling a quiet server from a closed one.
    pub async fn poll(&mut self, limit: Duration) -> Polled {
        match tokio::time::timeout(limit, self.recv_inner()).await {
            Err(_) => Polled::Nothing,
            Ok(Some(m)) => Polled::Message(m),
            Ok(None) => Polled::Closed,
        }
    }

    /// The next server message within `limit`.
    pub async fn recv_within(&mut self, limit: Duration) -> Option<ServerMessage> {
        tokio::time::timeout(limit, self.recv_inner())
            .await
            .ok()
            .flatten()
    }

    /// The next server message; `None` when the connection is over. A frame that is not a
    /// valid server message fails the test: the daemon must never send one.
    async fn recv_inner(&mut self) -> Option<ServerMessage> {
        match self.conn.read_message().await {
            Ok(m) => Some(m),
            Err(e @ (ClientError::Decode(_) | ClientError::Frame(_))) => {
                panic!("the daemon sent an invalid frame: {e}")
            }
            Err(_) => None,
        }
    }

    /// Reads until the server closes; true if it did within `limit`.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        self.conn.closed_within(limit).await
    }

    /// Reads acks/nacks until every seq in `1..=last` is answered; returns
    /// (highest cumulative ack, nacked seqs with their messages).
    pub async fn await_verdicts(&mut self, last: u64) -> (u64, Vec<ServerMessage>) {
        let mut acked = 0;
        let mut nacks = Vec::new();
        while acked < last
            && nacks
                .iter()
                .all(|n| !matches!(n, ServerMessage::Nack { seq, .. } if *seq == last))
        {
            match self.recv().await {
                Some(ServerMessage::Ack { seq }) => acked = acked.max(seq),
                Some(n @ ServerMessage::Nack { .. }) => nacks.push(n),
                Some(other) => panic!("unexpected message while waiting for acks: {other:?}"),
                None => break,
            }
        }
        (acked, nacks)
    }
}

/// `n` plausible points starting at `ts_micros`, one per 100 ms, seqs from `first_seq`.
pub fn points(n: usize, first_seq: i64, ts_micros: i64) -> Vec<Point> {
    (0..n)
        .map(|i| {
            let k = i as f64;
            Point {
                ts_micros: ts_micros + i as i64 * 100_000,
                seq: first_seq + i as i64,
                lat: Some(47.0 + k * 1e-5),
                lon: Some(8.0 + k * 1e-5),
                alt: Some(100.0 + (k as f32) * 0.1),
                gs: Some(12.5),
                vs: Some(0.5),
                hdg: Some(90.0),
                roll: Some(1.0),
                pitch: Some(-2.0),
                yaw: Some(0.5),
                ias: Some(13.0),
                bv: Some(22.2),
                bi: Some(10.5),
                bp: Some(80.0),
                rpm: Some(vec![5000.0, 5010.0, 4990.0, 5005.0]),
                cs: Some(vec![0.1, -0.1]),
                fix: Some(3),
                sats: Some(12),
                temp: Some(21.5),
                extra: None,
            }
        })
        .collect()
}

/// A gateway that keeps every batch until it sees it acked, and resends the rest
/// after every reconnect (on new batch seqs, as the protocol requires), sending one
/// batch per `pace` with up to 8 in flight. Publishes the acked batch indexes on
/// `acked_tx` as they come; returns how often it reconnected. Panics on a nack, or
/// when not everything is acked within 300 s.
pub async fn resend_until_acked(
    addr: SocketAddr,
    key: String,
    aircraft: Uuid,
    batches: Vec<(Uuid, Vec<Point>)>,
    pace: Duration,
    acked_tx: watch::Sender<HashSet<usize>>,
) -> u32 {
    let total = batches.len();
    // Batch index as the tag: what was acked, across connections.
    let mut unacked: Resend<usize> = Resend::default();
    for (i, (session, points)) in batches.into_iter().enumerate() {
        let aircraft = AircraftRef::Id(aircraft);
        unacked.push(
            Outgoing::Batch {
                aircraft,
                session,
                points,
            },
            i,
        );
    }
    let options = ConnectOptions {
        gateway: Some(GATEWAY.into()),
        timeout: Duration::from_secs(5),
        ..ConnectOptions::default()
    };
    let mut acked: HashSet<usize> = HashSet::new();
    let mut reconnects = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while acked.len() < total {
        assert!(
            Instant::now() < deadline,
            "gave up: {} of {total} acked",
            acked.len()
        );
        let mut client = match Client::connect(addr, &key, &options).await {
            Ok(client) => client,
            Err(ClientError::Connect { .. }) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(_) => {
                reconnects += 1;
                continue;
            }
        };
        loop {
            while client.in_flight() < 8 {
                let Some((msg, i)) = unacked.pop() else { break };
                // A failed write keeps the batch with the client; the read below sees the loss.
                let _ = client.send(msg, i).await;
                // A gateway's pace, so that a test's kills land while it still has work.
                tokio::time::sleep(pace).await;
            }
            if client.in_flight() == 0 {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(10), client.recv()).await {
                Ok(Ok(Answer::Acked(sent))) => {
                    acked.extend(sent.iter().map(|s| s.tag));
                    acked_tx.send_replace(acked.clone());
                }
                Ok(Ok(Answer::Nacked { sent, msg, .. })) => {
                    panic!("batch {} nacked: {msg}", sent.seq)
                }
                Ok(Ok(Answer::Pong)) => {}
                _ => break, // killed, or shutting down: reconnect and resend
            }
        }
        unacked.lost(client);
        if acked.len() < total {
            reconnects += 1;
        }
    }
    reconnects
}
