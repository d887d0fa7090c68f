//! `dbx setup` and `dbx check`: the seed's `setup_database.py` and its connection
//! test, made idempotent and honest about what failed.
//!
//! Setup connects as a superuser (from `DB_HOST`/`DB_PORT`/`DB_USER`/`DB_PASSWORD`
//! or `--superuser-url`), creates the database when missing, applies the embedded
//! migrations, gives the login users random passwords, inserts the seed's sample
//! data (a test organization and a few aircraft) with an API key for it, writes
//! `credentials.txt` and `api_key.txt` (mode 0600), and reports the seed's success
//! checklist item by item, including which branch of the schema PostGIS gave
//! ([`SetupOptions::postgis`]: `off`, `auto` (the default) or `require`). Running it again
//! changes nothing: passwords and the key are read back from the files it wrote, unless
//! `rotate` asks for new ones.
//!
//! Passwords never travel in clear: setup computes each user's SCRAM-SHA-256 verifier
//! itself and sends only that (`ALTER ROLE … PASSWORD 'SCRAM-SHA-256$…'`), so neither the
//! statement text, the server log (even with `log_statement = all`) nor
//! pg_stat_statements ever holds a password. A password read back from `credentials.txt`
//! must be a plain token ([`plain_token_problem`]); anything else is refused naming the
//! file and the key, never the value.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use dbx_core::apikey::{key_hash_hex, new_api_key, random_token};
use dbx_pg::{Connector, PgError};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::citus;
use crate::migrate;
use crate::postgis::{PostgisMode, PostgisState};

mod checklist;

pub use checklist::ChecklistItem;

/// The database the seed names.
pub const DEFAULT_DATABASE: &str = "dbx_aviation";

/// The seven tables of the seed's connection test, in its order.
pub const EXPECTED_TABLES: [&str; 7] = [
    "dbx_aviation.organizations",
    "dbx_aviation.aircraft_registry",
    "dbx_aviation.flight_sessions",
    "dbx_aviation.flight_telemetry",
    "dbx_aviation.ml_analysis_results",
    "dbx_aviation.api_requests",
    "dbx_audit.audit_log",
];

/// The login users setup gives passwords to, with the group role each belongs to.
pub const LOGIN_USERS: [(&str, &str); 4] = [
    ("dbx_api_service", "dbx_app_write"),
    ("dbx_analytics_service", "dbx_app_read"),
    ("dbx_ingest_service", "dbx_ingest"),
    // The control plane's user (`[database] admin_url`): archival, retention, sweep.
    ("dbx_maintenance_service", "dbx_admin"),
];

/// The sample organization's code.
pub const SAMPLE_ORG_CODE: &str = "DBX-TEST";

/// The seed's troubleshooting hint for a server that cannot be reached.
const CONNECTION_HINT: &str =
    "check that PostgreSQL is running (`sudo systemctl status postgresql` \
     on Linux, `brew services list | grep postgres` on macOS) and listening on that host and port";

