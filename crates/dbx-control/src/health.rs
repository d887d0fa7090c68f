//! The database health collector: on its own connection and its own timer it reads the seed's
//! `system_health` indicators (database_size, active_connections, slow_queries_count when
//! pg_stat_statements is loaded, cache_hit_ratio), `table_bloat`, the partitions of the live and
//! archive tables (count and bounds), the rows sitting in the default partition, how far ahead
//! the newest live partition reaches, the ingest role's connections, and whether its own connection
//! is TLS-encrypted (`pg_stat_ssl`, the server's view), on a Citus coordinator the cluster's
//! workers (active, unreachable, connections per node), and exports them as the
//! `dbx_db_*` gauges of [`crate::metrics`]. The last snapshot is also kept for
//! `/api/v2/system/status`. When the database does not answer, `dbx_db_up` drops to 0 and the
//! other gauges keep their last values.
//!
//! Every query reads catalogs, statistics or a bounded number of rows, so a collection costs
//! the same on an empty and on a large database: sizes come from `pg_database_size` (file
//! sizes), bloat from `pg_stats`, partitions from `pg_inherits`, and the default partition is
//! counted exactly only up to `DEFAULT_ROWS_EXACT` rows (the planner's estimate beyond).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dbx_pg::Connector;
use serde::Serialize;
use tokio_postgres::Client;

use crate::metrics as m;
use dbx_core::{SharedClock, Shutdown};

use crate::setup::EXPECTED_TABLES;

/// Rows of the default partition counted exactly; beyond, the planner's estimate is reported.
const DEFAULT_ROWS_EXACT: i64 = 100_000;

/// The last collection, shared with the admin endpoint.
pub type HealthHandle = Arc<RwLock<HealthSnapshot>>;

/// Partitions of one schema.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SchemaPartitions {
    /// `live` (dbx_aviation) or `archive` (dbx_archive).
    pub schema: String,
    /// Partitions, the default one not counted.
    pub count: i64,
    /// Lower bound of the oldest.
    pub oldest_start: Option<DateTime<Utc>>,
    /// Upper bound of the newest.
    pub newest_end: Option<DateTime<Utc>>,
}

/// One collection's results.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HealthSnapshot {
    /// The Citus cluster as the coordinator sees it; `None` on a single node.
    pub citus: Option<crate::citus::ClusterView>,
    /// The last collection succeeded.
    pub up: bool,
    /// When the last successful collection ran (collector clock).
    pub collected_at: Option<DateTime<Utc>>,
    /// Why the last collection failed, if it did.
    pub error: Option<String>,
    /// `system_health.database_size`, bytes.
    pub database_size_bytes: Option<f64>,
    /// `system_health.active_connections`.
    pub active_connections: Option<f64>,
    /// `system_health.slow_queries_count` (`None` without pg_stat_statements).
    pub slow_queries_count: Option<f64>,
    /// `system_health.cache_hit_ratio` as 0..1 (`None` before any read).
    pub cache_hit_ratio: Option<f64>,
    /// Estimated bloat per table, bytes (telemetry partitions summed under their parent).
    pub table_bloat_bytes: BTreeMap<String, i64>,
    /// Live and archive partitions.
    pub partitions: Vec<SchemaPartitions>,
    /// Seconds from now to the newest live partition's upper bound.
    pub partition_ahead_seconds: Option<f64>,
    /// Rows in the default partition.
    pub default_partition_rows: i64,
    /// Connections of the ingest role's members.
    pub ingest_connections: i64,
    /// The collector's connection is TLS-encrypted (`pg_stat_ssl.ssl`).
    pub tls: bool,
    /// Its TLS version (`pg_stat_ssl.version`), when encrypted.
    pub tls_version: Option<String>,
}

