//! The TLS files of `deploy/postgresql/`, run for real: `make-certs.sh` makes a CA, a server
//! certificate and a client certificate; a private cluster runs with `tls.conf` (its paths
//! pointed at those files) and `pg_hba.conf` as shipped, plus the one `cert` line its comment
//! describes; dbx's connector gets in with `sslmode=verify-full`, with a password or a client
//! certificate, and plaintext is refused with PostgreSQL's own reason.

use std::process::Command;

use dbx_pg::{Connector, TlsOptions};

use crate::{deploy_cluster, include_conf, is_root, pg_dir, read, repo, run_ok};

const CERT_USER: &str = "dbx_ops_cert_user";

fn make_certs(args: &[&str]) -> String {
    let mut cmd = Command::new(repo().join("deploy/postgresql/make-certs.sh"));
    cmd.args(args);
    if is_root() {
        cmd.env("PG_OWNER", "postgres");
    }
    run_ok(&mut cmd)
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let c = Connector::new(url, &TlsOptions::default(), "test").map_err(|e| e.to_string())?;
    c.connect().await.map_err(|e| e.to_string())
}

/// The error of a connection that must fail.
async fn refused(url: &str) -> String {
    match connect(url).await {
        Ok(_) => panic!("connected, but should have been refused"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_tls_files_make_a_tls_only_server_dbx_reaches_with_verify_full() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = pg_dir(tmp.path());
    let (ca, srv, cli) = (root.join("ca"), root.join("tls"), root.join("client"));
    let s = |p: &std::path::Path| p.display().to_string();
    let made = make_certs(&["server", &s(&ca), &s(&srv), "localhost", "127.0.0.1"]);
    assert!(made.contains("DNS:localhost,IP:127.0.0.1"), "{made}");
    make_certs(&["client", &s(&ca), &s(&cli), CERT_USER]);
    // Idempotent: a second run keeps the certificate.
    let again = make_certs(&["server", &s(&ca), &s(&srv), "localhost"]);
    assert!(again.contains("kept"), "{again}");

    let cluster = deploy_cluster(root.join("pg"));
    let pgdata = cluster.dir().join("pgdata");
    let shipped = read("deploy/postgresql/pg_hba.conf");
    let example = "#hostssl   dbx_aviation dbx_ingest_service 10.0.0.0/8 cert";
    assert!(shipped.contains(example), "pg_hba.conf shows a cert line");
    let hba = shipped.replace(
        example,
        &format!("hostssl all {CERT_USER} 127.0.0.1/32 cert"),
    );
    std::fs::write(pgdata.join("dbx-pg_hba.conf"), hba).expect("write pg_hba.conf");
    let shipped = read("deploy/postgresql/tls.conf");
    let mut tls_conf = shipped.replace("/etc/postgresql/tls", &s(&srv));
    assert_ne!(
        tls_conf, shipped,
        "tls.conf names its files under /etc/postgresql/tls"
    );
    tls_conf.push_str(&format!(
        "hba_file = '{}'\n",
        pgdata.join("dbx-pg_hba.conf").display()
    ));
    include_conf(&pgdata, "dbx-tls.conf", &tls_conf);
    pg_dir(cluster.dir());
    cluster.start().expect("start the TLS cluster");

    let base = |user: &str| {
        format!(
            "postgresql://{user}:{}@127.0.0.1:{}/postgres",
            cluster.password(),
            cluster.port()
        )
    };
    let ca_file = srv.join("ca.crt");
    let verify_full = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        base("postgres"),
        ca_file.display()
    );
    let su = connect(&verify_full).await.expect("verify-full connection");
    for (setting, want) in [
        ("ssl", "on"),
        ("ssl_min_protocol_version", "TLSv1.2"),
        ("ssl_ciphers", "ECDHE+AESGCM:ECDHE+CHACHA20"),
        ("password_encryption", "scram-sha-256"),
    ] {
        let got: String = su
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .expect("SHOW")
            .get(0);
        assert_eq!(got, want, "{setting} from deploy/postgresql/tls.conf");
    }
    let row = su
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("TLSv1.3"));

    // Plaintext: refused by pg_hba.conf before a password is asked.
    let e = refused(&format!("{}?sslmode=disable", base("postgres"))).await;
    assert!(
        e.contains("pg_hba.conf rejects connection") && e.contains("no encryption"),
        "{e}"
    );

    // A client certificate from make-certs.sh client, for a `cert` line.
    su.batch_execute(&format!("CREATE ROLE {CERT_USER} LOGIN"))
        .await
        .expect("create role");
    let cert_url = format!(
        "postgresql://{CERT_USER}@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        cluster.port(),
        ca_file.display()
    );
    let with_cert = format!(
        "{cert_url}&sslcert={}&sslkey={}",
        cli.join(format!("{CERT_USER}.crt")).display(),
        cli.join(format!("{CERT_USER}.key")).display()
    );
    let c = connect(&with_cert).await.expect("client certificate login");
    let dn: Option<String> = c
        .query_one(
            "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert_eq!(dn.as_deref(), Some(format!("/CN={CERT_USER}").as_str()));
    let e = refused(&cert_url).await;
    assert!(e.contains("requires a valid client certificate"), "{e}");
    cluster.stop().ok();
}
