//! API keys of an organization: create (returned once in clear, stored as their SHA-256),
//! list, revoke (`dbx key`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use dbx_core::apikey::{key_hash_hex, new_api_key};
use serde::Serialize;
use tokio_postgres::{Client, GenericClient, Row};
use uuid::Uuid;

use super::orgs::{org_by_code, Org};
use super::session::encryption_available;
use super::validate::{validate_label, MAX_EXPIRY};
use super::{invalid, violated_constraint, TenantError};

/// Where a key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    /// Accepted.
    Active,
    /// Past `expires_at`.
    Expired,
    /// Revoked.
    Revoked,
}

impl KeyStatus {
    /// `active`, `expired` or `revoked`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Expired => "expired",
            KeyStatus::Revoked => "revoked",
        }
    }
}

/// A key's metadata (never the key or its hash).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyInfo {
    /// Its id.
    pub key_id: Uuid,
    /// Its label, unique in the organization.
    pub label: String,
    /// Active, expired or revoked.
    pub status: KeyStatus,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last handshake with it (stamped by the daemons every few seconds).
    pub last_used_at: Option<DateTime<Utc>>,
    /// Expiry, if any.
    pub expires_at: Option<DateTime<Utc>>,
    /// Revocation time, if revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Whether an encrypted copy is stored.
    pub encrypted: bool,
}

const KEY_COLUMNS: &str = "k.key_id, k.label::text, \
     CASE WHEN k.revoked_at IS NOT NULL THEN 'revoked' \
          WHEN k.expires_at IS NOT NULL AND k.expires_at <= now() THEN 'expired' ELSE 'active' END, \
     k.created_at, k.last_used_at, k.expires_at, k.revoked_at, k.key_encrypted IS NOT NULL";

fn key_from_row(r: &Row) -> KeyInfo {
    let status = match r.get::<_, &str>(2) {
        "revoked" => KeyStatus::Revoked,
        "expired" => KeyStatus::Expired,
        _ => KeyStatus::Active,
    };
    KeyInfo {
        key_id: r.get(0),
        label: r.get(1),
        status,
        created_at: r.get(3),
        last_used_at: r.get(4),
        expires_at: r.get(5),
        revoked_at: r.get(6),
        encrypted: r.get(7),
    }
}

/// The result of `key create`: the key in clear, shown once.
#[derive(Debug, Clone, Serialize)]
pub struct CreatedKey {
    /// The organization's code.
    pub org: String,
    /// The key's metadata.
    pub key: KeyInfo,
    /// The API key. Not stored anywhere in clear; print it once.
    pub api_key: String,
}

/// Adds a key to an organization. Without a label it is `key-N` (the next free number); with
/// `expires_in` it stops working that long from now.
pub async fn create_key(
    client: &mut Client,
    code: &str,
    label: Option<&str>,
    expires_in: Option<Duration>,
) -> Result<CreatedKey, TenantError> {
    if let Some(l) = label {
        validate_label(l)?;
    }
    if let Some(d) = expires_in {
        if d.is_zero() || d > MAX_EXPIRY {
            return Err(invalid(
                "--expires",
                "must be between 1 second and 100 years",
            ));
        }
    }
    let tx = client.transaction().await?;
    let org = org_by_code(&tx, code).await?;
    let label = match label {
        Some(l) => l.to_string(),
        None => {
            let n: String = tx
                .query_one(
                    "SELECT (COALESCE(max(substring(label from '^key-([0-9]{1,18})$')::bigint), 0) + 1)::text
                       FROM dbx_aviation.api_keys WHERE org_id = $1",
                    &[&org.org_id],
                )
                .await?
                .get(0);
            format!("key-{n}")
        }
    };
    let key = new_api_key();
    let hash = key_hash_hex(&key);
    let encrypt = encryption_available(&tx).await?;
    let expires_secs: Option<f64> = expires_in.map(|d| d.as_secs_f64());
    let encrypted_arg: Option<&str> = encrypt.then_some(key.as_str());
    let sql = format!(
        "INSERT INTO dbx_aviation.api_keys AS k (org_id, label, key_hash, key_encrypted, expires_at)
         VALUES ($1, $2, $3,
                 CASE WHEN $4::text IS NOT NULL THEN dbx_aviation.encrypt_api_key($4::text) END,
                 now() + $5::float8 * interval '1 second')
         RETURNING {KEY_COLUMNS}"
    );
    let row = match tx
        .query_one(
            &sql,
            &[&org.org_id, &label, &hash, &encrypted_arg, &expires_secs],
        )
        .await
    {
        Ok(r) => r,
        Err(e) if violated_constraint(&e) == Some("api_keys_org_label_key") => {
            return Err(TenantError::DuplicateLabel {
                org: code.to_string(),
                label,
            })
        }
        Err(e) => return Err(e.into()),
    };
    let info = key_from_row(&row);
    tx.commit().await?;
    Ok(CreatedKey {
        org: org.code,
        key: info,
        api_key: key,
    })
}

/// The keys of an organization, oldest first.
pub async fn list_keys(
    client: &impl GenericClient,
    org: &Org,
) -> Result<Vec<KeyInfo>, TenantError> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM dbx_aviation.api_keys k WHERE k.org_id = $1 ORDER BY k.created_at, k.label"
    );
    Ok(client
        .query(&sql, &[&org.org_id])
        .await?
        .iter()
        .map(key_from_row)
        .collect())
}

/// The result of `key revoke`.
#[derive(Debug, Clone, Serialize)]
pub struct RevokedKey {
    /// The organization's code.
    pub org: String,
    /// The key as it is now.
    pub key: KeyInfo,
    /// Keys of the organization that still work.
    pub active_keys_left: i64,
}

/// Revokes a key: the daemons drop it within a second and close the connections that use it.
pub async fn revoke_key(
    client: &mut Client,
    code: &str,
    label: &str,
) -> Result<RevokedKey, TenantError> {
    validate_label(label)?;
    let tx = client.transaction().await?;
    let org = org_by_code(&tx, code).await?;
    let current = tx
        .query_opt(
            "SELECT revoked_at FROM dbx_aviation.api_keys WHERE org_id = $1 AND label = $2 FOR UPDATE",
            &[&org.org_id, &label],
        )
        .await?
        .ok_or_else(|| TenantError::UnknownKey {
            org: code.to_string(),
            label: label.to_string(),
        })?;
    if let Some(at) = current.get::<_, Option<DateTime<Utc>>>(0) {
        return Err(TenantError::AlreadyRevoked {
            org: code.to_string(),
            label: label.to_string(),
            at,
        });
    }
    let sql = format!(
        "UPDATE dbx_aviation.api_keys k SET revoked_at = now()
          WHERE k.org_id = $1 AND k.label = $2 RETURNING {KEY_COLUMNS}"
    );
    let row = tx.query_one(&sql, &[&org.org_id, &label]).await?;
    let left: i64 = tx
        .query_one(
            "SELECT count(*) FROM dbx_aviation.api_keys
              WHERE org_id = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
            &[&org.org_id],
        )
        .await?
        .get(0);
    tx.commit().await?;
    Ok(RevokedKey {
        org: org.code,
        key: key_from_row(&row),
        active_keys_left: left,
    })
}
