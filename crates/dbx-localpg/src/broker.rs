//! A private Mosquitto broker started from the machine's own `mosquitto`, for
//! `dbx demo --mqtt` and the MQTT tests, like [`crate::cluster`] does for PostgreSQL.
//!
//! It runs the configuration shipped in `deploy/mosquitto/` (embedded here), with only
//! what is host-specific rewritten: the listeners (a plain one on a loopback port, and a
//! TLS one when certificates are given), the password and ACL files (generated in the
//! broker's directory from the given users, the ACL copied verbatim), persistence (on,
//! in the broker's directory, so a restart keeps the sessions) and logging. Everything
//! else (no anonymous access, limits, the ACL itself) is the deployed configuration, so
//! the tests exercise what operators run.
//!
//! As root, the broker runs as the `mosquitto` user (the package's) and gets
//! `PR_SET_PDEATHSIG` after that switch, so it dies with this process.

use dbx_core::sync::lock;
use std::fs;
use std::io;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cluster::{
    chown_tree, command_dying_with_us, free_port, io_err, spawn_kept, user_ids, write_private,
    ClusterError,
};

/// The deployed broker configuration (`deploy/mosquitto/mosquitto.conf`).
pub const DEPLOY_CONF: &str = include_str!("../../../deploy/mosquitto/mosquitto.conf");
/// The deployed topic ACL (`deploy/mosquitto/dbx.acl`).
pub const DEPLOY_ACL: &str = include_str!("../../../deploy/mosquitto/dbx.acl");

/// Directives of the deployed configuration that name this host's ports and paths; they
/// are replaced, everything else is kept as shipped.
const HOST_SPECIFIC: [&str; 11] = [
    "listener",
    "certfile",
    "keyfile",
    "cafile",
    "password_file",
    "acl_file",
    "persistence_location",
    "pid_file",
    "log_dest",
    "user",
    "include_dir",
];

/// How to run a local broker.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Directory for the configuration, password file, ACL, persistence and log.
    pub dir: PathBuf,
    /// Users and passwords (dbx's own user, and one user per organization code).
    pub users: Vec<(String, String)>,
    /// PEM certificate chain and key for a TLS listener; `None` = plain only.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// A running (or stopped) local broker.
#[derive(Debug)]
pub struct LocalBroker {
    dir: PathBuf,
    port: u16,
    tls_port: Option<u16>,
    run_as: Option<(u32, u32)>,
    child: Mutex<Option<Child>>,
}

/// The `mosquitto` binary, or an error naming what to install.
fn find(name: &str) -> Result<PathBuf, ClusterError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| ClusterError::Io {
            what: format!(
                "{name} not found: install Mosquitto, e.g. `apt-get install mosquitto mosquitto-clients`"
            ),
            source: io::ErrorKind::NotFound.into(),
        })
}

/// The deployed configuration with this broker's ports and paths.
pub fn local_conf(dir: &Path, port: u16, tls: Option<(u16, &Path, &Path)>, user: &str) -> String {
    let mut out =
        String::from("# deploy/mosquitto/mosquitto.conf, host-specific lines rewritten\n");
    for line in DEPLOY_CONF.lines() {
        let directive = line.split_whitespace().next().unwrap_or("");
        if !HOST_SPECIFIC.contains(&directive) {
            out.push_str(line);
            out.push('\n');
        }
    }
    let d = dir.display();
    out.push_str(&format!(
        "password_file {d}/passwd\nacl_file {d}/dbx.acl\npersistence_location {d}/data/\nlog_dest file {d}/mosquitto.log\nuser {user}\nlistener {port} 127.0.0.1\n"
    ));
    if let Some((tls_port, cert, key)) = tls {
        out.push_str(&format!(
            "listener {tls_port} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
            cert.display(),
            key.display()
        ));
    }
    out
}

