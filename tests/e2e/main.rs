//! End-to-end tests: a real `dbx serve` process, real sockets, a real PostgreSQL
//! started by dbx-testkit. Each test gets its own database and daemon.

mod listener;

use std::path::Path;
use std::time::Duration;

use dbx_testkit::{Daemon, Fixture, Org, TestDb};
use tokio_postgres::Client;
use uuid::Uuid;

/// The binary under test.
pub fn dbx_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dbx"))
}

/// A migrated database, one organization with one aircraft, and a daemon.
pub struct Env {
    pub db: TestDb,
    pub client: Client,
    pub org: Org,
    pub aircraft: Uuid,
    pub registration: String,
    pub daemon: Daemon,
}

impl Env {
    /// Starts everything; `env` goes to the daemon (e.g. `DBX_LISTENER__MAX_CONNECTIONS`).
    pub async fn start(env: &[(&str, &str)]) -> Env {
        Env::start_with_rate(env, None).await
    }

    /// Same, with the organization limited to `rate` points per second.
    pub async fn start_with_rate(env: &[(&str, &str)], rate: Option<i32>) -> Env {
        let (db, ingest_url) = TestDb::migrated().await;
        let client = db.client().await;
        let org = Fixture::org(&client, "ACME", rate).await;
        let registration = "N100AC".to_string();
        let aircraft = Fixture::aircraft(&client, org.id, &registration).await;
        let daemon = Daemon::start(dbx_bin(), &ingest_url, env).await;
        Env {
            db,
            client,
            org,
            aircraft,
            registration,
            daemon,
        }
    }

    /// Rows of `session` in flight_telemetry.
    pub async fn rows(&self, session: Uuid) -> i64 {
        self.client
            .query_one(
                "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = $1",
                &[&session],
            )
            .await
            .expect("count rows")
            .get(0)
    }

    /// Waits until `session` has `n` rows (UDP has no ack to wait for).
    pub async fn wait_rows(&self, session: Uuid, n: i64) -> i64 {
        let mut got = 0;
        for _ in 0..200 {
            got = self.rows(session).await;
            if got >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        got
    }

    /// One metric's value from /metrics (sum over label sets matching `labels`).
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = self.daemon.http_get("/metrics").await;
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                let (series, _) = l.rsplit_once(' ').unwrap_or((l, ""));
                (series == name || series.starts_with(&format!("{name}{{")))
                    && series.contains(labels)
            })
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    }
}
