//! The TLS settings of one connection string: libpq's `sslmode`, `sslrootcert`, `sslcert`,
//! `sslkey` and `sslnegotiation` from the string, merged with the same settings given as
//! options (dbx's `database.*` keys, where a disagreement is an error naming both), checked
//! against libpq's rules, into the [`TlsPolicy`] a connector enforces.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{params, settings, PgError};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, else plaintext (libpq's default).
    Prefer,
    /// TLS; the certificate is checked only when an `sslrootcert` is given.
    Require,
    /// TLS; the certificate chain must lead to a CA in `sslrootcert`.
    VerifyCa,
    /// TLS; the chain must lead to a CA in `sslrootcert` and the certificate name the host.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq accepts `allow` (plaintext first); dbx never tries plaintext first.
            _ => {
                return Err(format!(
                    "sslmode={s} is not one of disable, prefer, require, verify-ca, verify-full"
                ))
            }
        })
    }
}

/// Where the CA certificates that verify the server come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of one or more CA certificates.
    File(PathBuf),
    /// The operating system's trust store (`sslrootcert=system`).
    System,
}

impl RootCert {
    fn parse(value: &str) -> RootCert {
        if value == "system" {
            RootCert::System
        } else {
            RootCert::File(PathBuf::from(value))
        }
    }
}

impl fmt::Display for RootCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RootCert::File(p) => write!(f, "{}", p.display()),
            RootCert::System => f.write_str("system (the OS trust store)"),
        }
    }
}

/// TLS settings given outside the connection string: dbx's `database.sslmode`,
/// `database.sslrootcert`, `database.sslcert`, `database.sslkey` and `database.require_tls`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// `database.sslmode`.
    pub sslmode: Option<SslMode>,
    /// `database.sslrootcert`: a PEM file or `system`.
    pub sslrootcert: Option<String>,
    /// `database.sslcert`.
    pub sslcert: Option<PathBuf>,
    /// `database.sslkey`.
    pub sslkey: Option<PathBuf>,
    /// `database.require_tls`: refuse any connection without TLS.
    pub require_tls: bool,
}

/// The TLS settings in force for one connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPolicy {
    /// The sslmode.
    pub mode: SslMode,
    /// The CAs that verify the server, when any do.
    pub root: Option<RootCert>,
    /// Client certificate and key files.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// `database.require_tls`.
    pub require_tls: bool,
}

/// How much of the server's certificate a policy verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verification {
    /// Nothing: the connection is encrypted (when TLS is used) to whoever answers.
    None,
    /// The chain to a trusted CA, not the host name.
    Chain,
    /// The chain and the host name.
    Full,
}

impl TlsPolicy {
    /// What this policy verifies of the server's certificate.
    pub fn verification(&self) -> Verification {
        match (self.mode, &self.root) {
            (SslMode::Disable, _) | (_, None) => Verification::None,
            (SslMode::VerifyFull, Some(_)) => Verification::Full,
            (_, Some(_)) => Verification::Chain,
        }
    }

    /// One line on what the server's certificate is checked against, for reports.
    pub fn describe_verification(&self) -> String {
        let root = self
            .root
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_default();
        match self.verification() {
            Verification::Full => format!(
                "verified: chain to sslrootcert={root} and host name (sslmode={})",
                self.mode
            ),
            Verification::Chain => format!(
                "chain verified to sslrootcert={root}, host name not checked (sslmode={})",
                self.mode
            ),
            Verification::None if self.mode == SslMode::Disable => {
                "not verified (sslmode=disable)".into()
            }
            Verification::None => format!(
                "NOT verified (sslmode={} without sslrootcert accepts any certificate; use \
                 sslmode=verify-full)",
                self.mode
            ),
        }
    }
}

/// A setting given in the connection string and as an option must agree.
fn merge(
    origin: &str,
    key: &str,
    in_url: Option<&str>,
    option: Option<String>,
) -> Result<Option<String>, PgError> {
    match (in_url, option) {
        (Some(u), Some(o)) if u != o => Err(settings(
            origin,
            format!(
                "{key}={u} in the connection string conflicts with database.{key} = {o:?}; \
                 give it in one place (or the same value in both)"
            ),
        )),
        (Some(u), _) => Ok(Some(u.to_string())),
        (None, o) => Ok(o),
    }
}

/// The policy from the connection string's TLS parameters and the options.
pub(crate) fn resolve(
    split: &params::Split,
    options: &TlsOptions,
    origin: &str,
) -> Result<TlsPolicy, PgError> {
    negotiation(split.get("sslnegotiation"), origin)?;
    let mode = merge(
        origin,
        "sslmode",
        split.get("sslmode"),
        options.sslmode.map(|m| m.to_string()),
    )?
    .map(|m| m.parse::<SslMode>().map_err(|e| settings(origin, e)))
    .transpose()?;
    let root = merge(
        origin,
        "sslrootcert",
        split.get("sslrootcert"),
        options.sslrootcert.clone(),
    )?
    .filter(|r| !r.is_empty())
    .map(|r| RootCert::parse(&r));
    let path = |p: &PathBuf| p.display().to_string();
    let cert = merge(
        origin,
        "sslcert",
        split.get("sslcert"),
        options.sslcert.as_ref().map(path),
    )?;
    let key = merge(
        origin,
        "sslkey",
        split.get("sslkey"),
        options.sslkey.as_ref().map(path),
    )?;
    let mode = match (mode, &root) {
        (None, Some(RootCert::System)) => SslMode::VerifyFull,
        (Some(m), Some(RootCert::System)) if m != SslMode::VerifyFull && m != SslMode::Disable => {
            return Err(settings(
                origin,
                format!(
                    "sslrootcert=system needs sslmode=verify-full, not {m}: the OS trust store's \
                     public CAs sign certificates for any name, so only the host-name check \
                     makes them a verification"
                ),
            ))
        }
        (m, _) => m.unwrap_or(SslMode::Prefer),
    };
    if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root.is_none() {
        return Err(settings(
            origin,
            format!(
                "sslmode={mode} needs sslrootcert: the CA certificate file (PEM) that signed the \
                 server's certificate, or `system` for the OS trust store"
            ),
        ));
    }
    let client_cert = match (cert, key) {
        (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
        (None, None) => None,
        (Some(_), None) => return Err(settings(origin, "sslcert is set but sslkey is not")),
        (None, Some(_)) => return Err(settings(origin, "sslkey is set but sslcert is not")),
    };
    Ok(TlsPolicy {
        mode,
        root,
        client_cert,
        require_tls: options.require_tls,
    })
}

/// `sslnegotiation`: PostgreSQL 15 knows only the SSLRequest negotiation (`postgres`).
fn negotiation(value: Option<&str>, origin: &str) -> Result<(), PgError> {
    match value {
        None | Some("postgres") => Ok(()),
        Some("direct") => Err(settings(
            origin,
            "sslnegotiation=direct is not supported: direct TLS negotiation needs \
             PostgreSQL 17, and dbx speaks the standard negotiation of PostgreSQL 15 \
             (remove sslnegotiation, or set it to postgres)",
        )),
        Some(other) => Err(settings(
            origin,
            format!("sslnegotiation={other} is not one of postgres, direct"),
        )),
    }
}
