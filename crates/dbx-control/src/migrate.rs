//! Versioned SQL migrations embedded in the binary, and the runner that applies them.
//!
//! The whole database of docs/schema.md lives in `crates/dbx-control/migrations/NNNN_<name>.sql`,
//! compiled in with `include_str!` and listed in [`MIGRATIONS`] in version order. [`apply`]
//! records each applied migration in `dbx_aviation.schema_migrations` with the sha256 of its
//! SQL, applies the pending ones each in its own transaction, and refuses to go on when an
//! applied migration was edited afterwards or the database is newer than the binary.
//! Every transaction of the runner holds the same transaction-level advisory lock, so two
//! daemons starting at once against one database serialize instead of racing. [`status`]
//! reports, read-only, which migrations are applied and which are pending. [`apply_with`]
//! takes the operator's PostGIS choice, which the runner enforces around the migrations that
//! predate it ([`crate::postgis`]).
//!
//! The runner must connect as a superuser: the first migration creates cluster-wide roles (one
//! with BYPASSRLS) and extensions. Later migrations `SET LOCAL ROLE dbx_admin` so that every
//! object ends up owned by `dbx_admin`; the runner resets the role before recording.

use std::fmt;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::postgis::{self, PostgisError, PostgisMode, PostgisState};

/// One embedded migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Version, unique and increasing; the `NNNN` of the file name.
    pub version: i32,
    /// Short name, the `<name>` of the file name.
    pub name: &'static str,
    /// The SQL, run as one batch inside one transaction.
    pub sql: &'static str,
}

impl Migration {
    /// Hex sha256 of [`Migration::sql`], as recorded in `schema_migrations.checksum`.
    pub fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }
}

impl fmt::Display for Migration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04} ({})", self.version, self.name)
    }
}

/// Every migration of the schema, in the order they are applied.
pub static MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "roles_schemas",
        sql: include_str!("../migrations/0001_roles_schemas.sql"),
    },
    Migration {
        version: 2,
        name: "tables",
        sql: include_str!("../migrations/0002_tables.sql"),
    },
    Migration {
        version: 3,
        name: "telemetry",
        sql: include_str!("../migrations/0003_telemetry.sql"),
    },
    Migration {
        version: 4,
        name: "security",
        sql: include_str!("../migrations/0004_security.sql"),
    },
    Migration {
        version: 5,
        name: "analytics",
        sql: include_str!("../migrations/0005_analytics.sql"),
    },
    Migration {
        version: 6,
        name: "monitoring",
        sql: include_str!("../migrations/0006_monitoring.sql"),
    },
    Migration {
        version: 7,
        name: "lifecycle",
        sql: include_str!("../migrations/0007_lifecycle.sql"),
    },
    Migration {
        version: 8,
        name: "listener",
        sql: include_str!("../migrations/0008_listener.sql"),
    },
    Migration {
        version: 9,
        name: "maintenance",
        sql: include_str!("../migrations/0009_maintenance.sql"),
    },
    Migration {
        version: 20,
        name: "tenants",
        sql: include_str!("../migrations/0020_tenants.sql"),
    },
    Migration {
        version: 31,
        name: "request_log",
        sql: include_str!("../migrations/0031_request_log.sql"),
    },
    Migration {
        version: 32,
        name: "org_context",
        sql: include_str!("../migrations/0032_org_context.sql"),
    },
    Migration {
        version: 33,
        name: "key_grants",
        sql: include_str!("../migrations/0033_key_grants.sql"),
    },
    Migration {
        version: 40,
        name: "sessions",
        sql: include_str!("../migrations/0040_sessions.sql"),
    },
    Migration {
        version: 41,
        name: "citus_triggers",
        sql: include_str!("../migrations/0041_citus_triggers.sql"),
    },
    Migration {
        version: 42,
        name: "citus_gdpr",
        sql: include_str!("../migrations/0042_citus_gdpr.sql"),
    },
    Migration {
        version: 43,
        name: "citus_analytics",
        sql: include_str!("../migrations/0043_citus_analytics.sql"),
    },
    Migration {
        version: 44,
        name: "citus_idle_sessions",
        sql: include_str!("../migrations/0044_citus_idle_sessions.sql"),
    },
    Migration {
        version: 45,
        name: "incremental_upkeep",
        sql: include_str!("../migrations/0045_incremental_upkeep.sql"),
    },
    Migration {
        version: 46,
        name: "columnar_retention",
        sql: include_str!("../migrations/0046_columnar_retention.sql"),
    },
    Migration {
        version: 47,
        name: "hot_session_updates",
        sql: include_str!("../migrations/0047_hot_session_updates.sql"),
    },
];

