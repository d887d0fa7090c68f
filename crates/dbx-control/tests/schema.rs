//! The schema on its PostGIS branch: every case of `schema/cases.rs` with `postgis = require`
//! (PostGIS is a prerequisite scripts/test installs: `pg-extension:postgis` in
//! scripts/test-tools), and what only this branch has: the geography endpoints generated from
//! the coordinates, radius and distance queries through their GiST indexes, and the runner
//! refusing a PostGIS choice a database cannot honour. `schema_plain` runs the same cases on
//! the plain branch.

use dbx_control::migrate::{self, MigrateError, MigrationState};
use dbx_control::postgis::{PostgisError, PostgisMode, PostgisState};
use dbx_testkit::TestDb;
use tokio_postgres::Client;
use uuid::Uuid;

#[path = "schema/cases.rs"]
mod cases;
mod common;

/// The branch of the schema these tests run on.
const POSTGIS: PostgisMode = PostgisMode::Require;

/// (city, latitude, longitude) of the endpoints below.
const ZURICH: (f64, f64) = (47.4647, 8.5492);
const GENEVA: (f64, f64) = (46.2381, 6.1090);
const BASEL: (f64, f64) = (47.5896, 7.5299);
const BERLIN: (f64, f64) = (52.3667, 13.5033);

/// A session of `org` with the given endpoints (`None`: no positioned point yet).
async fn flight(
    c: &Client,
    org: Uuid,
    aircraft: Uuid,
    from: Option<(f64, f64)>,
    to: Option<(f64, f64)>,
) -> Uuid {
    c.query_one(
        "INSERT INTO dbx_aviation.flight_sessions
           (org_id, aircraft_id, actual_departure, departure_latitude, departure_longitude,
            arrival_latitude, arrival_longitude, flight_status)
         VALUES ($1, $2, now(), $3, $4, $5, $6, 'completed') RETURNING session_id",
        &[
            &org,
            &aircraft,
            &from.map(|p| p.0),
            &from.map(|p| p.1),
            &to.map(|p| p.0),
            &to.map(|p| p.1),
        ],
    )
    .await
    .unwrap()
    .get(0)
}

/// Sessions of the database departing within `km` of `at`, by radius query, sorted.
async fn departing_within(c: &Client, at: (f64, f64), km: f64) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = c
        .query(
            "SELECT session_id FROM dbx_aviation.flight_sessions
              WHERE ST_DWithin(departure_location,
                               ST_SetSRID(ST_MakePoint($2, $1), 4326)::geography, $3::float8 * 1000)",
            &[&at.0, &at.1, &km],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn endpoints_are_generated_from_the_coordinates_and_radius_queries_use_gist() {
    let (db, c) = cases::migrated().await;
    let org = common::new_org(&c, "GEO", 30).await;
    let other = common::new_org(&c, "GEO-OTHER", 30).await;
    let aircraft = cases::new_aircraft(&c, org, "HB-GEO", "quadcopter", "NULL").await;
    let theirs = cases::new_aircraft(&c, other, "HB-OTH", "quadcopter", "NULL").await;
    let zrh_gva = flight(&c, org, aircraft, Some(ZURICH), Some(GENEVA)).await;
    let bsl_zrh = flight(&c, org, aircraft, Some(BASEL), Some(ZURICH)).await;
    let ber = flight(&c, org, aircraft, Some(BERLIN), None).await;
    let unpositioned = flight(&c, org, aircraft, None, None).await;
    let other_zrh = flight(&c, other, theirs, Some(ZURICH), Some(BASEL)).await;

    // The geography points are the coordinates (x = longitude), NULL without them.
    let row = c
        .query_one(
            "SELECT ST_AsText(departure_location), ST_AsText(arrival_location),
                    ST_SRID(departure_location::geometry)
               FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&zrh_gva],
        )
        .await
        .unwrap();
    let (dep, arr, srid): (String, String, i32) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(dep, format!("POINT({} {})", ZURICH.1, ZURICH.0));
    assert_eq!(arr, format!("POINT({} {})", GENEVA.1, GENEVA.0));
    assert_eq!(srid, 4326);
    let nulls = c
        .query_one(
            "SELECT departure_location IS NULL, arrival_location IS NULL
               FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&unpositioned],
        )
        .await
        .unwrap();
    assert_eq!(
        (nulls.get::<_, bool>(0), nulls.get::<_, bool>(1)),
        (true, true)
    );

    // While a flight is active its arrival coordinates move with every flush but it has no
    // arrival location (so the daemon's updates stay HOT, migration 0047); completing it
    // fills the location in from the coordinates.
    c.execute(
        "UPDATE dbx_aviation.flight_sessions
            SET arrival_latitude = $2, arrival_longitude = $3, flight_status = 'active'
          WHERE session_id = $1",
        &[&ber, &ZURICH.0, &ZURICH.1],
    )
    .await
    .unwrap();
    let located: bool = c
        .query_one(
            "SELECT arrival_location IS NOT NULL FROM dbx_aviation.flight_sessions
              WHERE session_id = $1",
            &[&ber],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!located, "an active flight has no arrival location");
    c.execute(
        "UPDATE dbx_aviation.flight_sessions SET flight_status = 'completed' WHERE session_id = $1",
        &[&ber],
    )
    .await
    .unwrap();

    // Distance between the endpoints: the great circle on PostGIS's sphere, which is the
    // sphere the daemon's total_distance_km uses (6371.0088 km), and the spheroid close to it.
    let row = c
        .query_one(
            "SELECT ST_Distance(departure_location, arrival_location, false) / 1000,
                    ST_Distance(departure_location, arrival_location) / 1000
               FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&zrh_gva],
        )
        .await
        .unwrap();
    let (sphere, spheroid): (f64, f64) = (row.get(0), row.get(1));
    let expected = dbx_batcher_haversine(ZURICH, GENEVA);
    assert!(
        (sphere - expected).abs() < 1e-6 * expected,
        "{sphere} vs {expected}"
    );
    assert!(
        (spheroid - expected).abs() < 0.005 * expected,
        "{spheroid} vs {expected}"
    );
    assert!(
        (200.0..250.0).contains(&sphere),
        "ZRH-GVA is about 225 km: {sphere}"
    );

    // Radius queries: 50 km around Zurich is Zurich and not Basel (about 80 km away); 100 km
    // takes Basel too; arrivals are found the same way.
    let mut near_zurich = vec![zrh_gva, other_zrh];
    near_zurich.sort();
    assert_eq!(departing_within(&c, ZURICH, 50.0).await, near_zurich);
    let mut within_100 = vec![zrh_gva, bsl_zrh, other_zrh];
    within_100.sort();
    assert_eq!(departing_within(&c, ZURICH, 100.0).await, within_100);
    let arriving: i64 = c
        .query_one(
            "SELECT count(*) FROM dbx_aviation.flight_sessions
              WHERE ST_DWithin(arrival_location, ST_MakePoint($2, $1)::geography, 1000)",
            &[&ZURICH.0, &ZURICH.1],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(arriving, 2, "Basel→Zurich and Berlin→(moved to) Zurich");

    // Both radius queries can use their GiST index.
    for column in ["departure_location", "arrival_location"] {
        let plan = explain_without_seqscan(
            &c,
            &format!(
                "SELECT session_id FROM dbx_aviation.flight_sessions
                  WHERE ST_DWithin({column}, ST_MakePoint(8.5, 47.4)::geography, 50000)"
            ),
        )
        .await;
        assert!(
            plan.contains(&format!("flight_sessions_{column}")),
            "{column}: {plan}"
        );
    }

    // Readers stay under row-level security in spatial queries too.
    let reader = cases::connect_as(&db, &c, "dbx_analytics_service").await;
    reader
        .batch_execute(&format!(
            "BEGIN; SELECT dbx_aviation.set_org_context('{org}')"
        ))
        .await
        .unwrap();
    assert_eq!(departing_within(&reader, ZURICH, 50.0).await, vec![zrh_gva]);
    reader.batch_execute("COMMIT").await.unwrap();
}

