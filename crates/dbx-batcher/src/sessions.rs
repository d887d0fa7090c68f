//! Flight session bookkeeping done in the same transaction as the telemetry
//! (docs/protocol.md, "Flight sessions"): departure is the stored point with the smallest
//! `ts`, arrival the largest, the duration their difference, `point_count` the rows
//! stored, and `total_distance_km` the great-circle sum over consecutive positioned
//! points in `seq` order.
//!
//! A flush first upserts every session it carries ([`UPSERT_SQL`], in session-id
//! order so that concurrent flushes lock rows in one order and cannot deadlock). The
//! upsert creates new sessions, refuses sessions of another organization or aircraft
//! and claims whose aircraft is not an active aircraft of the batch's (active)
//! organization (no row returned), locks the row and returns its current statistics.
//! The listener checks the same for live batches from its cache; here it is checked
//! again, in the transaction that writes the rows, for every batch — which is what
//! covers batches replayed from the disk spool after a restart (an aircraft retired,
//! an organization deactivated, or a tampered segment meanwhile). [`ACTIVE_AIRCRAFT_SQL`]
//! then tells the two refusals apart (`unknown_aircraft` or `foreign_session`). After the
//! rows are written, [`SessionUpdate::compute`] folds the rows actually inserted
//! into those statistics; the distance is extended incrementally from
//! `(last_latitude, last_longitude)` when every new `seq` is above `last_seq`, and is
//! recomputed from the table ([`RECOMPUTE_SQL`]) when a late point landed below it.
//! Only statistics columns are updated, so the audit trigger's WHEN clause skips them.
//! The update also stamps `last_point_at`, what the idle-session completer of the
//! control plane measures a session's silence from.
//!
//! The upsert also says whether the session is completed (`flight_status =
//! 'completed'`, protocol 1.1): the writer then checks with [`STORED_SQL`] whether a
//! batch only repeats stored points.

use chrono::{DateTime, Utc};
use tokio_postgres::Row;
use uuid::Uuid;

/// Mean Earth radius (km) the protocol fixes for distances.
pub const EARTH_RADIUS_KM: f64 = 6371.0088;

/// Creates missing sessions, checks ownership, locks and returns the current row.
/// A claim (session, organization, aircraft) is only considered when the aircraft is an
/// active aircraft of that organization and the organization is active (two primary-key
/// lookups per session of the flush). `updated_at = s.updated_at` changes nothing (and
/// fires no audit) but makes the conflicting row part of the result, locked.
pub const UPSERT_SQL: &str = "INSERT INTO dbx_aviation.flight_sessions AS s \
(session_id, org_id, aircraft_id) \
SELECT u.session_id, u.org_id, u.aircraft_id \
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS u(session_id, org_id, aircraft_id) \
JOIN dbx_aviation.aircraft_registry a \
ON a.aircraft_id = u.aircraft_id AND a.org_id = u.org_id AND a.is_active \
JOIN dbx_aviation.organizations o ON o.org_id = u.org_id AND o.is_active \
ON CONFLICT (session_id) DO UPDATE SET updated_at = s.updated_at \
WHERE s.org_id = EXCLUDED.org_id AND s.aircraft_id = EXCLUDED.aircraft_id \
RETURNING s.session_id, s.last_seq, s.last_latitude, s.last_longitude, \
s.actual_departure, s.departure_latitude, s.departure_longitude, \
s.actual_arrival, s.arrival_latitude, s.arrival_longitude, \
s.total_distance_km, s.point_count, s.flight_status = 'completed'";

/// Which of the `(session, seq)` pairs given as two arrays are stored (a batch for a
/// completed session is acknowledged only when all of its points are).
pub const STORED_SQL: &str = "SELECT u.session_id, u.seq \
FROM unnest($1::uuid[], $2::int8[]) AS u(session_id, seq) \
WHERE EXISTS (SELECT 1 FROM dbx_aviation.flight_telemetry e \
WHERE e.session_id = u.session_id AND e.seq = u.seq)";