/// What can go wrong in setup or check. Each message names what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The connection settings themselves are malformed.
    #[error("invalid connection settings: {0}")]
    BadUrl(String),
    /// Nothing answers at host:port.
    #[error("cannot reach PostgreSQL at {host}:{port}: {reason}; {CONNECTION_HINT}")]
    Unreachable {
        /// Host we tried.
        host: String,
        /// Port we tried.
        port: u16,
        /// What the socket said.
        reason: String,
    },
    /// The connection settings, TLS or `require_tls` refused the connection (the message
    /// names the setting).
    #[error(transparent)]
    Connection(PgError),
    /// The server's pg_hba.conf refused the connection (e.g. plaintext to a TLS-only server).
    #[error("PostgreSQL at {host}:{port} refused the connection: {reason}; {hint}")]
    Refused {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// The server's message.
        reason: String,
        /// What to change.
        hint: String,
    },
    /// Wrong user or password.
    #[error(
        "authentication failed for user \"{user}\" at {host}:{port}: {reason} \
         (reset it as the postgres OS user: `sudo -u postgres psql -c \"ALTER USER {user} PASSWORD '...'\"`)"
    )]
    AuthFailed {
        /// The user.
        user: String,
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// The server's message.
        reason: String,
    },
    /// The role lacks a privilege setup needs.
    #[error("permission denied while {doing}: {reason} (the connecting role lacks a privilege; `\\du` in psql lists roles; setup needs a superuser or a role with CREATEDB and CREATEROLE)")]
    MissingPrivilege {
        /// The step.
        doing: String,
        /// The server's message.
        reason: String,
    },
    /// The database exists but is not ours.
    #[error(
        "database \"{database}\" exists but was not made by dbx (it has {tables} tables and no \
         dbx_aviation.schema_migrations); choose another name with --database or drop it"
    )]
    ForeignDatabase {
        /// The database name.
        database: String,
        /// How many user tables it has.
        tables: i64,
    },
    /// The database named by the URL does not exist.
    #[error(
        "database \"{0}\" does not exist; run `dbx setup` first (or `createdb -U postgres {0}`)"
    )]
    NoDatabase(String),
    /// A migration failed.
    #[error(transparent)]
    Migrate(#[from] migrate::MigrateError),
    /// `--distributed`: the cluster is not ready, or a distribution step failed.
    #[error(transparent)]
    Citus(#[from] citus::CitusError),
    /// Columnar archives asked for, but the server has no `citus_columnar` extension.
    #[error(
        "partitions.archive_access_method = \"columnar\" needs the citus_columnar extension, \
         which this server does not have (pg_available_extensions): install Citus 13 for this \
         PostgreSQL (it ships citus_columnar; no shared_preload_libraries needed for columnar \
         alone), then run `dbx setup` again or CREATE EXTENSION citus_columnar in the database \
         as a superuser; or set partitions.archive_access_method = \"heap\""
    )]
    NoColumnar,
    /// Tables of the schema are missing.
    #[error("{} of the 7 tables are missing: {}; run `dbx setup` (or `dbx migrate`)", .0.len(), .0.join(", "))]
    MissingTables(Vec<String>),
    /// Any other database error, with the step.
    #[error("{doing}: {reason}")]
    Db {
        /// The step.
        doing: String,
        /// The server's message.
        reason: String,
    },
    /// A value of credentials.txt is not a plain token (the value itself is never shown).
    #[error(
        "{path}: the value of {key} is not a plain token: {problem}; use {PLAIN_TOKEN_RULE}, \
         or delete the line (or run with --rotate) to have a new one generated"
    )]
    BadCredential {
        /// The file.
        path: PathBuf,
        /// The key whose value is refused.
        key: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// Writing the credential files failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Maps a tokio-postgres error of `doing` to a [`SetupError`] with the server's message
/// and SQLSTATE ([`dbx_pg::describe`]).
fn db_err(doing: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SetupError {
    let doing = doing.into();
    move |e| {
        if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
            SetupError::MissingPrivilege {
                doing,
                reason: dbx_pg::describe(&e),
            }
        } else {
            SetupError::Db {
                doing,
                reason: dbx_pg::describe(&e),
            }
        }
    }
}

/// Connects with `connector`, classifying failures into the errors above.
pub async fn connect(connector: &Connector) -> Result<Client, SetupError> {
    connector
        .connect()
        .await
        .map_err(|e| classify(connector, e))
}

fn classify(connector: &Connector, e: PgError) -> SetupError {
    let Some(pg) = e.pg_error() else {
        return SetupError::Connection(e);
    };
    let (host, port) = (connector.host(), connector.port());
    let user = connector.pg_config().get_user().unwrap_or("").to_string();
    let reason = dbx_pg::describe(pg);
    match pg.code() {
        Some(c)
            if *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                && (reason.contains("pg_hba.conf") || reason.contains("client certificate")) =>
        {
            let hint = hba_hint(&reason);
            SetupError::Refused {
                host,
                port,
                reason,
                hint,
            }
        }
        Some(c)
            if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            SetupError::AuthFailed {
                user,
                host,
                port,
                reason,
            }
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => {
            SetupError::NoDatabase(connector.pg_config().get_dbname().unwrap_or("").to_string())
        }
        Some(_) => SetupError::Db {
            doing: format!("connecting to {host}:{port}"),
            reason,
        },
        // Password-less connection attempts to a password-protected server surface as a
        // client-side "password missing" error; that is an auth failure too.
        None if reason.contains("password") => SetupError::AuthFailed {
            user,
            host,
            port,
            reason,
        },
        None => SetupError::Unreachable { host, port, reason },
    }
}

/// What to do about a pg_hba.conf refusal, from PostgreSQL's own words.
fn hba_hint(reason: &str) -> String {
    if reason.contains("client certificate") {
        "this user authenticates with a client certificate (`cert` in pg_hba.conf): set sslcert \
         and sslkey"
            .into()
    } else if reason.contains("no encryption") {
        "the server accepts this connection only over TLS: set sslmode=verify-full (with \
         sslrootcert) or at least sslmode=require"
            .into()
    } else {
        "the server's pg_hba.conf has no line that lets this user reach this database from \
         here"
            .into()
    }
}

/// Where setup connects and what it writes.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// A superuser connection to the server (any database; we switch to ours), with the TLS
    /// settings every connection of setup uses.
    pub superuser: Connector,
    /// The database to create and fill (default `dbx_aviation`).
    pub database: String,
    /// Where `credentials.txt` and `api_key.txt` go.
    pub out_dir: PathBuf,
    /// Make new passwords and a new API key even when the files exist.
    pub rotate: bool,
    /// Insert the seed's sample organization and aircraft.
    pub sample_data: bool,
    /// Whether the schema uses PostGIS (geography endpoints on flight_sessions).
    pub postgis: PostgisMode,
    /// Distribute the schema over a Citus cluster after the migrations (`--distributed`): the
    /// server is its coordinator, with the `citus` extension and at least one worker
    /// ([`crate::citus`]).
    pub distributed: bool,
    /// The configuration asks for columnar archives (`partitions.archive_access_method =
    /// "columnar"`): create the `citus_columnar` extension, or fail saying how to get it.
    pub columnar: bool,
}

