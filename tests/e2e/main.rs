//! End-to-end tests: a real `dbx serve` process, real sockets, a real PostgreSQL
//! started by dbx-testkit. Each test gets its own database and daemon.

mod admin;
mod hardening;
mod listener;
mod orgs;
mod sessions;
mod stages;

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

/// Runs examples/python_gateway.py (with the test Python, which scripts/test makes)
/// against `env`'s daemon with `args` after `--host/--port/--key/--aircraft`; its JSON
/// report. Fails the test, with the script's output, when it does not exit 0.
pub async fn python_gateway(env: &dbx_testkit::Env, args: &[&str]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/python_gateway.py");
    let out = tokio::process::Command::new(dbx_testkit::prereq::python())
        .arg(&script)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &env.daemon.tcp.port().to_string(),
        ])
        .args(["--key", &env.org.key, "--aircraft", &env.registration])
        .args(args)
        .output()
        .await
        .expect("the test Python runs (scripts/test makes it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}
