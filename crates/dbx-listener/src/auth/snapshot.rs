//! The [`AuthSnapshot`]: every active key (by hash, and by `kid` for the UDP MAC form),
//! organization and aircraft, read in one go from the database and installed whole, so
//! that a connection always sees one consistent view.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dbx_core::apikey::PRIMARY_LABEL;
use dbx_core::sync::{lock, write};
use uuid::Uuid;

use super::owners::TwoGen;
use super::{AuthCache, AuthError, KeyGrant, OrgGrant};

/// One consistent view of keys and aircraft.
#[derive(Debug, Default, Clone)]
pub struct AuthSnapshot {
    pub(super) keys: HashMap<String, KeyGrant>,
    pub(super) orgs_by_code: HashMap<String, OrgGrant>,
    pub(super) org_codes: HashMap<Uuid, String>,
    /// kid → (raw sha256, hex hash) of every key with that kid, in hash order.
    pub(super) by_kid: HashMap<u64, Vec<([u8; 32], String)>>,
    pub(super) aircraft_by_reg: HashMap<(Uuid, String), Uuid>,
    pub(super) aircraft_org: HashMap<Uuid, Uuid>,
}

impl AuthSnapshot {
    /// The grant of a key given by its hex SHA-256 hash.
    pub fn key(&self, hash: &str) -> Option<&KeyGrant> {
        self.keys.get(hash)
    }

    /// Number of active keys.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// The active organization whose `org_code` is exactly `code`.
    pub fn org_by_code(&self, code: &str) -> Option<&OrgGrant> {
        self.orgs_by_code.get(code)
    }

    /// The `org_code` of an active organization.
    pub fn org_code(&self, org: Uuid) -> Option<&str> {
        self.org_codes.get(&org).map(String::as_str)
    }

    /// Adds a key by its hex hash (lower case).
    pub(super) fn insert_key(&mut self, hash: String, grant: KeyGrant) {
        if let Some(raw) = raw_hash(&hash) {
            let candidates = self.by_kid.entry(dbx_proto::mac::key_id(&raw)).or_default();
            if !candidates.iter().any(|(_, h)| *h == hash) {
                candidates.push((raw, hash.clone()));
                candidates.sort_by(|a, b| a.1.cmp(&b.1));
            }
        }
        self.keys.insert(hash, grant);
    }

    /// The key (hex hash and grant) whose MAC of `body` is `mac`, among the keys with
    /// this `kid`.
    pub fn key_by_mac(&self, kid: u64, mac: &[u8; 16], body: &[u8]) -> Option<(&str, &KeyGrant)> {
        let (_, hash) = self
            .by_kid
            .get(&kid)?
            .iter()
            .find(|(raw, _)| dbx_proto::mac::verify_body_mac(raw, body, mac))?;
        Some((hash.as_str(), self.keys.get(hash)?))
    }
}

/// An organization's `ingest_points_per_sec` as a limit: `NULL`, 0 or less is none.
pub(super) fn points_per_sec(rate: Option<i32>) -> Option<u32> {
    rate.filter(|r| *r > 0).map(|r| r as u32)
}

/// The 32 raw bytes of a hex SHA-256 hash; `None` for a malformed stored hash (such a
/// key can only be used in clear).
fn raw_hash(hex_hash: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_hash, &mut out).ok()?;
    Some(out)
}