/// What setup did.
#[derive(Debug, Clone)]
pub struct SetupReport {
    /// The server's version string.
    pub server_version: String,
    /// True when setup created the database in this run.
    pub created_database: bool,
    /// Migrations applied in this run.
    pub migrations_applied: Vec<String>,
    /// Which branch of the schema PostGIS gave, in words.
    pub postgis: String,
    /// What the distribution step did (`--distributed`), `None` on a single node.
    pub distributed: Option<citus::DistributeReport>,
    /// The columnar access method, when asked for ([`SetupOptions::columnar`]): `Some(true)`
    /// when this run created `citus_columnar`, `Some(false)` when it was there already.
    pub columnar: Option<bool>,
    /// Login user → password in effect.
    pub passwords: Vec<(String, String)>,
    /// The sample organization's API key, when sample data was asked for.
    pub api_key: Option<String>,
    /// URLs for each login user.
    pub urls: Vec<(String, String)>,
    /// The seed's checklist.
    pub checklist: Vec<ChecklistItem>,
    /// Files written.
    pub files: Vec<PathBuf>,
}

impl SetupReport {
    /// True when no checklist item failed.
    pub fn all_ok(&self) -> bool {
        self.checklist.iter().all(|i| i.ok != Some(false))
    }

    /// The URL of one login user.
    pub fn url_of(&self, user: &str) -> Option<&str> {
        self.urls
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, url)| url.as_str())
    }
}

impl fmt::Display for SetupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "🎉 Success Checklist")?;
        for item in &self.checklist {
            let mark = match item.ok {
                Some(true) => "[x]",
                Some(false) => "[!]",
                None => "[-]",
            };
            writeln!(f, "  {mark} {} — {}", item.label, item.detail)?;
        }
        Ok(())
    }
}

