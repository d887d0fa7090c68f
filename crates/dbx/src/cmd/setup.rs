//! `dbx setup`, `dbx check` and `dbx migrate`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use dbx_control::postgis::PostgisMode;
use dbx_control::{migrate, setup};
use dbx_pg::Connector;
use tokio_postgres::Config as PgConfig;

use crate::config::{self, Config, DatabaseConfig};

/// Flags of `dbx setup`.
#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Superuser connection URL; default built from DB_HOST, DB_PORT, DB_USER, DB_PASSWORD.
    #[arg(long, env = "DBX_SUPERUSER_URL")]
    superuser_url: Option<String>,
    /// Database to create and fill.
    #[arg(long, default_value = setup::DEFAULT_DATABASE)]
    database: String,
    /// Directory for credentials.txt and api_key.txt.
    #[arg(long, default_value = "./database")]
    out_dir: PathBuf,
    /// Make new passwords and a new API key even when the files exist.
    #[arg(long)]
    rotate: bool,
    /// Skip the sample organization and aircraft.
    #[arg(long)]
    no_sample_data: bool,
    /// PostGIS for the schema (geography endpoints on flight_sessions with GiST indexes):
    /// `auto` uses it when the server offers it, `require` fails without it, `off` never uses
    /// it. Chosen when the schema is created.
    #[arg(long, env = "DBX_POSTGIS", default_value_t = PostgisMode::Auto)]
    postgis: PostgisMode,
    /// Distribute the schema over a Citus cluster after the migrations: the server is the
    /// coordinator, with the citus extension in the database and at least one worker
    /// (docs/scaling.md). Idempotent; run it again after adding workers' tables by hand.
    #[arg(long, env = "DBX_SETUP_DISTRIBUTED")]
    distributed: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Flags of `dbx check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Connection URL; default DATABASE_URL, then the config's database.url.
    #[arg(long)]
    database_url: Option<String>,
    /// Also connect as every login user of this credentials.txt (written by `dbx setup`) and
    /// report how each connection is protected.
    #[arg(long)]
    credentials: Option<PathBuf>,
}

/// Flags of `dbx migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Connection URL of the database owner or a superuser; default DATABASE_URL.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// PostGIS for the schema, as for `dbx setup` (it matters when the schema is created).
    #[arg(long, env = "DBX_POSTGIS", default_value_t = PostgisMode::Auto)]
    postgis: PostgisMode,
    #[command(subcommand)]
    action: Option<MigrateAction>,
}

#[derive(Debug, Subcommand)]
enum MigrateAction {
    /// Apply pending migrations (the default).
    Apply,
    /// List migrations and whether each is applied.
    Status,
}

/// The `[database]` section of the config file and environment: its TLS keys
/// (`database.sslmode`, `sslrootcert`, `sslcert`, `sslkey`, `require_tls`) and timeout apply
/// to the URL of every command.
pub fn database_config(config_path: Option<&Path>) -> anyhow::Result<DatabaseConfig> {
    let cfg: Config = config::load(config_path)?;
    Ok(cfg.database)
}

/// A connector for `url`, named `from` in errors, with the `[database]` TLS keys.
pub fn connector(config_path: Option<&Path>, url: &str, from: &str) -> anyhow::Result<Connector> {
    Ok(database_config(config_path)?.connector(url, from)?)
}

/// The superuser connection from the flag or the seed's DB_* variables.
fn superuser(config_path: Option<&Path>, args: &SetupArgs) -> anyhow::Result<Connector> {
    let db = database_config(config_path)?;
    if let Some(url) = &args.superuser_url {
        return Ok(db.connector(url, "--superuser-url")?);
    }
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut cfg = PgConfig::new();
    cfg.host(var("DB_HOST").as_deref().unwrap_or("localhost"));
    let port = match var("DB_PORT") {
        Some(p) => p
            .parse::<u16>()
            .with_context(|| format!("DB_PORT must be a port number, not {p:?}"))?,
        None => 5432,
    };
    cfg.port(port);
    cfg.user(var("DB_USER").as_deref().unwrap_or("postgres"));
    if let Some(pw) = var("DB_PASSWORD") {
        cfg.password(pw);
    }
    cfg.dbname("postgres");
    Ok(db.connector_for(cfg, "DB_HOST/DB_PORT/DB_USER/DB_PASSWORD")?)
}

/// True when the configuration asks for columnar archives (`partitions.archive_access_method`),
/// which setup then prepares (`citus_columnar`).
fn columnar_archives(config_path: Option<&Path>) -> anyhow::Result<bool> {
    let cfg: Config = config::load(config_path)?;
    Ok(cfg.partitions.archive_access_method
        == dbx_control::partitions::ArchiveAccessMethod::Columnar)
}

