//! A complete end-to-end environment: a migrated database, one organization with
//! an API key and one aircraft, and a real `dbx serve` process against it.

use std::path::Path;
use std::time::Duration;

use tokio_postgres::Client;
use uuid::Uuid;

use crate::{Daemon, Fixture, Org, TestDb};

const SESSION_ROWS: &str =
    "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = $1";

/// A migrated database, one organization with one aircraft, and a daemon.
pub struct Env {
    /// The test database.
    pub db: TestDb,
    /// A superuser connection to it.
    pub client: Client,
    /// The organization (with its clear-text key).
    pub org: Org,
    /// Its aircraft.
    pub aircraft: Uuid,
    /// The aircraft's registration number.
    pub registration: String,
    /// The daemon, connected as the ingest user.
    pub daemon: Daemon,
    /// The ingest user's URL (to start more daemons against the same database).
    pub ingest_url: String,
}

impl Env {
    /// Starts everything; `env` goes to the daemon (e.g. `DBX_LISTENER__MAX_CONNECTIONS`).
    pub async fn start(bin: &Path, env: &[(&str, &str)]) -> Env {
        Env::start_with_rate(bin, env, None).await
    }

    /// Same, with the organization limited to `rate` points per second.
    pub async fn start_with_rate(bin: &Path, env: &[(&str, &str)], rate: Option<i32>) -> Env {
        Env::start_on(bin, env, rate, TestDb::migrated().await).await
    }

    /// [`Env::start`] on the TLS cluster: the daemon connects with `sslmode=verify-full`.
    pub async fn start_tls(bin: &Path, env: &[(&str, &str)]) -> Env {
        Env::start_on(bin, env, None, TestDb::migrated_tls().await).await
    }

    async fn start_on(
        bin: &Path,
        env: &[(&str, &str)],
        rate: Option<i32>,
        (db, ingest_url): (TestDb, String),
    ) -> Env {
        let client = db.client().await;
        let org = Fixture::org(&client, "ACME", rate).await;
        let registration = "N100AC".to_string();
        let aircraft = Fixture::aircraft(&client, org.id, &registration).await;
        let daemon = Daemon::start(bin, &ingest_url, env).await;
        Env {
            db,
            client,
            org,
            aircraft,
            registration,
            daemon,
            ingest_url,
        }
    }

    /// Rows of `session` in flight_telemetry.
    pub async fn rows(&self, session: Uuid) -> i64 {
        self.client
            .query_one(SESSION_ROWS, &[&session])
            .await
            .expect("count rows")
            .get(0)
    }

    /// Waits (up to 10 s) until `session` has `n` rows (UDP has no ack to wait for).
    pub async fn wait_rows(&self, session: Uuid, n: i64) -> i64 {
        let within = Duration::from_secs(10);
        crate::wait_count(&self.client, SESSION_ROWS, &[&session], n, within).await
    }

    /// One metric from the daemon's /metrics, summed over the series whose labels contain `labels`.
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = self.daemon.http_get("/metrics").await;
        metric_value(&body, name, labels)
    }
}

/// Sums the samples of `name` whose label set contains `labels` in a Prometheus exposition.
pub fn metric_value(exposition: &str, name: &str, labels: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            (*series == name || series.starts_with(&format!("{name}{{"))) && series.contains(labels)
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

/// `promtool check metrics` (a program of `scripts/test-tools`) on an exposition: whether it
/// passed, and what promtool said.
pub fn promtool_check_metrics(exposition: &str) -> (bool, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(crate::prereq::tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("feeding promtool");
    let out = child.wait_with_output().expect("promtool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
