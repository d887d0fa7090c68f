//! `dbx demo`: the whole product in one command. Starts a private PostgreSQL
//! cluster from the machine's server binaries in `./.dbx-demo/` (or uses the
//! superuser URL in `DATABASE_URL`), runs `setup`, starts the daemon, flies a
//! simulated fleet at it for `--duration` with live progress, then shows what
//! landed: rows per partition, flight sessions (how many the gateways completed with
//! `end`), the seed's executive summary (completed flights included) and maintenance
//! predictions over the new data, and where `/metrics` is.
//! Ctrl-C stops it cleanly at any point.
//!
//! The private cluster speaks plaintext on loopback unless `--tls` (or `DBX_DEMO_TLS=1`)
//! asks for production's setup: `ssl = on` with a certificate from a CA made for the demo,
//! TCP only over TLS, and every connection of setup and the daemon with
//! `sslmode=verify-full` and `database.require_tls = true`.
//!
//! `--citus` runs the same demo on a private Citus cluster of three nodes (a coordinator and
//! two workers, in `<dir>/citus/`, made fresh each run) with `dbx setup --distributed`, and
//! shows the rows per worker. Without Citus in the machine's PostgreSQL it says in one line
//! how to install it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use dbx_control::setup::{self, SetupOptions};
use dbx_core::ShutdownTrigger;
use dbx_localpg::citus::{CitusCluster, CitusError};
use dbx_localpg::cluster::{ClusterError, ClusterOptions, ClusterTls, LocalCluster};
use tokio_postgres::Client;

use crate::cmd::loadgen::{run_with_progress, LoadgenArgs};
use crate::config::{Config, DatabaseConfig};

/// Flags of `dbx demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the simulated fleet flies, seconds.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Where the private cluster and the credentials live.
    #[arg(long, default_value = "./.dbx-demo")]
    dir: PathBuf,
    /// Gateways in the simulated fleet.
    #[arg(long, default_value_t = 4)]
    gateways: usize,
    /// Aircraft per gateway.
    #[arg(long, default_value_t = 4)]
    aircraft_per_gateway: usize,
    /// Target rate, points per second (0 = as fast as acks allow).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Points per batch.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Exit after the report instead of serving until Ctrl-C (the default when not on a terminal).
    #[arg(long)]
    exit: bool,
    /// Fly the fleet through a private Mosquitto broker (MQTT 5, QoS 1) that dbx
    /// subscribes to, instead of dbx's own TCP protocol. Needs `mosquitto` installed.
    #[arg(long)]
    mqtt: bool,
    /// Run the private cluster with TLS only (certificates from a CA made for the demo) and
    /// connect with sslmode=verify-full and database.require_tls = true.
    #[arg(long, env = "DBX_DEMO_TLS", value_parser = clap::builder::BoolishValueParser::new())]
    tls: bool,
    /// Run on a private Citus cluster (a coordinator and two workers) set up with `dbx setup
    /// --distributed`, and show the rows per worker. Needs Citus installed into the machine's
    /// PostgreSQL.
    #[arg(long, conflicts_with = "tls")]
    citus: bool,
}

/// The demo's private PostgreSQL: one cluster, or a Citus cluster of three. Dropping it stops
/// the servers.
enum DemoCluster {
    Single(Box<LocalCluster>),
    Citus(CitusCluster),
}

/// The demo's private broker and how the fleet and dbx log in to it.
struct DemoBroker {
    broker: dbx_localpg::broker::LocalBroker,
    password: String,
}

