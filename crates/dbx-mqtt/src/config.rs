//! MQTT input settings, the `[mqtt]` section of `config/dbx.toml`. The input is off
//! unless `url` names a broker.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::topic::{DeadLetterTopic, TopicPattern};

/// `[mqtt]`: the broker, the subscription, delivery limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker URL, `mqtt://host:port` or `mqtts://host:port` (TLS); empty = input off.
    pub url: String,
    /// Client id; the broker keeps the persistent session under it, so it must be stable
    /// across restarts and unique per daemon. Empty = `dbx-<hostname>`.
    pub client_id: String,
    /// User name at the broker; empty = none.
    pub username: String,
    /// Password at the broker (prefer `password_file` or `DBX_MQTT__PASSWORD`).
    pub password: String,
    /// A file whose first line is the password (wins over `password`).
    pub password_file: Option<PathBuf>,
    /// PEM CA certificates to trust for `mqtts://`; unset = the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for brokers that authenticate clients by certificate.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Topic pattern with the levels `{org_code}` and `{aircraft}`; subscribed with `+` in
    /// their place.
    pub topic: String,
    /// Shared-subscription group: non-empty subscribes `$share/<group>/<filter>`, so that
    /// several daemons split the messages.
    pub shared_group: String,
    /// Where rejection notices go (`{org_code}` and `{aircraft}` are filled in); empty = none.
    pub dead_letter_topic: String,
    /// Highest QoS subscribed: 1 (acknowledged after commit) or 0 (best effort).
    pub qos: u8,
    /// QoS 1 messages received and not yet acknowledged, at most (the MQTT 5 Receive
    /// Maximum announced to the broker; the broker sends no more until dbx acknowledges).
    pub max_in_flight: u16,
    /// How long the broker keeps the session (subscription and unacknowledged messages)
    /// after a disconnect, seconds.
    pub session_expiry_secs: u32,
    /// Keep-alive interval, seconds.
    pub keep_alive_secs: u64,
    /// Timeout of one connection attempt (TCP, TLS and CONNACK), seconds.
    pub connect_timeout_secs: u64,
    /// First delay before reconnecting, milliseconds (doubles up to `reconnect_max_ms`).
    pub reconnect_initial_ms: u64,
    /// Longest delay between reconnect attempts, milliseconds.
    pub reconnect_max_ms: u64,
    /// At shutdown, how long to wait for the verdicts on messages in flight, milliseconds;
    /// what is still unacknowledged then is redelivered by the broker after the restart.
    pub drain_timeout_ms: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: String::new(),
            client_id: String::new(),
            username: String::new(),
            password: String::new(),
            password_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            topic: "dbx/{org_code}/{aircraft}/telemetry".into(),
            shared_group: String::new(),
            dead_letter_topic: "dbx/{org_code}/rejected".into(),
            qos: 1,
            max_in_flight: 256,
            session_expiry_secs: 86_400,
            keep_alive_secs: 30,
            connect_timeout_secs: 10,
            reconnect_initial_ms: 200,
            reconnect_max_ms: 10_000,
            drain_timeout_ms: 20_000,
        }
    }
}

pub use dbx_core::ConfigError;

/// A setting that cannot work: the key within `[mqtt]` and why.
fn err(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::new(key, reason)
}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// `mqtts://`: TLS.
    pub tls: bool,
}

