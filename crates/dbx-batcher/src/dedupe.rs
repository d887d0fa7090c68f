//! Exactly-once: per-session high-water marks and the staging path.
//!
//! A session's mark is the largest point `seq` stored for it (`flight_sessions.last_seq`).
//! Points above the mark cannot be stored yet and take the fast path (binary COPY
//! straight into the partition). Points at or below it may be resends or late,
//! out-of-order points; they take the staging path: COPY into a per-connection TEMP
//! table, then `INSERT … SELECT … WHERE NOT EXISTS … ON CONFLICT DO NOTHING`, which
//! stores each `(session, seq)` once and reports the rows it did insert.
//!
//! The marks live in a bounded [`SessionCache`] so that a flush can be planned and
//! encoded before it takes a connection. The cache is only a hint: the flush's session
//! upsert returns the authoritative mark under the session row's lock (which also
//! serializes concurrent flushes of one session), and a flush whose hint was wrong is
//! re-planned before anything is written. A miss is therefore free: the mark is
//! loaded lazily from that same upsert the first time a session is seen after start.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use crate::copy::COLUMNS;

/// Creates the staging table once per connection (a no-op with a NOTICE afterwards).
pub const CREATE_STAGING_SQL: &str = "CREATE TEMP TABLE IF NOT EXISTS dbx_staging \
(LIKE dbx_aviation.flight_telemetry) ON COMMIT DELETE ROWS";

/// COPY into the staging table.
pub fn copy_staging_sql() -> String {
    format!("COPY pg_temp.dbx_staging ({COLUMNS}) FROM STDIN (FORMAT binary)")
}

/// Moves staged rows that are not yet stored into `target` (a child or the parent),
/// returning what it inserted. `NOT EXISTS` makes `(session, seq)` the identity, as
/// the protocol says; `ON CONFLICT` on the contract's unique index is the backstop.
pub fn insert_from_staging_sql(target: &str) -> String {
    format!(
        "INSERT INTO {target} ({COLUMNS}) SELECT {COLUMNS} FROM pg_temp.dbx_staging s \
         WHERE NOT EXISTS (SELECT 1 FROM dbx_aviation.flight_telemetry e \
         WHERE e.session_id = s.session_id AND e.seq = s.seq) \
         ON CONFLICT (session_id, seq, ts) DO NOTHING \
         RETURNING session_id, seq, ts, latitude, longitude"
    )
}

/// Whether this database has the `citus` extension (then [`insert_from_staging_citus_sql`] is
/// used, which also works on tables Citus does not distribute): asked once per batcher, on its
/// first staging path.
pub const CITUS_SQL: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus')";

/// [`insert_from_staging_sql`] for a Citus cluster (`dbx setup --distributed`): Citus refuses
/// the correlated `NOT EXISTS` between the local staging table and the distributed telemetry,
/// so the stored `(session, seq)` of the flush's sessions (`$1`, a `uuid[]`) are read by an
/// uncorrelated subquery, which Citus runs on the shards of those sessions only; the rest is the
/// same statement, with the same `ON CONFLICT` backstop.
pub fn insert_from_staging_citus_sql(target: &str) -> String {
    format!(
        "INSERT INTO {target} ({COLUMNS}) SELECT {COLUMNS} FROM pg_temp.dbx_staging s \
         WHERE (s.session_id, s.seq) NOT IN (SELECT e.session_id, e.seq \
         FROM dbx_aviation.flight_telemetry e WHERE e.session_id = ANY($1::uuid[])) \
         ON CONFLICT (session_id, seq, ts) DO NOTHING \
         RETURNING session_id, seq, ts, latitude, longitude"
    )
}

/// A bounded map from session to high-water mark (`None`: the session exists but has
/// no stored point). Two generations approximate LRU in O(1): inserts go to the young
/// map; when it is full it becomes the old one and the previous old one is dropped;
/// a hit in the old generation is promoted.
#[derive(Debug)]
pub struct SessionCache {
    young: HashMap<Uuid, Option<i64>>,
    old: HashMap<Uuid, Option<i64>>,
    generation: usize,
}