/// Runs the whole setup: provisions the database (see the module doc), then verifies the
/// result item by item ([`checklist`]).
pub async fn setup(opts: &SetupOptions) -> Result<SetupReport, SetupError> {
    validate_database_name(&opts.database)?;
    let (server_version, existed) = ensure_database(opts).await?;
    let mut client = connect_to_database(opts, existed).await?;
    if opts.distributed {
        // Refused before any migration when the cluster is not ready for it.
        citus::preflight(&client).await?;
    }
    let applied = migrate::apply_with(&mut client, opts.postgis).await?;
    let distributed = if opts.distributed {
        Some(citus::distribute(&client).await?)
    } else {
        None
    };
    let columnar = if opts.columnar {
        Some(ensure_columnar(&client).await?)
    } else {
        None
    };
    let postgis = PostgisState::read(&client)
        .await
        .map_err(db_err("reading the PostGIS state"))?;
    let passwords = login_passwords(&client, &opts.out_dir, opts.rotate, opts.distributed).await?;
    let api_key = if opts.sample_data {
        Some(sample_data(&client, &opts.out_dir, opts.rotate).await?)
    } else {
        None
    };
    let urls = login_urls(&opts.superuser, &opts.database, &passwords);
    let files = write_files(&opts.out_dir, &urls, api_key.as_deref())?;
    let provisioned = checklist::Provisioned {
        server_version: &server_version,
        existed,
        migrations_applied: applied.len(),
        postgis: &postgis,
        urls: &urls,
        files: &files,
    };
    let checklist = checklist::verify(&client, opts, &provisioned).await?;
    Ok(SetupReport {
        created_database: !existed,
        migrations_applied: applied.iter().map(describe_applied).collect(),
        postgis: postgis.describe(opts.postgis),
        server_version,
        distributed,
        columnar,
        passwords,
        api_key,
        urls,
        checklist,
        files,
    })
}

/// Creates `citus_columnar` in the database when missing (on a Citus coordinator `CREATE
/// EXTENSION citus` has made it already); `Ok(true)` when created now. The columnar access
/// method needs no `shared_preload_libraries`: its library loads on first use.
async fn ensure_columnar(client: &Client) -> Result<bool, SetupError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_am WHERE amname = 'columnar'), \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_available_extensions \
                             WHERE name = 'citus_columnar')",
            &[],
        )
        .await
        .map_err(db_err("looking for the columnar access method"))?;
    let (present, available): (bool, bool) = (row.get(0), row.get(1));
    if present {
        return Ok(false);
    }
    if !available {
        return Err(SetupError::NoColumnar);
    }
    client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS citus_columnar")
        .await
        .map_err(db_err("CREATE EXTENSION citus_columnar"))?;
    Ok(true)
}

/// A database name PostgreSQL accepts and that we can quote with `"…"` as it is.
fn validate_database_name(db: &str) -> Result<(), SetupError> {
    if db.is_empty() || db.len() > 63 || db.contains('"') || db.contains('\0') {
        return Err(SetupError::BadUrl(format!("invalid database name {db:?}")));
    }
    Ok(())
}

/// Creates the database when it is missing, from the server's maintenance database.
/// Returns the server's version string and whether the database existed before.
async fn ensure_database(opts: &SetupOptions) -> Result<(String, bool), SetupError> {
    let db = &opts.database;
    let mut maint_cfg = opts.superuser.clone();
    let dbname = maint_cfg.pg_config().get_dbname();
    if dbname.is_none() || dbname == Some(db.as_str()) {
        maint_cfg.pg_config_mut().dbname("postgres");
    }
    let maint = connect(&maint_cfg).await?;
    let server_version: String = maint
        .query_one("SELECT version()", &[])
        .await
        .map_err(db_err("reading the server version"))?
        .get(0);
    let exists = maint
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[db])
        .await
        .map_err(db_err("looking for the database"))?
        .is_some();
    if !exists {
        maint
            .batch_execute(&format!(
                "CREATE DATABASE \"{db}\" WITH ENCODING 'UTF8' TEMPLATE template0"
            ))
            .await
            .map_err(db_err(format!("creating database {db}")))?;
    }
    Ok((server_version, exists))
}

