//! `dbx serve`: the daemon. Wires the stages together and runs the shutdown order
//! of docs/architecture.md: stop accepting → stop reading → the batcher writes and acks
//! what it accepted → control stops. A second SIGINT/SIGTERM exits at once.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use tokio::sync::mpsc;

use dbx_batcher::Batcher;
use dbx_control::health::HealthCollector;
use dbx_control::partitions::PartitionManager;
use dbx_control::sessions::SessionCompleter;
use dbx_core::{SharedClock, ShutdownTrigger, SystemClock};
use dbx_listener::{AuthCache, ByteBudget, HandshakeLog, Listener, OrgMetrics};
use dbx_spool::Spool;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::{self, Config};

/// Flags of `dbx serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Write the bound addresses as JSON to this file once accepting (for scripts and tests).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// Logs how the daemon's connection to PostgreSQL is protected (a warning when it is not).
async fn report_security(client: &tokio_postgres::Client, connector: &dbx_pg::Connector) {
    match dbx_control::setup::connection_security(client, connector).await {
        Ok(s) if s.encrypted && s.verification != dbx_pg::Verification::None => {
            tracing::info!(host = %s.host, "PostgreSQL connection: {}", s.summary())
        }
        Ok(s) => tracing::warn!(
            host = %s.host,
            "PostgreSQL connection: {} (set sslmode=verify-full and database.require_tls = true)",
            s.summary()
        ),
        Err(e) => tracing::warn!(error = %e, "cannot read pg_stat_ssl"),
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
    // Room for every gateway plus the pools, the spool and the admin endpoint.
    crate::limits::raise_open_files_limit(
        cfg.listener.max_connections as u64 + 256,
        "listener.max_connections (+ 256)",
    );
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
    let admin_token = cfg.admin.load_token()?.map(Arc::new);
    let prometheus = install_metrics()?;

    // One connector per URL: the TLS settings of `[database]` apply to every connection.
    let ingest = cfg.database.connector(&cfg.database.url, "database.url")?;
    let (admin_url, admin_origin) = cfg.database.admin();
    let admin = cfg.database.connector(admin_url, admin_origin)?;
    let writer_pool = ingest.pool(cfg.batcher.writers + 1)?;
    let service_pool = ingest.pool(4)?;
    let control_pool = admin.pool(2)?;

    check_database(&ingest, cfg.partitions.archive_access_method).await?;
    check_admin_node(&admin, admin_origin).await?;

    // Partitions first, before the listener opens.
    let manager = partitions_in_place(&cfg, &admin, &clock).await?;
    let (control_trigger, control_shutdown) = ShutdownTrigger::new();
    let maintenance_task = tokio::spawn(manager.clone().run(control_shutdown.clone()));
    let collector = Arc::new(HealthCollector::new(
        admin,
        clock.clone(),
        Duration::from_secs(cfg.health.interval_secs),
    ));
    let health = collector.handle();
    let collector_task = tokio::spawn(collector.run(control_shutdown.clone()));
    let completer = Arc::new(SessionCompleter::new(
        control_pool.clone(),
        cfg.sessions.clone(),
        clock.clone(),
    ));
    let completer_task = tokio::spawn(completer.run(control_shutdown.clone()));

    let auth = AuthCache::new(service_pool.clone(), cfg.listener.session_cache_capacity);
    auth.reload()
        .await
        .context("loading API keys and aircraft")?;
    let refresher = tokio::spawn(auth.clone().run_refresher(
        ingest,
        Duration::from_secs(cfg.listener.auth_refresh_secs),
        control_shutdown.clone(),
    ));
    let handshakes = HandshakeLog::spawn(service_pool.clone(), control_shutdown.clone());

    let (tx, rx) = mpsc::channel(cfg.batcher.queue_capacity);
    let listener_queue = tx.downgrade();
    let batcher = Batcher::spawn(cfg.batcher.clone(), writer_pool.clone(), rx);
    let (tx, spool) = spool_gate(&cfg, tx).await?;
    let (listener, mqtt) = start_inputs(&cfg, auth, tx, handshakes).await?;

    let accepting = Arc::new(AtomicBool::new(false));
    let (http_task, http_addr) = start_admin_http(
        &cfg,
        AdminParts {
            prometheus,
            pool: control_pool.clone(),
            started,
            accepting: accepting.clone(),
            queue: listener_queue.clone(),
            clock: clock.clone(),
            health,
            token: admin_token,
        },
        control_shutdown.clone(),
    )
    .await?;

    accepting.store(true, Ordering::Relaxed);
    announce(&cfg, &listener, http_addr, ready_file.as_deref())?;

    // 1–2. Runs until shutdown, then stops accepting and reading, and waits for
    //      every connection (and the MQTT input) to receive the verdicts on what it sent.
    let mqtt_task = mqtt.map(|m| tokio::spawn(m.run(shutdown.clone())));
    listener.run(shutdown).await;
    if let Some(t) = mqtt_task {
        let _ = t.await;
    }
    accepting.store(false, Ordering::Relaxed);
    drop(trigger);
    // 3. Every sender is gone: the batcher writes out what it holds and exits.
    drain_pipeline(batcher, spool).await;
    // 4. Control last.
    control_trigger.fire();
    let _ = tokio::join!(
        maintenance_task,
        collector_task,
        completer_task,
        refresher,
        http_task
    );
    tracing::info!("dbx stopped");
    Ok(())
}

/// Installs the Prometheus recorder and registers every crate's HELP texts.
fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
        .context("metric buckets")?
        // One histogram per organization: few buckets, so its series stay few.
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(
                dbx_listener::metrics::ORG_RATE_LIMIT_WAIT_SECONDS.into(),
            ),
            &[0.1, 1.0],
        )
        .context("metric buckets")?
        // Stages are short: finer buckets below 100 ms, where the tail is read.
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(
                dbx_batcher::metrics::BATCH_STAGE_SECONDS.into(),
            ),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
                0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )
        .context("metric buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    // Each crate registers the HELP text of the metrics it owns.
    dbx_listener::metrics::describe();
    dbx_batcher::metrics::describe();
    dbx_spool::metrics::describe();
    dbx_control::metrics::describe();
    dbx_mqtt::metrics::describe();

    Ok(prometheus)
}

