//! End-to-end tests: a real `dbx serve` process, real sockets, a real PostgreSQL
//! started by dbx-testkit. Each test gets its own database and daemon.

mod admin;
mod hardening;
mod listener;
mod orgs;
mod sessions;

use std::path::Path;

/// The binary under test.
pub fn dbx_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dbx"))
}

/// The environment of one test, with the binary under test.
pub struct Env;

impl Env {
    /// A migrated database, an organization, an aircraft and a daemon.
    pub async fn start(env: &[(&str, &str)]) -> dbx_testkit::Env {
        dbx_testkit::Env::start(dbx_bin(), env).await
    }

    /// Same, with the organization limited to `rate` points per second.
    pub async fn start_with_rate(env: &[(&str, &str)], rate: Option<i32>) -> dbx_testkit::Env {
        dbx_testkit::Env::start_with_rate(dbx_bin(), env, rate).await
    }
}
