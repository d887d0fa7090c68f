//! The admin HTTP endpoint (docs/protocol.md: 127.0.0.1:9898 by default):
//!
//! - `/metrics`: every metric of the daemon, Prometheus text format with HELP lines;
//! - `/healthz`: the process is alive (always 200 while it can answer);
//! - `/readyz`: 200 only when the database answers (on Citus: every worker holding shards too),
//!   live partitions cover now and the next
//!   interval, and the listener is accepting; 503 naming the failing checks otherwise;
//! - `/api/v2/system/status`: the seed's status endpoint, as JSON: version, uptime, database
//!   status with the live `system_health` indicators, the health collector's last snapshot
//!   (partitions, bloat, default-partition rows), ingest rates and queue depths.
//!
//! Ingest rates come from the daemon's own counters: a sampler reads the rendered exposition
//! every few seconds, so this crate needs no handle on the listener or the batcher.
//!
//! With an [`AdminToken`] (`admin.token_file`; required whenever `http.bind` is not a
//! loopback address) every request must carry `Authorization: Bearer <token>`, compared in
//! constant time; others get 401 and are counted in `dbx_admin_unauthorized_total`. Two
//! exceptions keep load balancers and orchestrators working without the secret:
//! `/healthz` (it says only "ok"), and the status code of `/readyz` — without the token
//! its body is only `ready` / `not ready`, the failing checks (which name database errors)
//! are shown to token holders alone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::events::AdminUnauthorized;
use crate::metrics as m;
use dbx_core::{InternalEvent, SharedClock, Shutdown};

use crate::health::HealthHandle;
use dbx_core::partition::PartitionInterval;

/// Extra figures for the status endpoint, supplied by the binary (queue depths, ingest totals).
pub type StatusSource = Arc<dyn Fn() -> Value + Send + Sync>;

/// What the admin endpoint reads from.
#[derive(Clone)]
pub struct AdminState {
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// A pool for health queries (its own, not the writers').
    pub pool: Pool,
    /// Process start.
    pub started: Instant,
    /// Set by the binary once the listener accepts, cleared when it stops.
    pub listener_accepting: Arc<AtomicBool>,
    /// Ingest figures.
    pub status: StatusSource,
    /// The clock (for the partition-ahead check).
    pub clock: SharedClock,
    /// Partition width (what "the next partition" means).
    pub interval: PartitionInterval,
    /// The health collector's last snapshot.
    pub health: HealthHandle,
    /// Ingest rates, kept current by the sampler [`serve`] runs.
    pub rates: Rates,
    /// The bearer token requests must carry; `None`: the endpoint is open (loopback only).
    pub token: Option<Arc<AdminToken>>,
}

/// Shortest and longest token accepted from `admin.token_file`, bytes.
const TOKEN_LEN: std::ops::RangeInclusive<usize> = 16..=4096;

/// The admin endpoint's bearer token. Only its SHA-256 is kept, and a presented token is
/// compared by digest in constant time, so neither its length nor a matching prefix shows
/// in the response time.
pub struct AdminToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// Why `admin.token_file` cannot be used; every message names the file, never the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// It cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Someone other than its owner may change it.
    #[error(
        "{path} is writable by its group or by other users (mode {mode:04o}); make it 0600 or 0400"
    )]
    Writable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Its content is not a usable token.
    #[error("{path}: {problem} (the token is the file's content, surrounding whitespace ignored: 16 to 4096 visible ASCII characters)")]
    Content {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: &'static str,
    },
}

impl AdminToken {
    /// A token from its text (tests and [`AdminToken::read`]).
    pub fn new(token: &str) -> Self {
        AdminToken {
            digest: Sha256::digest(token.as_bytes()).into(),
        }
    }

