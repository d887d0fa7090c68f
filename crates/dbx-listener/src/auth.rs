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
//! UDP datagrams in the MAC form (PROTOCOL.md 1.1) name their key by `kid`, the first
//! 8 bytes of its hash: the snapshot indexes the keys by it. Two keys can share a kid
//! (a 64-bit prefix); the datagram is then checked against each of them, in hash
//! order, and belongs to the one whose MAC verifies.
//!
//! Every cache here is bounded in entries, and every entry in bytes: keys and the kid
//! index hold one entry per active key (64-byte hashes); the aircraft caches at most
//! 2 × 10 000 entries of (organization, name), where a name is a registration of at
//! most 20 characters or a UUID; sessions 2 × `session_cache_capacity` entries of 48
//! bytes; key usage one entry per key in use.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_postgres::AsyncMessage;
use uuid::Uuid;

use dbx_core::{Clock, Shutdown, SystemClock};

/// The NOTIFY channel the schema's triggers signal on.
pub const AUTH_CHANNEL: &str = "dbx_auth_changed";

/// How often used keys are stamped in `api_keys.last_used_at`.
const USAGE_FLUSH_EVERY: Duration = Duration::from_secs(2);

/// How often keys held by open connections are stamped again (they stay "in use").
const LIVE_RESTAMP_EVERY: Duration = Duration::from_secs(60);

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

/// One consistent view of keys and aircraft.
#[derive(Debug, Default, Clone)]
pub struct AuthSnapshot {
    keys: HashMap<String, KeyGrant>,
    orgs_by_code: HashMap<String, OrgGrant>,
    org_codes: HashMap<Uuid, String>,
    /// kid → (raw sha256, hex hash) of every key with that kid, in hash order.
    by_kid: HashMap<u64, Vec<([u8; 32], String)>>,
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

    /// The active organization whose `org_code` is exactly `code`.
    pub fn org_by_code(&self, code: &str) -> Option<&OrgGrant> {
        self.orgs_by_code.get(code)
    }

    /// The `org_code` of an active organization.
    pub fn org_code(&self, org: Uuid) -> Option<&str> {
        self.org_codes.get(&org).map(String::as_str)
    }

    /// Adds a key by its hex hash (lower case).
    fn insert_key(&mut self, hash: String, grant: KeyGrant) {
        if let Some(raw) = raw_hash(&hash) {
            let candidates = self.by_kid.entry(dbx_proto::mac::key_id(&raw)).or_default();
            if !candidates.iter().any(|(_, h)| *h == hash) {
                candidates.push((raw, hash.clone()));
                candidates.sort_by(|a, b| a.1.cmp(&b.1));
            }
        }
        self.keys.insert(hash, grant);
    }

    /// The key (hex hash and grant) whose MAC of `body` is `mac`, among the keys with
    /// this `kid`.
    pub fn key_by_mac(&self, kid: u64, mac: &[u8; 16], body: &[u8]) -> Option<(&str, &KeyGrant)> {
        let (_, hash) = self
            .by_kid
            .get(&kid)?
            .iter()
            .find(|(raw, _)| dbx_proto::mac::verify_body_mac(raw, body, mac))?;
        Some((hash.as_str(), self.keys.get(hash)?))
    }
}

/// The 32 raw bytes of a hex SHA-256 hash; `None` for a malformed stored hash (such a
/// key can only be used in clear).
fn raw_hash(hex_hash: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_hash, &mut out).ok()?;
    Some(out)
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

/// Which keys are in use: open connections per key hash, and hashes used since the
/// last flush to `api_keys.last_used_at`.
#[derive(Debug, Default)]
struct Usage {
    live: HashMap<String, u32>,
    used: HashSet<String>,
}

/// Marks a key as in use by one open connection until dropped (see [`AuthCache::track_use`]).
#[derive(Debug)]
pub struct KeyInUse {
    cache: Arc<AuthCache>,
    hash: String,
}

impl Drop for KeyInUse {
    fn drop(&mut self) {
        let mut u = self.cache.usage.lock().expect("key usage lock");
        if let Some(n) = u.live.get_mut(&self.hash) {
            *n -= 1;
            if *n == 0 {
                u.live.remove(&self.hash);
            }
        }
    }
}

