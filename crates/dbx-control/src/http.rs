//! The admin HTTP endpoint (PROTOCOL.md: 127.0.0.1:9898 by default):
//!
//! - `/metrics`: every metric of the daemon, Prometheus text format with HELP lines;
//! - `/healthz`: the process is alive (always 200 while it can answer);
//! - `/readyz`: 200 only when the database answers, the next partition is in place,
//!   and the listener is accepting; 503 with the failing checks otherwise;
//! - `/api/v2/system/status`: the seed's status endpoint, as JSON: version, uptime,
//!   database status with the `system_health` indicators, and ingest figures.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Value};

use dbx_core::{SharedClock, Shutdown};

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
        .with_state(state)
}

/// Serves the admin endpoint on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.recv().await })
        .await
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
    metrics::gauge!(dbx_core::metrics::UPTIME_SECONDS).set(s.started.elapsed().as_secs_f64());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.prometheus.render(),
    )
        .into_response()
}

async fn db_health(pool: &Pool) -> Result<Vec<(String, Option<i64>, String)>, String> {
    let fut = async {
        let client = pool.get().await.map_err(|e| e.to_string())?;
        let rows = client
            .query(
                "SELECT metric, value::bigint, unit FROM dbx_aviation.system_health",
                &[],
            )
            .await
            .map_err(|e| crate::setup::describe_pg_error(&e))?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    r.get::<_, Option<i64>>(1),
                    r.get::<_, String>(2),
                )
            })
            .collect())
    };
    tokio::time::timeout(Duration::from_secs(3), fut)
        .await
        .unwrap_or_else(|_| Err("timed out after 3 s".into()))
}

async fn next_partition_ready(s: &AdminState) -> Result<bool, String> {
    let fut = async {
        let client = s.pool.get().await.map_err(|e| e.to_string())?;
        let tomorrow = (s.clock.now() + chrono::TimeDelta::days(1))
            .format("%Y%m%d")
            .to_string();
        let hour = (s.clock.now() + chrono::TimeDelta::hours(1))
            .format("%Y%m%d%H")
            .to_string();
        let row = client
            .query_one(
                "SELECT to_regclass('dbx_aviation.flight_telemetry_p' || $1) IS NOT NULL \
                     OR to_regclass('dbx_aviation.flight_telemetry_p' || $2) IS NOT NULL",
                &[&tomorrow, &hour],
            )
            .await
            .map_err(|e| crate::setup::describe_pg_error(&e))?;
        Ok(row.get::<_, bool>(0))
    };
    tokio::time::timeout(Duration::from_secs(3), fut)
        .await
        .unwrap_or_else(|_| Err("timed out after 3 s".into()))
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let mut failing = Vec::new();
    match next_partition_ready(&s).await {
        Ok(true) => {}
        Ok(false) => {
            failing.push("the next partition of flight_telemetry does not exist yet".to_string())
        }
        Err(e) => failing.push(format!("database unreachable: {e}")),
    }
    if !s.listener_accepting.load(Ordering::Relaxed) {
        failing.push("the listener is not accepting connections".into());
    }
    if failing.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", failing.join("; ")),
        )
            .into_response()
    }
}

async fn status(State(s): State<AdminState>) -> Json<Value> {
    let db = match db_health(&s.pool).await {
        Ok(rows) => json!({
            "status": "connected",
            "health": rows.iter().map(|(m, v, u)| json!({"metric": m, "value": v, "unit": u})).collect::<Vec<_>>(),
        }),
        Err(e) => json!({"status": "unreachable", "error": e}),
    };
    Json(json!({
        "service": "dbx",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": s.started.elapsed().as_secs(),
        "listener_accepting": s.listener_accepting.load(Ordering::Relaxed),
        "database": db,
        "ingest": (s.status)(),
    }))
}
