//! rustls for connections to PostgreSQL: the client configuration an `sslmode` asks for, and
//! the `MakeTlsConnect` handed to tokio-postgres.
//!
//! Verification follows libpq. `verify-full` checks the chain to `sslrootcert` and that the
//! certificate names the host; `verify-ca` checks the chain only; `require` and `prefer`
//! check nothing unless an `sslrootcert` is given, in which case they check the chain like
//! `verify-ca` (libpq does the same when it finds a root certificate file). The handshake
//! signatures are verified in every mode, so even an unverified connection is encrypted to
//! whoever holds the presented certificate's key. The crypto provider is ring, as for the
//! gateway-facing TLS listener.
//!
//! The connector wraps tokio-postgres-rustls (which also gives SCRAM channel binding) to
//! record whether a handshake happened and to explain a failed one in terms of the settings
//! (a certificate not issued by a CA in `sslrootcert`, a host name the certificate does not
//! carry, a client certificate the server refused).

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::Socket;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{RootCert, SslMode, TlsPolicy};

/// The TLS stream of a connection to PostgreSQL.
pub type TlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

type RustlsConnect = <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration for `policy`; the error names the setting at fault.
pub(crate) fn client_config(policy: &TlsPolicy) -> Result<ClientConfig, String> {
    let provider = provider();
    let roots = match &policy.root {
        Some(root) => Some(Arc::new(load_roots(root)?)),
        None => None,
    };
    let verifier = Arc::new(Verifier {
        roots,
        check_host: policy.mode == SslMode::VerifyFull,
        provider: provider.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS protocol versions: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match &policy.client_cert {
        Some((cert, key)) => {
            let chain = read_certs(cert, "sslcert")?;
            check_key_permissions(key)?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("sslkey={}: no usable private key: {e}", key.display()))?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                format!("sslcert/sslkey: {e} (does the key belong to the certificate?)")
            })
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{key}={}: cannot read certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{key}={}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

fn load_roots(root: &RootCert) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match root {
        RootCert::File(path) => {
            for cert in read_certs(path, "sslrootcert")? {
                store.add(cert).map_err(|e| {
                    format!(
                        "sslrootcert={}: not a usable CA certificate: {e}",
                        path.display()
                    )
                })?;
            }
        }
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "sslrootcert=system: part of the OS trust store could not be read");
            }
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "sslrootcert=system: the OS trust store has no certificates \
                     (install the ca-certificates package, or set SSL_CERT_FILE)"
                        .into(),
                );
            }
        }
    }
    Ok(store)
}