/// Polls the database's health on its own connection.
pub struct HealthCollector {
    pg: Connector,
    clock: SharedClock,
    interval: Duration,
    snapshot: HealthHandle,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl std::fmt::Debug for HealthCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthCollector")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

/// A collection that failed.
#[derive(Debug, thiserror::Error)]
#[error("health collection: {0}")]
pub struct HealthError(pub String);

fn qerr(what: &'static str) -> impl Fn(tokio_postgres::Error) -> HealthError {
    move |e| HealthError(format!("{what}: {}", dbx_pg::describe(&e)))
}

impl HealthCollector {
    /// A collector connecting with `pg`, every `interval`.
    pub fn new(pg: Connector, clock: SharedClock, interval: Duration) -> Self {
        HealthCollector {
            pg,
            clock,
            interval: interval.max(Duration::from_secs(1)),
            snapshot: Arc::new(RwLock::new(HealthSnapshot::default())),
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// The shared last snapshot.
    pub fn handle(&self) -> HealthHandle {
        self.snapshot.clone()
    }

    async fn connect(&self) -> Result<Client, HealthError> {
        let mut pg = self.pg.clone();
        pg.pg_config_mut().application_name("dbx-health");
        if pg.pg_config().get_connect_timeout().is_none() {
            pg.pg_config_mut().connect_timeout(Duration::from_secs(5));
        }
        let client = pg
            .connect()
            .await
            .map_err(|e| HealthError(format!("connecting: {e}")))?;
        // A stuck catalog query must not stall the collector forever.
        client
            .batch_execute("SET statement_timeout = '10s'")
            .await
            .map_err(qerr("preparing the session"))?;
        Ok(client)
    }

    /// Collects once, updates the gauges and the snapshot, and returns it.
    pub async fn collect_once(&self) -> Result<HealthSnapshot, HealthError> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_some_and(|c| c.is_closed()) {
            *slot = None;
        }
        let result = async {
            if slot.is_none() {
                *slot = Some(self.connect().await?);
            }
            match slot.as_ref() {
                Some(c) => collect(c, self.clock.now()).await,
                None => Err(HealthError("no connection".into())),
            }
        }
        .await;
        match result {
            Ok(snap) => {
                m::health(&snap);
                if snap.default_partition_rows > 0 {
                    tracing::warn!(
                        rows = snap.default_partition_rows,
                        "rows in the default telemetry partition (clock-skewed gateway or backfill); the sweep moves them"
                    );
                }
                if let Ok(mut s) = self.snapshot.write() {
                    *s = snap.clone();
                }
                Ok(snap)
            }
            Err(e) => {
                *slot = None;
                m::db_down();
                if let Ok(mut s) = self.snapshot.write() {
                    s.up = false;
                    s.error = Some(e.0.clone());
                }
                Err(e)
            }
        }
    }

    /// Collects every `interval` until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut timer = tokio::time::interval(self.interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.recv() => return,
                _ = timer.tick() => {}
            }
            let r = tokio::select! {
                _ = shutdown.recv() => return,
                r = self.collect_once() => r,
            };
            match r {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("database health collection recovered");
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "database health collection failed");
                }
                Err(e) => tracing::debug!(error = %e, "database health collection still failing"),
            }
        }
    }
}

/// The table label of a bloat row: telemetry partitions go under their parent.
fn bloat_table(schema: &str, table: &str) -> String {
    if table.starts_with("flight_telemetry_p") || table == "flight_telemetry_default" {
        match schema {
            "dbx_archive" => "dbx_archive.flight_telemetry_archive".into(),
            _ => "dbx_aviation.flight_telemetry".into(),
        }
    } else {
        format!("{schema}.{table}")
    }
}

async fn collect(c: &Client, now: DateTime<Utc>) -> Result<HealthSnapshot, HealthError> {
    let mut s = HealthSnapshot {
        up: true,
        collected_at: Some(now),
        ..HealthSnapshot::default()
    };
    // The cluster first, and exported at once: with a worker down the queries below that
    // touch distributed tables fail, and the gauges must still say which worker it is.
    let citus = crate::citus::cluster_view(c)
        .await
        .map_err(qerr("reading the Citus cluster"))?;
    if let Some(v) = &citus {
        m::citus(v);
    }
    read_system_health(c, &mut s).await?;
    read_bloat(c, &mut s).await?;
    read_partitions(c, now, &mut s).await?;
    // The figure is an alarm, not an inventory, and must stay cheap however much a skewed
    // clock put there: exact up to DEFAULT_ROWS_EXACT rows (reading at most that many), the
    // planner's estimate beyond.
    s.default_partition_rows = c
        .query_one(
            "SELECT CASE WHEN d.n < $1 THEN d.n
                         ELSE greatest(d.n, (SELECT c.reltuples::bigint FROM pg_class c
                                              WHERE c.oid = 'dbx_aviation.flight_telemetry_default'::regclass))
                    END
               FROM (SELECT count(*) AS n FROM (SELECT 1 FROM dbx_aviation.flight_telemetry_default
                                                  LIMIT $1) l) d",
            &[&DEFAULT_ROWS_EXACT],
        )
        .await
        .map_err(qerr("counting default-partition rows"))?
        .get(0);
    s.ingest_connections = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid
              WHERE a.datname = current_database() AND NOT r.rolsuper
                AND pg_has_role(a.usesysid, 'dbx_ingest', 'MEMBER')",
            &[],
        )
        .await
        .map_err(qerr("counting ingest connections"))?
        .get(0);
    let ssl = c
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(qerr("reading pg_stat_ssl"))?;
    s.tls = ssl.get(0);
    s.tls_version = ssl.get(1);
    s.citus = citus;
    Ok(s)
}

