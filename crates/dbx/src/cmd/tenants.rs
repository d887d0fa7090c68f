//! `dbx org`, `dbx key`, `dbx aircraft` and `dbx analyses`: tenant administration from the
//! command line. Flags are parsed and results printed here (a table, or JSON with `--json`);
//! everything else — validation, SQL, keys, audit — is `dbx_control::tenants`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use dbx_control::setup;
use dbx_control::tenants::{self, Aircraft, KeyInfo, NewAircraft, NewOrg, Org, OrgUpdate};
use serde::Serialize;
use tokio_postgres::Client;

/// Environment variable with a key for `app.encryption_key` (API keys are then also stored
/// encrypted); never a flag, so that it stays out of shell histories and process lists.
const ENCRYPTION_KEY_ENV: &str = "DBX_ENCRYPTION_KEY";

/// Flags every tenant command takes.
#[derive(Debug, Args)]
pub struct Common {
    /// Connection URL of the database owner (dbx_admin) or a superuser; default DATABASE_URL.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// Print the result as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// The `--config` file, whose `[database]` TLS keys apply to the URL.
    #[arg(skip)]
    config: Option<PathBuf>,
}

/// Flags of `dbx org`.
#[derive(Debug, Args)]
pub struct OrgArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    action: OrgAction,
}

#[derive(Debug, Subcommand)]
enum OrgAction {
    /// Create an organization and print its first API key (shown once, stored as SHA-256 only;
    /// also encrypted when app.encryption_key or DBX_ENCRYPTION_KEY is set).
    Create {
        /// Unique code: letters, digits, '-' or '_' (at most 50).
        #[arg(long)]
        code: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// Type, e.g. airline, drone_operator.
        #[arg(long = "type")]
        org_type: String,
        /// Days of telemetry kept (default: the schema's, 365).
        #[arg(long)]
        retention_days: Option<i32>,
        /// Ingest rate limit in points per second (default: unlimited).
        #[arg(long)]
        points_per_sec: Option<i32>,
    },
    /// List organizations with their activity.
    List,
    /// Show one organization, its activity and its keys.
    Show {
        /// Organization code.
        code: String,
    },
    /// Change an organization.
    Update {
        /// Organization code.
        code: String,
        /// New display name.
        #[arg(long)]
        name: Option<String>,
        /// New type.
        #[arg(long = "type")]
        org_type: Option<String>,
        /// New retention in days.
        #[arg(long)]
        retention_days: Option<i32>,
        /// New ingest rate limit in points per second.
        #[arg(long, conflicts_with = "unlimited")]
        points_per_sec: Option<i32>,
        /// Remove the ingest rate limit.
        #[arg(long)]
        unlimited: bool,
    },
    /// Deactivate an organization: its gateways are refused and their connections closed.
    Deactivate {
        /// Organization code.
        code: String,
    },
    /// Activate an organization again.
    Activate {
        /// Organization code.
        code: String,
    },
}

/// Flags of `dbx key`.
#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    action: KeyAction,
}

#[derive(Debug, Subcommand)]
enum KeyAction {
    /// Create another API key for an organization (rotation) and print it once.
    Create {
        /// Organization code.
        #[arg(long)]
        org: String,
        /// Label, unique in the organization (default: key-N).
        #[arg(long)]
        label: Option<String>,
        /// Lifetime, e.g. 30d, 12h, 90m (default: no expiry).
        #[arg(long)]
        expires: Option<String>,
    },
    /// List an organization's keys (never the keys themselves).
    List {
        /// Organization code.
        #[arg(long)]
        org: String,
    },
    /// Revoke a key: connections using it are closed within seconds.
    Revoke {
        /// Organization code.
        #[arg(long)]
        org: String,
        /// The key's label.
        #[arg(long)]
        label: String,
    },
}

/// Flags of `dbx aircraft`.
#[derive(Debug, Args)]
pub struct AircraftArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    action: AircraftAction,
}

#[derive(Debug, Subcommand)]
enum AircraftAction {
    /// Register an aircraft.
    Add {
        /// Organization code.
        #[arg(long)]
        org: String,
        /// Registration number: 1 to 20 letters, digits or dashes.
        #[arg(long)]
        registration: String,
        /// Aircraft type, e.g. quadcopter, fixed_wing.
        #[arg(long = "type")]
        aircraft_type: String,
        /// Manufacturer.
        #[arg(long)]
        manufacturer: Option<String>,
        /// Model.
        #[arg(long)]
        model: Option<String>,
    },
    /// List an organization's aircraft (retired ones too).
    List {
        /// Organization code.
        #[arg(long)]
        org: String,
    },
    /// Retire an aircraft: its telemetry is refused from now on; its history stays.
    Retire {
        /// Organization code.
        #[arg(long)]
        org: String,
        /// Registration number.
        #[arg(long)]
        registration: String,
    },
}