/// libpq's rule for `sslkey`: a key file owned by us must not be readable by group or others
/// (0600 or less); one owned by root may be group-readable (0640 or less).
pub(crate) fn check_key_permissions(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("sslkey={}: cannot read: {e}", path.display()))?;
    let mode = meta.mode() & 0o777;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let too_open = if meta.uid() == euid && euid != 0 {
        mode & 0o077 != 0
    } else if meta.uid() == 0 {
        mode & 0o037 != 0
    } else {
        false
    };
    if too_open {
        return Err(format!(
            "sslkey={}: the private key file has group or world access (mode {mode:04o}); \
             it must be 0600 or less when owned by the current user, or 0640 or less when \
             owned by root (chmod 600 {})",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// The server-certificate check of one `sslmode` (see the module documentation).
#[derive(Debug)]
struct Verifier {
    /// `None`: the certificate is not checked (require/prefer without sslrootcert).
    roots: Option<Arc<RootCertStore>>,
    /// verify-full: the certificate must name the host.
    check_host: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if self.check_host {
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What happened to the TLS handshake of one connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handshake {
    /// None was attempted (sslmode=disable, or the server answered the SSLRequest with 'N').
    None,
    /// It completed.
    Done,
    /// It was attempted and failed.
    Failed,
}

/// The handshake outcome of one attempt, shared with the connector that made it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outcome(Arc<AtomicU8>);

impl Outcome {
    fn set(&self, h: Handshake) {
        self.0.store(h as u8, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> Handshake {
        match self.0.load(Ordering::Relaxed) {
            1 => Handshake::Done,
            2 => Handshake::Failed,
            _ => Handshake::None,
        }
    }
}

/// The `MakeTlsConnect` of one connection attempt.
#[derive(Clone)]
pub(crate) struct Connector {
    rustls: Option<MakeRustlsConnect>,
    policy: Arc<TlsPolicy>,
    outcome: Outcome,
}

impl Connector {
    /// `rustls` is `None` for sslmode=disable (tokio-postgres then never starts a handshake).
    pub(crate) fn new(rustls: Option<MakeRustlsConnect>, policy: Arc<TlsPolicy>) -> Self {
        Connector {
            rustls,
            policy,
            outcome: Outcome::default(),
        }
    }

    pub(crate) fn outcome(&self) -> Outcome {
        self.outcome.clone()
    }
}

impl MakeTlsConnect<Socket> for Connector {
    type Stream = TlsStream;
    type TlsConnect = Connect;
    type Error = std::convert::Infallible;

    fn make_tls_connect(&mut self, host: &str) -> Result<Connect, Self::Error> {
        let inner = match self.rustls.as_mut() {
            Some(r) => {
                Some(<MakeRustlsConnect as MakeTlsConnect<Socket>>::make_tls_connect(r, host)?)
            }
            None => None,
        };
        Ok(Connect {
            inner,
            host: host.to_string(),
            policy: self.policy.clone(),
            outcome: self.outcome.clone(),
        })
    }
}

/// One handshake.
pub(crate) struct Connect {
    inner: Option<RustlsConnect>,
    host: String,
    policy: Arc<TlsPolicy>,
    outcome: Outcome,
}

type HandshakeFuture = Pin<Box<dyn Future<Output = io::Result<TlsStream>> + Send>>;

impl TlsConnect<Socket> for Connect {
    type Stream = TlsStream;
    type Error = io::Error;
    type Future = HandshakeFuture;

    fn connect(self, stream: Socket) -> HandshakeFuture {
        Box::pin(async move {
            let Some(inner) = self.inner else {
                return Err(io::Error::other("TLS is off (sslmode=disable)"));
            };
            match inner.connect(stream).await {
                Ok(s) => {
                    self.outcome.set(Handshake::Done);
                    Ok(s)
                }
                Err(e) => {
                    self.outcome.set(Handshake::Failed);
                    let why = explain(&e, &self.host, &self.policy);
                    Err(io::Error::new(e.kind(), why))
                }
            }
        })
    }
}

/// A failed handshake in terms of the settings that decide it.
pub(crate) fn explain(e: &io::Error, host: &str, policy: &TlsPolicy) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    let root = policy
        .root
        .as_ref()
        .map(|r| r.to_string())
        .unwrap_or_default();
    let hint = match tls {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "sslmode=verify-full: the server's certificate does not name the host {host:?} of \
             the connection; connect by a name or address the certificate lists, or use \
             sslmode=verify-ca to check the chain only"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
            | CertificateError::BadSignature
            | CertificateError::InvalidPurpose
            | CertificateError::InvalidPurposeContext { .. },
        ) => format!(
            "the server's certificate is not issued by a CA in sslrootcert={root}; point \
             sslrootcert at the CA that signed the server's certificate"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => "the server's certificate is outside its validity period (or this clock is wrong)"
            .to_string(),
        rustls::Error::AlertReceived(_) => match &policy.client_cert {
            Some((cert, _)) => format!(
                "the server refused the handshake; if it asks for a client certificate, it does \
                 not accept sslcert={}",
                cert.display()
            ),
            None => "the server refused the handshake; if it asks for a client certificate, \
                     set sslcert and sslkey"
                .to_string(),
        },
        _ => return tls.to_string(),
    };
    format!("{tls} ({hint})")
}
