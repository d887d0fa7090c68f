//! `dbx serve`: the daemon. Wires the stages together and runs the shutdown order
//! of ARCHITECTURE.md: stop accepting → stop reading → the batcher writes and acks
//! what it accepted → control stops. A second SIGINT/SIGTERM exits at once.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::mpsc;

use dbx_batcher::spool::Spool;
use dbx_batcher::{Batcher, PartitionInterval};
use dbx_control::health::HealthCollector;
use dbx_control::partitions::{Interval, PartitionManager};
use dbx_core::{SharedClock, ShutdownTrigger, SystemClock};
use dbx_listener::{AuthCache, ByteBudget, HandshakeLog, Listener};

use crate::config::{self, Config};

/// Flags of `dbx serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Write the bound addresses as JSON to this file once accepting (for scripts and tests).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// A deadpool pool over `url`, sized `size`.
pub fn pool(url: &str, size: usize, what: &str) -> anyhow::Result<Pool> {
    let pg: tokio_postgres::Config = url
        .parse()
        .with_context(|| format!("{what} is not a valid PostgreSQL URL"))?;
    let mgr = Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(10)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .with_context(|| format!("building the connection pool for {what}"))
}

/// Describes every metric once so `/metrics` carries HELP text.
fn describe_metrics() {
    use dbx_core::metrics as m;
    use metrics::{describe_counter as c, describe_gauge as g, describe_histogram as h, Unit};
    g!(
        m::CONNECTIONS_OPEN,
        "Open gateway connections, by transport."
    );
    c!(
        m::CONNECTIONS_TOTAL,
        "Gateway connections accepted, by transport."
    );
    c!(
        m::CONNECTIONS_REFUSED_TOTAL,
        "Connections refused before their handshake, by reason (max_connections, max_pending_handshakes, max_pending_per_ip)."
    );
    g!(
        m::PENDING_HANDSHAKES,
        "Connections whose TLS handshake or hello is not complete yet."
    );
    c!(
        m::WRITE_TIMEOUTS_TOTAL,
        "Connections closed because the peer did not read for write_timeout_ms, by transport."
    );
    g!(
        m::BUFFERED_BYTES,
        Unit::Bytes,
        "Bytes of frames and decoded batches held against limits.max_buffered_bytes."
    );
    g!(
        m::BUFFERED_BYTES_LIMIT,
        Unit::Bytes,
        "limits.max_buffered_bytes."
    );
    c!(
        m::BUFFERED_BYTES_WAITS_TOTAL,
        "Times a TCP connection stopped reading because limits.max_buffered_bytes was spent, by transport."
    );
    c!(
        m::FRAMES_RECEIVED_TOTAL,
        "Frames (or datagrams) received, by transport."
    );
    c!(
        m::POINTS_RECEIVED_TOTAL,
        "Points accepted into the pipeline, by transport."
    );
    c!(
        m::REJECTIONS_TOTAL,
        "Batches nacked or connections closed with an error, by protocol code."
    );
    c!(
        m::AUTH_FAILURES_TOTAL,
        "Failed or revoked handshakes, by reason (the protocol code: unauthorized, frame_too_large for a hello over max_hello_bytes, handshake_timeout, ...; tls; revoked)."
    );
    h!(
        m::RATE_LIMIT_WAIT_SECONDS,
        Unit::Seconds,
        "Pauses of TCP reads imposed by per-organization rate limits."
    );
    c!(
        m::RATE_LIMIT_DROPS_TOTAL,
        "UDP points dropped over an organization's rate limit."
    );
    c!(
        m::UDP_DROPPED_TOTAL,
        "UDP datagrams dropped, by reason (a protocol code such as unauthorized for a bad key or MAC; plain_key_refused, budget, rate_limited, saturated, too_large)."
    );
    h!(
        m::ACK_LATENCY_SECONDS,
        Unit::Seconds,
        "Frame received to ack sent."
    );
    c!(
        m::AUTH_RELOADS_TOTAL,
        "Successful reloads of the key and aircraft cache."
    );
    c!(
        m::AUTH_REFRESH_FAILURES_TOTAL,
        "Failures of the key and aircraft cache refresher (it retries; the previous cache stays in force)."
    );
    g!(
        m::AUTH_LAST_RELOAD_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "Unix time of the last successful key and aircraft cache reload."
    );
    g!(m::AUTH_KEYS, "API keys the daemon accepts.");
    g!(m::AUTH_AIRCRAFT, "Active aircraft the daemon knows.");
    c!(m::POINTS_WRITTEN_TOTAL, "Points committed to PostgreSQL.");
    c!(
        m::POINTS_DEDUPLICATED_TOTAL,
        "Points dropped because their (session, seq) was already stored."
    );
    c!(
        m::BATCHES_FLUSHED_TOTAL,
        "COPY flushes, by trigger (rows, bytes, age, shutdown)."
    );
    h!(m::FLUSH_ROWS, "Rows per COPY flush.");
    h!(m::FLUSH_BYTES, Unit::Bytes, "Bytes per COPY flush.");
    h!(
        m::COPY_DURATION_SECONDS,
        Unit::Seconds,
        "COPY plus commit duration per flush."
    );
    g!(
        m::QUEUE_DEPTH,
        "Batches waiting in the listener to batcher queue."
    );
    g!(
        m::QUEUE_CAPACITY,
        "Capacity of the listener to batcher queue."
    );
    c!(m::RETRIES_TOTAL, "Write retries, by kind.");
    g!(m::POOL_IN_USE, "Writer pool connections in use.");
    g!(m::POOL_IDLE, "Writer pool connections idle.");
    c!(
        m::ROWS_TO_DEFAULT_PARTITION_TOTAL,
        "Rows written while their partition did not exist (default partition)."
    );
    h!(
        m::COMMIT_TO_ACK_SECONDS,
        Unit::Seconds,
        "Commit to ack handed to the connection."
    );
    c!(
        m::BATCHES_REJECTED_TOTAL,
        "Batches nacked for a data error."
    );
    g!(
        m::SPOOL_BYTES,
        Unit::Bytes,
        "Bytes in disk spool segment files."
    );
    g!(
        m::SPOOL_RECORDS,
        "Batches in disk spool segment files (deleted once committed)."
    );
    g!(m::SPOOL_SEGMENTS, "Disk spool segment files.");
    g!(
        m::SPOOL_OLDEST_RECORD_AGE_SECONDS,
        Unit::Seconds,
        "How long the oldest spooled batch not yet in PostgreSQL has waited since it was accepted (0 when none waits)."
    );
    c!(
        m::SPOOL_WRITTEN_RECORDS_TOTAL,
        "Batches written and fsynced to the disk spool."
    );
    c!(
        m::SPOOL_REPLAYED_RECORDS_TOTAL,
        "Spooled batches replayed into PostgreSQL (its rate is the replay rate)."
    );
    c!(
        m::SPOOL_CORRUPT_RECORDS_TOTAL,
        "Torn or corrupt disk spool records detected and skipped."
    );
    c!(
        m::SPOOL_FULL_TOTAL,
        "Batches that found the disk spool full or unwritable, by kind (block, drop; rejected: the dead-letter store was full)."
    );
    g!(
        m::SPOOL_ACTIVE,
        "1 while batches are spooled to disk, 0 while they go to PostgreSQL directly."
    );
    c!(
        m::SPOOL_REJECTED_RECORDS_TOTAL,
        "Acked batches the database refused on replay, kept as dead letters under spool.dir/rejected/."
    );
    g!(
        m::SPOOL_REJECTED_BYTES,
        Unit::Bytes,
        "Bytes of the dead letters under spool.dir/rejected/."
    );
    c!(
        m::MAINTENANCE_RUNS_TOTAL,
        "Partition maintenance runs, by kind."
    );
    c!(
        m::MAINTENANCE_FAILURES_TOTAL,
        "Partition maintenance failures, by kind."
    );
    g!(
        m::UPTIME_SECONDS,
        Unit::Seconds,
        "Seconds since the daemon started."
    );
    c!(
        dbx_listener::audit::API_REQUESTS_DROPPED_TOTAL,
        "Handshake records not written to api_requests."
    );
}

