//! The aircraft of an organization: add, list, retire (`dbx aircraft`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use super::orgs::{org_by_code, Org};
use super::validate::{validate_registration, validate_text};
use super::{violated_constraint, TenantError};

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
