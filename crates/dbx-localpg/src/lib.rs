//! # dbx-localpg
//!
//! Local servers for the demo, the tests and the benches: a private PostgreSQL cluster, its
//! certificates, a private MQTT broker. Each is started from the machine's own binaries in a
//! directory of the caller's choosing, as an unprivileged user when we are root, on a free
//! loopback port, and dies with this process. The daemon and the control plane never use
//! this crate; `dbx demo`, `dbx-testkit` and the throughput harness do.
//!
//! - [`cluster`]: the [`LocalCluster`](cluster::LocalCluster) runner (`initdb`, `postgres`,
//!   ports, start/stop, optionally TLS-only with `cert` authentication).
//! - [`citus`]: a [`CitusCluster`](citus::CitusCluster) of a coordinator and workers, each a
//!   `LocalCluster` with `shared_preload_libraries = 'citus'` (the Citus test suite, `dbx demo
//!   --citus`).
//! - [`pki`]: a private CA making the server and client certificates of a TLS cluster (and of
//!   `dbx demo --tls`).
//! - [`broker`]: the [`LocalBroker`](broker::LocalBroker) runner, a Mosquitto with the
//!   configuration shipped in `deploy/mosquitto/`.
pub mod broker;
pub mod citus;
pub mod cluster;
pub mod pki;
