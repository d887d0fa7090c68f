//! A test gateway: a small, strict client of the wire protocol built on dbx-proto,
//! for end-to-end tests. It sends exactly what it is told (including malformed
//! bytes) and reads server messages one frame at a time.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
pub use dbx_core::now_micros;
use dbx_core::Point;
use dbx_proto::{AircraftRef, EncodeOptions, PointForm, ServerMessage};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use uuid::Uuid;

/// Anything a gateway can talk over (plain TCP or a TLS stream).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

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
pub struct TestGateway {
    stream: Box<dyn Stream>,
    buf: BytesMut,
}

impl std::fmt::Debug for TestGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestGateway").finish_non_exhaustive()
    }
}

impl TestGateway {
    /// Connects over plain TCP.
    pub async fn connect(addr: SocketAddr) -> TestGateway {
        let s = TcpStream::connect(addr).await.expect("connect to dbx");
        s.set_nodelay(true).ok();
        TestGateway::over(Box::new(s))
    }

    /// Wraps an already connected stream (TLS).
    pub fn over(stream: Box<dyn Stream>) -> TestGateway {
        TestGateway {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Connects and completes the handshake; panics unless welcomed.
    pub async fn hello(addr: SocketAddr, key: &str) -> (TestGateway, ServerMessage) {
        let mut g = TestGateway::connect(addr).await;
        g.send_hello(key).await;
        let w = g.recv().await.expect("an answer to hello");
        assert!(
            matches!(w, ServerMessage::Welcome { .. }),
            "expected welcome, got {w:?}"
        );
        (g, w)
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
            g.send_hello(key).await;
            match g.recv().await {
                Some(w @ ServerMessage::Welcome { .. }) => return (g, w),
                other if tokio::time::Instant::now() > deadline => {
                    panic!("key not accepted within {within:?}: {other:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Sends raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
        self.stream.flush().await.expect("flush");
    }

    /// Sends raw bytes, reporting a broken connection instead of panicking.
    pub async fn send_raw_checked(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Sends `hello`.
    pub async fn send_hello(&mut self, key: &str) {
        let mut b = BytesMut::new();
        dbx_proto::encode_hello(&mut b, key, Some("dbx-testkit"));
        self.send_raw(&b).await;
    }

    /// Sends one batch.
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

    async fn recv_inner(&mut self) -> Option<ServerMessage> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if self.buf.len() >= 4 + len {
                    self.buf.advance(4);
                    let body = self.buf.split_to(len);
                    return Some(dbx_proto::decode_server(&body).expect("a valid server message"));
                }
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Reads until the server closes; true if it did within `limit`.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, async {
            let mut sink = [0u8; 1024];
            loop {
                match self.stream.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
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
    let mut acked: HashSet<usize> = HashSet::new();
    let mut reconnects = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while acked.len() < batches.len() {
        assert!(
            Instant::now() < deadline,
            "gave up: {} of {} acked",
            acked.len(),
            batches.len()
        );
        let Ok(Ok(tcp)) =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut g = TestGateway::over(Box::new(tcp));
        g.send_hello(&key).await;
        match g.recv_within(Duration::from_secs(5)).await {
            Some(ServerMessage::Welcome { .. }) => {}
            _ => {
                reconnects += 1;
                continue;
            }
        }
        // conn seq → batch index, for what is in flight on this connection.
        let mut inflight: BTreeMap<u64, usize> = BTreeMap::new();
        let mut todo = (0..batches.len())
            .filter(|i| !acked.contains(i))
            .collect::<Vec<_>>()
            .into_iter();
        let mut seq = 0u64;
        'conn: loop {
            while inflight.len() < 8 {
                let Some(i) = todo.next() else { break };
                seq += 1;
                let mut b = BytesMut::new();
                let (session, pts) = &batches[i];
                dbx_proto::encode_batch_with(
                    &mut b,
                    seq,
                    &AircraftRef::Id(aircraft),
                    *session,
                    pts,
                    EncodeOptions::from(PointForm::Map),
                )
                .unwrap();
                g.send_raw_checked(&b).await.ok();
                inflight.insert(seq, i);
                // A gateway's pace, so that a test's kills land while it still has work.
                tokio::time::sleep(pace).await;
            }
            if inflight.is_empty() {
                break 'conn;
            }
            match g.recv_within(Duration::from_secs(10)).await {
                Some(ServerMessage::Ack { seq: upto }) => {
                    let done: Vec<u64> = inflight.range(..=upto).map(|(s, _)| *s).collect();
                    for s in done {
                        acked.insert(inflight.remove(&s).expect("in flight"));
                    }
                    acked_tx.send_replace(acked.clone());
                }
                Some(ServerMessage::Nack { seq, msg, .. }) => panic!("batch {seq} nacked: {msg}"),
                _ => break 'conn, // killed, or shutting down: reconnect and resend
            }
        }
        if acked.len() < batches.len() {
            reconnects += 1;
        }
    }
    reconnects
}
