//! A private PostgreSQL cluster started from the machine's own server binaries.
//!
//! `dbx demo` runs one in `./.dbx-demo/`, and `dbx-testkit` runs one per test
//! process. Both need the same things: find `initdb`/`postgres` (via `DBX_PG_BINDIR`,
//! `pg_config --bindir`, `/usr/lib/postgresql/*/bin`, or `PATH`), run them as an
//! unprivileged user when we are root (PostgreSQL refuses to run as root), wait
//! until the server accepts connections, and make sure the server dies with us.
//!
//! With [`ClusterOptions::tls`] the cluster runs as production should: `ssl = on` with a
//! certificate from a private CA ([`crate::pki`]), a pg_hba.conf that accepts TCP only over
//! TLS (`hostnossl … reject`), optionally `cert` authentication for some users, and URLs with
//! `sslmode=verify-full`.
//!
//! The server process is spawned from one long-lived "keeper" thread with
//! `PR_SET_PDEATHSIG`: Linux delivers that signal when the *thread* that forked
//! the child exits, so spawning from a short-lived test thread would kill the
//! server as soon as that test ended. The keeper lives as long as the process.

use dbx_core::apikey::random_token;
use dbx_core::sync::lock;
use dbx_pg::params::urlencode;
use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::pki::{Issued, Pki, PkiError, LOCAL_SERVER_NAMES};

/// What can go wrong while running a local cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No `initdb`/`postgres` found anywhere we looked.
    #[error(
        "no PostgreSQL server binaries found (looked in $DBX_PG_BINDIR, `pg_config --bindir`, \
         /usr/lib/postgresql/*/bin and PATH); install them, e.g. `apt-get install postgresql` \
         (Debian/Ubuntu) or `brew install postgresql` (macOS)"
    )]
    NoServerBinaries,
    /// We run as root and there is no unprivileged user to run PostgreSQL as.
    #[error(
        "running as root, and PostgreSQL refuses to run as root: create a `postgres` user \
         (the postgresql package does) or run as a normal user"
    )]
    NoUnprivilegedUser,
    /// `initdb` failed.
    #[error("initdb failed in {dir}: {output}")]
    Initdb {
        /// The data directory.
        dir: PathBuf,
        /// What initdb printed.
        output: String,
    },
    /// The server did not come up.
    #[error(
        "PostgreSQL did not start on port {port} (data directory {dir}); last log lines:\n{log}"
    )]
    Start {
        /// The port we asked for.
        port: u16,
        /// The data directory.
        dir: PathBuf,
        /// The tail of the server log.
        log: String,
    },
    /// Any other I/O failure, with what we were doing.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// How to lay out and tune a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The data directory; created (and initialised) when it holds no cluster yet.
    pub data_dir: PathBuf,
    /// TCP port on 127.0.0.1; `None` picks a free one.
    pub port: Option<u16>,
    /// Name of the bootstrap superuser.
    pub superuser: String,
    /// Its password (password authentication is on for TCP, as in production).
    pub password: String,
    /// Extra `-c name=value` server settings.
    pub settings: Vec<(String, String)>,
    /// TLS (`ssl = on`, certificates, a TLS-only pg_hba.conf); `None` = plaintext TCP.
    pub tls: Option<ClusterTls>,
}

/// TLS of a local cluster.
#[derive(Debug, Clone)]
pub struct ClusterTls {
    /// The CA certificate: clients verify the server with it (`sslrootcert`), and the server
    /// verifies client certificates with it (`ssl_ca_file`).
    pub ca_pem: String,
    /// The server's certificate and key.
    pub server: Issued,
    /// TCP only over TLS (`hostnossl … reject`); `false` accepts both.
    pub hostssl_only: bool,
    /// Users who authenticate with a client certificate (`cert`) instead of a password.
    pub cert_users: Vec<String>,
}

impl ClusterTls {
    /// A fresh CA and a server certificate for `localhost` and `127.0.0.1`, and the CA (to
    /// issue client certificates with).
    pub fn generate(hostssl_only: bool) -> Result<(ClusterTls, Pki), PkiError> {
        let pki = Pki::new("dbx local cluster CA")?;
        let tls = ClusterTls {
            ca_pem: pki.ca_pem(),
            server: pki.server(&LOCAL_SERVER_NAMES)?,
            hostssl_only,
            cert_users: Vec::new(),
        };
        Ok((tls, pki))
    }