impl LocalBroker {
    /// Writes the configuration, users and ACL into `opts.dir` and starts the broker.
    pub fn start(opts: BrokerOptions) -> Result<LocalBroker, ClusterError> {
        let mosquitto = find("mosquitto")?;
        let dir = opts.dir.clone();
        fs::create_dir_all(dir.join("data"))
            .map_err(io_err(format!("creating {}", dir.display())))?;
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let run_as = if root { user_ids("mosquitto") } else { None };
        let user = if root && run_as.is_none() {
            "root"
        } else {
            "mosquitto"
        };
        let port = free_port()?;
        let tls_port = opts.tls.as_ref().map(|_| free_port()).transpose()?;
        let mut tls_files = None;
        if let Some((cert, key)) = &opts.tls {
            for (from, to) in [(cert, "tls-cert.pem"), (key, "tls-key.pem")] {
                fs::copy(from, dir.join(to))
                    .map_err(io_err(format!("copying {}", from.display())))?;
            }
            tls_files = Some((dir.join("tls-cert.pem"), dir.join("tls-key.pem")));
        }
        let tls = tls_port
            .zip(tls_files.as_ref())
            .map(|(p, (c, k))| (p, c.as_path(), k.as_path()));
        write_private(
            &dir.join("mosquitto.conf"),
            &local_conf(&dir, port, tls, user),
        )?;
        write_private(&dir.join("dbx.acl"), DEPLOY_ACL)?;
        write_passwords(&dir.join("passwd"), &opts.users)?;
        if let Some((uid, gid)) = run_as {
            chown_tree(&dir, uid, gid)?;
        }
        let broker = LocalBroker {
            dir,
            port,
            tls_port,
            run_as,
            child: Mutex::new(None),
        };
        broker.launch(&mosquitto)?;
        Ok(broker)
    }

    fn launch(&self, mosquitto: &Path) -> Result<(), ClusterError> {
        let mut cmd: Command = command_dying_with_us(mosquitto, self.run_as, libc::SIGTERM);
        cmd.arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn_kept(cmd).map_err(io_err("starting mosquitto"))?;
        *lock(&self.child) = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = lock(&self.child).as_mut().map(Child::try_wait) {
                return Err(self.failed(format!("mosquitto exited with {status}")));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err(self.failed("mosquitto did not accept connections in 15 s".into()))
    }

    fn failed(&self, what: String) -> ClusterError {
        ClusterError::Io {
            what: format!("{what}; its log:\n{}", self.log()),
            source: io::ErrorKind::Other.into(),
        }
    }

    /// The plain listener's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TLS listener's port, when certificates were given.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the broker logged.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// Stops the broker gracefully (SIGTERM: it writes its persistence file) and waits.
    pub fn stop(&self) {
        if let Some(mut child) = lock(&self.child).take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports with the same persistence (sessions and queued
    /// messages survive).
    pub fn restart(&self) -> Result<(), ClusterError> {
        self.stop();
        self.launch(&find("mosquitto")?)
    }
}

impl Drop for LocalBroker {
    fn drop(&mut self) {
        if let Some(mut child) = lock(&self.child).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A Mosquitto password file for `users` (hashed by `mosquitto_passwd`).
fn write_passwords(path: &Path, users: &[(String, String)]) -> Result<(), ClusterError> {
    let tool = find("mosquitto_passwd")?;
    write_private(path, "")?;
    for (user, password) in users {
        let out = Command::new(&tool)
            .arg("-b")
            .arg(path)
            .arg(user)
            .arg(password)
            .output()
            .map_err(io_err("running mosquitto_passwd"))?;
        if !out.status.success() {
            return Err(ClusterError::Io {
                what: format!(
                    "mosquitto_passwd for {user}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
                source: io::ErrorKind::Other.into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_conf_keeps_the_deployed_rules_and_rewrites_only_host_lines() {
        let dir = Path::new("/srv/b");
        let conf = local_conf(
            dir,
            1883,
            Some((8883, Path::new("/c.pem"), Path::new("/k.pem"))),
            "mosquitto",
        );
        for line in DEPLOY_CONF.lines() {
            let directive = line.split_whitespace().next().unwrap_or("");
            if !HOST_SPECIFIC.contains(&directive) {
                assert!(conf.lines().any(|l| l == line), "lost: {line}");
            }
        }
        assert!(conf.contains("listener 1883 127.0.0.1\n"), "{conf}");
        assert!(
            conf.contains("listener 8883 127.0.0.1\ncertfile /c.pem\nkeyfile /k.pem\n"),
            "{conf}"
        );
        assert!(conf.contains("password_file /srv/b/passwd\n"), "{conf}");
        assert!(conf.contains("allow_anonymous false"), "{conf}");
    }
}
