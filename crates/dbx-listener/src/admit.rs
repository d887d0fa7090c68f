//! Admission of a decoded batch into its organization: the one place that resolves the
//! aircraft a batch names (registering it when auto-registration is on) and checks that
//! the flight session belongs to that organization and aircraft. Every input calls it
//! (TCP/TLS connections, UDP datagrams, the MQTT input), so the tenant boundary on the
//! write path has one implementation whatever the transport.

use dbx_core::{RejectCode, Rejection};
use dbx_proto::AircraftRef;
use uuid::Uuid;

use crate::auth::{AuthCache, SessionOwner};

/// The aircraft id a batch of `org` names, after checking that `session` belongs to
/// that organization and aircraft (or to nobody yet). `unknown_aircraft` when the
/// organization has no such active aircraft (and it could not or may not be
/// registered), `foreign_session` when the session is another's.
///
/// A database that cannot be asked is not a reason to refuse: the aircraft then comes
/// from the cache alone, and the session check is left to the batcher's upsert, which
/// makes it final in the same transaction as the rows.
pub async fn resolve_target(
    auth: &AuthCache,
    org: Uuid,
    aircraft: &AircraftRef,
    session: Uuid,
    auto_register: bool,
) -> Result<Uuid, Rejection> {
    let resolved = match auth.resolve_aircraft_checked(org, aircraft).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "aircraft lookup failed; using the cache only");
            auth.resolve_aircraft(org, aircraft)
        }
    };
    let aircraft_id = match (resolved, aircraft) {
        (Some(id), _) => id,
        (None, AircraftRef::Registration(reg)) if auto_register => {
            auth.register_aircraft(org, reg).await.map_err(|e| {
                tracing::warn!(error = %e, "auto-registration failed");
                Rejection::new(
                    RejectCode::UnknownAircraft,
                    format!("aircraft {reg:?} is not registered and could not be registered automatically"),
                )
            })?
        }
        (None, a) => {
            return Err(Rejection::new(
                RejectCode::UnknownAircraft,
                format!(
                    "aircraft {} is not registered to this organization",
                    aircraft_name(a)
                ),
            ))
        }
    };
    let claimant = SessionOwner {
        org_id: org,
        aircraft_id,
    };
    let owner = match auth.session_owner(session, claimant).await {
        Ok(o) => o,
        Err(e) => {
            tracing::debug!(error = %e, "session lookup failed; deferring the ownership check to the batcher");
            claimant
        }
    };
    if owner != claimant {
        return Err(Rejection::new(
            RejectCode::ForeignSession,
            format!("session {session} belongs to another organization or aircraft"),
        ));
    }
    Ok(aircraft_id)
}

/// How a rejection names an aircraft.
fn aircraft_name(a: &AircraftRef) -> String {
    match a {
        AircraftRef::Registration(r) => format!("{r:?}"),
        AircraftRef::Id(id) => id.to_string(),
    }
}