/// Key of the transaction-level advisory lock every runner transaction takes (ASCII "dbx_mig").
/// Advisory locks are per database, so runners on different databases never wait on each other.
const MIGRATION_LOCK_KEY: i64 = 0x0064_6278_5f6d_6967;

/// Creates the bookkeeping table. Idempotent; run under the advisory lock because concurrent
/// `CREATE ... IF NOT EXISTS` can still collide in the catalogs.
const BOOTSTRAP_SQL: &str = "
    CREATE SCHEMA IF NOT EXISTS dbx_aviation;
    CREATE TABLE IF NOT EXISTS dbx_aviation.schema_migrations (
        version    integer PRIMARY KEY,
        name       text NOT NULL,
        checksum   text NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now()
    );
    COMMENT ON TABLE dbx_aviation.schema_migrations IS
        'dbx schema migrations applied to this database; checksum = hex sha256 of the migration SQL';
";

/// A PostgreSQL error with its SQLSTATE, message, detail, hint and position kept readable.
#[derive(Debug)]
pub struct PgError {
    /// The SQLSTATE code (`None` for I/O and protocol errors, which have none).
    pub sqlstate: Option<String>,
    /// The server's message with detail, hint and context, or the client's error text.
    pub message: String,
    source: tokio_postgres::Error,
}

impl PgError {
    /// The underlying driver error.
    pub fn inner(&self) -> &tokio_postgres::Error {
        &self.source
    }

    /// The SQLSTATE as the driver's type, when the server sent one.
    pub fn code(&self) -> Option<&SqlState> {
        self.source.code()
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(source: tokio_postgres::Error) -> Self {
        let (sqlstate, message) = match source.as_db_error() {
            Some(db) => {
                let mut msg = format!("{}: {}", db.severity(), db.message());
                if let Some(detail) = db.detail() {
                    msg.push_str(&format!("; DETAIL: {detail}"));
                }
                if let Some(hint) = db.hint() {
                    msg.push_str(&format!("; HINT: {hint}"));
                }
                if let Some(context) = db.where_() {
                    msg.push_str(&format!("; CONTEXT: {}", context.replace('\n', " / ")));
                }
                (Some(db.code().code().to_owned()), msg)
            }
            None => (
                source.code().map(|c| c.code().to_owned()),
                source.to_string(),
            ),
        };
        PgError {
            sqlstate,
            message,
            source,
        }
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.sqlstate {
            Some(code) => write!(f, "[SQLSTATE {code}] {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Why migrating (or reading the migration status) failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// An applied migration's recorded checksum differs from the SQL embedded in this binary.
    #[error(
        "migration {version:04} ({name}) was changed after it was applied: the checksum recorded in \
         dbx_aviation.schema_migrations differs from the SQL embedded in this binary; restore the \
         original migration and put the change in a new one"
    )]
    ChecksumMismatch {
        /// Version of the changed migration.
        version: i32,
        /// Name of the changed migration.
        name: String,
    },
    /// The database has a migration applied that this binary does not know.
    #[error(
        "the database has migration {version:04} ({name}) applied, but this binary only knows \
         migrations up to {latest_known:04}: the database was migrated by a newer dbx; upgrade dbx"
    )]
    DatabaseNewer {
        /// Version recorded in the database.
        version: i32,
        /// Name recorded in the database.
        name: String,
        /// The newest version embedded in this binary.
        latest_known: i32,
    },
    /// A migration's SQL failed; its transaction was rolled back, nothing of it remains.
    #[error("migration {version:04} ({name}) failed and was rolled back: {source}")]
    Failed {
        /// Version of the failing migration.
        version: i32,
        /// Name of the failing migration.
        name: String,
        /// The database error.
        #[source]
        source: PgError,
    },
    /// The PostGIS choice cannot be honoured here; nothing was applied.
    #[error(transparent)]
    Postgis(#[from] PostgisError),
    /// Any other database error (connection, bookkeeping table, lock).
    #[error("database error while migrating: {0}")]
    Postgres(#[from] PgError),
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        MigrateError::Postgres(PgError::from(e))
    }
}

/// A migration applied by one call of [`apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Its version.
    pub version: i32,
    /// Its name.
    pub name: &'static str,
    /// How long its transaction took.
    pub duration: Duration,
}

/// Where one migration stands in a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationState {
    /// Applied at `applied_at`; `checksum_matches` is false when the file changed since.
    Applied {
        /// When it was applied.
        applied_at: DateTime<Utc>,
        /// Whether the recorded checksum equals the embedded SQL's.
        checksum_matches: bool,
    },
    /// Not applied yet.
    Pending,
    /// Recorded in the database but not embedded in this binary (a newer dbx applied it).
    UnknownToBinary {
        /// When it was applied.
        applied_at: DateTime<Utc>,
    },
}