    /// Reads the token file: a regular file (symbolic links are followed: orchestrators
    /// mount secrets that way) not writable by group or others, holding 16 to 4096 visible
    /// ASCII characters. Returns the token and whether group or others may read the file,
    /// which the caller warns about: container secret mounts often are, a host file should
    /// not be.
    pub fn read(path: &Path) -> Result<(AdminToken, bool), TokenFileError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |source| TokenFileError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        let content = |problem| TokenFileError::Content {
            path: path.to_path_buf(),
            problem,
        };
        if !meta.is_file() {
            return Err(content("not a regular file"));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(TokenFileError::Writable {
                path: path.to_path_buf(),
                mode,
            });
        }
        if meta.len() > 64 * 1024 {
            return Err(content("it is larger than 64 KiB"));
        }
        let text = std::fs::read(path).map_err(io)?;
        let token = std::str::from_utf8(&text)
            .map_err(|_| content("it is not ASCII text"))?
            .trim();
        if token.is_empty() {
            return Err(content("it is empty"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(content(
                "it holds whitespace, control or non-ASCII characters",
            ));
        }
        if !TOKEN_LEN.contains(&token.len()) {
            return Err(content(
                "it is shorter than 16 or longer than 4096 characters",
            ));
        }
        Ok((AdminToken::new(token), mode & 0o044 != 0))
    }

    /// True when `headers` carry `Authorization: Bearer <this token>`.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            });
        let Some(presented) = presented else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        digest.ct_eq(&self.digest).into()
    }
}

/// Whether a request may see everything: no token configured, or the right one presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Authorized(bool);

/// The bearer-token gate in front of every route (see the module docs for the two
/// exceptions).
async fn require_token(State(s): State<AdminState>, mut req: Request, next: Next) -> Response {
    let ok = s.token.as_ref().is_none_or(|t| t.admits(req.headers()));
    let path = req.uri().path();
    if ok || path == "/healthz" || path == "/readyz" {
        req.extensions_mut().insert(Authorized(ok));
        return next.run(req).await;
    }
    AdminUnauthorized { path }.emit();
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"dbx admin\"")],
        "unauthorized: this endpoint needs Authorization: Bearer <admin.token_file's token>\n",
    )
        .into_response()
}

/// Ingest totals and per-second rates over the last sampling window.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RateSample {
    /// `dbx_points_received_total`, all transports.
    pub points_received_total: f64,
    /// `dbx_points_written_total`.
    pub points_written_total: f64,
    /// Points received per second over the window.
    pub points_received_per_sec: f64,
    /// Points committed per second over the window.
    pub points_written_per_sec: f64,
    /// The window, seconds (0 before the second sample).
    pub window_seconds: f64,
}

/// Shared ingest-rate state.
#[derive(Debug, Clone, Default)]
pub struct Rates(Arc<Mutex<(Option<Instant>, RateSample)>>);

impl Rates {
    /// The latest sample.
    pub fn get(&self) -> RateSample {
        self.0.lock().map(|g| g.1.clone()).unwrap_or_default()
    }

    /// Takes a sample from a rendered exposition.
    pub fn sample(&self, exposition: &str) {
        let received = counter_sum(exposition, dbx_core::metrics::POINTS_RECEIVED_TOTAL);
        let written = counter_sum(exposition, dbx_core::metrics::POINTS_WRITTEN_TOTAL);
        let now = Instant::now();
        if let Ok(mut g) = self.0.lock() {
            let (last, prev) = &mut *g;
            let window = last
                .map(|l| now.duration_since(l).as_secs_f64())
                .unwrap_or(0.0);
            let rate = |cur: f64, old: f64| {
                if window > 0.0 {
                    ((cur - old) / window).max(0.0)
                } else {
                    0.0
                }
            };
            *prev = RateSample {
                points_received_per_sec: rate(received, prev.points_received_total),
                points_written_per_sec: rate(written, prev.points_written_total),
                points_received_total: received,
                points_written_total: written,
                window_seconds: window,
            };
            *last = Some(now);
        }
    }
}

/// The sum over every label set of one metric in a text exposition.
pub fn counter_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                return None;
            }
            l.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .sum()
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

/// The router (exposed for tests).
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v2/system/status", get(status))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .with_state(state)
}

