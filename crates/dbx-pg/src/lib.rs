//! # dbx-pg
//!
//! Connections to PostgreSQL, for every component of dbx: a connection string plus the TLS
//! settings given outside it become a [`Connector`], which makes tokio-postgres connections
//! ([`Connector::connect`], [`Connector::connect_raw`]) and deadpool pools
//! ([`Connector::pool`]) over rustls.
//!
//! The TLS settings are libpq's: `sslmode` (`disable`, `prefer` — the default —, `require`,
//! `verify-ca`, `verify-full`), `sslrootcert` (a PEM file, or `system` for the OS trust
//! store), `sslcert`/`sslkey` (a client certificate), and `sslnegotiation` (only `postgres`,
//! the negotiation PostgreSQL 15 speaks). They come from the connection string (URL query or
//! `key=value` form, see [`params`]) or from [`TlsOptions`] (dbx's `database.*` config keys);
//! a setting given both ways must have the same value, else the connector is refused with an
//! error naming both. With `require_tls` no connection is made without TLS: `prefer` is
//! upgraded to `require` (nothing, not even the user name, goes out before the handshake)
//! and `disable` is an error.
//!
//! libpq semantics kept: `prefer` tries TLS and falls back to plaintext when the server
//! declines or the handshake fails; `require` verifies the chain when an `sslrootcert` is
//! given; `sslrootcert=system` implies `verify-full` and refuses weaker modes (public CAs
//! sign certificates for any name, so only the host-name check makes them meaningful); a
//! client key readable by others is refused.

pub mod params;
mod policy;
mod tls;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::Host;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

pub use policy::{RootCert, SslMode, TlsOptions, TlsPolicy, Verification};
pub use tls::TlsStream;

/// A connection as tokio-postgres hands it out (poll it, or spawn it).
pub type PgConnection = tokio_postgres::Connection<tokio_postgres::Socket, TlsStream>;

/// What can go wrong making connections. Every message names where the setting came from
/// (`database.url`, `--database-url`, …) and never a password.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The connection string or a TLS setting is malformed, missing or contradictory.
    #[error("{origin}: {message}")]
    Settings {
        /// Where the connection string came from.
        origin: String,
        /// What is wrong, naming the parameter or key.
        message: String,
    },
    /// `require_tls` (or the sslmode) forbids the plaintext connection this would be.
    #[error("{origin}: refusing a plaintext connection to PostgreSQL at {host}:{port}: {reason}")]
    Plaintext {
        /// Where the connection string came from.
        origin: String,
        /// The host of the connection string.
        host: String,
        /// Its port.
        port: u16,
        /// Which setting refuses it, and why it would be plaintext.
        reason: String,
    },
    /// The TLS handshake failed.
    #[error("TLS with PostgreSQL at {host}:{port} ({origin}) failed: {reason}")]
    Tls {
        /// Where the connection string came from.
        origin: String,
        /// The host.
        host: String,
        /// The port.
        port: u16,
        /// The handshake's error, with what to change.
        reason: String,
    },
    /// Connecting failed otherwise (unreachable, refused by pg_hba.conf, wrong password, …).
    #[error("cannot connect to PostgreSQL at {host}:{port} ({origin}): {}", describe(.error))]
    Connect {
        /// Where the connection string came from.
        origin: String,
        /// The host.
        host: String,
        /// The port.
        port: u16,
        /// tokio-postgres's error (its SQLSTATE classifies it; already in the message, so
        /// not a `source` that error reporters would print twice).
        error: tokio_postgres::Error,
    },
}

