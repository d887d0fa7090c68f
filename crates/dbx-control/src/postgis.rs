//! The optional PostGIS branch of the schema: docs/schema.md asks for geography columns with GiST
//! indexes on the flight session endpoints when PostGIS is there, and for every object to work
//! without it.
//!
//! Migrations 0001 and 0002 decide the branch on their own — 0001 creates the extension whenever
//! the server offers it, 0002 adds the generated `departure_location` / `arrival_location`
//! columns when the extension exists — and, being applied as they are, can no longer change. An
//! operator's choice, [`PostgisMode`] (`dbx setup|migrate --postgis off|auto|require`), is
//! therefore enforced by the runner around them: [`check`] refuses, before anything is applied,
//! a choice the server or the database cannot honour (`require` on a server without PostGIS,
//! `off` on a database already using it), and [`before_migration`] puts the extension in the
//! state the mode asks for in 0002's own transaction, just before 0002 looks at it. The branch
//! is chosen when the schema is created; a database is never moved from one to the other.

use std::fmt;
use std::str::FromStr;

use tokio_postgres::GenericClient;

/// The version of the migration that adds the geography endpoints when PostGIS is installed.
pub(crate) const ENDPOINTS_MIGRATION: i32 = 2;

/// Whether the schema uses PostGIS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PostgisMode {
    /// The plain branch, even when the server offers PostGIS.
    Off,
    /// PostGIS when the server offers it, else the plain branch (the default).
    #[default]
    Auto,
    /// PostGIS, or an error when the server does not offer it.
    Require,
}

impl PostgisMode {
    /// Every mode, as written on the command line.
    pub const ALL: [PostgisMode; 3] = [PostgisMode::Off, PostgisMode::Auto, PostgisMode::Require];

    /// The mode as written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            PostgisMode::Off => "off",
            PostgisMode::Auto => "auto",
            PostgisMode::Require => "require",
        }
    }
}

impl fmt::Display for PostgisMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PostgisMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PostgisMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a PostGIS mode: use off, auto or require"))
    }
}

/// What a server and a database have of PostGIS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgisState {
    /// The database's name, for messages.
    pub database: String,
    /// The server's major version (for the name of the package that brings PostGIS).
    pub server_major: u32,
    /// The version of PostGIS the server offers (`pg_available_extensions`), if any.
    pub available: Option<String>,
    /// The version installed in this database, if any.
    pub installed: Option<String>,
    /// Whether `flight_sessions` has the geography endpoints (the PostGIS branch was taken).
    pub endpoints: bool,
}

impl PostgisState {
    /// Reads the state of the database `client` is connected to.
    pub async fn read(client: &impl GenericClient) -> Result<PostgisState, tokio_postgres::Error> {
        let row = client
            .query_one(
                "SELECT current_database()::text,
                        current_setting('server_version_num')::int / 10000,
                        (SELECT default_version FROM pg_available_extensions WHERE name = 'postgis'),
                        (SELECT extversion FROM pg_extension WHERE extname = 'postgis'),
                        EXISTS (SELECT 1 FROM pg_attribute
                                 WHERE attrelid = to_regclass('dbx_aviation.flight_sessions')
                                   AND attname = 'departure_location' AND NOT attisdropped)",
                &[],
            )
            .await?;
        Ok(PostgisState {
            database: row.get(0),
            server_major: row.get::<_, i32>(1).max(0) as u32,
            available: row.get(2),
            installed: row.get(3),
            endpoints: row.get(4),
        })
    }

    /// One line for people: which branch the schema is on, and why.
    pub fn describe(&self, mode: PostgisMode) -> String {
        match (&self.installed, self.endpoints) {
            (Some(v), true) => {
                format!("PostGIS {v}: geography endpoints on flight_sessions with GiST indexes")
            }
            (_, true) => "geography endpoints on flight_sessions, PostGIS missing".into(),
            (_, false) if mode == PostgisMode::Off => "not used (postgis = off)".into(),
            (_, false) if self.available.is_none() => format!(
                "not used: the server does not offer PostGIS (Debian: {})",
                debian_package(self.server_major)
            ),
            (_, false) => "not used: the database was set up without it".into(),
        }
    }
}

/// The Debian package that brings PostGIS to a PostgreSQL server of major version `major`.
pub fn debian_package(major: u32) -> String {
    format!("postgresql-{major}-postgis-3")
}

/// A PostGIS choice the server or the database cannot honour; nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostgisError {
    /// `require`, and the server does not offer the extension.
    #[error(
        "postgis = require, but the PostgreSQL {major} server does not offer the postgis \
         extension: install PostGIS on the server (Debian: apt-get install {package}), or choose \
         --postgis auto or off"
    )]
    Unavailable {
        /// The server's major version.
        major: u32,
        /// The package that brings PostGIS to it.
        package: String,
    },
    /// `require`, and the database's schema was created on the plain branch.
    #[error(
        "postgis = require, but database \"{database}\" was set up without PostGIS \
         (flight_sessions has no geography endpoints); the branch is chosen when the schema is \
         created: set up a new database with --postgis require, or use --postgis auto"
    )]
    SetUpWithout {
        /// The database.
        database: String,
    },
    /// `off`, and the database already has PostGIS (its schema, or the extension from a
    /// template database, which 0002 would take).
    #[error(
        "postgis = off, but database \"{database}\" {what}; the branch is chosen when the schema \
         is created: use --postgis auto{remedy}"
    )]
    AlreadyThere {
        /// The database.
        database: String,
        /// What it has.
        what: &'static str,
        /// What else can be done.
        remedy: &'static str,
    },
}

