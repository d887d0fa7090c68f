//! Operations tests (issue 8): the files under `deploy/` are checked against the code and
//! config they describe, and the procedures they document are run for real.
//!
//! - `deploy`: docker-compose, Dockerfile, Prometheus config and alert rules, the Grafana
//!   dashboard, the systemd unit and the HAProxy config parse, reference only files that
//!   exist and metrics the daemon exports, and agree with `config/dbx.toml` (ports, limits,
//!   timeouts); `promtool`, `systemd-analyze` and `haproxy` check them too (programs of
//!   `scripts/test-tools`, which `scripts/test` installs).
//! - `backup`: a cluster running with `deploy/postgresql/ingest.conf` and
//!   `deploy/backup/wal-archiving.conf`, `backup.sh base` and `backup.sh dump`, and a
//!   point-in-time recovery with `restore.sh` to a moment between two ingests.
//! - `scaleout`: two daemons on one database, both ingesting (with a gateway failing over
//!   from one to the other), nothing lost or doubled, maintenance under the advisory lock.
//! - `capacity`: the bytes-per-point measurement quoted in docs/scaling.md.
//! - `postgis`: flights ingested into a database on the schema's PostGIS branch answer
//!   distance and radius queries that agree with what the daemon computed.
//! - `prereqs`: `scripts/prereqs`, which `scripts/test` runs first, brings the programs of
//!   `scripts/test-tools` and the Python environment; the suite runs with them.
//! - `tls`: `deploy/postgresql/make-certs.sh`, `tls.conf` and `pg_hba.conf` in a real cluster:
//!   dbx connects with `sslmode=verify-full` (and a client certificate), plaintext is refused.

mod backup;
mod capacity;
mod deploy;
mod postgis;
mod prereqs;
mod scaleout;
mod tls;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The binary under test.
pub fn dbx_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dbx"))
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// A file of the repository, read whole.
pub fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// `config/dbx.toml`, parsed.
pub fn config() -> toml::Value {
    read("config/dbx.toml")
        .parse()
        .expect("config/dbx.toml parses")
}

/// A key of `config/dbx.toml` (`section.key`).
pub fn config_value(path: &str) -> toml::Value {
    let cfg = config();
    let (section, key) = path.split_once('.').expect("section.key");
    cfg.get(section)
        .and_then(|s| s.get(key))
        .unwrap_or_else(|| panic!("config/dbx.toml has no {path}"))
        .clone()
}

/// The port of a `host:port` bind address in `config/dbx.toml`.
pub fn config_port(path: &str) -> u16 {
    let v = config_value(path);
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string"));
    s.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{path} = {s:?} has no port"))
}

/// An integer key of `config/dbx.toml`.
pub fn config_int(path: &str) -> i64 {
    config_value(path)
        .as_integer()
        .unwrap_or_else(|| panic!("{path} is not an integer"))
}

/// Every metric name the daemon can export: the constants of every crate's `metrics.rs`
/// (read from their sources, so a new constant or crate needs no edit here), histogram
/// series suffixes for the histograms, and the `dbx_db_*` names the control plane uses.
pub fn exported_metrics() -> BTreeSet<String> {
    let mut src = String::new();
    for dir in std::fs::read_dir(repo().join("crates")).expect("crates/") {
        let file = dir.expect("dir entry").path().join("src/metrics.rs");
        if let Ok(text) = std::fs::read_to_string(&file) {
            src.push_str(&text);
            src.push('\n');
        }
    }
    let mut names = BTreeSet::new();
    let mut doc = String::new();
    for line in src.lines() {
        let t = line.trim();
        if let Some(d) = t.strip_prefix("///") {
            doc.push_str(d);
            continue;
        }
        if t.starts_with("pub const ") {
            if let Some(name) = t.split('"').nth(1).filter(|n| n.starts_with("dbx_")) {
                if name != "dbx_db_" {
                    names.insert(name.to_string());
                    if doc.contains("histogram") {
                        for suffix in ["_bucket", "_sum", "_count"] {
                            names.insert(format!("{name}{suffix}"));
                        }
                    }
                }
            }
        }
        doc.clear();
    }
    let control = repo().join("crates/dbx-control/src");
    for entry in std::fs::read_dir(&control).expect("crates/dbx-control/src") {
        let text = std::fs::read_to_string(entry.expect("dir entry").path()).unwrap_or_default();
        names.extend(metric_tokens(&text).into_iter().filter(|n| {
            n.starts_with("dbx_db_") && n.len() > "dbx_db_".len() && !n.ends_with('_')
        }));
    }
    assert!(
        names.contains("dbx_points_written_total") && names.contains("dbx_db_up"),
        "metric names not found in crates/*/src/metrics.rs: {names:?}"
    );
    names
}

/// Every `dbx_*` identifier in a PromQL expression (or any text).
pub fn metric_tokens(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(pos) = text[i..].find("dbx_") {
        let start = i + pos;
        let mut end = start;
        while end < b.len() && ident(b[end]) {
            end += 1;
        }
        if start == 0 || !ident(b[start - 1]) {
            out.insert(text[start..end].to_string());
        }
        i = end.max(start + 1);
    }
    out
}

/// True when we run as root (PostgreSQL, and so its files and scripts, run as `postgres`).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A directory the PostgreSQL user can write.
pub fn pg_dir(p: &Path) -> PathBuf {
    std::fs::create_dir_all(p).expect("mkdir");
    if is_root() {
        run_ok(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(p),
        );
    }
    p.to_path_buf()
}

/// A cluster in `dir` with only warnings logged, not started: the deploy snippets are
/// added to it with [`include_conf`].
pub fn deploy_cluster(dir: PathBuf) -> dbx_localpg::cluster::LocalCluster {
    dbx_localpg::cluster::LocalCluster::init(dbx_localpg::cluster::ClusterOptions {
        settings: vec![("log_min_messages".into(), "warning".into())],
        ..dbx_localpg::cluster::ClusterOptions::new(dir)
    })
    .expect("initdb")
}

/// Writes `text` to `pgdata/name` and includes it from the cluster's postgresql.conf.
pub fn include_conf(pgdata: &Path, name: &str, text: &str) {
    std::fs::write(pgdata.join(name), text).expect("write a config snippet");
    let conf = pgdata.join("postgresql.conf");
    let mut main = std::fs::read_to_string(&conf).expect("postgresql.conf");
    main.push_str(&format!("\ninclude '{name}'\n"));
    std::fs::write(&conf, main).expect("postgresql.conf");
}

/// Runs a command, panicking with its output unless it succeeds; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn metric_tokens_finds_names_only_at_word_starts() {
    let t = metric_tokens(
        r#"sum(rate(dbx_points_written_total{job="dbx"}[5m])) / x_dbx_no + dbx_db_up"#,
    );
    assert_eq!(
        t.into_iter().collect::<Vec<_>>(),
        vec!["dbx_db_up", "dbx_points_written_total"]
    );
}
