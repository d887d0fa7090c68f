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
//! Keys live in `dbx_aviation.api_keys` (several per organization, with expiry and
//! revocation) and, for compatibility, in `organizations.api_key_hash`; a hash the
//! key table knows is valid only as the key table says. A reload is also scheduled
//! for the moment the next key expires, so an expiring key's connections close on time.
//! Which keys are used is noted here (a counter per open connection, a set of keys
//! seen since the last flush) and written to `api_keys.last_used_at` in one UPDATE
//! every couple of seconds by the refresher, never on the hot path.
//!
//! Flight sessions are too many to load; their owners are looked up on first use
//! and remembered in a bounded two-generation cache.
//!
//! UDP datagrams in the MAC form (docs/protocol.md, 1.1) name their key by `kid`, the first
//! 8 bytes of its hash: the snapshot indexes the keys by it. Two keys can share a kid
//! (a 64-bit prefix); the datagram is then checked against each of them, in hash
//! order, and belongs to the one whose MAC verifies.
//!
//! The parts: [`snapshot`] (keys, organizations, aircraft, loaded whole), [`owners`]
//! (aircraft and session ownership lookups), [`usage`] (`last_used_at` stamping),
//! [`refresh`] (LISTEN/NOTIFY and timed reloads).
//!
//! Every cache here is bounded in entries, and every entry in bytes: keys and the kid
//! index hold one entry per active key (64-byte hashes); the aircraft caches at most
//! 2 × 10 000 entries of (organization, name), where a name is a registration of at
//! most 20 characters or a UUID; sessions 2 × `session_cache_capacity` entries of 48
//! bytes; key usage one entry per key in use.

use std::sync::{Arc, Mutex, RwLock};

use deadpool_postgres::Pool;
use tokio::sync::watch;
use uuid::Uuid;

use dbx_core::apikey::key_hash_hex;
use dbx_core::sync::read;
use dbx_core::{Clock, InternalEvent, SystemClock};

mod owners;
mod refresh;
mod snapshot;
mod usage;

use owners::TwoGen;
pub use snapshot::AuthSnapshot;
pub use usage::KeyInUse;
use usage::Usage;

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
    /// The change listener's own connection failed.
    #[error("auth change listener: {0}")]
    Connect(#[from] dbx_pg::PgError),
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

/// An active organization found by its `org_code` (inputs that name the organization
/// instead of presenting a key: MQTT topics, whose access the broker's ACL controls).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgGrant {
    /// The organization.
    pub org_id: Uuid,
    /// Points per second allowed for the organization; `None` = unlimited.
    pub points_per_sec: Option<u32>,
}

/// Who owns a flight session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOwner {
    /// Organization.
    pub org_id: Uuid,
    /// Aircraft.
    pub aircraft_id: Uuid,
}

/// The cache, shared by every connection and the UDP server.
#[derive(Debug)]
pub struct AuthCache {
    pool: Pool,
    snapshot: RwLock<Arc<AuthSnapshot>>,
    sessions: Mutex<TwoGen<Uuid, SessionOwner>>,
    /// Aircraft found in the database between two reloads: (org, reference) → id.
    aircraft_found: Mutex<TwoGen<(Uuid, String), Uuid>>,
    /// Aircraft not found: (org, reference) → when we last asked.
    aircraft_missing: Mutex<TwoGen<(Uuid, String), std::time::Instant>>,
    changes: watch::Sender<u64>,
    usage: Mutex<Usage>,
    /// When the earliest key of the last reload expires (a reload is due then).
    next_expiry: Mutex<Option<tokio::time::Instant>>,
}

impl AuthCache {
    /// A cache over `pool`; call [`AuthCache::reload`] before serving.
    pub fn new(pool: Pool, session_cache_capacity: usize) -> Arc<AuthCache> {
        let (changes, _) = watch::channel(0);
        Arc::new(AuthCache {
            pool,
            snapshot: RwLock::new(Arc::new(AuthSnapshot::default())),
            sessions: Mutex::new(TwoGen::new(session_cache_capacity)),
            aircraft_found: Mutex::new(TwoGen::new(10_000)),
            aircraft_missing: Mutex::new(TwoGen::new(10_000)),
            changes,
            usage: Mutex::new(Usage::default()),
            next_expiry: Mutex::new(None),
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<AuthSnapshot> {
        read(&self.snapshot).clone()
    }

    /// A receiver that changes value on every reload.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The grant of a clear-text key, if it is known, active and its organization too.
    pub fn authenticate(&self, key: &str) -> Option<(String, KeyGrant)> {
        let hash = key_hash_hex(key);
        let grant = self.snapshot().key(&hash).cloned()?;
        Some((hash, grant))
    }

    /// The grant of the key that signed `body` with `mac` (UDP MAC form): a key with
    /// this `kid` whose MAC verifies (constant-time), active, its organization too.
    pub fn authenticate_mac(
        &self,
        kid: u64,
        mac: &[u8; 16],
        body: &[u8],
    ) -> Option<(String, KeyGrant)> {
        let snap = self.snapshot();
        let (hash, grant) = snap.key_by_mac(kid, mac, body)?;
        Some((hash.to_string(), grant.clone()))
    }

    /// Reloads keys and aircraft from the database and tells subscribers; on failure
    /// the previous snapshot stays in force.
    pub async fn reload(&self) -> Result<(), AuthError> {
        let snap = self.load_snapshot().await?;
        crate::events::AuthReloaded {
            keys: snap.keys.len(),
            aircraft: snap.aircraft_org.len(),
            at_unix_secs: SystemClock.now().timestamp_millis() as f64 / 1000.0,
        }
        .emit();
        Ok(())
    }
}
