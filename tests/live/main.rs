//! The deploy/ configs run for real against real daemons (issue 19): Debian's `prometheus`
//! and `haproxy` (programs of scripts/test-tools, which scripts/test installs) with
//! deploy/prometheus and deploy/haproxy, rewritten only where a test must differ from a
//! deployment (addresses, ports, intervals, files), each rewrite checked to have found what
//! it rewrites so the tests follow the shipped files.
//!
//! - `prometheus`: Prometheus scrapes two daemons under load, every query of the Grafana
//!   dashboard returns data through its HTTP API, and with PostgreSQL stopped the
//!   database-down and ingest-stalled alerts of alerts.yml fire, then resolve once it is back.
//! - `haproxy`: HAProxy in front of two daemons on one database: gateways reconnect through
//!   it when one daemon is SIGKILLed and every acked point is stored exactly once; /readyz
//!   checks take a daemon out of rotation while its database is unreachable.
//!
//! Each test that stops or cuts PostgreSQL does it to a cluster (or a connection) of its own,
//! so the tests of this binary run side by side.

mod haproxy;
mod prometheus;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The binary under test.
pub fn dbx_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dbx"))
}

/// A file of the repository, read whole.
pub fn read(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// `text` with `from` replaced by `to`, which must occur exactly `times` times: a rewrite of
/// a deploy/ file that no longer finds its target fails instead of testing something else.
pub fn replace_checked(text: &str, from: &str, to: &str, times: usize) -> String {
    assert_eq!(
        text.matches(from).count(),
        times,
        "expected {from:?} {times} times in:\n{text}"
    );
    text.replace(from, to)
}

/// A server process of a test (prometheus, haproxy) with its output in a log file; killed
/// when dropped.
pub struct Server {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Starts `cmd` with stdout and stderr going to `<dir>/<name>.log`.
    pub fn spawn(name: &'static str, mut cmd: Command, dir: &Path) -> Server {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("server log");
        let err = out.try_clone().expect("server log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Server { name, child, log }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        format!(
            "--- {} log ---\n{}",
            self.name,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    /// Panics with its log when it has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited with {status}\n{}", self.name, self.log());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 100 ms until it returns `Some` or `within` has passed.
pub async fn poll<T, F, Fut>(within: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
