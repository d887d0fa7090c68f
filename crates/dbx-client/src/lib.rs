//! # dbx-client
//!
//! The gateway side of the dbx wire protocol (docs/protocol.md), for Rust gateways and
//! for dbx's own tools: connect over TCP or TLS, `hello`/`welcome`, send batches and
//! `end`s numbered with increasing `seq`s, match every cumulative `ack` and every `nack`
//! to what it answers, `bye`; after a lost connection, resend what was not answered, on
//! new seqs ([`Resend`]). UDP datagrams in both forms ([`UdpSender`]). The client does
//! no validation of points: the daemon's `nack` says what it refused, and why.
//!
//! - [`Client`]: one connection, what is in flight on it, its answers ([`Answer`]).
//! - [`AckTracker`]: seqs in flight, matched to `ack`s (cumulative) and `nack`s.
//! - [`Resend`]: the unanswered messages of a lost connection, sent first on the next.
//! - [`Connection`]: the framed stream under a client (the one frame reader,
//!   [`dbx_proto::FrameCodec`]); tests use it to send raw bytes.
//! - [`Tls`], [`tls::client_config`]: rustls trusting a CA file.
//! - [`UdpSender`], [`UdpAuth`]: fire-and-forget datagrams.
//! - [`loadgen`] and [`sim`]: the simulated gateway fleet of `dbx loadgen`, `dbx demo`
//!   and the throughput harness, built on the above.
//!
//! ## Example
//!
//! Connect, send a batch of points, wait for its ack, say bye:
//!
//! ```no_run
//! use dbx_client::{AircraftRef, Answer, Client, ClientError, ConnectOptions, Point};
//!
//! # async fn gateway() -> Result<(), ClientError> {
//! let addr = "127.0.0.1:7070".parse().unwrap();
//! let key = std::env::var("DBX_API_KEY").unwrap();
//! let mut client: Client = Client::connect(addr, &key, &ConnectOptions::default()).await?;
//!
//! let session = uuid::Uuid::new_v4(); // one per flight
//! let now = dbx_client::now_micros();
//! let points: Vec<Point> = (0..10)
//!     .map(|i| Point {
//!         ts_micros: now + i * 100_000,
//!         seq: i,
//!         lat: Some(47.377 + i as f64 * 1e-5),
//!         lon: Some(8.5418),
//!         alt: Some(420.0),
//!         ..Point::default()
//!     })
//!     .collect();
//! let aircraft = AircraftRef::Registration("N101DX".into());
//! let seq = client.send_batch(aircraft, session, points, ()).await?;
//!
//! match client.recv().await? {
//!     Answer::Acked(sent) => assert!(sent.iter().any(|s| s.seq == seq)), // durable
//!     Answer::Nacked { code, msg, index, .. } => {
//!         eprintln!("refused ({code}, point {index:?}): {msg}"); // do not resend as is
//!     }
//!     Answer::Pong => {}
//! }
//! client.bye().await?;
//! # Ok(())
//! # }
//! ```
//!
//! A long-lived gateway keeps several batches in flight (`send` while
//! [`Client::in_flight`] is below its window, `recv` in a `select!` beside it), and on
//! any error but [`ClientError::is_fatal`] reconnects with backoff, giving the lost
//! client to [`Resend::lost`] and sending [`Resend::pop`] first on the next one.

pub mod client;
pub mod connection;
pub mod error;
pub mod loadgen;
pub mod resend;
pub mod sim;
pub mod tls;
pub mod tracker;
pub mod udp;

pub use client::{Answer, Client, ConnectOptions, Outgoing, Sent};
pub use connection::{Connection, Stream, Welcome};
pub use error::ClientError;
pub use resend::Resend;
pub use tls::{tls_connector, Tls};
pub use tracker::AckTracker;
pub use udp::{UdpAuth, UdpSender};

pub use dbx_core::{now_micros, Point, RejectCode};
pub use dbx_proto::{AircraftRef, EncodeOptions, PointForm, TimestampForm};