/// The plan of `sql` with sequential scans discouraged (a handful of rows would otherwise
/// always be scanned).
async fn explain_without_seqscan(c: &Client, sql: &str) -> String {
    c.batch_execute("SET enable_seqscan = off").await.unwrap();
    let plan = c
        .query(&format!("EXPLAIN {sql}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n");
    c.batch_execute("RESET enable_seqscan").await.unwrap();
    plan
}

/// The great-circle distance the daemon keeps in total_distance_km (dbx-batcher's haversine
/// on a sphere of 6371.0088 km), computed here independently.
fn dbx_batcher_haversine(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1, la2, lo2) = (
        a.0.to_radians(),
        a.1.to_radians(),
        b.0.to_radians(),
        b.1.to_radians(),
    );
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * 6371.0088 * h.sqrt().asin()
}

#[tokio::test]
async fn a_postgis_choice_the_database_cannot_honour_is_refused_before_anything_is_applied() {
    // A database set up on the PostGIS branch is not moved to the plain one.
    let (_db, mut c) = cases::migrated().await;
    match migrate::apply_with(&mut c, PostgisMode::Off).await {
        Err(MigrateError::Postgis(PostgisError::AlreadyThere { what, .. })) => {
            assert!(what.contains("uses PostGIS"), "{what}")
        }
        other => panic!("expected AlreadyThere, got {other:?}"),
    }
    assert!(migrate::apply_with(&mut c, PostgisMode::Auto)
        .await
        .unwrap()
        .is_empty());

    // Nor the other way round.
    let plain = TestDb::new().await;
    let mut p = plain.client().await;
    migrate::apply_with(&mut p, PostgisMode::Off).await.unwrap();
    let e = migrate::apply_with(&mut p, PostgisMode::Require)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("\"{}\" was set up without PostGIS", plain.name())),
        "{e}"
    );

    // A fresh database that has PostGIS already (as from a template) would take the PostGIS
    // branch: `off` refuses it and applies nothing.
    let fresh = TestDb::new().await;
    let mut f = fresh.client().await;
    f.batch_execute("CREATE EXTENSION postgis").await.unwrap();
    let e = migrate::apply_with(&mut f, PostgisMode::Off)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("DROP EXTENSION postgis"), "{e}");
    let status = migrate::status(&f).await.unwrap();
    assert!(status.iter().all(|s| s.state == MigrationState::Pending));
    // Under `require` the same database is set up on the PostGIS branch.
    migrate::apply_with(&mut f, PostgisMode::Require)
        .await
        .unwrap();
    let state = PostgisState::read(&f).await.unwrap();
    assert!(state.endpoints, "{state:?}");
    assert!(
        state
            .describe(PostgisMode::Require)
            .starts_with(&format!("PostGIS {}", state.installed.clone().unwrap())),
        "{state:?}"
    );
}
