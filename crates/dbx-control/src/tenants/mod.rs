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
//!
//! One file per job: `validate` checks the values given on the command line, `session` readies
//! an administration session and audits reads, `orgs`, `keys` and `aircraft` manage the three
//! kinds of tenant object, `search` is the full-text search. This file holds what they share
//! (the [`TenantError`] every function returns) and re-exports every public item, so that all
//! of them stay at `dbx_control::tenants::…`.

mod aircraft;
mod keys;
mod orgs;
mod search;
mod session;
mod validate;

use tokio_postgres::error::SqlState;

use crate::migrate::PgError;
use chrono::{DateTime, Utc};

pub use aircraft::{add_aircraft, list_aircraft, retire_aircraft, Aircraft, NewAircraft};
pub use dbx_core::apikey::PRIMARY_LABEL;
pub use keys::{create_key, list_keys, revoke_key, CreatedKey, KeyInfo, KeyStatus, RevokedKey};
pub use orgs::{
    create_org, list_orgs, org_by_code, org_summary, set_org_active, update_org, CreatedOrg,
    NewOrg, Org, OrgSummary, OrgUpdate,
};
pub use search::{search_analyses, AnalysisHit};
pub use session::{audit_read, encryption_available, prepare};
pub use validate::{
    parse_duration, validate_code, validate_label, validate_points_per_sec, validate_registration,
    validate_retention_days, validate_text,
};

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
