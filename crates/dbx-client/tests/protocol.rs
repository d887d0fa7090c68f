//! The client against a tiny in-process server speaking the daemon's side of the
//! protocol with dbx-proto's own decoders and encoders: the handshake and its refusals,
//! seq numbering, cumulative acks and nacks matched to what was sent, bye, the resend
//! of what a lost connection left unanswered (on fresh seqs), the frame reader's
//! limits and cancel safety, and both UDP forms.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use dbx_client::{
    AircraftRef, Answer, Client, ClientError, ConnectOptions, Connection, Outgoing, Point,
    RejectCode, Resend, UdpAuth, UdpSender,
};
use dbx_proto::{ClientMessage, DatagramAuth, FrameCodec, Limits, ServerMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Decoder;
use uuid::Uuid;

const KEY: &str = "dbx_test_key";
const ORG: Uuid = Uuid::from_u128(0x7f0c2a4e_3b1d_4e8a_9c5f_1a2b3c4d5e6f);

/// The server's end of one connection.
struct Peer {
    tcp: TcpStream,
    buf: BytesMut,
}

impl Peer {
    /// The next client message (`None` when the client closed).
    async fn recv(&mut self) -> Option<ClientMessage> {
        let mut codec = FrameCodec::default();
        loop {
            if let Some(body) = codec.decode(&mut self.buf).unwrap() {
                let now = dbx_core::now_micros();
                return Some(dbx_proto::decode_client(&body, &Limits::default(), now).unwrap());
            }
            if self.tcp.read_buf(&mut self.buf).await.unwrap_or(0) == 0 {
                return None;
            }
        }
    }

    async fn send(&mut self, msg: ServerMessage) {
        let mut out = BytesMut::new();
        dbx_proto::encode_server(&msg, &mut out);
        self.tcp.write_all(&out).await.unwrap();
    }

    /// Reads `hello` and answers `welcome` when the key is [`KEY`], else `unauthorized`.
    async fn welcome(&mut self) -> bool {
        let Some(ClientMessage::Hello(h)) = self.recv().await else {
            panic!("hello first")
        };
        if h.key != KEY {
            self.send(ServerMessage::Error {
                code: RejectCode::Unauthorized,
                msg: "the key is not valid".into(),
            })
            .await;
            return false;
        }
        self.send(ServerMessage::Welcome {
            v: 1,
            org: ORG,
            max_frame: 1 << 20,
            max_points: 10_000,
        })
        .await;
        true
    }

    /// The seq and point count of the next batch.
    async fn batch(&mut self) -> (u64, usize) {
        match self.recv().await {
            Some(ClientMessage::Batch(b)) => (b.seq, b.points.len()),
            other => panic!("expected a batch, got {other:?}"),
        }
    }
}

async fn listen() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

async fn accept(l: &TcpListener) -> Peer {
    let (tcp, _) = l.accept().await.unwrap();
    Peer {
        tcp,
        buf: BytesMut::new(),
    }
}

/// A welcomed client with the default options.
async fn connect<T>(addr: SocketAddr) -> Client<T> {
    Client::connect(addr, KEY, &ConnectOptions::default())
        .await
        .unwrap()
}

fn points(n: usize) -> Vec<Point> {
    let now = dbx_core::now_micros();
    (0..n)
        .map(|i| Point {
            ts_micros: now - 1_000_000 + i as i64 * 1000,
            seq: i as i64,
            lat: Some(47.0),
            lon: Some(8.0),
            ..Point::default()
        })
        .collect()
}

fn batch(n: usize) -> Outgoing {
    Outgoing::Batch {
        aircraft: AircraftRef::Registration("N101DX".into()),
        session: ORG,
        points: points(n),
    }
}

fn seqs<T>(sent: &[dbx_client::Sent<T>]) -> Vec<u64> {
    sent.iter().map(|s| s.seq).collect()
}

#[tokio::test]
async fn the_handshake_returns_the_welcome_or_the_servers_error() {
    let (l, addr) = listen().await;
    let server = tokio::spawn(async move {
        assert!(accept(&l).await.welcome().await);
        assert!(!accept(&l).await.welcome().await);
    });
    let client: Client = Client::connect(addr, KEY, &ConnectOptions::default())
        .await
        .unwrap();
    assert_eq!(client.welcome().org, ORG);
    assert_eq!(client.welcome().max_points, 10_000);
    let refused = Client::<()>::connect(addr, "dbx_wrong", &ConnectOptions::default())
        .await
        .unwrap_err();
    match &refused {
        ClientError::Server { code, msg } => {
            assert_eq!(*code, RejectCode::Unauthorized);
            assert_eq!(msg, "the key is not valid");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(refused.is_fatal());
    server.await.unwrap();
}

#[tokio::test]
async fn a_silent_server_times_the_handshake_out() {
    let (l, addr) = listen().await;
    let _server = tokio::spawn(async move {
        let _peer = accept(&l).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let options = ConnectOptions {
        timeout: Duration::from_millis(200),
        ..ConnectOptions::default()
    };
    let e = Client::<()>::connect(addr, KEY, &options)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Timeout(_)), "{e:?}");
    assert!(!e.is_fatal());
}

#[tokio::test]
async fn acks_and_nacks_are_matched_to_the_batches_sent() {
    let (l, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut p = accept(&l).await;
        p.welcome().await;
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(p.batch().await);
        }
        assert_eq!(got, [(1, 1), (2, 2), (3, 3), (4, 4)], "seqs count from 1");
        // One ack covering two batches, a nack naming a point, then the last ack.
        p.send(ServerMessage::Ack { seq: 2 }).await;
        p.send(ServerMessage::Nack {
            seq: 3,
            code: RejectCode::InvalidPoint,
            msg: "point 2: lat = 91.5 is outside -90..90".into(),
            index: Some(2),
        })
        .await;
        p.send(ServerMessage::Ack { seq: 4 }).await;
        assert_eq!(p.recv().await, Some(ClientMessage::Bye));
        p.send(ServerMessage::Bye).await;
    });
    let mut c: Client<char> = connect(addr).await;
    for (n, tag) in [(1, 'a'), (2, 'b'), (3, 'c'), (4, 'd')] {
        assert_eq!(c.send(batch(n), tag).await.unwrap(), n as u64);
    }
    assert_eq!(c.in_flight(), 4);
    match c.recv().await.unwrap() {
        Answer::Acked(sent) => {
            assert_eq!(seqs(&sent), [1, 2]);
            assert_eq!(sent[1].tag, 'b');
            assert_eq!(sent[1].msg.points().len(), 2);
        }
        other => panic!("unexpected {other:?}"),
    }
    match c.recv().await.unwrap() {
        Answer::Nacked {
            sent,
            code,
            msg,
            index,
        } => {
            assert_eq!((sent.seq, sent.tag), (3, 'c'));
            assert_eq!(code, RejectCode::InvalidPoint);
            assert_eq!(index, Some(2));
            assert!(msg.starts_with("point 2"));
        }
        other => panic!("unexpected {other:?}"),
    }
    let rest = c.flush().await.unwrap();
    assert!(matches!(&rest[..], [Answer::Acked(s)] if seqs(s) == [4]));
    assert_eq!(c.in_flight(), 0);
    assert!(c.bye().await.unwrap().is_empty());
    server.await.unwrap();
}

#[tokio::test]
async fn bye_returns_the_answers_still_due() {
    let (l, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut p = accept(&l).await;
        p.welcome().await;
        p.batch().await;
        assert!(matches!(p.recv().await, Some(ClientMessage::End(e)) if e.seq == 2));
        assert_eq!(p.recv().await, Some(ClientMessage::Bye));
        p.send(ServerMessage::Ack { seq: 2 }).await;
        p.send(ServerMessage::Bye).await;
    });
    let mut c: Client = connect(addr).await;
    c.send(batch(3), ()).await.unwrap();
    c.send(Outgoing::End { session: ORG }, ()).await.unwrap();
    let answers = c.bye().await.unwrap();
    assert!(matches!(&answers[..], [Answer::Acked(s)] if seqs(s) == [1, 2]));
    server.await.unwrap();
}