/// One line of [`status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// Version.
    pub version: i32,
    /// Name (the database's record for migrations unknown to this binary).
    pub name: String,
    /// Applied, pending, or unknown to this binary.
    pub state: MigrationState,
}

/// A row of `schema_migrations`.
struct Recorded {
    version: i32,
    name: String,
    checksum: String,
    applied_at: DateTime<Utc>,
}

async fn recorded(client: &impl tokio_postgres::GenericClient) -> Result<Vec<Recorded>, PgError> {
    let rows = client
        .query(
            "SELECT version, name, checksum, applied_at FROM dbx_aviation.schema_migrations ORDER BY version",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Recorded {
            version: r.get(0),
            name: r.get(1),
            checksum: r.get(2),
            applied_at: r.get(3),
        })
        .collect())
}

/// Checks the recorded migrations against the embedded ones: edited or unknown ones are errors.
fn verify(recorded: &[Recorded]) -> Result<(), MigrateError> {
    let latest_known = MIGRATIONS.last().map_or(0, |m| m.version);
    for rec in recorded {
        match MIGRATIONS.iter().find(|m| m.version == rec.version) {
            Some(m) if m.checksum() != rec.checksum => {
                return Err(MigrateError::ChecksumMismatch {
                    version: m.version,
                    name: m.name.to_owned(),
                })
            }
            Some(_) => {}
            None => {
                return Err(MigrateError::DatabaseNewer {
                    version: rec.version,
                    name: rec.name.clone(),
                    latest_known,
                })
            }
        }
    }
    Ok(())
}

/// Applies every pending migration, in version order, each in its own transaction, and returns
/// the ones it applied (empty when the database was up to date).
///
/// Errors without applying anything when an applied migration was changed
/// ([`MigrateError::ChecksumMismatch`]) or the database knows a migration this binary does not
/// ([`MigrateError::DatabaseNewer`]). A failing migration is rolled back and reported as
/// [`MigrateError::Failed`]; the ones before it stay applied. PostGIS is used when the server
/// offers it ([`PostgisMode::Auto`]; see [`apply_with`]).
pub async fn apply(client: &mut Client) -> Result<Vec<Applied>, MigrateError> {
    apply_with(client, PostgisMode::Auto).await
}

/// [`apply`] with the operator's PostGIS choice: a choice the server or the database cannot
/// honour is refused before anything is applied ([`MigrateError::Postgis`]).
pub async fn apply_with(
    client: &mut Client,
    postgis: PostgisMode,
) -> Result<Vec<Applied>, MigrateError> {
    {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
        tx.batch_execute(BOOTSTRAP_SQL).await?;
        let rec = recorded(&tx).await?;
        verify(&rec)?;
        let state = PostgisState::read(&tx).await?;
        let endpoints_applied = rec
            .iter()
            .any(|r| r.version == postgis::ENDPOINTS_MIGRATION);
        postgis::check(postgis, &state, endpoints_applied)?;
        tx.commit().await?;
    }

    let mut applied = Vec::new();
    for m in MIGRATIONS {
        let started = Instant::now();
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
        // Looked up again under the lock: another runner may have applied it meanwhile.
        let row = tx
            .query_opt(
                "SELECT checksum FROM dbx_aviation.schema_migrations WHERE version = $1",
                &[&m.version],
            )
            .await?;
        if let Some(row) = row {
            let checksum: String = row.get(0);
            if checksum != m.checksum() {
                return Err(MigrateError::ChecksumMismatch {
                    version: m.version,
                    name: m.name.to_owned(),
                });
            }
            continue;
        }
        tracing::info!(version = m.version, name = m.name, "applying migration");
        let failed = |e| MigrateError::Failed {
            version: m.version,
            name: m.name.to_owned(),
            source: PgError::from(e),
        };
        postgis::before_migration(&tx, m.version, postgis)
            .await
            .map_err(failed)?;
        if local_ddl_only(&tx, m).await? {
            tx.batch_execute("SET LOCAL citus.enable_ddl_propagation = off")
                .await?;
        }
        tx.batch_execute(m.sql).await.map_err(failed)?;
        // Migrations SET LOCAL ROLE dbx_admin; the bookkeeping row is the runner's.
        tx.batch_execute("RESET ROLE").await?;
        tx.execute(
            "INSERT INTO dbx_aviation.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&m.version, &m.name, &m.checksum()],
        )
        .await?;
        tx.commit().await?;
        let duration = started.elapsed();
        tracing::info!(
            version = m.version,
            name = m.name,
            ms = duration.as_millis() as u64,
            "migration applied"
        );
        applied.push(Applied {
            version: m.version,
            name: m.name,
            duration,
        });
    }
    Ok(applied)
}

