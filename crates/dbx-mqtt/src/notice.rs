//! Rejection notices: what dbx publishes to the dead-letter topic when it refuses a
//! message. MQTT has no negative acknowledgement, so a refused message is acknowledged
//! (resending it unchanged would be refused again) and the reason goes here, where the
//! publishing gateway or an operator can subscribe.
//!
//! A notice is a small JSON object of bounded size: the topic and the message are cut at
//! fixed lengths, and the payload is never echoed, only its length and, when dbx still
//! has it, its SHA-256 (so a gateway can find which of its messages it was).

use dbx_core::Rejection;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Longest topic quoted in a notice, in characters.
const MAX_TOPIC_CHARS: usize = 256;
/// Longest rejection message quoted in a notice, in characters.
const MAX_MSG_CHARS: usize = 512;

/// What a notice says about the message it refers to.
#[derive(Debug, Clone)]
pub(crate) struct About {
    /// The message's topic, cut to 256 characters.
    pub(crate) topic: String,
    /// Where the notice goes (`None`: no dead-letter topic applies).
    pub(crate) dead_letter: Option<String>,
    /// QoS of the message.
    pub(crate) qos: u8,
    /// Payload length in bytes.
    pub(crate) payload_bytes: usize,
    /// Hex SHA-256 of the payload, when the notice is built while dbx still holds it.
    pub(crate) payload_sha256: Option<String>,
    /// The batch `seq` and session, when the payload could be decoded that far.
    pub(crate) seq: Option<u64>,
    pub(crate) session: Option<Uuid>,
    /// The per-organization metrics of the topic's organization, once it is known.
    pub(crate) org: Option<std::sync::Arc<dbx_listener::OrgCounters>>,
}

impl About {
    /// The description of a message with this topic and payload.
    pub(crate) fn new(topic: &str, dead_letter: Option<String>, qos: u8, payload: &[u8]) -> Self {
        About {
            topic: cut(topic, MAX_TOPIC_CHARS),
            dead_letter,
            qos,
            payload_bytes: payload.len(),
            payload_sha256: None,
            seq: None,
            session: None,
            org: None,
        }
    }

    /// Adds the payload's hash (for rejections decided while the payload is at hand).
    pub(crate) fn with_hash(mut self, payload: &[u8]) -> Self {
        self.payload_sha256 = Some(hex::encode(Sha256::digest(payload)));
        self
    }
}

fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// The notice's JSON text.
pub(crate) fn render(about: &About, rejection: &Rejection, daemon: &str) -> Vec<u8> {
    let v = serde_json::json!({
        "topic": about.topic,
        "code": rejection.code.as_str(),
        "msg": cut(&rejection.msg, MAX_MSG_CHARS),
        "index": rejection.index,
        "seq": about.seq,
        "session": about.session,
        "qos": about.qos,
        "payload_bytes": about.payload_bytes,
        "payload_sha256": about.payload_sha256,
        "rejected_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "daemon": cut(daemon, 64),
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbx_core::RejectCode;

    #[test]
    fn notices_are_bounded_and_never_echo_the_payload() {
        let payload = vec![b'A'; 100_000];
        let topic = format!("dbx/ACME/{}/telemetry", "N".repeat(10_000));
        let about =
            About::new(&topic, Some("dbx/ACME/rejected".into()), 1, &payload).with_hash(&payload);
        let r = Rejection::at(RejectCode::InvalidPoint, 3, "x".repeat(10_000));
        let text = render(&about, &r, "dbx-test");
        assert!(text.len() < 2_000, "{} bytes", text.len());
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(v["code"], "invalid_point");
        assert_eq!(v["index"], 3);
        assert_eq!(v["payload_bytes"], 100_000);
        assert_eq!(v["payload_sha256"].as_str().unwrap().len(), 64);
        assert!(!String::from_utf8_lossy(&text).contains("AAAA"));
    }
}