#[tokio::test]
async fn an_error_frame_ends_the_connection_with_the_servers_code() {
    let (l, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut p = accept(&l).await;
        p.welcome().await;
        p.send(ServerMessage::Pong).await;
        p.send(ServerMessage::Error {
            code: RejectCode::ServerShutdown,
            msg: "dbx is shutting down".into(),
        })
        .await;
    });
    let mut c: Client = connect(addr).await;
    assert!(matches!(c.recv().await.unwrap(), Answer::Pong));
    let e = c.recv().await.unwrap_err();
    assert_eq!(e.server_code(), Some(RejectCode::ServerShutdown));
    assert!(!e.is_fatal(), "a shutdown is worth a reconnect");
    server.await.unwrap();
}

#[tokio::test]
async fn what_a_lost_connection_left_unanswered_is_resent_first_on_fresh_seqs() {
    let (l, addr) = listen().await;
    let server = tokio::spawn(async move {
        // First connection: 3 batches arrive, only the first is acked, then it breaks.
        let mut p = accept(&l).await;
        p.welcome().await;
        for _ in 0..3 {
            p.batch().await;
        }
        p.send(ServerMessage::Ack { seq: 1 }).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(p);
        // Second: batches 2 and 3 again (2 and 3 points), as seqs 1 and 2, then the new one.
        let mut p = accept(&l).await;
        p.welcome().await;
        let got = [p.batch().await, p.batch().await, p.batch().await];
        assert_eq!(got, [(1, 2), (2, 3), (3, 4)]);
        p.send(ServerMessage::Ack { seq: 3 }).await;
    });
    let options = ConnectOptions::default();
    let mut c: Client<usize> = Client::connect(addr, KEY, &options).await.unwrap();
    for i in 1..=3 {
        c.send(batch(i), i).await.unwrap();
    }
    assert!(matches!(c.recv().await.unwrap(), Answer::Acked(s) if seqs(&s) == [1]));
    assert!(matches!(c.recv().await, Err(ClientError::Closed)));
    let mut resend = Resend::default();
    assert_eq!(resend.lost(c), 2);
    let mut c: Client<usize> = Client::connect(addr, KEY, &options).await.unwrap();
    assert_eq!(resend.send_some(&mut c, 8).await.unwrap(), 2);
    assert!(resend.is_empty());
    c.send(batch(4), 4).await.unwrap();
    let Answer::Acked(sent) = c.recv().await.unwrap() else {
        panic!("an ack")
    };
    assert_eq!(sent.iter().map(|s| s.tag).collect::<Vec<_>>(), [2, 3, 4]);
    server.await.unwrap();
}

