//! Tenant administration: organizations, their API keys and aircraft, and full-text search over
//! their analysis reports — the logic behind `dbx org`, `dbx key`, `dbx aircraft` and
//! `dbx analyses search` (the binary only parses flags and prints).
//!
//! Every function takes a connection of the database owner or a superuser (see [`prepare`]) and
//! validates its input before touching the database, naming the command-line flag a bad value
//! came from. Keys are made here, returned once in clear, and stored only as their SHA-256 (and
//! encrypted with `encrypt_api_key` when the session has `app.encryption_key`). Writes are audited
//! by the schema's triggers (organizations, aircraft_registry, api_keys); reads call
//! [`audit_read`]. Every change to organizations or keys NOTIFYs the daemons, whose auth caches
//! reload within a second: a new key works at once, a revoked one closes its connections.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Row};
use uuid::Uuid;

use crate::migrate::PgError;
use dbx_core::apikey::new_api_key;
use dbx_core::apikey::key_hash_hex;
pub use dbx_core::apikey::PRIMARY_LABEL;

/// Longest accepted `--expires`: 100 years, far beyond any sensible key lifetime.
const MAX_EXPIRY: Duration = Duration::from_secs(100 * 366 * 86_400);

/// Why a tenant command failed.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    /// No organization has this code.
    #[error("unknown organization {0:?} (see `dbx org list`)")]
    UnknownOrg(String),
    /// `org create` with a code that is taken.
    #[error("an organization with code {0:?} already exists (--code)")]
    DuplicateCode(String),
    /// `aircraft add` with a registration the organization already has.
    #[error(
        "organization {org:?} already has an aircraft registered as {registration:?}{} (--registration)",
        if *.retired { " (retired)" } else { "" }
    )]
    DuplicateRegistration {
        /// Organization code.
        org: String,
        /// The registration number.
        registration: String,
        /// Whether the existing aircraft is retired.
        retired: bool,
    },
    /// No aircraft of the organization has this registration.
    #[error("organization {org:?} has no aircraft registered as {registration:?} (see `dbx aircraft list --org {org}`)")]
    UnknownAircraft {
        /// Organization code.
        org: String,
        /// The registration number.
        registration: String,
    },
    /// `key create` with a label the organization already uses (revoked keys keep their label).
    #[error("organization {org:?} already has a key labelled {label:?} (--label; labels of revoked keys stay taken)")]
    DuplicateLabel {
        /// Organization code.
        org: String,
        /// The label.
        label: String,
    },
    /// No key of the organization has this label.
    #[error("organization {org:?} has no key labelled {label:?} (see `dbx key list --org {org}`)")]
    UnknownKey {
        /// Organization code.
        org: String,
        /// The label.
        label: String,
    },
    /// The key was revoked before.
    #[error("key {label:?} of organization {org:?} was already revoked at {at}")]
    AlreadyRevoked {
        /// Organization code.
        org: String,
        /// The label.
        label: String,
        /// When it was revoked.
        at: DateTime<Utc>,
    },
    /// A value failed validation; `flag` names where it came from.
    #[error("invalid {flag}: {reason}")]
    Invalid {
        /// The command-line flag (or argument) at fault.
        flag: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// The schema lacks the tenant objects.
    #[error("the database lacks {0}: run `dbx migrate` (or `dbx setup`) first")]
    NotMigrated(&'static str),
    /// The connection is subject to row-level security (an application user).
    #[error(
        "connected as {user:?}, which row-level security limits to one organization; tenant \
         administration needs the database owner's URL (dbx_admin) or a superuser's (--database-url)"
    )]
    NeedsAdmin {
        /// The connected user.
        user: String,
    },
    /// Any other database error.
    #[error("database error: {0}")]
    Db(#[from] PgError),
}

