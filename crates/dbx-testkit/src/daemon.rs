//! A real `dbx serve` process for end-to-end tests: started on port 0 against a
//! test database, with the addresses it bound read from its `--ready-file`; and
//! [`run_cli`] for the one-shot commands (`setup`, `check`, `partitions`, …).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running daemon process.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    /// Plain TCP address (`0.0.0.0:0` when the daemon serves TLS only).
    pub tcp: SocketAddr,
    /// TLS address, when configured.
    pub tls: Option<SocketAddr>,
    /// UDP address.
    pub udp: Option<SocketAddr>,
    /// Admin HTTP address.
    pub http: SocketAddr,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `bin serve` with `DATABASE_URL=database_url`, every listener on
    /// 127.0.0.1 port 0, and `env` on top (e.g. `DBX_LISTENER__MAX_CONNECTIONS`).
    /// Waits up to 30 s for it to accept; panics with its log otherwise.
    pub async fn start(bin: &Path, database_url: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("daemon temp dir");
        let ready = dir.path().join("ready.json");
        let log = dir.path().join("dbx.log");
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--ready-file")
            .arg(&ready)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", database_url)
            .env("DBX_LISTENER__TCP_BIND", "127.0.0.1:0")
            .env("DBX_LISTENER__TLS_BIND", "127.0.0.1:0")
            .env("DBX_LISTENER__UDP_BIND", "127.0.0.1:0")
            .env("DBX_HTTP__BIND", "127.0.0.1:0")
            .env(
                "RUST_LOG",
                std::env::var("DBX_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("daemon log"))
            .stderr(std::fs::File::create(dir.path().join("dbx.stderr")).expect("daemon log"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut d = Daemon {
            child,
            tcp: "0.0.0.0:0".parse().expect("addr"),
            tls: None,
            udp: None,
            http: "0.0.0.0:0".parse().expect("addr"),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    let addr = |k: &str| v[k].as_str().and_then(|s| s.parse().ok());
                    // `null` when the daemon serves TLS only (listener.plaintext = false).
                    if let Some(tcp) = addr("tcp") {
                        d.tcp = tcp;
                    }
                    d.http = addr("http").expect("http address in ready file");
                    d.tls = addr("tls");
                    d.udp = addr("udp");
                    return d;
                }
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("dbx serve exited early with {status}:\n{}", d.log());
            }
            if Instant::now() > deadline {
                panic!("dbx serve did not become ready in 30 s:\n{}", d.log());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!("{}{}", read("dbx.log"), read("dbx.stderr"))
    }

    /// The directory holding the ready file and logs.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Sends a signal (SIGTERM for a graceful shutdown, SIGKILL for a crash).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for the process to exit (up to `limit`), killing it past that.
    pub async fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// GET `path` from the admin endpoint: (status code, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `bin` with `args` and an environment of only PATH and `env` (nothing of the test's
/// own environment leaks in): whether it succeeded, and its stdout followed by its stderr.
pub fn run_cli(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(bin)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A loopback address on a port free right now, for a daemon that must come back on the
/// same port after a restart (`DBX_LISTENER__TCP_BIND`); port 0 would move it.
pub fn fixed_loopback_bind() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    format!("127.0.0.1:{port}")
}

/// A minimal HTTP/1.1 GET (no client library needed for three admin endpoints).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_get_with(addr, path, &[]).await
}

/// [`http_get`] with extra request headers, e.g. `("Authorization", "Bearer …")`.
pub async fn http_get_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect admin http");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write request");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Chunked bodies: good enough to strip the size lines for our assertions.
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    };
    (code, body)
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}
