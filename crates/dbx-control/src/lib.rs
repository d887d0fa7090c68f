//! # dbx-control
//!
//! Keeps the database in order while the daemon runs, and makes its state visible.
//! Never on the ingest hot path.
//!
//! - `migrate`: the versioned SQL migrations embedded in the binary, applied once each.
//! - `postgis`: the optional PostGIS branch of the schema and the operator's choice of it.
//! - `citus`: the distribution step of `dbx setup --distributed` (tables placed on a Citus cluster).
//! - `setup`: `dbx setup` (database, migrations, users, sample data, credentials) and `dbx check`.
//! - `partitions`: the `PartitionManager`: premake, default-partition sweep, archival,
//!   retention, upkeep of the daily telemetry aggregate, under an advisory lock.
//! - `health`: the `system_health` collector exporting `dbx_db_*` gauges.
//! - `sessions`: the `SessionCompleter`, which completes flight sessions idle for
//!   `sessions.idle_timeout_secs` (protocol 1.1).
//! - `tenants`: organizations, API keys, aircraft and report search behind `dbx org|key|aircraft|analyses`.
//! - [`metrics`] / [`events`]: metric names and HELP, health gauges; the events that log
//!   and count together (maintenance runs and failures, idle sessions, refused admin requests).
//! - `http`: `/metrics`, `/healthz`, `/readyz`, `/api/v2/system/status`.
//!
//! Every connection to PostgreSQL is made by a `dbx_pg::Connector` (TLS settings included).
pub mod citus;
pub mod events;
pub mod health;
pub mod http;
pub mod metrics;
pub mod migrate;
pub mod partitions;
pub mod postgis;
pub mod sessions;
pub mod setup;
pub mod tenants;