impl From<tokio_postgres::Error> for TenantError {
    fn from(e: tokio_postgres::Error) -> Self {
        TenantError::Db(PgError::from(e))
    }
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> TenantError {
    TenantError::Invalid {
        flag,
        reason: reason.into(),
    }
}

/// The unique constraint a statement violated, if that is why it failed.
fn violated_constraint(e: &tokio_postgres::Error) -> Option<&str> {
    let db = e.as_db_error()?;
    (db.code() == &SqlState::UNIQUE_VIOLATION)
        .then(|| db.constraint())
        .flatten()
}

// ------------------------------------------------------------------------------------------------
// Validation
// ------------------------------------------------------------------------------------------------

fn starts_alnum(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
}

/// An organization code: 1 to 50 ASCII letters, digits, `-` or `_`, starting with a letter or digit.
pub fn validate_code(flag: &'static str, code: &str) -> Result<(), TenantError> {
    let ok = (1..=50).contains(&code.len())
        && starts_alnum(code)
        && code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            flag,
            format!("{code:?} must be 1 to 50 letters, digits, '-' or '_', starting with a letter or digit"),
        ))
    }
}

/// Free text (names, types, models): not blank, at most `max` characters, no control characters.
pub fn validate_text(flag: &'static str, value: &str, max: usize) -> Result<(), TenantError> {
    if value.trim().is_empty() {
        return Err(invalid(flag, "must not be empty"));
    }
    if value.chars().count() > max {
        return Err(invalid(flag, format!("must be at most {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(flag, "must not contain control characters"));
    }
    Ok(())
}

/// An aircraft registration number: 1 to 20 ASCII letters, digits or dashes, starting with a
/// letter or digit — the rule of `dbx_aviation.register_aircraft` (auto-registration).
pub fn validate_registration(registration: &str) -> Result<(), TenantError> {
    let ok = (1..=20).contains(&registration.len())
        && starts_alnum(registration)
        && registration
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "--registration",
            format!(
                "{registration:?} must be 1 to 20 letters, digits or dashes, starting with a letter or digit (e.g. N123AB, G-ABCD)"
            ),
        ))
    }
}

/// A key label: 1 to 64 ASCII letters, digits, `.`, `_` or `-`, starting with a letter or digit.
pub fn validate_label(label: &str) -> Result<(), TenantError> {
    let ok = (1..=64).contains(&label.len())
        && starts_alnum(label)
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "--label",
            format!("{label:?} must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"),
        ))
    }
}

/// `data_retention_days`: 1 to 36 500.
pub fn validate_retention_days(days: i32) -> Result<(), TenantError> {
    if (1..=36_500).contains(&days) {
        Ok(())
    } else {
        Err(invalid(
            "--retention-days",
            format!("{days} must be between 1 and 36500 days"),
        ))
    }
}

/// `ingest_points_per_sec`: positive (use `--unlimited` for no limit).
pub fn validate_points_per_sec(rate: i32) -> Result<(), TenantError> {
    if rate > 0 {
        Ok(())
    } else {
        Err(invalid(
            "--points-per-sec",
            format!("{rate} must be a positive number of points per second (--unlimited removes the limit)"),
        ))
    }
}

/// Parses a duration such as `30d`, `12h`, `90m`, `45s` or `2w` (a positive whole number and a
/// unit); `flag` names the flag in the error.
pub fn parse_duration(flag: &'static str, text: &str) -> Result<Duration, TenantError> {
    let bad = || {
        invalid(
            flag,
            format!("{text:?} is not a duration: use a positive whole number and a unit: s, m, h, d or w (e.g. 30d, 12h, 90m)"),
        )
    };
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs_per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(bad());
    }
    let d = n
        .checked_mul(secs_per)
        .map(Duration::from_secs)
        .filter(|d| *d <= MAX_EXPIRY)
        .ok_or_else(|| invalid(flag, format!("{text:?} is longer than 100 years")))?;
    Ok(d)
}

// ------------------------------------------------------------------------------------------------
// Session
// ------------------------------------------------------------------------------------------------