/// Serves the admin endpoint on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    let sampler = {
        let (prometheus, rates, mut stop) = (
            state.prometheus.clone(),
            state.rates.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let mut timer = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = stop.recv() => return,
                    _ = timer.tick() => rates.sample(&prometheus.render()),
                }
            }
        })
    };
    let r = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.recv().await })
        .await;
    sampler.abort();
    r
}

/// Binds the admin address, naming it on failure.
pub async fn bind(addr: &str) -> Result<(tokio::net::TcpListener, SocketAddr), String> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot bind http.bind {addr}: {e}"))?;
    let a = l.local_addr().map_err(|e| e.to_string())?;
    Ok((l, a))
}

async fn metrics_handler(State(s): State<AdminState>) -> Response {
    m::uptime(s.started.elapsed());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.prometheus.render(),
    )
        .into_response()
}

async fn db_health(pool: &Pool) -> Result<Vec<(String, Option<f64>, String)>, String> {
    let fut = async {
        let client = pool.get().await.map_err(|e| e.to_string())?;
        let rows = client
            .query(
                "SELECT metric, value, unit FROM dbx_aviation.system_health",
                &[],
            )
            .await
            .map_err(|e| dbx_pg::describe(&e))?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    r.get::<_, Option<f64>>(1),
                    r.get::<_, String>(2),
                )
            })
            .collect())
    };
    tokio::time::timeout(Duration::from_secs(3), fut)
        .await
        .unwrap_or_else(|_| Err("timed out after 3 s".into()))
}

/// Live partitions covering now and the next interval: (now covered, next covered).
async fn partitions_ahead(s: &AdminState) -> Result<(bool, bool), String> {
    let fut = async {
        let client = s.pool.get().await.map_err(|e| e.to_string())?;
        let now = s.clock.now();
        let next = s.interval.floor(now) + s.interval.step();
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE range_start <= $1 AND range_end > $1) > 0,
                        count(*) FILTER (WHERE range_start <= $2 AND range_end > $2) > 0
                   FROM dbx_aviation.telemetry_partitions()
                  WHERE parent = 'dbx_aviation.flight_telemetry' AND NOT is_default",
                &[&now, &next],
            )
            .await
            .map_err(|e| dbx_pg::describe(&e))?;
        Ok((row.get::<_, bool>(0), row.get::<_, bool>(1)))
    };
    tokio::time::timeout(Duration::from_secs(3), fut)
        .await
        .unwrap_or_else(|_| Err("timed out after 3 s".into()))
}

/// On a Citus cluster, the workers holding shards that do not answer (their data is out of
/// reach, so writes of their sessions fail); nothing on a single node.
async fn citus_workers(s: &AdminState) -> Result<Vec<String>, String> {
    let fut = async {
        let client = s.pool.get().await.map_err(|e| e.to_string())?;
        let view = crate::citus::cluster_view(&**client)
            .await
            .map_err(|e| dbx_pg::describe(&e))?;
        Ok(view
            .map(|v| {
                v.unreachable
                    .into_iter()
                    .map(|w| format!("Citus worker unreachable: {w}"))
                    .collect()
            })
            .unwrap_or_default())
    };
    tokio::time::timeout(Duration::from_secs(3), fut)
        .await
        .unwrap_or_else(|_| Err("timed out after 3 s".into()))
}

