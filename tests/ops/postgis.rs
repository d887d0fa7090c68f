//! The seed's spatial intentions on real PostGIS (issue 19): flights ingested by a real daemon
//! into a database set up with `postgis = require` get geography endpoints that agree with the
//! distance the daemon computes, and the positions they sent answer radius queries.

use dbx_control::postgis::PostgisMode;
use dbx_core::Point;
use dbx_proto::{AircraftRef, PointForm};
use dbx_testkit::gateway::{now_micros, points};
use dbx_testkit::{Daemon, Fixture, TestDb, TestGateway};
use uuid::Uuid;

use crate::dbx_bin;

/// Zurich and Geneva airports (latitude, longitude).
const ZURICH: (f64, f64) = (47.4647, 8.5492);
const GENEVA: (f64, f64) = (46.2381, 6.1090);

/// `n` points of a flight at the given positions, one per second, from seq 1.
fn flight_points(positions: &[(f64, f64)], t0: i64) -> Vec<Point> {
    points(positions.len(), 1, t0)
        .into_iter()
        .zip(positions)
        .enumerate()
        .map(|(i, (mut p, &(lat, lon)))| {
            p.ts_micros = t0 + i as i64 * 1_000_000;
            p.lat = Some(lat);
            p.lon = Some(lon);
            p
        })
        .collect()
}

/// `n` positions on a circle of `radius_km` around `center` (a small-angle approximation:
/// what matters is the distance PostGIS measures, checked against our own count below).
fn circle(center: (f64, f64), radius_km: f64, n: usize) -> Vec<(f64, f64)> {
    let dlat = radius_km / 111.195;
    let dlon = dlat / center.0.to_radians().cos();
    (0..n)
        .map(|i| {
            let a = i as f64 / n as f64 * std::f64::consts::TAU;
            (center.0 + dlat * a.sin(), center.1 + dlon * a.cos())
        })
        .collect()
}

/// The great-circle distance in km on PostGIS's (and dbx-batcher's) sphere.
fn great_circle_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, la2) = (a.0.to_radians(), b.0.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((b.1 - a.1).to_radians() / 2.0).sin().powi(2);
    2.0 * 6371.0088 * h.sqrt().asin()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingested_flights_answer_distance_and_radius_queries_on_postgis() {
    dbx_testkit::prereq::pg_extension("postgis");
    let (db, ingest_url) = TestDb::migrated_with(PostgisMode::Require).await;
    let client = db.client().await;
    let org = Fixture::org(&client, "SPATIAL", None).await;
    Fixture::aircraft(&client, org.id, "HB-GIS").await;
    let aircraft = AircraftRef::Registration("HB-GIS".into());
    let daemon = Daemon::start(dbx_bin(), &ingest_url, &[]).await;

    // A two-point flight Zurich → Geneva, and a loop of 40 points 3 km around Zurich with
    // every other point pulled in to 1 km.
    let t0 = now_micros() - 3_600_000_000;
    let hop = Uuid::new_v4();
    let mut loop_positions = circle(ZURICH, 3.0, 20);
    loop_positions.extend(circle(ZURICH, 1.0, 20));
    let around = Uuid::new_v4();
    let (mut g, _) = TestGateway::hello(daemon.tcp, &org.key).await;
    let hop_points = flight_points(&[ZURICH, GENEVA], t0);
    g.send_batch(1, &aircraft, hop, &hop_points, PointForm::Map)
        .await;
    let around_points = flight_points(&loop_positions, t0);
    g.send_batch(2, &aircraft, around, &around_points, PointForm::Array)
        .await;
    // The hop lands: its arrival location is set when the flight is completed.
    g.send_end(3, hop).await;
    let (acked, nacks) = g.await_verdicts(3).await;
    assert_eq!((acked, nacks.len()), (3, 0), "{nacks:?}\n{}", daemon.log());

    // The endpoints PostGIS derives from what the daemon stored, and the distance between
    // them measured by PostGIS, agree with the daemon's total_distance_km.
    let row = client
        .query_one(
            "SELECT total_distance_km, point_count,
                    ST_Distance(departure_location, arrival_location, false) / 1000,
                    ST_Y(departure_location::geometry), ST_X(departure_location::geometry),
                    ST_Y(arrival_location::geometry), ST_X(arrival_location::geometry)
               FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&hop],
        )
        .await
        .expect("the two-point session");
    let (total, count, postgis_km): (f64, i64, f64) = (row.get(0), row.get(1), row.get(2));
    let endpoints: [f64; 4] = [row.get(3), row.get(4), row.get(5), row.get(6)];
    assert_eq!(count, 2);
    assert_eq!(endpoints, [ZURICH.0, ZURICH.1, GENEVA.0, GENEVA.1]);
    assert!(
        (postgis_km - total).abs() < 1e-6 * total,
        "ST_Distance {postgis_km} km vs total_distance_km {total} km"
    );
    assert!((total - great_circle_km(ZURICH, GENEVA)).abs() < 1e-6 * total);

    // A radius query over the positions the gateway sent: 2 km around Zurich holds exactly
    // the inner ring (and the hop's departure), whatever way the loop was flown.
    let expected = around_points
        .iter()
        .chain(&hop_points)
        .filter(|p| great_circle_km(ZURICH, (p.lat.unwrap(), p.lon.unwrap())) <= 2.0)
        .count() as i64;
    assert_eq!(expected, 21);
    let within: i64 = client
        .query_one(
            "SELECT count(*) FROM dbx_aviation.flight_telemetry
              WHERE org_id = $1
                AND ST_DWithin(ST_SetSRID(ST_MakePoint(longitude, latitude), 4326)::geography,
                               ST_SetSRID(ST_MakePoint($3, $2), 4326)::geography, 2000, false)",
            &[&org.id, &ZURICH.0, &ZURICH.1],
        )
        .await
        .expect("radius query")
        .get(0);
    assert_eq!(within, expected);
    // The loop's sessions depart within 4 km of Zurich (a GiST-indexed endpoint query).
    let departing: Vec<Uuid> = client
        .query(
            "SELECT session_id FROM dbx_aviation.flight_sessions
              WHERE ST_DWithin(departure_location, ST_MakePoint($2, $1)::geography, 4000)
              ORDER BY total_distance_km",
            &[&ZURICH.0, &ZURICH.1],
        )
        .await
        .expect("endpoint radius query")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(departing, vec![around, hop]);
}