/// Refuses a mode the server or the database cannot honour, before anything is applied.
/// `endpoints_migration_applied`: whether migration 0002 is recorded in the database.
pub fn check(
    mode: PostgisMode,
    state: &PostgisState,
    endpoints_migration_applied: bool,
) -> Result<(), PostgisError> {
    let database = state.database.clone();
    match mode {
        PostgisMode::Auto => Ok(()),
        PostgisMode::Require if endpoints_migration_applied && !state.endpoints => {
            Err(PostgisError::SetUpWithout { database })
        }
        PostgisMode::Require if !endpoints_migration_applied && state.available.is_none() => {
            Err(PostgisError::Unavailable {
                major: state.server_major,
                package: debian_package(state.server_major),
            })
        }
        PostgisMode::Require => Ok(()),
        PostgisMode::Off if state.endpoints => Err(PostgisError::AlreadyThere {
            database,
            what: "uses PostGIS (flight_sessions has geography endpoints)",
            remedy: "",
        }),
        PostgisMode::Off if !endpoints_migration_applied && state.installed.is_some() => {
            Err(PostgisError::AlreadyThere {
                database,
                what: "has the postgis extension installed (from its template database?)",
                remedy: ", or DROP EXTENSION postgis in it first",
            })
        }
        PostgisMode::Off => Ok(()),
    }
}

/// Run in the transaction of migration `version`, before its SQL: ahead of 0002, the
/// extension is made what `mode` asks for (0001 created it whenever the server offers it).
/// [`check`] has made sure that `off` drops only what this run's 0001 created.
pub async fn before_migration(
    tx: &impl GenericClient,
    version: i32,
    mode: PostgisMode,
) -> Result<(), tokio_postgres::Error> {
    if version != ENDPOINTS_MIGRATION {
        return Ok(());
    }
    match mode {
        PostgisMode::Auto => Ok(()),
        PostgisMode::Off => tx.batch_execute("DROP EXTENSION IF EXISTS postgis").await,
        PostgisMode::Require => {
            tx.batch_execute("CREATE EXTENSION IF NOT EXISTS postgis WITH SCHEMA public")
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(available: bool, installed: bool, endpoints: bool) -> PostgisState {
        PostgisState {
            database: "dbx_aviation".into(),
            server_major: 15,
            available: available.then(|| "3.3.2".to_string()),
            installed: installed.then(|| "3.3.2".to_string()),
            endpoints,
        }
    }

    #[test]
    fn modes_parse_and_print_as_on_the_command_line() {
        for m in PostgisMode::ALL {
            assert_eq!(m.to_string().parse::<PostgisMode>(), Ok(m));
        }
        assert_eq!(PostgisMode::default(), PostgisMode::Auto);
        let e = "on".parse::<PostgisMode>().unwrap_err();
        assert!(e.contains("use off, auto or require"), "{e}");
    }

    #[test]
    fn require_on_a_server_without_postgis_names_the_package_for_its_major_version() {
        let e = check(PostgisMode::Require, &state(false, false, false), false).unwrap_err();
        assert_eq!(
            e,
            PostgisError::Unavailable {
                major: 15,
                package: "postgresql-15-postgis-3".into()
            }
        );
        assert!(e
            .to_string()
            .contains("apt-get install postgresql-15-postgis-3"));
        assert!(check(PostgisMode::Require, &state(true, false, false), false).is_ok());
        // Up to date on the PostGIS branch: nothing to refuse.
        assert!(check(PostgisMode::Require, &state(true, true, true), true).is_ok());
    }

    #[test]
    fn a_database_is_never_moved_from_one_branch_to_the_other() {
        let e = check(PostgisMode::Require, &state(true, false, false), true).unwrap_err();
        assert!(matches!(e, PostgisError::SetUpWithout { .. }), "{e}");
        assert!(e
            .to_string()
            .contains("\"dbx_aviation\" was set up without PostGIS"));
        let e = check(PostgisMode::Off, &state(true, true, true), true).unwrap_err();
        assert!(e.to_string().contains("uses PostGIS"), "{e}");
        // The extension in a fresh database (from its template): 0002 would take it.
        let e = check(PostgisMode::Off, &state(true, true, false), false).unwrap_err();
        assert!(e.to_string().contains("DROP EXTENSION postgis"), "{e}");
        // Installed later by someone else in a plain database: still plain, fine.
        assert!(check(PostgisMode::Off, &state(true, true, false), true).is_ok());
        assert!(check(PostgisMode::Off, &state(true, false, false), false).is_ok());
        for (a, i, e, applied) in [(false, false, false, false), (true, true, true, true)] {
            assert!(check(PostgisMode::Auto, &state(a, i, e), applied).is_ok());
        }
    }

    #[test]
    fn the_description_says_which_branch_and_why() {
        assert_eq!(
            state(true, true, true).describe(PostgisMode::Auto),
            "PostGIS 3.3.2: geography endpoints on flight_sessions with GiST indexes"
        );
        assert_eq!(
            state(true, false, false).describe(PostgisMode::Off),
            "not used (postgis = off)"
        );
        assert!(state(false, false, false)
            .describe(PostgisMode::Auto)
            .contains("postgresql-15-postgis-3"));
        assert!(state(true, false, false)
            .describe(PostgisMode::Auto)
            .contains("set up without it"));
    }
}
