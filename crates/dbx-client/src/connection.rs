//! One framed connection to the daemon, below the protocol's rules: a stream (plain TCP
//! or TLS), the client side's only frame reader ([`dbx_proto::FrameCodec`] over a read
//! buffer, so reading is cancel-safe) and raw writes. [`Client`](crate::Client) builds
//! the protocol on it; tests use it directly to send what a well-behaved client never
//! would.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use dbx_proto::{FrameCodec, ServerMessage};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder;
use uuid::Uuid;

use crate::{ClientError, Tls};

/// Largest server frame body read. The daemon's frames are small (a `nack` quotes at
/// most 40 characters of a wire value); the bound keeps a wrong peer from making the
/// client buffer without limit.
pub const MAX_SERVER_FRAME_BYTES: usize = 64 * 1024;

/// Anything a connection can run over: a `TcpStream`, a TLS stream, a test's duplex.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// What the server said in `welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// Protocol version (1).
    pub v: u64,
    /// The organization the key belongs to.
    pub org: Uuid,
    /// Largest frame body the server reads (`listener.max_frame_bytes`).
    pub max_frame: u32,
    /// Most points per batch (`listener.max_points_per_batch`).
    pub max_points: u32,
}

impl From<Welcome> for ServerMessage {
    fn from(w: Welcome) -> Self {
        ServerMessage::Welcome {
            v: w.v,
            org: w.org,
            max_frame: w.max_frame,
            max_points: w.max_points,
        }
    }
}

/// A framed connection: raw writes, one server message per read. Over a boxed stream
/// (TCP or TLS) by default; any [`Stream`], borrowed ones too, works.
pub struct Connection<S: Stream = Box<dyn Stream>> {
    stream: S,
    read_buf: BytesMut,
    codec: FrameCodec,
}

impl<S: Stream> std::fmt::Debug for Connection<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("buffered", &self.read_buf.len())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to `addr` (no delay on the socket: frames go out when written), through
    /// TLS when `tls` is given.
    pub async fn open(addr: SocketAddr, tls: Option<&Tls>) -> Result<Connection, ClientError> {
        let failed = |source| ClientError::Connect { addr, source };
        let tcp = TcpStream::connect(addr).await.map_err(failed)?;
        tcp.set_nodelay(true).map_err(failed)?;
        let stream: Box<dyn Stream> = match tls {
            None => Box::new(tcp),
            Some(tls) => Box::new(
                tls.connector
                    .connect(tls.server_name.clone(), tcp)
                    .await
                    .map_err(failed)?,
            ),
        };
        Ok(Connection::over(stream))
    }
}

impl<S: Stream> Connection<S> {
    /// Wraps an already connected stream.
    pub fn over(stream: S) -> Connection<S> {
        Connection {
            stream,
            read_buf: BytesMut::with_capacity(4096),
            codec: FrameCodec::new(MAX_SERVER_FRAME_BYTES),
        }
    }

    /// Sends `hello` and reads the answer: the [`Welcome`], or the server's `error` as
    /// [`ClientError::Server`].
    pub async fn handshake(
        &mut self,
        key: &str,
        gateway: Option<&str>,
    ) -> Result<Welcome, ClientError> {
        let mut hello = BytesMut::new();
        dbx_proto::encode_hello(&mut hello, key, gateway);
        self.write_all(&hello).await?;
        match self.read_message().await? {
            ServerMessage::Welcome {
                v,
                org,
                max_frame,
                max_points,
            } => Ok(Welcome {
                v,
                org,
                max_frame,
                max_points,
            }),
            ServerMessage::Error { code, msg } => Err(ClientError::Server { code, msg }),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Writes `bytes` as they are (one or more frames, or anything at all) and flushes.
    pub async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// The next server message. An `error` frame comes back as a message (the server
    /// closes after it); [`ClientError::Closed`] when the server closed (at a frame
    /// boundary or in the middle of one). Cancel-safe: a partial frame stays buffered.
    pub async fn read_message(&mut self) -> Result<ServerMessage, ClientError> {
        loop {
            if let Some(body) = self.codec.decode(&mut self.read_buf)? {
                return Ok(dbx_proto::decode_server(&body)?);
            }
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    /// Reads and discards until the server closes; true if it did within `limit`.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        self.read_buf.clear();
        tokio::time::timeout(limit, async {
            let mut sink = [0u8; 1024];
            while let Ok(1..) = self.stream.read(&mut sink).await {}
        })
        .await
        .is_ok()
    }
}
