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
use tokio::sync::mpsc;

use dbx_batcher::spool::Spool;
use dbx_batcher::{Batcher, PartitionInterval};
use dbx_control::health::HealthCollector;
use dbx_control::partitions::{Interval, PartitionManager};
use dbx_control::sessions::SessionCompleter;
use dbx_core::{SharedClock, ShutdownTrigger, SystemClock};
use dbx_listener::{AuthCache, ByteBudget, HandshakeLog, Listener, OrgMetrics};

use crate::config::{self, Config};

/// Flags of `dbx serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Write the bound addresses as JSON to this file once accepting (for scripts and tests).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
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
        "Batches nacked by the writer, by reason (rejected, foreign_session, session_closed)."
    );
    c!(
        m::SESSIONS_COMPLETED_TOTAL,
        "Flight sessions completed, by reason (end: the gateway's end; idle: sessions.idle_timeout_secs without a point)."
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
    c!(
        m::ADMIN_UNAUTHORIZED_TOTAL,
        "Admin HTTP requests refused for a missing or wrong bearer token (admin.token_file)."
    );
    c!(
        m::API_REQUESTS_EXPIRED_TOTAL,
        "api_requests rows deleted by their retention (partitions.api_requests_retention_days)."
    );
    g!(
        m::UPTIME_SECONDS,
        Unit::Seconds,
        "Seconds since the daemon started."
    );
    describe_mqtt_metrics();
    describe_org_metrics();
    c!(
        dbx_listener::audit::API_REQUESTS_DROPPED_TOTAL,
        "Handshake records not written to api_requests, by reason (queue_full, pending_full, write_failed)."
    );
    c!(
        dbx_listener::audit::API_REQUESTS_COLLAPSED_TOTAL,
        "Refused handshakes counted in an earlier api_requests row of the same flush window (same client IP, status, transport)."
    );
}

/// HELP texts of the per-organization metrics.
fn describe_org_metrics() {
    use dbx_core::metrics as m;
    use metrics::{describe_counter as c, describe_gauge as g, describe_histogram as h, Unit};
    c!(
        m::ORG_POINTS_RECEIVED_TOTAL,
        "Points accepted into the pipeline, by organization (org code; past metrics.max_org_labels organizations, other)."
    );
    c!(
        m::ORG_BATCHES_RECEIVED_TOTAL,
        "Batches accepted into the pipeline, by organization."
    );
    c!(
        m::ORG_RECEIVED_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes received from an organization's gateways (frames, datagrams, MQTT payloads), by organization."
    );
    c!(
        m::ORG_REJECTIONS_TOTAL,
        "Batches refused (nacked, or datagrams dropped for a reason of the organization's own), by organization."
    );
    h!(
        m::ORG_RATE_LIMIT_WAIT_SECONDS,
        Unit::Seconds,
        "Pauses of an organization's input for its rate limit, by organization."
    );
    g!(
        m::ORG_LABELS,
        "Organizations with a label of their own in the per-organization metrics (at metrics.max_org_labels, others count as other)."
    );
}

/// HELP texts of the MQTT input's metrics.
fn describe_mqtt_metrics() {
    use dbx_core::metrics as m;
    use metrics::{describe_counter as c, describe_gauge as g, describe_histogram as h, Unit};
    c!(
        m::MQTT_MESSAGES_RECEIVED_TOTAL,
        "MQTT messages received from the broker, by kind (qos0, qos1)."
    );
    c!(
        m::MQTT_MESSAGES_ACKED_TOTAL,
        "MQTT QoS 1 messages acknowledged (PUBACK after the points were durable, or after a rejection notice)."
    );
    c!(
        m::MQTT_MESSAGES_REJECTED_TOTAL,
        "MQTT messages refused by the decoder or the batcher, by protocol code."
    );
    c!(
        m::MQTT_DEAD_LETTERS_TOTAL,
        "Rejection notices published to the MQTT dead-letter topic."
    );
    c!(
        m::MQTT_DROPPED_TOTAL,
        "MQTT QoS 0 messages (and notices) dropped without a verdict, by reason."
    );
    g!(
        m::MQTT_IN_FLIGHT,
        "MQTT QoS 1 messages received and not yet acknowledged."
    );
    g!(
        m::MQTT_CONNECTED,
        "1 while connected to the MQTT broker and subscribed, else 0."
    );
    c!(
        m::MQTT_RECONNECTS_TOTAL,
        "Lost or failed MQTT broker connections (each followed by a reconnect)."
    );
    c!(
        m::MQTT_SESSIONS_LOST_TOTAL,
        "Reconnects on which the broker no longer had dbx's session (messages it held were lost)."
    );
    c!(
        m::MQTT_REDELIVERED_TOTAL,
        "MQTT messages the broker delivered again (DUP flag)."
    );
    h!(
        m::MQTT_ACK_LATENCY_SECONDS,
        Unit::Seconds,
        "MQTT message received to PUBACK handed to the client."
    );
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
    let admin_token = cfg.admin.load_token()?.map(Arc::new);
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
        .context("metric buckets")?
        // One histogram per organization: few buckets, so its series stay few.
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(
                dbx_core::metrics::ORG_RATE_LIMIT_WAIT_SECONDS.into(),
            ),
            &[0.1, 1.0],
        )
        .context("metric buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe_metrics();
    dbx_control::health::describe_metrics();

    // One connector per URL: the TLS settings of `[database]` apply to every connection.
    let ingest = cfg.database.connector(&cfg.database.url, "database.url")?;
    let (admin_url, admin_origin) = cfg.database.admin();
    let admin = cfg.database.connector(admin_url, admin_origin)?;
    let writer_pool = ingest.pool(cfg.batcher.writers + 1)?;
    let service_pool = ingest.pool(4)?;
    let control_pool = admin.pool(2)?;

    // The first connection says plainly what is wrong (TLS, require_tls, password, …), and
    // the schema must be there: the daemon never migrates on its own.
    {
        let client = ingest.connect().await?;
        report_security(&client, &ingest).await;
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
    let manager = Arc::new(PartitionManager::new(
        admin.clone(),
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
        Some(dbx_mqtt::MqttInput::start(&cfg.mqtt, shared)?)
    } else {
        drop((auth, tx, budget));
        None
    };

    let accepting = Arc::new(AtomicBool::new(false));
    let (http_listener, http_addr) = dbx_control::http::bind(&cfg.http.bind)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    // Config validation resolved http.bind already; this covers a name that resolved
    // differently at bind time.
    if admin_token.is_none() && !http_addr.ip().is_loopback() {
        bail!(
            "config key `admin.token_file`: must be set when http.bind ({http_addr}) is not a \
             loopback address"
        );
    }
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
        token: admin_token,
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
        "mqtt_client_id": cfg.mqtt.enabled().then(|| cfg.mqtt.client_id()),
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
    //      every connection (and the MQTT input) to receive the verdicts on what it sent.
    let mqtt_task = mqtt.map(|m| tokio::spawn(m.run(shutdown.clone())));
    listener.run(shutdown).await;
    if let Some(t) = mqtt_task {
        let _ = t.await;
    }
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
