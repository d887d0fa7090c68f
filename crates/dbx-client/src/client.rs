//! The protocol's client side on one connection: [`Client::connect`] (TCP or TLS, `hello`,
//! `welcome`), [`Client::send`] numbering every `batch` and `end` with the next `seq`,
//! [`Client::recv`] matching each `ack` and `nack` to what it answers, and
//! [`Client::bye`]. Everything sent stays owned by the client until it is answered, so
//! that after a lost connection [`Client::into_unanswered`] hands back exactly what must
//! be sent again (see [`Resend`](crate::Resend)).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dbx_core::{Point, RejectCode};
use dbx_proto::{AircraftRef, EncodeOptions, ServerMessage};
use uuid::Uuid;

use crate::{AckTracker, ClientError, Connection, Tls, Welcome};

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// TLS to the daemon's TLS port; `None` for plain TCP.
    pub tls: Option<Tls>,
    /// Free text naming the gateway in `hello` (at most 64 characters, no NUL).
    pub gateway: Option<String>,
    /// How points are encoded (map or array form, timestamps, UUIDs).
    pub encode: EncodeOptions,
    /// Most time for connecting and the handshake together.
    pub timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            tls: None,
            gateway: None,
            encode: EncodeOptions::default(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// A message that takes a `seq` and gets an `ack` or a `nack`.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// Points of one aircraft in one flight session.
    Batch {
        /// The aircraft: its id or its registration number.
        aircraft: AircraftRef,
        /// The flight session.
        session: Uuid,
        /// 1 ..= `welcome.max_points` points.
        points: Vec<Point>,
    },
    /// The flight session is over (protocol 1.1).
    End {
        /// The session.
        session: Uuid,
    },
}

impl Outgoing {
    /// The points it carries (none for an `end`).
    pub fn points(&self) -> &[Point] {
        match self {
            Outgoing::Batch { points, .. } => points,
            Outgoing::End { .. } => &[],
        }
    }

    /// Appends its frame with `seq`; on error nothing is appended.
    pub fn encode(
        &self,
        out: &mut BytesMut,
        seq: u64,
        opts: EncodeOptions,
    ) -> Result<(), ClientError> {
        match self {
            Outgoing::Batch {
                aircraft,
                session,
                points,
            } => dbx_proto::encode_batch_with(out, seq, aircraft, *session, points, opts)?,
            Outgoing::End { session } => dbx_proto::encode_end(out, seq, *session),
        }
        Ok(())
    }
}

/// A message sent and not yet answered, with the caller's tag.
#[derive(Debug)]
pub struct Sent<T> {
    /// Its `seq` on the connection it was sent on.
    pub seq: u64,
    /// When it was written (the ack latency starts here).
    pub sent_at: Instant,
    /// The message.
    pub msg: Outgoing,
    /// What the caller gave with it.
    pub tag: T,
}

/// What [`Client::recv`] read.
#[derive(Debug)]
pub enum Answer<T> {
    /// An `ack`: these messages are durable (one ack may cover several), in seq order.
    Acked(Vec<Sent<T>>),
    /// A `nack`: this message was refused as a whole; nothing of it is or will be stored.
    Nacked {
        /// The message refused.
        sent: Sent<T>,
        /// The server's code.
        code: RejectCode,
        /// The server's sentence naming what was wrong.
        msg: String,
        /// The first bad point, counted from 0, when one point is to blame.
        index: Option<u32>,
    },
    /// A `pong`.
    Pong,
}

/// A connected, welcomed gateway. `T` is what the caller keeps with every message until
/// its answer (a batch number, a receipt to complete; `()` when nothing).
#[derive(Debug)]
pub struct Client<T = ()> {
    conn: Connection,
    welcome: Welcome,
    tracker: AckTracker<Sent<T>>,
    last_seq: u64,
    encode: EncodeOptions,
    out: BytesMut,
}

impl<T> Client<T> {
    /// Connects to `addr` (TLS when `options.tls` is set), sends `hello` with `key` and
    /// waits for `welcome`. The server's refusal comes back as [`ClientError::Server`]
    /// with its code (`unauthorized`, `too_many_connections`, ...).
    pub async fn connect(
        addr: SocketAddr,
        key: &str,
        options: &ConnectOptions,
    ) -> Result<Client<T>, ClientError> {
        let handshake = async {
            let mut conn = Connection::open(addr, options.tls.as_ref()).await?;
            let welcome = conn.handshake(key, options.gateway.as_deref()).await?;
            Ok::<_, ClientError>(Client::welcomed(conn, welcome, options.encode))
        };
        tokio::time::timeout(options.timeout, handshake)
            .await
            .map_err(|_| ClientError::Timeout(options.timeout))?
    }

