//! # dbx-testkit
//!
//! Dev-only helpers for tests that need a real PostgreSQL.
//!
//! One private cluster per test process, started on first use from the machine's
//! own server binaries (see [`dbx_localpg::cluster`]) in a temporary directory,
//! on a free port, and gone when the process exits; a fresh database per test.
//! With `DBX_TEST_DATABASE_URL` set (a superuser, or a role with CREATEDB) the tests
//! use that server instead and create their databases there.
//!
//! A missing PostgreSQL is a test failure with a one-line explanation of what to
//! install, never a silent skip; so is a missing program or Python environment of
//! [`prereq`] (the ones `scripts/test` brings).
//!
//! A second cluster, started only by the tests that ask for it ([`TestDb::new_tls`]), runs
//! as production should: `ssl = on` with a certificate from a private CA, TCP only over TLS
//! (`hostnossl … reject`), and `cert` authentication for [`CERT_USER`]. Its URLs carry
//! `sslmode=verify-full` and the CA file. Every connection the kit makes goes through
//! `dbx_pg`, like the daemon's.
//!
//! ```no_run
//! # async fn t() {
//! let db = dbx_testkit::TestDb::new().await;
//! let client = db.client().await;
//! client.batch_execute("CREATE TABLE t (x int)").await.unwrap();
//! # }
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use dbx_control::postgis::PostgisMode;
use dbx_core::apikey::random_token;
use dbx_localpg::cluster::{ClusterOptions, ClusterTls, LocalCluster};
use dbx_pg::{Connector, TlsOptions};
use tokio_postgres::Client;

pub mod attack;
pub mod broker;
pub mod citus;
pub mod daemon;
pub mod env;
pub mod events;
pub mod fixtures;
pub mod gateway;
pub mod prereq;

pub use broker::TestBroker;
pub use daemon::{run_cli, Daemon};
pub use env::Env;
pub use events::{capture_events, Captured};
pub use fixtures::{Fixture, Org};
pub use gateway::TestGateway;

pub use dbx_localpg::cluster::LocalCluster as Cluster;

/// Where the databases of this test process live.
enum Backend {
    /// Our own cluster.
    Local(Box<LocalCluster>),
    /// An existing server named by `DBX_TEST_DATABASE_URL`.
    External {
        host: String,
        port: u16,
        user: String,
        password: String,
    },
}

impl Backend {
    fn url_for(&self, user: &str, password: &str, db: &str) -> String {
        match self {
            Backend::Local(c) => c.url_for(user, password, db),
            Backend::External { host, port, .. } => {
                dbx_pg::params::url(user, password, host, *port, db)
            }
        }
    }

    fn superuser(&self) -> (&str, &str) {
        match self {
            Backend::Local(c) => (c.superuser(), c.password()),
            Backend::External { user, password, .. } => (user, password),
        }
    }
}

/// A server of this test process: where it is, and what the kit did to it once.
struct Server {
    backend: Backend,
    /// Client-side files of the TLS cluster.
    tls: Option<TlsFiles>,
    /// `dbx_ingest_service`'s password was set (roles are cluster-wide; see `migrated`).
    ingest_password: tokio::sync::OnceCell<()>,
}

/// The client-side files of the TLS cluster.
#[derive(Debug)]
pub struct TlsFiles {
    /// The CA certificate that signed the server's certificate (`sslrootcert`).
    pub ca: PathBuf,
    /// A client certificate (CN = [`CERT_USER`]) signed by that CA (`sslcert`).
    pub client_cert: PathBuf,
    /// Its key, mode 0600 (`sslkey`).
    pub client_key: PathBuf,
}

/// The user the TLS cluster authenticates by client certificate (`cert` in pg_hba.conf).
/// Roles are cluster-wide: the tests that use it create it.
pub const CERT_USER: &str = "dbx_cert_user";

fn server(backend: Backend, tls: Option<TlsFiles>) -> Server {
    Server {
        backend,
        tls,
        ingest_password: tokio::sync::OnceCell::const_new(),
    }
}

fn backend() -> &'static Server {
    static BACKEND: OnceLock<Server> = OnceLock::new();
    BACKEND.get_or_init(|| {
        if let Ok(url) = std::env::var("DBX_TEST_DATABASE_URL") {
            return server(external_backend(&url), None);
        }
        let dir = temp_cluster_dir();
        server(
            Backend::Local(Box::new(start(ClusterOptions::for_tests(dir)))),
            None,
        )
    })
}

fn start(options: ClusterOptions) -> LocalCluster {
    let cluster = LocalCluster::init(options).unwrap_or_else(|e| panic!("dbx-testkit: {e}"));
    cluster
        .start()
        .unwrap_or_else(|e| panic!("dbx-testkit: {e}"));
    cluster
}

