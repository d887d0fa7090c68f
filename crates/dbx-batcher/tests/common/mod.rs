//! Shared fixture of the batcher's integration tests: a fresh database with the
//! project's migrations applied, two organizations with one aircraft each, a
//! deadpool pool connected as the ingest role, and helpers to make points and
//! batches and to read rows back.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dbx_batcher::{Batcher, BatcherConfig, BatcherHandle};
#[allow(unused_imports)] // not every test binary that includes this module uses it
pub use dbx_core::now_micros;
use dbx_core::{
    AckHandle, AckReceiver, BatchOrigin, BatchOutcome, Point, RejectCode, TelemetryBatch,
};
use dbx_testkit::TestDb;
use deadpool_postgres::Pool;
use rand::Rng;
use tokio::sync::mpsc;
use uuid::Uuid;

/// One tenant with one aircraft.
#[derive(Debug, Clone, Copy)]
pub struct Tenant {
    pub org: Uuid,
    pub aircraft: Uuid,
}

pub struct Fixture {
    pub db: TestDb,
    pub a: Tenant,
    pub b: Tenant,
}

pub async fn fixture() -> Fixture {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    dbx_control::migrate::apply(&mut client)
        .await
        .expect("applying the migrations");
    // The daemon's login role; the same password for every test database (roles are
    // cluster-wide and tests run in parallel).
    {
        // Once per process: concurrent ALTER ROLE of one role fails with "tuple
        // concurrently updated".
        static PASSWORD_SET: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
        PASSWORD_SET
            .get_or_init(|| async {
                client
                    .batch_execute("ALTER ROLE dbx_ingest_service PASSWORD 'batcher-test'")
                    .await
                    .expect("setting the ingest password");
            })
            .await;
    }
    let mut tenants = Vec::new();
    for i in 0..2 {
        let org = Uuid::new_v4();
        let aircraft = Uuid::new_v4();
        client
            .execute(
                "INSERT INTO dbx_aviation.organizations (org_id, org_code, org_name, org_type, api_key_hash) \
                 VALUES ($1, $2, $2, 'operator', $3)",
                &[&org, &format!("ORG{i}-{}", &org.to_string()[..8]), &format!("{:064x}", org.as_u128())],
            )
            .await
            .expect("inserting an organization");
        client
            .execute(
                "INSERT INTO dbx_aviation.aircraft_registry (aircraft_id, org_id, registration_number, aircraft_type) \
                 VALUES ($1, $2, $3, 'uav')",
                &[&aircraft, &org, &format!("N{i}")],
            )
            .await
            .expect("inserting an aircraft");
        tenants.push(Tenant { org, aircraft });
    }
    Fixture {
        db,
        a: tenants[0],
        b: tenants[1],
    }
}

impl Fixture {
    /// A pool connected as `dbx_ingest_service`, the daemon's login role.
    pub fn pool(&self, size: usize) -> Pool {
        pool_for(&self.db.url_for("dbx_ingest_service", "batcher-test"), size)
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        self.db.client().await
    }
}

/// A pool like the daemon's (dbx-pg), of `size` connections to `url`.
pub fn pool_for(url: &str, size: usize) -> Pool {
    dbx_testkit::pool(url, size)
}

/// A config for tests: small groups, a long age unless a test wants one.
pub fn config() -> BatcherConfig {
    BatcherConfig {
        max_batch_rows: 1000,
        max_batch_age_ms: 20,
        retry_initial_ms: 20,
        retry_max_ms: 200,
        shutdown_deadline_ms: 60_000,
        ..BatcherConfig::default()
    }
}

pub fn start(config: BatcherConfig, pool: Pool) -> (mpsc::Sender<TelemetryBatch>, BatcherHandle) {
    let (tx, rx) = mpsc::channel(config.queue_capacity);
    (tx, Batcher::spawn(config, pool, rx))
}

pub fn batch(t: Tenant, session: Uuid, points: Vec<Point>) -> (TelemetryBatch, AckReceiver) {
    let (ack, rx) = AckHandle::channel();
    (
        TelemetryBatch {
            org_id: t.org,
            aircraft_id: t.aircraft,
            session_id: session,
            points,
            ack,
            origin: BatchOrigin::Tcp,
            received_at: Instant::now(),
            admitted_at: Instant::now(),
            queued_at: Instant::now(),
            ends_session: false,
        },
        rx,
    )
}

pub async fn outcome(rx: AckReceiver) -> BatchOutcome {
    tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .expect("no outcome within 60 s")
        .expect("ack handle dropped unanswered")
}

/// The code of a batch's rejection; fails the test on any other outcome.
pub async fn rejection(rx: AckReceiver) -> RejectCode {
    match outcome(rx).await {
        BatchOutcome::Rejected(r) => r.code,
        o => panic!("expected a rejection, got {o:?}"),
    }
}

