//! Who owns what: the aircraft a batch names (from the snapshot, else asked of the
//! database, with misses remembered for a second) and the owner of each flight session
//! (too many to load: looked up on first use and kept in a bounded two-generation cache).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dbx_core::sync::{lock, write};
use uuid::Uuid;

use super::{AuthCache, AuthError, AuthSnapshot, SessionOwner};

/// How long a failed aircraft lookup is remembered before the database is asked again.
pub(super) const NEGATIVE_TTL: Duration = Duration::from_secs(1);

/// A bounded map kept as two generations: when the young one fills up, the old one
/// is dropped and the young one becomes old. Lookups see both. At most 2 × capacity.
#[derive(Debug)]
pub(super) struct TwoGen<K, V> {
    young: HashMap<K, V>,
    old: HashMap<K, V>,
    capacity: usize,
}

impl<K: std::hash::Hash + Eq, V: Copy> TwoGen<K, V> {
    pub(super) fn new(capacity: usize) -> Self {
        TwoGen {
            young: HashMap::new(),
            old: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    pub(super) fn get(&self, k: &K) -> Option<V> {
        self.young.get(k).or_else(|| self.old.get(k)).copied()
    }

    pub(super) fn insert(&mut self, k: K, v: V) {
        if self.young.len() >= self.capacity {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(k, v);
    }
}

impl AuthCache {
    /// The aircraft a batch names, if it belongs to `org`.
    pub fn resolve_aircraft(&self, org: Uuid, aircraft: &dbx_proto::AircraftRef) -> Option<Uuid> {
        let snap = self.snapshot();
        match aircraft {
            dbx_proto::AircraftRef::Id(id) => {
                (snap.aircraft_org.get(id) == Some(&org)).then_some(*id)
            }
            dbx_proto::AircraftRef::Registration(reg) => {
                snap.aircraft_by_reg.get(&(org, reg.clone())).copied()
            }
        }
    }

    /// Like [`AuthCache::resolve_aircraft`], but a miss asks the database before
    /// giving up: an aircraft registered a moment ago (its NOTIFY reload still on the
    /// way) must not get a final `unknown_aircraft`. Misses are remembered for a
    /// second, so a gateway naming unknown aircraft costs at most one query a second
    /// per name.
    pub async fn resolve_aircraft_checked(
        &self,
        org: Uuid,
        aircraft: &dbx_proto::AircraftRef,
    ) -> Result<Option<Uuid>, AuthError> {
        if let Some(id) = self.resolve_aircraft(org, aircraft) {
            return Ok(Some(id));
        }
        let name = match aircraft {
            dbx_proto::AircraftRef::Id(id) => id.to_string(),
            dbx_proto::AircraftRef::Registration(r) => r.clone(),
        };
        let key = (org, name);
        if let Some(id) = lock(&self.aircraft_found).get(&key) {
            return Ok(Some(id));
        }
        if let Some(at) = lock(&self.aircraft_missing).get(&key) {
            if at.elapsed() < NEGATIVE_TTL {
                return Ok(None);
            }
        }
        let client = self.pool.get().await?;
        let (column, value): (&str, &(dyn tokio_postgres::types::ToSql + Sync)) = match aircraft {
            dbx_proto::AircraftRef::Id(id) => ("aircraft_id", id),
            dbx_proto::AircraftRef::Registration(reg) => ("registration_number", reg),
        };
        let row = client
            .query_opt(
                &format!(
                    "SELECT aircraft_id FROM dbx_aviation.aircraft_registry \
                     WHERE org_id = $1 AND {column} = $2 AND is_active"
                ),
                &[&org, value],
            )
            .await?;
        match row.map(|r| r.get::<_, Uuid>(0)) {
            Some(id) => {
                lock(&self.aircraft_found).insert(key, id);
                Ok(Some(id))
            }
            None => {
                lock(&self.aircraft_missing).insert(key, std::time::Instant::now());
                Ok(None)
            }
        }
    }

    /// Registers an unknown registration for `org` (auto-registration), returning its id.
    pub async fn register_aircraft(
        &self,
        org: Uuid,
        registration: &str,
    ) -> Result<Uuid, AuthError> {
        let client = self.pool.get().await?;
        let id: Uuid = client
            .query_one(
                "SELECT dbx_aviation.register_aircraft($1, $2)",
                &[&org, &registration],
            )
            .await?
            .get(0);
        // Make it visible at once for this process; the NOTIFY reload follows.
        let mut snap = AuthSnapshot::clone(&self.snapshot());
        snap.aircraft_by_reg
            .insert((org, registration.to_string()), id);
        snap.aircraft_org.insert(id, org);
        *write(&self.snapshot) = Arc::new(snap);
        Ok(id)
    }

    /// Who owns `session`: from the cache, else from the database; a session nobody
    /// owns yet is claimed for `claimant` (the batcher's upsert makes that final).
    pub async fn session_owner(
        &self,
        session: Uuid,
        claimant: SessionOwner,
    ) -> Result<SessionOwner, AuthError> {
        if let Some(owner) = lock(&self.sessions).get(&session) {
            return Ok(owner);
        }
        let client = self.pool.get().await?;
        let owner = client
            .query_opt(
                "SELECT org_id, aircraft_id FROM dbx_aviation.flight_sessions WHERE session_id = $1",
                &[&session],
            )
            .await?
            .map(|r| SessionOwner {
                org_id: r.get(0),
                aircraft_id: r.get(1),
            })
            .unwrap_or(claimant);
        lock(&self.sessions).insert(session, owner);
        Ok(owner)
    }

    /// Forgets a session's owner (after the batcher refused it as foreign).
    pub fn forget_session(&self, session: Uuid) {
        let mut s = lock(&self.sessions);
        s.young.remove(&session);
        s.old.remove(&session);
    }
}