/// Whether migration `m` must keep its DDL on this node: true on a Citus coordinator (the
/// `citus` extension in this database) whose schema is not distributed yet, for the migrations
/// after the first that work as `dbx_admin` (`SET LOCAL ROLE dbx_admin`).
///
/// Citus sends DDL to the workers as the current user, and `dbx_admin` is a NOLOGIN role until
/// `dbx setup --distributed` gives it LOGIN: so before the distribution step the schema is
/// built on the coordinator alone, and the distribution step ([`crate::citus`]) sends each
/// table's definition, policies, grants and dependencies to the workers. The migrations that
/// run as the superuser (0001: roles, schemas, extensions; 0009: the maintenance user) do
/// propagate, so every role and extension exists on every node. Once the schema is
/// distributed, later migrations propagate like any DDL on Citus. On a single node (no `citus`
/// extension) this is always false and nothing changes.
async fn local_ddl_only(
    tx: &tokio_postgres::Transaction<'_>,
    m: &Migration,
) -> Result<bool, PgError> {
    if m.version <= 1 || !m.sql.contains("SET LOCAL ROLE dbx_admin") {
        return Ok(false);
    }
    let row = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')",
            &[],
        )
        .await?;
    if !row.get::<_, bool>(0) {
        return Ok(false);
    }
    let distributed: bool = tx
        .query_one(crate::citus::SCHEMA_DISTRIBUTED_SQL, &[])
        .await?
        .get(0);
    Ok(!distributed)
}

/// Reports each embedded migration as applied or pending (and any migration recorded in the
/// database that this binary does not know), without changing anything.
pub async fn status(client: &Client) -> Result<Vec<MigrationStatus>, MigrateError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('dbx_aviation.schema_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    let rec = if exists {
        recorded(client).await?
    } else {
        Vec::new()
    };

    let mut out: Vec<MigrationStatus> = MIGRATIONS
        .iter()
        .map(|m| {
            let state = match rec.iter().find(|r| r.version == m.version) {
                Some(r) => MigrationState::Applied {
                    applied_at: r.applied_at,
                    checksum_matches: r.checksum == m.checksum(),
                },
                None => MigrationState::Pending,
            };
            MigrationStatus {
                version: m.version,
                name: m.name.to_owned(),
                state,
            }
        })
        .collect();
    out.extend(
        rec.iter()
            .filter(|r| !MIGRATIONS.iter().any(|m| m.version == r.version))
            .map(|r| MigrationStatus {
                version: r.version,
                name: r.name.clone(),
                state: MigrationState::UnknownToBinary {
                    applied_at: r.applied_at,
                },
            }),
    );
    out.sort_by_key(|s| s.version);
    Ok(out)
}

/// Whether an error is PostgreSQL's "insufficient privilege" (e.g. the runner is not a
/// superuser), so callers can explain what role `migrate` needs.
pub fn is_insufficient_privilege(err: &MigrateError) -> bool {
    let code = match err {
        MigrateError::Failed { source, .. } | MigrateError::Postgres(source) => source.code(),
        _ => None,
    };
    code == Some(&SqlState::INSUFFICIENT_PRIVILEGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_strictly_increasing_and_named_like_their_files() {
        // Gaps are allowed (helpers working in parallel reserve version ranges); order is not.
        let mut last = 0;
        for m in MIGRATIONS {
            assert!(m.version > last, "{m} is out of order");
            last = m.version;
            let header = format!("-- {:04} {}:", m.version, m.name);
            assert!(
                m.sql.starts_with(&header),
                "{m} must start with the comment block `{header}`"
            );
        }
        assert_eq!(Some(last), MIGRATIONS.last().map(|m| m.version));
    }

    #[test]
    fn checksum_is_sha256_hex_of_the_sql() {
        let m = Migration {
            version: 1,
            name: "x",
            sql: "abc",
        };
        assert_eq!(
            m.checksum(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn mismatch_message_names_the_migration() {
        let e = MigrateError::ChecksumMismatch {
            version: 3,
            name: "telemetry".into(),
        };
        assert!(e
            .to_string()
            .starts_with("migration 0003 (telemetry) was changed after it was applied: "));
    }

    #[test]
    fn verify_reports_unknown_newer_versions() {
        let rec = vec![Recorded {
            version: 99,
            name: "future".into(),
            checksum: "x".into(),
            applied_at: Utc::now(),
        }];
        match verify(&rec) {
            Err(MigrateError::DatabaseNewer {
                version,
                latest_known,
                ..
            }) => {
                assert_eq!(version, 99);
                assert_eq!(Some(latest_known), MIGRATIONS.last().map(|m| m.version));
            }
            other => panic!("expected DatabaseNewer, got {other:?}"),
        }
    }
}
