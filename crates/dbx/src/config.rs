//! Configuration: one TOML file (`config/dbx.toml` documents every key and its
//! default), every key overridable by an environment variable `DBX_SECTION__KEY`
//! (e.g. `DBX_LISTENER__MAX_CONNECTIONS=5000`), and `DATABASE_URL` honoured as in
//! the seed. Unknown keys and bad values fail at start with a message that names
//! the key.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Everything the daemon reads from its configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How to reach PostgreSQL.
    pub database: DatabaseConfig,
    /// Gateway-facing servers.
    pub listener: dbx_listener::ListenerConfig,
    /// Process-wide resource limits.
    pub limits: LimitsConfig,
    /// Batching and COPY.
    pub batcher: dbx_batcher::BatcherConfig,
    /// The MQTT input (off unless `mqtt.url` is set).
    pub mqtt: dbx_mqtt::MqttConfig,
    /// The crash-safe disk spool (off unless `spool.dir` is set).
    pub spool: dbx_spool::SpoolConfig,
    /// Partition upkeep: premake, sweep, archival, retention, view refresh.
    pub partitions: dbx_control::partitions::PartitionsConfig,
    /// Flight sessions: when they are completed without an `end`.
    pub sessions: dbx_control::sessions::SessionsConfig,
    /// The database health collector.
    pub health: HealthConfig,
    /// The daemon's own metrics.
    pub metrics: MetricsConfig,
    /// The admin HTTP endpoint.
    pub http: HttpConfig,
    /// Access to the admin HTTP endpoint.
    pub admin: AdminConfig,
    /// Logging.
    pub log: LogConfig,
}

/// `[database]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Connection URL of the ingest user (`DATABASE_URL` overrides it).
    pub url: String,
    /// Connection URL for the control plane (partition DDL, archival, retention, health);
    /// empty = `url`. Should be `dbx_maintenance_service`'s URL.
    pub admin_url: String,
    /// Seconds to wait for a connection.
    pub connect_timeout_secs: u64,
    /// libpq's `sslmode` for every connection; unset = the URL's, else `prefer`.
    pub sslmode: Option<dbx_pg::SslMode>,
    /// CA certificate file (PEM) the server's certificate must chain to, or `system`.
    pub sslrootcert: Option<String>,
    /// Client certificate (PEM) for `cert` authentication.
    pub sslcert: Option<PathBuf>,
    /// Its private key (PEM, mode 0600).
    pub sslkey: Option<PathBuf>,
    /// Refuse every connection to PostgreSQL that is not TLS-encrypted.
    pub require_tls: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgresql://dbx_ingest_service@localhost:5432/dbx_aviation".into(),
            admin_url: String::new(),
            connect_timeout_secs: 10,
            sslmode: None,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            require_tls: false,
        }
    }
}

impl DatabaseConfig {
    /// The TLS keys, as options on top of every connection string.
    pub fn tls(&self) -> dbx_pg::TlsOptions {
        dbx_pg::TlsOptions {
            sslmode: self.sslmode,
            sslrootcert: self.sslrootcert.clone(),
            sslcert: self.sslcert.clone(),
            sslkey: self.sslkey.clone(),
            require_tls: self.require_tls,
        }
    }

    /// A connector for `url` (named `origin` in errors) with the TLS keys and, unless the
    /// URL sets its own, `connect_timeout_secs`. Every connection of every command is made
    /// by one of these.
    pub fn connector(&self, url: &str, origin: &str) -> Result<dbx_pg::Connector, dbx_pg::PgError> {
        let mut c = dbx_pg::Connector::new(url, &self.tls(), origin)?;
        self.apply_timeout(&mut c);
        Ok(c)
    }

    /// Same, for a configuration built field by field (`dbx setup` from DB_HOST & co.).
    pub fn connector_for(
        &self,
        pg: tokio_postgres::Config,
        origin: &str,
    ) -> Result<dbx_pg::Connector, dbx_pg::PgError> {
        let mut c = dbx_pg::Connector::from_config(pg, &self.tls(), origin)?;
        self.apply_timeout(&mut c);
        Ok(c)
    }

    fn apply_timeout(&self, c: &mut dbx_pg::Connector) {
        if c.pg_config().get_connect_timeout().is_none() {
            c.pg_config_mut()
                .connect_timeout(std::time::Duration::from_secs(
                    self.connect_timeout_secs.max(1),
                ));
        }
    }

    /// The control plane's URL (`admin_url`, else `url`) and its name.
    pub fn admin(&self) -> (&str, &'static str) {
        if self.admin_url.is_empty() {
            (&self.url, "database.url")
        } else {
            (&self.admin_url, "database.admin_url")
        }
    }
}