/// A point with every field set to something random, some of them NULL.
pub fn random_point(rng: &mut impl Rng, ts: i64, seq: i64) -> Point {
    let mut opt = |p: f64| rng.gen_bool(p);
    let (a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, q, r, s, u) = (
        opt(0.8),
        opt(0.8),
        opt(0.8),
        opt(0.8),
        opt(0.8),
        opt(0.8),
        opt(0.8),
        opt(0.8),
        opt(0.8),
        opt(0.8),
        opt(0.8),
        opt(0.8),
        opt(0.8),
        opt(0.8),
        opt(0.8),
        opt(0.8),
        opt(0.8),
        opt(0.8),
        opt(0.5),
    );
    let mut f32r = |on: bool, lo: f32, hi: f32| on.then(|| rng.gen_range(lo..=hi));
    let alt = f32r(c, -100.0, 12_000.0);
    let gs = f32r(d, 0.0, 300.0);
    let vs = f32r(e, -50.0, 50.0);
    let hdg = f32r(f, 0.0, 360.0);
    let roll = f32r(g, -180.0, 180.0);
    let pitch = f32r(h, -90.0, 90.0);
    let yaw = f32r(i, -180.0, 180.0);
    let ias = f32r(j, 0.0, 300.0);
    let bv = f32r(k, 0.0, 60.0);
    let bi = f32r(l, -100.0, 100.0);
    let bp = f32r(m, 0.0, 100.0);
    let temp = f32r(s, -60.0, 60.0);
    let lat = a.then(|| rng.gen_range(-90.0..=90.0));
    let lon = b.then(|| rng.gen_range(-180.0..=180.0));
    let mut arr = |on: bool| {
        on.then(|| {
            let n = rng.gen_range(0..=16);
            (0..n)
                .map(|_| rng.gen_range(-1e5f32..1e5))
                .collect::<Vec<f32>>()
        })
    };
    let rpm = arr(n);
    let cs = arr(o);
    let fix = q.then(|| rng.gen_range(0..=8));
    let sats = r.then(|| rng.gen_range(0..=255));
    let extra = u.then(|| {
        serde_json::json!({
            "k": rng.gen_range(0..1000),
            "s": format!("v{}\"é", rng.gen_range(0..10)),
            "nested": {"a": [1, 2.5, null, true]},
        })
        .to_string()
    });
    Point {
        ts_micros: ts,
        seq,
        lat,
        lon,
        alt,
        gs,
        vs,
        hdg,
        roll,
        pitch,
        yaw,
        ias,
        bv,
        bi,
        bp,
        rpm,
        cs,
        fix,
        sats,
        temp,
        extra,
    }
}

/// Every stored row of a session as a Point, by seq, with the relation it sits in.
pub async fn read_points(
    c: &tokio_postgres::Client,
    session: Uuid,
) -> Vec<(String, Uuid, Uuid, Point)> {
    let rows = c
        .query(
            "SELECT tableoid::regclass::text, org_id, aircraft_id, ts, seq, latitude, longitude, altitude_m, \
             ground_speed_mps, vertical_speed_mps, heading_deg, roll_deg, pitch_deg, yaw_deg, \
             airspeed_mps, battery_voltage, battery_current, battery_remaining_pct, motor_rpm, \
             control_surfaces, gps_fix, satellites, temperature_c, extra \
             FROM dbx_aviation.flight_telemetry WHERE session_id = $1 ORDER BY seq, ts",
            &[&session],
        )
        .await
        .expect("reading telemetry");
    rows.iter()
        .map(|r| (r.get::<_, String>(0), r.get(1), r.get(2), point_from_row(r)))
        .collect()
}

pub async fn count(c: &tokio_postgres::Client, sql: &str, session: Uuid) -> i64 {
    c.query_one(sql, &[&session])
        .await
        .expect("counting")
        .get(0)
}

/// The partition name for a timestamp (daily).
pub fn day_partition(ts_micros: i64) -> String {
    let t = DateTime::<Utc>::from_timestamp_micros(ts_micros).expect("timestamp in range");
    format!("dbx_aviation.flight_telemetry_p{}", t.format("%Y%m%d"))
}

/// A point read back from a row with the contract's column order (column 3 = ts).
pub fn point_from_row(r: &tokio_postgres::Row) -> Point {
    let ts: chrono::DateTime<chrono::Utc> = r.get(3);
    let extra: Option<serde_json::Value> = r.get(23);
    Point {
        ts_micros: ts.timestamp_micros(),
        seq: r.get(4),
        lat: r.get(5),
        lon: r.get(6),
        alt: r.get(7),
        gs: r.get(8),
        vs: r.get(9),
        hdg: r.get(10),
        roll: r.get(11),
        pitch: r.get(12),
        yaw: r.get(13),
        ias: r.get(14),
        bv: r.get(15),
        bi: r.get(16),
        bp: r.get(17),
        rpm: r.get(18),
        cs: r.get(19),
        fix: r.get(20),
        sats: r.get(21),
        temp: r.get(22),
        extra: extra.map(|v| v.to_string()),
    }
}

/// Points `seqs` one second apart from `t0`, positioned (moving north by 0.001° a point).
pub fn pts(t0: i64, seqs: impl IntoIterator<Item = i64>) -> Vec<Point> {
    seqs.into_iter()
        .map(|s| {
            let mut p = Point::new(t0 + s * 1_000_000, s);
            p.lat = Some(47.0 + s as f64 * 1e-3);
            p.lon = Some(8.0);
            p
        })
        .collect()
}