/// Flags of `dbx analyses`.
#[derive(Debug, Args)]
pub struct AnalysesArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    action: AnalysesAction,
}

#[derive(Debug, Subcommand)]
enum AnalysesAction {
    /// Full-text search over the AI reports of an organization's analyses, best match first.
    Search {
        /// Organization code.
        #[arg(long)]
        org: String,
        /// Words to find (web-search syntax: "a phrase", or, -word).
        text: String,
        /// At most this many results.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
}

/// Connects as the administrator and readies the session for `command`.
async fn connect(common: &Common, command: &str) -> anyhow::Result<Client> {
    let Some(url) = &common.database_url else {
        anyhow::bail!(
            "no database: pass --database-url or set DATABASE_URL (the owner's or a superuser's URL)"
        );
    };
    let connector = crate::cmd::setup::connector(common.config.as_deref(), url, "--database-url")?;
    let client = setup::connect(&connector).await?;
    let encryption_key = std::env::var(ENCRYPTION_KEY_ENV).ok();
    tenants::prepare(&client, command, encryption_key.as_deref()).await?;
    Ok(client)
}

fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(value).context("encoding the result as JSON")?
    );
    Ok(())
}

/// Prints rows under headers, each column as wide as its widest cell.
fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn time(t: Option<DateTime<Utc>>, none: &str) -> String {
    t.map_or_else(
        || none.to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%SZ").to_string(),
    )
}

fn rate(r: Option<i32>) -> String {
    r.map_or_else(|| "unlimited".into(), |r| format!("{r} pts/s"))
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

fn print_org(org: &Org) {
    println!("organization {} ({})", org.code, org.org_id);
    println!("  name:          {}", org.name);
    println!("  type:          {}", org.org_type);
    println!("  tier:          {}", org.subscription_tier);
    println!("  active:        {}", yes_no(org.active));
    println!("  rate limit:    {}", rate(org.points_per_sec));
    println!("  retention:     {} days", org.retention_days);
    println!("  compliance:    {}", org.compliance_level);
    println!("  created:       {}", time(Some(org.created_at), "-"));
    println!("  updated:       {}", time(Some(org.updated_at), "-"));
}

fn print_keys(keys: &[KeyInfo]) {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.label.clone(),
                k.status.as_str().into(),
                time(Some(k.created_at), "-"),
                time(k.last_used_at, "never"),
                time(k.expires_at, "never"),
                time(k.revoked_at, "-"),
            ]
        })
        .collect();
    print_table(
        &[
            "LABEL",
            "STATUS",
            "CREATED",
            "LAST USED",
            "EXPIRES",
            "REVOKED",
        ],
        &rows,
    );
}

fn print_aircraft(list: &[Aircraft]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|a| {
            vec![
                a.registration.clone(),
                a.aircraft_type.clone(),
                a.manufacturer.clone().unwrap_or_else(|| "-".into()),
                a.model.clone().unwrap_or_else(|| "-".into()),
                a.operational_status.clone(),
                yes_no(a.active),
            ]
        })
        .collect();
    print_table(
        &[
            "REGISTRATION",
            "TYPE",
            "MANUFACTURER",
            "MODEL",
            "STATUS",
            "ACTIVE",
        ],
        &rows,
    );
}

fn print_new_key(org: &str, label: &str, key: &str, encrypted: bool) {
    println!("API key {label:?} of {org} (shown only this once; store it now):");
    println!();
    println!("  {key}");
    println!();
    if encrypted {
        println!("Stored as its SHA-256 hash, and encrypted with app.encryption_key.");
    } else {
        println!("Stored as its SHA-256 hash only (no app.encryption_key: no encrypted copy).");
    }
}

