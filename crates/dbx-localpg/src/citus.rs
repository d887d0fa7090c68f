//! A local Citus cluster: a coordinator and workers, each an ordinary [`LocalCluster`] of the
//! same runner on its own port, with `shared_preload_libraries = 'citus'`.
//!
//! Citus keeps its metadata per database, so a database is made a distributed one with
//! [`CitusCluster::create_database`]: created on every node with `CREATE EXTENSION citus`, then
//! on the coordinator `citus_set_coordinator_host` and `citus_add_node` for each worker. The
//! nodes name each other by their Unix socket directory, so the connections Citus opens between
//! them use the runner's `local … trust` line and TCP keeps password authentication for every
//! client (a production cluster uses certificates or its private network instead; see
//! docs/scaling.md). The node-level SQL runs through `psql` on those sockets, as the runner's
//! own tools do.
//!
//! [`citus_library`] tells whether the machine's PostgreSQL has Citus at all, with one line on
//! how to install it when not.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cluster::{ClusterError, ClusterOptions, LocalCluster};

/// Where Citus's install documentation is (the one line users get when it is missing).
pub const INSTALL_DOCS: &str = "https://docs.citusdata.com/en/stable/installation/multi_node.html";

/// Why a Citus cluster could not be started or prepared.
#[derive(Debug, thiserror::Error)]
pub enum CitusError {
    /// The machine's PostgreSQL has no `citus.so`.
    #[error(
        "Citus is not installed for the PostgreSQL in {bindir} (no {expected}); install Citus \
         for this PostgreSQL version, see {INSTALL_DOCS}"
    )]
    NotInstalled {
        /// The server binaries looked at.
        bindir: PathBuf,
        /// The library that is missing.
        expected: PathBuf,
    },
    /// A node failed to start.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// SQL on a node failed.
    #[error("Citus node on port {port}: {sql}: {output}")]
    Sql {
        /// The node's port.
        port: u16,
        /// The statement.
        sql: String,
        /// What psql printed.
        output: String,
    },
}

/// The path of `citus.so` of the PostgreSQL whose binaries are in `bindir` (`pg_config
/// --pkglibdir` of that installation), or [`CitusError::NotInstalled`].
pub fn citus_library(bindir: &Path) -> Result<PathBuf, CitusError> {
    let pkglibdir = Command::new(bindir.join("pg_config"))
        .arg("--pkglibdir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_else(|| bindir.join("../lib"));
    let lib = pkglibdir.join("citus.so");
    if lib.is_file() {
        Ok(lib)
    } else {
        Err(CitusError::NotInstalled {
            bindir: bindir.to_path_buf(),
            expected: lib,
        })
    }
}

/// A running coordinator and its workers.
#[derive(Debug)]
pub struct CitusCluster {
    nodes: Vec<LocalCluster>,
    /// Held while a database is created and its nodes registered: two `citus_add_node` calls
    /// at once, even in different databases, fail with "tuple concurrently updated" (they
    /// touch shared catalogs on the workers), and tests create databases in parallel.
    creating: std::sync::Mutex<()>,
}

impl CitusCluster {
    /// Initialises and starts a coordinator and `workers` workers under `dir` (`node0` is the
    /// coordinator), each with `base`'s settings plus `shared_preload_libraries = 'citus'`.
    /// Fails at once, naming how to install Citus, when the server has no Citus.
    pub fn start(dir: &Path, workers: usize, base: &ClusterOptions) -> Result<Self, CitusError> {
        citus_library(&LocalCluster::find_bindir()?)?;
        let mut nodes = Vec::with_capacity(workers + 1);
        for i in 0..=workers {
            let mut options = base.clone();
            options.data_dir = dir.join(format!("node{i}"));
            options.port = None;
            options
                .settings
                .push(("shared_preload_libraries".into(), "citus".into()));
            let node = LocalCluster::init(options)?;
            node.start()?;
            nodes.push(node);
        }
        Ok(CitusCluster {
            nodes,
            creating: std::sync::Mutex::new(()),
        })
    }

    /// The coordinator.
    pub fn coordinator(&self) -> &LocalCluster {
        &self.nodes[0]
    }

    /// The workers.
    pub fn workers(&self) -> &[LocalCluster] {
        &self.nodes[1..]
    }

    /// Every node, the coordinator first.
    pub fn nodes(&self) -> &[LocalCluster] {
        &self.nodes
    }

    /// Creates database `db` on every node with the `citus` extension and registers the nodes
    /// in the coordinator's copy of it (coordinator host, then each worker).
    pub fn create_database(&self, db: &str) -> Result<(), CitusError> {
        let _creating = dbx_core::sync::lock(&self.creating);
        for node in &self.nodes {
            psql(
                node,
                "postgres",
                &format!("CREATE DATABASE \"{db}\" ENCODING 'UTF8'"),
            )?;
            psql(node, db, "CREATE EXTENSION citus")?;
        }
        let coordinator = self.coordinator();
        psql(
            coordinator,
            db,
            &format!(
                "SELECT citus_set_coordinator_host('{}', {})",
                coordinator.dir().display(),
                coordinator.port()
            ),
        )?;
        for worker in self.workers() {
            psql(
                coordinator,
                db,
                &format!(
                    "SELECT citus_add_node('{}', {})",
                    worker.dir().display(),
                    worker.port()
                ),
            )?;
        }
        Ok(())
    }

    /// Stops every node, workers first.
    pub fn stop(&self) -> Result<(), ClusterError> {
        for node in self.nodes.iter().rev() {
            node.stop()?;
        }
        Ok(())
    }
}

/// Runs `sql` as the superuser in `db` on `node`, through its Unix socket.
fn psql(node: &LocalCluster, db: &str, sql: &str) -> Result<(), CitusError> {
    let out = Command::new(node.bindir().join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .arg("-h")
        .arg(node.dir())
        .arg("-p")
        .arg(node.port().to_string())
        .arg("-U")
        .arg(node.superuser())
        .arg("-d")
        .arg(db)
        .arg("-c")
        .arg(sql)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| CitusError::Sql {
            port: node.port(),
            sql: sql.to_string(),
            output: format!("running psql: {e}"),
        })?;
    if !out.status.success() {
        return Err(CitusError::Sql {
            port: node.port(),
            sql: sql.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(())
}