impl PgError {
    /// The underlying tokio-postgres error of a failed connection attempt.
    pub fn pg_error(&self) -> Option<&tokio_postgres::Error> {
        match self {
            PgError::Connect { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// A tokio-postgres error with the server's message and SQLSTATE, which its `Display`
/// ("db error") hides, or with its causes.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        let text = inner.to_string();
        // tokio-postgres already prints its direct cause; do not repeat it.
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = inner.source();
    }
    s
}

/// Makes connections to one PostgreSQL connection string with its TLS settings.
#[derive(Clone)]
pub struct Connector {
    pg: tokio_postgres::Config,
    policy: Arc<TlsPolicy>,
    rustls: Option<MakeRustlsConnect>,
    origin: Arc<str>,
    options: TlsOptions,
    url_tls: Vec<(String, String)>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("origin", &self.origin)
            .field("host", &self.host())
            .field("port", &self.port())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// A [`PgError::Settings`] naming `origin`.
pub(crate) fn settings(origin: &str, message: impl Into<String>) -> PgError {
    PgError::Settings {
        origin: origin.to_string(),
        message: message.into(),
    }
}

impl Connector {
    /// A connector for `conn` (a URL or `key=value` string) with `options` on top; `origin`
    /// names where `conn` came from in error messages (`database.url`, `--database-url`).
    /// Certificate and key files are read here, so a bad path fails at once.
    pub fn new(conn: &str, options: &TlsOptions, origin: &str) -> Result<Connector, PgError> {
        let split = params::split(conn).map_err(|m| {
            settings(
                origin,
                format!("not a valid PostgreSQL connection string: {m}"),
            )
        })?;
        let pg: tokio_postgres::Config = split.rest.parse().map_err(|e| {
            settings(
                origin,
                format!(
                    "not a valid PostgreSQL connection string (postgresql://user:password@host:port/dbname): {e}"
                ),
            )
        })?;
        let url_tls = split
            .tls
            .iter()
            .filter(|(k, _)| k == "sslmode" || k == "sslrootcert")
            .cloned()
            .collect();
        Self::build(pg, &split, options, origin, url_tls)
    }

    /// A connector for an already built tokio-postgres configuration (no TLS parameters of its
    /// own; `options` give them).
    pub fn from_config(
        pg: tokio_postgres::Config,
        options: &TlsOptions,
        origin: &str,
    ) -> Result<Connector, PgError> {
        let none = params::Split {
            rest: String::new(),
            tls: Vec::new(),
        };
        Self::build(pg, &none, options, origin, Vec::new())
    }

    /// A connector for another connection string with the same options (e.g. a login
    /// user's URL built from the superuser's).
    pub fn sibling(&self, conn: &str, origin: &str) -> Result<Connector, PgError> {
        Connector::new(conn, &self.options, origin)
    }

    fn build(
        mut pg: tokio_postgres::Config,
        split: &params::Split,
        options: &TlsOptions,
        origin: &str,
        url_tls: Vec<(String, String)>,
    ) -> Result<Connector, PgError> {
        let policy = policy::resolve(split, options, origin)?;
        let (host, port) = first_host(&pg);
        if policy.mode == SslMode::Disable && policy.require_tls {
            return Err(PgError::Plaintext {
                origin: origin.into(),
                host,
                port,
                reason: "sslmode=disable, and database.require_tls = true allows only TLS \
                         (set sslmode=verify-full)"
                    .into(),
            });
        }
        use tokio_postgres::config::SslMode as Wire;
        pg.ssl_mode(match policy.mode {
            SslMode::Disable => Wire::Disable,
            SslMode::Prefer if !policy.require_tls => Wire::Prefer,
            _ => Wire::Require,
        });
        let rustls = match policy.mode {
            SslMode::Disable => None,
            _ => Some(MakeRustlsConnect::new(
                tls::client_config(&policy).map_err(|m| settings(origin, m))?,
            )),
        };
        Ok(Connector {
            pg,
            policy: Arc::new(policy),
            rustls,
            origin: origin.into(),
            options: options.clone(),
            url_tls,
        })
    }

    /// The tokio-postgres configuration (TLS parameters removed, sslmode mapped).
    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.pg
    }

    /// The same, to change the user, database, application name or timeouts.
    pub fn pg_config_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.pg
    }

    /// The TLS settings in force.
    pub fn policy(&self) -> &TlsPolicy {
        &self.policy
    }

    /// Where the connection string came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The first host (a name, an address, or a Unix socket directory).
    pub fn host(&self) -> String {
        first_host(&self.pg).0
    }

    /// The first port.
    pub fn port(&self) -> u16 {
        first_host(&self.pg).1
    }

    /// `sslmode` and `sslrootcert` as the connection string gave them, as a URL query (empty
    /// when it gave neither), for URLs made from this one for other users.
    pub fn url_tls_query(&self) -> String {
        params::query(&self.url_tls)
    }

    /// Connects, driving the connection on a background task.
    pub async fn connect(&self) -> Result<Client, PgError> {
        let (client, connection) = self.connect_raw().await?;
        let host = self.host();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%host, error = %e, "PostgreSQL connection closed");
            }
        });
        Ok(client)
    }

    /// Connects and hands out the connection (for `poll_message`, e.g. LISTEN).
    pub async fn connect_raw(&self) -> Result<(Client, PgConnection), PgError> {
        let (client, connection, _) = self
            .attempt(&self.pg)
            .await
            .map_err(|(e, handshake)| self.error(e, handshake))?;
        Ok((client, connection))
    }

    /// One connection attempt with libpq's `prefer` fallback: a failed handshake is retried
    /// without TLS (never under `require_tls`, which maps `prefer` to `require`).
    async fn attempt(
        &self,
        pg: &tokio_postgres::Config,
    ) -> Result<(Client, PgConnection, tls::Handshake), (tokio_postgres::Error, tls::Handshake)>
    {
        let tls = tls::Connector::new(self.rustls.clone(), self.policy.clone());
        let outcome = tls.outcome();
        match pg.connect(tls).await {
            Ok((c, conn)) => Ok((c, conn, outcome.get())),
            Err(e)
                if outcome.get() == tls::Handshake::Failed
                    && pg.get_ssl_mode() == tokio_postgres::config::SslMode::Prefer =>
            {
                tracing::warn!(
                    host = %self.host(), origin = %self.origin, error = %describe(&e),
                    "TLS handshake with PostgreSQL failed; connecting without TLS, as sslmode=prefer allows"
                );
                let mut plain = pg.clone();
                plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
                let tls = tls::Connector::new(None, self.policy.clone());
                match plain.connect(tls).await {
                    Ok((c, conn)) => Ok((c, conn, tls::Handshake::None)),
                    Err(e) => Err((e, tls::Handshake::None)),
                }
            }
            Err(e) => Err((e, outcome.get())),
        }
    }

    fn error(&self, e: tokio_postgres::Error, handshake: tls::Handshake) -> PgError {
        let (host, port) = first_host(&self.pg);
        let origin = self.origin.to_string();
        if handshake == tls::Handshake::Failed {
            return PgError::Tls {
                origin,
                host,
                port,
                reason: describe(&e),
            };
        }
        // tokio-postgres's words when the server answers the SSLRequest with 'N'.
        if describe(&e).contains("server does not support TLS") {
            let by = if self.policy.mode == SslMode::Prefer {
                "database.require_tls = true allows only TLS".to_string()
            } else {
                format!("sslmode={} allows only TLS", self.policy.mode)
            };
            return PgError::Plaintext {
                origin,
                host,
                port,
                reason: format!(
                    "the server does not accept TLS (ssl = off in its postgresql.conf), and {by}"
                ),
            };
        }
        PgError::Connect {
            origin,
            host,
            port,
            error: e,
        }
    }

    /// A deadpool pool of at most `max_size` connections made like [`Connector::connect`]
    /// (waiting and creating time out after 10 s).
    pub fn pool(&self, max_size: usize) -> Result<Pool, PgError> {
        let manager = Manager::from_connect(
            self.pg.clone(),
            PoolConnect(self.clone()),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(max_size)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(10)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| settings(&self.origin, format!("building the connection pool: {e}")))
    }
}

/// The pool's way of connecting: the connector's, with the pool's copy of the configuration.
struct PoolConnect(Connector);

type PoolConnectFuture<'a> = Pin<
    Box<
        dyn std::future::Future<
                Output = Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
            > + Send
            + 'a,
    >,
>;

impl deadpool_postgres::Connect for PoolConnect {
    fn connect(&self, pg: &tokio_postgres::Config) -> PoolConnectFuture<'_> {
        let pg = pg.clone();
        Box::pin(async move {
            let (client, connection, _) = self.0.attempt(&pg).await.map_err(|(e, _)| e)?;
            let host = self.0.host();
            let driver = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(%host, error = %e, "pooled PostgreSQL connection failed");
                }
            });
            Ok((client, driver))
        })
    }
}

fn first_host(pg: &tokio_postgres::Config) -> (String, u16) {
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => pg
            .get_hostaddrs()
            .first()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "localhost".into()),
    };
    (host, pg.get_ports().first().copied().unwrap_or(5432))
}

#[cfg(test)]
mod tests;