impl BrokerAddr {
    /// Parses `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (8883).
    pub fn parse(url: &str) -> Result<BrokerAddr, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else {
            return Err(format!(
                "= {url:?} must start with mqtt:// or mqtts:// (TLS)"
            ));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '@', '?', '#']) {
            return Err(format!(
                "= {url:?} must be only scheme, host and port (user and password have their own keys)"
            ));
        }
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let (h, after) = v6
                    .split_once(']')
                    .ok_or_else(|| format!("= {url:?} has an unclosed [ in its host"))?;
                (h, after.strip_prefix(':'))
            }
            None => match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            },
        };
        if host.is_empty() {
            return Err(format!("= {url:?} has no host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("= {url:?} has an invalid port {p:?}"))?,
            None if tls => 8883,
            None => 1883,
        };
        Ok(BrokerAddr {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

impl MqttConfig {
    /// True when a broker is configured.
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    /// Checks what serde cannot; the error names the key. An input that is off is not
    /// checked further than its URL being empty.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        self.broker()?;
        let pattern = self.topic_pattern()?;
        let dead = self.dead_letter()?;
        if let Some(d) = &dead {
            if d.may_match(&pattern) {
                return Err(err(
                    "dead_letter_topic",
                    format!(
                        "= {:?} could match the subscription `topic`; dbx would consume its own rejection notices",
                        self.dead_letter_topic
                    ),
                ));
            }
        }
        if !self.shared_group.is_empty() && self.shared_group.contains(['/', '+', '#', '\0']) {
            return Err(err(
                "shared_group",
                "must not contain '/', '+', '#' or NUL (it is one topic level)",
            ));
        }
        if self.qos > 1 {
            return Err(err(
                "qos",
                "must be 0 or 1 (QoS 2 messages are delivered at QoS 1)",
            ));
        }
        let positive: [(&'static str, u64); 6] = [
            ("max_in_flight", u64::from(self.max_in_flight)),
            ("session_expiry_secs", u64::from(self.session_expiry_secs)),
            ("connect_timeout_secs", self.connect_timeout_secs),
            ("reconnect_initial_ms", self.reconnect_initial_ms),
            ("reconnect_max_ms", self.reconnect_max_ms),
            ("drain_timeout_ms", self.drain_timeout_ms),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(err(key, "must be greater than 0"));
            }
        }
        if !(5..=65_535).contains(&self.keep_alive_secs) {
            return Err(err("keep_alive_secs", "must be between 5 and 65535"));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(err(
                "client_cert",
                "and `mqtt.client_key` must be set together",
            ));
        }
        if self.client_id().chars().count() > 256 {
            return Err(err("client_id", "is longer than 256 characters"));
        }
        Ok(())
    }

    /// The broker's address.
    pub fn broker(&self) -> Result<BrokerAddr, ConfigError> {
        BrokerAddr::parse(&self.url).map_err(|m| err("url", m))
    }

    /// The topic pattern.
    pub fn topic_pattern(&self) -> Result<TopicPattern, ConfigError> {
        TopicPattern::parse(&self.topic).map_err(|m| err("topic", m))
    }

    /// The dead-letter topic, unless turned off.
    pub fn dead_letter(&self) -> Result<Option<DeadLetterTopic>, ConfigError> {
        if self.dead_letter_topic.is_empty() {
            return Ok(None);
        }
        DeadLetterTopic::parse(&self.dead_letter_topic)
            .map(Some)
            .map_err(|m| err("dead_letter_topic", m))
    }

    /// The filter to subscribe, with the shared-subscription prefix when a group is set.
    pub fn subscription(&self) -> Result<String, ConfigError> {
        let filter = self.topic_pattern()?.filter();
        Ok(if self.shared_group.is_empty() {
            filter
        } else {
            format!("$share/{}/{filter}", self.shared_group)
        })
    }

    /// The client id in use: `client_id`, or `dbx-<hostname>`.
    pub fn client_id(&self) -> String {
        if !self.client_id.is_empty() {
            return self.client_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
            .collect();
        format!("dbx-{}", if host.is_empty() { "localhost" } else { &host })
    }

    /// The password: the first line of `password_file`, else `password`.
    pub fn password(&self) -> Result<String, ConfigError> {
        match &self.password_file {
            Some(p) => std::fs::read_to_string(p)
                .map(|t| t.lines().next().unwrap_or_default().to_string())
                .map_err(|e| err("password_file", format!("{}: {e}", p.display()))),
            None => Ok(self.password.clone()),
        }
    }

    /// `keep_alive_secs` as a Duration.
    pub fn keep_alive(&self) -> Duration {
        Duration::from_secs(self.keep_alive_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let p = |u: &str| BrokerAddr::parse(u);
        assert_eq!(
            p("mqtt://broker").unwrap(),
            BrokerAddr {
                host: "broker".into(),
                port: 1883,
                tls: false
            }
        );
        assert_eq!(p("mqtts://b.example:8884/").unwrap().port, 8884);
        assert!(p("mqtts://b").unwrap().tls);
        assert_eq!(p("mqtt://[::1]:1999").unwrap().host, "::1");
        assert_eq!(p("mqtt://[::1]").unwrap().port, 1883);
        for bad in [
            "tcp://b:1",
            "mqtt://",
            "mqtt://b:0",
            "mqtt://b:x",
            "mqtt://u:p@b",
            "mqtt://b/t",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation_names_the_key() {
        let on = |f: fn(&mut MqttConfig)| {
            let mut c = MqttConfig {
                url: "mqtt://127.0.0.1".into(),
                ..MqttConfig::default()
            };
            f(&mut c);
            c.validate().map_err(|e| e.key)
        };
        assert_eq!(on(|_| {}), Ok(()));
        assert_eq!(on(|c| c.url = "http://x".into()), Err("url".into()));
        assert_eq!(on(|c| c.qos = 2), Err("qos".into()));
        assert_eq!(on(|c| c.max_in_flight = 0), Err("max_in_flight".into()));
        assert_eq!(on(|c| c.keep_alive_secs = 1), Err("keep_alive_secs".into()));
        assert_eq!(
            on(|c| c.shared_group = "a/b".into()),
            Err("shared_group".into())
        );
        assert_eq!(
            on(|c| c.topic = "dbx/{org_code}/x".into()),
            Err("topic".into())
        );
        assert_eq!(
            on(|c| c.dead_letter_topic = "dbx/{org_code}/{aircraft}/telemetry".into()),
            Err("dead_letter_topic".into())
        );
        assert_eq!(
            on(|c| c.client_key = Some("k.pem".into())),
            Err("client_cert".into())
        );
        // Off: nothing else is checked.
        let off = MqttConfig {
            qos: 7,
            ..MqttConfig::default()
        };
        assert_eq!(off.validate(), Ok(()));
    }

    #[test]
    fn subscription_with_and_without_a_group() {
        let mut c = MqttConfig {
            url: "mqtt://b".into(),
            ..MqttConfig::default()
        };
        assert_eq!(c.subscription().unwrap(), "dbx/+/+/telemetry");
        c.shared_group = "dbx".into();
        assert_eq!(c.subscription().unwrap(), "$share/dbx/dbx/+/+/telemetry");
        assert!(c.client_id().starts_with("dbx-"));
    }
}
