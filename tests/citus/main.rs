//! The Citus suite: dbx on a live three-node Citus cluster (a coordinator and two workers of the
//! test kit, `dbx_testkit::citus`). Built only with the `citus` feature, run by
//! `scripts/test-citus`, which first checks that the machine's PostgreSQL has Citus.
//!
//! - `schema.rs`: `dbx setup --distributed` (placements, idempotence, refusal without Citus),
//!   RLS through the coordinator with `SET LOCAL`, and the seed's features on Citus.
//! - `control.rs`: sweep, archival and retention of the distributed table; the maintenance lock
//!   across daemons on two nodes; the cluster gauges and `/readyz` with a worker down.
//! - `columnar.rs`: columnar archives (`partitions.archive_access_method = "columnar"`) on a
//!   single node with `citus_columnar` and on the cluster: conversion, unchanged answers,
//!   retention by rewrite or drop, GDPR delete, the missing-extension error, `dbx setup`.
//! - `ingest.rs`: real daemons writing through the coordinator and through a worker, a SIGKILL
//!   under a resending gateway, rows per worker.

mod columnar;
mod control;
mod ingest;
mod schema;

use std::collections::HashMap;
use std::path::Path;

use dbx_testkit::citus::CitusDb;
use dbx_testkit::{run_cli, Fixture, Org};
use tokio_postgres::Client;
use uuid::Uuid;

fn dbx_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dbx"))
}

/// A database of the Citus cluster after `dbx setup --distributed`, with what setup wrote.
struct Distributed {
    db: CitusDb,
    /// The coordinator, as the superuser.
    client: Client,
    /// Login user → password, from credentials.txt.
    passwords: HashMap<String, String>,
    /// What `dbx setup --distributed` printed.
    output: String,
    _dir: tempfile::TempDir,
}

impl Distributed {
    /// A fresh Citus database, set up by `dbx setup --distributed` without sample data.
    async fn new() -> Distributed {
        Distributed::on(CitusDb::new().await).await
    }

    /// `db`, set up by `dbx setup --distributed` without sample data.
    async fn on(db: CitusDb) -> Distributed {
        Distributed::on_with(db, &[]).await
    }

    /// A fresh Citus database set up by `dbx setup --distributed` with the environment `env`
    /// (configuration overrides, e.g. `DBX_PARTITIONS__ARCHIVE_ACCESS_METHOD`).
    async fn with_env(env: &[(&str, &str)]) -> Distributed {
        Distributed::on_with(CitusDb::new().await, env).await
    }

    async fn on_with(db: CitusDb, env: &[(&str, &str)]) -> Distributed {
        let dir = tempfile::tempdir().unwrap();
        // Login roles are cluster-wide and the tests' setups share the cluster: every setup
        // finds the same passwords in its credentials.txt and keeps them, so one test's setup
        // never changes the passwords another test is using.
        let seeded: String = LOGIN_USERS
            .iter()
            .map(|u| format!("{u}_password = {}\n", test_password(u)))
            .collect();
        std::fs::write(dir.path().join("credentials.txt"), seeded).unwrap();
        let output = setup_distributed(&db, dir.path(), env);
        let text = std::fs::read_to_string(dir.path().join("credentials.txt")).unwrap();
        let passwords = text
            .lines()
            .filter_map(|l| l.split_once(" = "))
            .filter_map(|(k, v)| Some((k.strip_suffix("_password")?.to_string(), v.to_string())))
            .collect();
        let client = db.client(0).await;
        Distributed {
            db,
            client,
            passwords,
            output,
            _dir: dir,
        }
    }

    /// The URL of login user `user` on node `i` (0 = the coordinator).
    fn url(&self, i: usize, user: &str) -> String {
        self.db.url_for(i, user, &self.passwords[user])
    }

    /// An organization with a key, and one aircraft of it.
    async fn org(&self, code: &str) -> (Org, Uuid) {
        let org = Fixture::org(&self.client, code, None).await;
        // On Citus the primary-key mirror is a call, not a trigger (migration 0041).
        self.client
            .execute("SELECT dbx_aviation.sync_primary_api_keys()", &[])
            .await
            .unwrap();
        let aircraft = Fixture::aircraft(&self.client, org.id, &format!("N{code}")).await;
        (org, aircraft)
    }
}

/// The login users `dbx setup` makes.
const LOGIN_USERS: [&str; 4] = [
    "dbx_api_service",
    "dbx_analytics_service",
    "dbx_ingest_service",
    "dbx_maintenance_service",
];

/// The fixed password of login user `user` in this suite (a plain token, as setup wants).
fn test_password(user: &str) -> String {
    format!("citusTest{}", user.replace('_', ""))
}

/// Runs `dbx setup --distributed` on `db`'s coordinator; panics with its output on failure.
/// One at a time in this process: setup sets the passwords of cluster-wide roles, and two
/// `ALTER ROLE`s of one role at once fail ("tuple concurrently updated").
fn setup_distributed(db: &CitusDb, out: &Path, env: &[(&str, &str)]) -> String {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (ok, output) = run_cli(
        dbx_bin(),
        &[
            "setup",
            "--distributed",
            "--no-sample-data",
            "--superuser-url",
            &db.url(0),
            "--database",
            db.name(),
            "--out-dir",
            &out.display().to_string(),
        ],
        env,
    );
    assert!(ok, "dbx setup --distributed failed:\n{output}");
    output
}

/// Runs `dbx partitions <args>` as the maintenance role against the coordinator; fails the
/// test unless every step succeeded. Its output.
fn partitions(d: &Distributed, args: &[&str], env: &[(&str, &str)]) -> String {
    let url = d.url(0, "dbx_maintenance_service");
    let mut all = vec!["partitions", "--database-url", url.as_str()];
    all.extend_from_slice(args);
    let (ok, out) = run_cli(dbx_bin(), &all, env);
    assert!(ok, "dbx {all:?} failed:\n{out}");
    assert!(!out.contains("FAILED"), "dbx {all:?}:\n{out}");
    out
}

/// Rows of `flight_telemetry` per worker (`host:port` → rows), counted on the shards.
async fn rows_per_worker(client: &Client) -> Vec<(String, i64)> {
    client
        .query(dbx_control::citus::ROWS_PER_WORKER_SQL, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(2)))
        .collect()
}

/// Partitions of `flight_telemetry` that Citus does not know (0 once every partition is
/// distributed with its parent).
async fn undistributed_partitions(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_inherits i \
              WHERE i.inhparent = 'dbx_aviation.flight_telemetry'::regclass \
                AND NOT EXISTS (SELECT 1 FROM citus_tables t WHERE t.table_name = i.inhrelid::regclass)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}
