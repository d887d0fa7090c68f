//! Citus mode of the throughput harness (`DBX_BENCH_CITUS=1`): dbx end to end into a private
//! three-node Citus cluster (a coordinator and two workers on loopback, started here with the
//! cluster runner of `dbx_localpg::citus`, `dbx setup --distributed`, production durability),
//! against the ceiling of that cluster measured in the same run.
//!
//! Each round measures, back to back so that every shape sees the same machine:
//!
//! 1. the single-node reference (skipped with `DBX_BENCH_CITUS_SINGLE=0`): the harness's
//!    usual ceiling and dbx end to end on the one-node cluster `main` started;
//! 2. the Citus ceiling: one `psql \copy … (FORMAT binary)` stream of the pre-encoded points
//!    into today's partition of the distributed `flight_telemetry`, through the coordinator;
//! 3. dbx end to end through the coordinator: one daemon, all gateways;
//! 4. the scale-out path: two daemons at once, one writing through the coordinator, one
//!    through a worker (control plane on the coordinator for both), each with half the
//!    gateways and half the aircraft.
//!
//! After every dbx run the stored rows are checked against the acked points: the row count,
//! no `(session_id, seq)` stored twice and the sessions' `point_count` sum must all equal the
//! points acked, or the harness panics. Rows per worker are counted on the shards.
//!
//! The pieces are the harness's own (`ceiling`, `dbx_end_to_end`, `start_daemon`,
//! `loadgen_run`, `generate`, `encode`, `register_fleet`); this file only adds the cluster,
//! the two-daemon run, the checks and the "Citus: three nodes on one machine" section of
//! `benches/RESULTS.md` (the other sections are kept; the section's run log keeps a row per
//! run of this mode).

use std::path::Path;
use std::time::Instant;

use dbx_control::setup::{self, SetupOptions, SetupReport};
use dbx_localpg::citus::CitusCluster;
use dbx_localpg::cluster::{ClusterOptions, LocalCluster};
use tokio_postgres::Client;

use super::{
    ceiling, connect, connector, dbx_end_to_end, encode, fresh, generate, loadavg, loadgen_run,
    machine, median, register_fleet, start_daemon, stop_daemon, write_results, DbxRun, Fleet,
    AIRCRAFT, BATCH, GATEWAYS,
};

/// The RESULTS.md section this mode writes.
const TITLE: &str = "Citus: three nodes on one machine";

/// The one-node cluster `main` set up, for the reference rows.
pub(crate) struct Single<'a> {
    /// The cluster.
    pub cluster: &'a LocalCluster,
    /// What setup made on it.
    pub report: &'a SetupReport,
    /// Its sample organization's fleet.
    pub fleet: &'a Fleet,
    /// The sample organization's API key there.
    pub key: &'a str,
    /// Its superuser, in `dbx_aviation`.
    pub su: &'a Client,
}

/// One run through two daemons at once.
struct TwoRun {
    /// Points/s of both together: all points over the wall time of the slower one.
    rate: f64,
    /// Each daemon's own points/s, the coordinator's first.
    each: [f64; 2],
    /// Ack p50/p99 (ms) of each daemon's gateways.
    p50: [f64; 2],
    p99: [f64; 2],
}

/// Rows of `flight_telemetry` per worker (`nodeN:port` → rows).
async fn rows_per_worker(su: &Client) -> Vec<(String, i64)> {
    su.query(dbx_control::citus::ROWS_PER_WORKER_SQL, &[])
        .await
        .expect("rows per worker")
        .iter()
        // The node is named `<socket dir>:<port>` (the runner's nodes reach each other over
        // their sockets): keep `nodeN:port`.
        .map(|r| {
            let node: String = r.get(0);
            let short = node.rsplit('/').next().unwrap_or(&node).to_string();
            (short, r.get(2))
        })
        .collect()
}

/// Fails loudly unless every one of the `n` acked points is stored exactly once: `n` rows,
/// no `(session_id, seq)` twice, and the sessions' point counts summing to `n`.
async fn verify_once(su: &Client, n: usize, what: &str) {
    let r = su
        .query_one(
            "SELECT (SELECT count(*) FROM dbx_aviation.flight_telemetry), \
                    (SELECT count(*) FROM (SELECT 1 FROM dbx_aviation.flight_telemetry \
                      GROUP BY session_id, seq HAVING count(*) > 1) twice), \
                    (SELECT COALESCE(sum(point_count), 0)::bigint FROM dbx_aviation.flight_sessions)",
            &[],
        )
        .await
        .expect("count the stored points");
    let (rows, twice, counted): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
    assert_eq!(
        (rows, twice, counted),
        (n as i64, 0, n as i64),
        "{what}: every acked point stored once (rows, (session, seq) stored more than once, \
         sum of flight_sessions.point_count) must be ({n}, 0, {n})"
    );
}