    /// The pg_hba.conf of the cluster: local socket trusted (the runner's own tools), TCP from
    /// loopback with SCRAM passwords or, for `cert_users`, a client certificate.
    fn hba(&self) -> String {
        let mut out = String::from(
            "# Written by the dbx cluster runner (crates/dbx-localpg/src/cluster.rs).\n\
             local all all trust\n",
        );
        for user in &self.cert_users {
            for net in ["127.0.0.1/32", "::1/128"] {
                out.push_str(&format!("hostssl all {user} {net} cert\n"));
            }
        }
        for net in ["127.0.0.1/32", "::1/128"] {
            if self.hostssl_only {
                out.push_str(&format!("hostnossl all all {net} reject\n"));
            }
            let kind = if self.hostssl_only { "hostssl" } else { "host" };
            out.push_str(&format!("{kind} all all {net} scram-sha-256\n"));
        }
        out
    }
}

impl ClusterOptions {
    /// A plaintext cluster in `data_dir` on a free port, superuser `postgres` with a random
    /// password, and the server's own settings.
    pub fn new(data_dir: PathBuf) -> Self {
        ClusterOptions {
            data_dir,
            port: None,
            superuser: "postgres".into(),
            password: random_token(24),
            settings: Vec::new(),
            tls: None,
        }
    }

    /// Settings for throwaway test clusters: durable enough for crash tests of the
    /// daemon (not of PostgreSQL), fast to start and to write.
    pub fn for_tests(data_dir: PathBuf) -> Self {
        ClusterOptions {
            settings: [
                ("fsync", "off"),
                ("synchronous_commit", "off"),
                ("full_page_writes", "off"),
                ("max_connections", "400"),
                ("shared_buffers", "128MB"),
                ("max_wal_size", "2GB"),
                ("log_min_messages", "warning"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..Self::new(data_dir)
        }
    }
}

/// A running (or stopped) local PostgreSQL cluster.
#[derive(Debug)]
pub struct LocalCluster {
    bindir: PathBuf,
    data_dir: PathBuf,
    port: u16,
    superuser: String,
    password: String,
    settings: Vec<(String, String)>,
    tls: Option<ClusterTls>,
    run_as: Option<(u32, u32)>,
    child: Mutex<Option<Child>>,
}

impl LocalCluster {
    /// Finds the directory holding `initdb` and `postgres`.
    pub fn find_bindir() -> Result<PathBuf, ClusterError> {
        let has_server = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
        if let Ok(dir) = std::env::var("DBX_PG_BINDIR") {
            let dir = PathBuf::from(dir);
            if has_server(&dir) {
                return Ok(dir);
            }
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && has_server(&dir) {
                return Ok(dir);
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                has_server(&bin).then_some((v, bin))
            })
            .collect();
        versions.sort();
        if let Some((_, dir)) = versions.pop() {
            return Ok(dir);
        }
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            if has_server(&dir) {
                return Ok(dir);
            }
        }
        Err(ClusterError::NoServerBinaries)
    }

    /// Initialises the data directory if it holds no cluster yet (a directory that
    /// already has one is reused as it is, with its own superuser password file).
    pub fn init(options: ClusterOptions) -> Result<LocalCluster, ClusterError> {
        let bindir = Self::find_bindir()?;
        let run_as = unprivileged_user()?;
        let dir = options.data_dir.clone();
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let dir = dir
            .canonicalize()
            .map_err(io_err(format!("resolving {}", dir.display())))?;
        let pgdata = dir.join("pgdata");
        let pwfile = dir.join("superuser.password");
        let password = if pgdata.join("PG_VERSION").is_file() {
            fs::read_to_string(&pwfile)
                .map(|s| s.trim().to_string())
                .unwrap_or(options.password.clone())
        } else {
            fs::create_dir_all(&pgdata).map_err(io_err("creating pgdata"))?;
            write_private(&pwfile, &options.password)?;
            if let Some((uid, gid)) = run_as {
                chown_tree(&dir, uid, gid)?;
            }
            let out = command(&bindir.join("initdb"), run_as)
                .arg("-D")
                .arg(&pgdata)
                .arg("-U")
                .arg(&options.superuser)
                .arg(format!("--pwfile={}", pwfile.display()))
                .args(["-A", "scram-sha-256", "--auth-local=trust", "-E", "UTF8"])
                .args(["--no-locale", "--no-sync", "--no-instructions"])
                .output()
                .map_err(io_err("running initdb"))?;
            if !out.status.success() {
                return Err(ClusterError::Initdb {
                    dir: pgdata,
                    output: format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ),
                });
            }
            options.password.clone()
        };
        let port = match options.port {
            Some(p) => p,
            None => free_port()?,
        };
        Ok(LocalCluster {
            bindir,
            data_dir: dir,
            port,
            superuser: options.superuser,
            password,
            settings: options.settings,
            tls: options.tls,
            run_as,
            child: Mutex::new(None),
        })
    }