/// The first connection says plainly what is wrong (TLS, require_tls, password, …), and
/// the schema must be there: the daemon never migrates on its own; and columnar archives,
/// when configured, need their access method (refused here, at start, rather than at every
/// archive run, where the failure would also hold up the tasks that run after archival).
async fn check_database(
    ingest: &dbx_pg::Connector,
    archive_am: dbx_control::partitions::ArchiveAccessMethod,
) -> anyhow::Result<()> {
    {
        let client = ingest.connect().await?;
        report_security(&client, ingest).await;
        let missing = dbx_control::setup::missing_tables(&client).await?;
        if !missing.is_empty() {
            bail!(
                "the database lacks {}; run `dbx setup` or `dbx migrate` first",
                missing.join(", ")
            );
        }
        dbx_control::partitions::check_access_method(&client, archive_am).await?;
    }

    Ok(())
}

/// On a Citus cluster the control plane must reach the coordinator: partition DDL runs only
/// there, and the maintenance advisory lock must be one every daemon sees (a lock is per node).
/// Ingest may go through any node (`database.url`); a single node passes at once.
async fn check_admin_node(admin: &dbx_pg::Connector, origin: &str) -> anyhow::Result<()> {
    let client = admin.connect().await?;
    let citus: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus')",
            &[],
        )
        .await?
        .get(0);
    if !citus {
        return Ok(());
    }
    let coordinator: bool = client
        .query_one("SELECT citus_is_coordinator()", &[])
        .await?
        .get(0);
    if !coordinator {
        bail!(
            "config key `{origin}`: this node is a Citus worker; the control plane (partitions, \
             maintenance lock) must connect to the coordinator: set database.admin_url to the \
             coordinator's dbx_maintenance_service URL (docs/scaling.md)"
        );
    }
    Ok(())
}

/// The gateway inputs: the listener (TCP, TLS, UDP) and, when configured, the MQTT
/// input, feeding the same queue with one byte budget and one set of org metrics.
async fn start_inputs(
    cfg: &Config,
    auth: Arc<AuthCache>,
    tx: mpsc::Sender<dbx_core::TelemetryBatch>,
    handshakes: HandshakeLog,
) -> anyhow::Result<(Listener, Option<dbx_mqtt::MqttInput>)> {
    let org_metrics = OrgMetrics::new(cfg.metrics.max_org_labels);
    let budget =
        ByteBudget::new(usize::try_from(cfg.limits.max_buffered_bytes).unwrap_or(usize::MAX));
    let listener = Listener::bind(
        cfg.listener.clone(),
        auth.clone(),
        tx.clone(),
        handshakes,
        org_metrics.clone(),
        budget.clone(),
    )
    .await?;
    // The MQTT input feeds the same queue, shares the rate limits and the tenant checks.
    let mqtt = if cfg.mqtt.enabled() {
        let shared = dbx_mqtt::Shared {
            auth,
            limiter: listener.rate_limiter(),
            batches: tx,
            limits: cfg.listener.limits(),
            auto_register_aircraft: cfg.listener.auto_register_aircraft,
            org_metrics,
            budget,
        };
        Some(dbx_mqtt::MqttInput::start(&cfg.mqtt, shared).map_err(|e| e.in_section("mqtt"))?)
    } else {
        drop((auth, tx, budget));
        None
    };

    Ok((listener, mqtt))
}