/// Empties the tables and checkpoints every node, so that each measurement starts alike (the
/// harness's `fresh` checkpoints only the node it is connected to).
async fn fresh_cluster(su: &Client, workers: &[Client]) {
    fresh(su).await;
    for w in workers {
        w.batch_execute("CHECKPOINT")
            .await
            .expect("checkpoint a worker");
    }
}

/// Half of the fleet: the first or the second half of its aircraft.
fn half(fleet: &Fleet, second: bool) -> Fleet {
    let mid = fleet.aircraft.len() / 2;
    let aircraft = if second {
        fleet.aircraft[mid..].to_vec()
    } else {
        fleet.aircraft[..mid].to_vec()
    };
    Fleet {
        org: fleet.org,
        aircraft,
    }
}

/// The scale-out path: half the fleet through the daemon at `a` (the coordinator's), half
/// through the one at `b` (a worker's), at once; then every acked point checked.
async fn two_daemons(
    (a, b): (std::net::SocketAddr, std::net::SocketAddr),
    key: &str,
    fleet: &Fleet,
    su: &Client,
    n: usize,
    seed: u64,
) -> TwoRun {
    let (first, second) = (half(fleet, false), half(fleet, true));
    let (n1, n2) = (n / 2, n - n / 2);
    let started = Instant::now();
    let (s1, s2) = tokio::join!(
        loadgen_run(None, a, key, &first, Some(n1 as u64), None, 3600.0, seed),
        loadgen_run(
            None,
            b,
            key,
            &second,
            Some(n2 as u64),
            None,
            3600.0,
            seed + 500
        ),
    );
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(s1.points_acked, n1 as u64, "every point acked ({s1:?})");
    assert_eq!(s2.points_acked, n2 as u64, "every point acked ({s2:?})");
    verify_once(su, n, "two daemons").await;
    TwoRun {
        rate: n as f64 / secs,
        each: [n1 as f64 / s1.duration_secs, n2 as f64 / s2.duration_secs],
        p50: [s1.latency_ms.p50, s2.latency_ms.p50],
        p99: [s1.latency_ms.p99, s2.latency_ms.p99],
    }
}

