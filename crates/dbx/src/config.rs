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
    /// The crash-safe disk spool (off unless `spool.dir` is set).
    pub spool: dbx_batcher::spool::SpoolConfig,
    /// Partition upkeep: premake, sweep, archival, retention, view refresh.
    pub partitions: dbx_control::partitions::PartitionsConfig,
    /// The database health collector.
    pub health: HealthConfig,
    /// The admin HTTP endpoint.
    pub http: HttpConfig,
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
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgresql://dbx_ingest_service@localhost:5432/dbx_aviation".into(),
            admin_url: String::new(),
            connect_timeout_secs: 10,
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

impl Config {
    /// Checks what serde cannot; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let key_err = |key: &str, message: String| ConfigError::Key {
            key: key.into(),
            message,
            from_env: None,
        };
        self.listener
            .validate()
            .map_err(|m| key_err("listener", m))?;
        self.batcher
            .validate()
            .map_err(|e| key_err(&format!("batcher.{}", e.key), e.reason))?;
        self.spool
            .validate()
            .map_err(|e| key_err(&format!("spool.{}", e.key), e.reason))?;
        self.partitions
            .validate()
            .map_err(|(key, m)| key_err(&format!("partitions.{key}"), m))?;
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
        if self.health.interval_secs == 0 {
            return Err(key_err("health.interval_secs", "must be at least 1".into()));
        }
        if self.database.url.parse::<tokio_postgres::Config>().is_err() {
            return Err(key_err(
                "database.url",
                "is not a valid PostgreSQL URL (postgresql://user:password@host:port/dbname)"
                    .into(),
            ));
        }
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
    /// A key has a bad value or is unknown.
    #[error("config key `{key}`: {message}{}", source_hint(.from_env))]
    Key {
        /// Dotted path of the key.
        key: String,
        /// What is wrong.
        message: String,
        /// The environment variable that set it, when one did.
        from_env: Option<String>,
    },
}

fn source_hint(from_env: &Option<String>) -> String {
    from_env
        .as_ref()
        .map(|v| format!(" (set by environment variable {v})"))
        .unwrap_or_default()
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
        ConfigError::Key {
            key: if key == "." {
                "(top level)".into()
            } else {
                key
            },
            message: e.into_inner().to_string(),
            from_env,
        }
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

        std::fs::write(&p, "[http\n").unwrap();
        let e = load_with_env::<Config>(Some(&p), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid TOML"), "{e}");
    }
}