/// Readies an administration session: checks that the schema has the tenant objects and that the
/// user is not confined by row-level security, tags the session so audit rows name `command`
/// (`app.user_agent` = `dbx <command>`), and sets `app.encryption_key` when one is given (else
/// the server's own setting, if any, is used).
pub async fn prepare(
    client: &Client,
    command: &str,
    encryption_key: Option<&str>,
) -> Result<(), TenantError> {
    let row = client
        .query_one(
            "SELECT to_regclass('dbx_aviation.organizations') IS NOT NULL,
                    to_regclass('dbx_aviation.api_keys') IS NOT NULL,
                    current_user::text",
            &[],
        )
        .await?;
    let (orgs, keys, user): (bool, bool, String) = (row.get(0), row.get(1), row.get(2));
    if !orgs {
        return Err(TenantError::NotMigrated("dbx_aviation.organizations"));
    }
    if !keys {
        return Err(TenantError::NotMigrated(
            "dbx_aviation.api_keys (migration 0020)",
        ));
    }
    let confined: bool = client
        .query_one(
            "SELECT row_security_active('dbx_aviation.organizations')",
            &[],
        )
        .await?
        .get(0);
    if confined {
        return Err(TenantError::NeedsAdmin { user });
    }
    client
        .execute(
            "SELECT set_config('app.user_agent', $1, false)",
            &[&format!("dbx {command}")],
        )
        .await?;
    if let Some(k) = encryption_key.filter(|k| !k.is_empty()) {
        client
            .execute("SELECT set_config('app.encryption_key', $1, false)", &[&k])
            .await?;
    }
    Ok(())
}

/// Whether this session can encrypt keys (`app.encryption_key` is set and not empty).
pub async fn encryption_available(client: &impl GenericClient) -> Result<bool, TenantError> {
    Ok(client
        .query_one(
            "SELECT COALESCE(current_setting('app.encryption_key', true), '') <> ''",
            &[],
        )
        .await?
        .get(0))
}

/// Writes an audit row (action `READ`) for an administrative read.
pub async fn audit_read(
    client: &impl GenericClient,
    org: Option<Uuid>,
    table: &str,
    details: serde_json::Value,
) -> Result<(), TenantError> {
    client
        .execute(
            "SELECT dbx_audit.log_admin_read($1, $2, $3)",
            &[&org, &table, &details],
        )
        .await?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Organizations
// ------------------------------------------------------------------------------------------------

/// An organization as the CLI shows it (never key material).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Org {
    /// Its id.
    pub org_id: Uuid,
    /// Its code (`--code`).
    pub code: String,
    /// Its name.
    pub name: String,
    /// Its type (`drone_operator`, `airline`, ...).
    pub org_type: String,
    /// Subscription tier.
    pub subscription_tier: String,
    /// Whether its gateways are accepted.
    pub active: bool,
    /// Ingest rate limit in points per second; `None` = unlimited.
    pub points_per_sec: Option<i32>,
    /// Data retention in days.
    pub retention_days: i32,
    /// Compliance level.
    pub compliance_level: String,
    /// Whether an encrypted copy of its primary key is stored.
    pub key_encrypted: bool,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

const ORG_COLUMNS: &str = "o.org_id, o.org_code::text, o.org_name::text, o.org_type::text, \
     o.subscription_tier::text, o.is_active, o.ingest_points_per_sec, o.data_retention_days, \
     o.compliance_level::text, o.api_key_encrypted IS NOT NULL, o.created_at, o.updated_at";

fn org_from_row(r: &Row) -> Org {
    Org {
        org_id: r.get(0),
        code: r.get(1),
        name: r.get(2),
        org_type: r.get(3),
        subscription_tier: r.get(4),
        active: r.get(5),
        points_per_sec: r.get(6),
        retention_days: r.get(7),
        compliance_level: r.get(8),
        key_encrypted: r.get(9),
        created_at: r.get(10),
        updated_at: r.get(11),
    }
}

/// An organization with its activity, for `org list` and `org show`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OrgSummary {
    /// The organization.
    #[serde(flatten)]
    pub org: Org,
    /// Active aircraft.
    pub aircraft: i64,
    /// Flight sessions, all time.
    pub sessions: i64,
    /// Sessions with a point in the last 24 hours.
    pub sessions_24h: i64,
    /// Points of the sessions active in the last 24 hours (from the per-session counters the
    /// daemon keeps, not a scan of telemetry: a session that started earlier counts whole).
    pub points_24h: i64,
    /// Keys that work now (not revoked, not expired).
    pub active_keys: i64,
}

