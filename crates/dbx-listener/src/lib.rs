//! # dbx-listener
//!
//! Accepts gateways and turns their frames into [`dbx_core::TelemetryBatch`]es on a
//! bounded channel, then delivers the batcher's verdicts back as `ack`/`nack`.
//! Builds no SQL for telemetry: it only reads keys, aircraft and session owners,
//! and records handshakes.
//!
//! - [`config`]: listener settings (binds, limits, timeouts, TLS paths).
//! - [`auth`]: the key → organization cache (SHA-256 hashes), refreshed by LISTEN/NOTIFY.
//! - [`admit`]: aircraft and session ownership of a batch, for every input (MQTT too).
//! - [`connection`]: one TCP/TLS connection: framing, handshake, batches, acks in order.
//! - [`tcp`] / [`udp`]: the servers.
//! - [`slots`]: connection, pending-handshake and per-address limits.
//! - [`budget`]: the byte budget every frame and decoded batch is charged against.
//! - [`ratelimit`]: per-organization token buckets.
//! - [`metrics`] / [`events`]: metric names and HELP; the events that log and count
//!   together (refusals, drops, timeouts).
//! - [`orgmetrics`]: per-organization metrics and their label policy, for every input.
//! - [`audit`]: batched `api_requests` rows for every handshake, off the hot path.
//!
//! [`Listener`] binds everything and runs it until shutdown, then drains: it stops
//! accepting and reading, waits for the batcher's verdicts on everything accepted,
//! sends `error server_shutdown`, and returns once every connection has closed.

pub mod admit;
pub mod audit;
pub mod auth;
pub mod budget;
pub mod config;
pub mod connection;
pub mod events;
pub mod metrics;
pub mod orgmetrics;
pub mod ratelimit;
pub mod slots;
pub mod tcp;
pub mod udp;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use dbx_core::{Shutdown, TelemetryBatch};

pub use audit::HandshakeLog;
pub use auth::AuthCache;
pub use budget::ByteBudget;
pub use config::ListenerConfig;
use connection::Shared;
pub use orgmetrics::{OrgCounters, OrgMetrics};
pub use ratelimit::RateLimiter;

/// Failures while starting the listener.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// The configuration is unusable; the error names the key.
    #[error(transparent)]
    Config(dbx_core::ConfigError),
    /// A socket could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// tcp / tls / udp.
        what: &'static str,
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The bound servers, ready to run.
pub struct Listener {
    shared: Shared,
    /// The plain TCP port; `None` with `listener.plaintext = false`.
    tcp: Option<TcpListener>,
    tls: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
    udp: Option<Arc<UdpSocket>>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("tcp", &self.tcp_addr())
            .field("tls", &self.tls_addr())
            .field("udp", &self.udp_addr())
            .finish()
    }
}

async fn bind_tcp(what: &'static str, addr: &str) -> Result<TcpListener, ListenerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ListenerError::Bind {
            what,
            addr: addr.to_string(),
            source,
        })
}

impl Listener {
    /// Validates the config and binds every configured socket (port 0 picks a free
    /// one: see [`Listener::tcp_addr`] and friends). Frames and batches are charged
    /// against `budget` (`limits.max_buffered_bytes`).
    pub async fn bind(
        config: ListenerConfig,
        auth: Arc<AuthCache>,
        batches: mpsc::Sender<TelemetryBatch>,
        handshakes: HandshakeLog,
        org_metrics: Arc<OrgMetrics>,
        budget: ByteBudget,
    ) -> Result<Listener, ListenerError> {
        config
            .validate()
            .map_err(|e| ListenerError::Config(e.in_section("listener")))?;
        let tcp = if config.plaintext {
            Some(bind_tcp("tcp", &config.tcp_bind).await?)
        } else {
            None
        };
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                let acceptor = tcp::tls_acceptor(cert, key)
                    .map_err(|e| ListenerError::Config(e.in_section("listener")))?;
                Some((bind_tcp("tls", &config.tls_bind).await?, acceptor))
            }
            _ => None,
        };
        // Series that count rare events start at 0 for each open port, so that a
        // dashboard shows "none" rather than "no data" until the first one.
        for (open, transport) in [(tcp.is_some(), "tcp"), (tls.is_some(), "tls")] {
            if open {
                crate::metrics::zero_write_timeouts(transport);
            }
        }
        let udp = if config.udp_bind.is_empty() {
            None
        } else {
            let s =
                UdpSocket::bind(&config.udp_bind)
                    .await
                    .map_err(|source| ListenerError::Bind {
                        what: "udp",
                        addr: config.udp_bind.clone(),
                        source,
                    })?;
            // A larger receive buffer absorbs bursts while the loop is busy.
            let sock = socket2::SockRef::from(&s);
            let _ = sock.set_recv_buffer_size(8 << 20);
            Some(Arc::new(s))
        };
        Ok(Listener {
            shared: Shared {
                config: Arc::new(config),
                auth,
                limiter: Arc::new(RateLimiter::new()),
                batches,
                handshakes,
                org_metrics,
                budget,
            },
            tcp,
            tls,
            udp,
        })
    }

    /// The per-organization rate limiter, for other inputs (MQTT) to share: an
    /// organization's `ingest_points_per_sec` covers all its traffic.
    pub fn rate_limiter(&self) -> Arc<RateLimiter> {
        self.shared.limiter.clone()
    }

    /// The plain TCP address (`None` when serving TLS only).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The TLS address, when TLS is configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The UDP address, when UDP is enabled.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// Serves until `shutdown` fires, then drains every connection and returns.
    /// The listener's clone of the batch sender is dropped on return, so once every
    /// connection has ended the batcher sees its queue closed.
    pub async fn run(self, shutdown: Shutdown) {
        let Listener {
            shared,
            tcp,
            tls,
            udp,
        } = self;
        let cfg = &shared.config;
        let slots = slots::Slots::new(
            cfg.max_connections,
            cfg.max_pending_handshakes,
            cfg.max_pending_per_ip,
        );
        let tracker = TaskTracker::new();
        let mut servers = Vec::new();
        let ports = tcp
            .map(|l| (l, None))
            .into_iter()
            .chain(tls.map(|(l, acceptor)| (l, Some(acceptor))));
        for (l, acceptor) in ports {
            servers.push(tokio::spawn(tcp::serve(
                l,
                acceptor,
                shared.clone(),
                slots.clone(),
                tracker.clone(),
                shutdown.clone(),
            )));
        }
        if let Some(sock) = udp {
            servers.push(tokio::spawn(udp::serve(
                sock,
                shared.clone(),
                shutdown.clone(),
            )));
        }
        drop(shared);
        for s in servers {
            let _ = s.await;
        }
        tracker.close();
        tracker.wait().await;
    }
}
