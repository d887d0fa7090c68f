//! The distribution step of `dbx setup --distributed`: places the migrated schema on a Citus
//! cluster.
//!
//! The migrations are one set for both modes. On a Citus coordinator they build the schema on
//! the coordinator alone ([`crate::migrate`] keeps their DDL local until this step has run);
//! [`distribute`] then decides where every table lives, in one idempotent pass that can be run
//! again at any time (each step looks at `citus_tables` first). Where each table goes and why is
//! [`PLACEMENTS`]; what cannot work on Citus, and what dbx does instead, is in docs/scaling.md.
//!
//! Requirements, checked before anything changes: the `citus` extension in this database, this
//! node is the coordinator, and at least one active worker. The step runs as a superuser.

use tokio_postgres::Client;

use crate::migrate::PgError;

/// True when the schema is distributed (`flight_telemetry` is a Citus table). Needs the `citus`
/// extension in the database (it reads `pg_dist_partition`).
pub const SCHEMA_DISTRIBUTED_SQL: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition \
     WHERE logicalrelid = pg_catalog.to_regclass('dbx_aviation.flight_telemetry'))";

/// Where a table goes on the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// A copy on every node (`create_reference_table`).
    Reference,
    /// Hash-distributed by `session_id`, colocated with `flight_sessions`.
    BySession,
    /// On the coordinator, known to Citus (`citus_add_local_table_to_metadata`), so every node
    /// can read and write it through the coordinator.
    Coordinator,
}

/// Every table of the schema and where it goes, in the order they are placed, with the reason.
pub const PLACEMENTS: [(&str, Placement, &str); 10] = [
    (
        "dbx_aviation.organizations",
        Placement::Reference,
        "small, read by every node: the auth cache and the tenant checks of every commit join it",
    ),
    (
        "dbx_aviation.aircraft_registry",
        Placement::Reference,
        "small, read by every node; flight_sessions references it (a distributed table may \
         reference a reference table)",
    ),
    (
        "dbx_aviation.api_keys",
        Placement::Reference,
        "small, read by every daemon's auth cache, wherever it connects",
    ),
    (
        "dbx_aviation.flight_sessions",
        Placement::BySession,
        "session_id is its primary key; a batch carries one session, so the session upsert and \
         its points go to one shard",
    ),
    (
        "dbx_aviation.flight_telemetry",
        Placement::BySession,
        "its only unique key (session_id, seq, ts) holds session_id; colocated with its session, \
         the dedupe and statistics stay on one node; each partition is distributed with it",
    ),
    (
        "dbx_archive.flight_telemetry_archive",
        Placement::BySession,
        "archival ATTACHes live partitions under it, which Citus allows only between colocated \
         tables",
    ),
    (
        "dbx_aviation.ml_analysis_results",
        Placement::Coordinator,
        "its primary key is analysis_id alone and session_id may be NULL, so it cannot be \
         distributed by session_id without changing the single-node schema; a few rows per \
         flight, it stays on the coordinator and Citus joins it to the sessions by pulling it. \
         Its foreign key to flight_sessions is dropped (Citus allows none from a coordinator \
         table to a distributed one); enforce_retention_policy deletes results before sessions",
    ),
    (
        "dbx_aviation.api_requests",
        Placement::Coordinator,
        "a log written in small batches off the hot path; references organizations",
    ),
    (
        "dbx_audit.audit_log",
        Placement::Coordinator,
        "the audit trail: the triggers of the reference tables write it from the coordinator's \
         placement only (migration 0041)",
    ),
    (
        "dbx_aviation.schema_migrations",
        Placement::Coordinator,
        "the migration runner's record; every daemon reads it, wherever it connects",
    ),
];

/// Functions the daemon calls through `database.url`, which on a worker must exist there too
/// (`create_distributed_function`). The rest (DDL, maintenance) run through the coordinator.
pub const NODE_FUNCTIONS: [&str; 2] = [
    "dbx_aviation.telemetry_partitions()",
    "dbx_aviation.register_aircraft(uuid, text)",
];

