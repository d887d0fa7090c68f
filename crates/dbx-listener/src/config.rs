//! Listener settings, the `[listener]` section of `config/dbx.toml`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use dbx_core::ConfigError;

/// `[listener]`: binds, limits and timeouts. Every limit has a default a gateway
/// author can rely on (docs/protocol.md states the protocol's own defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    /// Plain TCP bind address (docs/protocol.md: 0.0.0.0:7070).
    pub tcp_bind: String,
    /// Serve plain TCP on `tcp_bind`; `false` serves TLS only (the plain port is not
    /// opened) and then needs `tls_cert` and `tls_key`.
    pub plaintext: bool,
    /// TLS bind address; only used when `tls_cert` and `tls_key` are set.
    pub tls_bind: String,
    /// PEM certificate chain for TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    pub tls_key: Option<PathBuf>,
    /// UDP bind address; empty disables UDP.
    pub udp_bind: String,
    /// Accept UDP datagrams that carry the API key in clear (`key`, the v1 form);
    /// `false` accepts only the `kid`/`mac`/`body` form of docs/protocol.md, 1.1.
    pub udp_plain_key: bool,
    /// Most TCP+TLS connections at once, pending and established; the next one is
    /// refused (plain TCP: `error too_many_connections`; TLS: closed).
    pub max_connections: usize,
    /// Most connections that have not completed their handshake (TLS and `hello`).
    pub max_pending_handshakes: usize,
    /// Most such connections from one source address (IPv6: one /64).
    pub max_pending_per_ip: usize,
    /// Largest frame body accepted (`L`), bytes.
    pub max_frame_bytes: usize,
    /// Largest first frame (`hello`) before `welcome`, bytes; larger is `frame_too_large`.
    pub max_hello_bytes: usize,
    /// Most keys per point that go to `extra` (unknown keys plus entries of `x`).
    pub max_extra_keys: usize,
    /// Most points in one batch.
    pub max_points_per_batch: usize,
    /// Time allowed between connect and `hello`, milliseconds.
    pub handshake_timeout_ms: u64,
    /// A connection that sends nothing this long is closed, milliseconds.
    pub idle_timeout_ms: u64,
    /// A write the peer does not take within this long closes the connection, ms.
    pub write_timeout_ms: u64,
    /// Batches a connection may have accepted but not yet acked; at the limit its reads pause.
    pub max_inflight_batches: usize,
    /// Oldest accepted point timestamp, seconds before now.
    pub max_past_secs: u64,
    /// Newest accepted point timestamp, seconds after now.
    pub max_future_secs: u64,
    /// Register unknown aircraft registrations for the key's organization instead of nacking.
    pub auto_register_aircraft: bool,
    /// Full reload of the key/aircraft cache at least this often, seconds (changes
    /// arrive within a second through LISTEN/NOTIFY; this is the safety net).
    pub auth_refresh_secs: u64,
    /// Most flight sessions remembered for the ownership check.
    pub session_cache_capacity: usize,
    /// How long shutdown waits for accepted batches to be acked, milliseconds.
    pub drain_timeout_ms: u64,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            tcp_bind: "0.0.0.0:7070".into(),
            plaintext: true,
            tls_bind: "0.0.0.0:7443".into(),
            tls_cert: None,
            tls_key: None,
            udp_bind: "0.0.0.0:7071".into(),
            udp_plain_key: true,
            max_connections: 10_000,
            max_pending_handshakes: 1_024,
            max_pending_per_ip: 64,
            max_frame_bytes: 1 << 20,
            max_hello_bytes: 4_096,
            max_extra_keys: 256,
            max_points_per_batch: 10_000,
            handshake_timeout_ms: 5_000,
            idle_timeout_ms: 60_000,
            write_timeout_ms: 10_000,
            max_inflight_batches: 64,
            max_past_secs: 7 * 24 * 3600,
            max_future_secs: 300,
            auto_register_aircraft: false,
            auth_refresh_secs: 60,
            session_cache_capacity: 100_000,
            drain_timeout_ms: 20_000,
        }
    }
}

impl ListenerConfig {
    /// Checks values serde cannot; the error names the key within `[listener]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("max_connections", self.max_connections as u64),
            ("max_pending_handshakes", self.max_pending_handshakes as u64),
            ("max_pending_per_ip", self.max_pending_per_ip as u64),
            ("max_frame_bytes", self.max_frame_bytes as u64),
            ("max_hello_bytes", self.max_hello_bytes as u64),
            ("write_timeout_ms", self.write_timeout_ms),
            ("max_points_per_batch", self.max_points_per_batch as u64),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("max_inflight_batches", self.max_inflight_batches as u64),
            ("session_cache_capacity", self.session_cache_capacity as u64),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        if self.max_frame_bytes > u32::MAX as usize {
            return Err(ConfigError::new("max_frame_bytes", "must fit in 32 bits"));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            let missing = if self.tls_cert.is_some() {
                "tls_key"
            } else {
                "tls_cert"
            };
            return Err(ConfigError::new(
                missing,
                "listener.tls_cert and listener.tls_key must be set together",
            ));
        }
        if !self.plaintext && self.tls_cert.is_none() {
            return Err(ConfigError::new(
                "plaintext",
                "is false (TLS only), so listener.tls_cert and listener.tls_key must be set",
            ));
        }
        if self.max_hello_bytes > self.max_frame_bytes {
            return Err(ConfigError::new(
                "max_hello_bytes",
                format!(
                    "({}) must not exceed listener.max_frame_bytes ({})",
                    self.max_hello_bytes, self.max_frame_bytes
                ),
            ));
        }
        Ok(())
    }

    /// The protocol limits derived from this config.
    pub fn limits(&self) -> dbx_proto::Limits {
        dbx_proto::Limits {
            max_points_per_batch: self.max_points_per_batch,
            max_past: Duration::from_secs(self.max_past_secs),
            max_future: Duration::from_secs(self.max_future_secs),
            max_frame_bytes: self.max_frame_bytes,
            max_extra_keys: self.max_extra_keys,
            max_hello_bytes: self.max_hello_bytes,
        }
    }

    /// `handshake_timeout_ms` as a Duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// `idle_timeout_ms` as a Duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// `write_timeout_ms` as a Duration.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    /// `drain_timeout_ms` as a Duration.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}