const SUMMARY_SQL: &str = "
    SELECT {ORG},
           COALESCE(a.n, 0), COALESCE(s.total, 0), COALESCE(s.recent, 0), COALESCE(s.points, 0)::bigint,
           COALESCE(k.n, 0)
      FROM dbx_aviation.organizations o
      LEFT JOIN (SELECT org_id, count(*) AS n FROM dbx_aviation.aircraft_registry
                  WHERE is_active GROUP BY org_id) a USING (org_id)
      LEFT JOIN (SELECT org_id, count(*) AS total,
                        count(*) FILTER (WHERE recent) AS recent,
                        sum(point_count) FILTER (WHERE recent) AS points
                   FROM (SELECT org_id, point_count,
                                COALESCE(actual_arrival, created_at) >= now() - interval '24 hours' AS recent
                           FROM dbx_aviation.flight_sessions) fs
                  GROUP BY org_id) s USING (org_id)
      LEFT JOIN (SELECT org_id, count(*) AS n FROM dbx_aviation.api_keys
                  WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
                  GROUP BY org_id) k USING (org_id)";

fn summary_from_row(r: &Row) -> OrgSummary {
    OrgSummary {
        org: org_from_row(r),
        aircraft: r.get(12),
        sessions: r.get(13),
        sessions_24h: r.get(14),
        points_24h: r.get(15),
        active_keys: r.get(16),
    }
}

fn summary_sql(filter: &str) -> String {
    format!("{} {filter}", SUMMARY_SQL.replace("{ORG}", ORG_COLUMNS))
}

/// What `org create` is given.
#[derive(Debug, Clone, Default)]
pub struct NewOrg {
    /// `--code`.
    pub code: String,
    /// `--name`.
    pub name: String,
    /// `--type`.
    pub org_type: String,
    /// `--retention-days` (schema default when `None`).
    pub retention_days: Option<i32>,
    /// `--points-per-sec` (unlimited when `None`).
    pub points_per_sec: Option<i32>,
}

/// The result of `org create`: the organization and its first key, in clear, shown once.
#[derive(Debug, Clone, Serialize)]
pub struct CreatedOrg {
    /// The organization.
    pub org: Org,
    /// The key's label (`primary`).
    pub key_label: String,
    /// The API key. Not stored anywhere in clear; print it once.
    pub api_key: String,
}

/// An INSERT built column by column, its placeholders numbered as parameters are added.
#[derive(Default)]
struct Insert<'a> {
    cols: Vec<&'static str>,
    vals: Vec<String>,
    params: Vec<&'a (dyn ToSql + Sync)>,
}

impl<'a> Insert<'a> {
    /// Adds `col` = `expr`, where `$` in `expr` stands for the new parameter.
    fn add(&mut self, col: &'static str, param: &'a (dyn ToSql + Sync), expr: &str) {
        self.params.push(param);
        self.cols.push(col);
        self.vals
            .push(expr.replace('$', &format!("${}", self.params.len())));
    }
}

/// The organization with this code.
pub async fn org_by_code(client: &impl GenericClient, code: &str) -> Result<Org, TenantError> {
    let sql =
        format!("SELECT {ORG_COLUMNS} FROM dbx_aviation.organizations o WHERE o.org_code = $1");
    client
        .query_opt(&sql, &[&code])
        .await?
        .map(|r| org_from_row(&r))
        .ok_or_else(|| TenantError::UnknownOrg(code.to_string()))
}