/// [`STORED_SQL`] for a Citus cluster, where a subquery correlated with `unnest` is refused
/// ("correlated subqueries are not supported when the FROM clause contains a set returning
/// function"): the stored rows among the sessions and the seqs (a superset of the pairs asked
/// for, each one truly stored; the caller looks up only the pairs it asked for).
pub const STORED_CITUS_SQL: &str = "SELECT e.session_id, e.seq \
FROM dbx_aviation.flight_telemetry e \
WHERE e.session_id = ANY($1::uuid[]) AND e.seq = ANY($2::int8[])";

/// Of the claims (session, organization, aircraft) the upsert refused, the sessions whose
/// aircraft is an active aircraft of an active organization: those were refused because
/// the session belongs to someone else (`foreign_session`); the others name an aircraft
/// that is not the organization's, retired, or of an inactive organization
/// (`unknown_aircraft`). Runs only when the upsert refused something.
pub const ACTIVE_AIRCRAFT_SQL: &str = "SELECT u.session_id \
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS u(session_id, org_id, aircraft_id) \
JOIN dbx_aviation.aircraft_registry a \
ON a.aircraft_id = u.aircraft_id AND a.org_id = u.org_id AND a.is_active \
JOIN dbx_aviation.organizations o ON o.org_id = u.org_id AND o.is_active";

/// True when row-level security would hide aircraft or organizations from this role (an
/// ingest role without BYPASSRLS, a deployment error): the ownership check would then
/// refuse every claim, so the writer retries instead of nacking.
pub const RLS_HIDES_OWNERS_SQL: &str = "SELECT \
row_security_active('dbx_aviation.aircraft_registry') \
OR row_security_active('dbx_aviation.organizations')";

/// Writes the new statistics of every session of a flush.
pub const UPDATE_SQL: &str = "UPDATE dbx_aviation.flight_sessions AS s SET \
actual_departure = u.dep_ts, departure_latitude = u.dep_lat, departure_longitude = u.dep_lon, \
actual_arrival = u.arr_ts, arrival_latitude = u.arr_lat, arrival_longitude = u.arr_lon, \
flight_duration_seconds = u.dur, point_count = u.cnt, last_seq = u.last_seq, \
last_latitude = u.last_lat, last_longitude = u.last_lon, total_distance_km = u.dist, \
last_point_at = now(), updated_at = now() \
FROM unnest($1::uuid[], $2::timestamptz[], $3::float8[], $4::float8[], $5::timestamptz[], \
$6::float8[], $7::float8[], $8::int4[], $9::int8[], $10::int8[], $11::float8[], $12::float8[], \
$13::float8[]) AS u(session_id, dep_ts, dep_lat, dep_lon, arr_ts, arr_lat, arr_lon, dur, cnt, \
last_seq, last_lat, last_lon, dist) \
WHERE s.session_id = u.session_id";

/// Distance and last position of sessions, from the stored rows in `seq` order (the same
/// haversine as [`haversine_km`]; `least(1, …)` guards asin against rounding above 1, and
/// the FILTER skips each session's first point, which has no predecessor).
pub const RECOMPUTE_SQL: &str = "SELECT session_id, \
coalesce(sum(2 * 6371.0088 * asin(least(1.0, sqrt( \
power(sin(radians(latitude - plat) / 2), 2) + \
cos(radians(plat)) * cos(radians(latitude)) * power(sin(radians(longitude - plon) / 2), 2) \
)))) FILTER (WHERE plat IS NOT NULL), 0)::float8, \
max(latitude) FILTER (WHERE rn = 1), max(longitude) FILTER (WHERE rn = 1) FROM ( \
SELECT session_id, latitude, longitude, \
lag(latitude) OVER w AS plat, lag(longitude) OVER w AS plon, \
row_number() OVER (PARTITION BY session_id ORDER BY seq DESC) AS rn \
FROM dbx_aviation.flight_telemetry \
WHERE session_id = ANY($1) AND latitude IS NOT NULL AND longitude IS NOT NULL \
WINDOW w AS (PARTITION BY session_id ORDER BY seq)) t GROUP BY session_id";

