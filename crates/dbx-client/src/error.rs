//! The one error type of the client: what went wrong connecting, in the handshake or
//! on an established connection, with the server's own `code` and `msg` when it said
//! why.

use std::path::PathBuf;

use dbx_core::RejectCode;
use dbx_proto::{EncodeError, FrameError, ServerDecodeError, ServerMessage};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection (or the TLS handshake) could not be made.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: std::net::SocketAddr,
        /// What the socket said.
        source: std::io::Error,
    },
    /// The CA certificate file could not be read or holds no usable certificate.
    #[error("{path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A TLS setting is unusable (a server name that is not a DNS name or an IP address,
    /// a provider without a safe protocol version).
    #[error("TLS: {0}")]
    Tls(String),
    /// The server sent an `error` frame and closes the connection: at `hello` (for
    /// example `unauthorized`, `unsupported_version`, `too_many_connections`) or later
    /// (`server_shutdown`, `idle_timeout`, ...). Act on `code`.
    #[error("the server closed the connection with error {code}: {msg}")]
    Server {
        /// The server's code.
        code: RejectCode,
        /// The server's sentence naming what was wrong.
        msg: String,
    },
    /// The server closed the connection without an `error` frame.
    #[error("the server closed the connection")]
    Closed,
    /// Connecting or the handshake took longer than allowed.
    #[error("no welcome within {0:?}")]
    Timeout(std::time::Duration),
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent a frame whose length prefix is unusable.
    #[error("bad frame from the server: {0}")]
    Frame(FrameError),
    /// The server sent a frame that is not a server message.
    #[error("bad message from the server: {0}")]
    Decode(#[from] ServerDecodeError),
    /// The server sent a message the protocol does not allow at this point (a second
    /// `welcome`, a `nack` for a seq not in flight, anything but `welcome` to `hello`).
    #[error("unexpected message from the server: {0:?}")]
    Unexpected(ServerMessage),
    /// A batch could not be encoded (an `extra` that is not a JSON object).
    #[error("cannot encode the batch: {0}")]
    Encode(#[from] EncodeError),
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(e) => ClientError::Io(e),
            other => ClientError::Frame(other),
        }
    }
}

impl ClientError {
    /// The server's code when it refused with an `error` frame.
    pub fn server_code(&self) -> Option<RejectCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True when reconnecting cannot help: the key was refused, or the server does not
    /// speak this protocol version. Everything else (a lost connection, a shutdown, too
    /// many connections) is worth a retry with backoff.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self.server_code(),
            Some(RejectCode::Unauthorized | RejectCode::UnsupportedVersion)
        )
    }
}
