//! UDP datagrams: one batch per datagram, fire and forget (no answer, no resend). Two
//! forms: the key in the datagram (protocol 1), or `kid`/`mac`/`body` (protocol 1.1),
//! where a key id and an HMAC of the body stand for the key, which never travels.

use std::net::SocketAddr;

use bytes::BytesMut;
use dbx_core::Point;
use dbx_proto::{AircraftRef, EncodeOptions};
use serde::Serialize;
use tokio::net::UdpSocket;
use uuid::Uuid;

use crate::ClientError;

/// How a datagram says which key sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UdpAuth {
    /// `kid`/`mac`/`body` (protocol 1.1): the key never travels.
    #[default]
    Mac,
    /// The key in clear (`key`, protocol 1).
    Key,
}

/// A UDP socket sending batches to the daemon with one key.
#[derive(Debug)]
pub struct UdpSender {
    socket: UdpSocket,
    target: SocketAddr,
    key: String,
    auth: UdpAuth,
    encode: EncodeOptions,
    out: BytesMut,
}

impl UdpSender {
    /// Binds an ephemeral local port (of `target`'s address family) for sending to
    /// `target`.
    pub async fn bind(
        target: SocketAddr,
        key: &str,
        auth: UdpAuth,
        encode: EncodeOptions,
    ) -> Result<UdpSender, ClientError> {
        let local: SocketAddr = if target.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        Ok(UdpSender {
            socket: UdpSocket::bind(local).await?,
            target,
            key: key.to_owned(),
            auth,
            encode,
            out: BytesMut::with_capacity(64 * 1024),
        })
    }

    /// Sends one batch as one datagram (`seq` is optional over UDP); returns its size.
    /// Keep batches small: a datagram holds at most 65 507 bytes.
    pub async fn send(
        &mut self,
        seq: Option<u64>,
        aircraft: &AircraftRef,
        session: Uuid,
        points: &[Point],
    ) -> Result<usize, ClientError> {
        self.out.clear();
        let encode = match self.auth {
            UdpAuth::Mac => dbx_proto::encode_datagram_mac,
            UdpAuth::Key => dbx_proto::encode_datagram,
        };
        encode(
            &mut self.out,
            &self.key,
            seq,
            aircraft,
            session,
            points,
            self.encode,
        )?;
        Ok(self.socket.send_to(&self.out, self.target).await?)
    }
}