/// The superuser's connection to our database; one that `existed` before must be ours
/// ([`refuse_foreign_database`]).
async fn connect_to_database(opts: &SetupOptions, existed: bool) -> Result<Client, SetupError> {
    let mut cfg = opts.superuser.clone();
    cfg.pg_config_mut().dbname(&opts.database);
    let client = connect(&cfg).await?;
    if existed {
        refuse_foreign_database(&client, &opts.database).await?;
    }
    Ok(client)
}

/// `0001_roles_schemas (12 ms)`.
fn describe_applied(a: &migrate::Applied) -> String {
    format!(
        "{:04}_{} ({} ms)",
        a.version,
        a.name,
        a.duration.as_millis()
    )
}

/// The URL of each login user: the superuser's host and port, and the `sslmode` and
/// `sslrootcert` its URL gave (so that the written URLs connect the way setup did).
fn login_urls(
    superuser: &Connector,
    db: &str,
    passwords: &[(String, String)],
) -> Vec<(String, String)> {
    let (host, port) = (superuser.host(), superuser.port());
    let tls = superuser.url_tls_query();
    passwords
        .iter()
        .map(|(user, pw)| {
            let mut url = dbx_pg::params::url(user, pw, &host, port, db);
            if !tls.is_empty() {
                url.push('?');
                url.push_str(&tls);
            }
            (user.clone(), url)
        })
        .collect()
}

/// A database that has tables but no migrations table was made by something else. Tables
/// of extensions (PostGIS's `spatial_ref_sys`, from a template database) do not count.
async fn refuse_foreign_database(client: &Client, db: &str) -> Result<(), SetupError> {
    let row = client
        .query_one(
            "SELECT to_regclass('dbx_aviation.schema_migrations') IS NOT NULL, \
             (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.relkind IN ('r','p') AND n.nspname NOT IN ('pg_catalog','information_schema') \
              AND n.nspname NOT LIKE 'pg_toast%' \
              AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                              AND d.objid = c.oid AND d.deptype = 'e'))",
            &[],
        )
        .await
        .map_err(db_err("inspecting the existing database"))?;
    let ours: bool = row.get(0);
    let tables: i64 = row.get(1);
    if !ours && tables > 0 {
        return Err(SetupError::ForeignDatabase {
            database: db.to_string(),
            tables,
        });
    }
    Ok(())
}

/// Reads `key = value` lines written by an earlier run.
fn read_kv(path: &Path) -> Vec<(String, String)> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Shortest and longest password setup accepts from credentials.txt.
const PLAIN_TOKEN_LEN: std::ops::RangeInclusive<usize> = 16..=128;
/// What a plain token is, for error messages.
const PLAIN_TOKEN_RULE: &str = "16 to 128 ASCII letters, digits, '-', '_', '.' or '~'";

/// Why `value` is not a plain token (16 to 128 ASCII letters, digits, `-`, `_`, `.`, `~`:
/// nothing a URL, a shell or SQL would need to escape), or `None` when it is one. The
/// reason never quotes the value.
pub fn plain_token_problem(value: &str) -> Option<&'static str> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~');
    if value.is_empty() {
        Some("it is empty")
    } else if !value.is_ascii() {
        Some("it contains non-ASCII characters")
    } else if value.chars().any(|c| c.is_ascii_whitespace()) {
        Some("it contains whitespace")
    } else if value.chars().any(|c| matches!(c, '\'' | '"' | '`' | '\\')) {
        Some("it contains a quote or a backslash")
    } else if !value.chars().all(plain) {
        Some("it contains punctuation or control characters")
    } else if value.len() > *PLAIN_TOKEN_LEN.end() {
        Some("it is longer than 128 characters")
    } else if value.len() < *PLAIN_TOKEN_LEN.start() {
        Some("it is shorter than 16 characters")
    } else {
        None
    }
}

