//! The control plane's metrics: the database health indicators (`dbx_db_*`), partition
//! maintenance, the admin HTTP endpoint, `api_requests` retention and the process uptime.
//!
//! Each crate owns its metrics in a `metrics.rs` like this one: the names, with what they
//! count, and their HELP text, registered by [`describe`] (the binary calls each crate's
//! once, after installing the exporter). Conventions: `dbx_` prefix, base units, `_total`
//! for counters, label sets bounded (`reason`, `transport`, `trigger`, `kind`, `schema`,
//! `table`, and `org` capped by `metrics.max_org_labels`). Names never change: the
//! dashboard and the alerts in deploy/ depend on them (tests/ops checks every name they
//! use against these files).
//!
//! Below the names: the setters of the gauges describing state (database health,
//! uptime). Everything logged as well as counted (maintenance runs and failures, idle
//! sessions completed, admin requests refused) is an event of [`crate::events`].

use std::time::Duration;

use ::metrics::{describe_counter as c, describe_gauge as g, gauge, Unit};

use crate::health::HealthSnapshot;

pub use dbx_core::metrics::SESSIONS_COMPLETED_TOTAL;

/// Database health indicators (gauges; prefix for `dbx_db_*`).
pub const DB_PREFIX: &str = "dbx_db_";

/// Partition maintenance runs (counter, label `kind`).
pub const MAINTENANCE_RUNS_TOTAL: &str = "dbx_maintenance_runs_total";

/// Partition maintenance failures (counter, label `kind`).
pub const MAINTENANCE_FAILURES_TOTAL: &str = "dbx_maintenance_failures_total";

/// Seconds since start (gauge).
pub const UPTIME_SECONDS: &str = "dbx_uptime_seconds";

/// Partition maintenance steps skipped after their lock attempts ran out
/// (counter, label `kind`); the next run retries them.
pub const MAINTENANCE_SKIPPED_TOTAL: &str = "dbx_maintenance_skipped_total";

/// Admin HTTP requests refused for a missing or wrong bearer token
/// (`admin.token_file`) (counter).
pub const ADMIN_UNAUTHORIZED_TOTAL: &str = "dbx_admin_unauthorized_total";

/// Control: `dbx_aviation.api_requests` rows deleted by their retention
/// (`partitions.api_requests_retention_days`) (counter).
pub const API_REQUESTS_EXPIRED_TOTAL: &str = "dbx_api_requests_expired_total";

/// 1 when the last health collection succeeded, 0 when the database did not answer (gauge).
pub const DB_UP: &str = "dbx_db_up";

/// Control: `system_health` database_size (gauge, bytes).
pub const DB_SIZE_BYTES: &str = "dbx_db_size_bytes";

/// Control: `system_health` active_connections to this database (gauge).
pub const DB_ACTIVE_CONNECTIONS: &str = "dbx_db_active_connections";

/// Control: `system_health` slow_queries_count (gauge; only exported while
/// pg_stat_statements is installed and preloaded).
pub const DB_SLOW_QUERIES: &str = "dbx_db_slow_queries";

/// Control: `system_health` cache_hit_ratio as a 0..1 ratio (gauge).
pub const DB_CACHE_HIT_RATIO: &str = "dbx_db_cache_hit_ratio";

/// Estimated bloat per table (gauge, bytes, label `table`; the partitions of the
/// live and archive telemetry parents are summed under their parent's name).
pub const DB_TABLE_BLOAT_BYTES: &str = "dbx_db_table_bloat_bytes";

/// Telemetry partitions (gauge, label `schema` = live | archive; the default partition
/// is not counted).
pub const DB_PARTITIONS: &str = "dbx_db_partitions";

/// Lower bound of the oldest partition (gauge, unix seconds, label `schema`).
pub const DB_PARTITION_OLDEST_START: &str = "dbx_db_partition_oldest_start_timestamp_seconds";

/// Upper bound of the newest partition (gauge, unix seconds, label `schema`).
pub const DB_PARTITION_NEWEST_END: &str = "dbx_db_partition_newest_end_timestamp_seconds";

/// Seconds from now to the upper bound of the newest live partition (gauge; alert
/// well before it reaches 0, when points would start landing in the default partition).
pub const DB_PARTITION_AHEAD_SECONDS: &str = "dbx_db_partition_ahead_seconds";

/// Rows in the default partition (gauge; should be 0, the sweep moves them out).
pub const DB_DEFAULT_PARTITION_ROWS: &str = "dbx_db_default_partition_rows";

/// Connections of the ingest role's members to this database (gauge).
pub const DB_INGEST_CONNECTIONS: &str = "dbx_db_ingest_connections";

/// 1 when the health collector's connection to PostgreSQL is TLS-encrypted
/// (`pg_stat_ssl` of its own backend), 0 when it is plaintext (gauge).
pub const DB_TLS: &str = "dbx_db_tls";
/// Gauge, Citus only (`dbx setup --distributed`): workers Citus counts as active.
pub const DB_CITUS_ACTIVE_WORKERS: &str = "dbx_db_citus_active_workers";
/// Gauge, Citus only: workers holding placements that do not answer the coordinator.
pub const DB_CITUS_UNREACHABLE_WORKERS: &str = "dbx_db_citus_unreachable_workers";
/// Gauge, Citus only, label `node` (`coordinator` or a worker's `host:port`): connections to
/// the database on that node.
pub const DB_CITUS_NODE_CONNECTIONS: &str = "dbx_db_citus_node_connections";