/// The TLS cluster: always a private one (the kit must own its configuration).
fn tls_backend() -> &'static Server {
    static TLS: OnceLock<Server> = OnceLock::new();
    TLS.get_or_init(|| {
        let dir = temp_cluster_dir();
        let (mut tls, pki) = ClusterTls::generate(true)
            .unwrap_or_else(|e| panic!("dbx-testkit: TLS cluster certificates: {e}"));
        tls.cert_users = vec![CERT_USER.to_string()];
        let client = pki
            .client(CERT_USER)
            .unwrap_or_else(|e| panic!("dbx-testkit: client certificate: {e}"));
        let mut options = ClusterOptions::for_tests(dir.clone());
        options.tls = Some(tls);
        let cluster = start(options);
        let files = dir.join("client");
        std::fs::create_dir_all(&files).expect("dbx-testkit: client certificate directory");
        let write = |name: &str, text: &str, mode: u32| {
            use std::os::unix::fs::PermissionsExt;
            let p = files.join(name);
            std::fs::write(&p, text).expect("dbx-testkit: writing a client file");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .expect("dbx-testkit: chmod a client file");
            p
        };
        let tls = TlsFiles {
            ca: cluster.ca_file().expect("a TLS cluster has a CA file"),
            client_cert: write("client.crt", &client.cert_pem, 0o644),
            client_key: write("client.key", &client.key_pem, 0o600),
        };
        server(Backend::Local(Box::new(cluster)), Some(tls))
    })
}

fn external_backend(url: &str) -> Backend {
    let config: tokio_postgres::Config = url
        .parse()
        .unwrap_or_else(|e| panic!("dbx-testkit: DBX_TEST_DATABASE_URL is not a valid URL: {e}"));
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_string(),
    };
    Backend::External {
        host,
        port: config.get_ports().first().copied().unwrap_or(5432),
        user: config.get_user().unwrap_or("postgres").to_string(),
        password: config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default(),
    }
}

