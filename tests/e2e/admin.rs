//! The admin endpoint off loopback: it refuses to start without `admin.token_file`, and
//! with one it answers only bearers of the token, except `/healthz` and `/readyz`'s
//! status code (load balancers), whose body then names no failing check.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use dbx_testkit::daemon::http_get_with;

use crate::{dbx_bin, Env};

const TOKEN: &str = "e2e-admin-token-8f1c2d3e4a5b6c7d";

/// The daemon's admin address as a client reaches it (it bound 0.0.0.0).
fn reachable(http: SocketAddr) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], http.port()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_without_a_token_file_the_daemon_refuses_to_start() {
    let out = tokio::process::Command::new(dbx_bin())
        .arg("serve")
        .env_clear()
        .env("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
        .env("DBX_HTTP__BIND", "0.0.0.0:0")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .expect("exits at once")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("admin.token_file") && err.contains("0.0.0.0:0") && err.contains("loopback"),
        "{err}"
    );
    // A token file others may write is refused too, naming the key and the file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin_token");
    std::fs::write(&file, TOKEN).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = tokio::process::Command::new(dbx_bin())
        .arg("serve")
        .env_clear()
        .env("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
        .env("DBX_HTTP__BIND", "0.0.0.0:0")
        .env("DBX_ADMIN__TOKEN_FILE", &file)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("admin.token_file") && err.contains("writable") && !err.contains(TOKEN),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_admin_endpoint_answers_only_its_bearers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin_token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let file = file.display().to_string();
    let env = Env::start(&[
        ("DBX_HTTP__BIND", "0.0.0.0:0"),
        ("DBX_ADMIN__TOKEN_FILE", file.as_str()),
    ])
    .await;
    assert!(env.daemon.http.ip().is_unspecified(), "{}", env.daemon.http);
    let http = reachable(env.daemon.http);
    let bearer = format!("Bearer {TOKEN}");
    let good = [("Authorization", bearer.as_str())];
    let wrong = [("Authorization", "Bearer e2e-admin-token-8f1c2d3e4a5b6c7e")];
    let basic = [("Authorization", "Basic ZGJ4OmRieA==")];

    for path in ["/metrics", "/api/v2/system/status"] {
        for headers in [&[][..], &wrong[..], &basic[..]] {
            let (code, body) = http_get_with(http, path, headers).await;
            assert_eq!(code, 401, "{path} {headers:?}: {body}");
            assert!(!body.contains("dbx_"), "{path}: {body}");
        }
    }
    // Load balancers and probes need no secret.
    assert_eq!(
        http_get_with(http, "/healthz", &[]).await,
        (200, "ok\n".into())
    );
    assert_eq!(
        http_get_with(http, "/readyz", &[]).await,
        (200, "ready\n".into())
    );

    let (code, body) = http_get_with(http, "/api/v2/system/status", &good).await;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["database"]["status"], "connected");
    let (code, body) = http_get_with(http, "/metrics", &good).await;
    assert_eq!(code, 200);
    let refused = dbx_testkit::env::metric_value(&body, "dbx_admin_unauthorized_total", "");
    assert_eq!(refused, 6.0, "{body}");

    // Not ready (tomorrow's partition is gone): the status code for everyone, the reason
    // for token holders only.
    let tomorrow = (chrono::Utc::now() + chrono::TimeDelta::days(1)).format("%Y%m%d");
    env.client
        .batch_execute(&format!(
            "DROP TABLE dbx_aviation.flight_telemetry_p{tomorrow}"
        ))
        .await
        .unwrap();
    assert_eq!(
        http_get_with(http, "/readyz", &[]).await,
        (503, "not ready\n".into())
    );
    let (code, body) = http_get_with(http, "/readyz", &good).await;
    assert_eq!(code, 503);
    assert!(body.contains("no live partition"), "{body}");
    assert!(!env.daemon.log().contains(TOKEN));
}