/// `dbx setup`.
pub async fn setup(config_path: Option<&Path>, args: SetupArgs) -> anyhow::Result<ExitCode> {
    let opts = setup::SetupOptions {
        superuser: superuser(config_path, &args)?,
        database: args.database.clone(),
        out_dir: args.out_dir.clone(),
        rotate: args.rotate,
        sample_data: !args.no_sample_data,
        postgis: args.postgis,
        distributed: args.distributed,
        columnar: columnar_archives(config_path)?,
    };
    let report = setup::setup(&opts).await?;
    if args.json {
        let checklist: Vec<_> = report
            .checklist
            .iter()
            .map(|i| serde_json::json!({"item": i.label, "ok": i.ok, "detail": i.detail}))
            .collect();
        let out = serde_json::json!({
            "server_version": report.server_version,
            "created_database": report.created_database,
            "migrations_applied": report.migrations_applied,
            "postgis": report.postgis,
            "columnar": report.columnar,
            "distributed": report.distributed.as_ref().map(|d| serde_json::json!({
                "workers": d.workers,
                "placed": d.placed.iter().map(|(t, p)| format!("{t}: {p:?}")).collect::<Vec<_>>(),
                "already": d.already,
            })),
            "files": report.files,
            "checklist": checklist,
            "ok": report.all_ok(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("Setting up database {} ...", args.database);
        if report.created_database {
            println!("  created database {}", args.database);
        }
        for m in &report.migrations_applied {
            println!("  applied migration {m}");
        }
        if report.migrations_applied.is_empty() {
            println!("  migrations: up to date");
        }
        match report.columnar {
            Some(true) => println!("  created extension citus_columnar (columnar archives)"),
            Some(false) => println!("  columnar archives: citus_columnar present"),
            None => {}
        }
        if let Some(d) = &report.distributed {
            println!("  Citus workers: {}", d.workers.join(", "));
            for (table, placement) in &d.placed {
                println!("  distributed {table}: {placement:?}");
            }
            if !d.already.is_empty() {
                println!("  already distributed: {}", d.already.len());
            }
        }
        for f in &report.files {
            println!("  wrote {}", f.display());
        }
        println!();
        print!("{report}");
        if let Some(url) = report.url_of("dbx_ingest_service") {
            let redacted = redact(url);
            println!("\nNext: DATABASE_URL={redacted} dbx serve   (full URL in credentials.txt)");
        }
    }
    Ok(if report.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A URL with its password replaced, for printing.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn database_url(
    flag: Option<String>,
    config_path: Option<&Path>,
) -> anyhow::Result<(String, &'static str)> {
    if let Some(u) = flag {
        return Ok((u, "--database-url"));
    }
    let cfg: Config = config::load(config_path)?;
    Ok((cfg.database.url, "DATABASE_URL / database.url"))
}

/// `dbx check`.
pub async fn check(config_path: Option<&Path>, args: CheckArgs) -> anyhow::Result<ExitCode> {
    let (url, from) = database_url(args.database_url, config_path)?;
    let connector = connector(config_path, &url, from)?;
    let mut ok = match setup::check(&connector).await {
        Ok(report) => {
            println!("{report}");
            true
        }
        Err(e) => {
            println!("Testing database connection...");
            println!("❌ {e}");
            false
        }
    };
    if let Some(path) = &args.credentials {
        ok &= check_credentials(&connector, path).await?;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Connects as every `<user>_url` of a credentials file and prints how each connection is
/// protected; false when one cannot connect.
async fn check_credentials(base: &Connector, path: &Path) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--credentials {}", path.display()))?;
    let urls: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.split_once(" = "))
        .filter_map(|(k, v)| k.strip_suffix("_url").map(|user| (user, v.trim())))
        .collect();
    if urls.is_empty() {
        bail!(
            "--credentials {}: no `<user>_url = …` lines (is it dbx setup's credentials.txt?)",
            path.display()
        );
    }
    println!("\nConnection security per login user ({}):", path.display());
    let mut all = true;
    for (user, url) in urls {
        let origin = format!("{user}_url in {}", path.display());
        let result = async {
            let c = base.sibling(url, &origin)?;
            let client = setup::connect(&c).await?;
            Ok::<_, anyhow::Error>(setup::connection_security(&client, &c).await?)
        }
        .await;
        match result {
            Ok(s) => println!("   {s}"),
            Err(e) => {
                all = false;
                println!("   ❌ {user}: {e:#}");
            }
        }
    }
    Ok(all)
}

/// `dbx migrate`.
pub async fn migrate(config_path: Option<&Path>, args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let Some(url) = args.database_url else {
        bail!("no database: pass --database-url or set DATABASE_URL (the owner's or a superuser's URL)");
    };
    let connector = connector(config_path, &url, "--database-url")?;
    let mut client = setup::connect(&connector).await?;
    match args.action.unwrap_or(MigrateAction::Apply) {
        MigrateAction::Apply => {
            let applied = migrate::apply_with(&mut client, args.postgis).await?;
            if applied.is_empty() {
                println!(
                    "migrations: up to date ({} known)",
                    migrate::MIGRATIONS.len()
                );
            }
            for a in applied {
                println!(
                    "applied {:04}_{} in {} ms",
                    a.version,
                    a.name,
                    a.duration.as_millis()
                );
            }
            let postgis = dbx_control::postgis::PostgisState::read(&client).await?;
            println!("postgis: {}", postgis.describe(args.postgis));
        }
        MigrateAction::Status => {
            for s in migrate::status(&client).await? {
                let state = match s.state {
                    migrate::MigrationState::Applied {
                        applied_at,
                        checksum_matches: true,
                    } => {
                        format!("applied {applied_at}")
                    }
                    migrate::MigrationState::Applied {
                        applied_at,
                        checksum_matches: false,
                    } => {
                        format!("applied {applied_at}, CHANGED SINCE (checksum mismatch)")
                    }
                    migrate::MigrationState::Pending => "pending".into(),
                    migrate::MigrationState::UnknownToBinary { applied_at } => {
                        format!("applied {applied_at} by a newer dbx (unknown to this binary)")
                    }
                };
                println!("{:04}_{:<24} {state}", s.version, s.name);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("postgresql://u:secret@h:5432/db"),
            "postgresql://u:***@h:5432/db"
        );
        assert_eq!(redact("postgresql://u@h/db"), "postgresql://u@h/db");
    }
}