/// A fresh temporary directory for this process's cluster; directories left by
/// earlier processes that died without cleaning up are removed first.
pub(crate) fn temp_cluster_dir() -> PathBuf {
    let root = std::env::temp_dir();
    let pid = std::process::id();
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(old) = name
                .strip_prefix("dbx-testkit-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill with signal 0 only checks whether the process exists.
                let alive = unsafe { libc::kill(old, 0) } == 0;
                if !alive {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    root.join(format!(
        "dbx-testkit-{pid}-{}",
        random_token(6).to_lowercase()
    ))
}

/// A PostgreSQL cluster of one test's own, in its own temporary directory: for a test that
/// stops its server, or needs server settings of its own (`shared_preload_libraries`), while
/// the other tests of the process keep the shared cluster. Stopped and removed when dropped.
#[derive(Debug)]
pub struct OwnCluster {
    cluster: Option<LocalCluster>,
    dir: PathBuf,
}

impl OwnCluster {
    /// Initialises and starts a cluster with the test settings plus `settings`
    /// (`-c name=value`).
    pub async fn start(settings: &[(&str, &str)]) -> OwnCluster {
        let dir = temp_cluster_dir();
        let mut options = ClusterOptions::for_tests(dir.clone());
        options
            .settings
            .extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let cluster = tokio::task::spawn_blocking(move || {
            let c = LocalCluster::init(options).unwrap_or_else(|e| panic!("dbx-testkit: {e}"));
            c.start().unwrap_or_else(|e| panic!("dbx-testkit: {e}"));
            c
        })
        .await
        .expect("starting a test cluster");
        OwnCluster {
            cluster: Some(cluster),
            dir,
        }
    }

    /// The cluster.
    pub fn cluster(&self) -> &LocalCluster {
        self.cluster
            .as_ref()
            .expect("the cluster lives as long as OwnCluster")
    }

    /// Stops the server (a fast shutdown: connections are cut, nothing is lost).
    pub fn stop(&self) {
        tokio::task::block_in_place(|| self.cluster().stop())
            .unwrap_or_else(|e| panic!("dbx-testkit: stopping the test cluster: {e}"));
    }

    /// Starts the server again, on the same port.
    pub fn restart(&self) {
        tokio::task::block_in_place(|| self.cluster().start())
            .unwrap_or_else(|e| panic!("dbx-testkit: starting the test cluster again: {e}"));
    }

    /// Creates database `name` with every migration applied and the ingest user's password
    /// set; returns the superuser's URL to it and the ingest user's.
    pub async fn migrated(&self, name: &str) -> (String, String) {
        let c = self.cluster();
        let admin = connect(&c.superuser_url("postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\" ENCODING 'UTF8'"))
            .await
            .unwrap_or_else(|e| panic!("dbx-testkit: creating database {name}: {e}"));
        let url = c.superuser_url(name);
        let mut client = connect(&url).await;
        dbx_control::migrate::apply(&mut client)
            .await
            .unwrap_or_else(|e| panic!("dbx-testkit: migrations failed: {e}"));
        client
            .batch_execute(&format!(
                "ALTER ROLE dbx_ingest_service WITH LOGIN PASSWORD '{INGEST_TEST_PASSWORD}'"
            ))
            .await
            .unwrap_or_else(|e| panic!("dbx-testkit: setting the ingest password: {e}"));
        let ingest = c.url_for("dbx_ingest_service", INGEST_TEST_PASSWORD, name);
        (url, ingest)
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        drop(self.cluster.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh database for one test, on the process's cluster (or its TLS cluster).
#[derive(Clone)]
pub struct TestDb {
    name: String,
    server: &'static Server,
}

impl std::fmt::Debug for TestDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDb")
            .field("name", &self.name)
            .field("tls", &self.server.tls.is_some())
            .finish()
    }
}

impl TestDb {
    /// Creates a fresh, empty database (starting the cluster on first use).
    pub async fn new() -> TestDb {
        Self::on(backend).await
    }

    /// Creates a fresh, empty database on the TLS cluster (started on first use).
    pub async fn new_tls() -> TestDb {
        Self::on(tls_backend).await
    }

    async fn on(which: fn() -> &'static Server) -> TestDb {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let server = tokio::task::spawn_blocking(which)
            .await
            .expect("starting the test cluster");
        let b = &server.backend;
        let name = format!(
            "dbx_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            random_token(4).to_lowercase()
        );
        let (user, password) = b.superuser();
        let admin = connect(&b.url_for(user, password, "postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\" ENCODING 'UTF8'"))
            .await
            .unwrap_or_else(|e| panic!("dbx-testkit: creating database {name}: {e}"));
        TestDb { name, server }
    }

    /// The client-side files of the TLS cluster (starting it on first use).
    pub fn tls_files() -> &'static TlsFiles {
        tls_backend()
            .tls
            .as_ref()
            .expect("the TLS cluster has client files")
    }

    /// The TLS cluster.
    pub fn tls_cluster() -> &'static LocalCluster {
        match &tls_backend().backend {
            Backend::Local(c) => c,
            Backend::External { .. } => unreachable!("the TLS cluster is always local"),
        }
    }

    /// The process's cluster (to stop and start it in outage tests). Panics when
    /// the tests run against `DBX_TEST_DATABASE_URL`, which we do not own.
    pub fn cluster() -> &'static LocalCluster {
        match &backend().backend {
            Backend::Local(c) => c,
            Backend::External { .. } => {
                panic!("dbx-testkit: this test stops the server; it cannot run with DBX_TEST_DATABASE_URL")
            }
        }
    }

    /// This database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The superuser's URL to this database.
    pub fn url(&self) -> String {
        self.server_url(&self.name)
    }

    /// A URL to this database as `user` with `password`.
    pub fn url_for(&self, user: &str, password: &str) -> String {
        self.server.backend.url_for(user, password, &self.name)
    }

    /// The superuser's URL to another database of the same server.
    pub fn server_url(&self, db: &str) -> String {
        let b = &self.server.backend;
        let (user, password) = b.superuser();
        b.url_for(user, password, db)
    }

    /// A connected client to this database as the superuser.
    pub async fn client(&self) -> Client {
        connect(&self.url()).await
    }

    /// A fresh database with every migration applied, and the ingest user's URL
    /// (its password is a fixed test value, so concurrent tests sharing the
    /// cluster-wide role never disagree about it). PostGIS is used when the server offers
    /// it, as `dbx setup` does by default.
    pub async fn migrated() -> (TestDb, String) {
        TestDb::migrated_with(PostgisMode::Auto).await
    }

    /// [`TestDb::migrated`] on the branch of the schema `postgis` chooses.
    pub async fn migrated_with(postgis: PostgisMode) -> (TestDb, String) {
        Self::migrate(TestDb::new().await, postgis).await
    }

    /// [`TestDb::migrated`] on the TLS cluster.
    pub async fn migrated_tls() -> (TestDb, String) {
        Self::migrate(TestDb::new_tls().await, PostgisMode::Auto).await
    }

    async fn migrate(db: TestDb, postgis: PostgisMode) -> (TestDb, String) {
        let mut client = db.client().await;
        dbx_control::migrate::apply_with(&mut client, postgis)
            .await
            .unwrap_or_else(|e| panic!("dbx-testkit: migrations failed: {e}"));
        // Roles are cluster-wide and concurrent ALTER ROLEs of one role fail with
        // "tuple concurrently updated": set the password once per process.
        db.server
            .ingest_password
            .get_or_init(|| async {
                client
                    .batch_execute(&format!(
                        "ALTER ROLE dbx_ingest_service WITH LOGIN PASSWORD '{INGEST_TEST_PASSWORD}'"
                    ))
                    .await
                    .unwrap_or_else(|e| panic!("dbx-testkit: setting the ingest password: {e}"));
            })
            .await;
        let url = db.url_for("dbx_ingest_service", INGEST_TEST_PASSWORD);
        (db, url)
    }
}

