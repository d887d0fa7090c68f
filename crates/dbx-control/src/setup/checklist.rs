//! The seed's success checklist, verified rather than assumed: after provisioning, each item
//! is checked against the database as it now is (tables present, each login user logs in and
//! sees them, the sample data, the connection test as `dbx_api_service`, its TLS, the mode of
//! the files written) and reported ticked, failed or not applicable.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use tokio_postgres::Client;

use super::{
    check, connect, db_err, missing_tables, CheckReport, SetupError, SetupOptions, SAMPLE_ORG_CODE,
};
use crate::postgis::PostgisState;

/// One item of the seed's success checklist.
#[derive(Debug, Clone)]
pub struct ChecklistItem {
    /// The seed's wording.
    pub label: &'static str,
    /// `Some(true)` ticked, `Some(false)` failed, `None` not applicable here.
    pub ok: Option<bool>,
    /// What we found.
    pub detail: String,
}

/// What provisioning did, for the checklist to verify.
pub(super) struct Provisioned<'a> {
    /// The server's `version()`.
    pub server_version: &'a str,
    /// The database existed before this run.
    pub existed: bool,
    /// How many migrations this run applied.
    pub migrations_applied: usize,
    /// Which branch of the schema PostGIS gave.
    pub postgis: &'a PostgisState,
    /// Login user → URL written to `credentials.txt`.
    pub urls: &'a [(String, String)],
    /// Files written.
    pub files: &'a [PathBuf],
}

/// Every item of the checklist, in the seed's order. `client` is the superuser's connection to
/// the database.
pub(super) async fn verify(
    client: &Client,
    opts: &SetupOptions,
    done: &Provisioned<'_>,
) -> Result<Vec<ChecklistItem>, SetupError> {
    let mut items = vec![server_item(done), database_item(&opts.database, done)];
    items.push(tables_item(client, done).await?);
    items.push(ChecklistItem {
        label: "Geospatial data support (with PostGIS)",
        ok: done.postgis.endpoints.then_some(true),
        detail: done.postgis.describe(opts.postgis),
    });
    items.push(logins_item(opts, done.urls).await);
    if opts.sample_data {
        items.push(sample_data_item(client).await?);
    }
    let checked = connection_test(opts, done.urls).await;
    items.push(ChecklistItem {
        label: "Connection test passes",
        ok: Some(checked.is_some()),
        detail: "`dbx check` as dbx_api_service".into(),
    });
    items.push(tls_item(checked.as_ref()));
    items.push(ChecklistItem {
        label: "API integration works",
        ok: None,
        detail: "checked by the running daemon: `dbx serve`, then GET /api/v2/system/status".into(),
    });
    items.push(files_item(done.files));
    Ok(items)
}

fn server_item(done: &Provisioned<'_>) -> ChecklistItem {
    ChecklistItem {
        label: "PostgreSQL installed and running",
        ok: Some(true),
        detail: done
            .server_version
            .split(',')
            .next()
            .unwrap_or("")
            .to_string(),
    }
}

fn database_item(db: &str, done: &Provisioned<'_>) -> ChecklistItem {
    ChecklistItem {
        label: "Database `dbx_aviation` created",
        ok: Some(true),
        detail: if done.existed {
            format!("{db} already existed")
        } else {
            format!("{db} created")
        },
    }
}

async fn tables_item(client: &Client, done: &Provisioned<'_>) -> Result<ChecklistItem, SetupError> {
    let missing = missing_tables(client).await?;
    Ok(ChecklistItem {
        label: "All tables created successfully",
        ok: Some(missing.is_empty()),
        detail: if missing.is_empty() {
            format!(
                "7 tables; {} migration(s) applied now",
                done.migrations_applied
            )
        } else {
            format!("missing: {}", missing.join(", "))
        },
    })
}

/// Each login user connects with the URL written for it and sees every table.
async fn logins_item(opts: &SetupOptions, urls: &[(String, String)]) -> ChecklistItem {
    let mut login_ok = Vec::new();
    for (user, url) in urls {
        login_ok.push((user.clone(), logs_in_and_sees_tables(opts, url).await));
    }
    ChecklistItem {
        label: "Application users created with permissions",
        ok: Some(login_ok.iter().all(|(_, ok)| *ok)),
        detail: login_ok
            .iter()
            .map(|(u, ok)| format!("{u} {}", if *ok { "logs in" } else { "CANNOT log in" }))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

async fn logs_in_and_sees_tables(opts: &SetupOptions, url: &str) -> bool {
    let Ok(connector) = opts.superuser.sibling(url, "credentials.txt") else {
        return false;
    };
    match connect(&connector).await {
        Ok(client) => missing_tables(&client).await.is_ok_and(|m| m.is_empty()),
        Err(_) => false,
    }
}

async fn sample_data_item(client: &Client) -> Result<ChecklistItem, SetupError> {
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM dbx_aviation.aircraft_registry a \
             JOIN dbx_aviation.organizations o USING (org_id) WHERE o.org_code = $1",
            &[&SAMPLE_ORG_CODE],
        )
        .await
        .map_err(db_err("counting sample aircraft"))?
        .get(0);
    Ok(ChecklistItem {
        label: "Sample data inserted",
        ok: Some(n > 0),
        detail: format!("organization {SAMPLE_ORG_CODE} with {n} aircraft"),
    })
}

/// `dbx check` as the first login user (`dbx_api_service`); `None` when it fails.
async fn connection_test(opts: &SetupOptions, urls: &[(String, String)]) -> Option<CheckReport> {
    let (_, url) = urls.first()?;
    let connector = opts.superuser.sibling(url, "credentials.txt").ok()?;
    check(&connector).await.ok()
}

/// The seed's production checklist asks for SSL/TLS connections: ticked when the connection
/// test's connection was encrypted with a verified server certificate.
fn tls_item(checked: Option<&CheckReport>) -> ChecklistItem {
    let (ok, detail) = match checked.map(|c| &c.security) {
        Some(s) if s.encrypted && s.verification != dbx_pg::Verification::None => {
            (Some(true), s.summary())
        }
        Some(s) => (
            None,
            format!("{} — production sets sslmode=verify-full", s.summary()),
        ),
        None => (Some(false), "no connection to inspect".into()),
    };
    ChecklistItem {
        label: "SSL/TLS connections",
        ok,
        detail,
    }
}

/// The files holding secrets are readable by their owner only.
fn files_item(files: &[PathBuf]) -> ChecklistItem {
    let secured = files.iter().all(|p| {
        fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o077 == 0)
            .unwrap_or(false)
    });
    ChecklistItem {
        label: "Credentials files secured",
        ok: Some(secured),
        detail: files
            .iter()
            .map(|p| format!("{} (0600)", p.display()))
            .collect::<Vec<_>>()
            .join(", "),
    }
}