/// Creates an organization and its first (`primary`) key.
pub async fn create_org(client: &mut Client, new: &NewOrg) -> Result<CreatedOrg, TenantError> {
    validate_code("--code", &new.code)?;
    validate_text("--name", &new.name, 255)?;
    validate_text("--type", &new.org_type, 50)?;
    if let Some(d) = new.retention_days {
        validate_retention_days(d)?;
    }
    if let Some(r) = new.points_per_sec {
        validate_points_per_sec(r)?;
    }
    let key = new_api_key();
    let hash = key_hash_hex(&key);
    let tx = client.transaction().await?;
    let encrypt = encryption_available(&tx).await?;

    let mut ins = Insert::default();
    ins.add("org_code", &new.code, "$");
    ins.add("org_name", &new.name, "$");
    ins.add("org_type", &new.org_type, "$");
    ins.add("api_key_hash", &hash, "$");
    // The clear key goes to the server only when it is to be encrypted there.
    if encrypt {
        ins.add("api_key_encrypted", &key, "dbx_aviation.encrypt_api_key($)");
    }
    // Unset options keep the schema's defaults.
    if let Some(d) = &new.retention_days {
        ins.add("data_retention_days", d, "$");
    }
    if let Some(r) = &new.points_per_sec {
        ins.add("ingest_points_per_sec", r, "$");
    }
    let sql = format!(
        "INSERT INTO dbx_aviation.organizations AS o ({}) VALUES ({}) RETURNING {ORG_COLUMNS}",
        ins.cols.join(", "),
        ins.vals.join(", ")
    );
    let params = ins.params;
    let row = match tx.query_one(&sql, &params).await {
        Ok(r) => r,
        Err(e) if violated_constraint(&e) == Some("organizations_org_code_key") => {
            return Err(TenantError::DuplicateCode(new.code.clone()))
        }
        Err(e) => return Err(e.into()),
    };
    let org = org_from_row(&row);
    tx.commit().await?;
    Ok(CreatedOrg {
        org,
        key_label: PRIMARY_LABEL.into(),
        api_key: key,
    })
}

/// Every organization with its activity, by code.
pub async fn list_orgs(client: &impl GenericClient) -> Result<Vec<OrgSummary>, TenantError> {
    let rows = client
        .query(&summary_sql("ORDER BY o.org_code"), &[])
        .await?;
    Ok(rows.iter().map(summary_from_row).collect())
}

/// One organization with its activity.
pub async fn org_summary(
    client: &impl GenericClient,
    code: &str,
) -> Result<OrgSummary, TenantError> {
    client
        .query_opt(&summary_sql("WHERE o.org_code = $1"), &[&code])
        .await?
        .map(|r| summary_from_row(&r))
        .ok_or_else(|| TenantError::UnknownOrg(code.to_string()))
}

/// What `org update` changes; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct OrgUpdate {
    /// `--name`.
    pub name: Option<String>,
    /// `--type`.
    pub org_type: Option<String>,
    /// `--retention-days`.
    pub retention_days: Option<i32>,
    /// `--points-per-sec` (`Some(Some(r))`) or `--unlimited` (`Some(None)`).
    pub points_per_sec: Option<Option<i32>>,
}

/// Changes an organization; returns it as it is now.
pub async fn update_org(
    client: &impl GenericClient,
    code: &str,
    update: &OrgUpdate,
) -> Result<Org, TenantError> {
    if let Some(n) = &update.name {
        validate_text("--name", n, 255)?;
    }
    if let Some(t) = &update.org_type {
        validate_text("--type", t, 50)?;
    }
    if let Some(d) = update.retention_days {
        validate_retention_days(d)?;
    }
    if let Some(Some(r)) = update.points_per_sec {
        validate_points_per_sec(r)?;
    }
    let mut sets: Vec<String> = Vec::new();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&code];
    if let Some(n) = &update.name {
        params.push(n);
        sets.push(format!("org_name = ${}", params.len()));
    }
    if let Some(t) = &update.org_type {
        params.push(t);
        sets.push(format!("org_type = ${}", params.len()));
    }
    if let Some(d) = &update.retention_days {
        params.push(d);
        sets.push(format!("data_retention_days = ${}", params.len()));
    }
    if let Some(r) = &update.points_per_sec {
        params.push(r);
        sets.push(format!("ingest_points_per_sec = ${}::int", params.len()));
    }
    if sets.is_empty() {
        return Err(invalid(
            "org update",
            "nothing to change: pass --name, --type, --retention-days, --points-per-sec or --unlimited",
        ));
    }
    let sql = format!(
        "UPDATE dbx_aviation.organizations o SET {} WHERE o.org_code = $1 RETURNING {ORG_COLUMNS}",
        sets.join(", ")
    );
    client
        .query_opt(&sql, &params)
        .await?
        .map(|r| org_from_row(&r))
        .ok_or_else(|| TenantError::UnknownOrg(code.to_string()))
}