/// Passwords for the login users: kept from credentials.txt unless rotating. Each is
/// sent as a SCRAM-SHA-256 verifier computed here, never in clear. On Citus (`distributed`)
/// each worker gets it too, so daemons may log in to any node: Citus forwards `ALTER ROLE`
/// only for roles this database created itself.
async fn login_passwords(
    client: &Client,
    out_dir: &Path,
    rotate: bool,
    distributed: bool,
) -> Result<Vec<(String, String)>, SetupError> {
    let path = out_dir.join("credentials.txt");
    let previous = read_kv(&path);
    // Every kept value is checked before any role is touched.
    let mut out = Vec::new();
    for (user, _) in LOGIN_USERS {
        let key = format!("{user}_password");
        let kept = previous
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
            .filter(|_| !rotate);
        if let Some(problem) = kept.as_deref().and_then(plain_token_problem) {
            return Err(SetupError::BadCredential { path, key, problem });
        }
        out.push((user.to_string(), kept.unwrap_or_else(|| random_token(32))));
    }
    for (user, pw) in &out {
        // The verifier's alphabet (digits, base64, `$`, `:`, `-`) needs no SQL escaping.
        let verifier = postgres_protocol::password::scram_sha_256(pw.as_bytes());
        let alter = format!("ALTER ROLE {user} WITH LOGIN PASSWORD '{verifier}'");
        client
            .batch_execute(&alter)
            .await
            .map_err(db_err(format!("setting the password of {user}")))?;
        if distributed {
            citus::on_every_worker(client, &alter).await?;
        }
    }
    Ok(out)
}

/// The seed's sample data: a test organization and a few aircraft, and its key.
async fn sample_data(client: &Client, out_dir: &Path, rotate: bool) -> Result<String, SetupError> {
    let previous = fs::read_to_string(out_dir.join("api_key.txt"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("dbx_"))
                .map(str::to_string)
        })
        .filter(|_| !rotate);
    let existing: Option<String> = client
        .query_opt(
            "SELECT api_key_hash FROM dbx_aviation.organizations WHERE org_code = $1",
            &[&SAMPLE_ORG_CODE],
        )
        .await
        .map_err(db_err("reading the sample organization"))?
        .map(|r| r.get(0));
    let key = match (previous, &existing) {
        (Some(k), Some(h)) if key_hash_hex(&k) == *h => k,
        _ => new_api_key(),
    };
    let hash = key_hash_hex(&key);
    client
        .execute(
            "INSERT INTO dbx_aviation.organizations \
               (org_code, org_name, org_type, subscription_tier, api_key_hash, compliance_level) \
             VALUES ($1, 'DBX Test Organization', 'drone_operator', 'enterprise', $2, 'standard') \
             ON CONFLICT (org_code) DO UPDATE SET api_key_hash = EXCLUDED.api_key_hash \
             WHERE organizations.api_key_hash IS DISTINCT FROM EXCLUDED.api_key_hash",
            &[&SAMPLE_ORG_CODE, &hash],
        )
        .await
        .map_err(db_err("inserting the sample organization"))?;
    // On Citus the primary-key mirror is this call, not a trigger (migration 0041).
    client
        .execute("SELECT dbx_aviation.sync_primary_api_keys()", &[])
        .await
        .map_err(db_err("mirroring the sample organization's key"))?;
    client
        .execute(
            "INSERT INTO dbx_aviation.aircraft_registry \
               (org_id, registration_number, aircraft_type, manufacturer, model, next_maintenance_date) \
             SELECT o.org_id, a.reg, a.typ, a.mfr, a.model, CURRENT_DATE + a.due \
             FROM dbx_aviation.organizations o, (VALUES \
               ('N101DX', 'quadcopter', 'DBX Aerospace', 'Q-4 Surveyor', 45), \
               ('N102DX', 'quadcopter', 'DBX Aerospace', 'Q-4 Surveyor', 12), \
               ('N201DX', 'fixed_wing', 'DBX Aerospace', 'FW-2 Courier', 90), \
               ('N301DX', 'vtol', 'DBX Aerospace', 'V-3 Hybrid', 5) \
             ) AS a(reg, typ, mfr, model, due) \
             WHERE o.org_code = $1 \
             ON CONFLICT DO NOTHING",
            &[&SAMPLE_ORG_CODE],
        )
        .await
        .map_err(db_err("inserting the sample aircraft"))?;
    Ok(key)
}

fn write_private(path: &Path, contents: &str) -> Result<(), SetupError> {
    let io = |source| SetupError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    // An older file keeps its mode on open; tighten it explicitly.
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)
}

