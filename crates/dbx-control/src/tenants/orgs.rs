//! Organizations: create (with their first key), list with their activity, show, update,
//! enable and disable (`dbx org`).

use chrono::{DateTime, Utc};
use dbx_core::apikey::{key_hash_hex, new_api_key};
use serde::Serialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Row};
use uuid::Uuid;

use super::session::encryption_available;
use super::validate::{
    validate_code, validate_points_per_sec, validate_retention_days, validate_text,
};
use super::{invalid, violated_constraint, TenantError, PRIMARY_LABEL};

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
    // On Citus the primary-key mirror is this call, not a trigger (migration 0041); a no-op
    // on a single node.
    tx.execute("SELECT dbx_aviation.sync_primary_api_keys()", &[])
        .await?;
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
