//! An administration session: [`prepare`] checks the schema and the user and tags the session
//! for the audit trail; [`encryption_available`] says whether keys can be stored encrypted;
//! [`audit_read`] records an administrative read.

use tokio_postgres::{Client, GenericClient};
use uuid::Uuid;

use super::TenantError;

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
