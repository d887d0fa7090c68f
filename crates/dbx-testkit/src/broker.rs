//! A private Mosquitto broker per test, running the configuration shipped in
//! `deploy/mosquitto/` (see [`dbx_localpg::broker`]), with dbx's own user and one user
//! per organization code, and the environment that points a [`crate::Daemon`] at it.
//!
//! A missing `mosquitto` fails the test with the package to install, never a skip.

use std::path::PathBuf;
use std::time::Duration;

use dbx_localpg::broker::{BrokerOptions, LocalBroker};

/// dbx's user at the test broker (the ACL's `user dbx`).
pub const DBX_USER: &str = "dbx";
/// The password of every user of a test broker.
pub const PASSWORD: &str = "broker-test-password";

/// A broker for one test, removed with it.
#[derive(Debug)]
pub struct TestBroker {
    /// The broker (stop, restart, log).
    pub broker: LocalBroker,
    _dir: tempfile::TempDir,
}

impl TestBroker {
    /// Starts a broker whose users are dbx and the given organization codes (each with
    /// [`PASSWORD`]), plus a TLS listener when `tls` holds a certificate and key.
    pub fn start(org_codes: &[&str], tls: Option<(PathBuf, PathBuf)>) -> TestBroker {
        let dir = tempfile::tempdir().expect("broker temp dir");
        let users = std::iter::once(DBX_USER)
            .chain(org_codes.iter().copied())
            .map(|u| (u.to_string(), PASSWORD.to_string()))
            .collect();
        let broker = LocalBroker::start(BrokerOptions {
            dir: dir.path().to_path_buf(),
            users,
            tls,
        })
        .unwrap_or_else(|e| panic!("dbx-testkit: {e}"));
        TestBroker { broker, _dir: dir }
    }

    /// The plain listener's port.
    pub fn port(&self) -> u16 {
        self.broker.port()
    }

    /// Environment for a daemon consuming this broker as dbx, with `client_id`
    /// (fast reconnects, so that restarts in tests are quick).
    pub fn daemon_env(&self, client_id: &str) -> Vec<(String, String)> {
        [
            ("DBX_MQTT__URL", self.broker.url()),
            ("DBX_MQTT__USERNAME", DBX_USER.to_string()),
            ("DBX_MQTT__PASSWORD", PASSWORD.to_string()),
            ("DBX_MQTT__CLIENT_ID", client_id.to_string()),
            ("DBX_MQTT__RECONNECT_INITIAL_MS", "100".to_string()),
            ("DBX_MQTT__RECONNECT_MAX_MS", "500".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// Waits until the daemon is connected to its broker and subscribed (its
/// `dbx_mqtt_connected` gauge is 1); whether it was within `within`.
pub async fn wait_subscribed(daemon: &crate::Daemon, within: Duration) -> bool {
    crate::wait_until(within, || async {
        let (_, body) = daemon.http_get("/metrics").await;
        crate::env::metric_value(&body, "dbx_mqtt_connected", "") >= 1.0
    })
    .await
}