/// Why the distribution step refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CitusError {
    /// The `citus` extension is not installed in this database.
    #[error(
        "`--distributed` needs the citus extension in this database: on every node add \
         shared_preload_libraries = 'citus', then CREATE EXTENSION citus in this database on \
         every node (https://docs.citusdata.com/en/stable/installation/multi_node.html)"
    )]
    NoExtension,
    /// Connected to a worker rather than the coordinator.
    #[error("`--distributed` must run on the coordinator; this node is a Citus worker")]
    NotCoordinator,
    /// No active worker.
    #[error(
        "`--distributed` needs at least one active Citus worker; add one on the coordinator with \
         SELECT citus_add_node('<host>', <port>)"
    )]
    NoWorkers,
    /// A command run on a worker failed (`run_command_on_workers`).
    #[error("on a Citus worker: {0}")]
    Worker(String),
    /// A step failed.
    #[error("distributing {what}: {source}")]
    Step {
        /// The step.
        what: String,
        /// The database error.
        #[source]
        source: PgError,
    },
}

fn step(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> CitusError {
    let what = what.into();
    move |e| CitusError::Step {
        what,
        source: PgError::from(e),
    }
}

/// What [`distribute`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DistributeReport {
    /// Active workers (`host:port`).
    pub workers: Vec<String>,
    /// Tables placed by this call, with their placement.
    pub placed: Vec<(String, Placement)>,
    /// Tables that already had their placement.
    pub already: Vec<String>,
}