/// Registers the HELP text of every metric above; call once, after installing the
/// recorder.
pub fn describe() {
    c!(SESSIONS_COMPLETED_TOTAL, "Flight sessions completed, by reason (end: the gateway's end; idle: sessions.idle_timeout_secs without a point).");
    c!(
        MAINTENANCE_RUNS_TOTAL,
        "Partition maintenance runs, by kind."
    );
    c!(
        MAINTENANCE_FAILURES_TOTAL,
        "Partition maintenance failures, by kind."
    );
    g!(
        UPTIME_SECONDS,
        Unit::Seconds,
        "Seconds since the daemon started."
    );
    c!(
        MAINTENANCE_SKIPPED_TOTAL,
        "Partition maintenance steps skipped because their tables stayed locked, by kind."
    );
    c!(
        ADMIN_UNAUTHORIZED_TOTAL,
        "Admin HTTP requests refused for a missing or wrong bearer token (admin.token_file)."
    );
    c!(
        API_REQUESTS_EXPIRED_TOTAL,
        "api_requests rows deleted by their retention (partitions.api_requests_retention_days)."
    );
    g!(
        DB_UP,
        "1 when the last database health collection succeeded, else 0."
    );
    g!(
        DB_SIZE_BYTES,
        Unit::Bytes,
        "Size of the database (system_health.database_size)."
    );
    g!(
        DB_ACTIVE_CONNECTIONS,
        "Connections to the database (system_health.active_connections)."
    );
    g!(DB_SLOW_QUERIES, "Statements averaging over 100 ms (system_health.slow_queries_count; needs pg_stat_statements).");
    g!(DB_CACHE_HIT_RATIO, "Share of heap block reads served from shared buffers, 0..1 (system_health.cache_hit_ratio).");
    g!(
        DB_TABLE_BLOAT_BYTES,
        Unit::Bytes,
        "Estimated bloat per table (table_bloat); telemetry partitions summed under their parent."
    );
    g!(
        DB_PARTITIONS,
        "Telemetry partitions per schema (live, archive), the default partition not counted."
    );
    g!(
        DB_PARTITION_OLDEST_START,
        Unit::Seconds,
        "Lower bound of the oldest telemetry partition per schema, unix time."
    );
    g!(
        DB_PARTITION_NEWEST_END,
        Unit::Seconds,
        "Upper bound of the newest telemetry partition per schema, unix time."
    );
    g!(
        DB_PARTITION_AHEAD_SECONDS,
        Unit::Seconds,
        "Seconds until the newest live partition ends; alert before it nears 0."
    );
    g!(
        DB_DEFAULT_PARTITION_ROWS,
        "Rows in the default telemetry partition (the sweep moves them out)."
    );
    g!(
        DB_INGEST_CONNECTIONS,
        "Connections of members of the dbx_ingest role to the database."
    );
    g!(DB_TLS, "1 when the health collector's connection to PostgreSQL is TLS-encrypted (pg_stat_ssl), else 0.");
    g!(
        DB_CITUS_ACTIVE_WORKERS,
        "Citus only: workers the coordinator counts as active (citus_get_active_worker_nodes)."
    );
    g!(
        DB_CITUS_UNREACHABLE_WORKERS,
        "Citus only: workers holding shards or placements that do not answer; /readyz fails meanwhile."
    );
    g!(
        DB_CITUS_NODE_CONNECTIONS,
        "Citus only: connections to the database per node (coordinator, or a worker's host:port)."
    );
}

/// Sets every `dbx_db_*` gauge from a health collection that succeeded (`dbx_db_up` 1).
pub fn health(s: &HealthSnapshot) {
    gauge!(DB_UP).set(1.0);
    let opt = |name: &'static str, v: Option<f64>| {
        if let Some(v) = v {
            gauge!(name).set(v);
        }
    };
    opt(DB_SIZE_BYTES, s.database_size_bytes);
    opt(DB_ACTIVE_CONNECTIONS, s.active_connections);
    opt(DB_SLOW_QUERIES, s.slow_queries_count);
    opt(DB_CACHE_HIT_RATIO, s.cache_hit_ratio);
    opt(DB_PARTITION_AHEAD_SECONDS, s.partition_ahead_seconds);
    for (table, bytes) in &s.table_bloat_bytes {
        gauge!(DB_TABLE_BLOAT_BYTES, "table" => table.clone()).set(*bytes as f64);
    }
    for p in &s.partitions {
        let schema = p.schema.clone();
        gauge!(DB_PARTITIONS, "schema" => schema.clone()).set(p.count as f64);
        if let Some(t) = p.oldest_start {
            gauge!(DB_PARTITION_OLDEST_START, "schema" => schema.clone()).set(t.timestamp() as f64);
        }
        if let Some(t) = p.newest_end {
            gauge!(DB_PARTITION_NEWEST_END, "schema" => schema).set(t.timestamp() as f64);
        }
    }
    gauge!(DB_DEFAULT_PARTITION_ROWS).set(s.default_partition_rows as f64);
    gauge!(DB_INGEST_CONNECTIONS).set(s.ingest_connections as f64);
    gauge!(DB_TLS).set(if s.tls { 1.0 } else { 0.0 });
}

/// The Citus gauges (a coordinator only): active and unreachable workers, connections
/// per node.
pub fn citus(c: &crate::citus::ClusterView) {
    gauge!(DB_CITUS_ACTIVE_WORKERS).set(c.active_workers as f64);
    gauge!(DB_CITUS_UNREACHABLE_WORKERS).set(c.unreachable.len() as f64);
    for (node, n) in &c.connections {
        gauge!(DB_CITUS_NODE_CONNECTIONS, "node" => node.clone()).set(*n as f64);
    }
}

/// `dbx_db_up` 0: the database did not answer the health collection.
pub fn db_down() {
    gauge!(DB_UP).set(0.0);
}

/// `dbx_uptime_seconds`.
pub fn uptime(since_start: Duration) {
    gauge!(UPTIME_SECONDS).set(since_start.as_secs_f64());
}