/// `[limits]`: bounds on what the daemon holds for its peers, whoever they are.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// The byte budget of every frame and decoded batch between its read and its
    /// ack/nack (UDP: until written); the worst case of the daemon's memory is a formula
    /// of it, in config/dbx.toml.
    pub max_buffered_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_buffered_bytes: 256 << 20,
        }
    }
}

/// `[health]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// How often the database health collector polls (seconds); its own connection.
    pub interval_secs: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { interval_secs: 15 }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Organizations with a label of their own in the per-organization metrics; past it,
    /// further ones are counted under `org="other"`.
    pub max_org_labels: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            max_org_labels: 1000,
        }
    }
}

/// Most organizations `metrics.max_org_labels` may label: every label costs a handful of
/// series in every scrape.
pub const MAX_ORG_LABELS_LIMIT: usize = 100_000;

impl Config {
    /// Checks what serde cannot; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Every section names the key within itself; here it is placed in its section
        // and, when the environment set it, the variable is named too.
        fn placed(section: &'static str) -> impl Fn(dbx_core::ConfigError) -> ConfigError {
            move |e| key_error(e.in_section(section))
        }
        self.listener.validate().map_err(placed("listener"))?;
        self.batcher.validate().map_err(placed("batcher"))?;
        self.mqtt.validate().map_err(placed("mqtt"))?;
        self.spool.validate().map_err(placed("spool"))?;
        self.partitions.validate().map_err(placed("partitions"))?;
        self.sessions.validate().map_err(placed("sessions"))?;
        let key_err =
            |key: &str, reason: String| key_error(dbx_core::ConfigError::new(key, reason));
        // Room for at least one frame of the largest size (its decoded bound is larger
        // still; a charge is capped at the whole budget, so such a frame then passes alone).
        let min_budget = self.listener.max_frame_bytes as u64;
        if self.limits.max_buffered_bytes < min_budget {
            return Err(key_err(
                "limits.max_buffered_bytes",
                format!(
                    "must be at least listener.max_frame_bytes ({min_budget}); a frame must fit in the budget"
                ),
            ));
        }
        if self.metrics.max_org_labels > MAX_ORG_LABELS_LIMIT {
            return Err(key_err(
                "metrics.max_org_labels",
                format!("must be at most {MAX_ORG_LABELS_LIMIT}"),
            ));
        }
        if self.health.interval_secs == 0 {
            return Err(key_err("health.interval_secs", "must be at least 1".into()));
        }
        if self.admin.token_file.is_empty() && !loopback_only(&self.http.bind) {
            return Err(key_err(
                "admin.token_file",
                format!(
                    "must be set when http.bind ({}) is not a loopback address: /metrics and \
                     /api/v2/system/status would be open to the network (a file holding the \
                     bearer token, e.g. `openssl rand -hex 32 > /etc/dbx/admin_token`)",
                    self.http.bind
                ),
            ));
        }
        // Builds the connectors once: a malformed URL, a contradictory or missing TLS setting,
        // an unreadable certificate or `require_tls` with sslmode=disable stop the start here.
        self.database
            .connector(&self.database.url, "database.url")?;
        let (admin, origin) = self.database.admin();
        self.database.connector(admin, origin)?;
        Ok(())
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Bind address of `/metrics`, `/healthz`, `/readyz`, `/api/v2/system/status`.
    pub bind: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            bind: "127.0.0.1:9898".into(),
        }
    }
}

/// True when every address `bind` resolves to is a loopback address. A name that does
/// not resolve counts as loopback here: binding it fails later with its own error.
pub fn loopback_only(bind: &str) -> bool {
    use std::net::ToSocketAddrs;
    match bind.to_socket_addrs() {
        Ok(addrs) => addrs.into_iter().all(|a| a.ip().is_loopback()),
        Err(_) => true,
    }
}

/// `[admin]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// A file holding the bearer token of the admin endpoint; required when `http.bind`
    /// is not a loopback address; empty = no token (open endpoint, loopback only).
    pub token_file: String,
}