async fn readyz(
    State(s): State<AdminState>,
    authorized: Option<axum::Extension<Authorized>>,
) -> Response {
    let details = authorized.is_some_and(|axum::Extension(Authorized(ok))| ok);
    let mut failing = Vec::new();
    match partitions_ahead(&s).await {
        Ok((true, true)) => {}
        Ok((now, _)) => failing.push(format!(
            "no live partition of flight_telemetry for {} (premake has not run?)",
            if now { "the next interval" } else { "now" }
        )),
        Err(e) => failing.push(format!("database unreachable: {e}")),
    }
    match citus_workers(&s).await {
        Ok(down) => failing.extend(down),
        Err(e) => failing.push(format!("database unreachable: {e}")),
    }
    if !s.listener_accepting.load(Ordering::Relaxed) {
        failing.push("the listener is not accepting connections".into());
    }
    if failing.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else if details {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", failing.join("; ")),
        )
            .into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn status(State(s): State<AdminState>) -> Json<Value> {
    let t = Instant::now();
    let db = match db_health(&s.pool).await {
        Ok(rows) => json!({
            "status": "connected",
            "latency_ms": t.elapsed().as_secs_f64() * 1000.0,
            "health": rows.iter().map(|(m, v, u)| json!({"metric": m, "value": v, "unit": u})).collect::<Vec<_>>(),
        }),
        Err(e) => json!({"status": "unreachable", "error": e}),
    };
    let health = s
        .health
        .read()
        .map(|h| serde_json::to_value(&*h).unwrap_or(Value::Null))
        .unwrap_or(Value::Null);
    let mut ingest = json!({ "rates": s.rates.get() });
    if let (Some(obj), Value::Object(extra)) = (ingest.as_object_mut(), (s.status)()) {
        obj.extend(extra);
    }
    Json(json!({
        "service": "dbx",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": s.started.elapsed().as_secs(),
        "listener_accepting": s.listener_accepting.load(Ordering::Relaxed),
        "database": db,
        "health": health,
        "ingest": ingest,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_sums_add_label_sets_and_skip_lookalikes() {
        let text = "# HELP dbx_points_written_total x\n# TYPE dbx_points_written_total counter\n\
                    dbx_points_written_total 40\n\
                    dbx_points_received_total{transport=\"tcp\"} 30\n\
                    dbx_points_received_total{transport=\"udp\"} 12\n\
                    dbx_points_received_total_other 99\n";
        assert_eq!(
            counter_sum(text, dbx_core::metrics::POINTS_RECEIVED_TOTAL),
            42.0
        );
        assert_eq!(
            counter_sum(text, dbx_core::metrics::POINTS_WRITTEN_TOTAL),
            40.0
        );
        let r = Rates::default();
        r.sample(text);
        assert_eq!(r.get().points_written_total, 40.0);
        assert_eq!(r.get().window_seconds, 0.0);
    }

    fn auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn only_the_exact_bearer_token_is_admitted() {
        let t = AdminToken::new("s3cret-token-0123456789");
        assert!(t.admits(&auth("Bearer s3cret-token-0123456789")));
        assert!(t.admits(&auth("bearer s3cret-token-0123456789")));
        for bad in [
            "Bearer s3cret-token-012345678",
            "Bearer s3cret-token-01234567890",
            "Bearer ",
            "Basic s3cret-token-0123456789",
            "s3cret-token-0123456789",
        ] {
            assert!(!t.admits(&auth(bad)), "{bad}");
        }
        assert!(!t.admits(&HeaderMap::new()));
        assert_eq!(format!("{t:?}"), "AdminToken(..)");
    }

    #[test]
    fn the_token_file_is_checked_and_its_content_never_shown() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let p = write("ok", "  abcdefghijklmnop0123\n", 0o600);
        let (t, readable) = AdminToken::read(&p).unwrap();
        assert!(t.admits(&auth("Bearer abcdefghijklmnop0123")) && !readable);
        let (_, readable) =
            AdminToken::read(&write("shared", "abcdefghijklmnop0123", 0o644)).unwrap();
        assert!(
            readable,
            "group/other readable is reported (the caller warns)"
        );
        for (name, text, mode, want) in [
            ("gw", "abcdefghijklmnop0123", 0o620, "writable"),
            ("ow", "abcdefghijklmnop0123", 0o602, "writable"),
            ("empty", " \n", 0o600, "empty"),
            ("short", "abc", 0o600, "shorter than 16"),
            ("space", "abcdefgh ijklmnop0123", 0o600, "whitespace"),
            ("utf", "abcdefghijklmnop0123\u{e9}", 0o600, "non-ASCII"),
        ] {
            let e = AdminToken::read(&write(name, text, mode))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains(name), "{name}: {e}");
            assert!(!e.contains("abcdefgh"), "the token was shown: {e}");
        }
        let e = AdminToken::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = AdminToken::read(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read") && e.contains("missing"), "{e}");
    }
}
