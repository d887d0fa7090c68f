//! `CopyEncoder` output COPYed into a real PostgreSQL table with the contract's column
//! types and read back, edge values included.

mod common;

use dbx_batcher::copy::{CopyEncoder, COLUMNS};
use dbx_core::Point;
use dbx_testkit::TestDb;
use futures::SinkExt;
use uuid::Uuid;

#[tokio::test]
async fn encoder_round_trips_through_postgres() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (org_id uuid NOT NULL, aircraft_id uuid NOT NULL, session_id uuid NOT NULL, \
         ts timestamptz NOT NULL, seq bigint NOT NULL, latitude double precision, longitude double precision, \
         altitude_m real, ground_speed_mps real, vertical_speed_mps real, heading_deg real, roll_deg real, \
         pitch_deg real, yaw_deg real, airspeed_mps real, battery_voltage real, battery_current real, \
         battery_remaining_pct real, motor_rpm real[], control_surfaces real[], gps_fix smallint, \
         satellites smallint, temperature_c real, extra jsonb)",
    )
    .await
    .unwrap();
    let (org, air, ses) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let points = vec![
        Point::new(0, 0), // the Unix epoch, before PostgreSQL's
        Point {
            lat: Some(-90.0),
            lon: Some(180.0),
            alt: Some(f32::MAX),
            gs: Some(f32::MIN_POSITIVE),
            hdg: Some(360.0),
            bp: Some(-0.0),
            rpm: Some(vec![]),
            cs: Some((0..16).map(|i| i as f32 * 1.5 - 3.0).collect()),
            fix: Some(8),
            sats: Some(255),
            extra: Some(r#"{"b64":"AAE=","nested":{"x":[1,null,"é"]}}"#.into()),
            ..Point::new(1_767_225_599_999_999, i64::MAX)
        },
        Point {
            temp: Some(-273.15),
            rpm: Some(vec![12000.5]),
            extra: Some("{}".into()),
            ..Point::new(-1, i64::MIN)
        },
    ];
    let mut enc = CopyEncoder::new(4096);
    enc.begin();
    for p in &points {
        enc.push(&org, &air, &ses, p);
    }
    let data = enc.finish();
    let sink = c
        .copy_in::<_, bytes::Bytes>(&format!("COPY t ({COLUMNS}) FROM STDIN (FORMAT binary)"))
        .await
        .unwrap();
    futures::pin_mut!(sink);
    sink.send(data).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 3);

    let rows = c
        .query(
            &format!("SELECT {COLUMNS}, motor_rpm::text, extra::text FROM t ORDER BY ts"),
            &[],
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    for r in &rows {
        assert_eq!(
            (
                r.get::<_, Uuid>(0),
                r.get::<_, Uuid>(1),
                r.get::<_, Uuid>(2)
            ),
            (org, air, ses)
        );
        got.push(common::point_from_row(r));
    }
    let mut want = vec![points[2].clone(), points[0].clone(), points[1].clone()];
    for w in &mut want {
        w.extra = w.extra.as_deref().map(|e| {
            serde_json::from_str::<serde_json::Value>(e)
                .unwrap()
                .to_string()
        });
    }
    assert_eq!(got, want);
    // The text forms PostgreSQL shows for the arrays and the document.
    assert_eq!(
        rows[0].get::<_, Option<String>>(24).as_deref(),
        Some("{12000.5}")
    );
    assert_eq!(rows[1].get::<_, Option<String>>(24), None);
    assert_eq!(rows[2].get::<_, Option<String>>(24).as_deref(), Some("{}"));
    assert_eq!(
        rows[2].get::<_, Option<String>>(25).as_deref(),
        Some(r#"{"b64": "AAE=", "nested": {"x": [1, null, "é"]}}"#)
    );
}
