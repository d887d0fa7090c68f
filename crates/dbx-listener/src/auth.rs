//! The key → organization cache, and the aircraft and session ownership checks
//! that make the daemon the tenant boundary on the write path.
//!
//! Keys are stored (in the database and here) only as hex SHA-256 hashes. The
//! whole table of active keys and aircraft is held in memory as one immutable
//! [`AuthSnapshot`], swapped atomically on reload; a reload happens at start, on
//! every `NOTIFY dbx_auth_changed` (sent by triggers on the organization, key and
//! aircraft tables, so a deactivated organization or a new aircraft takes effect
//! within a second), and every `auth_refresh_secs` as a safety net. Connections
//! subscribe to [`AuthCache::changes`] to re-check their own key and close
//! themselves when it was revoked.
//!
//! Flight sessions are too many to load; their owners are looked up on first use
//! and remembered in a bounded two-generation cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_postgres::AsyncMessage;
use uuid::Uuid;

use dbx_core::Shutdown;

/// The NOTIFY channel the schema's triggers signal on.
pub const AUTH_CHANNEL: &str = "dbx_auth_changed";

/// Errors talking to the database about auth.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No pooled connection.
    #[error("no database connection for the auth cache: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A query failed.
    #[error("auth query failed: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// What an accepted key grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyGrant {
    /// The organization.
    pub org_id: Uuid,
    /// The key's label (`primary` for the organization's own `api_key_hash`).
    pub label: String,
    /// Points per second allowed for the organization; `None` = unlimited.
    pub points_per_sec: Option<u32>,
}

/// One consistent view of keys and aircraft.
#[derive(Debug, Default, Clone)]
pub struct AuthSnapshot {
    keys: HashMap<String, KeyGrant>,
    aircraft_by_reg: HashMap<(Uuid, String), Uuid>,
    aircraft_org: HashMap<Uuid, Uuid>,
}

impl AuthSnapshot {
    /// The grant of a key given by its hex SHA-256 hash.
    pub fn key(&self, hash: &str) -> Option<&KeyGrant> {
        self.keys.get(hash)
    }

    /// Number of active keys.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

/// Hex SHA-256 of an API key.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Who owns a flight session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOwner {
    /// Organization.
    pub org_id: Uuid,
    /// Aircraft.
    pub aircraft_id: Uuid,
}

/// A bounded map kept as two generations: when the young one fills up, the old one
/// is dropped and the young one becomes old. Lookups see both. At most 2 × capacity.
#[derive(Debug)]
struct TwoGen<K, V> {
    young: HashMap<K, V>,
    old: HashMap<K, V>,
    capacity: usize,
}