/// Starts the demo's broker with users for dbx and the sample organization and says where
/// it runs, or says in one line how to install Mosquitto.
fn start_broker(dir: &std::path::Path) -> anyhow::Result<Option<DemoBroker>> {
    use dbx_localpg::broker::{BrokerOptions, LocalBroker};
    let password = dbx_core::apikey::random_token(24);
    let users = ["dbx", setup::SAMPLE_ORG_CODE]
        .iter()
        .map(|u| (u.to_string(), password.clone()))
        .collect();
    let dir = dir.join("mosquitto");
    let _ = std::fs::remove_dir_all(&dir);
    match LocalBroker::start(BrokerOptions {
        dir,
        users,
        tls: None,
    }) {
        Ok(broker) => {
            println!(
                "▶ Mosquitto (deploy/mosquitto/ configuration) on {} (data in {})",
                broker.url(),
                broker.dir().display()
            );
            Ok(Some(DemoBroker { broker, password }))
        }
        Err(e) if e.to_string().contains("mosquitto not found") => {
            eprintln!("dbx demo --mqtt needs Mosquitto: `sudo apt-get install mosquitto mosquitto-clients` (Debian/Ubuntu), `brew install mosquitto` (macOS)");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// A port on 127.0.0.1: `preferred` when free, else any free one.
fn local_addr(preferred: u16) -> String {
    match TcpListener::bind(("127.0.0.1", preferred)) {
        Ok(_) => format!("127.0.0.1:{preferred}"),
        Err(_) => "127.0.0.1:0".into(),
    }
}

/// `dbx demo`.
pub async fn demo(config_path: Option<&Path>, args: DemoArgs) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    crate::logging::init(&crate::config::LogConfig {
        level: "warn".into(),
        ..Default::default()
    });
    // The daemon and the fleet share this process: room for both.
    crate::limits::raise_open_files_limit(
        crate::config::Config::default().listener.max_connections as u64
            + 256
            + args.gateways as u64,
        "listener.max_connections (+ 256) and --gateways",
    );

    // 0. With --mqtt, the broker first: without Mosquitto there is nothing to show.
    let broker = if args.mqtt {
        match start_broker(&args.dir)? {
            Some(b) => Some(b),
            None => return Ok(ExitCode::FAILURE),
        }
    } else {
        None
    };

    // 1. PostgreSQL: DATABASE_URL (a superuser) or a private cluster.
    let Some((database, superuser, cluster)) = start_database(config_path, &args).await? else {
        return Ok(ExitCode::FAILURE);
    };

    // 2. Setup.
    let Some(report) = run_setup(&superuser, &args.dir, args.citus).await? else {
        return Ok(ExitCode::FAILURE);
    };
    let mut db_cfg = superuser.clone();
    db_cfg.pg_config_mut().dbname(setup::DEFAULT_DATABASE);
    let admin = setup::connect(&db_cfg).await?;
    println!(
        "▶ PostgreSQL connection {}",
        setup::connection_security(&admin, &db_cfg).await?.summary()
    );
    let fleet = register_fleet(&admin, args.gateways * args.aircraft_per_gateway).await?;

    // 3. The daemon, in this process.
    let cfg = daemon_config(database, &report, broker.as_ref())?;
    cfg.validate()?;
    let (daemon, trigger, addrs) = start_daemon(cfg, &args.dir).await?;
    let tcp = addrs["tcp"].as_str().unwrap_or_default().to_string();
    let http = addrs["http"].as_str().unwrap_or_default().to_string();
    println!("▶ dbx serving gateways on {tcp}, admin on http://{http}");
    if let Some(b) = &broker {
        wait_subscribed(&http).await;
        println!(
            "▶ dbx subscribed to dbx/+/+/telemetry on {}; the fleet publishes as {}",
            b.broker.url(),
            setup::SAMPLE_ORG_CODE
        );
    }
    let rows_before = telemetry_rows(&admin).await?;

    // 4. The fleet.
    println!(
        "▶ Flying {} aircraft through {} gateways for {} s (Ctrl-C stops early)",
        fleet.len(),
        args.gateways,
        args.duration
    );
    let lg = fleet_args(
        &args,
        tcp.parse()?,
        report.api_key.clone(),
        fleet,
        broker.as_ref(),
    );
    let summary = run_with_progress(lg.to_config()?).await;
    println!("{summary}");
    let landed = wait_landed(&admin, rows_before, summary.points_sent).await?;
    if broker.is_some() {
        println!("▶ {landed} of {} points published through the broker are committed (each acknowledged to the broker only after its commit)", summary.points_sent);
    }

    // 5. What landed.
    analyses_for_new_sessions(&admin, args.citus).await?;
    report_landed(&admin, args.citus).await?;
    println!("\n▶ Metrics: http://{http}/metrics   status: http://{http}/api/v2/system/status");
    println!("  credentials: {}", args.dir.join("credentials").display());

    if !args.exit && std::io::stdout().is_terminal() {
        println!("▶ dbx keeps running: point gateways at {tcp}. Ctrl-C stops it.");
        let _ = tokio::signal::ctrl_c().await;
    }
    stop_all(daemon, trigger, cluster, &args.dir).await?;
    drop(broker);
    Ok(
        if summary.error.is_none() && summary.points_acked > 0 && landed > 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

/// Starts `dbx serve`'s work in this process and waits until it is ready: the task, its
/// shutdown trigger and the addresses it wrote to its ready file.
async fn start_daemon(
    cfg: Config,
    dir: &Path,
) -> anyhow::Result<(
    tokio::task::JoinHandle<anyhow::Result<()>>,
    ShutdownTrigger,
    serde_json::Value,
)> {
    let ready = dir.join("ready.json");
    let _ = std::fs::remove_file(&ready);
    let (trigger, shutdown) = ShutdownTrigger::new();
    let daemon = tokio::spawn(crate::cmd::serve::run(
        cfg,
        trigger.clone(),
        shutdown,
        Some(ready.clone()),
    ));
    loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            return Ok((daemon, trigger, serde_json::from_str(&text)?));
        }
        if daemon.is_finished() {
            daemon.await??;
            anyhow::bail!("the daemon stopped before it was ready");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops the daemon, then the private cluster; says how each went.
async fn stop_all(
    daemon: tokio::task::JoinHandle<anyhow::Result<()>>,
    trigger: ShutdownTrigger,
    cluster: Option<DemoCluster>,
    dir: &Path,
) -> anyhow::Result<()> {
    trigger.fire();
    match tokio::time::timeout(Duration::from_secs(60), daemon).await {
        Ok(Ok(Ok(()))) => println!("▶ dbx stopped cleanly"),
        Ok(Ok(Err(e))) => eprintln!("dbx stopped with an error: {e:#}"),
        _ => eprintln!("dbx did not stop within 60 s"),
    }
    match cluster {
        Some(DemoCluster::Single(c)) => {
            tokio::task::spawn_blocking(move || drop(c)).await?;
            println!("▶ PostgreSQL stopped (data kept in {})", dir.display());
        }
        Some(DemoCluster::Citus(c)) => {
            tokio::task::spawn_blocking(move || drop(c)).await?;
            println!(
                "▶ PostgreSQL stopped: the Citus coordinator and its workers (data kept in {} until the next run)",
                dir.join("citus").display()
            );
        }
        None => {}
    }
    Ok(())
}

/// The database the demo runs on: DATABASE_URL (a superuser) when set, else a private
/// cluster from the machine's server binaries; `None` (after saying why) when there is
/// neither.
async fn start_database(
    config_path: Option<&Path>,
    args: &DemoArgs,
) -> anyhow::Result<Option<(DatabaseConfig, dbx_pg::Connector, Option<DemoCluster>)>> {
    let mut database = crate::cmd::setup::database_config(config_path)?;
    database.require_tls |= args.tls;
    if args.citus {
        return start_citus(database, args).await;
    }
    if let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
        println!("▶ Using the PostgreSQL server of DATABASE_URL");
        let superuser = database.connector(&url, "DATABASE_URL")?;
        return Ok(Some((database, superuser, None)));
    }
    let mut opts = ClusterOptions::for_tests(args.dir.join("cluster"));
    if args.tls {
        opts.tls = Some(ClusterTls::generate(true)?.0);
    }
    // A demo shows real behaviour: durable commits, ingest-friendly settings.
    opts.settings = [
        ("shared_buffers", "256MB"),
        ("max_wal_size", "4GB"),
        ("wal_compression", "on"),
        ("checkpoint_timeout", "15min"),
        ("max_connections", "200"),
        ("log_min_messages", "warning"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let c = match tokio::task::spawn_blocking(move || {
        let c = LocalCluster::init(opts)?;
        c.start()?;
        Ok::<_, ClusterError>(c)
    })
    .await?
    {
        Ok(c) => c,
        Err(ClusterError::NoServerBinaries) => {
            eprintln!("dbx demo needs PostgreSQL's server binaries: `sudo apt-get install postgresql` (Debian/Ubuntu), `brew install postgresql` (macOS), or set DATABASE_URL to a superuser URL");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    println!(
        "▶ PostgreSQL from {} running on 127.0.0.1:{} (data in {})",
        c.bindir().display(),
        c.port(),
        c.dir().display()
    );
    let superuser = database.connector(&c.superuser_url("postgres"), "the demo cluster URL")?;
    Ok(Some((
        database,
        superuser,
        Some(DemoCluster::Single(Box::new(c))),
    )))
}

/// `--citus`: a fresh coordinator and two workers in `<dir>/citus/`, the demo's database on
/// all three with the extension and the workers registered; `None` (after one line on how to
/// install it) when the machine's PostgreSQL has no Citus.
async fn start_citus(
    database: DatabaseConfig,
    args: &DemoArgs,
) -> anyhow::Result<Option<(DatabaseConfig, dbx_pg::Connector, Option<DemoCluster>)>> {
    if std::env::var("DATABASE_URL").is_ok_and(|u| !u.is_empty()) {
        anyhow::bail!(
            "--citus runs its own three-node cluster; unset DATABASE_URL (or drop --citus)"
        );
    }
    let dir = args.dir.join("citus");
    let _ = std::fs::remove_dir_all(&dir);
    let mut base = ClusterOptions::for_tests(dir.join("base"));
    // Durable commits, as in the single-node demo; a smaller cache per node (three share it).
    base.settings = [
        ("shared_buffers", "128MB"),
        ("max_wal_size", "2GB"),
        ("max_connections", "300"),
        ("log_min_messages", "warning"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let started = tokio::task::spawn_blocking(move || {
        let c = CitusCluster::start(&dir, 2, &base)?;
        c.create_database(setup::DEFAULT_DATABASE)?;
        Ok::<_, CitusError>(c)
    })
    .await?;
    let c = match started {
        Ok(c) => c,
        Err(e @ CitusError::NotInstalled { .. }) => {
            eprintln!("dbx demo --citus: {e}");
            return Ok(None);
        }
        Err(CitusError::Cluster(ClusterError::NoServerBinaries)) => {
            eprintln!("dbx demo needs PostgreSQL's server binaries: `sudo apt-get install postgresql` (Debian/Ubuntu), `brew install postgresql` (macOS)");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let co = c.coordinator();
    println!(
        "▶ Citus: coordinator on 127.0.0.1:{}, workers on {} (PostgreSQL from {}, data in {})",
        co.port(),
        c.workers()
            .iter()
            .map(|w| format!("127.0.0.1:{}", w.port()))
            .collect::<Vec<_>>()
            .join(" and "),
        co.bindir().display(),
        args.dir.join("citus").display()
    );
    let superuser =
        database.connector(&co.superuser_url("postgres"), "the demo coordinator URL")?;
    Ok(Some((database, superuser, Some(DemoCluster::Citus(c)))))
}

/// `dbx setup` with the sample data; `None` (after printing the checklist) when a check
/// failed.
async fn run_setup(
    superuser: &dbx_pg::Connector,
    dir: &Path,
    distributed: bool,
) -> anyhow::Result<Option<setup::SetupReport>> {
    let report = setup::setup(&SetupOptions {
        superuser: superuser.clone(),
        database: setup::DEFAULT_DATABASE.into(),
        out_dir: dir.join("credentials"),
        rotate: false,
        sample_data: true,
        postgis: Default::default(),
        distributed,
        columnar: false,
    })
    .await?;
    println!(
        "▶ dbx setup: {} ({} migrations applied now)",
        if report.all_ok() {
            "all checks passed"
        } else {
            "SOME CHECKS FAILED"
        },
        report.migrations_applied.len()
    );
    if let Some(d) = &report.distributed {
        println!(
            "▶ dbx setup --distributed: {} tables placed on the coordinator and {} worker(s)",
            d.placed.len() + d.already.len(),
            d.workers.len()
        );
    }
    if !report.all_ok() {
        print!("{report}");
        return Ok(None);
    }
    Ok(Some(report))
}

/// The daemon's configuration: the users setup made, loopback ports (the usual ones when
/// free), the demo broker when there is one.
fn daemon_config(
    database: DatabaseConfig,
    report: &setup::SetupReport,
    broker: Option<&DemoBroker>,
) -> anyhow::Result<Config> {
    let ingest_url = report
        .url_of("dbx_ingest_service")
        .context("setup wrote no ingest URL")?
        .to_string();
    let mut cfg = Config {
        database,
        ..Config::default()
    };
    cfg.database.url = ingest_url.clone();
    cfg.database.admin_url = report
        .url_of("dbx_maintenance_service")
        .unwrap_or(&ingest_url)
        .to_string();
    cfg.listener.tcp_bind = local_addr(7070);
    cfg.listener.udp_bind = local_addr(7071);
    cfg.http.bind = local_addr(9898);
    if let Some(b) = broker {
        cfg.mqtt.url = b.broker.url();
        cfg.mqtt.username = "dbx".into();
        cfg.mqtt.password = b.password.clone();
        cfg.mqtt.client_id = "dbx-demo".into();
    }
    Ok(cfg)
}

/// The simulated fleet: TCP gateways to the daemon, or MQTT clients of the demo broker.
fn fleet_args(
    args: &DemoArgs,
    addr: std::net::SocketAddr,
    key: Option<String>,
    fleet: Vec<String>,
    broker: Option<&DemoBroker>,
) -> LoadgenArgs {
    let lg = LoadgenArgs {
        addr,
        key,
        key_file: PathBuf::new(),
        aircraft: fleet,
        gateways: args.gateways,
        aircraft_per_gateway: args.aircraft_per_gateway,
        batch: args.batch,
        window: 8,
        rate: args.rate,
        duration: args.duration,
        warmup_secs: 0.0,
        points: None,
        transport: crate::cmd::loadgen::TransportArg::Tcp,
        tls_ca: None,
        tls_name: "localhost".into(),
        form: crate::cmd::loadgen::FormArg::Map,
        udp_auth: crate::cmd::loadgen::UdpAuthArg::Mac,
        seed: rand::random(),
        json: false,
        broker: None,
        org_code: None,
        mqtt_user: None,
        mqtt_password: String::new(),
        topic: "dbx/{org_code}/{aircraft}/telemetry".into(),
    };
    match broker {
        Some(b) => LoadgenArgs {
            transport: crate::cmd::loadgen::TransportArg::Mqtt,
            broker: Some(b.broker.url()),
            org_code: Some(setup::SAMPLE_ORG_CODE.into()),
            mqtt_password: b.password.clone(),
            ..lg
        },
        None => lg,
    }
}

/// Waits (up to 30 s) until the daemon's MQTT input is subscribed.
async fn wait_subscribed(http: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Ok(body) = http_get(http, "/metrics").await {
            if body.lines().any(|l| l.starts_with("dbx_mqtt_connected 1")) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("dbx did not subscribe to the broker within 30 s; the report will show what landed");
}

/// A bare HTTP/1.1 GET of the admin endpoint.
async fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    Ok(buf)
}

async fn telemetry_rows(client: &Client) -> anyhow::Result<i64> {
    Ok(client
        .query_one("SELECT count(*) FROM dbx_aviation.flight_telemetry", &[])
        .await?
        .get(0))
}

/// Waits (up to 30 s) for `sent` points beyond `before` to be committed; how many were.
async fn wait_landed(client: &Client, before: i64, sent: u64) -> anyhow::Result<i64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let landed = telemetry_rows(client).await? - before;
        if landed >= sent as i64 || std::time::Instant::now() > deadline {
            return Ok(landed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Registers the demo fleet for the sample organization; returns the registrations.
async fn register_fleet(client: &Client, n: usize) -> anyhow::Result<Vec<String>> {
    let regs: Vec<String> = (1..=n.max(1)).map(|i| format!("N{:03}DM", i)).collect();
    client
        .execute(
            "INSERT INTO dbx_aviation.aircraft_registry \
               (org_id, registration_number, aircraft_type, manufacturer, model, next_maintenance_date) \
             SELECT o.org_id, r, (ARRAY['quadcopter','fixed_wing','vtol'])[1 + (ord % 3)], 'DBX Aerospace', 'Demo', \
                    CURRENT_DATE + (ord * 7 % 60)::int \
             FROM dbx_aviation.organizations o, unnest($1::text[]) WITH ORDINALITY AS u(r, ord) \
             WHERE o.org_code = $2 ON CONFLICT DO NOTHING",
            &[&regs, &setup::SAMPLE_ORG_CODE],
        )
        .await
        .map_err(|e| anyhow::anyhow!("registering the demo fleet: {}", dbx_pg::describe(&e)))?;
    Ok(regs)
}

/// The analysis side is not part of dbx; give the new flights a plausible analysis
/// each so the seed's reports have risk figures to show.
async fn analyses_for_new_sessions(client: &Client, citus: bool) -> anyhow::Result<()> {
    // On Citus the sessions are distributed and the results stay on the coordinator: Citus
    // refuses the correlated NOT EXISTS between them, and takes an uncorrelated NOT IN.
    let unanalysed = if citus {
        "WHERE s.session_id NOT IN (SELECT m.session_id FROM dbx_aviation.ml_analysis_results m \
         WHERE m.session_id IS NOT NULL)"
    } else {
        "WHERE NOT EXISTS (SELECT 1 FROM dbx_aviation.ml_analysis_results m WHERE m.session_id = s.session_id)"
    };
    client
        .execute(
            &format!("INSERT INTO dbx_aviation.ml_analysis_results \
               (session_id, org_id, model_version, anomaly_detected, anomaly_score, anomalies, risk_score, risk_level) \
             SELECT s.session_id, s.org_id, 'demo-1.0', r > 0.7, round(r::numeric, 4), \
                    CASE WHEN r > 0.85 THEN '[{{\"component\": \"motor\", \"severity\": \"critical\"}}]'::jsonb \
                         WHEN r > 0.7 THEN '[{{\"component\": \"battery\", \"severity\": \"warning\"}}]'::jsonb \
                         ELSE '[]'::jsonb END, \
                    round((r * 0.9)::numeric, 4), \
                    CASE WHEN r > 0.85 THEN 'critical' WHEN r > 0.7 THEN 'high' WHEN r > 0.4 THEN 'medium' ELSE 'low' END \
             FROM (SELECT session_id, org_id, random() AS r FROM dbx_aviation.flight_sessions s \
                   {unanalysed}) s"),
            &[],
        )
        .await
        .map_err(|e| anyhow::anyhow!("adding demo analyses: {}", dbx_pg::describe(&e)))?;
    Ok(())
}

fn cell(row: &tokio_postgres::Row, i: usize) -> String {
    use tokio_postgres::types::Type;
    let t = row.columns()[i].type_();
    let s = match *t {
        Type::INT8 => row.get::<_, Option<i64>>(i).map(|v| v.to_string()),
        Type::INT4 => row.get::<_, Option<i32>>(i).map(|v| v.to_string()),
        Type::FLOAT8 => row.get::<_, Option<f64>>(i).map(|v| format!("{v:.2}")),
        Type::DATE => row
            .get::<_, Option<chrono::NaiveDate>>(i)
            .map(|v| v.to_string()),
        Type::TIMESTAMPTZ => row
            .get::<_, Option<chrono::DateTime<chrono::Utc>>>(i)
            .map(|v| v.format("%Y-%m-%d %H:%M").to_string()),
        _ => match row.try_get::<_, Option<String>>(i) {
            Ok(v) => v,
            // Queries cast what they show to text; anything else is shown as its type.
            Err(_) => Some(format!("<{t}>")),
        },
    };
    s.unwrap_or_else(|| "—".into())
}

/// Prints a query result as an aligned table (numerics cast to text by the query).
fn print_table(title: &str, rows: &[tokio_postgres::Row]) {
    println!("\n{title}");
    let Some(first) = rows.first() else {
        println!("  (no rows)");
        return;
    };
    let headers: Vec<String> = first
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let data: Vec<Vec<String>> = rows
        .iter()
        .map(|r| (0..headers.len()).map(|i| cell(r, i)).collect())
        .collect();
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            data.iter()
                .map(|r| r[i].chars().count())
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("  {}", parts.join("  "));
    };
    line(&headers);
    for r in &data {
        line(r);
    }
}

async fn report_landed(client: &Client, citus: bool) -> anyhow::Result<()> {
    let q = |sql: &'static str| async move {
        client
            .query(sql, &[])
            .await
            .map_err(|e| anyhow::anyhow!("{}", dbx_pg::describe(&e)))
    };
    if citus {
        let per_worker = q(dbx_control::citus::ROWS_PER_WORKER_SQL).await?;
        print_table(
            "Rows of dbx_aviation.flight_telemetry per Citus worker (shards of every partition)",
            &per_worker,
        );
    } else {
        let partitions = q("SELECT c.relname AS partition, count(t.*) AS rows, pg_size_pretty(pg_total_relation_size(c.oid)) AS size \
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             LEFT JOIN LATERAL (SELECT 1 FROM dbx_aviation.flight_telemetry t WHERE t.tableoid = c.oid) t ON true \
             WHERE i.inhparent = 'dbx_aviation.flight_telemetry'::regclass GROUP BY c.relname, c.oid ORDER BY c.relname")
        .await?;
        print_table(
            "Rows per partition of dbx_aviation.flight_telemetry",
            &partitions,
        );
    }
    let sessions = q("SELECT count(*) AS sessions, \
         count(*) FILTER (WHERE flight_status = 'completed') AS completed, \
         count(*) FILTER (WHERE flight_status = 'active') AS active, \
         sum(point_count)::text AS points, \
         round(sum(total_distance_km)::numeric, 1)::text AS km_flown, \
         round(avg(flight_duration_seconds)::numeric, 1)::text AS avg_duration_s \
         FROM dbx_aviation.flight_sessions")
    .await?;
    print_table("Flight sessions", &sessions);
    let exec = q("SELECT org_name, month, flights, active_aircraft, avg_flight_hours::text, total_distance_km::text, \
         completed_flights, avg_risk_score::text, anomaly_count, high_risk_flights, \
         high_risk_percentage::text \
         FROM dbx_analytics.executive_summary")
    .await?;
    print_table("dbx_analytics.executive_summary", &exec);
    let maint = q("SELECT registration_number, aircraft_type, motor_issues, control_issues, recent_risk_score::text, \
         next_maintenance_date, maintenance_urgency::text, priority_level \
         FROM dbx_analytics.maintenance_predictions LIMIT 8")
    .await?;
    print_table("dbx_analytics.maintenance_predictions (top 8)", &maint);
    Ok(())
}