fn runs_text(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn balance_text(rows: &[(String, i64)]) -> String {
    let total: i64 = rows.iter().map(|(_, n)| n).sum::<i64>().max(1);
    rows.iter()
        .map(|(node, n)| format!("{n} ({:.1} %) on {node}", *n as f64 * 100.0 / total as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The ack latencies of a run list: "p50 a / p99 b" of their medians.
fn acks(runs: &[DbxRun]) -> String {
    format!(
        "{:.0} / {:.0}",
        median(runs.iter().map(|r| r.p50).collect()),
        median(runs.iter().map(|r| r.p99).collect())
    )
}

/// The log rows (`| 2…`) of this mode's section as RESULTS.md holds it now.
fn old_log_rows() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../benches/RESULTS.md");
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let Some(start) = text.find(&format!("## {TITLE}\n")) else {
        return Vec::new();
    };
    let section = &text[start + 3..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    section
        .lines()
        .filter(|l| l.starts_with("| 2"))
        .map(str::to_string)
        .collect()
}

/// The Citus mode: see the module's documentation.
pub(crate) async fn citus_mode(
    single: Single<'_>,
    n: usize,
    runs: usize,
    dir: &Path,
    server_version: &str,
) {
    let with_single = super::env_usize("DBX_BENCH_CITUS_SINGLE", 1) == 1;
    // The cluster: production durability (fsync and synchronous_commit on, as the single
    // node), a third of the single node's cache each (the three share the machine).
    let mut base = ClusterOptions::new(dir.join("citus"));
    base.settings = [
        ("shared_buffers", "256MB"),
        ("max_wal_size", "2GB"),
        ("wal_compression", "on"),
        ("checkpoint_timeout", "30min"),
        ("max_connections", "300"),
        ("log_min_messages", "warning"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let citus = tokio::task::block_in_place(|| {
        let c = CitusCluster::start(&dir.join("citus"), 2, &base)?;
        c.create_database("dbx_aviation")?;
        Ok::<_, dbx_localpg::citus::CitusError>(c)
    })
    .unwrap_or_else(|e| panic!("DBX_BENCH_CITUS: {e}"));
    let co = citus.coordinator();
    let report = setup::setup(&SetupOptions {
        superuser: connector(&co.superuser_url("postgres")),
        database: "dbx_aviation".into(),
        out_dir: dir.join("citus-credentials"),
        rotate: false,
        sample_data: true,
        postgis: Default::default(),
        distributed: true,
        columnar: false,
    })
    .await
    .expect("dbx setup --distributed");
    let key = report.api_key.clone().expect("api key");
    let su = connect(&co.superuser_url("dbx_aviation")).await;
    let mut workers = Vec::new();
    for w in citus.workers() {
        workers.push(connect(&w.superuser_url("dbx_aviation")).await);
    }
    let citus_version: String = su
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'citus'",
            &[],
        )
        .await
        .expect("citus version")
        .get(0);
    let fleet = register_fleet(&su).await;

    // The same simulated points for both clusters (their ids differ: each has its own fleet).
    let citus_file = dir.join("citus.pgcopy");
    let file_mb = encode(&fleet, &generate(&fleet, n), &citus_file);
    let single_file = dir.join("single.pgcopy");
    if with_single {
        encode(single.fleet, &generate(single.fleet, n), &single_file);
    }

    // The daemons (release build of the bench profile): one on the single node, one through
    // the coordinator, one through the first worker; the control plane of both Citus daemons
    // on the coordinator, as docs/scaling.md prescribes.
    let password = |user: &str| {
        report
            .passwords
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, p)| p.clone())
            .expect("password")
    };
    let admin = co.url_for(
        "dbx_maintenance_service",
        &password("dbx_maintenance_service"),
        "dbx_aviation",
    );
    let via_co = co.url_for(
        "dbx_ingest_service",
        &password("dbx_ingest_service"),
        "dbx_aviation",
    );
    let via_worker = citus.workers()[0].url_for(
        "dbx_ingest_service",
        &password("dbx_ingest_service"),
        "dbx_aviation",
    );
    let (d_co, addr_co, _) = start_daemon(dir, "citus-coordinator", &via_co, &admin, &[]).await;
    let (d_w, addr_w, _) = start_daemon(dir, "citus-worker", &via_worker, &admin, &[]).await;
    let single_daemon = if with_single {
        let ingest = single
            .report
            .url_of("dbx_ingest_service")
            .expect("ingest url")
            .to_string();
        let admin = single
            .report
            .url_of("dbx_maintenance_service")
            .unwrap_or(&ingest)
            .to_string();
        Some(start_daemon(dir, "single", &ingest, &admin, &[]).await)
    } else {
        None
    };

    let load_before = loadavg();
    println!(
        "dbx throughput harness, Citus mode: {n} points, {runs} round(s), PostgreSQL {server_version}, \
         Citus {citus_version} (coordinator 127.0.0.1:{}, workers {}), {}; load average {load_before}",
        co.port(),
        citus
            .workers()
            .iter()
            .map(|w| format!("127.0.0.1:{}", w.port()))
            .collect::<Vec<_>>()
            .join(" and "),
        machine()
    );

    // One unmeasured run through each daemon (pools filled, plans and caches warm).
    let warm = (n / 10).max(BATCH * GATEWAYS);
    fresh_cluster(&su, &workers).await;
    dbx_end_to_end(addr_co, &key, &fleet, &su, warm, 999).await;
    fresh_cluster(&su, &workers).await;
    two_daemons((addr_co, addr_w), &key, &fleet, &su, warm, 998).await;
    if let Some((_, addr, _)) = &single_daemon {
        dbx_end_to_end(*addr, single.key, single.fleet, single.su, warm, 999).await;
    }

    let (mut s_ceil, mut s_dbx) = (Vec::new(), Vec::<DbxRun>::new());
    let (mut c_ceil, mut one, mut two) = (Vec::new(), Vec::<DbxRun>::new(), Vec::new());
    let (mut balance_one, mut balance_two) = (Vec::new(), Vec::new());
    for r in 0..runs {
        let seed = 1000 + r as u64;
        if let Some((_, addr, _)) = &single_daemon {
            s_ceil.push(ceiling(single.cluster, single.su, &single_file, n, "dbx_aviation").await);
            s_dbx.push(dbx_end_to_end(*addr, single.key, single.fleet, single.su, n, seed).await);
            verify_once(single.su, n, "single node").await;
            fresh(single.su).await;
            println!(
                "  round {} single node: ceiling {:.0} points/s, dbx {:.0} points/s",
                r + 1,
                s_ceil[r],
                s_dbx[r].rate
            );
        }
        fresh_cluster(&su, &workers).await;
        c_ceil.push(ceiling(co, &su, &citus_file, n, "dbx_aviation").await);
        fresh_cluster(&su, &workers).await;
        one.push(dbx_end_to_end(addr_co, &key, &fleet, &su, n, seed).await);
        verify_once(&su, n, "one daemon through the coordinator").await;
        balance_one = rows_per_worker(&su).await;
        fresh_cluster(&su, &workers).await;
        two.push(two_daemons((addr_co, addr_w), &key, &fleet, &su, n, seed + 100).await);
        balance_two = rows_per_worker(&su).await;
        let (o, t) = (&one[r], &two[r]);
        println!(
            "  round {} Citus: ceiling {:.0} points/s; one daemon {:.0} points/s (ack p50 {:.0} ms p99 {:.0} ms); \
             two daemons {:.0} points/s ({:.0} + {:.0}; ack p50 {:.0}/{:.0} ms p99 {:.0}/{:.0} ms)",
            r + 1,
            c_ceil[r],
            o.rate,
            o.p50,
            o.p99,
            t.rate,
            t.each[0],
            t.each[1],
            t.p50[0],
            t.p50[1],
            t.p99[0],
            t.p99[1]
        );
    }
    fresh_cluster(&su, &workers).await;
    fresh(single.su).await;
    let load_after = loadavg();
    stop_daemon(d_co);
    stop_daemon(d_w);
    if let Some((d, _, _)) = single_daemon {
        stop_daemon(d);
    }

    let ceil = median(c_ceil.clone());
    let one_rate = median(one.iter().map(|r| r.rate).collect());
    let two_rates: Vec<f64> = two.iter().map(|r| r.rate).collect();
    let two_rate = median(two_rates.clone());
    let two_acks = format!(
        "{:.0} / {:.0} (coordinator's), {:.0} / {:.0} (worker's)",
        median(two.iter().map(|r| r.p50[0]).collect()),
        median(two.iter().map(|r| r.p99[0]).collect()),
        median(two.iter().map(|r| r.p50[1]).collect()),
        median(two.iter().map(|r| r.p99[1]).collect()),
    );
    let two_each = two
        .iter()
        .map(|t| format!("{:.0} + {:.0}", t.each[0], t.each[1]))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "  median   Citus ceiling {ceil:.0}; one daemon {one_rate:.0} ({:.2}× ceiling); two daemons {two_rate:.0} ({:.2}× ceiling, {:.2}× one daemon)",
        one_rate / ceil,
        two_rate / ceil,
        two_rate / one_rate
    );
    println!(
        "  rows per worker: one daemon {}; two daemons {}",
        balance_text(&balance_one),
        balance_text(&balance_two)
    );

    let mut rows = String::new();
    let mut log_single = String::from("– | –");
    let mut single_line = String::new();
    if with_single {
        let (sc, sd) = (
            median(s_ceil.clone()),
            median(s_dbx.iter().map(|r| r.rate).collect()),
        );
        rows.push_str(&format!(
            "| single node: ceiling, `psql \\copy … (FORMAT binary)`, one stream | {sc:.0} | {} | {:.2}× | | |\n\
             | single node: dbx end to end, one daemon | {sd:.0} | {} | {:.2}× | {} | |\n",
            runs_text(&s_ceil),
            sc / ceil,
            runs_text(&s_dbx.iter().map(|r| r.rate).collect::<Vec<_>>()),
            sd / ceil,
            acks(&s_dbx),
        ));
        log_single = format!("{sc:.0} | {sd:.0}");
        single_line = format!(
            "- Single node in the same rounds: dbx / its own ceiling {:.2}×; the Citus ceiling is {:.2}× the \
             single-node one, dbx through the coordinator {:.2}× single-node dbx.\n",
            sd / sc,
            ceil / sc,
            one_rate / sd
        );
    }
    rows.push_str(&format!(
        "| **Citus ceiling**: `psql \\copy … (FORMAT binary)`, one stream into the coordinator | **{ceil:.0}** | {} | **1.00×** | | |\n\
         | **dbx, one daemon through the coordinator** ({GATEWAYS} gateways) | **{one_rate:.0}** | {} | **{:.2}×** | {} | {} |\n\
         | **dbx, two daemons**: one through the coordinator, one through a worker ({} gateways each), sum | **{two_rate:.0}** | {} (each: {two_each}) | **{:.2}×** | {two_acks} | {} |\n",
        runs_text(&c_ceil),
        runs_text(&one.iter().map(|r| r.rate).collect::<Vec<_>>()),
        one_rate / ceil,
        acks(&one),
        balance_text(&balance_one),
        GATEWAYS / 2,
        runs_text(&two_rates),
        two_rate / ceil,
        balance_text(&balance_two),
    ));
    let date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC");
    let mut log = old_log_rows();
    log.push(format!(
        "| {date} | {n} × {runs} | {load_before} → {load_after} | {log_single} | {ceil:.0} | {one_rate:.0} ({:.2}×) | {two_rate:.0} ({:.2}×) |",
        one_rate / ceil,
        two_rate / ceil
    ));
    let section = format!(
        "Produced by `flock /tmp/bench.lock env DBX_BENCH_CITUS=1 DBX_BENCH_POINTS={n} DBX_BENCH_RUNS={runs} \
         cargo bench -p dbx --bench throughput` (benches/citus.rs) on {date}: a private Citus {citus_version} \
         cluster on PostgreSQL {server_version} (a coordinator and two workers on loopback, each its own \
         PostgreSQL with fsync and synchronous_commit on, shared_buffers 256 MB; `dbx setup --distributed`, \
         32 shards per table), release build of the daemon, {n} points of {AIRCRAFT} simulated aircraft \
         ({file_mb:.0} MB as binary COPY), {GATEWAYS} TCP gateways in all, batches of {BATCH}, acked after \
         commit. Each round measures every row below back to back into truncated tables (every node \
         checkpointed first), after one unmeasured run through each daemon; figures are medians of \
         {runs} rounds. After every dbx run the harness checks that the rows, the distinct \
         `(session_id, seq)` and the sessions' `point_count` sum all equal the points acked (it panics \
         otherwise). Ack latency is at full load (batch written → its ack, from the loadgen). The \
         two-daemon rate is all points over the wall time of the slower load generator.\n\n\
         - Machine: {machine}, shared by all three nodes, the daemons and the load generators (and \
           other work: load average {load_before} before, {load_after} after).\n\n\
         | path | points/s | rounds | vs Citus ceiling | ack p50 / p99 ms | rows per worker (last round) |\n\
         |---|---:|---|---:|---|---|\n{rows}\n\
         - dbx through the coordinator / Citus ceiling: **{:.2}×**; two daemons through two nodes / one \
           daemon: **{:.2}×**.\n{single_line}\n\
         What this does and does not show. All three nodes share the same two cores with the daemons \
         and the load generators, so this measures what Citus costs per point here, not what it scales \
         to. One COPY stream into the coordinator comes close to the single node's (the coordinator's \
         backend parses and routes every row, the workers' backends write: three processes on two \
         cores), but dbx through the coordinator does not: every flush is a distributed transaction \
         (the session upsert and statistics are multi-shard statements, and a flush touching shards on \
         both workers commits with two-phase commit), so each of the daemon's writers \
         (`batcher.writers`, 2) waits several times longer per flush than on one node (compare the ack \
         latencies), and the daemon is bound by that latency more than by CPU. A second daemon through \
         a worker brings two more writers and the worker's backends to the routing, which is why it \
         adds throughput even on the same two cores. On real machines, each worker with its own cores \
         and disks: each worker writes only its shards to its own WAL disk, so the storage side grows \
         with the workers; the routing (a node's backend parses every row of each COPY stream) and the \
         round trips of each distributed commit become the limits of one ingest path, so daemons should \
         write through several nodes (each node routes its own streams), and the sum should grow with \
         the nodes that write until the network between the nodes (every point crosses it once more \
         than on one node) or commit latency limits it. This machine cannot show that growth; more \
         writers per daemon on Citus were not measured.\n\n\
         Every run of this mode, newest last (points/s; the ratios are to the same run's Citus ceiling):\n\n\
         | run | points × rounds | load average before → after | single-node ceiling | single-node dbx | Citus ceiling | one daemon | two daemons |\n\
         |---|---|---|---:|---:|---:|---:|---:|\n{}\n",
        one_rate / ceil,
        two_rate / one_rate,
        log.join("\n"),
        machine = machine(),
    );
    let out = write_results(None, Some((TITLE, section)));
    println!("  written to {}", out.display());
    drop(su);
    drop(workers);
    let _ = citus.stop();
}