/// What the admin HTTP endpoint shows and needs.
struct AdminParts {
    prometheus: PrometheusHandle,
    pool: deadpool_postgres::Pool,
    started: Instant,
    accepting: Arc<AtomicBool>,
    queue: mpsc::WeakSender<dbx_core::TelemetryBatch>,
    clock: SharedClock,
    health: dbx_control::health::HealthHandle,
    token: Option<Arc<dbx_control::http::AdminToken>>,
}

/// Binds and serves the admin HTTP endpoint; refuses a non-loopback bind without a token.
async fn start_admin_http(
    cfg: &Config,
    parts: AdminParts,
    shutdown: dbx_core::Shutdown,
) -> anyhow::Result<(
    tokio::task::JoinHandle<std::io::Result<()>>,
    std::net::SocketAddr,
)> {
    let (http_listener, http_addr) = dbx_control::http::bind(&cfg.http.bind)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    // Config validation resolved http.bind already; this covers a name that resolved
    // differently at bind time.
    if parts.token.is_none() && !http_addr.ip().is_loopback() {
        bail!(
            "config key `admin.token_file`: must be set when http.bind ({http_addr}) is not a \
             loopback address"
        );
    }
    // A weak handle: the status endpoint must not keep the batcher's queue open at shutdown.
    let queue = parts.queue;
    let queue_capacity = cfg.batcher.queue_capacity;
    let admin = dbx_control::http::AdminState {
        prometheus: parts.prometheus,
        pool: parts.pool,
        started: parts.started,
        listener_accepting: parts.accepting,
        status: Arc::new(move || {
            let free = queue.upgrade().map(|q| q.capacity()).unwrap_or(0);
            serde_json::json!({
                "queue_capacity": queue_capacity,
                "queue_depth": queue_capacity.saturating_sub(free),
            })
        }),
        clock: parts.clock,
        interval: cfg.batcher.partition_interval,
        health: parts.health,
        rates: Default::default(),
        token: parts.token.clone(),
    };
    let http_task = tokio::spawn(dbx_control::http::serve(http_listener, admin, shutdown));

    Ok((http_task, http_addr))
}

/// Creates the partitions the configuration wants around now (before the listener opens),
/// and returns the manager that keeps them so.
async fn partitions_in_place(
    cfg: &Config,
    admin: &dbx_pg::Connector,
    clock: &SharedClock,
) -> anyhow::Result<Arc<PartitionManager>> {
    let manager = Arc::new(PartitionManager::new(
        admin.clone(),
        cfg.batcher.partition_interval,
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
    Ok(manager)
}

/// With a spool, a gate sits between the inputs' queue and the batcher's: the sender the
/// inputs get, and the spool to join at shutdown.
async fn spool_gate(
    cfg: &Config,
    batcher_tx: mpsc::Sender<dbx_core::TelemetryBatch>,
) -> anyhow::Result<(
    mpsc::Sender<dbx_core::TelemetryBatch>,
    Option<dbx_spool::SpoolHandle>,
)> {
    if !cfg.spool.enabled() {
        return Ok((batcher_tx, None));
    }
    let (gate_tx, gate_rx) = mpsc::channel(cfg.batcher.queue_capacity);
    let spool = Spool::start(cfg.spool.clone(), gate_rx, batcher_tx)
        .await
        .context("starting the disk spool (spool.dir)")?;
    Ok((gate_tx, Some(spool)))
}

/// Logs where dbx listens and writes the ready file.
fn announce(
    cfg: &Config,
    listener: &Listener,
    http_addr: std::net::SocketAddr,
    ready_file: Option<&Path>,
) -> anyhow::Result<()> {
    let addrs = serde_json::json!({
        "tcp": listener.tcp_addr().map(|a| a.to_string()),
        "tls": listener.tls_addr().map(|a| a.to_string()),
        "udp": listener.udp_addr().map(|a| a.to_string()),
        "http": http_addr.to_string(),
        "mqtt_client_id": cfg.mqtt.enabled().then(|| cfg.mqtt.client_id()),
        "pid": std::process::id(),
    });
    tracing::info!(
        tcp = ?listener.tcp_addr(), tls = ?listener.tls_addr(), udp = ?listener.udp_addr(),
        http = %http_addr, "dbx accepting gateways"
    );
    if let Some(path) = ready_file {
        write_ready_file(path, &addrs)?;
    }
    Ok(())
}

/// Waits for the batcher to write out what it holds, then for the spool to close.
async fn drain_pipeline(
    batcher: dbx_batcher::BatcherHandle,
    spool: Option<dbx_spool::SpoolHandle>,
) {
    match batcher.join().await {
        Ok(stats) => tracing::info!(?stats, "batcher drained"),
        Err(e) => tracing::error!(error = %e, "batcher did not finish cleanly"),
    }
    if let Some(spool) = spool {
        let stats = spool.join().await;
        tracing::info!(?stats, "spool closed");
    }
}

/// Writes the addresses for whoever waits for readiness (tests, the demo), atomically.
fn write_ready_file(path: &Path, addrs: &serde_json::Value) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(addrs)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