/// Checks that this database is a Citus coordinator with at least one active worker; returns
/// the workers.
pub async fn preflight(client: &Client) -> Result<Vec<String>, CitusError> {
    let has: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')",
            &[],
        )
        .await
        .map_err(step("the extension check"))?
        .get(0);
    if !has {
        return Err(CitusError::NoExtension);
    }
    let coordinator: bool = client
        .query_one("SELECT citus_is_coordinator()", &[])
        .await
        .map_err(step("the coordinator check"))?
        .get(0);
    if !coordinator {
        return Err(CitusError::NotCoordinator);
    }
    let workers: Vec<String> = client
        .query(
            "SELECT node_name || ':' || node_port FROM citus_get_active_worker_nodes() ORDER BY 1",
            &[],
        )
        .await
        .map_err(step("listing the workers"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if workers.is_empty() {
        return Err(CitusError::NoWorkers);
    }
    Ok(workers)
}

/// Distributes the migrated schema (see the module doc); idempotent.
pub async fn distribute(client: &Client) -> Result<DistributeReport, CitusError> {
    let workers = preflight(client).await?;
    let mut report = DistributeReport {
        workers,
        ..DistributeReport::default()
    };
    prepare(client).await?;
    for (table, placement, _why) in PLACEMENTS {
        if place(client, table, placement).await? {
            report.placed.push((table.to_string(), placement));
        } else {
            report.already.push(table.to_string());
        }
    }
    for f in NODE_FUNCTIONS {
        client
            .execute(
                "SELECT create_distributed_function($1::text::regprocedure) \
                  WHERE NOT EXISTS (SELECT 1 FROM pg_dist_object \
                                     WHERE classid = 'pg_proc'::regclass \
                                       AND objid = $1::text::regprocedure)",
                &[&f],
            )
            .await
            .map_err(step(format!("function {f}")))?;
    }
    settings(client).await?;
    tracing::info!(
        workers = report.workers.len(),
        placed = report.placed.len(),
        "schema distributed"
    );
    Ok(report)
}

/// The changes the placements need, each idempotent.
async fn prepare(client: &Client) -> Result<(), CitusError> {
    // Citus refuses to distribute a table with triggers unless told; dbx's triggers are made
    // safe for it by migration 0041 (audit from the coordinator's placement only, no NOTIFY in
    // Citus-internal transactions). This session only.
    client
        .batch_execute("SET citus.enable_unsafe_triggers = on")
        .await
        .map_err(step("citus.enable_unsafe_triggers"))?;
    // Citus opens its connections to the workers as the current user, and the SECURITY DEFINER
    // functions (register_aircraft, ensure_telemetry_partition, …) run as dbx_admin: it must be
    // allowed to log in. It has no password: the nodes' pg_hba.conf decides how the
    // coordinator authenticates to the workers (Citus's own advice: certificates or trust on
    // the cluster's private network).
    client
        .batch_execute("ALTER ROLE dbx_admin LOGIN")
        .await
        .map_err(step("dbx_admin LOGIN"))?;
    // A trigger on one placement of organizations cannot write api_keys (Citus refuses nested
    // distributed execution): dbx calls sync_primary_api_keys() after writing a key hash.
    client
        .batch_execute(
            "DROP TRIGGER IF EXISTS sync_primary_api_key ON dbx_aviation.organizations;
             SELECT dbx_aviation.sync_primary_api_keys();",
        )
        .await
        .map_err(step("the primary-key mirror"))?;
    client
        .batch_execute(
            "ALTER TABLE dbx_aviation.ml_analysis_results \
               DROP CONSTRAINT IF EXISTS ml_analysis_results_session_id_fkey",
        )
        .await
        .map_err(step("ml_analysis_results' foreign key to flight_sessions"))?;
    Ok(())
}

/// Places one table; false when it already was a Citus table of that kind.
async fn place(client: &Client, table: &str, placement: Placement) -> Result<bool, CitusError> {
    let kind: Option<String> = client
        .query_opt(
            "SELECT citus_table_type FROM citus_tables WHERE table_name = $1::text::regclass",
            &[&table],
        )
        .await
        .map_err(step(format!("looking up {table}")))?
        .map(|r| r.get(0));
    let wanted = match placement {
        Placement::Reference => "reference",
        Placement::BySession => "distributed",
        Placement::Coordinator => "local",
    };
    if kind.as_deref() == Some(wanted) {
        return Ok(false);
    }
    let sql = match placement {
        Placement::Reference => "SELECT create_reference_table($1::text::regclass)",
        Placement::BySession if table == "dbx_aviation.flight_sessions" => {
            "SELECT create_distributed_table($1::text::regclass, 'session_id')"
        }
        Placement::BySession => {
            "SELECT create_distributed_table($1::text::regclass, 'session_id', \
             colocate_with => 'dbx_aviation.flight_sessions')"
        }
        // A table already made a Citus local table by a foreign key to a reference table is
        // "local" and returned above; this makes the rest explicit (and keeps Citus from
        // turning them back into plain tables).
        Placement::Coordinator => "SELECT citus_add_local_table_to_metadata($1::text::regclass)",
    };
    client
        .execute(sql, &[&table])
        .await
        .map_err(step(table.to_string()))?;
    tracing::info!(table, ?placement, "table placed");
    Ok(true)
}

/// Database settings every node needs: the tenant context of RLS travels to the workers only as
/// `SET LOCAL` with `citus.propagate_set_commands = 'local'`. Citus sends `ALTER DATABASE … SET`
/// on to the workers itself (and refuses it run on a worker).
async fn settings(client: &Client) -> Result<(), CitusError> {
    let db: String = client
        .query_one("SELECT current_database()", &[])
        .await
        .map_err(step("the database name"))?
        .get(0);
    let alter = format!(
        "ALTER DATABASE {} SET citus.propagate_set_commands = 'local'",
        quote_ident(&db)
    );
    client
        .batch_execute(&alter)
        .await
        .map_err(step("citus.propagate_set_commands"))?;
    // The daemon's flushes write several shards of flight_sessions in one transaction (the
    // session upsert, then the statistics); by default Citus serializes such multi-shard
    // UPDATEs with shard-level locks taken statement by statement, so two writers deadlock
    // on each other's shards (Citus detects it and cancels one; the batcher retries). The
    // sessions' row locks already serialize what must be (one session's writes), and these
    // shards have one placement each, so the ingest role's writes are declared commutative.
    // The setting acts where a query starts, so on every node a daemon may connect to; Citus
    // does not always forward ALTER ROLE … IN DATABASE, hence once per node.
    let commutative = format!(
        "ALTER ROLE dbx_ingest_service IN DATABASE {} SET citus.all_modifications_commutative = on",
        quote_ident(&db)
    );
    client
        .batch_execute(&commutative)
        .await
        .map_err(step("citus.all_modifications_commutative"))?;
    // Then each worker by itself (the node may not forward it, and must not forward it again).
    on_every_worker(client, &commutative).await
}

/// Runs `sql` on every worker by itself (`run_command_on_workers`, with DDL propagation off so
/// the worker does not forward it again): for what Citus does not forward from the coordinator
/// in every case (role settings; passwords of roles that existed before this database knew
/// them). The statement text is visible to the workers as it is to the coordinator.
pub async fn on_every_worker(client: &Client, sql: &str) -> Result<(), CitusError> {
    let failed: Vec<String> = client
        .query(
            "SELECT nodename || ':' || nodeport || ': ' || result \
               FROM run_command_on_workers($1) WHERE NOT success",
            &[&format!("SET citus.enable_ddl_propagation TO off; {sql}")],
        )
        .await
        .map_err(step("a command on the workers"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    match failed.first() {
        Some(first) => Err(CitusError::Worker(first.clone())),
        None => Ok(()),
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The cluster as the coordinator sees it, for the health gauges and `/readyz`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClusterView {
    /// Workers Citus counts as active (`citus_get_active_worker_nodes()`).
    pub active_workers: i64,
    /// Workers holding shards or placements that do not answer (`host:port: error`).
    pub unreachable: Vec<String>,
    /// Connections to this database per node (`host:port` → count), the coordinator's own
    /// included; a worker that does not answer is absent.
    pub connections: Vec<(String, i64)>,
}

/// The Citus view of the database `client` is connected to, or `None` when it has no `citus`
/// extension (a single node: one catalog lookup, nothing else). Meant for the coordinator
/// (`database.admin_url`); on a worker with synced metadata it sees the same nodes.
pub async fn cluster_view(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Option<ClusterView>, tokio_postgres::Error> {
    let has: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus')",
            &[],
        )
        .await?
        .get(0);
    if !has {
        return Ok(None);
    }
    let active: i64 = client
        .query_one("SELECT count(*) FROM citus_get_active_worker_nodes()", &[])
        .await?
        .get(0);
    // run_command_on_workers reports a node that does not answer as a failed row instead of
    // failing; only nodes that hold placements make the data incomplete.
    let rows = client
        .query(
            "SELECT w.nodename || ':' || w.nodeport, w.success, w.result \
               FROM run_command_on_workers( \
                      $$SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()$$) w \
              WHERE EXISTS (SELECT 1 FROM pg_dist_node n JOIN pg_dist_placement p USING (groupid) \
                             WHERE n.nodename = w.nodename AND n.nodeport = w.nodeport) \
              ORDER BY 1",
            &[],
        )
        .await?;
    let mut view = ClusterView {
        active_workers: active,
        ..ClusterView::default()
    };
    let own: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()",
            &[],
        )
        .await?
        .get(0);
    view.connections.push(("coordinator".into(), own));
    for r in rows {
        let node: String = r.get(0);
        let ok: bool = r.get(1);
        let result: String = r.get(2);
        if ok {
            view.connections
                .push((node, result.trim().parse().unwrap_or_default()));
        } else {
            view.unreachable.push(format!("{node}: {result}"));
        }
    }
    Ok(Some(view))
}

/// Rows of `flight_telemetry` (every partition) per worker: `node` (`host:port`), `shards`,
/// `rows`, counted on the shards themselves: one `run_command_on_shards` per partition (once per
/// shard would count every shard of the partition each time: a minute on a million rows).
/// For `dbx demo --citus`, the tests' and the harness's balance report; run on the
/// coordinator.
pub const ROWS_PER_WORKER_SQL: &str = "\
    SELECT s.nodename || ':' || s.nodeport AS node, count(*) AS shards, \
           sum(r.result::bigint)::bigint AS rows \
      FROM (SELECT i.inhrelid::regclass AS part FROM pg_inherits i \
             WHERE i.inhparent = 'dbx_aviation.flight_telemetry'::regclass) p \
     CROSS JOIN LATERAL run_command_on_shards(p.part, 'SELECT count(*) FROM %s') r \
      JOIN citus_shards s ON s.shardid = r.shardid \
     GROUP BY 1 ORDER BY 1";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_of_the_schema_has_one_placement() {
        let placed: Vec<&str> = PLACEMENTS.iter().map(|(t, _, _)| *t).collect();
        for t in crate::setup::EXPECTED_TABLES {
            assert_eq!(
                placed.iter().filter(|p| **p == t).count(),
                1,
                "{t} needs exactly one placement"
            );
        }
        for extra in [
            "dbx_aviation.api_keys",
            "dbx_archive.flight_telemetry_archive",
            "dbx_aviation.schema_migrations",
        ] {
            assert!(placed.contains(&extra), "{extra} has no placement");
        }
        // flight_sessions comes first among the distributed tables: the others colocate with it.
        let first = PLACEMENTS
            .iter()
            .find(|(_, p, _)| *p == Placement::BySession)
            .map(|(t, _, _)| *t);
        assert_eq!(first, Some("dbx_aviation.flight_sessions"));
        // Reference tables come before the distributed ones that reference them.
        let pos = |t: &str| placed.iter().position(|p| *p == t).unwrap();
        assert!(pos("dbx_aviation.organizations") < pos("dbx_aviation.flight_sessions"));
        assert!(pos("dbx_aviation.aircraft_registry") < pos("dbx_aviation.flight_sessions"));
    }
}