/// `dbx org ...`.
pub async fn org(config: Option<&Path>, mut args: OrgArgs) -> anyhow::Result<ExitCode> {
    args.common.config = config.map(Path::to_path_buf);
    let common = &args.common;
    match args.action {
        OrgAction::Create {
            code,
            name,
            org_type,
            retention_days,
            points_per_sec,
        } => {
            let new = NewOrg {
                code,
                name,
                org_type,
                retention_days,
                points_per_sec,
            };
            org_create(common, &new).await?
        }
        OrgAction::List => org_list(common).await?,
        OrgAction::Show { code } => org_show(common, &code).await?,
        OrgAction::Update {
            code,
            name,
            org_type,
            retention_days,
            points_per_sec,
            unlimited,
        } => {
            let update = OrgUpdate {
                name,
                org_type,
                retention_days,
                points_per_sec: if unlimited {
                    Some(None)
                } else {
                    points_per_sec.map(Some)
                },
            };
            org_update(common, &code, &update).await?
        }
        OrgAction::Deactivate { code } => set_active(common, &code, false).await?,
        OrgAction::Activate { code } => set_active(common, &code, true).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `org create`: the organization and its first key, shown once.
async fn org_create(common: &Common, new: &NewOrg) -> anyhow::Result<()> {
    // Checked before connecting, so that a typo never needs a database.
    tenants::validate_code("--code", &new.code)?;
    let mut client = connect(common, "org create").await?;
    let created = tenants::create_org(&mut client, new).await?;
    if common.json {
        print_json(&created)?;
    } else {
        println!(
            "Created organization {} ({}, {}), id {}.",
            created.org.code, created.org.name, created.org.org_type, created.org.org_id
        );
        print_new_key(
            &created.org.code,
            &created.key_label,
            &created.api_key,
            created.org.key_encrypted,
        );
    }
    Ok(())
}

/// `org list`: every organization with its activity.
async fn org_list(common: &Common) -> anyhow::Result<()> {
    let client = connect(common, "org list").await?;
    let orgs = tenants::list_orgs(&client).await?;
    tenants::audit_read(
        &client,
        None,
        "dbx_aviation.organizations",
        serde_json::json!({"command": "org list", "rows": orgs.len()}),
    )
    .await?;
    if common.json {
        print_json(&orgs)?;
    } else {
        let rows: Vec<Vec<String>> = orgs
            .iter()
            .map(|s| {
                vec![
                    s.org.code.clone(),
                    s.org.name.clone(),
                    s.org.org_type.clone(),
                    yes_no(s.org.active),
                    s.aircraft.to_string(),
                    s.sessions.to_string(),
                    s.sessions_24h.to_string(),
                    s.points_24h.to_string(),
                    rate(s.org.points_per_sec),
                    format!("{} d", s.org.retention_days),
                ]
            })
            .collect();
        print_table(
            &[
                "CODE",
                "NAME",
                "TYPE",
                "ACTIVE",
                "AIRCRAFT",
                "SESSIONS",
                "SESSIONS 24H",
                "POINTS 24H",
                "RATE LIMIT",
                "RETENTION",
            ],
            &rows,
        );
    }
    Ok(())
}

/// `org show`: one organization, its activity and its keys.
async fn org_show(common: &Common, code: &str) -> anyhow::Result<()> {
    let client = connect(common, "org show").await?;
    let summary = tenants::org_summary(&client, code).await?;
    let keys = tenants::list_keys(&client, &summary.org).await?;
    tenants::audit_read(
        &client,
        Some(summary.org.org_id),
        "dbx_aviation.organizations",
        serde_json::json!({"command": "org show", "code": code}),
    )
    .await?;
    if common.json {
        #[derive(Serialize)]
        struct Shown<'a> {
            #[serde(flatten)]
            summary: &'a tenants::OrgSummary,
            keys: &'a [KeyInfo],
        }
        print_json(&Shown {
            summary: &summary,
            keys: &keys,
        })?;
    } else {
        print_org(&summary.org);
        println!("  aircraft:      {} active", summary.aircraft);
        println!(
            "  sessions:      {} ({} in the last 24 h, {} points)",
            summary.sessions, summary.sessions_24h, summary.points_24h
        );
        println!("  active keys:   {}", summary.active_keys);
        println!();
        print_keys(&keys);
    }
    Ok(())
}

/// `org update`: changes the given fields.
async fn org_update(common: &Common, code: &str, update: &OrgUpdate) -> anyhow::Result<()> {
    let client = connect(common, "org update").await?;
    let org = tenants::update_org(&client, code, update).await?;
    if common.json {
        print_json(&org)?;
    } else {
        println!("Updated.");
        print_org(&org);
    }
    Ok(())
}

async fn set_active(common: &Common, code: &str, active: bool) -> anyhow::Result<()> {
    let command = if active {
        "org activate"
    } else {
        "org deactivate"
    };
    let client = connect(common, command).await?;
    let org = tenants::set_org_active(&client, code, active).await?;
    if common.json {
        print_json(&org)?;
    } else if active {
        println!(
            "Organization {} is active: its keys are accepted again.",
            org.code
        );
    } else {
        println!(
            "Organization {} is deactivated: its gateways are refused and their open connections closed.",
            org.code
        );
    }
    Ok(())
}

/// `dbx key ...`.
pub async fn key(config: Option<&Path>, mut args: KeyArgs) -> anyhow::Result<ExitCode> {
    args.common.config = config.map(Path::to_path_buf);
    let json = args.common.json;
    match args.action {
        KeyAction::Create {
            org,
            label,
            expires,
        } => {
            let expires = expires
                .map(|e| tenants::parse_duration("--expires", &e))
                .transpose()?;
            if let Some(l) = &label {
                tenants::validate_label(l)?;
            }
            let mut client = connect(&args.common, "key create").await?;
            let created = tenants::create_key(&mut client, &org, label.as_deref(), expires).await?;
            if json {
                print_json(&created)?;
            } else {
                print_new_key(
                    &created.org,
                    &created.key.label,
                    &created.api_key,
                    created.key.encrypted,
                );
                if let Some(at) = created.key.expires_at {
                    println!("Expires {}.", time(Some(at), "-"));
                }
            }
        }
        KeyAction::List { org } => {
            let client = connect(&args.common, "key list").await?;
            let o = tenants::org_by_code(&client, &org).await?;
            let keys = tenants::list_keys(&client, &o).await?;
            tenants::audit_read(
                &client,
                Some(o.org_id),
                "dbx_aviation.api_keys",
                serde_json::json!({"command": "key list", "code": org}),
            )
            .await?;
            if json {
                print_json(&keys)?;
            } else {
                print_keys(&keys);
            }
        }
        KeyAction::Revoke { org, label } => {
            let mut client = connect(&args.common, "key revoke").await?;
            let revoked = tenants::revoke_key(&mut client, &org, &label).await?;
            if json {
                print_json(&revoked)?;
            } else {
                println!(
                    "Revoked key {:?} of {}: connections using it are closed within seconds.",
                    revoked.key.label, revoked.org
                );
                if revoked.active_keys_left == 0 {
                    println!(
                        "Warning: {} has no working key left; `dbx key create --org {}` makes one.",
                        revoked.org, revoked.org
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `dbx aircraft ...`.
pub async fn aircraft(config: Option<&Path>, mut args: AircraftArgs) -> anyhow::Result<ExitCode> {
    args.common.config = config.map(Path::to_path_buf);
    let json = args.common.json;
    match args.action {
        AircraftAction::Add {
            org,
            registration,
            aircraft_type,
            manufacturer,
            model,
        } => {
            tenants::validate_registration(&registration)?;
            let client = connect(&args.common, "aircraft add").await?;
            let a = tenants::add_aircraft(
                &client,
                &org,
                &NewAircraft {
                    registration,
                    aircraft_type,
                    manufacturer,
                    model,
                },
            )
            .await?;
            if json {
                print_json(&a)?;
            } else {
                println!(
                    "Registered {} ({}) for {org}, id {}.",
                    a.registration, a.aircraft_type, a.aircraft_id
                );
            }
        }
        AircraftAction::List { org } => {
            let client = connect(&args.common, "aircraft list").await?;
            let o = tenants::org_by_code(&client, &org).await?;
            let list = tenants::list_aircraft(&client, &o).await?;
            tenants::audit_read(
                &client,
                Some(o.org_id),
                "dbx_aviation.aircraft_registry",
                serde_json::json!({"command": "aircraft list", "code": org, "rows": list.len()}),
            )
            .await?;
            if json {
                print_json(&list)?;
            } else {
                print_aircraft(&list);
            }
        }
        AircraftAction::Retire { org, registration } => {
            tenants::validate_registration(&registration)?;
            let client = connect(&args.common, "aircraft retire").await?;
            let a = tenants::retire_aircraft(&client, &org, &registration).await?;
            if json {
                print_json(&a)?;
            } else {
                println!(
                    "Retired {} of {org}: its telemetry is refused from now on.",
                    a.registration
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `dbx analyses ...`.
pub async fn analyses(config: Option<&Path>, mut args: AnalysesArgs) -> anyhow::Result<ExitCode> {
    args.common.config = config.map(Path::to_path_buf);
    let json = args.common.json;
    match args.action {
        AnalysesAction::Search { org, text, limit } => {
            let client = connect(&args.common, "analyses search").await?;
            let o = tenants::org_by_code(&client, &org).await?;
            let hits = tenants::search_analyses(&client, &o, &text, limit).await?;
            tenants::audit_read(
                &client,
                Some(o.org_id),
                "dbx_aviation.ml_analysis_results",
                serde_json::json!({"command": "analyses search", "code": org, "query": text, "rows": hits.len()}),
            )
            .await?;
            if json {
                print_json(&hits)?;
            } else if hits.is_empty() {
                println!("No analysis of {org} matches {text:?}.");
            } else {
                for (i, h) in hits.iter().enumerate() {
                    println!(
                        "{}. {} rank {:.4}  risk {}  {}  model {}",
                        i + 1,
                        h.analysis_id,
                        h.rank,
                        h.risk_level.as_deref().unwrap_or("-"),
                        time(Some(h.analysis_timestamp), "-"),
                        h.model_version
                    );
                    println!("   {}", h.headline.replace('\n', " "));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
