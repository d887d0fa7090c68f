//! The Citus test cluster: a coordinator and two workers of this test process, started on first
//! use (the same cluster runner as every test cluster, three ports, `shared_preload_libraries =
//! 'citus'`), and a fresh distributed-ready database per test ([`CitusDb::new`]).
//!
//! Only the Citus suite (`scripts/test-citus`) uses it. A machine whose PostgreSQL has no Citus
//! fails the suite with one line naming how to install it, never a skip.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use dbx_core::apikey::random_token;
use dbx_localpg::citus::CitusCluster;
use dbx_localpg::cluster::{ClusterOptions, LocalCluster};
use tokio_postgres::Client;

use crate::{connect, temp_cluster_dir};

/// Workers of the test cluster.
pub const WORKERS: usize = 2;

fn cluster() -> &'static CitusCluster {
    static CLUSTER: OnceLock<CitusCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let dir = temp_cluster_dir();
        let base = ClusterOptions::for_tests(dir.clone());
        CitusCluster::start(&dir, WORKERS, &base).unwrap_or_else(|e| panic!("dbx-testkit: {e}"))
    })
}

/// A fresh database on the Citus test cluster: created on every node with the `citus`
/// extension, the coordinator and the workers registered. Nothing of dbx is in it yet: tests run
/// `dbx setup --distributed` on it, as a user would.
#[derive(Debug, Clone)]
pub struct CitusDb {
    name: String,
    /// Port, superuser and password of each node, the coordinator first.
    nodes: Vec<(u16, String, String)>,
}

impl CitusDb {
    /// Creates the database (starting the cluster on first use).
    pub async fn new() -> CitusDb {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "dbx_citus_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            random_token(4).to_lowercase()
        );
        let db = name.clone();
        tokio::task::spawn_blocking(move || {
            cluster()
                .create_database(&db)
                .unwrap_or_else(|e| panic!("dbx-testkit: {e}"))
        })
        .await
        .expect("preparing a Citus database");
        CitusDb::on(cluster(), &name)
    }

    /// Database `name`, already prepared on `cluster` ([`CitusCluster::create_database`]): for
    /// a test that runs a cluster of its own (one it stops a node of).
    pub fn on(cluster: &CitusCluster, name: &str) -> CitusDb {
        CitusDb {
            name: name.to_string(),
            nodes: cluster
                .nodes()
                .iter()
                .map(|n| {
                    (
                        n.port(),
                        n.superuser().to_string(),
                        n.password().to_string(),
                    )
                })
                .collect(),
        }
    }

    /// The cluster (to stop a worker, or to read its ports).
    pub fn cluster() -> &'static CitusCluster {
        cluster()
    }

    /// This database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Node `i` of the shared test cluster (0 = the coordinator).
    pub fn node(i: usize) -> &'static LocalCluster {
        &cluster().nodes()[i]
    }

    /// The superuser's URL to this database on node `i` (0 = the coordinator).
    pub fn url(&self, i: usize) -> String {
        let (_, user, password) = &self.nodes[i];
        self.url_for(i, user, password)
    }

    /// A URL to this database on node `i` as `user` with `password`.
    pub fn url_for(&self, i: usize, user: &str, password: &str) -> String {
        dbx_pg::params::url(user, password, "127.0.0.1", self.nodes[i].0, &self.name)
    }

    /// A superuser client of this database on node `i`.
    pub async fn client(&self, i: usize) -> Client {
        connect(&self.url(i)).await
    }
}