/// How long a failed aircraft lookup is remembered before the database is asked again.
const NEGATIVE_TTL: Duration = Duration::from_secs(1);

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

    /// Notes that the key with this hash was used (a UDP datagram, a handshake), for
    /// `api_keys.last_used_at`; written by the refresher within a few seconds.
    pub fn note_used(&self, hash: &str) {
        let mut u = self.usage.lock().expect("key usage lock");
        if !u.used.contains(hash) {
            u.used.insert(hash.to_string());
        }
    }

    /// Marks the key as used now and in use for as long as the guard lives (one open
    /// connection): its `last_used_at` keeps being refreshed while it stays connected.
    pub fn track_use(self: &Arc<Self>, hash: &str) -> KeyInUse {
        {
            let mut u = self.usage.lock().expect("key usage lock");
            *u.live.entry(hash.to_string()).or_insert(0) += 1;
            u.used.insert(hash.to_string());
        }
        KeyInUse {
            cache: self.clone(),
            hash: hash.to_string(),
        }
    }

    /// Number of open connections holding the key with this hash.
    pub fn connections_using(&self, hash: &str) -> u32 {
        let u = self.usage.lock().expect("key usage lock");
        u.live.get(hash).copied().unwrap_or(0)
    }

    /// Writes `last_used_at` for the keys used since the last call (and, when
    /// `include_live`, for every key held by an open connection). Keys the key table
    /// does not hold are simply not matched.
    pub async fn flush_usage(&self, include_live: bool) -> Result<usize, AuthError> {
        let hashes: Vec<String> = {
            let mut u = self.usage.lock().expect("key usage lock");
            let mut all = std::mem::take(&mut u.used);
            if include_live {
                all.extend(u.live.keys().cloned());
            }
            all.into_iter().collect()
        };
        if hashes.is_empty() {
            return Ok(0);
        }
        let result = async {
            let client = self.pool.get().await?;
            let n = client
                .execute(
                    "UPDATE dbx_aviation.api_keys SET last_used_at = now() \
                     WHERE key_hash = ANY($1) AND (last_used_at IS NULL OR last_used_at < now())",
                    &[&hashes],
                )
                .await?;
            Ok::<_, AuthError>(n as usize)
        }
        .await;
        match result {
            Err(AuthError::Db(e))
                if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) =>
            {
                // A schema before the key table: nothing to stamp.
                Ok(0)
            }
            Err(e) => {
                // Kept for the next attempt: the stamp is late, not lost.
                let mut u = self.usage.lock().expect("key usage lock");
                u.used.extend(hashes);
                Err(e)
            }
            ok => ok,
        }
    }

    /// Stamps `last_used_at` every couple of seconds until shutdown, then once more.
    async fn run_usage_flusher(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(USAGE_FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_live = tokio::time::Instant::now();
        loop {
            let stop = tokio::select! {
                _ = shutdown.recv() => true,
                _ = tick.tick() => false,
            };
            let include_live = stop || last_live.elapsed() >= LIVE_RESTAMP_EVERY;
            if include_live {
                last_live = tokio::time::Instant::now();
            }
            if let Err(e) = self.flush_usage(include_live).await {
                tracing::debug!(error = %e, "could not stamp api_keys.last_used_at; will retry");
            }
            if stop {
                return;
            }
        }
    }

    /// Reloads keys and aircraft from the database and tells subscribers; on failure
    /// the previous snapshot stays in force.
    pub async fn reload(&self) -> Result<(), AuthError> {
        use dbx_core::metrics as m;
        let snap = self.load_snapshot().await?;
        metrics::counter!(m::AUTH_RELOADS_TOTAL).increment(1);
        metrics::gauge!(m::AUTH_LAST_RELOAD_TIMESTAMP_SECONDS)
            .set(SystemClock.now().timestamp_millis() as f64 / 1000.0);
        metrics::gauge!(m::AUTH_KEYS).set(snap.keys.len() as f64);
        metrics::gauge!(m::AUTH_AIRCRAFT).set(snap.aircraft_org.len() as f64);
        Ok(())
    }

    /// Reads the snapshot, installs it and returns it.
    async fn load_snapshot(&self) -> Result<Arc<AuthSnapshot>, AuthError> {
        let client = self.pool.get().await?;
        let mut snap = AuthSnapshot::default();
        // Additional keys (rotation) live in dbx_aviation.api_keys when that table exists;
        // it is then authoritative for every hash it holds, the organization's own included
        // (a revoked or expired primary key must not come back through organizations).
        let has_key_table: bool = client
            .query_one(
                "SELECT to_regclass('dbx_aviation.api_keys') IS NOT NULL",
                &[],
            )
            .await?
            .get(0);
        let org_keys_sql = if has_key_table {
            "SELECT o.api_key_hash, o.org_id, o.ingest_points_per_sec FROM dbx_aviation.organizations o \
             WHERE o.is_active AND o.api_key_hash IS NOT NULL \
               AND NOT EXISTS (SELECT 1 FROM dbx_aviation.api_keys k WHERE k.key_hash = lower(o.api_key_hash))"
        } else {
            "SELECT api_key_hash, org_id, ingest_points_per_sec FROM dbx_aviation.organizations \
             WHERE is_active AND api_key_hash IS NOT NULL"
        };
        for row in client.query(org_keys_sql, &[]).await? {
            let rate: Option<i32> = row.get(2);
            snap.insert_key(
                row.get::<_, String>(0).to_ascii_lowercase(),
                KeyGrant {
                    org_id: row.get(1),
                    label: "primary".into(),
                    points_per_sec: rate.filter(|r| *r > 0).map(|r| r as u32),
                },
            );
        }
        let mut next_expiry: Option<f64> = None;
        if has_key_table {
            for row in client
                .query(
                    "SELECT k.key_hash, k.org_id, k.label, o.ingest_points_per_sec, \
                            EXTRACT(EPOCH FROM (k.expires_at - now()))::float8 \
                     FROM dbx_aviation.api_keys k JOIN dbx_aviation.organizations o USING (org_id) \
                     WHERE o.is_active AND k.revoked_at IS NULL \
                       AND (k.expires_at IS NULL OR k.expires_at > now())",
                    &[],
                )
                .await?
            {
                let rate: Option<i32> = row.get(3);
                // Seconds until expiry by the database's clock, so clock skew does not matter.
                if let Some(secs) = row.get::<_, Option<f64>>(4) {
                    next_expiry = Some(next_expiry.map_or(secs, |n| n.min(secs)));
                }
                snap.insert_key(
                    row.get::<_, String>(0).to_ascii_lowercase(),
                    KeyGrant {
                        org_id: row.get(1),
                        label: row.get(2),
                        points_per_sec: rate.filter(|r| *r > 0).map(|r| r as u32),
                    },
                );
            }
        }
        *self.next_expiry.lock().expect("next expiry lock") = next_expiry.map(|secs| {
            // A little after the instant, so that the reload no longer sees the key.
            let wait = Duration::from_secs_f64(secs.clamp(0.0, 86_400.0 * 365.0));
            tokio::time::Instant::now() + wait + Duration::from_millis(50)
        });
        for row in client
            .query(
                "SELECT org_code, org_id, ingest_points_per_sec FROM dbx_aviation.organizations \
                 WHERE is_active",
                &[],
            )
            .await?
        {
            let rate: Option<i32> = row.get(2);
            let (code, org_id): (String, Uuid) = (row.get(0), row.get(1));
            snap.org_codes.insert(org_id, code.clone());
            snap.orgs_by_code.insert(
                code,
                OrgGrant {
                    org_id,
                    points_per_sec: rate.filter(|r| *r > 0).map(|r| r as u32),
                },
            );
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
        let snap = Arc::new(snap);
        *self.snapshot.write().expect("auth snapshot lock") = snap.clone();
        // The snapshot is authoritative again (a retired aircraft must stop resolving).
        *self.aircraft_found.lock().expect("aircraft cache lock") = TwoGen::new(10_000);
        *self.aircraft_missing.lock().expect("aircraft cache lock") = TwoGen::new(10_000);
        self.changes.send_modify(|g| *g += 1);
        Ok(snap)
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
        if let Some(id) = self
            .aircraft_found
            .lock()
            .expect("aircraft cache lock")
            .get(&key)
        {
            return Ok(Some(id));
        }
        if let Some(at) = self
            .aircraft_missing
            .lock()
            .expect("aircraft cache lock")
            .get(&key)
        {
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
                self.aircraft_found
                    .lock()
                    .expect("aircraft cache lock")
                    .insert(key, id);
                Ok(Some(id))
            }
            None => {
                self.aircraft_missing
                    .lock()
                    .expect("aircraft cache lock")
                    .insert(key, std::time::Instant::now());
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
        listen_config: dbx_pg::Connector,
        refresh_every: Duration,
        mut shutdown: Shutdown,
    ) {
        tokio::spawn(self.clone().run_usage_flusher(shutdown.clone()));
        const FIRST_RETRY: Duration = Duration::from_millis(200);
        let mut backoff = FIRST_RETRY;
        loop {
            let started = tokio::time::Instant::now();
            let session = self.listen_once(&listen_config, refresh_every, shutdown.clone());
            tokio::select! {
                _ = shutdown.recv() => return,
                res = session => {
                    if let Err(e) = res {
                        metrics::counter!(dbx_core::metrics::AUTH_REFRESH_FAILURES_TOTAL).increment(1);
                        tracing::warn!(error = %e, retry_in = ?backoff, "auth change listener lost its connection; retrying");
                    }
                }
            }
            // A session that lasted was healthy: the next outage starts the backoff afresh.
            if started.elapsed() > refresh_every.max(Duration::from_secs(30)) {
                backoff = FIRST_RETRY;
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
        config: &dbx_pg::Connector,
        refresh_every: Duration,
        mut shutdown: Shutdown,
    ) -> Result<(), AuthError> {
        let (client, mut connection) = config.connect_raw().await?;
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
            let expiry = *self.next_expiry.lock().expect("next expiry lock");
            tokio::select! {
                _ = shutdown.recv() => { driver.abort(); return Ok(()); }
                n = notes.recv() => {
                    if n.is_none() { break; }
                    // Coalesce a burst of notifications into one reload.
                    while notes.try_recv().is_ok() {}
                    self.reload().await?;
                }
                _ = timer.tick() => self.reload().await?,
                // A key expires: reload so that it is refused and its connections close.
                _ = tokio::time::sleep_until(expiry.unwrap_or_else(tokio::time::Instant::now)), if expiry.is_some() => {
                    self.reload().await?;
                }
            }
        }
        match driver.await {
            Ok(Err(e)) => Err(e.into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(label: &str) -> KeyGrant {
        KeyGrant {
            org_id: Uuid::nil(),
            label: label.into(),
            points_per_sec: None,
        }
    }

    #[test]
    fn a_mac_finds_its_key_among_keys_sharing_a_kid() {
        let mut snap = AuthSnapshot::default();
        // Two stored hashes with the same first 8 bytes (the kid), and a real one.
        let a = format!("{}{}", "ab".repeat(8), "01".repeat(24));
        let b = format!("{}{}", "ab".repeat(8), "02".repeat(24));
        snap.insert_key(b.clone(), grant("b"));
        snap.insert_key(a.clone(), grant("a"));
        snap.insert_key(hash_key("dbx_real"), grant("real"));
        let raw_b = raw_hash(&b).unwrap();
        let kid = dbx_proto::mac::key_id(&raw_b);
        assert_eq!(kid, 0xabab_abab_abab_abab);
        let mac = dbx_proto::mac::body_mac(&raw_b, b"batch");
        let (hash, g) = snap.key_by_mac(kid, &mac, b"batch").unwrap();
        assert_eq!((hash, g.label.as_str()), (b.as_str(), "b"));
        // Wrong body, wrong kid, a MAC by no stored key: nothing.
        assert!(snap.key_by_mac(kid, &mac, b"batcH").is_none());
        assert!(snap.key_by_mac(kid ^ 1, &mac, b"batch").is_none());
        let forged = dbx_proto::mac::body_mac(&dbx_proto::mac::key_hash("guess"), b"batch");
        assert!(snap.key_by_mac(kid, &forged, b"batch").is_none());
        // The real key through its own kid.
        let real = dbx_proto::mac::key_hash("dbx_real");
        let mac = dbx_proto::mac::body_mac(&real, b"x");
        assert_eq!(
            snap.key_by_mac(dbx_proto::mac::key_id(&real), &mac, b"x")
                .unwrap()
                .1
                .label,
            "real"
        );
    }
}