/// Activates or deactivates an organization. A deactivated organization's gateways are refused
/// at their next handshake and its open connections closed (the daemons reload on NOTIFY).
pub async fn set_org_active(
    client: &impl GenericClient,
    code: &str,
    active: bool,
) -> Result<Org, TenantError> {
    let sql = format!(
        "UPDATE dbx_aviation.organizations o SET is_active = $2 WHERE o.org_code = $1 RETURNING {ORG_COLUMNS}"
    );
    client
        .query_opt(&sql, &[&code, &active])
        .await?
        .map(|r| org_from_row(&r))
        .ok_or_else(|| TenantError::UnknownOrg(code.to_string()))
}

// ------------------------------------------------------------------------------------------------
// Keys
// ------------------------------------------------------------------------------------------------

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

// ------------------------------------------------------------------------------------------------
// Aircraft
// ------------------------------------------------------------------------------------------------

/// An aircraft of an organization.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Aircraft {
    /// Its id.
    pub aircraft_id: Uuid,
    /// Registration number, unique in the organization.
    pub registration: String,
    /// Type.
    pub aircraft_type: String,
    /// Manufacturer.
    pub manufacturer: Option<String>,
    /// Model.
    pub model: Option<String>,
    /// Operational status (`active`, `retired`, ...).
    pub operational_status: String,
    /// Whether the daemon accepts telemetry for it.
    pub active: bool,
    /// Registered.
    pub created_at: DateTime<Utc>,
}

const AIRCRAFT_COLUMNS: &str =
    "a.aircraft_id, a.registration_number::text, a.aircraft_type::text, \
     a.manufacturer::text, a.model::text, a.operational_status::text, a.is_active, a.created_at";

fn aircraft_from_row(r: &Row) -> Aircraft {
    Aircraft {
        aircraft_id: r.get(0),
        registration: r.get(1),
        aircraft_type: r.get(2),
        manufacturer: r.get(3),
        model: r.get(4),
        operational_status: r.get(5),
        active: r.get(6),
        created_at: r.get(7),
    }
}

/// What `aircraft add` is given.
#[derive(Debug, Clone, Default)]
pub struct NewAircraft {
    /// `--registration`.
    pub registration: String,
    /// `--type`.
    pub aircraft_type: String,
    /// `--manufacturer`.
    pub manufacturer: Option<String>,
    /// `--model`.
    pub model: Option<String>,
}