/// Great-circle distance in km between two (latitude, longitude) points in degrees.
pub fn haversine_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1) = (a.0.to_radians(), a.1.to_radians());
    let (la2, lo2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

/// A session row as the upsert returned it (locked for the rest of the transaction).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionState {
    /// The session.
    pub session_id: Uuid,
    /// Largest stored seq.
    pub last_seq: Option<i64>,
    /// Position of the positioned point with the largest seq.
    pub last_pos: Option<(f64, f64)>,
    /// Departure time and position.
    pub departure: Option<(i64, Option<f64>, Option<f64>)>,
    /// Arrival time and position.
    pub arrival: Option<(i64, Option<f64>, Option<f64>)>,
    /// Distance so far.
    pub distance_km: f64,
    /// Rows stored so far.
    pub point_count: i64,
    /// `flight_status = 'completed'`: the session takes no new points.
    pub completed: bool,
}

impl SessionState {
    /// Reads a row of [`UPSERT_SQL`].
    pub fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error> {
        let micros = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_micros());
        let pos = |a: Option<f64>, b: Option<f64>| Some((a?, b?));
        let dep: Option<DateTime<Utc>> = row.try_get(4)?;
        let arr: Option<DateTime<Utc>> = row.try_get(7)?;
        Ok(SessionState {
            session_id: row.try_get(0)?,
            last_seq: row.try_get(1)?,
            last_pos: pos(row.try_get(2)?, row.try_get(3)?),
            departure: micros(dep)
                .map(|t| Ok::<_, tokio_postgres::Error>((t, row.try_get(5)?, row.try_get(6)?)))
                .transpose()?,
            arrival: micros(arr)
                .map(|t| Ok::<_, tokio_postgres::Error>((t, row.try_get(8)?, row.try_get(9)?)))
                .transpose()?,
            distance_km: row.try_get(10)?,
            point_count: row.try_get(11)?,
            completed: row.try_get(12)?,
        })
    }
}

/// A row this flush inserted, as far as the statistics care.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InsertedRow {
    /// Point seq.
    pub seq: i64,
    /// Microseconds since the Unix epoch.
    pub ts: i64,
    /// Latitude.
    pub lat: Option<f64>,
    /// Longitude.
    pub lon: Option<f64>,
}

/// New statistics of one session.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionUpdate {
    /// The session.
    pub session_id: Uuid,
    /// Departure (earliest point).
    pub departure: (i64, Option<f64>, Option<f64>),
    /// Arrival (latest point).
    pub arrival: (i64, Option<f64>, Option<f64>),
    /// Arrival − departure, whole seconds (rounded).
    pub duration_s: i32,
    /// Stored rows.
    pub point_count: i64,
    /// Largest stored seq.
    pub last_seq: i64,
    /// Position of the positioned point with the largest seq.
    pub last_pos: Option<(f64, f64)>,
    /// Total distance; stale when `recompute` is set.
    pub distance_km: f64,
    /// A late point landed below `last_seq`: distance and last position must be
    /// recomputed from the table.
    pub recompute: bool,
}