fn write_files(
    out_dir: &Path,
    urls: &[(String, String)],
    api_key: Option<&str>,
) -> Result<Vec<PathBuf>, SetupError> {
    fs::create_dir_all(out_dir).map_err(|source| SetupError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let mut creds =
        String::from("# dbx application users (written by `dbx setup`; keep this file secret)\n");
    for (user, url) in urls {
        let pw = dbx_pg::params::split(url)
            .ok()
            .and_then(|s| s.rest.parse::<tokio_postgres::Config>().ok())
            .and_then(|c| {
                c.get_password()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
            })
            .unwrap_or_default();
        creds.push_str(&format!("{user}_password = {pw}\n{user}_url = {url}\n"));
    }
    let creds_path = out_dir.join("credentials.txt");
    write_private(&creds_path, &creds)?;
    let mut files = vec![creds_path];
    if let Some(key) = api_key {
        let path = out_dir.join("api_key.txt");
        write_private(
            &path,
            &format!("# API key of organization {SAMPLE_ORG_CODE} (only its SHA-256 is in the database)\n{key}\n"),
        )?;
        files.push(path);
    }
    Ok(files)
}

/// The seven expected tables that are not there. Asked of the catalog, which every
/// role may read, so that a role without USAGE on a schema still sees what exists.
pub async fn missing_tables(client: &Client) -> Result<Vec<String>, SetupError> {
    let wanted: Vec<String> = EXPECTED_TABLES.iter().map(|s| s.to_string()).collect();
    let present: Vec<String> = client
        .query(
            "SELECT n.nspname || '.' || c.relname FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND n.nspname || '.' || c.relname = ANY($1)",
            &[&wanted],
        )
        .await
        .map_err(db_err("looking up tables"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(wanted
        .into_iter()
        .filter(|t| !present.contains(t))
        .collect())
}

/// How one connection is protected: the server's view (`pg_stat_ssl`) and what the client
/// verified of the server's certificate (from the sslmode in force).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Security {
    /// The user connected.
    pub user: String,
    /// Host of the connection string.
    pub host: String,
    /// Port.
    pub port: u16,
    /// `pg_stat_ssl.ssl`.
    pub encrypted: bool,
    /// `pg_stat_ssl.version`, e.g. `TLSv1.3`.
    pub tls_version: Option<String>,
    /// `pg_stat_ssl.cipher`.
    pub cipher: Option<String>,
    /// `pg_stat_ssl.bits`.
    pub bits: Option<i32>,
    /// `pg_stat_ssl.client_dn`: the client certificate's subject, when one was sent.
    pub client_dn: Option<String>,
    /// The sslmode in force.
    pub sslmode: String,
    /// What was verified of the server's certificate.
    pub verification: dbx_pg::Verification,
    /// The same, in a sentence.
    pub verified: String,
}

impl Security {
    /// One line: encryption, protocol, cipher, and what was verified.
    pub fn summary(&self) -> String {
        if !self.encrypted {
            return format!(
                "NOT encrypted: plaintext connection (sslmode={})",
                self.sslmode
            );
        }
        let mut s = format!(
            "encrypted, {} {}",
            self.tls_version.as_deref().unwrap_or("TLS"),
            self.cipher.as_deref().unwrap_or("")
        );
        if let Some(bits) = self.bits {
            s.push_str(&format!(" ({bits} bits)"));
        }
        s.push_str(&format!("; server certificate {}", self.verified));
        if let Some(dn) = self.client_dn.as_deref().filter(|d| !d.is_empty()) {
            s.push_str(&format!("; client certificate {dn}"));
        }
        s
    }
}

impl fmt::Display for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = if self.encrypted { "🔒" } else { "⚠️ " };
        write!(
            f,
            "{mark} {}@{}:{}: {}",
            self.user,
            self.host,
            self.port,
            self.summary()
        )
    }
}