/// Registers an aircraft; the daemons accept telemetry for it within a second.
pub async fn add_aircraft(
    client: &impl GenericClient,
    code: &str,
    new: &NewAircraft,
) -> Result<Aircraft, TenantError> {
    validate_registration(&new.registration)?;
    validate_text("--type", &new.aircraft_type, 50)?;
    if let Some(m) = &new.manufacturer {
        validate_text("--manufacturer", m, 100)?;
    }
    if let Some(m) = &new.model {
        validate_text("--model", m, 100)?;
    }
    let org = org_by_code(client, code).await?;
    let sql = format!(
        "INSERT INTO dbx_aviation.aircraft_registry AS a
           (org_id, registration_number, aircraft_type, manufacturer, model)
         VALUES ($1, $2, $3, $4, $5) RETURNING {AIRCRAFT_COLUMNS}"
    );
    match client
        .query_one(
            &sql,
            &[
                &org.org_id,
                &new.registration,
                &new.aircraft_type,
                &new.manufacturer,
                &new.model,
            ],
        )
        .await
    {
        Ok(r) => Ok(aircraft_from_row(&r)),
        Err(e) if violated_constraint(&e) == Some("aircraft_registry_org_registration_key") => {
            let active: bool = client
                .query_opt(
                    "SELECT is_active FROM dbx_aviation.aircraft_registry
                      WHERE org_id = $1 AND registration_number = $2",
                    &[&org.org_id, &new.registration],
                )
                .await?
                .is_none_or(|r| r.get(0));
            Err(TenantError::DuplicateRegistration {
                org: code.to_string(),
                registration: new.registration.clone(),
                retired: !active,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// The aircraft of an organization (retired ones too), by registration.
pub async fn list_aircraft(
    client: &impl GenericClient,
    org: &Org,
) -> Result<Vec<Aircraft>, TenantError> {
    let sql = format!(
        "SELECT {AIRCRAFT_COLUMNS} FROM dbx_aviation.aircraft_registry a
          WHERE a.org_id = $1 ORDER BY a.registration_number"
    );
    Ok(client
        .query(&sql, &[&org.org_id])
        .await?
        .iter()
        .map(aircraft_from_row)
        .collect())
}

/// Retires an aircraft (`is_active = false`, status `retired`): the daemons refuse its
/// telemetry (`unknown_aircraft`) within a second. Its history stays.
pub async fn retire_aircraft(
    client: &impl GenericClient,
    code: &str,
    registration: &str,
) -> Result<Aircraft, TenantError> {
    validate_registration(registration)?;
    let org = org_by_code(client, code).await?;
    let sql = format!(
        "UPDATE dbx_aviation.aircraft_registry a SET is_active = false, operational_status = 'retired'
          WHERE a.org_id = $1 AND a.registration_number = $2 RETURNING {AIRCRAFT_COLUMNS}"
    );
    client
        .query_opt(&sql, &[&org.org_id, &registration])
        .await?
        .map(|r| aircraft_from_row(&r))
        .ok_or_else(|| TenantError::UnknownAircraft {
            org: code.to_string(),
            registration: registration.to_string(),
        })
}

// ------------------------------------------------------------------------------------------------
// Full-text search
// ------------------------------------------------------------------------------------------------

/// One analysis matching a search.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnalysisHit {
    /// The analysis.
    pub analysis_id: Uuid,
    /// Its flight session.
    pub session_id: Option<Uuid>,
    /// Model that produced it.
    pub model_version: String,
    /// Risk level.
    pub risk_level: Option<String>,
    /// Whether an anomaly was detected.
    pub anomaly_detected: bool,
    /// When it was made.
    pub analysis_timestamp: DateTime<Utc>,
    /// `ts_rank` of the report against the query (higher is better).
    pub rank: f32,
    /// Matching fragments of the report, matches between `**`.
    pub headline: String,
}

/// The analyses of an organization whose report matches `query` (web-search syntax: words,
/// `"phrases"`, `or`, `-excluded`; English stemming), best first, at most `limit`. Uses the GIN
/// index `ml_analysis_results_report_fts`.
pub async fn search_analyses(
    client: &impl GenericClient,
    org: &Org,
    query: &str,
    limit: i64,
) -> Result<Vec<AnalysisHit>, TenantError> {
    validate_text("search text", query, 1000)?;
    if !(1..=10_000).contains(&limit) {
        return Err(invalid(
            "--limit",
            format!("{limit} must be between 1 and 10000"),
        ));
    }
    // Rank in the inner query, headline only for the rows returned (ts_headline re-parses the
    // whole document, so it must not run for every match).
    let rows = client
        .query(
            "WITH q AS (SELECT websearch_to_tsquery('english', $2) AS q),
                  best AS (
                    SELECT a.analysis_id,
                           ts_rank(to_tsvector('english'::regconfig, COALESCE(a.ai_report_content, '')), q.q) AS rank
                      FROM dbx_aviation.ml_analysis_results a, q
                     WHERE a.org_id = $1
                       AND to_tsvector('english'::regconfig, COALESCE(a.ai_report_content, '')) @@ q.q
                     ORDER BY rank DESC, a.analysis_timestamp DESC
                     LIMIT $3)
             SELECT a.analysis_id, a.session_id, a.model_version::text, a.risk_level::text,
                    a.anomaly_detected, a.analysis_timestamp, best.rank,
                    ts_headline('english', COALESCE(a.ai_report_content, ''), q.q,
                                'StartSel=**, StopSel=**, MaxWords=35, MinWords=12, MaxFragments=2, FragmentDelimiter=\" ... \"')
               FROM best JOIN dbx_aviation.ml_analysis_results a USING (analysis_id), q
              ORDER BY best.rank DESC, a.analysis_timestamp DESC",
            &[&org.org_id, &query, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| AnalysisHit {
            analysis_id: r.get(0),
            session_id: r.get(1),
            model_version: r.get(2),
            risk_level: r.get(3),
            anomaly_detected: r.get(4),
            analysis_timestamp: r.get(5),
            rank: r.get(6),
            headline: r.get(7),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_their_unit() {
        assert_eq!(
            parse_duration("--expires", "30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(
            parse_duration("--expires", "12h").unwrap(),
            Duration::from_secs(12 * 3600)
        );
        assert_eq!(
            parse_duration("--expires", "90m").unwrap(),
            Duration::from_secs(90 * 60)
        );
        assert_eq!(
            parse_duration("--expires", "45s").unwrap(),
            Duration::from_secs(45)
        );
        assert_eq!(
            parse_duration("--expires", "2w").unwrap(),
            Duration::from_secs(14 * 86_400)
        );
        for bad in [
            "",
            "30",
            "d",
            "0d",
            "-1d",
            "1.5d",
            "30x",
            "30 days",
            "99999999999999999999d",
        ] {
            let e = parse_duration("--expires", bad).unwrap_err();
            assert!(
                e.to_string().starts_with("invalid --expires: "),
                "{bad:?}: {e}"
            );
        }
        assert!(parse_duration("--expires", "40000d")
            .unwrap_err()
            .to_string()
            .contains("100 years"));
    }

    #[test]
    fn registrations_follow_register_aircraft() {
        for ok in ["N123AB", "G-ABCD", "9H-XYZ", "A", "ABCDEFGHIJ0123456789"] {
            validate_registration(ok).unwrap();
        }
        for bad in [
            "",
            "-ABC",
            "N 123",
            "N123_AB",
            "ABCDEFGHIJ01234567890",
            "Ñ123",
        ] {
            let e = validate_registration(bad).unwrap_err();
            assert!(
                e.to_string().starts_with("invalid --registration: "),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn codes_labels_and_numbers_are_checked() {
        validate_code("--code", "ACME-1_x").unwrap();
        assert!(validate_code("--code", "").is_err());
        assert!(validate_code("--code", "_x").is_err());
        assert!(validate_code("--code", &"A".repeat(51)).is_err());
        validate_label("rot-2024.05_a").unwrap();
        assert!(validate_label("has space").is_err());
        assert!(validate_label(&"k".repeat(65)).is_err());
        assert!(validate_retention_days(0).is_err());
        assert!(validate_retention_days(36_501).is_err());
        validate_retention_days(30).unwrap();
        let e = validate_points_per_sec(0).unwrap_err().to_string();
        assert!(e.starts_with("invalid --points-per-sec"), "{e}");
        assert!(validate_text("--name", "  ", 10).is_err());
        assert!(validate_text("--name", "a\nb", 10).is_err());
        assert!(validate_text("--name", "abcdefghijk", 10).is_err());
        validate_text("--name", "Zürich Air", 10).unwrap();
    }
}