impl AuthCache {
    /// Reads the snapshot, installs it and returns it.
    pub(super) async fn load_snapshot(&self) -> Result<Arc<AuthSnapshot>, AuthError> {
        let client = self.pool.get().await?;
        let mut snap = AuthSnapshot::default();
        // Additional keys (rotation) live in dbx_aviation.api_keys, which is authoritative
        // for every hash it holds, the organization's own included (a revoked or expired
        // primary key must not come back through organizations).
        let org_keys_sql = "SELECT o.api_key_hash, o.org_id, o.ingest_points_per_sec \
             FROM dbx_aviation.organizations o \
             WHERE o.is_active AND o.api_key_hash IS NOT NULL \
               AND NOT EXISTS (SELECT 1 FROM dbx_aviation.api_keys k WHERE k.key_hash = lower(o.api_key_hash))";
        for row in client.query(org_keys_sql, &[]).await? {
            let rate: Option<i32> = row.get(2);
            snap.insert_key(
                row.get::<_, String>(0).to_ascii_lowercase(),
                KeyGrant {
                    org_id: row.get(1),
                    label: PRIMARY_LABEL.into(),
                    points_per_sec: points_per_sec(rate),
                },
            );
        }
        let mut next_expiry: Option<f64> = None;
        for row in client
            .query(
                "SELECT k.key_hash, k.org_id, k.label, o.ingest_points_per_sec, \
                        EXTRACT(EPOCH FROM (k.expires_at - now()))::float8 \
                 FROM dbx_aviation.api_keys k JOIN dbx_aviation.organizations o USING (org_id) \
                 WHERE o.is_active AND k.revoked_at IS NULL \
                   AND (k.expires_at IS NULL OR k.expires_at > now())",
                &[],
            )
            .await?
        {
            let rate: Option<i32> = row.get(3);
            // Seconds until expiry by the database's clock, so clock skew does not matter.
            if let Some(secs) = row.get::<_, Option<f64>>(4) {
                next_expiry = Some(next_expiry.map_or(secs, |n| n.min(secs)));
            }
            snap.insert_key(
                row.get::<_, String>(0).to_ascii_lowercase(),
                KeyGrant {
                    org_id: row.get(1),
                    label: row.get(2),
                    points_per_sec: points_per_sec(rate),
                },
            );
        }
        *lock(&self.next_expiry) = next_expiry.map(|secs| {
            // A little after the instant, so that the reload no longer sees the key.
            let wait = Duration::from_secs_f64(secs.clamp(0.0, 86_400.0 * 365.0));
            tokio::time::Instant::now() + wait + Duration::from_millis(50)
        });
        for row in client
            .query(
                "SELECT org_code, org_id, ingest_points_per_sec FROM dbx_aviation.organizations \
                 WHERE is_active",
                &[],
            )
            .await?
        {
            let rate: Option<i32> = row.get(2);
            let (code, org_id): (String, Uuid) = (row.get(0), row.get(1));
            snap.org_codes.insert(org_id, code.clone());
            snap.orgs_by_code.insert(
                code,
                OrgGrant {
                    org_id,
                    points_per_sec: points_per_sec(rate),
                },
            );
        }
        for row in client
            .query(
                "SELECT aircraft_id, org_id, registration_number FROM dbx_aviation.aircraft_registry \
                 WHERE is_active",
                &[],
            )
            .await?
        {
            let (id, org, reg): (Uuid, Uuid, String) = (row.get(0), row.get(1), row.get(2));
            snap.aircraft_by_reg.insert((org, reg), id);
            snap.aircraft_org.insert(id, org);
        }
        tracing::debug!(
            keys = snap.keys.len(),
            aircraft = snap.aircraft_org.len(),
            "auth cache reloaded"
        );
        let snap = Arc::new(snap);
        *write(&self.snapshot) = snap.clone();
        // The snapshot is authoritative again (a retired aircraft must stop resolving).
        *lock(&self.aircraft_found) = TwoGen::new(10_000);
        *lock(&self.aircraft_missing) = TwoGen::new(10_000);
        self.changes.send_modify(|g| *g += 1);
        Ok(snap)
    }

    /// Makes `key` known with `grant`, without a database (unit tests of the listener).
    #[cfg(test)]
    pub(crate) fn insert_key_for_test(&self, key: &str, grant: KeyGrant) {
        let mut snap = (*self.snapshot()).clone();
        snap.insert_key(dbx_core::apikey::key_hash_hex(key), grant);
        *write(&self.snapshot) = Arc::new(snap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbx_core::apikey::key_hash_hex;

    fn grant(label: &str) -> KeyGrant {
        KeyGrant {
            org_id: Uuid::nil(),
            label: label.into(),
            points_per_sec: None,
        }
    }

    #[test]
    fn a_mac_finds_its_key_among_keys_sharing_a_kid() {
        let mut snap = AuthSnapshot::default();
        // Two stored hashes with the same first 8 bytes (the kid), and a real one.
        let a = format!("{}{}", "ab".repeat(8), "01".repeat(24));
        let b = format!("{}{}", "ab".repeat(8), "02".repeat(24));
        snap.insert_key(b.clone(), grant("b"));
        snap.insert_key(a.clone(), grant("a"));
        snap.insert_key(key_hash_hex("dbx_real"), grant("real"));
        let raw_b = raw_hash(&b).unwrap();
        let kid = dbx_proto::mac::key_id(&raw_b);
        assert_eq!(kid, 0xabab_abab_abab_abab);
        let mac = dbx_proto::mac::body_mac(&raw_b, b"batch");
        let (hash, g) = snap.key_by_mac(kid, &mac, b"batch").unwrap();
        assert_eq!((hash, g.label.as_str()), (b.as_str(), "b"));
        // Wrong body, wrong kid, a MAC by no stored key: nothing.
        assert!(snap.key_by_mac(kid, &mac, b"batcH").is_none());
        assert!(snap.key_by_mac(kid ^ 1, &mac, b"batch").is_none());
        let forged = dbx_proto::mac::body_mac(&dbx_proto::mac::key_hash("guess"), b"batch");
        assert!(snap.key_by_mac(kid, &forged, b"batch").is_none());
        // The real key through its own kid.
        let real = dbx_proto::mac::key_hash("dbx_real");
        let mac = dbx_proto::mac::body_mac(&real, b"x");
        assert_eq!(
            snap.key_by_mac(dbx_proto::mac::key_id(&real), &mac, b"x")
                .unwrap()
                .1
                .label,
            "real"
        );
    }
}