/// How `client`, connected with `connector`, is protected.
pub async fn connection_security(
    client: &Client,
    connector: &Connector,
) -> Result<Security, SetupError> {
    let row = client
        .query_one(
            "SELECT current_user::text, s.ssl, s.version, s.cipher, s.bits, s.client_dn \
             FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(db_err("reading pg_stat_ssl"))?;
    let encrypted: bool = row.get(1);
    let policy = connector.policy();
    Ok(Security {
        user: row.get(0),
        host: connector.host(),
        port: connector.port(),
        encrypted,
        tls_version: row.get(2),
        cipher: row.get(3),
        bits: row.get(4),
        client_dn: row.get(5),
        sslmode: policy.mode.to_string(),
        verification: if encrypted {
            policy.verification()
        } else {
            dbx_pg::Verification::None
        },
        verified: policy.describe_verification(),
    })
}

/// What `dbx check` found.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// `PostgreSQL 15.x` as the seed prints it.
    pub version: String,
    /// The seven tables, all present.
    pub tables: Vec<String>,
    /// Migrations applied / known to this binary; `None` when this role may not read them.
    pub migrations: Option<(usize, usize)>,
    /// How the connection is protected.
    pub security: Security,
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Testing database connection...")?;
        writeln!(f, "✅ Database connection successful!")?;
        writeln!(f, "📊 Database version: {}", self.version)?;
        writeln!(f, "{}", self.security)?;
        writeln!(f, "📋 Found {} tables:", self.tables.len())?;
        for t in &self.tables {
            writeln!(f, "   - {t}")?;
        }
        match self.migrations {
            Some((applied, known)) => write!(f, "🗂  Migrations: {applied} of {known} applied"),
            None => write!(f, "🗂  Migrations: not readable by this role"),
        }
    }
}

/// The seed's connection test: version and the seven tables (an error when any is missing),
/// and how the connection is protected.
pub async fn check(connector: &Connector) -> Result<CheckReport, SetupError> {
    let client = connect(connector).await?;
    let full: String = client
        .query_one("SELECT version()", &[])
        .await
        .map_err(db_err("reading the server version"))?
        .get(0);
    // "PostgreSQL 15.18 (Debian ...) on x86_64..." → "PostgreSQL 15.18"
    let version = full
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let security = connection_security(&client, connector).await?;
    let missing = missing_tables(&client).await?;
    if !missing.is_empty() {
        return Err(SetupError::MissingTables(missing));
    }
    let applied = match client
        .query_one("SELECT count(*) FROM dbx_aviation.schema_migrations", &[])
        .await
    {
        Ok(row) => Some((row.get::<_, i64>(0) as usize, migrate::MIGRATIONS.len())),
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => None,
        Err(e) => return Err(db_err("reading dbx_aviation.schema_migrations")(e)),
    };
    Ok(CheckReport {
        version,
        tables: EXPECTED_TABLES.iter().map(|s| s.to_string()).collect(),
        migrations: applied,
        security,
    })
}

#[cfg(test)]
mod tests {
    use super::plain_token_problem;

    #[test]
    fn only_plain_tokens_are_accepted_and_the_reason_never_quotes_the_value() {
        assert_eq!(plain_token_problem("Abcdefgh12345678"), None);
        assert_eq!(plain_token_problem(&"a".repeat(128)), None);
        assert_eq!(plain_token_problem("a-b_c.d~e0123456789"), None);
        for (bad, why) in [
            ("", "empty"),
            ("secretsecret';DROP_ROLE_x;--", "quote"),
            ("secret\"secretsecret", "quote"),
            ("secretsecret\\secret", "backslash"),
            ("secret secretsecret", "whitespace"),
            ("secret\tsecretsecret", "whitespace"),
            ("sécretsecretsecret", "non-ASCII"),
            ("secret$secretsecret", "punctuation"),
            ("secret\u{7}secretsecret", "control"),
            ("abc123", "shorter than 16"),
        ] {
            let p = plain_token_problem(bad).unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(p.contains(why), "{bad:?}: {p}");
            assert!(bad.is_empty() || !p.contains(bad), "{p}");
        }
        assert!(plain_token_problem(&"a".repeat(129))
            .unwrap()
            .contains("longer than 128"));
    }
}