/// The `dbx_aviation.system_health` figures.
async fn read_system_health(c: &Client, s: &mut HealthSnapshot) -> Result<(), HealthError> {
    for r in c
        .query("SELECT metric, value FROM dbx_aviation.system_health", &[])
        .await
        .map_err(qerr("reading system_health"))?
    {
        let v: Option<f64> = r.get(1);
        match r.get::<_, &str>(0) {
            "database_size" => s.database_size_bytes = v,
            "active_connections" => s.active_connections = v,
            "slow_queries_count" => s.slow_queries_count = v,
            "cache_hit_ratio" => s.cache_hit_ratio = v.map(|p| p / 100.0),
            _ => {}
        }
    }
    Ok(())
}

/// Bloat per dbx table (`dbx_aviation.table_bloat`), partitions summed into their parent.
async fn read_bloat(c: &Client, s: &mut HealthSnapshot) -> Result<(), HealthError> {
    // Every dbx table has a bloat figure, 0 until ANALYZE gave the estimate something to go on.
    for t in EXPECTED_TABLES {
        s.table_bloat_bytes.insert(t.to_string(), 0);
    }
    s.table_bloat_bytes
        .insert("dbx_archive.flight_telemetry_archive".into(), 0);
    for r in c
        .query(
            "SELECT schemaname, tablename, bloat_bytes FROM dbx_aviation.table_bloat",
            &[],
        )
        .await
        .map_err(qerr("reading table_bloat"))?
    {
        let key = bloat_table(r.get(0), r.get(1));
        *s.table_bloat_bytes.entry(key).or_insert(0) += r.get::<_, i64>(2);
    }
    Ok(())
}

/// Live and archive partitions: count, oldest start, newest end; how far ahead the live
/// ones reach.
async fn read_partitions(
    c: &Client,
    now: DateTime<Utc>,
    s: &mut HealthSnapshot,
) -> Result<(), HealthError> {
    let mut live = SchemaPartitions {
        schema: "live".into(),
        ..SchemaPartitions::default()
    };
    let mut archive = SchemaPartitions {
        schema: "archive".into(),
        ..SchemaPartitions::default()
    };
    for r in c
        .query(
            "SELECT partition_schema, count(*), min(range_start), max(range_end)
               FROM dbx_aviation.telemetry_partitions() WHERE NOT is_default GROUP BY 1",
            &[],
        )
        .await
        .map_err(qerr("reading the partitions"))?
    {
        let target = match r.get::<_, &str>(0) {
            "dbx_archive" => &mut archive,
            _ => &mut live,
        };
        target.count = r.get(1);
        target.oldest_start = r.get(2);
        target.newest_end = r.get(3);
    }
    s.partition_ahead_seconds = live
        .newest_end
        .map(|end| (end - now).num_milliseconds() as f64 / 1000.0);
    s.partitions = vec![live, archive];
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bloat_of_partitions_goes_under_the_parent() {
        assert_eq!(
            bloat_table("dbx_aviation", "flight_telemetry_p20260101"),
            "dbx_aviation.flight_telemetry"
        );
        assert_eq!(
            bloat_table("dbx_aviation", "flight_telemetry_default"),
            "dbx_aviation.flight_telemetry"
        );
        assert_eq!(
            bloat_table("dbx_archive", "flight_telemetry_p2026010100"),
            "dbx_archive.flight_telemetry_archive"
        );
        assert_eq!(bloat_table("dbx_audit", "audit_log"), "dbx_audit.audit_log");
    }
}