impl SessionUpdate {
    /// Folds the rows this flush inserted into `state`; `None` when it inserted none.
    pub fn compute(state: &SessionState, rows: &mut [InsertedRow]) -> Option<SessionUpdate> {
        if rows.is_empty() {
            return None;
        }
        rows.sort_unstable_by_key(|r| r.seq);
        // Departure: smallest ts (ties: the smaller seq, and the stored one first).
        let mut departure = state.departure;
        let mut arrival = state.arrival;
        for r in rows.iter() {
            if departure.is_none_or(|d| r.ts < d.0) {
                departure = Some((r.ts, r.lat, r.lon));
            }
            if arrival.is_none_or(|a| r.ts > a.0) {
                arrival = Some((r.ts, r.lat, r.lon));
            }
        }
        let (departure, arrival) = (departure?, arrival?);
        let duration_us = arrival.0.saturating_sub(departure.0);
        let duration_s = ((duration_us as f64) / 1e6).round();
        let duration_s = duration_s.clamp(i32::MIN as f64, i32::MAX as f64) as i32;

        let first_seq = rows[0].seq;
        let max_seq = rows[rows.len() - 1].seq;
        let recompute = state.last_seq.is_some_and(|m| first_seq <= m);
        let mut last_pos = state.last_pos;
        let mut distance_km = state.distance_km;
        if !recompute {
            for r in rows.iter() {
                if let (Some(lat), Some(lon)) = (r.lat, r.lon) {
                    if let Some(prev) = last_pos {
                        distance_km += haversine_km(prev, (lat, lon));
                    }
                    last_pos = Some((lat, lon));
                }
            }
        }
        Some(SessionUpdate {
            session_id: state.session_id,
            departure,
            arrival,
            duration_s,
            point_count: state.point_count + rows.len() as i64,
            last_seq: state.last_seq.map_or(max_seq, |m| m.max(max_seq)),
            last_pos,
            distance_km,
            recompute,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> SessionState {
        SessionState {
            session_id: Uuid::nil(),
            last_seq: None,
            last_pos: None,
            departure: None,
            arrival: None,
            distance_km: 0.0,
            point_count: 0,
            completed: false,
        }
    }

    fn row(seq: i64, ts: i64, pos: Option<(f64, f64)>) -> InsertedRow {
        InsertedRow {
            seq,
            ts,
            lat: pos.map(|p| p.0),
            lon: pos.map(|p| p.1),
        }
    }

    #[test]
    fn haversine_known_values() {
        // One degree of longitude on the equator: R·π/180.
        let d = haversine_km((0.0, 0.0), (0.0, 1.0));
        assert!((d - EARTH_RADIUS_KM * std::f64::consts::PI / 180.0).abs() < 1e-9);
        // Antipodes: half the circumference.
        let d = haversine_km((0.0, 0.0), (0.0, 180.0));
        assert!((d - EARTH_RADIUS_KM * std::f64::consts::PI).abs() < 1e-6);
        assert_eq!(haversine_km((10.0, 20.0), (10.0, 20.0)), 0.0);
    }

    #[test]
    fn first_flush_and_incremental_extension() {
        let mut rows = vec![
            row(2, 2_000_000, Some((0.0, 1.0))),
            row(1, 1_000_000, Some((0.0, 0.0))),
            row(3, 3_500_000, None),
        ];
        let u = SessionUpdate::compute(&state(), &mut rows).unwrap();
        assert_eq!(u.departure, (1_000_000, Some(0.0), Some(0.0)));
        assert_eq!(u.arrival, (3_500_000, None, None));
        assert_eq!(u.duration_s, 3); // 2.5 s rounds to 3
        assert_eq!(u.point_count, 3);
        assert_eq!(u.last_seq, 3);
        assert_eq!(u.last_pos, Some((0.0, 1.0)));
        assert!(!u.recompute);
        let one_deg = haversine_km((0.0, 0.0), (0.0, 1.0));
        assert!((u.distance_km - one_deg).abs() < 1e-12);

        let st = SessionState {
            last_seq: Some(3),
            last_pos: u.last_pos,
            departure: Some(u.departure),
            arrival: Some(u.arrival),
            distance_km: u.distance_km,
            point_count: u.point_count,
            ..state()
        };
        let mut rows = vec![row(4, 4_000_000, Some((0.0, 2.0)))];
        let u2 = SessionUpdate::compute(&st, &mut rows).unwrap();
        assert!((u2.distance_km - 2.0 * one_deg).abs() < 1e-9);
        assert_eq!(u2.point_count, 4);
        assert_eq!(u2.departure.0, 1_000_000);
        assert_eq!(u2.arrival, (4_000_000, Some(0.0), Some(2.0)));

        // A late point below last_seq asks for a recompute and may move departure.
        let mut rows = vec![row(0, 500_000, Some((1.0, 0.0)))];
        let u3 = SessionUpdate::compute(&st, &mut rows).unwrap();
        assert!(u3.recompute);
        assert_eq!(u3.departure, (500_000, Some(1.0), Some(0.0)));
        assert_eq!(u3.last_seq, 3);
        assert!(SessionUpdate::compute(&st, &mut []).is_none());
    }
}