/// Raises the open-files soft limit to the hard limit: every connection is a file, and
/// the usual soft limit of 1024 would refuse sockets (EMFILE) long before
/// `listener.max_connections`. Warns when even the hard limit is below `wanted`.
fn raise_open_files_limit(wanted: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    };
    if soft < wanted {
        tracing::warn!(
            open_files = soft,
            wanted,
            "the open-files limit is below listener.max_connections + 256; raise it (systemd LimitNOFILE, ulimit -n)"
        );
    }
}

/// Waits for SIGINT or SIGTERM.
async fn signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `dbx serve`.
pub async fn serve(config_path: Option<&Path>, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let cfg: Config = config::load(config_path)?;
    cfg.validate()?;
    crate::logging::init(&cfg.log);
    raise_open_files_limit(cfg.listener.max_connections as u64 + 256);
    let (trigger, shutdown) = ShutdownTrigger::new();
    let stop = trigger.clone();
    tokio::spawn(async move {
        signal().await;
        tracing::info!("shutdown requested; draining (a second signal exits at once)");
        stop.fire();
        signal().await;
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
    run(cfg, trigger, shutdown, args.ready_file).await?;
    Ok(ExitCode::SUCCESS)
}

/// Runs the daemon until `shutdown` fires and everything is drained.
pub async fn run(
    cfg: Config,
    trigger: ShutdownTrigger,
    shutdown: dbx_core::Shutdown,
    ready_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let clock: SharedClock = Arc::new(SystemClock);
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
        .context("metric buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe_metrics();
    dbx_control::health::describe_metrics();

    let admin_url = if cfg.database.admin_url.is_empty() {
        cfg.database.url.clone()
    } else {
        cfg.database.admin_url.clone()
    };
    let writer_pool = pool(&cfg.database.url, cfg.batcher.writers + 1, "database.url")?;
    let service_pool = pool(&cfg.database.url, 4, "database.url")?;
    let control_pool = pool(&admin_url, 2, "database.admin_url")?;

    // The schema must be there: the daemon never migrates on its own.
    {
        let client = service_pool
            .get()
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL (database.url): {e}"))?;
        let missing = dbx_control::setup::missing_tables(&client).await?;
        if !missing.is_empty() {
            bail!(
                "the database lacks {}; run `dbx setup` or `dbx migrate` first",
                missing.join(", ")
            );
        }
    }

    // Partitions first, before the listener opens.
    let interval = match cfg.batcher.partition_interval {
        PartitionInterval::Daily => Interval::Daily,
        PartitionInterval::Hourly => Interval::Hourly,
    };
    let admin_pg: tokio_postgres::Config = {
        let mut c: tokio_postgres::Config = admin_url
            .parse()
            .context("database.admin_url is not a valid PostgreSQL URL")?;
        c.connect_timeout(Duration::from_secs(
            cfg.database.connect_timeout_secs.max(1),
        ));
        c
    };
    let manager = Arc::new(PartitionManager::new(
        admin_pg.clone(),
        interval,
        cfg.partitions.clone(),
        clock.clone(),
    ));
    let made = manager.startup().await?;
    tracing::info!(
        created = made.done.len(),
        skipped = made.skipped.len(),
        failed = made.failed.len(),
        "partitions in place"
    );
    let (control_trigger, control_shutdown) = ShutdownTrigger::new();
    let maintenance_task = tokio::spawn(manager.clone().run(control_shutdown.clone()));
    let collector = Arc::new(HealthCollector::new(
        admin_pg,
        clock.clone(),
        Duration::from_secs(cfg.health.interval_secs),
    ));
    let health = collector.handle();
    let collector_task = tokio::spawn(collector.run(control_shutdown.clone()));

    let auth = AuthCache::new(service_pool.clone(), cfg.listener.session_cache_capacity);
    auth.reload()
        .await
        .context("loading API keys and aircraft")?;
    let listen_cfg: tokio_postgres::Config = cfg.database.url.parse()?;
    let refresher = tokio::spawn(auth.clone().run_refresher(
        listen_cfg,
        Duration::from_secs(cfg.listener.auth_refresh_secs),
        control_shutdown.clone(),
    ));
    let handshakes = HandshakeLog::spawn(service_pool.clone(), control_shutdown.clone());

    let (tx, rx) = mpsc::channel(cfg.batcher.queue_capacity);
    let listener_queue = tx.downgrade();
    let batcher = Batcher::spawn(cfg.batcher.clone(), writer_pool.clone(), rx);
    // With a spool, a gate sits between the listener's queue and the batcher's.
    let (tx, spool) = if cfg.spool.enabled() {
        let (gate_tx, gate_rx) = mpsc::channel(cfg.batcher.queue_capacity);
        let spool = Spool::start(cfg.spool.clone(), gate_rx, tx)
            .await
            .context("starting the disk spool (spool.dir)")?;
        (gate_tx, Some(spool))
    } else {
        (tx, None)
    };
    let budget =
        ByteBudget::new(usize::try_from(cfg.limits.max_buffered_bytes).unwrap_or(usize::MAX));
    let listener = Listener::bind(cfg.listener.clone(), auth, tx, handshakes, budget).await?;

    let accepting = Arc::new(AtomicBool::new(false));
    let (http_listener, http_addr) = dbx_control::http::bind(&cfg.http.bind)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    // A weak handle: the status endpoint must not keep the batcher's queue open at shutdown.
    let queue = listener_queue.clone();
    let queue_capacity = cfg.batcher.queue_capacity;
    let admin = dbx_control::http::AdminState {
        prometheus,
        pool: control_pool.clone(),
        started,
        listener_accepting: accepting.clone(),
        status: Arc::new(move || {
            let free = queue.upgrade().map(|q| q.capacity()).unwrap_or(0);
            serde_json::json!({
                "queue_capacity": queue_capacity,
                "queue_depth": queue_capacity.saturating_sub(free),
            })
        }),
        clock: clock.clone(),
        interval,
        health,
        rates: Default::default(),
    };
    let http_task = tokio::spawn(dbx_control::http::serve(
        http_listener,
        admin,
        control_shutdown.clone(),
    ));

    let addrs = serde_json::json!({
        "tcp": listener.tcp_addr().map(|a| a.to_string()),
        "tls": listener.tls_addr().map(|a| a.to_string()),
        "udp": listener.udp_addr().map(|a| a.to_string()),
        "http": http_addr.to_string(),
        "pid": std::process::id(),
    });
    tracing::info!(
        tcp = ?listener.tcp_addr(), tls = ?listener.tls_addr(), udp = ?listener.udp_addr(),
        http = %http_addr, "dbx accepting gateways"
    );
    accepting.store(true, Ordering::Relaxed);
    if let Some(path) = &ready_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&addrs)?)?;
        std::fs::rename(&tmp, path)?;
    }

    // 1–2. Runs until shutdown, then stops accepting and reading, and waits for
    //      every connection to receive the verdicts on what it sent.
    listener.run(shutdown).await;
    accepting.store(false, Ordering::Relaxed);
    drop(trigger);
    // 3. Every sender is gone: the batcher writes out what it holds and exits.
    match batcher.join().await {
        Ok(stats) => tracing::info!(?stats, "batcher drained"),
        Err(e) => tracing::error!(error = %e, "batcher did not finish cleanly"),
    }
    if let Some(spool) = spool {
        let stats = spool.join().await;
        tracing::info!(?stats, "spool closed");
    }
    // 4. Control last.
    control_trigger.fire();
    let _ = tokio::join!(maintenance_task, collector_task, refresher, http_task);
    tracing::info!("dbx stopped");
    Ok(())
}