impl SessionCache {
    /// A cache holding at most `capacity` sessions (at least 2).
    pub fn new(capacity: usize) -> Self {
        let generation = (capacity / 2).max(1);
        SessionCache {
            young: HashMap::with_capacity(generation.min(4096)),
            old: HashMap::new(),
            generation,
        }
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The mark of `session`: `None` on a miss, `Some(mark)` on a hit.
    pub fn get(&mut self, session: &Uuid) -> Option<Option<i64>> {
        if let Some(m) = self.young.get(session) {
            return Some(*m);
        }
        let m = self.old.remove(session)?;
        self.put(*session, m);
        Some(m)
    }

    /// Records a mark; never lowers one already held.
    pub fn put(&mut self, session: Uuid, mark: Option<i64>) {
        if let Some(cur) = self.young.get_mut(&session) {
            *cur = (*cur).max(mark);
            return;
        }
        let mark = self.old.remove(&session).map_or(mark, |m| m.max(mark));
        if self.young.len() >= self.generation {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(session, mark);
    }
}

/// Drops repeated seqs of one session within one flush, keeping the first.
/// Cheap in the usual case of increasing seqs: the set of seen seqs is built only
/// once a seq fails to exceed the largest seen so far.
#[derive(Debug, Default)]
pub struct InFlushDedupe {
    max: Option<i64>,
    seen: Option<HashSet<i64>>,
    kept: Vec<i64>,
}

impl InFlushDedupe {
    /// True when `seq` is new in this flush (and records it).
    pub fn admit(&mut self, seq: i64) -> bool {
        if self.max.is_none_or(|m| seq > m) {
            self.max = Some(seq);
            match &mut self.seen {
                Some(s) => {
                    s.insert(seq);
                }
                None => self.kept.push(seq),
            }
            return true;
        }
        let seen = self
            .seen
            .get_or_insert_with(|| std::mem::take(&mut self.kept).into_iter().collect());
        seen.insert(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_bounded_and_keeps_recent() {
        let mut c = SessionCache::new(4);
        let ids: Vec<Uuid> = (0..10u8).map(|i| Uuid::from_bytes([i; 16])).collect();
        for (i, id) in ids.iter().enumerate() {
            c.put(*id, Some(i as i64));
            assert!(c.len() <= 4, "len {}", c.len());
        }
        assert_eq!(c.get(&ids[9]), Some(Some(9)));
        assert_eq!(c.get(&ids[0]), None);
    }

    #[test]
    fn cache_never_lowers_a_mark() {
        let mut c = SessionCache::new(100);
        let id = Uuid::from_bytes([7; 16]);
        c.put(id, Some(10));
        c.put(id, Some(5));
        c.put(id, None);
        assert_eq!(c.get(&id), Some(Some(10)));
    }

    #[test]
    fn promotion_from_old_generation() {
        let mut c = SessionCache::new(4);
        let a = Uuid::from_bytes([1; 16]);
        c.put(a, Some(1));
        c.put(Uuid::from_bytes([2; 16]), None);
        c.put(Uuid::from_bytes([3; 16]), None); // a moves to the old generation
        assert_eq!(c.get(&a), Some(Some(1))); // promoted
        c.put(Uuid::from_bytes([4; 16]), None);
        c.put(Uuid::from_bytes([5; 16]), None);
        assert!(c.len() <= 4);
    }

    #[test]
    fn in_flush_dedupe_keeps_first() {
        let mut d = InFlushDedupe::default();
        let seqs = [1, 2, 3, 2, 5, 4, 4, 1, 6];
        let kept: Vec<i64> = seqs.into_iter().filter(|s| d.admit(*s)).collect();
        assert_eq!(kept, vec![1, 2, 3, 5, 4, 6]);
    }
}
