//! Unit tests of the settings: parsing, merging, libpq's rules, and the errors' wording.
//! Connections to a real server are tested in tests/tls.

use super::*;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use serde::Deserialize;

/// A throwaway CA certificate file (its key is not needed: nothing is signed here).
fn ca_file(dir: &std::path::Path) -> PathBuf {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    let path = dir.join("ca.pem");
    std::fs::write(&path, cert.pem()).unwrap();
    path
}

/// A client certificate and key, the key with `mode`.
fn client_files(dir: &std::path::Path, mode: u32) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["dbx_cert_user".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (c, k) = (dir.join("client.pem"), dir.join("client.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(mode)).unwrap();
    (c, k)
}

fn err(conn: &str, options: &TlsOptions) -> String {
    Connector::new(conn, options, "database.url")
        .unwrap_err()
        .to_string()
}

const URL: &str = "postgresql://dbx_ingest_service:s3cret@db.example:6432/dbx_aviation";

#[test]
fn verify_full_from_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_file(dir.path());
    let url = format!("{URL}?sslmode=verify-full&sslrootcert={}", ca.display());
    let c = Connector::new(&url, &TlsOptions::default(), "database.url").unwrap();
    assert_eq!(c.policy().mode, SslMode::VerifyFull);
    assert_eq!(c.policy().root, Some(RootCert::File(ca.clone())));
    assert_eq!(c.policy().verification(), Verification::Full);
    assert_eq!(
        c.pg_config().get_ssl_mode(),
        tokio_postgres::config::SslMode::Require
    );
    assert_eq!((c.host().as_str(), c.port()), ("db.example", 6432));
    assert_eq!(c.pg_config().get_dbname(), Some("dbx_aviation"));
    // URLs derived from this one carry the mode and the CA, encoded.
    let q = c.url_tls_query();
    let again = params::split(&format!("postgresql://h/d?{q}")).unwrap();
    assert_eq!(again.get("sslmode"), Some("verify-full"));
    assert_eq!(again.get("sslrootcert"), Some(ca.to_str().unwrap()));
    assert!(c
        .policy()
        .describe_verification()
        .starts_with("verified: chain to sslrootcert="));
}

#[test]
fn the_key_value_form_works_too() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_file(dir.path());
    let conn = format!(
        "host=127.0.0.1 port=5433 user=u password='a b' dbname=d sslmode=verify-ca sslrootcert='{}'",
        ca.display()
    );
    let c = Connector::new(&conn, &TlsOptions::default(), "--database-url").unwrap();
    assert_eq!(c.policy().verification(), Verification::Chain);
    assert_eq!(c.pg_config().get_password(), Some(&b"a b"[..]));
}

#[test]
fn prefer_is_the_default_and_require_tls_upgrades_it() {
    let c = Connector::new(URL, &TlsOptions::default(), "database.url").unwrap();
    assert_eq!(c.policy().mode, SslMode::Prefer);
    assert_eq!(c.policy().verification(), Verification::None);
    assert_eq!(
        c.pg_config().get_ssl_mode(),
        tokio_postgres::config::SslMode::Prefer
    );
    let strict = TlsOptions {
        require_tls: true,
        ..TlsOptions::default()
    };
    let c = Connector::new(URL, &strict, "database.url").unwrap();
    assert_eq!(
        c.pg_config().get_ssl_mode(),
        tokio_postgres::config::SslMode::Require
    );
    assert!(c.policy().describe_verification().contains("NOT verified"));
}

#[test]
fn require_tls_refuses_sslmode_disable_naming_host_and_setting_not_the_password() {
    let strict = TlsOptions {
        require_tls: true,
        ..TlsOptions::default()
    };
    let e = err(&format!("{URL}?sslmode=disable"), &strict);
    assert!(e.contains("db.example:6432"), "{e}");
    assert!(e.contains("database.require_tls"), "{e}");
    assert!(e.contains("database.url"), "{e}");
    assert!(!e.contains("s3cret"), "{e}");
}

#[test]
fn config_keys_apply_and_conflicts_name_both() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_file(dir.path());
    let options = TlsOptions {
        sslmode: Some(SslMode::VerifyFull),
        sslrootcert: Some(ca.display().to_string()),
        ..TlsOptions::default()
    };
    let c = Connector::new(URL, &options, "database.url").unwrap();
    assert_eq!(c.policy().mode, SslMode::VerifyFull);
    // Only what the URL gave is carried into derived URLs.
    assert_eq!(c.url_tls_query(), "");
    // The same value in both places is fine.
    assert!(Connector::new(&format!("{URL}?sslmode=verify-full"), &options, "x").is_ok());
    let e = err(&format!("{URL}?sslmode=require"), &options);
    assert!(
        e.contains("sslmode=require in the connection string")
            && e.contains("database.sslmode = \"verify-full\""),
        "{e}"
    );
    let e = err(&format!("{URL}?sslrootcert=/other/ca.pem"), &options);
    assert!(
        e.contains("sslrootcert=/other/ca.pem") && e.contains("database.sslrootcert"),
        "{e}"
    );
}