impl AdminConfig {
    /// Reads the token file (`None` when none is configured); the error names the key and
    /// the file. Warns when group or others may read it.
    pub fn load_token(&self) -> Result<Option<dbx_control::http::AdminToken>, ConfigError> {
        if self.token_file.is_empty() {
            return Ok(None);
        }
        let path = Path::new(&self.token_file);
        match dbx_control::http::AdminToken::read(path) {
            Ok((token, readable_by_others)) => {
                if readable_by_others {
                    tracing::warn!(
                        file = %path.display(),
                        "admin.token_file is readable by its group or other users; make it 0600 \
                         unless it is a container secret mount"
                    );
                }
                Ok(Some(token))
            }
            Err(e) => Err(key_error(dbx_core::ConfigError::new(
                "admin.token_file",
                e.to_string(),
            ))),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter (`info`, `dbx=debug,tokio_postgres=warn`, …); `RUST_LOG` wins.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A configuration that could not be loaded; the message names the file and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A connection string or TLS setting of `[database]` is unusable (the message names it).
    #[error(transparent)]
    Database(#[from] dbx_pg::PgError),
    /// A key has a bad value or is unknown (the dotted key, why, and the environment
    /// variable that set it when one did).
    #[error(transparent)]
    Key(#[from] dbx_core::ConfigError),
}

/// A bad value of a dotted key, naming the environment variable that set it when the
/// process environment holds one.
fn key_error(e: dbx_core::ConfigError) -> ConfigError {
    let var = dbx_core::config::env_var_for(&e.key);
    let set_by = std::env::var_os(&var).map(|_| var);
    ConfigError::Key(e.set_by(set_by))
}

/// Reads `path` (or only defaults and the environment when `None`) into `T`.
pub fn load<T: DeserializeOwned>(path: Option<&Path>) -> Result<T, ConfigError> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    load_with_env(path, &env)
}

/// [`load`] with an explicit environment (tests).
pub fn load_with_env<T: DeserializeOwned>(
    path: Option<&Path>,
    env: &[(String, String)],
) -> Result<T, ConfigError> {
    let mut root = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?;
            text.parse::<toml::Table>()
                .map_err(|e| ConfigError::Syntax {
                    path: p.to_path_buf(),
                    message: e.to_string(),
                })?
        }
        None => toml::Table::new(),
    };
    let mut env_keys = Vec::new();
    for (name, value) in env {
        if let Some(rest) = name.strip_prefix("DBX_") {
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
            let table = root
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = table {
                t.insert(key.clone(), env_value(value));
                env_keys.push((format!("{section}.{key}"), name.clone()));
            }
        } else if name == "DATABASE_URL" && !value.is_empty() {
            let table = root
                .entry("database")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = table {
                t.insert("url".into(), toml::Value::String(value.clone()));
                env_keys.push(("database.url".into(), name.clone()));
            }
        }
    }
    serde_path_to_error::deserialize(toml::Value::Table(root)).map_err(|e| {
        let key = e.path().to_string();
        let from_env = env_keys
            .iter()
            .find(|(k, _)| *k == key || key.starts_with(&format!("{k}.")))
            .map(|(_, v)| v.clone());
        let key = if key == "." {
            "(top level)".to_string()
        } else {
            key
        };
        ConfigError::Key(
            dbx_core::ConfigError::new(key, e.into_inner().to_string()).set_by(from_env),
        )
    })
}

/// An environment value as TOML: numbers, booleans and arrays as such, else a string.
fn env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_documented_file_lists_exactly_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/dbx.toml");
        let documented: Config = load_with_env(Some(&path), &[]).unwrap();
        assert_eq!(
            format!("{documented:?}"),
            format!("{:?}", Config::default())
        );
        documented.validate().unwrap();
    }

    #[test]
    fn defaults_without_a_file() {
        let c: Config = load_with_env(None, &[]).unwrap();
        assert_eq!(c.http.bind, "127.0.0.1:9898");
        assert_eq!(c.log.format, LogFormat::Text);
    }

    #[test]
    fn environment_overrides_file_and_database_url_is_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dbx.toml");
        std::fs::write(
            &p,
            "[http]\nbind = \"0.0.0.0:1\"\n[log]\nlevel = \"debug\"\n",
        )
        .unwrap();
        let c: Config = load_with_env(
            Some(&p),
            &env(&[
                ("DBX_HTTP__BIND", "127.0.0.1:2"),
                ("DATABASE_URL", "postgresql://u@h/d"),
                ("DBX_LOG__FORMAT", "json"),
            ]),
        )
        .unwrap();
        assert_eq!(c.http.bind, "127.0.0.1:2");
        assert_eq!(c.log.level, "debug");
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.database.url, "postgresql://u@h/d");
    }

    #[test]
    fn a_non_loopback_admin_endpoint_needs_a_token_file() {
        let with = |bind: &str, token_file: &str| Config {
            http: HttpConfig { bind: bind.into() },
            admin: AdminConfig {
                token_file: token_file.into(),
            },
            ..Config::default()
        };
        for open in ["0.0.0.0:9898", "[::]:9898", "192.0.2.10:9898"] {
            let e = with(open, "").validate().unwrap_err().to_string();
            assert!(e.contains("admin.token_file") && e.contains(open), "{e}");
            with(open, "/etc/dbx/admin_token").validate().unwrap();
        }
        for local in ["127.0.0.1:9898", "[::1]:0", "localhost:9898"] {
            with(local, "").validate().unwrap();
        }
        let e = with("127.0.0.1:0", "/nonexistent/admin_token")
            .admin
            .load_token()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("admin.token_file") && e.contains("/nonexistent/admin_token"),
            "{e}"
        );
        assert!(AdminConfig::default().load_token().unwrap().is_none());
    }

    #[test]
    fn the_org_label_cap_is_bounded_and_named() {
        let c: Config =
            load_with_env(None, &env(&[("DBX_METRICS__MAX_ORG_LABELS", "25")])).unwrap();
        assert_eq!(c.metrics.max_org_labels, 25);
        c.validate().unwrap();
        let too_many = Config {
            metrics: MetricsConfig {
                max_org_labels: MAX_ORG_LABELS_LIMIT + 1,
            },
            ..Config::default()
        };
        let e = too_many.validate().unwrap_err().to_string();
        assert!(e.contains("metrics.max_org_labels"), "{e}");
        let e = load_with_env::<Config>(None, &env(&[("DBX_METRICS__MAX_ORG_LABELS", "-1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics.max_org_labels"), "{e}");
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dbx.toml");
        std::fs::write(&p, "[http]\nbindd = \"x\"\n").unwrap();
        let e = load_with_env::<Config>(Some(&p), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bindd"), "{e}");

        let e = load_with_env::<Config>(
            None,
            &env(&[("DBX_DATABASE__CONNECT_TIMEOUT_SECS", "soon")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("database.connect_timeout_secs"), "{e}");
        assert!(e.contains("DBX_DATABASE__CONNECT_TIMEOUT_SECS"), "{e}");

        std::fs::write(&p, "[partitions]\narchive_access_method = \"parquet\"\n").unwrap();
        let e = load_with_env::<Config>(Some(&p), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("partitions.archive_access_method"), "{e}");
        let c = load_with_env::<Config>(
            None,
            &env(&[("DBX_PARTITIONS__ARCHIVE_ACCESS_METHOD", "columnar")]),
        )
        .unwrap();
        assert_eq!(
            c.partitions.archive_access_method,
            dbx_control::partitions::ArchiveAccessMethod::Columnar
        );

        std::fs::write(&p, "[http\n").unwrap();
        let e = load_with_env::<Config>(Some(&p), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn tls_keys_come_from_file_and_environment_and_are_checked() {
        let c: Config = load_with_env(
            None,
            &env(&[
                ("DBX_DATABASE__SSLMODE", "verify-full"),
                ("DBX_DATABASE__SSLROOTCERT", "system"),
                ("DBX_DATABASE__REQUIRE_TLS", "true"),
            ]),
        )
        .unwrap();
        let tls = c.database.tls();
        assert_eq!(tls.sslmode, Some(dbx_pg::SslMode::VerifyFull));
        assert_eq!(tls.sslrootcert.as_deref(), Some("system"));
        assert!(tls.require_tls);

        let e = load_with_env::<Config>(None, &env(&[("DBX_DATABASE__SSLMODE", "verify_full")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("database.sslmode") && e.contains("verify-full"),
            "{e}"
        );

        // A URL parameter and a key that disagree: the start is refused, naming both.
        let c: Config = load_with_env(
            None,
            &env(&[
                (
                    "DATABASE_URL",
                    "postgresql://u:pw@db.example/d?sslmode=require",
                ),
                ("DBX_DATABASE__SSLMODE", "disable"),
            ]),
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("database.url")
                && e.contains("sslmode=require")
                && e.contains("database.sslmode = \"disable\""),
            "{e}"
        );

        // require_tls with a plaintext sslmode names the host and the setting, not the password.
        let c: Config = load_with_env(
            None,
            &env(&[
                (
                    "DATABASE_URL",
                    "postgresql://u:pw@db.example/d?sslmode=disable",
                ),
                ("DBX_DATABASE__REQUIRE_TLS", "true"),
            ]),
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("db.example") && e.contains("database.require_tls") && !e.contains("pw@"),
            "{e}"
        );
        // The admin URL is checked too.
        let c: Config = load_with_env(
            None,
            &env(&[(
                "DBX_DATABASE__ADMIN_URL",
                "postgresql://u@h/d?sslnegotiation=direct",
            )]),
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("database.admin_url") && e.contains("sslnegotiation=direct"),
            "{e}"
        );
    }
}
