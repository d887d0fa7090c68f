//! The local servers for real: a plaintext cluster that starts, serves SQL, stops and
//! comes back with its data and password; a TLS-only cluster that a verify-full client
//! reaches and a plaintext one cannot; a Mosquitto broker that listens, restarts on its
//! ports and stops.

use std::net::TcpStream;
use std::path::Path;

use dbx_localpg::broker::{BrokerOptions, LocalBroker};
use dbx_localpg::cluster::{ClusterOptions, ClusterTls, LocalCluster};
use dbx_pg::{Connector, TlsOptions};

async fn client(url: &str) -> Result<tokio_postgres::Client, dbx_pg::PgError> {
    Connector::new(url, &TlsOptions::default(), "test")?
        .connect()
        .await
}

async fn query_one(url: &str, sql: &str) -> Result<String, dbx_pg::PgError> {
    let row = client(url).await?.query_one(sql, &[]).await.expect(sql);
    Ok(row.get(0))
}

/// The data directory must be one `postgres` can enter when we run as root.
fn cluster_dir(tmp: &Path, name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    tmp.join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_cluster_starts_serves_stops_and_restarts_with_its_data() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = cluster_dir(tmp.path(), "pg");
    let cluster = LocalCluster::init(ClusterOptions::for_tests(dir.clone())).unwrap();
    cluster.start().unwrap();
    assert!(cluster.is_running());
    assert!(cluster.ca_file().is_none());
    let url = cluster.superuser_url("postgres");
    client(&url)
        .await
        .unwrap()
        .batch_execute("CREATE TABLE kept AS SELECT 'still here'::text AS v")
        .await
        .unwrap();
    assert_eq!(
        query_one(&url, "SELECT v FROM kept").await.unwrap(),
        "still here"
    );
    let password = cluster.password().to_string();
    cluster.stop().unwrap();
    assert!(!cluster.is_running());
    assert!(TcpStream::connect(("127.0.0.1", cluster.port())).is_err());
    drop(cluster);

    // The same directory again: reused as it is, with the password it was made with.
    let again = LocalCluster::init(ClusterOptions::for_tests(dir)).unwrap();
    assert_eq!(again.password(), password);
    again.start().unwrap();
    let url = again.superuser_url("postgres");
    assert_eq!(
        query_one(&url, "SELECT v FROM kept").await.unwrap(),
        "still here"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_accepts_verify_full_and_refuses_plaintext() {
    let tmp = tempfile::tempdir().unwrap();
    let (tls, _ca) = ClusterTls::generate(true).unwrap();
    let cluster = LocalCluster::init(ClusterOptions {
        tls: Some(tls),
        ..ClusterOptions::for_tests(cluster_dir(tmp.path(), "pg"))
    })
    .unwrap();
    cluster.start().unwrap();
    assert!(cluster.ca_file().unwrap().is_file());
    let url = cluster.superuser_url("postgres");
    assert!(url.contains("sslmode=verify-full"), "{url}");
    let ssl = "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    assert_eq!(query_one(&url, ssl).await.unwrap(), "true");
    let plain = cluster.plaintext_url_for(cluster.superuser(), cluster.password(), "postgres");
    let refused = query_one(&plain, "SELECT 'no'").await.unwrap_err();
    assert!(refused.to_string().contains("pg_hba.conf"), "{refused}");
}

#[test]
fn a_broker_listens_restarts_on_its_ports_and_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = cluster_dir(tmp.path(), "mqtt");
    let broker = LocalBroker::start(BrokerOptions {
        dir: dir.clone(),
        users: vec![("dbx".into(), "secret".into())],
        tls: None,
    })
    .unwrap();
    assert_eq!(broker.url(), format!("mqtt://127.0.0.1:{}", broker.port()));
    assert!(TcpStream::connect(("127.0.0.1", broker.port())).is_ok());
    let passwd = std::fs::read_to_string(dir.join("passwd")).unwrap();
    assert!(
        passwd.starts_with("dbx:") && !passwd.contains("secret"),
        "{passwd}"
    );
    broker.restart().unwrap();
    assert!(TcpStream::connect(("127.0.0.1", broker.port())).is_ok());
    broker.stop();
    assert!(TcpStream::connect(("127.0.0.1", broker.port())).is_err());
}
