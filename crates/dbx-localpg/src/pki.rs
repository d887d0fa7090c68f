//! A private certificate authority for local clusters: `dbx demo --tls`, the test kit's TLS
//! cluster and the throughput harness run PostgreSQL with `ssl = on`, a server certificate
//! this CA signed (for `localhost` and `127.0.0.1`, so that clients can use
//! `sslmode=verify-full`), and client certificates for `cert` authentication. Keys are ECDSA
//! P-256, made with rcgen, and never leave the process except into the cluster's directory.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// The names the server certificate of a local cluster carries (it listens on 127.0.0.1).
pub const LOCAL_SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (`-----BEGIN CERTIFICATE-----`).
    pub cert_pem: String,
    /// Its private key (PKCS#8, `-----BEGIN PRIVATE KEY-----`).
    pub key_pem: String,
}

/// A certificate authority made in memory.
pub struct Pki {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

/// Certificate generation failed (only on a broken crypto provider).
#[derive(Debug, thiserror::Error)]
#[error("generating a certificate: {0}")]
pub struct PkiError(#[from] rcgen::Error);

impl Pki {
    /// A new CA whose subject is `CN=<name>`.
    pub fn new(name: &str) -> Result<Pki, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(Pki { cert, key })
    }

    /// The CA certificate, for `sslrootcert` and the server's `ssl_ca_file`.
    pub fn ca_pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str]) -> Result<Issued, PkiError> {
        let owned: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(owned)?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate whose common name is `user` (what `cert` authentication in
    /// pg_hba.conf compares with the user name).
    pub fn client(&self, user: &str) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, mut params: CertificateParams) -> Result<Issued, PkiError> {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