impl<K: std::hash::Hash + Eq, V: Copy> TwoGen<K, V> {
    fn new(capacity: usize) -> Self {
        TwoGen {
            young: HashMap::new(),
            old: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    fn get(&self, k: &K) -> Option<V> {
        self.young.get(k).or_else(|| self.old.get(k)).copied()
    }

    fn insert(&mut self, k: K, v: V) {
        if self.young.len() >= self.capacity {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(k, v);
    }
}

/// The cache, shared by every connection and the UDP server.
#[derive(Debug)]
pub struct AuthCache {
    pool: Pool,
    snapshot: RwLock<Arc<AuthSnapshot>>,
    sessions: Mutex<TwoGen<Uuid, SessionOwner>>,
    changes: watch::Sender<u64>,
}

impl AuthCache {
    /// A cache over `pool`; call [`AuthCache::reload`] before serving.
    pub fn new(pool: Pool, session_cache_capacity: usize) -> Arc<AuthCache> {
        let (changes, _) = watch::channel(0);
        Arc::new(AuthCache {
            pool,
            snapshot: RwLock::new(Arc::new(AuthSnapshot::default())),
            sessions: Mutex::new(TwoGen::new(session_cache_capacity)),
            changes,
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<AuthSnapshot> {
        self.snapshot.read().expect("auth snapshot lock").clone()
    }

    /// A receiver that changes value on every reload.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The grant of a clear-text key, if it is known, active and its organization too.
    pub fn authenticate(&self, key: &str) -> Option<(String, KeyGrant)> {
        let hash = hash_key(key);
        let grant = self.snapshot().key(&hash).cloned()?;
        Some((hash, grant))
    }

    /// Reloads keys and aircraft from the database and tells subscribers.
    pub async fn reload(&self) -> Result<(), AuthError> {
        let client = self.pool.get().await?;
        let mut snap = AuthSnapshot::default();
        for row in client
            .query(
                "SELECT api_key_hash, org_id, ingest_points_per_sec FROM dbx_aviation.organizations \
                 WHERE is_active AND api_key_hash IS NOT NULL",
                &[],
            )
            .await?
        {
            let rate: Option<i32> = row.get(2);
            snap.keys.insert(
                row.get::<_, String>(0).to_ascii_lowercase(),
                KeyGrant {
                    org_id: row.get(1),
                    label: "primary".into(),
                    points_per_sec: rate.filter(|r| *r > 0).map(|r| r as u32),
                },
            );
        }
        // Additional keys (rotation) live in dbx_aviation.api_keys when that table exists.
        let has_key_table: bool = client
            .query_one(
                "SELECT to_regclass('dbx_aviation.api_keys') IS NOT NULL",
                &[],
            )
            .await?
            .get(0);
        if has_key_table {
            for row in client
                .query(
                    "SELECT k.key_hash, k.org_id, k.label, o.ingest_points_per_sec \
                     FROM dbx_aviation.api_keys k JOIN dbx_aviation.organizations o USING (org_id) \
                     WHERE o.is_active AND k.revoked_at IS NULL \
                       AND (k.expires_at IS NULL OR k.expires_at > now())",
                    &[],
                )
                .await?
            {
                let rate: Option<i32> = row.get(3);
                snap.keys.insert(
                    row.get::<_, String>(0).to_ascii_lowercase(),
                    KeyGrant {
                        org_id: row.get(1),
                        label: row.get(2),
                        points_per_sec: rate.filter(|r| *r > 0).map(|r| r as u32),
                    },
                );
            }
        }
        for row in client
            .query(
                "SELECT aircraft_id, org_id, registration_number FROM dbx_aviation.aircraft_registry \
                 WHERE is_active",
                &[],
            )
            .await?
        {
            let (id, org, reg): (Uuid, Uuid, String) = (row.get(0), row.get(1), row.get(2));
            snap.aircraft_by_reg.insert((org, reg), id);
            snap.aircraft_org.insert(id, org);
        }
        tracing::debug!(
            keys = snap.keys.len(),
            aircraft = snap.aircraft_org.len(),
            "auth cache reloaded"
        );
        *self.snapshot.write().expect("auth snapshot lock") = Arc::new(snap);
        self.changes.send_modify(|g| *g += 1);
        Ok(())
    }

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
        *self.snapshot.write().expect("auth snapshot lock") = Arc::new(snap);
        Ok(id)
    }

    /// Who owns `session`: from the cache, else from the database; a session nobody
    /// owns yet is claimed for `claimant` (the batcher's upsert makes that final).
    pub async fn session_owner(
        &self,
        session: Uuid,
        claimant: SessionOwner,
    ) -> Result<SessionOwner, AuthError> {
        if let Some(owner) = self
            .sessions
            .lock()
            .expect("session cache lock")
            .get(&session)
        {
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
        self.sessions
            .lock()
            .expect("session cache lock")
            .insert(session, owner);
        Ok(owner)
    }

    /// Forgets a session's owner (after the batcher refused it as foreign).
    pub fn forget_session(&self, session: Uuid) {
        let mut s = self.sessions.lock().expect("session cache lock");
        s.young.remove(&session);
        s.old.remove(&session);
    }

    /// Keeps the cache fresh until shutdown: LISTEN for changes, full reload on a timer.
    pub async fn run_refresher(
        self: Arc<Self>,
        listen_config: tokio_postgres::Config,
        refresh_every: Duration,
        mut shutdown: Shutdown,
    ) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let session = self.listen_once(&listen_config, refresh_every, shutdown.clone());
            tokio::select! {
                _ = shutdown.recv() => return,
                res = session => {
                    if let Err(e) = res {
                        tracing::warn!(error = %e, "auth change listener lost its connection; retrying");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.recv() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn listen_once(
        &self,
        config: &tokio_postgres::Config,
        refresh_every: Duration,
        mut shutdown: Shutdown,
    ) -> Result<(), AuthError> {
        let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
        let (tx, mut notes) = tokio::sync::mpsc::channel::<()>(16);
        let driver = tokio::spawn(async move {
            let mut stream = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(msg) = stream.next().await {
                match msg {
                    Ok(AsyncMessage::Notification(_)) => {
                        let _ = tx.try_send(());
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        client
            .batch_execute(&format!("LISTEN {AUTH_CHANNEL}"))
            .await?;
        // Anything changed while we were not listening is picked up by this reload.
        self.reload().await?;
        let mut timer = tokio::time::interval(refresh_every.max(Duration::from_secs(1)));
        timer.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.recv() => { driver.abort(); return Ok(()); }
                n = notes.recv() => {
                    if n.is_none() { break; }
                    // Coalesce a burst of notifications into one reload.
                    while notes.try_recv().is_ok() {}
                    self.reload().await?;
                }
                _ = timer.tick() => self.reload().await?,
            }
        }
        match driver.await {
            Ok(Err(e)) => Err(e.into()),
            _ => Ok(()),
        }
    }
}