#[test]
fn libpq_rules_for_modes_and_roots() {
    let none = TlsOptions::default();
    let e = err(&format!("{URL}?sslmode=verify-full"), &none);
    assert!(e.contains("sslmode=verify-full needs sslrootcert"), "{e}");
    let e = err(&format!("{URL}?sslmode=verify-ca"), &none);
    assert!(e.contains("needs sslrootcert"), "{e}");
    let e = err(&format!("{URL}?sslmode=allow"), &none);
    assert!(e.contains("not one of disable, prefer, require"), "{e}");
    let e = err(&format!("{URL}?sslrootcert=system&sslmode=require"), &none);
    assert!(
        e.contains("sslrootcert=system needs sslmode=verify-full"),
        "{e}"
    );
    // require with a root file verifies the chain, as libpq does.
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_file(dir.path());
    let c = Connector::new(
        &format!("{URL}?sslmode=require&sslrootcert={}", ca.display()),
        &none,
        "x",
    )
    .unwrap();
    assert_eq!(c.policy().verification(), Verification::Chain);
    let e = err(
        &format!("{URL}?sslmode=require&sslrootcert=/no/such/ca.pem"),
        &none,
    );
    assert!(
        e.contains("sslrootcert=/no/such/ca.pem: cannot read"),
        "{e}"
    );
    std::fs::write(dir.path().join("empty.pem"), "nothing").unwrap();
    let e = err(
        &format!(
            "{URL}?sslmode=require&sslrootcert={}/empty.pem",
            dir.path().display()
        ),
        &none,
    );
    assert!(e.contains("holds no PEM certificate"), "{e}");
}

#[test]
fn system_roots_default_to_verify_full() {
    // The OS store may be empty on a minimal machine; the mode is decided either way.
    let split = params::split(&format!("{URL}?sslrootcert=system")).unwrap();
    let p = policy::resolve(&split, &TlsOptions::default(), "x").unwrap();
    assert_eq!(
        (p.mode, p.root),
        (SslMode::VerifyFull, Some(RootCert::System))
    );
}

#[test]
fn sslnegotiation_direct_is_refused_clearly() {
    let e = err(
        &format!("{URL}?sslnegotiation=direct"),
        &TlsOptions::default(),
    );
    assert!(
        e.contains("sslnegotiation=direct is not supported") && e.contains("PostgreSQL 17"),
        "{e}"
    );
    assert!(Connector::new(
        &format!("{URL}?sslnegotiation=postgres"),
        &TlsOptions::default(),
        "x"
    )
    .is_ok());
}

#[test]
fn client_certificates_need_both_files_and_a_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = client_files(dir.path(), 0o600);
    let url = format!(
        "{URL}?sslmode=require&sslcert={}&sslkey={}",
        cert.display(),
        key.display()
    );
    let c = Connector::new(&url, &TlsOptions::default(), "x").unwrap();
    assert_eq!(c.policy().client_cert, Some((cert.clone(), key.clone())));
    let e = err(
        &format!("{URL}?sslcert={}", cert.display()),
        &TlsOptions::default(),
    );
    assert!(e.contains("sslcert is set but sslkey is not"), "{e}");
    // libpq refuses a key others can read; so do we.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = err(&url, &TlsOptions::default());
    assert!(
        e.contains("group or world access") && e.contains("chmod 600"),
        "{e}"
    );
}

#[test]
fn a_failed_handshake_is_explained_by_the_setting_at_fault() {
    let policy = TlsPolicy {
        mode: SslMode::VerifyFull,
        root: Some(RootCert::File("/etc/dbx/pg-ca.pem".into())),
        client_cert: None,
        require_tls: false,
    };
    let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let unknown = tls::explain(
        &io(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        )),
        "db.example",
        &policy,
    );
    assert!(
        unknown.contains("sslrootcert=/etc/dbx/pg-ca.pem"),
        "{unknown}"
    );
    let name = tls::explain(
        &io(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName,
        )),
        "db.example",
        &policy,
    );
    assert!(
        name.contains("does not name the host \"db.example\"") && name.contains("verify-full"),
        "{name}"
    );
    let alert = tls::explain(
        &io(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired,
        )),
        "db.example",
        &policy,
    );
    assert!(alert.contains("set sslcert and sslkey"), "{alert}");
}

#[test]
fn sslmode_reads_as_config_values_do() {
    use serde::de::value::{Error, StrDeserializer};
    let m = SslMode::deserialize(StrDeserializer::<Error>::new("verify-full")).unwrap();
    assert_eq!(m, SslMode::VerifyFull);
    assert!(SslMode::deserialize(StrDeserializer::<Error>::new("verify_full")).is_err());
    for m in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
        assert_eq!(m.parse::<SslMode>().unwrap().as_str(), m);
    }
}

#[test]
fn describe_does_not_repeat_the_cause() {
    let e = "postgresql://h/d?connect_timeout=x"
        .parse::<tokio_postgres::Config>()
        .unwrap_err();
    let d = describe(&e);
    assert_eq!(d.matches("connect_timeout").count(), 1, "{d}");
}