    /// Starts the server and waits (up to 60 s) until it accepts connections.
    pub fn start(&self) -> Result<(), ClusterError> {
        let mut guard = lock(&self.child);
        if let Some(child) = guard.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                return Ok(());
            }
        }
        let log_path = self.data_dir.join("postgres.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err("opening postgres.log"))?;
        if let Some((uid, gid)) = self.run_as {
            // SAFETY: plain syscall on a path we own; failure is reported by the server later.
            let c = std::ffi::CString::new(log_path.as_os_str().as_encoded_bytes()).ok();
            if let Some(c) = c {
                unsafe { libc::chown(c.as_ptr(), uid, gid) };
            }
        }
        let mut cmd = command(&self.bindir.join("postgres"), self.run_as);
        cmd.arg("-D")
            .arg(self.data_dir.join("pgdata"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg("listen_addresses=127.0.0.1")
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.data_dir.display()
            ));
        for (k, v) in self.tls_settings()?.iter().chain(&self.settings) {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("postgres.log"))?)
            .stderr(log);
        let child = spawn_kept(cmd).map_err(io_err("starting postgres"))?;
        *guard = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = guard.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    *guard = None;
                    return Err(self.start_error());
                }
            }
            let ready = Command::new(self.bindir.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.start_error());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes the certificates, key and pg_hba.conf of a TLS cluster under `tls/` and returns
    /// the server settings that use them (none for a plaintext cluster).
    fn tls_settings(&self) -> Result<Vec<(String, String)>, ClusterError> {
        let Some(tls) = &self.tls else {
            return Ok(Vec::new());
        };
        let dir = self.data_dir.join("tls");
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let files = [
            ("ca.crt", tls.ca_pem.as_str(), 0o644),
            ("server.crt", tls.server.cert_pem.as_str(), 0o644),
            // PostgreSQL refuses a key others can read.
            ("server.key", tls.server.key_pem.as_str(), 0o600),
            ("pg_hba.conf", &tls.hba(), 0o600),
        ];
        for (name, contents, mode) in files {
            let path = dir.join(name);
            write_private(&path, contents)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .map_err(io_err(format!("chmod {}", path.display())))?;
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(io_err(format!("chmod {}", dir.display())))?;
        if let Some((uid, gid)) = self.run_as {
            chown_tree(&dir, uid, gid)?;
        }
        let file = |n: &str| dir.join(n).display().to_string();
        Ok(vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), file("server.crt")),
            ("ssl_key_file".into(), file("server.key")),
            ("ssl_ca_file".into(), file("ca.crt")),
            ("ssl_min_protocol_version".into(), "TLSv1.2".into()),
            ("hba_file".into(), file("pg_hba.conf")),
        ])
    }

    /// The CA certificate file clients verify a TLS cluster with (`sslrootcert`); `None`
    /// for a plaintext cluster. Written when the server starts.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(|_| self.data_dir.join("tls/ca.crt"))
    }

    /// Stops the server with a fast shutdown and waits for it to exit.
    pub fn stop(&self) -> Result<(), ClusterError> {
        let mut guard = lock(&self.child);
        if let Some(mut child) = guard.take() {
            // SIGINT = "fast" shutdown: roll back open transactions, exit cleanly.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// True while the server process runs.
    pub fn is_running(&self) -> bool {
        let mut guard = lock(&self.child);
        guard
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The bootstrap superuser's name.
    pub fn superuser(&self) -> &str {
        &self.superuser
    }

    /// The bootstrap superuser's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The directory holding the server binaries (psql, pg_dump, … live there too).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The cluster's directory (data in `pgdata/`, log in `postgres.log`).
    pub fn dir(&self) -> &Path {
        &self.data_dir
    }

    /// A connection URL for `user`/`password` to database `db`; with
    /// `sslmode=verify-full&sslrootcert=…` on a TLS cluster.
    pub fn url_for(&self, user: &str, password: &str, db: &str) -> String {
        let base = self.base_url(user, password, db);
        match self.ca_file() {
            Some(ca) => format!(
                "{base}?sslmode=verify-full&sslrootcert={}",
                urlencode(&ca.display().to_string())
            ),
            None => base,
        }
    }

    /// A URL for `user`/`password` to `db` with `sslmode=disable` (refused by a TLS-only
    /// cluster; a cluster with `hostssl_only = false` accepts it).
    pub fn plaintext_url_for(&self, user: &str, password: &str, db: &str) -> String {
        format!("{}?sslmode=disable", self.base_url(user, password, db))
    }

    fn base_url(&self, user: &str, password: &str, db: &str) -> String {
        dbx_pg::params::url(user, password, "127.0.0.1", self.port, db)
    }

    /// The superuser's connection URL to database `db`.
    pub fn superuser_url(&self, db: &str) -> String {
        self.url_for(&self.superuser, &self.password, db)
    }

    fn start_error(&self) -> ClusterError {
        let mut log = String::new();
        if let Ok(mut f) = fs::File::open(self.data_dir.join("postgres.log")) {
            let _ = f.read_to_string(&mut log);
        }
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        ClusterError::Start {
            port: self.port,
            dir: self.data_dir.clone(),
            log: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The uid/gid to run PostgreSQL as when we are root: `postgres` (the package's user).
fn unprivileged_user() -> Result<Option<(u32, u32)>, ClusterError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    user_ids("postgres")
        .map(Some)
        .ok_or(ClusterError::NoUnprivilegedUser)
}

/// The uid and gid of the user `name`, if it exists.
pub(crate) fn user_ids(name: &str) -> Option<(u32, u32)> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam returns a pointer to static storage or null; we copy the ids at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

fn command(program: &Path, run_as: Option<(u32, u32)>) -> Command {
    // SIGQUIT makes the postmaster shut down immediately, taking its backends along.
    command_dying_with_us(program, run_as, libc::SIGQUIT)
}

/// A command that runs as `run_as` (when given; we must be root) and receives
/// `death_signal` when this process dies. Spawn it with [`spawn_kept`].
pub(crate) fn command_dying_with_us(
    program: &Path,
    run_as: Option<(u32, u32)>,
    death_signal: libc::c_int,
) -> Command {
    let mut cmd = Command::new(program);
    // The server must not inherit our locale quirks; --no-locale covers initdb.
    cmd.env("LC_ALL", "C");
    let parent = unsafe { libc::getpid() };
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = run_as {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            // After setuid (which clears it): die with the keeper thread, i.e. with us.
            libc::prctl(libc::PR_SET_PDEATHSIG, death_signal);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from the process-long keeper thread (see the module doc).
pub(crate) fn spawn_kept(cmd: Command) -> io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("dbx-pg-keeper".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // The channel is static and never closes: park for the process lifetime.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawning the keeper thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    lock(keeper)
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("keeper thread gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("keeper thread gone"))?
}

pub(crate) fn free_port() -> Result<u16, ClusterError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io_err("finding a free port"))?;
    Ok(l.local_addr()
        .map_err(io_err("finding a free port"))?
        .port())
}

pub(crate) fn write_private(path: &Path, contents: &str) -> Result<(), ClusterError> {
    let mut f = fs::File::create(path).map_err(io_err(format!("writing {}", path.display())))?;
    f.write_all(contents.as_bytes())
        .map_err(io_err(format!("writing {}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("chmod {}", path.display())))
}

pub(crate) fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<(), ClusterError> {
    let c = |p: &Path| {
        let s = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|e| io_err(format!("path {}", p.display()))(io::Error::other(e)))?;
        // SAFETY: valid NUL-terminated path.
        if unsafe { libc::chown(s.as_ptr(), uid, gid) } != 0 {
            return Err(io_err(format!("chown {}", p.display()))(
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    };
    c(dir)?;
    for entry in fs::read_dir(dir).map_err(io_err(format!("listing {}", dir.display())))? {
        let path = entry.map_err(io_err("listing"))?.path();
        if path.is_dir() {
            chown_tree(&path, uid, gid)?;
        } else {
            c(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_only_hba_rejects_plaintext_and_lets_cert_users_in_first() {
        let (mut tls, _) = ClusterTls::generate(true).unwrap();
        tls.cert_users = vec!["dbx_cert".into()];
        let hba = tls.hba();
        let lines: Vec<&str> = hba.lines().collect();
        let cert = lines
            .iter()
            .position(|l| *l == "hostssl all dbx_cert 127.0.0.1/32 cert")
            .expect(&hba);
        let reject = lines
            .iter()
            .position(|l| *l == "hostnossl all all 127.0.0.1/32 reject")
            .expect(&hba);
        assert!(cert < reject, "{hba}");
        assert!(
            hba.contains("hostssl all all ::1/128 scram-sha-256"),
            "{hba}"
        );
        assert!(!hba.lines().any(|l| l.starts_with("host ")), "{hba}");
    }

    #[test]
    fn a_tls_cluster_that_accepts_both_has_no_reject_line() {
        let (tls, _) = ClusterTls::generate(false).unwrap();
        let hba = tls.hba();
        assert!(!hba.contains("reject"), "{hba}");
        assert!(
            hba.contains("host all all 127.0.0.1/32 scram-sha-256"),
            "{hba}"
        );
    }
}
