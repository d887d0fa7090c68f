//! TLS to the broker (`mqtts://`): rustls with the ring provider, like the rest of the
//! daemon. The broker is verified against `mqtt.ca_file`, or the system's trust store
//! when none is set; `mqtt.client_cert`/`client_key` add a client certificate.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ConfigError, MqttConfig};

fn err(key: &'static str, path: &Path, why: impl std::fmt::Display) -> ConfigError {
    ConfigError::new(key, format!("{}: {why}", path.display()))
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = std::fs::read(path).map_err(|e| err(key, path, e))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(key, path, e))?;
    if certs.is_empty() {
        return Err(err(key, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let pem = std::fs::read(path).map_err(|e| err("client_key", path, e))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| err("client_key", path, e))?
        .ok_or_else(|| err("client_key", path, "holds no PEM private key"))
}

/// The rustls client configuration for the broker.
pub(crate) fn client_config(cfg: &MqttConfig) -> Result<rustls::ClientConfig, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            for c in certs("ca_file", path)? {
                roots.add(c).map_err(|e| err("ca_file", path, e))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(ConfigError::new(
                    "ca_file",
                    "is not set and the system trust store holds no certificate; set it to the broker's CA",
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new("url", format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots);
    match (&cfg.client_cert, &cfg.client_key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(certs("client_cert", cert)?, private_key(key)?)
            .map_err(|e| err("client_key", key, e)),
        _ => Ok(builder.with_no_client_auth()),
    }
}
