//! TLS to the daemon: a rustls client (ring provider) trusting the CA certificates of
//! a PEM file, as a gateway verifies dbx. The load generator's MQTT fleet uses the same
//! client configuration for an `mqtts://` broker.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::ClientError;

/// What a TLS connection needs: the connector and the server name to verify.
#[derive(Clone)]
pub struct Tls {
    pub(crate) connector: TlsConnector,
    pub(crate) server_name: ServerName<'static>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// TLS trusting the PEM certificates in `ca`, verifying `server_name` (a DNS name
    /// or an IP address).
    pub fn from_ca_file(ca: &Path, server_name: &str) -> Result<Tls, ClientError> {
        Tls::new(Arc::new(client_config(ca)?), server_name)
    }

    /// TLS with a rustls configuration of the caller's (client certificates, the OS trust
    /// store, ...), verifying `server_name`.
    pub fn new(config: Arc<rustls::ClientConfig>, server_name: &str) -> Result<Tls, ClientError> {
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| ClientError::Tls(format!("server name {server_name:?}: {e}")))?;
        Ok(Tls {
            connector: TlsConnector::from(config),
            server_name,
        })
    }
}

/// A TLS connector trusting the PEM certificates in `ca` (for callers that make their
/// own streams; [`Tls`] is the usual way).
pub fn tls_connector(ca: &Path) -> Result<TlsConnector, ClientError> {
    Ok(TlsConnector::from(Arc::new(client_config(ca)?)))
}

/// A rustls client configuration (ring provider, safe default versions) trusting the
/// PEM certificates in `ca`; the error names the file.
pub fn client_config(ca: &Path) -> Result<rustls::ClientConfig, ClientError> {
    let bad = |reason: String| ClientError::CaFile {
        path: ca.to_owned(),
        reason,
    };
    let pem = std::fs::read(ca).map_err(|e| bad(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
