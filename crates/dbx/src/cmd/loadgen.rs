//! `dbx loadgen`: the simulated gateway fleet from the command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use dbx_client::loadgen::{self, LoadgenConfig, Stats, Transport, UdpAuth};
use dbx_core::ShutdownTrigger;
use dbx_proto::PointForm;

/// Transport flag values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TransportArg {
    /// Plain TCP.
    Tcp,
    /// TCP with TLS (needs --tls-ca).
    Tls,
    /// UDP datagrams.
    Udp,
    /// MQTT 5 QoS 1 messages through a broker (needs --broker and --org-code).
    Mqtt,
}

/// UDP authentication flag values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum UdpAuthArg {
    /// kid/mac/body (protocol 1.1): the API key never travels.
    Mac,
    /// The API key in clear in every datagram (protocol v1).
    Key,
}

/// Point layout flag values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormArg {
    /// Maps with short keys.
    Map,
    /// Arrays in table order.
    Array,
}

/// Flags of `dbx loadgen`.
#[derive(Debug, Args, Clone)]
pub struct LoadgenArgs {
    /// The daemon's address (its TCP, TLS or UDP port).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub addr: SocketAddr,
    /// API key; or use --key-file.
    #[arg(long, env = "DBX_API_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// File holding the API key (the last line starting with `dbx_`, as `dbx setup` writes it).
    #[arg(long, default_value = "./database/api_key.txt")]
    pub key_file: PathBuf,
    /// Registration numbers to fly, comma-separated (must be registered to the key's organization).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "N101DX,N102DX,N201DX,N301DX"
    )]
    pub aircraft: Vec<String>,
    /// Gateways (connections).
    #[arg(long, default_value_t = 4)]
    pub gateways: usize,
    /// Aircraft per gateway.
    #[arg(long, default_value_t = 4)]
    pub aircraft_per_gateway: usize,
    /// Points per batch.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Unacked batches per gateway.
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Target rate for the whole fleet, points per second (0 = as fast as acks allow).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// How long to run, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Leave the acks of batches sent in the first this many seconds out of the latency
    /// percentiles (they are still counted): the fleet's connects and first lookups.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_secs: f64,
    /// Stop after exactly this many points in total.
    #[arg(long)]
    pub points: Option<u64>,
    /// Transport.
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: TransportArg,
    /// TLS: CA certificate (PEM) to trust.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// TLS: server name to verify.
    #[arg(long, default_value = "localhost")]
    pub tls_name: String,
    /// Point layout.
    #[arg(long, value_enum, default_value = "map")]
    pub form: FormArg,
    /// UDP: authenticate datagrams with a MAC (the key never travels) or send the key.
    #[arg(long, value_enum, default_value = "mac")]
    pub udp_auth: UdpAuthArg,
    /// Seed for the simulated flights.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// MQTT: the broker, mqtt://host:port or mqtts://host:port (with --tls-ca).
    #[arg(long)]
    pub broker: Option<String>,
    /// MQTT: the organization's code (the topic's {org_code}).
    #[arg(long)]
    pub org_code: Option<String>,
    /// MQTT: user name at the broker (default: the organization's code).
    #[arg(long)]
    pub mqtt_user: Option<String>,
    /// MQTT: password at the broker.
    #[arg(
        long,
        env = "DBX_MQTT_PASSWORD",
        hide_env_values = true,
        default_value = ""
    )]
    pub mqtt_password: String,
    /// MQTT: topic pattern.
    #[arg(long, default_value = "dbx/{org_code}/{aircraft}/telemetry")]
    pub topic: String,
}

impl LoadgenArgs {
    /// The engine's configuration, with flag errors naming the flag.
    pub fn to_config(&self) -> anyhow::Result<LoadgenConfig> {
        let key = self.api_key()?;
        self.check_numbers()?;
        let mqtt = self.mqtt_target()?;
        let transport = match self.transport {
            TransportArg::Tcp => Transport::Tcp,
            TransportArg::Tls => Transport::Tls,
            TransportArg::Udp => Transport::Udp,
            TransportArg::Mqtt => Transport::Mqtt,
        };
        let tls = match (transport, &self.tls_ca) {
            (Transport::Tls | Transport::Mqtt, Some(ca)) => {
                Some((self.tls_name.clone(), ca.clone()))
            }
            (Transport::Tls, None) => {
                bail!("--transport tls needs --tls-ca (the CA certificate to trust)")
            }
            _ => None,
        };
        Ok(LoadgenConfig {
            addr: self.addr,
            transport,
            tls,
            key,
            aircraft: self
                .aircraft
                .iter()
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect(),
            gateways: self.gateways,
            aircraft_per_gateway: self.aircraft_per_gateway,
            batch_points: self.batch,
            window: self.window,
            rate: (self.rate > 0.0).then_some(self.rate),
            duration: Duration::from_secs_f64(self.duration),
            warmup: Duration::from_secs_f64(self.warmup_secs),
            total_points: self.points,
            form: match self.form {
                FormArg::Map => PointForm::Map,
                FormArg::Array => PointForm::Array,
            },
            seed: self.seed,
            mqtt,
            udp_auth: match self.udp_auth {
                UdpAuthArg::Mac => UdpAuth::Mac,
                UdpAuthArg::Key => UdpAuth::Key,
            },
        })
    }