/// The password every test gives `dbx_ingest_service`.
pub const INGEST_TEST_PASSWORD: &str = "dbx-ingest-test-password";

/// A connector for `url` with its own TLS parameters only (no `database.*` options).
pub fn connector(url: &str) -> Connector {
    Connector::new(url, &TlsOptions::default(), "test URL")
        .unwrap_or_else(|e| panic!("dbx-testkit: {e}"))
}

/// Connects to `url` (with the TLS its parameters ask for), driving the connection on a
/// background task.
pub async fn connect(url: &str) -> Client {
    connector(url)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("dbx-testkit: connecting to the test server: {e}"))
}

/// A connection pool of at most `size` connections to `url` (connections are made on
/// first use), the way the daemon builds its own.
pub fn pool(url: &str, size: usize) -> deadpool_postgres::Pool {
    connector(url)
        .pool(size)
        .unwrap_or_else(|e| panic!("dbx-testkit: building a pool: {e}"))
}

/// How often [`wait_until`] and [`wait_count`] look again.
const POLL_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// Polls `check` until it holds or `within` has passed; whether it held. For what
/// happens after the event a test can observe (a backend exiting after its socket
/// closed, a NOTIFY reload, a replay), so that a test waits for a signal instead of
/// sleeping a fixed time. Callers assert on the result with their own message.
pub async fn wait_until<F, Fut>(within: std::time::Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls `sql` (a single `count(*)`, with `params`) until it reaches `n` or `within`
/// has passed; the last count. For what the daemon writes off the ack path
/// (handshake records, key stamps) and what UDP stores without an ack.
pub async fn wait_count(
    c: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    n: i64,
    within: std::time::Duration,
) -> i64 {
    let got = &std::sync::atomic::AtomicI64::new(0);
    wait_until(within, || async move {
        let count: i64 = c
            .query_one(sql, params)
            .await
            .unwrap_or_else(|e| panic!("dbx-testkit: {sql}: {e}"))
            .get(0);
        got.store(count, std::sync::atomic::Ordering::Relaxed);
        count >= n
    })
    .await;
    got.load(std::sync::atomic::Ordering::Relaxed)
}

/// Brings a fresh database to where a release before migration `version` left it: every
/// earlier migration applied and recorded, as the runner does, so that a test can then
/// upgrade it with [`dbx_control::migrate::apply`].
pub async fn migrate_before(client: &mut Client, version: i32) {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS dbx_aviation;
             CREATE TABLE dbx_aviation.schema_migrations (version integer PRIMARY KEY, name text NOT NULL,
                 checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .expect("creating schema_migrations");
    let earlier = dbx_control::migrate::MIGRATIONS
        .iter()
        .filter(|m| m.version < version);
    for m in earlier {
        let tx = client.transaction().await.expect("BEGIN");
        tx.batch_execute(m.sql)
            .await
            .unwrap_or_else(|e| panic!("{m}: {e}"));
        tx.batch_execute("RESET ROLE").await.expect("RESET ROLE");
        tx.execute(
            "INSERT INTO dbx_aviation.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&m.version, &m.name, &m.checksum()],
        )
        .await
        .expect("recording the migration");
        tx.commit().await.expect("COMMIT");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn two_databases_are_isolated_and_usable() {
        let a = TestDb::new().await;
        let b = TestDb::new().await;
        assert_ne!(a.name(), b.name());
        let ca = a.client().await;
        ca.batch_execute("CREATE TABLE only_in_a (x int); INSERT INTO only_in_a VALUES (41)")
            .await
            .unwrap();
        let v: i32 = ca
            .query_one("SELECT x + 1 FROM only_in_a", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, 42);
        let cb = b.client().await;
        let err = cb.query("SELECT * FROM only_in_a", &[]).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
        );
    }

    #[tokio::test]
    async fn wrong_password_is_refused() {
        let db = TestDb::new().await;
        let url = db.url_for("postgres", "definitely-wrong");
        let err = match connector(&url).connect().await {
            Ok(_) => panic!("a wrong password was accepted"),
            Err(e) => e,
        };
        assert_eq!(
            err.pg_error().and_then(|e| e.code()),
            Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
            "{err:?}"
        );
    }
}