    /// A client over a connection whose handshake is done.
    pub fn welcomed(conn: Connection, welcome: Welcome, encode: EncodeOptions) -> Client<T> {
        Client {
            conn,
            welcome,
            tracker: AckTracker::default(),
            last_seq: 0,
            encode,
            out: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// What the server said in `welcome` (its limits).
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Messages sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }

    /// Sends `msg` with the next `seq`, which it returns; the client keeps `msg` and `tag`
    /// until the answer. On an encoding error nothing is sent; on an I/O error the
    /// message stays unanswered (the connection is lost: see [`Client::into_unanswered`]).
    pub async fn send(&mut self, msg: Outgoing, tag: T) -> Result<u64, ClientError> {
        let seq = self.last_seq + 1;
        self.out.clear();
        msg.encode(&mut self.out, seq, self.encode)?;
        self.last_seq = seq;
        let sent = Sent {
            seq,
            sent_at: Instant::now(),
            msg,
            tag,
        };
        self.tracker.sent(seq, sent);
        self.conn.write_all(&self.out).await?;
        Ok(seq)
    }

    /// Sends a `batch` of `points` (convenience over [`Client::send`]).
    pub async fn send_batch(
        &mut self,
        aircraft: AircraftRef,
        session: Uuid,
        points: Vec<Point>,
        tag: T,
    ) -> Result<u64, ClientError> {
        let msg = Outgoing::Batch {
            aircraft,
            session,
            points,
        };
        self.send(msg, tag).await
    }

    /// Sends `ping`; its `pong` comes from [`Client::recv`].
    pub async fn ping(&mut self) -> Result<(), ClientError> {
        self.out.clear();
        dbx_proto::encode_ping(&mut self.out);
        Ok(self.conn.write_all(&self.out).await?)
    }

    /// The next answer. An `error` frame is [`ClientError::Server`] (the connection is
    /// over). Cancel-safe: use it in `select!` beside sending.
    pub async fn recv(&mut self) -> Result<Answer<T>, ClientError> {
        let msg = self.conn.read_message().await?;
        self.answer(msg)
    }

    /// Matches one server message to what it answers.
    fn answer(&mut self, msg: ServerMessage) -> Result<Answer<T>, ClientError> {
        match msg {
            ServerMessage::Ack { seq } => Ok(Answer::Acked(
                self.tracker.ack(seq).map(|(_, sent)| sent).collect(),
            )),
            ServerMessage::Nack {
                seq,
                code,
                msg,
                index,
            } => match self.tracker.nack(seq) {
                Some(sent) => Ok(Answer::Nacked {
                    sent,
                    code,
                    msg,
                    index,
                }),
                None => Err(ClientError::Unexpected(ServerMessage::Nack {
                    seq,
                    code,
                    msg,
                    index,
                })),
            },
            ServerMessage::Pong => Ok(Answer::Pong),
            ServerMessage::Error { code, msg } => Err(ClientError::Server { code, msg }),
            other @ (ServerMessage::Welcome { .. } | ServerMessage::Bye) => {
                Err(ClientError::Unexpected(other))
            }
        }
    }

    /// Reads answers until everything sent is answered; returns them in order.
    pub async fn flush(&mut self) -> Result<Vec<Answer<T>>, ClientError> {
        let mut answers = Vec::new();
        while !self.tracker.is_empty() {
            answers.push(self.recv().await?);
        }
        Ok(answers)
    }

    /// Ends the connection gracefully: sends `bye`, reads the answers still due, then the
    /// server's `bye`. Returns those answers. On an error, what was unanswered is lost
    /// with the client: call [`Client::flush`] first when it must be resent.
    pub async fn bye(mut self) -> Result<Vec<Answer<T>>, ClientError> {
        self.out.clear();
        dbx_proto::encode_bye(&mut self.out);
        self.conn.write_all(&self.out).await?;
        let mut answers = Vec::new();
        loop {
            match self.conn.read_message().await? {
                ServerMessage::Bye => return Ok(answers),
                msg => answers.push(self.answer(msg)?),
            }
        }
    }

    /// What was sent and not answered, in seq order: after the connection is lost, none
    /// of it is known to be stored, and all of it must be sent again on a new connection
    /// (with new seqs; the daemon stores each point once).
    pub fn into_unanswered(self) -> impl DoubleEndedIterator<Item = Sent<T>> {
        self.tracker.unanswered().map(|(_, sent)| sent)
    }
}
