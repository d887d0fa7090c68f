//! The TCP framing of docs/protocol.md: a 4-byte unsigned big-endian length `L`, then `L`
//! bytes of body.
//!
//! [`FrameCodec`] splits frames off the read buffer without copying, refuses `L = 0`
//! and `L > max_frame_bytes` as soon as the prefix is in (before any of the body
//! arrives), and reserves buffer space only for the announced length. Errors are
//! final: the decoder does not consume the offending prefix, and the connection is
//! expected to answer with an `error` frame and close.

use bytes::{BufMut, BytesMut};
use dbx_core::{RejectCode, Rejection};
use tokio_util::codec::{Decoder, Encoder};

use crate::encode::encode_server;
use crate::message::ServerMessage;

/// Bytes in the length prefix.
pub const PREFIX_LEN: usize = 4;

/// A framing error on the read side.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A frame announced an empty body (`bad_frame`).
    #[error("zero-length frame")]
    ZeroLength,
    /// A frame announced a body larger than allowed (`frame_too_large`).
    #[error("frame of {len} bytes exceeds {limit} = {max}")]
    TooLarge {
        /// The announced length.
        len: u32,
        /// The limit.
        max: usize,
        /// The limit's configuration key (`max_frame_bytes`, or `max_hello_bytes`
        /// before `welcome`).
        limit: &'static str,
    },
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// The rejection to answer with, or `None` for an I/O error (nothing to answer).
    pub fn rejection(&self) -> Option<Rejection> {
        match self {
            FrameError::ZeroLength => Some(Rejection::new(
                RejectCode::BadFrame,
                "the frame has length 0; a frame holds exactly one MessagePack map",
            )),
            FrameError::TooLarge { len, max, limit } => Some(Rejection::new(
                RejectCode::FrameTooLarge,
                format!("the frame announces {len} bytes; {limit} is {max}"),
            )),
            FrameError::Io(_) => None,
        }
    }
}

/// Length-prefixed frame codec. Decodes frame bodies; encodes [`ServerMessage`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameCodec {
    /// Largest accepted body (the prefix not counted); a body of exactly this size is
    /// accepted.
    pub max_frame_bytes: usize,
    /// The configuration key of that limit, for messages.
    pub limit_name: &'static str,
}

impl FrameCodec {
    /// A codec refusing bodies over `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameCodec {
            max_frame_bytes,
            limit_name: "max_frame_bytes",
        }
    }

    /// The codec of a connection before `welcome`: bodies over `max_hello_bytes` are
    /// refused (docs/protocol.md, 1.1).
    pub fn for_hello(max_hello_bytes: usize) -> Self {
        FrameCodec {
            max_frame_bytes: max_hello_bytes,
            limit_name: "max_hello_bytes",
        }
    }

    /// The body length the next frame in `src` announces, once its 4-byte prefix is
    /// there, checked against the limit; nothing is consumed or reserved. Lets a
    /// reader decide how much to buffer (and charge) before it reads a body.
    pub fn announced(&self, src: &[u8]) -> Result<Option<usize>, FrameError> {
        let Some(prefix) = src.get(..PREFIX_LEN) else {
            return Ok(None);
        };
        let mut len_bytes = [0u8; PREFIX_LEN];
        len_bytes.copy_from_slice(prefix);
        let len = u32::from_be_bytes(len_bytes);
        if len == 0 {
            return Err(FrameError::ZeroLength);
        }
        if len as usize > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_bytes,
                limit: self.limit_name,
            });
        }
        Ok(Some(len as usize))
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(crate::Limits::default().max_frame_bytes)
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        let Some(len) = self.announced(src)? else {
            return Ok(None);
        };
        let total = PREFIX_LEN + len;
        if src.len() < total {
            // Room for the rest of this frame only: the limit above bounds it.
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(total);
        let _ = frame.split_to(PREFIX_LEN);
        Ok(Some(frame))
    }
}

impl Encoder<&ServerMessage> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: &ServerMessage, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_server(item, dst);
        Ok(())
    }
}

/// Appends `body` to `dst` as one frame (prefix and body).
///
/// # Panics
/// If `body` is 4 GiB or more, which no frame can be.
pub fn write_frame(dst: &mut BytesMut, body: &[u8]) {
    let len = u32::try_from(body.len()).expect("a frame body is below 4 GiB");
    dst.reserve(PREFIX_LEN + body.len());
    dst.put_u32(len);
    dst.put_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_frames_and_waits_for_more() {
        let mut c = FrameCodec::new(16);
        let mut buf = BytesMut::new();
        buf.put_slice(&[0, 0, 0, 3, 1, 2]);
        assert!(c.decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() >= 7);
        buf.put_slice(&[3, 0, 0, 0, 1, 9]);
        assert_eq!(&c.decode(&mut buf).unwrap().unwrap()[..], &[1, 2, 3]);
        assert_eq!(&c.decode(&mut buf).unwrap().unwrap()[..], &[9]);
        assert!(c.decode(&mut buf).unwrap().is_none());
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_before_the_body() {
        let mut c = FrameCodec::new(16);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 17][..]);
        match c.decode(&mut buf) {
            Err(FrameError::TooLarge {
                len: 17,
                max: 16,
                limit: "max_frame_bytes",
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
        // Nothing was reserved for the refused body.
        assert!(buf.capacity() < 17);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 16][..]);
        assert!(c.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn the_hello_codec_names_its_limit() {
        let c = FrameCodec::for_hello(4096);
        assert_eq!(c.announced(&[0, 0, 16, 0]).unwrap(), Some(4096));
        let e = c.announced(&[0, 0, 16, 1]).unwrap_err();
        assert_eq!(
            e.rejection().unwrap().msg,
            "the frame announces 4097 bytes; max_hello_bytes is 4096"
        );
        assert_eq!(c.announced(&[0, 0, 16]).unwrap(), None);
    }

    #[test]
    fn zero_length_is_an_error() {
        let mut c = FrameCodec::new(16);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert!(matches!(c.decode(&mut buf), Err(FrameError::ZeroLength)));
        assert_eq!(
            FrameError::ZeroLength.rejection().unwrap().code,
            RejectCode::BadFrame
        );
    }
}