    /// `--key`, or the last `dbx_` line of `--key-file`; none for MQTT, whose gateways
    /// authenticate to the broker.
    fn api_key(&self) -> anyhow::Result<String> {
        if let Some(k) = &self.key {
            return Ok(k.clone());
        }
        if matches!(self.transport, TransportArg::Mqtt) {
            return Ok(String::new());
        }
        let text = std::fs::read_to_string(&self.key_file).with_context(|| {
            format!(
                "no --key given and --key-file {} cannot be read (run `dbx setup` first)",
                self.key_file.display()
            )
        })?;
        match text.lines().rev().find(|l| l.trim().starts_with("dbx_")) {
            Some(k) => Ok(k.trim().to_string()),
            None => bail!("--key-file {} holds no API key", self.key_file.display()),
        }
    }

    /// The counts, sizes and rates, each refused with its flag.
    fn check_numbers(&self) -> anyhow::Result<()> {
        if self.gateways == 0 {
            bail!("--gateways must be at least 1");
        }
        if self.aircraft_per_gateway == 0 {
            bail!("--aircraft-per-gateway must be at least 1");
        }
        if self.batch == 0 || self.batch > 10_000 {
            bail!("--batch must be between 1 and 10000 points");
        }
        if self.window == 0 {
            bail!("--window must be at least 1");
        }
        if self.aircraft.iter().all(|a| a.trim().is_empty()) {
            bail!("--aircraft needs at least one registration number");
        }
        if !(self.duration > 0.0 && self.duration.is_finite()) {
            bail!("--duration must be a positive number of seconds");
        }
        if !(self.warmup_secs >= 0.0 && self.warmup_secs < self.duration) {
            bail!("--warmup-secs must be at least 0 and less than --duration");
        }
        if self.rate < 0.0 || !self.rate.is_finite() {
            bail!("--rate must be 0 (unlimited) or a positive number of points per second");
        }
        Ok(())
    }

    /// The broker and topic of `--transport mqtt` (the broker URL and topic pattern in
    /// the daemon's MQTT input syntax); `None` for the other transports.
    fn mqtt_target(&self) -> anyhow::Result<Option<loadgen::MqttTarget>> {
        if !matches!(self.transport, TransportArg::Mqtt) {
            return Ok(None);
        }
        let Some(url) = &self.broker else {
            bail!("--transport mqtt needs --broker mqtt://host:port");
        };
        let broker =
            dbx_mqtt::BrokerAddr::parse(url).map_err(|m| anyhow::anyhow!("--broker {m}"))?;
        let Some(org_code) = self.org_code.clone().filter(|c| !c.is_empty()) else {
            bail!("--transport mqtt needs --org-code (the organization's code, the topic's {{org_code}})");
        };
        dbx_mqtt::topic::TopicPattern::parse(&self.topic)
            .map_err(|m| anyhow::anyhow!("--topic {m}"))?;
        Ok(Some(loadgen::MqttTarget {
            host: broker.host,
            port: broker.port,
            tls: broker.tls,
            username: self.mqtt_user.clone().unwrap_or_else(|| org_code.clone()),
            password: self.mqtt_password.clone(),
            org_code,
            topic: self.topic.clone(),
        }))
    }
}

/// Runs the fleet with live progress; Ctrl-C stops it and still prints the summary.
pub async fn run_with_progress(config: LoadgenConfig) -> loadgen::Summary {
    let stats = Arc::new(Stats::default());
    let (stop, stop_rx) = ShutdownTrigger::new();
    let (progress_stop, progress_rx) = ShutdownTrigger::new();
    let ctrl_c = stop.clone();
    let ctrl_c_task = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            ctrl_c.fire();
        }
    });
    let progress = tokio::spawn(loadgen::progress(
        stats.clone(),
        Duration::from_secs(5),
        progress_rx,
    ));
    let summary = loadgen::run(config, stats, stop_rx).await;
    progress_stop.fire();
    let _ = progress.await;
    ctrl_c_task.abort();
    summary
}

/// `dbx loadgen`.
pub async fn loadgen(args: LoadgenArgs) -> anyhow::Result<ExitCode> {
    let config = args.to_config()?;
    // Warnings (a refused key, nacks, too few open files) to stderr; RUST_LOG still wins.
    crate::logging::init(&crate::config::LogConfig {
        level: "warn".into(),
        ..Default::default()
    });
    // One socket per gateway, and a few for the runtime.
    crate::limits::raise_open_files_limit(args.gateways as u64 + 64, "--gateways (+ 64)");
    let summary = run_with_progress(config).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{summary}");
    }
    Ok(if summary.error.is_some() || summary.points_nacked > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: LoadgenArgs,
    }

    fn args(extra: &[&str]) -> LoadgenArgs {
        let base = ["loadgen", "--key", "dbx_test", "--duration", "10"];
        Cmd::parse_from(base.iter().chain(extra)).args
    }

    #[test]
    fn a_warm_up_is_refused_naming_its_flag_unless_shorter_than_the_run() {
        for bad in ["--warmup-secs=10", "--warmup-secs=-1", "--warmup-secs=NaN"] {
            let e = args(&[bad]).check_numbers().unwrap_err();
            assert!(e.to_string().contains("--warmup-secs"), "{bad}: {e}");
        }
        let config = args(&["--warmup-secs", "2.5"]).to_config().unwrap();
        assert_eq!(config.warmup, Duration::from_millis(2500));
        assert_eq!(args(&[]).to_config().unwrap().warmup, Duration::ZERO);
    }
}