#[tokio::test]
async fn frames_are_read_whole_however_they_arrive_and_oversized_ones_refused() {
    let (l, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut p = accept(&l).await;
        let mut out = BytesMut::new();
        dbx_proto::encode_server(&ServerMessage::Ack { seq: 7 }, &mut out);
        dbx_proto::encode_server(&ServerMessage::Pong, &mut out);
        // Byte by byte, with pauses: a reader cancelled between bytes loses nothing.
        for b in out.iter() {
            p.tcp.write_all(&[*b]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // A prefix announcing 16 MiB: refused at the prefix.
        p.tcp.write_all(&(16u32 << 20).to_be_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    let mut conn = Connection::open(addr, None).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        // Time out often, to cancel reads in the middle of frames.
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(1), conn.read_message()).await {
            got.push(m.unwrap());
        }
    }
    assert_eq!(got, [ServerMessage::Ack { seq: 7 }, ServerMessage::Pong]);
    let e = conn.read_message().await.unwrap_err();
    assert!(matches!(e, ClientError::Frame(_)), "{e:?}");
    server.await.unwrap();
}

#[tokio::test]
async fn udp_datagrams_go_out_in_both_forms() {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = sock.local_addr().unwrap();
    let aircraft = AircraftRef::Registration("N101DX".into());
    let pts = points(3);
    let limits = Limits::default();
    let mut buf = vec![0u8; 65_536];
    for auth in [UdpAuth::Key, UdpAuth::Mac] {
        let mut udp = UdpSender::bind(target, KEY, auth, Default::default())
            .await
            .unwrap();
        let n = udp.send(Some(9), &aircraft, ORG, &pts).await.unwrap();
        let (len, _) = sock.recv_from(&mut buf).await.unwrap();
        assert_eq!(len, n);
        let env = dbx_proto::open_datagram(&buf[..len]).unwrap();
        let hash = dbx_proto::mac::key_hash(KEY);
        match (auth, env.auth) {
            (UdpAuth::Key, DatagramAuth::Key(k)) => assert_eq!(k, KEY),
            (UdpAuth::Mac, DatagramAuth::Mac { kid, mac, body }) => {
                assert_eq!(kid, dbx_proto::mac::key_id(&hash));
                assert!(dbx_proto::mac::verify_body_mac(&hash, body, &mac));
                assert!(!String::from_utf8_lossy(&buf[..len]).contains(KEY));
            }
            other => panic!("unexpected {other:?}"),
        }
        let d = env.decode(&limits, dbx_core::now_micros()).unwrap();
        assert_eq!((d.seq, d.points.len(), d.session), (Some(9), 3, ORG));
    }
}
